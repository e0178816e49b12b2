"""Validation Dice over epochs or hours for one or several runs, as a PNG (thesis Figures 5.1-5.4, 5.6-5.8).

Reads the per-epoch "history" of results.json run records (written by monai-peft's trainers, the bundles, the
nnU-Net trainers and the demo): RUN is a run folder, a results.json file, or a folder searched recursively.
Prints the best and last validation Dice of each run.

Examples:
  monai-peft curves runs/full runs/convadapter -o curves.png
  monai-peft curves runs/sweep/organs --panels data_fraction --x hours -o figure_5_6.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from monai_peft.cli._arg_types import existing_path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from monai_peft.analysis.curves import METRICS, PANELS, X_AXES

    parser.add_argument("runs", nargs="+", type=existing_path, help="run folders or results.json files")
    parser.add_argument("-o", "--output", type=Path, default=Path("curves.png"), help="PNG to write (default: %(default)s)")
    parser.add_argument("--metric", choices=METRICS, default="val_mean_dice", help="y axis (default: %(default)s)")
    parser.add_argument("--x", choices=X_AXES, default="epoch", help="x axis (default: %(default)s)")
    parser.add_argument("--panels", choices=PANELS, default="none",
                        help="one panel per task or data size, as Figure 5.6 (default: %(default)s)")
    parser.add_argument("--title", default=None, help="figure title")
    parser.add_argument("--json", action="store_true", help="print the curves as JSON")


def run(args: argparse.Namespace) -> int:
    from monai_peft.analysis.curves import load_curves, plot_curves

    curves = load_curves(args.runs)
    path = plot_curves(curves, args.output, metric=args.metric, x=args.x, panel_by=args.panels, title=args.title)
    summary = []
    for c in curves:
        xs, ys = c.points(args.metric, args.x)
        best = max(range(len(ys)), key=ys.__getitem__) if ys and args.metric == "val_mean_dice" else None
        summary.append({"label": c.label, "source": c.source, "points": len(ys), "last": ys[-1] if ys else None,
                        "best": ys[best] if best is not None else None,
                        "best_at": xs[best] if best is not None else None})
    if args.json:
        print(json.dumps({"plot": str(path), "runs": summary, "curves": [
            {"label": c.label, "source": c.source, "x": c.points(args.metric, args.x)[0],
             "y": c.points(args.metric, args.x)[1]} for c in curves]}, indent=2))
        return 0
    width = max(len(s["label"]) for s in summary)
    print(f"{'run':<{width}}  {'points':>6}  {'last':>7}  {'best':>7}  {'at ' + args.x:>9}")
    for s in summary:
        def fmt(v, spec=".3f"):
            return "-" if v is None else format(v, spec)

        print(f"{s['label']:<{width}}  {s['points']:>6}  {fmt(s['last']):>7}  {fmt(s['best']):>7}  "
              f"{fmt(s['best_at'], '.4g'):>9}")
    print(f"plot: {path}")
    return 0
