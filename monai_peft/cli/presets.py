"""List the thesis experiment presets with trainable parameters next to the thesis's figures.

Examples::

    monai-peft presets                       # table
    monai-peft presets --json                # machine-readable: name, backbone, method, trainable, total, ...
    monai-peft presets --backbone segresnet --out-channels 26
    monai-peft presets --plot presets.png    # bar chart: ours vs the thesis's trainable %
"""

from __future__ import annotations

import argparse
import json

from monai_peft.cli._arg_types import positive_int


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--backbone", choices=("segresnet", "unet"), default=None, help="only presets of this backbone")
    parser.add_argument("--out-channels", type=positive_int, default=18,
                        help="head size used for the counts (default 18 = background + organs_17)")
    parser.add_argument("--names", nargs="*", default=None, help="only these presets")
    parser.add_argument("--plot", default=None, metavar="PNG",
                        help="also write a bar chart of trainable %% (ours vs thesis) to this PNG file")


def _fmt_thesis(row: dict) -> str:
    if row["thesis_params_m"] is None:
        return "-"
    return f"{row['thesis_params_m']:g}M ({row['thesis_percent']:g}%)"


def run(args: argparse.Namespace) -> int:
    from monai_peft.presets import preset_names, preset_table

    names = args.names or preset_names(args.backbone)
    rows = preset_table(out_channels=args.out_channels, names=names)
    if args.plot:
        _plot(rows, args.plot)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    header = f"{'preset':<50} {'trainable':>12} {'total':>12} {'%':>6}  {'thesis':>16}  table"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['name']:<50} {r['trainable']:>12,} {r['total']:>12,} {r['percent']:>5.1f}%  {_fmt_thesis(r):>16}  {r['table']}")
    notes = {r["note"] for r in rows if r["note"]}
    for note in sorted(notes):
        print(f"note: {note}")
    return 0


def _plot(rows: list[dict], path: str) -> None:
    """Horizontal bars of trainable % per preset, ours beside the thesis's; written atomically."""
    from pathlib import Path

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from monai_peft.io import atomic_save_figure

    out = Path(path)
    n = len(rows)
    fig, ax = plt.subplots(figsize=(9, 0.32 * n + 1.2))
    ys = list(range(n))
    ax.barh([y - 0.2 for y in ys], [r["percent"] for r in rows], height=0.4, label="monai-peft")
    ax.barh([y + 0.2 for y in ys], [r["thesis_percent"] or 0.0 for r in rows], height=0.4, label="thesis")
    ax.set_yticks(ys, [r["name"] for r in rows], fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("symlog", linthresh=1.0)
    ax.set_xlabel("trainable parameters (% of backbone)")
    ax.legend(loc="lower right", bbox_to_anchor=(1.0, 1.0), ncol=2, frameon=False)
    fig.tight_layout()
    try:
        atomic_save_figure(fig, out, dpi=120, format="png")
    finally:
        plt.close(fig)
