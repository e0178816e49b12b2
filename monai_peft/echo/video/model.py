"""VideoMAE encoder + ejection-fraction head, local checkpoints, and PEFT wrapping (EchoAI, seed 002).

EchoAI (seed ``002``, "Method Summary") pretrains a video transformer as a masked autoencoder on
echocardiogram videos and fine-tunes it "to estimate ejection fraction using a regression head". Here the
video transformer is ``transformers``' VideoMAE (patch + tubelet embeddings with fixed sin-cos positions,
pre-norm ViT blocks), built from a ``VideoMAEConfig`` with one (grayscale) channel. :class:`VideoEFNet`
takes MONAI channel-first clips ``(B, 1, T, H, W)`` and returns the EF in percent ``(B, 1)``.

Weights come from a random init or a local checkpoint (:func:`load_videomae_weights`): a folder with
``config.json`` + ``*.safetensors`` (what ``save_pretrained`` and ``monai-peft echo video-pretrain`` write) or a
state-dict file read with ``weights_only=True``. Nothing is ever downloaded; a Hub id is refused.

:func:`adapt_video_ef` wraps the network for one fine-tuning method: LoRA on the attention projections (or on
every linear layer of the blocks), full fine-tuning, the frozen linear probe (``head``), visual prompts, bottleneck
adapters, or any other :func:`monai_peft.adapt` method or a ready peft config, always with the new head trained
fully.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from monai.utils import optional_import

from monai_peft.regions import register_regions

transformers, _ = optional_import("transformers")
peft, _ = optional_import("peft")

__all__ = ["VIDEOMAE_SIZES", "VIDEO_LORA_TARGETS", "EF_MEAN", "EF_STD", "videomae_config", "EFHead", "VideoEFNet",
           "load_videomae_weights", "read_videomae_config", "read_videomae_checkpoint", "adapt_video_ef"]

logger = logging.getLogger(__name__)

# VideoMAE paper (Tong et al. 2022), Table 1 encoder widths; decoder widths of its released configs.
VIDEOMAE_SIZES: dict[str, dict[str, int]] = {
    "small": {"hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 6, "intermediate_size": 1536,
              "decoder_hidden_size": 192, "decoder_num_hidden_layers": 4, "decoder_num_attention_heads": 3,
              "decoder_intermediate_size": 768},
    "base": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
             "decoder_hidden_size": 384, "decoder_num_hidden_layers": 4, "decoder_num_attention_heads": 6,
             "decoder_intermediate_size": 1536},
}

# EchoNet-Dynamic FileList: EF mean 55.7 %, standard deviation 12.4 % (Ouyang et al. 2020); the head predicts
# standardised EF so a new head starts at the population mean.
EF_MEAN = 55.0
EF_STD = 12.5

_BLOCK = r"videomae\.encoder\.layer\.\d+\."
_ATTN = r"attention\.(attention\.(query|key|value)|output\.dense)"
# peft regexes (full match): LoRA on the self-attention projections, or on every linear layer of the blocks.
VIDEO_LORA_TARGETS: dict[str, str] = {
    "attention": rf"{_BLOCK}{_ATTN}",
    "all": rf"{_BLOCK}({_ATTN}|intermediate\.dense|output\.dense)",
}

_CHECKPOINT_FILES = ("model.safetensors", "pytorch_model.bin")


def videomae_config(size: str = "base", image_size: int = 112, num_frames: int = 16, patch_size: int = 16,
                    tubelet_size: int = 2, **overrides: Any) -> transformers.VideoMAEConfig:
    """A grayscale ``VideoMAEConfig``.

    Args:
        size: ``"small"`` or ``"base"`` (:data:`VIDEOMAE_SIZES`). Default ``"base"``.
        image_size: square frame side in pixels. Default 112 (EchoNet-Dynamic's frame size).
        num_frames: frames per clip. Default 16.
        patch_size: spatial patch side. Default 16.
        tubelet_size: frames per tube (temporal patch). Default 2.
        overrides: any other ``VideoMAEConfig`` field, e.g. ``hidden_size=32, num_hidden_layers=2`` for tests.

    Raises:
        ValueError: unknown ``size``, or a clip geometry the patches do not tile.
    """
    if size not in VIDEOMAE_SIZES:
        raise ValueError(f"size: expected one of {sorted(VIDEOMAE_SIZES)}, got {size!r}.")
    if image_size % patch_size:
        raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}.")
    if num_frames % tubelet_size:
        raise ValueError(f"num_frames {num_frames} is not a multiple of tubelet_size {tubelet_size}.")
    kwargs: dict[str, Any] = {**VIDEOMAE_SIZES[size], "num_channels": 1, "norm_pix_loss": True,
                              "use_mean_pooling": True}
    kwargs.update(overrides)
    return transformers.VideoMAEConfig(image_size=image_size, num_frames=num_frames, patch_size=patch_size,
                                       tubelet_size=tubelet_size, **kwargs)


class EFHead(nn.Module):
    """Regression head: LayerNorm, dropout, linear -> EF in percent (``y * ef_std + ef_mean``).

    Args:
        in_features: encoder width ``D``.
        ef_mean: EF the head predicts at init (zero output). Default :data:`EF_MEAN`.
        ef_std: EF units per unit of the linear output. Default :data:`EF_STD`.
        dropout: dropout before the linear layer. Default 0.
    """

    def __init__(self, in_features: int, ef_mean: float = EF_MEAN, ef_std: float = EF_STD, dropout: float = 0.0) -> None:
        super().__init__()
        if ef_std <= 0:
            raise ValueError(f"ef_std must be > 0, got {ef_std}.")
        self.norm = nn.LayerNorm(in_features)
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(in_features, 1)
        nn.init.zeros_(self.linear.bias)
        self.ef_mean = float(ef_mean)
        self.ef_std = float(ef_std)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """``(B, D)`` pooled features -> ``(B, 1)`` EF in percent."""
        return self.linear(self.dropout(self.norm(features))) * self.ef_std + self.ef_mean


class VideoEFNet(nn.Module):
    """VideoMAE encoder, mean pooling over all tokens, :class:`EFHead`: ``(B, 1, T, H, W)`` -> ``(B, 1)`` EF %.

    Regions (for :func:`monai_peft.adapt`): ``encoder`` (the VideoMAE model) and ``head``.

    Args:
        config: a grayscale ``VideoMAEConfig`` (:func:`videomae_config`); clips must have its ``num_frames`` and
            ``image_size``.
        ef_mean, ef_std, dropout: :class:`EFHead` arguments.
    """

    def __init__(self, config: transformers.VideoMAEConfig, ef_mean: float = EF_MEAN, ef_std: float = EF_STD,
                 dropout: float = 0.0) -> None:
        super().__init__()
        # not named ``config``: peft would treat the module as a transformers model
        self.videomae_config = config
        self.videomae = transformers.VideoMAEModel(config)
        self.head = EFHead(config.hidden_size, ef_mean, ef_std, dropout)

    @property
    def clip_shape(self) -> tuple[int, int, int, int]:
        """The expected clip shape ``(C, T, H, W)``."""
        c = self.videomae_config
        return c.num_channels, c.num_frames, c.image_size, c.image_size

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, T, H, W)`` clips -> ``(B, D)`` mean of the encoder's tokens."""
        if x.ndim != 5 or tuple(x.shape[1:]) != self.clip_shape:
            raise ValueError(f"VideoEFNet: expected clips (B, {', '.join(map(str, self.clip_shape))}) "
                             f"(channels, frames, height, width), got {tuple(x.shape)}.")
        # VideoMAE wants (B, T, C, H, W); positional: peft's LN-tuning wrapper (full / head methods) takes x first
        hidden = self.videomae(x.permute(0, 2, 1, 3, 4)).last_hidden_state
        return hidden.mean(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 1, T, H, W)`` clips in [0, 1] -> ``(B, 1)`` EF in percent."""
        return self.head(self.features(x))

    def extra_state(self) -> dict:
        """What rebuilds this network besides weights: the VideoMAE config and the head's EF scaling."""
        return {"videomae_config": self.videomae_config.to_dict(), "ef_mean": self.head.ef_mean,
                "ef_std": self.head.ef_std, "dropout": self.head.dropout.p}

    @classmethod
    def from_extra_state(cls, state: dict) -> VideoEFNet:
        """Inverse of :meth:`extra_state` (random weights)."""
        if "videomae_config" not in state:
            raise KeyError("VideoEFNet state: missing key 'videomae_config'.")
        cfg = _config_from_dict(state["videomae_config"])
        return cls(cfg, state.get("ef_mean", EF_MEAN), state.get("ef_std", EF_STD), state.get("dropout", 0.0))

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, ef_mean: float = EF_MEAN, ef_std: float = EF_STD,
                        dropout: float = 0.0, **config_overrides: Any) -> VideoEFNet:
        """Build from a local checkpoint folder (``config.json`` + weights) and load its encoder weights.

        Args:
            path: checkpoint folder (:func:`read_videomae_checkpoint`).
            ef_mean, ef_std, dropout: head arguments.
            config_overrides: config fields to change, e.g. ``num_frames`` or ``image_size`` (positions are
                sin-cos, so they follow); ``num_channels`` is always 1.
        """
        net = cls(read_videomae_config(path, **config_overrides), ef_mean, ef_std, dropout)
        load_videomae_weights(net, path)
        return net


register_regions(VideoEFNet, {"encoder": [r"videomae"], "head": [r"head"]})


def _config_from_dict(d: dict, **overrides: Any) -> transformers.VideoMAEConfig:
    d = {k: v for k, v in d.items() if k not in ("transformers_version", "model_type", "architectures")}
    d.update(overrides)
    d["num_channels"] = 1
    return transformers.VideoMAEConfig(**d)


def _local(path: str | os.PathLike, what: str) -> Path:
    p = Path(path)
    if not p.exists():
        looks_remote = "://" in str(path) or (str(path).count("/") == 1 and not str(path).startswith((".", "/")))
        hint = " It looks like a Hugging Face Hub id: monai-peft never downloads; download it yourself." if looks_remote else ""
        raise FileNotFoundError(f"{what} {str(path)!r} is not a local file or folder.{hint} Expected a folder with "
                                "config.json + *.safetensors, or a state-dict file (.safetensors / .pt).")
    return p


def _read_weights(p: Path) -> dict[str, torch.Tensor]:
    from monai_peft.echo.models import _read_state_dict

    if p.is_file():
        return _module_names(_read_state_dict(p))
    files = sorted(p.glob("*.safetensors"))
    if not files:
        files = [p / f for f in _CHECKPOINT_FILES if (p / f).is_file()]
    if not files:
        raise FileNotFoundError(f"checkpoint folder {p}: no *.safetensors or pytorch_model.bin weights.")
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        sd.update(_read_state_dict(f))
    return _module_names(sd)


def _module_names(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Saved VideoMAE checkpoints (the released ones, and ``save_pretrained`` of transformers 5) store the query /
    value biases as ``q_bias`` / ``v_bias``; the modules call them ``query.bias`` / ``value.bias``."""
    renames = ((".attention.attention.q_bias", ".attention.attention.query.bias"),
               (".attention.attention.v_bias", ".attention.attention.value.bias"))
    out = {}
    for k, v in sd.items():
        for old, new in renames:
            if k.endswith(old):
                k = k[: -len(old)] + new
        out[k] = v
    return out


def read_videomae_config(path: str | os.PathLike, **config_overrides: Any) -> transformers.VideoMAEConfig:
    """The grayscale ``VideoMAEConfig`` of a local checkpoint folder's ``config.json`` (weights are not read).

    Raises:
        FileNotFoundError: not a local folder with ``config.json``. ValueError: not a VideoMAE config.
    """
    p = _local(path, "VideoMAE checkpoint")
    if not p.is_dir() or not (p / "config.json").is_file():
        raise FileNotFoundError(f"VideoMAE checkpoint {p}: expected a folder with config.json (a state-dict file "
                                "needs a config: build VideoEFNet(videomae_config(...)) and call load_videomae_weights).")
    try:
        cfg = json.loads((p / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{p / 'config.json'} is not valid JSON: {e}") from e
    if cfg.get("model_type", "videomae") != "videomae":
        raise ValueError(f"{p / 'config.json'}: model_type {cfg.get('model_type')!r}, expected 'videomae'.")
    return _config_from_dict(cfg, **config_overrides)


def read_videomae_checkpoint(path: str | os.PathLike, **config_overrides: Any
                             ) -> tuple[transformers.VideoMAEConfig, dict[str, torch.Tensor]]:
    """Config (grayscale) and encoder weights of a local VideoMAE checkpoint folder.

    Args:
        path: folder with ``config.json`` and ``*.safetensors`` (or ``pytorch_model.bin``, read with
            ``weights_only=True``), e.g. written by ``VideoMAEForPreTraining.save_pretrained`` or
            ``monai-peft echo video-pretrain``.
        config_overrides: config fields to change.

    Returns:
        ``(config, state)`` where ``state`` holds the encoder tensors under ``videomae.*`` names.

    Raises:
        FileNotFoundError: not a local folder, no ``config.json`` or no weights. ValueError: no encoder tensors.
    """
    config = read_videomae_config(path, **config_overrides)
    p = Path(path)
    return config, _encoder_state(_read_weights(p), p)


def _encoder_state(sd: dict[str, torch.Tensor], source: Path) -> dict[str, torch.Tensor]:
    """Encoder tensors under ``videomae.*`` names, from a pretraining, classification or bare-encoder state."""
    if any(k.startswith("videomae.") for k in sd):
        out = {k: v for k, v in sd.items() if k.startswith("videomae.")}
    else:  # a bare VideoMAEModel
        out = {f"videomae.{k}": v for k, v in sd.items() if k.startswith(("embeddings.", "encoder.", "layernorm."))}
    if not out:
        raise ValueError(f"{source}: no VideoMAE encoder tensors (expected 'videomae.*' or 'embeddings.*' / "
                         f"'encoder.*' keys, found e.g. {sorted(sd)[:3]}).")
    return out


def load_videomae_weights(network: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load local VideoMAE encoder weights into a :class:`VideoEFNet` or a pretraining network; never downloads.

    Accepts a checkpoint folder (``config.json`` + weights) or a state-dict file (``.safetensors``, or
    ``.pt``/``.pth``/``.bin`` read with ``weights_only=True``) of a VideoMAE model (pretraining, classification
    or bare encoder) or of a :class:`VideoEFNet`. RGB patch embeddings (``(D, 3, t, p, p)``) are summed over the
    colour channels for grayscale networks. Every encoder tensor of ``network`` must come from the file.

    Args:
        network: a :class:`VideoEFNet` (``videomae`` attribute) or a module whose encoder sits at
            ``mae.videomae`` (:class:`~monai_peft.echo.video.mae.VideoMAEPretrainNet`).
        path: checkpoint folder or file.

    Raises:
        FileNotFoundError: not a local path. ValueError: missing encoder tensors or shape mismatches (named).
    """
    p = _local(path, "VideoMAE weights")
    sd = _encoder_state(_read_weights(p), p)
    encoder = network.videomae if hasattr(network, "videomae") else network.mae.videomae
    own = {f"videomae.{k}": v for k, v in encoder.state_dict().items()}
    key = "videomae.embeddings.patch_embeddings.projection.weight"
    if key in sd and key in own and sd[key].shape[1] != own[key].shape[1] and own[key].shape[1] == 1:
        sd[key] = sd[key].sum(dim=1, keepdim=True)  # RGB -> grayscale tubelet embedding
    missing = sorted(set(own) - set(sd))
    wrong = [f"{k}: file {tuple(sd[k].shape)} vs network {tuple(own[k].shape)}"
             for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or wrong:
        raise ValueError(f"{p}: VideoMAE encoder weights do not fit the network (missing {missing[:3]}, "
                         f"shape mismatch {wrong[:3]}); build the network from the checkpoint's config.json.")
    encoder.load_state_dict({k[len("videomae."):]: sd[k] for k in own}, strict=True)
    extra = sorted(set(sd) - set(own))
    if extra:
        logger.info("%s: %d encoder tensors not used (e.g. %s)", p, len(extra), extra[:3])
    return network


def adapt_video_ef(network: VideoEFNet, method: str = "lora", layers: str = "attention",
                   peft_config: Any | None = None, adapter_name: str = "default", **method_kwargs: Any):
    """Wrap a :class:`VideoEFNet` for one fine-tuning method; the EF head always trains fully.

    Args:
        network: the network with its (pretrained) encoder.
        method: a :func:`monai_peft.adapt` method: ``"lora"`` (on :data:`VIDEO_LORA_TARGETS`), ``"full"`` (full
            fine-tuning), ``"head"`` (frozen encoder, linear probe), ``"ssf"``, ``"bitfit"``, ``"norm"``, ``"vpt"``
            (visual prompts in every block) or ``"bottleneck"`` (bottleneck adapters beside / after attention and
            MLP of every block). Ignored when ``peft_config`` is given. Default ``"lora"``.
        layers: LoRA placement, ``"attention"`` (query/key/value/output projections) or ``"all"`` (plus the
            MLP). Default ``"attention"``.
        peft_config: a ready peft config (``get_peft_model`` is called with it); the head is added to its
            ``modules_to_save`` when it lists none.
        adapter_name: the peft adapter name. Default ``"default"``.
        method_kwargs: method options passed to :func:`monai_peft.adapt` (LoRA ``r``, ``lora_alpha``; VPT
            ``variant``, ``num_tokens``; bottleneck ``insertion``, ``bottleneck_size``, ...).

    Returns:
        a ``peft.PeftModel``.

    Raises:
        ValueError: unknown method or LoRA ``layers``, or options the method does not take.
    """
    from monai_peft.adapt import adapt
    from monai_peft.targeting import NameRegex

    if not isinstance(network, VideoEFNet):
        raise TypeError(f"adapt_video_ef: expected a VideoEFNet, got {type(network).__name__}.")
    if peft_config is not None:
        if not getattr(peft_config, "modules_to_save", None):
            peft_config.modules_to_save = ["head"]
        return peft.get_peft_model(network, peft_config, adapter_name=adapter_name)
    if method in ("full", "head"):
        return adapt(network, method, adapter_name=adapter_name, **method_kwargs)
    target = None
    if method == "lora":
        if layers not in VIDEO_LORA_TARGETS:
            raise ValueError(f"layers: expected one of {sorted(VIDEO_LORA_TARGETS)}, got {layers!r}.")
        target = NameRegex(VIDEO_LORA_TARGETS[layers])
    return adapt(network, method, target=target, train_fully="head", adapter_name=adapter_name, **method_kwargs)
