"""ConvAdapter layers: a bottleneck conv adapter beside (or after) a conv or a residual block.

Chen et al. 2022, "Conv-Adapter"; thesis 001, section 3.2.2 (eqs. 3.1-3.2) and Fig. 3.2-3.3.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from monai_peft.targeting import CONV_TYPES
from monai_peft.tuners._common import CONV_BY_DIMS, NonWeightBaseLayerMixin

from .config import ConvAdapterConfig

_ACTIVATIONS = {
    "relu": F.relu,
    "gelu": F.gelu,
    "silu": F.silu,
    "leakyrelu": lambda x: F.leaky_relu(x, 0.01),
    "identity": lambda x: x,
}


@dataclass(frozen=True)
class AdapterGeometry:
    """Shape facts of the module an adapter is attached to.

    ``in_channels``/``out_channels`` are the adapted module's; ``stride`` its spatial down-sampling factor;
    ``kernel_size``/``padding``/``dilation`` those of the (first) conv it contains.
    """

    spatial_dims: int
    in_channels: int
    out_channels: int
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    is_block: bool


def _tuple(v: Any, n: int) -> tuple[int, ...]:
    return tuple(v) if isinstance(v, (tuple, list)) else (int(v),) * n


def conv_geometry(conv: nn.Module) -> AdapterGeometry:
    if not isinstance(conv, CONV_TYPES):
        raise TypeError(f"expected Conv1d/2d/3d, got {type(conv).__name__}")
    if isinstance(conv.padding, str):
        n = conv.weight.dim() - 2
        pad = tuple(d * (k - 1) // 2 for k, d in zip(_tuple(conv.kernel_size, n), _tuple(conv.dilation, n)))
    else:
        pad = tuple(conv.padding)
    n = len(conv.kernel_size)
    return AdapterGeometry(n, conv.in_channels, conv.out_channels, tuple(conv.kernel_size), tuple(conv.stride), pad,
                           tuple(conv.dilation), is_block=False)


def block_geometry(block: nn.Module, probe_size: int = 16) -> AdapterGeometry:
    """Geometry of a block ``y = block(x)`` (residual block, conv+norm+act unit, ...).

    Input channels and kernel come from the block's first convolution; output channels and stride from running a
    copy of the block on the ``meta`` device (no memory, no computation) with a ``probe_size``-wide input.

    Raises:
        TypeError: the block contains no convolution, or it cannot run on a single tensor.
        ValueError: the block up-samples (a parallel adapter cannot follow it).
    """
    first = next((m for m in block.modules() if isinstance(m, CONV_TYPES)), None)
    if first is None:
        raise TypeError(f"{type(block).__name__} contains no Conv1d/2d/3d: ConvAdapter cannot infer its geometry.")
    n = len(first.kernel_size)
    probe = copy.deepcopy(block).to("meta")
    x = torch.empty(2, first.in_channels, *([probe_size] * n), device="meta")
    try:
        with torch.no_grad():
            y = probe(x)
    except Exception as e:  # the block is user code: any failure means "not a one-tensor block"
        raise TypeError(
            f"ConvAdapter runs a residual-block target as block(x) with x of shape (B, C, *spatial); "
            f"{type(block).__name__} failed on a (2, {first.in_channels}, {', '.join([str(probe_size)] * n)}) input: {e}"
        ) from e
    if not isinstance(y, torch.Tensor) or y.dim() != n + 2:
        raise TypeError(f"{type(block).__name__} does not return one (B, C, *spatial) tensor.")
    stride = []
    for size in y.shape[2:]:
        if size > probe_size or probe_size % size:
            raise ValueError(
                f"{type(block).__name__} maps spatial size {probe_size} to {size}: only blocks that keep or "
                "down-sample resolution by an integer factor can take a ConvAdapter; target its convs instead."
            )
        stride.append(probe_size // size)
    k = tuple(first.kernel_size)
    pad = tuple(d * (kk - 1) // 2 for kk, d in zip(k, first.dilation))
    return AdapterGeometry(n, first.in_channels, int(y.shape[1]), k, tuple(stride), pad, tuple(first.dilation),
                           is_block=True)


class ConvAdapterLayer(NonWeightBaseLayerMixin, BaseTunerLayer):
    """Mixin holding, per adapter name, the down conv, the up conv and the per-channel scale ``alpha``."""

    adapter_layer_names = ("conv_adapter_down", "conv_adapter_up", "conv_adapter_alpha")
    other_param_names = ()

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.conv_adapter_down = nn.ModuleDict({})
        self.conv_adapter_up = nn.ModuleDict({})
        self.conv_adapter_alpha = nn.ParameterDict({})
        self.conv_adapter_insertion: dict[str, str] = {}
        self.conv_adapter_activation: dict[str, str] = {}
        self._disable_adapters = False
        self.merged_adapters = []
        base = self.get_base_layer()
        self.geometry = conv_geometry(base) if isinstance(base, CONV_TYPES) else block_geometry(base)
        self.in_features = self.geometry.in_channels
        self.out_features = self.geometry.out_channels

    def update_layer(self, adapter_name: str, config: ConvAdapterConfig, inference_mode: bool = False) -> None:
        g = self.geometry
        parallel = config.insertion == "parallel"
        channels = g.in_channels if parallel else g.out_channels
        if channels % config.gamma:
            raise ValueError(
                f"ConvAdapter gamma={config.gamma} does not divide the {channels} "
                f"{'input' if parallel else 'output'} channels of {type(self.get_base_layer()).__name__}; "
                "choose a gamma that divides every targeted module's channels or exclude this module."
            )
        hidden = channels // config.gamma
        if config.kernel_size is None:
            k, dil = g.kernel_size, g.dilation
            pad = g.padding
        else:
            k, dil = (int(config.kernel_size),) * g.spatial_dims, (1,) * g.spatial_dims
            pad = tuple((kk - 1) // 2 for kk in k)
        if parallel:
            stride = g.stride
            if not g.is_block and config.kernel_size is not None:
                self._check_same_output_size(k, stride, pad, dil)
        else:
            stride = (1,) * g.spatial_dims
            if any(kk % 2 == 0 for kk in k):
                raise ValueError(f"ConvAdapter sequential insertion needs an odd kernel to keep the size, got {k}.")
            pad = tuple(d * (kk - 1) // 2 for kk, d in zip(k, dil))
        conv = CONV_BY_DIMS[g.spatial_dims]
        groups = hidden if config.adapter_conv == "depthwise" else 1
        self.conv_adapter_down[adapter_name] = conv(
            channels, hidden, k, stride=stride, padding=pad, dilation=dil, groups=groups, bias=True
        )
        self.conv_adapter_up[adapter_name] = conv(hidden, g.out_channels, 1, bias=True)
        self.conv_adapter_alpha[adapter_name] = nn.Parameter(torch.ones(g.out_channels))
        if config.activation == "prelu":
            self.conv_adapter_down[adapter_name] = nn.Sequential(self.conv_adapter_down[adapter_name], nn.PReLU(hidden))
            self.conv_adapter_activation[adapter_name] = "identity"
        else:
            self.conv_adapter_activation[adapter_name] = config.activation
        self.conv_adapter_insertion[adapter_name] = config.insertion
        self.reset_conv_adapter_parameters(adapter_name, config.init_weights)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def _check_same_output_size(self, k, stride, pad, dil) -> None:
        g = self.geometry
        for n in (15, 16, 17):
            base = [(n + 2 * p - d * (kk - 1) - 1) // s + 1 for kk, s, p, d in zip(g.kernel_size, g.stride, g.padding, g.dilation)]
            ours = [(n + 2 * p - d * (kk - 1) - 1) // s + 1 for kk, s, p, d in zip(k, stride, pad, dil)]
            if base != ours:
                raise ValueError(
                    f"ConvAdapter kernel_size={k[0]} gives a different output size than the adapted conv "
                    f"(kernel {g.kernel_size}, stride {g.stride}, padding {g.padding}); leave kernel_size=None."
                )

    @torch.no_grad()
    def reset_conv_adapter_parameters(self, adapter_name: str, init_weights: bool = True) -> None:
        if adapter_name not in self.conv_adapter_up:
            return
        down = self.conv_adapter_down[adapter_name]
        down = down[0] if isinstance(down, nn.Sequential) else down
        if down.weight.device.type == "meta":
            return
        nn.init.kaiming_uniform_(down.weight, a=5**0.5)
        nn.init.zeros_(down.bias)
        up = self.conv_adapter_up[adapter_name]
        if init_weights:  # thesis 3.2.2: zero up-projection, so the adapted network starts as the base network
            nn.init.zeros_(up.weight)
        else:
            nn.init.normal_(up.weight, std=0.02)
        nn.init.zeros_(up.bias)
        self.conv_adapter_alpha[adapter_name].fill_(1.0)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        raise ValueError(
            "ConvAdapter adds a non-linear branch (conv -> activation -> conv) and cannot be merged into the base "
            "weights; keep the adapter at inference, or use `unload()` to get the base network back."
        )

    def unmerge(self) -> None:
        warnings.warn("ConvAdapter is never merged; nothing to unmerge.")

    def _adapter_delta(self, adapter_name: str, source: torch.Tensor) -> torch.Tensor:
        down = self.conv_adapter_down[adapter_name]
        up = self.conv_adapter_up[adapter_name]
        alpha = self.conv_adapter_alpha[adapter_name]
        weight = down[0].weight if isinstance(down, nn.Sequential) else down.weight
        source = self._cast_input_dtype(source, weight.dtype)
        h = _ACTIVATIONS[self.conv_adapter_activation[adapter_name]](down(source))
        h = up(h)
        return h * alpha.view(1, -1, *([1] * self.geometry.spatial_dims))


class ConvAdapterModule(nn.Module, ConvAdapterLayer):
    """A conv or a block with ConvAdapters: ``forward(x) = base(x) + sum_a alpha_a * A_a(x or base(x))``.

    Shapes: ``x`` is ``(B, C_in, *spatial)``; the output is the base module's ``(B, C_out, *spatial_out)``.
    """

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: ConvAdapterConfig, **kwargs: Any) -> None:
        super().__init__()
        ConvAdapterLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            return self.base_layer(x, *args, **kwargs)
        active = [a for a in self.active_adapters if a in self.conv_adapter_down]
        # Parallel branches read x before the base layer runs: blocks that modify their input in place cannot
        # change what the adapter sees.
        parallel = [self._adapter_delta(a, x) for a in active if self.conv_adapter_insertion[a] == "parallel"]
        result = self.base_layer(x, *args, **kwargs)
        dtype = result.dtype
        for delta in parallel:
            result = result + delta.to(dtype)
        for a in active:
            if self.conv_adapter_insertion[a] == "sequential":
                result = result + self._adapter_delta(a, result).to(dtype)
        return result

    def __repr__(self) -> str:
        return "conv_adapter." + super().__repr__()
