"""Data-size sweep (10, 50, 100 percent of the data) and OOD runs as bundle command lines; collect finished runs into thesis tables.

Each task reads its own dataset folder: --dataset ct=FOLDER serves organs and vertebrae (TotalSegmentator CT),
--dataset mr=FOLDER the MR organs (TotalSegmentator MR); --dataset TASK=FOLDER sets one task. A task without a
folder, or a folder of the other modality, is an error before anything is written. collect lays the finished run
records out as the thesis's Tables 5.1-5.10, the thesis's figures beside.

Examples::

    monai-peft sweep plan bundles/totalseg_organs_suprem_segresnet_peft --output-root runs/sweep \\
        --dataset ct=/data/Totalsegmentator_dataset_v201 --dataset mr=/data/TotalsegmentatorMRI_dataset_v200
    monai-peft sweep collect runs/sweep --markdown runs/sweep/tables.md
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import asdict
from pathlib import Path

from monai_peft.analysis.sweeps import DEFAULT_KEYS, DEFAULT_PRESETS, collect_sweep, plan_sweep, write_plan
from monai_peft.cli._arg_types import existing_dir
from monai_peft.io import atomic_write_json, atomic_write_text, json_default

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True)
    p = sub.add_parser("plan", help="write the sweep's bundle command lines (sweep.sh, sweep.json)")
    p.add_argument("bundle_dir", type=Path)
    p.add_argument("--output-root", type=Path, default=Path("runs/sweep"))
    p.add_argument("--presets", nargs="+", default=list(DEFAULT_PRESETS), help="PEFT presets to compare")
    p.add_argument("--fractions", nargs="+", type=_fraction, default=[1.0, 0.5, 0.1],
                   help="shares of the training data, each in (0, 1] (default: 1.0 0.5 0.1)")
    p.add_argument("--ood", nargs="*", default=["vertebrae", "mr_organs"], help="OOD tasks (none: empty)")
    p.add_argument("--dataset", action="append", default=[], metavar="TASK=FOLDER",
                   help="dataset folder of a task (organs, vertebrae, mr_organs) or modality (ct, mr); repeat")
    p.add_argument("--key", action="append", default=[], metavar="FIELD=ID",
                   help=f"config id for a field ({', '.join(DEFAULT_KEYS)}), e.g. preset=peft#preset")
    p.add_argument("--set", action="append", default=[], metavar="ID=VALUE", help="extra override for every run")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    c = sub.add_parser("collect", help="collect finished run records into the thesis tables")
    c.add_argument("root", type=existing_dir)
    c.add_argument("--backbone", default=None, help="backbone for records that name none")
    c.add_argument("--output", type=Path, default=None, help="write the runs and tables as JSON here")
    c.add_argument("--markdown", type=Path, default=None, help="write the tables as Markdown here")
    c.add_argument("--json", action="store_true", help="print the result as JSON")


def _fraction(value: str) -> float:
    try:
        x = float(value)
    except ValueError:
        x = float("nan")
    if not 0.0 < x <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1], got {value!r}")
    return x


def _pairs(items: list[str], flag: str) -> dict[str, str]:
    bad = [i for i in items if "=" not in i]
    if bad:
        raise ValueError(f"{flag} expects NAME=VALUE, got {bad}.")
    return dict(i.split("=", 1) for i in items)


def run(args: argparse.Namespace) -> int:
    if args.action == "plan":
        bundle = args.bundle_dir
        if not (bundle / "configs").is_dir():
            logger.warning("%s has no configs/ folder; the command lines point at it all the same", bundle)
        runs = plan_sweep(bundle, args.presets, args.fractions, args.ood, args.output_root,
                          datasets=_pairs(args.dataset, "--dataset"), keys=_pairs(args.key, "--key"),
                          extra_overrides=_pairs(args.set, "--set"))
        script, plan = write_plan(runs, args.output_root)
        if args.json:
            print(json.dumps([asdict(r) for r in runs], indent=2))
        else:
            print("\n".join(r.shell for r in runs))
            print(f"# {len(runs)} runs -> {script}, {plan}")
        return 0
    result = collect_sweep(args.root, backbone=args.backbone)
    markdown = "\n\n".join(t["markdown"] for t in result["tables"].values())
    as_json = {"runs": result["runs"], "tables": {k: v["json"] for k, v in result["tables"].items()}}
    if args.output:
        atomic_write_json(args.output, as_json, default=json_default)
    if args.markdown:
        atomic_write_text(args.markdown, markdown + "\n")
    if args.json:
        print(json.dumps(as_json, indent=2))
    else:
        print(markdown or "no thesis table can be filled from these runs")
    return 0
