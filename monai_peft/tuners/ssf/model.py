"""SSF tuner: follows the targeted convs, norms and linear layers with a per-channel scale and shift."""

from __future__ import annotations

from peft.tuners.tuners_utils import BaseTuner
from torch import nn

from monai_peft.tuners._common import AtomicInjectMixin, ReplaceModuleMixin, StrictLoadMixin
from monai_peft.tuners.frozen_norm import keep_frozen_batchnorm_statistics

from .config import SSFConfig
from .layer import SUPPORTED_TYPES, SSFLayer, SSFModule


class SSFModel(AtomicInjectMixin, ReplaceModuleMixin, StrictLoadMixin, BaseTuner):
    """Use through peft: ``peft.get_peft_model(model, SSFConfig(target_modules=[...]))``; thesis 001, 3.2.3.

    If any target cannot take SSF, the error names it and no module is wrapped. Frozen batch norms keep their
    running statistics while the adapters train (:mod:`monai_peft.tuners.frozen_norm`).
    """

    prefix: str = "ssf_"
    tuner_layer_cls = SSFLayer
    target_module_mapping: dict[str, list[str]] = {}

    def _prepare_adapter_config(self, peft_config: SSFConfig, model_config: dict) -> SSFConfig:
        if peft_config.target_modules is None:
            raise ValueError(
                "SSFConfig.target_modules is required for CNNs: list the convs/norms to follow with SSF, e.g. "
                "monai_peft.resolve_targets(model, Region('encoder') & ModuleType(nn.Conv3d)), "
                "or use monai_peft.adapt(model, 'ssf')."
            )
        return peft_config

    def _post_injection_hook(self, model: nn.Module, config: SSFConfig, adapter_name: str) -> None:
        keep_frozen_batchnorm_statistics(model)

    def _create_and_replace(self, peft_config, adapter_name, target, target_name, parent, current_key, **kwargs):
        if isinstance(target, SSFLayer):
            target.update_layer(adapter_name, peft_config, inference_mode=peft_config.inference_mode)
            return
        if not isinstance(target, SUPPORTED_TYPES):
            raise TypeError(
                f"SSF cannot follow '{current_key}' ({type(target).__name__}); supported: "
                f"{', '.join(t.__name__ for t in SUPPORTED_TYPES)}."
            )
        try:
            new_module = SSFModule(target, adapter_name, peft_config)
        except TypeError as e:
            raise TypeError(f"SSF on '{current_key}': {e}") from e
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)
