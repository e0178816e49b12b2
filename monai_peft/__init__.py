"""monai-peft: parameter-efficient fine-tuning (ConvAdapter, LoRA, SSF, selective baselines) for MONAI and nnU-Net.

Importing this package checks the installed peft against the supported range (an ``ImportError`` names both), patches
the LoRA bugs of that peft release (``monai_peft._peft_compat.PEFT_WORKAROUNDS``) and registers ConvAdapter and SSF
as peft methods, so ``peft.get_peft_model``, ``save_pretrained`` and ``PeftModel.from_pretrained`` work with
:class:`ConvAdapterConfig` and :class:`SSFConfig`.
"""

from monai_peft._peft_compat import check_peft_version as _check_peft_version

_check_peft_version()

from monai_peft._peft_compat import apply_peft_workarounds as _apply_peft_workarounds  # noqa: E402
from monai_peft._peft_compat import register_monai_peft_methods as _register  # noqa: E402

_apply_peft_workarounds()
_register()

from monai_peft.adapt import METHODS, adapt, default_targets  # noqa: E402
from monai_peft.lora import init_lora_pca_, lora_config  # noqa: E402
from monai_peft.memory import enable_activation_checkpointing, register_checkpoint_block  # noqa: E402
from monai_peft.regions import register_regions, regions_of  # noqa: E402
from monai_peft.report import ParameterReport, parameter_report  # noqa: E402
from monai_peft.targeting import KernelSize, ModuleType, Names, NameRegex, Region, resolve_targets  # noqa: E402
from monai_peft.tuners.conv_adapter import ConvAdapterConfig, ConvAdapterModel  # noqa: E402
from monai_peft.tuners.ssf import SSFConfig, SSFModel  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "ConvAdapterConfig", "ConvAdapterModel", "SSFConfig", "SSFModel", "adapt", "METHODS", "default_targets",
    "lora_config", "init_lora_pca_", "Region", "ModuleType", "NameRegex", "Names", "KernelSize", "resolve_targets",
    "register_regions", "regions_of", "parameter_report", "ParameterReport", "enable_activation_checkpointing",
    "register_checkpoint_block",
]
