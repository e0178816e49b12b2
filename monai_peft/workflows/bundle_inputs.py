"""Command-line overrides of the TotalSegmentator bundles, checked before anything runs.

MONAI's ``python -m monai.bundle`` has two habits that hide a user's mistake:

- it drops every override whose value parses to ``None`` (``--pretrained None``, ``--split None`` are silently
  ignored and the default applies), so the keys that can be "nothing" accept what the command line can pass:
  ``none``, ``null`` or an empty string (``--pretrained none``, ``--split all``); ``'$None'`` also works;
- it wraps every exception of a config expression in ``RuntimeError: Failed to evaluate ...`` / ``Failed to
  instantiate component ...``, so the cause sits mid-traceback.

The functions here are called from the configs (``initialize``, ``network_def``, ``class_names``). A bad input stops
the run with :class:`BundleInputError`, a ``SystemExit`` (which MONAI's ``except Exception`` lets through), so
the only line printed is ``error: <what, which override, what was expected>``; ``MONAI_PEFT_DEBUG=1`` raises the
original exception instead, with MONAI's traceback.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from monai_peft.errors import USER_ERRORS, debug_enabled, error_line

__all__ = ["BundleInputError", "NONE_VALUES", "SPLITS", "check_inputs", "pretrained_file", "optional_split",
           "class_names", "stop_on_bad_input"]

# what `python -m monai.bundle run --key VALUE` can pass for "nothing" (MONAI drops a literal None)
NONE_VALUES = ("", "none", "null")
SPLITS = ("train", "val", "test")


class BundleInputError(SystemExit):
    """A bad bundle override: stops the run with one line ``error: ...`` (exit status 1).

    A ``SystemExit`` and not a ``ValueError`` because MONAI's config parser re-raises every ``Exception`` of a
    config expression as ``RuntimeError: Failed to evaluate ...``; ``SystemExit`` passes through unchanged.
    """


@contextlib.contextmanager
def stop_on_bad_input() -> Iterator[None]:
    """Turn a user error raised in the block (:data:`monai_peft.errors.USER_ERRORS`) into :class:`BundleInputError`.

    With ``MONAI_PEFT_DEBUG=1`` the original exception propagates (full traceback).
    """
    try:
        yield
    except USER_ERRORS as e:
        if debug_enabled():
            raise
        raise BundleInputError(error_line(e)) from e


def _is_none(value: Any) -> bool:
    return value is None or (isinstance(value, str) and value.strip().lower() in NONE_VALUES)


def pretrained_file(value: str | Path | None, key: str = "--pretrained") -> str | None:
    """The ``--pretrained`` override as a checked file path, or None for ``none`` / ``null`` / ``''`` / ``$None``.

    Raises:
        BundleInputError: the file does not exist (the message names the override and how to train without it).
    """
    if _is_none(value):
        return None
    path = Path(str(value))
    with stop_on_bad_input():
        if not path.is_file():
            raise FileNotFoundError(
                f"{key} {path}: no such file; give the SuPreM checkpoint (e.g. supervised_suprem_segresnet_2100.pth) "
                f"or {key} none to start from random weights."
            )
    return str(path)


def optional_split(value: str | None, key: str = "--split") -> str | None:
    """The ``--split`` override: ``train`` / ``val`` / ``test``, or None (every case) for ``all`` / ``none`` / ``''``.

    Raises:
        BundleInputError: any other value.
    """
    if _is_none(value) or str(value).strip().lower() == "all":
        return None
    with stop_on_bad_input():
        if value not in SPLITS:
            raise ValueError(f"{key} {value!r}: expected one of {SPLITS} or 'all' (every case).")
    return str(value)


def class_names(classes: str | Sequence[str]) -> list[str]:
    """``monai_peft.data.class_group(classes)`` for the ``--classes`` override, stopping on an unknown name."""
    from monai_peft.data import class_group

    with stop_on_bad_input():
        try:
            return class_group(classes)
        except ValueError as e:
            raise ValueError(f"--classes: {e}") from None


def check_inputs(
    dataset_dir: str | Path | None,
    classes: str | Sequence[str],
    preset: str | None = None,
    backbone: str | None = None,
    pretrained: str | Path | None = None,
    split: str | None = None,
    roi_size: Sequence[int] | None = None,
    need_labels: bool = True,
    modality: str = "auto",
) -> dict[str, Any]:
    """Check the overrides of a bundle run at once, before any data is read or network built.

    Args:
        dataset_dir: ``--dataset_dir``: a TotalSegmentator folder.
        classes: ``--classes``: a class group, a structure name or a list; with ``need_labels`` every structure
            needs a mask file in some case.
        preset: ``--peft#preset``: a name from ``monai-peft presets``.
        backbone: the bundle's backbone (``"segresnet"`` or ``"unet"``); the preset must be for it.
        pretrained: ``--pretrained``: a file, or ``none``.
        split: ``--split`` of inference: ``train`` / ``val`` / ``test`` / ``all``.
        roi_size: ``--roi_size``: three positive sizes divisible by 8 (both SuPreM backbones halve three times).
        need_labels: training and evaluation need label files; inference does not.
        modality: ``"ct"``, ``"mr"`` or ``"auto"``.

    Returns:
        ``{"cases": number of case folders, "class_names": [...]}``.

    Raises:
        BundleInputError: the first problem found, as one line naming the override.
    """
    from monai_peft.data.totalseg import dataset_classes
    from monai_peft.workflows.bundle import check_dataset_dir

    with stop_on_bad_input():
        names = class_names(classes)
        cases = check_dataset_dir(dataset_dir, classes, need_labels=need_labels, modality=modality)
        if need_labels:
            try:
                names = dataset_classes(cases, classes, dataset_dir)
            except ValueError as e:
                raise ValueError(f"--classes {classes!r}: {e}") from None
        if preset is not None:
            from monai_peft.presets import get_preset

            try:
                p = get_preset(preset)
            except KeyError as e:
                raise KeyError(f"--peft#preset: {e.args[0] if e.args else e}") from None
            if backbone is not None and p.backbone != backbone:
                raise ValueError(f"--peft#preset {preset}: a preset of the {p.backbone} backbone; this bundle "
                                 f"fine-tunes SuPreM's {backbone} (monai-peft presets --backbone {backbone} lists "
                                 "its presets).")
        pretrained_file(pretrained)
        if split is not None:
            optional_split(split)
        if roi_size is not None:
            sizes = list(roi_size) if isinstance(roi_size, (list, tuple)) else None
            if sizes is None or len(sizes) != 3 or any(not isinstance(s, int) or s < 8 or s % 8 for s in sizes):
                raise ValueError(f"--roi_size {roi_size!r}: expected three sizes divisible by 8, e.g. [96,96,96].")
    return {"cases": len(cases), "class_names": names}
