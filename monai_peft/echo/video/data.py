"""EchoNet-Dynamic videos as MONAI data: datalists with EF labels and clip transforms (load, crop, sample).

A sample dict starts as ``{"image": <avi path>, "label": [EF], "name", "split", "where"}`` (``where`` names
the FileList row for error messages). The transforms decode the video (:func:`~monai_peft.echo.echonet.read_video`),
center-crop and resize every frame like the still-frame tasks (:func:`~monai_peft.echo.data.center_crop_resize`),
then cut clips of ``num_frames`` frames taken every ``stride`` frames (EchoNet-Dynamic reference code: 32 frames,
period 2; VideoMAE: 16 frames, stride 4 on 30 fps video). Training takes one random clip per video; evaluation
takes ``clips`` clips evenly spread over the video and the network's predictions are averaged per video
(:class:`~monai_peft.echo.video.engines.ClipAverageInferer`). Videos shorter than a clip are padded with
black frames, as the EchoNet-Dynamic reference code does.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from monai.config import KeysCollection
from monai.transforms import Compose, EnsureTyped, MapTransform, Randomizable, ScaleIntensityRanged

from ..data import center_crop_resize
from ..echonet import find_echonet, probe_video, read_video

__all__ = ["echonet_video_datalist", "video_datalist", "LoadEchoVideod", "CropResizeVideod", "SampleClipsd", "video_transforms"]


def echonet_video_datalist(root: str | os.PathLike, split: str | Sequence[str] | None = None,
                           check_videos: bool = True) -> list[dict]:
    """One item per EchoNet-Dynamic video of ``split``: ``{"image": path, "label": [EF], "name", "split", "where"}``.

    Videos need no tracings here (EF comes from ``FileList.csv``).

    Args:
        root: EchoNet-Dynamic folder (``FileList.csv``, ``Videos/``).
        split: ``"TRAIN"``, ``"VAL"``, ``"TEST"`` or a list of them. Default all.
        check_videos: decode the first frame of every video now, so an unreadable file stops the run before
            training starts (about 1-3 ms per video). Default True.

    Raises:
        ValueError: no video in ``split``, a video that cannot be decoded, or bad rows (see
            :func:`~monai_peft.echo.echonet.find_echonet`); the message names the file and its FileList row.
    """
    recs = find_echonet(root, splits=split, require_tracings=False)
    if not recs:
        raise ValueError(f"{root}: no EchoNet video in split {split!r} of FileList.csv.")
    if check_videos:
        for r in recs:
            try:
                probe_video(r.video)
            except ValueError as e:
                raise ValueError(f"{r.where}: {e}") from None
    return [{"image": str(r.video), "label": [r.ef], "name": r.name, "split": r.split, "where": r.where} for r in recs]


def video_datalist(source: str | os.PathLike | Sequence[str | os.PathLike], split: str | Sequence[str] | None = None
                   ) -> list[dict]:
    """Items ``{"image": path, "name"[, "label", ...]}`` for inference.

    Args:
        source: an EchoNet-Dynamic folder (``FileList.csv``: its videos of ``split``, with EF labels), another
            folder (every ``*.avi`` in it, sorted), or a list of AVI files.
        split: FileList split(s) for an EchoNet-Dynamic folder. Default all.

    Raises:
        FileNotFoundError: a missing file or folder, or a folder without AVI files.
    """
    if isinstance(source, (str, os.PathLike)):
        root = Path(source)
        if (root / "FileList.csv").is_file():
            return echonet_video_datalist(root, split)
        if not root.exists():
            raise FileNotFoundError(f"video source {root} does not exist.")
        paths = sorted(root.glob("*.avi")) if root.is_dir() else [root]
        if not paths:
            raise FileNotFoundError(f"{root}: no *.avi files and no FileList.csv.")
    else:
        paths = [Path(p) for p in source]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"video file(s) {missing} do not exist.")
    for p in paths:
        probe_video(p)  # the message names the file
    return [{"image": str(p), "name": p.stem, "where": str(p)} for p in paths]


class LoadEchoVideod(MapTransform):
    """Decode the AVI at ``d[key]`` into a grayscale ``uint8`` tensor ``(T, H, W)``.

    Args:
        keys: keys holding video paths. Default ``"image"``.
        where_key: key naming the source row for error messages (see :func:`echonet_video_datalist`).

    Raises:
        ValueError: a video OpenCV cannot decode; the message names the file and its FileList row.
    """

    def __init__(self, keys: KeysCollection = "image", where_key: str = "where") -> None:
        super().__init__(keys)
        self.where_key = where_key

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            try:
                d[key] = torch.from_numpy(np.ascontiguousarray(read_video(d[key])))
            except ValueError as e:
                where = d.get(self.where_key)
                raise ValueError(f"{where}: {e}" if where else str(e)) from e
        return d


class CropResizeVideod(MapTransform):
    """Center-crop every frame to a square and resize it: ``(T, H, W)`` -> ``(T, size, size)`` ``uint8``.

    Args:
        keys: video keys. Default ``"image"``.
        size: output side in pixels. Default 112.
    """

    def __init__(self, keys: KeysCollection = "image", size: int = 112) -> None:
        super().__init__(keys)
        if int(size) < 1:
            raise ValueError(f"size must be >= 1, got {size}.")
        self.size = int(size)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            video = torch.as_tensor(d[key])
            if video.ndim != 3:
                raise ValueError(f"CropResizeVideod: expected a (T, H, W) video at {key!r}, got {tuple(video.shape)}.")
            out = center_crop_resize(video, self.size)  # frames ride along as channels
            d[key] = out.round().clamp(0, 255).to(torch.uint8)
        return d


class SampleClipsd(Randomizable, MapTransform):
    """Cut clips of ``num_frames`` frames, ``stride`` apart, from a ``(T, H, W)`` video.

    Args:
        keys: video keys. Default ``"image"``.
        num_frames: frames per clip. Default 16.
        stride: frame step inside a clip. Default 2.
        clips: ``1`` returns one clip ``(1, num_frames, H, W)``; ``K > 1`` returns ``K`` clips
            ``(K, 1, num_frames, H, W)`` whose starts are spread evenly over the video. Default 1.
        random_start: draw the start of a single clip at random (training); False takes the first frame
            (``clips=1``). Ignored for ``clips > 1``. Default True.
    """

    def __init__(self, keys: KeysCollection = "image", num_frames: int = 16, stride: int = 2, clips: int = 1,
                 random_start: bool = True) -> None:
        super().__init__(keys)
        for name, v in (("num_frames", num_frames), ("stride", stride), ("clips", clips)):
            if int(v) < 1:
                raise ValueError(f"SampleClipsd: {name} must be >= 1, got {v}.")
        self.num_frames, self.stride, self.clips = int(num_frames), int(stride), int(clips)
        self.random_start = bool(random_start)
        self._start = 0.0

    def randomize(self, data: object = None) -> None:
        self._start = float(self.R.uniform())

    def _starts(self, length: int) -> list[int]:
        last = max(length - (self.num_frames - 1) * self.stride - 1, 0)  # last start with a full clip
        if self.clips > 1:
            return np.linspace(0, last, self.clips).round().astype(int).tolist()
        return [int(self._start * (last + 1)) if self.random_start else 0]

    def _clip(self, video: torch.Tensor, start: int) -> torch.Tensor:
        idx = torch.arange(start, start + self.num_frames * self.stride, self.stride)
        clip = torch.zeros((self.num_frames, *video.shape[1:]), dtype=video.dtype)
        ok = idx < video.shape[0]
        clip[ok] = video[idx[ok]]  # past the end: black frames (EchoNet-Dynamic reference code)
        return clip[None]

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        self.randomize()
        for key in self.key_iterator(d):
            video = torch.as_tensor(d[key])
            if video.ndim != 3:
                raise ValueError(f"SampleClipsd: expected a (T, H, W) video at {key!r}, got {tuple(video.shape)}.")
            clips = [self._clip(video, s) for s in self._starts(video.shape[0])]
            d[key] = clips[0] if self.clips == 1 else torch.stack(clips)
        return d


def video_transforms(num_frames: int = 16, stride: int = 2, size: int = 112, train: bool = True,
                     clips: int = 4) -> Compose:
    """Load, crop + resize, clip sampling, scaling to [0, 1]; labels become ``float32`` ``(1,)``.

    The deterministic part (decoding, resizing) comes before the random clip draw, so a MONAI
    ``CacheDataset`` caches resized videos.

    Args:
        num_frames: frames per clip (the network's ``num_frames``). Default 16.
        stride: frame step inside a clip. Default 2.
        size: frame side (the network's ``image_size``). Default 112.
        train: one random clip per video ``(1, T, S, S)``; False gives ``clips`` evenly spread clips
            ``(K, 1, T, S, S)`` for per-video averaging. Default True.
        clips: clips per video at evaluation. Default 4.
    """
    return Compose([
        LoadEchoVideod("image"),
        CropResizeVideod("image", size),
        SampleClipsd("image", num_frames, stride, clips=1 if train else clips, random_start=train),
        ScaleIntensityRanged("image", a_min=0.0, a_max=255.0, b_min=0.0, b_max=1.0),
        EnsureTyped("image", dtype=torch.float32, track_meta=False),
        EnsureTyped("label", dtype=torch.float32, track_meta=False, allow_missing_keys=True),
    ])
