"""Training and evaluation loops for echo pretraining and task adapters (plain PyTorch, tqdm progress).

Echo seed defaults: Adam, cross-entropy (segmentation, view) or Huber loss (volume, age), optional cosine
annealing from ``lr`` to ``lr_min`` (the tables' "0.001 to 0.0001"). Metrics are reported with and without
poor-quality images (Tables I-IV): Dice per structure, accuracy, MAE in ml / years.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

from monai.utils import optional_import

from monai_peft.io import atomic_write_json

from .data import camus_task_dataset, echonet_task_dataset
from .models import EchoBackbone, EchoTaskModel, segformer_config
from .multitask import MultiTaskEchoModel, save_backbone
from .tasks import TaskSpec, get_task

tqdm, _ = optional_import("tqdm", name="tqdm")

__all__ = ["fit", "evaluate", "pretrain", "train_adapter", "write_json"]

logger = logging.getLogger(__name__)


def write_json(obj: dict, path: str | os.PathLike) -> Path:
    """Write ``obj`` as indented JSON atomically; numpy scalars and tensors become floats."""
    return atomic_write_json(path, obj, default=float)


def fit(model: nn.Module, loader: DataLoader, loss_fn: nn.Module, epochs: int = 1, lr: float = 1e-3,
        lr_min: float | None = None, device: str | torch.device = "cpu", progress: bool = True) -> list[float]:
    """Train the trainable parameters of ``model`` with Adam.

    Args:
        model: maps ``batch["image"]`` ``(B, 1, H, W)`` to the loss input.
        loader: yields dicts with ``"image"`` and ``"label"``.
        loss_fn: ``loss_fn(output, label)``.
        epochs: epochs. Default 1.
        lr: learning rate. Default 1e-3.
        lr_min: cosine annealing from ``lr`` to ``lr_min`` per epoch; None keeps ``lr``. Default None.
        device: device. Default CPU.
        progress: show a tqdm bar. Default True.

    Returns:
        The mean training loss of each epoch.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("fit: the model has no trainable parameters.")
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(epochs, 1), eta_min=lr_min) if lr_min else None
    model.to(device).train()
    history = []
    for epoch in range(epochs):
        losses = []
        it = tqdm(loader, desc=f"epoch {epoch + 1}/{epochs}", leave=False, disable=not progress) if tqdm else loader
        for batch in it:
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(batch["image"].to(device)), batch["label"].to(device))
            loss.backward()
            opt.step()
            losses.append(loss.item())
        if sched is not None:
            sched.step()
        history.append(float(np.mean(losses)))
        logger.info("epoch %d/%d: loss %.4f", epoch + 1, epochs, history[-1])
    return history


def _dice(pred: torch.Tensor, label: torch.Tensor, num_classes: int) -> np.ndarray:
    """Per-image Dice of classes 1..K-1: ``(B, K-1)``; NaN where both are empty."""
    out = np.full((pred.shape[0], num_classes - 1), np.nan)
    for c in range(1, num_classes):
        p, g = pred == c, label == c
        inter = (p & g).flatten(1).sum(1).float()
        denom = (p.flatten(1).sum(1) + g.flatten(1).sum(1)).float()
        ok = denom > 0
        out[ok.numpy(), c - 1] = (2 * inter[ok] / denom[ok]).numpy()
    return out


def _summary(spec: TaskSpec, scores: np.ndarray) -> dict:
    if len(scores) == 0:
        return {"n": 0}
    if spec.kind == "segmentation":
        per = np.nanmean(scores, axis=0)
        d = {f"dice_{n.replace(' ', '_')}": float(v) for n, v in zip(spec.class_names[1:], per)}
        d["mean_dice"] = float(np.nanmean(per))
    elif spec.kind == "classification":
        d = {"accuracy": float(np.mean(scores))}
    else:
        d = {"mae": float(np.mean(scores))}
    d["n"] = int(len(scores))
    return d


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, spec: TaskSpec | str, batch_size: int = 8,
             device: str | torch.device = "cpu") -> dict:
    """Evaluate ``model`` on ``dataset`` for ``spec``, with and without poor-quality images.

    Returns:
        ``{"task", "all": {...}, "no_poor": {...}}`` with Dice per structure + mean Dice (segmentation),
        accuracy (classification) or MAE in target units (regression).
    """
    spec = get_task(spec) if isinstance(spec, str) else spec
    model.to(device).eval()
    scores, poor = [], []
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        pred = spec.decode(model(batch["image"].to(device))).cpu()
        label = batch["label"]
        if spec.kind == "segmentation":
            s = _dice(pred, label[:, 0] if label.ndim == 4 else label, spec.num_outputs)
        elif spec.kind == "classification":
            s = (pred == label).float().numpy()
        else:
            s = (pred - spec.decode(label)).abs().mean(dim=1).numpy()
        scores.append(s)
        q = batch.get("quality", [""] * len(pred))
        poor += [str(x).lower() == "poor" for x in q]
    allv = np.concatenate(scores) if scores else np.zeros((0,))
    keep = ~np.asarray(poor, dtype=bool)
    return {"task": spec.name, "all": _summary(spec, allv), "no_poor": _summary(spec, allv[keep])}


def pretrain(echonet_root: str | os.PathLike, out_dir: str | os.PathLike, variant: str = "b0", size: int = 128,
             epochs: int = 1, batch_size: int = 8, lr: float = 1e-3, lr_min: float | None = 1e-4,
             config_overrides: dict | None = None, init_weights: str | os.PathLike | None = None,
             device: str = "cpu", progress: bool = True) -> dict:
    """Pretext task of the echo seed: LV segmentation of EchoNet-Dynamic ED/ES frames.

    Writes ``out_dir/backbone/`` (backbone + pretext head, see :func:`save_backbone`) and
    ``out_dir/pretrain_metrics.json``.

    Args:
        echonet_root: EchoNet-Dynamic folder. out_dir: output folder.
        variant: ``"b0"`` or ``"b2"``. size: input side. epochs / batch_size / lr / lr_min: optimisation.
        config_overrides: ``SegformerConfig`` overrides (e.g. narrow widths for tests).
        init_weights: optional local weights for the backbone (:func:`load_backbone_weights`).
        device: device. progress: tqdm bars.
    """
    from .models import load_backbone_weights

    t0 = time.time()
    spec = get_task("lv_segmentation")
    train_ds = echonet_task_dataset(echonet_root, "TRAIN", size)
    backbone = EchoBackbone(segformer_config(variant, **(config_overrides or {})))
    if init_weights:
        load_backbone_weights(backbone, init_weights)
    model = EchoTaskModel(backbone, spec.build_head(backbone.out_channels))
    history = fit(model, DataLoader(train_ds, batch_size=batch_size, shuffle=True), spec.loss(), epochs, lr,
                  lr_min, device, progress)
    metrics: dict = {"task": spec.name, "variant": variant, "image_size": size, "train_loss": history,
                     "num_train_frames": len(train_ds)}
    try:
        val_ds = echonet_task_dataset(echonet_root, ["VAL", "TEST"], size)
        metrics["val"] = evaluate(model, val_ds, spec, batch_size, device)
    except ValueError as e:
        logger.warning("pretrain: no validation frames (%s)", e)
    metrics["seconds"] = time.time() - t0
    out = Path(out_dir)
    save_backbone(backbone.cpu(), out / "backbone", head=model.head.cpu(), task=spec,
                  extra={"image_size": size, "variant": variant, "pretext": "EchoNet-Dynamic LV segmentation"})
    write_json(metrics, out / "pretrain_metrics.json")
    return metrics


def train_adapter(backbone_dir: str | os.PathLike, camus_root: str | os.PathLike, task: str,
                  out_dir: str | os.PathLike, layers: str = "attention", r: int = 4, epochs: int = 1,
                  batch_size: int = 8, lr: float = 1e-3, lr_min: float | None = None, size: int = 128,
                  head_kwargs: dict | None = None, train_split: Sequence[str] | str | None = "training",
                  eval_split: Sequence[str] | str | None = "testing", device: str = "cpu",
                  progress: bool = True) -> dict:
    """Train one task adapter (LoRA + head) on CAMUS and evaluate it (echo seed, section III.A-D).

    Writes ``out_dir/<task>/`` (see :meth:`MultiTaskEchoModel.save_task`) and ``out_dir/<task>_metrics.json``.

    Args:
        backbone_dir: pretrained backbone folder. camus_root: CAMUS folder. task: ``segmentation``, ``view``,
            ``volume`` or ``age``. out_dir: output folder. layers: ``"attention"`` or ``"all"``. r: LoRA rank.
        epochs / batch_size / lr / lr_min: optimisation. size: input side (default 128).
        head_kwargs: :class:`CNNHead` arguments. train_split / eval_split: official CAMUS splits.
        device: device. progress: tqdm bars.
    """
    t0 = time.time()
    model = MultiTaskEchoModel.for_training(backbone_dir, task, layers, r, head_kwargs)
    spec = model.tasks[task]
    train_ds = camus_task_dataset(camus_root, spec, split=train_split, size=size)
    history = fit(model, DataLoader(train_ds, batch_size=batch_size, shuffle=True), spec.loss(), epochs, lr, lr_min,
                  device, progress)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    metrics: dict = {"task": task, "layers": layers, "r": r, "train_loss": history, "trainable_params": trainable,
                     "total_params": total, "num_train_frames": len(train_ds)}
    try:
        metrics["test"] = evaluate(model, camus_task_dataset(camus_root, spec, split=eval_split, size=size), spec,
                                   batch_size, device)
    except ValueError as e:
        logger.warning("train_adapter: no evaluation frames (%s)", e)
    metrics["seconds"] = time.time() - t0
    model.cpu().save_task(task, Path(out_dir) / task)
    write_json(metrics, Path(out_dir) / f"{task}_metrics.json")
    return metrics
