"""Echocardiography: Segformer backbone with multi-task LoRA adapters, CAMUS / EchoNet-Dynamic readers,
Simpson's biplane volumes, phantoms (echo seed ``000``)."""

from __future__ import annotations

from .camus import (CAMUS_LABELS, CamusRecord, camus_quality_report, find_camus, load_camus_record, read_image,
                    read_info_cfg)
from .data import EchoTaskDataset, camus_task_dataset, center_crop_resize, echonet_task_dataset, preprocess_image
from .echonet import EchoNetRecord, find_echonet, load_echonet_frames, read_video, tracing_mask
from .models import (LORA_TARGETS, MIT_VARIANTS, CNNHead, EchoBackbone, EchoTaskModel, SegmentationHead,
                     load_backbone_weights, lora_target_modules, segformer_config)
from .inference import infer_camus, infer_echonet_lv, write_mask
from .multitask import MultiTaskEchoModel, echo_lora_config, load_backbone, load_pretrained_task_model, save_backbone
from .phantom import random_heart, render_frame, write_camus_phantom, write_echonet_phantom
from .predictor import EchoPredictor
from .simpson import disk_profile, ejection_fraction, simpson_biplane, simpson_biplane_ef
from .tasks import TASKS, TaskSpec, get_task
from .training import evaluate, fit, pretrain, train_adapter, write_json

__all__ = [
    "CAMUS_LABELS", "CamusRecord", "camus_quality_report", "find_camus", "load_camus_record", "read_image",
    "read_info_cfg",
    "EchoTaskDataset", "camus_task_dataset", "center_crop_resize", "echonet_task_dataset", "preprocess_image",
    "EchoNetRecord", "find_echonet", "load_echonet_frames", "read_video", "tracing_mask",
    "LORA_TARGETS", "MIT_VARIANTS", "CNNHead", "EchoBackbone", "EchoTaskModel", "SegmentationHead",
    "load_backbone_weights", "lora_target_modules", "segformer_config",
    "MultiTaskEchoModel", "echo_lora_config", "load_backbone", "load_pretrained_task_model", "save_backbone",
    "infer_camus", "infer_echonet_lv", "write_mask",
    "random_heart", "render_frame", "write_camus_phantom", "write_echonet_phantom", "EchoPredictor",
    "disk_profile", "ejection_fraction", "simpson_biplane", "simpson_biplane_ef", "TASKS", "TaskSpec", "get_task",
    "evaluate", "fit", "pretrain", "train_adapter", "write_json",
]
