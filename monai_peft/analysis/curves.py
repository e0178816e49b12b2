"""Validation Dice over training time from run records: the thesis's Figures 5.1-5.4 and 5.6-5.8.

Every workflow writes a ``history`` list into its run record ``results.json`` (one entry per epoch: ``epoch``,
``train_loss``, ``lr``, ``seconds``, ``elapsed_seconds``, ``val_mean_dice``, ``val_per_class_dice``; see
:class:`monai_peft.handlers.EpochHistory`). :func:`load_curves` reads them, :func:`plot_curves` draws one line per
run, optionally one panel per task or data size (Figure 5.6 has three: 100 %, 50 %, 10 % of the data).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from monai_peft.io import atomic_save_figure

__all__ = ["Curve", "X_AXES", "PANELS", "METRICS", "load_curves", "plot_curves"]

#: x axes: epochs, or hours of training (the thesis plots Mean Dice over 20 hours, 5.1)
X_AXES = ("epoch", "hours")
#: what splits the runs into panels
PANELS = ("none", "task", "data_fraction")
#: what the y axis shows
METRICS = ("val_mean_dice", "train_loss", "lr")


@dataclass
class Curve:
    """One run's history.

    Attributes:
        label: legend text (preset, else method; with the data size when it is below 100 %).
        source: the ``results.json`` file.
        history: the record's ``history`` entries.
        method, preset, task: from the record, when it has them.
        data_fraction: share of the training data (``None``: all).
    """

    label: str
    source: str
    history: list[dict[str, Any]] = field(default_factory=list)
    method: str | None = None
    preset: str | None = None
    task: str | None = None
    data_fraction: float | None = None

    def points(self, metric: str = "val_mean_dice", x: str = "epoch") -> tuple[list[float], list[float]]:
        """``(xs, ys)`` of the entries that hold ``metric`` (epochs without validation are left out)."""
        xs, ys = [], []
        for h in self.history:
            value = h.get(metric)
            if value is None:
                continue
            xs.append(float(h["epoch"]) if x == "epoch" else float(h.get("elapsed_seconds", 0.0)) / 3600.0)
            ys.append(float(value))
        return xs, ys


def _records(paths: Iterable[str | os.PathLike]) -> list[Path]:
    files: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise FileNotFoundError(f"curves: no such run folder or file {p}")
        if p.is_dir():
            found = sorted(p.rglob("results.json"))
            if not found:
                raise FileNotFoundError(f"curves: no results.json under {p}")
            files += found
        else:
            files.append(p)
    return files


def _label(record: dict[str, Any], path: Path) -> str:
    name = record.get("preset") or record.get("method") or path.parent.name
    fraction = record.get("data_fraction")
    if isinstance(fraction, (int, float)) and fraction < 0.999:
        name = f"{name} ({fraction * 100:.0f}% data)"
    return str(name)


def load_curves(paths: Iterable[str | os.PathLike]) -> list[Curve]:
    """The histories of run records.

    Args:
        paths: ``results.json`` files or folders searched recursively for them.

    Raises:
        FileNotFoundError: a path does not exist, or a folder holds no ``results.json``.
        ValueError: a record is not JSON or has no ``history`` (the message names the file).
    """
    curves = []
    for path in _records(paths):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from e
        history = record.get("history") if isinstance(record, dict) else None
        if not history:
            raise ValueError(f"{path}: run record has no 'history' (per-epoch entries); was it written by "
                             "monai-peft's trainers, bundles or nnU-Net trainers?")
        fraction = record.get("data_fraction")
        curves.append(Curve(label=_label(record, path), source=str(path), history=list(history),
                            method=record.get("method"), preset=record.get("preset"),
                            task=record.get("task") if isinstance(record.get("task"), str) else None,
                            data_fraction=float(fraction) if isinstance(fraction, (int, float)) else None))
    return curves


def _panel_key(curve: Curve, panel_by: str) -> str:
    if panel_by == "task":
        return curve.task or "organs"
    if panel_by == "data_fraction":
        return f"{(curve.data_fraction or 1.0) * 100:.0f}% data"
    return ""


def plot_curves(
    curves: Sequence[Curve],
    path: str | os.PathLike,
    metric: str = "val_mean_dice",
    x: str = "epoch",
    panel_by: str = "none",
    title: str | None = None,
) -> Path:
    """Draw ``metric`` over epochs or hours, one line per run, and write a PNG (atomically).

    Args:
        curves: from :func:`load_curves`.
        path: the PNG file.
        metric: one of :data:`METRICS`. Default ``"val_mean_dice"`` (the thesis's Mean Dice over time).
        x: ``"epoch"`` or ``"hours"`` of training.
        panel_by: ``"none"``, ``"task"`` or ``"data_fraction"`` (one panel each, as Figure 5.6).
        title: figure title.

    Raises:
        ValueError: an unknown ``metric`` / ``x`` / ``panel_by``, or no run holds ``metric``.
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if x not in X_AXES:
        raise ValueError(f"x must be one of {X_AXES}, got {x!r}")
    if panel_by not in PANELS:
        raise ValueError(f"panel_by must be one of {PANELS}, got {panel_by!r}")
    drawn = [c for c in curves if c.points(metric, x)[0]]
    if not drawn:
        raise ValueError(f"no run has {metric!r} in its history: {[c.source for c in curves]}")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: dict[str, list[Curve]] = {}
    for c in drawn:
        panels.setdefault(_panel_key(c, panel_by), []).append(c)
    keys = sorted(panels, key=lambda k: (-float(k.split("%")[0]) if k.endswith("% data") else 0, k))
    fig, axes = plt.subplots(1, len(keys), figsize=(5.2 * len(keys), 3.8), dpi=120, squeeze=False, sharey=True)
    labels = sorted({c.label for c in drawn})
    colours = {label: f"C{i % 10}" for i, label in enumerate(labels)}
    for ax, key in zip(axes[0], keys):
        for c in panels[key]:
            xs, ys = c.points(metric, x)
            ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, ms=3, lw=1.5, color=colours[c.label], label=c.label)
        ax.set_xlabel("epoch" if x == "epoch" else "training time (h)")
        ax.grid(True, alpha=0.3)
        if key:
            ax.set_title(key)
        if metric == "val_mean_dice":
            ax.set_ylim(0, 1)
    axes[0][0].set_ylabel({"val_mean_dice": "validation Mean Dice", "train_loss": "training loss", "lr": "learning rate"}[metric])
    axes[0][-1].legend(fontsize=8, loc="lower right" if metric == "val_mean_dice" else "upper right")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    try:
        return atomic_save_figure(fig, Path(path), format="png")
    finally:
        plt.close(fig)
