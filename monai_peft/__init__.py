"""monai-peft: parameter-efficient fine-tuning (ConvAdapter, LoRA, SSF, selective baselines) for MONAI and nnU-Net.

Importing this package checks the installed peft against the supported range (an ``ImportError`` names both), patches
the LoRA bugs of that peft release (``monai_peft._peft_compat.PEFT_WORKAROUNDS``) and registers ConvAdapter, SSF,
VPT and bottleneck adapters as peft methods, so ``peft.get_peft_model``, ``save_pretrained`` and
``PeftModel.from_pretrained`` work with their configs.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

__version__ = "0.1.0"

# public name -> the module that defines it (bound on first use, and all at once by _load_api)
_EXPORTS: dict[str, str] = {
    "ConvAdapterConfig": "monai_peft.tuners.conv_adapter",
    "ConvAdapterModel": "monai_peft.tuners.conv_adapter",
    "SSFConfig": "monai_peft.tuners.ssf",
    "SSFModel": "monai_peft.tuners.ssf",
    "adapt": "monai_peft.adapt",
    "METHODS": "monai_peft.adapt",
    "default_targets": "monai_peft.adapt",
    "lora_config": "monai_peft.lora",
    "init_lora_pca_": "monai_peft.lora",
    "Region": "monai_peft.targeting",
    "ModuleType": "monai_peft.targeting",
    "NameRegex": "monai_peft.targeting",
    "Names": "monai_peft.targeting",
    "KernelSize": "monai_peft.targeting",
    "resolve_targets": "monai_peft.targeting",
    "register_regions": "monai_peft.regions",
    "regions_of": "monai_peft.regions",
    "default_learning_rate": "monai_peft.defaults",
    "DEFAULT_LEARNING_RATES": "monai_peft.defaults",
    "parameter_report": "monai_peft.report",
    "ParameterReport": "monai_peft.report",
    "VPTConfig": "monai_peft.tuners.vpt",
    "VPTModel": "monai_peft.tuners.vpt",
    "BottleneckAdapterConfig": "monai_peft.tuners.bottleneck",
    "BottleneckAdapterModel": "monai_peft.tuners.bottleneck",
    "enable_activation_checkpointing": "monai_peft.memory",
    "register_checkpoint_block": "monai_peft.memory",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'monai_peft' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def _load_api() -> None:
    """What ``import monai_peft`` does: check the installed peft (an ``ImportError`` names it and the supported
    range), patch its LoRA bugs, register monai-peft's methods with peft and bind the public names."""
    from monai_peft._peft_compat import apply_peft_workarounds, check_peft_version, register_monai_peft_methods

    check_peft_version()
    apply_peft_workarounds()
    register_monai_peft_methods()
    for name in _EXPORTS:
        __getattr__(name)


def _started_as_console_script() -> bool:
    # The ``monai-peft`` script imports this package before it parses its arguments; torch, peft and transformers
    # take seconds to import, so there the work waits until a command runs (monai_peft.cli.main calls _load_api)
    # and ``monai-peft --help`` answers at once.
    argv = getattr(sys, "argv", None) or [""]
    return os.path.basename(argv[0]).split(".")[0] == "monai-peft"


if not _started_as_console_script():
    _load_api()
