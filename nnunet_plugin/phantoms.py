"""Synthetic nnU-Net raw datasets for tests, demos and smoke runs (no downloads).

Each case is a small 3D volume with a few ellipsoids whose intensity depends on their label, so a
network can learn the task within a handful of iterations.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["make_phantom_dataset", "phantom_case"]


def phantom_case(
    shape: Sequence[int], num_labels: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """One phantom: an image and its label map.

    Args:
        shape: volume size ``(X, Y, Z)``.
        num_labels: foreground labels ``1..num_labels``; each gets one ellipsoid.
        rng: random generator (cases differ by position, radius and noise).

    Returns:
        image ``(X, Y, Z)`` float32 and labels ``(X, Y, Z)`` uint8.
    """
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij"))
    image = rng.normal(0.0, 0.3, size=tuple(shape)).astype(np.float32)
    labels = np.zeros(tuple(shape), dtype=np.uint8)
    for label in range(1, num_labels + 1):
        radius = rng.uniform(0.15, 0.25, size=3) * np.asarray(shape)
        centre = np.asarray([rng.uniform(r, s - r) for r, s in zip(radius, shape)], dtype=np.float32)
        dist = sum(((grid[i] - centre[i]) / radius[i]) ** 2 for i in range(3))
        inside = dist <= 1.0
        labels[inside] = label
        image[inside] += 1.0 + label  # label-specific brightness
    return image, labels


def make_phantom_dataset(
    raw_root: str | os.PathLike,
    dataset_id: int,
    name: str = "Phantom",
    num_cases: int = 6,
    shape: Sequence[int] = (24, 24, 24),
    num_labels: int = 2,
    spacing: Sequence[float] = (1.5, 1.5, 1.5),
    seed: int = 0,
) -> Path:
    """Write an nnU-Net v2 raw dataset ``DatasetXXX_<name>`` of phantom cases.

    Args:
        raw_root: the ``nnUNet_raw`` folder.
        dataset_id: three-digit nnU-Net dataset id (1..999).
        name: dataset name suffix.
        num_cases: number of training cases (nnU-Net's 5-fold split needs 5 or more).
        shape: volume size ``(X, Y, Z)``, e.g. 16^3-32^3 for tests.
        num_labels: foreground labels per case.
        spacing: voxel size in mm.
        seed: random seed.

    Returns:
        the dataset folder.
    """
    import nibabel as nib
    from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json

    if not 1 <= int(dataset_id) <= 999:
        raise ValueError(f"dataset_id must be in 1..999, got {dataset_id}.")
    if num_cases < 1:
        raise ValueError(f"num_cases must be >= 1, got {num_cases}.")
    folder = Path(raw_root) / f"Dataset{int(dataset_id):03d}_{name}"
    (folder / "imagesTr").mkdir(parents=True, exist_ok=True)
    (folder / "labelsTr").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    affine = np.diag([*map(float, spacing), 1.0])
    for i in range(num_cases):
        image, labels = phantom_case(shape, num_labels, rng)
        case = f"{name.lower()}_{i:03d}"
        nib.save(nib.Nifti1Image(image, affine), str(folder / "imagesTr" / f"{case}_0000.nii.gz"))
        nib.save(nib.Nifti1Image(labels, affine), str(folder / "labelsTr" / f"{case}.nii.gz"))
    label_ids = {"background": 0, **{f"structure{k}": k for k in range(1, num_labels + 1)}}
    generate_dataset_json(str(folder), {0: "CT"}, label_ids, num_cases, ".nii.gz", dataset_name=name,
                          converted_by="monai-peft phantoms", license="synthetic phantoms, no license restriction")
    return folder
