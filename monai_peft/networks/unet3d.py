"""SuPreM's 3D UNet (the Models Genesis ``UNet3D``), written so SuPreM's released weights load key for key.

Module names follow SuPreM / Models Genesis exactly (thesis 2.2.1.2, 4.2.1; 19.08M parameters with one input
channel): ``down_tr64``, ``down_tr128``, ``down_tr256``, ``down_tr512`` (encoder), ``up_tr256``, ``up_tr128``,
``up_tr64`` (decoder) and ``out_tr`` (the 1x1x1 head). Each transition holds ``ops``, a ``Sequential`` of two
:class:`LUConv` blocks (``conv1`` 3x3x3 conv, ``bn1`` batch norm, ReLU).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ContBatchNorm3d", "LUConv", "DownTransition", "UpTransition", "OutputTransition", "UNet3D"]


class ContBatchNorm3d(nn.BatchNorm3d):
    """3D batch norm that always normalises with the statistics of the current batch (SuPreM's BN).

    SuPreM and Models Genesis train and infer with ``ContBatchNorm3d``, which calls ``F.batch_norm`` with
    ``training=True`` in both modes; running statistics are still updated (and saved) but never used. The
    parameters and buffers are those of :class:`torch.nn.BatchNorm3d`, so checkpoints are interchangeable.

    Args:
        num_features: number of channels ``C`` of the ``(B, C, H, W, D)`` input.
        eps, momentum, affine, track_running_stats: as in :class:`torch.nn.BatchNorm3d`.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if input.dim() != 5:
            raise ValueError(f"ContBatchNorm3d expects a 5D input (B, C, H, W, D), got shape {tuple(input.shape)}.")
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
        # batch statistics in train AND eval mode; running buffers only updated while training
        update = self.training and self.track_running_stats
        return F.batch_norm(
            input,
            self.running_mean if update else None,
            self.running_var if update else None,
            self.weight,
            self.bias,
            True,
            momentum,
            self.eps,
        )


class LUConv(nn.Module):
    """3x3x3 convolution, batch norm and ReLU (Models Genesis ``LUConv``).

    Args:
        in_channels: input channels.
        out_channels: output channels.
        running_stats: ``False`` (default, SuPreM): :class:`ContBatchNorm3d`, batch statistics always;
            ``True``: :class:`torch.nn.BatchNorm3d`, running statistics in eval mode.
    """

    def __init__(self, in_channels: int, out_channels: int, running_stats: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(in_channels, out_channels, kernel_size=3, padding=1)
        self.bn1 = nn.BatchNorm3d(out_channels) if running_stats else ContBatchNorm3d(out_channels)
        self.activation = nn.ReLU()  # not in-place: adapters and Grad-CAM hooks read these tensors

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_channels, H, W, D)`` -> ``(B, out_channels, H, W, D)``."""
        return self.activation(self.bn1(self.conv1(x)))


def _make_nconv(in_channels: int, depth: int, double_channel: bool, running_stats: bool) -> nn.Sequential:
    # Models Genesis channel pattern: encoder 32*2^d -> 64*2^d, decoder 64*2^d -> 64*2^d
    if double_channel:
        mid = out = 32 * 2 ** (depth + 1)
    else:
        mid, out = 32 * 2**depth, 32 * 2**depth * 2
    return nn.Sequential(LUConv(in_channels, mid, running_stats), LUConv(mid, out, running_stats))


class DownTransition(nn.Module):
    """Two :class:`LUConv` (``ops``) then 2x max pooling, except at the deepest level (``depth == 3``).

    Args:
        in_channels: input channels.
        depth: level 0..3; outputs ``64 * 2**depth`` channels.
        running_stats: see :class:`LUConv`.
    """

    def __init__(self, in_channels: int, depth: int, running_stats: bool = False) -> None:
        super().__init__()
        self.ops = _make_nconv(in_channels, depth, double_channel=False, running_stats=running_stats)
        self.maxpool = nn.MaxPool3d(2)
        self.current_depth = depth

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(pooled, before_pool)``; both the same tensor at depth 3."""
        before_pool = self.ops(x)
        if self.current_depth == 3:
            return before_pool, before_pool
        return self.maxpool(before_pool), before_pool


class UpTransition(nn.Module):
    """Transposed conv (``up_conv``, k=2, s=2), concatenation with the skip, then two :class:`LUConv` (``ops``).

    Args:
        in_channels: channels of the deeper feature map.
        out_channels: channels produced by ``up_conv``.
        depth: level 0..2; outputs ``64 * 2**depth`` channels.
        running_stats: see :class:`LUConv`.
    """

    def __init__(self, in_channels: int, out_channels: int, depth: int, running_stats: bool = False) -> None:
        super().__init__()
        self.depth = depth
        self.up_conv = nn.ConvTranspose3d(in_channels, out_channels, kernel_size=2, stride=2)
        self.ops = _make_nconv(in_channels + out_channels // 2, depth, double_channel=True, running_stats=running_stats)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """``x``: ``(B, in_channels, h, w, d)``; ``skip``: ``(B, out_channels // 2, 2h, 2w, 2d)``."""
        return self.ops(torch.cat((self.up_conv(x), skip), dim=1))


class OutputTransition(nn.Module):
    """1x1x1 convolution (``final_conv``) to the class logits.

    SuPreM applies a sigmoid here; like MONAI networks, this one returns logits so losses choose the activation.

    Args:
        in_channels: input channels (64).
        out_channels: number of classes.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.final_conv = nn.Conv3d(in_channels, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.final_conv(x)


class UNet3D(nn.Module):
    """SuPreM's 3D UNet backbone with a segmentation head (thesis 4.2.1, Table 4.1: 19.08M parameters).

    Args:
        in_channels: input channels (1 for CT/MR).
        out_channels: number of output classes (logits, no activation).
        running_stats: ``False`` (default) reproduces SuPreM's :class:`ContBatchNorm3d` (batch statistics in
            train and eval); ``True`` uses :class:`torch.nn.BatchNorm3d` with running statistics at eval time.

    Input ``(B, in_channels, H, W, D)`` with ``H, W, D`` divisible by 8; output ``(B, out_channels, H, W, D)``.
    """

    def __init__(self, in_channels: int = 1, out_channels: int = 1, running_stats: bool = False) -> None:
        super().__init__()
        if in_channels < 1 or out_channels < 1:
            raise ValueError(f"UNet3D: in_channels and out_channels must be >= 1, got {in_channels}, {out_channels}.")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.down_tr64 = DownTransition(in_channels, 0, running_stats)
        self.down_tr128 = DownTransition(64, 1, running_stats)
        self.down_tr256 = DownTransition(128, 2, running_stats)
        self.down_tr512 = DownTransition(256, 3, running_stats)
        self.up_tr256 = UpTransition(512, 512, 2, running_stats)
        self.up_tr128 = UpTransition(256, 256, 1, running_stats)
        self.up_tr64 = UpTransition(128, 128, 0, running_stats)
        self.out_tr = OutputTransition(64, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_channels, H, W, D)`` -> logits ``(B, out_channels, H, W, D)``."""
        if any(s % 8 for s in x.shape[2:]):
            raise ValueError(f"UNet3D: spatial size must be divisible by 8, got {tuple(x.shape[2:])}.")
        out64, skip64 = self.down_tr64(x)
        out128, skip128 = self.down_tr128(out64)
        out256, skip256 = self.down_tr256(out128)
        out512, _ = self.down_tr512(out256)
        up256 = self.up_tr256(out512, skip256)
        up128 = self.up_tr128(up256, skip128)
        up64 = self.up_tr64(up128, skip64)
        return self.out_tr(up64)
