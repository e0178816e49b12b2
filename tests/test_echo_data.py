"""CAMUS (2019 .mhd, 2023 NIfTI) and EchoNet-Dynamic readers on phantom folders, preprocessing, self-check."""

from __future__ import annotations

import csv
import shutil

import numpy as np
import pytest

from monai_peft.echo import (camus_quality_report, camus_task_dataset, center_crop_resize, echonet_task_dataset,
                             find_camus, find_echonet, load_camus_record, load_echonet_frames, read_info_cfg,
                             read_video, render_frame, random_heart, write_camus_phantom, write_echonet_phantom)
from monai_peft.echo.phantom import _write_image


@pytest.fixture(scope="module", params=["2019", "2023"])
def camus(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"camus{request.param}")
    truth = write_camus_phantom(root, num_patients=5, layout=request.param, shape=(96, 80), seed=3)
    return request.param, root, truth


@pytest.fixture(scope="module")
def echonet(tmp_path_factory):
    root = tmp_path_factory.mktemp("echonet")
    rows = write_echonet_phantom(root, num_videos=5, num_frames=10, size=64, seed=1)
    return root, rows


def test_camus_layouts_parse(camus):
    layout, root, truth = camus
    recs = find_camus(root)
    assert len(recs) == 4 * len(truth)
    assert {(r.view, r.phase) for r in recs} == {("2CH", "ED"), ("2CH", "ES"), ("4CH", "ED"), ("4CH", "ES")}
    suffix = ".mhd" if layout == "2019" else ".nii.gz"
    assert all(r.image.name.endswith(suffix) for r in recs)
    by_name = {t["patient"]: t for t in truth}
    for r in recs:
        t = by_name[r.patient]
        assert r.info["EF"] == pytest.approx(t["EF"], abs=0.06)  # 2019 writes LVef, 2023 EF
        assert r.volume == pytest.approx(t["EDV"] if r.phase == "ED" else t["ESV"], abs=0.006)
        assert r.split == t["split"]
    test_recs = find_camus(root, splits="testing")
    assert test_recs and all(r.split == "testing" for r in test_recs)
    if layout == "2019":  # the 2019 test set has no ground truth
        assert all(r.label is None for r in test_recs)
    else:
        assert {r.split for r in recs} == {"training", "validation", "testing"}
    d = load_camus_record(recs[0])
    assert d["image"].shape == (96, 80) and d["label"].shape == (96, 80)
    assert set(np.unique(d["label"])) <= {0, 1, 2, 3} and (d["label"] == 1).sum() > 50
    assert d["spacing"] == pytest.approx((160.0 / 96, 160.0 / 96))


def test_camus_self_check_report(camus, tmp_path):
    _, root, truth = camus
    report = camus_quality_report(find_camus(root), ef_tolerance=3.0, out_json=tmp_path / "quality.json")
    assert (tmp_path / "quality.json").is_file()
    assert report["summary"]["num_patients"] == len(truth) and not report["flagged"]
    by_name = {t["patient"]: t for t in truth}
    checked = [r for r in report["patients"] if "EDV_simpson" in r]
    assert checked
    for row in checked:  # Simpson on the phantom masks recovers the exact ellipsoid volumes
        t = by_name[row["patient"]]
        assert row["EDV_simpson"] == pytest.approx(t["EDV"], rel=0.05)
        assert row["EF_simpson"] == pytest.approx(t["EF"], abs=3.0)


def test_camus_quality_report_flags_inconsistent_ef(tmp_path):
    write_camus_phantom(tmp_path, num_patients=2, layout="2023", shape=(96, 80), seed=0, with_test_split=False)
    cfg = tmp_path / "database_nifti" / "patient0001" / "Info_2CH.cfg"
    text = [ln if not ln.startswith("EF:") else "EF: 99.0" for ln in cfg.read_text().splitlines()]
    cfg.write_text("\n".join(text) + "\n")
    report = camus_quality_report(find_camus(tmp_path, check_sizes=False))
    assert report["flagged"] == ["patient0001"]


def test_camus_errors_name_file_and_key(tmp_path):
    write_camus_phantom(tmp_path, num_patients=2, layout="2023", shape=(64, 64), seed=0)
    folder = tmp_path / "database_nifti" / "patient0002"
    cfg = folder / "Info_4CH.cfg"
    cfg.write_text("".join(ln + "\n" for ln in cfg.read_text().splitlines() if not ln.startswith("Age")))
    with pytest.raises(ValueError, match=r"Info_4CH\.cfg.*'Age'"):
        find_camus(tmp_path)
    with pytest.raises(ValueError, match=r"Info_4CH\.cfg"):
        read_info_cfg(cfg)
    assert read_info_cfg(cfg, required=("ED", "ES"))["ED"] == 1
    shutil.copy(folder.parent / "patient0001" / "Info_4CH.cfg", cfg)
    # a mask whose size differs from its image
    _write_image(np.zeros((60, 64), np.uint8), (1.0, 1.0), folder / "patient0002_2CH_ES_gt.nii.gz")
    with pytest.raises(ValueError, match=r"size mismatch.*patient0002_2CH_ES\.nii\.gz.*patient0002_2CH_ES_gt"):
        find_camus(tmp_path)
    with pytest.raises(FileNotFoundError, match="no CAMUS patient folders"):
        find_camus(tmp_path / "database_split")


def test_echonet_parse_and_masks(echonet):
    root, rows = echonet
    recs = find_echonet(root)
    assert [r.name for r in recs] == [r["FileName"] for r in rows]
    for rec, row in zip(recs, rows):
        assert (rec.ed, rec.es) == (row["ED"], row["ES"])  # the larger traced area is ED
        assert rec.edv == pytest.approx(row["EDV"]) and rec.split == row["Split"]
    assert {r.split for r in find_echonet(root, "train")} == {"TRAIN"}
    video = read_video(recs[0].video)
    assert video.shape == (10, 64, 64) and video.dtype == np.uint8
    frames = load_echonet_frames(recs[:1])
    assert [f["phase"] for f in frames] == ["ED", "ES"]
    ed_area, es_area = frames[0]["label"].sum(), frames[1]["label"].sum()
    assert ed_area > es_area > 0
    # the tracing polygon covers the dark LV cavity of the video frame
    lv_pixels = frames[0]["image"][frames[0]["label"] > 0].mean()
    assert lv_pixels < frames[0]["image"][frames[0]["image"] > 0].mean()  # the traced cavity is dark


def test_echonet_errors(tmp_path):
    write_echonet_phantom(tmp_path, num_videos=2, num_frames=6, size=32, seed=0)
    with open(tmp_path / "FileList.csv") as fh:
        rows = list(csv.reader(fh))
    with open(tmp_path / "FileList.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([r[:-1] for r in rows])  # drop the Split column
    with pytest.raises(ValueError, match=r"FileList\.csv.*Split"):
        find_echonet(tmp_path)


def test_preprocessing_and_datasets(camus, echonet):
    img = np.arange(6 * 10, dtype=np.float32).reshape(6, 10)
    out = center_crop_resize(img, 3)
    assert out.shape == (1, 3, 3)
    lab = np.zeros((6, 10), np.uint8)
    lab[:, 2:8] = 2  # the centered 6x6 crop is columns 2..7
    assert center_crop_resize(lab, 12, is_label=True).unique().tolist() == [2]
    _, root, _ = camus
    seg = camus_task_dataset(root, "segmentation", size=32)
    s = seg[0]
    assert s["image"].shape == (1, 32, 32) and 0.0 <= float(s["image"].min()) and float(s["image"].max()) <= 1.0
    assert s["label"].shape == (1, 32, 32) and s["label"].dtype.is_floating_point is False
    view = camus_task_dataset(root, "view", size=32)
    assert sorted({int(v["label"]) for v in view.samples}) == [0, 1]
    vol = camus_task_dataset(root, "volume", size=32, exclude_poor=True)
    assert all(v["quality"] != "Poor" for v in vol.samples)
    en = echonet_task_dataset(echonet[0], "TRAIN", size=32)
    assert len(en) == 2 * 3 and en[0]["label"].max() == 1


def test_phantom_geometry_changes_between_phases_and_views():
    p = random_heart(np.random.default_rng(5))
    ed2, l_ed2, sp, _ = render_frame(p, "2CH", "ED", (128, 112))
    _, l_es2, _, _ = render_frame(p, "2CH", "ES", (128, 112))
    _, l_ed4, _, _ = render_frame(p, "4CH", "ED", (128, 112))
    assert (l_ed2 == 1).sum() > (l_es2 == 1).sum()  # LV shrinks at ES
    assert (l_es2 == 3).sum() > (l_ed2 == 3).sum()  # the atrium grows at ES
    assert set(np.unique(l_ed2)) == {0, 1, 2, 3}
    assert ed2[0, 0] == 0 and ed2[-1, 56] == 0  # outside the fan-shaped sector
    assert not np.array_equal(l_ed2, l_ed4)
