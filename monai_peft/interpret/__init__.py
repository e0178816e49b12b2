"""Interpretability for segmentation networks and their adapters: 3D Grad-CAM (thesis 2.6.1, 5.2.4.1)
and ProtoSeg segmentation ability (thesis 2.6.2, 5.2.4.2), as functions and MONAI/ignite handlers."""

from __future__ import annotations

from monai_peft.interpret.gradcam import GradCAMHandler, GradCAMResult, gradcam_3d, otsu_dice, run_gradcam
from monai_peft.interpret.protoseg import (
    LayerSA,
    ProtoSegHandler,
    plot_segmentation_ability,
    protoseg,
    run_protoseg,
    sa_table,
    segmentation_ability_map,
)

__all__ = [
    "GradCAMHandler",
    "GradCAMResult",
    "LayerSA",
    "ProtoSegHandler",
    "gradcam_3d",
    "otsu_dice",
    "plot_segmentation_ability",
    "protoseg",
    "run_gradcam",
    "run_protoseg",
    "sa_table",
    "segmentation_ability_map",
]
