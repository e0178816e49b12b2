"""ConvAdapter layers: a bottleneck conv adapter beside (or after) a conv, a transposed conv or a block.

Chen et al. 2022, "Conv-Adapter"; thesis 001, section 3.2.2 (eqs. 3.1-3.2) and Fig. 3.2-3.3. What is built is
written out in :class:`~monai_peft.tuners.conv_adapter.ConvAdapterConfig`; the shapes in :mod:`.geometry`.
"""

from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from monai_peft.tuners._common import NonWeightBaseLayerMixin
from monai_peft.tuners.module_types import CONV_BY_DIMS, CONV_TRANSPOSE_TYPES
from monai_peft.tuners.pointwise import channel_matmul

from .config import ConvAdapterConfig
from .geometry import AdapterGeometry, bottleneck_width, build_down_projection, module_geometry

MERGE_ERROR = (
    "ConvAdapter adds a non-linear branch (conv -> activation -> conv) and cannot be merged into the base "
    "weights; keep the adapter at inference, or use `unload()` to get the base network back."
)


def _activation(name: str, hidden: int) -> nn.Module:
    if name == "prelu":
        return nn.PReLU(hidden)
    return {
        "relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "identity": nn.Identity,
        "leakyrelu": lambda: nn.LeakyReLU(0.01),
    }[name]()


class ConvAdapterLayer(NonWeightBaseLayerMixin, BaseTunerLayer):
    """Per adapter name: the down-projection, the activation, the up-projection, the scale ``alpha`` and where the
    adapter reads its input (``conv_adapter_insertion``)."""

    adapter_layer_names = ("conv_adapter_down", "conv_adapter_act", "conv_adapter_up", "conv_adapter_alpha")
    other_param_names = ("conv_adapter_insertion",)

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.conv_adapter_down = nn.ModuleDict({})
        self.conv_adapter_act = nn.ModuleDict({})
        self.conv_adapter_up = nn.ModuleDict({})
        self.conv_adapter_alpha = nn.ParameterDict({})
        self.conv_adapter_insertion: dict[str, str] = {}
        self._disable_adapters = False
        self.merged_adapters = []
        self.geometry: AdapterGeometry = module_geometry(self.get_base_layer())
        self.in_features = self.geometry.in_channels
        self.out_features = self.geometry.out_channels

    def update_layer(self, adapter_name: str, config: ConvAdapterConfig, inference_mode: bool = False) -> None:
        """Create adapter ``adapter_name``; every check runs before anything is created."""
        g = self.geometry
        channels = g.in_channels if config.insertion == "parallel" else g.out_channels
        hidden = bottleneck_width(channels, int(config.gamma))
        down = build_down_projection(g, config.insertion, hidden, config.adapter_conv, config.kernel_size)
        self.conv_adapter_down[adapter_name] = down
        self.conv_adapter_act[adapter_name] = _activation(config.activation, hidden)
        self.conv_adapter_up[adapter_name] = CONV_BY_DIMS[g.spatial_dims](hidden, g.out_channels, 1, bias=True)
        self.conv_adapter_alpha[adapter_name] = nn.Parameter(torch.ones(g.out_channels))
        self.conv_adapter_insertion[adapter_name] = config.insertion
        self.reset_conv_adapter_parameters(adapter_name, config.init_weights)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    @torch.no_grad()
    def reset_conv_adapter_parameters(self, adapter_name: str, init_weights: bool = True) -> None:
        if adapter_name not in self.conv_adapter_up:
            return
        down = self.conv_adapter_down[adapter_name]
        if down.weight.device.type == "meta":
            return
        nn.init.kaiming_uniform_(down.weight, a=5**0.5)
        nn.init.zeros_(down.bias)
        up = self.conv_adapter_up[adapter_name]
        if init_weights:  # thesis 3.2.2: zero up-projection, so the adapted network starts as the base network
            nn.init.zeros_(up.weight)
            nn.init.zeros_(up.bias)
        else:  # PyTorch's default conv init, bias included: the adapter changes the output from the start
            up.reset_parameters()
        self.conv_adapter_alpha[adapter_name].fill_(1.0)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        raise ValueError(MERGE_ERROR)

    def unmerge(self) -> None:
        warnings.warn("ConvAdapter is never merged; nothing to unmerge.")

    def _adapter_delta(self, adapter_name: str, source: torch.Tensor, output_size: Any = None) -> torch.Tensor:
        """``alpha * up(act(down(source)))`` of shape ``(B, C_out, *spatial_out)`` (a linear layer: ``(..., C_out)``),
        in the adapter's dtype.

        Computed as ``(alpha * W_up) @ act(down(source)) + alpha * b_up``: the pointwise up-projection and the scale
        are one channel product (:func:`~monai_peft.tuners.pointwise.channel_matmul`), not a ``1x1`` conv followed
        by a multiplication, which saves two passes over the output and one stored activation. On CPUs a 3D
        down-projection reads its input in channels-last layout, where oneDNN runs grouped and thin convs 1.5-3x
        faster than on a contiguous tensor (``benchmarks/bench_methods.py``); the result is the same.
        """
        if self.geometry.features_last:  # a linear layer: (..., C) as (N, C, 1), the adapter's 1-D convs with kernel 1
            delta = self._conv_branch(adapter_name, source.reshape(-1, source.shape[-1], 1))
            return delta.reshape(*source.shape[:-1], delta.shape[1])
        return self._conv_branch(adapter_name, source, output_size)

    def _conv_branch(self, adapter_name: str, source: torch.Tensor, output_size: Any = None) -> torch.Tensor:
        down = self.conv_adapter_down[adapter_name]
        source = self._cast_input_dtype(source, down.weight.dtype)
        if output_size is not None and isinstance(down, CONV_TRANSPOSE_TYPES):
            h = down(source, output_size=output_size)
        else:
            if source.device.type == "cpu" and source.dim() == 5 and isinstance(down, nn.Conv3d):
                source = source.contiguous(memory_format=torch.channels_last_3d)
            h = down(source)
        h = self.conv_adapter_act[adapter_name](h)
        up, alpha = self.conv_adapter_up[adapter_name], self.conv_adapter_alpha[adapter_name].to(h.dtype)
        if up._forward_hooks or up._forward_pre_hooks:
            # an observer (Grad-CAM, ProtoSeg) hooks the up-projection: run it as the module it watches
            return alpha.view(1, -1, *([1] * (h.dim() - 2))) * up(h)
        return channel_matmul(alpha[:, None] * up.weight.flatten(1), h, alpha * up.bias)


class ConvAdapterModule(nn.Module, ConvAdapterLayer):
    """A conv, transposed conv or block with ConvAdapters: ``forward(x) = base(x) + sum_a alpha_a * A_a(x or base(x))``.

    Shapes: ``x`` is ``(B, C_in, *spatial)``; the output is the base module's ``(B, C_out, *spatial_out)``. Active
    adapters are summed in the order of their names, so the result does not depend on the order of activation.
    """

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: ConvAdapterConfig, **kwargs: Any) -> None:
        super().__init__()
        ConvAdapterLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            return self.base_layer(x, *args, **kwargs)
        active = sorted(a for a in self.active_adapters if a in self.conv_adapter_down)
        output_size = None
        if isinstance(self.get_base_layer(), CONV_TRANSPOSE_TYPES):
            # ConvTranspose's forward(input, output_size): the parallel branch needs the same output size
            output_size = kwargs.get("output_size", args[0] if args else None)
        # parallel branches read x before the base layer runs: a block that modifies its input in place cannot
        # change what the adapter sees
        deltas = {a: self._adapter_delta(a, x, output_size) for a in active
                  if self.conv_adapter_insertion[a] == "parallel"}
        result = self.base_layer(x, *args, **kwargs)
        base_out = result
        for a in active:
            delta = deltas[a] if a in deltas else self._adapter_delta(a, base_out)
            result = result + delta.to(result.dtype)
        return result

    def __repr__(self) -> str:
        return "conv_adapter." + super().__repr__()
