"""Data-size sweep and OOD runs (thesis 4.2.5.2, 4.2.5.3, 5.2.1, 5.2.3) as bundle command lines, and the
collection of their finished run records into the thesis tables 5.5, 5.6, 5.8 and 5.9.

``plan`` writes one ``python -m monai.bundle run`` command per run (it trains nothing itself):

* data sizes 100 %, 50 %, 10 % of the training/validation cases, the test set fixed (thesis 4.2.5.2),
  for each preset (default: SegResNet full fine-tuning and ConvAdapter, the thesis's comparison); the
  smaller sizes override the bundle's ``train#datalist`` / ``validate#datalist`` with :func:`subsample`;
* OOD: the 25 vertebrae of TotalSegmentator CT, and the 29 organs of TotalSegmentator MR (thesis
  4.2.5.3), 100 % of the data.

Each run writes to ``<output_root>/<task>/<N>pct/<preset>/`` so ``collect`` can tell task and data
size from the folder even when a record does not carry them. Run it as::

    python -m monai_peft.analysis.sweeps plan bundles/totalseg_organs_suprem_segresnet_peft \\
        --output-root runs/sweep --set dataset_dir=/data/Totalsegmentator_dataset_v201
    bash runs/sweep/sweep.sh            # hours of training, on a GPU machine
    python -m monai_peft.analysis.sweeps collect runs/sweep --markdown runs/sweep/tables.md
"""

from __future__ import annotations

import logging
import re
import shlex
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from monai_peft.io import atomic_write_json, atomic_write_text, json_default
from monai_peft.analysis.pareto import RunRecord, load_run_records
from monai_peft.analysis.tables import thesis_tables

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_KEYS", "DEFAULT_PRESETS", "SWEEP_TASKS", "SweepRun", "collect_sweep", "main", "plan_sweep",
           "subsample", "write_plan"]

#: bundle config ids the overrides set (``--<id> <value>`` on the ``monai.bundle run`` command line);
#: the ids of the bundles in ``bundles/`` (``train.json``).
DEFAULT_KEYS: dict[str, str] = {
    "preset": "peft#preset",
    "classes": "classes",
    "output_dir": "output_dir",
    "train_datalist": "train#datalist",
    "val_datalist": "validate#datalist",
}

#: task -> ``--classes`` (thesis 4.2.5.3: vertebrae of TotalSegmentator CT, organs of TotalSegmentator MR;
#: the bundles' datalist picks ``mri.nii.gz`` cases for the MR group).
SWEEP_TASKS: dict[str, str] = {"organs": "organs", "vertebrae": "vertebrae", "mr_organs": "mr_organs"}

#: the thesis's comparison (5.2): SegResNet fully fine-tuned vs ConvAdapter parallel to every ResBlock.
DEFAULT_PRESETS = ("segresnet-full-finetune", "segresnet-convadapter-resblock-parallel")

_DATALIST = ("$__import__('monai_peft.analysis.sweeps', fromlist=['subsample']).subsample("
             "monai_peft.workflows.bundle.bundle_datalist(@dataset_dir, @classes, '{split}', @cache_dir), {fraction})")


@dataclass
class SweepRun:
    """One planned run: its task, preset, data fraction, output folder and bundle command line."""

    task: str
    preset: str
    data_fraction: float
    output_dir: str
    overrides: dict[str, Any] = field(default_factory=dict)
    command: list[str] = field(default_factory=list)

    @property
    def shell(self) -> str:
        return shlex.join(self.command)


def subsample(datalist: Sequence[Any], fraction: float, seed: int = 0) -> list[Any]:
    """A seeded random ``fraction`` of a datalist (at least one item), in the original order.

    Applied to the training and to the validation list separately, it keeps their 80/20 ratio as the
    thesis's 50 % and 10 % runs did (4.2.5.2); the test list is never subsampled.

    Args:
        datalist: the items.
        fraction: in (0, 1].
        seed: random seed.
    """
    if not 0.0 < float(fraction) <= 1.0:
        raise ValueError(f"subsample: fraction must be in (0, 1], got {fraction}")
    items = list(datalist)
    if fraction >= 1.0 or not items:
        return items
    import random

    n = max(1, round(len(items) * float(fraction)))
    keep = sorted(random.Random(seed).sample(range(len(items)), n))
    return [items[i] for i in keep]


def _percent(fraction: float) -> str:
    return f"{round(fraction * 100):d}pct"


def plan_sweep(
    bundle_dir: str | Path,
    presets: Sequence[str] = DEFAULT_PRESETS,
    fractions: Sequence[float] = (1.0, 0.5, 0.1),
    ood_tasks: Sequence[str] = ("vertebrae", "mr_organs"),
    output_root: str | Path = "runs/sweep",
    keys: Mapping[str, str] | None = None,
    extra_overrides: Mapping[str, Any] | None = None,
    config_file: str = "configs/train.json",
    python: str = "python",
) -> list[SweepRun]:
    """The runs of the data-size sweep and the OOD experiments as bundle command lines.

    Args:
        bundle_dir: the MONAI bundle (holds ``configs/train.json`` and ``configs/metadata.json``).
        presets: PEFT presets to compare (``monai-peft presets``; default: SegResNet full fine-tuning
            and ConvAdapter, the thesis's 5.2 comparison).
        fractions: data sizes in (0, 1] for the organs task (thesis: 1.0, 0.5, 0.1).
        ood_tasks: OOD tasks, run at 100 % (``vertebrae``, ``mr_organs``; empty for none).
        output_root: root of the run folders ``<task>/<N>pct/<preset>``.
        keys: config ids of the overrides, default :data:`DEFAULT_KEYS` (an id mapped to ``""`` is not set).
        extra_overrides: more ``--id value`` pairs for every run (e.g. ``{"dataset_dir": ...}``).
        config_file: the training config inside the bundle.
        python: interpreter for the command lines.

    Raises:
        ValueError: for a fraction outside (0, 1], an unknown task or an empty preset list.
    """
    keys = {**DEFAULT_KEYS, **(keys or {})}
    if not presets:
        raise ValueError("plan_sweep: presets is empty")
    bad = [f for f in fractions if not 0.0 < float(f) <= 1.0]
    if bad:
        raise ValueError(f"plan_sweep: fractions must be in (0, 1], got {bad}")
    unknown = [t for t in ood_tasks if t not in SWEEP_TASKS]
    if unknown:
        raise ValueError(f"plan_sweep: unknown OOD tasks {unknown}; expected some of {sorted(SWEEP_TASKS)}")
    bundle = Path(bundle_dir)
    jobs = [("organs", float(f)) for f in fractions] + [(t, 1.0) for t in ood_tasks]
    runs = []
    for task, fraction in jobs:
        for preset in presets:
            out = Path(output_root) / task / _percent(fraction) / preset
            values: dict[str, Any] = {"preset": preset, "classes": SWEEP_TASKS[task], "output_dir": str(out)}
            if fraction < 1.0:
                values["train_datalist"] = _DATALIST.format(split="train", fraction=fraction)
                values["val_datalist"] = _DATALIST.format(split="val", fraction=fraction)
            overrides = {keys[k]: v for k, v in values.items() if keys.get(k)}
            overrides.update(extra_overrides or {})
            command = [python, "-m", "monai.bundle", "run", "--bundle_root", str(bundle),
                       "--config_file", str(bundle / config_file),
                       "--meta_file", str(bundle / "configs" / "metadata.json")]
            for k, v in overrides.items():
                command += [f"--{k}", str(v)]
            runs.append(SweepRun(task, preset, fraction, str(out), overrides, command))
    return runs


def write_plan(runs: Sequence[SweepRun], output_root: str | Path) -> tuple[Path, Path]:
    """Write ``sweep.sh`` (one command per line, stops at the first failure) and ``sweep.json``."""
    root = Path(output_root)
    script = root / "sweep.sh"
    lines = ["#!/usr/bin/env bash", "# thesis 4.2.5.2 / 4.2.5.3: data-size sweep and OOD runs", "set -euo pipefail"]
    lines += [r.shell for r in runs]
    atomic_write_text(script, "\n".join(lines) + "\n")
    plan = atomic_write_json(root / "sweep.json", [asdict(r) for r in runs], default=json_default)
    return script, plan


_PCT = re.compile(r"^(\d+)pct$")


def _from_path(record: RunRecord, root: Path) -> RunRecord:
    """Fill task / data fraction of a record from its ``<task>/<N>pct/<method>`` folder when missing."""
    if record.source is None:
        return record
    try:
        parts = Path(record.source.split("[")[0]).resolve().relative_to(root.resolve()).parts
    except ValueError:
        return record
    if record.task is None and parts and parts[0] in SWEEP_TASKS:
        record.task = parts[0]
    if record.data_fraction is None and len(parts) > 1 and _PCT.match(parts[1]):
        record.data_fraction = int(_PCT.match(parts[1]).group(1)) / 100.0
    return record


def collect_sweep(root: str | Path, backbone: str | None = None) -> dict[str, Any]:
    """Read every ``results.json`` under ``root`` and lay them out as the thesis tables.

    Args:
        root: the sweep's output root.
        backbone: backbone name for records that carry none (e.g. ``segresnet``).

    Returns:
        ``{"runs": [...], "tables": {"5.6": {"json", "markdown"}, ...}}``.
    """
    root = Path(root)
    records = [_from_path(r, root) for r in load_run_records([root])]
    if backbone:
        for r in records:
            if r.backbone == "unknown":
                r.backbone = backbone
    return {"runs": [asdict(r) for r in records], "tables": thesis_tables(records)}


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m monai_peft.analysis.sweeps {plan,collect} ...``: the same as ``monai-peft sweep ...``."""
    from monai_peft.cli import main as cli_main

    return cli_main(["sweep", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
