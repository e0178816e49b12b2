"""VPT tuner: decides which transformer blocks take prompts, and each block's role (deep / shallow window)."""

from __future__ import annotations

from collections import defaultdict

from peft.tuners.tuners_utils import BaseTuner, check_target_module_exists
from torch import nn

from monai_peft.tuners._common import AtomicInjectMixin, ReplaceModuleMixin, StrictLoadMixin, exact_names_regex
from monai_peft.tuners.transformer_blocks import (BlockFamily, FAMILIES, import_class, family_of, find_blocks,
                                                  token_width, unwrap)

from .config import VPTConfig
from .layer import VPTLayer, VPTModule

__all__ = ["VPTModel", "default_vpt_targets", "count_class_tokens", "prompt_site"]

_KNOWN = ", ".join(f.name for f in FAMILIES)
# networks that reshape the outputs of intermediate blocks into spatial maps: VPT-shallow's prompts, which travel
# through those blocks, would not fit (VPT-deep drops its prompts after each block and works)
_READS_BLOCK_OUTPUTS = ("monai.networks.nets.unetr.UNETR",)


def default_vpt_targets(model: nn.Module) -> list[str]:
    """Names of the modules :class:`VPTConfig` ``(target_modules=None)`` prompts: every block of a known family
    (for Segformer, each block's attention).

    Raises:
        ValueError: ``model`` has no such block, e.g. a CNN (the message names the model class).
    """
    blocks = find_blocks(model)
    if not blocks:
        raise ValueError(
            f"VPTConfig(target_modules=None): {type(model).__name__} contains no transformer block that takes a token "
            f"sequence (known: {_KNOWN}); visual prompts need one. Pass target_modules naming such blocks."
        )
    return [f"{name}.{fam.prompt_site}" if fam.prompt_site else name for name, _, fam in blocks]


def count_class_tokens(model: nn.Module) -> int:
    """1 if ``model`` has a parameter named ``cls_token`` (the class token VPT keeps in front), else 0."""
    return int(any(n.rpartition(".")[2] == "cls_token" for n, _ in model.named_parameters()))


def prompt_site(target: nn.Module, target_name: str, parent: nn.Module, key: str) -> tuple[str, int, BlockFamily]:
    """``(kind, token width, family)`` for a VPT target, or TypeError naming it.

    ``kind`` is ``"sequence"`` for a block that takes the prompts in its token sequence and ``"key_value"`` for the
    attention of a block that joins them to its key/value sequence (Segformer).
    """
    target = unwrap(target)
    fam = family_of(target)
    if fam is not None and not fam.prompt_site:
        if fam.name.startswith("MONAI"):
            attn = target.attn
            if getattr(attn, "causal", False) or getattr(attn, "rel_positional_embedding", None) is not None:
                raise TypeError(f"VPT cannot prompt '{key}' (TransformerBlock): its attention is causal or uses "
                                "relative position embeddings, which have no entry for prompt tokens.")
        return "sequence", token_width(target, fam), fam
    if fam is not None:
        raise TypeError(f"VPT cannot prompt '{key}' ({type(target).__name__}): {fam.name} blocks reshape their tokens "
                        f"to a spatial map; target its '{fam.prompt_site}' ('{key}.{fam.prompt_site}'), where the "
                        "prompts join the key/value sequence.")
    block = unwrap(parent)
    parent_fam = family_of(block)
    if parent_fam is not None and parent_fam.prompt_site and target_name == parent_fam.prompt_site:
        if not all(hasattr(target, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj", "sequence_reduction_ratio")):
            raise TypeError(f"VPT cannot prompt '{key}' ({type(target).__name__}): expected the transformers>=5 "
                            "SegformerAttention (q_proj/k_proj/v_proj/o_proj, sequence_reduction_ratio).")
        return "key_value", token_width(block, parent_fam), parent_fam
    raise TypeError(
        f"VPT cannot prompt '{key}' ({type(target).__name__}): it is not a transformer block that takes a token "
        f"sequence (known: {_KNOWN}; for Segformer, a block's attention)."
    )


def _group(key: str) -> str:
    """The block list ``key`` belongs to: its name with the last numeric part replaced by ``*``."""
    parts = key.split(".")
    for i in range(len(parts) - 1, -1, -1):
        if parts[i].isdigit():
            return ".".join(parts[:i] + ["*"] + parts[i + 1:])
    return key


class VPTModel(AtomicInjectMixin, ReplaceModuleMixin, StrictLoadMixin, BaseTuner):
    """Visual prompts in the transformer blocks of a model (Jia et al. 2022; lecture 003).

    Use through peft: ``peft.get_peft_model(model, VPTConfig(variant="deep"))``.
    """

    prefix: str = "vpt_"
    tuner_layer_cls = VPTLayer
    target_module_mapping: dict[str, list[str]] = {}

    def _prepare_adapter_config(self, peft_config: VPTConfig, model_config: dict) -> VPTConfig:
        if peft_config.target_modules is None:
            peft_config.target_modules = exact_names_regex(default_vpt_targets(self.model))
        if peft_config.num_prefix_tokens is None:
            peft_config.num_prefix_tokens = count_class_tokens(self.model)
        if peft_config.variant == "shallow":
            readers = tuple(c for c in map(import_class, _READS_BLOCK_OUTPUTS) if c is not None)
            for name, m in self.model.named_modules():
                if readers and isinstance(m, readers):
                    raise ValueError(f"VPT-shallow on '{name or type(m).__name__}' ({type(m).__name__}): it reshapes "
                                     "intermediate block outputs into feature maps, which would carry the prompts; "
                                     "use variant='deep'.")
        return peft_config

    def inject_adapter(self, model: nn.Module, adapter_name: str, autocast_adapter_dtype: bool = True,
                       low_cpu_mem_usage: bool = False, state_dict=None) -> None:
        if state_dict is not None:
            raise ValueError("VPT adapters are placed from their config (a shallow window needs its last block, which "
                             "holds no weights), not from state_dict keys; inject without state_dict.")
        try:
            super().inject_adapter(model, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype,
                                   low_cpu_mem_usage=low_cpu_mem_usage)
        finally:
            self.__dict__.get("_vpt_plans", {}).pop(adapter_name, None)

    def _plan(self, config: VPTConfig, adapter_name: str) -> dict[str, str]:
        """``{module name: role}`` for every block that does something with this adapter's prompts."""
        tuner_layers = [n for n, m in self.model.named_modules() if isinstance(m, VPTLayer)]
        groups: dict[str, list[tuple[str, str]]] = defaultdict(list)
        modules = dict(self.model.named_modules())
        for key, module in modules.items():
            if not key or any(key.startswith(t + ".") for t in tuner_layers) or ".modules_to_save." in f".{key}.":
                continue
            if check_target_module_exists(config, key):
                parent_key, _, name = key.rpartition(".")
                kind, _, _ = prompt_site(module, name, modules[parent_key] if parent_key else self.model, key)
                groups[_group(key)].append((key, kind))
        plan: dict[str, str] = {}
        for group, members in groups.items():
            keys = [k for k, _ in members]
            if config.variant == "deep":
                plan.update({k: "deep" for k in keys})
            elif members[0][1] == "key_value" or len(keys) == 1:
                plan[keys[0]] = "open_close"
            else:
                plan[keys[0]], plan[keys[-1]] = "open", "close"
                self._check_same_window(group, keys[0], keys[-1], adapter_name)
        return plan

    def _check_same_window(self, group: str, first: str, last: str, adapter_name: str) -> None:
        """Shallow adapters on one block list must open and close at the same blocks (their prompts share a stretch
        of the sequence)."""
        windows: dict[str, dict[str, str]] = defaultdict(dict)
        for name, m in self.model.named_modules():
            if isinstance(m, VPTLayer) and _group(name) == group:
                for a, role in m.vpt_role.items():
                    if a != adapter_name and role in ("open", "close"):
                        windows[a][role] = name
        for other, w in windows.items():
            if (w.get("open"), w.get("close")) != (first, last):
                raise ValueError(f"VPT-shallow adapter '{adapter_name}' would span {first} .. {last}, but adapter "
                                 f"'{other}' spans {w.get('open')} .. {w.get('close')} of the same blocks; shallow "
                                 "adapters on one block list must share their first and last block.")

    def _create_and_replace(self, peft_config, adapter_name, target, target_name, parent, current_key, **kwargs):
        plans = self.__dict__.setdefault("_vpt_plans", {})
        if adapter_name not in plans:
            plans[adapter_name] = self._plan(peft_config, adapter_name)
        role = plans[adapter_name].get(current_key)
        if role is None:  # inside a shallow window: the block carries the prompts like any token
            return
        if isinstance(target, VPTLayer):
            target.update_layer(adapter_name, peft_config, role, inference_mode=peft_config.inference_mode)
            return
        kind, width, family = prompt_site(target, target_name, parent, current_key)
        new_module = VPTModule(target, adapter_name, peft_config, role, kind, width, family)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)
