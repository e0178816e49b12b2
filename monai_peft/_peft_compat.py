"""Every place where monai-peft reaches into peft's internals, in one module.

peft (0.17-0.21) keeps the list of methods in the closed enum ``peft.utils.PeftType`` and refuses to register a
method whose name is not a member of it (``register_peft_method``). monai-peft therefore

1. adds its members (``CONV_ADAPTER``, ``SSF``) to ``PeftType`` so that configs serialise as
   ``"peft_type": "CONV_ADAPTER"`` and ``PeftConfig.from_pretrained`` / ``PeftModel.from_pretrained`` find them again;
2. calls peft's public ``register_peft_method`` for each method.

Everything else monai-peft needs from peft goes through public or documented-for-tuner-authors API
(``BaseTuner``, ``BaseTunerLayer``, ``check_adapters_to_merge``). :func:`check_peft_compat` verifies all of it and is
run by the test suite, so a peft upgrade that moves one of these pieces fails loudly in one place.
"""

from __future__ import annotations

import enum

from peft.utils import PeftType

__all__ = ["MONAI_PEFT_TYPES", "add_peft_type", "register_monai_peft_methods", "check_peft_compat"]

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
    if problems:
        raise RuntimeError("monai-peft is incompatible with the installed peft: " + "; ".join(problems))
