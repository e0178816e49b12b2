"""The thesis's published results (seed 001, Tables 5.1-5.10): the column shown beside a user's own runs.

One place for these numbers; :mod:`monai_peft.analysis.tables` lays the user's run records out next to them.
Trainable-parameter figures of the placements live with the presets (``Preset.thesis_params_m``).
"""

from __future__ import annotations

__all__ = ["VALIDATION_TABLES", "TEST_DICE", "DATA_SIZE_DICE", "OOD_DICE", "COSTS", "GRADCAM_OTSU_DICE",
           "GRADCAM_LAYER_ROLES"]

#: Tables 5.1-5.4: validation Mean Dice after 20 hours of training, per preset (in the thesis's column order)
VALIDATION_TABLES: dict[str, dict[str, float]] = {
    "5.1": {  # UNet, LoRA
        "unet3d-full-finetune": 0.87, "unet3d-decoder-finetune": 0.75, "unet3d-lora-encdec-r8": 0.54,
        "unet3d-lora-encdec-r16": 0.62, "unet3d-lora-encdec-r16-pca": 0.63, "unet3d-lora-encdec-r64": 0.81,
        "unet3d-lora-encdec-rdynamic": 0.75, "unet3d-lora-encoder+full-decoder-r16": 0.85,
        "unet3d-lora-decoder+full-encoder-r16": 0.85,
    },
    "5.2": {  # SegResNet, LoRA
        "segresnet-full-finetune": 0.85, "segresnet-decoder-finetune": 0.64,
        "segresnet-lora-encoder+full-decoder-r16": 0.85, "segresnet-lora-encoder+full-decoder-r32": 0.79,
        "segresnet-lora-encoder+full-decoder-rdynamic": 0.82,
    },
    "5.3": {  # SegResNet, ConvAdapter
        "segresnet-full-finetune": 0.85, "segresnet-convadapter-convinit+resblock-parallel": 0.77,
        "segresnet-convadapter-resblock-parallel": 0.82, "segresnet-convadapter-resblock-conv2": 0.72,
        "segresnet-convadapter-encoder+full-decoder": 0.70, "segresnet-convadapter-encoder-only": 0.50,
    },
    "5.4": {  # UNet, ConvAdapter
        "unet3d-full-finetune": 0.86, "unet3d-convadapter-luconv-parallel": 0.65,
        "unet3d-convadapter-encoder+full-decoder": 0.80,
    },
}  # fmt: skip

#: Table 5.5: test Mean Dice of the best placement per (backbone, method)
TEST_DICE: dict[tuple[str, str], float] = {
    ("unet", "full"): 0.90, ("unet", "lora"): 0.68, ("unet", "convadapter"): 0.83,
    ("segresnet", "full"): 0.89, ("segresnet", "lora"): 0.60, ("segresnet", "convadapter"): 0.84,
}  # fmt: skip

#: Table 5.6: SegResNet test Mean Dice by share of the training data
DATA_SIZE_DICE: dict[tuple[float, str], float] = {
    (1.0, "full"): 0.89, (1.0, "convadapter"): 0.84, (0.5, "full"): 0.87, (0.5, "convadapter"): 0.84,
    (0.1, "full"): 0.79, (0.1, "convadapter"): 0.73,
}  # fmt: skip

#: Tables 5.8 (vertebrae, CT) and 5.9 (organs, MR): SegResNet test Mean Dice
OOD_DICE: dict[tuple[str, str], float] = {
    ("vertebrae", "full"): 0.79, ("vertebrae", "convadapter"): 0.73,
    ("mr_organs", "full"): 0.54, ("mr_organs", "convadapter"): 0.59,
}  # fmt: skip

#: Table 5.7: SegResNet costs on the full dataset (GPU); keys as in the run record's ``costs`` section
COSTS: dict[str, dict[str, float]] = {
    "full": {"train_s_per_volume": 2.10, "inference_s_per_volume": 0.12, "train_peak_memory_gb": 11.01},
    "convadapter": {"train_s_per_volume": 2.11, "inference_s_per_volume": 0.14, "train_peak_memory_gb": 11.75},
}

#: Table 5.10: mean Dice of Otsu-thresholded Grad-CAM maps with the ground truth, SegResNet + ConvAdapter
GRADCAM_OTSU_DICE: dict[str, dict[str, float]] = {
    "lung_lower_lobe_right": {"final": 0.86, "backbone": 0.01, "adapter": 0.43},
    "lung_middle_lobe_right": {"final": 0.83, "backbone": 0.16, "adapter": 0.32},
    "lung_lower_lobe_left": {"final": 0.84, "backbone": 0.45, "adapter": 0.05},
    "lung_upper_lobe_left": {"final": 0.86, "backbone": 0.30, "adapter": 0.20},
    "aorta": {"final": 0.83, "backbone": 0.01, "adapter": 0.04},
}

#: the three layers of Table 5.10, by role
GRADCAM_LAYER_ROLES: dict[str, str] = {
    "final": "final convolutional layer",
    "backbone": "last conv in last ResBlock",
    "adapter": "last conv in ConvAdapter",
}
