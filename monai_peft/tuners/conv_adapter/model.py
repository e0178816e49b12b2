"""ConvAdapter tuner: decides which modules get a :class:`ConvAdapterModule` (thesis 001, 3.2.2)."""

from __future__ import annotations

from peft.tuners.tuners_utils import BaseTuner
from torch import nn

from monai_peft.tuners._common import AtomicInjectMixin, ReplaceModuleMixin, StrictLoadMixin
from monai_peft.tuners.frozen_norm import keep_frozen_batchnorm_statistics

from .config import ConvAdapterConfig
from .layer import MERGE_ERROR, ConvAdapterLayer, ConvAdapterModule


class ConvAdapterModel(AtomicInjectMixin, ReplaceModuleMixin, StrictLoadMixin, BaseTuner):
    """Wraps the targeted convs, transposed convs and blocks of a CNN with ConvAdapters.

    Use through peft: ``peft.get_peft_model(model, ConvAdapterConfig(target_modules=[...]))``.
    Targets are ``Conv{1,2,3}d`` / ``ConvTranspose{1,2,3}d`` modules or blocks containing convolutions whose
    ``forward`` takes one tensor. If any target cannot take an adapter, the error names it and no module is wrapped.
    Frozen batch norms keep their running statistics while the adapters train (:mod:`monai_peft.tuners.frozen_norm`).
    """

    prefix: str = "conv_adapter_"
    tuner_layer_cls = ConvAdapterLayer
    target_module_mapping: dict[str, list[str]] = {}

    def _prepare_adapter_config(self, peft_config: ConvAdapterConfig, model_config: dict) -> ConvAdapterConfig:
        if peft_config.target_modules is None:
            raise ValueError(
                "ConvAdapterConfig.target_modules is required for CNNs: list the convs/blocks to adapt, e.g. "
                "monai_peft.resolve_targets(model, Region('encoder') & ModuleType(ResBlock)), "
                "or use monai_peft.adapt(model, 'convadapter'), which picks the residual blocks."
            )
        return peft_config

    def _post_injection_hook(self, model: nn.Module, config: ConvAdapterConfig, adapter_name: str) -> None:
        keep_frozen_batchnorm_statistics(model)

    def _check_merge_allowed(self) -> None:
        raise ValueError(MERGE_ERROR)

    def _create_and_replace(self, peft_config, adapter_name, target, target_name, parent, current_key, **kwargs):
        try:
            if isinstance(target, ConvAdapterLayer):
                target.update_layer(adapter_name, peft_config, inference_mode=peft_config.inference_mode)
                return
            if isinstance(target, nn.Embedding):
                raise TypeError(
                    "Embedding is not a convolution: ConvAdapter adapts Conv1d/2d/3d, ConvTranspose1d/2d/3d, Linear "
                    "and blocks containing convs"
                )
            new_module = ConvAdapterModule(target, adapter_name, peft_config)
        except (TypeError, ValueError) as e:
            raise type(e)(f"ConvAdapter cannot adapt '{current_key}' ({type(target).__name__}): {e}") from e
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)
