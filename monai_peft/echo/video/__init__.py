"""Video ejection fraction with a VideoMAE foundation model: EchoAI (echo seed ``002``) on MONAI engines.

Masked-autoencoder pretraining with 90% tube masking, EF regression fine-tuning with LoRA / full fine-tuning /
linear probe (or any :func:`monai_peft.adapt` method), per-video predictions averaged over clips, MAE / RMSE /
R^2 of EF.
"""

from __future__ import annotations

from .data import (CropResizeVideod, LoadEchoVideod, SampleClipsd, echonet_video_datalist, video_datalist,
                   video_transforms)
from .engines import KEY_METRIC, ClipAverageInferer, EFLoss, build_ef_evaluator, build_ef_trainer, lower_is_better
from .mae import MASK_RATIO, ReconstructionLoss, VideoMAEPretrainNet, save_videomae_checkpoint, tube_mask
from .model import (EF_MEAN, EF_STD, VIDEO_LORA_TARGETS, VIDEOMAE_SIZES, EFHead, VideoEFNet, adapt_video_ef,
                    load_videomae_weights, read_videomae_checkpoint, read_videomae_config, videomae_config)
from .runs import (METHOD_DEFAULTS, build_video_ef_model, evaluate_video_ef, finetune_video_ef, load_ef_model,
                   predict_video_ef, pretrain_video)

__all__ = [
    "CropResizeVideod", "LoadEchoVideod", "SampleClipsd", "echonet_video_datalist", "video_datalist",
    "video_transforms",
    "KEY_METRIC", "ClipAverageInferer", "EFLoss", "build_ef_evaluator", "build_ef_trainer", "lower_is_better",
    "MASK_RATIO", "ReconstructionLoss", "VideoMAEPretrainNet", "save_videomae_checkpoint", "tube_mask",
    "EF_MEAN", "EF_STD", "VIDEO_LORA_TARGETS", "VIDEOMAE_SIZES", "EFHead", "VideoEFNet", "adapt_video_ef",
    "load_videomae_weights", "read_videomae_checkpoint", "read_videomae_config", "videomae_config",
    "METHOD_DEFAULTS", "build_video_ef_model", "evaluate_video_ef", "finetune_video_ef", "load_ef_model",
    "predict_video_ef", "pretrain_video",
]
