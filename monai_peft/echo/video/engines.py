"""MONAI engines for video EF: clip-averaging inferer, EF loss, trainer and evaluator factories.

EchoAI (seed 002, "Method Summary"): AdamW, cosine annealing, automatic mixed precision and gradient
accumulation; here AMP is ``SupervisedTrainer(amp=True)`` (CUDA autocast + gradient scaling) and
accumulation is its ``accumulation_steps``. The handlers are the CT bundles' (parameter report, adapter
checkpoints with resume, cost meter, run record) plus :class:`~monai_peft.echo.handlers.EchoMetricsWriter`
for EF MAE / RMSE / R^2.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.handlers import LrScheduleHandler, MeanAbsoluteError, StatsHandler, ValidationHandler, from_engine
from monai.inferers import Inferer
from monai.utils import optional_import

from monai_peft.handlers import AdapterCheckpoint, CostMeter, ParameterReportHandler
from monai_peft.workflows.engines import build_lr_scheduler, build_optimizer

from ..handlers import EchoMetricsWriter, LossHistory
from .model import EF_STD

ProgressBar, has_progress_bar = optional_import("ignite.contrib.handlers", name="ProgressBar")

__all__ = ["ClipAverageInferer", "EFLoss", "lower_is_better", "build_ef_evaluator", "build_ef_trainer"]

KEY_METRIC = "val_ef_mae"


def lower_is_better(current: float, previous: float) -> bool:
    """Metric comparison for MONAI engines whose key metric is an error (MAE)."""
    return current < previous


class ClipAverageInferer(Inferer):
    """Per-video prediction as the mean over its clips.

    Inputs ``(B, K, C, T, H, W)`` (``K`` clips per video, from ``SampleClipsd(clips=K)``) run through the network
    as ``B * K`` clips, ``clip_batch_size`` at a time, and the outputs are averaged over ``K``; 5D inputs
    ``(B, C, T, H, W)`` pass straight through.

    Args:
        clip_batch_size: clips per forward pass; None runs all ``B * K`` at once. Default None.
    """

    def __init__(self, clip_batch_size: int | None = None) -> None:
        if clip_batch_size is not None and int(clip_batch_size) < 1:
            raise ValueError(f"clip_batch_size must be >= 1 or None, got {clip_batch_size}.")
        self.clip_batch_size = clip_batch_size

    def __call__(self, inputs: torch.Tensor, network: Callable[..., torch.Tensor], *args: Any, **kwargs: Any) -> torch.Tensor:
        if inputs.ndim == 5:
            return network(inputs, *args, **kwargs)
        if inputs.ndim != 6:
            raise ValueError(f"ClipAverageInferer: expected (B, C, T, H, W) or (B, K, C, T, H, W), got {tuple(inputs.shape)}.")
        b, k = inputs.shape[:2]
        flat = inputs.flatten(0, 1)
        step = self.clip_batch_size or len(flat)
        out = torch.cat([network(flat[i:i + step], *args, **kwargs) for i in range(0, len(flat), step)])
        return out.reshape(b, k, *out.shape[1:]).mean(dim=1)


class EFLoss(nn.Module):
    """Mean squared error of EF in standard-deviation units: ``mean(((pred - target) / scale) ** 2)``.

    The EchoNet-Dynamic reference regression uses the MSE; dividing by the EF spread keeps the loss near 1 at
    the start, whatever the units.

    Args:
        scale: EF units per loss unit. Default :data:`~monai_peft.echo.video.model.EF_STD`.
    """

    def __init__(self, scale: float = EF_STD) -> None:
        super().__init__()
        if scale <= 0:
            raise ValueError(f"EFLoss scale must be > 0, got {scale}.")
        self.scale = float(scale)

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``pred``, ``target``: ``(B, 1)`` EF in percent."""
        return torch.mean(((pred.float() - target.float().reshape(pred.shape)) / self.scale) ** 2)


def build_ef_evaluator(network: nn.Module, loader: Iterable, device: str | torch.device = "cpu",
                       record_path: str | Path | None = None, section: str = "validation",
                       output_dir: str | Path | None = None, clip_batch_size: int | None = None,
                       measure_cost: bool = False, amp: bool = False, progress: bool = True,
                       log_stats: bool = True) -> SupervisedEvaluator:
    """Evaluator of per-video EF: key metric ``val_ef_mae`` (MONAI ``MeanAbsoluteError``), MAE/RMSE/R^2 summary.

    Args:
        network: the EF network (peft-wrapped or not), ``(B, 1, T, H, W)`` -> ``(B, 1)``.
        loader: batches ``{"image": (B, K, 1, T, H, W) or (B, 1, T, H, W), "label": (B, 1), "name": ...}``.
        device: device to run on.
        record_path: run record receiving ``section``; None writes none.
        section: run-record section (``"validation"`` or ``"test"``). Default ``"validation"``.
        output_dir: folder for ``<section>_predictions.csv`` / ``.png``; None writes none.
        clip_batch_size: see :class:`ClipAverageInferer`.
        measure_cost: add an inference :class:`~monai_peft.handlers.CostMeter` (seconds per video).
        amp: CUDA autocast.
        progress: ignite progress bar.
        log_stats: log the metrics with MONAI's ``StatsHandler`` (to stdout). Default True.
    """
    handlers: list[Any] = []
    if measure_cost:  # first, so the metric writer is not timed as inference
        handlers.append(CostMeter(phase="inference", record_path=record_path))
    handlers.append(EchoMetricsWriter("regression", record_path=record_path, section=section, output_dir=output_dir,
                                      prefix=f"{section}_", units="EF %"))
    if log_stats:
        handlers.append(StatsHandler(iteration_log=False, output_transform=lambda x: None))
    evaluator = SupervisedEvaluator(
        device=torch.device(device), val_data_loader=loader, network=network,
        inferer=ClipAverageInferer(clip_batch_size),
        key_val_metric={KEY_METRIC: MeanAbsoluteError(output_transform=from_engine(["pred", "label"]))},
        metric_cmp_fn=lower_is_better, val_handlers=handlers, amp=amp,
    )
    if progress and has_progress_bar:
        ProgressBar(persist=False).attach(evaluator)
    return evaluator


def build_ef_trainer(network: nn.Module, loader: Iterable, max_epochs: int, output_dir: str | Path,
                     device: str | torch.device = "cpu", evaluator: SupervisedEvaluator | None = None,
                     val_interval: int = 1, lr: float = 1e-4, weight_decay: float = 0.05,
                     loss_function: Callable | None = None, amp: bool = False, accumulation_steps: int = 1,
                     resume: bool = False, run_info: dict | None = None, checkpoint: bool = True,
                     progress: bool = True, log_stats: bool = True) -> SupervisedTrainer:
    """Trainer for the EF network or the MAE pretraining network (AdamW + cosine annealing per epoch).

    Handlers: parameter report, LR schedule, validation every ``val_interval`` epochs, adapter checkpoints
    ``<output_dir>/adapter/{last,best}`` (best = lowest ``val_ef_mae``; ``resume`` continues from ``last``),
    training cost meter, loss history (``trainer.loss_history.history``) and loss logging. The run record is
    ``<output_dir>/results.json``.

    Args:
        network: the model; only its trainable parameters are optimised.
        loader: training batches ``{"image": (B, 1, T, H, W)[, "label": (B, 1)]}``.
        max_epochs: epochs (also the cosine period).
        output_dir: run folder.
        device: device.
        evaluator: validation engine (:func:`build_ef_evaluator`); None trains without validation.
        val_interval: validate every this many epochs. Default 1.
        lr: AdamW learning rate. Default 1e-4.
        weight_decay: AdamW weight decay. Default 0.05 (VideoMAE fine-tuning).
        loss_function: default :class:`EFLoss`.
        amp: CUDA automatic mixed precision (EchoAI). Default False.
        accumulation_steps: mini-batches per optimizer step (EchoAI's gradient accumulation). Default 1.
        resume: continue from ``<output_dir>/adapter/last``. Default False.
        run_info: facts for the run record (``method``, ``task``, ...).
        checkpoint: write adapter checkpoints. Default True.
        progress: ignite progress bar.
        log_stats: log the loss of every iteration with MONAI's ``StatsHandler`` (to stdout). Default True.
    """
    output_dir = Path(output_dir)
    record = output_dir / "results.json"
    optimizer = build_optimizer(network, lr=lr, weight_decay=weight_decay)
    scheduler = build_lr_scheduler(optimizer, max_epochs)
    history = LossHistory()
    handlers: list[Any] = [
        ParameterReportHandler(network, record_path=record, report_path=output_dir / "parameter_report.json",
                               run_info=run_info),
        LrScheduleHandler(lr_scheduler=scheduler, print_lr=False),
    ]
    if evaluator is not None:
        handlers.append(ValidationHandler(validator=evaluator, interval=val_interval, epoch_level=True))
    if checkpoint:
        handlers.append(AdapterCheckpoint(output_dir / "adapter", network, optimizer=optimizer, lr_scheduler=scheduler,
                                          evaluator=evaluator, key_metric_name=KEY_METRIC if evaluator else None,
                                          higher_is_better=False, resume=resume))
    handlers += [CostMeter(phase="train", record_path=record, skip_first=1), history]
    if log_stats:
        handlers.append(StatsHandler(tag_name="train_loss", output_transform=from_engine(["loss"], first=True)))
    trainer = SupervisedTrainer(
        device=torch.device(device), max_epochs=max_epochs, train_data_loader=loader, network=network,
        optimizer=optimizer, loss_function=loss_function if loss_function is not None else EFLoss(),
        train_handlers=handlers, amp=amp, accumulation_steps=accumulation_steps,
    )
    trainer.lr_scheduler = scheduler
    trainer.loss_history = history
    if progress and has_progress_bar:
        ProgressBar(persist=False).attach(trainer, output_transform=from_engine(["loss"], first=True))
    return trainer
