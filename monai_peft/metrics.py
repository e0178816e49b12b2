"""The one Dice of monai-peft: ``monai.metrics.compute_dice`` with one empty-mask convention.

Every Dice the library reports (evaluation handlers, echo metrics, Grad-CAM's Otsu Dice, ProtoSeg's segmentation
ability) is MONAI's ``compute_dice`` with ``ignore_empty=True``: where the ground truth of a class is empty the
Dice is NaN (there is nothing to find, so the case says nothing about that class), whatever the prediction holds.
Means over cases or classes skip NaN (:func:`nan_mean`), so an absent organ neither scores 1 for an empty prediction
nor 0 for a false positive.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import torch
from monai.metrics import compute_dice
from monai.networks.utils import one_hot

__all__ = ["label_dice", "mask_dice", "nan_mean"]


def label_dice(pred: torch.Tensor, label: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Dice of classes ``1..K-1`` per case from class-index maps: ``(B, K-1)``, NaN where ``label`` lacks the class.

    Args:
        pred: predicted class indices ``(B, 1, *spatial)``.
        label: ground-truth class indices, same shape.
        num_classes: ``K``, background included.

    Raises:
        ValueError: ``pred`` and ``label`` differ in shape.
    """
    if pred.shape != label.shape:
        raise ValueError(f"pred shape {tuple(pred.shape)} differs from label shape {tuple(label.shape)}.")
    if pred.ndim < 3 or pred.shape[1] != 1:
        raise ValueError(f"class-index maps must have shape (B, 1, *spatial), got {tuple(pred.shape)}.")
    return compute_dice(one_hot(pred.long(), num_classes), one_hot(label.long(), num_classes), include_background=False,
                        ignore_empty=True)


def mask_dice(pred: np.ndarray | torch.Tensor, truth: np.ndarray | torch.Tensor) -> float:
    """Dice of two binary masks of the same shape (any number of dimensions); NaN when ``truth`` is empty.

    Args:
        pred: predicted mask (bool or 0/1).
        truth: ground-truth mask, same shape.

    Raises:
        ValueError: the shapes differ.
    """
    p, t = (torch.as_tensor(np.asarray(m) if not isinstance(m, torch.Tensor) else m).bool() for m in (pred, truth))
    if p.shape != t.shape:
        raise ValueError(f"pred mask shape {tuple(p.shape)} differs from truth mask shape {tuple(t.shape)}.")
    return float(compute_dice(p[None, None], t[None, None], include_background=True, ignore_empty=True)[0, 0])


def nan_mean(values: Iterable[float | None]) -> float:
    """Mean of the values that are numbers (NaN and None skipped); NaN when none is."""
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    return float(np.mean(vals)) if vals else float("nan")
