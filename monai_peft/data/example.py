"""The real abdominal CT and MR shipped with monai-peft (TotalSegmentator 2.18.0 test references, Apache-2.0).

Two real scans at 3 mm with TotalSegmentator's own label maps (``totalseg_example/README.md`` says where they come
from; ``totalseg_example/LICENSE`` is their licence). They are small (< 1 MB together) so that the demo, the
``example-data`` command, the docs' first examples and the tests run on real anatomy without any download; they are
too few to report accuracy on.
"""

from __future__ import annotations

import csv
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["EXAMPLE_DIR", "ExampleScan", "EXAMPLE_SCANS", "example_scan", "write_example_dataset", "REAL_CASE_ID",
           "SCANS_FOLDER"]

REAL_CASE_ID = "s1000"  # the real scan's case folder; phantoms are s0000, s0001, ...
SCANS_FOLDER = "example_scans"  # the shipped files as they are (image, TotalSegmentator label map, class_map.json)

EXAMPLE_DIR = Path(__file__).resolve().parent / "totalseg_example"


@dataclass(frozen=True)
class ExampleScan:
    """One shipped scan.

    Attributes:
        modality: ``"ct"`` or ``"mr"``.
        image: NIfTI image (CT in Hounsfield units, MR in scanner units), int16.
        label: NIfTI label map on the image's grid, TotalSegmentator ids of ``task``.
        task: the key of ``class_map`` naming the label ids (``"total"``: 117 CT classes, ``"total_mr"``: 50).
        class_map: the TotalSegmentator ``class_map.json`` (``{task: {"id": name}}``).
    """

    modality: str
    image: Path
    label: Path
    task: str
    class_map: Path = EXAMPLE_DIR / "class_map.json"


EXAMPLE_SCANS: dict[str, ExampleScan] = {
    "ct": ExampleScan("ct", EXAMPLE_DIR / "example_ct_sm.nii.gz", EXAMPLE_DIR / "example_seg.nii.gz", "total"),
    "mr": ExampleScan("mr", EXAMPLE_DIR / "example_mr_sm.nii.gz", EXAMPLE_DIR / "example_seg_mr.nii.gz", "total_mr"),
}


def example_scan(modality: str = "ct") -> ExampleScan:
    """The shipped example scan of ``modality`` (``"ct"`` or ``"mr"``).

    Raises:
        ValueError: another modality was asked for.
    """
    key = modality.lower()
    if key not in EXAMPLE_SCANS:
        raise ValueError(f"example_scan: modality must be one of {sorted(EXAMPLE_SCANS)}, got {modality!r}.")
    return EXAMPLE_SCANS[key]


def write_example_dataset(
    root: str | Path,
    modality: str = "ct",
    n_phantoms: int = 6,
    shape: Sequence[int] = (32, 32, 32),
    spacing: Sequence[float] = (3.0, 3.0, 3.0),
    seed: int = 0,
    real: bool = True,
    overwrite: bool = False,
) -> list[str]:
    """Write a small TotalSegmentator v2 dataset to try the bundles, the nnU-Net converter and the readers on.

    ``root`` gets phantom cases (:func:`~monai_peft.data.write_phantom_dataset`; ``meta.csv`` splits
    train, train, val, test, ...), the real example scan of ``modality`` as case ``s1000`` (split ``test``; every
    structure of TotalSegmentator's task as ``segmentations/<name>.nii.gz``) and, in ``example_scans/``, the shipped
    files as they are (image, TotalSegmentator label map, ``class_map.json``, licence) for commands that take an
    image and a label map. The folder is written beside ``root`` and moved into place only when complete.

    Args:
        root: the dataset folder; must not exist or be empty unless ``overwrite``.
        modality: ``"ct"`` (``ct.nii.gz``) or ``"mr"`` (``mri.nii.gz``).
        n_phantoms: phantom cases (>= 4 gives every split a case). Default 6.
        shape: phantom size in voxels. Default ``(32, 32, 32)``.
        spacing: phantom voxel size in mm; default 3 mm, the real scans' spacing, so both meet the networks at
            the same scale.
        seed: phantom random seed.
        real: add the real example scan. Default True.
        overwrite: replace an existing non-empty ``root``.

    Returns:
        The case ids.

    Raises:
        FileExistsError: ``root`` holds files and ``overwrite`` is False.
        ValueError: bad ``modality`` or ``n_phantoms``.
    """
    from monai_peft.data.class_maps import task_id_map
    from monai_peft.data.phantoms import write_phantom_dataset
    from monai_peft.data.totalseg import import_multilabel_case
    from monai_peft.io import atomic_folder, atomic_path

    scan = example_scan(modality)
    if n_phantoms < 0:
        raise ValueError(f"n_phantoms must be >= 0, got {n_phantoms}.")
    if n_phantoms == 0 and not real:
        raise ValueError("nothing to write: n_phantoms is 0 and real is False.")
    root = Path(root)
    if root.exists() and (not root.is_dir() or any(root.iterdir())) and not overwrite:
        raise FileExistsError(f"{root} exists and is not empty; choose a new folder (or overwrite=True / --overwrite).")
    with atomic_folder(root) as tmp:
        ids = write_phantom_dataset(tmp, n_phantoms, shape, seed, modality, spacing) if n_phantoms else []
        rows = _read_rows(tmp / "meta.csv") if n_phantoms else []
        if real:
            import_multilabel_case(scan.image, scan.label, task_id_map(scan.class_map, scan.task), tmp / REAL_CASE_ID,
                                   modality, write_empty=True)
            ids.append(REAL_CASE_ID)
            rows.append({"image_id": REAL_CASE_ID, "age": "", "gender": "", "institute": "TotalSegmentator example",
                         "study_type": f"real {modality.upper()} (TotalSegmentator 2.18.0 test reference)",
                         "split": "test"})
            scans = tmp / SCANS_FOLDER
            scans.mkdir()
            for src in (scan.image, scan.label, scan.class_map, EXAMPLE_DIR / "LICENSE", EXAMPLE_DIR / "README.md"):
                shutil.copyfile(src, scans / src.name)
        with atomic_path(tmp / "meta.csv", suffix=".csv") as meta, open(meta, "w", newline="") as f:
            columns = ["image_id", "age", "gender", "institute", "study_type", "split"]
            writer = csv.DictWriter(f, columns, delimiter=";")
            writer.writeheader()
            writer.writerows({k: row.get(k, "") for k in columns} for row in rows)
    return ids


def _read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f, delimiter=";"))
