"""The ``monai-peft`` console script.

Each sub-command lives in its own module of this package and exposes two functions::

    def add_arguments(parser: argparse.ArgumentParser) -> None: ...
    def run(args: argparse.Namespace) -> int: ...

and a module docstring whose first line becomes the command's help text. A module is imported only when its
command runs or its ``--help`` is asked for (the command list reads the docstrings from the source files), and
add_arguments imports nothing heavy, so every ``--help`` answers without torch.

Bad input gets one line: the library raises ``ValueError`` / ``KeyError`` / ``TypeError`` / ``OSError``
(``FileNotFoundError`` ...) naming the file, key or argument (:mod:`monai_peft.errors`); :func:`main` prints
``error: <message>`` on stderr and returns 2, as for argparse's own errors. ``--debug`` (or ``MONAI_PEFT_DEBUG=1``)
shows the traceback instead.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import sys
from collections.abc import Iterable, Sequence
from typing import NoReturn

from monai_peft.errors import DEBUG_ENV, USER_ERRORS, debug_enabled, error_line

__all__ = ["SUBCOMMANDS", "build_parser", "main"]

# command name -> module under monai_peft.cli; one place lists every command.
SUBCOMMANDS: dict[str, str] = {
    "example-data": "monai_peft.cli.example_data",
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

class _Parser(argparse.ArgumentParser):
    """argparse with the one-line error format of every monai-peft error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def _summary(module: str) -> str:
    """First docstring line of a command module, read from its source without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.origin:
        return ""
    with open(spec.origin, encoding="utf-8") as f:
        doc = ast.get_docstring(ast.parse(f.read())) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def build_parser(commands: Iterable[str] | None = None) -> argparse.ArgumentParser:
    """The ``monai-peft`` parser: every command listed, the arguments of ``commands`` (default: all) filled in.

    Args:
        commands: commands whose modules are imported to add their arguments; the others are listed with the
            first line of their docstring only. ``None`` fills in every command.
    """
    full = set(SUBCOMMANDS) if commands is None else set(commands)
    parser = _Parser(prog="monai-peft", description="Parameter-efficient fine-tuning for MONAI and nnU-Net CNNs.")
    _add_debug(parser, default=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name in SUBCOMMANDS.items():
        if name not in full:
            sub.add_parser(name, help=_summary(module_name).replace("%", "%%"), add_help=False)
            continue
        module = importlib.import_module(module_name)
        doc = module.__doc__ or name
        p = sub.add_parser(name, help=doc.strip().splitlines()[0].replace("%", "%%"), description=doc,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        _add_debug(p, default=argparse.SUPPRESS)  # SUPPRESS: a top-level --debug is not reset by the command
        module.add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def _add_debug(parser: argparse.ArgumentParser, default: object) -> None:
    parser.add_argument("--debug", action="store_true", default=default,
                        help=f"show the full traceback of an error (also {DEBUG_ENV}=1)")


def _command_of(argv: Sequence[str]) -> str | None:
    """The command named in ``argv``: its first argument that is not an option (top-level options take no value)."""
    for arg in argv:
        if not arg.startswith("-"):
            return arg if arg in SUBCOMMANDS else None
    return None


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = _command_of(argv)
    parser = build_parser([command] if command else [])
    args = parser.parse_args(argv)
    if getattr(args, "_module", None) is None:
        parser.print_help()
        return 2
    debug = bool(args.debug) or debug_enabled()
    try:
        import monai_peft

        monai_peft._load_api()  # what `import monai_peft` does outside the console script (peft registration)
        return int(args._module.run(args) or 0)
    except USER_ERRORS as e:
        if debug:
            raise
        print(error_line(e), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if debug:
            raise
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
