"""Functions the MONAI bundles in ``bundles/`` call from their JSON configs.

They check what a user passes on the command line (``--dataset_dir``, ``--classes``, ``--peft#preset``) and
fail with a message that names the override, before ignite starts; they build datalists from a
TotalSegmentator folder; and they export a merged plain network for ``ckpt_export``.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from monai_peft.io import atomic_torch_save
from monai_peft.handlers.adapter_checkpoint import INFO_FILE, load_adapter_folder, unwrap_network
from monai_peft.workflows.records import atomic_write_json

__all__ = [
    "check_dataset_dir",
    "bundle_datalist",
    "data_summary",
    "evaluation_protocol",
    "eval_roi_size",
    "EVAL_PROTOCOLS",
    "SPLIT_SOURCES",
    "image_list",
    "run_info",
    "export_merged",
    "MERGEABLE_METHODS",
]

logger = logging.getLogger(__name__)

# methods whose adapters fold into the base weights (peft merge_and_unload); ConvAdapter keeps a side branch
MERGEABLE_METHODS = ("lora", "ssf", "bitfit", "full", "decoder", "head", "norm")
_SPLITS = ("train", "val", "test")
#: where train/val/test come from: the thesis's seeded 70/20/10 split (4.2.2.1) or meta.csv's ``split`` column
SPLIT_SOURCES = ("random", "meta")
#: how validation / test volumes meet the network: whole volume in sliding windows, or the thesis's
#: ``ResizeWithPadOrCropd`` to ``roi_size`` of Table 4.3 (one window per volume)
EVAL_PROTOCOLS = ("sliding_window", "resize_crop")


def check_dataset_dir(dataset_dir: str | Path | None, classes: str | Sequence[str] = "organs",
                      need_labels: bool = True, modality: str = "auto") -> list[Path]:
    """Check a TotalSegmentator folder and return its case folders.

    Args:
        dataset_dir: the ``--dataset_dir`` override: case folders ``sXXXX/`` with ``ct.nii.gz`` (or
            ``mri.nii.gz``) and ``segmentations/<structure>.nii.gz``.
        classes: the ``--classes`` override (class group name or list of structure names).
        need_labels: require label files (training, evaluation); inference does not.
        modality: ``"ct"``, ``"mr"`` or ``"auto"``.

    Raises:
        FileNotFoundError: the folder does not exist, holds no case, or (``need_labels``, CT) a case has none of
            the label files of ``classes``; the message names the override and the expected files. MR cases
            without segmentations are not an error: :func:`bundle_datalist` skips and counts them (thesis 4.2.5.3).
    """
    from monai_peft.data import class_group
    from monai_peft.data.totalseg import list_cases

    if dataset_dir is None or str(dataset_dir).strip() == "":
        raise FileNotFoundError("--dataset_dir is not set: point it at a TotalSegmentator folder (sXXXX/ct.nii.gz, "
                                "sXXXX/segmentations/*.nii.gz).")
    root = Path(dataset_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"--dataset_dir {root} does not exist (expected a TotalSegmentator folder with "
                                "case folders sXXXX/ct.nii.gz and sXXXX/segmentations/*.nii.gz).")
    try:
        cases = list_cases(root, modality)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"--dataset_dir {root} holds no TotalSegmentator case folder ({e}).") from None
    if need_labels and modality != "mr":
        names = class_group(classes)
        for case in cases:
            seg = case / "segmentations"
            if not any((seg / f"{n}.nii.gz").is_file() for n in names):
                raise FileNotFoundError(
                    f"--dataset_dir {root}: case {case.name} has no label files for --classes {classes!r}: expected "
                    f"{seg}/<structure>.nii.gz for structures such as {names[:3]}."
                )
    return cases


def _unlabelled(items: Sequence[dict[str, Any]]) -> list[str]:
    """Case ids whose merged label map holds no structure of the class group."""
    import nibabel as nib
    import numpy as np

    return [d["case_id"] for d in items if not np.any(np.asanyarray(nib.load(d["label"]).dataobj))]


def _splits(dataset_dir: str | Path, classes: str | Sequence[str], cache_dir: str | Path | None, modality: str,
            split_source: str, data_fraction: float, seed: int,
            fractions: Sequence[float]) -> tuple[dict[str, list[dict[str, Any]]], dict[str, Any]]:
    from monai_peft.data import meta_split, random_split, resolve_modality, subset_split, totalseg_datalist

    if split_source not in SPLIT_SOURCES:
        raise ValueError(f"--split_source must be one of {SPLIT_SOURCES}, got {split_source!r}.")
    modality = resolve_modality(classes, dataset_dir, modality)
    cases = check_dataset_dir(dataset_dir, classes, need_labels=True, modality=modality)
    items = totalseg_datalist(dataset_dir, classes, cache_dir=cache_dir, modality=modality,
                              case_ids=[c.name for c in cases], progress=False)
    skipped = _unlabelled(items) if modality == "mr" else []
    if skipped:
        # thesis 4.2.5.3: "excluding the images without segmentations of these subclasses" (298 -> 235 MR cases)
        logger.warning(f"--dataset_dir {dataset_dir}: {len(skipped)} of {len(items)} MR cases have no segmentation "
                       f"of --classes {classes!r} and are skipped: {skipped[:10]}{' ...' if len(skipped) > 10 else ''}")
        items = [d for d in items if d["case_id"] not in set(skipped)]
    if not items:
        raise FileNotFoundError(f"--dataset_dir {dataset_dir}: no case has a segmentation of --classes {classes!r}.")
    if split_source == "meta":
        splits = meta_split(items, dataset_dir)
    else:
        splits = random_split(items, fractions, seed)
    if float(data_fraction) < 1.0:
        splits = subset_split(splits, float(data_fraction), seed=seed)
    summary = {"dataset_dir": str(dataset_dir), "modality": modality, "classes": classes if isinstance(classes, str)
               else list(classes), "split_source": split_source, "seed": seed, "data_fraction": float(data_fraction),
               "n_cases": len(items) + len(skipped), "skipped_unlabelled": len(skipped),
               "skipped_cases": skipped, **{f"n_{k}": len(v) for k, v in splits.items()}}
    return splits, summary


def bundle_datalist(
    dataset_dir: str | Path,
    classes: str | Sequence[str] = "organs",
    split: str = "train",
    cache_dir: str | Path | None = None,
    modality: str = "auto",
    split_source: str = "random",
    data_fraction: float = 1.0,
    seed: int = 0,
    fractions: Sequence[float] = (0.7, 0.2, 0.1),
) -> list[dict[str, Any]]:
    """Datalist of one split of a TotalSegmentator folder, with merged label maps cached on disk.

    The thesis's protocol by default: a seeded random 70/20/10 split (4.2.2.1: 1228 cases -> 859 / 245 / 124),
    ``data_fraction`` of train+val re-split 80/20 with the test set kept (4.2.5.2: 88 / 22 at 10 %, 441 / 111 at
    50 %), and MR cases without any segmentation of ``classes`` skipped and counted (4.2.5.3).

    Args:
        dataset_dir: the ``--dataset_dir`` folder.
        classes: the ``--classes`` override.
        split: ``"train"``, ``"val"`` or ``"test"``.
        cache_dir: where merged label maps go (default ``<dataset_dir>/.monai_peft_labels``).
        modality: ``"ct"``, ``"mr"`` or ``"auto"`` (from ``classes`` and the folder; a mismatch is an error, see
            :func:`monai_peft.data.resolve_modality`).
        split_source: ``"random"`` (default, the thesis's split) or ``"meta"`` (``meta.csv``'s ``split`` column).
        data_fraction: share of train+val kept, in (0, 1] (``--data_fraction``; 1.0 keeps the split as it is).
        seed: seed of the random split and of the subset.
        fractions: ``(train, val, test)`` of the random split.

    Returns:
        ``[{"image": ..., "label": ..., "case_id": ...}, ...]``.

    Raises:
        ValueError: unknown ``split`` / ``split_source``, a class group of the other modality, or an empty split.
        KeyError: ``split_source="meta"`` and ``meta.csv`` lacks the ``split`` column or a case.
    """
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {_SPLITS}, got {split!r}.")
    splits, _ = _splits(dataset_dir, classes, cache_dir, modality, split_source, data_fraction, seed, fractions)
    if not splits[split]:
        n = sum(len(v) for v in splits.values())
        raise ValueError(f"--dataset_dir {dataset_dir}: the {split!r} split is empty ({n} cases in all, "
                         f"--split_source {split_source!r}).")
    return splits[split]


def data_summary(
    dataset_dir: str | Path,
    classes: str | Sequence[str] = "organs",
    cache_dir: str | Path | None = None,
    modality: str = "auto",
    split_source: str = "random",
    data_fraction: float = 1.0,
    seed: int = 0,
    fractions: Sequence[float] = (0.7, 0.2, 0.1),
) -> dict[str, Any]:
    """What :func:`bundle_datalist` made of a folder, for the run record's ``data`` section.

    Returns:
        ``{"dataset_dir", "modality", "classes", "split_source", "seed", "data_fraction", "n_cases",
        "skipped_unlabelled", "skipped_cases", "n_train", "n_val", "n_test"}``.
    """
    return _splits(dataset_dir, classes, cache_dir, modality, split_source, data_fraction, seed, fractions)[1]


def evaluation_protocol(protocol: str = "sliding_window", roi_size: Sequence[int] = (96, 96, 96),
                        overlap: float = 0.25) -> dict[str, Any]:
    """The run record's ``evaluation`` section, checked: how validation and test volumes were evaluated.

    Args:
        protocol: ``"sliding_window"`` (whole volume, ``roi_size`` windows with ``overlap``) or ``"resize_crop"``
            (thesis Table 4.3: ``ResizeWithPadOrCropd`` to ``roi_size``, one window).
        roi_size: window / crop size.
        overlap: sliding-window overlap.

    Raises:
        ValueError: an unknown protocol.
    """
    if protocol not in EVAL_PROTOCOLS:
        raise ValueError(f"--eval_protocol must be one of {EVAL_PROTOCOLS}, got {protocol!r}.")
    return {"protocol": protocol, "roi_size": [int(v) for v in roi_size],
            "overlap": float(overlap) if protocol == "sliding_window" else None}


def eval_roi_size(protocol: str, roi_size: Sequence[int]) -> list[int] | None:
    """``ResizeWithPadOrCropd`` size of the validation chain: ``None`` (whole volume) or ``roi_size``."""
    return None if evaluation_protocol(protocol, roi_size)["protocol"] == "sliding_window" else list(roi_size)


def image_list(dataset_dir: str | Path, split: str | None = "test", modality: str = "auto",
               split_source: str = "meta", classes: str | Sequence[str] | None = None,
               seed: int = 0) -> list[dict[str, str]]:
    """Images to predict: one split of a TotalSegmentator folder, or every case when ``split`` is None.

    Args:
        dataset_dir: the ``--dataset_dir`` folder.
        split: ``"train"``, ``"val"``, ``"test"`` or ``None`` (every case, no labels needed).
        modality: ``"ct"``, ``"mr"`` or ``"auto"``.
        split_source: ``"meta"`` (``meta.csv``'s column when the folder has one, else every case) or ``"random"``
            (the training bundle's split, :func:`bundle_datalist` with ``classes`` and ``seed``; needs labels).
        classes: the ``--classes`` of the training run (``split_source="random"``).
        seed: the training run's split seed.
    """
    from monai_peft.data import meta_split
    from monai_peft.data.totalseg import image_file

    if split is not None and split_source == "random":
        if classes is None:
            raise ValueError("image_list: split_source='random' needs the training run's classes.")
        chosen = bundle_datalist(dataset_dir, classes, split, None, modality, "random", 1.0, seed)
        return [{"image": d["image"], "case_id": d["case_id"]} for d in chosen]
    cases = check_dataset_dir(dataset_dir, need_labels=False, modality=modality)
    items = [{"image": str(image_file(c, modality)), "case_id": c.name} for c in cases]
    if split is not None and (Path(dataset_dir) / "meta.csv").is_file():
        try:
            chosen = meta_split(items, dataset_dir)[split]
            if chosen:
                return chosen
        except (KeyError, ValueError) as e:
            logger.warning(f"{dataset_dir}/meta.csv gives no split ({e}); predicting every case")
    return items


def run_info(preset: str, classes: str | Sequence[str], data: dict[str, Any] | None = None,
             evaluation: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run-record facts of a preset: ``preset``, ``method``, ``placement``, ``backbone``, ``classes``; with
    ``data`` (:func:`data_summary`) also ``task``, ``data_fraction`` and the ``data`` section, with ``evaluation``
    (:func:`evaluation_protocol`) the ``evaluation`` section.

    Raises:
        KeyError: unknown ``--peft#preset`` (the message lists close names).
    """
    from monai_peft.data import class_group
    from monai_peft.presets import get_preset

    p = get_preset(preset)
    info = {"preset": p.name, "method": p.method, "placement": p.placement, "backbone": p.backbone,
            "target": p.target, "train_fully": list(p.train_fully), "method_kwargs": dict(p.method_kwargs),
            "classes": classes if isinstance(classes, str) else list(classes), "class_names": class_group(classes)}
    if data is not None:
        # the task and data size the thesis tables sort runs by (5.6, 5.8, 5.9)
        info.update(task=classes if isinstance(classes, str) else "custom", data_fraction=data["data_fraction"],
                    data=dict(data))
    if evaluation is not None:
        info["evaluation"] = dict(evaluation)
    return info


def _remove_stale(filepath: Path) -> None:
    """Delete a merged network left by an earlier run, so ``ckpt_export`` cannot export the wrong weights."""
    for path in (filepath, filepath.with_suffix(filepath.suffix + ".json")):
        if path.exists():
            path.unlink()
            logger.info(f"export: removed stale {path}")


def export_merged(network: torch.nn.Module, adapter_dir: str | Path | None, filepath: str | Path,
                  method: str | None = None) -> Path | None:
    """Save a plain network with the adapter folded in, for ``python -m monai.bundle ckpt_export``.

    Loads ``adapter_dir`` (strictly) into a copy of ``network``, merges the adapters (``merge_and_unload``)
    and writes the plain ``state_dict`` to ``filepath`` atomically, with ``<filepath>.json`` describing it.
    ConvAdapter (a non-linear side branch) cannot be merged, and peft's merge may fail for other set-ups: then
    no file is written (a stale one from an earlier run is removed), the adapter folder is what ships, and None
    is returned. Only rank 0 writes in a distributed run.

    Args:
        network: the peft model of the run (optionally DDP-wrapped).
        adapter_dir: adapter folder to export (``.../adapter/best``, falling back to ``.../adapter/last``);
            ``None`` exports the weights ``network`` holds now.
        filepath: output ``.pt`` file (``models/model.pt`` by bundle convention).
        method: the preset's method; read from the peft config when not given.

    Raises:
        ValueError: merging left adapter tensors behind (the export would not be a plain network).
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return None
    net = copy.deepcopy(unwrap_network(network)).cpu()
    if method is None:
        cfg = getattr(net, "peft_config", {}).get(getattr(net, "active_adapter", "default"))
        method = str(getattr(cfg, "peft_type", "")).split(".")[-1].lower() if cfg is not None else "full"
        method = {"conv_adapter": "convadapter", "ln_tuning": "full"}.get(method, method)
    filepath = Path(filepath)
    if method not in MERGEABLE_METHODS:
        _remove_stale(filepath)
        logger.info(f"export: {method} adapters cannot be merged into the backbone; ship the adapter folder")
        return None
    if adapter_dir is not None:
        folder = Path(adapter_dir)
        if not (folder / INFO_FILE).exists() and (folder.parent / "last" / INFO_FILE).exists():
            folder = folder.parent / "last"
        load_adapter_folder(net, folder)
    # keys of the plain network the bundle's `network_def` builds (adapters dropped, nothing merged)
    plain_keys = set(copy.deepcopy(net).unload().state_dict()) if hasattr(net, "unload") else None
    try:
        merged = net.merge_and_unload() if hasattr(net, "merge_and_unload") else net
    except Exception as e:  # peft raises many types; the run itself succeeded, so report and ship the adapter
        _remove_stale(filepath)
        logger.warning(f"export: merging the {method} adapter failed ({type(e).__name__}: {e}); "
                       "no merged network written, ship the adapter folder")
        return None
    state = {k: v.detach().cpu().contiguous() for k, v in merged.state_dict().items()}
    leftovers = [k for k in state if any(t in k for t in ("lora_", "ssf_", "conv_adapter_", "base_layer",
                                                            "modules_to_save", "original_module"))]
    if leftovers:
        raise ValueError(f"export: merging {method} left adapter tensors in the network, e.g. {leftovers[:3]}.")
    if plain_keys is not None and set(state) != plain_keys:
        # e.g. SSF merged into bias-free convs adds their biases: the plain network could not load the file
        extra, missing = sorted(set(state) - plain_keys), sorted(plain_keys - set(state))
        _remove_stale(filepath)
        logger.warning(f"export: the merged {method} network does not fit the plain network (extra keys "
                       f"{extra[:3]}{'...' if len(extra) > 3 else ''}, missing {missing[:3]}); no merged network "
                       "written, ship the adapter folder")
        return None
    atomic_torch_save(state, filepath)
    atomic_write_json(filepath.with_suffix(filepath.suffix + ".json"),
                      {"method": method, "adapter_dir": str(adapter_dir) if adapter_dir else None,
                       "n_tensors": len(state), "network": type(merged).__name__})
    logger.info(f"export: merged {method} network written to {filepath}")
    return filepath
