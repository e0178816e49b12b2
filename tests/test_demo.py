"""``monai-peft demo``: the main job behind README's first command, at a tiny size (the full size is measured and
reported in docs/monai_workflows_and_bundles.md; it runs in minutes, not in CI)."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from monai_peft.cli import main
from monai_peft.workflows.demo import DEMO_METHODS, format_table, run_demo

TINY = ["--epochs", "2", "--pretrain-epochs", "2", "--pretrain-cases", "2", "1", "1", "--target-cases", "2", "1", "1",
        "--no-progress"]


@pytest.mark.slow
def test_demo_compares_four_methods_and_repeats_exactly(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--output-dir", str(out), *TINY]) == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "comparison.json").read_text())
    rows = {r["method"]: r for r in result["rows"]}
    assert list(rows) == list(DEMO_METHODS) == ["full", "convadapter", "lora", "ssf"]
    # the printed table is the one in comparison.json, under the foundation model's own test Dice
    assert format_table(result["rows"], result["foundation"]) in printed
    assert "foundation model on its own task (liver, spleen" in printed and "after a warm-up" in printed
    foundation = json.loads((out / "pretrain" / "results.json").read_text())
    assert result["foundation"]["test_dice"] == foundation["test"]["mean_dice"]
    full = rows["full"]
    assert full["trainable"] == full["total"] and full["trainable_percent"] == pytest.approx(100.0)
    for run in ("full", "pretrain"):  # nothing frozen: no fingerprint of "a frozen backbone" (of zero bytes)
        assert json.loads((out / run / "results.json").read_text())["frozen_backbone"] is None, run
    for method in ("convadapter", "lora", "ssf"):
        row = rows[method]
        assert 0 < row["trainable"] < full["trainable"] and row["total"] == full["total"], method
        assert row["lr"] == DEMO_METHODS[method]["lr"] > DEMO_METHODS["full"]["lr"]  # adapters take larger steps
        assert (out / method / "adapter" / "last" / "adapter_model.safetensors").is_file()
    for method, row in rows.items():
        record = json.loads((out / method / "results.json").read_text())
        # validation every epoch: the history the curves are drawn from
        assert [h["epoch"] for h in record["history"]] == [1, 2]
        assert record["history"][1]["val_mean_dice"] == pytest.approx(record["validation"]["mean_dice"])
        assert row["test_dice"] == record["test"]["mean_dice"]
        assert record["evaluation"]["warm_up_passes"] == 1 and record["costs"]["inference_volumes_timed"] == 1
    for png in ("comparison.png", "curves.png"):
        with Image.open(out / png) as image:
            assert image.size[0] > 300 and image.size[1] > 200
    # the same numbers again, whatever torch's thread count outside the demo: fixed seeds, one thread inside
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        again = run_demo(tmp_path / "again", methods=["full", "ssf"], epochs=2, pretrain_epochs=2,
                         n_pretrain=(2, 1, 1), n_target=(2, 1, 1), progress=False)
    finally:
        torch.set_num_threads(before)
    assert torch.get_num_threads() == before
    assert again["foundation"]["test_dice"] == result["foundation"]["test_dice"]
    for row in again["rows"]:
        assert row["test_dice"] == rows[row["method"]]["test_dice"]
        assert row["per_class_dice"] == rows[row["method"]]["per_class_dice"]
    # a later run in the same folder reuses the data and the foundation model
    mtime = (out / "pretrain" / "pretrained.pt").stat().st_mtime
    assert main(["demo", "--output-dir", str(out), *TINY, "--methods", "ssf", "--lr", "ssf=0.05"]) == 0
    assert (out / "pretrain" / "pretrained.pt").stat().st_mtime == mtime
    rows = json.loads((out / "comparison.json").read_text())["rows"]
    assert [(r["method"], r["lr"]) for r in rows] == [("ssf", 0.05)]


def test_demo_rejects_bad_arguments(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:  # argparse refuses it: one line, exit 2
        main(["demo", "--output-dir", str(tmp_path), "--target-cases", "2", "0", "1", "--no-progress"])
    assert exit_info.value.code == 2
    assert "--target-cases: expected a positive integer, got '0'" in capsys.readouterr().err
    assert main(["demo", "--output-dir", str(tmp_path), "--lr", "lora", "--no-progress"]) == 2
    assert "--lr expects METHOD=LR" in capsys.readouterr().err
