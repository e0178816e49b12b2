"""Ignite handlers for echo evaluators: per-case predictions -> metrics, run record, CSV and scatter plot.

Echo seed tables report every metric "with poor images" and "no poor images" (Tables I-IV); an evaluator's
batches carry a ``quality`` entry for CAMUS frames, and :class:`EchoMetricsWriter` summarises both subsets.
Regression results also get the seed's prediction-vs-truth figure (Figures 4-5) with R^2.
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from monai.utils import IgniteInfo, min_version, optional_import

from monai_peft.io import atomic_save_figure, atomic_write_text
from monai_peft.workflows.records import process_rank, update_run_record

from .metrics import dice_per_case, summarise

if TYPE_CHECKING:
    from ignite.engine import Engine, Events
else:
    Engine, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine")
    Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")

__all__ = ["EchoMetricsWriter", "LossHistory", "PredictionCollector"]

_KINDS = ("segmentation", "classification", "regression")


def _as_batch(items: Any, key: str) -> Any:
    """``key`` of a collated dict, or the stacked ``key`` entries of a decollated list of dicts."""
    if isinstance(items, dict):
        return items.get(key)
    values = [it.get(key) for it in items]
    if values and isinstance(values[0], torch.Tensor):
        return torch.stack([torch.as_tensor(v) for v in values])
    if values and isinstance(values[0], (int, float, np.number)) and not isinstance(values[0], bool):
        return torch.as_tensor(values)  # decollating turns 0-dim tensors (class labels) into numbers
    return values


class EchoMetricsWriter:
    """Collect an evaluator's per-case predictions and summarise them when it completes.

    The summary (``{"all": {...}, "no_poor": {...}}``, the second when batches carry a ``quality`` entry, as
    CAMUS frames do) goes to ``engine.state.echo_summary``; the ``all`` values also to ``engine.state.metrics``
    (``mae``/``rmse``/``r2``, ``accuracy`` or ``mean_dice`` + ``dice_<class>``) and to the run record section.
    Regression cases are written to ``<output_dir>/<prefix>predictions.csv`` with a scatter plot
    ``<prefix>predictions.png`` (prediction vs truth, identity line, R^2).

    Args:
        kind: ``"segmentation"``, ``"classification"`` or ``"regression"``.
        decode: maps the network output ``(B, ...)`` to predictions (class map, class index, or values in
            units); for regression it is applied to labels too. Default: argmax over dim 1 for segmentation /
            classification, identity for regression.
        class_names: class names, background first (segmentation Dice keys).
        record_path: run record (``results.json``) to update; None writes none.
        section: run record section. Default ``"test"``.
        output_dir: folder for the regression CSV and PNG; None writes none.
        prefix: file name prefix. Default ``""``.
        name_key: batch key with the case name. Default ``"name"``.
        quality_key: batch key with the image quality. Default ``"quality"``.
        units: axis label of the regression plot. Default ``""``.
    """

    def __init__(self, kind: str, decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 class_names: Sequence[str] = (), record_path: str | Path | None = None, section: str = "test",
                 output_dir: str | Path | None = None, prefix: str = "", name_key: str = "name",
                 quality_key: str = "quality", units: str = "") -> None:
        if kind not in _KINDS:
            raise ValueError(f"EchoMetricsWriter kind must be one of {_KINDS}, got {kind!r}.")
        self.kind = kind
        self.decode = decode
        self.class_names = tuple(class_names)
        self.record_path = Path(record_path) if record_path is not None else None
        self.section = section
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.prefix = prefix
        self.name_key, self.quality_key = name_key, quality_key
        self.units = units
        self.logger = logging.getLogger(__name__)
        self._reset()

    def _reset(self, engine: Engine | None = None) -> None:
        self.rows: list[dict] = []

    def attach(self, engine: Engine) -> None:
        if engine.has_event_handler(self._collect, Events.ITERATION_COMPLETED):
            return
        engine.add_event_handler(Events.STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.COMPLETED, self)

    def _decoded(self, out: torch.Tensor) -> torch.Tensor:
        if self.decode is not None:
            return self.decode(out)
        return out if self.kind == "regression" else out.argmax(dim=1)

    @torch.no_grad()
    def _collect(self, engine: Engine) -> None:
        output, batch = engine.state.output, engine.state.batch
        pred = self._decoded(_as_batch(output, "pred").detach().float().cpu())
        label = _as_batch(output, "label")
        if label is None:
            raise KeyError("EchoMetricsWriter: the evaluator's output has no 'label'; evaluation needs labels.")
        label = label.detach().cpu()
        names = _as_batch(batch, self.name_key) or [None] * len(pred)
        quality = _as_batch(batch, self.quality_key) or [None] * len(pred)
        if self.kind == "segmentation":
            lab = label[:, 0] if label.ndim == pred.ndim + 1 else label
            scores = [{"dice": d} for d in dice_per_case(pred, lab, len(self.class_names) or int(lab.max()) + 1)]
        elif self.kind == "classification":
            scores = [{"correct": float(c)} for c in (pred == label.reshape(pred.shape)).float()]
        else:
            target = self._decoded(label.float()) if self.decode is not None else label.float()
            scores = [{"pred": p.reshape(-1).tolist(), "target": t.reshape(-1).tolist()}
                      for p, t in zip(pred, target.reshape(pred.shape))]
        for s, n, q in zip(scores, names, quality):
            self.rows.append({"name": None if n is None else str(n), "quality": None if q is None else str(q), **s})

    def summary(self) -> dict:
        """``{"all": {...}[, "no_poor": {...}]}`` of the cases collected so far."""
        out = {"all": self._summarise(self.rows)}
        if any(r["quality"] for r in self.rows):
            out["no_poor"] = self._summarise([r for r in self.rows if (r["quality"] or "").lower() != "poor"])
        return out

    def _summarise(self, rows: list[dict]) -> dict:
        if self.kind == "segmentation":
            k = len(self.class_names) - 1 if self.class_names else (len(rows[0]["dice"]) if rows else 0)
            return summarise("segmentation", {"dice": np.asarray([r["dice"] for r in rows]).reshape(-1, k)},
                             self.class_names)
        if self.kind == "classification":
            return summarise("classification", {"correct": [r["correct"] for r in rows]})
        return summarise("regression", {"pred": [r["pred"] for r in rows], "target": [r["target"] for r in rows]})

    def __call__(self, engine: Engine) -> None:
        result = self.summary()
        engine.state.echo_summary = result
        for k, v in result["all"].items():
            if k != "n" and v is not None:
                engine.state.metrics[k] = v
        engine.logger.info(f"echo metrics ({len(self.rows)} cases): {result['all']}")
        if process_rank() != 0:
            return
        section: dict[str, Any] = dict(result)
        if self.kind == "regression" and self.output_dir is not None and self.rows:
            section["cases_csv"] = self._write_cases().name
            section["figure"] = self._plot(result["all"]).name
        if self.record_path is not None:
            update_run_record(self.record_path, {self.section: section})

    def _write_cases(self) -> Path:
        buf = io.StringIO()
        w = csv.writer(buf)
        k = len(self.rows[0]["pred"])
        w.writerow(["name", "quality"] + [f"true_{i}" for i in range(k)] + [f"pred_{i}" for i in range(k)])
        for r in self.rows:
            w.writerow([r["name"], r["quality"], *(f"{x:.4f}" for x in r["target"]), *(f"{x:.4f}" for x in r["pred"])])
        return atomic_write_text(self.output_dir / f"{self.prefix}predictions.csv", buf.getvalue())

    def _plot(self, stats: dict) -> Path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        t = np.asarray([r["target"] for r in self.rows]).ravel()
        p = np.asarray([r["pred"] for r in self.rows]).ravel()
        lo, hi = float(min(t.min(), p.min())), float(max(t.max(), p.max()))
        fig, ax = plt.subplots(figsize=(4.2, 4.2))
        ax.scatter(t, p, s=12, alpha=0.7)
        ax.plot([lo, hi], [lo, hi], "k--", lw=1)
        r2 = "-" if stats["r2"] is None else f"{stats['r2']:.2f}"
        ax.set_title(f"MAE {stats['mae']:.2f}, RMSE {stats['rmse']:.2f}, R$^2$ {r2} (n={stats['n']})", fontsize=9)
        ax.set_xlabel(f"truth {self.units}".strip())
        ax.set_ylabel(f"prediction {self.units}".strip())
        fig.tight_layout()
        try:
            return atomic_save_figure(fig, self.output_dir / f"{self.prefix}predictions.png", dpi=90, format="png")
        finally:
            plt.close(fig)


class LossHistory:
    """Mean training loss of every epoch, kept in ``self.history`` (and ``engine.state.loss_history``)."""

    def __init__(self) -> None:
        self.history: list[float] = []
        self._losses: list[float] = []

    def attach(self, engine: Engine) -> None:
        if not engine.has_event_handler(self._iteration, Events.ITERATION_COMPLETED):
            engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration)
            engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch)

    def _iteration(self, engine: Engine) -> None:
        out = engine.state.output
        loss = out[0]["loss"] if isinstance(out, list) else out["loss"]
        self._losses.append(float(torch.as_tensor(loss).detach()))

    def _epoch(self, engine: Engine) -> None:
        self.history.append(float(np.mean(self._losses)) if self._losses else float("nan"))
        self._losses = []
        engine.state.loss_history = list(self.history)


class PredictionCollector:
    """Keep each case's network output (on CPU, without batch dimension) by name: ``self.outputs[name]``.

    Args:
        name_key: batch key holding the case name. Default ``"name"``.
        output_file: JSON file written when the engine completes, ``{name: value}`` with ``transform`` applied;
            None writes none.
        transform: maps one output tensor to a JSON value. Default: a float for one value, else a list.
    """

    def __init__(self, name_key: str = "name", output_file: str | Path | None = None,
                 transform: Callable[[torch.Tensor], Any] | None = None) -> None:
        self.name_key = name_key
        self.output_file = Path(output_file) if output_file is not None else None
        self.transform = transform or (lambda t: float(t.reshape(-1)[0]) if t.numel() == 1 else t.tolist())
        self.outputs: dict[str, torch.Tensor] = {}

    def attach(self, engine: Engine) -> None:
        if not engine.has_event_handler(self._collect, Events.ITERATION_COMPLETED):
            engine.add_event_handler(Events.STARTED, self._reset)
            engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
            engine.add_event_handler(Events.COMPLETED, self)

    def _reset(self, engine: Engine) -> None:
        self.outputs = {}

    def _collect(self, engine: Engine) -> None:
        pred = _as_batch(engine.state.output, "pred").detach().cpu()
        names = _as_batch(engine.state.batch, self.name_key)
        if names is None:
            raise KeyError(f"PredictionCollector: batches have no {self.name_key!r} entry to name the cases.")
        for n, p in zip(names, pred):
            self.outputs[str(n)] = p

    def __call__(self, engine: Engine) -> None:
        if self.output_file is not None and process_rank() == 0:
            from monai_peft.io import atomic_write_json

            atomic_write_json(self.output_file, {n: self.transform(p) for n, p in self.outputs.items()})
