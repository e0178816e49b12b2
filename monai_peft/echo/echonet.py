"""EchoNet-Dynamic reader: ``FileList.csv``, ``VolumeTracings.csv`` -> ED/ES LV masks, AVI videos (OpenCV).

Each traced frame has a long-axis line followed by chords across the LV; the mask is the polygon through
the chord end points (as in the EchoNet-Dynamic reference code). Of the two traced frames of a video the
one with the larger LV area is end-diastole, the smaller end-systole. These ED/ES frames are the pretext
task of the echo seed (section II: "In each video, cardiologists labeled one frame for end-systole and one
frame for end-diastole").
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["EchoNetRecord", "find_echonet", "read_video", "tracing_mask", "load_echonet_frames"]

logger = logging.getLogger(__name__)

FILELIST_COLUMNS = ("FileName", "EF", "ESV", "EDV", "Split")
TRACING_COLUMNS = ("FileName", "X1", "Y1", "X2", "Y2", "Frame")


@dataclass
class EchoNetRecord:
    """One EchoNet-Dynamic video with its traced ED and ES frames.

    Attributes:
        name: file name without ``.avi``. video: the AVI path. split: ``TRAIN``/``VAL``/``TEST``.
        ef, edv, esv: FileList values. traces: frame index -> ``(N, 4)`` array of ``X1, Y1, X2, Y2`` lines.
        ed, es: the traced frame indices with the larger / smaller LV area.
    """

    name: str
    video: Path
    split: str
    ef: float
    edv: float
    esv: float
    traces: dict = field(default_factory=dict)
    ed: int = -1
    es: int = -1


def _stem(name: str) -> str:
    return name[:-4] if name.lower().endswith(".avi") else name


def _read_csv(path: Path, columns: Iterable[str]) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"EchoNet file {path} does not exist.")
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in columns if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing} (found {reader.fieldnames}).")
        return list(reader)


def tracing_mask(lines: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Rasterise one EchoNet tracing into a binary LV mask.

    Args:
        lines: ``(N, 4)`` ``X1, Y1, X2, Y2`` in pixels; row 0 is the long axis and is skipped.
        shape: mask ``(H, W)``.

    Returns:
        ``uint8`` mask ``(H, W)``.
    """
    from skimage.draw import polygon

    lines = np.asarray(lines, dtype=float)
    if lines.ndim != 2 or lines.shape[1] != 4 or len(lines) < 3:
        raise ValueError(f"tracing: expected (N>=3, 4) lines X1,Y1,X2,Y2, got shape {lines.shape}.")
    x = np.concatenate([lines[1:, 0], lines[1:, 2][::-1]])
    y = np.concatenate([lines[1:, 1], lines[1:, 3][::-1]])
    r, c = polygon(np.rint(y).astype(int), np.rint(x).astype(int), shape)
    mask = np.zeros(shape, np.uint8)
    mask[r, c] = 1
    return mask


def find_echonet(root: str | os.PathLike, splits: str | Iterable[str] | None = None) -> list[EchoNetRecord]:
    """Index an EchoNet-Dynamic folder (``FileList.csv``, ``VolumeTracings.csv``, ``Videos/``).

    Videos without two traced frames are skipped with a warning (the public release has a few).

    Args:
        root: dataset folder.
        splits: keep only these splits (``"TRAIN"``, ``"VAL"``, ``"TEST"``; case-insensitive). Default all.

    Raises:
        FileNotFoundError: missing CSV or video. ValueError: missing CSV column.
    """
    root = Path(root)
    files = _read_csv(root / "FileList.csv", FILELIST_COLUMNS)
    traces: dict[str, dict[int, list]] = {}
    for row in _read_csv(root / "VolumeTracings.csv", TRACING_COLUMNS):
        xs = [float(row[k]) for k in ("X1", "Y1", "X2", "Y2")]
        traces.setdefault(_stem(row["FileName"]), {}).setdefault(int(float(row["Frame"])), []).append(xs)
    wanted = None
    if splits is not None:
        wanted = {splits.upper()} if isinstance(splits, str) else {s.upper() for s in splits}
    out = []
    for row in files:
        name = _stem(row["FileName"])
        split = row["Split"].upper()
        if wanted is not None and split not in wanted:
            continue
        tr = {k: np.asarray(v) for k, v in traces.get(name, {}).items()}
        if len(tr) < 2:
            logger.warning("EchoNet %s: %d traced frame(s) in VolumeTracings.csv, skipped", name, len(tr))
            continue
        video = root / "Videos" / f"{name}.avi"
        if not video.is_file():
            raise FileNotFoundError(f"EchoNet video {video} (listed in {root / 'FileList.csv'}) does not exist.")
        rec = EchoNetRecord(name, video, split, float(row["EF"]), float(row["EDV"]), float(row["ESV"]), tr)
        # the larger traced area is ED; measured on a nominal 112x112 grid (areas only need to be ordered)
        areas = {f: tracing_mask(v, (1024, 1024)).sum() for f, v in tr.items()}
        ordered = sorted(areas, key=areas.get)
        rec.es, rec.ed = ordered[0], ordered[-1]
        out.append(rec)
    return out


def read_video(path: str | os.PathLike, frames: Iterable[int] | None = None) -> np.ndarray:
    """Read an AVI as grayscale ``uint8`` ``(T, H, W)`` (only ``frames`` if given, in that order)."""
    import cv2

    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        raise OSError(f"cannot open video {path} with OpenCV.")
    wanted = None if frames is None else list(frames)
    out: dict[int, np.ndarray] = {}
    i = 0
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        if wanted is None or i in wanted:
            out[i] = cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY) if frame.ndim == 3 else frame
        i += 1
        if wanted is not None and i > max(wanted):
            break
    cap.release()
    order = sorted(out) if wanted is None else wanted
    missing = [f for f in order if f not in out]
    if missing:
        raise ValueError(f"{path}: frame(s) {missing} not in the video ({i} frames read).")
    return np.stack([out[f] for f in order])


def load_echonet_frames(records: Iterable[EchoNetRecord]) -> list[dict]:
    """ED and ES frames with their LV masks: ``[{"image": (H, W) float32, "label": (H, W) uint8, "phase",
    "name", "split"}, ...]``."""
    items = []
    for rec in records:
        frames = read_video(rec.video, [rec.ed, rec.es])
        for img, f, phase in zip(frames, (rec.ed, rec.es), ("ED", "ES")):
            items.append({"image": img.astype(np.float32), "label": tracing_mask(rec.traces[f], img.shape),
                          "phase": phase, "name": rec.name, "split": rec.split})
    return items
