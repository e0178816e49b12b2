"""benchmarks/bench_lora_conv.py runs end to end (issue 12.3); its timings are printed, never asserted."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from conftest import REPO


@pytest.mark.slow
def test_bench_lora_conv_runs(tmp_path):
    """The benchmark runs end to end (tiny settings); its timings are printed, never asserted."""
    spec = importlib.util.spec_from_file_location("bench_lora_conv", REPO / "benchmarks" / "bench_lora_conv.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    tiny = ["--size", "8", "--ranks", "2", "--warmup", "0", "--rounds", "1", "--out", str(tmp_path / "b")]
    assert bench.main(tiny) == 0
    result = json.loads((tmp_path / "b.json").read_text())
    assert list(result["methods"]) == ["fft", "frozen", "peft-r2", "fused-r2"]
    assert result["methods"]["fused-r2"]["trainable"] == result["methods"]["peft-r2"]["trainable"] > 0
    assert (tmp_path / "b.png").stat().st_size > 0
    assert bench.main(["--device", "cuda:0"] if not torch.cuda.is_available() else ["--rounds", "0"]) == 2
