"""Run records laid out as the echo paper's Tables I-IV, our figures beside the paper's.

Each training run (:func:`~monai_peft.echo.training.train_preset`, ``monai-peft echo train``) leaves a run record
``results.json`` with the preset, the composition, LoRA layers and rank, the learning rate, the parameter counts,
the training time and the test metric with and without poor-quality images. :func:`echo_tables` groups the
records by table (task) in the paper's column order: experiment, layers with LoRA weights, rank, learning rate,
test metric with / without poor images, trainable and total parameters, training minutes; regression tables add
R^2 (the paper's Figures 4-5). Where the record's preset is a row of the paper, the paper's figure stands beside
ours ("ours / paper").
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from .presets import ECHO_PRESETS, METRIC_OF_TASK, TABLE_OF_TASK

__all__ = ["find_run_records", "echo_tables"]

_TITLES = {"view": "classification adapter (accuracy)", "volume": "ventricular volume regression adapter (MAE, ml)",
           "age": "age regression adapter (MAE, years)", "segmentation": "segmentation adapter (Dice)"}


def find_run_records(paths: Iterable[str | os.PathLike]) -> list[dict]:
    """Run records (``results.json``) of echo task runs under ``paths`` (files, run folders or their parents).

    Raises:
        FileNotFoundError: a path does not exist, or no echo task run record is found at all.
    """
    records = []
    for p in map(Path, paths):
        if not p.exists():
            raise FileNotFoundError(f"run path {p} does not exist.")
        files = [p] if p.is_file() else ([p / "results.json"] if (p / "results.json").is_file()
                                         else sorted(p.rglob("results.json")))
        for f in files:
            try:
                rec = json.loads(f.read_text())
            except json.JSONDecodeError as e:
                raise ValueError(f"run record {f} is not valid JSON: {e}") from e
            if isinstance(rec, dict) and rec.get("task") in TABLE_OF_TASK and "test" in rec:
                records.append({**rec, "_path": str(f)})
    if not records:
        raise FileNotFoundError(f"no echo task run record (results.json with a task and a test section) under "
                                f"{[str(p) for p in paths]}.")
    return records


def _num(v: Any, spec: str) -> str:
    return "–" if v is None else format(v, spec)


def _pair(ours: Any, paper: Any, spec: str) -> str:
    return f"{_num(ours, spec)} / {_num(paper, spec)}" if paper is not None else _num(ours, spec)


def _lr(rec: dict) -> str:
    lr, lr_min = rec.get("lr"), rec.get("lr_min")
    if lr is None:
        return "–"
    return f"{lr:g}" if lr_min is None else f"{lr:g} to {lr_min:g}"


def _row(rec: dict) -> dict:
    task = rec["task"]
    metric = METRIC_OF_TASK[task]
    preset = ECHO_PRESETS.get(rec.get("preset", ""))
    paper = preset.paper if preset is not None else {}
    test = rec.get("test", {})
    params = rec.get("parameters", {})
    seconds = rec.get("train_seconds", rec.get("costs", {}).get("train_seconds"))
    return {
        "run": rec["_path"], "preset": rec.get("preset"), "experiment": rec.get("experiment", "?"),
        "layers": rec.get("placement") or "no LoRA", "rank": rec.get("rank"), "lr": _lr(rec),
        "with_poor": test.get("all", {}).get(metric), "no_poor": test.get("no_poor", {}).get(metric),
        "r2": test.get("all", {}).get("r2"), "trainable": params.get("trainable"), "total": params.get("total"),
        "minutes": None if seconds is None else seconds / 60.0,
        "paper": {k: paper.get(k) for k in ("with_poor", "no_poor", "trainable", "total", "minutes")},
    }


def echo_tables(records: Sequence[dict]) -> dict[str, dict]:
    """Tables I-IV from run records: ``{"I": {"task", "rows": [...], "markdown": str}, ...}`` (tables with runs only)."""
    out: dict[str, dict] = {}
    for task, table in TABLE_OF_TASK.items():
        rows = [_row(r) for r in records if r["task"] == task]
        if not rows:
            continue
        metric = METRIC_OF_TASK[task]
        spec = ".3f" if metric != "mae" else ".2f"
        regression = metric == "mae"
        head = ("| Experiment | layers with LoRA weights | rank | learning rate | test "
                f"{metric} with poor images | no poor images |" + (" R² |" if regression else "")
                + " trainable params | total params | training time [min] |")
        sep = "|---|---|---|---|---|---|" + ("---|" if regression else "") + "---|---|---|"
        lines = [f"**Table {table}: results for the {_TITLES[task]}** (ours / paper)", "", head, sep]
        for r in rows:
            p = r["paper"]
            cells = [r["experiment"] + ("" if r["preset"] in ECHO_PRESETS else " (custom)"), r["layers"],
                     _num(r["rank"], "d"), r["lr"], _pair(r["with_poor"], p["with_poor"], spec),
                     _pair(r["no_poor"], p["no_poor"], spec)]
            if regression:
                cells.append(_num(r["r2"], ".2f"))
            cells += [_pair(r["trainable"], p["trainable"], ","), _pair(r["total"], p["total"], ","),
                      _pair(r["minutes"], p["minutes"], ".2f")]
            lines.append("| " + " | ".join(cells) + " |")
        out[table] = {"task": task, "rows": rows, "markdown": "\n".join(lines)}
    return out
