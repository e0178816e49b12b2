"""Pointwise (``1x1(x1)``) channel maps as matrix products, for tensors in either memory layout.

A ``1x1x1`` 3D convolution is a matrix product over the channel dimension, but PyTorch's CPU backend runs it through
its generic ``slow_conv3d`` kernel, with copies of the activations on the way in and out, and a channels-last
tensor is first converted. These helpers run the product as one ``matmul`` on the tensor as it is laid out
(``(B, C, *spatial)`` contiguous, or channels-last ``(B, *spatial, C)`` in memory); the result keeps the layout.
"""

from __future__ import annotations

import torch

__all__ = ["channel_matmul", "channel_gram"]


def _channels_last_view(x: torch.Tensor) -> torch.Tensor | None:
    """``x`` as ``(B, *spatial, C)`` when that view is contiguous (a channels-last tensor), else ``None``."""
    view = x.movedim(1, -1)
    return view if view.is_contiguous() else None


def channel_matmul(weight: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``y[b, o, ...] = sum_i weight[o, i] * x[b, i, ...] (+ bias[o])``: a pointwise conv without the conv kernel.

    Args:
        weight: ``(C_out, C_in)``.
        x: ``(B, C_in, *spatial)``, contiguous or channels-last (other layouts are made contiguous first).
        bias: optional ``(C_out,)``.

    Returns:
        ``(B, C_out, *spatial)`` in the memory layout of ``x``.
    """
    last = _channels_last_view(x) if not x.is_contiguous() else None
    if last is not None:
        y = torch.matmul(last, weight.t())
        if bias is not None:
            y = y + bias
        return y.movedim(-1, 1)
    x = x.contiguous()
    y = torch.matmul(weight, x.flatten(2))
    if bias is not None:
        y = y + bias[:, None]
    return y.view(x.shape[0], weight.shape[0], *x.shape[2:])


def channel_gram(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``g[i, j] = sum_{batch, space} a[:, i] * b[:, j]``: the weight gradient of a pointwise conv.

    Args:
        a: ``(B, C_a, *spatial)``; b: ``(B, C_b, *spatial)``, both contiguous or both channels-last.

    Returns:
        ``(C_a, C_b)``.
    """
    la, lb = (_channels_last_view(a), _channels_last_view(b)) if not a.is_contiguous() else (None, None)
    if la is not None and lb is not None:
        return la.reshape(-1, la.shape[-1]).t() @ lb.reshape(-1, lb.shape[-1])
    a, b = a.contiguous(), b.contiguous()
    return torch.matmul(a.flatten(2), b.flatten(2).transpose(1, 2)).sum(0)
