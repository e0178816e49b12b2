"""One entry point for every fine-tuning method of the thesis: :func:`adapt`.

PEFT methods (ConvAdapter, LoRA, SSF, BitFit; for transformers visual prompts and bottleneck adapters) and the
selective baselines (full, decoder-only, head-only/linear probing, norm-layer tuning) all come back as a
``peft.PeftModel``, so saving, loading, named adapters, disabling and (where the maths allows) merging work the same
way for all of them. The selective baselines use peft's own
``LNTuningConfig``, which keeps a trainable copy of each selected module per adapter name: the adapter file of
"decoder-only" holds the decoder, and one frozen backbone serves many of them.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any, Optional

from monai.networks.blocks import ResidualUnit
from monai.networks.blocks.segresnet_block import ResBlock
from peft import LNTuningConfig, PeftModel, get_peft_model
from torch import nn

from monai_peft.lora import init_lora_pca_, lora_config
from monai_peft.memory import checkpoint_mode, enable_activation_checkpointing
from monai_peft.regions import regions_of
from monai_peft.targeting import (
    SPATIAL_OR_TRANSPOSED_CONV, ModuleType, Selector, SelectorLike, as_selector, exact_names_regex, resolve_targets,
)
from monai_peft.tuners.bottleneck import BottleneckAdapterConfig, default_bottleneck_targets
from monai_peft.tuners.conv_adapter import ConvAdapterConfig
from monai_peft.tuners.frozen_norm import keep_frozen_batchnorm_statistics
from monai_peft.tuners.module_types import ANY_CONV_TYPES, CONV_TYPES, NORM_TYPES
from monai_peft.tuners.ssf import SSFConfig
from monai_peft.tuners.ssf.layer import SUPPORTED_TYPES as SSF_TYPES
from monai_peft.tuners.vpt import VPTConfig, default_vpt_targets
from monai_peft.tuners.wrappers import user_network

__all__ = ["METHODS", "adapt", "default_targets", "RESIDUAL_BLOCK_TYPES", "register_residual_block"]

METHODS = ("convadapter", "lora", "ssf", "bitfit", "norm", "full", "decoder", "head", "vpt", "bottleneck")

# Blocks that the residual-parallel ConvAdapter scheme wraps by default (thesis Table 5.3 "ResBlock parallel").
RESIDUAL_BLOCK_TYPES: list[type[nn.Module]] = [ResBlock, ResidualUnit]


def register_residual_block(block_cls: type[nn.Module]) -> None:
    """Add a block class to the default ConvAdapter targets (e.g. nnU-Net's ``BasicBlockD``)."""
    if block_cls not in RESIDUAL_BLOCK_TYPES:
        RESIDUAL_BLOCK_TYPES.append(block_cls)


class _AnyOf(Selector):
    """Matches everything when ``regions`` is empty, else modules inside any of the regions."""

    def __init__(self, regions: tuple[str, ...]) -> None:
        self.regions = regions

    def matches(self, model, name, module) -> bool:
        from monai_peft.regions import module_in_region

        return not self.regions or any(module_in_region(model, name, r) for r in self.regions)

    def __repr__(self) -> str:
        return " | ".join(f"Region({r!r})" for r in self.regions) or "everything"


class _HasBias(Selector):
    def matches(self, model, name, module) -> bool:
        return isinstance(getattr(module, "bias", None), nn.Parameter)

    def __repr__(self) -> str:
        return "HasBias()"


def _backbone(model: nn.Module, regions: Optional[tuple[str, ...]] = None) -> Selector:
    declared = regions_of(model)
    if regions is None:
        return _AnyOf(tuple(r for r in ("encoder", "decoder") if r in declared))
    unknown = [r for r in regions if r not in declared]
    if unknown or not regions:
        raise ValueError(f"regions {list(regions)}: {type(model).__name__} declares {sorted(declared) or 'none'}.")
    return _AnyOf(tuple(regions))


def default_targets(
    model: nn.Module,
    method: str,
    insertion: str = "sequential",
    *,
    regions: Optional[tuple[str, ...]] = None,
    blocks: Optional[bool] = None,
    block_types: Optional[Sequence[type[nn.Module]]] = None,
) -> Selector:
    """The modules ``method`` wraps: the selector :func:`adapt` uses when ``target`` is not given, and the one rule
    the presets and the nnU-Net plugin ask too.

    Args:
        model: the network (a ``PeftModel`` is unwrapped).
        method: one of :data:`METHODS`.
        insertion: bottleneck adapters only: ``"sequential"`` (default) or ``"parallel"``.
        regions: where ``convadapter`` / ``lora`` / ``ssf`` go, declared regions of the model, e.g.
            ``("encoder",)``. Default None: encoder + decoder (the whole network when none are declared).
        blocks: ``convadapter`` only: True wraps residual blocks, False spatial convs, None (default) blocks when
            the network has any, else spatial convs.
        block_types: ``convadapter`` only: the block classes of the block placement; default
            :data:`RESIDUAL_BLOCK_TYPES` (the nnU-Net plugin passes its architectures' conv blocks). Resolve a block
            selector with ``resolve_targets(..., outermost=True)``.

    - ``convadapter``: residual blocks (:data:`RESIDUAL_BLOCK_TYPES`) in encoder + decoder (thesis Table 5.3,
      best SegResNet placement); spatial (k > 1) convs and transposed convs there, the 1-channel input conv included,
      if the network has no such blocks (thesis Table 5.4, UNet "LUConvs parallel");
    - ``lora``: convs (1x1 included) in encoder + decoder; peft 0.21's merge into 1x1x1 convs is patched by
      :mod:`monai_peft._peft_compat`;
    - ``ssf``: convs (transposed convs included), norms and linear layers in encoder + decoder;
    - ``bitfit``: every conv/norm/linear layer that has a bias, anywhere;
    - ``norm``: every norm layer; ``head``: the head region; ``decoder``: decoder + head; ``full``: everything;
    - ``vpt``: every transformer block of a known family (Segformer: each block's attention), anywhere;
    - ``bottleneck``: the attention and MLP branches of those blocks (for ``insertion``), anywhere.

    "Encoder + decoder" is the whole network when the architecture declares no regions.
    """
    model = user_network(model)
    if method == "convadapter":
        in_blocks = _backbone(model, regions) & ModuleType(*(RESIDUAL_BLOCK_TYPES if block_types is None else block_types))
        if blocks is None:
            try:
                resolve_targets(model, in_blocks)
                return in_blocks
            except ValueError:
                blocks = False
        return in_blocks if blocks else _backbone(model, regions) & SPATIAL_OR_TRANSPOSED_CONV
    if method == "lora":
        return _backbone(model, regions) & ModuleType(*CONV_TYPES)
    if method == "ssf":
        return _backbone(model, regions) & ModuleType(*ANY_CONV_TYPES, *NORM_TYPES, nn.Linear)
    if method == "bitfit":
        return ModuleType(*SSF_TYPES) & _HasBias()
    if method == "norm":
        return ModuleType(*NORM_TYPES)
    if method == "head":
        return as_selector("head")
    if method == "decoder":
        return as_selector("decoder") | as_selector("head")
    if method == "full":
        return _TopLevelWithParams()
    if method == "vpt":  # monai_peft.tuners.transformer_blocks: the block families; a CNN is a ValueError here
        return as_selector(default_vpt_targets(model))
    if method == "bottleneck":
        return as_selector(default_bottleneck_targets(model, insertion))
    raise ValueError(f"unknown method {method!r}; choose one of {METHODS}.")


class _TopLevelWithParams(Selector):
    def matches(self, model, name, module) -> bool:
        return "." not in name and any(True for _ in module.parameters())

    def __repr__(self) -> str:
        return "TopLevelModules()"


def _expand_containers(model: nn.Module, names: list[str]) -> list[str]:
    """Replace ``ModuleList``/``ModuleDict`` names by their children: networks iterate or index those containers, which
    a wrapping tuner layer would break (SegResNet does ``for down in self.down_layers``)."""
    modules = dict(model.named_modules())
    out: list[str] = []
    for name in names:
        m = modules[name]
        if isinstance(m, (nn.ModuleList, nn.ModuleDict)):
            out.extend(_expand_containers(model, [f"{name}.{child}" for child, _ in m.named_children()]))
        elif any(True for _ in m.parameters()):
            out.append(name)
    return out


def adapt(
    model: nn.Module,
    method: str,
    *,
    target: Optional[SelectorLike] = None,
    train_fully: Optional[SelectorLike] = None,
    adapter_name: str = "default",
    low_cpu_mem_usage: bool = False,
    activation_checkpointing: bool | str = False,
    **method_kwargs: Any,
) -> PeftModel:
    """Wrap ``model`` for fine-tuning with ``method``; the backbone is frozen, the adapter trains.

    Args:
        model: a network (``nn.Module``) or a ``PeftModel`` to which a further named adapter is added.
        method: one of ``convadapter``, ``lora``, ``ssf``, ``bitfit``, ``norm``, ``full``, ``decoder``, ``head``,
            ``vpt`` (visual prompts), ``bottleneck`` (bottleneck adapters).
        target: what to adapt: a :class:`~monai_peft.Selector`, region name, regex or list of module names;
            ``None`` uses :func:`default_targets`.
        train_fully: modules that train fully besides the adapters, e.g. ``"head"`` when the head was rebuilt for a
            new class count, or ``"decoder"`` for thesis "encoder adapters + full decoder" (Tables 5.1-5.3); saved
            with the adapter (peft ``modules_to_save``). With ``target=None`` the default targets inside these
            modules are left out; an explicit ``target`` that overlaps them is an error.
        adapter_name: the peft adapter name.
        low_cpu_mem_usage: create adapter weights on the meta device (for loading saved adapters fast).
        activation_checkpointing: ``True`` / ``"full-resolution"``: blocks at the input's resolution recompute their
            activations in backward instead of storing them; ``"all"``: every block; ``False`` (default): off. See
            :mod:`monai_peft.memory` (the adapter file is unchanged).
        method_kwargs: method options: ConvAdapter ``gamma``, ``insertion``, ``adapter_conv``, ``kernel_size``,
            ``activation``; LoRA ``r`` (int or ``"dynamic"``), ``lora_alpha``, ``lora_dropout``, ``init_pca``, ``fused``
            (default: each conv trains as one conv with the merged kernel, with the faster backward per layer, unless
            ``lora_dropout > 0``; ``"merged"`` / ``"factored"`` force one backward, ``False`` runs peft's layers);
            SSF ``scale``, ``shift``; VPT ``variant`` (``"deep"`` default, ``"shallow"``), ``num_tokens``,
            ``prompt_dropout``; bottleneck ``insertion`` (``"sequential"`` = Houlsby, default; ``"parallel"``),
            ``bottleneck_size``, ``activation``, ``scale`` (any other ``VPTConfig`` / ``BottleneckAdapterConfig`` field
            too).

    Returns:
        a ``peft.PeftModel`` (``print_trainable_parameters()``, ``save_pretrained()``, ``merge_and_unload()`` for
        LoRA/SSF/BitFit, ...).

    Frozen batch norms normalise with their running statistics also while training and do not update them
    (:mod:`monai_peft.tuners.frozen_norm`), so base checkpoint + adapter file give back exactly the trained network.

    Learning rate: an adapter starts as the identity and trains a few percent of the weights, so it needs larger
    steps than full fine-tuning; at full fine-tuning's rate it barely moves and looks broken. Start from
    :func:`monai_peft.default_learning_rate` ``(method)`` (measured per method on a real CT-to-MR adaptation,
    ``benchmarks/real_adaptation.py``; the table is in ``docs/core.md``, "Learning rates"), which the bundles and
    the nnU-Net trainers use too.

    Raises:
        ValueError: unknown method, a target or ``train_fully`` that matches nothing, or bad method options (the
            message names the module or argument).
        TypeError: a target that cannot take the method (e.g. a module without convs for ConvAdapter); no module
            is wrapped then.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}.")
    checkpointing = checkpoint_mode(activation_checkpointing)
    base = user_network(model)
    insertion = method_kwargs.get("insertion", "sequential")
    selector = default_targets(base, method, insertion) if target is None else as_selector(target)
    whole_modules = method in ("norm", "full", "decoder", "head")
    targets = resolve_targets(base, selector, outermost=whole_modules)
    if whole_modules:
        targets = _expand_containers(base, targets)
    to_save = None
    if train_fully is not None:
        to_save = _expand_containers(base, resolve_targets(base, train_fully, outermost=True))
    if to_save:
        def overlaps(t: str, x: str) -> bool:
            return t == x or x.startswith(t + ".") or t.startswith(x + ".")

        if target is None and not whole_modules:  # default targets: adapt what does not train fully
            targets = [x for x in targets if not any(overlaps(t, x) for t in to_save)]
            if not targets:
                raise ValueError(f"train_fully={train_fully!r} covers every default {method} target; nothing to adapt.")
        overlap = [t for t in to_save if any(overlaps(t, x) for x in targets)]
        if overlap and not whole_modules:
            raise ValueError(f"train_fully overlaps the {method} targets at {overlap}; a module is either adapted or trained fully.")
        if whole_modules:  # selective baselines: fully trained modules are simply more targets
            targets = sorted(set(targets) | set(to_save))
            targets = _expand_containers(base, [t for t in targets if not any(t.startswith(o + ".") for o in targets if o != t)])
            to_save = None

    init_pca = bool(method_kwargs.pop("init_pca", False))
    if method == "convadapter":
        config = ConvAdapterConfig(target_modules=exact_names_regex(targets), modules_to_save=to_save, **method_kwargs)
    elif method == "lora":
        if init_pca and method_kwargs.get("init_lora_weights", True) is not True:
            raise ValueError("init_pca=True replaces init_lora_weights; do not pass both.")
        config = lora_config(base, targets, modules_to_save=to_save, **method_kwargs)
    elif method in ("ssf", "bitfit"):
        if method == "bitfit":
            method_kwargs = {"scale": False, "shift": True, **method_kwargs}
        config = SSFConfig(target_modules=exact_names_regex(targets), modules_to_save=to_save, **method_kwargs)
    elif method in ("vpt", "bottleneck"):
        config_cls = VPTConfig if method == "vpt" else BottleneckAdapterConfig
        config = config_cls(target_modules=exact_names_regex(targets), modules_to_save=to_save, **method_kwargs)
    else:
        if method_kwargs:
            raise ValueError(f"method {method!r} takes no options, got {sorted(method_kwargs)}.")
        config = LNTuningConfig(target_modules=exact_names_regex(targets), modules_to_save=to_save)
    if init_pca and method != "lora":
        raise ValueError("init_pca applies to method='lora' only.")

    with warnings.catch_warnings():
        # peft's LN tuning warns "Unsupported layer type" for any module that is not a Linear/Conv/Embedding,
        # although copying a whole module is exactly what the selective baselines want.
        warnings.filterwarnings("ignore", message="Unsupported layer type")
        if isinstance(model, PeftModel):
            model.add_adapter(adapter_name, config, low_cpu_mem_usage=low_cpu_mem_usage)
            peft_model = model
        else:
            peft_model = get_peft_model(model, config, adapter_name=adapter_name, low_cpu_mem_usage=low_cpu_mem_usage)
    if init_pca:
        init_lora_pca_(peft_model, adapter_name)
    keep_frozen_batchnorm_statistics(peft_model)  # see monai_peft.tuners.frozen_norm: the adapter file is complete
    if checkpointing is not None:
        enable_activation_checkpointing(peft_model, checkpointing)
    return peft_model
