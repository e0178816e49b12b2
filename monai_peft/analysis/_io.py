"""Atomic writers for the JSON, PNG and NIfTI outputs of the analysis and interpretability tools."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["atomic_path", "write_json_atomic", "savefig_atomic"]


class atomic_path:
    """Context manager giving a temporary path beside ``path``; on success it replaces ``path``.

    Args:
        path: the final file.
        suffix: suffix of the temporary file (some writers pick the format from it), default: the
            final file's full suffix (``.nii.gz`` included).
    """

    def __init__(self, path: str | os.PathLike, suffix: str | None = None) -> None:
        self.path = Path(path)
        self.suffix = "".join(self.path.suffixes) if suffix is None else suffix
        self.tmp: str | None = None

    def __enter__(self) -> str:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, self.tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".tmp-", suffix=self.suffix)
        os.close(fd)
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            os.chmod(self.tmp, 0o644)  # mkstemp creates 0600; outputs are meant to be shared
            os.replace(self.tmp, self.path)
        elif self.tmp and os.path.exists(self.tmp):
            os.remove(self.tmp)


def write_json_atomic(path: str | os.PathLike, data: Any) -> Path:
    """Write ``data`` as indented JSON to ``path`` through a temporary file and ``os.replace``."""
    with atomic_path(path, suffix=".json") as tmp:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2, default=_default)
            f.write("\n")
    return Path(path)


def savefig_atomic(fig: Any, path: str | os.PathLike, dpi: int = 120) -> Path:
    """Save a matplotlib figure atomically; the format follows the suffix of ``path``."""
    path = Path(path)
    with atomic_path(path, suffix=path.suffix) as tmp:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format=path.suffix.lstrip(".") or "png")
    return path


def _default(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot write {type(obj).__name__} as JSON")
