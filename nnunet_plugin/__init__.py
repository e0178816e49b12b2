"""nnU-Net v2 face of monai-peft: PEFT trainers, adapter export and a TotalSegmentator converter.

Importing this package is cheap (no torch, no nnU-Net): it runs at every interpreter start through the
``monai_peft_nnunet.pth`` hook to make the trainers visible to ``nnUNetv2_train -tr ...``. The trainers live in
:mod:`nnunet_plugin.trainers`; see ``docs/nnunet.md``.
"""

from __future__ import annotations

from nnunet_plugin._registration import (
    EXT_TRAINER_ENV,
    ext_trainer_folder,
    ext_trainer_value,
    register_ext_trainer_folder,
)

__all__ = ["EXT_TRAINER_ENV", "ext_trainer_folder", "ext_trainer_value", "register_ext_trainer_folder"]
