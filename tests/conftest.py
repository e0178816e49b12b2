"""Shared fixtures: small but real networks of the three families the core must handle."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
# the real example CT/MR as the package ships them (monai_peft/data/totalseg_example)
TOTALSEG_EXAMPLE = REPO / "monai_peft" / "data" / "totalseg_example"


def segresnet() -> nn.Module:
    """The SuPreM SegResNet layout named in issue 2 (4.70M parameters), 3 output classes."""
    from monai.networks.nets import SegResNet

    return SegResNet(spatial_dims=3, init_filters=16, blocks_down=(1, 2, 2, 4), blocks_up=(1, 1, 1),
                     in_channels=1, out_channels=3)


def basicunet() -> nn.Module:
    from monai.networks.nets import BasicUNet

    return BasicUNet(spatial_dims=3, in_channels=1, out_channels=3, features=(8, 8, 16, 32, 64, 8))


class TwoConvBlock(nn.Module):
    """A user-written residual block: conv-bn-relu-conv-bn + (strided 1x1) shortcut, optional channel change."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity() if (cin == cout and stride == 1) else nn.Conv2d(cin, cout, 1, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(h)) + self.shortcut(x))


class SmallCNN2d(nn.Module):
    """A 2D segmentation CNN with its own blocks and a declared region map (encoder / decoder / head)."""

    peft_regions = {"encoder": [r"stem", r"enc\d"], "decoder": [r"up", r"dec\d"], "head": [r"head"]}

    def __init__(self, in_channels: int = 1, classes: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1), nn.GroupNorm(4, 8), nn.ReLU())
        self.enc1 = TwoConvBlock(8, 16, stride=2)
        self.enc2 = TwoConvBlock(16, 16)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.dec1 = TwoConvBlock(16, 8)
        self.head = nn.Conv2d(8, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dec1(self.up(self.enc2(self.enc1(self.stem(x))))))


def small_cnn2d() -> nn.Module:
    return SmallCNN2d()


NETWORKS = {
    "segresnet": (segresnet, (1, 1, 16, 16, 16)),
    "basicunet": (basicunet, (1, 1, 32, 32, 32)),
    "cnn2d": (small_cnn2d, (2, 1, 16, 16)),
}


def make(name: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    factory, shape = NETWORKS[name]
    torch.manual_seed(seed)
    model = factory().eval()
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed + 1))
    return model, x


@pytest.fixture
def tiny_segresnet() -> nn.Module:
    from monai.networks.nets import SegResNet

    torch.manual_seed(0)
    return SegResNet(spatial_dims=3, init_filters=8, blocks_down=(1, 2), blocks_up=(1,), in_channels=1,
                     out_channels=2).eval()
