"""The class groups of the thesis, as TotalSegmentator v2 structure file names (one definition, imported everywhere).

A class group is an ordered list of structure names; label ``i`` (1-based) of a merged label map is the
``i``-th name, ``0`` is background. Names are the file names of TotalSegmentator v2
(``segmentations/<name>.nii.gz``) and the ids of its ``total`` / ``total_mr`` tasks.
"""

from __future__ import annotations

import difflib
import functools
import json
from collections.abc import Collection, Iterable, Sequence
from pathlib import Path

__all__ = [
    "ORGANS_17",
    "VERTEBRAE_25",
    "MR_ORGANS_29",
    "CLASS_GROUPS",
    "class_group",
    "label_names",
    "task_id_map",
    "totalseg_structure_names",
    "closest_names",
    "check_structure_names",
]

# TotalSegmentator's own class map (tasks "total" and "total_mr"), shipped with the example scans: the vocabulary
# that structure names are checked against
TOTALSEG_CLASS_MAP = Path(__file__).resolve().parent / "totalseg_example" / "class_map.json"

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


@functools.lru_cache(maxsize=1)
def totalseg_structure_names() -> frozenset[str]:
    """Every structure name of TotalSegmentator v2: the 117 CT names (task ``total``) and the 50 MR names
    (``total_mr``), read from TotalSegmentator's ``class_map.json`` shipped with monai-peft."""
    return frozenset(name for task in ("total", "total_mr") for name in task_id_map(TOTALSEG_CLASS_MAP, task).values())


def closest_names(name: str, valid: Iterable[str], n: int = 3) -> list[str]:
    """Up to ``n`` names of ``valid`` that look like ``name`` (``difflib``), best first; for "did you mean"."""
    return difflib.get_close_matches(name, sorted(valid), n=n, cutoff=0.6)


def check_structure_names(names: Iterable[str], valid: Collection[str], where: str) -> None:
    """Raise ``ValueError`` naming every name of ``names`` that is not in ``valid``, with the closest valid names.

    Args:
        names: structure names to check.
        valid: the names that exist.
        where: what ``valid`` is, for the message (e.g. ``"TotalSegmentator v2"``, ``"class_map.json task 'total'"``).
    """
    unknown = [n for n in names if n not in valid]
    if not unknown:
        return
    hints = []
    for n in unknown:
        close = closest_names(n, valid)
        hints.append(f"{n!r} (did you mean {' or '.join(map(repr, close))}?)" if close else repr(n))
    raise ValueError(f"unknown structure name{'s' if len(unknown) > 1 else ''} {', '.join(hints)}: not in {where}.")


def class_group(
    name_or_list: str | Sequence[str], known: Collection[str] | None = None, known_what: str | None = None
) -> list[str]:
    """Resolve a class group to its ordered structure names.

    Args:
        name_or_list: ``"organs_17"`` (alias ``"organs"``), ``"vertebrae_25"`` (``"vertebrae"``),
            ``"mr_organs_29"`` (``"mr_organs"``), one structure name, or a user list of structure names.
        known: the structure names a user list may use. Default: the TotalSegmentator v2 names
            (:func:`totalseg_structure_names`); pass your dataset's names for data with other structures.
        known_what: what ``known`` is, for the error message.

    Returns:
        The names; label ``i + 1`` of a merged label map is ``names[i]``.

    Raises:
        ValueError: unknown group name, empty list, duplicated names, or a name outside ``known`` (the message
            suggests the closest valid names).
    """
    vocabulary = totalseg_structure_names() if known is None else known
    if isinstance(name_or_list, str):
        key = _ALIASES.get(name_or_list, name_or_list)
        if key in CLASS_GROUPS:
            return list(CLASS_GROUPS[key])
        if name_or_list in vocabulary:  # one structure
            return [name_or_list]
        groups = sorted(CLASS_GROUPS) + sorted(_ALIASES)
        close = closest_names(name_or_list, [*groups, *vocabulary])
        hint = f"did you mean {' or '.join(map(repr, close))}? " if close else ""
        raise ValueError(
            f"unknown class group or structure {name_or_list!r}; {hint}expected one of {groups}, a structure name "
            "or a list of structure names (TotalSegmentator v2 file names)."
        )
    names = [str(n) for n in name_or_list]
    if not names:
        raise ValueError("class group: the list of structure names is empty.")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"class group: duplicated structure names {dupes}.")
    where = "TotalSegmentator v2 (segmentations/<name>.nii.gz)" if known is None else known_what
    check_structure_names(names, vocabulary, where or "the known structure names")
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
        FileNotFoundError: no such file.
        ValueError: the file is not JSON of that form (the message names the file).
        KeyError: the task is not in the file (the message names the file and its tasks).
    """
    path = Path(class_map_json)
    if not path.is_file():
        raise FileNotFoundError(f"class map {path} does not exist.")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a JSON class map ({e}).") from None
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise ValueError(f"{path}: expected {{task: {{id: structure name}}}}, got {type(data).__name__}.")
    if task not in data:
        raise KeyError(f"{path}: no task {task!r}; tasks in the file: {sorted(data)}.")
    try:
        return {int(k): str(v) for k, v in data[task].items()}
    except ValueError:
        raise ValueError(f"{path}: task {task!r} has ids that are not integers: {list(data[task])[:5]}.") from None
