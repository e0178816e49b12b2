"""Make the plugin's trainers visible to nnU-Net through ``nnUNet_extTrainer``.

nnU-Net 2.8 (``nnunetv2.utilities.find_objects.recursive_find_trainer_class_by_name``) splits
``nnUNet_extTrainer`` on ``os.pathsep`` and imports every module of each folder until it finds the requested
class. We therefore *append* our folder to whatever the user set, never replace it.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping
from pathlib import Path

__all__ = ["EXT_TRAINER_ENV", "ext_trainer_folder", "ext_trainer_value", "register_ext_trainer_folder"]

EXT_TRAINER_ENV = "nnUNet_extTrainer"


def ext_trainer_folder() -> str:
    """Absolute path of the folder to put in ``nnUNet_extTrainer`` (it re-exports every trainer of the plugin)."""
    return str(Path(__file__).resolve().parent / "ext_trainers")


def ext_trainer_value(current: str | None) -> str:
    """The value ``nnUNet_extTrainer`` should have: ``current`` with our folder appended once.

    Args:
        current: the existing value (``None`` or empty when unset); its folders are kept, in order.

    Returns:
        ``os.pathsep``-joined folders, ours last, without duplicates of ours.
    """
    ours = ext_trainer_folder()
    parts = [p for p in (current or "").split(os.pathsep) if p.strip()]
    if any(os.path.realpath(p) == os.path.realpath(ours) for p in parts):
        return os.pathsep.join(parts)
    return os.pathsep.join([*parts, ours])


def register_ext_trainer_folder(environ: MutableMapping[str, str] | None = None) -> str:
    """Append the plugin's trainer folder to ``nnUNet_extTrainer`` (idempotent, keeps existing folders).

    Args:
        environ: the environment to edit; ``os.environ`` (default) also reaches every subprocess.

    Returns:
        the new value of the variable.
    """
    env = os.environ if environ is None else environ
    value = ext_trainer_value(env.get(EXT_TRAINER_ENV))
    env[EXT_TRAINER_ENV] = value
    return value
