"""Where a ConvAdapter branch reads and what shape it must produce: the geometry of the adapted module.

A parallel adapter ``A(x)`` is added to ``module(x)``, so its down-projection must map every input size to exactly
the module's output size. For a conv or a transposed conv it copies the module's kernel, stride, padding (also
``"same"``/``"valid"``), output padding, dilation and padding mode, which makes the shapes equal by construction.
For a block (a residual block or any module taking one tensor) the output channels and the resampling factor are
measured by running a copy of the block on PyTorch's ``meta`` device, and the chosen down-projection is checked
against the block at several input sizes. A sequential adapter reads the module's output and keeps its size
(stride 1, ``"same"`` padding).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, replace
from typing import Any, Union

import torch
from torch import nn

from monai_peft.tuners.module_types import ANY_CONV_TYPES, CONV_BY_DIMS, CONV_TRANSPOSE_BY_DIMS, CONV_TRANSPOSE_TYPES

__all__ = ["ConvSpec", "AdapterGeometry", "module_geometry", "bottleneck_width", "down_projection_groups",
           "build_down_projection", "PROBE_SIZES"]

Padding = Union[str, tuple[int, ...]]

# input sizes (along every spatial dim) at which a block is run on the meta device; the first one measures the
# resampling factor, all of them check that the adapter's output size follows the block's
PROBE_SIZES = (16, 15, 17, 24)


@dataclass(frozen=True)
class ConvSpec:
    """Kernel geometry of a (transposed) convolution, without its channels.

    ``padding`` is a tuple or one of PyTorch's strings ``"same"``/``"valid"``; ``output_padding`` is only used when
    ``transposed``.
    """

    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    padding: Padding
    dilation: tuple[int, ...]
    output_padding: tuple[int, ...] = ()
    padding_mode: str = "zeros"
    transposed: bool = False

    def output_size(self, size: tuple[int, ...]) -> tuple[int, ...]:
        """Spatial output size for spatial input ``size`` (PyTorch's formulas; ``"same"`` keeps the size)."""
        out = []
        for i, n in enumerate(size):
            k, s, d = self.kernel_size[i], self.stride[i], self.dilation[i]
            if self.transposed:
                out.append((n - 1) * s - 2 * self.padding[i] + d * (k - 1) + self.output_padding[i] + 1)
            elif self.padding == "same":
                out.append(n)
            else:
                p = 0 if self.padding == "valid" else self.padding[i]
                out.append((n + 2 * p - d * (k - 1) - 1) // s + 1)
        return tuple(out)

    def build(self, in_channels: int, out_channels: int, groups: int) -> nn.Module:
        """A ``Conv{n}d`` / ``ConvTranspose{n}d`` (with bias) of this geometry."""
        dims = len(self.kernel_size)
        if self.transposed:
            return CONV_TRANSPOSE_BY_DIMS[dims](
                in_channels, out_channels, self.kernel_size, stride=self.stride, padding=self.padding,
                output_padding=self.output_padding, groups=groups, bias=True, dilation=self.dilation,
            )
        return CONV_BY_DIMS[dims](
            in_channels, out_channels, self.kernel_size, stride=self.stride, padding=self.padding,
            dilation=self.dilation, groups=groups, bias=True, padding_mode=self.padding_mode,
        )


@dataclass(frozen=True)
class AdapterGeometry:
    """Shape facts of the module an adapter is attached to.

    Attributes:
        spatial_dims: 1, 2 or 3.
        in_channels: channels of the module's input ``(B, in_channels, *spatial)``.
        out_channels: channels of its output.
        parallel: the down-projection geometry of a parallel adapter (same output size as the module).
        kernel_size: kernel of the (first) conv, used by sequential adapters.
        dilation: dilation of that conv.
        padding_mode: padding mode of that conv (``"zeros"`` for transposed convs and blocks).
        is_block: the module is a block, not a single conv.
        size_map: ``((input size, output size), ...)`` measured on a block (empty for convs).
        features_last: the module is an ``nn.Linear``: its tensors are ``(..., features)``, and the adapter runs as
            a 1-D conv with kernel 1 on them viewed as ``(N, features, 1)``.
    """

    spatial_dims: int
    in_channels: int
    out_channels: int
    parallel: ConvSpec
    kernel_size: tuple[int, ...]
    dilation: tuple[int, ...]
    padding_mode: str = "zeros"
    is_block: bool = False
    size_map: tuple[tuple[tuple[int, ...], tuple[int, ...]], ...] = ()
    features_last: bool = False

    @property
    def sequential(self) -> ConvSpec:
        """The down-projection geometry of a sequential adapter: the conv's kernel and dilation, stride 1, size kept."""
        n = self.spatial_dims
        return ConvSpec(self.kernel_size, (1,) * n, "same", self.dilation, padding_mode=self.padding_mode)


def _tuple(v: Any, n: int) -> tuple[int, ...]:
    return tuple(int(i) for i in v) if isinstance(v, (tuple, list)) else (int(v),) * n


def bottleneck_width(channels: int, gamma: int) -> int:
    """Hidden channels of the bottleneck: ``max(1, ceil(channels / gamma))`` (thesis 3.2.2: ``C / gamma``)."""
    return max(1, math.ceil(channels / gamma))


def down_projection_groups(channels: int, hidden: int, adapter_conv: str) -> int:
    """Groups of the down-projection ``channels -> hidden``.

    ``"depthwise"`` (the paper's): ``gcd(channels, hidden)``, i.e. ``hidden`` groups of ``gamma`` input channels
    each when ``gamma`` divides ``channels``, fewer (down to one dense group) for channel counts it does not divide;
    ``"dense"``: one group.
    """
    return math.gcd(channels, hidden) if adapter_conv == "depthwise" else 1


def _conv_geometry(conv: nn.Module) -> AdapterGeometry:
    n = len(conv.kernel_size)
    transposed = isinstance(conv, CONV_TRANSPOSE_TYPES)
    padding = conv.padding if isinstance(conv.padding, str) else _tuple(conv.padding, n)
    spec = ConvSpec(
        kernel_size=_tuple(conv.kernel_size, n), stride=_tuple(conv.stride, n), padding=padding,
        dilation=_tuple(conv.dilation, n), output_padding=_tuple(conv.output_padding, n) if transposed else (),
        padding_mode=conv.padding_mode, transposed=transposed,
    )
    return AdapterGeometry(n, conv.in_channels, conv.out_channels, spec, spec.kernel_size, spec.dilation,
                           padding_mode=conv.padding_mode)


def _run_on_meta(block: nn.Module, channels: int, size: int, dims: int) -> torch.Tensor:
    dtype = next((p.dtype for p in block.parameters() if p.is_floating_point()), torch.float32)
    x = torch.empty(2, channels, *([size] * dims), device="meta", dtype=dtype)
    with torch.no_grad():
        return block(x)


def _block_geometry(block: nn.Module) -> AdapterGeometry:
    first = next(m for m in block.modules() if isinstance(m, ANY_CONV_TYPES))
    n = len(first.kernel_size)
    probe = copy.deepcopy(block).to("meta")
    size = PROBE_SIZES[0]
    shape = f"(2, {first.in_channels}, {', '.join([str(size)] * n)})"
    try:
        y = _run_on_meta(probe, first.in_channels, size, n)
    except Exception as e:  # the block is user code: any failure means "not a one-tensor block"
        raise TypeError(
            f"ConvAdapter runs a block target as block(x) with x of shape (B, C, *spatial), C taken from its first "
            f"conv; {type(block).__name__} failed on a {shape} input: {e}"
        ) from e
    if not isinstance(y, torch.Tensor) or y.dim() != n + 2:
        raise TypeError(f"{type(block).__name__} does not return one (B, C, *spatial) tensor for a {shape} input.")
    out, out_channels = tuple(int(s) for s in y.shape[2:]), int(y.shape[1])
    down = all(o <= size and size % o == 0 for o in out)
    up = all(o >= size and o % size == 0 for o in out)
    if not (down or up):
        raise ValueError(
            f"{type(block).__name__} maps spatial size {size} to {out}: a parallel ConvAdapter needs a block that "
            "keeps, down-samples or up-samples the resolution by an integer factor; target its convs instead."
        )
    k, d = _tuple(first.kernel_size, n), _tuple(first.dilation, n)
    if down:
        stride = tuple(size // o for o in out)
        pad: Padding = "same" if all(s == 1 for s in stride) else tuple(dd * (kk - 1) // 2 for kk, dd in zip(k, d))
        spec = ConvSpec(k, stride, pad, d)
    else:  # up-sampling block: a transposed conv with kernel = stride = factor reproduces n -> factor * n
        factor = tuple(o // size for o in out)
        spec = ConvSpec(factor, factor, (0,) * n, (1,) * n, output_padding=(0,) * n, transposed=True)
    sizes = [((size,) * n, out)]
    for other in PROBE_SIZES[1:]:
        try:
            other_out = _run_on_meta(probe, first.in_channels, other, n)
        except Exception:  # blocks may only accept some sizes (e.g. even ones); check those they accept
            continue
        sizes.append(((other,) * n, tuple(int(s) for s in other_out.shape[2:])))
    return AdapterGeometry(n, first.in_channels, out_channels, spec, k, d, is_block=True, size_map=tuple(sizes))


def _linear_geometry(linear: nn.Linear) -> AdapterGeometry:
    """A linear layer is a 1x1 conv over its features: kernel 1, stride 1, no padding, one spatial dim."""
    spec = ConvSpec(kernel_size=(1,), stride=(1,), padding=(0,), dilation=(1,))
    return AdapterGeometry(1, linear.in_features, linear.out_features, spec, (1,), (1,), features_last=True)


def module_geometry(module: nn.Module) -> AdapterGeometry:
    """Geometry of a conv, transposed conv, linear layer or block that a ConvAdapter is attached to.

    Raises:
        TypeError: the module contains no (transposed) convolution, or it cannot run on one tensor.
        ValueError: a block that resamples by a non-integer factor.
    """
    if isinstance(module, ANY_CONV_TYPES):
        return _conv_geometry(module)
    if isinstance(module, nn.Linear):
        return _linear_geometry(module)
    if not any(isinstance(m, ANY_CONV_TYPES) for m in module.modules()):
        raise TypeError(
            f"{type(module).__name__} contains no Conv1d/2d/3d or ConvTranspose1d/2d/3d, so a ConvAdapter has no "
            "channels or kernel to follow; target a conv or a block containing convs."
        )
    return _block_geometry(module)


def _solve_padding(base: ConvSpec, kernel: tuple[int, ...]) -> ConvSpec:
    """``base`` with kernel ``kernel`` (dilation 1) and the padding that keeps its output size for every input."""
    n = len(kernel)
    if base.transposed:  # out = (n-1)s - 2p + (k-1) + op + 1, with 0 <= op < s
        pads, ops = [], []
        for i in range(n):
            target = base.dilation[i] * (base.kernel_size[i] - 1) - 2 * base.padding[i] + base.output_padding[i]
            options = [(kernel[i] - 1 + op - target, op) for op in range(base.stride[i])]
            options = [(twice_pad // 2, op) for twice_pad, op in options if twice_pad >= 0 and twice_pad % 2 == 0]
            if not options:
                raise ValueError(f"no padding gives a {kernel} transposed conv the adapted conv's output size")
            pads.append(options[0][0])
            ops.append(options[0][1])
        return ConvSpec(kernel, base.stride, tuple(pads), (1,) * n, tuple(ops), transposed=True)
    if base.padding == "same":
        return ConvSpec(kernel, base.stride, "same", (1,) * n, padding_mode=base.padding_mode)
    base_pad = (0,) * n if base.padding == "valid" else base.padding
    pads = []
    for i in range(n):
        total = 2 * base_pad[i] - base.dilation[i] * (base.kernel_size[i] - 1) + kernel[i] - 1
        if total < 0 or total % 2:
            if base.stride[i] == 1 and total == kernel[i] - 1:
                return ConvSpec(kernel, base.stride, "same", (1,) * n, padding_mode=base.padding_mode)
            raise ValueError(f"no symmetric padding gives a {kernel} conv the adapted conv's output size")
        pads.append(total // 2)
    return ConvSpec(kernel, base.stride, tuple(pads), (1,) * n, padding_mode=base.padding_mode)


def _block_spec_with_kernel(g: AdapterGeometry, kernel: tuple[int, ...]) -> ConvSpec:
    p = g.parallel
    if p.transposed:
        return _solve_padding(p, kernel)
    if all(s == 1 for s in p.stride):
        return replace(p, kernel_size=kernel, padding="same", dilation=(1,) * len(kernel))
    return replace(p, kernel_size=kernel, padding=tuple((k - 1) // 2 for k in kernel), dilation=(1,) * len(kernel))


def build_down_projection(
    geometry: AdapterGeometry,
    insertion: str,
    hidden: int,
    adapter_conv: str,
    kernel_size: int | None = None,
) -> nn.Module:
    """The down-projection ``C -> hidden`` of a ConvAdapter on a module of ``geometry``.

    Args:
        geometry: from :func:`module_geometry`.
        insertion: ``"parallel"`` (reads the module's input, copies its geometry) or ``"sequential"`` (reads its
            output, stride 1, size kept).
        hidden: bottleneck width, see :func:`bottleneck_width`.
        adapter_conv: ``"depthwise"`` or ``"dense"``, see :func:`down_projection_groups`.
        kernel_size: ``None`` copies the module's kernel; an int uses that kernel (dilation 1) with the padding that
            keeps the output size.

    Raises:
        ValueError: ``kernel_size`` cannot give the module's output size (no padding does), a block's measured
            sizes disagree with the down-projection's, or a kernel other than 1 for a linear layer.
    """
    n = geometry.spatial_dims
    channels = geometry.in_channels if insertion == "parallel" else geometry.out_channels
    if geometry.features_last and kernel_size not in (None, 1):
        raise ValueError(f"ConvAdapterConfig.kernel_size={kernel_size}: a linear layer has no spatial extent; a "
                         "ConvAdapter on it uses kernel 1, leave kernel_size=None.")
    if insertion == "sequential":
        spec = geometry.sequential
        if kernel_size is not None:
            spec = replace(spec, kernel_size=(int(kernel_size),) * n, dilation=(1,) * n)
    elif kernel_size is None:
        spec = geometry.parallel
    else:
        kernel = (int(kernel_size),) * n
        try:
            if geometry.is_block:
                spec = _block_spec_with_kernel(geometry, kernel)
            else:
                spec = _solve_padding(geometry.parallel, kernel)
        except ValueError as e:
            raise ValueError(f"ConvAdapterConfig.kernel_size={kernel_size}: {e}; leave kernel_size=None.") from e
    if insertion == "parallel" and geometry.is_block:
        for size_in, size_out in geometry.size_map:
            if spec.output_size(size_in) != size_out:
                raise ValueError(
                    f"the block maps spatial size {size_in} to {size_out}, but a ConvAdapter down-projection "
                    f"(kernel {spec.kernel_size}, stride {spec.stride}, padding {spec.padding}) gives "
                    f"{spec.output_size(size_in)}; target the block's convs instead."
                )
    return spec.build(channels, hidden, down_projection_groups(channels, hidden, adapter_conv))
