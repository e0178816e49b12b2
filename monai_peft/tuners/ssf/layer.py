"""SSF layers: a per-channel scale and shift after a conv, norm or linear layer (thesis 001, 3.2.3, eq. 3.3)."""

from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from monai_peft.tuners._common import NonWeightBaseLayerMixin

from .config import SSFConfig

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_NORM_CHANNEL_FIRST = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.InstanceNorm1d,
                       nn.InstanceNorm2d, nn.InstanceNorm3d, nn.GroupNorm)
SUPPORTED_TYPES = _CONV + _CONV_T + _NORM_CHANNEL_FIRST + (nn.Linear, nn.LayerNorm)


def ssf_channels(module: nn.Module) -> tuple[int, int]:
    """``(channels, channel_dim)`` of the output of a supported module (dim 1 for ``(B, C, ...)``, -1 for linear)."""
    if isinstance(module, _CONV + _CONV_T):
        if isinstance(module, _CONV_T) and module.groups != 1:
            raise TypeError("SSF supports transposed convolutions with groups=1 only.")
        return module.out_channels, 1
    if isinstance(module, nn.GroupNorm):
        return module.num_channels, 1
    if isinstance(module, _NORM_CHANNEL_FIRST):
        return module.num_features, 1
    if isinstance(module, nn.Linear):
        return module.out_features, -1
    if isinstance(module, nn.LayerNorm):
        if len(module.normalized_shape) != 1:
            raise TypeError(f"SSF supports LayerNorm over one dimension, got normalized_shape={module.normalized_shape}.")
        return module.normalized_shape[0], -1
    raise TypeError(
        f"SSF does not support {type(module).__name__}; supported: {', '.join(t.__name__ for t in SUPPORTED_TYPES)}."
    )


class SSFLayer(NonWeightBaseLayerMixin, BaseTunerLayer):
    """Per adapter name: ``ssf_scale`` (C,) and/or ``ssf_shift`` (C,)."""

    adapter_layer_names = ("ssf_scale", "ssf_shift")
    other_param_names = ()

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.ssf_scale = nn.ParameterDict({})
        self.ssf_shift = nn.ParameterDict({})
        self._disable_adapters = False
        self.merged_adapters = []
        # per merged adapter: which parameters the merge had to create (so unmerge can remove them again)
        self._ssf_created: dict[str, tuple[str, ...]] = {}
        self.channels, self.channel_dim = ssf_channels(self.get_base_layer())
        self.in_features = self.out_features = self.channels

    def update_layer(self, adapter_name: str, config: SSFConfig, inference_mode: bool = False) -> None:
        if config.scale:
            self.ssf_scale[adapter_name] = nn.Parameter(torch.ones(self.channels))
        if config.shift:
            self.ssf_shift[adapter_name] = nn.Parameter(torch.zeros(self.channels))
        self.reset_ssf_parameters(adapter_name, config.init_weights)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    @torch.no_grad()
    def reset_ssf_parameters(self, adapter_name: str, init_weights: bool = True) -> None:
        for table, identity in ((self.ssf_scale, 1.0), (self.ssf_shift, 0.0)):
            if adapter_name in table and table[adapter_name].device.type != "meta":
                if init_weights:
                    table[adapter_name].fill_(identity)
                else:
                    table[adapter_name].copy_(identity + 0.1 * torch.randn_like(table[adapter_name]))

    def _view(self, v: torch.Tensor, ndim: int) -> torch.Tensor:
        if self.channel_dim == -1:
            return v
        return v.view(1, -1, *([1] * (ndim - 2)))

    def _scale_shift(self, adapter_name: str, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        scale = self.ssf_scale[adapter_name] if adapter_name in self.ssf_scale else torch.ones(self.channels)
        shift = self.ssf_shift[adapter_name] if adapter_name in self.ssf_shift else torch.zeros(self.channels)
        return scale.to(device=device, dtype=dtype), shift.to(device=device, dtype=dtype)

    def _adapters(self) -> list[str]:
        return [a for a in self.active_adapters if a in self.ssf_scale or a in self.ssf_shift]

    # -- merging (thesis eq. 3.3) -------------------------------------------------------------------------
    def _weight_view(self, v: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        base = self.get_base_layer()
        if isinstance(base, _CONV_T):  # weight (C_in, C_out, *k)
            return v.view(1, -1, *([1] * (weight.dim() - 2)))
        return v.view(-1, *([1] * (weight.dim() - 1)))

    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        adapter_names = check_adapters_to_merge(self, adapter_names)
        base = self.get_base_layer()
        for name in adapter_names:
            if name not in self.ssf_scale and name not in self.ssf_shift:
                continue
            ref = next(p for p in (getattr(base, "weight", None), getattr(base, "bias", None),
                                   *self.ssf_scale.values(), *self.ssf_shift.values()) if p is not None)
            scale, shift = self._scale_shift(name, ref.device, torch.float32)
            if safe_merge and not (torch.isfinite(scale).all() and torch.isfinite(shift).all()):
                raise ValueError(f"NaNs or infs in SSF adapter '{name}'; not merged.")
            created = []
            weight = getattr(base, "weight", None)
            if weight is None:  # norm without affine parameters: y = s * norm(x) + t
                base.weight = nn.Parameter(scale.to(ref.dtype).clone(), requires_grad=False)
                created.append("weight")
            else:
                weight.data = (weight.data.float() * self._weight_view(scale, weight)).to(weight.dtype)
            bias = getattr(base, "bias", None)
            if bias is None:
                warnings.warn(
                    f"merging SSF into {type(base).__name__} without a bias adds a bias parameter of shape "
                    f"({self.channels},) to it (the shift); the merged network's state_dict gains that key."
                )
                base.bias = nn.Parameter(shift.to(base.weight.dtype).clone(), requires_grad=False)
                created.append("bias")
            else:
                bias.data = (bias.data.float() * scale + shift).to(bias.dtype)
            if created and hasattr(base, "affine") and "weight" in created:
                base.affine = True
            self._ssf_created[name] = tuple(created)
            self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        base = self.get_base_layer()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            created = self._ssf_created.pop(name, ())
            scale, shift = self._scale_shift(name, base.bias.device, torch.float32)
            if "bias" in created:
                base.bias = None
            else:
                base.bias.data = ((base.bias.data.float() - shift) / scale).to(base.bias.dtype)
            if "weight" in created:
                base.weight = None
                if hasattr(base, "affine"):
                    base.affine = False
            else:
                w = base.weight
                w.data = (w.data.float() / self._weight_view(scale, w)).to(w.dtype)


class SSFModule(nn.Module, SSFLayer):
    """A layer followed by SSF: ``forward(x) = scale * base(x) + shift`` per channel.

    Shapes: channel-first layers give ``(B, C, *spatial)`` with scale/shift over ``C``; ``Linear``/``LayerNorm`` give
    ``(..., C)`` with scale/shift over the last dimension.
    """

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: SSFConfig, **kwargs: Any) -> None:
        super().__init__()
        SSFLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        dtype = result.dtype
        for name in self._adapters():
            scale, shift = self._scale_shift(name, result.device, torch.promote_types(dtype, torch.float32))
            result = (result * self._view(scale, result.dim()) + self._view(shift, result.dim())).to(dtype)
        return result

    def __repr__(self) -> str:
        return "ssf." + super().__repr__()
