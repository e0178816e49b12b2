"""``monai-peft``: every command's bad input gives one line ``error: ...`` and exit status 2 (a traceback only with
--debug), and --help imports nothing heavy (the time it takes is measured by benchmarks/cli_help.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from monai_peft.cli import SUBCOMMANDS, main

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "numpy", "monai", "peft", "transformers", "nibabel", "nnunetv2", "matplotlib", "scipy")


def test_help_of_every_command_imports_nothing_heavy():
    """As the console script (argv[0] == monai-peft): the package defers peft registration, commands defer torch."""
    code = f"""
import sys
sys.argv[0] = "monai-peft"
from monai_peft.cli import SUBCOMMANDS, main
heavy = {HEAVY!r}
found = {{}}
for name in [None, *SUBCOMMANDS]:
    try:
        main(["--help"] if name is None else [name, "--help"])
    except SystemExit as e:
        assert e.code == 0, (name, e.code)
    found[name or "monai-peft"] = sorted(m for m in heavy if m in sys.modules)
print(found)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    found = eval(proc.stdout.strip().splitlines()[-1])
    assert set(found) == {"monai-peft", *SUBCOMMANDS}
    assert all(not mods for mods in found.values()), found
    for name in SUBCOMMANDS:
        assert name in proc.stdout


def test_a_command_registers_the_peft_methods_before_it_runs():
    """In the console script the registration is deferred; it must still happen before a command runs."""
    code = """
import sys
sys.argv[0] = "monai-peft"
import monai_peft.cli
import peft
assert "CONV_ADAPTER" not in peft.utils.PeftType.__members__  # nothing registered for --help
code = monai_peft.cli.main(["report", "--network", "segresnet", "--method", "ssf", "--json"])
assert "CONV_ADAPTER" in peft.utils.PeftType.__members__ and code == 0
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout)["method"] == "ssf"


def _fail(capsys, argv: list[str]) -> str:
    """Run ``monai-peft argv`` in-process; it must return 2 and print exactly one line, ``error: ...``."""
    try:
        code = main(argv)
    except SystemExit as e:  # argparse errors exit from inside parse_args
        code = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, (argv, err)
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_errors")
    (root / "not_safetensors.adapter.safetensors").write_bytes(b"\x00" * 64 + b"not a safetensors file")
    (root / "base.pth").write_bytes(b"not a checkpoint")
    (root / "occupied").mkdir()
    (root / "occupied" / "keep.txt").write_text("mine")
    return root


def _cases(files: Path) -> dict[str, tuple[list[str], str]]:
    """One bad input per command: (argv, text the one line must hold)."""
    from monai_peft.data.example import EXAMPLE_DIR

    ct, seg, cmap = (str(EXAMPLE_DIR / n) for n in ("example_ct_sm.nii.gz", "example_seg.nii.gz", "class_map.json"))
    return {
        "example-data": (["example-data", str(files / "occupied")], "is not empty"),
        "report": (["report", "--method", "loar"], "unknown method 'loar'"),
        "nnunet-rebuild": (["nnunet-rebuild", "--base", str(files / "base.pth"), "--adapter",
                            str(files / "not_safetensors.adapter.safetensors"), "-o", str(files / "model")],
                           "not_safetensors.adapter.safetensors: not a safetensors file"),
        "totalseg-to-nnunet": (["totalseg-to-nnunet", str(files / "occupied"), "--dataset-id", "1000",
                                "--raw", str(files)], "argument --dataset-id: expected an integer in 1..999"),
        "gradcam": (["gradcam", "--image", ct, "--label", seg, "--class-map", cmap, "--classes", "livr", "spleen",
                     "--output-dir", str(files / "gc")], "'livr' (did you mean 'liver'?)"),
        "protoseg": (["protoseg", "--image", ct, "--output-dir", str(files / "ps"), "--init-filters", "8",
                      "--pixdim", "6", "6", "6", "--roi-size", "16", "16", "8"], "--label is required"),
        "pareto": (["pareto", str(files / "no_runs_here")], "argument inputs: no such file or folder"),
        "curves": (["curves", str(files / "occupied")], "no results.json under"),
        "sweep": (["sweep", "plan", "bundles/x", "--set", "max_epochs"], "--set expects NAME=VALUE"),
        "presets": (["presets", "--out-channels", "0"], "argument --out-channels: expected a positive integer"),
        "demo": (["demo", "--lr", "lora=fast", "--output-dir", str(files / "demo")], "'fast' is not a number"),
        "echo": (["echo", "train", "--backbone", str(files / "nope"), "--camus", str(files), "--task", "view",
                  "--out", str(files / "echo")], "argument --backbone: no such folder"),
    }


def test_every_command_has_a_bad_input_case(files):
    assert set(_cases(files)) == set(SUBCOMMANDS)


@pytest.mark.parametrize("command", list(SUBCOMMANDS))
def test_bad_input_is_one_error_line_and_exit_2(command, files, capsys):
    argv, expected = _cases(files)[command]
    line = _fail(capsys, argv)
    assert expected in line, line
    assert (files / "occupied" / "keep.txt").read_text() == "mine"  # example-data left the folder alone


def test_debug_shows_the_traceback_and_argparse_errors_are_one_line(capsys):
    with pytest.raises(ValueError, match="unknown method 'loar'"):
        main(["--debug", "report", "--method", "loar"])
    with pytest.raises(ValueError, match="unknown method 'loar'"):
        main(["report", "--method", "loar", "--debug"])
    assert "invalid choice: 'nosuch'" in _fail(capsys, ["nosuch"])
    assert "the following arguments are required: --image" in _fail(capsys, ["gradcam", "--output-dir", "x"])


def test_console_script_prints_one_line_without_traceback(tmp_path):
    """The installed launcher's way in (argv[0] == monai-peft), as a user's shell sees it."""
    code = "import sys; sys.argv[0] = 'monai-peft'; from monai_peft.cli import main; sys.exit(main())"
    proc = subprocess.run([sys.executable, "-c", code, "totalseg-to-nnunet", str(tmp_path), "--dataset-id", "501",
                           "--raw", str(tmp_path / "raw"), "--classes", "liver,livr"],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr
    assert not (tmp_path / "raw").exists()
