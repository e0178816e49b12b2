"""TotalSegmentator data: class maps, reader + label cache, splits, transforms, phantoms; real example CT/MR."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from monai_peft.data import (
    MR_ORGANS_29,
    ORGANS_17,
    VERTEBRAE_25,
    cached_label_map,
    class_group,
    import_multilabel_case,
    label_names,
    make_phantom,
    merge_structures,
    meta_split,
    random_split,
    read_meta,
    remap_label_map,
    subset_split,
    task_id_map,
    totalseg_datalist,
    train_transforms,
    val_transforms,
    write_phantom_dataset,
)

EXAMPLE = Path(__file__).resolve().parents[1] / "monai_peft" / "data" / "totalseg_example"
CLASS_MAP = EXAMPLE / "class_map.json"


# ----------------------------------------------------------------------------------------------- class maps
def test_class_groups_match_thesis_tables_and_totalsegmentator_names():
    total, total_mr = task_id_map(CLASS_MAP, "total"), task_id_map(CLASS_MAP, "total_mr")
    assert len(ORGANS_17) == 17 and len(VERTEBRAE_25) == 25 and len(MR_ORGANS_29) == 29
    assert set(ORGANS_17) <= set(total.values()) and set(VERTEBRAE_25) <= set(total.values())
    assert list(MR_ORGANS_29) == [total_mr[i] for i in range(1, 30)]  # Table 4.5 order = total_mr ids 1..29
    # Table 4.2 order: 1 spleen, 5 liver, 7 aorta, 9 portal/splenic vein, 17 middle lobe
    assert (ORGANS_17[0], ORGANS_17[4], ORGANS_17[6], ORGANS_17[8], ORGANS_17[16]) == (
        "spleen", "liver", "aorta", "portal_vein_and_splenic_vein", "lung_middle_lobe_right")
    # Table 4.4: S1 first, C1 last, T12 seventh
    assert (VERTEBRAE_25[0], VERTEBRAE_25[6], VERTEBRAE_25[-1]) == ("vertebrae_S1", "vertebrae_T12", "vertebrae_C1")
    assert class_group("organs") == list(ORGANS_17) and class_group("mr_organs_29") == list(MR_ORGANS_29)
    assert class_group(["liver", "spleen"]) == ["liver", "spleen"]
    assert label_names("vertebrae")[25] == "vertebrae_C1" and label_names("organs")[0] == "background"
    with pytest.raises(ValueError, match="unknown class group or structure 'organz'; did you mean 'organs'"):
        class_group("organz")
    with pytest.raises(ValueError, match="duplicated.*liver"):
        class_group(["liver", "liver"])
    with pytest.raises(KeyError, match="total_ct"):
        task_id_map(CLASS_MAP, "total_ct")


# -------------------------------------------------------------------------------------- phantoms + reader
@pytest.fixture(scope="module")
def phantom_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("totalseg_phantom")
    assert write_phantom_dataset(root, n_cases=3, shape=(24, 24, 24), seed=0) == ["s0000", "s0001", "s0002"]
    return root


def test_phantom_is_ct_like():
    image, label, names = make_phantom((32, 32, 32), seed=3)
    inv = {n: i for i, n in names.items()}
    assert image.min() < -900 and image.max() > 300  # air and bone
    assert abs(np.median(image[label == inv["liver"]]) - 60) < 20  # liver ~60 HU
    assert np.median(image[label == inv["lung_upper_lobe_left"]]) < -700
    assert sum(n.startswith("vertebrae_") for n in names.values()) == 5
    assert all((label == i).any() for i in names)  # every structure drawn at 32^3
    mr, mr_label, mr_names = make_phantom((24, 24, 24), seed=3, modality="mr")
    assert mr.min() >= 0 and "vertebrae" in mr_names.values() and set(mr_names.values()) <= set(MR_ORGANS_29)


def test_reader_turns_phantom_folder_into_class_ids(phantom_root, tmp_path):
    data = totalseg_datalist(phantom_root, "organs", cache_dir=tmp_path / "cache", progress=False)
    assert [d["case_id"] for d in data] == ["s0000", "s0001", "s0002"]
    for i, item in enumerate(data):
        _, truth, names = make_phantom((24, 24, 24), seed=i)
        expected = remap_label_map(truth, names, "organs")
        if i % 2 == 1:  # odd phantoms have no gallbladder
            expected[expected == ORGANS_17.index("gallbladder") + 1] = 0
        label = np.asanyarray(nib.load(item["label"]).dataobj)
        assert label.dtype == np.uint8 and np.array_equal(label, expected)
        assert np.allclose(nib.load(item["label"]).affine, nib.load(item["image"]).affine)
    assert (label == ORGANS_17.index("liver") + 1).sum() > 50
    vert = totalseg_datalist(phantom_root, "vertebrae", cache_dir=tmp_path / "cache", progress=False)
    vlabel = np.asanyarray(nib.load(vert[0]["label"]).dataobj)
    _, truth, names = make_phantom((24, 24, 24), seed=0)
    assert np.array_equal(vlabel, remap_label_map(truth, names, "vertebrae"))
    assert 5 <= len(np.unique(vlabel)) <= 6 and vlabel.max() <= 25


def test_missing_structure_is_absent_and_cache_follows(phantom_root, tmp_path):
    case = tmp_path / "s0000"
    (case / "segmentations").mkdir(parents=True)
    os.link(phantom_root / "s0000" / "ct.nii.gz", case / "ct.nii.gz")
    for f in (phantom_root / "s0000" / "segmentations").iterdir():
        os.link(f, case / "segmentations" / f.name)
    cache = tmp_path / "cache"
    first = cached_label_map(case, "organs", cache)
    full = np.asanyarray(nib.load(first).dataobj).copy()
    stamp = first.stat().st_mtime_ns
    assert cached_label_map(case, "organs", cache).stat().st_mtime_ns == stamp  # cache hit: not rewritten
    liver = ORGANS_17.index("liver") + 1
    assert (full == liver).any()
    time.sleep(0.01)
    (case / "segmentations" / "liver.nii.gz").unlink()
    again = np.asanyarray(nib.load(cached_label_map(case, "organs", cache)).dataobj)
    assert not (again == liver).any()
    assert np.array_equal(again[full != liver], full[full != liver])
    custom = cached_label_map(case, ["spleen", "kidney_left"], cache)  # another group, another file
    assert custom != first and set(np.unique(nib.load(custom).dataobj)) <= {0, 1, 2}


def test_mask_on_other_grid_is_an_error(phantom_root, tmp_path):
    case = tmp_path / "s0009"
    (case / "segmentations").mkdir(parents=True)
    os.link(phantom_root / "s0000" / "ct.nii.gz", case / "ct.nii.gz")
    nib.save(nib.Nifti1Image(np.ones((24, 24, 24), np.uint8), np.diag([3.0, 3.0, 3.0, 1.0])),
             case / "segmentations" / "spleen.nii.gz")
    with pytest.raises(ValueError, match=r"(?s)spleen\.nii\.gz.*differs from.*ct\.nii\.gz"):
        merge_structures(case, "organs")
    nib.save(nib.Nifti1Image(np.ones((24, 24, 20), np.uint8), np.diag([1.5, 1.5, 1.5, 1.0])),
             case / "segmentations" / "spleen.nii.gz")
    with pytest.raises(ValueError, match=r"spleen\.nii\.gz: grid \(24, 24, 20\)"):
        merge_structures(case, "organs")
    with pytest.raises(FileNotFoundError, match="s0404"):
        totalseg_datalist(phantom_root, case_ids=["s0404"], cache_dir=tmp_path / "c", progress=False)


# -------------------------------------------------------------------------------------------------- splits
def test_splits(phantom_root):
    s = random_split(list(range(1228)), seed=0)
    assert [len(s[k]) for k in ("train", "val", "test")] == [859, 245, 124]  # thesis 4.2.2.1
    assert sorted(s["train"] + s["val"] + s["test"]) == list(range(1228))
    assert random_split(list(range(1228)), seed=0) == s and random_split(list(range(1228)), seed=1) != s
    for frac, n, n_train in ((0.1, 110, 88), (0.5, 552, 441)):  # thesis 4.2.5.2 / Table 5.6: 88/22, 441/111
        sub = subset_split(s, frac, seed=0)
        assert len(sub["train"]) + len(sub["val"]) == n and len(sub["train"]) == n_train
        assert sub["test"] == s["test"] and set(sub["train"]) <= set(s["train"] + s["val"])
        assert not set(sub["train"]) & set(sub["val"])
    meta = read_meta(phantom_root)
    assert [r["image_id"] for r in meta] == ["s0000", "s0001", "s0002"]
    items = [{"case_id": c, "image": f"/x/{c}/ct.nii.gz"} for c in ("s0002", "s0000", "s0001")]
    split = meta_split(items, phantom_root)
    assert [d["case_id"] for d in split["train"]] == ["s0000", "s0001"] and split["val"][0]["case_id"] == "s0002"
    with pytest.raises(KeyError, match="s0077"):
        meta_split(["s0077"], meta)
    with pytest.raises(ValueError, match="fractions"):
        random_split([1, 2], fractions=(0.5, 0.6, 0.1))


# -------------------------------------------------------------------------------- real example CT and MR
@pytest.fixture(scope="module")
def real_cases(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("totalseg_real")
    import_multilabel_case(EXAMPLE / "example_ct_sm.nii.gz", EXAMPLE / "example_seg.nii.gz",
                           task_id_map(CLASS_MAP, "total"), root / "s0000", modality="ct")
    import_multilabel_case(EXAMPLE / "example_mr_sm.nii.gz", EXAMPLE / "example_seg_mr.nii.gz",
                           task_id_map(CLASS_MAP, "total_mr"), root / "s0001", modality="mr")
    return root


def test_reader_on_real_example_ct_and_mr(real_cases, tmp_path):
    seg = np.asanyarray(nib.load(EXAMPLE / "example_seg.nii.gz").dataobj).astype(int)
    total = task_id_map(CLASS_MAP, "total")
    label, affine = merge_structures(real_cases / "s0000", "organs")
    assert np.allclose(affine, nib.load(EXAMPLE / "example_ct_sm.nii.gz").affine)
    for k, name in enumerate(ORGANS_17, start=1):
        task_id = next(i for i, n in total.items() if n == name)
        assert np.array_equal(label == k, seg == task_id), name
    present = {ORGANS_17[k - 1] for k in np.unique(label) if k}
    assert {"liver", "spleen", "kidney_left", "aorta"} <= present
    # MR: Table 4.5 ids are total_mr ids 1..29, so the merged map equals the seg where id <= 29
    mr_seg = np.asanyarray(nib.load(EXAMPLE / "example_seg_mr.nii.gz").dataobj).astype(int)
    data = totalseg_datalist(real_cases, "mr_organs", cache_dir=tmp_path, modality="mr", progress=False)
    assert [d["case_id"] for d in data] == ["s0001"]
    mr_label = np.asanyarray(nib.load(data[0]["label"]).dataobj)
    assert np.array_equal(mr_label, np.where(mr_seg <= 29, mr_seg, 0)) and mr_label.max() > 0


def test_transforms_on_real_ct(real_cases, tmp_path):
    item = totalseg_datalist(real_cases, "organs", cache_dir=tmp_path, modality="ct", progress=False)[0]
    raw = np.asanyarray(nib.load(item["label"]).dataobj)
    out = val_transforms(roi_size=(48, 48, 32), pixdim=(3.0, 3.0, 3.0))(item)
    img, lab = out["image"], out["label"]
    assert img.shape == (1, 48, 48, 32) and lab.shape == (1, 48, 48, 32)
    assert float(img.min()) >= 0.0 and float(img.max()) <= 1.0 and float(img.max()) > 0.9
    assert set(np.unique(lab.numpy()).astype(int)) <= set(np.unique(raw).tolist())
    assert (lab == ORGANS_17.index("liver") + 1).sum() > 100  # nearest-neighbour labels survive
    # windowing: (HU + 175) / 425, checked on the soft-tissue voxels of the liver
    liver_mean = float(img[lab == ORGANS_17.index("liver") + 1].mean())
    assert 0.3 < liver_mean < 0.8
    torch.manual_seed(0)
    tr = train_transforms(roi_size=(32, 32, 32), pixdim=(3.0, 3.0, 3.0), rotate90_prob=1.0, shift_prob=1.0)(item)
    assert tr["image"].shape == (1, 32, 32, 32) and isinstance(tr["image"], torch.Tensor)
    assert set(np.unique(tr["label"].numpy()).astype(int)) <= set(np.unique(raw).tolist())


def test_transforms_on_real_mr_reorient_lps_to_ras(real_cases, tmp_path):
    item = totalseg_datalist(real_cases, "mr_organs", cache_dir=tmp_path, modality="mr", progress=False)[0]
    out = val_transforms(roi_size=None, pixdim=(3.0, 3.0, 3.0), intensity="percentile")(item)
    img = out["image"]
    assert float(img.min()) >= 0.0 and float(img.max()) <= 1.0
    codes = nib.aff2axcodes(img.affine.numpy())
    assert codes == ("R", "A", "S")
    assert img.shape[1:] == out["label"].shape[1:] and out["label"].max() > 0
    with pytest.raises(ValueError, match="intensity"):
        val_transforms(intensity="zscore")


# ------------------------------------------------------------------------ mistakes are errors, not empty classes
def test_unknown_structure_names_are_errors_with_the_closest_names(phantom_root, tmp_path):
    with pytest.raises(ValueError, match=r"'livr' \(did you mean 'liver'\?\)"):
        class_group(["livr", "spleen"])
    with pytest.raises(ValueError, match="did you mean 'spleen'"):
        class_group("splen")
    assert class_group("liver") == ["liver"]  # one structure is a group of one
    with pytest.raises(ValueError, match=r"'livr' \(did you mean 'liver'\?\)"):
        totalseg_datalist(phantom_root, ["livr", "spleen"], cache_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="did you mean 'liver'"):
        merge_structures(phantom_root / "s0000", ["livr"])
    # a dataset of one's own: a structure with mask files is a valid name, and a name in no case is not
    own = tmp_path / "own" / "s0000"
    shutil.copytree(phantom_root / "s0000", own)
    shutil.copy(own / "segmentations" / "liver.nii.gz", own / "segmentations" / "liver_tumour.nii.gz")
    label, _ = merge_structures(own, ["spleen", "liver_tumour"])
    liver = np.asanyarray(nib.load(own / "segmentations" / "liver.nii.gz").dataobj) > 0
    assert np.array_equal(label == 2, liver)
    with pytest.raises(ValueError, match="no case has segmentations/<name>.nii.gz for any of the 2 classes"):
        totalseg_datalist(own.parent, ["prostate", "urinary_bladder"], cache_dir=tmp_path, progress=False)


def test_label_values_outside_the_class_map_are_errors_naming_the_file(tmp_path):
    total = task_id_map(CLASS_MAP, "total")
    label = np.zeros((4, 4, 4), np.uint8)
    label[0, 0, 0], label[1, 1, 1] = 5, 200  # 5 = liver; 200 is no id of the 117-class map
    with pytest.raises(ValueError, match=r"seg\.nii\.gz: label values \[200\] are not ids of the class map"):
        remap_label_map(label, total, "organs", source="seg.nii.gz")
    label[1, 1, 1] = 0
    remapped = remap_label_map(label, total, "organs")
    assert remapped[0, 0, 0] == ORGANS_17.index("liver") + 1 and remapped.sum() == remapped[0, 0, 0]
    # the MR task has no lung lobes: the organs group is not all there, and a misspelt name is no structure at all
    with pytest.raises(ValueError, match="'livr'"):
        remap_label_map(label, task_id_map(CLASS_MAP, "total_mr"), ["livr"])
    with pytest.raises(ValueError, match="the class map names none of the 2 classes"):
        remap_label_map(label, task_id_map(CLASS_MAP, "total_mr"), ["lung_upper_lobe_left", "lung_middle_lobe_right"])
    # import: a label map written with another task's ids is refused, naming the label file
    seg = tmp_path / "seg_in_other_ids.nii.gz"
    nib.save(nib.Nifti1Image(np.full((4, 4, 4), 77, np.uint8), np.eye(4)), seg)
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), np.eye(4)), tmp_path / "img.nii.gz")
    with pytest.raises(ValueError, match=r"seg_in_other_ids\.nii\.gz: label values \[77\]"):
        import_multilabel_case(tmp_path / "img.nii.gz", seg, task_id_map(CLASS_MAP, "total_mr"), tmp_path / "case")
    assert not (tmp_path / "case").exists()


def test_every_reader_names_the_file_it_failed_on(phantom_root, tmp_path):
    case = tmp_path / "s0000"
    shutil.copytree(phantom_root / "s0000", case)
    mask = case / "segmentations" / "spleen.nii.gz"
    data = mask.read_bytes()
    mask.write_bytes(data[: len(data) // 2])  # a truncated gzip
    with pytest.raises(ValueError, match=r"spleen\.nii\.gz: cannot be read as NIfTI"):
        merge_structures(case, "organs")
    bad_map = tmp_path / "class_map.json"
    bad_map.write_text("{not json")
    with pytest.raises(ValueError, match=r"class_map\.json: not a JSON class map"):
        task_id_map(bad_map)
    with pytest.raises(KeyError, match=r"class_map\.json: no task 'totl'"):
        task_id_map(CLASS_MAP, "totl")
