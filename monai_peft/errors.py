"""What counts as a user's mistake, and the one line that reports it (house rule: ``error: <what, which file/key/
argument, what was expected>``).

The library raises ``ValueError`` / ``KeyError`` / ``TypeError`` / ``OSError`` (``FileNotFoundError`` ...) whose
message names the file, key or argument; the ``monai-peft`` console script and the bundles' input checks turn
those into :func:`error_line` instead of a traceback, unless ``MONAI_PEFT_DEBUG=1`` (or ``monai-peft --debug``)
asks for the traceback. Standard library only: the console script imports this before anything heavy.
"""

from __future__ import annotations

import os

__all__ = ["USER_ERRORS", "DEBUG_ENV", "error_line", "debug_enabled"]

# what bad input raises; anything else is a bug and keeps its traceback
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, KeyError, TypeError, OSError, ModuleNotFoundError)
DEBUG_ENV = "MONAI_PEFT_DEBUG"


def error_line(exc: BaseException) -> str:
    """``error: <message>`` on one line (whitespace runs, newlines included, become one space)."""
    if isinstance(exc, KeyError) and len(exc.args) == 1:
        message = str(exc.args[0])  # str(KeyError) adds quotes
    elif isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        message = f"{exc.strerror}: {exc.filename}"
    else:
        message = str(exc) or type(exc).__name__
    return "error: " + " ".join(message.split())


def debug_enabled() -> bool:
    """``MONAI_PEFT_DEBUG`` is set to something other than ``0``: show tracebacks instead of one line."""
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")
