"""CAMUS reader for the 2019 (``.mhd``) and 2023 (NIfTI) releases, and the Simpson self-check report.

Labels: 0 background, 1 LV endocardium (cavity), 2 myocardium, 3 left atrium. Each patient folder holds
ED and ES frames of the apical 2CH and 4CH views, their ``_gt`` masks (absent for the 2019 test set) and
``Info_2CH.cfg`` / ``Info_4CH.cfg``. Official splits: 2023 ``database_split/subgroup_*.txt``; 2019 the
``training`` / ``testing`` folders. Evaluation with and without poor-quality images follows the echo seed
(section III: "tested once with all image qualities and once without poor image quality").
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from monai_peft.io import atomic_write_json

from .simpson import ejection_fraction, simpson_biplane

__all__ = ["CAMUS_LABELS", "CFG_FIELDS", "CamusRecord", "read_info_cfg", "read_image", "find_camus",
           "load_camus_record", "camus_quality_report"]

logger = logging.getLogger(__name__)

CAMUS_LABELS: dict[int, str] = {0: "background", 1: "LV endocardium", 2: "myocardium", 3: "left atrium"}
VIEWS = ("2CH", "4CH")
PHASES = ("ED", "ES")
CFG_FIELDS = ("ED", "ES", "NbFrame", "Sex", "Age", "ImageQuality", "EF", "LVedv", "LVesv")
_CFG_ALIASES = {"LVef": "EF"}  # the 2019 release writes LVef, the 2023 release EF
_NUMERIC = {"ED": int, "ES": int, "NbFrame": int, "Age": float, "EF": float, "LVedv": float, "LVesv": float}
_EXTS = (".nii.gz", ".mhd", ".nii")


@dataclass
class CamusRecord:
    """One CAMUS frame: a (patient, view, phase) with its image, mask and patient metadata.

    Attributes:
        patient: e.g. ``"patient0001"``. view: ``"2CH"``/``"4CH"``. phase: ``"ED"``/``"ES"``.
        image: image file. label: mask file or None (2019 test set). split: official split or None.
        info: the parsed ``Info_<view>.cfg`` (see :data:`CFG_FIELDS`).
    """

    patient: str
    view: str
    phase: str
    image: Path
    label: Path | None
    split: str | None
    info: dict = field(default_factory=dict)

    @property
    def quality(self) -> str:
        return str(self.info.get("ImageQuality", ""))

    @property
    def volume(self) -> float:
        """The LV volume of this frame from the cfg: ``LVedv`` at ED, ``LVesv`` at ES (ml)."""
        return float(self.info["LVedv" if self.phase == "ED" else "LVesv"])


def read_info_cfg(path: str | os.PathLike, required: Sequence[str] = CFG_FIELDS) -> dict:
    """Parse an ``Info_2CH.cfg`` / ``Info_4CH.cfg`` file (``Key: value`` lines).

    Args:
        path: the cfg file.
        required: fields that must be present (``LVef`` counts as ``EF``). Default :data:`CFG_FIELDS`.

    Raises:
        FileNotFoundError: missing file. ValueError: missing field or a non-numeric numeric field.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"CAMUS info file {p} does not exist.")
    info: dict = {}
    for line in p.read_text().splitlines():
        if ":" not in line:
            continue
        key, val = (s.strip() for s in line.split(":", 1))
        key = _CFG_ALIASES.get(key, key)
        if key in _NUMERIC:
            try:
                info[key] = _NUMERIC[key](float(val)) if _NUMERIC[key] is int else float(val)
            except ValueError as e:
                raise ValueError(f"{p}: field {key!r} should be a number, got {val!r}.") from e
        else:
            info[key] = val
    missing = [k for k in required if k not in info]
    if missing:
        raise ValueError(f"{p}: missing field(s) {missing} (expected {list(required)}).")
    return info


def read_image(path: str | os.PathLike) -> tuple[np.ndarray, tuple[float, float]]:
    """Read a CAMUS ``.mhd`` / ``.nii(.gz)`` 2D image with SimpleITK.

    Returns:
        ``(array, spacing)``: ``(H, W)`` array (rows = depth, apex toward row 0) and ``(row, col)`` mm spacing.
    """
    import SimpleITK as sitk

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"CAMUS image {p} does not exist.")
    img = sitk.ReadImage(str(p))
    arr = sitk.GetArrayFromImage(img)
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2:
        raise ValueError(f"{p}: expected a 2D frame, got array shape {arr.shape}.")
    sx, sy = img.GetSpacing()[:2]
    return arr, (float(sy), float(sx))


def _image_size(path: Path) -> tuple[int, ...]:
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    return tuple(s for s in reader.GetSize() if s != 1)


def _find_file(folder: Path, stem: str) -> Path | None:
    for ext in _EXTS:
        f = folder / f"{stem}{ext}"
        if f.is_file():
            return f
    return None


def _official_splits(root: Path) -> dict[str, str]:
    split_dir = root / "database_split"
    out: dict[str, str] = {}
    if split_dir.is_dir():
        for s in ("training", "validation", "testing"):
            f = split_dir / f"subgroup_{s}.txt"
            if f.is_file():
                for name in f.read_text().split():
                    out[name.strip()] = s
    return out


def _patient_folders(root: Path) -> list[tuple[Path, str | None]]:
    if (root / "database_nifti").is_dir():  # 2023 release
        return [(d, None) for d in sorted((root / "database_nifti").glob("patient*")) if d.is_dir()]
    found = []
    for sub in ("training", "testing"):  # 2019 release
        if (root / sub).is_dir():
            found += [(d, sub) for d in sorted((root / sub).glob("patient*")) if d.is_dir()]
    if not found:
        found = [(d, None) for d in sorted(root.glob("patient*")) if d.is_dir()]
    return found


def find_camus(root: str | os.PathLike, splits: str | Iterable[str] | None = None, check_sizes: bool = True,
               required_fields: Sequence[str] = CFG_FIELDS) -> list[CamusRecord]:
    """Index a CAMUS folder (either release) into :class:`CamusRecord` s, 4 per patient.

    Args:
        root: the dataset folder (containing ``database_nifti/`` for 2023, ``training/``/``testing/`` for 2019,
            or patient folders directly).
        splits: keep only these official splits (e.g. ``"training"``); None keeps all. Default None.
        check_sizes: compare image and mask sizes from the file headers. Default True.
        required_fields: cfg fields that must exist. Default :data:`CFG_FIELDS`.

    Raises:
        FileNotFoundError: no patient folder, or a missing image / cfg file.
        ValueError: a missing cfg field or an image/mask size mismatch (naming both files).
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"CAMUS root {root} is not a folder.")
    folders = _patient_folders(root)
    if not folders:
        raise FileNotFoundError(f"{root}: no CAMUS patient folders (expected database_nifti/patientXXXX, "
                                "training/patientXXXX or patientXXXX).")
    official = _official_splits(root)
    wanted = {splits} if isinstance(splits, str) else (set(splits) if splits is not None else None)
    records = []
    for folder, folder_split in folders:
        name = folder.name
        split = official.get(name, folder_split)
        if wanted is not None and split not in wanted:
            continue
        for view in VIEWS:
            info = read_info_cfg(folder / f"Info_{view}.cfg", required_fields)
            for phase in PHASES:
                image = _find_file(folder, f"{name}_{view}_{phase}")
                if image is None:
                    raise FileNotFoundError(f"{folder}: missing image {name}_{view}_{phase}{{.mhd,.nii.gz}}.")
                label = _find_file(folder, f"{name}_{view}_{phase}_gt")
                if check_sizes and label is not None:
                    si, sl = _image_size(image), _image_size(label)
                    if si != sl:
                        raise ValueError(f"size mismatch: image {image} is {si} but mask {label} is {sl}.")
                records.append(CamusRecord(name, view, phase, image, label, split, info))
    return records


def load_camus_record(rec: CamusRecord) -> dict:
    """Read one record: ``{"image": (H, W) float32, "label": (H, W) uint8 or None, "spacing": (row, col)}``.

    Raises:
        ValueError: the image and mask arrays differ in shape (naming both files).
    """
    image, spacing = read_image(rec.image)
    label = None
    if rec.label is not None:
        label, _ = read_image(rec.label)
        if label.shape != image.shape:
            raise ValueError(f"size mismatch: image {rec.image} is {image.shape} but mask {rec.label} is {label.shape}.")
        label = label.astype(np.uint8)
    return {"image": image.astype(np.float32), "label": label, "spacing": spacing}


def camus_quality_report(records: Sequence[CamusRecord], ef_tolerance: float = 5.0,
                         out_json: str | os.PathLike | None = None) -> dict:
    """Self-check of the echo seed (section II): recompute EF and compare with the dataset's EF.

    For each patient: ``EF_cfg`` (the cfg's EF), ``EF_from_volumes`` = EF from the cfg's ``LVedv``/``LVesv``,
    and, when the four ground-truth masks exist, Simpson's biplane ``EDV``/``ESV``/``EF`` from the LV cavity
    masks (label 1). Patients whose recomputed EF differs by more than ``ef_tolerance`` points are flagged.

    Args:
        records: from :func:`find_camus`.
        ef_tolerance: allowed EF difference in percentage points. Default 5.
        out_json: optional path; the report is written there atomically.

    Returns:
        ``{"patients": [...], "flagged": [names], "summary": {...}}``.
    """
    by_patient: dict[str, dict[tuple[str, str], CamusRecord]] = {}
    for r in records:
        by_patient.setdefault(r.patient, {})[(r.view, r.phase)] = r
    rows, flagged = [], []
    for name, recs in sorted(by_patient.items()):
        info = next(iter(recs.values())).info
        row: dict = {"patient": name, "quality": info.get("ImageQuality"), "EF_cfg": info.get("EF"),
                     "EDV_cfg": info.get("LVedv"), "ESV_cfg": info.get("LVesv")}
        if row["EDV_cfg"] and row["ESV_cfg"] is not None:
            row["EF_from_volumes"] = ejection_fraction(row["EDV_cfg"], row["ESV_cfg"])
        keys = [(v, p) for v in VIEWS for p in PHASES]
        if all(k in recs and recs[k].label is not None for k in keys):
            m = {k: load_camus_record(recs[k]) for k in keys}
            sp2, sp4 = m[("2CH", "ED")]["spacing"], m[("4CH", "ED")]["spacing"]
            edv = simpson_biplane(m[("2CH", "ED")]["label"] == 1, m[("4CH", "ED")]["label"] == 1, sp2, sp4)
            esv = simpson_biplane(m[("2CH", "ES")]["label"] == 1, m[("4CH", "ES")]["label"] == 1, sp2, sp4)
            row.update(EDV_simpson=edv, ESV_simpson=esv, EF_simpson=ejection_fraction(edv, esv))
        diffs = [abs(row[k] - row["EF_cfg"]) for k in ("EF_from_volumes", "EF_simpson")
                 if k in row and row.get("EF_cfg") is not None]
        row["max_EF_difference"] = max(diffs) if diffs else None
        row["flagged"] = bool(diffs) and max(diffs) > ef_tolerance
        if row["flagged"]:
            flagged.append(name)
        rows.append(row)

    def _mae(a: str, b: str) -> float | None:
        v = [abs(r[a] - r[b]) for r in rows if r.get(a) is not None and r.get(b) is not None]
        return float(np.mean(v)) if v else None

    report = {"patients": rows, "flagged": flagged,
              "summary": {"num_patients": len(rows), "num_flagged": len(flagged), "ef_tolerance": ef_tolerance,
                          "mae_EF_from_volumes_vs_cfg": _mae("EF_from_volumes", "EF_cfg"),
                          "mae_EF_simpson_vs_cfg": _mae("EF_simpson", "EF_cfg"),
                          "mae_EDV_simpson_vs_cfg": _mae("EDV_simpson", "EDV_cfg"),
                          "mae_ESV_simpson_vs_cfg": _mae("ESV_simpson", "ESV_cfg")}}
    if out_json is not None:
        atomic_write_json(out_json, report, default=float)
    return report

