"""Copy an engine's metrics into the run record ``results.json`` when it completes."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from monai.utils import IgniteInfo, min_version, optional_import

from monai_peft.workflows.records import process_rank, update_run_record

if TYPE_CHECKING:
    from ignite.engine import Engine, Events
else:
    Engine, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine")
    Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")

__all__ = ["RunRecordWriter"]


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
