"""VPT layers: learnable prompt tokens in a transformer block's token sequence, or in its attention's key/value
sequence (Jia et al. 2022, "Visual Prompt Tuning"; lecture 003).

Per block and adapter a *role* says what the block does with that adapter's prompts:

- ``"deep"``: insert new prompts before the block, drop them after it (VPT-deep);
- ``"open"`` / ``"close"``: the first / last block of a VPT-shallow window: insert the prompts before the first, drop
  what became of them after the last; the blocks in between are not wrapped and carry them like any token;
- ``"open_close"``: a window of one block (insert, run, drop).

Token layout inside a prompted stretch, for ``P`` class tokens: ``[class tokens, deep prompts of this block, shallow
prompts, image tokens]``; adapters are taken in sorted name order, so several active adapters give the same result
whatever order they were activated in.
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
from monai_peft.tuners.transformer_blocks import BlockFamily

from .config import VPTConfig

ROLES = ("deep", "open", "close", "open_close")
_INSERTS = ("deep", "open", "open_close")
KINDS = ("sequence", "key_value")


class VPTLayer(NonWeightBaseLayerMixin, BaseTunerLayer):
    """Per adapter name: ``vpt_prompts`` ``(num_tokens, D)`` (blocks that insert prompts), the block's role, the
    number of prompt tokens and the prompt dropout.

    Args:
        base_layer: the wrapped block (``kind="sequence"``) or attention module (``kind="key_value"``).
        kind: ``"sequence"`` or ``"key_value"``.
        width: token width ``D``.
        family: the block family (attention-mask argument).
        num_prefix_tokens: class tokens kept before the prompts (``"sequence"`` only).
    """

    adapter_layer_names = ("vpt_prompts",)
    other_param_names = ("vpt_role", "vpt_num_tokens", "vpt_dropout")

    def __init__(self, base_layer: nn.Module, kind: str, width: int, family: BlockFamily,
                 num_prefix_tokens: int = 0, **kwargs: Any) -> None:
        if kind not in KINDS:
            raise ValueError(f"VPT layer kind must be one of {KINDS}, got {kind!r}.")
        self.base_layer = base_layer
        self.vpt_prompts = nn.ParameterDict({})
        self.vpt_role: dict[str, str] = {}
        self.vpt_num_tokens: dict[str, int] = {}
        self.vpt_dropout: dict[str, float] = {}
        self._disable_adapters = False
        self.merged_adapters = []
        self.kind = kind
        self.width = self.in_features = self.out_features = int(width)
        self.family = family
        self.num_prefix_tokens = int(num_prefix_tokens)

    def update_layer(self, adapter_name: str, config: VPTConfig, role: str, inference_mode: bool = False) -> None:
        if role not in ROLES:
            raise ValueError(f"VPT role must be one of {ROLES}, got {role!r}.")
        if self.vpt_role and int(config.num_prefix_tokens or 0) != self.num_prefix_tokens:
            raise ValueError(f"VPT adapter '{adapter_name}': num_prefix_tokens={config.num_prefix_tokens} differs from "
                             f"the {self.num_prefix_tokens} of the adapters already on this block.")
        self.vpt_role[adapter_name] = role
        self.vpt_num_tokens[adapter_name] = int(config.num_tokens)
        self.vpt_dropout[adapter_name] = float(config.prompt_dropout)
        if role in _INSERTS:
            self.vpt_prompts[adapter_name] = nn.Parameter(torch.empty(int(config.num_tokens), self.width))
            self.reset_vpt_prompts(adapter_name, config.init_weights)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    @torch.no_grad()
    def reset_vpt_prompts(self, adapter_name: str, init_weights: bool | str = True) -> None:
        p = self.vpt_prompts[adapter_name]
        if p.device.type == "meta":
            return
        if init_weights == "zeros":
            p.zero_()
        elif init_weights is True:  # Jia et al.: Xavier uniform; fan_in = fan_out = D here
            bound = math.sqrt(3.0 / self.width)
            p.uniform_(-bound, bound)
        else:
            p.normal_()

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        raise ValueError("visual prompts are extra tokens, not a weight update, and cannot be merged into the base "
                         "weights; keep them at inference, or use `unload()` for the base model.")

    def unmerge(self) -> None:
        warnings.warn("VPT adapters are never merged; nothing to unmerge.")

    def _active(self) -> list[str]:
        return [] if self.disable_adapters else sorted(a for a in self.active_adapters if a in self.vpt_role)

    def _prompt_tokens(self, names: list[str], like: torch.Tensor) -> torch.Tensor:
        """Prompts of ``names`` side by side, ``(B, sum P, D)`` in the dtype and on the device of ``like``."""
        parts = []
        for a in names:
            p = F.dropout(self.vpt_prompts[a], self.vpt_dropout[a], self.training)
            parts.append(p.to(device=like.device, dtype=like.dtype))
        return torch.cat(parts, dim=0).unsqueeze(0).expand(like.shape[0], -1, -1)


def _insert(x: torch.Tensor, tokens: torch.Tensor, at: int) -> torch.Tensor:
    return torch.cat([x[:, :at], tokens, x[:, at:]], dim=1)


def _drop(out: Any, at: int, n: int) -> Any:
    h = out[0] if isinstance(out, tuple) else out
    h = torch.cat([h[:, :at], h[:, at + n:]], dim=1)
    return (h, *out[1:]) if isinstance(out, tuple) else h


def _pad_mask(mask: torch.Tensor, length: int, at: int, n: int, keep: float) -> torch.Tensor:
    """Let ``n`` new tokens at position ``at`` through an attention mask over ``length`` tokens.

    Accepted: ``(B, N)`` key masks (MONAI) and ``(B|1, H|1, N|1, N)`` query-key masks (``transformers``).
    """
    fill = True if mask.dtype == torch.bool else keep

    def widen(m: torch.Tensor, dim: int) -> torch.Tensor:
        shape = list(m.shape)
        shape[dim] = n
        pad = torch.full(shape, fill, dtype=m.dtype, device=m.device)
        return torch.cat([m.narrow(dim, 0, at), pad, m.narrow(dim, at, m.shape[dim] - at)], dim=dim)

    if mask.dim() not in (2, 4) or mask.shape[-1] != length:
        raise ValueError(f"VPT: cannot extend an attention mask of shape {tuple(mask.shape)} for {length} tokens; "
                         "expected (B, N) or (B, H, N, N).")
    mask = widen(mask, -1)
    if mask.dim() == 4 and mask.shape[-2] == length:
        mask = widen(mask, -2)
    return mask


def segformer_attention_with_prompts(attn: nn.Module, hidden_states: torch.Tensor, height: int, width: int,
                                     prompts: Optional[torch.Tensor]) -> tuple[torch.Tensor, None]:
    """``transformers`` 5.x ``SegformerAttention`` with prompt tokens joined to its key/value sequence.

    The queries are the ``N = H * W`` image tokens; keys and values come from the spatially reduced tokens
    ``(B, N / R^2, C)`` (after the reduction's LayerNorm) followed by the ``P`` prompts ``(B, P, C)``. With
    ``prompts=None`` this is the base attention (a test checks it against ``transformers``).

    Args:
        attn: the ``SegformerAttention`` module.
        hidden_states: normalised tokens ``(B, N, C)``.
        height, width: the token map size ``H, W``.
        prompts: ``(B, P, C)`` or None.

    Returns:
        ``(attention output (B, N, C), None)`` like the base module (no attention weights).
    """
    b, n, _ = hidden_states.shape
    q = attn.q_proj(hidden_states).view(b, n, -1, attn.head_dim).transpose(1, 2)
    kv = hidden_states
    if attn.sequence_reduction_ratio > 1:
        kv = attn.sequence_reduction(hidden_states, height, width)
    if prompts is not None:
        kv = torch.cat([kv, prompts.to(kv.dtype)], dim=1)
    k = attn.k_proj(kv).view(b, kv.shape[1], -1, attn.head_dim).transpose(1, 2)
    v = attn.v_proj(kv).view(b, kv.shape[1], -1, attn.head_dim).transpose(1, 2)
    if k.dtype != q.dtype:  # LayerNorm outputs float32 under autocast while the projections give half precision
        k, v = k.to(q.dtype), v.to(q.dtype)
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.attention_dropout if attn.training else 0.0,
                                         scale=attn.scaling)
    return attn.o_proj(out.transpose(1, 2).reshape(b, n, -1)), None


class VPTModule(nn.Module, VPTLayer):
    """A transformer block (or Segformer attention) with visual prompts.

    ``kind="sequence"``: ``x`` is ``(B, N, D)`` tokens; the block runs on ``N + P`` tokens and returns what it
    returns, with the prompts of closing/deep adapters removed again. ``kind="key_value"``: ``forward(hidden_states
    (B, N, C), height, width)`` returns ``(B, N, C)`` attention output (and None for the weights).
    """

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: VPTConfig, role: str, kind: str, width: int,
                 family: BlockFamily, **kwargs: Any) -> None:
        super().__init__()
        VPTLayer.__init__(self, base_layer, kind, width, family, int(config.num_prefix_tokens or 0), **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, role)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        active = self._active()
        if self.kind == "key_value":
            prompting = [a for a in active if a in self.vpt_prompts]
            if not prompting:
                return self.base_layer(x, *args, **kwargs)
            height = args[0] if args else kwargs["height"]
            width = args[1] if len(args) > 1 else kwargs["width"]
            return segformer_attention_with_prompts(self.get_base_layer(), x, height, width,
                                                    self._prompt_tokens(prompting, x))
        deep = [a for a in active if self.vpt_role[a] == "deep"]
        opening = [a for a in active if self.vpt_role[a] in ("open", "open_close")]
        closing = [a for a in active if self.vpt_role[a] in ("close", "open_close")]
        if not (deep or opening or closing):
            return self.base_layer(x, *args, **kwargs)
        at = self.num_prefix_tokens
        new = deep + opening
        if new:
            n_new = sum(self.vpt_num_tokens[a] for a in new)
            args, kwargs = self._extend_mask(args, kwargs, x.shape[1], at, n_new,
                                             shallow=any(self.vpt_role[a] == "open" for a in opening))
            x = _insert(x, self._prompt_tokens(new, x), at)
        out = self.base_layer(x, *args, **kwargs)
        n_drop = sum(self.vpt_num_tokens[a] for a in deep + closing)
        return _drop(out, at, n_drop) if n_drop else out

    def _extend_mask(self, args: tuple, kwargs: dict, length: int, at: int, n: int, shallow: bool):
        if self.family.mask_arg is None:
            return args, kwargs
        pos, key = self.family.mask_arg
        mask = kwargs.get(key) if key in kwargs else (args[pos - 1] if len(args) >= pos else None)
        if mask is None:
            return args, kwargs
        if shallow:
            raise ValueError(f"VPT-shallow carries its prompts through blocks that receive the model's attention mask "
                             f"unchanged ({self.family.name}); use variant='deep' with attention masks.")
        mask = _pad_mask(mask, length, at, n, self.family.mask_keep)
        if key in kwargs:
            return args, {**kwargs, key: mask}
        args = list(args)
        args[pos - 1] = mask
        return tuple(args), kwargs

    def __repr__(self) -> str:
        return "vpt." + super().__repr__()
