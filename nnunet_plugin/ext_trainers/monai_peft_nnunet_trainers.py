"""Re-exports every trainer of :mod:`nnunet_plugin.trainers` for nnU-Net's ``nnUNet_extTrainer`` lookup.

nnU-Net imports this file by its bare module name (the folder is put on ``sys.path`` for the search), so the
name is unique on purpose; the classes themselves live in the installed ``nnunet_plugin`` package.
"""

from nnunet_plugin.trainers import *  # noqa: F401,F403
from nnunet_plugin.trainers import __all__  # noqa: F401
