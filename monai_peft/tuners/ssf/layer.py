"""SSF layers: a per-channel scale and shift after a conv, norm or linear layer (thesis 001, 3.2.3, eq. 3.3)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn
from torch.func import functional_call

from monai_peft.tuners._common import NonWeightBaseLayerMixin
from monai_peft.tuners.frozen_norm import running_statistics_if_frozen
from monai_peft.tuners.module_types import ANY_CONV_TYPES, CHANNEL_FIRST_NORM_TYPES, CONV_TRANSPOSE_TYPES, NORM_TYPES

from .config import SSFConfig

SUPPORTED_TYPES: tuple[type[nn.Module], ...] = ANY_CONV_TYPES + CHANNEL_FIRST_NORM_TYPES + (nn.Linear, nn.LayerNorm)

# flags that say whether a norm layer uses its weight/bias; set while SSF's merge gave it ones it did not have
_AFFINE_FLAGS = ("affine", "elementwise_affine")


def ssf_channels(module: nn.Module) -> tuple[int, int]:
    """``(channels, channel_dim)`` of the output of a supported module (dim 1 for ``(B, C, ...)``, -1 for linear)."""
    if isinstance(module, ANY_CONV_TYPES):
        return module.out_channels, 1
    if isinstance(module, nn.GroupNorm):
        return module.num_channels, 1
    if isinstance(module, CHANNEL_FIRST_NORM_TYPES):
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


@dataclass
class _MergeRecord:
    """What unmerging one adapter needs besides its scale and shift."""

    created: tuple[str, ...]  # parameters the merge created ("weight" / "bias") and unmerge removes again
    bias: Optional[torch.Tensor]  # the bias before the merge (C floats; restores it exactly)
    channels: torch.Tensor  # output channels whose weights division cannot restore (scale 0, underflow, ...)
    weight_rows: Optional[torch.Tensor]  # their weights before the merge, as ``_channel_first(weight)[channels]``


def _owns_parameters(module: nn.Module) -> bool:
    """Whether ``module.weight`` / ``module.bias`` are its own ``nn.Parameter`` s (or absent).

    FSDP with ``use_orig_params=True`` replaces them with plain tensor views during forward, and ``functional_call``
    then runs the module with those views instead of the tensors it was given: folding SSF into the norm would be
    silently dropped, so SSF is applied after the norm instead.
    """
    return all(module._parameters.get(name) is None or isinstance(module._parameters[name], nn.Parameter)
               for name in ("weight", "bias"))


class SSFLayer(NonWeightBaseLayerMixin, BaseTunerLayer):
    """Per adapter name: ``ssf_scale`` (C,) and/or ``ssf_shift`` (C,).

    Several active adapters combine as ``y = (prod_a scale_a) * op(x) + sum_a shift_a``: scales multiply (as IA3's
    do) and shifts add, so the result does not depend on the order of the adapters, and merging them one by one or
    together gives the same weights.
    """

    adapter_layer_names = ("ssf_scale", "ssf_shift")
    other_param_names = ()

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.ssf_scale = nn.ParameterDict({})
        self.ssf_shift = nn.ParameterDict({})
        self._disable_adapters = False
        self.merged_adapters = []
        self._ssf_merge_records: dict[str, _MergeRecord] = {}
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

    def _scale_shift(self, names: list[str], device, dtype) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """Product of the scales and sum of the shifts of ``names`` (``None`` where no adapter has one)."""
        scale = shift = None
        for name in names:
            if name in self.ssf_scale:
                s = self.ssf_scale[name].to(device=device, dtype=dtype)
                scale = s if scale is None else scale * s
            if name in self.ssf_shift:
                t = self.ssf_shift[name].to(device=device, dtype=dtype)
                shift = t if shift is None else shift + t
        return scale, shift

    def _adapters(self) -> list[str]:
        """Active adapters of this layer, sorted by name (a fixed order makes their combination exactly repeatable)."""
        return sorted(a for a in self.active_adapters if a in self.ssf_scale or a in self.ssf_shift)

    # -- merging (thesis eq. 3.3) -------------------------------------------------------------------------
    def _channel_first(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` viewed as ``(C_out, ...)``; a transposed conv's ``(C_in, C_out / g, *k)`` is regrouped."""
        base = self.get_base_layer()
        if isinstance(base, CONV_TRANSPOSE_TYPES):
            g = base.groups
            w = weight.reshape(g, weight.shape[0] // g, weight.shape[1], *weight.shape[2:])
            return w.transpose(1, 2).reshape(self.channels, *w.shape[1:2], *weight.shape[2:])
        return weight.reshape(self.channels, *weight.shape[1:]) if weight.dim() > 1 else weight

    def _from_channel_first(self, rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        base = self.get_base_layer()
        if isinstance(base, CONV_TRANSPOSE_TYPES):
            g = base.groups
            w = rows.reshape(g, like.shape[1], like.shape[0] // g, *like.shape[2:])
            return w.transpose(1, 2).reshape(like.shape).contiguous()
        return rows.reshape(like.shape).contiguous()

    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Fold adapters into the layer: ``W' = s * W``, ``b' = s * (b - T) + T + t`` (``T``: shifts merged before).

        The new tensors are computed apart from the layer (in float32, float64 for a float64 layer) and written only
        when complete; with ``safe_merge=True`` they are first checked to be finite. A layer without bias gains one
        (a norm without affine parameters gains weight and bias); a warning says so.

        Raises:
            ValueError: ``safe_merge`` and the merged weights would hold NaN or inf (nothing is changed).
        """
        adapter_names = check_adapters_to_merge(self, adapter_names)
        base = self.get_base_layer()
        for name in adapter_names:
            if name not in self.ssf_scale and name not in self.ssf_shift:
                continue
            weight, bias = getattr(base, "weight", None), getattr(base, "bias", None)
            ref = next(p for p in (weight, bias, *self.ssf_scale.values(), *self.ssf_shift.values()) if p is not None)
            dtype = (weight if weight is not None else ref).dtype
            work = torch.promote_types(dtype, torch.float32)  # float64 layers merge in float64
            scale, shift = self._scale_shift([name], ref.device, work)
            ones = torch.ones(self.channels, device=ref.device, dtype=work)
            scale = ones if scale is None else scale
            shift = torch.zeros_like(ones) if shift is None else shift
            merged_shift = self._scale_shift(self.merged_adapters, ref.device, work)[1]
            merged_shift = torch.zeros_like(ones) if merged_shift is None else merged_shift

            old_w = self._channel_first(weight.detach().to(work)) if weight is not None else ones
            new_w = old_w * scale.view(-1, *([1] * (old_w.dim() - 1)))
            old_b = bias.detach().to(work) if bias is not None else torch.zeros_like(ones)
            new_b = scale * (old_b - merged_shift) + merged_shift + shift
            if safe_merge and not (torch.isfinite(new_w).all() and torch.isfinite(new_b).all()):
                raise ValueError(
                    f"NaNs detected in the merged weights. The adapter {name} seems to be broken: SSF's scale or "
                    f"shift of {type(base).__name__} is not finite; nothing was merged."
                )
            # channels whose pre-merge weights dividing by the scale cannot give back (scale 0, underflow, ...)
            new_w_cast = new_w.to(dtype)
            back = (new_w_cast.to(work) / scale.view(-1, *([1] * (old_w.dim() - 1)))).to(dtype).to(work)
            tol = 8 * torch.finfo(dtype).eps
            bad = ~torch.isclose(back, old_w, rtol=tol, atol=0.0).reshape(self.channels, -1).all(dim=1)
            channels = bad.nonzero().flatten()
            record = _MergeRecord(
                created=tuple(n for n, p in (("weight", weight), ("bias", bias)) if p is None),
                bias=None if bias is None else bias.detach().clone(),
                channels=channels,
                weight_rows=None if weight is None else self._channel_first(weight.detach())[channels].clone(),
            )
            if record.created:
                warnings.warn(
                    f"merging SSF into {type(base).__name__} without {' and '.join(record.created)} adds "
                    f"{' and '.join(record.created)} parameter(s) of shape ({self.channels},) to it; the merged "
                    "network's state_dict gains those keys."
                )
            if weight is None:  # norm without affine parameters: y = s * norm(x) + t
                base.weight = nn.Parameter(new_w_cast, requires_grad=False)
                for flag in _AFFINE_FLAGS:
                    if hasattr(base, flag):
                        setattr(base, flag, True)
            else:
                weight.data = self._from_channel_first(new_w_cast, weight)
            if bias is None:
                base.bias = nn.Parameter(new_b.to(dtype), requires_grad=False)
            else:
                bias.data = new_b.to(bias.dtype).contiguous()
            self._ssf_merge_records[name] = record
            self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo the merges, last first: weights are divided by the scale except the channels where division cannot
        restore them (a scale of 0, or weights that underflowed), which the merge kept; the bias comes back exactly."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        base = self.get_base_layer()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            record = self._ssf_merge_records.pop(name)
            if "weight" in record.created:
                base.weight = None
                for flag in _AFFINE_FLAGS:
                    if hasattr(base, flag):
                        setattr(base, flag, False)
            else:
                w = base.weight
                work = torch.promote_types(w.dtype, torch.float32)
                scale, _ = self._scale_shift([name], w.device, work)
                rows = self._channel_first(w.detach().to(work))
                if scale is not None:
                    safe = scale.clone()
                    safe[record.channels] = 1.0  # these rows are restored from the record below
                    rows = rows / safe.view(-1, *([1] * (rows.dim() - 1)))
                rows = rows.to(w.dtype)
                if record.weight_rows is not None:
                    rows[record.channels] = record.weight_rows.to(rows.dtype)
                w.data = self._from_channel_first(rows, w)
            if "bias" in record.created:
                base.bias = None
            else:
                base.bias.data = record.bias.to(base.bias.dtype)


def _same_float_dtype(*tensors: Optional[torch.Tensor]) -> bool:
    dtypes = {t.dtype for t in tensors if t is not None}
    return len(dtypes) == 1 and dtypes <= {torch.float32, torch.float64}


class SSFModule(nn.Module, SSFLayer):
    """A layer followed by SSF: ``forward(x) = scale * base(x) + shift`` per channel.

    Shapes: channel-first layers give ``(B, C, *spatial)`` with scale/shift over ``C``; ``Linear``/``LayerNorm`` give
    ``(..., C)`` with scale/shift over the last dimension. The affine map is computed in at least float32 and the
    result cast back to the base layer's output dtype, so half-precision models with float32 adapters and the
    reverse both work.

    How it is computed (same result, fewer passes over the activations; issue 12): after a norm layer the scale and
    shift are folded into the norm's own affine parameters (``norm(x) * (w * s) + (b * s + t)``), so the norm's
    kernel produces the output and the gradients of ``s`` and ``t`` in its own backward, and no extra tensor is
    stored; after a conv, the map runs as one eval-mode batch norm with zero mean and unit variance
    (``eps = 0``), whose fused kernel computes the input, scale and shift gradients in one pass. Half precision,
    autocast and ``Linear`` layers use the plain elementwise form.
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
        names = self._adapters()
        if self.merged or not names:
            return self.base_layer(x, *args, **kwargs)
        base = self.get_base_layer()
        foldable = isinstance(base, NORM_TYPES) and self._can_fold(x, base) and _owns_parameters(base)
        if not args and not kwargs and foldable:
            return self._norm_with_folded_ssf(x, base, names)
        result = self.base_layer(x, *args, **kwargs)
        dtype = result.dtype
        if self.channel_dim == 1 and result.dim() > 2 and self._can_fold(result, None):
            scale, shift = self._scale_shift(names, result.device, dtype)
            ones = torch.ones(self.channels, device=result.device, dtype=dtype)
            zeros = torch.zeros_like(ones)
            # eval-mode batch norm with mean 0, variance 1, eps 0: exactly scale * result + shift
            return F.batch_norm(result, zeros, ones, ones if scale is None else scale,
                                zeros if shift is None else shift, False, 0.0, 0.0)
        scale, shift = self._scale_shift(names, result.device, torch.promote_types(dtype, torch.float32))
        out = result if scale is None else result * self._view(scale, result.dim())
        out = out if shift is None else out + self._view(shift, result.dim())
        return out.to(dtype)

    def _can_fold(self, x: torch.Tensor, base: Optional[nn.Module]) -> bool:
        """The fast forms apply: float32/64 throughout, no autocast, adapters and base in one dtype."""
        if torch.is_autocast_enabled(x.device.type):
            return False
        params = [*self.ssf_scale.values(), *self.ssf_shift.values()]
        if base is not None:
            params += [getattr(base, "weight", None), getattr(base, "bias", None)]
        return _same_float_dtype(x, *params)

    def _norm_with_folded_ssf(self, x: torch.Tensor, base: nn.Module, names: list[str]) -> torch.Tensor:
        """``base(x)`` with weight ``w * s`` and bias ``b * s + t`` (``w = 1``, ``b = 0`` without affine params)."""
        scale, shift = self._scale_shift(names, x.device, x.dtype)
        weight, bias = base.weight, base.bias
        if scale is not None:
            weight = scale if weight is None else weight * scale
            bias = None if bias is None else bias * scale
        if shift is not None:
            bias = shift if bias is None else bias + shift
        # the swapped-in tensors require grad; a frozen batch norm must still see itself as frozen
        with running_statistics_if_frozen(base):
            return functional_call(base, {"weight": weight, "bias": bias}, (x,))

    def __repr__(self) -> str:
        return "ssf." + super().__repr__()
