"""benchmarks/real_adaptation.py: the MR split's leakage guards and a ``--quick`` smoke run (the learning-rate defaults
it sets: tests/test_defaults.py)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "real_adaptation.py"


def _benchmark():
    spec = importlib.util.spec_from_file_location("real_adaptation", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def test_mr_split_normalises_with_the_training_slab_only():
    ra = _benchmark()
    rng = np.random.default_rng(0)
    image = rng.uniform(0.0, 800.0, (7, 6, 20)).astype(np.float32)
    label = rng.integers(0, 4, (7, 6, 20))
    slabs, window = ra.split_mr(image, label, {"val": (0, 5), "train": (5, 15), "test": (15, 20)})
    assert window == pytest.approx(tuple(np.percentile(image[..., 5:15], ra.MR_PERCENTILES)))
    # slabs are the volume's slices, in order, without overlap or gap
    np.testing.assert_array_equal(np.concatenate([slabs[k]["label"][0] for k in ("val", "train", "test")], -1), label)
    # changing the held-out slabs' intensities changes neither the window nor the training input
    changed = image.copy()
    changed[..., :5] *= 40.0
    changed[..., 15:] -= 500.0
    slabs2, window2 = ra.split_mr(changed, label, {"val": (0, 5), "train": (5, 15), "test": (15, 20)})
    assert window2 == window
    np.testing.assert_array_equal(slabs2["train"]["image"], slabs["train"]["image"])
    assert not np.array_equal(slabs2["test"]["image"], slabs["test"]["image"])
    with pytest.raises(ValueError, match="overlap at slices \\[5, 6\\]"):
        ra.split_mr(image, label, {"train": (5, 15), "val": (0, 7)})
    with pytest.raises(ValueError, match="'test' = \\[15, 25\\) is not inside the 20 slices"):
        ra.split_mr(image, label, {"train": (5, 15), "test": (15, 25)})


def test_shared_classes_follow_the_thesis_mr_group_and_both_label_maps():
    ra = _benchmark()
    ct_ids = {1: "spleen", 2: "liver", 3: "lung_upper_lobe_left", 4: "aorta"}
    mr_ids = {1: "aorta", 2: "liver", 3: "lung_left", 4: "heart"}
    ct = np.array([0, 1, 2, 3, 4])
    mr = np.array([0, 1, 2, 3])  # no heart voxel: absent
    assert ra.shared_classes(ct, ct_ids, mr, mr_ids) == ["liver", "aorta"]  # Table 4.5 order, not the maps'


@pytest.mark.slow
def test_quick_run_writes_a_consistent_table_json_and_png(tmp_path):
    """About 20 s serial: tiny network, 2 steps, 2 learning rates per method, one seed, in one process."""
    run = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--workers", "1", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=600, cwd=REPO)
    assert run.returncode == 0, run.stderr[-3000:]
    res = json.loads((tmp_path / "real_adaptation.json").read_text())
    settings, grid, data = res["settings"], res["grid"], res["data"]
    assert settings["methods"] == ["full", "head", "convadapter", "lora", "ssf"]
    assert sorted((g["method"], json.dumps(g["options"]), g["lr"]) for g in grid) == sorted(
        (m, json.dumps(v), lr) for m in settings["methods"] for v in settings["variants"][m]
        for lr in settings["lr_grids"][m])
    assert settings["variants"]["convadapter"] == [{"gamma": g, "activation": a} for a in ("relu", "leakyrelu")
                                                   for g in (4, 2)]
    assert all(len(settings["lr_grids"][m]) == 2 for m in settings["methods"])

    # each slab's mean Dice is the mean of its scored classes' Dice (absent prediction = 0)
    for g in grid:
        for slab in ("val", "test"):
            per_class = g[f"{slab}_per_class"]
            assert set(per_class) == set(data["classes"])
            values = [per_class[c] or 0.0 for c in data["scored"][slab]]
            assert g[f"{slab}_dice"] == pytest.approx(float(np.mean(values)))
    # scored classes have the minimum volume in the slab and in the training slab
    min_voxels = int(np.ceil(settings["min_ml"] * 1000 / np.prod(settings["pixdim"])))
    for slab, names in data["scored"].items():
        assert names
        assert all(data["voxels"][slab][c] >= min_voxels and data["voxels"]["train"][c] >= min_voxels for c in names)

    rows = {r["method"]: r for r in res["rows"]}
    assert list(rows) == ["pretrained"] + settings["methods"]
    for method in settings["methods"]:
        row, points = rows[method], [g for g in grid if g["method"] == method]
        # fold A: the rate is chosen on the validation slab and scored on the test slab; fold B the other way round
        # (ConvAdapter's gamma and activation are chosen with the rate)
        for chosen, options, on, scored in (("lr", "options", "val", "test_dice"),
                                            ("lr_b", "options_b", "test", "val_dice_b")):
            best = max(g[f"{on}_dice"] for g in points)
            assert row[chosen] == min(g["lr"] for g in points if g[f"{on}_dice"] == best)
            at = next(g for g in points if g["lr"] == row[chosen] and g["options"] == row[options])
            assert at[f"{on}_dice"] == best
            assert row[scored] == at["test_dice" if on == "val" else "val_dice"]
        assert row["heldout_dice"] == pytest.approx(0.5 * (row["test_dice"] + row["val_dice_b"]))
        both = [g["val_dice"] + g["test_dice"] for g in points]
        assert row["default_lr"] == min(g["lr"] for g, v in zip(points, both) if v == max(both))
        assert row["trainable_percent"] == pytest.approx(100.0 * row["trainable"] / row["total"])
    for method, t in res["targets"].items():
        assert t["gap_to_full"] == pytest.approx(rows["full"]["heldout_dice"] - rows[method]["heldout_dice"])
    assert rows["full"]["trainable"] == rows["full"]["total"]
    # head only: the 1x1x1 output conv, weights + bias
    assert rows["head"]["trainable"] == (settings["filters"][0] + 1) * (len(data["classes"]) + 1)
    assert 0 < rows["ssf"]["trainable"] < rows["convadapter"]["trainable"] < rows["full"]["trainable"]

    # the printed table is the JSON's
    for method in settings["methods"]:
        line = next(ln for ln in run.stdout.splitlines() if ln.startswith(method + " "))
        assert f"{rows[method]['trainable']:,}" in line and f"{rows[method]['heldout_dice']:.3f}" in line
    # the docs' table is written beside the JSON
    table = (tmp_path / "real_adaptation.md").read_text()
    assert all(f"| {m} |" in table for m in settings["methods"])

    # every run was cached: a second invocation trains nothing and gives the same grid
    again = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--workers", "1", "--out", str(tmp_path)],
                           capture_output=True, text=True, timeout=600, cwd=REPO)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "step " not in again.stderr and again.stderr.count(", cached)") == len(res["runs"])
    res2 = json.loads((tmp_path / "real_adaptation.json").read_text())
    assert [(g["method"], g["options"], g["lr"], g["val_dice"], g["test_dice"]) for g in res2["grid"]] == [
        (g["method"], g["options"], g["lr"], g["val_dice"], g["test_dice"]) for g in grid]
    import matplotlib.image

    png = matplotlib.image.imread(str(tmp_path / "real_adaptation.png"))
    assert png.ndim == 3 and png.shape[0] > 300 and png.shape[1] > 800 and png.std() > 0.01
