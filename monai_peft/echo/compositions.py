"""Adapter compositions of the echo paper's tables: what is frozen, what has LoRA, what trains fully.

Echo seed (``000``), section III: "Playing with the composition of the adapter is an attempt to find out whether
the entire pretrained model has an effect as a backbone or whether the encoder alone is sufficient." The
compositions (see :mod:`monai_peft.echo.presets`):

* ``backbone``: :class:`~monai_peft.echo.multitask.MultiTaskEchoModel` with one LoRA task (encoder + decoder
  projections, :data:`~monai_peft.echo.models.LORA_TARGETS`); saved as a task folder the multi-task predictor
  loads;
* ``full_mit``: :class:`FullSegformer` (encoder, decoder projections and the pretrained decoder's fusion layer)
  with LoRA in the encoder only (:data:`ENCODER_LORA_TARGETS`) and the decoder trained fully (peft
  ``modules_to_save``); the task head sees the fused ``(B, D, H/4, W/4)`` features;
* ``head``: the frozen backbone without LoRA and a trained task head;
* ``full``: backbone and head trained fully.
"""

from __future__ import annotations

import os
from dataclasses import replace

import torch
import torch.nn as nn

from monai.utils import optional_import

from .models import _ATTN, _EMBED, _MLP, _SR, EchoBackbone, EchoTaskModel, lora_target_modules
from .multitask import MultiTaskEchoModel, echo_lora_config, load_backbone, load_pretrained_task_model
from .tasks import TaskSpec, get_task

peft, _ = optional_import("peft")

__all__ = ["ENCODER_LORA_TARGETS", "FullSegformer", "compose_task_model", "task_spec_for"]

# LoRA in the MiT encoder only (the "full MiT" rows: the decoder trains fully instead)
ENCODER_LORA_TARGETS: dict[str, str] = {
    "attention": rf"(.*\.)?encoder\..*\.{_ATTN}",
    "all": rf"(.*\.)?encoder\..*\.({_ATTN}|{_MLP}|{_EMBED}|{_SR})",
}
_DECODER_MODULES = ["neck.proj.0", "neck.proj.1", "neck.proj.2", "neck.proj.3", "fuse"]


class FullSegformer(nn.Module):
    """The whole pretrained Segformer up to its last features: backbone, then the decoder's fusion layer.

    Args:
        backbone: the pretrained :class:`~monai_peft.echo.models.EchoBackbone` ``(B, 1, H, W) -> (B, 4D, H/4, W/4)``.
        fuse: the pretext head's fusion block (1x1 conv ``4D -> D``, BN, ReLU, dropout).

    Output: ``(B, D, H/4, W/4)``.
    """

    def __init__(self, backbone: EchoBackbone, fuse: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.fuse = fuse
        conv = next(m for m in fuse.modules() if isinstance(m, nn.Conv2d))
        self.out_channels = conv.out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fuse(self.backbone(x))


def task_spec_for(task: str, head_kwargs: dict | None = None, dropout: float | None = None) -> TaskSpec:
    """The task's :class:`TaskSpec` with another head (``head_kwargs``) and/or head ``dropout``."""
    spec = get_task(task, **(head_kwargs or {}))
    return replace(spec, dropout=float(dropout)) if dropout is not None else spec


def compose_task_model(backbone_dir: str | os.PathLike, spec: TaskSpec, composition: str = "backbone",
                       layers: str | None = "attention", rank: int | None = 4) -> nn.Module:
    """A trainable model for one task in one composition; only the parts the composition trains need gradients.

    Args:
        backbone_dir: pretrained backbone folder (``echo pretrain``; ``full_mit`` also needs its pretext head).
        spec: the task (:func:`task_spec_for`).
        composition: ``"backbone"``, ``"full_mit"``, ``"head"`` or ``"full"``. Default ``"backbone"``.
        layers: LoRA layers (``"attention"`` / ``"all"``) for ``backbone`` and ``full_mit``.
        rank: LoRA rank for ``backbone`` and ``full_mit``.

    Returns:
        ``backbone``: a :class:`MultiTaskEchoModel`; otherwise an :class:`EchoTaskModel` whose ``body`` is a
        peft model (``full_mit``) or the backbone.
    """
    if composition == "backbone":
        backbone, _ = load_backbone(backbone_dir)
        lora_target_modules(backbone, layers)  # fail early if the installed transformers names differ
        model = MultiTaskEchoModel(backbone)
        model.add_task(spec, echo_lora_config(layers, rank))
        return model
    if composition == "full_mit":
        if layers not in ENCODER_LORA_TARGETS:
            raise ValueError(f"layers: expected one of {sorted(ENCODER_LORA_TARGETS)}, got {layers!r}.")
        pretext = load_pretrained_task_model(backbone_dir)
        fuse = getattr(pretext.head, "fuse", None)
        if fuse is None:
            raise ValueError(f"{backbone_dir}: the pretext head has no 'fuse' block (expected a SegmentationHead).")
        body = FullSegformer(pretext.backbone, fuse)
        body.requires_grad_(False)
        if rank is None or not 1 <= int(rank) <= 64:
            raise ValueError(f"rank: expected a LoRA rank in 1..64, got {rank!r}.")
        lora = peft.LoraConfig(r=int(rank), lora_alpha=int(rank), target_modules=ENCODER_LORA_TARGETS[layers],
                               modules_to_save=list(_DECODER_MODULES), bias="none")
        peft_body = peft.get_peft_model(body, lora)
        return EchoTaskModel(peft_body, spec.build_head(body.out_channels))
    if composition in ("head", "full"):
        backbone, _ = load_backbone(backbone_dir)
        backbone.requires_grad_(composition == "full")
        return EchoTaskModel(backbone, spec.build_head(backbone.out_channels))
    raise ValueError(f"composition: expected 'backbone', 'full_mit', 'head' or 'full', got {composition!r}.")
