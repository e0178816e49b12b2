"""SSF (Lian et al. 2022) as a peft method; thesis 001, section 3.2.3."""

from .config import SSFConfig
from .layer import SSFLayer, SSFModule
from .model import SSFModel

__all__ = ["SSFConfig", "SSFLayer", "SSFModule", "SSFModel"]
