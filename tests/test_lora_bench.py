"""The benchmarks under benchmarks/ run end to end (issue 12); their timings are printed, never asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO

BENCH = REPO / "benchmarks"


def _run(script: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(BENCH / script), *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
def test_bench_lora_conv_runs(tmp_path):
    proc = _run("bench_lora_conv.py", "--layers", "8x4", "--ranks", "2", "--batch", "1", "--warmup", "0",
                "--rounds", "1", "--out", str(tmp_path / "b"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(proc.stdout)
    (row,) = json.loads((tmp_path / "b.json").read_text())["layers"]
    assert sorted(row["ratio_vs_fft"]) == ["auto", "factored", "merged", "peft"]
    assert (tmp_path / "b.png").stat().st_size > 0
    bad = _run("bench_lora_conv.py", "--layers", "8by4")
    assert bad.returncode == 2 and bad.stderr.startswith("error: --layers takes CHANNELSxSIZE")


@pytest.mark.slow
def test_bench_methods_runs_on_cpu(tmp_path):
    """``python benchmarks/bench_methods.py --device cpu`` in its --quick form on SegResNet: four configurations,
    memory probes in subprocesses, inference merged and unmerged, adapter files (UNet3D runs the same code)."""
    proc = _run("bench_methods.py", "--device", "cpu", "--quick", "--networks", "segresnet", "--out",
                str(tmp_path / "m"), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(proc.stdout)
    result = json.loads((tmp_path / "m.json").read_text())
    assert result["settings"]["size"] == 16 and result["environment"]["device"] == "cpu"
    rows = result["networks"]["segresnet"]["rows"]
    assert list(rows) == ["fft", "convadapter", "lora r4 fused", "ssf +ckpt"]
    assert rows["fft"]["step_vs_fft"] == 1.0 and rows["fft"]["adapter_vs_checkpoint"] == 1.0
    assert rows["fft"]["trainable"] > 100 * rows["convadapter"]["trainable"] > 0
    assert all(r["peak_mb"] > 0 and len(r["step_s"]) == 1 for r in rows.values())
    # the adapter files hold adapters and the new head only (the ratio is a fact, not a timing)
    assert rows["convadapter"]["adapter_vs_checkpoint"] < 0.05
    assert rows["lora r4 fused"]["merged_infer_vs_base"] is not None  # LoRA merges, ConvAdapter does not
    assert rows["convadapter"]["merged_infer_vs_base"] is None and rows["convadapter"]["infer_vs_base"] is not None
    assert rows["ssf +ckpt"]["config"]["checkpointing"] == "full-resolution"
    assert (tmp_path / "m.png").stat().st_size > 0
    assert "| segresnet | convadapter |" in proc.stdout
    if not torch.cuda.is_available():
        bad = _run("bench_methods.py", "--device", "cuda")
        assert bad.returncode == 2 and bad.stderr.startswith("error: --device cuda: no CUDA device")


@pytest.mark.slow
def test_bench_nnunet_runs_on_cpu(tmp_path):
    """``benchmarks/bench_nnunet.py --quick``: the stock trainer and one PEFT trainer on the same phantom plans."""
    proc = _run("bench_nnunet.py", "--device", "cpu", "--quick", "--trainers", "nnUNetTrainerSSF", "--out",
                str(tmp_path / "n"), "--work", str(tmp_path / "work"), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(proc.stdout)
    result = json.loads((tmp_path / "n.json").read_text())
    rows = result["rows"]
    assert list(rows) == ["nnUNetTrainer", "nnUNetTrainerSSF"]
    assert rows["nnUNetTrainer"]["epoch_vs_stock"] == 1.0 and rows["nnUNetTrainer"]["file_vs_stock"] == 1.0
    assert 0 < rows["nnUNetTrainerSSF"]["trainable"] < rows["nnUNetTrainer"]["trainable"] / 100
    assert rows["nnUNetTrainerSSF"]["file_vs_stock"] < 0.05 and rows["nnUNetTrainerSSF"]["peak_mb"] > 0
    assert len(rows["nnUNetTrainerSSF"]["epoch_s"]) == 1 and result["data_s_per_epoch"] > 0
    assert result["plans"]["configuration"] == "3d_fullres" and (tmp_path / "n.png").stat().st_size > 0
    bad = _run("bench_nnunet.py", "--trainers", "nnUNetTrainerNoSuchThing", "--work", str(tmp_path / "work"))
    assert bad.returncode == 2  # one error line last (nnU-Net's imports may warn before it)
    assert bad.stderr.strip().splitlines()[-1].startswith("error: --trainers: no nnU-Net trainer class named")
