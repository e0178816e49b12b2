"""Trainer / evaluator factories, test-set evaluation and bundle helpers on tiny phantom data."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from monai.data import DataLoader, Dataset
from monai.networks.nets import SegResNet

import monai_peft
from monai_peft.data import make_phantom, write_phantom_dataset
from monai_peft.workflows import (
    build_evaluator,
    build_lr_scheduler,
    build_optimizer,
    build_test_evaluator,
    build_trainer,
    read_run_record,
)
from monai_peft.workflows.bundle import bundle_datalist, export_merged, image_list, run_info

CLASSES = ["liver", "spleen", "stomach"]


def _cases(seeds, size: int = 16) -> list[dict]:
    out = []
    for seed in seeds:
        img, lab, names = make_phantom((size, size, size), seed)
        ids = {n: i for i, n in names.items()}
        label = np.zeros_like(lab, dtype=np.float32)
        for k, c in enumerate(CLASSES, start=1):
            label[lab == ids[c]] = k
        image = np.clip((img + 175.0) / 425.0, 0.0, 1.0).astype(np.float32)
        out.append({"image": torch.from_numpy(image)[None], "label": torch.from_numpy(label)[None]})
    return out


def _net() -> SegResNet:
    torch.manual_seed(0)
    return SegResNet(spatial_dims=3, init_filters=8, in_channels=1, out_channels=len(CLASSES) + 1,
                     blocks_down=(1, 2), blocks_up=(1,))


def test_optimizer_holds_only_trainable_parameters_with_thesis_hyperparameters():
    model = monai_peft.adapt(_net(), "ssf", train_fully="head")
    opt = build_optimizer(model)
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert in_opt == {id(p) for p in model.parameters() if p.requires_grad}
    assert opt.defaults["lr"] == 1e-4 and opt.defaults["weight_decay"] == 1e-5  # thesis 4.2.3
    sched = build_lr_scheduler(opt, max_epochs=4)
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(1e-4) and lrs[2] == pytest.approx(0.5e-4) and opt.param_groups[0]["lr"] == 0.0
    frozen = _net().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer(frozen)
    with pytest.raises(ValueError, match="max_epochs"):
        build_lr_scheduler(opt, 0)


@pytest.mark.slow
def test_train_validate_test_lora_keeps_backbone_and_writes_record(tmp_path):
    model = monai_peft.adapt(_net(), "lora", r=2, train_fully="head")
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    train = DataLoader(Dataset(_cases(range(4))), batch_size=2, shuffle=True)
    val = DataLoader(Dataset(_cases([10])), batch_size=1)
    evaluator = build_evaluator(model, val, CLASSES, roi_size=(16, 16, 16), record_path=tmp_path / "results.json",
                                progress=False)
    trainer = build_trainer(model, train, 2, tmp_path, evaluator=evaluator, lr=1e-3,
                            run_info={"method": "lora", "placement": "spatial convs"}, progress=False)
    trainer.run()

    after = dict(model.named_parameters())
    assert all(torch.equal(after[n], v) for n, v in frozen_before.items())
    assert any(not torch.equal(after[n], v) for n, v in trainable_before.items())
    record = read_run_record(tmp_path / "results.json")
    assert record["method"] == "lora" and record["placement"] == "spatial convs"
    assert record["parameters"]["trainable"] == sum(v.numel() for v in trainable_before.values())
    assert 0.0 <= record["validation"]["mean_dice"] <= 1.0 and record["validation"]["epoch"] == 2
    assert set(record["validation"]["per_class_dice"]) == set(CLASSES)
    assert record["costs"]["train_s_per_volume"] > 0 and record["costs"]["train_volumes_timed"] == 6
    assert record["frozen_backbone"]["unchanged"] is True
    for sub in ("best", "last"):
        assert (tmp_path / "adapter" / sub / "adapter_model.safetensors").is_file()

    tester = build_test_evaluator(model, DataLoader(Dataset(_cases([20, 21])), batch_size=1), CLASSES, tmp_path,
                                  roi_size=(16, 16, 16), progress=False)
    tester.run()
    record = read_run_record(tmp_path / "results.json")
    cases = json.loads((tmp_path / "test_metrics.json").read_text())["cases"]
    assert len(cases) == 2 and record["test"]["n_cases"] == 2
    per_class = {c: np.nanmean([case["dice"][c] if case["dice"][c] is not None else np.nan for case in cases])
                 for c in CLASSES}
    for c in CLASSES:
        assert record["test"]["per_class_dice"][c] == pytest.approx(per_class[c], abs=1e-6)
    assert tester.state.metrics["test_mean_dice"] == pytest.approx(record["test"]["mean_dice"], abs=1e-5)
    assert record["costs"]["inference_s_per_volume"] > 0
    assert record["validation"]["epoch"] == 2  # the test run added its section, earlier ones stay


def test_bundle_datalist_uses_meta_split_and_checks_inputs(tmp_path):
    write_phantom_dataset(tmp_path / "ds", 4, (16, 16, 16), seed=0)
    train = bundle_datalist(tmp_path / "ds", ["liver", "spleen"], "train", split_source="meta")
    test = bundle_datalist(tmp_path / "ds", ["liver", "spleen"], "test", split_source="meta")
    assert [d["case_id"] for d in train] == ["s0000", "s0001"] and [d["case_id"] for d in test] == ["s0003"]
    assert [d["case_id"] for d in image_list(tmp_path / "ds", "val")] == ["s0002"]
    assert len(image_list(tmp_path / "ds", None)) == 4
    with pytest.raises(FileNotFoundError, match="--dataset_dir .* does not exist"):
        bundle_datalist(tmp_path / "missing", "organs")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no TotalSegmentator case folder"):
        image_list(tmp_path / "empty")
    with pytest.raises(ValueError, match="split"):
        bundle_datalist(tmp_path / "ds", "organs", "training")
    info = run_info("segresnet-ssf-encdec", ["liver", "spleen"])
    assert info["method"] == "ssf" and info["class_names"] == ["liver", "spleen"] and info["backbone"] == "segresnet"
    with pytest.raises(KeyError, match="unknown preset"):
        run_info("segresnet-nope", "organs")


@pytest.mark.parametrize("method", ["lora"])
def test_export_merged_matches_adapted_network(tmp_path, method):
    from monai_peft.handlers import save_adapter_folder

    kwargs = {"r": 2}
    model = monai_peft.adapt(_net(), method, train_fully="head", **kwargs)
    with torch.no_grad():  # make the adapters non-trivial, as after training
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    save_adapter_folder(model, tmp_path / "best")
    path = export_merged(model, tmp_path / "best", tmp_path / "models" / "model.pt")
    plain = _net()
    plain.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    x = torch.rand(1, 1, 16, 16, 16)
    model.eval()
    plain.eval()
    with torch.no_grad():
        assert torch.allclose(plain(x), model(x), atol=1e-4)
        assert not torch.allclose(_net().eval()(x), model(x), atol=1e-3)
    assert json.loads((tmp_path / "models" / "model.pt.json").read_text())["method"] == method


def test_export_merged_refuses_a_merge_the_plain_network_cannot_load(tmp_path, caplog):
    """SSF merged into SegResNet's bias-free convs adds bias tensors: no model.pt rather than a file ckpt_export
    would reject or, worse, load partially."""
    (tmp_path / "model.pt").write_bytes(b"from an earlier run")
    model = monai_peft.adapt(_net(), "ssf", train_fully="head")
    with caplog.at_level("WARNING"):
        assert export_merged(model, None, tmp_path / "model.pt") is None
    assert not (tmp_path / "model.pt").exists()
    assert "does not fit the plain network" in caplog.text and ".bias" in caplog.text


def test_export_merged_skips_convadapter_and_removes_stale_export(tmp_path):
    (tmp_path / "model.pt").write_bytes(b"from an earlier run")
    model = monai_peft.adapt(_net(), "convadapter", train_fully="head")
    assert export_merged(model, None, tmp_path / "model.pt") is None
    assert not (tmp_path / "model.pt").exists()
