"""Every ```bash block of the documentation runs as written.

Files: README.md, docs/*.md, bundles/*/docs/README.md and benchmarks/README.md. The blocks of one file run in
order in one bash session (``set -euo pipefail``; variables and ``cd`` carry over, as in a user's terminal) in a
temporary working folder, with the current environment. The working folder holds a copy of the repository's
``bundles/`` (as a checkout does); a bundle's README runs in that copy of its bundle folder ("from this folder").

Conventions for writers of documentation:

- ``<!-- not-tested: <reason> -->`` on the line before a fence skips that block; the reason is required (a GPU,
  data or weights only the user has, hours of training, ...).
- ``<!-- slow -->`` before a fence marks the file's test ``slow`` (it trains, or runs nnU-Net / a bundle); later
  blocks may use what it wrote.
- Blocks that train use tiny settings and the shipped example data (``monai-peft example-data DIR``).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[\w+-]*)[ \t]*$")
NOT_TESTED = re.compile(r"^\s*<!--\s*not-tested:(?P<reason>.*?)-->\s*$")
SLOW = re.compile(r"^\s*<!--\s*slow\s*-->\s*$")
FILE_TIMEOUT_S = 1500  # nnU-Net's quick start on a busy 2-core machine


@dataclass
class Block:
    file: Path
    line: int  # 1-based line of the opening fence
    code: str
    skip_reason: str | None
    slow: bool


def doc_files() -> list[Path]:
    files = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")),
             *sorted((REPO / "bundles").glob("*/docs/README.md")), REPO / "benchmarks" / "README.md"]
    return [f for f in files if f.is_file()]


def bash_blocks(path: Path) -> list[Block]:
    """The ```bash blocks of a Markdown file with the markers on the lines right before each fence."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m or m["lang"] == "":
            i += 1
            continue
        start, indent, lang = i, m["indent"], m["lang"]
        i += 1
        body = []
        while i < len(lines) and lines[i].strip() != "```":
            body.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i].lstrip())
            i += 1
        i += 1
        if lang not in ("bash", "sh", "shell"):
            continue
        skip, slow, k = None, False, start - 1
        while k >= 0 and lines[k].strip().startswith("<!--"):
            if (n := NOT_TESTED.match(lines[k])) is not None:
                skip = n["reason"].strip()
                if not skip:
                    raise AssertionError(f"{path}:{k + 1}: <!-- not-tested: --> needs a reason")
            elif SLOW.match(lines[k]):
                slow = True
            k -= 1
        blocks.append(Block(path, start + 1, "\n".join(body), skip, slow))
    return blocks


def _param(path: Path):
    slow = any(b.slow and b.skip_reason is None for b in bash_blocks(path))
    return pytest.param(path, id=str(path.relative_to(REPO)), marks=[pytest.mark.slow] if slow else [])


def _script(blocks: list[Block]) -> str:
    parts = ["set -euo pipefail"]
    for b in blocks:
        where = f"{b.file.relative_to(REPO)}:{b.line}"
        parts.append(f"echo '>>> block {where}' >&2")
        parts.append(b.code)
    return "\n".join(parts) + "\n"


def _working_folder(path: Path, tmp: Path) -> Path:
    shutil.copytree(REPO / "bundles", tmp / "bundles", ignore=shutil.ignore_patterns("runs", "models", "__pycache__"))
    if path.parent.name == "docs" and path.parent.parent.parent == REPO / "bundles":
        return tmp / "bundles" / path.parent.parent.name
    return tmp


def test_markers_are_well_formed():
    for path in doc_files():
        text = path.read_text(encoding="utf-8")
        for n, line in enumerate(text.splitlines(), start=1):
            if "not-tested" in line:
                m = NOT_TESTED.match(line)
                assert m is not None and m["reason"].strip(), f"{path}:{n}: write <!-- not-tested: <reason> -->"
        bash_blocks(path)  # raises on a marker without reason


@pytest.mark.timeout(FILE_TIMEOUT_S + 60)
@pytest.mark.parametrize("path", [_param(p) for p in doc_files() if bash_blocks(p)])
def test_bash_blocks_run_as_written(path, tmp_path):
    blocks = [b for b in bash_blocks(path) if b.skip_reason is None]
    if not blocks:
        pytest.skip(f"{path.name}: every bash block is marked not-tested")
    cwd = _working_folder(path, tmp_path)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.pop("PYTEST_XDIST_WORKER", None)
    proc = subprocess.run(["bash", "-c", _script(blocks)], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=FILE_TIMEOUT_S)
    if proc.returncode != 0:
        started = re.findall(r">>> block (\S+)", proc.stderr)
        pytest.fail(f"{path.relative_to(REPO)}: block {started[-1] if started else '?'} failed "
                    f"(exit {proc.returncode}):\n--- stdout ---\n{proc.stdout[-3000:]}\n--- stderr ---\n"
                    f"{proc.stderr[-6000:]}")
