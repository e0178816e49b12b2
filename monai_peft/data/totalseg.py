"""Reader for the TotalSegmentator v2 dataset layout, with an on-disk cache of merged label maps (thesis 4.2.2).

Layout (CT; MR is the same with ``mri.nii.gz``)::

    root/
      meta.csv                      # ';'-separated, column image_id (+ split, age, gender, ...)
      s0000/ct.nii.gz
      s0000/segmentations/<name>.nii.gz   # one binary mask per structure (117 for CT, 50 for MR)

Training needs one label map per case for a class group (:mod:`monai_peft.data.class_maps`); merging 17-117
mask files every epoch is slow, so :func:`totalseg_datalist` merges once and caches the result as NIfTI.
A missing structure file counts as absent (zeros); a mask on a different grid than its image is an error, and so
is a structure name that is neither a TotalSegmentator name nor a file of the dataset (a typo would train an
always-empty class). Every read failure names the file.
"""

from __future__ import annotations

import csv
import hashlib
import logging
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from monai.utils import optional_import

from monai_peft.data.class_maps import class_group, closest_names, totalseg_structure_names
from monai_peft.io import atomic_save_nifti

tqdm, _has_tqdm = optional_import("tqdm", name="tqdm")

__all__ = [
    "IMAGE_FILES",
    "list_cases",
    "image_file",
    "load_nifti",
    "structures_in",
    "dataset_classes",
    "read_meta",
    "merge_structures",
    "remap_label_map",
    "write_case",
    "import_multilabel_case",
    "cached_label_map",
    "totalseg_datalist",
]

logger = logging.getLogger(__name__)

IMAGE_FILES: dict[str, str] = {"ct": "ct.nii.gz", "mr": "mri.nii.gz"}
SEG_DIR = "segmentations"
DEFAULT_CACHE = ".monai_peft_labels"


def image_file(case_dir: str | Path, modality: str = "auto") -> Path:
    """The image of a case folder: ``ct.nii.gz`` (CT) or ``mri.nii.gz`` (MR).

    Args:
        case_dir: a case folder (``sXXXX``).
        modality: ``"ct"``, ``"mr"`` or ``"auto"`` (whichever file exists, CT first).

    Raises:
        FileNotFoundError: naming the folder and the file names looked for.
    """
    case_dir = Path(case_dir)
    if modality not in ("auto", *IMAGE_FILES):
        raise ValueError(f"modality must be 'auto', 'ct' or 'mr', got {modality!r}.")
    names = list(IMAGE_FILES.values()) if modality == "auto" else [IMAGE_FILES[modality]]
    for name in names:
        if (case_dir / name).is_file():
            return case_dir / name
    raise FileNotFoundError(f"{case_dir}: no image file, expected one of {names}.")


def list_cases(root: str | Path, modality: str = "auto") -> list[Path]:
    """Case folders under ``root`` (sorted by name) that hold an image of the modality.

    Raises:
        FileNotFoundError: ``root`` does not exist or holds no case.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"TotalSegmentator root not found: {root}")
    cases = []
    for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        try:
            image_file(d, modality)
        except FileNotFoundError:
            continue
        cases.append(d)
    if not cases:
        raise FileNotFoundError(f"{root}: no case folder with {IMAGE_FILES if modality == 'auto' else IMAGE_FILES[modality]}.")
    return cases


def read_meta(root: str | Path) -> list[dict[str, str]]:
    """Rows of ``root/meta.csv`` (``;``-separated, as in TotalSegmentator v2), one dict per case.

    Raises:
        FileNotFoundError: no ``meta.csv``.
        ValueError: the file lacks the ``image_id`` column.
    """
    path = Path(root) / "meta.csv"
    if not path.is_file():
        raise FileNotFoundError(f"meta.csv not found: {path}")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f, delimiter=";"))
    if rows and "image_id" not in rows[0]:
        raise ValueError(f"{path}: no 'image_id' column (columns: {list(rows[0])}); is it ';'-separated?")
    return [{k.strip(): (v or "").strip() for k, v in row.items() if k is not None} for row in rows]


def load_nifti(path: str | Path, read_data: bool = True) -> tuple[nib.Nifti1Image, np.ndarray | None]:
    """Open a NIfTI file (and read its voxels); any failure is an error that names the file.

    Args:
        path: a ``.nii.gz`` / ``.nii`` file.
        read_data: also read the voxel array (a truncated file only fails here).

    Returns:
        ``(image, data)``; ``data`` is ``None`` when ``read_data`` is False.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file cannot be read as NIfTI (corrupt, truncated, another format).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"NIfTI file {path} does not exist.")
    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj) if read_data else None
    except Exception as e:  # nibabel, gzip, zlib and numpy each raise their own types for a bad file
        raise ValueError(f"{path}: cannot be read as NIfTI ({type(e).__name__}: {e}).") from e
    return img, data


def structures_in(case_dir: str | Path) -> set[str]:
    """Names of the structure files of a case (``segmentations/<name>.nii.gz``)."""
    seg = Path(case_dir) / SEG_DIR
    suffix = ".nii.gz"
    return {p.name[: -len(suffix)] for p in seg.glob(f"*{suffix}")} if seg.is_dir() else set()


def _case_class_names(case_dir: Path, classes: str | Sequence[str]) -> list[str]:
    """``class_group(classes)`` that also accepts the structures this case has files for (datasets of your own)."""
    return class_group(classes, known=totalseg_structure_names() | structures_in(case_dir),
                       known_what=f"TotalSegmentator v2 nor the files of {case_dir / SEG_DIR}")


def dataset_classes(
    cases: Sequence[str | Path], classes: str | Sequence[str], root: str | Path | None = None
) -> list[str]:
    """Resolve ``classes`` for a set of case folders and check them against the structure files present.

    Names must be TotalSegmentator v2 names or structures some case has a file for (datasets of your own); an
    unknown name is an error with the closest valid names (a typo would train an always-empty class). Names no
    case has a file for are logged as a warning naming them (they stay empty: a subset without those structures,
    or CT structures asked of MR data); if that is every name, it is an error.

    Args:
        cases: case folders (``sXXXX``).
        classes: class group name, one structure name or a list of names.
        root: the dataset folder, for the messages. Default: the first case's parent.

    Returns:
        The structure names; label ``i + 1`` is ``names[i]``.

    Raises:
        ValueError: an unknown name, or no case has a file for any of the names (the message names the folder
            and suggests the closest structure files present).
    """
    present: set[str] = set()
    for case in cases:
        present |= structures_in(case)
    names = class_group(classes, known=totalseg_structure_names() | present,
                        known_what="TotalSegmentator v2 nor the structure files of the cases")
    absent = [n for n in names if n not in present]
    if not absent or not cases:
        return names
    where = Path(root) if root is not None else Path(cases[0]).parent
    if len(absent) == len(names):
        hints = []
        for n in absent[:5]:
            close = closest_names(n, present)
            hints.append(f"{n!r}" + (f" (present: {' or '.join(map(repr, close))})" if close else ""))
        raise ValueError(
            f"{where}: no case has {SEG_DIR}/<name>.nii.gz for any of the {len(names)} classes, e.g. "
            f"{', '.join(hints)}; check the class names and the modality (CT and MR structures differ)."
        )
    logger.warning("%s: no case has a mask file for %d of the %d classes, which stay empty: %s", where, len(absent),
                   len(names), absent)
    return names


def _same_grid(a: nib.Nifti1Image, b: nib.Nifti1Image, atol: float = 1e-3) -> bool:
    return tuple(a.shape[:3]) == tuple(b.shape[:3]) and np.allclose(a.affine, b.affine, atol=atol)


def _label_dtype(n_classes: int) -> type:
    return np.uint8 if n_classes < 256 else np.uint16


def merge_structures(
    case_dir: str | Path, classes: str | Sequence[str] = "organs", modality: str = "auto"
) -> tuple[np.ndarray, np.ndarray]:
    """Merge a case's per-structure masks into one label map for a class group.

    Args:
        case_dir: a case folder with ``ct.nii.gz``/``mri.nii.gz`` and ``segmentations/``.
        classes: a class group name or list of structure names (see :func:`~monai_peft.data.class_group`);
            label ``i + 1`` is the ``i``-th name. Later names win where masks overlap.
        modality: ``"ct"``, ``"mr"`` or ``"auto"``.

    Returns:
        ``(label, affine)``: ``label`` is ``(H, W, D)`` uint8 (uint16 above 255 classes) on the image grid.

    Raises:
        ValueError: a mask's shape or affine differs from the image's (the message names both files), a file
            cannot be read (named), or an unknown structure name.
    """
    case_dir = Path(case_dir)
    names = _case_class_names(case_dir, classes)
    img, _ = load_nifti(image_file(case_dir, modality), read_data=False)
    label = np.zeros(img.shape[:3], dtype=_label_dtype(len(names)))
    absent = []
    for idx, name in enumerate(names, start=1):
        mask_path = case_dir / SEG_DIR / f"{name}.nii.gz"
        if not mask_path.is_file():
            absent.append(name)
            continue
        mask, data = load_nifti(mask_path)
        if not _same_grid(mask, img):
            raise ValueError(
                f"{mask_path}: grid {tuple(mask.shape)} with affine {np.round(mask.affine, 4).tolist()} differs from "
                f"{image_file(case_dir, modality)}: {tuple(img.shape)} with affine {np.round(img.affine, 4).tolist()}."
            )
        label[np.asarray(data).reshape(label.shape) > 0] = idx
    if absent:
        logger.debug("%s: %d structure files absent (counted as empty): %s", case_dir.name, len(absent), absent)
    return label, img.affine


def remap_label_map(
    label: np.ndarray, id_to_name: Mapping[int, str], classes: str | Sequence[str], source: str | Path | None = None
) -> np.ndarray:
    """Map a multi-label map in task ids (e.g. TotalSegmentator's ``total``) to a class group's ids.

    Args:
        label: integer label map of any shape, values are keys of ``id_to_name`` (or 0, background).
        id_to_name: ``{task id: structure name}`` (see :func:`~monai_peft.data.task_id_map`).
        classes: class group name or list; structures outside it become background.
        source: the file ``label`` was read from, named in errors.

    Returns:
        An array of the same shape with values ``0..len(classes)``.

    Raises:
        ValueError: ``label`` holds values that are not ids of ``id_to_name``, a class name is neither a
            TotalSegmentator name nor in the map (with the closest names), or the map names none of the classes;
            the message names ``source``. Classes the map lacks (but not all) are logged and stay empty.
    """
    where = f"{source}: " if source is not None else ""
    mapped = set(id_to_name.values())
    names = class_group(classes, known=mapped | totalseg_structure_names(),
                        known_what="TotalSegmentator v2 nor the class map")
    missing = [n for n in names if n not in mapped]
    if len(missing) == len(names):
        hints = [f"{n!r}" + (f" (closest: {', '.join(map(repr, closest_names(n, mapped)))})"
                             if closest_names(n, mapped) else "") for n in missing[:5]]
        raise ValueError(f"{where}the class map names none of the {len(names)} classes, e.g. {', '.join(hints)}; "
                         "is it the right class map and task?")
    if missing:
        logger.warning("%sthe class map has no id for %d of the %d classes, which stay empty: %s", where,
                       len(missing), len(names), missing)
    values = np.unique(np.asarray(label))
    unknown = [int(v) for v in values if v != 0 and int(v) not in id_to_name]
    if unknown or np.any(values != np.round(values)):
        bad = unknown or [float(v) for v in values if v != np.round(v)]
        raise ValueError(f"{where}label values {bad[:10]} are not ids of the class map (ids {min(id_to_name)}.."
                         f"{max(id_to_name)}); is it the right class map and task?")
    index = {n: i for i, n in enumerate(names, start=1)}
    lut = np.zeros(max(int(values.max(initial=0)), max(id_to_name, default=0)) + 1, dtype=_label_dtype(len(names)))
    for task_id, name in id_to_name.items():
        if name in index:
            lut[int(task_id)] = index[name]
    return lut[np.asarray(label).astype(np.int64)]


def _nifti(data: np.ndarray, affine: np.ndarray) -> nib.Nifti1Image:
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    return img


def write_case(
    case_dir: str | Path,
    image: np.ndarray,
    affine: np.ndarray,
    label: np.ndarray,
    names: Mapping[int, str] | Sequence[str],
    modality: str = "ct",
    write_empty: bool = True,
) -> Path:
    """Write one case in TotalSegmentator layout: the image and one binary mask file per structure.

    Args:
        case_dir: the case folder to create (``root/sXXXX``).
        image: ``(H, W, D)`` image (CT in HU, saved as int16 when integral).
        affine: ``(4, 4)`` voxel-to-RAS affine shared by image and masks.
        label: ``(H, W, D)`` integer label map.
        names: ``{label id: structure name}`` or a sequence where element ``i`` is label ``i + 1``.
        modality: ``"ct"`` (``ct.nii.gz``) or ``"mr"`` (``mri.nii.gz``).
        write_empty: also write all-zero masks for names absent from ``label`` (as the real dataset does).

    Returns:
        The case folder.
    """
    if modality not in IMAGE_FILES:
        raise ValueError(f"modality must be 'ct' or 'mr', got {modality!r}.")
    if image.shape[:3] != label.shape[:3]:
        raise ValueError(f"write_case: image shape {image.shape} and label shape {label.shape} differ.")
    case_dir = Path(case_dir)
    id_to_name = dict(names) if isinstance(names, Mapping) else {i + 1: n for i, n in enumerate(names)}
    data = image.astype(np.int16) if np.allclose(image, np.round(image)) and np.abs(image).max() < 32767 else image
    atomic_save_nifti(_nifti(np.asarray(data), affine), case_dir / IMAGE_FILES[modality])
    for idx, name in id_to_name.items():
        mask = (label == idx).astype(np.uint8)
        if mask.any() or write_empty:
            atomic_save_nifti(_nifti(mask, affine), case_dir / SEG_DIR / f"{name}.nii.gz")
    return case_dir


def import_multilabel_case(
    image_path: str | Path,
    label_path: str | Path,
    id_to_name: Mapping[int, str],
    case_dir: str | Path,
    modality: str = "ct",
    write_empty: bool = False,
) -> Path:
    """Turn an image + multi-label map (TotalSegmentator ``--ml`` output) into a TotalSegmentator-layout case.

    Args:
        image_path: the image NIfTI.
        label_path: the label map NIfTI in task ids, on the same grid.
        id_to_name: ``{task id: structure name}``, e.g. ``task_id_map("class_map.json", "total")``.
        case_dir: output case folder.
        modality: ``"ct"`` or ``"mr"``.
        write_empty: also write masks for structures absent from the label map.

    Raises:
        ValueError: the label map's grid differs from the image's (both files named), it holds values that are
            not ids of ``id_to_name`` (named with the file), or a file cannot be read (named).
    """
    img, image = load_nifti(image_path)
    lab, data = load_nifti(label_path)
    if not _same_grid(img, lab):
        raise ValueError(f"{label_path}: grid {lab.shape} differs from {image_path}: {img.shape}.")
    values = np.unique(data)
    unknown = [v.item() for v in values if v != 0 and (v != np.round(v) or int(v) not in id_to_name)]
    if unknown:
        raise ValueError(f"{label_path}: label values {unknown[:10]} are not ids of the class map "
                         f"(ids {min(id_to_name, default=0)}..{max(id_to_name, default=0)}); is it the right task?")
    label = np.asarray(data).astype(np.int64)
    return write_case(case_dir, np.asarray(image), img.affine, label, id_to_name, modality, write_empty)


def _group_tag(names: Sequence[str], modality: str) -> str:
    return hashlib.sha1(("|".join(names) + f"#{modality}").encode()).hexdigest()[:10]


def cached_label_map(
    case_dir: str | Path, classes: str | Sequence[str] = "organs", cache_dir: str | Path | None = None, modality: str = "auto"
) -> Path:
    """Path of the merged label map of a case, merging and caching it first if needed.

    The cache file is ``cache_dir/<case>_<group hash>.nii.gz``; it is rebuilt when missing or older than the
    image or any of the group's mask files. Written atomically, so parallel workers cannot read half a file.

    Args:
        case_dir: a case folder.
        classes: class group name or list.
        cache_dir: where merged maps go; default ``<root>/.monai_peft_labels`` beside the case folders.
        modality: ``"ct"``, ``"mr"`` or ``"auto"``.
    """
    case_dir = Path(case_dir)
    names = _case_class_names(case_dir, classes)
    cache = Path(cache_dir) if cache_dir is not None else case_dir.parent / DEFAULT_CACHE
    out = cache / f"{case_dir.name}_{_group_tag(names, modality)}.nii.gz"
    # the segmentations folder's own mtime changes when a mask file is added or deleted
    sources = [image_file(case_dir, modality), case_dir / SEG_DIR] + [case_dir / SEG_DIR / f"{n}.nii.gz" for n in names]
    newest = max(p.stat().st_mtime for p in sources if p.exists())
    if out.is_file() and out.stat().st_mtime >= newest:
        return out
    label, affine = merge_structures(case_dir, names, modality)
    atomic_save_nifti(_nifti(label, affine), out)
    return out


def totalseg_datalist(
    root: str | Path,
    classes: str | Sequence[str] = "organs",
    cache_dir: str | Path | None = None,
    modality: str = "auto",
    case_ids: Iterable[str] | None = None,
    num_workers: int = 0,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """MONAI datalist for a TotalSegmentator-layout folder, with merged label maps cached on disk.

    Args:
        root: dataset folder (case folders ``sXXXX`` and optionally ``meta.csv``).
        classes: ``"organs"`` (thesis Table 4.2), ``"vertebrae"`` (4.4), ``"mr_organs"`` (4.5) or a list.
        cache_dir: where merged label maps are stored (default ``root/.monai_peft_labels``).
        modality: ``"ct"``, ``"mr"`` or ``"auto"``.
        case_ids: only these cases (folder names), in this order; default all cases.
        num_workers: threads for merging (0 = in this thread).
        progress: show a tqdm bar while merging.

    Returns:
        ``[{"image": str, "label": str, "case_id": str}, ...]`` ready for ``LoadImaged``.

    Raises:
        FileNotFoundError: ``root`` has no case, or a requested case id is not there (named).
        ValueError: an unknown class name or none with a file (see :func:`dataset_classes`), or an unreadable file.
    """
    root = Path(root)
    cases = list_cases(root, modality)
    if case_ids is not None:
        by_name = {c.name: c for c in cases}
        wanted = list(case_ids)
        unknown = [c for c in wanted if c not in by_name]
        if unknown:
            raise FileNotFoundError(f"{root}: case ids not found: {unknown[:10]}")
        cases = [by_name[c] for c in wanted]
    names = dataset_classes(cases, classes, root)
    cache = Path(cache_dir) if cache_dir is not None else root / DEFAULT_CACHE

    def one(case: Path) -> dict[str, Any]:
        label = cached_label_map(case, names, cache, modality)
        return {"image": str(image_file(case, modality)), "label": str(label), "case_id": case.name}

    bar = progress and _has_tqdm and len(cases) > 1
    if num_workers > 0:
        with ThreadPoolExecutor(num_workers) as pool:
            it = pool.map(one, cases)
            return list(tqdm(it, total=len(cases), desc="label maps", disable=not bar) if _has_tqdm else it)
    it = tqdm(cases, desc="label maps", disable=not bar) if _has_tqdm else cases
    return [one(c) for c in it]
