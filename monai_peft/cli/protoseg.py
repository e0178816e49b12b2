"""ProtoSeg segmentation ability (SA) of every conv layer, adapters included: table, JSON, plot (thesis 5.2.4.2).

For each conv layer, foreground/background prototypes are averaged from its features under the
network's prediction, every voxel is assigned to the nearer prototype (the segmentation-ability map),
and SA is that map's Dice with the label. Layers are scored while the features stream past (one
forward pass with hooks; never all features at once), so 96^3 volumes fit in ordinary memory.
Writes protoseg.json, protoseg.png (SA by layer, frozen backbone and adapter convs side by side) and,
for --save-maps layers, sam_<layer>_<target>.nii.gz to --output-dir.

Example:
  monai-peft protoseg --image example_ct_sm.nii.gz --label example_seg.nii.gz \\
      --class-map class_map.json --classes liver spleen --pixdim 3 3 3 --roi-size 64 64 32 \\
      --init-filters 8 --method convadapter --output-dir runs/protoseg
"""

from __future__ import annotations

import argparse
import time

from monai_peft.cli._arg_types import output_folder
from monai_peft.cli._interpret_args import (
    add_case_and_model_arguments,
    build_model,
    dump,
    load_case,
    out_channels_for,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_case_and_model_arguments(parser)
    g = parser.add_argument_group("ProtoSeg")
    g.add_argument("--output-dir", type=output_folder, required=True, help="folder for protoseg.json, protoseg.png, SAM NIfTIs")
    g.add_argument("--layers", nargs="+", default=None, help="module names to score. Default: every conv layer")
    g.add_argument("--per-class", action="store_true",
                   help="score each class against the rest instead of the merged foreground (thesis: foreground)")
    g.add_argument("--metric", choices=("cosine", "euclidean"), default="cosine", help="prototype similarity")
    g.add_argument("--save-maps", nargs="*", default=(), help="layers whose SAM is written as NIfTI")
    g.add_argument("--json", action="store_true", help="print the result record as JSON on stdout")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from monai_peft.interpret.protoseg import run_protoseg, sa_table, LayerSA

    image, label, names = load_case(args)
    if label is None:
        raise ValueError("--label is required: the segmentation ability is a Dice with the ground truth.")
    model = build_model(args, out_channels_for(args, label, names), in_channels=image.shape[0])
    t0 = time.perf_counter()
    classes = sorted(names) if args.per_class else None
    record = run_protoseg(model, image, label, Path(args.output_dir), layers=args.layers, classes=classes,
                          class_names=names, metric=args.metric, save_maps=args.save_maps)
    record["seconds"] = round(time.perf_counter() - t0, 3)
    record["image"] = str(args.image)
    from monai_peft.io import atomic_write_json, json_default

    atomic_write_json(Path(args.output_dir) / "protoseg.json", record, default=json_default)
    if args.json:
        print(dump(record))
    else:
        rows = [LayerSA(r["name"], r["adapter"], tuple(r["shape"]), r["sa"], r["order"], r["trainable"])
                for r in record["layers"]]
        print(sa_table(rows))
        print(f"ProtoSeg of {args.image} -> {args.output_dir} ({record['seconds']:.1f} s)")
    return 0
