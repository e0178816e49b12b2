"""Handlers of monai_peft.handlers on real (tiny) computations."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events
from monai.networks.nets import SegResNet
from monai.networks.utils import one_hot

import monai_peft
from monai_peft.handlers import (
    AdapterCheckpoint,
    AdapterLoader,
    CaseMetricsWriter,
    CostMeter,
    ParameterReportHandler,
    PerClassDice,
    RunRecordWriter,
    frozen_fingerprint,
    load_adapter_folder,
    save_adapter_folder,
)
from monai_peft.workflows.records import read_run_record, update_run_record


def _net(out_channels: int = 3) -> torch.nn.Module:
    torch.manual_seed(0)
    return SegResNet(spatial_dims=3, init_filters=8, in_channels=1, out_channels=out_channels, blocks_down=(1, 1),
                     blocks_up=(1,))


def _lora(out_channels: int = 3):
    return monai_peft.adapt(_net(out_channels), "lora", r=2, train_fully="head")


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def _blobs(seed: int, shape=(12, 12, 12)) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer label maps ``(1, H, W, D)`` for a prediction and a ground truth with two classes."""
    rng = np.random.default_rng(seed)
    gt = np.zeros(shape, dtype=np.int64)
    pr = np.zeros(shape, dtype=np.int64)
    o = rng.integers(0, 3, 3)
    gt[o[0] : o[0] + 5, 2:8, 2:8] = 1
    pr[o[1] : o[1] + 5, 2:8, 2:8] = 1
    gt[8:11, 8:11, o[2] : o[2] + 3] = 2
    pr[8:11, 8:11, 1:4] = 2
    return torch.from_numpy(pr)[None], torch.from_numpy(gt)[None]


def test_per_class_dice_matches_hand_computed_values():
    cases = [_blobs(s) for s in range(3)]
    metric = PerClassDice(class_names=["cube", "bar"])
    engine = Engine(lambda e, batch: batch)
    metric.attach(engine, "val_mean_dice")
    data = [([one_hot(p[None], 3)[0]], [one_hot(g[None], 3)[0]]) for p, g in cases]
    state = engine.run(data, max_epochs=1)
    per_class = [np.mean([_dice(p.numpy() == c, g.numpy() == c) for p, g in cases]) for c in (1, 2)]
    assert state.metrics["val_mean_dice_cube"] == pytest.approx(per_class[0], abs=1e-5)
    assert state.metrics["val_mean_dice_bar"] == pytest.approx(per_class[1], abs=1e-5)
    assert state.metrics["val_mean_dice"] == pytest.approx(np.mean(per_class), abs=1e-5)
    assert state.metric_details["val_mean_dice"].shape == (3, 2)


def test_per_class_dice_leaves_absent_classes_out_of_the_mean():
    p, g = _blobs(0)
    g = torch.where(g == 2, 0, g)  # class 2 absent from the ground truth of every case
    metric = PerClassDice(class_names=["cube", "bar"])
    engine = Engine(lambda e, batch: batch)
    metric.attach(engine, "dice")
    state = engine.run([([one_hot(p[None], 3)[0]], [one_hot(g[None], 3)[0]])], max_epochs=1)
    assert math.isnan(state.metrics["dice_bar"])
    assert state.metrics["dice"] == pytest.approx(_dice(p.numpy() == 1, g.numpy() == 1), abs=1e-5)
    with pytest.raises(ValueError, match="class_names"):
        PerClassDice(class_names="liver")


def test_case_metrics_writer_files_and_record(tmp_path):
    cases = [_blobs(s) for s in range(2)]
    same = cases[0][1]
    outputs = [
        [{"pred": one_hot(p[None], 3)[0], "label": one_hot(g[None], 3)[0]}] for p, g in cases
    ] + [[{"pred": one_hot(same[None], 3)[0], "label": one_hot(same[None], 3)[0]}]]
    engine = Engine(lambda e, batch: batch)
    writer = CaseMetricsWriter(tmp_path, ["cube", "bar"], record_path=tmp_path / "results.json", nsd_tolerance_mm=1.0)
    writer.attach(engine)
    engine.run(outputs, max_epochs=1)
    data = json.loads((tmp_path / "test_metrics.json").read_text())
    assert [c["case"] for c in data["cases"]] == ["case_0000", "case_0001", "case_0002"]
    for (p, g), case in zip(cases, data["cases"]):
        assert case["dice"]["cube"] == pytest.approx(_dice(p.numpy() == 1, g.numpy() == 1), abs=1e-5)
        assert case["dice"]["bar"] == pytest.approx(_dice(p.numpy() == 2, g.numpy() == 2), abs=1e-5)
        assert 0.0 <= case["nsd"]["cube"] <= 1.0
    assert data["cases"][2]["dice"] == {"cube": 1.0, "bar": 1.0}
    assert data["cases"][2]["nsd"] == {"cube": 1.0, "bar": 1.0}
    rows = (tmp_path / "test_metrics.csv").read_text().strip().splitlines()
    assert rows[0].split(",")[:4] == ["case", "image", "mean_dice", "dice_cube"] and len(rows) == 4
    record = read_run_record(tmp_path / "results.json")
    expected = np.mean([c["dice"]["cube"] for c in data["cases"]])
    assert record["test"]["per_class_dice"]["cube"] == pytest.approx(expected)
    assert record["test"]["n_cases"] == 3 and record["test"]["cases_csv"] == "test_metrics.csv"


def test_case_metrics_writer_rejects_wrong_channel_count(tmp_path):
    p, g = _blobs(0)
    engine = Engine(lambda e, batch: batch)
    CaseMetricsWriter(tmp_path, ["only_one"]).attach(engine)
    with pytest.raises(ValueError, match="expected 2"):
        engine.run([[{"pred": one_hot(p[None], 3)[0], "label": one_hot(g[None], 3)[0]}]], max_epochs=1)


def _train_step(net, opt):
    def step(engine, batch):
        opt.zero_grad()
        loss = net(batch).square().mean()
        loss.backward()
        opt.step()
        return loss.item()

    return step


def test_adapter_checkpoint_best_last_and_resume_after_kill(tmp_path):
    data = [torch.rand(1, 1, 8, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    scores = {1: 0.2, 2: 0.5, 3: 0.3}

    def make(resume: bool, stop_after: int | None):
        net = _lora()
        opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-2)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=3)
        trainer = Engine(_train_step(net, opt))
        evaluator = Engine(lambda e, b: None)
        evaluator.add_event_handler(Events.COMPLETED, lambda e: e.state.metrics.update(val=scores[trainer.state.epoch]))
        ckpt = AdapterCheckpoint(tmp_path / "adapter", net, optimizer=opt, lr_scheduler=sched, evaluator=evaluator,
                                 key_metric_name="val", resume=resume)
        ckpt.attach(trainer)
        trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: sched.step())
        trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: evaluator.run([0]))
        epochs: list[int] = []
        trainer.add_event_handler(Events.EPOCH_STARTED, lambda e: epochs.append(e.state.epoch))
        if stop_after is not None:  # a kill right after the checkpoint of this epoch
            trainer.add_event_handler(Events.EPOCH_COMPLETED(once=stop_after), lambda e: e.terminate())
        return net, opt, trainer, ckpt, epochs

    net, _, trainer, _, epochs = make(resume=False, stop_after=1)
    trainer.run(data, max_epochs=3)
    assert epochs == [1]
    info = json.loads((tmp_path / "adapter" / "last" / "checkpoint.json").read_text())
    assert info["epoch"] == 1 and info["iteration"] == 2
    saved = {k: v.clone() for k, v in net.state_dict().items() if "lora_" in k}

    net2, opt2, trainer2, ckpt2, epochs2 = make(resume=True, stop_after=None)
    loaded: dict[str, bool] = {}

    def check(engine):
        state = net2.state_dict()
        loaded["weights"] = all(torch.equal(state[k], v) for k, v in saved.items())
        loaded["optimizer"] = len(opt2.state) > 0

    trainer2.add_event_handler(Events.STARTED, check)
    trainer2.run(data, max_epochs=3)
    assert epochs2 == [2, 3] and ckpt2.resumed_from == 1
    assert loaded == {"weights": True, "optimizer": True}
    best = json.loads((tmp_path / "adapter" / "best" / "checkpoint.json").read_text())
    assert best["epoch"] == 2 and best["metric"] == pytest.approx(0.5)
    assert json.loads((tmp_path / "adapter" / "last" / "checkpoint.json").read_text())["epoch"] == 3
    assert not [p for p in (tmp_path / "adapter").iterdir() if p.name.startswith(".")]  # no temporary folders left
    # the adapter file holds adapters + head only, and loads back strictly
    fresh = _lora()
    load_adapter_folder(fresh, tmp_path / "adapter" / "last")
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in net2.state_dict().items())


def test_adapter_files_are_strict(tmp_path):
    net = _lora()
    save_adapter_folder(net, tmp_path / "r2")
    other = monai_peft.adapt(_net(), "lora", r=4, train_fully="head")
    with pytest.raises(ValueError, match="differ in shape"):
        load_adapter_folder(other, tmp_path / "r2")
    fewer = monai_peft.adapt(_net(), "lora", r=2)  # no trained head: file has more tensors than the model
    with pytest.raises(ValueError, match="tensors not in the model"):
        load_adapter_folder(fewer, tmp_path / "r2")
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        load_adapter_folder(net, tmp_path)
    engine = Engine(lambda e, b: None)
    AdapterLoader(tmp_path / "missing", net).attach(engine)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        engine.run([0], max_epochs=1)


def test_cost_meter_counts_volumes_and_writes_record(tmp_path):
    net = _net()
    opt = torch.optim.SGD(net.parameters(), lr=1e-3)
    batches = [{"image": torch.rand(b, 1, 8, 8, 8)} for b in (2, 2, 1)]
    trainer = Engine(lambda e, batch: _train_step(net, opt)(e, batch["image"]))
    meter = CostMeter("train", record_path=tmp_path / "results.json", skip_first=1)
    meter.attach(trainer)
    meter.attach(trainer)  # attaching twice registers once
    trainer.run(batches, max_epochs=1)
    cost = trainer.state.cost
    assert cost["train_volumes_timed"] == 3  # first batch (2 volumes) skipped as warm-up
    assert cost["train_s_per_volume"] > 0 and cost["train_peak_memory_gb"] > 0
    assert cost["memory_source"] == "cpu_peak_rss"
    assert read_run_record(tmp_path / "results.json")["costs"]["train_s_per_volume"] == pytest.approx(
        cost["train_s_per_volume"])
    with pytest.raises(ValueError, match="phase"):
        CostMeter("validation")


def test_parameter_report_and_frozen_fingerprint(tmp_path):
    model = _lora()
    engine = Engine(lambda e, b: None)
    handler = ParameterReportHandler(model, record_path=tmp_path / "results.json", report_path=tmp_path / "report.json",
                                     run_info={"method": "lora"})
    handler.attach(engine)
    engine.run([0], max_epochs=1)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    record = read_run_record(tmp_path / "results.json")
    assert record["method"] == "lora" and record["parameters"]["trainable"] == trainable
    assert record["frozen_backbone"]["unchanged"] is True
    assert json.loads((tmp_path / "report.json").read_text())["trainable"] == trainable

    before = frozen_fingerprint(model)
    frozen = next(p for p in model.parameters() if not p.requires_grad)

    def corrupt(e, b):
        with torch.no_grad():
            frozen.add_(1.0)

    engine2 = Engine(corrupt)
    ParameterReportHandler(model, record_path=tmp_path / "r2.json").attach(engine2)
    engine2.run([0], max_epochs=1)
    assert frozen_fingerprint(model) != before
    assert read_run_record(tmp_path / "r2.json")["frozen_backbone"]["unchanged"] is False


def test_run_record_tells_the_truth_about_the_frozen_backbone(tmp_path):
    """Full fine-tuning freezes nothing: no fingerprint. A frozen bfloat16 backbone is hashed by its bytes."""
    def net():
        return SegResNet(spatial_dims=3, init_filters=8, blocks_down=(1,), blocks_up=(), in_channels=1, out_channels=2)

    # pretraining (a plain network) and full fine-tuning (peft keeps idle frozen originals beside trained copies)
    for name, full in (("plain", net()), ("full", monai_peft.adapt(net(), "full"))):
        engine = Engine(lambda e, b: None)
        ParameterReportHandler(full, record_path=tmp_path / f"{name}.json").attach(engine)
        engine.run([0], max_epochs=1)
        assert read_run_record(tmp_path / f"{name}.json")["frozen_backbone"] is None, name
        assert frozen_fingerprint(full) is None and engine.state.frozen_unchanged is None
    head_only = monai_peft.adapt(net(), "head")  # the head (conv_final) trains as a copy; its idle original is not
    backbone = [n for n, p in head_only.named_parameters() if not p.requires_grad and "conv_final" not in n]
    assert frozen_fingerprint(head_only)["tensors"] == len(backbone) > 0

    half = monai_peft.adapt(_net(3), "lora", r=2).to(torch.bfloat16)  # every frozen tensor is in the forward path
    first = frozen_fingerprint(half)
    frozen = [p for p in half.parameters() if not p.requires_grad]
    assert first["tensors"] == len(frozen) and first["parameters"] == sum(p.numel() for p in frozen)
    with torch.no_grad():  # flip the lowest mantissa bit of one value: another hash
        frozen[0].view(-1).view(torch.int16)[0] ^= 1
    assert frozen_fingerprint(half)["sha256"] != first["sha256"]


def test_run_record_merges_nested_sections_atomically(tmp_path):
    path = tmp_path / "results.json"
    update_run_record(path, {"costs": {"train_s_per_volume": 2.1}, "method": "lora"})
    update_run_record(path, {"costs": {"inference_s_per_volume": float("nan")}})
    record = json.loads(path.read_text())
    assert record["costs"] == {"train_s_per_volume": 2.1, "inference_s_per_volume": None}
    assert record["method"] == "lora" and record["record_version"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        read_run_record(path)


def test_run_record_writer_tracks_best_epoch(tmp_path):
    engine = Engine(lambda e, b: None)
    values = iter([0.3, 0.6, 0.4])
    engine.add_event_handler(Events.COMPLETED, lambda e: e.state.metrics.update(
        {"val_mean_dice": next(values), "val_mean_dice_liver": 0.5}))
    writer = RunRecordWriter(tmp_path / "results.json")
    writer.attach(engine)
    for epoch in (1, 2, 3):
        engine.state.epoch = epoch - 1
        engine.run([0], max_epochs=epoch)
    section = read_run_record(tmp_path / "results.json")["validation"]
    assert section["mean_dice"] == pytest.approx(0.4) and section["best_mean_dice"] == pytest.approx(0.6)
    assert section["best_epoch"] == 2 and section["per_class_dice"] == {"liver": 0.5}
