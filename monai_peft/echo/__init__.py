"""Echocardiography: Segformer backbone with multi-task LoRA adapters, CAMUS / EchoNet-Dynamic readers,
Simpson's biplane volumes, phantoms and the echo paper's Tables I-IV (echo seed ``000``); video EF with a
VideoMAE foundation model (EchoAI, seed ``002``) in :mod:`monai_peft.echo.video`."""

from __future__ import annotations

from .camus import (CAMUS_LABELS, CamusRecord, camus_quality_report, find_camus, load_camus_record, read_image,
                    read_info_cfg)
from .compositions import ENCODER_LORA_TARGETS, FullSegformer, compose_task_model, task_spec_for
from .data import EchoTaskDataset, camus_task_dataset, center_crop_resize, echonet_task_dataset, preprocess_image
from .echonet import EchoNetRecord, find_echonet, load_echonet_frames, read_video, tracing_mask
from .handlers import EchoMetricsWriter, LossHistory, PredictionCollector
from .metrics import dice_per_case, regression_metrics
from .models import (LORA_TARGETS, MIT_VARIANTS, CNNHead, EchoBackbone, EchoTaskModel, SegmentationHead,
                     load_backbone_weights, lora_target_modules, segformer_config)
from .inference import infer_camus, infer_echonet_lv, run_frames, write_mask
from .multitask import MultiTaskEchoModel, echo_lora_config, load_backbone, load_pretrained_task_model, save_backbone
from .paper_tables import echo_tables, find_run_records
from .phantom import random_heart, render_frame, write_camus_phantom, write_echonet_phantom
from .predictor import EchoPredictor
from .presets import (COMPOSITIONS, ECHO_PRESETS, EchoPreset, best_preset, get_preset, presets_markdown,
                      resolve_preset)
from .simpson import disk_profile, ejection_fraction, simpson_biplane, simpson_biplane_ef
from .tasks import TASKS, TaskSpec, get_task
from .training import evaluate, fit, pretrain, train_adapter, train_preset, write_json

__all__ = [
    "CAMUS_LABELS", "CamusRecord", "camus_quality_report", "find_camus", "load_camus_record", "read_image",
    "read_info_cfg",
    "ENCODER_LORA_TARGETS", "FullSegformer", "compose_task_model", "task_spec_for",
    "EchoTaskDataset", "camus_task_dataset", "center_crop_resize", "echonet_task_dataset", "preprocess_image",
    "EchoNetRecord", "find_echonet", "load_echonet_frames", "read_video", "tracing_mask",
    "EchoMetricsWriter", "LossHistory", "PredictionCollector", "dice_per_case", "regression_metrics",
    "LORA_TARGETS", "MIT_VARIANTS", "CNNHead", "EchoBackbone", "EchoTaskModel", "SegmentationHead",
    "load_backbone_weights", "lora_target_modules", "segformer_config",
    "MultiTaskEchoModel", "echo_lora_config", "load_backbone", "load_pretrained_task_model", "save_backbone",
    "infer_camus", "infer_echonet_lv", "run_frames", "write_mask", "echo_tables", "find_run_records",
    "random_heart", "render_frame", "write_camus_phantom", "write_echonet_phantom", "EchoPredictor",
    "COMPOSITIONS", "ECHO_PRESETS", "EchoPreset", "best_preset", "get_preset", "presets_markdown", "resolve_preset",
    "disk_profile", "ejection_fraction", "simpson_biplane", "simpson_biplane_ef", "TASKS", "TaskSpec", "get_task",
    "evaluate", "fit", "pretrain", "train_adapter", "train_preset", "write_json",
]
