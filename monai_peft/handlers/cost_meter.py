"""Computational cost of a run: seconds per volume and peak memory (thesis 5.2.2, Table 5.7)."""

from __future__ import annotations

import logging
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from monai.utils import IgniteInfo, min_version, optional_import

from monai_peft.workflows.records import process_rank, update_run_record

if TYPE_CHECKING:
    from ignite.engine import Engine, Events
else:
    Engine, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine")
    Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")

__all__ = ["CostMeter", "peak_memory_gb", "batch_size_of"]

_PHASES = ("train", "inference")


def peak_memory_gb(device: torch.device | str | None = None) -> tuple[float, str]:
    """Peak memory of this process in GiB and where it was measured.

    Args:
        device: the device the network runs on. CUDA devices report ``torch.cuda.max_memory_allocated``
            (the thesis's "GPU memory"); anything else reports the peak resident set size of the process.

    Returns:
        ``(gib, source)`` with ``source`` either ``"cuda_max_allocated"`` or ``"cpu_peak_rss"``.
    """
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.max_memory_allocated(dev) / 2**30, "cuda_max_allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is KiB on Linux, bytes on macOS
    rss_bytes = rss if sys.platform == "darwin" else rss * 1024
    return rss_bytes / 2**30, "cpu_peak_rss"


def batch_size_of(batch: Any, image_key: str = "image") -> int:
    """Number of volumes in a batch: a dict of ``(B, C, H, W[, D])`` tensors, a list of per-case dicts or a tensor."""
    if isinstance(batch, dict):
        value = batch.get(image_key)
        if value is None:
            raise KeyError(f"batch has no key '{image_key}'; keys are {sorted(batch)}.")
        return int(value.shape[0]) if hasattr(value, "shape") else len(value)
    if isinstance(batch, (list, tuple)):
        if batch and isinstance(batch[0], dict):
            return len(batch)
        return batch_size_of(batch[0], image_key) if batch else 0
    if hasattr(batch, "shape"):
        return int(batch.shape[0])
    raise TypeError(f"cannot count volumes in a batch of type {type(batch).__name__}.")


class CostMeter:
    """Measure seconds per volume of the network step and peak memory of a training or inference engine.

    The clock runs from ``ITERATION_STARTED`` to ``ITERATION_COMPLETED`` (forward, loss, backward and
    optimizer step for a trainer; sliding-window inference and post-processing for an evaluator), so data
    loading is not counted, as in thesis Table 5.7. The result is kept in ``engine.state.cost`` and, when
    ``record_path`` is given, merged into the run record (``results.json``) under ``costs``.

    Args:
        phase: ``"train"`` or ``"inference"``; names the keys (``train_s_per_volume``,
            ``inference_s_per_volume``, ``train_peak_memory_gb``, ...).
        record_path: run record JSON to update when the engine completes; ``None`` writes nothing.
        batch_transform: maps ``engine.state.batch`` to the number of volumes. Default counts the
            ``"image"`` entries.
        skip_first: iterations to leave out at the start of the run (warm-up, lazy CUDA init). Default 0;
            when every iteration would be skipped, all are counted.
        device: device for peak memory; default is ``engine.state.device`` or the engine's ``device``.
        write_rank0_only: only rank 0 updates ``record_path`` in a distributed run. Default True.
    """

    def __init__(
        self,
        phase: str = "train",
        record_path: str | Path | None = None,
        batch_transform: Callable[[Any], int] | None = None,
        skip_first: int = 0,
        device: torch.device | str | None = None,
        write_rank0_only: bool = True,
    ) -> None:
        if phase not in _PHASES:
            raise ValueError(f"CostMeter phase must be one of {_PHASES}, got {phase!r}.")
        if skip_first < 0:
            raise ValueError(f"CostMeter skip_first must be >= 0, got {skip_first}.")
        self.phase = phase
        self.record_path = Path(record_path) if record_path is not None else None
        self.batch_transform = batch_transform or batch_size_of
        self.skip_first = skip_first
        self.device = device
        self.write_rank0_only = write_rank0_only
        self.logger = logging.getLogger(__name__)
        self._reset()

    def _reset(self) -> None:
        self._t0 = 0.0
        self._iters = 0
        self._times: list[float] = []
        self._volumes: list[int] = []

    def attach(self, engine: Engine) -> None:
        """Register on the engine's run and iteration events (once)."""
        if engine.has_event_handler(self._started, Events.STARTED):
            return
        self.logger = engine.logger
        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.ITERATION_STARTED, self._iteration_started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration_completed)
        engine.add_event_handler(Events.COMPLETED, self)

    def _started(self, engine: Engine) -> None:
        self._reset()
        dev = self._device(engine)
        if dev.type == "cuda" and torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats(dev)

    def _device(self, engine: Engine) -> torch.device:
        dev = self.device if self.device is not None else getattr(engine.state, "device", None)
        dev = dev if dev is not None else getattr(engine, "device", "cpu")
        return torch.device(dev)

    def _sync(self, engine: Engine) -> None:
        dev = self._device(engine)
        if dev.type == "cuda" and torch.cuda.is_available():
            torch.cuda.synchronize(dev)

    def _iteration_started(self, engine: Engine) -> None:
        self._sync(engine)
        self._t0 = time.perf_counter()

    def _iteration_completed(self, engine: Engine) -> None:
        self._sync(engine)
        self._times.append(time.perf_counter() - self._t0)
        self._volumes.append(int(self.batch_transform(engine.state.batch)))

    def summary(self, engine: Engine) -> dict[str, Any]:
        """The costs measured so far, as plain numbers."""
        skip = self.skip_first if self.skip_first < len(self._times) else 0
        seconds = sum(self._times[skip:])
        volumes = sum(self._volumes[skip:])
        mem, source = peak_memory_gb(self._device(engine))
        return {
            f"{self.phase}_s_per_volume": seconds / volumes if volumes else float("nan"),
            f"{self.phase}_volumes_timed": volumes,
            f"{self.phase}_seconds": seconds,
            f"{self.phase}_peak_memory_gb": mem,
            "memory_source": source,
            "device": str(self._device(engine)),
        }

    def __call__(self, engine: Engine) -> None:
        """Store the costs in ``engine.state.cost`` and the run record at the end of the run."""
        cost = self.summary(engine)
        current = getattr(engine.state, "cost", None) or {}
        current.update(cost)
        engine.state.cost = current
        engine.logger.info(
            f"cost[{self.phase}]: {cost[f'{self.phase}_s_per_volume']:.3f} s/volume, "
            f"peak memory {cost[f'{self.phase}_peak_memory_gb']:.2f} GiB ({cost['memory_source']})"
        )
        if self.record_path is not None and (not self.write_rank0_only or process_rank() == 0):
            update_run_record(self.record_path, {"costs": cost})

