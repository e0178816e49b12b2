"""Write a small TotalSegmentator-layout dataset (phantoms + the real example CT or MR) to try everything on.

DIR gets phantom cases s0000, s0001, ... (meta.csv splits train, train, val, test, ...), the real example scan
shipped with monai-peft (TotalSegmentator 2.18.0 test reference, Apache-2.0) as case s1000 (test split, one
segmentations/<structure>.nii.gz per TotalSegmentator structure) and example_scans/ with the shipped image, label
map and class_map.json as they are. The bundles (--dataset_dir DIR), totalseg-to-nnunet DIR and the readers of
monai_peft.data take DIR as it is. Seconds; about 3 MB.

Examples::

    monai-peft example-data data                      # CT: 6 phantoms of 32^3 voxels (3 mm) + the real CT
    monai-peft example-data data_mr --modality mr     # MR: phantoms + the real MR
"""

from __future__ import annotations

import argparse
import json

from monai_peft.cli._arg_types import output_folder, non_negative_int, positive_int


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", type=output_folder, metavar="DIR", help="dataset folder to write (new or empty)")
    parser.add_argument("--modality", choices=("ct", "mr"), default="ct", help="ct (default) or mr")
    parser.add_argument("--phantoms", type=non_negative_int, default=6,
                        help="number of phantom cases (default: %(default)s; 0 for the real scan only)")
    parser.add_argument("--size", type=positive_int, default=32,
                        help="phantom edge length in voxels at 3 mm (the real scans' spacing), >= 8 "
                             "(default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="phantom random seed (default: %(default)s)")
    parser.add_argument("--no-real", action="store_true", help="phantoms only, without the real example scan")
    parser.add_argument("--overwrite", action="store_true", help="replace DIR when it already holds files")


def run(args: argparse.Namespace) -> int:
    from monai_peft.data.example import write_example_dataset

    if args.size < 8:
        raise ValueError(f"--size must be >= 8 voxels, got {args.size}.")
    ids = write_example_dataset(args.dir, args.modality, args.phantoms, (args.size,) * 3, seed=args.seed,
                                real=not args.no_real, overwrite=args.overwrite)
    print(json.dumps({"dataset_dir": str(args.dir), "modality": args.modality, "cases": ids}, indent=2))
    return 0
