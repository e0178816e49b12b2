"""3D Grad-CAM heatmaps per class and layer: NIfTI maps, Otsu Dice JSON, PNG overlays (thesis 5.2.4.1).

Runs Grad-CAM on one volume with a SegResNet/UNet (optionally with SuPreM weights, a fine-tuned
checkpoint and a peft adapter) on any named layer; by default the three layers of thesis Table 5.10:
the final conv, the last conv of the last ResBlock and the adapter conv parallel to it. Writes
cam_<layer>_<class>.nii.gz (on the preprocessed grid with its affine, aligned with the input in a
viewer; with --original-grid resampled onto the --image file's own grid),
input.nii.gz and label.nii.gz (the preprocessed image and label, channel ids), gradcam.json and
gradcam_<class>.png to --output-dir.

Example (real CT of the shared TotalSegmentator example, small random SegResNet with ConvAdapter):
  monai-peft gradcam --image example_ct_sm.nii.gz --label example_seg.nii.gz \\
      --class-map class_map.json --classes liver spleen --pixdim 3 3 3 --roi-size 64 64 32 \\
      --init-filters 8 --method convadapter --output-dir runs/gradcam --json
"""

from __future__ import annotations

import argparse
import time

from monai_peft.cli._arg_types import positive_int
from monai_peft.cli._interpret_args import (
    add_case_and_model_arguments,
    build_model,
    dump,
    list_layers,
    load_case,
    out_channels_for,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_case_and_model_arguments(parser)
    g = parser.add_argument_group("Grad-CAM")
    g.add_argument("--output-dir", type=str, default=None,
                   help="folder for NIfTI, JSON and PNG (required unless --list-layers)")
    g.add_argument("--layers", nargs="+", default=None,
                   help="module names (named_modules; peft's base_model.model. prefix optional). "
                        "Default: final conv, the conv before it, the last adapter conv before the final conv")
    g.add_argument("--channels", nargs="+", type=positive_int, default=None,
                   help="output channels to explain. Default: all but background")
    g.add_argument("--mask-source", choices=("prediction", "label"), default="prediction",
                   help="voxels whose class logits are explained: the network's prediction (default) or the label")
    g.add_argument("--original-grid", action="store_true",
                   help="write the NIfTI heatmaps on the --image file's own grid (shape and affine; 0 outside the "
                        "analysed crop) instead of the preprocessed grid")
    g.add_argument("--no-png", action="store_true", help="skip the PNG overlays")
    g.add_argument("--list-layers", action="store_true", help="print the conv layers in execution order and exit")
    g.add_argument("--json", action="store_true", help="print the result record as JSON on stdout")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from monai_peft.io import atomic_write_json, json_default
    from monai_peft.interpret._common import save_nifti
    from monai_peft.interpret.gradcam import run_gradcam

    image, label, names = load_case(args)
    model = build_model(args, out_channels_for(args, label, names), in_channels=image.shape[0])
    if args.list_layers:
        layers = list_layers(model, image)
        if args.json:
            print(dump(layers))
        else:
            for i, layer in enumerate(layers):
                print(f"{i:>3} {'adapter ' if layer['adapter'] else 'backbone'} {layer['name']}")
        return 0
    if args.output_dir is None:
        raise ValueError("--output-dir is required (unless --list-layers).")
    out = Path(args.output_dir)
    reference = None
    if args.original_grid:
        import nibabel as nib

        header = nib.load(str(args.image))
        reference = (header.shape[:3], header.affine)
    t0 = time.perf_counter()
    record = run_gradcam(model, image, out, layers=args.layers, classes=args.channels, label=label,
                         class_names=names, mask_source=args.mask_source, save_png=not args.no_png,
                         reference_grid=reference)
    if reference is None:
        # the preprocessed input (and label) on the heatmaps' grid, so a viewer overlays them voxel by voxel
        save_nifti(image.as_tensor()[0].numpy(), record_affine(image), out / "input.nii.gz")
        record["files"]["nifti"].insert(0, "input.nii.gz")
        if label is not None:
            save_nifti(label.astype("float32"), record_affine(image), out / "label.nii.gz")
            record["files"]["nifti"].insert(1, "label.nii.gz")
    record["image"] = str(args.image)
    record["seconds"] = round(time.perf_counter() - t0, 3)
    atomic_write_json(out / "gradcam.json", record, default=json_default)
    if args.json:
        print(dump(record))
    else:
        print(f"Grad-CAM of {args.image} -> {out} ({record['seconds']:.1f} s)")
        if record["dice"]:
            layers = [layer["name"] for layer in record["layers"]]
            for k, n in enumerate(layers):
                print(f"  L{k}: {n}")
            print(f"{'class':<22}" + "".join(f"{'L' + str(k):>8}" for k in range(len(layers))))
            for cname, per_layer in record["dice"].items():
                print(f"{cname:<22}" + "".join(f"{per_layer[n]:>8.3f}" for n in layers))
    return 0


def record_affine(image):
    from monai_peft.interpret._common import image_affine

    return image_affine(image)
