"""Pareto frontier of fine-tuning runs (thesis eq. 4.1), the Fig. 5.5 trade-off plot and the thesis tables.

Reads results.json run records (files, or folders searched recursively) and/or CSV files with the
columns backbone,method,params,dice. Per backbone, Mean Dice and trainable parameters are min-max
normalised to [0, 1] (D, P) and scored with score = 0.5 D + 0.5 (1 - P); walking the runs by
increasing parameters, a run joins the frontier when its score beats the best so far. Prints the
table (frontier runs starred), optionally writes the JSON, the Fig. 5.5 plot (Dice difference vs
parameter reduction against each backbone's full fine-tuning run) and the thesis table layouts with the
thesis's published figures beside (5.1-5.4 by preset, 5.5, 5.7 costs; with data_fraction / task in the records
also 5.6, 5.8, 5.9; 5.10 from Grad-CAM summaries under the input folders).

Example:
  monai-peft pareto runs/ extra_results.csv --plot tradeoff.png --output pareto.json --tables
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from monai_peft.cli._arg_types import existing_path, non_negative_float


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", type=existing_path,
                        help="results.json files, folders holding them (recursive), or CSV files")
    parser.add_argument("--w-dice", type=non_negative_float, default=0.5,
                        help="weight of normalised Dice (thesis: 0.5)")
    parser.add_argument("--w-params", type=non_negative_float, default=0.5,
                        help="weight of 1 - normalised params (thesis: 0.5)")
    parser.add_argument("--pooled", action="store_true",
                        help="normalise and walk all backbones together (the thesis does each separately)")
    parser.add_argument("--plot", type=Path, default=None, help="write the Fig. 5.5 trade-off PNG here")
    parser.add_argument("--output", type=Path, default=None, help="write the scored runs (and tables) as JSON here")
    parser.add_argument("--tables", action="store_true",
                        help="also print the thesis table layouts the runs fill (5.1-5.10; 5.10 from gradcam_summary.json "
                             "files under the input folders), each with the thesis's figures beside")
    parser.add_argument("--json", action="store_true", help="print the result as JSON on stdout")


def run(args: argparse.Namespace) -> int:
    from monai_peft.io import atomic_write_json, json_default
    from monai_peft.analysis.pareto import load_run_records, pareto_scores, plot_tradeoff, scores_table
    from monai_peft.analysis.tables import load_gradcam_summaries, thesis_tables

    records = load_run_records(args.inputs)
    points = pareto_scores(records, w_dice=args.w_dice, w_params=args.w_params, per_backbone=not args.pooled)
    result = {
        "equation": "score = w_dice * D + w_params * (1 - P), D/P min-max normalised per backbone (thesis eq. 4.1)",
        "w_dice": args.w_dice,
        "w_params": args.w_params,
        "per_backbone": not args.pooled,
        "runs": [p.as_dict() for p in points],
        "frontier": [p.record.backbone + ":" + p.record.label for p in points if p.on_frontier],
        "best": {p.record.backbone: p.record.label for p in points if p.best},
    }
    tables = thesis_tables(records, load_gradcam_summaries([p for p in args.inputs if p.is_dir()])) if args.tables else None
    if tables is not None:
        result["tables"] = {k: v["json"] for k, v in tables.items()}
    if args.plot is not None:
        result["plot"] = str(plot_tradeoff(points, args.plot))
    if args.output is not None:
        atomic_write_json(args.output, result, default=json_default)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(scores_table(points))
        for backbone, label in result["best"].items():
            print(f"best trade-off for {backbone}: {label}")
        if tables:
            for t in tables.values():
                print()
                print(t["markdown"])
        if args.plot is not None:
            print(f"plot: {args.plot}")
    return 0
