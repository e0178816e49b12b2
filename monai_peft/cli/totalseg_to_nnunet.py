"""Convert a TotalSegmentator folder into an nnU-Net v2 raw dataset (class group of your choice).

Writes ``$nnUNet_raw/DatasetXXX_<name>/`` with imagesTr/labelsTr (train+val cases of meta.csv), imagesTs/labelsTs
(test cases), dataset.json and splits_final.json (fold 0 = meta.csv train vs val); the folder appears only when
complete. After ``nnUNetv2_plan_and_preprocess -d XXX`` run it again with ``--install-splits`` (or copy the file)
so nnU-Net trains fold 0 on meta.csv's split.

Example::

    monai-peft totalseg-to-nnunet /data/Totalsegmentator_dataset_v201 --dataset-id 501 --classes organs
"""

from __future__ import annotations

import argparse
import json
import os

from monai_peft.cli._arg_types import existing_dir, int_in_range


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("totalseg_root", type=existing_dir, help="folder with sXXXX case folders and meta.csv")
    parser.add_argument("--dataset-id", type=int_in_range(1, 999), required=True, help="nnU-Net dataset id (1..999)")
    parser.add_argument("--classes", default="organs",
                        help="class group (organs, vertebrae, mr_organs) or comma-separated structure names")
    parser.add_argument("--name", default=None, help="dataset name suffix (default TotalSeg<Group>)")
    parser.add_argument("--modality", default="ct", choices=("ct", "mr"))
    parser.add_argument("--raw", default=None, help="nnUNet_raw folder (default: $nnUNet_raw)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing dataset folder of the same name (it is swapped only when complete)")
    parser.add_argument("--install-splits", action="store_true",
                        help="copy splits_final.json into $nnUNet_preprocessed/<dataset>/ (after planning); converts "
                             "first only when the dataset folder does not exist yet (or with --overwrite)")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from nnunet_plugin.totalseg import dataset_folder_name, install_splits, totalseg_to_nnunet

    raw = args.raw or os.environ.get("nnUNet_raw")
    if not raw:
        raise ValueError("--raw is not given and nnUNet_raw is not set: name the nnUNet_raw folder.")
    classes = args.classes if "," not in args.classes else [c.strip() for c in args.classes.split(",") if c.strip()]
    folder = Path(raw) / dataset_folder_name(args.dataset_id, classes, args.name)
    result = {"dataset_folder": str(folder)}
    if not (args.install_splits and folder.is_dir() and not args.overwrite):
        totalseg_to_nnunet(args.totalseg_root, raw, args.dataset_id, classes, args.name, args.modality,
                           overwrite=args.overwrite)
    if args.install_splits:
        result["splits"] = str(install_splits(folder))
    print(json.dumps(result, indent=2))
    return 0
