"""The video EF task of ``monai-peft echo compare``: EF regression on a MAE-pretrained VideoMAE (EchoAI, seed 002).

One :data:`~monai_peft.echo.compare.COMPARE_TASKS` entry (``"ef"``) built from the video pieces, nothing new: the
EchoNet-Dynamic reader and clip transforms (:mod:`.data`), the VideoMAE encoder from a local checkpoint
(:class:`~.model.VideoEFNet`) with a fresh :class:`~.model.EFHead` per run, :class:`~.engines.EFLoss`, and the
evaluator of ``video-train`` (:func:`~.engines.build_ef_evaluator`: per-video EF averaged over clips, MAE / RMSE /
R^2 from MONAI / ignite metrics). Training is the comparison's own loop (:func:`monai_peft.echo.training.fit`).

Defaults (no ``video_checkpoint``, no ``echonet``): phantom videos (:func:`~.demo.write_video_phantom`) and the tiny
VideoMAE of ``monai-peft echo video-demo``, MAE-pretrained here with 90% tube masking on the TRAIN videos.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch.nn as nn
from monai.data import CacheDataset, DataLoader

from monai_peft.io import atomic_write_json
from monai_peft.lora import lora_config
from monai_peft.targeting import NameRegex

from ..echonet import find_echonet
from ..metrics import regression_metrics
from .data import echonet_video_datalist, video_transforms
from .demo import pretrain_tiny_videomae, write_video_phantom
from .engines import EFLoss, build_ef_evaluator
from .model import VIDEO_LORA_TARGETS, EFHead, VideoEFNet
from .runs import METHOD_DEFAULTS

if TYPE_CHECKING:
    from ..compare import CompareSettings, TaskSetup

__all__ = ["video_ef_task", "ef_videos", "ef_checkpoint", "video_encoder"]


def ef_videos(settings: CompareSettings) -> Path:
    """The EchoNet-Dynamic folder of the EF task: ``settings.echonet``, or phantom videos written once into
    ``out/data/echonet_ef`` (``settings.num_ef_videos`` of them)."""
    if settings.echonet:
        return Path(settings.echonet)
    root = Path(settings.out) / "data" / "echonet_ef"
    if not ((root / "FileList.csv").is_file()
            and len(find_echonet(root, require_tracings=False)) == settings.num_ef_videos):
        write_video_phantom(root, settings.num_ef_videos, seed=settings.seed + 3)
    return root


def ef_checkpoint(settings: CompareSettings, videos: Path) -> Path:
    """The pretrained VideoMAE folder: ``settings.video_checkpoint``, or the tiny VideoMAE MAE-pretrained here once on
    the TRAIN videos for ``settings.video_pretrain_epochs`` epochs (reused by later runs with the same settings)."""
    if settings.video_checkpoint:
        return Path(settings.video_checkpoint)
    run = Path(settings.out) / "video_pretrain"
    recipe = {"videos": str(videos.resolve()), "epochs": settings.video_pretrain_epochs, "seed": settings.seed,
              "train_videos": sorted(r.name for r in find_echonet(videos, "TRAIN", require_tracings=False))}
    stamp = run / "compare_recipe.json"
    if (run / "checkpoint" / "config.json").is_file() and stamp.is_file() and json.loads(stamp.read_text()) == recipe:
        return run / "checkpoint"
    pretrain_tiny_videomae(videos, run, settings.video_pretrain_epochs, seed=settings.seed,
                           progress=settings.progress)
    atomic_write_json(stamp, recipe)
    return run / "checkpoint"


def video_encoder(checkpoint: str | Path) -> VideoEFNet:
    """The VideoMAE of ``checkpoint`` as a comparison backbone: clips ``(B, 1, T, H, W)`` -> mean token ``(B, D)``.

    A :class:`VideoEFNet` whose head is ``nn.Identity``: the comparison puts a fresh :class:`EFHead` beside every
    method (``TaskSetup.new_head``), so head-only and the other methods train the same head.
    """
    net = VideoEFNet.from_checkpoint(checkpoint)
    net.head = nn.Identity()
    return net


def video_ef_task(settings: CompareSettings) -> TaskSetup:
    """The EF task on the FileList's TRAIN / VAL / TEST videos: one random clip per training video and epoch,
    ``settings.video_clips`` evenly spread clips averaged per video at evaluation; score ``mae``, ``rmse``, ``r2``;
    the reference is the training mean EF predicted for every test video."""
    from ..compare import TaskSetup

    videos = ef_videos(settings)
    pretrained = video_encoder(ef_checkpoint(settings, videos))
    cfg = pretrained.videomae_config
    stride = settings.video_stride

    train_ef = [r.ef for r in find_echonet(videos, "TRAIN", require_tracings=False)]
    test_ef = [r.ef for r in find_echonet(videos, "TEST", require_tracings=False)]
    mean = sum(train_ef) / len(train_ef)

    def dataset(split: str, train: bool) -> CacheDataset:
        tf = video_transforms(cfg.num_frames, stride, cfg.image_size, train=train, clips=settings.video_clips)
        return CacheDataset(echonet_video_datalist(videos, split), tf, cache_rate=settings.video_cache_rate,
                            num_workers=None, progress=False)

    def score(model: nn.Module, ds: CacheDataset) -> dict:
        loader = DataLoader(ds, batch_size=settings.batch_size, shuffle=False)
        evaluator = build_ef_evaluator(model, loader, settings.device, progress=False, log_stats=False)
        evaluator.run()
        return evaluator.state.echo_summary["all"]

    return TaskSetup(
        train=dataset("TRAIN", True), val=dataset("VAL", False), test=dataset("TEST", False),
        new_backbone=lambda: copy.deepcopy(pretrained),
        new_head=lambda backbone: EFHead(backbone.videomae_config.hidden_size),
        loss=EFLoss(), score=score, epochs=settings.video_epochs,
        reference={"label": "predict the training mean EF", **regression_metrics([mean] * len(test_ef), test_ef)},
        # video-train's LoRA: the attention projections at its default rank
        lora_config=lambda backbone: lora_config(backbone, NameRegex(VIDEO_LORA_TARGETS["attention"]),
                                                 r=METHOD_DEFAULTS["lora"]["r"]),
    )
