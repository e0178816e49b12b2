"""Run records laid out as the thesis's result tables (thesis 5.1-5.2), the thesis's own figures beside them.

* Tables 5.1-5.4: per preset of the table (``monai-peft presets``), trainable parameters and best validation Mean
  Dice, each next to the thesis's figure (5.1 UNet LoRA, 5.2 SegResNet LoRA, 5.3 SegResNet ConvAdapter, 5.4 UNet
  ConvAdapter). Runs are matched by their ``preset``.
* Table 5.5: per backbone, FFT and each PEFT method: ``# Params (M)`` and ``Mean Dice`` on the test set
  (organs task, 100 % of the data).
* Table 5.6: per backbone, the data-size sweep (100 %, 50 %, 10 %), FFT next to each PEFT method.
* Table 5.8: vertebrae (OOD, TotalSegmentator CT) Mean Dice, FFT next to each PEFT method.
* Table 5.9: organs on MR (OOD, TotalSegmentator MR) Mean Dice, FFT next to each PEFT method.
* Table 5.7: per backbone and method, training and inference seconds per volume and peak memory, next to the
  thesis's SegResNet figures.
* Table 5.10: mean Otsu Dice of Grad-CAM maps per class and layer (``gradcam_summary.json`` of the bundles'
  ``interpret.json`` or ``gradcam.json`` of ``monai-peft gradcam``), next to the thesis's.

Tables 5.5-5.9 carry a ``Mean Dice (thesis)`` row where the thesis reports the same backbone and method.

A record's task comes from its ``task``/``dataset`` key (``None`` means organs on CT; names holding
``vert`` mean vertebrae, names holding ``mr`` mean MR organs), its data size from ``data_fraction``
(``None`` means 100 %). When several runs fill one cell (e.g. different placements), the one with the
highest Mean Dice is shown.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from monai_peft.analysis import thesis_figures as thesis
from monai_peft.analysis.pareto import FFT_METHODS, RunRecord

__all__ = ["METHOD_LABELS", "task_kind", "table_validation", "table_5_5", "table_5_6", "table_5_7", "table_ood",
           "table_5_10", "load_gradcam_summaries", "layer_role", "thesis_tables"]

logger = logging.getLogger(__name__)

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


def _canonical(method: str) -> str:
    """``full`` for every spelling of full fine-tuning, else the method in lower case."""
    return "full" if method.strip().lower() in FFT_METHODS else method.strip().lower()


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
    title: str, columns: list[tuple[str, str]], cells: list[RunRecord | None], params_row: bool,
    thesis_dice: list[float | None] | None = None,
) -> dict[str, Any]:
    rows_json: dict[str, list[float | None]] = {}
    rows_md: dict[str, list[str]] = {}
    if params_row:
        rows_json["# Params (M)"] = [None if c is None else c.params / 1e6 for c in cells]
        rows_md["# Params (M)"] = [_fmt(v, ".3g") for v in rows_json["# Params (M)"]]
    rows_json["Mean Dice"] = [None if c is None else c.dice for c in cells]
    rows_md["Mean Dice"] = [_fmt(v, ".2f") for v in rows_json["Mean Dice"]]
    if thesis_dice is not None and any(v is not None for v in thesis_dice):
        rows_json["Mean Dice (thesis)"] = list(thesis_dice)
        rows_md["Mean Dice (thesis)"] = [_fmt(v, ".2f") for v in thesis_dice]
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
    columns, cells, published = [], [], []
    for b in _backbones(pool):
        rb = [r for r in pool if r.backbone == b]
        for m in _methods(rb):
            columns.append((_blabel(b), _mlabel(m)))
            cells.append(_best([r for r in rb if r.method == m]))
            published.append(thesis.TEST_DICE.get((b.lower(), _canonical(m))))
    return _table("Table 5.5: performance of inference on the test set", columns, cells, params_row=True,
                  thesis_dice=published)


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
    columns, cells, published = [], [], []
    for f in fractions:
        rf = [r for r in pool if abs(_fraction(r) - f) < 1e-3]
        for b in _backbones(rf):
            rb = [r for r in rf if r.backbone == b]
            for m in _methods(rb):
                columns.append((f"{f * 100:.0f}% data", f"{_blabel(b)}-{_mlabel(m)}"))
                cells.append(_best([r for r in rb if r.method == m]))
                published.append(thesis.DATA_SIZE_DICE.get((round(f, 2), _canonical(m)))
                                 if b.lower() == "segresnet" else None)
    return _table("Table 5.6: test Mean Dice with various downstream dataset sizes", columns, cells, params_row=False,
                  thesis_dice=published)


def table_ood(records: Sequence[RunRecord], kind: str) -> dict[str, Any] | None:
    """Table 5.8 (``kind="vertebrae"``) or 5.9 (``kind="mr_organs"``): OOD test Mean Dice."""
    titles = {"vertebrae": "Table 5.8: test Mean Dice on TotalSegmentator CT vertebrae (OOD)",
              "mr_organs": "Table 5.9: test Mean Dice on TotalSegmentator MR organs (OOD)"}
    if kind not in titles:
        raise ValueError(f"kind must be one of {sorted(titles)}, got {kind!r}")
    pool = [r for r in records if task_kind(r) == kind and _fraction(r) >= 0.999]
    if not pool:
        return None
    columns, cells, published = [], [], []
    for b in _backbones(pool):
        rb = [r for r in pool if r.backbone == b]
        for m in _methods(rb):
            columns.append(("", f"{_blabel(b)}-{_mlabel(m)}"))
            cells.append(_best([r for r in rb if r.method == m]))
            published.append(thesis.OOD_DICE.get((kind, _canonical(m))) if b.lower() == "segresnet" else None)
    return _table(titles[kind], columns, cells, params_row=False, thesis_dice=published)


def _side_by_side(title: str, row_names: list[str], columns: list[tuple[str, str]],
                  values: list[list[float | None]], specs: list[str],
                  sources: list[str | None] | None = None) -> dict[str, Any]:
    """A table whose rows are configurations and whose columns pair the user's figure with the thesis's."""
    rows_json = {name: list(vals) for name, vals in zip(row_names, values)}
    rows_md = {name: [_fmt(v, spec) for v, spec in zip(vals, specs)] for name, vals in zip(row_names, values)}
    table = {"title": title, "columns": [list(c) for c in columns], "rows": rows_json}
    if sources is not None:
        table["sources"] = sources
    return {"json": table, "markdown": _markdown(title, columns, rows_md)}


_VALIDATION_TITLES = {
    "5.1": "Table 5.1: full fine-tuning and LoRA in the UNet (validation Mean Dice)",
    "5.2": "Table 5.2: full fine-tuning and LoRA in the SegResNet (validation Mean Dice)",
    "5.3": "Table 5.3: full fine-tuning and ConvAdapter in the SegResNet (validation Mean Dice)",
    "5.4": "Table 5.4: full fine-tuning and ConvAdapter in the UNet (validation Mean Dice)",
}


def table_validation(records: Sequence[RunRecord], table: str) -> dict[str, Any] | None:
    """Table 5.1, 5.2, 5.3 or 5.4: trainable parameters and best validation Mean Dice of the table's presets.

    Rows are the presets of the thesis table that have a run (matched by the record's ``preset``; organs task,
    100 % of the data); columns pair ours with the thesis's (``# Param (M)``, ``Val Mean Dice``). A preset with
    several runs shows the one with the best validation Dice.
    """
    from monai_peft.presets import get_preset

    if table not in thesis.VALIDATION_TABLES:
        raise ValueError(f"table must be one of {sorted(thesis.VALIDATION_TABLES)}, got {table!r}")
    pool = [r for r in records if r.preset and task_kind(r) == "organs" and _fraction(r) >= 0.999]
    rows, values, sources = [], [], []
    for name, published in thesis.VALIDATION_TABLES[table].items():
        runs = [r for r in pool if r.preset == name]
        if not runs:
            continue
        best = max(runs, key=lambda r: -1.0 if r.val_dice is None else r.val_dice)
        rows.append(name)
        values.append([best.params / 1e6, get_preset(name).thesis_params_m, best.val_dice, published])
        sources.append(best.source)
    if not rows:
        return None
    columns = [("# Param (M)", ""), ("# Param (M)", "thesis"), ("Val Mean Dice", ""), ("Val Mean Dice", "thesis")]
    return _side_by_side(_VALIDATION_TITLES[table], rows, columns, values, [".3g", ".3g", ".2f", ".2f"], sources)


_COST_ROWS = (("train_s_per_volume", "Training time (s/volume)"),
              ("inference_s_per_volume", "Inference time (s/volume)"),
              ("train_peak_memory_gb", "Peak memory, training (GB)"))


def table_5_7(records: Sequence[RunRecord]) -> dict[str, Any] | None:
    """Table 5.7: seconds per volume (training, inference) and peak training memory per backbone and method.

    Columns pair each of the user's configurations with the thesis's figure (SegResNet FFT and ConvAdapter, on a
    GPU; ``memory_source`` in the run record says whether ours is GPU memory or the CPU's peak RSS).
    """
    pool = [r for r in records if r.costs and any(r.costs.get(k) is not None for k, _ in _COST_ROWS)
            and task_kind(r) == "organs" and _fraction(r) >= 0.999]  # thesis: the full organs dataset
    if not pool:
        return None
    columns: list[tuple[str, str]] = []
    cols: list[list[float | None]] = []
    for b in _backbones(pool):
        rb = [r for r in pool if r.backbone == b]
        for m in _methods(rb):
            run = max((r for r in rb if r.method == m), key=lambda r: r.dice)
            published = thesis.COSTS.get(_canonical(m)) if b.lower() == "segresnet" else None
            columns.append((f"{_blabel(b)}-{_mlabel(m)}", run.costs.get("memory_source", "") or ""))
            cols.append([run.costs.get(k) for k, _ in _COST_ROWS])
            columns.append((f"{_blabel(b)}-{_mlabel(m)}", "thesis"))
            cols.append([published.get(k) if published else None for k, _ in _COST_ROWS])
    rows = [label for _, label in _COST_ROWS]
    values = [[c[i] for c in cols] for i in range(len(_COST_ROWS))]
    return _side_by_side("Table 5.7: computational costs", rows, columns, values, [".3g"] * len(columns))


def layer_role(name: str) -> str:
    """``"adapter"``, ``"final"`` or ``"backbone"``: which of Table 5.10's layers a module name is."""
    low = name.lower()
    if any(t in low for t in ("conv_adapter", "lora_", "ssf_", "adapter")):
        return "adapter"
    if any(t in low for t in ("conv_final", "final_conv", "out_tr", "seg_layers")):
        return "final"
    return "backbone"


def load_gradcam_summaries(paths: Iterable[str | Path]) -> list[dict[str, dict[str, float]]]:
    """Mean Otsu Dice per class and layer from ``gradcam_summary.json`` / ``gradcam.json`` files or folders.

    Returns:
        one ``{class: {layer name: Dice}}`` per file found (folders are searched recursively).
    """
    out = []
    for p in map(Path, paths):
        files = [p] if p.is_file() else (sorted(p.rglob("gradcam_summary.json")) + sorted(p.rglob("gradcam.json"))
                                         if p.is_dir() else [])
        for f in files:
            if f.name not in ("gradcam_summary.json", "gradcam.json"):
                continue
            data = json.loads(f.read_text(encoding="utf-8"))
            dice = data.get("mean_dice") if f.name == "gradcam_summary.json" else data.get("dice")
            if isinstance(dice, dict) and dice:
                out.append(dice)
            else:
                logger.warning("%s: no Otsu Dice in the file", f)
    return out


def table_5_10(summaries: Sequence[dict[str, dict[str, float]]]) -> dict[str, Any] | None:
    """Table 5.10: mean Otsu Dice of Grad-CAM maps per class, for the final conv, the last backbone conv and the
    adapter conv, each next to the thesis's figure (classes the thesis reports first).

    Args:
        summaries: from :func:`load_gradcam_summaries`; several files are averaged per class and layer role.
    """
    collected: dict[str, dict[str, list[float]]] = {}
    for summary in summaries:
        for cname, per_layer in summary.items():
            for layer, value in per_layer.items():
                if value is not None:
                    collected.setdefault(cname, {}).setdefault(layer_role(layer), []).append(float(value))
    if not collected:
        return None
    roles = list(thesis.GRADCAM_LAYER_ROLES)
    classes = [c for c in thesis.GRADCAM_OTSU_DICE if c in collected] + sorted(set(collected) - set(thesis.GRADCAM_OTSU_DICE))
    columns = []
    for role in roles:
        columns += [(thesis.GRADCAM_LAYER_ROLES[role], ""), (thesis.GRADCAM_LAYER_ROLES[role], "thesis")]
    values = []
    for c in classes:
        row: list[float | None] = []
        for role in roles:
            mine = collected[c].get(role)
            row += [sum(mine) / len(mine) if mine else None, thesis.GRADCAM_OTSU_DICE.get(c, {}).get(role)]
        values.append(row)
    return _side_by_side("Table 5.10: mean Dice of Otsu-thresholded Grad-CAM maps", classes, columns, values,
                         [".2f"] * len(columns))


def thesis_tables(records: Sequence[RunRecord],
                  gradcam: Sequence[dict[str, dict[str, float]]] = ()) -> dict[str, dict[str, Any]]:
    """Every thesis table the records (and Grad-CAM summaries) can fill: ``{"5.1": {"json", "markdown"}, ...}``."""
    out: dict[str, dict[str, Any] | None] = {t: table_validation(records, t) for t in thesis.VALIDATION_TABLES}
    out.update({"5.5": table_5_5(records), "5.6": table_5_6(records), "5.7": table_5_7(records),
                "5.8": table_ood(records, "vertebrae"), "5.9": table_ood(records, "mr_organs"),
                "5.10": table_5_10(gradcam)})
    return {k: v for k, v in out.items() if v is not None}
