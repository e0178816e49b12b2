"""``python -m nnunet_plugin``: print the folder to put in ``nnUNet_extTrainer``.

``python -m nnunet_plugin --export`` prints a shell line that appends it to the current value instead.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

from nnunet_plugin._registration import EXT_TRAINER_ENV, ext_trainer_folder, ext_trainer_value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nnunet_plugin", description=__doc__.splitlines()[0])
    parser.add_argument("--export", action="store_true",
                        help=f"print `export {EXT_TRAINER_ENV}=...` keeping the folders already set")
    args = parser.parse_args(argv)
    if args.export:
        # the hook may have added our folder already; ext_trainer_value does not add it twice
        print(f"export {EXT_TRAINER_ENV}={shlex.quote(ext_trainer_value(os.environ.get(EXT_TRAINER_ENV)))}")
    else:
        print(ext_trainer_folder())
    return 0


if __name__ == "__main__":
    sys.exit(main())
