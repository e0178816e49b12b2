"""The class groups of the thesis, as TotalSegmentator v2 structure file names (one definition, imported everywhere).

A class group is an ordered list of structure names; label ``i`` (1-based) of a merged label map is the
``i``-th name, ``0`` is background. Names are the file names of TotalSegmentator v2
(``segmentations/<name>.nii.gz``) and the ids of its ``total`` / ``total_mr`` tasks.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

__all__ = [
    "ORGANS_17",
    "VERTEBRAE_25",
    "MR_ORGANS_29",
    "CLASS_GROUPS",
    "class_group",
    "label_names",
    "task_id_map",
]

# thesis Table 4.2: the downstream "organs" class of TotalSegmentator v2 CT, in the thesis's label order
ORGANS_17: tuple[str, ...] = (
    "spleen",
    "kidney_right",
    "kidney_left",
    "gallbladder",
    "liver",
    "stomach",
    "aorta",
    "inferior_vena_cava",
    "portal_vein_and_splenic_vein",
    "pancreas",
    "adrenal_gland_right",
    "adrenal_gland_left",
    "lung_upper_lobe_left",
    "lung_upper_lobe_right",
    "lung_lower_lobe_left",
    "lung_lower_lobe_right",
    "lung_middle_lobe_right",
)

# thesis Table 4.4: the 25 vertebrae (OOD CT task), S1 first, then lumbar, thoracic, cervical caudal-to-cranial
VERTEBRAE_25: tuple[str, ...] = (
    ("vertebrae_S1",)
    + tuple(f"vertebrae_L{i}" for i in range(5, 0, -1))
    + tuple(f"vertebrae_T{i}" for i in range(12, 0, -1))
    + tuple(f"vertebrae_C{i}" for i in range(7, 0, -1))
)

# thesis Table 4.5: the 29 organs of TotalSegmentator MR (OOD modality), equal to total_mr ids 1..29
MR_ORGANS_29: tuple[str, ...] = (
    "spleen",
    "kidney_right",
    "kidney_left",
    "gallbladder",
    "liver",
    "stomach",
    "pancreas",
    "adrenal_gland_right",
    "adrenal_gland_left",
    "lung_left",
    "lung_right",
    "esophagus",
    "small_bowel",
    "duodenum",
    "colon",
    "urinary_bladder",
    "prostate",
    "sacrum",
    "vertebrae",
    "intervertebral_discs",
    "spinal_cord",
    "heart",
    "aorta",
    "inferior_vena_cava",
    "portal_vein_and_splenic_vein",
    "iliac_artery_left",
    "iliac_artery_right",
    "iliac_vena_left",
    "iliac_vena_right",
)

CLASS_GROUPS: dict[str, tuple[str, ...]] = {
    "organs_17": ORGANS_17,
    "vertebrae_25": VERTEBRAE_25,
    "mr_organs_29": MR_ORGANS_29,
}
_ALIASES = {"organs": "organs_17", "vertebrae": "vertebrae_25", "mr_organs": "mr_organs_29"}


def class_group(name_or_list: str | Sequence[str]) -> list[str]:
    """Resolve a class group to its ordered structure names.

    Args:
        name_or_list: ``"organs_17"`` (alias ``"organs"``), ``"vertebrae_25"`` (``"vertebrae"``),
            ``"mr_organs_29"`` (``"mr_organs"``), or a user list of TotalSegmentator structure names.

    Returns:
        The names; label ``i + 1`` of a merged label map is ``names[i]``.

    Raises:
        ValueError: unknown group name, empty list or duplicated names.
    """
    if isinstance(name_or_list, str):
        key = _ALIASES.get(name_or_list, name_or_list)
        if key not in CLASS_GROUPS:
            raise ValueError(
                f"unknown class group {name_or_list!r}; expected one of {sorted(CLASS_GROUPS) + sorted(_ALIASES)} "
                "or a list of TotalSegmentator structure names."
            )
        return list(CLASS_GROUPS[key])
    names = [str(n) for n in name_or_list]
    if not names:
        raise ValueError("class group: the list of structure names is empty.")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"class group: duplicated structure names {dupes}.")
    return names


def label_names(name_or_list: str | Sequence[str]) -> dict[int, str]:
    """``{0: "background", 1: first structure, ...}`` for a class group (e.g. for bundle metadata)."""
    return {0: "background", **{i + 1: n for i, n in enumerate(class_group(name_or_list))}}


def task_id_map(class_map_json: str | Path, task: str = "total") -> dict[int, str]:
    """Read a TotalSegmentator ``class_map.json`` (``{task: {"1": name, ...}}``) into ``{id: name}``.

    Args:
        class_map_json: path to the JSON file.
        task: ``"total"`` (CT, 117 classes) or ``"total_mr"`` (MR, 50 classes).

    Raises:
        KeyError: the task is not in the file (the message names the file and its tasks).
    """
    data = json.loads(Path(class_map_json).read_text())
    if task not in data:
        raise KeyError(f"{class_map_json}: no task {task!r}; tasks in the file: {sorted(data)}.")
    return {int(k): v for k, v in data[task].items()}
