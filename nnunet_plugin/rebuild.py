"""Rebuild an nnU-Net predictor from base weights + an adapter file (no fine-tuned checkpoint needed).

The adapter file (``checkpoint_final.adapter.safetensors``, written by every plugin trainer at every save) holds
the trainable tensors plus the trainer name, settings, plans, configuration and dataset.json. With the
pretrained nnU-Net checkpoint it was trained from, that is all the network needs:

- :func:`rebuild_network`: the adapted network with base + adapter weights;
- :func:`predictor_from_adapter`: a ready ``nnUNetPredictor`` (``predict_from_files`` ...);
- :func:`export_model_folder`: a regular nnU-Net model folder (``plans.json``, ``dataset.json``,
  ``fold_X/checkpoint_final.pth``) for ``nnUNetv2_predict_from_modelfolder``.

Command line: ``monai-peft nnunet-rebuild --base BASE.pth --adapter ADAPTER.safetensors -o MODEL_DIR``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Union

import torch
from torch import nn

from monai_peft.io import atomic_write_json

from nnunet_plugin.checkpoints import (
    adapter_state_dict, atomic_torch_save, file_sha256, load_adapter_file, load_pretrained_backbone,
)

__all__ = ["rebuild_network", "load_adapter_tensors", "predictor_from_adapter", "export_model_folder", "trainer_class"]

logger = logging.getLogger(__name__)


def trainer_class(name: str) -> type:
    """A plugin trainer by class name, else nnU-Net's own lookup (``nnUNet_extTrainer`` included)."""
    from nnunet_plugin import trainers

    if name in trainers.__all__:
        return getattr(trainers, name)
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    return recursive_find_trainer_class_by_name(name)


def rebuild_network(
    base_weights: Union[str, os.PathLike], adapter_file: Union[str, os.PathLike], check_base: bool = True
) -> tuple[nn.Module, dict[str, Any]]:
    """The fine-tuned network from its pretrained checkpoint and adapter file.

    Args:
        base_weights: the nnU-Net checkpoint given as ``-pretrained_weights`` when training the adapter.
        adapter_file: ``*.adapter.safetensors`` written by a plugin trainer.
        check_base: compare the base file's SHA-256 with the one recorded at training time (default ``True``).

    Returns:
        ``(network, metadata)``: the network in eval mode without deep supervision, on CPU; the adapter metadata.

    Raises:
        ValueError: the base file differs from the one the adapter was trained on, the adapter file is not
            safetensors, lacks tensors the rebuilt network needs, or has tensors that do not fit it (names the file
            and the first keys).
    """
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    tensors, meta = load_adapter_file(adapter_file)
    lacking = [k for k in ("trainer", "plans", "configuration", "dataset_json") if k not in meta]
    if lacking:
        raise ValueError(f"{adapter_file}: the adapter metadata lacks {lacking}; write it with an nnunet_plugin trainer.")
    recorded = (meta.get("base_weights") or {}).get("sha256")
    if check_base and recorded and recorded != file_sha256(base_weights):
        raise ValueError(
            f"--base {base_weights}: SHA-256 differs from the base checkpoint the adapter {adapter_file} was trained "
            f"on ({meta['base_weights'].get('file')}); pass that file (or check_base=False to force)."
        )
    plans_manager = PlansManager(meta["plans"])
    configuration = plans_manager.get_configuration(meta["configuration"])
    dataset_json = meta["dataset_json"]
    cls = trainer_class(meta["trainer"])
    network = cls.build_network_architecture(
        plans_manager, configuration, determine_num_input_channels(plans_manager, configuration, dataset_json),
        plans_manager.get_label_manager(dataset_json).num_segmentation_heads, enable_deep_supervision=False)
    load_pretrained_backbone(network, base_weights)
    load_adapter_tensors(network, tensors, adapter_file, meta.get("trainer", "plugin"))
    network.eval()
    return network, meta


def load_adapter_tensors(network: nn.Module, tensors: dict[str, torch.Tensor], adapter_file: Union[str, os.PathLike],
                         trainer: str = "plugin") -> None:
    """Load an adapter file's tensors into a network whose base weights are loaded, strictly.

    Every tensor the base checkpoint cannot restore (:func:`~nnunet_plugin.checkpoints.adapter_state_dict`:
    adapters, seg layers, trained modules) must be in the file, with the network's shape, and the file may hold
    nothing else; otherwise those layers would silently predict with their initial values.

    Raises:
        ValueError: naming the file and the first missing, unknown or mis-shaped tensors.
    """
    state = network.state_dict()
    unknown = sorted(set(tensors) - set(state))
    if unknown:
        raise ValueError(f"{adapter_file}: {len(unknown)} tensors do not fit the rebuilt network, e.g. {unknown[:3]}.")
    missing = sorted(set(adapter_state_dict(network)) - set(tensors))
    if missing:
        raise ValueError(f"{adapter_file}: {len(missing)} adapter tensors of the rebuilt {trainer} network are "
                         f"missing, e.g. {missing[:3]}; the file is incomplete or from another trainer/settings.")
    shapes = [f"{k}: file {tuple(v.shape)} vs network {tuple(state[k].shape)}" for k, v in tensors.items()
              if tuple(v.shape) != tuple(state[k].shape)]
    if shapes:
        raise ValueError(f"{adapter_file}: {len(shapes)} tensors have another shape than the rebuilt network, e.g. "
                         f"{'; '.join(shapes[:3])}.")
    network.load_state_dict(tensors, strict=False)  # the other tensors came from the base file


def predictor_from_adapter(
    base_weights: Union[str, os.PathLike],
    adapter_file: Union[str, os.PathLike],
    device: Union[str, torch.device] = "cpu",
    use_mirroring: bool = True,
    tile_step_size: float = 0.5,
    check_base: bool = True,
):
    """An ``nnUNetPredictor`` for the fine-tuned model (``predict_from_files``, ``predict_single_npy_array``).

    Args:
        base_weights: the pretrained nnU-Net checkpoint.
        adapter_file: the adapter safetensors file.
        device: ``"cpu"`` or ``"cuda"``.
        use_mirroring: test-time mirroring as in ``nnUNetv2_predict`` (default ``True``).
        tile_step_size: sliding-window step as a fraction of the patch (nnU-Net default 0.5).
        check_base: see :func:`rebuild_network`.
    """
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    network, meta = rebuild_network(base_weights, adapter_file, check_base=check_base)
    device = torch.device(device)
    predictor = nnUNetPredictor(tile_step_size=tile_step_size, use_gaussian=True, use_mirroring=use_mirroring,
                                perform_everything_on_device=device.type == "cuda", device=device,
                                allow_tqdm=False)
    plans_manager = PlansManager(meta["plans"])
    mirroring = meta.get("inference_allowed_mirroring_axes")
    predictor.manual_initialization(
        network.to(device), plans_manager, plans_manager.get_configuration(meta["configuration"]),
        [network.state_dict()], meta["dataset_json"], meta["trainer"],
        tuple(mirroring) if mirroring is not None else None)
    return predictor


def export_model_folder(
    base_weights: Union[str, os.PathLike],
    adapter_file: Union[str, os.PathLike],
    output_folder: Union[str, os.PathLike],
    fold: Union[int, str] = 0,
    check_base: bool = True,
) -> Path:
    """Write an nnU-Net model folder for ``nnUNetv2_predict_from_modelfolder -m OUTPUT -f FOLD``.

    Args:
        base_weights: the pretrained nnU-Net checkpoint.
        adapter_file: the adapter safetensors file.
        output_folder: created if needed; gets ``plans.json``, ``dataset.json`` and ``fold_<fold>/checkpoint_final.pth``.
        fold: fold name in the folder (default 0).
        check_base: see :func:`rebuild_network`.

    Returns:
        the checkpoint file written.
    """
    network, meta = rebuild_network(base_weights, adapter_file, check_base=check_base)
    out = Path(output_folder)
    out.mkdir(parents=True, exist_ok=True)
    for name, content in (("plans.json", meta["plans"]), ("dataset.json", meta["dataset_json"])):
        atomic_write_json(out / name, content)
    mirroring = meta.get("inference_allowed_mirroring_axes")
    checkpoint = {
        "network_weights": network.state_dict(),
        "trainer_name": meta["trainer"],
        "init_args": {"plans": meta["plans"], "configuration": meta["configuration"], "fold": fold,
                      "dataset_json": meta["dataset_json"], "device": "cpu"},
        "inference_allowed_mirroring_axes": tuple(mirroring) if mirroring is not None else None,
        "current_epoch": meta.get("epoch", 0),
    }
    target = out / f"fold_{fold}" / "checkpoint_final.pth"
    atomic_torch_save(checkpoint, target)
    logger.info("wrote %s", target)
    return target
