"""The thesis's data protocol by default: splits and subsets (4.2.2.1, 4.2.5.2), MR normalisation and modality
checks (4.2.5.3, Table 5.9), the evaluation protocol in the run record (Table 4.3)."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from monai.transforms import Compose

from monai_peft.data import (
    example_scan,
    import_multilabel_case,
    preprocess_transforms,
    random_split,
    resolve_modality,
    subset_split,
    task_id_map,
    val_transforms,
    write_case,
    write_phantom_dataset,
)
from monai_peft.workflows.bundle import (
    bundle_datalist,
    data_summary,
    eval_roi_size,
    evaluation_protocol,
    image_list,
    run_info,
)


def _sizes(splits):
    return [len(splits[k]) for k in ("train", "val", "test")]


def test_thesis_split_sizes():
    full = random_split(list(range(1228)), seed=0)
    assert _sizes(full) == [859, 245, 124]  # thesis 4.2.2.1
    # thesis 4.2.5.2 / Table 5.6: 10 % and 50 % of train+val re-split 80/20, the test set kept
    assert _sizes(subset_split(full, 0.1)) == [88, 22, 124]
    assert _sizes(subset_split(full, 0.5)) == [441, 111, 124]
    assert subset_split(full, 0.5)["test"] == full["test"]
    # thesis 4.2.5.3: the 235 labelled MR cases split 164 / 47 / 24
    assert _sizes(random_split(list(range(235)), seed=0)) == [164, 47, 24]
    # a 4-case folder still gets one validation and one test case
    assert _sizes(random_split(list(range(4)), seed=0)) == [2, 1, 1]


def _clipped(image: np.ndarray) -> tuple[float, float]:
    return float((image <= 0.0).mean()), float((image >= 1.0).mean())


def test_mr_normalisation_does_not_saturate_the_real_example_mr():
    mr = example_scan("mr")
    kwargs = {"roi_size": None, "pixdim": (3.0, 3.0, 3.0), "keys": ("image",)}
    ct_window = Compose(preprocess_transforms(intensity="window", **kwargs))({"image": str(mr.image)})["image"]
    mr_scaled = Compose(preprocess_transforms(modality="mr", **kwargs))({"image": str(mr.image)})["image"]
    low_before, high_before = _clipped(ct_window.numpy())
    low_after, high_after = _clipped(mr_scaled.numpy())
    # the CT window [-175, 250] HU sends a third of the MR volume to 1.0; percentile scaling clips ~1 %
    assert high_before > 0.3
    assert high_after < 0.01 and low_after < 0.01
    body = mr_scaled.numpy() > 0.05
    assert np.unique(np.round(mr_scaled.numpy()[body], 2)).size > 50  # a spread of grey values, not two levels
    with pytest.raises(ValueError, match="CT Hounsfield window.*MR"):
        val_transforms(modality="mr", intensity="window")
    with pytest.raises(ValueError, match="modality"):
        val_transforms(modality="pet")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A CT phantom folder, and an MR folder: the real example MR plus an MR case without segmentations."""
    root = tmp_path_factory.mktemp("modality")
    write_phantom_dataset(root / "ct", 4, (16, 16, 16), seed=0)
    mr = example_scan("mr")
    for i in range(4):
        import_multilabel_case(mr.image, mr.label, task_id_map(mr.class_map, mr.task), root / "mr" / f"s{i:04d}",
                               modality="mr", write_empty=True)
    empty = root / "mr" / "s0004"
    image = nib.load(mr.image)
    write_case(empty, np.asarray(image.dataobj), image.affine, np.zeros(image.shape, np.int64), {},
               modality="mr", write_empty=False)  # an image, no segmentation at all
    return root


def test_modality_of_class_groups_and_folders(folders):
    assert resolve_modality("mr_organs", folders / "mr") == "mr"
    assert resolve_modality(["liver", "spleen"], folders / "mr") == "mr"  # a list takes the folder's modality
    assert resolve_modality("organs", folders / "ct") == "ct" and resolve_modality("vertebrae") == "ct"
    with pytest.raises(ValueError, match=r"--classes 'organs' is a CT class group but --dataset_dir .*mr holds MR"):
        resolve_modality("organs", folders / "mr")
    with pytest.raises(ValueError, match=r"'mr_organs' is an MR class group but --dataset_dir .*ct holds CT"):
        bundle_datalist(folders / "ct", "mr_organs", "train")
    with pytest.raises(ValueError, match="--modality 'ct' contradicts --classes 'mr_organs'"):
        resolve_modality("mr_organs", modality="ct")


def test_mr_cases_without_segmentations_are_skipped_and_counted(folders, caplog):
    with caplog.at_level("WARNING"):
        summary = data_summary(folders / "mr", "mr_organs")
    assert summary["modality"] == "mr" and summary["n_cases"] == 5
    assert summary["skipped_unlabelled"] == 1 and summary["skipped_cases"] == ["s0004"]
    assert summary["n_train"] + summary["n_val"] + summary["n_test"] == 4
    assert "1 of 5 MR cases have no segmentation" in caplog.text
    every = [d["case_id"] for s in ("train", "val", "test") for d in bundle_datalist(folders / "mr", "mr_organs", s)]
    assert sorted(every) == ["s0000", "s0001", "s0002", "s0003"]
    info = run_info("segresnet-full-finetune", "mr_organs", summary, evaluation_protocol())
    assert info["task"] == "mr_organs" and info["data"]["skipped_unlabelled"] == 1
    assert info["evaluation"] == {"protocol": "sliding_window", "roi_size": [96, 96, 96], "overlap": 0.25}


def test_split_sources_fraction_and_inference_list(folders):
    ct = folders / "ct"
    meta = {s: [d["case_id"] for d in bundle_datalist(ct, "organs", s, split_source="meta")]
            for s in ("train", "val", "test")}
    assert meta == {"train": ["s0000", "s0001"], "val": ["s0002"], "test": ["s0003"]}  # the phantoms' meta.csv
    rand = {s: [d["case_id"] for d in bundle_datalist(ct, "organs", s)] for s in ("train", "val", "test")}
    assert sorted(sum(rand.values(), [])) == ["s0000", "s0001", "s0002", "s0003"] and rand != meta
    # inference predicts the training run's test split
    assert [d["case_id"] for d in image_list(ct, "test", split_source="random", classes="organs")] == rand["test"]
    assert data_summary(ct, "organs", data_fraction=0.5)["data_fraction"] == 0.5
    with pytest.raises(ValueError, match="--split_source must be one of"):
        bundle_datalist(ct, "organs", "train", split_source="metadata")


def test_evaluation_protocol_choices():
    assert eval_roi_size("sliding_window", (96, 96, 96)) is None  # whole volume, sliding windows
    assert eval_roi_size("resize_crop", (96, 96, 96)) == [96, 96, 96]  # thesis Table 4.3: ResizeWithPadOrCropd
    assert evaluation_protocol("resize_crop", (64, 64, 32))["overlap"] is None
    with pytest.raises(ValueError, match="--eval_protocol must be one of"):
        evaluation_protocol("crop")


def test_gradcam_and_protoseg_inputs_get_the_mr_normalisation():
    import argparse

    from monai_peft.cli._interpret_args import add_case_and_model_arguments, case_modality, load_case

    mr = example_scan("mr")
    parser = argparse.ArgumentParser()
    add_case_and_model_arguments(parser)
    common = ["--image", str(mr.image), "--pixdim", "3", "3", "3", "--roi-size", "64", "64", "32"]
    args = parser.parse_args(common + ["--label", str(mr.label), "--class-map", str(mr.class_map), "--task", "total_mr",
                                       "--classes", "liver", "spleen"])
    assert case_modality(args) == "mr"
    image, label, names = load_case(args)
    assert (image.numpy() >= 1.0).mean() < 0.01 and label.max() == 2  # not saturated by the CT window
    assert case_modality(parser.parse_args(common)) == "mr"  # no declaration: no air at -1000, so not Hounsfield
    assert case_modality(parser.parse_args(["--image", str(example_scan("ct").image)])) == "ct"
    with pytest.raises(ValueError, match="ambiguous: --modality means CT, --task total_mr means MR"):
        case_modality(parser.parse_args(common + ["--modality", "ct", "--class-map", str(mr.class_map),
                                                  "--task", "total_mr"]))


@pytest.mark.parametrize("bundle", ["totalseg_organs_suprem_segresnet_peft", "totalseg_organs_suprem_unet_peft"])
def test_bundles_normalise_mr_and_refuse_ct_classes_on_an_mr_folder(folders, bundle):
    from pathlib import Path

    from monai import transforms as mt
    from monai.bundle import ConfigParser

    configs = Path(__file__).resolve().parents[1] / "bundles" / bundle / "configs"
    for name in ("train.json", "inference.json"):
        parser = ConfigParser()
        parser.read_config(configs / name)
        parser["dataset_dir"] = str(folders / "mr")
        parser["classes"] = "mr_organs"
        assert parser.get_parsed_content("image_modality") == "mr"
        chain = parser.get_parsed_content("train#preprocessing" if name == "train.json" else "preprocessing")
        kinds = [type(t) for t in chain.transforms]
        assert mt.ScaleIntensityRangePercentilesd in kinds and mt.ScaleIntensityRanged not in kinds
        parser["classes"] = "organs"
        with pytest.raises(Exception) as failure:  # MONAI wraps the config function's error
            parser.get_parsed_content("image_modality")
        cause = failure.value if isinstance(failure.value, ValueError) else failure.value.__cause__
        assert "'organs' is a CT class group but --dataset_dir" in str(cause) and "holds MR" in str(cause)
    parser = ConfigParser()
    parser.read_config(configs / "train.json")
    parser.update({"dataset_dir": str(folders / "mr"), "classes": "mr_organs", "eval_protocol": "resize_crop"})
    info = parser.get_parsed_content("run_info")
    assert info["data"]["skipped_unlabelled"] == 1 and info["evaluation"]["protocol"] == "resize_crop"
    # thesis Table 4.3: validation volumes cropped / padded to roi_size; the default validates whole volumes
    assert mt.ResizeWithPadOrCropd in [type(t) for t in parser.get_parsed_content("validate#preprocessing").transforms]
    parser["eval_protocol"] = "sliding_window"
    chain = parser.get_parsed_content("validate#preprocessing", instantiate=True, lazy=False)
    assert mt.ResizeWithPadOrCropd not in [type(t) for t in chain.transforms]
