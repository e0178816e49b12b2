"""Visual Prompt Tuning (Jia et al. 2022; shallow and deep) as a peft method; lecture 003."""

from .config import VPTConfig
from .layer import VPTLayer, VPTModule
from .model import VPTModel, count_class_tokens, default_vpt_targets

__all__ = ["VPTConfig", "VPTLayer", "VPTModule", "VPTModel", "count_class_tokens", "default_vpt_targets"]
