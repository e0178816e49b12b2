"""Echo-like 2D phantoms: fan-shaped sector, speckle, LV cavity, myocardium and left atrium.

The LV cavity is an ellipsoid (semi-axes ``a`` along the long axis, ``b`` in the 2CH plane, ``c`` in the
4CH plane), so its exact volume ``4/3 pi a b c`` is the ground truth written into the phantom ``Info_*.cfg``
/ ``FileList.csv`` files; ED and ES frames differ by the patient's ejection fraction, the atrium grows at ES.
4CH frames also show the right heart (unlabelled), 2CH frames do not. Writers produce the CAMUS 2019
(``.mhd``), CAMUS 2023 (NIfTI) and EchoNet-Dynamic (AVI + CSV) layouts for tests and the demo.
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from monai_peft.io import atomic_path

__all__ = ["HeartParams", "random_heart", "render_frame", "write_camus_phantom", "write_echonet_phantom"]

DEPTH_MM = 160.0  # imaging depth of the sector
SECTOR_HALF_ANGLE = math.radians(38.0)
QUALITIES = ("Good", "Medium", "Poor")


@dataclass
class HeartParams:
    """Geometry of one phantom heart (mm, degrees) at end-diastole and its ejection fraction.

    Attributes:
        a: LV long semi-axis at ED. b: 2CH short semi-axis at ED. c: 4CH short semi-axis at ED.
        ef: ejection fraction in percent; ES keeps 92% of the long axis and scales the short axes.
        wall: myocardial thickness at ED (ES adds 30%). la_a, la_b: left atrium semi-axes at ED.
        tilt: long-axis tilt per view in degrees. age, sex, quality: patient metadata.
    """

    a: float
    b: float
    c: float
    ef: float
    wall: float
    la_a: float
    la_b: float
    tilt: dict = field(default_factory=lambda: {"2CH": 0.0, "4CH": 0.0})
    age: int = 60
    sex: str = "M"
    quality: str = "Good"

    def axes(self, phase: str) -> tuple[float, float, float]:
        """LV semi-axes ``(a, b, c)`` in mm at ``phase`` ("ED" or "ES")."""
        if phase == "ED":
            return self.a, self.b, self.c
        k_long = 0.92
        k = math.sqrt((1.0 - self.ef / 100.0) / k_long)
        return self.a * k_long, self.b * k, self.c * k

    def volume(self, phase: str) -> float:
        """Exact LV volume in ml at ``phase``."""
        a, b, c = self.axes(phase)
        return 4.0 / 3.0 * math.pi * a * b * c / 1000.0


def random_heart(rng: np.random.Generator) -> HeartParams:
    """Draw a plausible phantom heart."""
    return HeartParams(
        a=float(rng.uniform(34, 44)), b=float(rng.uniform(15, 21)), c=float(rng.uniform(16, 22)),
        ef=float(rng.uniform(30, 70)), wall=float(rng.uniform(7, 10)), la_a=float(rng.uniform(15, 20)),
        la_b=float(rng.uniform(13, 18)), tilt={"2CH": float(rng.uniform(-8, 8)), "4CH": float(rng.uniform(-8, 8))},
        age=int(rng.integers(20, 90)), sex=str(rng.choice(["M", "F"])), quality=str(rng.choice(QUALITIES, p=[.4, .4, .2])),
    )


def _interp(p: HeartParams, phase: str | float) -> tuple[float, float, float, float, float]:
    """(a, b, c, wall, la_scale) at a phase name or a contraction fraction in [0, 1] (0 = ED, 1 = ES)."""
    t = {"ED": 0.0, "ES": 1.0}[phase] if isinstance(phase, str) else float(phase)
    ed, es = np.array(p.axes("ED")), np.array(p.axes("ES"))
    a, b, c = (1 - t) * ed + t * es
    return float(a), float(b), float(c), p.wall * (1 + 0.3 * t), 1.0 + 0.25 * t


def render_frame(p: HeartParams, view: str, phase: str | float, shape: tuple[int, int] = (128, 112),
                 rng: np.random.Generator | None = None, depth_mm: float = DEPTH_MM):
    """Render one apical frame.

    Args:
        p: heart geometry.
        view: ``"2CH"`` or ``"4CH"``.
        phase: ``"ED"``, ``"ES"`` or a contraction fraction in [0, 1].
        shape: ``(H, W)`` in pixels; square pixels of ``depth_mm / H`` mm.
        rng: noise generator. Default: a fixed seed.
        depth_mm: imaging depth. Default 160 mm.

    Returns:
        ``(image, label, spacing, geometry)``: ``uint8`` image ``(H, W)``; ``uint8`` labels ``(H, W)`` with
        1 LV cavity, 2 myocardium, 3 left atrium; spacing ``(row, col)`` in mm; and a dict with the LV
        centre, semi-axes and axis direction in mm (used for EchoNet tracings).
    """
    if view not in ("2CH", "4CH"):
        raise ValueError(f"view: expected '2CH' or '4CH', got {view!r}.")
    rng = rng if rng is not None else np.random.default_rng(0)
    h, w = shape
    sp = depth_mm / h
    a, b2, c4, wall, la_s = _interp(p, phase)
    short = b2 if view == "2CH" else c4
    rows, cols = np.mgrid[0:h, 0:w].astype(np.float64)
    y, x = rows * sp, cols * sp
    x0 = (w - 1) / 2.0 * sp
    r = np.hypot(y, x - x0)
    sector = (r <= depth_mm * 0.97) & (np.abs(np.arctan2(x - x0, y)) <= SECTOR_HALF_ANGLE)

    ed_a = p.a
    base_y = 16.0 + 2 * ed_a  # the mitral plane stays put; the apex moves down at ES
    theta = math.radians(p.tilt[view])
    axis = np.array([-math.cos(theta), math.sin(theta)])  # (row, col) direction towards the apex
    cy, cx = base_y - a * math.cos(theta), x0 + a * math.sin(theta)
    # coordinates in the LV frame: u along the long axis (towards the base), v across
    dy, dx = y - cy, x - cx
    u = -(dy * axis[0] + dx * axis[1])
    v = dy * -axis[1] + dx * axis[0]
    lv = (u / a) ** 2 + (v / short) ** 2 <= 1.0
    outer = (u / (a + wall)) ** 2 + (v / (short + wall)) ** 2 <= 1.0
    myo = outer & ~lv & (u < 0.55 * a)
    la_a, la_b = p.la_a * la_s, p.la_b * la_s
    la_u = a + 0.8 * la_a
    la = (((u - la_u) / la_a) ** 2 + (v / la_b) ** 2 <= 1.0) & ~lv & ~myo

    label = np.zeros((h, w), np.uint8)
    label[la] = 3
    label[myo] = 2
    label[lv] = 1
    label[~sector] = 0

    tissue = np.full((h, w), 0.4)
    cavity = lv | la
    if view == "4CH":  # right ventricle and atrium beside the left heart (unlabelled)
        rv_v = -(short + wall + 13.0)
        rv = ((u + 0.1 * a) / (0.8 * a)) ** 2 + ((v - rv_v) / 11.0) ** 2 <= 1.0
        ra = ((u - la_u) / (0.9 * la_a)) ** 2 + ((v - rv_v) / (0.9 * la_b)) ** 2 <= 1.0
        cavity = cavity | ((rv | ra) & (label == 0))
    tissue[cavity] = 0.05
    tissue[myo] = 0.85
    noise = {"Good": 0.35, "Medium": 0.6, "Poor": 1.0}[p.quality]
    speckle = rng.rayleigh(1.0, size=(h, w)) / math.sqrt(math.pi / 2)
    img = tissue * (1 + noise * (speckle - 1)) + 0.04 * noise * rng.random((h, w))
    img = ndimage.gaussian_filter(img, 0.7) * np.exp(-r / 300.0)
    if p.quality == "Poor":
        img *= 0.6
    img[~sector] = 0.0
    image = np.clip(img * 255.0, 0, 255).astype(np.uint8)
    geometry = {"centre": (cy, cx), "a": a, "short": short, "axis": tuple(axis.tolist())}
    return image, label, (sp, sp), geometry


# ----------------------------------------------------------------------------------------------- CAMUS
def _write_image(arr: np.ndarray, spacing: tuple[float, float], path: Path) -> None:
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((float(spacing[1]), float(spacing[0])))  # ITK order is (x=col, y=row)
    if path.suffix == ".mhd":  # header + .raw pair, named after each other: written in place
        sitk.WriteImage(img, str(path))
        return
    with atomic_path(path, suffix="".join(path.suffixes)) as tmp:  # SimpleITK picks the format from the suffix
        sitk.WriteImage(img, tmp)


def _cfg_text(p: HeartParams, frames: int, ed: int, es: int, ef_key: str) -> str:
    edv, esv = p.volume("ED"), p.volume("ES")
    ef = (edv - esv) / edv * 100.0
    lines = [f"ED: {ed}", f"ES: {es}", f"NbFrame: {frames}", f"Sex: {p.sex}", f"Age: {p.age}",
             f"ImageQuality: {p.quality}", f"{ef_key}: {ef:.1f}", f"LVedv: {edv:.2f}", f"LVesv: {esv:.2f}"]
    return "\n".join(lines) + "\n"


def write_camus_phantom(root: str | os.PathLike, num_patients: int = 6, layout: str = "2023",
                        shape: tuple[int, int] = (128, 112), seed: int = 0, with_test_split: bool = True) -> list[dict]:
    """Write a CAMUS-like phantom dataset.

    Layouts: ``"2019"``: ``training/patientXXXX/patientXXXX_{2CH,4CH}_{ED,ES}[_gt].mhd`` + ``Info_*.cfg``
    (EF key ``LVef``), the last patients in ``testing/`` without ground truth like the challenge release;
    ``"2023"``: ``database_nifti/patientXXXX/..._gt.nii.gz`` + ``Info_*.cfg`` (EF key ``EF``) and
    ``database_split/subgroup_{training,validation,testing}.txt``.

    Args:
        root: output folder (created).
        num_patients: number of patients. Default 6.
        layout: ``"2019"`` or ``"2023"``. Default ``"2023"``.
        shape: frame size ``(H, W)``. Default ``(128, 112)``.
        seed: random seed. Default 0.
        with_test_split: 2019: hold out ``max(1, n // 5)`` patients in ``testing/``; 2023: write split files.

    Returns:
        One dict per patient with ``patient``, ``split``, exact ``EDV``/``ESV`` (ml), ``EF`` and metadata.
    """
    if layout not in ("2019", "2023"):
        raise ValueError(f"layout: expected '2019' or '2023', got {layout!r}.")
    root = Path(root)
    rng = np.random.default_rng(seed)
    n_test = max(1, num_patients // 5) if with_test_split and num_patients > 1 else 0
    n_val = max(1, num_patients // 5) if with_test_split and layout == "2023" and num_patients > 2 else 0
    truth = []
    for i in range(num_patients):
        name = f"patient{i + 1:04d}"
        split = "testing" if i >= num_patients - n_test else ("validation" if i >= num_patients - n_test - n_val
                                                               else "training")
        p = random_heart(rng)
        if layout == "2019":
            folder = root / ("testing" if split == "testing" else "training") / name
            ext, ef_key = ".mhd", "LVef"
            write_gt = split != "testing"
        else:
            folder = root / "database_nifti" / name
            ext, ef_key, write_gt = ".nii.gz", "EF", True
        folder.mkdir(parents=True, exist_ok=True)
        frames = int(rng.integers(12, 25))
        for view in ("2CH", "4CH"):
            for phase in ("ED", "ES"):
                img, lab, sp, _ = render_frame(p, view, phase, shape, rng)
                _write_image(img, sp, folder / f"{name}_{view}_{phase}{ext}")
                if write_gt:
                    _write_image(lab, sp, folder / f"{name}_{view}_{phase}_gt{ext}")
            es = int(rng.integers(frames // 2, frames))
            (folder / f"Info_{view}.cfg").write_text(_cfg_text(p, frames, 1, es, ef_key))
        edv, esv = p.volume("ED"), p.volume("ES")
        truth.append({"patient": name, "split": split if layout == "2023" or split == "testing" else "training",
                      "EDV": edv, "ESV": esv, "EF": (edv - esv) / edv * 100, "age": p.age, "sex": p.sex,
                      "quality": p.quality})
    if layout == "2023" and with_test_split:
        sd = root / "database_split"
        sd.mkdir(parents=True, exist_ok=True)
        for s in ("training", "validation", "testing"):
            (sd / f"subgroup_{s}.txt").write_text("".join(t["patient"] + "\n" for t in truth if t["split"] == s))
    return truth


# --------------------------------------------------------------------------------------------- EchoNet
def _tracing_lines(geom: dict, sp: float, num_disks: int = 20) -> list[tuple[float, float, float, float]]:
    """EchoNet-style tracing: the long axis, then ``num_disks`` chords across the LV, in pixels (X=col, Y=row)."""
    cy, cx = geom["centre"]
    a, s = geom["a"], geom["short"]
    ax = np.array(geom["axis"])
    nrm = np.array([-ax[1], ax[0]])
    c = np.array([cy, cx])
    apex, base = c + a * ax, c - a * ax
    lines = [(apex[1] / sp, apex[0] / sp, base[1] / sp, base[0] / sp)]
    for i in range(num_disks):
        t = 1.0 - (i + 0.5) * 2.0 / num_disks  # from the apex (t=1) to the base (t=-1)
        half = s * math.sqrt(max(0.0, 1 - t * t))
        p1, p2 = c + t * a * ax + half * nrm, c + t * a * ax - half * nrm
        lines.append((p1[1] / sp, p1[0] / sp, p2[1] / sp, p2[0] / sp))
    return lines


def write_echonet_phantom(root: str | os.PathLike, num_videos: int = 6, num_frames: int = 16,
                          size: int = 112, seed: int = 0, depth_mm: float = DEPTH_MM,
                          same_geometry: bool = False) -> list[dict]:
    """Write an EchoNet-Dynamic-like phantom: ``Videos/*.avi``, ``FileList.csv``, ``VolumeTracings.csv``.

    Videos are apical 4CH cycles (ED -> ES -> ED); ``VolumeTracings.csv`` holds, for the ED and ES frames,
    the long axis and 20 chords like the released tracings; splits are TRAIN / VAL / TEST.

    Args:
        root: output folder (created).
        num_videos: number of videos. Default 6.
        num_frames: frames per video. Default 16.
        size: frame height and width. Default 112 (as EchoNet-Dynamic).
        seed: random seed. Default 0.
        depth_mm: imaging depth; a shallower sector (e.g. 110 mm) makes the heart fill more of a small frame,
            which the video EF tests use at 32 pixels. Default 160 mm.
        same_geometry: every heart has the same end-diastolic size and tilt and only its EF (and speckle,
            quality, ED frame) varies: a beating ellipse whose contraction alone carries the EF, learnable by a
            tiny video model in a short CPU run. Default False (sizes vary as in :func:`random_heart`).

    Returns:
        One dict per video with ``FileName``, ``ED``/``ES`` frame indices, exact ``EDV``/``ESV`` and ``EF``.
    """
    import cv2

    root = Path(root)
    (root / "Videos").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows, traces = [], []
    for i in range(num_videos):
        name = f"0X{seed:04X}{i:08X}"
        p = random_heart(rng)
        if same_geometry:
            p.a, p.b, p.wall, p.la_a, p.la_b, p.tilt = 39.0, 18.0, 8.5, 17.5, 15.5, {"2CH": 0.0, "4CH": 0.0}
        p.c = p.b  # one apical view: volumes assume a circular cross-section (single-plane)
        ed = int(rng.integers(0, num_frames // 4))
        es = ed + num_frames // 2
        fourcc = cv2.VideoWriter_fourcc(*"FFV1")
        with atomic_path(root / "Videos" / f"{name}.avi", suffix=".avi") as tmp:  # OpenCV picks the container
            writer = cv2.VideoWriter(tmp, fourcc, 50, (size, size), isColor=True)
            if not writer.isOpened():
                raise RuntimeError(f"{tmp}: OpenCV cannot write FFV1 AVI files.")
            try:
                for f in range(num_frames):
                    t = 0.5 * (1 - math.cos(2 * math.pi * (f - ed) / (2 * (es - ed))))
                    img, _, sp, geom = render_frame(p, "4CH", t, (size, size), rng, depth_mm)
                    writer.write(np.repeat(img[..., None], 3, axis=2))
                    if f in (ed, es):
                        for x1, y1, x2, y2 in _tracing_lines(geom, sp[0]):
                            traces.append([f"{name}.avi", f"{x1:.4f}", f"{y1:.4f}", f"{x2:.4f}", f"{y2:.4f}", f])
            finally:
                writer.release()
        split = ["TRAIN", "TRAIN", "TRAIN", "VAL", "TEST"][i % 5] if num_videos >= 3 else "TRAIN"
        edv, esv = p.volume("ED"), p.volume("ES")
        rows.append({"FileName": name, "EF": (edv - esv) / edv * 100, "ESV": esv, "EDV": edv, "FrameHeight": size,
                     "FrameWidth": size, "FPS": 50, "NumberOfFrames": num_frames, "Split": split, "ED": ed, "ES": es})
    cols = ["FileName", "EF", "ESV", "EDV", "FrameHeight", "FrameWidth", "FPS", "NumberOfFrames", "Split"]
    with open(root / "FileList.csv", "w", newline="") as fh:
        wr = csv.writer(fh)
        wr.writerow(cols)
        for r in rows:
            wr.writerow([r[c] for c in cols])
    with open(root / "VolumeTracings.csv", "w", newline="") as fh:
        wr = csv.writer(fh)
        wr.writerow(["FileName", "X1", "Y1", "X2", "Y2", "Frame"])
        wr.writerows(traces)
    return rows
