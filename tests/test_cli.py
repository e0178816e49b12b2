"""The console script: every registered command loads and answers --help; report prints real counts."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from monai_peft.cli import SUBCOMMANDS, build_parser, main


def test_every_command_has_help(capsys):
    parser = build_parser()
    for name in SUBCOMMANDS:
        with pytest.raises(SystemExit) as exit_info:
            parser.parse_args([name, "--help"])
        assert exit_info.value.code == 0
        assert name in capsys.readouterr().out


def test_report_json_matches_the_library(capsys):
    assert main(["report", "--network", "segresnet", "--method", "lora", "--r", "dynamic",
                 "--train-fully", "decoder", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["method"] == "lora" and data["total"] > 4_600_000
    assert 0 < data["trainable"] < data["total"] and data["by_kind"]["lora"] > 0


def test_console_script_entry_point_runs():
    proc = subprocess.run([sys.executable, "-m", "monai_peft.cli", "--help"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "report" in proc.stdout
