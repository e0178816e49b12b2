"""Data-size sweep and OOD runs (thesis 4.2.5.2, 4.2.5.3, 5.2.1, 5.2.3) as bundle command lines, and the
collection of their finished run records into the thesis tables 5.5, 5.6, 5.8 and 5.9.

``plan`` writes one ``python -m monai.bundle run`` command per run (it trains nothing itself):

* data sizes 100 %, 50 %, 10 % of the training/validation cases, the test set fixed (thesis 4.2.5.2: 859/245,
  441/111, 88/22 of TotalSegmentator's 1228 cases), for each preset (default: SegResNet full fine-tuning and
  ConvAdapter, the thesis's comparison); the smaller sizes set the bundle's ``data_fraction``
  (:func:`monai_peft.data.subset_split` inside :func:`monai_peft.workflows.bundle.bundle_datalist`);
* OOD: the 25 vertebrae of TotalSegmentator CT, and the 29 organs of TotalSegmentator MR (thesis
  4.2.5.3), 100 % of the data.

Each task reads its own dataset folder (``datasets``: the CT folder for organs and vertebrae, the MR folder for
``mr_organs``, whose bundles then normalise MR intensities); a planned task without a folder, or a folder of the
other modality, is an error before anything is written. Each run writes to
``<output_root>/<task>/<N>pct/<preset>/`` so ``collect`` can tell task and data size from the folder even when a
record does not carry them. Run it as::

    monai-peft sweep plan bundles/totalseg_organs_suprem_segresnet_peft --output-root runs/sweep \\
        --dataset ct=/data/Totalsegmentator_dataset_v201 --dataset mr=/data/TotalsegmentatorMRI_dataset_v200
    bash runs/sweep/sweep.sh            # hours of training, on a GPU machine
    monai-peft sweep collect runs/sweep --markdown runs/sweep/tables.md
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
from monai_peft.analysis.tables import load_gradcam_summaries, thesis_tables

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_KEYS", "DEFAULT_PRESETS", "SWEEP_TASKS", "SweepRun", "collect_sweep", "main", "plan_sweep",
           "subsample", "task_datasets", "write_plan"]

#: bundle config ids the overrides set (``--<id> <value>`` on the ``monai.bundle run`` command line);
#: the ids of the bundles in ``bundles/`` (``train.json``).
DEFAULT_KEYS: dict[str, str] = {
    "preset": "peft#preset",
    "classes": "classes",
    "output_dir": "output_dir",
    "dataset_dir": "dataset_dir",
    "data_fraction": "data_fraction",
}

#: task -> ``--classes`` (thesis 4.2.5.3: vertebrae of TotalSegmentator CT, organs of TotalSegmentator MR;
#: the bundles' datalist picks ``mri.nii.gz`` cases for the MR group).
SWEEP_TASKS: dict[str, str] = {"organs": "organs", "vertebrae": "vertebrae", "mr_organs": "mr_organs"}

#: the thesis's comparison (5.2): SegResNet fully fine-tuned vs ConvAdapter parallel to every ResBlock.
DEFAULT_PRESETS = ("segresnet-full-finetune", "segresnet-convadapter-resblock-parallel")



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

    For lists of your own; the sweep's data sizes come from :func:`monai_peft.data.subset_split`, which
    gives the thesis's 88/22 and 441/111 (4.2.5.2).

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
    datasets: Mapping[str, str | Path] | None = None,
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
        datasets: dataset folder per task (``organs``, ``vertebrae``, ``mr_organs``) or per modality (``ct``,
            ``mr``); see :func:`task_datasets`. Required for every planned task.
        keys: config ids of the overrides, default :data:`DEFAULT_KEYS` (an id mapped to ``""`` is not set).
        extra_overrides: more ``--id value`` pairs for every run (e.g. ``{"dataset_dir": ...}``).
        config_file: the training config inside the bundle.
        python: interpreter for the command lines.

    Raises:
        ValueError: for a fraction outside (0, 1], an unknown task, an empty preset list, a task without a
            dataset folder, or a folder whose modality differs from the task's.
        FileNotFoundError: a dataset folder that does not exist.
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
    folders = task_datasets(sorted({t for t, _ in jobs}), datasets or {})
    runs = []
    for task, fraction in jobs:
        for preset in presets:
            out = Path(output_root) / task / _percent(fraction) / preset
            values: dict[str, Any] = {"preset": preset, "classes": SWEEP_TASKS[task], "output_dir": str(out),
                                      "dataset_dir": folders[task]}
            if fraction < 1.0:
                values["data_fraction"] = fraction
            overrides = {keys[k]: v for k, v in values.items() if keys.get(k)}
            overrides.update(extra_overrides or {})
            command = [python, "-m", "monai.bundle", "run", "--bundle_root", str(bundle),
                       "--config_file", str(bundle / config_file),
                       "--meta_file", str(bundle / "configs" / "metadata.json")]
            for k, v in overrides.items():
                command += [f"--{k}", str(v)]
            runs.append(SweepRun(task, preset, fraction, str(out), overrides, command))
    return runs


def task_datasets(tasks: Sequence[str], datasets: Mapping[str, str | Path]) -> dict[str, str]:
    """The dataset folder of each sweep task, checked before anything trains.

    Args:
        tasks: sweep tasks (keys of :data:`SWEEP_TASKS`).
        datasets: ``{task or modality: folder}``; a task's own entry wins over its modality's (``ct`` serves
            ``organs`` and ``vertebrae``, ``mr`` serves ``mr_organs``).

    Raises:
        ValueError: an unknown key, a task without a folder (all such tasks named), or a folder of the other
            modality (through :func:`monai_peft.data.resolve_modality`, naming the class group and the folder).
        FileNotFoundError: a folder that does not exist or holds no case.
    """
    from monai_peft.data import group_modality, resolve_modality

    unknown = sorted(set(datasets) - set(SWEEP_TASKS) - {"ct", "mr"})
    if unknown:
        raise ValueError(f"sweep datasets: unknown keys {unknown}; expected tasks {sorted(SWEEP_TASKS)} or 'ct' / 'mr'")
    out: dict[str, str] = {}
    missing = []
    for task in tasks:
        folder = datasets.get(task) or datasets.get(group_modality(SWEEP_TASKS[task]) or "ct")
        if not folder:
            missing.append(task)
            continue
        if not Path(folder).is_dir():
            raise FileNotFoundError(f"sweep task {task!r}: dataset folder {folder} does not exist")
        resolve_modality(SWEEP_TASKS[task], folder)  # CT classes on an MR folder (or the reverse) fail here
        out[task] = str(Path(folder).absolute())  # sweep.sh may run from another folder
    if missing:
        hints = ", ".join(f"--dataset {t}=FOLDER (or {group_modality(SWEEP_TASKS[t]) or 'ct'}=FOLDER)" for t in missing)
        raise ValueError(f"sweep tasks {missing} have no dataset folder: give {hints}")
    return out


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
    return {"runs": [asdict(r) for r in records], "tables": thesis_tables(records, load_gradcam_summaries([root]))}


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m monai_peft.analysis.sweeps {plan,collect} ...``: the same as ``monai-peft sweep ...``."""
    from monai_peft.cli import main as cli_main

    return cli_main(["sweep", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
