"""The one Dice (monai_peft.metrics): MONAI's compute_dice, NaN where the ground truth is empty."""

from __future__ import annotations

import math

import numpy as np
import torch

from monai_peft.interpret.gradcam import otsu_dice
from monai_peft.metrics import label_dice, mask_dice, nan_mean


def test_mask_dice_counts_overlap_and_skips_empty_truth():
    pred = np.zeros((4, 5, 3), bool)
    truth = np.zeros((4, 5, 3), bool)
    pred[:2] = True   # 30 voxels
    truth[1:3] = True  # 30 voxels, 15 shared
    assert mask_dice(pred, truth) == 2 * 15 / 60
    assert mask_dice(torch.as_tensor(pred), torch.as_tensor(pred)) == 1.0
    empty = np.zeros_like(truth)
    assert math.isnan(mask_dice(pred, empty)) and math.isnan(mask_dice(empty, empty))
    assert mask_dice(empty, truth) == 0.0


def test_label_dice_per_class_and_the_interpret_convention():
    pred = torch.tensor([[0, 1, 1, 2], [2, 2, 0, 0]])[:, None, :, None]  # (B=2, 1, 4, 1)
    label = torch.tensor([[0, 1, 2, 2], [0, 0, 0, 0]])[:, None, :, None]
    d = label_dice(pred, label, 3)
    assert d.shape == (2, 2)
    assert d[0, 0] == 2 * 1 / 3 and d[0, 1] == 2 * 1 / 3
    assert torch.isnan(d[1]).all(), "a class the ground truth lacks has no Dice, whatever the prediction"
    assert nan_mean([0.5, float("nan"), None, 1.0]) == 0.75 and math.isnan(nan_mean([float("nan")]))
    # Grad-CAM's Otsu Dice follows the same convention: a constant heatmap finds nothing
    assert otsu_dice(np.zeros((4, 4, 4)), np.ones((4, 4, 4), bool))[0] == 0.0
    assert math.isnan(otsu_dice(np.zeros((4, 4, 4)), np.zeros((4, 4, 4), bool))[0])
