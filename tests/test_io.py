"""monai_peft.io: atomic writers leave the whole new file or the untouched old one, and nothing else."""

from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest
import torch

from monai_peft.io import (
    atomic_path,
    atomic_replace_dir,
    atomic_save_figure,
    atomic_save_nifti,
    atomic_save_safetensors,
    atomic_torch_save,
    atomic_write_json,
    atomic_write_text,
    json_default,
)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _entries(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_atomic_path_writes_the_file_and_creates_parents(tmp_path):
    target = tmp_path / "a" / "b" / "out.txt"
    with atomic_path(target) as tmp:
        assert os.path.dirname(tmp) == str(target.parent), "the temporary file must be on the same file system"
        assert os.path.basename(tmp).startswith(".out.txt.") and tmp.endswith(".tmp")
        assert not target.exists()
        with open(tmp, "w") as f:
            f.write("hello")
    assert target.read_text() == "hello"
    assert _entries(target.parent) == ["out.txt"]


def test_atomic_path_keeps_a_requested_suffix(tmp_path):
    with atomic_path(tmp_path / "x.nii.gz", suffix=".nii.gz") as tmp:
        assert tmp.endswith(".nii.gz")
        open(tmp, "wb").close()
    assert _entries(tmp_path) == ["x.nii.gz"]


def test_exception_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "keep.json"
    target.write_text("old")
    seen = []
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_path(target) as tmp:
            seen.append(tmp)
            with open(tmp, "w") as f:
                f.write("half written")
            raise RuntimeError("boom")
    assert target.read_text() == "old"
    assert not os.path.exists(seen[0])
    assert _entries(tmp_path) == ["keep.json"]


def test_failed_first_write_leaves_nothing(tmp_path):
    with pytest.raises(TypeError):
        atomic_write_json(tmp_path / "bad.json", {"x": object()})
    assert _entries(tmp_path) == []


def test_result_is_readable_by_others(tmp_path):
    path = atomic_write_text(tmp_path / "shared.txt", "x")
    assert stat.S_IMODE(path.stat().st_mode) == 0o644 & ~_umask()
    old = os.umask(0o022)
    try:
        path = atomic_write_text(tmp_path / "shared2.txt", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # mkstemp alone would give 0o600


def test_text_overwrites(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("old")
    assert atomic_write_text(path, "new ünïcode\n") == path
    assert path.read_text(encoding="utf-8") == "new ünïcode\n"


def test_json_round_trip_and_options(tmp_path):
    data = {"b": 1, "a": [1.5, None, "x"], "nested": {"z": True}}
    path = atomic_write_json(tmp_path / "d.json", data)
    text = path.read_text()
    assert json.loads(text) == data
    assert text.endswith("\n") and text.startswith("{\n  ")
    sorted_text = atomic_write_json(tmp_path / "s.json", data, sort_keys=True).read_text()
    assert sorted_text.index('"a"') < sorted_text.index('"b"')
    with pytest.raises(ValueError):
        atomic_write_json(tmp_path / "nan.json", {"x": float("nan")}, allow_nan=False)
    assert not (tmp_path / "nan.json").exists()


def test_json_default_handles_numpy_torch_and_paths(tmp_path):
    data = {"f": np.float32(0.5), "i": np.int64(3), "arr": np.arange(3), "t": torch.tensor(2.0),
            "tt": torch.tensor([1, 2]), "p": tmp_path / "x"}
    path = atomic_write_json(tmp_path / "d.json", data, default=json_default)
    assert json.loads(path.read_text()) == {"f": 0.5, "i": 3, "arr": [0, 1, 2], "t": 2.0, "tt": [1, 2],
                                           "p": str(tmp_path / "x")}
    with pytest.raises(TypeError, match="object"):
        json_default(object())


def test_torch_round_trip(tmp_path):
    state = {"w": torch.randn(3, 4), "epoch": 7}
    path = atomic_torch_save(state, tmp_path / "ckpt" / "state.pt")
    loaded = torch.load(path, weights_only=True)
    assert loaded["epoch"] == 7 and torch.equal(loaded["w"], state["w"])
    assert _entries(path.parent) == ["state.pt"]


def test_safetensors_round_trip_with_metadata(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    tensors = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(2, dtype=torch.int64)}
    path = atomic_save_safetensors(tensors, tmp_path / "w.safetensors", metadata={"format": "pt", "k": "v"})
    loaded = load_file(str(path))
    assert all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"format": "pt", "k": "v"}
    assert _entries(tmp_path) == ["w.safetensors"]


@pytest.mark.parametrize("name, magic", [("fig.png", b"\x89PNG"), ("fig.pdf", b"%PDF"), ("noext", b"\x89PNG")])
def test_figure_format_follows_the_extension(tmp_path, name, magic):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2, 2))
    ax.plot([0, 1], [0, 1])
    try:
        path = atomic_save_figure(fig, tmp_path / name, dpi=50)
    finally:
        plt.close(fig)
    assert path.read_bytes()[:4] == magic
    assert _entries(tmp_path) == [name]


@pytest.mark.parametrize("name, gzipped", [("img.nii.gz", True), ("img.nii", False)])
def test_nifti_round_trip(tmp_path, name, gzipped):
    import nibabel as nib

    data = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    affine = np.diag([1.5, 2.0, 3.0, 1.0])
    path = atomic_save_nifti(nib.Nifti1Image(data, affine), tmp_path / name)
    assert (path.read_bytes()[:2] == b"\x1f\x8b") == gzipped
    img = nib.load(path)
    np.testing.assert_array_equal(np.asarray(img.dataobj), data)
    np.testing.assert_allclose(img.affine, affine)
    assert _entries(tmp_path) == [name]


def test_nifti_rejects_other_names(tmp_path):
    import nibabel as nib

    with pytest.raises(ValueError, match=r"img\.mha"):
        atomic_save_nifti(nib.Nifti1Image(np.zeros((2, 2, 2)), np.eye(4)), tmp_path / "img.mha")
    assert _entries(tmp_path) == []


def test_replace_dir_into_a_new_place(tmp_path):
    tmp = tmp_path / ".out.tmp"
    tmp.mkdir()
    (tmp / "a.txt").write_text("new")
    final = atomic_replace_dir(tmp, tmp_path / "out")
    assert (final / "a.txt").read_text() == "new"
    assert _entries(tmp_path) == ["out"]


def test_replace_dir_swaps_an_existing_folder(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    (final / "old_only.txt").write_text("old")
    (final / "a.txt").write_text("old")
    (tmp_path / ".out.old").mkdir()  # stale leftover of an interrupted swap
    tmp = tmp_path / ".out.tmp"
    tmp.mkdir()
    (tmp / "a.txt").write_text("new")
    atomic_replace_dir(tmp, final)
    assert _entries(final) == ["a.txt"] and (final / "a.txt").read_text() == "new"
    assert _entries(tmp_path) == ["out"]
