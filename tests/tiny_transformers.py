"""Tiny transformer models built from configs (no download) for the VPT and bottleneck adapter tests.

Each factory returns ``(model, inputs)`` with ``model(**inputs)`` valid; :func:`tokens` reads the token output of
any of them. A grid of geometries per family: widths, depths, heads, class token or not, spatial reduction.
"""

from __future__ import annotations

import torch
import transformers
from torch import nn


def vit(hidden: int = 16, layers: int = 2, heads: int = 2, image: int = 16, patch: int = 4, qkv_bias: bool = True,
        classifier: bool = False):
    cfg = transformers.ViTConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                                 intermediate_size=2 * hidden, image_size=image, patch_size=patch, num_channels=1,
                                 qkv_bias=qkv_bias, num_labels=3)
    model = transformers.ViTForImageClassification(cfg) if classifier else transformers.ViTModel(cfg)
    return model.eval(), {"pixel_values": torch.randn(2, 1, image, image, generator=torch.Generator().manual_seed(1))}


def videomae(hidden: int = 16, layers: int = 2, heads: int = 2, frames: int = 4, mean_pooling: bool = True,
             classifier: bool = False):
    cfg = transformers.VideoMAEConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                                      intermediate_size=2 * hidden, image_size=16, patch_size=8, num_channels=1,
                                      num_frames=frames, tubelet_size=2, use_mean_pooling=mean_pooling, num_labels=1)
    model = transformers.VideoMAEForVideoClassification(cfg) if classifier else transformers.VideoMAEModel(cfg)
    x = torch.randn(2, frames, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    return model.eval(), {"pixel_values": x}


def segformer(hidden=(8, 16), heads=(1, 2), sr=(4, 1), depths=(2, 1), size: int = 32):
    cfg = transformers.SegformerConfig(num_channels=1, num_encoder_blocks=len(hidden), hidden_sizes=list(hidden),
                                       num_attention_heads=list(heads), sr_ratios=list(sr), depths=list(depths),
                                       patch_sizes=[7, 3, 3, 3][:len(hidden)], strides=[4, 2, 2, 2][:len(hidden)],
                                       mlp_ratios=[2] * len(hidden), decoder_hidden_size=16)
    x = torch.randn(2, 1, size, size, generator=torch.Generator().manual_seed(3))
    return transformers.SegformerModel(cfg).eval(), {"pixel_values": x}


def echo_backbone():
    from monai_peft.echo import EchoBackbone, segformer_config

    cfg = segformer_config("b0", hidden_sizes=[8, 16, 32, 64], decoder_hidden_size=16, num_attention_heads=[1, 1, 2, 2])
    return EchoBackbone(cfg).eval(), {"x": torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(4))}


def monai_vit(classification: bool = True, hidden: int = 16, layers: int = 2, heads: int = 2, qkv_bias: bool = False):
    from monai.networks.nets import ViT

    model = ViT(in_channels=1, img_size=(16, 16), patch_size=(4, 4), hidden_size=hidden, mlp_dim=2 * hidden,
                num_layers=layers, num_heads=heads, spatial_dims=2, classification=classification, num_classes=3,
                qkv_bias=qkv_bias)
    return model.eval(), {"x": torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(5))}


def monai_unetr():
    from monai.networks.nets import UNETR

    model = UNETR(in_channels=1, out_channels=2, img_size=(16, 16), feature_size=4, hidden_size=16, mlp_dim=32,
                  num_heads=2, spatial_dims=2)
    return model.eval(), {"x_in": torch.randn(1, 1, 16, 16, generator=torch.Generator().manual_seed(6))}


# family/geometry name -> factory; the grid the identity and conformance tests run over
MODELS = {
    "vit": vit,
    "vit-wide-nobias": lambda: vit(hidden=24, layers=3, heads=3, qkv_bias=False),
    "vit-classifier": lambda: vit(classifier=True),
    "videomae": videomae,
    "videomae-cls-first-token": lambda: videomae(layers=3, mean_pooling=False, classifier=True),
    "segformer": segformer,
    "segformer-3stage": lambda: segformer(hidden=(8, 16, 24), heads=(1, 2, 3), sr=(8, 2, 1), depths=(1, 2, 1),
                                          size=64),
    "echo-backbone": echo_backbone,
    "monai-vit": monai_vit,
    "monai-vit-noclass": lambda: monai_vit(classification=False, hidden=12, heads=3, qkv_bias=True),
    "monai-unetr": monai_unetr,
}


def make(name: str, seed: int = 0) -> tuple[nn.Module, dict]:
    torch.manual_seed(seed)
    return MODELS[name]()


def tokens(output) -> torch.Tensor:
    """The main tensor of a model output: logits, last hidden state, a tensor or a tuple's first element."""
    for attr in ("logits", "last_hidden_state"):
        if hasattr(output, attr):
            return getattr(output, attr)
    if isinstance(output, (tuple, list)):
        return output[0]
    return output
