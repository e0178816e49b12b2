"""argparse ``type=`` checks shared by the commands: a bad value stops at parsing with
``error: argument --x: <what was expected>`` (exit 2). Standard library only, so ``--help`` stays fast."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

__all__ = ["positive_int", "non_negative_int", "positive_float", "non_negative_float", "int_in_range",
           "existing_file", "existing_dir", "existing_path", "output_folder", "rank"]


def _number(kind: Callable[[str], float], value: str, what: str) -> float:
    try:
        return kind(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {value!r}") from None


def positive_int(value: str) -> int:
    n = int(_number(int, value, "a positive integer"))
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return n


def non_negative_int(value: str) -> int:
    n = int(_number(int, value, "an integer >= 0"))
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value!r}")
    return n


def positive_float(value: str) -> float:
    x = _number(float, value, "a positive number")
    if not x > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value!r}")
    return x


def non_negative_float(value: str) -> float:
    x = _number(float, value, "a number >= 0")
    if not x >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {value!r}")
    return x


def int_in_range(low: int, high: int) -> Callable[[str], int]:
    """An integer in ``low..high`` (inclusive)."""

    def check(value: str) -> int:
        n = int(_number(int, value, f"an integer in {low}..{high}"))
        if not low <= n <= high:
            raise argparse.ArgumentTypeError(f"expected an integer in {low}..{high}, got {value!r}")
        return n

    check.__name__ = f"integer in {low}..{high}"
    return check


def rank(value: str) -> int | str:
    """A LoRA rank: a positive integer or ``dynamic``."""
    if value == "dynamic":
        return value
    try:
        return positive_int(value)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'dynamic', got {value!r}") from None


def existing_file(value: str) -> Path:
    path = Path(value)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"no such file: {value}" if not path.exists() else f"not a file: {value}")
    return path


def existing_dir(value: str) -> Path:
    path = Path(value)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"no such folder: {value}" if not path.exists() else f"not a folder: {value}")
    return path


def existing_path(value: str) -> Path:
    """An existing file or folder."""
    path = Path(value)
    if not path.exists():
        raise argparse.ArgumentTypeError(f"no such file or folder: {value}")
    return path


def output_folder(value: str) -> Path:
    """A folder to write into (created when missing): anything but an existing file."""
    path = Path(value)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{value} exists and is not a folder")
    return path
