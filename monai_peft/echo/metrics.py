"""Echo metrics from library implementations: MAE, RMSE, R^2 (regression), Dice (segmentation), accuracy.

MAE and MSE come from ``monai.metrics``; RMSE is the square root of the mean squared error over all cases
(MONAI's ``RMSEMetric`` averages per-case RMSEs, which for one value per case is the MAE). R^2 is ignite's
``R2Score`` (the echo seed reports it for volume and age, Figures 4-5; EchoAI for EF, seed 002 "Key Results").
Dice is ``monai.metrics.compute_dice`` per case and class, NaN where the class is absent from the ground truth.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from monai.metrics import MAEMetric, MSEMetric, compute_dice
from monai.networks.utils import one_hot
from monai.utils import optional_import

R2Score, _ = optional_import("ignite.metrics.regression", name="R2Score")

__all__ = ["regression_metrics", "dice_per_case", "summarise"]


def regression_metrics(pred: torch.Tensor | Sequence[float], target: torch.Tensor | Sequence[float]) -> dict:
    """MAE, RMSE and R^2 of predictions against targets, in the targets' units.

    Args:
        pred: ``(N,)`` or ``(N, K)`` predictions.
        target: same shape.

    Returns:
        ``{"mae", "rmse", "r2", "n"}``; ``r2`` is None with fewer than two cases or constant targets.
    """
    if len(pred) != len(target):
        raise ValueError(f"regression_metrics: {len(pred)} predictions for {len(target)} targets.")
    if len(pred) == 0:
        return {"mae": None, "rmse": None, "r2": None, "n": 0}
    p = torch.as_tensor(np.asarray(pred, dtype=np.float64)).reshape(len(pred), -1)
    t = torch.as_tensor(np.asarray(target, dtype=np.float64)).reshape(len(target), -1)
    if p.shape != t.shape:
        raise ValueError(f"regression_metrics: pred {tuple(p.shape)} and target {tuple(t.shape)} differ in shape.")
    mae, mse = MAEMetric(), MSEMetric()
    mae(p, t)
    mse(p, t)
    r2 = None
    if len(p) >= 2 and float(t.var()) > 0:
        score = R2Score()
        score.update((p.flatten(), t.flatten()))
        r2 = float(score.compute())
    return {"mae": float(mae.aggregate()), "rmse": math.sqrt(float(mse.aggregate())), "r2": r2, "n": int(len(p))}


def dice_per_case(pred: torch.Tensor, label: torch.Tensor, num_classes: int) -> np.ndarray:
    """Dice of classes ``1..K-1`` per case: ``(B, K-1)``, NaN where the class is absent from ``label``.

    Args:
        pred: class maps ``(B, H, W)`` or ``(B, 1, H, W)``.
        label: class maps, same shape.
        num_classes: ``K`` (background included).
    """
    p = pred if pred.ndim == 4 else pred[:, None]
    g = label if label.ndim == 4 else label[:, None]
    d = compute_dice(one_hot(p.long(), num_classes), one_hot(g.long(), num_classes), include_background=False,
                     ignore_empty=True)
    return d.cpu().double().numpy()


def summarise(kind: str, scores: dict, class_names: Sequence[str] = ()) -> dict:
    """One summary row of a task from per-case values.

    Args:
        kind: ``"segmentation"`` (``scores["dice"]`` ``(N, K-1)``), ``"classification"`` (``scores["correct"]``
            ``(N,)``) or ``"regression"`` (``scores["pred"]``, ``scores["target"]`` ``(N, K)`` in units).
        scores: per-case values as above.
        class_names: class names with background first (segmentation).

    Returns:
        ``{"dice_<class>", "mean_dice", "n"}``, ``{"accuracy", "n"}`` or ``{"mae", "rmse", "r2", "n"}``.
    """
    if kind == "regression":
        return regression_metrics(scores["pred"], scores["target"])
    if kind == "classification":
        c = np.asarray(scores["correct"], dtype=float)
        return {"accuracy": float(c.mean()) if len(c) else None, "n": int(len(c))}
    if kind == "segmentation":
        d = np.asarray(scores["dice"], dtype=float)
        if len(d) == 0:
            return {"mean_dice": None, "n": 0}
        with np.errstate(all="ignore"):
            per = np.nanmean(d, axis=0)
        names = list(class_names[1:]) or [str(i) for i in range(1, d.shape[1] + 1)]
        out = {f"dice_{n.replace(' ', '_')}": float(v) for n, v in zip(names, per)}
        out["mean_dice"] = float(np.nanmean(per))
        out["n"] = int(len(d))
        return out
    raise ValueError(f"kind: expected 'segmentation', 'classification' or 'regression', got {kind!r}.")
