"""``monai-peft echo compare``: every PEFT family on the phantom echo segmentation and video EF tasks, trainable
parameters against the architectures, learning-rate choice on the validation split, EF metrics against a direct
computation, costs, and a new task added by one table entry."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import peft
import pytest
import torch
from torch import nn
from torch.utils.data import ConcatDataset

from monai_peft.cli import main
from monai_peft.echo import compare, find_echonet
from monai_peft.echo.compare import (COMPARE_TASKS, FAST_LRS, METHODS, CompareTask, TaskSetup, choose_lr,
                                     fast_settings, run_comparison)

pytestmark = pytest.mark.slow

TINY_WIDTHS = compare.TINY_SEGFORMER["hidden_sizes"]  # MiT-B0 depths (2, 2, 2, 2)


@pytest.fixture(scope="module")
def phantom_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    settings = fast_settings(out)
    lrs = {**FAST_LRS, "head": (1e-3, 3e-2)}  # two rates: the choice on the validation split is exercised
    return settings, run_comparison(settings, ["segmentation"], list(METHODS), lrs)


def test_every_method_is_recorded_with_its_chosen_rate_and_costs(phantom_run):
    settings, result = phantom_run
    saved = json.loads((Path(settings.out) / "comparison.json").read_text())
    assert saved["tasks"].keys() == result["tasks"].keys() == {"segmentation"}
    png = (Path(settings.out) / "comparison.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    res = result["tasks"]["segmentation"]
    rows = res["methods"]
    assert list(rows) == list(METHODS) and res["metric"] == "mean_dice"
    assert (res["num_train"], res["num_val"], res["num_test"]) == (12, 4, 4)  # 3 / 1 / 1 phantom patients x 4 frames

    head = rows["head"]["trainable_params"]
    total = rows["full"]["total_params"]
    assert rows["full"]["trainable_params"] == total and all(r["total_params"] == total for r in rows.values())
    n_tok = 10  # VPTConfig default: prompts per block; deep: all 8 blocks, shallow: first block of each stage
    assert rows["vpt-deep"]["trainable_params"] == head + n_tok * 2 * sum(TINY_WIDTHS)
    assert rows["vpt-shallow"]["trainable_params"] == head + n_tok * sum(TINY_WIDTHS)
    m = 16  # bottleneck size: per block, attention + MLP adapters of 2 D m + m + D parameters
    adapters = sum(2 * 2 * (2 * d * m + m + d) for d in TINY_WIDTHS)
    assert rows["houlsby"]["trainable_params"] == rows["parallel"]["trainable_params"] == head + adapters
    assert head < rows["bitfit"]["trainable_params"] < rows["lora"]["trainable_params"] < total

    for name, r in rows.items():
        best = choose_lr(r["lr_grid"], higher_is_better=True)
        assert r["lr"] == r["lr_grid"][best]["lr"] and r["val"] == r["lr_grid"][best]["val"]
        assert 0.0 <= r["test"] <= 1.0 and r["test"] == r["test_scores"]["mean_dice"]
        # Adam keeps two float32 moments per trainable parameter (plus a step counter per tensor)
        assert math.isclose(r["optimizer_state_mb"] * 2**20, 8 * r["trainable_params"], rel_tol=0.05), name
    assert [g["lr"] for g in rows["head"]["lr_grid"]] == [1e-3, 3e-2]
    assert rows["full"]["step_time_vs_full"] == 1.0
    assert rows["head"]["peak_step_mb"] < rows["full"]["peak_step_mb"], "no backbone gradients for head-only"
    assert "| vpt-deep |" in compare.comparison_table(result)


def test_choose_lr_prefers_the_best_validation_and_skips_diverged_runs():
    grid = [{"val": 0.5}, {"val": float("nan")}, {"val": 0.7}, {"val": 0.7}]
    assert choose_lr(grid, higher_is_better=True) == 2
    assert choose_lr([{"val": 3.0}, {"val": 2.0}, {"val": float("inf")}], higher_is_better=False) == 1
    with pytest.raises(ValueError, match="no learning rate gave a finite"):
        choose_lr([{"val": float("nan")}], higher_is_better=True)


class _VideoBackbone(nn.Module):
    """A tiny VideoMAE returning the mean token ``(B, D)`` of a clip ``(B, T, C, H, W)``."""

    def __init__(self) -> None:
        super().__init__()
        import transformers

        cfg = transformers.VideoMAEConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                          intermediate_size=32, image_size=16, patch_size=8, num_channels=1,
                                          num_frames=4, tubelet_size=2)
        self.videomae = transformers.VideoMAEModel(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.videomae(pixel_values=x).last_hidden_state.mean(1)


def _video_regression(settings) -> TaskSetup:
    """Stands for the EF task: clips whose target is their mean brightness."""
    g = torch.Generator().manual_seed(0)

    def clips(n):
        x = torch.rand(n, 4, 1, 16, 16, generator=g)
        return [{"image": x[i], "label": x[i].mean().view(1) * 10} for i in range(n)]

    torch.manual_seed(0)
    pretrained = _VideoBackbone()

    def mae(model, ds):
        model.eval()
        with torch.no_grad():
            err = [(model(s["image"][None]) - s["label"]).abs().item() for s in ds]
        return {"mae": sum(err) / len(err)}

    return TaskSetup(train=clips(8), val=clips(4), test=clips(4), new_backbone=lambda: copy.deepcopy(pretrained),
                     new_head=lambda backbone: nn.Linear(16, 1), loss=nn.HuberLoss(), score=mae,
                     lora_config=lambda backbone: peft.LoraConfig(r=2, target_modules=["query", "value"]))


def test_a_new_task_is_one_table_entry(tmp_path, monkeypatch):
    monkeypatch.setitem(COMPARE_TASKS, "clip", CompareTask("clip", "mae", False, _video_regression))
    methods = ["lora", "vpt-deep", "vpt-shallow", "houlsby", "parallel", "head", "full"]
    result = run_comparison(fast_settings(tmp_path), ["clip"], methods, {m: (1e-2,) for m in methods})
    rows = result["tasks"]["clip"]["methods"]
    head = 17  # Linear(16, 1)
    assert rows["head"]["trainable_params"] == head
    assert rows["vpt-deep"]["trainable_params"] == head + 2 * 10 * 16  # 2 blocks x 10 prompts x D=16
    assert rows["vpt-shallow"]["trainable_params"] == head + 10 * 16
    assert rows["parallel"]["trainable_params"] == head + 2 * 2 * (2 * 16 * 16 + 16 + 16)
    assert rows["lora"]["trainable_params"] == head + 2 * 2 * (2 * 16 * 2)
    assert all(math.isfinite(r["test"]) for r in rows.values())
    assert not (tmp_path / "data").exists(), "a task with its own data writes no echo phantoms"


def test_cli_runs_on_given_data_and_names_bad_arguments(phantom_run, tmp_path, capsys):
    settings, _ = phantom_run
    base = ["echo", "compare", "--out", str(tmp_path), "--camus", str(Path(settings.out) / "data" / "camus"),
            "--backbone", str(Path(settings.out) / "backbone"), "--fast"]
    assert main(base + ["--methods", "head", "vpt-shallow", "--lr", "head=1e-2"]) == 0
    printed = capsys.readouterr().out
    assert "| vpt-shallow |" in printed and "comparison.png" in printed
    saved = json.loads((tmp_path / "comparison.json").read_text())
    assert list(saved["tasks"]["segmentation"]["methods"]) == ["head", "vpt-shallow"]
    assert saved["tasks"]["segmentation"]["methods"]["head"]["lr"] == 1e-2
    for bad, message in ((["--methods", "prompt"], "unknown method 'prompt'"),
                         (["--lr", "lora=fast"], "--lr 'lora=fast': expected METHOD=LR"),
                         (["--tasks", "lvef"], "unknown task 'lvef'")):
        try:  # main() turns these ValueErrors into 'error: ...' and exit code 2 once the CLI error handling lands
            rc = main(base + bad)
        except ValueError as e:
            assert message in str(e)
        else:
            assert rc == 2 and message in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ video EF
# the tiny VideoMAE of the fast settings (monai_peft.echo.video.demo.TINY_VIDEOMAE, TINY_CLIP): width D, L blocks,
# MLP width I, 8 x 8 x 2 tubelets of 1 channel; and the method defaults: prompts, bottleneck size, LoRA rank
D, L, I, PATCH = 32, 2, 64, 1 * 2 * 8 * 8
N_TOK, M, R = 10, 16, 8


@pytest.fixture(scope="module")
def ef_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare_ef")
    settings = fast_settings(out)
    lrs = {**FAST_LRS, "lora": (1e-3, 1e-2, 3e-2)}  # three rates: the choice on the validation split is exercised
    return settings, run_comparison(settings, ["ef"], list(METHODS), lrs)


def test_ef_rows_count_the_videomae_and_keep_the_best_validation_rate(ef_run):
    settings, result = ef_run
    res = result["tasks"]["ef"]
    rows = res["methods"]
    assert list(rows) == list(METHODS) and res["metric"] == "mae" and res["higher_is_better"] is False
    assert (res["num_train"], res["num_val"], res["num_test"]) == (6, 2, 2)  # 10 phantom videos, 60 / 20 / 20 %
    head = 2 * D + D + 1  # EFHead: LayerNorm + Linear(D, 1)
    block = 4 * D * D + 3 * D + 2 * D * I + I + D + 2 * 2 * D  # q, k, v, o (k without bias), MLP, two LayerNorms
    total = PATCH * D + D + L * block + head  # position embeddings are fixed sin-cos buffers
    expected = {
        "full": total, "head": head,
        "lora": head + L * 4 * R * (D + D),  # query, key, value, attention output
        "vpt-deep": head + L * N_TOK * D, "vpt-shallow": head + N_TOK * D,
        "houlsby": head + L * 2 * (2 * D * M + M + D), "parallel": head + L * 2 * (2 * D * M + M + D),
        "bitfit": head + D + L * (3 * D + I + D + 2 * D),  # biases: patch conv, q, v, o, MLP in/out, LayerNorms
    }
    assert {n: r["trainable_params"] for n, r in rows.items()} == expected
    assert all(r["total_params"] == total for r in rows.values())
    for name, r in rows.items():
        best = min(r["lr_grid"], key=lambda g: g["val"])  # EF MAE: lower is better
        assert (r["lr"], r["val"]) == (best["lr"], best["val"]), name
        scores = r["test_scores"]
        assert r["test"] == scores["mae"] and scores["n"] == 2 and scores["rmse"] >= scores["mae"], name
        assert scores["r2"] is not None
    assert len({g["val"] for g in rows["lora"]["lr_grid"]}) == 3, "three rates, three validation results"
    videos = Path(settings.out) / "data" / "echonet_ef"
    train_ef, test_ef = ([r.ef for r in find_echonet(videos, split, require_tracings=False)]
                         for split in ("TRAIN", "TEST"))
    mean = sum(train_ef) / len(train_ef)
    assert res["reference"]["mae"] == pytest.approx(sum(abs(mean - t) for t in test_ef) / len(test_ef))
    table = compare.comparison_table(result)
    assert "| test mae | test rmse | test r2 |" in table and "| vpt-deep | 737 |" in table
    assert f"| (predict the training mean EF) | 0 | 0.00 | - | - | {res['reference']['mae']:.3f} |" in table
    assert (Path(settings.out) / "video_pretrain" / "checkpoint" / "config.json").is_file()


def test_ef_scores_are_the_metrics_of_clip_averaged_predictions(ef_run):
    settings, _ = ef_run
    setup = COMPARE_TASKS["ef"].prepare(settings)  # the run's phantom videos and pretrained VideoMAE again
    torch.manual_seed(0)
    model, _ = compare._build("vpt-deep", setup)
    held_out = ConcatDataset([setup.val, setup.test])
    got = setup.score(model, held_out)
    model.eval()
    with torch.no_grad():  # each item holds evenly spread clips (K, 1, T, H, W): the video's EF is their mean
        pred = np.array([float(model(item["image"]).mean()) for item in held_out])
    truth = np.array([float(item["label"][0]) for item in held_out])
    assert got["n"] == 4 and setup.val[0]["image"].shape[0] == settings.video_clips == 2
    err = pred - truth
    assert got["mae"] == pytest.approx(np.abs(err).mean(), rel=1e-5)
    assert got["rmse"] == pytest.approx(math.sqrt((err ** 2).mean()), rel=1e-5)
    assert got["r2"] == pytest.approx(1 - (err ** 2).sum() / ((truth - truth.mean()) ** 2).sum(), rel=1e-4)


def test_cli_ef_uses_the_given_videos_and_checkpoint(ef_run, tmp_path, capsys):
    settings, _ = ef_run
    videos = Path(settings.out) / "data" / "echonet_ef"
    checkpoint = Path(settings.out) / "video_pretrain" / "checkpoint"
    assert main(["echo", "compare", "--out", str(tmp_path), "--tasks", "ef", "--echonet", str(videos),
                 "--video-checkpoint", str(checkpoint), "--methods", "head", "--fast"]) == 0
    assert "### ef (mae, lower is better; 6 / 2 / 2" in capsys.readouterr().out
    saved = json.loads((tmp_path / "comparison.json").read_text())
    assert saved["tasks"]["ef"]["methods"]["head"]["trainable_params"] == 2 * D + D + 1
    assert not (tmp_path / "data").exists() and not (tmp_path / "video_pretrain").exists()
