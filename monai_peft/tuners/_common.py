"""Helpers shared by monai-peft's tuner layers (ConvAdapter, SSF)."""

from __future__ import annotations

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn

CONV_BY_DIMS: dict[int, type[nn.Module]] = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def first_tensor_device_and_dtype(module: nn.Module) -> tuple[torch.device | None, torch.dtype | None]:
    """Device and dtype of ``module.weight``, else of its first floating parameter (for blocks without ``weight``)."""
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor):
        return weight.device, weight.dtype
    for p in module.parameters():
        if p.is_floating_point():
            return p.device, p.dtype
    return None, None


class NonWeightBaseLayerMixin:
    """peft's ``BaseTunerLayer`` finds a base layer's device/dtype from its ``weight``; residual blocks, norms
    without affine parameters and other containers have none, so fall back to their first parameter."""

    def _get_base_layer_device_and_dtype(self, base_layer: nn.Module):  # noqa: D401 - peft hook
        device, dtype = BaseTunerLayer._get_base_layer_device_and_dtype(self, base_layer)
        if device is None:
            device, dtype = first_tensor_device_and_dtype(base_layer)
        return device, dtype


class ReplaceModuleMixin:
    """``BaseTuner._replace_module`` copies ``child.weight`` onto any replacement that has no ``base_layer``, which
    fails when unloading a wrapped block or a ``modules_to_save`` copy of a ``Sequential`` head (neither has a
    ``weight``). Like peft's LoRA, replace the module and only move new adapter weights to the base layer's device."""

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        setattr(parent, child_name, new_module)
        if hasattr(child, "base_layer"):
            child = child.base_layer
        device, _ = first_tensor_device_and_dtype(child)
        if device is None:
            return
        meta = torch.device("meta")
        for name, module in new_module.named_modules():
            if self.prefix in name and not any(p.device == meta for p in module.parameters()):
                module.to(device)


class StrictLoadMixin:
    """Loading an adapter file whose keys do not match the model's adapter parameters is an error naming the keys.

    peft itself loads with ``strict=False`` and only warns; for the methods of this package a silent partial load
    would train or predict with random adapter weights.
    """

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        remapped = BaseTuner._remap_adapter_state_dict_for_load.__func__(cls, model, config, adapter_name, state_dict)
        from peft.tuners.tuners_utils import _filter_state_dict_by_key_prefixes, _get_tuner_state_dict_key_prefixes

        prefixes = _get_tuner_state_dict_key_prefixes(model, adapter_name=adapter_name)
        expected = set(_filter_state_dict_by_key_prefixes(model.state_dict(), prefixes))
        given = {k for k in remapped if k in expected or cls.prefix in k}
        missing, unexpected = sorted(expected - given), sorted(given - expected)
        if missing or unexpected:
            def show(keys: list[str]) -> str:
                return ", ".join(keys[:8]) + (f" ... ({len(keys)} in all)" if len(keys) > 8 else "")

            raise ValueError(
                f"adapter '{adapter_name}' ({config.peft_type}) does not match this model: "
                + (f"missing keys: {show(missing)}. " if missing else "")
                + (f"unexpected keys: {show(unexpected)}. " if unexpected else "")
                + "Was it saved from a different network or with other target_modules? Nothing was loaded."
            )
        return remapped
