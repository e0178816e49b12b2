"""Bottleneck adapter tuner: decides which Linear layers / transformer branches get a bottleneck adapter."""

from __future__ import annotations

from typing import Optional

from peft.tuners.tuners_utils import BaseTuner
from torch import nn

from monai_peft.tuners._common import AtomicInjectMixin, ReplaceModuleMixin, StrictLoadMixin, exact_names_regex
from monai_peft.tuners.transformer_blocks import FAMILIES, family_of, find_blocks, token_width, unwrap

from .config import BottleneckAdapterConfig
from .layer import BottleneckAdapterLayer, BottleneckAdapterModule

__all__ = ["BottleneckAdapterModel", "default_bottleneck_targets"]


def default_bottleneck_targets(model: nn.Module, insertion: str = "sequential") -> list[str]:
    """Names of the modules :class:`BottleneckAdapterConfig` ``(target_modules=None)`` adapts in ``model``.

    For each block of a known family: the attention branch and the MLP branch (for ``"sequential"`` on VideoMAE, the
    MLP's output Linear ``output.dense``, because VideoMAE's ``output`` module adds the residual itself).

    Raises:
        ValueError: ``model`` has no block of a known family (the message names the model class).
    """
    blocks = find_blocks(model)
    if not blocks:
        raise ValueError(
            f"BottleneckAdapterConfig(target_modules=None): {type(model).__name__} contains no transformer block of a "
            f"known family ({', '.join(f.name for f in FAMILIES)}); pass target_modules (nn.Linear layers or "
            "attention/MLP branch modules)."
        )
    return [f"{name}.{fam.branch(insertion, which)}" for name, _, fam in blocks for which in ("attention", "mlp")]


class BottleneckAdapterModel(AtomicInjectMixin, ReplaceModuleMixin, StrictLoadMixin, BaseTuner):
    """Houlsby (sequential) or parallel bottleneck adapters in the transformer blocks of a model.

    Use through peft: ``peft.get_peft_model(model, BottleneckAdapterConfig())``; lecture 003 ("Adaptor").
    """

    prefix: str = "bottleneck_"
    tuner_layer_cls = BottleneckAdapterLayer
    target_module_mapping: dict[str, list[str]] = {}

    def _prepare_adapter_config(self, peft_config: BottleneckAdapterConfig,
                                model_config: dict) -> BottleneckAdapterConfig:
        if peft_config.target_modules is None:
            targets = default_bottleneck_targets(self.model, peft_config.insertion)
            peft_config.target_modules = exact_names_regex(targets)
        return peft_config

    @staticmethod
    def _site(target: nn.Module, target_name: str, parent: nn.Module,
              current_key: str) -> tuple[int, int, Optional[nn.Module]]:
        """``(in_features, out_features, input_norm)`` of a target, or TypeError naming it."""
        if isinstance(target, nn.Linear):
            return target.in_features, target.out_features, None
        block = unwrap(parent)
        fam = family_of(block)
        if fam is not None and target_name in (fam.attention, fam.mlp):
            width = token_width(block, fam)
            norm = block.get_submodule(fam.mlp_input_norm) if target_name == fam.mlp and fam.mlp_input_norm else None
            return width, width, norm
        raise TypeError(
            f"bottleneck adapter cannot wrap '{current_key}' ({type(target).__name__}): targets are nn.Linear layers "
            f"or the attention / MLP branch of a block of a known family ({', '.join(f.name for f in FAMILIES)})."
        )

    def _create_and_replace(self, peft_config, adapter_name, target, target_name, parent, current_key, **kwargs):
        try:
            if isinstance(target, BottleneckAdapterLayer):
                target.update_layer(adapter_name, peft_config, inference_mode=peft_config.inference_mode)
                return
            d_in, d_out, norm = self._site(target, target_name, parent, current_key)
            new_module = BottleneckAdapterModule(target, adapter_name, peft_config, d_in, d_out, norm)
        except TypeError as e:
            message = str(e) if current_key in str(e) else f"bottleneck adapter on '{current_key}': {e}"
            raise TypeError(message) from e
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)
