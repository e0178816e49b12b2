"""Arguments and loading shared by ``monai-peft gradcam`` and ``monai-peft protoseg``: one CT/MR volume
(NIfTI) with its label map, preprocessed with the thesis chain (Table 4.3; MR volumes get the MR normalisation,
see :func:`case_modality`), and a network with optional weights and adapter."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from monai_peft.cli._arg_types import existing_dir, existing_file, positive_float, positive_int

if TYPE_CHECKING:  # torch and numpy load when a command runs, not for --help
    import numpy as np
    from torch import nn

logger = logging.getLogger(__name__)


def add_case_and_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the image/label, preprocessing and network options."""
    g = parser.add_argument_group("input volume")
    g.add_argument("--image", required=True, type=existing_file, help="image NIfTI (CT in HU, or MR)")
    g.add_argument("--label", type=existing_file, default=None, help="label map NIfTI on the image's grid")
    g.add_argument("--classes", nargs="+", default=None,
                   help="class group (organs, vertebrae, mr_organs) or TotalSegmentator structure names; "
                        "channel i+1 of the network is the i-th name. With --class-map the label's ids are remapped "
                        "to these channels; without it the label already holds channel ids.")
    g.add_argument("--class-map", type=existing_file, default=None,
                   help="TotalSegmentator class_map.json ({task: {id: name}}) the label's ids refer to")
    g.add_argument("--task", default="total", help="task key in --class-map (total, total_mr). Default: total")
    g.add_argument("--pixdim", nargs=3, type=positive_float, default=(1.5, 1.5, 1.5), metavar=("X", "Y", "Z"),
                   help="voxel spacing in mm after resampling (thesis: 1.5 1.5 1.5)")
    g.add_argument("--roi-size", nargs=3, type=positive_int, default=(96, 96, 96), metavar=("H", "W", "D"),
                   help="centre crop / pad size after resampling (thesis: 96 96 96; SegResNet needs multiples of 8)")
    g.add_argument("--modality", choices=("auto", "ct", "mr"), default="auto",
                   help="ct: HU window [-175, 250] -> [0, 1]; mr: 0.5-99.5 percentiles -> [0, 1] (thesis 4.2.5.3). "
                        "auto (default): from --classes (mr_organs), --task with --class-map (total_mr), an "
                        "mri.nii.gz file name, else the image itself (Hounsfield units reach air at -1000)")
    g.add_argument("--intensity", choices=("window", "percentile"), default=None,
                   help="override the modality's normalisation (window: CT HU window; percentile: MR)")
    m = parser.add_argument_group("network")
    m.add_argument("--backbone", choices=("segresnet", "unet"), default="segresnet",
                   help="SuPreM backbone layout (thesis Table 4.1). Default: segresnet")
    m.add_argument("--init-filters", type=positive_int, default=16,
                   help="SegResNet width (SuPreM: 16); smaller values give a quick demo network")
    m.add_argument("--out-channels", type=positive_int, default=None,
                   help="network output channels; default: number of --classes + 1, else label max + 1")
    m.add_argument("--pretrained", type=existing_file, default=None,
                   help="SuPreM-layout checkpoint for the backbone (head rebuilt)")
    m.add_argument("--checkpoint", type=existing_file, default=None,
                   help="state dict of exactly this network (.pt/.pth, weights_only, or .safetensors)")
    m.add_argument("--adapter", type=existing_dir, default=None, help="peft adapter folder (save_pretrained) to load on top")
    m.add_argument("--method", default=None,
                   help="add a freshly initialised PEFT method (monai_peft.adapt, e.g. convadapter) instead of "
                        "--adapter, to inspect its layers")
    m.add_argument("--preset", default=None,
                   help="build a thesis preset (monai-peft presets; backbone + placement, fresh adapters) on top of "
                        "the network of --backbone/--init-filters/--pretrained/--checkpoint")
    m.add_argument("--seed", type=int, default=0, help="seed for random initialisation. Default: 0")
    m.add_argument("--device", default="cpu", help="torch device. Default: cpu")


def _class_names(args: argparse.Namespace) -> list[str] | None:
    if not args.classes:
        return None
    from monai_peft.data.class_maps import class_group

    return class_group(args.classes[0] if len(args.classes) == 1 else args.classes)  # a group or structure names


def case_modality(args: argparse.Namespace) -> str:
    """``"ct"`` or ``"mr"`` for ``--image``: declared by ``--modality``, ``--classes``, ``--task`` or the file name,
    else read from the image (CT in Hounsfield units has air near -1000; MR has no negative tissue values).

    Raises:
        ValueError: two of those disagree (the message names each).
    """
    from monai_peft.data.modality import GROUP_MODALITY, group_modality

    found: dict[str, str] = {}
    if args.modality != "auto":
        found["--modality"] = args.modality
    if args.classes and len(args.classes) == 1 and (args.classes[0] in GROUP_MODALITY
                                                     or args.classes[0] in ("organs", "vertebrae", "mr_organs")):
        found[f"--classes {args.classes[0]}"] = group_modality(args.classes[0]) or "ct"
    if args.class_map is not None:
        found[f"--task {args.task}"] = "mr" if args.task == "total_mr" else "ct"
    if Path(args.image).name.startswith("mri."):
        found[f"--image {Path(args.image).name}"] = "mr"
    if len(set(found.values())) > 1:
        raise ValueError("the image's modality is ambiguous: " + ", ".join(f"{k} means {v.upper()}" for k, v in found.items()))
    if found:
        return next(iter(found.values()))
    import nibabel as nib
    import numpy as np

    lowest = float(np.min(np.asanyarray(nib.load(str(args.image)).dataobj)))
    modality = "ct" if lowest < -500.0 else "mr"
    logger.info("%s: lowest value %.0f, read as %s (give --modality to say so)", args.image, lowest, modality.upper())
    return modality


def load_case(args: argparse.Namespace) -> tuple[Any, np.ndarray | None, dict[int, str]]:
    """Load and preprocess ``--image``/``--label``.

    Returns:
        the image ``MetaTensor (C, H, W, D)`` (its affine is that of the preprocessed grid), the label
        ``(H, W, D)`` in channel ids (or ``None``), and ``{channel: name}``.
    """
    import numpy as np
    from monai.transforms import Compose

    from monai_peft.data.transforms import preprocess_transforms

    for flag, path in (("--image", args.image), ("--label", args.label), ("--class-map", args.class_map)):
        if path is not None and not Path(path).is_file():
            raise FileNotFoundError(f"{flag}: no such file {path}")
    names = _class_names(args)
    keys = ("image", "label") if args.label is not None else ("image",)
    data: dict[str, Any] = {"image": str(args.image)}
    if args.label is not None:
        data["label"] = str(args.label)
    chain = Compose(preprocess_transforms(roi_size=tuple(args.roi_size), pixdim=tuple(args.pixdim),
                                          intensity=args.intensity, keys=keys, modality=case_modality(args)))
    out = chain(data)
    image = out["image"]
    label = None
    if args.label is not None:
        label = np.rint(np.asarray(out["label"].as_tensor()[0])).astype(np.int64)
        if names is not None and args.class_map is not None:
            from monai_peft.data.class_maps import task_id_map
            from monai_peft.data.totalseg import remap_label_map

            id_to_name = task_id_map(args.class_map, args.task)
            label = remap_label_map(label, id_to_name, names, source=args.label).astype(np.int64)
        elif names is not None and int(label.max()) > len(names):
            raise ValueError(
                f"--label {args.label}: holds ids up to {int(label.max())}, but --classes names {len(names)} channels; "
                "give --class-map (and --task) when the label holds TotalSegmentator ids."
            )
    if names is not None:
        channel_names = {i + 1: n for i, n in enumerate(names)}
    else:
        top = int(label.max()) if label is not None else (args.out_channels or 2) - 1
        channel_names = {i: f"class{i}" for i in range(1, top + 1)}
    return image, label, channel_names


def build_model(args: argparse.Namespace, out_channels: int, in_channels: int = 1) -> nn.Module:
    """The network of ``--backbone`` with ``--pretrained``/``--checkpoint`` weights and ``--adapter``/``--method``."""
    import torch
    from monai.networks.nets import SegResNet

    from monai_peft.networks.suprem import SUPREM_SEGRESNET_KWARGS, suprem_unet

    torch.manual_seed(args.seed)
    if args.backbone == "segresnet":
        kwargs = {**SUPREM_SEGRESNET_KWARGS, "init_filters": args.init_filters, "in_channels": in_channels}
        model: nn.Module = SegResNet(**kwargs, out_channels=out_channels)
    else:
        model = suprem_unet(out_channels, in_channels=in_channels)
    if args.pretrained is not None:
        from monai_peft.checkpoints import load_suprem_checkpoint

        logger.info("%s", load_suprem_checkpoint(model, args.pretrained, backbone=args.backbone))
    if args.checkpoint is not None:
        path = Path(args.checkpoint)
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            try:
                state = load_file(str(path))
            except Exception as e:  # safetensors' own error type: a truncated or foreign file
                raise ValueError(f"--checkpoint {path}: not a readable safetensors file ({e}).") from e
        else:
            from monai_peft.checkpoints import extract_state_dict

            try:
                obj = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:  # UnpicklingError, RuntimeError (not a zip), EOFError ...
                raise ValueError(f"--checkpoint {path}: not a torch checkpoint readable with weights_only=True "
                                 f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}).") from e
            state = extract_state_dict(obj, path)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise ValueError(f"--checkpoint {path} does not fit the {args.backbone} network: {e}") from e
    chosen = [flag for flag, value in (("--adapter", args.adapter), ("--method", args.method),
                                       ("--preset", args.preset)) if value is not None]
    if len(chosen) > 1:
        raise ValueError(f"give one of --adapter, --method, --preset, not {' and '.join(chosen)}")
    if args.adapter is not None:
        import peft

        import monai_peft  # noqa: F401  (registers ConvAdapter / SSF with peft)

        if not (Path(args.adapter) / "adapter_config.json").is_file():
            raise FileNotFoundError(f"--adapter: {args.adapter} has no adapter_config.json")
        model = peft.PeftModel.from_pretrained(model, str(args.adapter))
    elif args.method is not None:
        from monai_peft import adapt

        model = adapt(model, args.method)
    elif args.preset is not None:
        from monai_peft.presets import build_preset, get_preset

        preset = get_preset(args.preset)
        if preset.backbone != args.backbone:
            raise ValueError(
                f"--preset {args.preset} is for the {preset.backbone} backbone, not --backbone {args.backbone}"
            )
        model = build_preset(preset, out_channels, model=model)
    return model.to(args.device).eval()


def out_channels_for(args: argparse.Namespace, label: np.ndarray | None, names: dict[int, str]) -> int:
    """``--out-channels``, else the number of ``--classes`` + 1, else the label's largest id + 1 (at least 2)."""
    if args.out_channels is not None:
        return args.out_channels
    if args.classes:
        return len(names) + 1
    if label is not None:
        return max(int(label.max()) + 1, 2)
    raise ValueError("give --out-channels, --classes or --label to size the network's output")


def list_layers(model: nn.Module, image: Any) -> list[dict[str, Any]]:
    """Conv layers in execution order with their adapter flag."""
    from monai_peft.interpret._common import adapter_names, as_batch, is_adapter_module, trace_convs

    device = next(model.parameters()).device
    order, _ = trace_convs(model, as_batch(image).to(device))
    names = adapter_names(model)
    return [{"name": n, "adapter": is_adapter_module(n, names)} for n in order]


def dump(record: Any) -> str:
    return json.dumps(record, indent=2, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))
