"""``monai-peft example-data``: a TotalSegmentator-layout folder that the readers, bundles and nnU-Net converter take."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from monai_peft.cli import main
from monai_peft.data import ORGANS_17, merge_structures, read_meta, task_id_map, totalseg_datalist
from monai_peft.data.example import REAL_CASE_ID, SCANS_FOLDER, example_scan


@pytest.fixture(scope="module")
def example_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("example") / "data"
    assert main(["example-data", str(root), "--phantoms", "4", "--size", "16"]) == 0
    return root


def test_layout_splits_and_the_real_ct_against_totalsegmentators_own_label_map(example_dir):
    meta = {r["image_id"]: r["split"] for r in read_meta(example_dir)}
    assert meta == {"s0000": "train", "s0001": "train", "s0002": "val", "s0003": "test", REAL_CASE_ID: "test"}
    scan = example_scan("ct")
    total = task_id_map(scan.class_map, "total")
    # every TotalSegmentator structure has its file, as in the public dataset
    assert {p.name for p in (example_dir / REAL_CASE_ID / "segmentations").iterdir()} == {
        f"{n}.nii.gz" for n in total.values()}
    # the merged organs map equals TotalSegmentator's label map, id by id
    label, affine = merge_structures(example_dir / REAL_CASE_ID, "organs")
    reference = np.asanyarray(nib.load(scan.label).dataobj).astype(int)
    assert np.allclose(affine, nib.load(scan.image).affine)
    by_name = {n: i for i, n in total.items()}
    for k, name in enumerate(ORGANS_17, start=1):
        assert np.array_equal(label == k, reference == by_name[name]), name
    assert np.array_equal(np.asanyarray(nib.load(example_dir / REAL_CASE_ID / "ct.nii.gz").dataobj),
                          np.asanyarray(nib.load(scan.image).dataobj))
    assert {p.name for p in (example_dir / SCANS_FOLDER).iterdir()} >= {
        scan.image.name, scan.label.name, "class_map.json", "LICENSE"}
    # the readers take it as it is: the example_scans/ folder is no case
    items = totalseg_datalist(example_dir, "organs", cache_dir=example_dir.parent / "cache", progress=False)
    assert [d["case_id"] for d in items] == ["s0000", "s0001", "s0002", "s0003", REAL_CASE_ID]


def test_an_existing_folder_is_kept_unless_overwrite(example_dir, tmp_path):
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("keep")
    from monai_peft.data.example import write_example_dataset

    with pytest.raises(FileExistsError, match="mine exists and is not empty"):
        write_example_dataset(target, n_phantoms=1, shape=(8, 8, 8), real=False)
    assert (target / "notes.txt").read_text() == "keep"
    write_example_dataset(target, modality="mr", n_phantoms=0, overwrite=True)
    assert not (target / "notes.txt").exists() and (target / REAL_CASE_ID / "mri.nii.gz").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["mine"]  # no temporary folder left beside it
