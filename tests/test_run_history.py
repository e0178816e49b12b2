"""Per-epoch history in the run record and ``monai-peft curves`` (thesis Figures 5.1-5.4, 5.6-5.8)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from monai.data import DataLoader, Dataset
from monai.networks.nets import SegResNet
from PIL import Image

import monai_peft
from monai_peft.analysis.curves import load_curves, plot_curves
from monai_peft.cli import main
from monai_peft.data import make_phantom
from monai_peft.workflows import build_evaluator, build_trainer, read_run_record

CLASSES = ["liver", "stomach"]


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


def _run(out, epochs: int, resume: bool = False, val_interval: int = 1):
    torch.manual_seed(0)
    net = SegResNet(spatial_dims=3, init_filters=8, in_channels=1, out_channels=3, blocks_down=(1, 1), blocks_up=(1,))
    model = monai_peft.adapt(net, "ssf", train_fully="head")
    evaluator = build_evaluator(model, DataLoader(Dataset(_cases([9])), batch_size=1), CLASSES,
                                record_path=out / "results.json", progress=False)
    trainer = build_trainer(model, DataLoader(Dataset(_cases([1, 2])), batch_size=1), epochs, out, lr=1e-2,
                            evaluator=evaluator, val_interval=val_interval, resume=resume,
                            run_info={"method": "ssf", "preset": "tiny-ssf"}, progress=False, log_stats=False)
    trainer.run()
    return trainer, evaluator


def test_history_has_one_entry_per_epoch_and_survives_resume(tmp_path):
    trainer, evaluator = _run(tmp_path, 3, val_interval=2)
    history = read_run_record(tmp_path / "results.json")["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3]
    # cosine annealing over 3 epochs from 1e-2: the lr each epoch trained with
    assert [h["lr"] for h in history] == pytest.approx([1e-2, 0.75e-2, 0.25e-2])
    assert all(h["train_loss"] > 0 and h["seconds"] > 0 for h in history)
    assert history[2]["elapsed_seconds"] >= history[1]["elapsed_seconds"] >= history[0]["elapsed_seconds"]
    assert "val_mean_dice" not in history[0] and "val_mean_dice" not in history[2]  # validated in epoch 2 only
    assert history[1]["val_mean_dice"] == pytest.approx(evaluator.state.metrics["val_mean_dice"])
    assert set(history[1]["val_per_class_dice"]) == set(CLASSES)
    # a resumed run continues the history: entries up to the checkpoint stay, later ones are rewritten
    before = history[:3]
    _run(tmp_path, 5, resume=True, val_interval=2)
    resumed = read_run_record(tmp_path / "results.json")["history"]
    assert [h["epoch"] for h in resumed] == [1, 2, 3, 4, 5] and resumed[:3] == before
    assert resumed[3]["elapsed_seconds"] > before[2]["elapsed_seconds"]


def _record(folder, preset, dice, fraction=None, task=None):
    folder.mkdir(parents=True)
    history = [{"epoch": e + 1, "train_loss": 1.0 / (e + 1), "lr": 1e-3, "seconds": 60.0,
                "elapsed_seconds": 3600.0 * (e + 1), "val_mean_dice": d} for e, d in enumerate(dice)]
    record = {"method": preset.split("-")[1], "preset": preset, "history": history}
    if fraction is not None:
        record["data_fraction"] = fraction
    if task is not None:
        record["task"] = task
    (folder / "results.json").write_text(json.dumps(record))
    return folder


def test_curves_command_plots_runs_and_panels(tmp_path, capsys):
    full = _record(tmp_path / "runs" / "full", "segresnet-full-finetune", [0.5, 0.8, 0.85])
    ca = _record(tmp_path / "runs" / "ca", "segresnet-convadapter-resblock-parallel", [0.3, 0.7, 0.82])
    _record(tmp_path / "runs" / "ca10", "segresnet-convadapter-resblock-parallel", [0.2, 0.6], fraction=0.1)
    assert main(["curves", str(full), str(ca / "results.json"), "-o", str(tmp_path / "c.png")]) == 0
    printed = capsys.readouterr().out
    assert "segresnet-full-finetune" in printed and "0.850" in printed and "0.820" in printed
    with Image.open(tmp_path / "c.png") as png:
        assert png.size[0] > 400
    curves = load_curves([tmp_path / "runs"])
    assert sorted(c.label for c in curves) == ["segresnet-convadapter-resblock-parallel",
                                               "segresnet-convadapter-resblock-parallel (10% data)",
                                               "segresnet-full-finetune"]
    xs, ys = curves[0].points(x="hours")
    assert xs == [1.0, 2.0, 3.0][: len(xs)]
    # Figure 5.6: one panel per data size
    assert main(["curves", str(tmp_path / "runs"), "--panels", "data_fraction", "--x", "hours",
                 "-o", str(tmp_path / "p.png"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert len(result["runs"]) == 3 and result["runs"][0]["best"] is not None
    with Image.open(tmp_path / "p.png") as one, Image.open(tmp_path / "c.png") as other:
        assert one.size[0] > 1.5 * other.size[0]  # two panels side by side
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "results.json").write_text(json.dumps({"method": "full"}))
    with pytest.raises(ValueError, match=r"bare.*results\.json: run record has no 'history'"):
        load_curves([tmp_path / "bare"])
    with pytest.raises(ValueError, match="x must be one of"):
        plot_curves(curves, tmp_path / "x.png", x="minutes")
