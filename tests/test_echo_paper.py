"""The echo paper's comparison: Tables I-IV presets and defaults, adapter compositions (head only, full, full MiT),
runs on MONAI engines with run records, and the results table in the paper's layout."""

from __future__ import annotations

import json

import pytest
import torch

from monai_peft.echo import (ECHO_PRESETS, EchoBackbone, EchoTaskModel, FullSegformer, best_preset,
                             compose_task_model, echo_tables, find_run_records, fit, get_task, resolve_preset,
                             save_backbone, segformer_config, task_spec_for, write_camus_phantom)

TINY = {"hidden_sizes": [8, 16, 32, 64], "decoder_hidden_size": 16, "num_attention_heads": [1, 1, 2, 2]}
SMALL_HEAD = {"conv_channels": [8, 16, 16], "fc_features": [32, 16]}


@pytest.fixture(scope="module")
def backbone_dir(tmp_path_factory):
    torch.manual_seed(0)
    b = EchoBackbone(segformer_config("b0", **TINY))
    t = get_task("lv_segmentation")
    head = t.build_head(b.out_channels)
    with torch.no_grad():
        for p in head.parameters():
            p.normal_(0, 0.2)
    d = tmp_path_factory.mktemp("echo_paper") / "backbone"
    save_backbone(b, d, head=head, task=t, extra={"image_size": 64, "variant": "b0"})
    return d


def test_every_table_row_is_a_preset_with_the_papers_figures():
    by_table = {}
    for p in ECHO_PRESETS.values():
        by_table.setdefault(p.table, []).append(p)
    assert {t: len(v) for t, v in by_table.items()} == {"I": 10, "II": 8, "III": 8, "IV": 7}
    assert {p.batch_size for p in by_table["III"]} == {8}  # III.C: "the same ... batch size ... as volume"
    assert ECHO_PRESETS["volume-b0-head"].batch_size == 64 and ECHO_PRESETS["view-b0-head"].batch_size == 64
    assert ECHO_PRESETS["segmentation-b0-backbone-attn-r4"].batch_size == 8  # Table IV note b
    assert ECHO_PRESETS["segmentation-b2-full"].paper == {"with_poor": 0.881, "no_poor": 0.887,
                                                          "trainable": 192_246_274, "total": 192_246_274,
                                                          "minutes": 200.5}
    assert ECHO_PRESETS["age-b0-full-mit-all-r4"].dropout == 0.3  # Table III note b
    assert [p.epochs for p in by_table["I"]] == [200] * 10 and {p.epochs for p in by_table["II"]} == {100}


def test_defaults_are_each_tables_best_configuration():
    view = best_preset("view", "b0")
    assert (view.composition, view.layers, view.rank, view.head_kwargs) == ("full_mit", "all", 4, {"conv_channels": [8, 16, 32]})
    vol = best_preset("volume", "b2")
    assert (vol.layers, vol.rank, vol.lr, vol.lr_min, vol.batch_size) == ("attention", 4, 1e-3, 1e-4, 8)
    age = best_preset("age", "b0")
    assert (age.layers, age.rank, age.lr, age.batch_size) == ("attention", 2, 1e-2, 8)
    seg = best_preset("segmentation", "b0")
    assert (seg.layers, seg.rank, seg.lr, seg.lr_min, seg.batch_size) == ("all", 2, 1e-4, 1e-5, 32)
    assert best_preset("view", "b0", ["backbone"]).name == "view-b0-backbone-all-r2"  # the multi-task bundle's
    assert resolve_preset("age", None, "b0") == age
    with pytest.raises(ValueError, match="is a 'volume' configuration, not 'age'"):
        resolve_preset("age", "volume-b0-backbone-attn-r4")
    with pytest.raises(ValueError, match="MiT-B2 backbone, the backbone is MiT-B0"):
        resolve_preset("volume", "volume-b2-backbone-attn-r4", "b0")
    with pytest.raises(ValueError, match="composition 'head'"):
        resolve_preset("volume", "volume-b0-head", "b0", ["backbone"])
    with pytest.raises(ValueError, match="unknown name"):
        resolve_preset("volume", "volume-b0-lora")


def _x(n=4):
    return torch.rand(n, 1, 64, 64, generator=torch.Generator().manual_seed(3))


def test_compositions_train_exactly_their_parts(backbone_dir):
    spec = task_spec_for("volume", SMALL_HEAD)
    batch = {"image": _x(), "label": torch.randn(4, 1)}
    changed = {}
    for comp, layers in (("full_mit", "attention"), ("head", None), ("full", None), ("backbone", "all")):
        torch.manual_seed(0)
        model = compose_task_model(backbone_dir, spec, comp, layers, 2)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        fit(model, [batch] * 2, spec.loss(), epochs=1, lr=1e-2, progress=False)
        changed[comp] = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
        assert changed[comp] and changed[comp] <= trainable, comp
    # full MiT: LoRA in the encoder only, the decoder (projections + fusion) as trained copies, the head
    lora = {n for n in changed["full_mit"] if "lora_" in n}
    assert lora and all(".encoder." in n for n in lora)
    assert any("neck.proj.0.modules_to_save" in n for n in changed["full_mit"])
    assert any("fuse.modules_to_save" in n for n in changed["full_mit"])
    assert not any("neck.proj.0.original_module" in n for n in changed["full_mit"])
    assert all(n.startswith("head.") for n in changed["head"])  # adapter head only, no LoRA
    assert any(n.startswith("backbone.encoder.") for n in changed["full"])  # fully trained MiT
    assert any("neck.proj" in n and "lora_" in n for n in changed["backbone"])  # "backbone of": LoRA in the neck too


def test_full_mit_is_the_pretrained_segformer_at_init(backbone_dir):
    from monai_peft.echo import load_pretrained_task_model

    spec = task_spec_for("view", SMALL_HEAD)
    torch.manual_seed(0)
    model = compose_task_model(backbone_dir, spec, "full_mit", "all", 4).eval()
    pretext = load_pretrained_task_model(backbone_dir).eval()
    plain = EchoTaskModel(FullSegformer(pretext.backbone, pretext.head.fuse), model.head).eval()
    x = _x(2)
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain(x), rtol=0, atol=1e-6)
        assert model.backbone(x).shape == (2, 16, 16, 16)  # D channels after the decoder's fusion


@pytest.mark.slow
def test_table_rows_train_on_engines_and_render_beside_the_paper(backbone_dir, tmp_path, capsys):
    from monai_peft.cli import main
    from monai_peft.echo import get_preset, train_preset

    camus = tmp_path / "camus"
    write_camus_phantom(camus, 6, "2023", (64, 56), seed=1)
    runs = tmp_path / "runs"
    rec = train_preset(get_preset("volume-b0-head"), backbone_dir, camus, runs, size=64, epochs=1, batch_size=4,
                       head_kwargs=SMALL_HEAD, progress=False)
    assert rec["composition"] == "head" and rec["table"] == "II" and rec["batch_size"] == 4
    assert set(rec["test"]) >= {"all", "no_poor"} and rec["test"]["all"]["n"] == 4
    assert {"mae", "rmse", "r2"} <= set(rec["test"]["all"]) and rec["test"]["all"]["rmse"] >= rec["test"]["all"]["mae"]
    assert rec["costs"]["train_s_per_volume"] > 0 and rec["costs"]["inference_s_per_volume"] > 0
    assert rec["frozen_backbone"]["unchanged"] is True and (runs / "volume-b0-head" / "model" / "task.json").is_file()
    # the CLI's default for the task: the paper's best LoRA row for the backbone's variant
    assert main(["echo", "train", "--backbone", str(backbone_dir), "--camus", str(camus), "--task", "volume",
                 "--out", str(runs), "--size", "64", "--epochs", "1", "--batch-size", "4", "--small-head"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["preset"] == "volume-b0-backbone-attn-r4" and out["placement"] == "attention" and out["rank"] == 4
    assert (runs / "volume-b0-backbone-attn-r4" / "adapter" / "adapter_config.json").is_file()
    tables = echo_tables(find_run_records([runs]))
    assert list(tables) == ["II"] and len(tables["II"]["rows"]) == 2
    md = tables["II"]["markdown"]
    assert "| backbone of MiT-B0 | attention | 4 | 0.001 |" in md and " / 22.270 |" not in md and " / 22.27 |" in md
    assert " / 29.21 |" in md and "R²" in md  # the paper's figures beside ours; R^2 for regression
    assert main(["echo", "table", "--runs", str(runs), "--out", str(tmp_path / "tables.md")]) == 0
    assert "Table II" in capsys.readouterr().out and (tmp_path / "tables.json").is_file()
    assert main(["echo", "presets", "--task", "age"]) == 0
    text = capsys.readouterr().out
    assert "age-b0-backbone-attn-r2 *" in text and "Table III" in text and "view-b0" not in text


def test_engine_evaluation_matches_a_direct_computation(backbone_dir, tmp_path):
    from monai_peft.echo import camus_task_dataset, evaluate

    camus = tmp_path / "camus"
    write_camus_phantom(camus, 4, "2023", (64, 56), seed=2)
    for task in ("view", "volume", "segmentation"):
        spec = task_spec_for(task, SMALL_HEAD if task != "segmentation" else None)
        torch.manual_seed(0)
        model = compose_task_model(backbone_dir, spec, "backbone", "all", 2).eval()
        ds = camus_task_dataset(camus, spec, split=None, size=64)
        got = evaluate(model, ds, spec, batch_size=3, record_path=tmp_path / f"{task}.json")
        x = torch.stack([s["image"] for s in ds.samples])
        poor = torch.tensor([s["quality"] == "Poor" for s in ds.samples])
        with torch.no_grad():
            out = model(x)
        if task == "view":
            correct = (out.argmax(1) == torch.stack([s["label"] for s in ds.samples])).float()
            assert got["all"]["accuracy"] == pytest.approx(float(correct.mean()))
            assert got["no_poor"]["accuracy"] == pytest.approx(float(correct[~poor].mean()))
        elif task == "volume":
            err = spec.decode(out) - spec.decode(torch.stack([s["label"] for s in ds.samples]))
            assert got["all"]["mae"] == pytest.approx(float(err.abs().mean()), rel=1e-5)
            assert got["all"]["rmse"] == pytest.approx(float(err.pow(2).mean().sqrt()), rel=1e-5)
            assert got["no_poor"]["n"] == int((~poor).sum())
        else:
            pred, lab = out.argmax(1), torch.stack([s["label"][0] for s in ds.samples])
            inter = ((pred == 1) & (lab == 1)).flatten(1).sum(1).float()
            dice = 2 * inter / ((pred == 1).flatten(1).sum(1) + (lab == 1).flatten(1).sum(1)).float()
            assert got["all"]["dice_LV_endocardium"] == pytest.approx(float(dice.mean()), abs=1e-6)
        record = json.loads((tmp_path / f"{task}.json").read_text())
        assert record["test"]["all"] == pytest.approx(got["all"]) and record["costs"]["inference_s_per_volume"] > 0
