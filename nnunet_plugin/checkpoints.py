"""Safe checkpoint I/O for the nnU-Net plugin: pretrained backbones in, adapter-only safetensors out.

- :func:`safe_load_checkpoint`: ``torch.load(weights_only=True)`` mapped to a device, so a GPU-saved nnU-Net
  checkpoint loads on a CPU machine; errors name the file.
- :func:`load_pretrained_backbone`: what ``nnUNetv2_train -pretrained_weights`` does for the plugin's trainers:
  loads an nnU-Net checkpoint of the *plain* architecture into the (adapted) network, leaves the segmentation
  layers at their fresh initialisation (new label count), and raises :class:`PretrainedWeightsError` naming the
  first mismatching keys when the checkpoint comes from another architecture.
- :func:`save_adapter_file` / :func:`load_adapter_file`: the trainable state only (adapters, seg layers, fully
  trained modules) as safetensors, with the settings, plans and dataset.json needed to rebuild the network.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from monai_peft.io import atomic_path, atomic_save_safetensors
from monai_peft.io import atomic_torch_save as _atomic_torch_save

from nnunet_plugin.network import PLAIN_KEYS_ATTR, SUPREM_ATTR, unwrap_network

__all__ = [
    "PretrainedWeightsError", "safe_load_checkpoint", "plain_key", "load_pretrained_backbone",
    "adapter_state_dict", "save_adapter_file", "load_adapter_file", "adapter_path_for", "file_sha256",
    "SKIP_IN_PRETRAINED", "ADAPTER_METADATA_KEY", "PRETRAINED_ATTR", "atomic_torch_save",
]

logger = logging.getLogger(__name__)

# as nnunetv2.run.load_pretrained_weights: the seg layers are sized for the pretraining labels
SKIP_IN_PRETRAINED = (".seg_layers.",)
ADAPTER_METADATA_KEY = "monai_peft_nnunet"
PRETRAINED_ATTR = "_nnunet_plugin_pretrained"

# wrapper segments peft puts between a module's name and its tensors
_WRAPPER_SEGMENTS = re.compile(r"\.(?:base_layer|original_module)(?=\.)|\.(?:modules_to_save|ln_tuning_layers)\.[^.]+(?=\.)")


class PretrainedWeightsError(ValueError):
    """A ``-pretrained_weights`` file that does not fit the network (other architecture, not a checkpoint)."""


def _numpy_safe_globals() -> list[Any]:
    """numpy scalar types nnU-Net's logger leaves in checkpoints (e.g. EMA Dice as ``np.float64``)."""
    import numpy as np

    out: list[Any] = [np.dtype, np.ndarray]
    try:
        from numpy._core.multiarray import _reconstruct, scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct, scalar  # type: ignore[no-redef]
    out += [scalar, _reconstruct]
    out += [type(np.dtype(t)) for t in ("float64", "float32", "int64", "int32", "bool")]
    return out


def safe_load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """``torch.load(path, map_location, weights_only=True)`` with numpy scalars allowed and clear errors.

    Args:
        path: a ``.pth`` file (nnU-Net checkpoint or plain state dict).
        map_location: where tensors go; ``"cpu"`` (default) loads GPU-saved files on CPU-only machines.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        PretrainedWeightsError: not a torch file, or it holds objects ``weights_only`` refuses.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file {str(path)!r} does not exist.")
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # UnpicklingError, RuntimeError (zip), EOFError, ...
        raise PretrainedWeightsError(
            f"{path}: cannot be read as a torch checkpoint with weights_only=True ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''})."
        ) from e


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def plain_key(key: str) -> str:
    """The plain-network state-dict key of an adapted network's key.

    ``base_model.model.encoder.x.conv.base_layer.weight`` -> ``encoder.x.conv.weight``; trainable copies
    (``modules_to_save.<name>``, ``ln_tuning_layers.<name>``) map to the module they copy; adapter tensors
    (``lora_A``, ``conv_adapter_down``, ``ssf_scale`` ...) map to names the plain network does not have.
    """
    if key.startswith("base_model.model."):
        key = key[len("base_model.model."):]
    return _WRAPPER_SEGMENTS.sub("", key)


def _network_weights(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping) and isinstance(obj.get("network_weights"), Mapping):
        weights = dict(obj["network_weights"])
    elif isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        weights = dict(obj)
    else:
        keys = list(obj.keys())[:8] if isinstance(obj, Mapping) else type(obj).__name__
        raise PretrainedWeightsError(
            f"{path}: not an nnU-Net checkpoint: expected a dict with 'network_weights' (or a plain state dict), "
            f"got {keys}."
        )
    # DDP ('module.') and torch.compile ('_orig_mod.') prefixes of checkpoints written outside nnU-Net
    out = {}
    for k, v in weights.items():
        for prefix in ("module.", "_orig_mod."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def _is_head(module: nn.Module, plain: str) -> bool:
    """Whether a plain key belongs to the output layer that is re-initialised for the new label count."""
    suprem = getattr(module, SUPREM_ATTR, None)
    if suprem is not None:
        from monai_peft.checkpoints import HEAD_PREFIXES

        return plain.startswith(HEAD_PREFIXES[suprem])
    return any(s in plain for s in SKIP_IN_PRETRAINED)


def _suprem_weights(obj: Any, path: Path, backbone: str, plain: set[str]) -> dict[str, torch.Tensor]:
    """SuPreM's layout (``{"net": ...}``, ``module.`` / ``module.backbone.`` prefixes) -> plain backbone keys."""
    from monai_peft.checkpoints import _PREFIXES, extract_state_dict

    try:
        state = extract_state_dict(obj, path)
    except ValueError as e:
        raise PretrainedWeightsError(str(e)) from e
    out = {}
    for key, value in state.items():
        for prefix in _PREFIXES[backbone]:
            if key.startswith(prefix) and key[len(prefix):] in plain:
                out[key[len(prefix):]] = value
                break
    return out


def load_pretrained_backbone(network: nn.Module, path: str | os.PathLike, verbose: bool = False) -> dict[str, Any]:
    """Load an nnU-Net checkpoint of the plain architecture into a network built by the plugin.

    Args:
        network: the network from a plugin trainer's ``build_network_architecture`` (maybe DDP / compiled).
        path: ``checkpoint_final.pth`` (or any ``checkpoint_*.pth``) of an nnU-Net training with the same plans
            architecture, e.g. ``nnUNetv2_train SOURCE 3d_fullres all`` after ``nnUNetv2_move_plans_between_datasets``;
            for SuPreM trainers a SuPreM checkpoint (``supervised_suprem_segresnet_2100.pth`` layout).
        verbose: log every loaded key.

    Returns:
        a report: ``{"file", "sha256", "loaded", "skipped", "left_at_init"}``.

    Raises:
        PretrainedWeightsError: a key of the architecture is missing in the file or has another shape (the
            message shows the first few and says how to make plans compatible).
    """
    path = Path(path)
    module = unwrap_network(network)
    plain_keys = getattr(module, PLAIN_KEYS_ATTR, None)
    if plain_keys is None:
        raise TypeError(f"{type(module).__name__} was not built by an nnunet_plugin trainer; use nnU-Net's loader.")
    plain = set(plain_keys)
    suprem = getattr(module, SUPREM_ATTR, None)
    obj = safe_load_checkpoint(path, map_location="cpu")
    weights = _suprem_weights(obj, path, suprem, plain) if suprem else _network_weights(obj, path)
    model_sd = module.state_dict()
    missing, mismatched, new_state, left = [], [], {}, []
    for key, tensor in model_sd.items():
        base = plain_key(key)
        if base not in plain:
            left.append(key)  # adapter tensor
            continue
        if _is_head(module, base):
            left.append(key)  # seg layers / head: new label count, fresh init
            continue
        if base not in weights:
            missing.append(base)
        elif tuple(weights[base].shape) != tuple(tensor.shape):
            mismatched.append(f"{base}: file {tuple(weights[base].shape)} vs network {tuple(tensor.shape)}")
        else:
            new_state[key] = weights[base].to(dtype=tensor.dtype)
    if missing or mismatched:
        problems = [f"missing {m}" for m in sorted(set(missing))[:3]] + sorted(set(mismatched))[:3]
        raise PretrainedWeightsError(
            f"-pretrained_weights {path}: does not fit this network ({len(set(missing))} keys missing, "
            f"{len(set(mismatched))} with another shape; e.g. {'; '.join(problems)}). The checkpoint comes from "
            "another architecture: pretrain with the plans you fine-tune with (nnUNetv2_move_plans_between_datasets "
            "-s SOURCE -t TARGET -sp PLANS -tp PLANS) and the same configuration."
        )
    unexpected = module.load_state_dict(new_state, strict=False).unexpected_keys
    if unexpected:
        raise RuntimeError(f"internal: unexpected keys while loading {path}: {unexpected[:5]}")
    skipped = sorted(k for k in weights if k not in plain or _is_head(module, k))
    report = {"file": str(path.resolve()), "sha256": file_sha256(path), "loaded": len(new_state),
              "skipped": skipped, "left_at_init": len(left)}
    setattr(module, PRETRAINED_ATTR, dict(report))
    logger.info("loaded %d tensors from %s (%d skipped: %s)", len(new_state), path, len(skipped), skipped[:4])
    if verbose:
        for key in new_state:
            logger.info("  %s", key)
    return report


def adapter_state_dict(network: nn.Module) -> dict[str, torch.Tensor]:
    """What the base checkpoint cannot restore: trainable parameters, the buffers of their modules, and every
    tensor of the segmentation layers (re-initialised for the new label count, so not in the base file).

    Aliased registrations (nnU-Net's ``all_modules``, ``decoder.encoder``) appear once, under their first name.

    Args:
        network: an adapted network (maybe DDP / compiled).

    Returns:
        key -> detached CPU tensor, keys as in the network's ``state_dict()``.
    """
    module = unwrap_network(network)
    out: dict[str, torch.Tensor] = {}
    owners: set[str] = set()
    for name, p in module.named_parameters():  # remove_duplicate=True: first registration only
        # seg layers are never restored from the base file (new label count): keep all their copies
        if p.requires_grad or _is_head(module, plain_key(name)):
            out[name] = p.detach().cpu().contiguous()
            owners.add(name.rsplit(".", 1)[0])
    for name, b in module.named_buffers():
        if name.rsplit(".", 1)[0] in owners or _is_head(module, plain_key(name)):
            out[name] = b.detach().cpu().contiguous()
    if not out:
        raise ValueError(f"{type(module).__name__} has no trainable parameters: nothing to export.")
    return out


def adapter_path_for(checkpoint: str | os.PathLike) -> Path:
    """``.../checkpoint_final.pth`` -> ``.../checkpoint_final.adapter.safetensors``."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.stem + ".adapter.safetensors")


def save_adapter_file(network: nn.Module, path: str | os.PathLike, metadata: Mapping[str, Any]) -> Path:
    """Write :func:`adapter_state_dict` as safetensors, atomically (:func:`monai_peft.io.atomic_save_safetensors`).

    Args:
        network: the adapted network.
        path: target ``.safetensors`` file.
        metadata: JSON-serialisable facts stored under ``"monai_peft_nnunet"`` in the safetensors header
            (trainer, settings, plans, dataset.json, configuration, base checkpoint hash).
    """
    tensors = adapter_state_dict(network)
    header = {"format": "pt", ADAPTER_METADATA_KEY: json.dumps(dict(metadata), sort_keys=True, default=str)}
    return atomic_save_safetensors(tensors, path, metadata=header)


def load_adapter_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read an adapter file: ``(tensors, metadata)``.

    Raises:
        FileNotFoundError / ValueError: missing file, a file that is not safetensors (named), or a safetensors file
            without the plugin's metadata.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"adapter file {str(path)!r} does not exist.")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
        tensors = load_file(str(path))
    except Exception as e:  # safetensors raises its own SafetensorError ("header too large", ...)
        raise ValueError(f"adapter file {path}: not a safetensors file ({e}); expected the "
                         "checkpoint_*.adapter.safetensors an nnunet_plugin trainer writes.") from e
    if ADAPTER_METADATA_KEY not in header:
        raise ValueError(f"{path}: no {ADAPTER_METADATA_KEY!r} metadata; not written by nnunet_plugin.")
    return tensors, json.loads(header[ADAPTER_METADATA_KEY])


def atomic_torch_save(obj: Any, path: str | os.PathLike, save_fn: Optional[Any] = None) -> None:
    """``torch.save(obj, path)`` atomically, or ``save_fn(tmp)`` for writers that save themselves.

    Args:
        obj: what ``torch.save`` writes; ignored when ``save_fn`` is given.
        path: the final file.
        save_fn: called with the temporary path instead of ``torch.save`` (e.g. ``nnUNetTrainer.save_checkpoint``).
    """
    if save_fn is None:
        _atomic_torch_save(obj, path)
        return
    with atomic_path(path) as tmp:
        save_fn(tmp)
