"""PCA initialisation of LoRA's ``A`` from the pretrained filters (thesis 001, 5.1.1, Table 5.2).

The rows of ``A`` are the top principal components of the pretrained filters, scaled to the row norm of peft's
default Kaiming-uniform init (so training starts at the same scale); ``B`` stays zero, so the adapted network is
the pretrained one at init.

Shapes. For a conv ``W: (C_out, C_in / g, *k)`` with ``g`` groups, peft 0.21 builds ``A: (r, C_in, *k)`` as a dense
conv over all input channels and ``B: (C_out, r / g, 1, ...)`` with ``g`` groups: output group ``j`` reads the rank
slots ``j * r/g ... (j+1) * r/g - 1`` of ``A``. "Principal components of the pretrained filters" is therefore taken
per group: the ``C_out / g`` filters of group ``j`` (rows of ``W_j`` reshaped to ``(C_out/g, C_in/g * prod(k))``,
centred over the filters) give the top ``r / g`` components, which fill group ``j``'s rows of ``A`` on group ``j``'s
input channels (zero on the others; training is free to use them). A group with a single filter (a depth-wise conv)
has no spread to centre: its one component is the filter itself. Where a group has fewer components than rows (the
centred filters span at most ``C_out/g - 1`` directions), the remaining rows are Kaiming-uniform on the group's
input channels. ``g = 1`` is the plain case: ``W`` as ``(C_out, C_in * prod(k))``. Linear layers are ``k = ()``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["init_lora_pca_", "principal_filter_directions"]

# Kaiming-uniform(a=sqrt(5)) rows (peft's default A) have expected squared norm 1/3 whatever their length.
_KAIMING_ROW_NORM = 1.0 / math.sqrt(3.0)


def _top_right_singular_vectors(m: torch.Tensor, k: int) -> torch.Tensor:
    """Top-``k`` right singular vectors of ``m`` with a non-negligible singular value (rows of the result, at most
    ``k``), via the eigen-decomposition of the small ``(rows x rows)`` Gram matrix when ``m`` is wide (a 3D conv's
    ``C_in * 27`` columns), else a thin SVD. Directions below ``1e-6`` of the largest singular value are null
    directions (centring removes one) that the Gram matrix's squared spectrum cannot resolve in float64."""
    m = m.double()
    rows, cols = m.shape
    if rows >= cols:
        _, sing, vh = torch.linalg.svd(m, full_matrices=False)
        vh, sing = vh[:k], sing[:k]
    else:
        evals, evecs = torch.linalg.eigh(m @ m.T)  # ascending
        order = torch.argsort(evals, descending=True)[: min(k, rows)]
        sing = evals[order].clamp_min(0).sqrt()
        vh = (m.T @ evecs[:, order]).T
    keep = sing > sing.max().clamp_min(1e-30) * 1e-6
    vh = vh[keep]
    return vh / vh.norm(dim=1, keepdim=True)


def principal_filter_directions(filters: torch.Tensor, k: int) -> torch.Tensor:
    """Up to ``k`` unit-norm principal directions of ``filters`` ``(n, d)`` (one filter per row), as rows.

    Centred over the filters when there are at least two; a single filter's direction is the filter itself.
    Fewer than ``k`` rows come back when the filters span fewer directions.
    """
    if filters.shape[0] > 1:
        filters = filters - filters.mean(dim=0, keepdim=True)
    return _top_right_singular_vectors(filters, k)


def _kaiming_rows(n: int, d: int) -> torch.Tensor:
    """``n`` unit-norm rows drawn like peft's default ``A`` (Kaiming-uniform, ``a = sqrt(5)``)."""
    rows = torch.empty(n, d, dtype=torch.float64)
    nn.init.kaiming_uniform_(rows, a=math.sqrt(5))
    return rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-12)


def _pca_rows(weight: torch.Tensor, rank: int, in_channels: int, groups: int) -> torch.Tensor:
    """``A`` as ``(rank, in_channels, prod(k))`` in float64 from the base ``weight`` ``(C_out, C_in/g, *k)``."""
    c_out, per_group_in = weight.shape[:2]
    taps = int(math.prod(weight.shape[2:]))
    rows_per_group, filters_per_group = rank // groups, c_out // groups
    a = torch.zeros(rank, in_channels, taps, dtype=torch.float64)
    for j in range(groups):
        filters = weight[j * filters_per_group:(j + 1) * filters_per_group].reshape(filters_per_group, -1)
        comps = principal_filter_directions(filters.double(), rows_per_group)
        if comps.shape[0] < rows_per_group:
            comps = torch.cat([comps, _kaiming_rows(rows_per_group - comps.shape[0], comps.shape[1])])
        rows = slice(j * rows_per_group, (j + 1) * rows_per_group)
        a[rows, j * per_group_in:(j + 1) * per_group_in] = comps.reshape(rows_per_group, per_group_in, taps)
    return a * _KAIMING_ROW_NORM


def _materialise(module: nn.Module, name: str, like: torch.Tensor, fill: torch.Tensor | None) -> None:
    """Replace a meta-device parameter ``module.<name>`` by a real one on ``like``'s device (zeros or ``fill``)."""
    old = getattr(module, name)
    data = torch.zeros(old.shape, dtype=old.dtype, device=like.device) if fill is None else fill
    setattr(module, name, nn.Parameter(data.to(device=like.device, dtype=old.dtype), requires_grad=old.requires_grad))


@torch.no_grad()
def init_lora_pca_(peft_model: nn.Module, adapter_name: str = "default") -> int:
    """Initialise every LoRA ``A`` of ``adapter_name`` from the principal components of its pretrained weight.

    In place; see the module docstring for the per-group definition. Adapter weights created on the meta device
    (``low_cpu_mem_usage=True``) are materialised on the base weight's device: ``A`` from PCA, ``B`` (and a LoRA
    bias) as zeros, i.e. exactly what the same call gives without ``low_cpu_mem_usage``.

    Args:
        peft_model: a model with peft LoRA layers (``PeftModel`` or the tuned network).
        adapter_name: the adapter whose ``A`` matrices are set. Default ``"default"``.

    Returns:
        the number of layers initialised.

    Raises:
        ValueError: the model has no LoRA layer for ``adapter_name``, or a base weight is on the meta device (the
            pretrained weights must be loaded first: PCA needs them). The message names the module.
    """
    from peft.tuners.lora import LoraLayer

    count = 0
    for name, module in peft_model.named_modules():
        if not isinstance(module, LoraLayer) or adapter_name not in module.lora_A:
            continue
        base = module.get_base_layer()
        if base.weight.is_meta:
            raise ValueError(
                f"init_lora_pca_: the pretrained weight of '{name}' is on the meta device; load the base weights "
                "before the PCA initialisation, which is computed from them."
            )
        lora_a, lora_b = module.lora_A[adapter_name], module.lora_B[adapter_name]
        rank = lora_a.weight.shape[0]
        groups = getattr(base, "groups", 1)
        a = _pca_rows(base.weight.detach(), rank, lora_a.weight.shape[1], groups).reshape(lora_a.weight.shape)
        if lora_a.weight.is_meta:
            _materialise(lora_a, "weight", base.weight, a)
        else:
            lora_a.weight.copy_(a.to(lora_a.weight.dtype))
        for param in ("weight", "bias"):
            if getattr(lora_b, param, None) is not None and getattr(lora_b, param).is_meta:
                _materialise(lora_b, param, base.weight, None)
        count += 1
    if count == 0:
        raise ValueError(f"init_lora_pca_: no LoRA layer with adapter '{adapter_name}' in the model.")
    return count
