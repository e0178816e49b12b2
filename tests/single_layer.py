"""``Wrap``: a network holding one layer under the name ``layer``, so a test can target ``"layer"`` with any peft
config and read the adapted layer back as ``peft_model.base_model.model.layer``."""

from __future__ import annotations

import torch
from torch import nn


class Wrap(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)
