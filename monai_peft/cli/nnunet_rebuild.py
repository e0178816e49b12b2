"""Rebuild a fine-tuned nnU-Net model from base weights + an adapter file (optionally predict).

Writes a regular nnU-Net model folder (plans.json, dataset.json, fold_X/checkpoint_final.pth) that
``nnUNetv2_predict_from_modelfolder -m OUTPUT -f X`` uses; with ``--input``/``--predictions`` it also predicts
a folder of images (``CASE_0000.nii.gz``) right away.

Example::

    monai-peft nnunet-rebuild --base pretrained/checkpoint_final.pth \\
        --adapter nnUNet_results/Dataset002_X/nnUNetTrainerConvAdapter__nnUNetPlans__3d_fullres/fold_0/checkpoint_final.adapter.safetensors \\
        -o rebuilt_model --input imagesTs --predictions preds
"""

from __future__ import annotations

import argparse
import json

from monai_peft.cli._arg_types import existing_dir, existing_file, output_folder


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", required=True, type=existing_file,
                        help="pretrained nnU-Net checkpoint (the -pretrained_weights file)")
    parser.add_argument("--adapter", required=True, type=existing_file,
                        help="*.adapter.safetensors written by an nnunet_plugin trainer")
    parser.add_argument("-o", "--output", required=True, type=output_folder, help="model folder to write")
    parser.add_argument("--fold", default="0", help="fold name in the model folder (default 0)")
    parser.add_argument("--input", default=None, type=existing_dir, help="folder of images to predict (nnU-Net naming)")
    parser.add_argument("--predictions", default=None, type=output_folder, help="where predictions go (with --input)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda", "mps"), help="cpu (default), cuda or mps")
    parser.add_argument("--no-check-base", action="store_true",
                        help="do not compare the base file's SHA-256 with the one recorded in the adapter")


def run(args: argparse.Namespace) -> int:
    from nnunet_plugin.rebuild import export_model_folder, predictor_from_adapter

    if (args.input is None) != (args.predictions is None):
        raise ValueError("--input and --predictions go together: give both or neither.")
    fold = int(args.fold) if str(args.fold).isdigit() else args.fold
    checkpoint = export_model_folder(args.base, args.adapter, args.output, fold=fold,
                                     check_base=not args.no_check_base)
    result = {"model_folder": str(args.output), "checkpoint": str(checkpoint)}
    if args.input is not None:
        predictor = predictor_from_adapter(args.base, args.adapter, device=args.device,
                                           check_base=not args.no_check_base)
        predictor.predict_from_files(str(args.input), str(args.predictions), save_probabilities=False, overwrite=True,
                                     num_processes_preprocessing=1, num_processes_segmentation_export=1)
        result["predictions"] = str(args.predictions)
    print(json.dumps(result, indent=2))
    return 0
