"""EchoNet-Dynamic reader: ``FileList.csv``, ``VolumeTracings.csv`` -> ED/ES LV masks, AVI videos (OpenCV).

Videos are decoded with OpenCV (``opencv-python-headless``): torchvision 0.29's ``torchvision.io`` no longer reads
video and PyAV is not a dependency.

Each traced frame has a long-axis line followed by chords across the LV; the mask is the polygon through
the chord end points (as in the EchoNet-Dynamic reference code). Of the two traced frames of a video the
one with the larger LV area is end-diastole, the smaller end-systole. These ED/ES frames are the pretext
task of the echo seed (section II: "In each video, cardiologists labeled one frame for end-systole and one
frame for end-diastole"); the whole videos with their ``EF`` are the fine-tuning data of EchoAI (seed 002).

Bad input is an error naming the file and row: an EF outside 0-100, a traced frame outside the video
(``NumberOfFrames``), a video OpenCV cannot decode, a missing ``Split`` column (never a silent random split).
Rows are numbered as in a spreadsheet: the header is row 1.
"""

from __future__ import annotations

import csv
import logging
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["EchoNetRecord", "find_echonet", "read_video", "probe_video", "tracing_mask", "load_echonet_frames"]

logger = logging.getLogger(__name__)

FILELIST_COLUMNS = ("FileName", "EF", "ESV", "EDV", "Split")
TRACING_COLUMNS = ("FileName", "X1", "Y1", "X2", "Y2", "Frame")


@dataclass
class EchoNetRecord:
    """One EchoNet-Dynamic video with its traced ED and ES frames.

    Attributes:
        name: file name without ``.avi``. video: the AVI path. split: ``TRAIN``/``VAL``/``TEST``.
        ef, edv, esv: FileList values. traces: frame index -> ``(N, 4)`` array of ``X1, Y1, X2, Y2`` lines.
        ed, es: the traced frame indices with the larger / smaller LV area (-1 when the video has no tracing).
        row: the video's row in ``FileList.csv`` (header = row 1). num_frames: ``NumberOfFrames`` or None.
        trace_rows: frame index -> first ``VolumeTracings.csv`` row of that frame (for error messages).
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
    row: int = 0
    num_frames: int | None = None
    trace_rows: dict = field(default_factory=dict)

    @property
    def where(self) -> str:
        """``"<FileList.csv> row N (<name>)"`` for error messages."""
        return f"{self.video.parent.parent / 'FileList.csv'} row {self.row} ({self.name})"


def _stem(name: str) -> str:
    return name[:-4] if name.lower().endswith(".avi") else name


def _read_csv(path: Path, columns: Iterable[str]) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"EchoNet file {path} does not exist.")
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in columns if c not in (reader.fieldnames or [])]
        if missing:
            hint = " (the split is never drawn at random: add a Split column of TRAIN/VAL/TEST)" if "Split" in missing else ""
            raise ValueError(f"{path}: missing column(s) {missing} (found {reader.fieldnames}){hint}.")
        return list(reader)


def _number(value: str, path: Path, row: int, column: str) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{path} row {row}: {column} {value!r} is not a number.") from None
    if not math.isfinite(x):
        raise ValueError(f"{path} row {row}: {column} {value!r} is not a finite number.")
    return x


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


def find_echonet(root: str | os.PathLike, splits: str | Iterable[str] | None = None,
                 require_tracings: bool = True) -> list[EchoNetRecord]:
    """Index an EchoNet-Dynamic folder (``FileList.csv``, ``VolumeTracings.csv``, ``Videos/``).

    Args:
        root: dataset folder.
        splits: keep only these splits (``"TRAIN"``, ``"VAL"``, ``"TEST"``; case-insensitive). Default all.
        require_tracings: skip videos without two traced frames, with a warning (the public release has a
            few); the ED/ES pretext task needs them. False keeps every video (EF from whole videos) and
            ``VolumeTracings.csv`` becomes optional. Default True.

    Raises:
        FileNotFoundError: missing CSV or video. ValueError: missing column (``Split`` included), an EF outside
            0-100, a non-numeric value, a traced frame outside ``NumberOfFrames``; the message names file and row.
    """
    root = Path(root)
    filelist = root / "FileList.csv"
    files = _read_csv(filelist, FILELIST_COLUMNS)
    tracings = root / "VolumeTracings.csv"
    traces: dict[str, dict[int, list]] = {}
    trace_rows: dict[str, dict[int, int]] = {}
    if require_tracings or tracings.is_file():
        for i, row in enumerate(_read_csv(tracings, TRACING_COLUMNS), start=2):
            xs = [_number(row[k], tracings, i, k) for k in ("X1", "Y1", "X2", "Y2")]
            frame = _number(row["Frame"], tracings, i, "Frame")
            if frame < 0 or frame != int(frame):
                raise ValueError(f"{tracings} row {i} ({row['FileName']}): Frame {row['Frame']!r} is not a frame index.")
            name = _stem(row["FileName"])
            traces.setdefault(name, {}).setdefault(int(frame), []).append(xs)
            trace_rows.setdefault(name, {}).setdefault(int(frame), i)
    wanted = None
    if splits is not None:
        wanted = {splits.upper()} if isinstance(splits, str) else {s.upper() for s in splits}
    has_frames = "NumberOfFrames" in files[0] if files else False
    out = []
    for i, row in enumerate(files, start=2):
        name = _stem(row["FileName"])
        split = (row["Split"] or "").strip().upper()
        if not split:
            raise ValueError(f"{filelist} row {i} ({name}): empty Split; expected TRAIN, VAL or TEST.")
        if wanted is not None and split not in wanted:
            continue
        ef = _number(row["EF"], filelist, i, "EF")
        if not 0.0 <= ef <= 100.0:
            raise ValueError(f"{filelist} row {i} ({name}): EF {ef:g} is outside 0-100 (percent expected).")
        num_frames = int(_number(row["NumberOfFrames"], filelist, i, "NumberOfFrames")) if has_frames else None
        tr = {k: np.asarray(v) for k, v in traces.get(name, {}).items()}
        rows_of = trace_rows.get(name, {})
        if num_frames is not None:
            bad = sorted(f for f in tr if f >= num_frames)
            if bad:
                raise ValueError(f"{tracings} row {rows_of[bad[0]]} ({name}): traced frame {bad[0]} is not in the video "
                                 f"({num_frames} frames per {filelist} row {i}).")
        if require_tracings and len(tr) < 2:
            logger.warning("EchoNet %s: %d traced frame(s) in VolumeTracings.csv, skipped", name, len(tr))
            continue
        video = root / "Videos" / f"{name}.avi"
        if not video.is_file():
            raise FileNotFoundError(f"EchoNet video {video} (listed in {filelist} row {i}) does not exist.")
        rec = EchoNetRecord(name, video, split, ef, _number(row["EDV"], filelist, i, "EDV"),
                            _number(row["ESV"], filelist, i, "ESV"), tr, row=i, num_frames=num_frames,
                            trace_rows=rows_of)
        if len(tr) >= 2:
            # the larger traced area is ED; measured on a fixed grid (areas only need to be ordered)
            areas = {f: tracing_mask(v, (1024, 1024)).sum() for f, v in tr.items()}
            ordered = sorted(areas, key=areas.get)
            rec.es, rec.ed = ordered[0], ordered[-1]
        out.append(rec)
    return out


def read_video(path: str | os.PathLike, frames: Iterable[int] | None = None) -> np.ndarray:
    """Read an AVI as grayscale ``uint8`` ``(T, H, W)`` (only ``frames`` if given, in that order).

    Raises:
        ValueError: OpenCV cannot open or decode the file, or a requested frame is not in the video.
    """
    import cv2

    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        raise ValueError(f"cannot decode video {path} with OpenCV (missing codec or not a video file).")
    wanted = None if frames is None else list(frames)
    out: dict[int, np.ndarray] = {}
    i = 0
    try:
        while True:
            ok, frame = cap.read()
            if not ok:
                break
            if wanted is None or i in wanted:
                out[i] = cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY) if frame.ndim == 3 else frame
            i += 1
            if wanted is not None and i > max(wanted):
                break
    finally:
        cap.release()
    if i == 0:
        raise ValueError(f"cannot decode video {path} with OpenCV: no frame could be read.")
    order = sorted(out) if wanted is None else wanted
    missing = [f for f in order if f not in out]
    if missing:
        raise ValueError(f"{path}: frame(s) {missing} not in the video ({i} frames read).")
    return np.stack([out[f] for f in order])


def probe_video(path: str | os.PathLike) -> int:
    """Open a video and decode its first frame; returns the frame count the container reports.

    Raises:
        ValueError: OpenCV cannot open the file or decode a frame.
    """
    import cv2

    cap = cv2.VideoCapture(str(path))
    try:
        if not cap.isOpened():
            raise ValueError(f"cannot decode video {path} with OpenCV (missing codec or not a video file).")
        ok, _ = cap.read()
        if not ok:
            raise ValueError(f"cannot decode video {path} with OpenCV: no frame could be read.")
        return int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
    finally:
        cap.release()


def load_echonet_frames(records: Iterable[EchoNetRecord]) -> list[dict]:
    """ED and ES frames with their LV masks: ``[{"image": (H, W) float32, "label": (H, W) uint8, "phase",
    "name", "split"}, ...]``.

    Raises:
        ValueError: a record without tracings, or a video that cannot be decoded or lacks a traced frame (the
            message names the FileList and VolumeTracings rows).
    """
    items = []
    for rec in records:
        if rec.ed < 0 or rec.es < 0:
            raise ValueError(f"{rec.where}: no ED/ES tracings in VolumeTracings.csv.")
        try:
            frames = read_video(rec.video, [rec.ed, rec.es])
        except ValueError as e:
            rows = ", ".join(f"frame {f}: VolumeTracings.csv row {rec.trace_rows.get(f, '?')}" for f in (rec.ed, rec.es))
            raise ValueError(f"{rec.where}: {e} ({rows})") from e
        for img, f, phase in zip(frames, (rec.ed, rec.es), ("ED", "ES")):
            items.append({"image": img.astype(np.float32), "label": tracing_mask(rec.traces[f], img.shape),
                          "phase": phase, "name": rec.name, "split": rec.split})
    return items
