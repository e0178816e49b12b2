"""ConvAdapter (Chen et al. 2022) as a peft method; thesis 001, section 3.2.2."""

from .config import ConvAdapterConfig
from .layer import ConvAdapterLayer, ConvAdapterModule
from .model import ConvAdapterModel

__all__ = ["ConvAdapterConfig", "ConvAdapterLayer", "ConvAdapterModule", "ConvAdapterModel"]
