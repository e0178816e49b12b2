"""Run by ``monai_peft_nnunet.pth`` at interpreter start: registers the trainer folder, never fails loudly.

Opt out with ``MONAI_PEFT_NO_NNUNET_HOOK=1``.
"""

import os

if not os.environ.get("MONAI_PEFT_NO_NNUNET_HOOK"):
    try:
        from nnunet_plugin._registration import register_ext_trainer_folder

        register_ext_trainer_folder()
    except Exception:  # a broken hook must never break an unrelated interpreter start
        pass
