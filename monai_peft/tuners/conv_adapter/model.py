"""ConvAdapter tuner: decides which modules get a :class:`ConvAdapterModule` (thesis 001, 3.2.2)."""

from __future__ import annotations

from peft.tuners.tuners_utils import BaseTuner
from torch import nn

from monai_peft.targeting import CONV_TYPES
from monai_peft.tuners._common import ReplaceModuleMixin, StrictLoadMixin

from .config import ConvAdapterConfig
from .layer import ConvAdapterLayer, ConvAdapterModule

_UNSUPPORTED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear, nn.Embedding)


class ConvAdapterModel(ReplaceModuleMixin, StrictLoadMixin, BaseTuner):
    """Wraps the targeted convs / residual blocks of a CNN with ConvAdapters.

    Use through peft: ``peft.get_peft_model(model, ConvAdapterConfig(target_modules=[...]))``.
    Targets are ``Conv1d/2d/3d`` modules or blocks containing convolutions whose ``forward`` takes one tensor.
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

    def _create_and_replace(self, peft_config, adapter_name, target, target_name, parent, current_key, **kwargs):
        if isinstance(target, ConvAdapterLayer):
            target.update_layer(adapter_name, peft_config, inference_mode=peft_config.inference_mode)
            return
        if isinstance(target, _UNSUPPORTED) or not any(isinstance(m, CONV_TYPES) for m in target.modules()):
            raise TypeError(
                f"ConvAdapter cannot adapt '{current_key}' ({type(target).__name__}): targets must be Conv1d/2d/3d "
                "modules or blocks containing convolutions (transposed convs and linear layers are not supported)."
            )
        try:
            new_module = ConvAdapterModule(target, adapter_name, peft_config)
        except (TypeError, ValueError) as e:
            raise type(e)(f"ConvAdapter on '{current_key}': {e}") from e
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)
