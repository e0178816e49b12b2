"""The run record ``results.json``: one JSON file per run that training, evaluation and analysis share.

Layout (every section optional; writers merge into what is there)::

    {
      "record_version": 1,
      "method": "convadapter", "placement": "resblock-parallel", "preset": "segresnet-convadapter-...",
      "parameters": {"trainable": 123, "total": 456, "trainable_percent": 0.27},
      "validation": {"mean_dice": 0.8, "per_class_dice": {...}, "best_epoch": 3},
      "test": {"mean_dice": 0.8, "mean_nsd": 0.7, "per_class_dice": {...}, "per_class_nsd": {...},
               "n_cases": 12, "cases_csv": "test_metrics.csv"},
      "costs": {"train_s_per_volume": 2.1, "inference_s_per_volume": 0.12, "train_peak_memory_gb": 11.0, ...},
      "history": [{"epoch": 1, "train_loss": 0.9, "lr": 1e-4, "seconds": 61.0, "elapsed_seconds": 61.0,
                   "val_mean_dice": 0.41, "val_per_class_dice": {...}}, ...],
      "frozen_backbone": {"tensors": 80, "parameters": 4129120, "start": "<sha256>", "end": "<sha256>",
                          "unchanged": true},
      "updated": "2026-01-01T00:00:00+00:00"
    }

``history`` has one entry per epoch (:class:`monai_peft.handlers.EpochHistory` for MONAI engines, the nnU-Net
trainers write the same layout); ``monai-peft curves`` plots it.

``frozen_backbone`` fingerprints the raw bytes of the frozen parameters at the start and end of training; it is
``null`` for a run that freezes nothing (full fine-tuning, pretraining), where there is no frozen backbone.
"""

from __future__ import annotations

import datetime
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from monai_peft.io import atomic_write_json as _write_json
from monai_peft.io import atomic_write_text

__all__ = ["RECORD_VERSION", "atomic_write_json", "atomic_write_text", "process_rank", "read_run_record",
           "update_run_record"]

RECORD_VERSION = 1


def _jsonable(value: Any) -> Any:
    """Plain JSON types; NaN/inf become None so the file stays standard JSON."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "tolist"):  # numpy / torch scalars and arrays
        return _jsonable(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def process_rank() -> int:
    """Rank of this process in an initialised ``torch.distributed`` group, else 0 (only rank 0 writes files)."""
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def atomic_write_json(path: str | Path, data: Any) -> Path:
    """Write ``data`` as indented JSON atomically; NaN/inf become null, numpy/torch values plain numbers.

    The run-record flavour of :func:`monai_peft.io.atomic_write_json` (the file stays standard JSON).
    """
    return _write_json(path, _jsonable(data), allow_nan=False)


def read_run_record(path: str | Path) -> dict[str, Any]:
    """Read a run record; a missing file gives an empty record.

    Raises:
        ValueError: when the file is not a JSON object.
    """
    path = Path(path)
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"run record {path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"run record {path} must hold a JSON object, found {type(data).__name__}.")
    return data


def _merge(base: dict[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    for key, value in new.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            base[key] = _merge(base[key], value)
        else:
            base[key] = value
    return base


def update_run_record(path: str | Path, sections: Mapping[str, Any]) -> dict[str, Any]:
    """Merge ``sections`` into the run record at ``path`` (nested dicts merge key by key) and write it atomically.

    Args:
        path: the ``results.json`` file; created with its folder when missing.
        sections: top-level keys to set, e.g. ``{"costs": {"train_s_per_volume": 2.1}}``.

    Returns:
        The record as written.
    """
    record = read_run_record(path)
    record = _merge(record, _jsonable(dict(sections)))
    record["record_version"] = RECORD_VERSION
    record["updated"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    atomic_write_json(path, record)
    return record
