"""SuPreM 3D backbones: MONAI SegResNet with SuPreM's settings and the Models-Genesis ``UNet3D``."""

from __future__ import annotations

from monai_peft.networks.suprem import (
    BACKBONES,
    SUPREM_SEGRESNET_KWARGS,
    suprem_backbone,
    suprem_segresnet,
    suprem_unet,
)
from monai_peft.networks.unet3d import ContBatchNorm3d, DownTransition, LUConv, OutputTransition, UNet3D, UpTransition

__all__ = [
    "BACKBONES",
    "SUPREM_SEGRESNET_KWARGS",
    "ContBatchNorm3d",
    "DownTransition",
    "LUConv",
    "OutputTransition",
    "UNet3D",
    "UNET3D_REGIONS",
    "UpTransition",
    "suprem_backbone",
    "suprem_segresnet",
    "suprem_unet",
]

# thesis 5.1: encoder = down path, decoder = up path, head = 1x1x1 output conv (regexes on module names)
UNET3D_REGIONS: dict[str, list[str]] = {
    "encoder": [r"down_tr(64|128|256|512)"],
    "decoder": [r"up_tr(256|128|64)"],
    "head": [r"out_tr"],
}


def _register() -> None:
    from monai_peft.regions import register_regions

    register_regions(UNet3D, UNET3D_REGIONS)


_register()
