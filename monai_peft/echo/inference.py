"""Batch inference used by the echo bundles and the CLI: masks as NIfTI, predictions as JSON."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from monai.utils import optional_import

from monai_peft.io import atomic_path

from .camus import find_camus, load_camus_record
from .data import preprocess_image
from .echonet import find_echonet, load_echonet_frames
from .multitask import load_pretrained_task_model
from .predictor import EchoPredictor
from .training import _dice, write_json

tqdm, _ = optional_import("tqdm", name="tqdm")

__all__ = ["infer_camus", "infer_echonet_lv", "write_mask"]


def write_mask(mask: np.ndarray, spacing: Sequence[float], path: str | os.PathLike) -> Path:
    """Write a ``(H, W)`` uint8 mask with ``(row, col)`` spacing as NIfTI, atomically."""
    import SimpleITK as sitk

    p = Path(path)
    img = sitk.GetImageFromArray(np.asarray(mask, np.uint8))
    img.SetSpacing((float(spacing[1]), float(spacing[0])))
    with atomic_path(p, suffix="".join(p.suffixes) or None) as tmp:  # SimpleITK picks the format from the suffix
        sitk.WriteImage(img, tmp)
    return p


def infer_camus(backbone_dir: str | os.PathLike, task_dirs: Sequence[str | os.PathLike],
                dataset_dir: str | os.PathLike, output_dir: str | os.PathLike, split: str | None = "testing",
                image_size: int | None = None, device: str = "cpu", progress: bool = True) -> dict:
    """Run every task adapter on the CAMUS patients of ``split``.

    Writes ``output_dir/<patient>_<view>_<phase>_seg.nii.gz`` (when a segmentation task is loaded) and
    ``output_dir/predictions.json``: per patient the frame predictions (view, volume, age) and the study's
    EDV / ESV / EF from the volume adapter and from Simpson's method on the predicted masks, next to the
    dataset's values.
    """
    pred = EchoPredictor(backbone_dir, task_dirs, image_size=image_size, device=device)
    recs = find_camus(dataset_dir, splits=split)
    by_patient: dict[str, dict] = {}
    for r in recs:
        by_patient.setdefault(r.patient, {})[(r.view, r.phase)] = r
    out_dir = Path(output_dir)
    results = {}
    items = sorted(by_patient.items())
    for name, frames in (tqdm(items, desc="CAMUS inference", disable=not progress) if tqdm else items):
        loaded = {k: load_camus_record(r) for k, r in frames.items()}
        study = pred.predict_study({k: (d["image"], d["spacing"]) for k, d in loaded.items()})
        info = next(iter(frames.values())).info
        entry: dict = {"dataset": {"EDV": info.get("LVedv"), "ESV": info.get("LVesv"), "EF": info.get("EF"),
                                   "age": info.get("Age"), "quality": info.get("ImageQuality")}}
        for key, fp in study["frames"].items():
            view, phase = key.split("_")
            row = {}
            for task, value in fp.items():
                if isinstance(value, np.ndarray):
                    path = write_mask(value, loaded[(view, phase)]["spacing"], out_dir / f"{name}_{key}_{task}.nii.gz")
                    row[task] = path.name
                else:
                    row[task] = value
            entry[key] = row
        for k in ("volume_adapter", "simpson"):
            if k in study:
                entry[k] = study[k]
        results[name] = entry
    report = {"tasks": pred.tasks, "split": split, "patients": results}
    write_json(report, out_dir / "predictions.json")
    return report


@torch.no_grad()
def infer_echonet_lv(backbone_dir: str | os.PathLike, dataset_dir: str | os.PathLike, output_dir: str | os.PathLike,
                     split: str | None = "TEST", image_size: int | None = None, progress: bool = True) -> dict:
    """LV masks of the pretrained backbone + pretext head on EchoNet ED/ES frames (NIfTI + JSON with Dice)."""
    from .data import center_crop_resize
    from .multitask import load_backbone

    model = load_pretrained_task_model(backbone_dir).eval()
    size = int(image_size or load_backbone(backbone_dir)[1].get("image_size", 128))
    items = load_echonet_frames(find_echonet(dataset_dir, splits=split))
    out_dir = Path(output_dir)
    rows = {}
    for it in (tqdm(items, desc="EchoNet inference", disable=not progress) if tqdm else items):
        logits = model(preprocess_image(it["image"], size)[None])
        mask = EchoPredictor._mask_to_image(logits, it["image"].shape)
        gt = center_crop_resize(it["label"], size, is_label=True)
        dice = float(_dice(logits.argmax(1), gt, 2)[0, 0])
        path = write_mask(mask, (1.0, 1.0), out_dir / f"{it['name']}_{it['phase']}_lv.nii.gz")
        rows[f"{it['name']}_{it['phase']}"] = {"mask": path.name, "dice": dice}
    dices = [r["dice"] for r in rows.values() if r["dice"] == r["dice"]]
    report = {"split": split, "mean_dice": float(np.mean(dices)) if dices else None, "frames": rows}
    write_json(report, out_dir / "predictions.json")
    return report
