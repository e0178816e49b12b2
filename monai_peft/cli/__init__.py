"""The ``monai-peft`` console script.

Each sub-command lives in its own module of this package and exposes two functions::

    def add_arguments(parser: argparse.ArgumentParser) -> None: ...
    def run(args: argparse.Namespace) -> int: ...

and a module docstring whose first line becomes the command's help text. Modules are imported
lazily, so ``monai-peft --help`` stays fast and one broken optional dependency does not take the
whole tool down.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# command name -> module under monai_peft.cli; one place lists every command.
SUBCOMMANDS: dict[str, str] = {
    "report": "monai_peft.cli.report",
    "nnunet-rebuild": "monai_peft.cli.nnunet_rebuild",
    "totalseg-to-nnunet": "monai_peft.cli.totalseg_to_nnunet",
    "gradcam": "monai_peft.cli.gradcam",
    "protoseg": "monai_peft.cli.protoseg",
    "pareto": "monai_peft.cli.pareto",
    "curves": "monai_peft.cli.curves",
    "sweep": "monai_peft.cli.sweep",
    "presets": "monai_peft.cli.presets",
    "demo": "monai_peft.cli.demo",
    "echo": "monai_peft.cli.echo",
}


def _load(name: str):
    return importlib.import_module(SUBCOMMANDS[name])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="monai-peft", description="Parameter-efficient fine-tuning for MONAI and nnU-Net CNNs."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        module = _load(name)
        summary = (module.__doc__ or name).strip().splitlines()[0].replace("%", "%%")
        p = sub.add_parser(name, help=summary, description=module.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "_module", None) is None:
        parser.print_help()
        return 2
    return int(args._module.run(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
