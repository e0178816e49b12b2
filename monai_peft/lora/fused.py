"""Fused conv LoRA: ``conv(x, W + scaling * B @ A)`` as one conv during training (issue 12, lever 1).

peft computes a LoRA conv as ``conv(x, W) + scaling * B(A(x))``: two more convolutions per layer, whose thin
(``r``-channel) activations are slow on CPUs and GPUs alike. The fused layer builds the merged kernel
``W + scaling * B @ A`` (``(C_out, C_in, *k)``; tiny next to the activations) and runs the base conv once with it.

Cost, in units of one conv pass over the activations: the backward needs the input gradient (as the frozen base
does) and the weight gradient of the merged kernel, from which ``A`` and ``B`` get theirs by two small matmuls.
A fused step therefore costs about one full fine-tuning step (3 units) whatever the rank, where peft's path costs
``2 + 3 r / C_out`` units by FLOPs (1.67x full fine-tuning at ``r = C_out``), and more than that on hardware where
thin convs run far below peak. Below full fine-tuning's cost, the weight gradients are computed in factored form
(:mod:`monai_peft.lora.factored`: ``2 + 2 r / C_out`` units); ``fused="auto"`` (what ``fused=True`` means) picks the
faster of the two per layer and device, ``"merged"`` / ``"factored"`` force one. ``benchmarks/bench_methods.py``
measures them.

The layers are peft's own LoRA conv layers with another ``forward``, created through peft's custom-layer hook
(:func:`monai_peft._peft_compat.register_custom_lora_layers`): parameters, names, saving, merging, named adapters and
``disable_adapter()`` are peft's, and the saved adapter is a plain peft LoRA file that loads with or without fusing.
"""

from __future__ import annotations

from typing import Any

import torch
from peft import LoraConfig
from torch import nn

from monai_peft._peft_compat import lora_conv_delta_weight, lora_conv_layer_classes, register_custom_lora_layers
from monai_peft.lora.factored import factored_conv_lora, factored_is_faster

__all__ = ["use_fused_conv_lora", "FusedConvLoraMixin", "FusedLoraConv1d", "FusedLoraConv2d", "FusedLoraConv3d",
           "FUSED_LORA_CONV_LAYERS", "FUSED_MODES", "fused_mode"]

# fused=True means "auto"; "merged" and "factored" force one backward (see the module docstring)
FUSED_MODES = ("auto", "merged", "factored")


def fused_mode(fused: bool | str) -> str | None:
    """The backward path of the ``fused`` option: ``None`` (peft's layers), ``"auto"``, ``"merged"`` or ``"factored"``.

    Raises:
        ValueError: anything but ``True``, ``False`` or a :data:`FUSED_MODES` entry.
    """
    if fused is False:
        return None
    if fused is True:
        return "auto"
    if isinstance(fused, str) and fused in FUSED_MODES:
        return fused
    raise ValueError(f"fused must be True, False or one of {FUSED_MODES}, got {fused!r}.")


def _check_fusable(config: LoraConfig, where: str) -> None:
    if config.lora_dropout:
        raise ValueError(
            f"{where}: fused conv LoRA cannot apply lora_dropout={config.lora_dropout}: dropout acts on the input of "
            "the LoRA branch only, and the fused conv has no separate branch; use lora_dropout=0 or fused=False."
        )
    if config.use_dora:
        raise ValueError(f"{where}: fused conv LoRA supports plain LoRA only, not DoRA (use_dora=True); "
                         "use fused=False.")


class FusedConvLoraMixin:
    """Runs the active LoRA adapters of a peft conv layer as one conv with the merged kernel.

    ``forward(x)`` with ``x`` of shape ``(B, C_in, *spatial)`` returns ``conv(x, W + sum_a s_a B_a @ A_a, b')`` with
    ``b' = b + sum_a s_a * B_a.bias`` (``lora_bias=True``), in the base layer's dtype (the delta is computed in the
    adapters' dtype and cast; under ``torch.autocast`` the conv runs in the autocast dtype, as the base conv would).
    peft's own path is used, with the same result, where the merged kernel cannot express the layer: a grouped base
    conv (peft's LoRA on it is a dense conv, which has no place in the grouped kernel; merging it is refused as in
    peft), a LoRA variant, mixed-batch inference (``adapter_names=...``), and extra forward arguments. Disabled
    adapters and merged weights behave as in peft.
    """

    def update_layer(self, adapter_name: str, r: int, lora_alpha: int, config: LoraConfig, **kwargs: Any) -> None:
        _check_fusable(config, f"adapter '{adapter_name}' on a fused {type(self.get_base_layer()).__name__} LoRA layer")
        super().update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

    fused_backward: str = "auto"

    def _factored(self, x: torch.Tensor, active: list[str]) -> bool:
        """Use the factored backward: training a frozen kernel outside autocast, and the mode or the device says so."""
        weight = self.get_base_layer().weight
        if (self.fused_backward == "merged" or not torch.is_grad_enabled() or weight.requires_grad
                or x.dtype != weight.dtype or torch.is_autocast_enabled(x.device.type)):
            return False
        if self.fused_backward == "factored":
            return True
        rank = sum(self.r[a] for a in active)
        return factored_is_faster(x.device, weight.shape[1], weight.shape[0], rank)

    def _fusable_adapters(self) -> list[str]:
        base = self.get_base_layer()
        active = [a for a in self.active_adapters if a in self.lora_A]
        if base.groups > 1 or any(a in self.lora_variant for a in active):
            return []
        return active

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters or self.merged or args or kwargs:
            return super().forward(x, *args, **kwargs)
        active = self._fusable_adapters()
        if not active:
            return super().forward(x)
        base = self.get_base_layer()
        weight, bias = base.weight, base.bias
        if self._factored(x, active):
            for adapter in active:
                if self.lora_bias[adapter]:
                    extra = (self.lora_B[adapter].bias * self.scaling[adapter]).to(weight.dtype)
                    bias = extra if bias is None else bias + extra
            factors = [(self.lora_A[a].weight, self.lora_B[a].weight, self.scaling[a]) for a in active]
            return factored_conv_lora(x, base, weight, bias, factors)
        for adapter in active:
            lora_a, lora_b, scaling = self.lora_A[adapter], self.lora_B[adapter], self.scaling[adapter]
            delta = lora_conv_delta_weight(lora_a.weight, lora_b.weight, scaling, weight.shape)
            weight = weight + delta.to(weight.dtype)
            if self.lora_bias[adapter]:
                extra = (lora_b.bias * scaling).to(weight.dtype)
                bias = extra if bias is None else bias + extra
        return base._conv_forward(x, weight, bias)


_PEFT_CONV = lora_conv_layer_classes()


class FusedLoraConv1d(FusedConvLoraMixin, _PEFT_CONV[nn.Conv1d]):
    """peft's LoRA ``Conv1d`` layer, run as one conv with the merged kernel (:class:`FusedConvLoraMixin`)."""


class FusedLoraConv2d(FusedConvLoraMixin, _PEFT_CONV[nn.Conv2d]):
    """peft's LoRA ``Conv2d`` layer, run as one conv with the merged kernel (:class:`FusedConvLoraMixin`)."""


class FusedLoraConv3d(FusedConvLoraMixin, _PEFT_CONV[nn.Conv3d]):
    """peft's LoRA ``Conv3d`` layer, run as one conv with the merged kernel (:class:`FusedConvLoraMixin`)."""


FUSED_LORA_CONV_LAYERS: dict[type[nn.Module], type[nn.Module]] = {
    nn.Conv1d: FusedLoraConv1d, nn.Conv2d: FusedLoraConv2d, nn.Conv3d: FusedLoraConv3d,
}


def _layers_with_backward(mode: str) -> dict[type[nn.Module], type[nn.Module]]:
    """The fused layer classes whose backward is fixed to ``mode`` (module-level classes, so models pickle)."""
    layers = {}
    for conv, auto_cls in FUSED_LORA_CONV_LAYERS.items():
        name = f"{auto_cls.__name__}{mode.title()}"
        if name not in globals():
            globals()[name] = type(name, (auto_cls,), {
                "fused_backward": mode, "__module__": __name__,
                "__doc__": f"{auto_cls.__name__} with the {mode} backward always.",
            })
        layers[conv] = globals()[name]
    return layers


_LAYERS_BY_MODE = {"auto": FUSED_LORA_CONV_LAYERS, **{m: _layers_with_backward(m) for m in ("merged", "factored")}}


def use_fused_conv_lora(config: LoraConfig, mode: str = "auto") -> LoraConfig:
    """Make the convs that ``config`` wraps train as one conv with the merged kernel; returns ``config`` (changed).

    ``mode``: the backward, ``"auto"`` (default: the faster of the two for each layer and device), ``"merged"``
    (the merged kernel's weight gradient, projected on ``A`` and ``B``) or ``"factored"`` (see
    :mod:`monai_peft.lora.factored`). Forward, gradients and the saved file are the same for all three.

    Works on any ``LoraConfig``, including one read from a saved adapter, which then loads fused::

        config = use_fused_conv_lora(LoraConfig.from_pretrained("adapters/organs"))
        model = PeftModel.from_pretrained(net, "adapters/organs", config=config)

    Nothing about fusing is written to ``adapter_config.json``: the adapter stays a plain peft LoRA file. Fusing
    applies to the conv layers peft creates for this config; a further adapter added to an already wrapped conv
    runs the way that layer was created.

    Raises:
        ValueError: ``lora_dropout > 0`` (dropout of the LoRA branch's input has no counterpart in one conv),
            ``use_dora=True``, or an unknown ``mode``.
        TypeError: ``config`` is not a ``LoraConfig``.
    """
    if not isinstance(config, LoraConfig):
        raise TypeError(f"use_fused_conv_lora: expected a peft LoraConfig, got {type(config).__name__}.")
    if mode not in FUSED_MODES:
        raise ValueError(f"use_fused_conv_lora: mode must be one of {FUSED_MODES}, got {mode!r}.")
    _check_fusable(config, "fused=True")
    register_custom_lora_layers(config, _LAYERS_BY_MODE[mode])
    return config
