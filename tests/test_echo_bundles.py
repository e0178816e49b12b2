"""The echo bundles run train / evaluate / inference on phantoms via ``python -m monai.bundle run``.

Two runs are subprocesses (pretraining, and CAMUS inference, which also proves that the adapter files reload
in a fresh process); the others call ``monai.bundle.run`` in-process (the same entry point) to stay in the
CI time budget.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
PRETRAIN = REPO / "bundles" / "echo_segformer_pretrain"
MULTITASK = REPO / "bundles" / "camus_segformer_lora_multitask"
TINY = "{'hidden_sizes': [8, 16, 32, 64], 'decoder_hidden_size': 16, 'num_attention_heads': [1, 1, 2, 2]}"
SMALL_HEAD = {"conv_channels": [8, 16, 16], "fc_features": [32, 16]}


def _cli(bundle: Path, config: str, **overrides) -> list[str]:
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(bundle / "configs" / config),
           "--meta_file", str(bundle / "configs" / "metadata.json"),
           "--logging_file", str(bundle / "configs" / "logging.conf"), "--bundle_root", str(bundle)]
    for k, v in overrides.items():
        cmd += [f"--{k}", str(v)]
    return cmd


def _inprocess(bundle: Path, config: str, **overrides) -> None:
    from monai.bundle import run

    run(config_file=str(bundle / "configs" / config), meta_file=str(bundle / "configs" / "metadata.json"),
        bundle_root=str(bundle), **overrides)


def _subprocess(cmd: list[str], cwd: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.slow
def test_bundles_on_phantoms(tmp_path):
    from monai_peft.echo import EchoPredictor, find_camus, load_camus_record

    import jsonschema
    import SimpleITK as sitk

    schema = json.loads((REPO / "bundles" / "schema" / "monai_peft_bundle_metadata.schema.json").read_text())
    for bundle in (PRETRAIN, MULTITASK):
        jsonschema.validate(json.loads((bundle / "configs" / "metadata.json").read_text()), schema)
        assert all((bundle / f).is_file() for f in ("LICENSE", "docs/README.md", "configs/logging.conf"))

    models = tmp_path / "models"
    echonet, camus = tmp_path / "echonet", tmp_path / "camus"
    # 1. pretraining on EchoNet-like phantoms (subprocess, the documented command)
    _subprocess(_cli(PRETRAIN, "train.json", dataset_dir=echonet, output_dir=models, make_phantom=True,
                     phantom_videos=5, image_size=64, epochs=2, batch_size=4, segformer_overrides=TINY),
                tmp_path)
    backbone = models / "backbone"
    assert {"backbone.safetensors", "backbone.json", "head.safetensors"} <= {p.name for p in backbone.iterdir()}
    _inprocess(PRETRAIN, "evaluate.json", dataset_dir=str(echonet), output_dir=str(models))
    ev = json.loads((models / "eval_metrics.json").read_text())
    assert ev["task"] == "lv_segmentation" and ev["all"]["n"] == 4
    per_class = [v for k, v in ev["all"].items() if k.startswith("dice_")]
    assert per_class and ev["all"]["mean_dice"] == pytest.approx(np.mean(per_class))  # the mean of its classes
    _inprocess(PRETRAIN, "inference.json", dataset_dir=str(echonet), output_dir=str(models),
               prediction_dir=str(tmp_path / "lv_pred"))
    assert len(json.loads((tmp_path / "lv_pred" / "predictions.json").read_text())["frames"]) == 2

    # 2. task adapters on the pretrained backbone; the task is chosen by override
    common = {"dataset_dir": str(camus), "backbone_dir": str(backbone), "output_dir": str(models)}
    _inprocess(MULTITASK, "train.json", task="segmentation", make_phantom=True, phantom_patients=5, epochs=1,
               batch_size=4, lora_layers="all", lora_rank=2, **common)
    _inprocess(MULTITASK, "train.json", task="volume", epochs=1, batch_size=4, head_kwargs=SMALL_HEAD, **common)
    for task in ("segmentation", "volume"):
        assert (models / "adapters" / task / "adapter_model.safetensors").is_file()
    cfg = json.loads((models / "adapters" / "segmentation" / "adapter_config.json").read_text())
    assert cfg["r"] == 2 and cfg["peft_type"] == "LORA"
    _inprocess(MULTITASK, "evaluate.json", task="volume", **common)
    metrics = json.loads((models / "eval_volume.json").read_text())
    assert metrics["all"]["mae"] > 0 and metrics["all"]["n"] == 4

    # 3. multi-task inference in a fresh process == in-process predictions from the same files
    pred_dir = tmp_path / "pred"
    _subprocess(_cli(MULTITASK, "inference.json", prediction_dir=pred_dir, tasks="['segmentation', 'volume']",
                     **common), tmp_path)
    report = json.loads((pred_dir / "predictions.json").read_text())
    assert report["tasks"] == ["segmentation", "volume"] and list(report["patients"]) == ["patient0005"]
    predictor = EchoPredictor(backbone, [models / "adapters" / "segmentation", models / "adapters" / "volume"])
    recs = {(r.view, r.phase): r for r in find_camus(camus, "testing")}
    entry = report["patients"]["patient0005"]
    for (view, phase), rec in recs.items():
        here = predictor.predict(load_camus_record(rec)["image"])
        assert entry[f"{view}_{phase}"]["volume"] == here["volume"]  # bit-identical after a fresh reload
        mask = sitk.GetArrayFromImage(sitk.ReadImage(str(pred_dir / entry[f"{view}_{phase}"]["segmentation"])))
        np.testing.assert_array_equal(mask, here["segmentation"])
    assert {"EDV", "ESV", "EF"} <= set(entry["volume_adapter"]) and entry["dataset"]["EDV"] > 0
