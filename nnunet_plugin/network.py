"""PEFT networks for nnU-Net 2.8's own architectures (``PlainConvUNet``, ``ResidualEncoderUNet``).

:func:`build_peft_network` turns the plain network nnU-Net builds from the plans into the adapted one. It is
called from the trainers' ``build_network_architecture``, i.e. both when training and when
``nnUNetv2_predict`` rebuilds the network, so both see the same structure.

One nnU-Net quirk is handled here: ``ConvDropoutNormReLU`` registers its conv and norm twice, as ``.conv`` /
``.norm`` and inside ``.all_modules`` (the ``nn.Sequential`` its forward actually runs). peft replaces the
module under the first name only, which would leave the adapter outside the forward path; :func:`relink_aliases`
points every other registration of a replaced module at its replacement.
"""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

from monai_peft.tuners.wrappers import unwrap_network
from monai_peft.tuners.wrappers import user_network as base_network  # the nnU-Net architecture object, e.g. for .decoder
from nnunet_plugin.settings import PEFTSettings, speed_options

__all__ = [
    "METHODS", "NNUNET_REGIONS", "register_nnunet_regions", "adapter_targets", "seg_layer_names",
    "relink_aliases", "build_peft_network", "build_suprem_peft_network", "unwrap_network", "base_network",
    "PLAIN_KEYS_ATTR", "SUPREM_ATTR", "SUPREM_METHODS",
]

logger = logging.getLogger(__name__)

# nnU-Net trainer method -> monai_peft.adapt method ("full" trains the plain network, no wrapper)
METHODS = ("convadapter", "lora", "ssf", "bitfit", "norm", "decoder", "head", "full")

# Regions of dynamic_network_architectures' U-Nets. ModuleList children are listed one by one (\d+) so that a
# selective method wraps each stage, not the ModuleList the decoder indexes.
NNUNET_REGIONS: dict[str, list[str]] = {
    "encoder": [r"encoder"],
    "decoder": [r"decoder\.stages\.\d+", r"decoder\.transpconvs\.\d+"],
    "head": [r"decoder\.seg_layers\.\d+"],
}

# attribute on the built network: the state-dict keys of the plain nnU-Net network it was built from
PLAIN_KEYS_ATTR = "_nnunet_plugin_plain_keys"
# attribute on networks with a SuPreM backbone: its name ("segresnet"), selects the checkpoint layout
SUPREM_ATTR = "_nnunet_plugin_suprem"
SUPREM_METHODS = ("convadapter", "lora", "ssf", "decoder", "full")


def _architectures() -> list[type[nn.Module]]:
    from dynamic_network_architectures.architectures import unet

    return [getattr(unet, n) for n in ("PlainConvUNet", "ResidualEncoderUNet", "ResidualUNet") if hasattr(unet, n)]


def _residual_blocks() -> tuple[type[nn.Module], ...]:
    from dynamic_network_architectures.building_blocks.residual import BasicBlockD, BottleneckD
    from dynamic_network_architectures.building_blocks.simple_conv_blocks import StackedConvBlocks

    return (BasicBlockD, BottleneckD, StackedConvBlocks)


def register_nnunet_regions() -> None:
    """Declare encoder / decoder / head of nnU-Net's U-Nets with :func:`monai_peft.register_regions` (idempotent).

    Runs when this module is imported (the trainers import it), so ``monai_peft.adapt(net, method, target="encoder")``
    works on nnU-Net networks once ``nnunet_plugin.network`` is imported; the core ``monai_peft`` knows no nnU-Net.
    """
    from monai_peft.regions import register_regions

    try:
        architectures = _architectures()
    except ImportError:  # dynamic_network_architectures not installed: nothing to declare
        return
    for cls in architectures:
        register_regions(cls, NNUNET_REGIONS)
    from monai_peft.memory import register_checkpoint_block

    for block in _residual_blocks():  # nnUNet_peft_activation_checkpointing recomputes these
        register_checkpoint_block(block)


def seg_layer_names(network: nn.Module) -> list[str]:
    """Names of the 1x1 segmentation layers (one per deep-supervision output), e.g. ``decoder.seg_layers.0``."""
    seg = getattr(getattr(network, "decoder", None), "seg_layers", None)
    if seg is None:
        raise TypeError(f"{type(network).__name__} has no decoder.seg_layers: not an nnU-Net U-Net architecture.")
    return [f"decoder.seg_layers.{i}" for i in range(len(seg))]


def adapter_targets(network: nn.Module, method: str, settings: PEFTSettings) -> list[str]:
    """Module names the method adapts in ``settings.target`` regions: the core's rule
    (:func:`monai_peft.adapt.default_targets`), asked with nnU-Net's conv blocks as the block placement's unit.

    - ``convadapter`` ``conv-*``: every spatial (kernel > 1) conv and transposed conv, the stem included (any
      channel count takes an adapter, see ``monai_peft.ConvAdapterConfig``); ``residual-*``: every conv block, the
      outermost of ``StackedConvBlocks`` (plain stages, stem, decoder) and ``BasicBlockD`` / ``BottleneckD``
      (residual stages).
    - ``lora``: every conv, 1x1 included (peft has no LoRA for transposed convs).
    - ``ssf``: every conv (transposed convs included) and norm layer (scale/shift after each, thesis 3.2.3).

    Args:
        network: the plain nnU-Net network.
        method: one of ``convadapter``, ``lora``, ``ssf``.
        settings: placement and target regions.

    Raises:
        ValueError: nothing matched (the message names the regions and the architecture).
    """
    from dynamic_network_architectures.building_blocks.residual import BasicBlockD, BottleneckD
    from dynamic_network_architectures.building_blocks.simple_conv_blocks import StackedConvBlocks

    from monai_peft.adapt import default_targets
    from monai_peft.targeting import resolve_targets

    if method not in ("convadapter", "lora", "ssf"):
        raise ValueError(f"adapter_targets: method must be convadapter, lora or ssf, got {method!r}.")
    blocks = method == "convadapter" and settings.placement.startswith("residual")
    selector = default_targets(network, method, regions=tuple(settings.target), blocks=blocks,
                               block_types=(BasicBlockD, BottleneckD, StackedConvBlocks))
    try:
        return resolve_targets(network, selector, outermost=blocks)
    except ValueError:
        raise ValueError(
            f"no {method} targets in regions {list(settings.target)} of {type(network).__name__} "
            f"(placement {settings.placement!r})."
        ) from None


def _alias_slots(model: nn.Module) -> dict[int, tuple[nn.Module, list[tuple[nn.Module, str]]]]:
    slots: dict[int, tuple[nn.Module, list[tuple[nn.Module, str]]]] = {}
    seen: set[int] = set()
    stack = [model]
    while stack:
        parent = stack.pop()
        if id(parent) in seen:
            continue
        seen.add(id(parent))
        for attr, child in parent._modules.items():
            if child is None:
                continue
            slots.setdefault(id(child), (child, []))[1].append((parent, attr))
            stack.append(child)
    return {k: v for k, v in slots.items() if len(v[1]) > 1}


def relink_aliases(model: nn.Module, aliases: dict[int, tuple[nn.Module, list[tuple[nn.Module, str]]]]) -> int:
    """After peft replaced modules, make every other registration of a replaced module use the replacement.

    Args:
        model: the adapted model (only used for logging).
        aliases: ``_alias_slots(model)`` taken *before* adaptation: modules registered in more than one place.

    Returns:
        the number of registrations redirected.
    """
    fixed = 0
    for original, places in aliases.values():
        current = [getattr(parent, attr) for parent, attr in places]
        replacements = {id(c): c for c in current if c is not original and any(m is original for m in c.modules())}
        if not replacements:
            continue
        if len(replacements) > 1:
            raise RuntimeError(f"{type(original).__name__} was replaced by two different wrappers; cannot relink.")
        (replacement,) = replacements.values()
        for (parent, attr), c in zip(places, current):
            if c is original:
                parent._modules[attr] = replacement
                fixed += 1
    if fixed:
        logger.debug("relinked %d aliased module registrations in %s", fixed, type(model).__name__)
    return fixed


def build_peft_network(network: nn.Module, method: str, settings: PEFTSettings) -> nn.Module:
    """Adapt a freshly built nnU-Net network for ``method`` (backbone frozen, adapters + seg layers train).

    Args:
        network: the plain network from ``get_network_from_plans`` (``(B, C, X, Y[, Z])`` in,
            ``(B, K, X, Y[, Z])`` or a deep-supervision list out).
        method: one of :data:`METHODS`; ``"full"`` returns ``network`` unchanged (everything trains).
        settings: rank / gamma / placement / target regions.

    Returns:
        a ``peft.PeftModel`` (or ``network`` for ``"full"``) with attribute ``_nnunet_plugin_plain_keys`` listing
        the plain network's state-dict keys (used to load nnU-Net checkpoints into it).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}.")
    plain_keys = list(network.state_dict().keys())
    if method == "full":
        setattr(network, PLAIN_KEYS_ATTR, plain_keys)
        return network

    import monai_peft  # noqa: F401  (registers ConvAdapter / SSF with peft)
    from monai_peft.adapt import adapt

    seg_layers = seg_layer_names(network)
    kwargs: dict[str, Any] = {}
    target: Any = None
    train_fully: Any = seg_layers  # new label count: the seg layers are re-initialised and train (issue 5)
    if method == "convadapter":
        target = adapter_targets(network, method, settings)
        kwargs = {"gamma": settings.gamma, "insertion": settings.placement.split("-")[1]}
    elif method == "lora":
        target = adapter_targets(network, method, settings)
        kwargs = {"r": settings.rank}
    elif method == "ssf":
        target = adapter_targets(network, method, settings)
    elif method == "decoder":
        target = "decoder"  # the head comes through train_fully
    elif method == "head":
        target, train_fully = seg_layers, None
    elif method == "bitfit":
        # monai_peft's BitFit targets minus the seg layers, which train fully (weights too) on top
        from monai_peft.adapt import default_targets
        from monai_peft.targeting import resolve_targets

        target = [n for n in resolve_targets(network, default_targets(network, "bitfit")) if n not in seg_layers]
    # norm: monai_peft's default targets; the seg layers train fully on top
    aliases = _alias_slots(network)
    peft_model = adapt(network, method, target=target, train_fully=train_fully, **kwargs, **speed_options(method))
    relink_aliases(peft_model, aliases)
    setattr(peft_model, PLAIN_KEYS_ATTR, plain_keys)
    return peft_model


def build_suprem_peft_network(network: nn.Module, method: str, settings: PEFTSettings, backbone: str) -> nn.Module:
    """Adapt a SuPreM backbone (``monai_peft.networks.suprem_backbone``) for use inside nnU-Net.

    The regions (encoder / decoder / head) are the core library's; the head (SegResNet ``conv_final``, UNet3D
    ``out_tr``) is rebuilt for the new label count and trains fully. ConvAdapter ``residual-*`` wraps the
    ResBlocks (thesis Table 5.3, best SegResNet placement), ``conv-*`` every spatial conv (UNet3D: both LUConv
    convs of every transition, Table 5.4); LoRA targets spatial convs; SSF every conv and norm. UNet3D's frozen
    batch norms keep batch statistics without updating their buffers (``adapt()`` applies
    :func:`monai_peft.tuners.frozen_norm.keep_frozen_batchnorm_statistics` to every frozen batch norm).

    Args:
        network: the backbone, ``(B, 1, H, W, D)`` -> ``(B, K, H, W, D)``.
        method: one of :data:`SUPREM_METHODS`.
        settings: rank / gamma / placement / target regions.
        backbone: ``"segresnet"`` or ``"unet"`` (recorded so ``-pretrained_weights`` reads SuPreM's checkpoint
            layout).
    """
    if method not in SUPREM_METHODS:
        raise ValueError(f"SuPreM trainers support methods {SUPREM_METHODS}, got {method!r}.")
    plain_keys = list(network.state_dict().keys())
    if method != "full":
        import monai_peft  # noqa: F401  (registers ConvAdapter / SSF with peft)
        from monai_peft.adapt import adapt, default_targets

        kwargs: dict[str, Any] = {}
        target: Any = None  # decoder: adapt()'s own default
        if method in ("convadapter", "lora", "ssf"):  # the core's rule, in the settings' regions
            target = default_targets(network, method, regions=tuple(settings.target),
                                     blocks=settings.placement.startswith("residual"))
        if method == "convadapter":
            kwargs = {"gamma": settings.gamma, "insertion": settings.placement.split("-")[1]}
        elif method == "lora":
            kwargs = {"r": settings.rank}
        network = adapt(network, method, target=target, train_fully="head", **kwargs, **speed_options(method))
    setattr(network, PLAIN_KEYS_ATTR, plain_keys)
    setattr(network, SUPREM_ATTR, backbone)
    return network


register_nnunet_regions()
