"""Trainer and evaluator factories on MONAI's ``SupervisedTrainer`` / ``SupervisedEvaluator`` (thesis 4.2.3)."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.handlers import LrScheduleHandler, StatsHandler, ValidationHandler, from_engine
from monai.inferers import SimpleInferer, SlidingWindowInferer
from monai.losses import DiceCELoss
from monai.transforms import Activationsd, AsDiscreted, Compose
from monai.utils import optional_import

from monai_peft.handlers import (
    AdapterCheckpoint,
    CaseMetricsWriter,
    CostMeter,
    EpochHistory,
    ParameterReportHandler,
    PerClassDice,
    RunRecordWriter,
)

ProgressBar, has_progress_bar = optional_import("ignite.contrib.handlers", name="ProgressBar")

__all__ = [
    "trainable_parameters",
    "build_optimizer",
    "build_lr_scheduler",
    "build_loss",
    "build_inferer",
    "build_post_transforms",
    "build_evaluator",
    "build_trainer",
    "build_test_evaluator",
]

logger = logging.getLogger(__name__)


def trainable_parameters(network: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Parameters with ``requires_grad`` (adapters, selected layers); frozen backbone tensors stay out.

    Raises:
        ValueError: when nothing in ``network`` is trainable.
    """
    params = [p for p in network.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"network {type(network).__name__} has no trainable parameters: nothing to optimise.")
    return params


def build_optimizer(network: torch.nn.Module, lr: float = 1e-4, weight_decay: float = 1e-5) -> torch.optim.AdamW:
    """AdamW over the trainable parameters only (thesis 4.2.3: lr 1e-4, weight decay 1e-5).

    Args:
        network: the (peft) model.
        lr: learning rate. Default 1e-4.
        weight_decay: decoupled weight decay. Default 1e-5.
    """
    return torch.optim.AdamW(trainable_parameters(network), lr=lr, weight_decay=weight_decay)


def build_lr_scheduler(optimizer: torch.optim.Optimizer, max_epochs: int) -> torch.optim.lr_scheduler.CosineAnnealingLR:
    """Cosine annealing over ``max_epochs`` epochs, stepped once per epoch (thesis 4.2.3)."""
    if int(max_epochs) < 1:
        raise ValueError(f"max_epochs must be >= 1, got {max_epochs}.")
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=int(max_epochs))


def build_loss(include_background: bool = True, batch: bool = False, lambda_ce: float = 1.0) -> DiceCELoss:
    """Dice + cross-entropy on softmax outputs against integer labels ``(B, 1, H, W[, D])``.

    Args:
        include_background: count channel 0 in the Dice term. Default True (MONAI's default, the thesis setting).
        batch: one Dice over the whole batch instead of per case (helps tiny structures).
        lambda_ce: weight of the cross-entropy term. Default 1.0.
    """
    return DiceCELoss(to_onehot_y=True, softmax=True, include_background=include_background, batch=batch,
                      lambda_ce=lambda_ce)


def build_inferer(roi_size: Sequence[int] | None = None, sw_batch_size: int = 2, overlap: float = 0.25):
    """``SlidingWindowInferer`` over ``roi_size`` windows; ``None`` runs the whole volume at once."""
    if roi_size is None:
        return SimpleInferer()
    return SlidingWindowInferer(roi_size=list(roi_size), sw_batch_size=sw_batch_size, overlap=overlap)


def build_post_transforms(num_classes: int) -> Compose:
    """Softmax + argmax to one-hot ``pred`` and one-hot ``label``, both ``(C, H, W[, D])`` per case."""
    return Compose([
        Activationsd(keys="pred", softmax=True),
        AsDiscreted(keys=["pred", "label"], argmax=[True, False], to_onehot=[num_classes, num_classes]),
    ])


def _progress(engine: Any, output_transform: Any = None) -> None:
    if has_progress_bar:
        ProgressBar(persist=False).attach(engine, output_transform=output_transform)


def build_evaluator(
    network: torch.nn.Module,
    val_loader: Iterable,
    class_names: Sequence[str],
    device: str | torch.device = "cpu",
    roi_size: Sequence[int] | None = None,
    sw_batch_size: int = 2,
    record_path: str | Path | None = None,
    progress: bool = True,
    amp: bool = False,
) -> SupervisedEvaluator:
    """Validation engine with :class:`PerClassDice` as key metric ``val_mean_dice``.

    Args:
        network: the model.
        val_loader: yields dicts with ``image`` ``(B, 1, H, W, D)`` and integer ``label`` ``(B, 1, H, W, D)``.
        class_names: foreground classes; the network outputs ``len(class_names) + 1`` channels.
        device: device to run on.
        roi_size: sliding-window size; ``None`` infers whole volumes.
        sw_batch_size: windows per forward pass.
        record_path: run record to receive the ``validation`` section; ``None`` writes none.
        progress: show an ignite ProgressBar.
        amp: autocast on CUDA.
    """
    handlers: list[Any] = [StatsHandler(iteration_log=False, output_transform=lambda x: None)]
    if record_path is not None:
        handlers.append(RunRecordWriter(record_path, metric_name="val_mean_dice"))
    return _dice_evaluator(network, val_loader, class_names, "val_mean_dice", handlers, device, roi_size,
                           sw_batch_size, progress, amp)


def _dice_evaluator(
    network: torch.nn.Module,
    loader: Iterable,
    class_names: Sequence[str],
    metric_name: str,
    handlers: list[Any],
    device: str | torch.device,
    roi_size: Sequence[int] | None,
    sw_batch_size: int,
    progress: bool,
    amp: bool = False,
) -> SupervisedEvaluator:
    """A segmentation evaluator: sliding-window (or whole-volume) inference, argmax post-processing and
    :class:`PerClassDice` as key metric ``metric_name``."""
    evaluator = SupervisedEvaluator(
        device=torch.device(device),
        val_data_loader=loader,
        network=network,
        inferer=build_inferer(roi_size, sw_batch_size),
        postprocessing=build_post_transforms(len(class_names) + 1),
        key_val_metric={metric_name: PerClassDice(class_names=list(class_names),
                                                  output_transform=from_engine(["pred", "label"]))},
        val_handlers=handlers,
        amp=amp,
    )
    if progress:
        _progress(evaluator)
    return evaluator


def build_trainer(
    network: torch.nn.Module,
    train_loader: Iterable,
    max_epochs: int,
    output_dir: str | Path,
    device: str | torch.device = "cpu",
    evaluator: SupervisedEvaluator | None = None,
    val_interval: int = 1,
    lr: float = 1e-4,
    weight_decay: float = 1e-5,
    resume: bool = False,
    run_info: dict[str, Any] | None = None,
    progress: bool = True,
    amp: bool = False,
    log_stats: bool = True,
    loss_function: Any | None = None,
) -> SupervisedTrainer:
    """Training engine for a PEFT model: AdamW on trainable parameters, cosine annealing, DiceCE loss.

    Handlers: parameter report at start, LR schedule, validation every ``val_interval`` epochs, the per-epoch
    :class:`EpochHistory` (loss, validation Dice, lr, seconds), :class:`AdapterCheckpoint`
    (``<output_dir>/adapter/last`` and ``best``, resumable), a training :class:`CostMeter`, loss logging and a
    ProgressBar. The run record is ``<output_dir>/results.json``.

    Args:
        network: the (peft) model; only its trainable parameters are optimised.
        train_loader: yields dicts with ``image`` ``(B, 1, H, W, D)`` and ``label`` ``(B, 1, H, W, D)``.
        max_epochs: epochs to train (also the cosine period).
        output_dir: folder for ``adapter/`` and ``results.json``.
        device: device to run on.
        evaluator: validation engine (see :func:`build_evaluator`); ``None`` trains without validation.
        val_interval: validate every this many epochs.
        lr: AdamW learning rate. Default 1e-4 (thesis 4.2.3).
        weight_decay: AdamW weight decay. Default 1e-5 (thesis 4.2.3).
        resume: continue from ``<output_dir>/adapter/last`` when it exists.
        run_info: facts for the run record (``method``, ``placement``, ``preset``).
        progress: show an ignite ProgressBar.
        amp: autocast on CUDA.
        log_stats: log the loss of every iteration (MONAI ``StatsHandler``).
        loss_function: replaces the default :func:`build_loss`.
    """
    output_dir = Path(output_dir)
    record = output_dir / "results.json"
    optimizer = build_optimizer(network, lr=lr, weight_decay=weight_decay)
    scheduler = build_lr_scheduler(optimizer, max_epochs)
    handlers: list[Any] = [
        ParameterReportHandler(network, record_path=record, report_path=output_dir / "parameter_report.json",
                               run_info=run_info),
        LrScheduleHandler(lr_scheduler=scheduler, print_lr=False),
    ]
    if evaluator is not None:
        handlers.append(ValidationHandler(validator=evaluator, interval=val_interval, epoch_level=True))
    handlers.append(EpochHistory(record, evaluator=evaluator))  # after validation: the epoch's Dice exists
    handlers += [
        AdapterCheckpoint(output_dir / "adapter", network, optimizer=optimizer, lr_scheduler=scheduler,
                          evaluator=evaluator, key_metric_name="val_mean_dice" if evaluator is not None else None,
                          resume=resume),
        CostMeter(phase="train", record_path=record, skip_first=1),
    ]
    if log_stats:
        handlers.append(StatsHandler(tag_name="train_loss", output_transform=from_engine(["loss"], first=True)))
    trainer = SupervisedTrainer(
        device=torch.device(device),
        max_epochs=max_epochs,
        train_data_loader=train_loader,
        network=network,
        optimizer=optimizer,
        loss_function=loss_function if loss_function is not None else build_loss(),
        inferer=SimpleInferer(),
        train_handlers=handlers,
        amp=amp,
    )
    trainer.lr_scheduler = scheduler
    if progress:
        _progress(trainer, output_transform=from_engine(["loss"], first=True))
    return trainer


def build_test_evaluator(
    network: torch.nn.Module,
    test_loader: Iterable,
    class_names: Sequence[str],
    output_dir: str | Path,
    device: str | torch.device = "cpu",
    roi_size: Sequence[int] | None = None,
    sw_batch_size: int = 2,
    nsd_tolerance_mm: float | None = 2.0,
    progress: bool = True,
) -> SupervisedEvaluator:
    """Test-set engine: per-case per-class Dice/NSD files, inference cost, and the ``test`` run-record section.

    Writes ``<output_dir>/test_metrics.json``, ``test_metrics.csv`` and updates ``<output_dir>/results.json``.
    The adapter weights must already be in ``network`` (or add an :class:`~monai_peft.handlers.AdapterLoader`).
    """
    output_dir = Path(output_dir)
    record = output_dir / "results.json"
    # the cost meter goes first so the NSD computation of the writer is not timed as inference
    handlers = [
        CostMeter(phase="inference", record_path=record),
        CaseMetricsWriter(output_dir, class_names, record_path=record, nsd_tolerance_mm=nsd_tolerance_mm),
    ]
    return _dice_evaluator(network, test_loader, class_names, "test_mean_dice", handlers, device, roi_size,
                           sw_batch_size, progress)
