"""``monai-peft demo``: the main job behind README's first command, at a tiny size."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from monai_peft.cli import main
from monai_peft.workflows.demo import DEMO_METHODS, format_table


@pytest.mark.slow
def test_demo_compares_four_methods(tmp_path, capsys):
    out = tmp_path / "demo"
    rc = main(["demo", "--output-dir", str(out), "--epochs", "1", "--pretrain-epochs", "1", "--size", "16",
               "--train-cases", "2", "--test-cases", "1", "--pretrain-cases", "2", "--no-progress", "--device", "cpu"])
    assert rc == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "comparison.json").read_text())
    rows = {r["method"]: r for r in result["rows"]}
    assert list(rows) == list(DEMO_METHODS) == ["full", "convadapter", "lora", "ssf"]
    # the printed table is the one in comparison.json
    assert format_table(result["rows"]) in printed
    full = rows["full"]
    assert full["trainable"] == full["total"] and full["trainable_percent"] == pytest.approx(100.0)
    for run in ("full", "pretrain"):  # nothing frozen: no fingerprint of "a frozen backbone" (of zero bytes)
        assert json.loads((out / run / "results.json").read_text())["frozen_backbone"] is None, run
    for method in ("convadapter", "lora", "ssf"):
        row = rows[method]
        assert 0 < row["trainable"] < full["trainable"], method
        assert row["total"] == full["total"]  # the same backbone under every method
        record = json.loads((out / method / "results.json").read_text())
        assert record["frozen_backbone"]["unchanged"] is True, method
        assert (out / method / "adapter" / "last" / "adapter_model.safetensors").is_file()
    for row in rows.values():
        assert 0.0 <= row["test_dice"] <= 1.0
        assert row["train_s_per_volume"] > 0 and row["inference_s_per_volume"] > 0
    with Image.open(out / "comparison.png") as png:
        assert png.size[0] > 300 and png.size[1] > 200
    # a second run reuses data and the pretrained network
    assert (out / "pretrain" / "pretrained.pt").is_file()
    assert main(["demo", "--output-dir", str(out), "--methods", "ssf", "--epochs", "1", "--size", "16",
                 "--train-cases", "2", "--test-cases", "1", "--pretrain-cases", "2", "--no-progress"]) == 0
    assert [r["method"] for r in json.loads((out / "comparison.json").read_text())["rows"]] == ["ssf"]


def test_demo_rejects_bad_sizes(tmp_path, capsys):
    assert main(["demo", "--output-dir", str(tmp_path), "--size", "18", "--no-progress"]) == 2
    assert "size must be a multiple of 4" in capsys.readouterr().err
