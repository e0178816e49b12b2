"""Named regions (encoder / decoder / head / ...) of known architectures.

A region is a list of regular expressions matched (``re.fullmatch``) against module names; a module belongs to a
region if its name, or the name of one of its ancestors, matches. The thesis (001, 4.2 and 5.1) places adapters by
region: "LoRA in the encoder + full decoder", "ConvAdapter in encoder and decoder", "decoder fine-tuning".

Regions are looked up by the model's class (its MRO, so subclasses inherit them) or, for one-off models, from a
``peft_regions`` attribute on the model instance: ``model.peft_regions = {"encoder": [...], ...}``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from torch import nn

__all__ = ["register_regions", "regions_of", "region_names", "module_in_region", "REGION_REGISTRY"]

REGION_REGISTRY: dict[type, dict[str, tuple[str, ...]]] = {}


def register_regions(model_cls: type, regions: Mapping[str, Sequence[str]]) -> None:
    """Declare the regions of an architecture.

    Args:
        model_cls: the ``nn.Module`` subclass (instances of subclasses inherit the declaration).
        regions: region name -> regexes on module names, e.g. ``{"encoder": [r"down_layers"], "head": [r"conv_final"]}``.
            Every regex must compile.
    """
    if not (isinstance(model_cls, type) and issubclass(model_cls, nn.Module)):
        raise TypeError(f"model_cls must be an nn.Module subclass, got {model_cls!r}.")
    checked: dict[str, tuple[str, ...]] = {}
    for name, patterns in regions.items():
        if isinstance(patterns, str):
            patterns = [patterns]
        for p in patterns:
            try:
                re.compile(p)
            except re.error as e:
                raise ValueError(f"region {name!r} of {model_cls.__name__}: invalid regex {p!r}: {e}") from e
        checked[name] = tuple(patterns)
    REGION_REGISTRY[model_cls] = checked


def _unwrap(model: nn.Module) -> nn.Module:
    """The user's network inside a ``PeftModel`` (``model.base_model.model``) or the model itself."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        return model.base_model.model
    return model


def regions_of(model: nn.Module) -> dict[str, tuple[str, ...]]:
    """Region declarations that apply to ``model`` (instance attribute first, then class registry by MRO)."""
    model = _unwrap(model)
    own = getattr(model, "peft_regions", None)
    if own:
        return {k: (v,) if isinstance(v, str) else tuple(v) for k, v in own.items()}
    for cls in type(model).__mro__:
        if cls in REGION_REGISTRY:
            return dict(REGION_REGISTRY[cls])
    return {}


def region_names(model: nn.Module) -> list[str]:
    return sorted(regions_of(model))


def module_in_region(model: nn.Module, module_name: str, region: str) -> bool:
    """Whether ``module_name`` (a name from ``model.named_modules()``) lies in ``region``.

    Raises:
        KeyError: ``region`` is not declared for this model; the message lists the declared ones.
    """
    regions = regions_of(model)
    if region not in regions:
        raise KeyError(
            f"region {region!r} is not declared for {type(_unwrap(model)).__name__}; declared: {sorted(regions) or 'none'}"
            " (declare them with monai_peft.register_regions or a `peft_regions` attribute)."
        )
    parts = module_name.split(".")
    prefixes = [".".join(parts[: i + 1]) for i in range(len(parts))]
    return any(re.fullmatch(p, prefix) for p in regions[region] for prefix in prefixes)


def _register_builtin() -> None:
    from monai.networks.nets import BasicUNet, SegResNet

    # thesis 2.2 / 4.2.1: SegResNet = convInit + down_layers (encoder), up_samples + up_layers (decoder), conv_final.
    register_regions(
        SegResNet,
        {"encoder": [r"convInit", r"down_layers"], "decoder": [r"up_samples", r"up_layers"], "head": [r"conv_final"]},
    )
    register_regions(
        BasicUNet,
        {"encoder": [r"conv_0", r"down_\d+"], "decoder": [r"upcat_\d+"], "head": [r"final_conv"]},
    )
    # Other packages declare the regions of their own architectures when they are imported: SuPreM's UNet3D
    # (monai_peft.networks) and nnU-Net's U-Nets (nnunet_plugin.network).


_register_builtin()
