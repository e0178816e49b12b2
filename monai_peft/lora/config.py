"""A peft ``LoraConfig`` for the convs of a CNN, with the thesis's dynamic rank (001, 3.2.1 and 5.1.1, Table 5.1).

- ``r="dynamic"``: each conv gets rank ``out_channels // 2`` (the thesis's answer to the channel counts changing
  along a U-Net), expressed as peft's ``rank_pattern``/``alpha_pattern``.
- ``fused`` (default where possible): the targeted convs train as one conv with the weight ``W + scaling * B @ A``
  (:mod:`monai_peft.lora.fused`); the config and the saved adapter stay plain peft LoRA.
"""

from __future__ import annotations

import re
from typing import Any, Union

from peft import LoraConfig
from torch import nn

from monai_peft.lora.fused import fused_mode, use_fused_conv_lora
from monai_peft.targeting import SelectorLike, exact_names_regex, resolve_targets

__all__ = ["lora_config", "dynamic_rank"]


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
    fused: Union[bool, str, None] = None,
    **lora_kwargs: Any,
) -> LoraConfig:
    """A peft ``LoraConfig`` for the convs selected by ``target``.

    Args:
        model: the network the config is for (needed to resolve targets and dynamic ranks).
        target: selector, region name, regex or list of module names (see :func:`monai_peft.resolve_targets`).
        r: an integer rank, or ``"dynamic"`` for ``out_channels // 2`` per layer (thesis Table 5.1). Default 16.
        lora_alpha: LoRA scaling numerator; ``None`` (default) uses ``r`` per layer, i.e. scaling 1.
        modules_to_save: modules trained fully and saved with the adapter.
        fused: ``True`` (= ``"auto"``) trains each targeted conv as one conv with the merged weight, with the faster
            backward per layer and device; ``"merged"`` / ``"factored"`` force one backward (see
            :func:`monai_peft.lora.use_fused_conv_lora`; needs ``lora_dropout=0`` and no DoRA); ``False``: peft's two
            extra convs per layer. Default ``None``: ``"auto"`` where the config allows it (no dropout, no DoRA),
            else ``False``. Outputs, gradients and the saved adapter (a plain peft LoRA file) are the same.
        lora_kwargs: any other ``LoraConfig`` field (``lora_dropout``, ``init_lora_weights``, ...).

    Raises:
        ValueError: a rank that is not a positive int or ``"dynamic"``; an unknown ``fused`` value; ``fused`` with
            dropout or DoRA.
    """
    names = resolve_targets(model, target)
    modules = dict(model.named_modules())
    if r == "dynamic":
        ranks = {re.escape(n): dynamic_rank(modules[n]) for n in names}
        base_r = max(ranks.values())
        config = LoraConfig(
            target_modules=exact_names_regex(names), r=base_r, lora_alpha=base_r if lora_alpha is None else lora_alpha,
            rank_pattern=ranks, alpha_pattern=dict(ranks) if lora_alpha is None else {},
            modules_to_save=modules_to_save, **lora_kwargs,
        )
    elif not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise ValueError(f"LoRA rank r must be a positive int or 'dynamic', got {r!r}.")
    else:
        config = LoraConfig(
            target_modules=exact_names_regex(names), r=r, lora_alpha=r if lora_alpha is None else lora_alpha,
            modules_to_save=modules_to_save, **lora_kwargs,
        )
    if fused is None:  # the fast path where it applies (issue 12); same numbers as peft's
        fused = not (lora_kwargs.get("lora_dropout") or lora_kwargs.get("use_dora"))
    mode = fused_mode(fused)
    return config if mode is None else use_fused_conv_lora(config, mode)
