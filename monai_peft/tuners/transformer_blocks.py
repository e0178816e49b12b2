"""The transformer block families that VPT and bottleneck adapters know, in one place.

A *family* names the class of one transformer block (``transformers`` ViT / VideoMAE / Segformer, MONAI's
``TransformerBlock`` used by ``monai.networks.nets.ViT`` and UNETR) and where, relative to the block, its pieces
sit: the LayerNorm whose width is the token width, the attention and MLP residual branches, where visual prompts
go, and how its attention mask is passed. Both tuners (:mod:`monai_peft.tuners.vpt`,
:mod:`monai_peft.tuners.bottleneck`) read this table; nothing else in them is model-specific except the Segformer
attention with prompt tokens (:mod:`monai_peft.tuners.vpt.layer`).

Classes are looked up lazily by dotted path, so a missing optional package only removes its families.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

from torch import nn

__all__ = ["BlockFamily", "FAMILIES", "family_of", "find_blocks", "import_class", "token_width", "unwrap"]


@dataclass(frozen=True)
class BlockFamily:
    """Where the pieces of one transformer block class are.

    Args:
        name: shown in messages, e.g. ``"transformers ViT"``.
        block: dotted path of the block class.
        width: LayerNorm in the block whose ``normalized_shape`` is the token width ``D``.
        attention: the attention residual branch (its output is added to the residual stream).
        mlp: the MLP residual branch as one module, input the normalised tokens, output before the residual add.
        prompt_site: ``""``: the block takes visual prompts in its token sequence; else the attention module (relative
            to the block) that joins them to its key/value sequence (blocks that need a spatial token map).
        houlsby_mlp: where a sequential adapter after the MLP goes when ``mlp`` already adds the residual
            (VideoMAE's ``output``); ``""`` means ``mlp``.
        mlp_input_norm: set when ``mlp`` does not receive the branch input: its argument 1 is the residual stream,
            and this LayerNorm of the block gives the branch input (VideoMAE: ``layernorm_after``).
        mask_arg: ``(position, keyword)`` of the block's attention-mask argument, or None if it takes none.
        mask_keep: value of a float mask entry that lets a token through: 0.0 (additive masks of ``transformers``)
            or 1.0 (MONAI's ``attn_mask``, where 0 masks).
    """

    name: str
    block: str
    width: str
    attention: str
    mlp: str
    prompt_site: str = ""
    houlsby_mlp: str = ""
    mlp_input_norm: str = ""
    mask_arg: Optional[tuple[int, str]] = None
    mask_keep: float = 0.0

    @property
    def block_class(self) -> Optional[type]:
        return import_class(self.block)

    def branch(self, insertion: str, which: str) -> str:
        """Path (relative to the block) of the module a ``"sequential"`` or ``"parallel"`` adapter wraps for the
        ``"attention"`` or ``"mlp"`` branch."""
        if which == "attention":
            return self.attention
        return (self.houlsby_mlp or self.mlp) if insertion == "sequential" else self.mlp


FAMILIES: tuple[BlockFamily, ...] = (
    BlockFamily("transformers ViT", "transformers.models.vit.modeling_vit.ViTLayer", width="layernorm_before",
                attention="attention", mlp="mlp", mask_arg=(1, "attention_mask")),
    BlockFamily("transformers VideoMAE", "transformers.models.videomae.modeling_videomae.VideoMAELayer",
                width="layernorm_before", attention="attention", mlp="output", houlsby_mlp="output.dense",
                mlp_input_norm="layernorm_after"),
    BlockFamily("transformers Segformer", "transformers.models.segformer.modeling_segformer.SegformerLayer",
                width="layernorm_before", attention="attention", mlp="mlp", prompt_site="attention"),
    BlockFamily("MONAI TransformerBlock", "monai.networks.blocks.transformerblock.TransformerBlock", width="norm1",
                attention="attn", mlp="mlp", mask_arg=(2, "attn_mask"), mask_keep=1.0),
)


@lru_cache(maxsize=None)
def import_class(path: str) -> Optional[type]:
    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None


def family_of(module: nn.Module) -> Optional[BlockFamily]:
    """The family whose block class ``module`` is an instance of, else None."""
    for fam in FAMILIES:
        cls = fam.block_class
        if cls is not None and isinstance(module, cls):
            return fam
    return None


def find_blocks(model: nn.Module) -> list[tuple[str, nn.Module, BlockFamily]]:
    """``(name, block, family)`` of every known transformer block in ``model``, in module order.

    Modules inside a peft wrapper's ``base_layer`` are reported under the wrapper's name.
    """
    out = []
    for name, module in model.named_modules():
        if ".base_layer" in f".{name}" or ".modules_to_save." in f".{name}.":
            continue
        fam = family_of(unwrap(module))
        if fam is not None:
            out.append((name, unwrap(module), fam))
    return out


def token_width(block: nn.Module, family: BlockFamily) -> int:
    """Token width ``D`` of ``block`` (the ``normalized_shape`` of its ``family.width`` LayerNorm)."""
    norm = block.get_submodule(family.width)
    if not isinstance(norm, nn.LayerNorm) or len(norm.normalized_shape) != 1:
        raise TypeError(f"{family.name} block: expected '{family.width}' to be a 1-D LayerNorm, got {norm!r}.")
    return int(norm.normalized_shape[0])


def unwrap(module: nn.Module) -> nn.Module:
    """The module under a peft tuner layer (itself when not wrapped)."""
    get_base = getattr(module, "get_base_layer", None)
    return get_base() if callable(get_base) else module
