"""Masked-autoencoder pretraining of the video encoder with tube masking (EchoAI, seed 002; VideoMAE).

EchoAI "reconstruct[s] echocardiogram recordings while exposed to only 10% of the video pixels" (seed 002,
summary): 90% of the space-time patches are hidden. Tube masking (VideoMAE, Tong et al. 2022) hides the same
spatial patches in every tubelet of a clip, so a hidden patch cannot be copied from its neighbour in time.
``transformers``' ``VideoMAEForPreTraining`` encodes the visible tubes and reconstructs the hidden ones; the
loss is the MSE on per-patch normalised pixels (``norm_pix_loss``).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from monai.utils import optional_import

from monai_peft.io import atomic_replace_dir

from .model import load_videomae_weights, read_videomae_config

transformers, _ = optional_import("transformers")

__all__ = ["tube_mask", "VideoMAEPretrainNet", "ReconstructionLoss", "save_videomae_checkpoint"]

logger = logging.getLogger(__name__)

MASK_RATIO = 0.9  # EchoAI: "exposed to only 10% of the video pixels"


def tube_mask(batch_size: int, config: transformers.VideoMAEConfig, mask_ratio: float = MASK_RATIO,
              generator: torch.Generator | None = None, device: torch.device | str | None = None) -> torch.Tensor:
    """Tube masks for ``VideoMAEForPreTraining``'s ``bool_masked_pos``.

    Each sample hides ``round(mask_ratio * P)`` of its ``P = (H / p) * (W / p)`` spatial patches (at least one
    stays visible, at least one is hidden), the same ones in every tubelet.

    Args:
        batch_size: ``B``.
        config: the ``VideoMAEConfig`` (image, patch, frame and tubelet sizes).
        mask_ratio: fraction of patches hidden, in (0, 1). Default 0.9 (EchoAI).
        generator: random generator. Default torch's global one.
        device: device of the mask.

    Returns:
        ``(B, (T / t) * P)`` bool, True = hidden; the token order is VideoMAE's (time, row, column).
    """
    if not 0.0 < mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}.")
    per_frame = (config.image_size // config.patch_size) ** 2
    tubes = config.num_frames // config.tubelet_size
    hidden = min(max(int(round(mask_ratio * per_frame)), 1), per_frame - 1)
    scores = torch.rand(batch_size, per_frame, generator=generator)
    order = scores.argsort(dim=1)
    spatial = torch.zeros(batch_size, per_frame, dtype=torch.bool)
    spatial.scatter_(1, order[:, :hidden], True)
    return spatial.repeat(1, tubes).to(device)


class VideoMAEPretrainNet(nn.Module):
    """``VideoMAEForPreTraining`` with tube masking: ``(B, 1, T, H, W)`` clips -> reconstruction loss ``(1,)``.

    The forward pass draws a new tube mask per call, so a MONAI ``SupervisedTrainer`` trains it with
    :class:`ReconstructionLoss` (the network's output is already the loss) and batches without labels.

    Args:
        config: a grayscale ``VideoMAEConfig`` (:func:`~monai_peft.echo.video.model.videomae_config`).
        mask_ratio: fraction of space-time patches hidden. Default 0.9 (EchoAI).
    """

    def __init__(self, config: transformers.VideoMAEConfig, mask_ratio: float = MASK_RATIO) -> None:
        super().__init__()
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}.")
        self.videomae_config = config
        self.mask_ratio = float(mask_ratio)
        self.mae = transformers.VideoMAEForPreTraining(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 1, T, H, W)`` clips in [0, 1] -> the masked-tube reconstruction loss, shape ``(1,)``."""
        c = self.videomae_config
        expected = (c.num_channels, c.num_frames, c.image_size, c.image_size)
        if x.ndim != 5 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"VideoMAEPretrainNet: expected clips (B, {', '.join(map(str, expected))}), "
                             f"got {tuple(x.shape)}.")
        mask = tube_mask(x.shape[0], c, self.mask_ratio, device=x.device)
        return self.mae(x.permute(0, 2, 1, 3, 4), bool_masked_pos=mask).loss.reshape(1)

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, mask_ratio: float = MASK_RATIO, **config_overrides: Any
                        ) -> VideoMAEPretrainNet:
        """Continue pretraining from a local checkpoint folder: its config, its encoder (and decoder when the
        folder holds a pretraining model with the same decoder) weights."""
        net = cls(read_videomae_config(path, **config_overrides), mask_ratio)
        load_videomae_weights(net, path)
        from .model import _read_weights

        rest = {k: v for k, v in _read_weights(Path(path)).items() if not k.startswith("videomae.")}
        own = net.mae.state_dict()
        fits = {k: v for k, v in rest.items() if k in own and own[k].shape == v.shape}
        if fits:
            net.mae.load_state_dict(fits, strict=False)
        logger.info("%s: encoder and %d decoder tensors loaded", path, len(fits))
        return net


class ReconstructionLoss(nn.Module):
    """The loss for :class:`VideoMAEPretrainNet` in a MONAI trainer: the network output itself (its mean)."""

    def forward(self, output: torch.Tensor, target: Any = None) -> torch.Tensor:
        return output.mean()


def save_videomae_checkpoint(network: VideoMAEPretrainNet, directory: str | os.PathLike) -> Path:
    """Write ``config.json`` + ``model.safetensors`` (``save_pretrained``) into ``directory``, atomically.

    The folder loads with :meth:`VideoEFNet.from_checkpoint <monai_peft.echo.video.model.VideoEFNet.from_checkpoint>`,
    :meth:`VideoMAEPretrainNet.from_checkpoint` and ``transformers.VideoMAEForPreTraining.from_pretrained``.
    """
    final = Path(directory)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        network.mae.save_pretrained(str(tmp), safe_serialization=True)
        atomic_replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final
