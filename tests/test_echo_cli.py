"""``monai-peft echo`` sub-commands that need no training: phantoms and the CAMUS self-check."""

from __future__ import annotations

import json

from monai_peft.cli import main


def test_echo_cli_phantom_and_quality(tmp_path, capsys):
    assert main(["echo", "phantom", "--layout", "camus2019", "--out", str(tmp_path / "c"), "--num", "2",
                 "--size", "64"]) == 0
    assert json.loads(capsys.readouterr().out)["items"] == 2
    assert (tmp_path / "c" / "testing" / "patient0002" / "Info_4CH.cfg").is_file()
    assert main(["echo", "quality", "--camus", str(tmp_path / "c"), "--out", str(tmp_path / "q.json")]) == 0
    printed = json.loads(capsys.readouterr().out)
    saved = json.loads((tmp_path / "q.json").read_text())
    assert printed["summary"] == saved["summary"] and printed["summary"]["num_patients"] == 2
    assert saved["patients"][0]["EF_simpson"] > 0 and "EF_simpson" not in saved["patients"][1]  # no test gt
    assert main(["echo", "phantom", "--layout", "echonet", "--out", str(tmp_path / "e"), "--num", "2",
                 "--size", "32"]) == 0
    assert (tmp_path / "e" / "FileList.csv").read_text().count("\n") == 3
