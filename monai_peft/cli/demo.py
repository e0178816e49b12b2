"""Pretrain a small foundation SegResNet on phantom CTs, then compare full fine-tuning, ConvAdapter, LoRA and SSF.

With no arguments: writes contrast-enhanced phantom CTs in TotalSegmentator layout, trains a small SegResNet on a
source task (abdominal organs) and prints its own test Dice, fine-tunes a copy per method on a target task with
two new structures (new head; adapters + head train, backbone frozen), validating every epoch, and prints each
method's test Dice beside its trainable parameters and its costs (measured after a warm-up).
Writes <output-dir>/comparison.json, comparison.png (Dice vs trainable parameters), curves.png (validation Dice
over epochs per method) and one run folder per method (results.json with the history, adapter/).
A few minutes on 2 CPU cores; the same Dice on every run (fixed seeds, one CPU thread).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from monai_peft.cli._arg_types import positive_int
from monai_peft.workflows.demo_methods import DEMO_METHODS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output-dir", default="monai_peft_demo", help="folder for data, runs and the comparison (default: %(default)s)")
    parser.add_argument("--methods", nargs="+", default=list(DEMO_METHODS), choices=list(DEMO_METHODS),
                        help="methods to compare (default: all)")
    parser.add_argument("--epochs", type=positive_int, default=25, help="fine-tuning epochs per method (default: %(default)s)")
    parser.add_argument("--pretrain-epochs", type=positive_int, default=30,
                        help="epochs of source-task pretraining (default: %(default)s; reused when already done)")
    parser.add_argument("--pretrain-cases", nargs=3, type=positive_int, default=[12, 4, 4], metavar=("TRAIN", "VAL", "TEST"),
                        help="source-task phantom cases (default: 12 4 4)")
    parser.add_argument("--target-cases", nargs=3, type=positive_int, default=[12, 4, 4], metavar=("TRAIN", "VAL", "TEST"),
                        help="target-task phantom cases (default: 12 4 4)")
    parser.add_argument("--lr", action="append", default=[], metavar="METHOD=LR",
                        help="learning rate of one method, e.g. --lr lora=3e-3 (defaults: "
                             + ", ".join(f"{m} {v['lr']:g}" for m, v in DEMO_METHODS.items()) + ")")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto (default: %(default)s: the figures in the "
                        "docs are CPU figures, and CPU runs repeat exactly)")
    parser.add_argument("--threads", type=positive_int, default=1, help="CPU threads (default: %(default)s; deterministic)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument("--verbose", action="store_true", help="log engine events")


def _learning_rates(items: list[str]) -> dict[str, float]:
    out = {}
    for item in items:
        method, _, value = item.partition("=")
        if method not in DEMO_METHODS or not value:
            raise ValueError(f"--lr expects METHOD=LR with METHOD one of {list(DEMO_METHODS)}, got {item!r}")
        try:
            out[method] = float(value)
        except ValueError:
            raise ValueError(f"--lr {item!r}: {value!r} is not a number") from None
        if out[method] <= 0:
            raise ValueError(f"--lr {item!r}: the learning rate must be positive")
    return out


def run(args: argparse.Namespace) -> int:
    import torch

    from monai_peft.workflows.demo import format_table, run_demo

    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("monai_peft.workflows.demo").setLevel(logging.INFO)
    learning_rates = _learning_rates(args.lr)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    result = run_demo(
        output_dir=args.output_dir, methods=args.methods, epochs=args.epochs, pretrain_epochs=args.pretrain_epochs,
        n_pretrain=args.pretrain_cases, n_target=args.target_cases, learning_rates=learning_rates,
        seed=args.seed, device=device, threads=args.threads, progress=not args.no_progress, verbose=args.verbose,
    )
    print()
    print(format_table(result["rows"], result["foundation"]))
    print()
    print(f"{len(result['rows'])} methods in {result['wall_seconds']:.0f} s ({result['cpu_seconds']:.0f} s of CPU); results: "
          + ", ".join(os.path.join(args.output_dir, f) for f in ("comparison.json", "comparison.png", "curves.png")))
    return 0
