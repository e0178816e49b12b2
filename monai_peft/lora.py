"""What the thesis adds on top of peft's own LoRA for CNNs (001, 3.2.1 and 5.1.1, Tables 5.1-5.2).

- ``r="dynamic"``: each conv gets rank ``out_channels // 2`` (the thesis's answer to the channel counts changing
  along a U-Net), expressed as peft's ``rank_pattern``/``alpha_pattern``.
- PCA initialisation: the rows of ``A`` are the top principal components of the pretrained filters (the conv
  weight reshaped to ``(C_out, C_in * prod(k))``, centred over output filters), scaled to the row norm of peft's
  default Kaiming-uniform init, so training starts at the same scale; ``B`` stays zero (identity at init).
- 1x1(x1) convolutions are kept out of the default targets: peft 0.21 cannot merge LoRA into them.
"""

from __future__ import annotations

import math
import re
from typing import Any, Union

import torch
from peft import LoraConfig
from torch import nn

from monai_peft.targeting import SelectorLike, exact_names_regex, resolve_targets

__all__ = ["lora_config", "init_lora_pca_", "dynamic_rank"]


def dynamic_rank(module: nn.Module) -> int:
    """Thesis 5.1.1: rank = out_channels / 2 (at least 1)."""
    out = getattr(module, "out_channels", None) or getattr(module, "out_features", None)
    if out is None:
        raise TypeError(f"dynamic LoRA rank needs a conv or linear layer, got {type(module).__name__}.")
    return max(1, int(out) // 2)


def lora_config(
    model: nn.Module,
    target: SelectorLike,
    r: Union[int, str] = 16,
    lora_alpha: Union[int, None] = None,
    modules_to_save: Union[list[str], None] = None,
    **lora_kwargs: Any,
) -> LoraConfig:
    """A peft ``LoraConfig`` for the convs selected by ``target``.

    Args:
        model: the network the config is for (needed to resolve targets and dynamic ranks).
        target: selector, region name, regex or list of module names (see :func:`monai_peft.resolve_targets`).
        r: an integer rank, or ``"dynamic"`` for ``out_channels // 2`` per layer (thesis Table 5.1).
        lora_alpha: LoRA scaling numerator; ``None`` (default) uses ``r`` per layer, i.e. scaling 1.
        modules_to_save: modules trained fully and saved with the adapter.
        lora_kwargs: any other ``LoraConfig`` field (``lora_dropout``, ``init_lora_weights``, ...).
    """
    names = resolve_targets(model, target)
    modules = dict(model.named_modules())
    if r == "dynamic":
        ranks = {re.escape(n): dynamic_rank(modules[n]) for n in names}
        base_r = max(ranks.values())
        return LoraConfig(
            target_modules=exact_names_regex(names), r=base_r, lora_alpha=base_r if lora_alpha is None else lora_alpha,
            rank_pattern=ranks, alpha_pattern=dict(ranks) if lora_alpha is None else {},
            modules_to_save=modules_to_save, **lora_kwargs,
        )
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise ValueError(f"LoRA rank r must be a positive int or 'dynamic', got {r!r}.")
    return LoraConfig(target_modules=exact_names_regex(names), r=r, lora_alpha=r if lora_alpha is None else lora_alpha,
                      modules_to_save=modules_to_save, **lora_kwargs)


def _top_right_singular_vectors(m: torch.Tensor, k: int) -> torch.Tensor:
    """Top-``k`` right singular vectors of ``m`` (rows of the result), via the eigen-decomposition of the small
    ``(rows x rows)`` Gram matrix when ``m`` is wide (a 3D conv's ``C_in * 27`` columns), else a thin SVD."""
    rows, cols = m.shape
    if rows >= cols:
        return torch.linalg.svd(m, full_matrices=False)[2][:k]
    evals, evecs = torch.linalg.eigh(m.double() @ m.double().T)  # ascending
    order = torch.argsort(evals, descending=True)[: min(k, rows)]
    sing = evals[order].clamp_min(0).sqrt()
    keep = sing > sing.max().clamp_min(1e-30) * 1e-10  # drop null directions (centring removes one)
    v = (m.double().T @ evecs[:, order[keep]]) / sing[keep]
    return v.T.to(m.dtype)


@torch.no_grad()
def init_lora_pca_(peft_model: nn.Module, adapter_name: str = "default") -> int:
    """Initialise every LoRA ``A`` of ``adapter_name`` from PCA components of its pretrained weight (in place).

    Returns:
        the number of layers initialised.

    Raises:
        ValueError: the model has no LoRA layer for ``adapter_name``.
    """
    from peft.tuners.lora import LoraLayer

    count = 0
    for name, module in peft_model.named_modules():
        if not isinstance(module, LoraLayer) or adapter_name not in module.lora_A:
            continue
        lora_a = module.lora_A[adapter_name]
        weight = module.get_base_layer().weight.detach().float()
        flat = weight.reshape(weight.shape[0], -1)  # (C_out, C_in * prod(k)): filters are the samples
        centred = flat - flat.mean(dim=0, keepdim=True)
        rank = lora_a.weight.shape[0]
        vh = _top_right_singular_vectors(centred, rank)
        a = torch.empty(rank, flat.shape[1])
        n = min(rank, vh.shape[0])
        a[:n] = vh[:n]
        if rank > n:  # more rank than the weight has components: Kaiming-uniform rows for the rest
            extra = torch.empty(rank - n, flat.shape[1])
            nn.init.kaiming_uniform_(extra, a=math.sqrt(5))
            a[n:] = extra / extra.norm(dim=1, keepdim=True).clamp_min(1e-12)
        # Kaiming-uniform(a=sqrt(5)) rows have expected squared norm 1/3: keep the default init's scale.
        a = a / math.sqrt(3.0)
        lora_a.weight.copy_(a.reshape(lora_a.weight.shape).to(lora_a.weight.dtype))
        count += 1
    if count == 0:
        raise ValueError(f"init_lora_pca_: no LoRA layer with adapter '{adapter_name}' in the model.")
    return count
