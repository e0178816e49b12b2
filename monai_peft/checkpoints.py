"""Loaders for SuPreM's released 3D checkpoints (thesis 4.2.1) into :mod:`monai_peft.networks` backbones.

SuPreM publishes ``supervised_suprem_segresnet_2100.pth`` (``{"net": state_dict}``, keys prefixed ``module.``)
and ``supervised_suprem_unet_2100.pth`` (``{"net": state_dict}``, backbone keys prefixed ``module.backbone.``
plus the text-driven head of the CLIP-driven Universal Model: ``module.precls_conv``, ``module.GAP``,
``module.controller``, ``module.text_to_vision``, ``module.organ_embedding``). The loaders strip the prefixes,
drop the old output layer and the text-driven head, leave the new head (sized for the target classes) at its
initialisation, and return a :class:`LoadReport`. Users pass the file path; nothing is downloaded.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from monai_peft.io import atomic_torch_save

__all__ = ["LoadReport", "HEAD_PREFIXES", "load_suprem_checkpoint", "extract_state_dict", "write_suprem_layout_checkpoint"]

logger = logging.getLogger(__name__)

# the output layer each backbone re-initialises for the target classes (SuPreM's own fine-tuning drops the same)
HEAD_PREFIXES: dict[str, str] = {"segresnet": "conv_final.2.conv.", "unet": "out_tr."}
# prefixes SuPreM's DataParallel / Universal-Model wrappers put in front of backbone keys, most specific first
_PREFIXES: dict[str, tuple[str, ...]] = {
    "segresnet": ("module.", ""),
    "unet": ("module.backbone.", "backbone.", "module.", ""),
}
# optional buffers a checkpoint may lack without harm
_OPTIONAL_SUFFIXES = ("num_batches_tracked",)


@dataclass
class LoadReport:
    """What :func:`load_suprem_checkpoint` did.

    Attributes:
        path: the checkpoint file.
        backbone: ``"segresnet"`` or ``"unet"``.
        loaded: model keys filled from the checkpoint.
        skipped: checkpoint keys not used (old output layer, text-driven head, anything unknown).
        missing: model keys left at their initialisation (the new head, optional BN counters).
    """

    path: str
    backbone: str
    loaded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dictionary."""
        return asdict(self)

    def __str__(self) -> str:
        return (
            f"{Path(self.path).name} ({self.backbone}): {len(self.loaded)} loaded, {len(self.skipped)} skipped, "
            f"{len(self.missing)} missing ({', '.join(self.missing[:4])}{', ...' if len(self.missing) > 4 else ''})"
        )


def extract_state_dict(obj: Any, path: str | Path = "<checkpoint>") -> dict[str, torch.Tensor]:
    """The tensor dictionary inside a loaded checkpoint object.

    Args:
        obj: what ``torch.load`` returned: ``{"net": sd}`` (SuPreM), ``{"state_dict": sd}``, ``{"model": sd}``
            or a plain state dict.
        path: the file name used in error messages.

    Raises:
        ValueError: naming the file and its top-level keys when no state dict is found.
    """
    if isinstance(obj, Mapping):
        for key in ("net", "state_dict", "model"):
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                return dict(inner)
        if obj and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
            return dict(obj)
        keys = list(obj.keys())[:8]
        raise ValueError(
            f"{path}: no state dict found; expected a dict of tensors or one under 'net', 'state_dict' or "
            f"'model', got top-level keys {keys}."
        )
    raise ValueError(f"{path}: expected a dict checkpoint, got {type(obj).__name__}.")


def _strip(key: str, prefixes: tuple[str, ...], model_keys: Mapping[str, Any]) -> str | None:
    for prefix in prefixes:
        if key.startswith(prefix) and key[len(prefix) :] in model_keys:
            return key[len(prefix) :]
    return None


def load_suprem_checkpoint(
    model: nn.Module, path: str | Path, backbone: str = "segresnet", keep_head: bool = False
) -> LoadReport:
    """Load a SuPreM checkpoint into ``model`` in place and report what happened.

    Args:
        model: a :func:`~monai_peft.networks.suprem_segresnet` or :func:`~monai_peft.networks.suprem_unet`
            model (any output class count).
        path: the ``.pth`` file (``supervised_suprem_segresnet_2100.pth`` / ``supervised_suprem_unet_2100.pth``
            or one in the same layout). Loaded with ``torch.load(..., weights_only=True)``.
        backbone: ``"segresnet"`` or ``"unet"``; selects the prefixes and the output layer to drop.
        keep_head: also load the old output layer when its shape matches the model's (default ``False``: the
            head is always rebuilt for the target classes, as in the thesis).

    Returns:
        :class:`LoadReport` with loaded, skipped and missing keys.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the backbone name is unknown, the file is not a state dict, nothing matched, a backbone
            tensor has the wrong shape, or backbone keys are missing (the message names them).
    """
    key = backbone.lower().replace("unet3d", "unet")
    if key not in HEAD_PREFIXES:
        raise ValueError(f"backbone must be one of {sorted(HEAD_PREFIXES)}, got {backbone!r}.")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"SuPreM checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling errors have many types; name the file
        raise ValueError(f"{path}: cannot be read as a weights-only torch checkpoint ({err}).") from err
    source = extract_state_dict(obj, path)

    head = HEAD_PREFIXES[key]
    target = model.state_dict()
    report = LoadReport(path=str(path), backbone=key)
    new_state: dict[str, torch.Tensor] = {}
    mismatched: list[str] = []
    for ckpt_key, tensor in source.items():
        name = _strip(ckpt_key, _PREFIXES[key], target)
        if name is None:
            report.skipped.append(ckpt_key)
            continue
        if name.startswith(head) and not (keep_head and tensor.shape == target[name].shape):
            report.skipped.append(ckpt_key)
            continue
        if tensor.shape != target[name].shape:
            mismatched.append(f"{ckpt_key} {tuple(tensor.shape)} vs model {name} {tuple(target[name].shape)}")
            continue
        new_state[name] = tensor
    if mismatched:
        raise ValueError(f"{path}: tensors with the wrong shape for backbone {key!r}: {mismatched[:10]}")
    if not new_state:
        raise ValueError(
            f"{path}: no key matches a {key!r} model; first checkpoint keys: {list(source)[:6]}, "
            f"expected keys like {list(target)[:3]} (with prefix {_PREFIXES[key][0]!r})."
        )
    report.loaded = sorted(new_state)
    report.missing = [k for k in target if k not in new_state]
    missing_backbone = [k for k in report.missing if not k.startswith(head) and not k.endswith(_OPTIONAL_SUFFIXES)]
    if missing_backbone:
        raise ValueError(
            f"{path}: {len(missing_backbone)} {key!r} backbone keys missing from the checkpoint: {missing_backbone[:10]}"
        )
    model.load_state_dict(new_state, strict=False)
    logger.info("%s", report)
    return report


def write_suprem_layout_checkpoint(
    model: nn.Module, path: str | Path, backbone: str = "segresnet", pretrain_classes: int = 32
) -> Path:
    """Write ``model``'s weights in the exact layout of SuPreM's released file (for tests and demos).

    The backbone tensors are ``model``'s own. For ``"segresnet"`` the output layer is replaced by one for
    ``pretrain_classes`` classes (as in SuPreM's file, whose head does not match the target task); for ``"unet"``
    the output layer is left out and the CLIP-driven Universal Model's text-driven head keys are added instead, as
    in SuPreM's released file (``tests/data/*.net.keys.json`` hold the released layouts). Written atomically.

    Args:
        model: a SuPreM SegResNet or UNet3D.
        path: output ``.pth`` file.
        backbone: ``"segresnet"`` (``{"net": {"module." + key}}``) or ``"unet"``
            (``{"net": {"module.backbone." + key, "module.controller.weight", ...}}``).
        pretrain_classes: class count of the old output layer.
    """
    key = backbone.lower().replace("unet3d", "unet")
    if key not in HEAD_PREFIXES:
        raise ValueError(f"backbone must be one of {sorted(HEAD_PREFIXES)}, got {backbone!r}.")
    gen = torch.Generator().manual_seed(0)
    head = HEAD_PREFIXES[key]
    net: dict[str, torch.Tensor] = {}
    prefix = "module." if key == "segresnet" else "module.backbone."
    for name, tensor in model.state_dict().items():
        if name.startswith(head) and key == "unet":
            continue  # SuPreM's universal model segments with its text-driven head, not with out_tr
        if name.startswith(head):
            shape = (pretrain_classes, *tensor.shape[1:])
            tensor = torch.randn(shape, generator=gen) * 0.01
        net[prefix + name] = tensor.detach().clone()
    if key == "unet":
        # CLIP-driven Universal Model head (SuPreM's pre-training task), dropped on load
        extra = {
            "precls_conv.0.weight": (64,), "precls_conv.0.bias": (64,),
            "precls_conv.2.weight": (8, 64, 1, 1, 1), "precls_conv.2.bias": (8,),
            "GAP.0.weight": (512,), "GAP.0.bias": (512,),
            "GAP.3.weight": (256, 512, 1, 1, 1), "GAP.3.bias": (256,),
            "controller.weight": (153, 512, 1, 1, 1), "controller.bias": (153,),
            "text_to_vision.weight": (256, 512), "text_to_vision.bias": (256,),
            "organ_embedding": (pretrain_classes, 512),
        }  # fmt: skip
        for name, shape in extra.items():
            net["module." + name] = torch.randn(shape, generator=gen)
    path = Path(path)
    atomic_torch_save({"net": net, "epoch": 2100}, path)
    return path
