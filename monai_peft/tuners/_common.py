"""Helpers shared by monai-peft's tuners (ConvAdapter, SSF, VPT, bottleneck adapters): exact-name target regexes,
device lookup, module replacement, atomic injection, strict loading."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn


def first_tensor_device_and_dtype(module: nn.Module) -> tuple[torch.device | None, torch.dtype | None]:
    """Device and dtype of ``module.weight``, else of its first floating parameter, else buffer (for blocks without
    ``weight`` and norms without affine parameters); ``(None, None)`` for a module without floating tensors."""
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor):
        return weight.device, weight.dtype
    for t in (*module.parameters(), *module.buffers()):
        if t.is_floating_point():
            return t.device, t.dtype
    return None, None


def exact_names_regex(names: Sequence[str]) -> str:
    """A regex matching exactly these module names, for peft's ``target_modules`` (a list there would also match
    every module whose name merely *ends* with one of them, e.g. ``conv_0`` and ``conv_0.conv_0``)."""
    return "(?:" + "|".join(re.escape(n) for n in names) + ")"

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


class AtomicInjectMixin:
    """Adding an adapter either wraps every target or none: if one target cannot take the adapter (the error names
    it and why), the targets already wrapped for this adapter are restored before the error propagates.

    peft wraps targets one by one (``BaseTuner.inject_adapter``); without this, a bad 20th target would leave 19
    wrapped modules behind in the user's network.
    """

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        try:
            super().inject_adapter(model, adapter_name, *args, **kwargs)
        except Exception:
            _remove_partial_adapter(model, adapter_name, self.tuner_layer_cls)
            raise


def _remove_partial_adapter(model: nn.Module, adapter_name: str, layer_cls: type) -> None:
    """Undo ``adapter_name`` on every layer of ``layer_cls``: drop it where other adapters remain, else put the base
    module back in place of the wrapper."""
    for name, module in list(model.named_modules()):
        if not isinstance(module, layer_cls) or adapter_name not in module._all_available_adapter_names():
            continue
        if set(module._all_available_adapter_names()) - {adapter_name}:
            module.delete_adapter(adapter_name)
            continue
        parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
        setattr(parent, name.rpartition(".")[2], module.get_base_layer())


class StrictLoadMixin:
    """Loading an adapter file whose keys or shapes do not match the model is an error naming the keys (and shapes).

    peft itself loads with ``strict=False`` and only warns; for the methods of this package a silent partial load
    would train or predict with random adapter weights.
    """

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        remapped = BaseTuner._remap_adapter_state_dict_for_load.__func__(cls, model, config, adapter_name, state_dict)
        from peft.tuners.tuners_utils import _filter_state_dict_by_key_prefixes, _get_tuner_state_dict_key_prefixes

        own = model.state_dict()
        prefixes = _get_tuner_state_dict_key_prefixes(model, adapter_name=adapter_name)
        expected = set(_filter_state_dict_by_key_prefixes(own, prefixes))
        given = {k for k in remapped if k in expected or cls.prefix in k}
        missing, unexpected = sorted(expected - given), sorted(given - expected)
        wrong_shape = [
            f"{k.removeprefix('base_model.model.')} (file {tuple(v.shape)}, model {tuple(own[k].shape)})"
            for k, v in remapped.items() if k in own and hasattr(v, "shape") and tuple(v.shape) != tuple(own[k].shape)
        ]
        if wrong_shape:
            raise ValueError(
                f"adapter '{adapter_name}' ({config.peft_type}) was saved from a network with other channel counts: "
                f"{'; '.join(wrong_shape[:8])}" + (f" ... ({len(wrong_shape)} in all)" if len(wrong_shape) > 8 else "")
                + ". Nothing was loaded."
            )
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
