"""Preprocessing (center crop + resize, intensity scaling) and task datasets for CAMUS and EchoNet.

Echo seed, section III: "a center crop is applied to get the same side ratios and afterwards the images
are resized to the same size"; preprocessing is otherwise kept to input normalisation.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .camus import CamusRecord, find_camus, load_camus_record
from .echonet import find_echonet, load_echonet_frames
from .tasks import TaskSpec, get_task

__all__ = ["center_crop_resize", "preprocess_image", "EchoTaskDataset", "camus_items", "camus_task_dataset",
           "echonet_task_dataset"]


def center_crop_resize(arr: np.ndarray | torch.Tensor, size: int | Sequence[int], is_label: bool = False) -> torch.Tensor:
    """Center-crop to a square (the shorter side) and resize.

    Args:
        arr: ``(H, W)`` or ``(C, H, W)`` array.
        size: output side length or ``(h, w)``.
        is_label: nearest-neighbour resizing and integer output (masks). Default False (bilinear).

    Returns:
        ``(C, h, w)`` tensor (``C = 1`` for 2D input); ``float32`` or ``int64`` for labels.
    """
    t = torch.as_tensor(np.asarray(arr) if not isinstance(arr, torch.Tensor) else arr)
    if t.ndim == 2:
        t = t[None]
    if t.ndim != 3:
        raise ValueError(f"center_crop_resize: expected (H, W) or (C, H, W), got shape {tuple(t.shape)}.")
    _, h, w = t.shape
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    t = t[:, top:top + s, left:left + s].float()
    out = (size, size) if isinstance(size, int) else tuple(size)
    if is_label:
        return F.interpolate(t[None], size=out, mode="nearest")[0].long()
    return F.interpolate(t[None], size=out, mode="bilinear", align_corners=False, antialias=True)[0]


def preprocess_image(image: np.ndarray | torch.Tensor, size: int | Sequence[int]) -> torch.Tensor:
    """Center crop + resize + scale to [0, 1] (uint8 range / 255): ``(H, W)`` -> ``(1, size, size)``."""
    return (center_crop_resize(image, size) / 255.0).clamp(0.0, 1.0)


class EchoTaskDataset(Dataset):
    """In-memory dataset of ``{"image": (1, S, S), "label": target, ...}`` for one task.

    Args:
        items: dicts with ``"image"`` ``(H, W)`` and the task's target field (``"label"`` mask, ``"view"``,
            ``"volume"``, ``"age"``) plus metadata (``"quality"``...).
        task: a :class:`TaskSpec` or task name.
        size: square input side. Default 128.
    """

    def __init__(self, items: Sequence[dict], task: TaskSpec | str, size: int = 128) -> None:
        self.task = get_task(task) if isinstance(task, str) else task
        self.size = size
        self.samples = []
        for i, it in enumerate(items):
            if self.task.target not in it or it[self.task.target] is None:
                raise ValueError(f"item {i} ({it.get('name', '?')}): no {self.task.target!r} for task {self.task.name!r}.")
            tgt = it[self.task.target]
            label = (center_crop_resize(tgt, size, is_label=True) if self.task.kind == "segmentation"
                     else self.task.encode(tgt))
            meta = {k: v for k, v in it.items() if k in ("name", "view", "phase", "quality", "split")}
            self.samples.append({"image": preprocess_image(it["image"], size), "label": label, **meta})

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        return self.samples[i]


def camus_items(records: Sequence[CamusRecord]) -> list[dict]:
    """Load CAMUS records into item dicts (image, label, view index, volume, age, quality...)."""
    items = []
    for r in records:
        d = load_camus_record(r)
        items.append({"image": d["image"], "label": d["label"], "spacing": d["spacing"], "name": r.patient,
                      "view": 0 if r.view == "2CH" else 1, "phase": r.phase, "volume": r.volume,
                      "age": float(r.info["Age"]), "quality": r.quality, "split": r.split})
    return items


def camus_task_dataset(root: str | os.PathLike, task: TaskSpec | str, split: str | Sequence[str] | None = None,
                       size: int = 128, exclude_poor: bool = False) -> EchoTaskDataset:
    """A CAMUS dataset for ``task``; frames without a mask are dropped for segmentation.

    Args:
        root: CAMUS folder (either release).
        task: task spec or name (``segmentation``, ``view``, ``volume``, ``age``).
        split: official split(s) to keep. Default all.
        size: input side. Default 128.
        exclude_poor: drop ``ImageQuality: Poor`` frames. Default False.
    """
    spec = get_task(task) if isinstance(task, str) else task
    recs = find_camus(root, splits=split)
    if spec.kind == "segmentation":
        recs = [r for r in recs if r.label is not None]
    if exclude_poor:
        recs = [r for r in recs if r.quality.lower() != "poor"]
    if not recs:
        raise ValueError(f"{root}: no CAMUS frames for task {spec.name!r} in split {split!r}.")
    return EchoTaskDataset(camus_items(recs), spec, size)


def echonet_task_dataset(root: str | os.PathLike, split: str | Sequence[str] | None = None,
                         size: int = 128) -> EchoTaskDataset:
    """EchoNet-Dynamic ED/ES frames with LV masks for the pretext task ``lv_segmentation``."""
    recs = find_echonet(root, splits=split)
    if not recs:
        raise ValueError(f"{root}: no traced EchoNet videos in split {split!r}.")
    return EchoTaskDataset(load_echonet_frames(recs), get_task("lv_segmentation"), size)
