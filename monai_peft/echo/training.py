"""Echo training and evaluation on MONAI engines: pretraining, task adapters, the paper's table rows.

Echo seed defaults: Adam, cross-entropy (segmentation, view) or Huber loss (volume, age), optional cosine
annealing from ``lr`` to ``lr_min`` (the tables' "0.001 to 0.0001"). Training runs on MONAI's
``SupervisedTrainer`` and evaluation on ``SupervisedEvaluator`` with the CT bundles' handlers (parameter report,
cost meter, run record ``results.json``); metrics are reported with and without poor-quality images (Tables
I-IV): Dice per structure, accuracy, MAE / RMSE / R^2 in ml or years.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch.utils.data import DataLoader
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.handlers import LrScheduleHandler
from monai.utils import optional_import

from monai_peft.handlers import CostMeter, ParameterReportHandler, save_adapter_folder
from monai_peft.io import atomic_write_json
from monai_peft.workflows.records import read_run_record, update_run_record

from .compositions import compose_task_model, task_spec_for
from .data import camus_task_dataset, echonet_task_dataset
from .handlers import EchoMetricsWriter, LossHistory
from .models import EchoBackbone, EchoTaskModel, segformer_config
from .multitask import MultiTaskEchoModel, load_backbone, save_backbone
from .presets import EchoPreset
from .tasks import TaskSpec, get_task

ProgressBar, has_progress_bar = optional_import("ignite.contrib.handlers", name="ProgressBar")

__all__ = ["fit", "evaluate", "pretrain", "train_adapter", "train_preset", "write_json"]

logger = logging.getLogger(__name__)


def write_json(obj: dict, path: str | os.PathLike) -> Path:
    """Write ``obj`` as indented JSON atomically; numpy scalars and tensors become floats."""
    return atomic_write_json(path, obj, default=float)


def fit(model: nn.Module, loader: Iterable, loss_fn: nn.Module, epochs: int = 1, lr: float = 1e-3,
        lr_min: float | None = None, device: str | torch.device = "cpu", progress: bool = True,
        record_path: str | os.PathLike | None = None, run_info: dict | None = None) -> list[float]:
    """Train the trainable parameters of ``model`` with Adam on a MONAI ``SupervisedTrainer``.

    Args:
        model: maps ``batch["image"]`` ``(B, 1, H, W)`` to the loss input.
        loader: yields dicts with ``"image"`` and ``"label"``.
        loss_fn: ``loss_fn(output, label)``.
        epochs: epochs. Default 1.
        lr: learning rate. Default 1e-3.
        lr_min: cosine annealing from ``lr`` to ``lr_min`` per epoch; None keeps ``lr``. Default None.
        device: device. Default CPU.
        progress: show a progress bar. Default True.
        record_path: run record receiving ``parameters`` (parameter report), ``costs`` (training time and
            memory) and ``run_info``; None writes none.
        run_info: facts for the run record (task, method, ...).

    Returns:
        The mean training loss of each epoch.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("fit: the model has no trainable parameters.")
    opt = torch.optim.Adam(params, lr=lr)
    history = LossHistory()
    handlers: list[Any] = [ParameterReportHandler(model, record_path=record_path, run_info=run_info),
                           CostMeter(phase="train", record_path=record_path, skip_first=1), history]
    if lr_min is not None:
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(int(epochs), 1), eta_min=lr_min)
        handlers.append(LrScheduleHandler(sched, print_lr=False))
    trainer = SupervisedTrainer(device=torch.device(device), max_epochs=int(epochs), train_data_loader=loader,
                                network=model.to(device), optimizer=opt, loss_function=loss_fn,
                                train_handlers=handlers)
    if progress and has_progress_bar:
        ProgressBar(persist=False).attach(trainer)
    trainer.run()
    for i, loss in enumerate(history.history):
        logger.info("epoch %d/%d: loss %.4f", i + 1, epochs, loss)
    return history.history


def evaluate(model: nn.Module, dataset: Iterable, spec: TaskSpec | str, batch_size: int = 8,
             device: str | torch.device = "cpu", record_path: str | os.PathLike | None = None,
             section: str = "test", output_dir: str | os.PathLike | None = None, progress: bool = False) -> dict:
    """Evaluate ``model`` on ``dataset`` for ``spec`` on a MONAI ``SupervisedEvaluator``.

    Args:
        model: the task model ``(B, 1, H, W)`` -> head output.
        dataset: a dataset of ``{"image", "label", "quality", "name"}`` dicts.
        spec: the task (its ``decode`` maps outputs and regression labels to units).
        batch_size: evaluation batch size. Default 8.
        device: device.
        record_path: run record receiving ``section`` and the inference ``costs``; None writes none.
        section: run-record section. Default ``"test"``.
        output_dir: folder for the regression predictions CSV and plot; None writes none.
        progress: progress bar. Default False.

    Returns:
        ``{"task", "all": {...}, "no_poor": {...}}`` (``no_poor`` when samples carry a quality) with Dice per
        structure + mean Dice (segmentation), accuracy (classification) or MAE / RMSE / R^2 in target units.
    """
    spec = get_task(spec) if isinstance(spec, str) else spec
    writer = EchoMetricsWriter(spec.kind, decode=spec.decode, class_names=spec.class_names, record_path=record_path,
                               section=section, output_dir=output_dir, prefix=f"{section}_{spec.name}_")
    evaluator = SupervisedEvaluator(
        device=torch.device(device), val_data_loader=DataLoader(dataset, batch_size=batch_size, shuffle=False),
        network=model.to(device), val_handlers=[CostMeter(phase="inference", record_path=record_path), writer])
    if progress and has_progress_bar:
        ProgressBar(persist=False).attach(evaluator)
    evaluator.run()
    return {"task": spec.name, **evaluator.state.echo_summary}


def pretrain(echonet_root: str | os.PathLike, out_dir: str | os.PathLike, variant: str = "b0", size: int = 128,
             epochs: int = 1, batch_size: int = 8, lr: float = 1e-3, lr_min: float | None = 1e-4,
             config_overrides: dict | None = None, init_weights: str | os.PathLike | None = None,
             device: str = "cpu", progress: bool = True) -> dict:
    """Pretext task of the echo seed: LV segmentation of EchoNet-Dynamic ED/ES frames.

    Writes ``out_dir/backbone/`` (backbone + pretext head, see :func:`save_backbone`), ``out_dir/results.json``
    (run record) and ``out_dir/pretrain_metrics.json``.

    Args:
        echonet_root: EchoNet-Dynamic folder. out_dir: output folder.
        variant: ``"b0"`` or ``"b2"``. size: input side. epochs / batch_size / lr / lr_min: optimisation.
        config_overrides: ``SegformerConfig`` overrides (e.g. narrow widths for tests).
        init_weights: optional local weights for the backbone (:func:`load_backbone_weights`).
        device: device. progress: progress bars.
    """
    from .models import load_backbone_weights

    t0 = time.time()
    out = Path(out_dir)
    record = out / "results.json"
    spec = get_task("lv_segmentation")
    train_ds = echonet_task_dataset(echonet_root, "TRAIN", size)
    backbone = EchoBackbone(segformer_config(variant, **(config_overrides or {})))
    if init_weights:
        load_backbone_weights(backbone, init_weights)
    model = EchoTaskModel(backbone, spec.build_head(backbone.out_channels))
    history = fit(model, DataLoader(train_ds, batch_size=batch_size, shuffle=True), spec.loss(), epochs, lr,
                  lr_min, device, progress, record, {"task": spec.name, "method": "full", "variant": variant})
    metrics: dict = {"task": spec.name, "variant": variant, "image_size": size, "train_loss": history,
                     "num_train_frames": len(train_ds)}
    try:
        val_ds = echonet_task_dataset(echonet_root, ["VAL", "TEST"], size)
        metrics["val"] = evaluate(model, val_ds, spec, batch_size, device, record, "validation")
    except ValueError as e:
        logger.warning("pretrain: no validation frames (%s)", e)
    metrics["seconds"] = time.time() - t0
    save_backbone(backbone.cpu(), out / "backbone", head=model.head.cpu(), task=spec,
                  extra={"image_size": size, "variant": variant, "pretext": "EchoNet-Dynamic LV segmentation"})
    write_json(metrics, out / "pretrain_metrics.json")
    return metrics


def train_preset(preset: EchoPreset, backbone_dir: str | os.PathLike, camus_root: str | os.PathLike,
                 out_dir: str | os.PathLike, name: str | None = None, size: int = 128,
                 train_split: Sequence[str] | str | None = "training", eval_split: Sequence[str] | str | None = "testing",
                 device: str = "cpu", progress: bool = True, **overrides: Any) -> dict:
    """Train one row of the echo paper's tables (a :class:`~monai_peft.echo.presets.EchoPreset`) on CAMUS and test it.

    Writes the run folder ``out_dir/<name>/``: ``results.json`` (run info, parameters, costs, ``test`` with and
    without poor images), and the trained part: ``adapter/`` (a task folder the multi-task predictor loads)
    for the ``backbone`` composition, ``model/`` (``model.safetensors``, :func:`~monai_peft.handlers.save_adapter_folder`)
    plus ``task.json`` otherwise.

    Args:
        preset: the configuration. backbone_dir: pretrained backbone. camus_root: CAMUS folder.
        out_dir: parent of the run folder. name: run folder name; default the preset's name.
        size: input side. Default 128. train_split / eval_split: official CAMUS splits.
        device / progress: run settings.
        overrides: preset fields to change (``layers``, ``rank``, ``lr``, ``lr_min``, ``epochs``, ``batch_size``,
            ``head_kwargs``, ``dropout``).

    Raises:
        ValueError: the backbone's MiT variant differs from the preset's, or an unknown override.
    """
    bad = sorted(set(overrides) - {"layers", "rank", "lr", "lr_min", "epochs", "batch_size", "head_kwargs", "dropout"})
    if bad:
        raise ValueError(f"train_preset: unknown override(s) {bad}.")
    for key in ("layers", "rank"):
        if overrides.get(key) is not None and preset.layers is None:
            raise ValueError(f"preset {preset.name!r} ({preset.experiment}) has no LoRA; {key!r} does not apply.")
    p = replace(preset, **overrides)
    variant = load_backbone(backbone_dir)[1].get("variant", "b0")
    if variant != p.variant:
        raise ValueError(f"preset {p.name!r} is for a MiT-{p.variant.upper()} backbone; {backbone_dir} holds "
                         f"MiT-{str(variant).upper()} (pretrain with --variant {p.variant}).")
    t0 = time.time()
    run = Path(out_dir) / (name or p.name)
    record = run / "results.json"
    spec = task_spec_for(p.task, p.head_kwargs, p.dropout)
    model = compose_task_model(backbone_dir, spec, p.composition, p.layers, p.rank)
    train_ds = camus_task_dataset(camus_root, spec, split=train_split, size=size)
    info = {"task": p.task, "preset": preset.name, "table": p.table, "experiment": p.experiment,
            "composition": p.composition, "variant": p.variant, "method": "lora" if p.layers else p.composition,
            "placement": p.layers, "rank": p.rank, "lr": p.lr, "lr_min": p.lr_min, "batch_size": p.batch_size,
            "epochs": p.epochs, "head_kwargs": p.head_kwargs, "image_size": size, "num_train_frames": len(train_ds)}
    history = fit(model, DataLoader(train_ds, batch_size=p.batch_size, shuffle=True), spec.loss(), p.epochs, p.lr,
                  p.lr_min, device, progress, record, info)
    update_run_record(record, {"train_loss": history, "train_seconds": time.time() - t0})
    try:
        evaluate(model, camus_task_dataset(camus_root, spec, split=eval_split, size=size), spec, p.batch_size, device,
                 record, "test", run)
    except ValueError as e:
        logger.warning("train_preset: no evaluation frames (%s)", e)
    model.cpu()
    if isinstance(model, MultiTaskEchoModel):
        model.save_task(spec.name, run / "adapter")
    else:
        save_adapter_folder(model, run / "model", info={"preset": preset.name, "composition": p.composition})
        atomic_write_json(run / "model" / "task.json", spec.to_dict())
    return read_run_record(record)


def train_adapter(backbone_dir: str | os.PathLike, camus_root: str | os.PathLike, task: str,
                  out_dir: str | os.PathLike, layers: str = "attention", r: int = 4, epochs: int = 1,
                  batch_size: int = 8, lr: float = 1e-3, lr_min: float | None = None, size: int = 128,
                  head_kwargs: dict | None = None, train_split: Sequence[str] | str | None = "training",
                  eval_split: Sequence[str] | str | None = "testing", device: str = "cpu",
                  progress: bool = True) -> dict:
    """Train one LoRA task adapter ("backbone of" composition) with explicit settings (echo seed, III.A-D).

    Writes the run folder ``out_dir/<task>/`` (see :func:`train_preset`); the task folder is
    ``out_dir/<task>/adapter``.

    Args:
        backbone_dir: pretrained backbone folder. camus_root: CAMUS folder. task: ``segmentation``, ``view``,
            ``volume`` or ``age``. out_dir: parent of the run folder. layers: ``"attention"`` or ``"all"``.
        r: LoRA rank. epochs / batch_size / lr / lr_min: optimisation. size: input side (default 128).
        head_kwargs: :class:`CNNHead` arguments. train_split / eval_split: official CAMUS splits.
        device: device. progress: progress bars.
    """
    variant = load_backbone(backbone_dir)[1].get("variant", "b0")
    preset = EchoPreset(f"{task}-{variant}-backbone-custom", task, f"backbone of MiT-{variant.upper()}", "backbone",
                        variant, layers, r, lr, lr_min, batch_size, epochs, dict(head_kwargs or {}))
    return train_preset(preset, backbone_dir, camus_root, out_dir, task, size, train_split, eval_split, device,
                        progress)
