"""Bottleneck adapters (Houlsby et al. 2019; parallel, He et al. 2022) as a peft method; lecture 003."""

from .config import BottleneckAdapterConfig
from .layer import BottleneckAdapterLayer, BottleneckAdapterModule
from .model import BottleneckAdapterModel, default_bottleneck_targets

__all__ = ["BottleneckAdapterConfig", "BottleneckAdapterLayer", "BottleneckAdapterModule", "BottleneckAdapterModel",
           "default_bottleneck_targets"]
