"""monai_peft.defaults: the measured learning rates, and the bundles, nnU-Net trainers and docs that read them."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from monai_peft import METHODS
from monai_peft.defaults import DEFAULT_LEARNING_RATES, default_learning_rate

REPO = Path(__file__).resolve().parents[1]
COMMITTED = REPO / "benchmarks" / "results" / "real_adaptation.json"
BENCHMARKED = ("full", "head", "convadapter", "lora", "ssf")


def test_every_cnn_method_has_a_rate_and_unknown_ones_are_refused():
    assert set(DEFAULT_LEARNING_RATES) == set(METHODS) - {"vpt", "bottleneck"}
    assert default_learning_rate("lora") == DEFAULT_LEARNING_RATES["lora"]
    with pytest.raises(ValueError, match="unknown method 'adapter'.*convadapter"):
        default_learning_rate("adapter")
    with pytest.raises(ValueError, match="'vpt' is a transformer method.*METHOD_DEFAULTS"):
        default_learning_rate("vpt")


def test_rates_are_the_committed_benchmark_winners():
    """Each benchmarked method's rate is its ``default_lr`` in the committed full run (best mean held-out Dice),
    the unbenchmarked ones borrow as the module docstring says, and the adapters take larger steps than full."""
    res = json.loads(COMMITTED.read_text())
    assert not res["settings"]["quick"]
    rows = {r["method"]: r for r in res["rows"] if r["method"] != "pretrained"}
    assert set(rows) == set(BENCHMARKED)
    for method, row in rows.items():
        points = [g for g in res["grid"] if g["method"] == method]  # ConvAdapter: every (gamma, lr)
        best = max(points, key=lambda g: (g["val_dice"] + g["test_dice"], -g["lr"]))
        assert (row["default_lr"], row["default_options"]) == (best["lr"], best["options"])
        assert DEFAULT_LEARNING_RATES[method] == row["default_lr"], f"{method}: re-run the benchmark or update defaults"
    assert DEFAULT_LEARNING_RATES["decoder"] == DEFAULT_LEARNING_RATES["full"]
    assert DEFAULT_LEARNING_RATES["bitfit"] == DEFAULT_LEARNING_RATES["norm"] == DEFAULT_LEARNING_RATES["ssf"]
    for method in ("convadapter", "lora", "ssf", "head"):
        assert DEFAULT_LEARNING_RATES[method] > DEFAULT_LEARNING_RATES["full"]


def test_docs_table_is_the_committed_run():
    """docs/core.md's learning-rate table: one row per benchmarked method with its held-out Dice and default rate."""
    res = json.loads(COMMITTED.read_text())
    text = (REPO / "docs" / "core.md").read_text()
    for row in res["rows"]:
        if row["method"] == "pretrained":
            continue
        lines = [ln for ln in text.splitlines() if ln.startswith(f"| {row['method']} |")]
        cells = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]
        assert len(lines) == len(res["settings"]["variants"][row["method"]]), row["method"]
        assert all(f"{row['heldout_dice']:.3f}" in c for c in cells), lines
        assert [c[-1] for c in cells if c[-1]] == [f"**{row['default_lr']:g}**"], lines


@pytest.mark.parametrize("bundle", ["totalseg_organs_suprem_segresnet_peft", "totalseg_organs_suprem_unet_peft"])
def test_bundle_learning_rate_is_the_preset_methods_default(bundle):
    from monai.bundle import ConfigParser

    from monai_peft.presets import get_preset, preset_names

    config = REPO / "bundles" / bundle / "configs" / "train.json"
    backbone = get_preset(json.loads(config.read_text())["peft"]["preset"]).backbone
    names = preset_names(backbone)
    assert {get_preset(n).method for n in names} >= {"convadapter", "lora", "full"}
    for name in names:
        parser = ConfigParser()
        parser.read_config(str(config))
        parser["peft"]["preset"] = name
        assert parser.get_parsed_content("learning_rate") == default_learning_rate(get_preset(name).method), name


def test_nnunet_trainers_start_at_the_methods_default_rate():
    from nnunet_plugin import trainers
    from nnunet_plugin.settings import ENV_VARS, resolve_settings

    classes = [getattr(trainers, n) for n in trainers.__all__ if n.startswith("nnUNetTrainer")]
    peft_trainers = [c for c in classes if issubclass(c, trainers.nnUNetTrainerPEFT)]
    assert {c.peft_method for c in peft_trainers} >= {"convadapter", "lora", "ssf", "full"}
    for cls in peft_trainers:
        settings = resolve_settings(cls.settings_defaults(), None, environ={})
        assert settings.lr == default_learning_rate(cls.peft_method), cls.__name__
    # the environment and the plans still override it (the thesis's 1e-4 is one variable away)
    lora = trainers.nnUNetTrainerLoRA
    assert resolve_settings(lora.settings_defaults(), None, environ={ENV_VARS["lr"]: "1e-4"}).lr == 1e-4
    assert resolve_settings(lora.settings_defaults(), {"monai_peft": {"lr": 2e-3}}, environ={}).lr == 2e-3


def test_adapt_docs_point_to_the_defaults():
    from monai_peft import adapt

    assert "default_learning_rate" in adapt.__doc__
    assert re.search(r"nnUNet_peft_lr.*\(core\.md#learning-rates\)", (REPO / "docs" / "nnunet.md").read_text())
