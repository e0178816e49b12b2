"""Tables 5.1-5.4 (validation Dice by placement), 5.7 (costs) and 5.10 (Grad-CAM Otsu Dice) from run records,
each with the thesis's published figures beside the user's."""

from __future__ import annotations

import json

import pytest

from monai_peft.analysis.pareto import RunRecord, record_from_dict
from monai_peft.analysis.tables import layer_role, load_gradcam_summaries, table_validation, thesis_tables
from monai_peft.cli import main


def _bundle_record(preset: str, method: str, trainable: float, val: float, test: float, costs=None) -> dict:
    """A run record as the bundles write it (run_info + parameters + validation + test sections)."""
    record = {"preset": preset, "method": method, "placement": "words of the thesis", "backbone": preset.split("-")[0]
              .replace("unet3d", "unet"), "parameters": {"trainable": trainable, "total": 4.7e6},
              "validation": {"mean_dice": val - 0.01, "best_mean_dice": val, "best_epoch": 7},
              "test": {"mean_dice": test}}
    if costs:
        record["costs"] = costs
    return record


def test_validation_tables_by_preset_with_thesis_column():
    records = [record_from_dict(_bundle_record(*args), source=args[0]) for args in (
        ("segresnet-full-finetune", "full", 4.70e6, 0.86, 0.88),
        ("segresnet-convadapter-resblock-parallel", "convadapter", 0.57e6, 0.80, 0.83),
        ("segresnet-convadapter-encoder-only", "convadapter", 0.53e6, 0.55, 0.60),
        ("segresnet-lora-encoder+full-decoder-r16", "lora", 1.0e6, 0.84, 0.61),
        ("unet3d-convadapter-luconv-parallel", "convadapter", 1.79e6, 0.66, 0.70),
    )]
    assert records[0].preset == "segresnet-full-finetune" and records[0].val_dice == 0.86
    tables = thesis_tables(records)
    assert {"5.2", "5.3", "5.4", "5.5"} <= set(tables) and "5.1" not in tables  # no UNet LoRA run
    t53 = tables["5.3"]["json"]
    assert list(t53["rows"]) == ["segresnet-full-finetune", "segresnet-convadapter-resblock-parallel",
                                 "segresnet-convadapter-encoder-only"]  # the thesis's column order
    assert t53["columns"] == [["# Param (M)", ""], ["# Param (M)", "thesis"], ["Val Mean Dice", ""],
                              ["Val Mean Dice", "thesis"]]
    assert t53["rows"]["segresnet-convadapter-resblock-parallel"] == pytest.approx([0.57, 0.7, 0.80, 0.82])
    assert t53["rows"]["segresnet-convadapter-encoder-only"] == pytest.approx([0.53, 0.65, 0.55, 0.50])
    assert "| segresnet-full-finetune | 4.7 | 4.7 | 0.86 | 0.85 |" in tables["5.3"]["markdown"]
    assert tables["5.4"]["json"]["rows"]["unet3d-convadapter-luconv-parallel"][3] == 0.65
    # Table 5.5 gains the thesis's test Dice beside the user's
    t55 = tables["5.5"]["json"]["rows"]
    assert t55["Mean Dice (thesis)"] == [0.83] + [0.89, 0.60, 0.84]  # UNet: ConvAda only; SegResNet: FFT, LoRA, ConvAda
    with pytest.raises(ValueError, match="table must be one of"):
        table_validation(records, "5.9")


def test_cost_table_5_7_and_gradcam_table_5_10(tmp_path, capsys):
    costs = {"full": {"train_s_per_volume": 0.40, "inference_s_per_volume": 0.05, "train_peak_memory_gb": 1.2,
                      "memory_source": "cpu_peak_rss"},
             "convadapter": {"train_s_per_volume": 0.44, "inference_s_per_volume": 0.06, "train_peak_memory_gb": 1.3,
                             "memory_source": "cpu_peak_rss"}}
    runs = tmp_path / "runs"
    for preset, method, params in (("segresnet-full-finetune", "full", 4.7e6),
                                   ("segresnet-convadapter-resblock-parallel", "convadapter", 0.57e6)):
        (runs / method).mkdir(parents=True)
        (runs / method / "results.json").write_text(json.dumps(_bundle_record(preset, method, params, 0.8, 0.8,
                                                                              costs[method])))
    # a bundle's interpret.json summary and a `monai-peft gradcam` record, as they are written
    summary = runs / "convadapter" / "interpret" / "gradcam"
    summary.mkdir(parents=True)
    layers = ("base_model.model.conv_final.2.conv", "base_model.model.up_layers.2.0.conv2.conv",
              "base_model.model.up_layers.2.0.conv_adapter_up.default")
    (summary / "gradcam_summary.json").write_text(json.dumps({"cases": ["a", "b"], "mean_dice": {
        "aorta": dict(zip(layers, (0.8, 0.1, 0.2))), "liver": dict(zip(layers, (0.9, 0.3, 0.4)))}}))
    (runs / "gradcam.json").write_text(json.dumps({"dice": {"aorta": dict(zip(layers, (0.6, 0.3, 0.0)))}}))
    assert [layer_role(n) for n in layers] == ["final", "backbone", "adapter"]
    tables = thesis_tables(load_records(runs), load_gradcam_summaries([runs]))
    t57 = tables["5.7"]["json"]
    assert t57["columns"] == [["SegResNet-FFT", "cpu_peak_rss"], ["SegResNet-FFT", "thesis"],
                              ["SegResNet-ConvAda", "cpu_peak_rss"], ["SegResNet-ConvAda", "thesis"]]
    assert t57["rows"]["Training time (s/volume)"] == [0.40, 2.10, 0.44, 2.11]
    assert t57["rows"]["Peak memory, training (GB)"] == [1.2, 11.01, 1.3, 11.75]
    t510 = tables["5.10"]["json"]
    assert list(t510["rows"]) == ["aorta", "liver"]  # the thesis's classes first
    assert t510["rows"]["aorta"] == pytest.approx([0.7, 0.83, 0.2, 0.01, 0.1, 0.04])  # mean of the two files
    assert t510["rows"]["liver"][1::2] == [None, None, None]  # no thesis figure for the liver
    # the commands print them
    assert main(["pareto", str(runs), "--tables"]) == 0
    printed = capsys.readouterr().out
    assert "Table 5.7: computational costs" in printed and "Table 5.10" in printed and "Table 5.3" in printed
    assert main(["sweep", "collect", str(runs), "--backbone", "segresnet", "--json"]) == 0
    assert {"5.3", "5.7", "5.10"} <= set(json.loads(capsys.readouterr().out)["tables"])


def load_records(root):
    from monai_peft.analysis.pareto import load_run_records

    return load_run_records([root])


def test_run_record_without_preset_stays_out_of_placement_tables():
    plain = RunRecord("segresnet", "convadapter", 0.5e6, 0.8)
    assert table_validation([plain], "5.3") is None
