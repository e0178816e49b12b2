"""Every place where monai-peft reaches into peft's internals, in one module.

peft keeps the list of methods in the closed enum ``peft.utils.PeftType`` and refuses to register a
method whose name is not a member of it (``register_peft_method``). monai-peft therefore

1. adds its members (``CONV_ADAPTER``, ``SSF``) to ``PeftType`` so that configs serialise as
   ``"peft_type": "CONV_ADAPTER"`` and ``PeftConfig.from_pretrained`` / ``PeftModel.from_pretrained`` find them again;
2. calls peft's public ``register_peft_method`` for each method.

Everything else monai-peft needs from peft goes through public or documented-for-tuner-authors API
(``BaseTuner``, ``BaseTunerLayer``, ``check_adapters_to_merge``). :func:`check_peft_compat` verifies all of it and is
run by the test suite, so a peft upgrade that moves one of these pieces fails loudly in one place.

It also holds

- the supported peft range (:data:`SUPPORTED_PEFT`, checked by :func:`check_peft_version` when ``monai_peft`` is
  imported): the tuners need peft 0.21's ``BaseTuner``;
- the workarounds for LoRA bugs of the installed peft (:data:`PEFT_WORKAROUNDS`), each gated on the peft version
  and tested against peft's own code, so that a test says when an upgrade makes one unnecessary;
- the one call of peft's experimental custom-LoRA-layer hook (:func:`register_custom_lora_layers`), used by the
  fused conv LoRA of :mod:`monai_peft.lora.fused`.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

import torch
from packaging.specifiers import SpecifierSet
from packaging.version import Version
from peft.utils import PeftType
from torch import nn

__all__ = [
    "MONAI_PEFT_TYPES", "add_peft_type", "register_monai_peft_methods", "check_peft_compat", "SUPPORTED_PEFT",
    "installed_peft_version", "check_peft_version", "PeftWorkaround", "PEFT_WORKAROUNDS", "apply_peft_workarounds",
    "lora_conv_layer_classes", "register_custom_lora_layers", "lora_conv_delta_weight",
]

# What the tuners need first appeared in peft 0.21: ``BaseTuner._remap_adapter_state_dict_for_load`` (called by
# ``set_peft_model_state_dict``; StrictLoadMixin refuses partial adapter files through it) and
# ``peft.tuners.tuners_utils._get_tuner_state_dict_key_prefixes`` / ``_filter_state_dict_by_key_prefixes``. peft 0.20
# loads adapter files in ``utils/save_and_load.py`` without asking the tuner, so a mismatched ConvAdapter/SSF file
# would load partially there. The upper bound is the newest minor release tested (0.21.0 and 0.21.2 share this API).
# setup.cfg's install_requires states the same range (tests/test_lora_compat.py keeps the two equal).
SUPPORTED_PEFT = ">=0.21,<0.22"

# peft type name -> (method name used by register_peft_method, prefix of its parameters)
MONAI_PEFT_TYPES: dict[str, tuple[str, str]] = {
    "CONV_ADAPTER": ("conv_adapter", "conv_adapter_"),
    "SSF": ("ssf", "ssf_"),
    "VPT": ("vpt", "vpt_"),
    "BOTTLENECK_ADAPTER": ("bottleneck_adapter", "bottleneck_"),
}


def add_peft_type(name: str) -> PeftType:
    """Add ``name`` as a member of :class:`peft.utils.PeftType` (idempotent) and return the member.

    ``PeftType`` is a ``str`` enum; Python offers no public way to extend an enum, so the member is created the way
    ``enum`` itself creates members and entered in the three lookup tables the enum machinery reads
    (``_member_map_``, ``_value2member_map_``, ``_member_names_``).
    """
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member._sort_order_ = len(PeftType._member_names_)
    member.__objclass__ = PeftType
    member.__init__(name)
    type.__setattr__(PeftType, name, member)  # EnumType.__setattr__ would refuse: the class is "closed"
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    return member


def register_monai_peft_methods() -> None:
    """Register ConvAdapter and SSF with peft; safe to call more than once."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
    from peft.utils import register_peft_method

    from monai_peft.tuners.conv_adapter import ConvAdapterConfig, ConvAdapterModel
    from monai_peft.tuners.ssf import SSFConfig, SSFModel
    from monai_peft.tuners.bottleneck import BottleneckAdapterConfig, BottleneckAdapterModel
    from monai_peft.tuners.vpt import VPTConfig, VPTModel

    classes = {"CONV_ADAPTER": (ConvAdapterConfig, ConvAdapterModel), "SSF": (SSFConfig, SSFModel)}
    classes.update(VPT=(VPTConfig, VPTModel), BOTTLENECK_ADAPTER=(BottleneckAdapterConfig, BottleneckAdapterModel))
    for type_name, (method, prefix) in MONAI_PEFT_TYPES.items():
        peft_type = add_peft_type(type_name)
        if peft_type in PEFT_TYPE_TO_CONFIG_MAPPING:
            continue
        config_cls, model_cls = classes[type_name]
        register_peft_method(name=method, config_cls=config_cls, model_cls=model_cls, prefix=prefix)


def check_peft_compat() -> None:
    """Raise ``RuntimeError`` naming what moved if the installed peft lacks something monai-peft relies on."""
    problems: list[str] = []
    try:
        from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
        from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, check_adapters_to_merge  # noqa: F401
        from peft.utils import register_peft_method  # noqa: F401
    except ImportError as e:  # pragma: no cover - exercised only by a breaking peft release
        raise RuntimeError(f"peft API moved: {e}") from e
    if not issubclass(PeftType, enum.Enum) or not issubclass(PeftType, str):
        problems.append("peft.utils.PeftType is no longer a str Enum")
    for type_name, (_, prefix) in MONAI_PEFT_TYPES.items():
        if type_name not in PeftType.__members__:
            problems.append(f"PeftType.{type_name} missing")
            continue
        member = PeftType[type_name]
        if PeftType(type_name) is not member or member not in list(PeftType):
            problems.append(f"PeftType.{type_name} is not a full enum member")
        for table_name, table in (("config", PEFT_TYPE_TO_CONFIG_MAPPING), ("tuner", PEFT_TYPE_TO_TUNER_MAPPING)):
            if table.get(type_name) is None:
                problems.append(f"{type_name} missing from PEFT_TYPE_TO_{table_name.upper()}_MAPPING")
        if PEFT_TYPE_TO_PREFIX_MAPPING.get(type_name) != prefix:
            problems.append(f"{type_name} prefix is {PEFT_TYPE_TO_PREFIX_MAPPING.get(type_name)!r}, expected {prefix!r}")
    for attr in ("adapter_layer_names", "other_param_names", "_move_adapter_to_device_of_base_layer",
                 "_get_base_layer_device_and_dtype", "_cast_input_dtype", "get_base_layer", "set_adapter",
                 "delete_adapter", "enable_adapters"):
        if not hasattr(BaseTunerLayer, attr):
            problems.append(f"BaseTunerLayer.{attr} missing")
    for attr in ("_create_and_replace", "_mark_only_adapters_as_trainable", "_unload_and_optionally_merge",
                 "_remap_adapter_state_dict_for_load", "inject_adapter"):
        if not hasattr(BaseTuner, attr):
            problems.append(f"BaseTuner.{attr} missing")
    from peft import LoraConfig

    conv_nd = _lora_conv_base()
    for attr in ("get_delta_weight", "update_layer", "merge", "unmerge", "forward"):
        if not hasattr(conv_nd, attr):
            problems.append(f"peft.tuners.lora.layer._ConvNd.{attr} missing")
    if not hasattr(LoraConfig(), "_custom_modules") or not hasattr(LoraConfig, "_register_custom_module"):
        problems.append("LoraConfig._register_custom_module (custom LoRA layers) missing")
    if problems:
        raise RuntimeError("monai-peft is incompatible with the installed peft: " + "; ".join(problems))


# ------------------------------------------------------------------------------------------------- peft version
def installed_peft_version() -> str:
    """The version of the peft that ``import peft`` gives (what monai-peft runs against)."""
    import peft

    return str(peft.__version__)


def check_peft_version(version: Optional[str] = None) -> None:
    """Raise ``ImportError`` naming the installed peft and :data:`SUPPORTED_PEFT` when they do not match.

    Args:
        version: the version to check; ``None`` (default) checks :func:`installed_peft_version`.
    """
    version = installed_peft_version() if version is None else version
    try:
        supported = SpecifierSet(SUPPORTED_PEFT).contains(Version(version), prereleases=True)
    except ValueError:  # packaging.version.InvalidVersion
        supported = False
    if not supported:
        raise ImportError(
            f"monai-peft needs peft{SUPPORTED_PEFT} (its tuners are built on peft 0.21's BaseTuner), but peft "
            f"{version} is installed; install a supported version: pip install 'peft{SUPPORTED_PEFT}'."
        )


# ---------------------------------------------------------------------------------------- LoRA bug workarounds
@dataclass(frozen=True)
class PeftWorkaround:
    """One patch of a peft bug, applied at ``import monai_peft`` while the installed peft needs it.

    Args:
        issue: the upstream report, ``"huggingface/peft#NNNN"``.
        summary: what goes wrong without the patch.
        fixed_in: the first peft release with the upstream fix; ``None`` while no release has it.
        apply: patches peft (idempotent).
        still_needed: runs peft's own, unpatched code on a small case and says whether the bug is still there.
    """

    issue: str
    summary: str
    fixed_in: Optional[str]
    apply: Callable[[], None]
    still_needed: Callable[[], bool]

    def gated_on(self, version: Optional[str] = None) -> bool:
        """Whether this workaround applies to peft ``version`` (default: the installed one)."""
        version = installed_peft_version() if version is None else version
        return self.fixed_in is None or Version(version) < Version(self.fixed_in)


_UNPATCHED: dict[str, Callable] = {}  # peft's own functions, kept by the workarounds that replace them


def _lora_conv_base() -> type:
    from peft.tuners.lora.layer import _ConvNd

    return _ConvNd


def lora_conv_delta_weight(
    weight_a: torch.Tensor, weight_b: torch.Tensor, scaling: float, base_shape: torch.Size
) -> torch.Tensor:
    """The weight that LoRA adds to an ungrouped conv: ``scaling * B @ A`` as a ``(C_out, C_in, *k)`` kernel.

    Args:
        weight_a: ``lora_A`` weight, ``(r, C_in, *k)``.
        weight_b: ``lora_B`` weight, ``(C_out, r, 1, ...)``.
        scaling: ``lora_alpha / r`` (or rsLoRA's ``lora_alpha / sqrt(r)``).
        base_shape: the base conv's weight shape ``(C_out, C_in, *k)``.
    """
    return (weight_b.flatten(1) @ weight_a.flatten(1)).reshape(base_shape) * scaling


def _pointwise_delta(layer: nn.Module, adapter: str) -> torch.Tensor:
    """:func:`lora_conv_delta_weight` of a peft LoRA conv layer, in ``A``'s dtype; on CPU half-precision factors are
    multiplied in float32 (as peft does: CPU half matmuls are slow)."""
    weight_a, weight_b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    dtype = weight_a.dtype
    if weight_b.device.type == "cpu" and dtype in (torch.float16, torch.bfloat16):
        weight_a, weight_b = weight_a.float(), weight_b.float()
    delta = lora_conv_delta_weight(weight_a, weight_b, layer.scaling[adapter], layer.get_base_layer().weight.shape)
    return delta.to(dtype)


def _takes_2d_pointwise_shortcut_wrongly(layer: nn.Module) -> bool:
    """peft 0.21 treats every weight with ``shape[2:4] == (1, 1)`` as a 2D 1x1 conv: true for a 3D ``1x1x1`` or
    ``(1, 1, k)`` kernel, whose delta it then fails to compute (its ``squeeze`` leaves the third kernel dim)."""
    weight = layer.get_base_layer().weight
    return weight.dim() != 4 and tuple(weight.shape[2:4]) == (1, 1)


def _apply_3768() -> None:
    conv_nd = _lora_conv_base()
    if "3768" in _UNPATCHED:
        return
    original = conv_nd.get_delta_weight
    _UNPATCHED["3768"] = original

    def get_delta_weight(self, adapter):
        if _takes_2d_pointwise_shortcut_wrongly(self) and self.get_base_layer().groups == 1:
            return _pointwise_delta(self, adapter)
        return original(self, adapter)

    get_delta_weight.__doc__ = original.__doc__
    conv_nd.get_delta_weight = get_delta_weight


def _probe_lora_conv(conv: nn.Module) -> nn.Module:
    """A peft LoRA conv layer (rank 1, random ``B``) around ``conv``, for the probes below."""
    from peft import LoraConfig
    from peft.tuners.lora import layer as lora_layer

    cls = {1: lora_layer.Conv1d, 2: lora_layer.Conv2d, 3: lora_layer.Conv3d}[conv.weight.dim() - 2]
    layer = cls(conv, "probe", config=LoraConfig(r=1, lora_alpha=1, init_lora_weights=False), r=1, lora_alpha=1)
    return layer


def _needs_3768() -> bool:
    torch.manual_seed(0)
    layer = _probe_lora_conv(nn.Conv3d(2, 3, 1))
    original = _UNPATCHED.get("3768", _lora_conv_base().get_delta_weight)
    try:
        delta = original(layer, "probe")
    except RuntimeError:
        return True
    expected = _pointwise_delta(layer, "probe")
    return delta.shape != expected.shape or not torch.allclose(delta, expected)


def _copy_spatial_geometry(layer: nn.Module, adapter_name: str) -> None:
    """Give ``lora_A`` the base conv's dilation and padding mode (peft 0.21 drops both when it builds ``lora_A``)."""
    base, lora_a = layer.get_base_layer(), layer.lora_A[adapter_name]
    lora_a.dilation = base.dilation
    lora_a.padding_mode = base.padding_mode
    lora_a._reversed_padding_repeated_twice = list(base._reversed_padding_repeated_twice)


def _apply_3697() -> None:
    conv_nd = _lora_conv_base()
    if "3697" in _UNPATCHED:
        return
    original = conv_nd.update_layer
    _UNPATCHED["3697"] = original

    def update_layer(self, adapter_name, *args, **kwargs):
        original(self, adapter_name, *args, **kwargs)
        if adapter_name in self.lora_A:
            _copy_spatial_geometry(self, adapter_name)

    update_layer.__doc__ = original.__doc__
    conv_nd.update_layer = update_layer


def _needs_3697() -> bool:
    from peft import LoraConfig

    layer = _probe_lora_conv(nn.Conv2d(2, 3, 3, padding=2, dilation=2, padding_mode="reflect"))
    original = _UNPATCHED.get("3697", _lora_conv_base().update_layer)
    original(layer, "unpatched", r=1, lora_alpha=1, config=LoraConfig(r=1, lora_alpha=1))
    lora_a, base = layer.lora_A["unpatched"], layer.get_base_layer()
    return lora_a.dilation != base.dilation or lora_a.padding_mode != base.padding_mode


PEFT_WORKAROUNDS: dict[str, PeftWorkaround] = {
    "lora-conv3d-pointwise-merge": PeftWorkaround(
        issue="huggingface/peft#3768",
        summary="merging LoRA into a Conv3d with a 1x1x1 or (1, 1, k) kernel raises a shape error",
        fixed_in="0.22.0",  # huggingface/peft#3777, merged after 0.21.2
        apply=_apply_3768,
        still_needed=_needs_3768,
    ),
    "lora-conv-dilation-padding-mode": PeftWorkaround(
        issue="huggingface/peft#3697",
        summary="LoRA's lora_A conv ignores the base conv's dilation and padding_mode: a dilated conv with int padding "
        "fails in forward, with padding='same' or a non-zeros padding mode the unmerged output silently differs "
        "from the merged one",
        fixed_in=None,  # huggingface/peft#3758 is open
        apply=_apply_3697,
        still_needed=_needs_3697,
    ),
}


def apply_peft_workarounds() -> list[str]:
    """Apply every workaround of :data:`PEFT_WORKAROUNDS` gated on the installed peft; returns their keys."""
    applied = []
    for key, workaround in PEFT_WORKAROUNDS.items():
        if workaround.gated_on():
            workaround.apply()
            applied.append(key)
    return applied


# ------------------------------------------------------------------------------------------ custom LoRA layers
def lora_conv_layer_classes() -> dict[type[nn.Module], type[nn.Module]]:
    """peft's LoRA layer class for each conv type it wraps: ``{nn.Conv1d: lora.layer.Conv1d, ...}``."""
    from peft.tuners.lora import layer as lora_layer

    return {nn.Conv1d: lora_layer.Conv1d, nn.Conv2d: lora_layer.Conv2d, nn.Conv3d: lora_layer.Conv3d}


def register_custom_lora_layers(config, mapping: dict[type[nn.Module], type[nn.Module]]) -> None:
    """Make peft build ``mapping[type(base)]`` instead of its own LoRA layer for the targets of ``config``.

    peft's experimental ``LoraConfig._register_custom_module``: the mapping lives on the config object only (it is
    not written to ``adapter_config.json``), and it applies where peft creates a new LoRA layer (a second adapter on
    an existing layer keeps that layer's class).
    """
    config._register_custom_module(mapping)
