"""Synthetic CT/MR phantoms in TotalSegmentator v2 layout, for tests and demos (no real data needed).

Each phantom is a body ellipsoid (fat rim, soft tissue) in air with ellipsoid organs at plausible positions
(patient right = +x, anterior = +y, superior = +z; RAS affine), a column of vertebral bodies, CT-like
Hounsfield values (or MR-like intensities) and Gaussian noise. Sizes are relative to the volume, so 16^3 to
96^3 phantoms all contain the large organs.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from monai_peft.data.class_maps import VERTEBRAE_25
from monai_peft.data.totalseg import write_case
from monai_peft.io import atomic_path

__all__ = ["PHANTOM_ORGANS", "VENOUS_PHASE_HU", "make_phantom", "write_phantom_dataset"]

# name: (centre (x, y, z) in [-1, 1] body coordinates, radii as fraction of the half-size, CT HU, MR intensity)
PHANTOM_ORGANS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float], float, float]] = {
    "lung_upper_lobe_right": ((0.45, 0.05, 0.72), (0.28, 0.35, 0.2), -850.0, 30.0),
    "lung_upper_lobe_left": ((-0.45, 0.05, 0.72), (0.28, 0.35, 0.2), -850.0, 30.0),
    "lung_lower_lobe_right": ((0.45, -0.2, 0.42), (0.28, 0.3, 0.12), -830.0, 35.0),
    "lung_lower_lobe_left": ((-0.45, -0.2, 0.42), (0.28, 0.3, 0.12), -830.0, 35.0),
    "lung_middle_lobe_right": ((0.45, 0.35, 0.45), (0.2, 0.15, 0.1), -840.0, 30.0),
    "liver": ((0.35, 0.05, 0.1), (0.38, 0.4, 0.22), 60.0, 420.0),
    "gallbladder": ((0.22, 0.4, -0.05), (0.08, 0.08, 0.1), 5.0, 900.0),
    "spleen": ((-0.5, -0.25, 0.12), (0.15, 0.2, 0.15), 50.0, 600.0),
    "stomach": ((-0.3, 0.3, 0.15), (0.2, 0.18, 0.15), 15.0, 500.0),
    "pancreas": ((-0.05, 0.05, -0.05), (0.3, 0.08, 0.06), 40.0, 550.0),
    "kidney_right": ((0.35, -0.4, -0.25), (0.1, 0.12, 0.18), 30.0, 700.0),
    "kidney_left": ((-0.35, -0.4, -0.22), (0.1, 0.12, 0.18), 30.0, 700.0),
    "adrenal_gland_right": ((0.3, -0.38, 0.02), (0.05, 0.05, 0.05), 25.0, 650.0),
    "adrenal_gland_left": ((-0.3, -0.38, 0.05), (0.05, 0.05, 0.05), 25.0, 650.0),
    "aorta": ((-0.08, -0.25, 0.0), (0.06, 0.06, 0.9), 180.0, 200.0),
    "inferior_vena_cava": ((0.12, -0.2, -0.1), (0.06, 0.06, 0.7), 120.0, 220.0),
    "portal_vein_and_splenic_vein": ((0.05, 0.0, 0.02), (0.2, 0.04, 0.04), 140.0, 240.0),
}
# MR-only structures drawn in MR phantoms (whole lungs and the spine as one structure, as in total_mr)
_MR_EXTRA = {
    "lung_right": ((0.45, 0.0, 0.62), (0.3, 0.4, 0.3), -850.0, 30.0),
    "lung_left": ((-0.45, 0.0, 0.62), (0.3, 0.4, 0.3), -850.0, 30.0),
}
_MR_SKIP = {k for k in PHANTOM_ORGANS if k.startswith("lung_")}
# portal-venous phase CT (contrast agent in the vessels and enhancing organs), the phase of most abdominal CT in
# TotalSegmentator and AbdomenAtlas; organs the table does not name keep their native value
VENOUS_PHASE_HU: dict[str, float] = {
    "liver": 110.0, "spleen": 130.0, "kidney_right": 190.0, "kidney_left": 190.0, "pancreas": 95.0,
    "adrenal_gland_right": 70.0, "adrenal_gland_left": 70.0, "aorta": 200.0, "inferior_vena_cava": 160.0,
    "portal_vein_and_splenic_vein": 180.0, "stomach": -10.0, "gallbladder": 5.0,
}  # fmt: skip


def _ellipsoid(grid: tuple[np.ndarray, ...], centre, radii) -> np.ndarray:
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii)) <= 1.0


def make_phantom(
    shape: Sequence[int] = (48, 48, 48), seed: int = 0, modality: str = "ct", noise: float | None = None,
    phase: str = "native",
    organ_scale: float = 1.0,
) -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
    """One synthetic case in memory.

    Args:
        shape: ``(H, W, D)`` voxels (x = right, y = anterior, z = superior).
        seed: random seed; jitters positions (5% of the size), radii (10%) and noise.
        modality: ``"ct"`` (Hounsfield units, int16 range) or ``"mr"`` (positive intensities, air 0).
        noise: Gaussian noise sigma (default 20 HU for CT, 25 for MR).
        phase: CT contrast phase: ``"native"`` (default, :data:`PHANTOM_ORGANS` values; kidneys and spleen lie
            within the noise of the soft tissue around them) or ``"venous"`` (:data:`VENOUS_PHASE_HU`, enhancing
            organs and vessels stand out, as in contrast CT).
        organ_scale: factor on every organ's radii (default 1.0); above 1 organs fill more of small volumes,
            e.g. for a demo that must learn them in a few hundred steps.

    Returns:
        ``(image, label, id_to_name)``: ``image`` ``(H, W, D)`` float32, ``label`` ``(H, W, D)`` uint8 with
        ids of ``id_to_name`` (organs of :data:`PHANTOM_ORGANS`, then 5 consecutive vertebrae for CT or one
        ``"vertebrae"`` structure for MR). Structures never overlap.
    """
    if modality not in ("ct", "mr"):
        raise ValueError(f"modality must be 'ct' or 'mr', got {modality!r}.")
    if len(shape) != 3 or min(shape) < 8:
        raise ValueError(f"shape must be 3 sizes >= 8, got {tuple(shape)}.")
    if phase not in ("native", "venous"):
        raise ValueError(f"phase must be 'native' or 'venous', got {phase!r}.")
    if not 0.25 <= organ_scale <= 4.0:
        raise ValueError(f"organ_scale must be in [0.25, 4], got {organ_scale}.")
    rng = np.random.default_rng(seed)
    grid = np.meshgrid(*[np.linspace(-1.0, 1.0, int(s), dtype=np.float32) for s in shape], indexing="ij")
    ct = modality == "ct"
    image = np.full(shape, -1000.0 if ct else 0.0, dtype=np.float32)
    label = np.zeros(shape, dtype=np.uint8)
    body = _ellipsoid(grid, (0.0, 0.0, 0.0), (0.92, 0.75, 1.2))
    inner = _ellipsoid(grid, (0.0, 0.0, 0.0), (0.85, 0.68, 1.2))
    image[body] = -100.0 if ct else 350.0  # subcutaneous fat
    image[inner] = 35.0 if ct else 250.0  # muscle / soft tissue

    organs = dict(PHANTOM_ORGANS)
    if not ct:
        organs = {k: v for k, v in organs.items() if k not in _MR_SKIP} | _MR_EXTRA
    names: dict[int, str] = {}
    for idx, (name, (centre, radii, hu, mr)) in enumerate(organs.items(), start=1):
        c = np.asarray(centre) + rng.uniform(-0.05, 0.05, 3)
        r = np.asarray(radii) * rng.uniform(0.9, 1.1, 3) * organ_scale
        mask = _ellipsoid(grid, c, r) & inner & (label == 0)
        label[mask] = idx
        if ct and phase == "venous":
            hu = VENOUS_PHASE_HU.get(name, hu)
        image[mask] = hu if ct else mr
        names[idx] = name

    # vertebral bodies along z behind the aorta: 5 consecutive vertebrae (CT) or one "vertebrae" mask (MR)
    n_vert = 5
    start = int(rng.integers(0, 13 - n_vert + 1))  # S1..T6: the abdominal spine
    vert_names = list(VERTEBRAE_25[start : start + n_vert])[::-1]  # cranial at the top (+z)
    edges = np.linspace(-0.9, 0.9, n_vert + 1)
    for k in range(n_vert):
        centre = (0.0, -0.55, (edges[k] + edges[k + 1]) / 2)
        radii = (0.13, 0.11, (edges[k + 1] - edges[k]) / 2 * 0.8)  # gaps = intervertebral discs
        mask = _ellipsoid(grid, centre, radii) & (label == 0)
        name = vert_names[k] if ct else "vertebrae"
        idx = next((i for i, n in names.items() if n == name), len(names) + 1)
        names[idx] = name
        label[mask] = idx
        image[mask] = 450.0 if ct else 150.0

    image += rng.normal(0.0, noise if noise is not None else (20.0 if ct else 25.0), size=shape).astype(np.float32)
    if not ct:
        np.clip(image, 0.0, None, out=image)
    return image, label, names


def write_phantom_dataset(
    root: str | Path,
    n_cases: int = 4,
    shape: Sequence[int] = (48, 48, 48),
    seed: int = 0,
    modality: str = "ct",
    spacing: Sequence[float] = (1.5, 1.5, 1.5),
    write_empty: bool = True,
    phase: str = "native",
    organ_scale: float = 1.0,
) -> list[str]:
    """Write ``n_cases`` phantoms as a TotalSegmentator v2 folder (``sXXXX/ct.nii.gz`` or ``mri.nii.gz``,
    ``sXXXX/segmentations/<name>.nii.gz``, ``meta.csv`` with a ``split`` column).

    Odd cases have no gallbladder (an all-zero mask, as after cholecystectomy), so readers see absent classes.

    Args:
        root: output folder (created).
        n_cases: number of cases; case ``i`` uses seed ``seed + i``.
        shape: ``(H, W, D)`` voxels per case.
        seed: base random seed.
        modality: ``"ct"`` or ``"mr"``.
        spacing: voxel size in mm (diagonal RAS affine).
        write_empty: write all-zero masks for absent structures, as the real dataset does.
        phase: CT contrast phase, see :func:`make_phantom`.
        organ_scale: factor on the organs' radii, see :func:`make_phantom`.

    Returns:
        The case ids (``s0000``, ``s0001``, ...).
    """
    if n_cases < 1:
        raise ValueError(f"n_cases must be >= 1, got {n_cases}.")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    affine = np.diag([*map(float, spacing), 1.0])
    ids, splits = [], ("train", "train", "val", "test")
    for i in range(n_cases):
        image, label, names = make_phantom(shape, seed + i, modality, phase=phase, organ_scale=organ_scale)
        if i % 2 == 1:
            gb = next((k for k, n in names.items() if n == "gallbladder"), None)
            if gb is not None:
                image[label == gb] = 35.0 if modality == "ct" else 250.0
                label[label == gb] = 0
        case_id = f"s{i:04d}"
        write_case(root / case_id, np.round(image), affine, label, names, modality, write_empty)
        ids.append(case_id)
    with atomic_path(root / "meta.csv", suffix=".csv") as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f, delimiter=";")
        writer.writerow(["image_id", "age", "gender", "institute", "study_type", "split"])
        rng = np.random.default_rng(seed)
        for i, case_id in enumerate(ids):
            writer.writerow([case_id, int(rng.integers(20, 90)), "mf"[i % 2], "A", "phantom", splits[i % 4]])
    return ids
