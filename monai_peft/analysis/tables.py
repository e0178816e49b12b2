"""Run records laid out as the thesis's result tables (thesis 5.1.4, 5.2.1, 5.2.3).

* Table 5.5: per backbone, FFT and each PEFT method: ``# Params (M)`` and ``Mean Dice`` on the test set
  (organs task, 100 % of the data).
* Table 5.6: per backbone, the data-size sweep (100 %, 50 %, 10 %), FFT next to each PEFT method.
* Table 5.8: vertebrae (OOD, TotalSegmentator CT) Mean Dice, FFT next to each PEFT method.
* Table 5.9: organs on MR (OOD, TotalSegmentator MR) Mean Dice, FFT next to each PEFT method.

A record's task comes from its ``task``/``dataset`` key (``None`` means organs on CT; names holding
``vert`` mean vertebrae, names holding ``mr`` mean MR organs), its data size from ``data_fraction``
(``None`` means 100 %). When several runs fill one cell (e.g. different placements), the one with the
highest Mean Dice is shown.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from monai_peft.analysis.pareto import FFT_METHODS, RunRecord

__all__ = ["METHOD_LABELS", "task_kind", "table_5_5", "table_5_6", "table_ood", "thesis_tables"]

METHOD_LABELS = {"full": "FFT", "fft": "FFT", "lora": "LoRA", "convadapter": "ConvAda", "ssf": "SSF",
                 "bitfit": "BitFit", "norm": "Norm", "decoder": "Decoder", "head": "Head"}
BACKBONE_LABELS = {"segresnet": "SegResNet", "unet": "UNet"}
_BACKBONE_ORDER = ("unet", "segresnet")  # the thesis's column order


def task_kind(record: RunRecord) -> str:
    """``organs``, ``vertebrae``, ``mr_organs`` or the record's own task name."""
    t = (record.task or "").lower()
    if not t or (("organ" in t or "total" in t) and "mr" not in t):
        return "organs"
    if "vert" in t:
        return "vertebrae"
    if "mr" in t:
        return "mr_organs"
    return t


def _fraction(record: RunRecord) -> float:
    return 1.0 if record.data_fraction is None else record.data_fraction


def _mlabel(method: str) -> str:
    return METHOD_LABELS.get(method.lower(), method)


def _blabel(backbone: str) -> str:
    return BACKBONE_LABELS.get(backbone.lower(), backbone)


def _backbones(records: Sequence[RunRecord]) -> list[str]:
    names = {r.backbone for r in records}
    known = [b for b in _BACKBONE_ORDER if b in names]
    return known + sorted(names - set(known))


def _methods(records: Sequence[RunRecord]) -> list[str]:
    """FFT first, then by decreasing trainable parameters (the thesis's column order)."""
    by_method: dict[str, float] = {}
    for r in records:
        by_method[r.method] = max(by_method.get(r.method, 0.0), r.params)
    return sorted(by_method, key=lambda m: (m.strip().lower() not in FFT_METHODS, -by_method[m]))


def _best(records: Sequence[RunRecord]) -> RunRecord | None:
    return max(records, key=lambda r: r.dice) if records else None


def _fmt(v: float | None, spec: str) -> str:
    return "–" if v is None else format(v, spec)


def _markdown(title: str, columns: list[tuple[str, str]], rows: dict[str, list[str]]) -> str:
    head = "| | " + " | ".join(f"{g} {s}".strip() for g, s in columns) + " |"
    sep = "|---|" + "---|" * len(columns)
    body = [f"| {name} | " + " | ".join(vals) + " |" for name, vals in rows.items()]
    return "\n".join([f"**{title}**", "", head, sep, *body])


def _table(
    title: str, columns: list[tuple[str, str]], cells: list[RunRecord | None], params_row: bool
) -> dict[str, Any]:
    rows_json: dict[str, list[float | None]] = {}
    rows_md: dict[str, list[str]] = {}
    if params_row:
        rows_json["# Params (M)"] = [None if c is None else c.params / 1e6 for c in cells]
        rows_md["# Params (M)"] = [_fmt(v, ".3g") for v in rows_json["# Params (M)"]]
    rows_json["Mean Dice"] = [None if c is None else c.dice for c in cells]
    rows_md["Mean Dice"] = [_fmt(v, ".2f") for v in rows_json["Mean Dice"]]
    return {
        "json": {"title": title, "columns": [list(c) for c in columns], "rows": rows_json,
                 "sources": [None if c is None else c.source for c in cells]},
        "markdown": _markdown(title, columns, rows_md),
    }


def table_5_5(records: Sequence[RunRecord]) -> dict[str, Any] | None:
    """Table 5.5: test Mean Dice and trainable parameters per backbone and method (organs, 100 %)."""
    pool = [r for r in records if task_kind(r) == "organs" and _fraction(r) >= 0.999]
    if not pool:
        return None
    columns, cells = [], []
    for b in _backbones(pool):
        rb = [r for r in pool if r.backbone == b]
        for m in _methods(rb):
            columns.append((_blabel(b), _mlabel(m)))
            cells.append(_best([r for r in rb if r.method == m]))
    return _table("Table 5.5: performance of inference on the test set", columns, cells, params_row=True)


def table_5_6(records: Sequence[RunRecord]) -> dict[str, Any] | None:
    """Table 5.6: test Mean Dice for each data size (100 / 50 / 10 %), FFT next to the PEFT methods, for
    the backbone-method pairs that have runs on less than 100 % of the data."""
    organs = [r for r in records if task_kind(r) == "organs"]
    swept = {(r.backbone, r.method) for r in organs if _fraction(r) < 0.999}
    if not swept:
        return None
    # only the backbone-method pairs that were swept (the thesis: SegResNet FFT and ConvAdapter)
    pool = [r for r in organs if (r.backbone, r.method) in swept]
    fractions = sorted({round(_fraction(r), 4) for r in pool}, reverse=True)
    columns, cells = [], []
    for f in fractions:
        rf = [r for r in pool if abs(_fraction(r) - f) < 1e-3]
        for b in _backbones(rf):
            rb = [r for r in rf if r.backbone == b]
            for m in _methods(rb):
                columns.append((f"{f * 100:.0f}% data", f"{_blabel(b)}-{_mlabel(m)}"))
                cells.append(_best([r for r in rb if r.method == m]))
    return _table("Table 5.6: test Mean Dice with various downstream dataset sizes", columns, cells, params_row=False)


def table_ood(records: Sequence[RunRecord], kind: str) -> dict[str, Any] | None:
    """Table 5.8 (``kind="vertebrae"``) or 5.9 (``kind="mr_organs"``): OOD test Mean Dice."""
    titles = {"vertebrae": "Table 5.8: test Mean Dice on TotalSegmentator CT vertebrae (OOD)",
              "mr_organs": "Table 5.9: test Mean Dice on TotalSegmentator MR organs (OOD)"}
    if kind not in titles:
        raise ValueError(f"kind must be one of {sorted(titles)}, got {kind!r}")
    pool = [r for r in records if task_kind(r) == kind and _fraction(r) >= 0.999]
    if not pool:
        return None
    columns, cells = [], []
    for b in _backbones(pool):
        rb = [r for r in pool if r.backbone == b]
        for m in _methods(rb):
            columns.append(("", f"{_blabel(b)}-{_mlabel(m)}"))
            cells.append(_best([r for r in rb if r.method == m]))
    return _table(titles[kind], columns, cells, params_row=False)


def thesis_tables(records: Sequence[RunRecord]) -> dict[str, dict[str, Any]]:
    """Every thesis table the records can fill: ``{"5.5": {"json": ..., "markdown": ...}, ...}``."""
    out = {"5.5": table_5_5(records), "5.6": table_5_6(records),
           "5.8": table_ood(records, "vertebrae"), "5.9": table_ood(records, "mr_organs")}
    return {k: v for k, v in out.items() if v is not None}
