"""The layer types monai-peft's methods and selectors recognise, in one place.

The tuner layers (:mod:`monai_peft.tuners`), the selectors (:mod:`monai_peft.targeting`), :func:`monai_peft.adapt`
and the nnU-Net plugin all import these tuples, so "what counts as a conv / a norm" is decided once.
"""

from __future__ import annotations

from torch import nn

__all__ = [
    "CONV_TYPES", "CONV_TRANSPOSE_TYPES", "ANY_CONV_TYPES", "CONV_BY_DIMS", "CONV_TRANSPOSE_BY_DIMS",
    "BATCH_NORM_TYPES", "CHANNEL_FIRST_NORM_TYPES", "NORM_TYPES",
]

CONV_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
CONV_TRANSPOSE_TYPES: tuple[type[nn.Module], ...] = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
ANY_CONV_TYPES: tuple[type[nn.Module], ...] = CONV_TYPES + CONV_TRANSPOSE_TYPES

CONV_BY_DIMS: dict[int, type[nn.Module]] = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
CONV_TRANSPOSE_BY_DIMS: dict[int, type[nn.Module]] = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d,
                                                      3: nn.ConvTranspose3d}

# batch norms keep running statistics (see monai_peft.tuners.frozen_norm)
BATCH_NORM_TYPES: tuple[type[nn.Module], ...] = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
# norms whose channels are dim 1 of a (B, C, *spatial) tensor
CHANNEL_FIRST_NORM_TYPES: tuple[type[nn.Module], ...] = BATCH_NORM_TYPES + (
    nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.GroupNorm,
)
NORM_TYPES: tuple[type[nn.Module], ...] = CHANNEL_FIRST_NORM_TYPES + (nn.LayerNorm,)
