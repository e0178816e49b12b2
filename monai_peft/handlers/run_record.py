"""Copy an engine's metrics into the run record ``results.json``: the final validation section, and the per-epoch
history the thesis plots as Mean Dice over time (Figures 5.1-5.4, 5.6-5.8)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from monai.utils import IgniteInfo, min_version, optional_import

from monai_peft.workflows.records import process_rank, read_run_record, update_run_record

if TYPE_CHECKING:
    from ignite.engine import Engine, Events
else:
    Engine, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine")
    Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")

__all__ = ["RunRecordWriter", "EpochHistory", "history_entry"]


class RunRecordWriter:
    """Write the key metric, its per-class entries and the best epoch of an evaluator into the run record.

    With a :class:`~monai_peft.handlers.PerClassDice` key metric named ``val_mean_dice`` and classes
    ``liver, spleen`` the section reads
    ``{"mean_dice": .., "per_class_dice": {"liver": .., "spleen": ..}, "epoch": .., "best_mean_dice": .., "best_epoch": ..}``.

    Args:
        record_path: the run record file.
        metric_name: metric in ``engine.state.metrics`` holding the mean; entries named
            ``f"{metric_name}_<class>"`` become ``per_class_dice``. Default ``"val_mean_dice"``.
        section: run record section. Default ``"validation"``.
        extra: other JSON-able facts to store in the same section.
        write_rank0_only: only rank 0 writes in a distributed run. Default True.
    """

    def __init__(
        self,
        record_path: str | Path,
        metric_name: str = "val_mean_dice",
        section: str = "validation",
        extra: dict[str, Any] | None = None,
        write_rank0_only: bool = True,
    ) -> None:
        if not record_path:
            raise ValueError("RunRecordWriter needs record_path (the results.json file).")
        self.record_path = Path(record_path)
        self.metric_name = metric_name
        self.section = section
        self.extra = dict(extra or {})
        self.write_rank0_only = write_rank0_only
        self.best: float | None = None
        self.best_epoch: int | None = None

    def attach(self, engine: Engine) -> None:
        if not engine.has_event_handler(self, Events.COMPLETED):
            engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        metrics = engine.state.metrics
        if self.metric_name not in metrics:
            raise KeyError(f"RunRecordWriter: metric '{self.metric_name}' not in {sorted(metrics)}.")
        mean = float(metrics[self.metric_name])
        prefix = f"{self.metric_name}_"
        per_class = {k[len(prefix):]: float(v) for k, v in metrics.items() if k.startswith(prefix)}
        epoch = int(engine.state.epoch)
        if not math.isnan(mean) and (self.best is None or mean > self.best):
            self.best, self.best_epoch = mean, epoch
        section: dict[str, Any] = {"mean_dice": mean, "epoch": epoch, "best_mean_dice": self.best,
                                   "best_epoch": self.best_epoch, **self.extra}
        if per_class:
            section["per_class_dice"] = per_class
        rank = process_rank()
        if self.write_rank0_only and rank != 0:
            return
        update_run_record(self.record_path, {self.section: section})


def history_entry(
    epoch: int,
    train_loss: float | None,
    lr: float | None,
    seconds: float,
    elapsed_seconds: float,
    val_mean_dice: float | None = None,
    val_per_class_dice: dict[str, float] | None = None,
) -> dict[str, Any]:
    """One element of the run record's ``history`` list (one layout for MONAI engines and nnU-Net trainers).

    Args:
        epoch: 1-based epoch number.
        train_loss: mean training loss over the epoch's iterations.
        lr: learning rate the epoch trained with.
        seconds: wall time of the epoch (training and its validation).
        elapsed_seconds: wall time since the run started (continued across resumes).
        val_mean_dice: mean validation Dice, ``None`` when no validation ran in this epoch.
        val_per_class_dice: ``{class name: Dice}`` of that validation.
    """

    def num(v: float | None) -> float | None:
        return None if v is None or not math.isfinite(float(v)) else float(v)

    entry: dict[str, Any] = {"epoch": int(epoch), "train_loss": num(train_loss), "lr": num(lr),
                             "seconds": float(seconds), "elapsed_seconds": float(elapsed_seconds)}
    if val_mean_dice is not None:
        entry["val_mean_dice"] = num(val_mean_dice)
        entry["val_per_class_dice"] = {k: num(v) for k, v in (val_per_class_dice or {}).items()}
    return entry


class EpochHistory:
    """Append one :func:`history_entry` per epoch to the run record's ``history`` (thesis Figures 5.1-5.8).

    Attach it to the trainer *after* its ``ValidationHandler``, so the evaluator's metrics of the epoch exist when
    the entry is written. A resumed run keeps the entries of the epochs it resumes from and drops later ones.

    Args:
        record_path: the run record file (``results.json``).
        evaluator: the validation engine; its ``metric_name`` and ``f"{metric_name}_<class>"`` metrics go into the
            entry of every epoch it ran in. ``None`` records training only.
        metric_name: the evaluator's mean Dice metric. Default ``"val_mean_dice"``.
        loss_transform: maps ``engine.state.output`` to the iteration's loss. Default: the ``"loss"`` entry
            (MONAI ``SupervisedTrainer`` output, decollated or not).
        write_rank0_only: only rank 0 writes in a distributed run. Default True.
    """

    def __init__(
        self,
        record_path: str | Path,
        evaluator: Engine | None = None,
        metric_name: str = "val_mean_dice",
        loss_transform: Callable[[Any], Any] | None = None,
        write_rank0_only: bool = True,
    ) -> None:
        if not record_path:
            raise ValueError("EpochHistory needs record_path (the results.json file).")
        self.record_path = Path(record_path)
        self.evaluator = evaluator
        self.metric_name = metric_name
        self.loss_transform = loss_transform or _loss_of
        self.write_rank0_only = write_rank0_only
        self.history: list[dict[str, Any]] | None = None
        self._epoch_start = 0.0
        self._run_start = 0.0
        self._offset = 0.0
        self._losses: list[float] = []
        self._lr: float | None = None

    def attach(self, engine: Engine) -> None:
        if engine.has_event_handler(self, Events.EPOCH_COMPLETED):
            return
        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.EPOCH_STARTED, self._epoch_started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration_completed)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def _started(self, engine: Engine) -> None:
        self.history = None
        self._run_start = time.perf_counter()

    def _epoch_started(self, engine: Engine) -> None:
        if self.history is None:  # first epoch of this run: keep the entries a resumed run starts after
            old = read_run_record(self.record_path).get("history") or []
            self.history = [h for h in old if isinstance(h, dict) and int(h.get("epoch", 0)) < engine.state.epoch]
            self._offset = float(self.history[-1].get("elapsed_seconds", 0.0)) if self.history else 0.0
        self._epoch_start = time.perf_counter()
        self._losses = []
        optimizer = getattr(engine, "optimizer", None)
        self._lr = float(optimizer.param_groups[0]["lr"]) if optimizer is not None else None

    def _iteration_completed(self, engine: Engine) -> None:
        loss = self.loss_transform(engine.state.output)
        if loss is not None:
            self._losses.append(float(loss))

    def __call__(self, engine: Engine) -> None:
        epoch = int(engine.state.epoch)
        now = time.perf_counter()
        val_mean = per_class = None
        ev = self.evaluator
        if ev is not None and getattr(ev.state, "epoch", None) == epoch and self.metric_name in ev.state.metrics:
            metrics = ev.state.metrics
            prefix = f"{self.metric_name}_"
            val_mean = float(metrics[self.metric_name])
            per_class = {k[len(prefix):]: float(v) for k, v in metrics.items() if k.startswith(prefix)}
        entry = history_entry(epoch, sum(self._losses) / len(self._losses) if self._losses else None, self._lr,
                              now - self._epoch_start, self._offset + now - self._run_start, val_mean, per_class)
        self.history = [*(self.history or []), entry]
        if self.write_rank0_only and process_rank() != 0:
            return
        update_run_record(self.record_path, {"history": self.history})


def _loss_of(output: Any) -> Any:
    """The ``"loss"`` of a trainer's output: a dict, a list of per-case dicts (MONAI decollates) or a tensor."""
    if isinstance(output, dict):
        return output.get("loss")
    if isinstance(output, (list, tuple)) and output and isinstance(output[0], dict):
        return output[0].get("loss")
    return output if hasattr(output, "item") else None
