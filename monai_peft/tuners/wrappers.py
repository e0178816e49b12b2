"""What peft, DDP and ``torch.compile`` put around a user's network, and the names they add, in one place.

peft renames what it wraps: a ``PeftModel`` prefixes every name with ``base_model.model.``; a tuner layer keeps the
wrapped module as ``base_layer``; ``modules_to_save`` / LN tuning keep trained copies in a ``ModuleDict``
(``modules_to_save.<adapter>``, ``ln_tuning_layers.<adapter>``) beside the idle original (``original_module``,
``base_layer``); adapter tensors start with the method's prefix (``lora_``, ``conv_adapter_``, ``ssf_``, ``vpt_``,
``bottleneck_``). DDP / ``DataParallel`` keep the network as ``.module`` and ``torch.compile`` as ``._orig_mod``.
Reports, selectors, checkpoint readers, interpretability tools and the peft registration
(:mod:`monai_peft._peft_compat`) ask this module instead of spelling the names out.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch and peft load when a function runs: the analysis tools use the names without them
    from torch import nn

__all__ = [
    "MONAI_PEFT_TYPES", "PEFT_MODEL_PREFIX", "TUNER_BASE", "WRAPPED_PARTS", "TRAINED_COPY_ORIGINALS", "ADAPTER_PREFIXES", "unwrap_network",
    "user_network", "tuner_base_layer", "strip_peft_prefix", "adapter_kind", "is_wrapper_internal",
    "base_module_name", "plain_key", "strip_parallel_prefixes",
]

# peft type name -> (method name used by register_peft_method, prefix of its parameters)
MONAI_PEFT_TYPES: dict[str, tuple[str, str]] = {
    "CONV_ADAPTER": ("conv_adapter", "conv_adapter_"),
    "SSF": ("ssf", "ssf_"),
    "VPT": ("vpt", "vpt_"),
    "BOTTLENECK_ADAPTER": ("bottleneck_adapter", "bottleneck_"),
}
# prefix of every name inside a PeftModel
PEFT_MODEL_PREFIX = "base_model.model."
# name segment of the module a tuner layer wraps
TUNER_BASE = "base_layer"
# name segments that hold the wrapped original of a peft wrapper (the tuner layer / copy wrapper stands for it)
WRAPPED_PARTS: tuple[str, ...] = (TUNER_BASE, "original_module")
# ModuleDict of trained copies (the adapter name follows) -> attribute of the idle original beside it
TRAINED_COPY_ORIGINALS: dict[str, str] = {"modules_to_save": "original_module", "ln_tuning_layers": "base_layer"}
# first characters of an adapter's own tensors and modules -> method name
ADAPTER_PREFIXES: dict[str, str] = {"lora_": "lora", **{prefix: method for method, prefix in MONAI_PEFT_TYPES.values()}}


def unwrap_network(network: nn.Module) -> nn.Module:
    """The module inside ``DistributedDataParallel`` / ``DataParallel`` / ``torch.compile`` wrappers.

    A ``PeftModel`` stays a ``PeftModel`` (see :func:`user_network` for the network inside it).
    """
    from torch import nn
    from torch._dynamo.eval_frame import OptimizedModule

    while True:
        if isinstance(network, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            network = network.module
        elif isinstance(network, OptimizedModule):
            network = network._orig_mod
        else:
            return network


def user_network(model: nn.Module) -> nn.Module:
    """The network as the user built it: inside parallel / compile wrappers and a ``PeftModel``
    (``model.base_model.model``); tuner layers inside it stay in place."""
    from peft import PeftModel

    model = unwrap_network(model)
    return model.base_model.model if isinstance(model, PeftModel) else model


def tuner_base_layer(module: nn.Module) -> nn.Module:
    """The module under a peft tuner layer (``get_base_layer()``, nested wrappers resolved); ``module`` otherwise."""
    get_base = getattr(module, "get_base_layer", None)
    return get_base() if callable(get_base) else module


def strip_peft_prefix(name: str) -> str:
    """``name`` without a ``PeftModel``'s ``base_model.model.`` prefix."""
    return name.removeprefix(PEFT_MODEL_PREFIX)


def adapter_kind(name: str) -> str | None:
    """What a parameter or module name belongs to: the method of its first adapter segment (``"lora"``,
    ``"conv_adapter"``, ``"ssf"``, ``"vpt"``, ``"bottleneck_adapter"``), ``"full_copy"`` inside a trained copy
    (``modules_to_save`` / ``ln_tuning_layers``), ``None`` for the base network."""
    for part in name.split("."):
        if part in TRAINED_COPY_ORIGINALS:
            return "full_copy"
        for prefix, method in ADAPTER_PREFIXES.items():
            if part.startswith(prefix):
                return method
    return None


def is_wrapper_internal(name: str) -> bool:
    """Whether a module name lies inside what peft added (adapter modules, trained copies), not the user's network."""
    return adapter_kind(name) is not None


def plain_key(key: str) -> str:
    """The plain-network name of a (peft-wrapped) state-dict key or module name.

    ``base_model.model.encoder.x.conv.base_layer.weight`` -> ``encoder.x.conv.weight``; trained copies
    (``modules_to_save.<name>``, ``ln_tuning_layers.<name>``) map to the module they copy; adapter tensors
    (``lora_A``, ``conv_adapter_down``, ``ssf_scale`` ...) keep their segments, names a plain network does not have.
    """
    out: list[str] = []
    parts = strip_peft_prefix(key).split(".")
    i = 0
    while i < len(parts):
        if parts[i] in TRAINED_COPY_ORIGINALS:
            i += 2  # the adapter name follows
            continue
        if parts[i] not in WRAPPED_PARTS:
            out.append(parts[i])
        i += 1
    return ".".join(out)


def base_module_name(name: str) -> str:
    """The user-network module a (peft-wrapped) module name belongs to: :func:`plain_key` cut at the first adapter
    segment (an adapter belongs to the module it adapts).

    ``base_model.model.up.0.conv.base_layer`` -> ``up.0.conv``; ``base_model.model.head.modules_to_save.default``
    -> ``head``; ``base_model.model.up.0.conv_adapter_down.default`` -> ``up.0``.
    """
    out: list[str] = []
    for part in plain_key(name).split("."):
        if any(part.startswith(p) for p in ADAPTER_PREFIXES):
            break
        out.append(part)
    return ".".join(out)


def strip_parallel_prefixes(key: str) -> str:
    """A state-dict key without the ``module.`` (DDP) and ``_orig_mod.`` (``torch.compile``) prefixes."""
    for prefix in ("module.", "_orig_mod."):
        key = key.removeprefix(prefix)
    return key
