"""The real abdominal CT and MR shipped with monai-peft (TotalSegmentator 2.18.0 test references, Apache-2.0).

Two real scans at 3 mm with TotalSegmentator's own label maps (``totalseg_example/README.md`` says where they come
from; ``totalseg_example/LICENSE`` is their licence). They are small (< 1 MB together) so that the demo, the
``example-data`` command, the docs' first examples and the tests run on real anatomy without any download; they are
too few to report accuracy on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["EXAMPLE_DIR", "ExampleScan", "EXAMPLE_SCANS", "example_scan"]

EXAMPLE_DIR = Path(__file__).resolve().parent / "totalseg_example"


@dataclass(frozen=True)
class ExampleScan:
    """One shipped scan.

    Attributes:
        modality: ``"ct"`` or ``"mr"``.
        image: NIfTI image (CT in Hounsfield units, MR in scanner units), int16.
        label: NIfTI label map on the image's grid, TotalSegmentator ids of ``task``.
        task: the key of ``class_map`` naming the label ids (``"total"``: 117 CT classes, ``"total_mr"``: 50).
        class_map: the TotalSegmentator ``class_map.json`` (``{task: {"id": name}}``).
    """

    modality: str
    image: Path
    label: Path
    task: str
    class_map: Path = EXAMPLE_DIR / "class_map.json"


EXAMPLE_SCANS: dict[str, ExampleScan] = {
    "ct": ExampleScan("ct", EXAMPLE_DIR / "example_ct_sm.nii.gz", EXAMPLE_DIR / "example_seg.nii.gz", "total"),
    "mr": ExampleScan("mr", EXAMPLE_DIR / "example_mr_sm.nii.gz", EXAMPLE_DIR / "example_seg_mr.nii.gz", "total_mr"),
}


def example_scan(modality: str = "ct") -> ExampleScan:
    """The shipped example scan of ``modality`` (``"ct"`` or ``"mr"``).

    Raises:
        ValueError: another modality was asked for.
    """
    key = modality.lower()
    if key not in EXAMPLE_SCANS:
        raise ValueError(f"example_scan: modality must be one of {sorted(EXAMPLE_SCANS)}, got {modality!r}.")
    return EXAMPLE_SCANS[key]
