"""TotalSegmentator folder -> nnU-Net v2 raw dataset (``imagesTr/``, ``labelsTr/``, ``dataset.json``, splits).

The TotalSegmentator layout (``sXXXX/ct.nii.gz``, ``sXXXX/segmentations/<structure>.nii.gz``, ``meta.csv`` with
``;``-separated columns ``image_id`` and ``split``) is read with :mod:`monai_peft.data` (issue 3: class groups,
``merge_structures``), so the labels match the MONAI bundles exactly. Cases whose ``split`` is ``test`` go to
``imagesTs/`` / ``labelsTs/``; ``train`` and ``val`` cases go to ``imagesTr/`` / ``labelsTr/``, and
``splits_final.json`` (one fold: train vs val) is written beside ``dataset.json``. nnU-Net reads splits from the
*preprocessed* folder only: :func:`install_splits` copies the file there after ``nnUNetv2_plan_and_preprocess``.
The dataset is written into a temporary folder beside its final place and moved there only when complete, so a
case that cannot be read leaves nothing behind (and an earlier dataset of that name untouched).

Command line: ``monai-peft totalseg-to-nnunet TOTALSEG_ROOT --dataset-id 501 --classes organs``.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional, Union

import nibabel as nib
import numpy as np
from monai.utils import optional_import

from monai_peft.data import list_cases, merge_structures, read_meta
from monai_peft.data.totalseg import dataset_classes, image_file, load_nifti
from monai_peft.io import atomic_folder, atomic_path, atomic_save_nifti, atomic_write_json

tqdm, _has_tqdm = optional_import("tqdm", name="tqdm")

__all__ = ["totalseg_to_nnunet", "install_splits", "dataset_folder_name", "CHANNEL_NAMES"]

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
    overwrite: bool = False,
) -> Path:
    """Convert a TotalSegmentator-layout folder into ``raw_root/DatasetXXX_<name>``.

    The dataset is written into a temporary folder in ``raw_root`` and renamed into place only when every case,
    ``dataset.json`` and the splits are written; on any error the temporary folder is removed.

    Args:
        totalseg_root: folder with case folders ``sXXXX`` (and optionally ``meta.csv``).
        raw_root: the ``nnUNet_raw`` folder.
        dataset_id: nnU-Net dataset id, 1..999.
        classes: class group (``"organs"`` = organs_17, ``"vertebrae"``, ``"mr_organs"``) or list of structure
            names; label ``i + 1`` is the ``i``-th name. Every name needs a mask file in some case.
        name: dataset name suffix; default ``TotalSeg<Group>``.
        modality: ``"ct"`` (``ct.nii.gz``) or ``"mr"`` (``mri.nii.gz``).
        progress: show a tqdm bar.
        overwrite: replace an existing ``DatasetXXX_<name>`` (swapped only when the new one is complete).

    Returns:
        the dataset folder.

    Raises:
        ValueError: bad ``dataset_id`` / ``modality``, unknown class names or classes without any mask file (with
            the closest names), a ``meta.csv`` split other than train/val/test, no training case, or an unreadable
            case file (named).
        FileNotFoundError: no case folder under ``totalseg_root``.
        FileExistsError: the dataset folder exists (without ``overwrite``), or another dataset has the same id.
    """
    if not 1 <= int(dataset_id) <= 999:
        raise ValueError(f"dataset_id must be in 1..999, got {dataset_id!r}.")
    if modality not in CHANNEL_NAMES:
        raise ValueError(f"modality must be 'ct' or 'mr', got {modality!r}.")
    folder = Path(raw_root) / dataset_folder_name(dataset_id, classes, name)
    cases = list_cases(totalseg_root, modality)
    names = dataset_classes(cases, classes, totalseg_root)
    meta_path = Path(totalseg_root) / "meta.csv"
    split_of: dict[str, str] = {}
    if meta_path.is_file():
        for row in read_meta(totalseg_root):
            split = (row.get("split") or "train").strip()
            if split not in ("train", "val", "test"):
                raise ValueError(f"{meta_path}: case {row['image_id']!r} has split {split!r}; expected train/val/test.")
            split_of[row["image_id"]] = split
    raw = folder.parent
    same_id = sorted(p.name for p in raw.glob(f"Dataset{int(dataset_id):03d}_*") if p.is_dir() and p != folder)
    if same_id:
        raise FileExistsError(f"{raw}: dataset id {int(dataset_id)} is taken by {same_id}; nnU-Net needs unique ids.")
    if folder.exists() and not overwrite:
        raise FileExistsError(f"{folder} exists; pass overwrite=True (--overwrite) to replace it.")
    with atomic_folder(folder) as tmp:
        splits = _write_dataset(tmp, cases, names, split_of, meta_path, modality, progress, folder.name)
        n_train = len(splits["train"]) + len(splits["val"])
        if n_train == 0:
            raise ValueError(f"{totalseg_root}: no train/val case to write to imagesTr (all {len(cases)} are test).")
        dataset_json: dict[str, Any] = {
            "channel_names": {"0": CHANNEL_NAMES[modality]},
            "labels": {"background": 0, **{n: i for i, n in enumerate(names, start=1)}},
            "numTraining": n_train,
            "file_ending": ".nii.gz",
            "name": folder.name.split("_", 1)[1],
            "description": f"TotalSegmentator {modality.upper()} converted by monai-peft; classes: "
                           f"{classes if isinstance(classes, str) else 'custom list'}",
        }
        atomic_write_json(tmp / "dataset.json", dataset_json)
        if splits["val"]:
            atomic_write_json(tmp / "splits_final.json",
                              [{"train": sorted(splits["train"]), "val": sorted(splits["val"])}])
    logger.info("wrote %s: %d train, %d val, %d test cases", folder, len(splits["train"]), len(splits["val"]),
                len(splits["test"]))
    return folder


def dataset_folder_name(dataset_id: int, classes: Union[str, Sequence[str]] = "organs",
                        name: Optional[str] = None) -> str:
    """``DatasetXXX_<name>``; the default name is ``TotalSeg<Group>`` (``TotalSegCustom`` for a list of names).

    Raises:
        ValueError: an id outside 1..999, or a name with characters other than letters, digits, ``_`` and ``-``.
    """
    if not 1 <= int(dataset_id) <= 999:
        raise ValueError(f"dataset_id must be in 1..999, got {dataset_id!r}.")
    if name is None:
        name = "TotalSeg" + ("".join(p.capitalize() for p in classes.split("_")) if isinstance(classes, str) else "Custom")
    if not re.fullmatch(r"[A-Za-z0-9_\-]+", name):
        raise ValueError(f"dataset name {name!r}: use letters, digits, '_' and '-' only (it becomes a folder name).")
    return f"Dataset{int(dataset_id):03d}_{name}"


def _write_dataset(tmp: Path, cases: Sequence[Path], names: Sequence[str], split_of: dict[str, str], meta_path: Path,
                   modality: str, progress: bool, title: str) -> dict[str, list[str]]:
    """Write every case's image and merged label map into ``tmp``; returns the case ids per split."""
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (tmp / sub).mkdir(parents=True, exist_ok=True)
    splits: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    iterator = tqdm(cases, desc=f"TotalSegmentator -> {title}") if (progress and _has_tqdm) else cases
    for case in iterator:
        case_id = case.name
        split = split_of.get(case_id, "train")
        if split_of and case_id not in split_of:
            logger.warning("%s: case %s has no row in meta.csv; used for training", meta_path, case_id)
        label, affine = merge_structures(case, names, modality)  # reads every mask; errors name the file
        image = image_file(case, modality)
        load_nifti(image)  # a truncated image would only fail later, inside nnU-Net's preprocessing
        images, labels = ("imagesTs", "labelsTs") if split == "test" else ("imagesTr", "labelsTr")
        _atomic_copy(image, tmp / images / f"{case_id}_0000.nii.gz")
        atomic_save_nifti(_nifti_image(label, affine), tmp / labels / f"{case_id}.nii.gz")
        splits[split].append(case_id)
    return splits


def install_splits(raw_dataset_folder: Union[str, os.PathLike],
                   preprocessed_root: Optional[Union[str, os.PathLike]] = None) -> Path:
    """Copy ``splits_final.json`` from the raw dataset into ``nnUNet_preprocessed/<dataset>/`` (fold 0 = meta.csv).

    Args:
        raw_dataset_folder: the folder :func:`totalseg_to_nnunet` returned.
        preprocessed_root: ``nnUNet_preprocessed`` (default: the environment variable).

    Raises:
        FileNotFoundError: no ``splits_final.json`` in the raw folder (meta.csv had no val cases).
        ValueError: ``nnUNet_preprocessed`` is not set and no root was given.
    """
    raw = Path(raw_dataset_folder)
    src = raw / "splits_final.json"
    if not src.is_file():
        raise FileNotFoundError(f"{src} does not exist (meta.csv had no 'val' cases).")
    root = preprocessed_root or os.environ.get("nnUNet_preprocessed")
    if not root:
        raise ValueError("nnUNet_preprocessed is not set; set it (or pass preprocessed_root) to install the splits.")
    dst = Path(root) / raw.name / "splits_final.json"
    dst.parent.mkdir(parents=True, exist_ok=True)
    _atomic_copy(src, dst)
    return dst
