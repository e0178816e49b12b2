"""TotalSegmentator folder -> nnU-Net v2 raw dataset (``imagesTr/``, ``labelsTr/``, ``dataset.json``, splits).

The TotalSegmentator layout (``sXXXX/ct.nii.gz``, ``sXXXX/segmentations/<structure>.nii.gz``, ``meta.csv`` with
``;``-separated columns ``image_id`` and ``split``) is read with :mod:`monai_peft.data` (issue 3: class groups,
``merge_structures``), so the labels match the MONAI bundles exactly. Cases whose ``split`` is ``test`` go to
``imagesTs/`` / ``labelsTs/``; ``train`` and ``val`` cases go to ``imagesTr/`` / ``labelsTr/``, and
``splits_final.json`` (one fold: train vs val) is written beside ``dataset.json``. nnU-Net reads splits from the
*preprocessed* folder only: :func:`install_splits` copies the file there after ``nnUNetv2_plan_and_preprocess``.

Command line: ``monai-peft totalseg-to-nnunet TOTALSEG_ROOT --dataset-id 501 --classes organs``.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional, Union

import nibabel as nib
import numpy as np
from monai.utils import optional_import

from monai_peft.data import class_group, list_cases, merge_structures, read_meta
from monai_peft.io import atomic_path, atomic_save_nifti, atomic_write_json

tqdm, _has_tqdm = optional_import("tqdm", name="tqdm")

__all__ = ["totalseg_to_nnunet", "install_splits", "CHANNEL_NAMES"]

logger = logging.getLogger(__name__)

# nnU-Net normalisation by channel name: "CT" = dataset-wide clipping + z-score, anything else z-score per image
CHANNEL_NAMES = {"ct": "CT", "mr": "MRI"}


def _atomic_copy(src: Path, dst: Path) -> None:
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


def _nifti_image(data: np.ndarray, affine: np.ndarray) -> nib.Nifti1Image:
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    return img


def totalseg_to_nnunet(
    totalseg_root: Union[str, os.PathLike],
    raw_root: Union[str, os.PathLike],
    dataset_id: int,
    classes: Union[str, Sequence[str]] = "organs",
    name: Optional[str] = None,
    modality: str = "ct",
    progress: bool = True,
) -> Path:
    """Convert a TotalSegmentator-layout folder into ``raw_root/DatasetXXX_<name>``.

    Args:
        totalseg_root: folder with case folders ``sXXXX`` (and optionally ``meta.csv``).
        raw_root: the ``nnUNet_raw`` folder.
        dataset_id: nnU-Net dataset id, 1..999.
        classes: class group (``"organs"`` = organs_17, ``"vertebrae"``, ``"mr_organs"``) or list of structure
            names; label ``i + 1`` is the ``i``-th name.
        name: dataset name suffix; default ``TotalSeg<Group>``.
        modality: ``"ct"`` (``ct.nii.gz``) or ``"mr"`` (``mri.nii.gz``).
        progress: show a tqdm bar.

    Returns:
        the dataset folder.

    Raises:
        ValueError: bad ``dataset_id`` / ``modality``, a ``meta.csv`` split other than train/val/test, or no
            training case.
        FileNotFoundError: no case folder under ``totalseg_root``.
    """
    if not 1 <= int(dataset_id) <= 999:
        raise ValueError(f"dataset_id must be in 1..999, got {dataset_id!r}.")
    if modality not in CHANNEL_NAMES:
        raise ValueError(f"modality must be 'ct' or 'mr', got {modality!r}.")
    names = class_group(classes)
    if name is None:
        name = "TotalSeg" + ("".join(p.capitalize() for p in classes.split("_")) if isinstance(classes, str) else "Custom")
    cases = list_cases(totalseg_root, modality)
    meta_path = Path(totalseg_root) / "meta.csv"
    split_of: dict[str, str] = {}
    if meta_path.is_file():
        for row in read_meta(totalseg_root):
            split = (row.get("split") or "train").strip()
            if split not in ("train", "val", "test"):
                raise ValueError(f"{meta_path}: case {row['image_id']!r} has split {split!r}; expected train/val/test.")
            split_of[row["image_id"]] = split
    folder = Path(raw_root) / f"Dataset{int(dataset_id):03d}_{name}"
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    splits: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    iterator = tqdm(cases, desc=f"TotalSegmentator -> {folder.name}") if (progress and _has_tqdm) else cases
    for case in iterator:
        case_id = case.name
        split = split_of.get(case_id, "train")
        if split_of and case_id not in split_of:
            logger.warning("%s: case %s has no row in meta.csv; used for training", meta_path, case_id)
        label, affine = merge_structures(case, names, modality)
        images, labels = ("imagesTs", "labelsTs") if split == "test" else ("imagesTr", "labelsTr")
        _atomic_copy(case / ("ct.nii.gz" if modality == "ct" else "mri.nii.gz"),
                     folder / images / f"{case_id}_0000.nii.gz")
        atomic_save_nifti(_nifti_image(label, affine), folder / labels / f"{case_id}.nii.gz")
        splits[split].append(case_id)
    n_train = len(splits["train"]) + len(splits["val"])
    if n_train == 0:
        raise ValueError(f"{totalseg_root}: no train/val case to write to imagesTr (all {len(cases)} are test).")
    dataset_json: dict[str, Any] = {
        "channel_names": {"0": CHANNEL_NAMES[modality]},
        "labels": {"background": 0, **{n: i for i, n in enumerate(names, start=1)}},
        "numTraining": n_train,
        "file_ending": ".nii.gz",
        "name": name,
        "description": f"TotalSegmentator {modality.upper()} converted by monai-peft; classes: "
                       f"{classes if isinstance(classes, str) else 'custom list'}",
    }
    atomic_write_json(folder / "dataset.json", dataset_json)
    if splits["val"]:
        atomic_write_json(folder / "splits_final.json",
                          [{"train": sorted(splits["train"]), "val": sorted(splits["val"])}])
    logger.info("wrote %s: %d train, %d val, %d test cases", folder, len(splits["train"]), len(splits["val"]),
                len(splits["test"]))
    return folder


def install_splits(raw_dataset_folder: Union[str, os.PathLike],
                   preprocessed_root: Optional[Union[str, os.PathLike]] = None) -> Path:
    """Copy ``splits_final.json`` from the raw dataset into ``nnUNet_preprocessed/<dataset>/`` (fold 0 = meta.csv).

    Args:
        raw_dataset_folder: the folder :func:`totalseg_to_nnunet` returned.
        preprocessed_root: ``nnUNet_preprocessed`` (default: the environment variable).

    Raises:
        FileNotFoundError: no ``splits_final.json`` in the raw folder (meta.csv had no val cases).
        RuntimeError: ``nnUNet_preprocessed`` is not set and no root was given.
    """
    raw = Path(raw_dataset_folder)
    src = raw / "splits_final.json"
    if not src.is_file():
        raise FileNotFoundError(f"{src} does not exist (meta.csv had no 'val' cases).")
    root = preprocessed_root or os.environ.get("nnUNet_preprocessed")
    if not root:
        raise RuntimeError("nnUNet_preprocessed is not set; pass preprocessed_root.")
    dst = Path(root) / raw.name / "splits_final.json"
    dst.parent.mkdir(parents=True, exist_ok=True)
    _atomic_copy(src, dst)
    return dst
