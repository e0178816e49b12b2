"""Conv LoRA as one conv with the merged kernel forward, and a factored backward (issue 12, lever 1).

Forward: ``y = conv(x, W + sum_a s_a B_a @ A_a) + b``, one convolution as in :mod:`monai_peft.lora.fused`. Backward,
for a frozen ``W`` and upstream gradient ``g = dL/dy`` (``(B, C_out, *spatial_out)``):

- ``dL/dx``: the input gradient of the merged conv (what the frozen base layer needs anyway);
- ``dL/dA_a = s_a * weight_grad(x, B_a^T g)``: the weight gradient of an ``r``-output-channel conv, fed by the
  ``r``-channel projection ``B_a^T g`` of the gradient (a pointwise channel product);
- ``dL/dB_a = s_a * sum_{batch, space} g z_a^T`` with ``z_a = A_a(x)`` (an ``r``-output-channel conv, recomputed in
  backward instead of stored).

By FLOPs a step costs ``(2 + 2 r / C_out) / 3`` of full fine-tuning instead of the merged path's ``1`` (which
computes the ``(C_out, C_in, *k)`` weight gradient of the merged kernel and projects it on ``A`` and ``B``). Whether
that is faster depends on the convolution kernels of the device: on CPUs, oneDNN runs an ``r``-output-channel conv at
about the cost of a conv with all ``C_out`` channels when ``C_in`` is small (16-32 channels) and far below it when
``C_in`` is large, which :func:`factored_is_faster` encodes (``benchmarks/bench_methods.py`` measures both paths).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from monai_peft.tuners.pointwise import channel_gram, channel_matmul

__all__ = ["factored_conv_lora", "factored_is_faster", "conv_padding_for_factored"]


def _convolution_backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, geometry: tuple,
                          mask: list[bool]) -> tuple:
    stride, padding, dilation = geometry
    return torch.ops.aten.convolution_backward(
        grad, x, weight, None, list(stride), list(padding), list(dilation), False, [0] * len(stride), 1, mask)


class _FactoredConvLora(torch.autograd.Function):
    """``conv(x, W + sum_a s_a B_a A_a, bias)`` with the factored backward of the module docstring; ``W`` frozen."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, geometry: tuple,
                scalings: tuple[float, ...], *factors: torch.Tensor) -> torch.Tensor:
        merged = weight
        for i, scaling in enumerate(scalings):
            lora_a, lora_b = factors[2 * i], factors[2 * i + 1]
            delta = (lora_b.flatten(1) @ lora_a.flatten(1)).reshape(weight.shape) * scaling
            merged = merged + delta.to(weight.dtype)
        stride, padding, dilation = geometry
        ctx.save_for_backward(x, merged, *factors)
        ctx.geometry, ctx.scalings = geometry, scalings
        return torch.convolution(x, merged, bias, stride, padding, dilation, False, [0] * len(stride), 1)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        x, merged, *factors = ctx.saved_tensors
        grad = grad.contiguous(memory_format=_layout(x))
        needs = ctx.needs_input_grad
        grad_x = _convolution_backward(grad, x, merged, ctx.geometry, [True, False, False])[0] if needs[0] else None
        grad_bias = grad.sum(dim=[d for d in range(grad.dim()) if d != 1]) if needs[2] else None
        factor_grads: list[torch.Tensor | None] = []
        for i, scaling in enumerate(ctx.scalings):
            lora_a, lora_b = factors[2 * i], factors[2 * i + 1]
            a_cast, b_mat = lora_a.to(grad.dtype), lora_b.flatten(1).to(grad.dtype)  # (r, C_in, *k), (C_out, r)
            grad_a = grad_b = None
            if needs[5 + 2 * i]:
                projected = channel_matmul(b_mat.t(), grad)  # (B, r, *spatial_out)
                grad_a = _convolution_backward(projected, x, a_cast, ctx.geometry, [False, True, False])[1]
                grad_a = (grad_a * scaling).to(lora_a.dtype)
            if needs[6 + 2 * i]:
                stride, padding, dilation = ctx.geometry
                z = torch.convolution(x, a_cast, None, stride, padding, dilation, False, [0] * len(stride), 1)
                grad_b = (channel_gram(grad, z.contiguous(memory_format=_layout(grad))) * scaling)
                grad_b = grad_b.reshape(lora_b.shape).to(lora_b.dtype)
            factor_grads += [grad_a, grad_b]
        return (grad_x, None, grad_bias, None, None, *factor_grads)


def _layout(x: torch.Tensor) -> torch.memory_format:
    if x.dim() in (4, 5) and not x.is_contiguous():
        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        if x.is_contiguous(memory_format=fmt):
            return fmt
    return torch.contiguous_format


def conv_padding_for_factored(conv: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """``(x', padding)`` such that ``conv(x', padding=padding)`` with zero padding equals ``conv``'s own padding:
    other padding modes and asymmetric ``"same"`` padding are applied to ``x`` with ``F.pad`` (as PyTorch's
    ``_conv_forward`` does), ``"valid"`` is 0, symmetric ``"same"`` becomes the explicit per-dim padding."""
    n = len(conv.kernel_size)
    if conv.padding_mode != "zeros":
        return F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode), (0,) * n
    if conv.padding == "valid":
        return x, (0,) * n
    if conv.padding == "same":
        pads = conv._reversed_padding_repeated_twice  # (left, right) per dim, last dim first
        if all(pads[2 * i] == pads[2 * i + 1] for i in range(n)):
            return x, tuple(pads[2 * (n - 1 - d)] for d in range(n))
        return F.pad(x, pads), (0,) * n
    return x, tuple(conv.padding)


def factored_is_faster(device: torch.device, in_channels: int, out_channels: int, rank: int) -> bool:
    """Whether the factored backward beats the merged one for a conv ``C_in -> C_out`` with total LoRA rank ``r``.

    - CUDA: the FLOP count decides: the factored backward computes ``2 r / C_out`` of a conv's work for ``A`` and
      ``B`` against the merged path's full weight gradient, so it wins while ``2 r < C_out``;
    - CPU (oneDNN): a thin ``r``-output-channel conv costs nearly as much as a full one when ``C_in <= 32``, so the
      factored path is used only for ``C_in >= 64`` and ``2 r < C_out`` (measured with
      ``benchmarks/bench_methods.py --lora-layers``).
    """
    if 2 * rank >= out_channels:
        return False
    return device.type != "cpu" or in_channels >= 64


def factored_conv_lora(
    x: torch.Tensor,
    base: nn.Module,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    factors: list[tuple[torch.Tensor, torch.Tensor, float]],
) -> torch.Tensor:
    """``conv(x, weight + sum s B @ A, bias)`` with the factored backward; ``base`` gives the conv's geometry.

    Args:
        x: ``(B, C_in, *spatial)``.
        base: the ungrouped ``Conv{1,2,3}d`` (stride, padding, dilation, padding mode).
        weight: its frozen kernel ``(C_out, C_in, *k)``.
        bias: ``(C_out,)`` or ``None`` (may require a gradient, e.g. ``lora_bias``).
        factors: ``(A.weight (r, C_in, *k), B.weight (C_out, r, 1, ...), scaling)`` per active adapter.

    Returns:
        ``(B, C_out, *spatial_out)``.
    """
    if type(x) is not torch.Tensor:
        # a tensor subclass (MONAI's MetaTensor) would hand the Function's output back as a view of it, which an
        # in-place op after the conv (SegResNet's ``x += identity``) may not modify: run on the plain tensor
        x = x.as_subclass(torch.Tensor)
    x, padding = conv_padding_for_factored(base, x)
    geometry = (tuple(base.stride), padding, tuple(base.dilation))
    flat = [t for a, b, _ in factors for t in (a, b)]
    return _FactoredConvLora.apply(x, weight, bias, geometry, tuple(float(s) for _, _, s in factors), *flat)
