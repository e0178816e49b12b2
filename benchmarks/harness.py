"""What every benchmark here shares: the interleaved timing loop, peak-memory probes, the environment record.

Timing (:func:`interleaved_times`): every configuration lives in the same process; after ``warmup`` untimed rounds,
each round runs one call of every configuration in turn (the order rotates from round to round), so a slow phase of
a shared machine hits all of them alike. Ratios are taken per round against the baseline of the same round and the
median over rounds is reported (:func:`ratio_medians`): a load change between rounds moves numerator and
denominator together.

Peak memory:

- CUDA: ``torch.cuda.max_memory_allocated`` over one step, after ``reset_peak_memory_stats`` (weights, gradients,
  optimizer state and activations: what the allocator holds at the peak);
- CPU: the process's peak resident set (``VmHWM``) over one step minus its resident set before the network was
  built, measured in a fresh subprocess per configuration (:func:`measure_in_subprocess`). A process that has run
  other configurations keeps freed memory in the allocator's free lists, so only a fresh process measures one
  configuration alone; glibc is told to serve every allocation of 64 KiB or more by ``mmap``
  (``MALLOC_MMAP_THRESHOLD_``), so freed activations leave the resident set at once and it follows the live tensors.
  ``/proc/self/clear_refs`` resets the peak after warm-up, so the figure is one steady-state step. Linux only.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "interleaved_times", "ratio_medians", "environment", "sync", "reset_peak", "peak_mb", "rss_mb",
    "measure_in_subprocess", "MEMORY_ENV",
]

# glibc: allocations >= 64 KiB come from mmap and go back to the system when freed (fixed threshold)
MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_times(
    calls: dict[str, Callable[[], Any]],
    device: torch.device,
    warmup: int,
    rounds: int,
    progress: Callable[[str], None] | None = None,
) -> dict[str, list[float]]:
    """Seconds per call of every entry of ``calls``, ``rounds`` timed rounds after ``warmup`` untimed ones.

    Args:
        calls: name -> a function doing one unit of work (a training step, a forward pass).
        device: where the work runs (CUDA is synchronised around each call).
        warmup: untimed rounds first (caches, allocator, oneDNN primitive creation).
        rounds: timed rounds; round ``i`` starts at entry ``i mod len(calls)``.
        progress: called with a line after each round.

    Returns:
        name -> list of ``rounds`` durations in round order.
    """
    names = list(calls)
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in range(warmup + rounds):
        start_at = (i - warmup) % len(names) if i >= warmup else 0
        for name in names[start_at:] + names[:start_at]:
            sync(device)
            start = time.perf_counter()
            calls[name]()
            sync(device)
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
        if progress is not None:
            progress(f"round {i + 1}/{warmup + rounds}{' (warm-up)' if i < warmup else ''} done")
    return times


def ratio_medians(times: dict[str, list[float]], baseline: str) -> dict[str, float]:
    """Median over rounds of ``times[name][i] / times[baseline][i]`` for every name."""
    base = times[baseline]
    return {n: statistics.median(t / b for t, b in zip(ts, base)) for n, ts in times.items()}


def environment(device: torch.device) -> dict[str, Any]:
    """Versions, threads and hardware of this run (stored in every JSON result)."""
    import monai
    import peft

    return {
        "torch": torch.__version__, "monai": monai.__version__, "peft": peft.__version__,
        "python": platform.python_version(), "device": str(device), "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field} (CPU memory is measured on Linux only)")


def rss_mb() -> float:
    """Resident set of this process now, in MiB (Linux)."""
    return _status_kb("VmRSS") / 1024


def reset_peak(device: torch.device) -> None:
    """Start a new peak: CUDA's allocator statistics, or the process's ``VmHWM`` (Linux ``clear_refs``)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        Path("/proc/self/clear_refs").write_text("5")


def peak_mb(device: torch.device) -> float:
    """The peak since :func:`reset_peak`: CUDA max allocated, or ``VmHWM`` (both MiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return _status_kb("VmHWM") / 1024


def measure_in_subprocess(script: Path, probe: dict[str, Any], timeout: float = 3600) -> dict[str, Any]:
    """Run ``python script --memory-probe '<json>'`` in a fresh process with :data:`MEMORY_ENV`; returns the JSON
    object the probe prints on its last stdout line.

    Raises:
        RuntimeError: the probe failed (its stderr tail is in the message).
    """
    env = {**os.environ, **MEMORY_ENV}
    proc = subprocess.run([sys.executable, str(script), "--memory-probe", json.dumps(probe)], env=env,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"memory probe {probe} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def write_outputs(result: dict[str, Any], out: str | Path, plot: Callable[[dict, Path], None],
                  table: Callable[[dict], str]) -> int:
    """Write ``<out>.json`` (atomically) and ``<out>.png``, print the Markdown table and the paths; returns exit 0."""
    from monai_peft.io import atomic_write_json

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out.with_suffix(".json"), result)
    plot(result, out.with_suffix(".png"))
    print(table(result))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")
    return 0


def probe_or_device_check(args: Any, memory_probe: Callable[[dict], dict]) -> int | None:
    """The start of a benchmark's ``main``: in its ``--memory-probe`` role (a fresh subprocess) print the probe's JSON
    and return 0; return 2 with an error line when CUDA is asked for and absent; None to go on."""
    if args.memory_probe is not None:
        print(json.dumps(memory_probe(json.loads(args.memory_probe))))
        return 0
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"error: --device {args.device}: no CUDA device is available", file=sys.stderr)
        return 2
    return None
