"""Factories for SuPreM's 3D backbones (thesis 4.2.1, Table 4.1): SegResNet (4.70M) and UNet3D (19.08M)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from monai.networks.nets import SegResNet

from monai_peft.networks.unet3d import UNet3D

__all__ = ["SUPREM_SEGRESNET_KWARGS", "suprem_segresnet", "suprem_unet", "suprem_backbone", "BACKBONES"]

# SuPreM's SegResNet: the exact MONAI arguments of its released 2100-CT checkpoint (thesis Table 4.1: 4.7M).
SUPREM_SEGRESNET_KWARGS: dict[str, Any] = {
    "spatial_dims": 3,
    "blocks_down": (1, 2, 2, 4),
    "blocks_up": (1, 1, 1),
    "init_filters": 16,
    "in_channels": 1,
    "dropout_prob": 0.0,
}

BACKBONES = ("segresnet", "unet")


def suprem_segresnet(out_channels: int, pretrained: str | Path | None = None, in_channels: int = 1) -> SegResNet:
    """MONAI ``SegResNet`` with SuPreM's configuration, optionally loaded from a SuPreM checkpoint.

    Args:
        out_channels: number of output classes of the new head (``conv_final.2.conv``).
        pretrained: path to ``supervised_suprem_segresnet_2100.pth`` (or a file in the same layout); ``None``
            keeps random initialisation. Nothing is downloaded.
        in_channels: input channels (1 for CT; SuPreM's weights need 1).

    Returns:
        ``SegResNet`` mapping ``(B, in_channels, H, W, D)`` (``H, W, D`` divisible by 8) to logits
        ``(B, out_channels, H, W, D)``.
    """
    if out_channels < 1:
        raise ValueError(f"suprem_segresnet: out_channels must be >= 1, got {out_channels}.")
    model = SegResNet(**{**SUPREM_SEGRESNET_KWARGS, "in_channels": in_channels}, out_channels=out_channels)
    if pretrained is not None:
        from monai_peft.checkpoints import load_suprem_checkpoint

        load_suprem_checkpoint(model, pretrained, backbone="segresnet")
    return model


def suprem_unet(
    out_channels: int, pretrained: str | Path | None = None, in_channels: int = 1, running_stats: bool = False
) -> UNet3D:
    """SuPreM's :class:`UNet3D`, optionally loaded from a SuPreM checkpoint.

    Args:
        out_channels: number of output classes of the new head (``out_tr.final_conv``).
        pretrained: path to ``supervised_suprem_unet_2100.pth`` (or a file in the same layout); ``None`` keeps
            random initialisation. Nothing is downloaded.
        in_channels: input channels (1 for CT; SuPreM's weights need 1).
        running_stats: ``False`` (default): SuPreM's batch-statistics BN; ``True``: running statistics in eval.

    Returns:
        :class:`UNet3D` mapping ``(B, in_channels, H, W, D)`` to logits ``(B, out_channels, H, W, D)``.
    """
    model = UNet3D(in_channels=in_channels, out_channels=out_channels, running_stats=running_stats)
    if pretrained is not None:
        from monai_peft.checkpoints import load_suprem_checkpoint

        load_suprem_checkpoint(model, pretrained, backbone="unet")
    return model


def suprem_backbone(name: str, out_channels: int, pretrained: str | Path | None = None, **kwargs: Any):
    """Build a SuPreM backbone by name.

    Args:
        name: ``"segresnet"`` or ``"unet"`` (``"unet3d"`` is accepted as an alias).
        out_channels: number of output classes.
        pretrained: optional SuPreM checkpoint path.
        kwargs: passed to :func:`suprem_segresnet` or :func:`suprem_unet`.
    """
    key = name.lower()
    if key == "segresnet":
        return suprem_segresnet(out_channels, pretrained, **kwargs)
    if key in ("unet", "unet3d"):
        return suprem_unet(out_channels, pretrained, **kwargs)
    raise ValueError(f"backbone must be one of {BACKBONES}, got {name!r}.")
