"""Which imaging modality a class group and a dataset folder belong to, and the check that they agree.

The thesis fine-tunes a CT foundation model on CT organs (4.2.2), CT vertebrae and MR organs (4.2.5.3). MR needs
its own intensity normalisation (:data:`monai_peft.data.transforms.INTENSITY_FOR_MODALITY`), so every workflow
resolves the modality once, here: from the class group (``mr_organs`` is MR, ``organs`` / ``vertebrae`` are CT)
and from the dataset folder (``ct.nii.gz`` or ``mri.nii.gz`` case images). A CT class group on an MR folder, or
the reverse, is an error that names both.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

__all__ = ["GROUP_MODALITY", "MODALITIES", "group_modality", "dataset_modality", "resolve_modality"]

MODALITIES = ("ct", "mr")

#: class group -> modality of the TotalSegmentator dataset it comes from (thesis Tables 4.2, 4.4, 4.5)
GROUP_MODALITY: dict[str, str] = {"organs_17": "ct", "vertebrae_25": "ct", "mr_organs_29": "mr"}
_ALIASES = {"organs": "organs_17", "vertebrae": "vertebrae_25", "mr_organs": "mr_organs_29"}


def group_modality(classes: str | Sequence[str]) -> str | None:
    """``"ct"`` or ``"mr"`` for a named class group, ``None`` for a list of structure names (valid in both).

    Raises:
        ValueError: an unknown group name (through :func:`~monai_peft.data.class_group`).
    """
    if not isinstance(classes, str):
        return None
    from monai_peft.data.class_maps import class_group

    class_group(classes)  # unknown names fail here, with the list of groups
    return GROUP_MODALITY.get(_ALIASES.get(classes, classes))


def dataset_modality(dataset_dir: str | Path) -> str:
    """``"ct"`` or ``"mr"``: the modality of the case images in a TotalSegmentator folder.

    Raises:
        FileNotFoundError: the folder does not exist or holds no case image.
        ValueError: the folder mixes ``ct.nii.gz`` and ``mri.nii.gz`` cases (the message counts both).
    """
    from monai_peft.data.totalseg import IMAGE_FILES, list_cases

    root = Path(dataset_dir)
    cases = list_cases(root)  # raises FileNotFoundError naming the folder
    found = {m: sum((c / name).is_file() for c in cases) for m, name in IMAGE_FILES.items()}
    present = [m for m, n in found.items() if n]
    if len(present) > 1:
        raise ValueError(
            f"{root} mixes modalities: {found['ct']} cases with {IMAGE_FILES['ct']} and {found['mr']} with "
            f"{IMAGE_FILES['mr']}; keep CT and MR in separate dataset folders."
        )
    return present[0]


def resolve_modality(
    classes: str | Sequence[str], dataset_dir: str | Path | None = None, modality: str = "auto"
) -> str:
    """The modality of a run, checked against its class group and its dataset folder.

    Args:
        classes: the class group name or list of structure names (``--classes``).
        dataset_dir: the TotalSegmentator folder (``--dataset_dir``); ``None`` or a missing folder skips that check.
        modality: ``"auto"`` (default: from the class group, else the dataset, else ``"ct"``), ``"ct"`` or ``"mr"``.

    Returns:
        ``"ct"`` or ``"mr"``.

    Raises:
        ValueError: ``modality`` is not one of the above, or the class group, the dataset folder and ``modality``
            disagree (the message names each of them).
    """
    if modality not in ("auto", *MODALITIES):
        raise ValueError(f"modality must be 'auto', 'ct' or 'mr', got {modality!r}.")
    from_group = group_modality(classes)
    from_data = None
    if dataset_dir is not None and str(dataset_dir).strip() and Path(dataset_dir).is_dir():
        from_data = dataset_modality(dataset_dir)
    if from_group and from_data and from_group != from_data:
        raise ValueError(
            f"--classes {classes!r} is {'an' if from_group == 'mr' else 'a'} {from_group.upper()} class group but "
            f"--dataset_dir {dataset_dir} holds "
            f"{from_data.upper()} cases; use {'mr_organs' if from_data == 'mr' else 'organs or vertebrae'} "
            f"(or a list of structure names) for this folder."
        )
    found = from_group or from_data
    if modality != "auto":
        if found and found != modality:
            source = f"--classes {classes!r}" if from_group else f"--dataset_dir {dataset_dir}"
            raise ValueError(f"--modality {modality!r} contradicts {source}, which is {found.upper()}.")
        return modality
    return found or "ct"
