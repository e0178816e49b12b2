"""Run by ``monai_peft_nnunet.pth`` at interpreter start: registers the trainer folder, never fails loudly.

The ``.pth`` line finds this file without importing the ``nnunet_plugin`` package (``find_spec`` of a top-level
package does not import it), and this file loads ``_registration.py`` (standard library only) the same way: a
Python start-up leaves no nnU-Net module in ``sys.modules``, so ``import monai_peft`` knows no nnU-Net.
Opt out with ``MONAI_PEFT_NO_NNUNET_HOOK=1``.
"""

import importlib.util
import os

if not os.environ.get("MONAI_PEFT_NO_NNUNET_HOOK"):
    try:
        _path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_registration.py")
        _spec = importlib.util.spec_from_file_location("_monai_peft_nnunet_registration", _path)
        _registration = importlib.util.module_from_spec(_spec)
        _spec.loader.exec_module(_registration)
        _registration.register_ext_trainer_folder()
    except Exception:  # a broken hook must never break an unrelated interpreter start
        pass
