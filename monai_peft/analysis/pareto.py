"""Performance / parameter-efficiency trade-off: thesis eq. 4.1, the Pareto walk and Fig. 5.5.

The thesis (4.2.5.1, 5.1.5) normalises the Mean Dice score and the number of parameters of every
CNN-PEFT combination to [0, 1], scores each with

    score = w_D * D + w_P * (1 - P),   w_D = w_P = 0.5            (thesis eq. 4.1)

then sorts the combinations by increasing parameter count and walks them: a combination joins the
frontier when its score beats the best score seen so far. "This is done for both the UNet and
SegResNet separately", so normalisation and walk run per backbone.

Normalisation (worked out from Table 5.5, the appendix with the score table did not survive): min-max
over all runs *of the same backbone*, the full fine-tuning (FFT) run included, with ``params`` the
*trainable* parameter count. Table 5.5 then gives ConvAdapter-SegResNet
0.5 * (0.84 - 0.60) / (0.89 - 0.60) + 0.5 * (1 - 0) = 0.914 and ConvAdapter-UNet
0.5 * (0.83 - 0.68) / (0.90 - 0.68) + 0.5 * (1 - 0) = 0.841, the 0.91 and 0.84 of thesis 5.1.5.
(Normalising both backbones together would give 0.90 for SegResNet, so it is not what the thesis did.)

Inputs are run records: ``results.json`` files written by the training workflows, or a CSV with the
columns ``backbone,method,params,dice`` (``placement`` optional) for results obtained elsewhere.
Keys read from a ``results.json`` record (first one present wins; top-level keys first, then the
nested sections ``test``, ``metrics``, ``results``, ``parameters``, ``run_info``, ``config``, ...,
``validation``, so the layout of :mod:`monai_peft.workflows.records` reads as is):

==================  ================================================================
field               keys
==================  ================================================================
backbone            ``backbone``, ``network``, ``model``; else a backbone name inside ``preset``,
                    else ``unknown``
method              ``method``
placement           ``placement``, ``preset``, ``target``
params (trainable)  ``trainable_params``, ``params``, ``num_trainable``, ``trainable``
total params        ``total_params``, ``num_params``, ``total``
Mean Dice           ``mean_dice``, ``dice``, ``test_mean_dice`` (``test`` before ``validation``)
data fraction       ``data_fraction``, ``fraction``, ``data_size`` (0-1 or percent)
task                ``task``, ``dataset``, ``classes`` (a class group name)
costs               ``costs`` (kept as is)
==================  ================================================================
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from monai_peft.io import atomic_save_figure

logger = logging.getLogger(__name__)

__all__ = [
    "FFT_METHODS",
    "ParetoPoint",
    "RunRecord",
    "load_run_records",
    "pareto_scores",
    "plot_tradeoff",
    "read_runs_csv",
    "read_results_json",
    "record_from_dict",
    "scores_table",
]

#: method names that denote full fine-tuning, the per-backbone baseline of Fig. 5.5.
FFT_METHODS = frozenset({"full", "fft", "full_finetune", "full_finetuning", "full-finetuning", "full fine-tuning"})

_KEYS = {
    "backbone": ("backbone", "network", "model", "net"),
    "method": ("method", "peft_method"),
    "placement": ("placement", "preset", "target"),
    "params": ("trainable_params", "params", "num_trainable", "trainable", "n_trainable"),
    "total_params": ("total_params", "num_params", "total", "n_params"),
    "dice": ("mean_dice", "dice", "test_mean_dice", "val_mean_dice"),
    "data_fraction": ("data_fraction", "fraction", "data_size", "train_fraction"),
    "task": ("task", "dataset", "classes"),
}
# nested sections searched in this order: the test result wins over the validation result
_NESTED = ("test", "metrics", "results", "parameters", "parameter_report", "report", "summary", "run_info", "config",
           "run", "validation")
_BACKBONE_HINTS = ("segresnet", "unet", "swinunetr", "segformer")


@dataclass
class RunRecord:
    """One fine-tuning run: what was trained, how many parameters it trained and how well it scored.

    Args:
        backbone: network name (``segresnet``, ``unet``...); the unit of normalisation.
        method: PEFT method (``convadapter``, ``lora``, ``full``...).
        params: trainable parameters (for full fine-tuning: all parameters).
        dice: Mean Dice on the test set, in [0, 1].
        placement: where the method was placed (preset name), if known.
        total_params: all parameters of the model, if known.
        data_fraction: fraction of the downstream training data, in (0, 1], if known.
        task: downstream task / dataset name (``organs``, ``vertebrae``, ``mr_organs``), if known.
        costs: cost measurements as recorded (train/inference time, memory), if any.
        source: file the record came from.
        preset: the ``monai-peft presets`` name the run used, if any.
        val_dice: best validation Mean Dice of the run (thesis Tables 5.1-5.4), if recorded.
    """

    backbone: str
    method: str
    params: float
    dice: float
    placement: str | None = None
    total_params: float | None = None
    data_fraction: float | None = None
    task: str | None = None
    costs: dict[str, Any] | None = None
    source: str | None = None
    preset: str | None = None
    val_dice: float | None = None

    @property
    def label(self) -> str:
        return f"{self.method}[{self.placement}]" if self.placement else self.method

    @property
    def is_fft(self) -> bool:
        return self.method.strip().lower() in FFT_METHODS


@dataclass
class ParetoPoint:
    """A run with its eq. 4.1 terms: normalised Dice ``D``, normalised params ``P``, ``score``."""

    record: RunRecord
    D: float
    P: float
    score: float
    on_frontier: bool = False
    best: bool = False
    pareto_optimal: bool = False
    dice_diff: float | None = None
    param_reduction: float | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self.record).items() if v is not None}
        d.update(
            label=self.record.label,
            D=self.D,
            P=self.P,
            score=self.score,
            on_frontier=self.on_frontier,
            best=self.best,
            pareto_optimal=self.pareto_optimal,
            dice_diff_vs_fft=self.dice_diff,
            param_reduction_vs_fft=self.param_reduction,
        )
        return d


def _lookup(d: dict[str, Any], names: Sequence[str]) -> Any:
    for name in names:
        if name in d and d[name] is not None and not isinstance(d[name], dict):
            return d[name]
    for nest in _NESTED:
        sub = d.get(nest)
        if isinstance(sub, dict):
            found = _lookup(sub, names)
            if found is not None:
                return found
    return None


def _fraction(value: Any) -> float | None:
    if value is None:
        return None
    v = float(str(value).rstrip("%"))
    return v / 100.0 if v > 1.0 else v


def record_from_dict(d: dict[str, Any], source: str = "<dict>") -> RunRecord:
    """Build a :class:`RunRecord` from one run record dictionary, reading the tolerant keys above.

    Args:
        d: the record (e.g. a parsed ``results.json``).
        source: where it came from, named in errors.

    Raises:
        ValueError: when ``method``, trainable params or Mean Dice are missing (a missing backbone
            is taken from the preset name, else ``"unknown"``).
    """
    values = {name: _lookup(d, keys) for name, keys in _KEYS.items()}
    if values["backbone"] is None:
        # records that name no backbone: take it from the preset name ("segresnet-convadapter-...")
        hint = " ".join(str(_lookup(d, (k,)) or "") for k in ("preset", "placement", "name")).lower()
        found = [b for b in _BACKBONE_HINTS if b in hint]
        if found:
            values["backbone"] = found[0]
        else:
            logger.warning("%s: no backbone in the run record; grouped as 'unknown'", source)
            values["backbone"] = "unknown"
    missing = [n for n in ("method", "params", "dice") if values[n] is None]
    if missing:
        wanted = {n: _KEYS[n] for n in missing}
        raise ValueError(f"{source}: run record lacks {missing}; expected one of the keys {wanted}")
    costs = d.get("costs") if isinstance(d.get("costs"), dict) else None
    validation = d.get("validation") if isinstance(d.get("validation"), dict) else {}
    val_dice = validation.get("best_mean_dice", validation.get("mean_dice"))
    preset = _lookup(d, ("preset",))
    try:
        params, dice = float(values["params"]), float(values["dice"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{source}: params/dice must be numbers, got {values['params']!r}, {values['dice']!r}") from e
    return RunRecord(
        backbone=str(values["backbone"]),
        method=str(values["method"]),
        params=params,
        dice=dice,
        placement=None if values["placement"] is None else str(values["placement"]),
        total_params=None if values["total_params"] is None else float(values["total_params"]),
        data_fraction=_fraction(values["data_fraction"]),
        task=values["task"] if isinstance(values["task"], str) else None,
        costs=costs,
        source=source,
        preset=None if preset is None else str(preset),
        val_dice=None if val_dice is None else float(val_dice),
    )


def read_results_json(path: str | os.PathLike) -> list[RunRecord]:
    """Read one ``results.json`` (a record, a list of records, or ``{"runs": [...]}``)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if isinstance(data, dict) and isinstance(data.get("runs"), list):
        data = data["runs"]
    items = data if isinstance(data, list) else [data]
    return [record_from_dict(item, source=f"{path}[{i}]" if len(items) > 1 else str(path))
            for i, item in enumerate(items)]


def read_runs_csv(path: str | os.PathLike) -> list[RunRecord]:
    """Read a CSV with the columns ``backbone,method,params,dice`` (optional: ``placement``,
    ``total_params``, ``data_fraction``, ``task``), one run per row."""
    path = Path(path)
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in (reader.fieldnames or [])]
        need = {"backbone", "method", "params", "dice"}
        if not need <= set(header):
            raise ValueError(f"{path}: CSV needs the columns {sorted(need)}, found {header}")
        rows = [{k.strip(): (v.strip() if isinstance(v, str) else v) for k, v in row.items() if v not in (None, "")}
                for row in reader]
    return [record_from_dict(row, source=f"{path}:{i + 2}") for i, row in enumerate(rows)]


def load_run_records(paths: Iterable[str | os.PathLike]) -> list[RunRecord]:
    """Collect run records from files and folders.

    Args:
        paths: ``results.json`` / ``*.json`` files, ``*.csv`` files, or folders searched recursively
            for ``results.json``.

    Raises:
        FileNotFoundError: for a path that does not exist; ValueError when nothing was found.
    """
    records: list[RunRecord] = []
    for p in map(Path, paths):
        if not p.exists():
            raise FileNotFoundError(f"run records: no such file or folder {p}")
        if p.is_dir():
            files = sorted(p.rglob("results.json"))
            if not files:
                logger.warning("no results.json under %s", p)
            for f in files:
                records.extend(read_results_json(f))
        elif p.suffix.lower() == ".csv":
            records.extend(read_runs_csv(p))
        else:
            records.extend(read_results_json(p))
    if not records:
        raise ValueError(f"no run records found in {[str(p) for p in paths]}")
    return records


def _minmax(values: Sequence[float]) -> list[float]:
    lo, hi = min(values), max(values)
    if math.isclose(hi, lo):
        return [1.0 for _ in values]
    return [(v - lo) / (hi - lo) for v in values]


def pareto_scores(
    records: Sequence[RunRecord], w_dice: float = 0.5, w_params: float = 0.5, per_backbone: bool = True
) -> list[ParetoPoint]:
    """Score runs with thesis eq. 4.1 and mark the frontier found by the walk of thesis 4.2.5.1.

    Args:
        records: the runs.
        w_dice: weight of the normalised Mean Dice ``D`` (thesis: 0.5).
        w_params: weight of ``1 - P``, ``P`` the normalised trainable parameter count (thesis: 0.5).
        per_backbone: normalise and walk each backbone separately (thesis); ``False`` pools all runs.

    Returns:
        one :class:`ParetoPoint` per record, in the order of the records. ``on_frontier`` marks the
        walk's frontier (sorted by increasing params, ties by higher Dice; a run joins when its score
        beats the best so far); ``best`` the highest score of its group; ``pareto_optimal`` plain
        non-domination (no run has fewer-or-equal params and higher-or-equal Dice, one strictly);
        ``dice_diff`` / ``param_reduction`` compare with the group's full fine-tuning run (Fig. 5.5):
        ``dice - dice_fft`` and ``1 - params / params_fft``.

    Raises:
        ValueError: for no records or weights that are negative.
    """
    if not records:
        raise ValueError("pareto_scores: no run records given")
    if w_dice < 0 or w_params < 0:
        raise ValueError(f"pareto_scores: weights must be >= 0, got w_dice={w_dice}, w_params={w_params}")
    points: list[ParetoPoint | None] = [None] * len(records)
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        groups.setdefault(r.backbone if per_backbone else "all", []).append(i)
    for idx in groups.values():
        group = [records[i] for i in idx]
        D = _minmax([r.dice for r in group])
        # P: 0 for the fewest parameters; if all runs train the same count none is penalised.
        P = _minmax([r.params for r in group]) if len({r.params for r in group}) > 1 else [0.0] * len(group)
        fft = [r for r in group if r.is_fft]
        for j, i in enumerate(idx):
            r = records[i]
            base = next((f for f in fft if f.backbone == r.backbone), None)
            points[i] = ParetoPoint(
                record=r,
                D=D[j],
                P=P[j],
                score=w_dice * D[j] + w_params * (1.0 - P[j]),
                dice_diff=None if base is None else r.dice - base.dice,
                param_reduction=None if base is None or base.params == 0 else 1.0 - r.params / base.params,
            )
        order = sorted(idx, key=lambda i: (records[i].params, -records[i].dice))
        best = -math.inf
        for i in order:
            if points[i].score > best:
                points[i].on_frontier = True
                best = points[i].score
        top = max(points[i].score for i in idx)
        for i in idx:
            points[i].best = math.isclose(points[i].score, top)
            r = records[i]
            points[i].pareto_optimal = not any(
                o.params <= r.params and o.dice >= r.dice and (o.params < r.params or o.dice > r.dice)
                for o in (records[k] for k in idx)
            )
    if any(r.is_fft for r in records) is False:
        logger.info("no full fine-tuning run among the records: Fig. 5.5 differences are left empty")
    return [p for p in points if p is not None]


def scores_table(points: Sequence[ParetoPoint]) -> str:
    """A plain-text table of the scored runs, grouped by backbone, frontier members starred."""
    head = f"{'backbone':<12} {'run':<28} {'params':>12} {'dice':>6} {'D':>6} {'P':>6} {'score':>6}  frontier"
    lines = [head, "-" * len(head)]
    for p in sorted(points, key=lambda p: (p.record.backbone, p.record.params)):
        r = p.record
        mark = ("*" if p.on_frontier else "") + (" best" if p.best else "")
        lines.append(
            f"{r.backbone:<12} {r.label:<28.28} {r.params:>12,.0f} {r.dice:>6.3f} {p.D:>6.3f} {p.P:>6.3f} "
            f"{p.score:>6.3f}  {mark}"
        )
    return "\n".join(lines)


def plot_tradeoff(points: Sequence[ParetoPoint], path: str | os.PathLike) -> Path:
    """Fig. 5.5: Mean Dice difference vs parameter reduction against each backbone's FFT run.

    Runs without a full fine-tuning baseline of their backbone are left out; frontier runs are
    drawn filled, the others hollow.

    Args:
        points: scored runs from :func:`pareto_scores`.
        path: the PNG to write (atomically).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    markers = "osD^v<>Ph"
    for k, backbone in enumerate(sorted({p.record.backbone for p in points})):
        pts = [p for p in points if p.record.backbone == backbone and p.dice_diff is not None and not p.record.is_fft]
        if not pts:
            continue
        color = f"C{k}"
        for p in pts:
            ax.scatter(100 * p.param_reduction, p.dice_diff, marker=markers[k % len(markers)], s=60,
                       color=color if p.on_frontier else "none", edgecolors=color,
                       label=backbone if p is pts[0] else None)
            ax.annotate(f"{p.record.label} ({p.score:.2f})", (100 * p.param_reduction, p.dice_diff),
                        textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.axhline(0.0, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("parameter reduction vs full fine-tuning (%)")
    ax.set_ylabel("Mean Dice difference vs full fine-tuning")
    ax.set_title("Performance - parameter efficiency trade-off (filled: frontier)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(title="backbone")
    atomic_save_figure(fig, path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path
