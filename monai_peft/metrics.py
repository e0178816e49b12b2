"""The one Dice of monai-peft: ``monai.metrics.compute_dice`` with one empty-mask convention.

Every Dice the library reports (validation and test handlers, echo metrics, Grad-CAM's Otsu Dice, ProtoSeg's
segmentation ability) is MONAI's ``compute_dice`` / ``DiceMetric`` with ``ignore_empty=True``
(:data:`IGNORE_EMPTY`): where the ground truth of a class is empty the Dice is NaN (there is nothing to find, so the
case says nothing about that class), whatever the prediction holds. Means over cases or classes skip NaN
(:func:`nan_mean`), so an absent organ neither scores 1 for an empty prediction nor 0 for a false positive.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import torch
from monai.metrics import compute_dice
from monai.networks.utils import one_hot

__all__ = ["IGNORE_EMPTY", "onehot_dice", "label_dice", "mask_dice", "nan_mean"]

# the empty-ground-truth convention of every Dice in monai-peft: NaN, skipped by means
IGNORE_EMPTY = True


def onehot_dice(pred: torch.Tensor, label: torch.Tensor, include_background: bool = False) -> torch.Tensor:
    """Dice per case and class of one-hot maps: ``(B, C)`` (``(B, C-1)`` without background), NaN for empty truth.

    Args:
        pred: one-hot (or binary per channel) prediction ``(B, C, *spatial)``.
        label: one-hot ground truth, same shape.
        include_background: score channel 0 as well. Default False.

    Raises:
        ValueError: ``pred`` and ``label`` differ in shape.
    """
    if pred.shape != label.shape:
        raise ValueError(f"pred shape {tuple(pred.shape)} differs from label shape {tuple(label.shape)}.")
    return compute_dice(pred.float(), label.float(), include_background=include_background, ignore_empty=IGNORE_EMPTY)


def label_dice(pred: torch.Tensor, label: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Dice of classes ``1..K-1`` per case from class-index maps: ``(B, K-1)``, NaN where ``label`` lacks the class.

    Args:
        pred: predicted class indices ``(B, 1, *spatial)``.
        label: ground-truth class indices, same shape.
        num_classes: ``K``, background included.

    Raises:
        ValueError: ``pred`` and ``label`` differ in shape or are not ``(B, 1, *spatial)``.
    """
    if pred.shape != label.shape:
        raise ValueError(f"pred shape {tuple(pred.shape)} differs from label shape {tuple(label.shape)}.")
    if pred.ndim < 3 or pred.shape[1] != 1:
        raise ValueError(f"class-index maps must have shape (B, 1, *spatial), got {tuple(pred.shape)}.")
    return onehot_dice(one_hot(pred.long(), num_classes), one_hot(label.long(), num_classes))


def mask_dice(pred: np.ndarray | torch.Tensor, truth: np.ndarray | torch.Tensor) -> float:
    """Dice of two binary masks of the same shape (any number of dimensions); NaN when ``truth`` is empty.

    Args:
        pred: predicted mask (bool or 0/1).
        truth: ground-truth mask, same shape.

    Raises:
        ValueError: the shapes differ.
    """
    p, t = (m.bool() if isinstance(m, torch.Tensor) else torch.as_tensor(np.asarray(m, dtype=bool)) for m in (pred, truth))
    if p.shape != t.shape:
        raise ValueError(f"pred mask shape {tuple(p.shape)} differs from truth mask shape {tuple(t.shape)}.")
    return float(onehot_dice(p[None, None], t[None, None], include_background=True)[0, 0])


def nan_mean(values: Iterable[float | None]) -> float:
    """Mean of the values that are numbers (NaN and None skipped); NaN when none is."""
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    return float(np.mean(vals)) if vals else float("nan")
