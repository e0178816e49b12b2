"""``python -m monai_peft.cli``: the same as the ``monai-peft`` console script."""

import sys

from monai_peft.cli import main

sys.exit(main())
