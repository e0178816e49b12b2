"""The thesis's MONAI transform chains (Table 4.3) with SuPreM's values as documented defaults.

Training: LoadImaged (+ channel first, the old ``AddChanneld``), Orientationd, CropForegroundd, Spacingd,
ScaleIntensityRanged, ResizeWithPadOrCropd, RandRotate90d, RandShiftIntensityd, ToTensord.
Validation / test: the same without the two random transforms. SuPreM's values: RAS, 1.5 mm isotropic,
HU window [-175, 250] -> [0, 1], 96^3 crops, RandRotate90 (p=0.1, up to 3 turns), RandShiftIntensity
(offset 0.1, p=0.2).

MR (thesis 4.2.5.3, Table 5.9) has no Hounsfield scale: the CT window would clip most of an MR body to 1.0.
``modality="mr"`` therefore maps the 0.5-99.5 intensity percentiles of each volume to ``[0, 1]``
(``ScaleIntensityRangePercentilesd``), the range the CT backbone saw in pretraining; on the shipped example MR
this clips under 1 % of the body voxels where the CT window clips most of them (``docs/suprem_and_data.md``).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

from monai import transforms as mt

__all__ = ["INTENSITY_FOR_MODALITY", "train_transforms", "val_transforms", "preprocess_transforms"]

KEYS = ("image", "label")
#: the intensity normalisation each modality gets by default: CT's HU window, MR's percentile scaling
INTENSITY_FOR_MODALITY: dict[str, str] = {"ct": "window", "mr": "percentile"}


def _above(x, threshold: float):
    return x > threshold


def preprocess_transforms(
    roi_size: Sequence[int] | None = (96, 96, 96),
    pixdim: Sequence[float] = (1.5, 1.5, 1.5),
    a_min: float = -175.0,
    a_max: float = 250.0,
    b_min: float = 0.0,
    b_max: float = 1.0,
    axcodes: str = "RAS",
    intensity: str | None = None,
    keys: Sequence[str] = KEYS,
    load: bool = True,
    modality: str = "ct",
) -> list:
    """The deterministic part shared by training and validation (thesis Table 4.3, in its order).

    Args:
        roi_size: output size after ``ResizeWithPadOrCropd`` (centre crop / pad); ``None`` keeps the whole
            resampled, foreground-cropped volume (for sliding-window inference).
        pixdim: target voxel spacing in mm (SuPreM: 1.5 mm isotropic).
        a_min, a_max: Hounsfield window mapped to ``[b_min, b_max]`` and clipped (SuPreM: -175, 250).
        b_min, b_max: output intensity range (0, 1).
        axcodes: target orientation (``"RAS"``).
        intensity: ``"window"`` (HU window, CT) or ``"percentile"`` (0.5-99.5 percentiles to
            ``[b_min, b_max]``, for MR where HU windows mean nothing); ``None`` (default) takes the modality's
            (:data:`INTENSITY_FOR_MODALITY`).
        keys: ``(image key, label key)``; a one-element tuple transforms images only.
        load: start with ``LoadImaged`` (set ``False`` when the dict already holds arrays/MetaTensors).
        modality: ``"ct"`` (default) or ``"mr"`` (see :func:`monai_peft.data.resolve_modality`).

    Raises:
        ValueError: an unknown ``intensity`` or ``modality``, or the CT window asked for on MR.

    Returns:
        A list of MONAI dictionary transforms.
    """
    if modality not in INTENSITY_FOR_MODALITY:
        raise ValueError(f"modality must be one of {sorted(INTENSITY_FOR_MODALITY)}, got {modality!r}.")
    if intensity is None:
        intensity = INTENSITY_FOR_MODALITY[modality]
    if intensity not in ("window", "percentile"):
        raise ValueError(f"intensity must be 'window' or 'percentile', got {intensity!r}.")
    if modality == "mr" and intensity == "window":
        raise ValueError("intensity='window' is the CT Hounsfield window; MR images need intensity='percentile'.")
    if a_max <= a_min:
        raise ValueError(f"a_max ({a_max}) must be greater than a_min ({a_min}).")
    keys = list(keys)
    image_key = keys[0]
    modes = ["bilinear"] + ["nearest"] * (len(keys) - 1)
    chain: list = []
    if load:
        chain.append(mt.LoadImaged(keys=keys, ensure_channel_first=True, image_only=True))
    else:
        chain.append(mt.EnsureChannelFirstd(keys=keys))
    # CT background (air) is below the window; MR background is ~0
    threshold = a_min if intensity == "window" else 0.0
    chain += [
        mt.Orientationd(keys=keys, axcodes=axcodes, labels=(("L", "R"), ("P", "A"), ("I", "S"))),
        mt.CropForegroundd(keys=keys, source_key=image_key, select_fn=partial(_above, threshold=threshold), allow_smaller=True),
        mt.Spacingd(keys=keys, pixdim=tuple(pixdim), mode=modes),
    ]
    if intensity == "window":
        chain.append(mt.ScaleIntensityRanged(keys=[image_key], a_min=a_min, a_max=a_max, b_min=b_min, b_max=b_max, clip=True))
    else:
        chain.append(mt.ScaleIntensityRangePercentilesd(keys=[image_key], lower=0.5, upper=99.5, b_min=b_min, b_max=b_max, clip=True))
    if roi_size is not None:
        chain.append(mt.ResizeWithPadOrCropd(keys=keys, spatial_size=tuple(roi_size)))
    return chain


def train_transforms(
    roi_size: Sequence[int] = (96, 96, 96),
    pixdim: Sequence[float] = (1.5, 1.5, 1.5),
    a_min: float = -175.0,
    a_max: float = 250.0,
    b_min: float = 0.0,
    b_max: float = 1.0,
    axcodes: str = "RAS",
    intensity: str | None = None,
    rotate90_prob: float = 0.10,
    shift_offsets: float = 0.10,
    shift_prob: float = 0.20,
    keys: Sequence[str] = KEYS,
    load: bool = True,
    modality: str = "ct",
) -> mt.Compose:
    """Training chain of thesis Table 4.3 (SuPreM's values).

    Args:
        roi_size: patch size ``(H, W, D)`` after ``ResizeWithPadOrCropd`` (96^3).
        pixdim, a_min, a_max, b_min, b_max, axcodes, intensity, keys, load, modality: see
            :func:`preprocess_transforms`.
        rotate90_prob: ``RandRotate90d`` probability (0.1, ``max_k=3``).
        shift_offsets: ``RandShiftIntensityd`` offset range (0.1, of the ``[0, 1]`` scaled intensities).
        shift_prob: ``RandShiftIntensityd`` probability (0.2).

    Returns:
        ``Compose`` mapping ``{"image": path, "label": path}`` to ``image`` ``(1, *roi_size)`` float tensor and
        ``label`` ``(1, *roi_size)`` tensor of class ids.
    """
    keys = list(keys)
    chain = preprocess_transforms(roi_size, pixdim, a_min, a_max, b_min, b_max, axcodes, intensity, keys, load, modality)
    chain += [
        mt.RandRotate90d(keys=keys, prob=rotate90_prob, max_k=3),
        mt.RandShiftIntensityd(keys=[keys[0]], offsets=shift_offsets, prob=shift_prob),
        mt.ToTensord(keys=keys),
    ]
    return mt.Compose(chain)


def val_transforms(
    roi_size: Sequence[int] | None = (96, 96, 96),
    pixdim: Sequence[float] = (1.5, 1.5, 1.5),
    a_min: float = -175.0,
    a_max: float = 250.0,
    b_min: float = 0.0,
    b_max: float = 1.0,
    axcodes: str = "RAS",
    intensity: str | None = None,
    keys: Sequence[str] = KEYS,
    load: bool = True,
    modality: str = "ct",
) -> mt.Compose:
    """Validation / test chain of thesis Table 4.3: :func:`preprocess_transforms` then ``ToTensord``.

    Args:
        roi_size: ``(H, W, D)`` after ``ResizeWithPadOrCropd`` (96^3); ``None`` keeps the whole volume.
        pixdim, a_min, a_max, b_min, b_max, axcodes, intensity, keys, load, modality: see
            :func:`preprocess_transforms`.

    Returns:
        ``Compose`` producing ``image`` ``(1, H, W, D)`` and ``label`` ``(1, H, W, D)``.
    """
    keys = list(keys)
    chain = preprocess_transforms(roi_size, pixdim, a_min, a_max, b_min, b_max, axcodes, intensity, keys, load, modality)
    chain.append(mt.ToTensord(keys=keys))
    return mt.Compose(chain)
