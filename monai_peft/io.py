"""Atomic file output: every file monai-peft writes appears whole or not at all.

A writer fills a temporary file in the destination folder (same file system, so the final
``os.replace`` is atomic) and only then renames it onto the target; a crash or an exception leaves
the previous file untouched and no temporary file behind. Folders (adapter checkpoints, echo task
folders) are written to a temporary folder and swapped in with :func:`atomic_replace_dir`.

Heavy libraries (torch, safetensors, matplotlib, nibabel) are imported inside the helpers that need
them, so importing this module is cheap.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = [
    "atomic_folder",
    "atomic_path",
    "atomic_replace_dir",
    "atomic_save_figure",
    "atomic_save_nifti",
    "atomic_save_safetensors",
    "atomic_torch_save",
    "atomic_write_json",
    "atomic_write_text",
    "json_default",
]

_FILE_MODE = 0o644  # what open() gives a new file under the usual umask; mkstemp makes 0600


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[str]:
    """Yield a temporary file path beside ``path``; on normal exit it replaces ``path``.

    The temporary file is created (empty) with ``tempfile.mkstemp`` in the destination folder, named
    ``.<name>.XXXXXXXX<suffix>``; parent folders are created. On normal exit it gets the mode of a
    normally created file (``0o644`` minus the umask) and is ``os.replace``-d onto ``path``. If the
    block raises, the temporary file is removed, ``path`` is left as it was and the exception propagates.

    Args:
        path: the final file.
        suffix: suffix of the temporary file; writers that pick the format from the file name need the
            real extension (``".png"``, ``".nii.gz"``). Default ``".tmp"``.

    Yields:
        The temporary path as a string.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix or ".tmp")
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, _FILE_MODE & ~_current_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically.

    Args:
        path: the final file.
        text: the whole content.

    Returns:
        ``path`` as a ``Path``.
    """
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    return Path(path)


def json_default(obj: Any) -> Any:
    """``json.dumps(default=...)`` for numpy / torch values and paths: scalars, lists, strings.

    Args:
        obj: an object ``json`` cannot serialise by itself.

    Raises:
        TypeError: anything else, naming its type.
    """
    if hasattr(obj, "item") and getattr(obj, "ndim", 0) == 0:  # numpy / torch scalars
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot write {type(obj).__name__} as JSON")


def atomic_write_json(
    path: str | os.PathLike,
    obj: Any,
    indent: int | None = 2,
    *,
    sort_keys: bool = False,
    default: Callable[[Any], Any] | None = None,
    allow_nan: bool = True,
) -> Path:
    """Write ``obj`` as JSON (with a trailing newline) to ``path`` atomically.

    Args:
        path: the final file.
        obj: a JSON-serialisable object.
        indent: ``json.dumps`` indentation. Default 2.
        sort_keys: sort dictionary keys. Default False.
        default: called for objects ``json`` cannot serialise, e.g. :func:`json_default` or ``float``. Default None.
        allow_nan: write NaN/inf as the non-standard ``NaN``/``Infinity``; False raises ``ValueError`` instead.
            Default True.

    Returns:
        ``path`` as a ``Path``.
    """
    text = json.dumps(obj, indent=indent, sort_keys=sort_keys, default=default, allow_nan=allow_nan)
    return atomic_write_text(path, text + "\n")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj)`` to ``path`` atomically.

    Args:
        obj: anything ``torch.save`` accepts (state dicts, checkpoint dicts).
        path: the final file (``.pt`` / ``.pth``).

    Returns:
        ``path`` as a ``Path``.
    """
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def atomic_save_safetensors(
    tensors: Mapping[str, Any], path: str | os.PathLike, metadata: Mapping[str, str] | None = None
) -> Path:
    """``safetensors.torch.save_file`` to ``path`` atomically.

    Args:
        tensors: name -> contiguous ``torch.Tensor``.
        path: the final ``.safetensors`` file.
        metadata: string -> string header entries. Default None.

    Returns:
        ``path`` as a ``Path``.
    """
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(dict(tensors), tmp, metadata=dict(metadata) if metadata is not None else None)
    return Path(path)


def atomic_save_figure(fig: Any, path: str | os.PathLike, **savefig_kwargs: Any) -> Path:
    """``fig.savefig`` to ``path`` atomically; the format follows the extension of ``path`` (PNG without one).

    The figure is not closed (the caller owns it).

    Args:
        fig: a matplotlib ``Figure``.
        path: the final image file (``.png``, ``.pdf``, ``.svg``, ...).
        savefig_kwargs: passed to ``fig.savefig`` (``dpi``, ``bbox_inches``, ``format``, ...).

    Returns:
        ``path`` as a ``Path``.
    """
    path = Path(path)
    savefig_kwargs.setdefault("format", path.suffix.lstrip(".") or "png")
    with atomic_path(path, suffix=path.suffix or None) as tmp:
        fig.savefig(tmp, **savefig_kwargs)
    return path


def _nifti_suffix(path: str | os.PathLike) -> str:
    """``".nii.gz"`` or ``".nii"`` for a NIfTI file name.

    Args:
        path: a file name ending in ``.nii.gz`` or ``.nii``.

    Raises:
        ValueError: any other ending.
    """
    name = Path(path).name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return suffix
    raise ValueError(f"{path}: expected a NIfTI file name ending in .nii.gz or .nii.")


def atomic_save_nifti(image: Any, path: str | os.PathLike) -> Path:
    """``nibabel.save(image)`` to ``path`` atomically (gzip-compressed when ``path`` ends in ``.nii.gz``).

    Args:
        image: a nibabel image (``Nifti1Image``).
        path: the final file, ending in ``.nii.gz`` or ``.nii``.

    Returns:
        ``path`` as a ``Path``.

    Raises:
        ValueError: ``path`` does not end in ``.nii.gz`` or ``.nii``.
    """
    import nibabel as nib

    with atomic_path(path, suffix=_nifti_suffix(path)) as tmp:  # nibabel picks compression from the suffix
        nib.save(image, tmp)
    return Path(path)


def atomic_replace_dir(tmp_dir: str | os.PathLike, final_dir: str | os.PathLike) -> Path:
    """Swap the fully written folder ``tmp_dir`` into place as ``final_dir``.

    A previous ``final_dir`` is renamed to ``.<name>.old`` beside it, ``tmp_dir`` is renamed onto
    ``final_dir``, and only then is the old folder deleted; a stale ``.<name>.old`` from an interrupted
    swap is removed first. ``tmp_dir`` must be on the same file system (create it in ``final_dir``'s parent).

    Args:
        tmp_dir: the finished temporary folder.
        final_dir: where it should end up.

    Returns:
        ``final_dir`` as a ``Path``.
    """
    final = Path(final_dir)
    old = final.with_name(f".{final.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp_dir, final)
    if old.exists():
        shutil.rmtree(old)
    return final


@contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a new temporary folder beside ``path``; on normal exit it replaces ``path`` (:func:`atomic_replace_dir`).

    The folder (``.<name>.XXXXXXXX``, mode of a normally created folder) is filled by the block; if the block
    raises, it is removed, ``path`` is left as it was and the exception propagates.

    Args:
        path: the final folder.

    Yields:
        The temporary folder.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}."))
    try:
        os.chmod(tmp, 0o777 & ~_current_umask())
        yield tmp
        atomic_replace_dir(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
