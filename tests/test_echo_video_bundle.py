"""The echonet_videomae_ef_peft bundle: pretrain (the documented command, in a subprocess), train, evaluate and
inference via ``monai.bundle.run``, offline metadata check and ``verify_net_in_out``; the CLI video commands."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "echonet_videomae_ef_peft"
SCHEMA = REPO / "bundles" / "schema" / "monai_peft_bundle_metadata.schema.json"
TINY = ("{'patch_size': 8, 'hidden_size': 16, 'num_hidden_layers': 1, 'num_attention_heads': 2, "
        "'intermediate_size': 32, 'decoder_hidden_size': 16, 'decoder_num_hidden_layers': 1, "
        "'decoder_num_attention_heads': 2, 'decoder_intermediate_size': 32}")


@pytest.fixture
def no_download(monkeypatch):
    import monai.apps.utils as apps_utils

    def _refuse(*args, **kwargs):
        raise AssertionError(f"verify_metadata tried to download: {args} {kwargs}")

    monkeypatch.setattr(apps_utils, "_download_with_progress", _refuse)
    monkeypatch.setattr(apps_utils, "urlopen", _refuse)


def test_metadata_verifies_offline(no_download):
    from monai.bundle import verify_metadata

    for rel in ("configs/metadata.json", "configs/pretrain.json", "configs/train.json", "configs/evaluate.json",
                "configs/inference.json", "configs/logging.conf", "docs/README.md", "LICENSE"):
        assert (BUNDLE / rel).is_file(), rel
    meta = json.loads((BUNDLE / "configs" / "metadata.json").read_text())
    assert (BUNDLE / meta["schema"]).resolve() == SCHEMA.resolve() and meta["version"] in meta["changelog"]
    verify_metadata(meta_file=str(BUNDLE / "configs" / "metadata.json"), filepath=str(SCHEMA))
    assert meta["network_data_format"]["inputs"]["image"]["spatial_shape"] == [16, 112, 112]


def _run(config: str | list[str], **overrides) -> None:
    from monai.bundle import run

    files = [str(BUNDLE / "configs" / c) for c in ([config] if isinstance(config, str) else config)]
    run(config_file=files, meta_file=str(BUNDLE / "configs" / "metadata.json"), bundle_root=str(BUNDLE), **overrides)


@pytest.mark.slow
def test_bundle_pretrain_train_evaluate_infer(tmp_path):
    from monai.bundle import verify_net_in_out

    from monai_peft.echo.video import ClipAverageInferer, build_video_ef_model, video_datalist, video_transforms
    from monai_peft.handlers import load_adapter_folder

    data, models = tmp_path / "echonet", tmp_path / "models"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(BUNDLE / "configs" / "pretrain.json"),
           "--meta_file", str(BUNDLE / "configs" / "metadata.json"), "--logging_file",
           str(BUNDLE / "configs" / "logging.conf"), "--bundle_root", str(BUNDLE), "--dataset_dir", str(data),
           "--output_dir", str(models), "--make_phantom", "true", "--phantom_videos", "10", "--phantom_frames", "12",
           "--phantom_size", "32", "--num_frames", "4", "--image_size", "32", "--epochs", "1", "--batch_size", "3",
           "--videomae_overrides", TINY]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert {"config.json", "model.safetensors"} <= {p.name for p in (models / "videomae").iterdir()}
    common = {"dataset_dir": str(data), "output_dir": str(models), "clips": 2, "batch_size": 3}
    _run("train.json", epochs=2, method_kwargs={"r": 2}, **common)
    run_dir = models / "ef_lora"
    record = json.loads((run_dir / "results.json").read_text())
    assert record["method"] == "lora" and record["frozen_backbone"]["unchanged"] is True
    assert 0 < record["parameters"]["trainable"] < record["parameters"]["total"]
    assert record["validation"]["all"]["n"] == 2 and record["costs"]["train_s_per_volume"] > 0
    assert {"best", "last"} <= {p.name for p in (run_dir / "adapter").iterdir()}
    _run(["train.json", "evaluate.json"], method_kwargs={"r": 2}, **common)
    record = json.loads((run_dir / "results.json").read_text())
    assert record["test"]["all"]["n"] == 2 and record["test"]["all"]["mae"] > 0
    assert (run_dir / "test_predictions.csv").is_file() and record["costs"]["inference_s_per_volume"] > 0
    _run("inference.json", method_kwargs={"r": 2}, **common)
    preds = json.loads((run_dir / "predictions.json").read_text())
    # the bundle's predictions are those of the saved files, rebuilt here from scratch
    model = build_video_ef_model(models / "videomae", "lora", r=2)
    load_adapter_folder(model, run_dir / "adapter" / "best")
    items = video_datalist(data, "TEST")
    assert sorted(preds) == sorted(d["name"] for d in items)
    tf = video_transforms(4, 2, 32, train=False, clips=2)
    with torch.no_grad():
        for d in items:
            ef = float(ClipAverageInferer()(tf(d)["image"][None], model.eval())[0, 0])
            assert preds[d["name"]] == pytest.approx(ef, abs=1e-4)
    verify_net_in_out(net_id="network_def", meta_file=str(BUNDLE / "configs" / "metadata.json"),
                      config_file=str(BUNDLE / "configs" / "inference.json"), bundle_root=str(BUNDLE),
                      output_dir=str(models), method_kwargs={"r": 2},
                      **{"_meta_#network_data_format#inputs#image#spatial_shape": [4, 32, 32]})


@pytest.mark.slow
def test_video_cli_commands(tmp_path, capsys):
    from monai_peft.cli import main

    data = tmp_path / "echonet"
    assert main(["echo", "phantom", "--layout", "echonet", "--out", str(data), "--num", "10", "--size", "32",
                 "--frames", "12", "--depth-mm", "110"]) == 0
    capsys.readouterr()
    clip = ["--frames", "4", "--stride", "2", "--image-size", "32", "--batch-size", "3", "--cache-rate", "1"]
    assert main(["echo", "video-pretrain", "--echonet", str(data), "--out", str(tmp_path / "pre"), "--tiny",
                 "--epochs", "1", *clip]) == 0
    assert json.loads(capsys.readouterr().out)["train_loss"][0] > 0
    ckpt = tmp_path / "pre" / "checkpoint"
    assert main(["echo", "video-train", "--checkpoint", str(ckpt), "--echonet", str(data), "--out",
                 str(tmp_path / "lp"), "--method", "head", "--epochs", "1", "--clips", "2", "--accumulation-steps", "2",
                 *clip]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["method"] == "head" and out["test"]["all"]["n"] == 2
    assert out["parameters"]["trainable"] == 2 * 32 + 32 + 1  # LayerNorm + linear of the 32-wide head: a linear probe
    assert main(["echo", "video-evaluate", "--run", str(tmp_path / "lp"), "--echonet", str(data), "--split", "VAL",
                 "--out", str(tmp_path / "val")]) == 0
    assert json.loads(capsys.readouterr().out)["all"]["n"] == 2
    videos = sorted(str(p) for p in (data / "Videos").glob("*.avi"))[:2]
    assert main(["echo", "video-predict", "--run", str(tmp_path / "lp"), "--videos", *videos, "--out",
                 str(tmp_path / "ef.json")]) == 0
    saved = json.loads((tmp_path / "ef.json").read_text())
    assert list(saved["videos"]) == [Path(v).stem for v in videos] and all(0 < v < 100 for v in saved["videos"].values())
    assert main(["echo", "video-train", "--checkpoint", "MCG-NJU/videomae-base", "--echonet", str(data), "--out",
                 str(tmp_path / "x")]) == 2
    assert "never downloads" in capsys.readouterr().err
    from safetensors.torch import load_file, save_file

    state = load_file(str(ckpt / "model.safetensors"))
    state["videomae.encoder.layer.0.output.dense.weight"] += 0.01
    save_file(state, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="differ from those"):  # the base weights changed since training
        main(["echo", "video-evaluate", "--run", str(tmp_path / "lp"), "--echonet", str(data)])
