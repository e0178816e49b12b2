"""Fine-tune a small SegResNet with full fine-tuning, ConvAdapter, LoRA and SSF on phantom CTs and compare them.

With no arguments: generates phantom CTs in TotalSegmentator layout, trains a small "foundation" SegResNet on a
source task, fine-tunes a copy per method on a new task (new head; adapters + head train, backbone frozen),
evaluates each on held-out cases and prints trainable parameters, Dice, NSD and seconds per volume.
Writes <output-dir>/comparison.json, comparison.png and one run folder per method (results.json, adapter/).
A few minutes on 2 CPU cores with the defaults.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from monai_peft.cli._arg_types import positive_float, positive_int


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output-dir", default="monai_peft_demo", help="folder for data, runs and the comparison (default: %(default)s)")
    parser.add_argument("--methods", nargs="+", default=None,
                        help="methods to compare, of full, convadapter, lora, ssf (default: all four)")
    parser.add_argument("--epochs", type=positive_int, default=20, help="fine-tuning epochs per method (default: %(default)s)")
    parser.add_argument("--pretrain-epochs", type=positive_int, default=30,
                        help="epochs of source-task pretraining (default: %(default)s; reused when already done)")
    parser.add_argument("--size", type=positive_int, default=32, help="phantom edge length in voxels, multiple of 4 (default: %(default)s)")
    parser.add_argument("--train-cases", type=positive_int, default=8, help="fine-tuning cases (default: %(default)s)")
    parser.add_argument("--test-cases", type=positive_int, default=4, help="held-out test cases (default: %(default)s)")
    parser.add_argument("--pretrain-cases", type=positive_int, default=8, help="pretraining cases (default: %(default)s)")
    parser.add_argument("--lr", type=positive_float, default=3e-3,
                        help="AdamW learning rate of pretraining and full fine-tuning (default: %(default)s)")
    parser.add_argument("--peft-lr", type=positive_float, default=1e-2,
                        help="AdamW learning rate of ConvAdapter, LoRA and SSF (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument("--verbose", action="store_true", help="log engine events")


def run(args: argparse.Namespace) -> int:
    import torch

    from monai_peft.workflows.demo import DEMO_METHODS, format_table, run_demo

    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("monai_peft.workflows.demo").setLevel(logging.INFO)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    result = run_demo(
        output_dir=args.output_dir, methods=args.methods or list(DEMO_METHODS), epochs=args.epochs,
        pretrain_epochs=args.pretrain_epochs, size=args.size, n_pretrain=args.pretrain_cases, n_train=args.train_cases,
        n_test=args.test_cases, lr=args.lr, peft_lr=args.peft_lr, seed=args.seed, device=device,
        progress=not args.no_progress, verbose=args.verbose,
    )
    print()
    print(format_table(result["rows"]))
    print()
    print(f"{len(result['rows'])} methods in {result['wall_seconds']:.0f} s; "
          f"results: {os.path.join(args.output_dir, 'comparison.json')}, {os.path.join(args.output_dir, 'comparison.png')}")
    return 0
