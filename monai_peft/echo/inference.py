"""Batch inference of the echo models on MONAI's ``SupervisedEvaluator``: masks as NIfTI, predictions as JSON.

Each task adapter runs over all frames in one evaluator pass (the backbone is loaded once and the adapters are
switched between passes), with the CT bundles' handlers: parameter report, inference cost meter (seconds per
frame, peak memory) and the run record ``results.json`` in the output folder.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from monai.engines import SupervisedEvaluator
from torch.utils.data import DataLoader

from monai_peft.handlers import CostMeter, ParameterReportHandler
from monai_peft.io import atomic_path

from .camus import find_camus, load_camus_record
from .data import center_crop_resize, preprocess_image
from .echonet import find_echonet, load_echonet_frames
from .handlers import EchoMetricsWriter, PredictionCollector
from .metrics import dice_per_case
from .multitask import load_backbone, load_pretrained_task_model
from .predictor import EchoPredictor
from .tasks import get_task
from .training import write_json

__all__ = ["infer_camus", "infer_echonet_lv", "write_mask", "run_frames"]


def write_mask(mask: np.ndarray, spacing: Sequence[float], path: str | os.PathLike) -> Path:
    """Write a ``(H, W)`` uint8 mask with ``(row, col)`` spacing as NIfTI, atomically."""
    import SimpleITK as sitk

    p = Path(path)
    img = sitk.GetImageFromArray(np.asarray(mask, np.uint8))
    img.SetSpacing((float(spacing[1]), float(spacing[0])))
    with atomic_path(p, suffix="".join(p.suffixes) or None) as tmp:  # SimpleITK picks the format from the suffix
        sitk.WriteImage(img, tmp)
    return p


def run_frames(network: torch.nn.Module, items: Sequence[dict], device: str | torch.device = "cpu",
               batch_size: int = 8, record_path: str | os.PathLike | None = None, run_info: dict | None = None,
               extra_handlers: Sequence = ()) -> dict[str, torch.Tensor]:
    """Run ``network`` over ``items`` (``{"image": (1, S, S), "name", ...}``) on a ``SupervisedEvaluator``.

    Args:
        network: the model (in eval mode during the run).
        items: preprocessed frames with unique names (and a ``label`` when ``extra_handlers`` need one).
        device / batch_size: run settings.
        record_path: run record for the parameter report and the inference costs; None writes none.
        run_info: facts for the run record.
        extra_handlers: more evaluator handlers (e.g. an :class:`~monai_peft.echo.handlers.EchoMetricsWriter`).

    Returns:
        ``{name: output}`` (CPU tensors without batch dimension).
    """
    collector = PredictionCollector()
    handlers = [ParameterReportHandler(network, record_path=record_path, run_info=run_info),
                CostMeter(phase="inference", record_path=record_path), collector, *extra_handlers]
    SupervisedEvaluator(device=torch.device(device), network=network.to(device), val_handlers=handlers,
                        val_data_loader=DataLoader(list(items), batch_size=batch_size, shuffle=False)).run()
    return collector.outputs


def infer_camus(backbone_dir: str | os.PathLike, task_dirs: Sequence[str | os.PathLike],
                dataset_dir: str | os.PathLike, output_dir: str | os.PathLike, split: str | None = "testing",
                image_size: int | None = None, device: str = "cpu", progress: bool = True) -> dict:
    """Run every task adapter on the CAMUS patients of ``split``.

    Writes ``output_dir/<patient>_<view>_<phase>_seg.nii.gz`` (when a segmentation task is loaded),
    ``output_dir/predictions.json`` (per patient the frame predictions (view, volume, age) and the study's
    EDV / ESV / EF from the volume adapter and from Simpson's method on the predicted masks, next to the
    dataset's values) and ``output_dir/results.json`` (parameters, inference costs).
    """
    pred = EchoPredictor(backbone_dir, task_dirs, image_size=image_size, device=device)
    recs = find_camus(dataset_dir, splits=split)
    if not recs:
        raise ValueError(f"{dataset_dir}: no CAMUS frames in split {split!r}.")
    out_dir = Path(output_dir)
    loaded = {(r.patient, r.view, r.phase): load_camus_record(r) for r in recs}
    items = [{"image": preprocess_image(d["image"], pred.image_size), "name": f"{p}_{v}_{ph}"}
             for (p, v, ph), d in loaded.items()]
    outputs: dict[str, dict[str, torch.Tensor]] = {}
    for task in pred.tasks:
        pred.model.set_task(task)
        outputs[task] = run_frames(pred.model, items, device, record_path=out_dir / "results.json",
                                   run_info={"task": "camus_inference", "tasks": pred.tasks})
    by_patient: dict[str, dict] = {}
    for r in recs:
        by_patient.setdefault(r.patient, {})[(r.view, r.phase)] = r
    results = {}
    for name, frames in sorted(by_patient.items()):
        shape = {k: loaded[(name, *k)]["image"].shape for k in frames}
        spacing = {k: loaded[(name, *k)]["spacing"] for k in frames}
        frame_preds = {f"{v}_{ph}": {t: pred.postprocess(t, outputs[t][f"{name}_{v}_{ph}"], shape[(v, ph)])
                                     for t in pred.tasks} for (v, ph) in frames}
        info = next(iter(frames.values())).info
        entry: dict = {"dataset": {"EDV": info.get("LVedv"), "ESV": info.get("LVesv"), "EF": info.get("EF"),
                                   "age": info.get("Age"), "quality": info.get("ImageQuality")}}
        if len(frames) == 4:
            study = pred.summarise_study(frame_preds, spacing)
            for k in ("volume_adapter", "simpson"):
                if k in study:
                    entry[k] = study[k]
        for key, fp in frame_preds.items():
            view, phase = key.split("_")
            row = {}
            for task, value in fp.items():
                if isinstance(value, np.ndarray):
                    path = write_mask(value, spacing[(view, phase)], out_dir / f"{name}_{key}_{task}.nii.gz")
                    row[task] = path.name
                else:
                    row[task] = value
            entry[key] = row
        results[name] = entry
    report = {"tasks": pred.tasks, "split": split, "patients": results}
    write_json(report, out_dir / "predictions.json")
    return report


@torch.no_grad()
def infer_echonet_lv(backbone_dir: str | os.PathLike, dataset_dir: str | os.PathLike, output_dir: str | os.PathLike,
                     split: str | None = "TEST", image_size: int | None = None, progress: bool = True) -> dict:
    """LV masks of the pretrained backbone + pretext head on EchoNet ED/ES frames (NIfTI + JSON with Dice)."""
    model = load_pretrained_task_model(backbone_dir).eval()
    size = int(image_size or load_backbone(backbone_dir)[1].get("image_size", 128))
    frames = load_echonet_frames(find_echonet(dataset_dir, splits=split))
    out_dir = Path(output_dir)
    items = [{"image": preprocess_image(it["image"], size), "label": center_crop_resize(it["label"], size, is_label=True),
              "name": f"{it['name']}_{it['phase']}"} for it in frames]
    spec = get_task("lv_segmentation")
    writer = EchoMetricsWriter("segmentation", class_names=spec.class_names, record_path=out_dir / "results.json")
    outputs = run_frames(model, items, record_path=out_dir / "results.json",
                         run_info={"task": "echonet_lv_inference"}, extra_handlers=[writer])
    rows = {}
    for it, src in zip(items, frames):
        logits = outputs[it["name"]][None]
        dice = float(dice_per_case(logits.argmax(1), it["label"], 2)[0, 0])
        mask = EchoPredictor._mask_to_image(logits, src["image"].shape)
        path = write_mask(mask, (1.0, 1.0), out_dir / f"{it['name']}_lv.nii.gz")
        rows[it["name"]] = {"mask": path.name, "dice": dice}
    report = {"split": split, "mean_dice": writer.summary()["all"]["mean_dice"], "frames": rows}
    write_json(report, out_dir / "predictions.json")
    return report
