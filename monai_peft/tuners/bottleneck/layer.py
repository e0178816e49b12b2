"""Bottleneck adapter layers: ``scale * W_up(act(W_down h))`` after (sequential) or beside (parallel) a layer.

Houlsby et al. 2019 (sequential, after the attention and the MLP of each transformer block), He et al. 2022
(parallel, reading the branch input); lecture 003, "Parameter Efficient Fine Tuning - Adaptor" and the "Summary"
table.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Optional

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from monai_peft.tuners._common import NonWeightBaseLayerMixin

from .config import BottleneckAdapterConfig

_ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh, "identity": lambda h: h}


class BottleneckAdapterLayer(NonWeightBaseLayerMixin, BaseTunerLayer):
    """Per adapter name: ``bottleneck_down`` (Linear ``D_in -> m``) and ``bottleneck_up`` (Linear ``m -> D_out``).

    Args:
        base_layer: the wrapped ``nn.Linear`` or attention / MLP branch module.
        in_features: width of the base layer's input as the adapter sees it (``D_in``).
        out_features: width of the base layer's output (``D_out``).
        input_norm: for a branch module that does not receive the branch input (VideoMAE's ``output``, argument 1 the
            residual stream): the block's LayerNorm giving it. Held by reference, not registered: it belongs to the
            block and stays frozen.
    """

    adapter_layer_names = ("bottleneck_down", "bottleneck_up")
    other_param_names = ("bottleneck_insertion", "bottleneck_activation", "bottleneck_scale")

    def __init__(self, base_layer: nn.Module, in_features: int, out_features: int,
                 input_norm: Optional[nn.Module] = None, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.bottleneck_down = nn.ModuleDict({})
        self.bottleneck_up = nn.ModuleDict({})
        self.bottleneck_insertion: dict[str, str] = {}
        self.bottleneck_activation: dict[str, str] = {}
        self.bottleneck_scale: dict[str, float] = {}
        self._disable_adapters = False
        self.merged_adapters = []
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        object.__setattr__(self, "_input_norm", input_norm)  # not a submodule: not in this layer's state or params

    def update_layer(self, adapter_name: str, config: BottleneckAdapterConfig, inference_mode: bool = False) -> None:
        if config.insertion == "sequential" and self._input_norm is not None:
            raise TypeError(f"{type(self.get_base_layer()).__name__} adds the residual itself: a sequential adapter "
                            "after it would act on the residual stream; target its output Linear instead.")
        d_in = self.out_features if config.insertion == "sequential" else self.in_features
        m = int(config.bottleneck_size)
        self.bottleneck_down[adapter_name] = nn.Linear(d_in, m)
        self.bottleneck_up[adapter_name] = nn.Linear(m, self.out_features)
        self.bottleneck_insertion[adapter_name] = config.insertion
        self.bottleneck_activation[adapter_name] = config.activation
        self.bottleneck_scale[adapter_name] = float(config.scale)
        self.reset_bottleneck_parameters(adapter_name, config.init_weights)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    @torch.no_grad()
    def reset_bottleneck_parameters(self, adapter_name: str, init_weights: bool = True) -> None:
        down, up = self.bottleneck_down[adapter_name], self.bottleneck_up[adapter_name]
        if down.weight.device.type == "meta":
            return
        nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5))
        nn.init.zeros_(down.bias)
        if init_weights:  # Houlsby et al.: a near-identity start; a zero up-projection makes it exact
            nn.init.zeros_(up.weight)
        else:  # a random adapter that visibly changes the output (tests)
            nn.init.kaiming_uniform_(up.weight, a=math.sqrt(5))
        nn.init.zeros_(up.bias)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        raise ValueError("a bottleneck adapter is a non-linear branch (Linear -> activation -> Linear) and cannot be "
                         "merged into the base weights; keep it at inference, or use `unload()` for the base model.")

    def unmerge(self) -> None:
        warnings.warn("bottleneck adapters are never merged; nothing to unmerge.")

    def _adapter_output(self, adapter_name: str, h: torch.Tensor) -> torch.Tensor:
        down, up = self.bottleneck_down[adapter_name], self.bottleneck_up[adapter_name]
        h = self._cast_input_dtype(h, down.weight.dtype)
        return up(_ACTIVATIONS[self.bottleneck_activation[adapter_name]](down(h))) * self.bottleneck_scale[adapter_name]

    def _branch_input(self, x: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
        if self._input_norm is None:
            return x
        residual = args[0] if args else kwargs.get("input_tensor")
        if residual is None:
            raise TypeError(f"{type(self.get_base_layer()).__name__}: expected the residual stream as argument 1.")
        return self._input_norm(residual)


class BottleneckAdapterModule(nn.Module, BottleneckAdapterLayer):
    """A layer with bottleneck adapters: ``y = f(x) + sum_a A_a(f(x))`` (sequential) or ``+ A_a(x)`` (parallel).

    Shapes: tokens ``x`` of shape ``(B, N, D_in)`` (any leading dims); ``f``'s output ``(B, N, D_out)``, or a tuple
    whose first element is that (attention modules that also return weights), returned in the same form.
    """

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: BottleneckAdapterConfig, in_features: int,
                 out_features: int, input_norm: Optional[nn.Module] = None, **kwargs: Any) -> None:
        super().__init__()
        BottleneckAdapterLayer.__init__(self, base_layer, in_features, out_features, input_norm, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        active = [] if self.disable_adapters else sorted(a for a in self.active_adapters if a in self.bottleneck_down)
        if not active:
            return self.base_layer(x, *args, **kwargs)
        # read the branch input before the base layer runs (a block could modify it in place)
        source = self._branch_input(x, args, kwargs) if any(
            self.bottleneck_insertion[a] == "parallel" for a in active) else None
        out = self.base_layer(x, *args, **kwargs)
        h = out[0] if isinstance(out, tuple) else out
        if not isinstance(h, torch.Tensor):
            raise TypeError(f"{type(self.get_base_layer()).__name__} returned {type(h).__name__}; a bottleneck "
                            "adapter needs a tensor (or a tuple starting with one).")
        result = h
        for a in active:
            src = h if self.bottleneck_insertion[a] == "sequential" else source
            result = result + self._adapter_output(a, src).to(h.dtype)
        return (result, *out[1:]) if isinstance(out, tuple) else result

    def __repr__(self) -> str:
        return "bottleneck." + super().__repr__()
