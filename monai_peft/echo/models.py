"""Segformer (MiT-B0 / MiT-B2) backbone for grayscale echocardiography and the task heads of the echo seed.

The backbone is the Mix-Transformer encoder of ``transformers`` plus the first half of the Segformer
all-MLP decoder (per-stage linear projections, upsampling to ``H/4`` and concatenation): echo seed,
section III.D, "concatenation and upsampling to a fourth of the input size is already done in the
backbone". Task heads take its ``(B, 4 * D, H/4, W/4)`` feature map.

Supported ``transformers`` versions: 4.46-4.x (attention ``query/key/value`` + ``output.dense``, MLP
``dense1/dense2``) and 5.x (attention ``q_proj/k_proj/v_proj/o_proj``, MLP ``fc1/fc2``, ``stages``);
tested with 5.23. :data:`LORA_TARGETS` covers both naming schemes and :func:`lora_target_modules`
raises when a pattern matches nothing in the installed version. Nothing is ever downloaded: weights come
from random init or a local path (:func:`load_backbone_weights`).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from monai.utils import optional_import

transformers, _has_transformers = optional_import("transformers")

__all__ = [
    "MIT_VARIANTS",
    "LORA_TARGETS",
    "segformer_config",
    "EchoBackbone",
    "SegmentationHead",
    "CNNHead",
    "EchoTaskModel",
    "lora_target_modules",
    "load_backbone_weights",
]

logger = logging.getLogger(__name__)

# Segformer paper, Table 6 (MiT-B0 / MiT-B2 encoder sizes); decoder widths of the original configs.
MIT_VARIANTS: dict[str, dict] = {
    "b0": {"hidden_sizes": [32, 64, 160, 256], "depths": [2, 2, 2, 2], "num_attention_heads": [1, 2, 5, 8],
           "decoder_hidden_size": 256},
    "b2": {"hidden_sizes": [64, 128, 320, 512], "depths": [3, 4, 6, 3], "num_attention_heads": [1, 2, 5, 8],
           "decoder_hidden_size": 768},
}

# echo seed, Tables I-IV: LoRA in "self-attention only" or in "all" layers. Patterns are peft regexes
# (full match on the module name) for transformers 5.x and 4.x names.
_ATTN = r"attention\.(q_proj|k_proj|v_proj|o_proj|self\.query|self\.key|self\.value|output\.dense)"
_MLP = r"mlp\.(fc1|fc2|dense1|dense2)"
_EMBED = r"patch_embeddings(\.\d+)?\.proj"
_SR = r"attention\.(sequence_reduction\.sequence_reduction|self\.sr)"
LORA_TARGETS: dict[str, str] = {
    "attention": rf"(.*\.)?encoder\..*\.{_ATTN}",
    "all": rf"(.*\.)?(encoder\..*\.({_ATTN}|{_MLP}|{_EMBED}|{_SR})|neck\.proj\.\d+)",
}


def segformer_config(variant: str = "b0", num_channels: int = 1, **overrides) -> transformers.SegformerConfig:
    """A ``SegformerConfig`` for MiT-B0 or MiT-B2 with grayscale input.

    Args:
        variant: ``"b0"`` or ``"b2"``. Default ``"b0"``.
        num_channels: input channels; 1 for echocardiography. Default 1.
        overrides: any ``SegformerConfig`` field, e.g. ``hidden_sizes=[8, 16, 32, 64]`` for tests.
    """
    key = variant.lower().replace("mit-", "").replace("mit_", "")
    if key not in MIT_VARIANTS:
        raise ValueError(f"variant: expected one of {sorted(MIT_VARIANTS)}, got {variant!r}.")
    kwargs = dict(MIT_VARIANTS[key])
    kwargs.update(overrides)
    return transformers.SegformerConfig(num_channels=num_channels, **kwargs)


class EchoBackbone(nn.Module):
    """MiT encoder + Segformer decoder projections: ``(B, C_in, H, W)`` -> ``(B, 4 * D, H/4, W/4)``.

    Args:
        config: a ``transformers.SegformerConfig`` (see :func:`segformer_config`); ``D`` is its
            ``decoder_hidden_size``.
    """

    def __init__(self, config: transformers.SegformerConfig) -> None:
        super().__init__()
        # not named ``config``: peft would treat the module as a transformers model (v4->v5 key conversion)
        self.segformer_config = config
        self.encoder = transformers.SegformerModel(config)
        self.neck = nn.Module()
        self.neck.proj = nn.ModuleList(nn.Linear(c, config.decoder_hidden_size) for c in config.hidden_sizes)
        self.out_channels = config.decoder_hidden_size * len(config.hidden_sizes)

    def stage_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The four encoder stage outputs, each ``(B, C_i, H / 2^(i+1), W / 2^(i+1))``."""
        if hasattr(self.encoder, "stages"):  # transformers 5.x
            feats, h = [], x
            for stage in self.encoder.stages:
                h = stage(h)
                feats.append(h)
            return feats
        out = self.encoder(x, output_hidden_states=True, return_dict=True)  # transformers 4.x
        return list(out.hidden_states)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args:
            x: images ``(B, C_in, H, W)``.

        Returns:
            features ``(B, 4 * D, H/4, W/4)`` (deepest stage first, as in Segformer's decoder).
        """
        feats = self.stage_features(x)
        size = feats[0].shape[2:]
        outs = []
        for f, proj in zip(feats, self.neck.proj):
            b, c, h, w = f.shape
            # contiguous: with a strided input, Linear's kernel choice (and last bits) depends on requires_grad
            y = proj(f.flatten(2).transpose(1, 2).contiguous()).transpose(1, 2).reshape(b, -1, h, w)
            outs.append(F.interpolate(y, size=size, mode="bilinear", align_corners=False))
        return torch.cat(outs[::-1], dim=1)


class SegmentationHead(nn.Module):
    """Second half of the Segformer decoder: fuse, BN, ReLU, dropout, classifier, upsample to the input.

    Args:
        in_channels: backbone feature channels ``4 * D``.
        num_classes: output classes (background included).
        hidden: fused channel width ``D``. Default: ``in_channels // 4``.
        dropout: dropout before the classifier. Default 0.1 (Segformer's ``classifier_dropout_prob``).
        upsample: interpolate logits to the input size (x4). Default True.
    """

    def __init__(self, in_channels: int, num_classes: int, hidden: int | None = None, dropout: float = 0.1,
                 upsample: bool = True) -> None:
        super().__init__()
        hidden = hidden or max(in_channels // 4, 1)
        self.fuse = nn.Sequential(nn.Conv2d(in_channels, hidden, 1, bias=False), nn.BatchNorm2d(hidden),
                                  nn.ReLU(inplace=True), nn.Dropout(dropout))
        self.classifier = nn.Conv2d(hidden, num_classes, 1)
        self.upsample = upsample

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """``(B, in_channels, h, w)`` -> logits ``(B, num_classes, 4h, 4w)``."""
        y = self.classifier(self.fuse(feats))
        if self.upsample:
            y = F.interpolate(y, scale_factor=4, mode="bilinear", align_corners=False)
        return y


class CNNHead(nn.Module):
    """CNN task head of the echo seed (sections III.A-C) for classification and regression.

    Conv3x3-BN-ReLU[-Dropout]-MaxPool blocks (32, 64, 128 channels), global average pooling, then fully
    connected ReLU[-Dropout] layers (1024, 512, 256) and a linear output. View classification uses dropout;
    volume and age regression do not ("Dropout was not beneficial for this problem").

    Args:
        in_channels: backbone feature channels.
        num_outputs: classes (classification) or regressed values.
        conv_channels: conv block widths. Default ``(32, 64, 128)``.
        fc_features: hidden fully connected widths. Default ``(1024, 512, 256)``.
        dropout: dropout probability; 0 disables the dropout layers. Default 0.0.
    """

    def __init__(self, in_channels: int, num_outputs: int, conv_channels: Sequence[int] = (32, 64, 128),
                 fc_features: Sequence[int] = (1024, 512, 256), dropout: float = 0.0) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for co in conv_channels:
            layers += [nn.Conv2d(c, co, 3, padding=1, bias=False), nn.BatchNorm2d(co), nn.ReLU(inplace=True)]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            layers.append(nn.MaxPool2d(2, ceil_mode=True))
            c = co
        self.features = nn.Sequential(*layers)
        fcs: list[nn.Module] = []
        for f in fc_features:
            fcs += [nn.Linear(c, f), nn.ReLU(inplace=True)]
            if dropout > 0:
                fcs.append(nn.Dropout(dropout))
            c = f
        fcs.append(nn.Linear(c, num_outputs))
        self.fc = nn.Sequential(*fcs)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """``(B, in_channels, h, w)`` -> ``(B, num_outputs)``."""
        y = self.features(feats)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))


class EchoTaskModel(nn.Module):
    """Backbone followed by one task head (used for pretraining and for fully trained baselines).

    Args:
        backbone: an :class:`EchoBackbone` (or a peft model wrapping one).
        head: a task head taking the backbone features.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C_in, H, W)`` -> head output (``(B, K, H, W)`` logits or ``(B, K)``)."""
        return self.head(self.backbone(x))


def lora_target_modules(backbone: nn.Module, layers: str = "attention") -> list[str]:
    """Module names that LoRA adapts for ``layers`` ("attention" or "all"), checked on ``backbone``.

    Args:
        backbone: an :class:`EchoBackbone` (module names relative to it).
        layers: key of :data:`LORA_TARGETS`. Default ``"attention"``.

    Raises:
        ValueError: unknown ``layers`` or no module matches (unsupported ``transformers`` naming).
    """
    if layers not in LORA_TARGETS:
        raise ValueError(f"layers: expected one of {sorted(LORA_TARGETS)}, got {layers!r}.")
    pattern = re.compile(LORA_TARGETS[layers])
    names = [n for n, m in backbone.named_modules()
             if pattern.fullmatch(n) and isinstance(m, (nn.Linear, nn.Conv2d))]
    if not names:
        ver = getattr(transformers, "__version__", "?")
        raise ValueError(f"LORA_TARGETS[{layers!r}] matches no Linear/Conv2d module of the backbone with "
                         f"transformers {ver}; supported: 4.46-5.x.")
    return names


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    sd = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(sd).__name__}.")
    return sd


def load_backbone_weights(backbone: EchoBackbone, path: str | os.PathLike, strict: bool = True) -> EchoBackbone:
    """Load local weights into ``backbone``; never downloads.

    Accepted: a ``.safetensors`` / ``.pt`` state dict of an :class:`EchoBackbone` (keys ``encoder.*``,
    ``neck.*``; a ``backbone.`` prefix as written by :class:`EchoTaskModel` is stripped), or a local
    Hugging Face Segformer folder (``config.json`` + weights, e.g. an ImageNet MiT checkpoint), loaded with
    ``local_files_only=True``; RGB patch-embedding weights are summed over the colour channels.

    Args:
        backbone: the module to fill.
        path: file or folder.
        strict: require every backbone key (for state-dict files). Default True.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"backbone weights: {p} does not exist.")
    if p.is_dir():
        hf = transformers.SegformerModel.from_pretrained(str(p), local_files_only=True)
        sd = {f"encoder.{k}": v for k, v in hf.state_dict().items()}
        strict = False  # a Hugging Face encoder has no neck
    else:
        sd = _read_state_dict(p)
        if any(k.startswith("backbone.") for k in sd):
            sd = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
    own = backbone.state_dict()
    for k, v in list(sd.items()):
        if k in own and v.ndim == 4 and own[k].ndim == 4 and v.shape[1] != own[k].shape[1] and own[k].shape[1] == 1:
            sd[k] = v.sum(dim=1, keepdim=True)  # RGB -> grayscale patch embedding
    missing, unexpected = backbone.load_state_dict(sd, strict=False)
    if strict and (missing or unexpected):
        raise ValueError(f"{p}: backbone keys do not match (missing {missing[:5]}, unexpected {unexpected[:5]}).")
    if missing:
        logger.info("%s: %d backbone tensors kept at their initial values (e.g. %s)", p, len(missing), missing[:3])
    return backbone
