"""`monai-peft gradcam`, `protoseg` and `pareto` on the shipped real CT example, end to end."""

from __future__ import annotations

import argparse
import importlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "monai_peft" / "data" / "totalseg_example"
CT, SEG, CLASS_MAP = EXAMPLE / "example_ct_sm.nii.gz", EXAMPLE / "example_seg.nii.gz", EXAMPLE / "class_map.json"
# a small SegResNet on the real CT at its 3 mm spacing, centre-cropped to 48 x 48 x 32
CASE = ["--image", str(CT), "--label", str(SEG), "--class-map", str(CLASS_MAP), "--classes", "liver", "spleen",
        "--pixdim", "3", "3", "3", "--roi-size", "48", "48", "32", "--init-filters", "8"]


def run_command(name: str, argv: list[str]) -> int:
    """Run one of our sub-commands in-process through its own parser (as the console script does)."""
    module = importlib.import_module(f"monai_peft.cli.{name}")
    parser = argparse.ArgumentParser(prog=f"monai-peft {name}")
    module.add_arguments(parser)
    return module.run(parser.parse_args(argv))


@pytest.mark.parametrize("name", ["gradcam", "protoseg", "pareto"])
def test_registered_with_help(name, capsys):
    from monai_peft.cli import SUBCOMMANDS

    assert SUBCOMMANDS[name] == f"monai_peft.cli.{name}"
    module = importlib.import_module(SUBCOMMANDS[name])
    parser = argparse.ArgumentParser(prog=f"monai-peft {name}", description=module.__doc__)
    module.add_arguments(parser)
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["--help"])
    assert exit_info.value.code == 0
    assert "--json" in capsys.readouterr().out


@pytest.mark.slow
def test_gradcam_real_ct_end_to_end(tmp_path, capsys):
    out = tmp_path / "gradcam"
    assert run_command("gradcam", [*CASE, "--method", "convadapter", "--output-dir", str(out), "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record == json.loads((out / "gradcam.json").read_text())
    layers = [layer["name"] for layer in record["layers"]]
    assert layers[0].endswith("conv_final.2.conv") and layers[1].endswith("up_layers.2.0.base_layer.conv2.conv")
    assert record["layers"][2]["adapter"] and "conv_adapter" in layers[2]
    assert set(record["dice"]) == {"liver", "spleen"}
    for per_layer in record["dice"].values():
        assert set(per_layer) == set(layers)
    assert record["files"]["png"] == ["gradcam_liver.png", "gradcam_spleen.png"]
    assert len(record["files"]["nifti"]) == 2 + 3 * 2
    for name in record["files"]["png"]:
        assert (out / name).stat().st_size > 5000

    # heatmaps sit on the preprocessed grid, and that grid is placed right in the world: the label
    # written beside them lands on the liver of the original label map through the affines
    inp = nib.load(out / "input.nii.gz")
    assert inp.shape == (48, 48, 32)
    np.testing.assert_allclose(np.abs(np.diag(inp.affine)[:3]), [3.0, 3.0, 3.0], atol=1e-4)
    for name in record["files"]["nifti"]:
        img = nib.load(out / name)
        assert img.shape == inp.shape
        np.testing.assert_allclose(img.affine, inp.affine, atol=1e-5)
    label = nib.load(out / "label.nii.gz")
    liver = np.argwhere(label.get_fdata() == 1)
    assert len(liver) > 500
    world = nib.affines.apply_affine(label.affine, liver)
    orig = nib.load(SEG)
    ijk = np.rint(nib.affines.apply_affine(np.linalg.inv(orig.affine), world)).astype(int)
    assert np.mean(orig.get_fdata()[tuple(ijk.T)] == 5) > 0.98, "liver (id 5) must map back onto the liver"
    cam = nib.load(out / f"cam_{layers[0][len('base_model.model.'):]}_liver.nii.gz").get_fdata()
    assert cam.min() >= 0.0 and cam.max() <= 1.0 and np.ptp(cam) > 0.1
    # each Otsu Dice is the Dice of the saved heatmap above the recorded threshold with the saved label (numpy here)
    from monai_peft.interpret._common import safe_name

    ids = {name: int(c) for c, name in record["classes"].items()}
    for cls, per_layer in record["dice"].items():
        truth = label.get_fdata() == ids[cls]
        for layer, dice in per_layer.items():
            heat = nib.load(out / f"cam_{safe_name(layer)}_{cls}.nii.gz").get_fdata()
            threshold = record["threshold"][cls][layer]  # None: a constant heatmap, nothing above it
            hot = heat > threshold if threshold is not None else np.zeros(heat.shape, bool)
            assert dice == pytest.approx(2 * (hot & truth).sum() / (hot.sum() + truth.sum()), abs=2e-3), (cls, layer)

    # --original-grid: heatmaps on the CT file's own grid, matching the analysed ones where they overlap
    out2 = tmp_path / "orig"
    argv = [*CASE, "--method", "convadapter", "--output-dir", str(out2), "--original-grid", "--no-png",
            "--channels", "1", "--layers", "conv_final.2.conv"]
    assert run_command("gradcam", argv) == 0
    capsys.readouterr()
    on_ct = nib.load(out2 / "cam_conv_final.2.conv_liver.nii.gz")
    assert on_ct.shape == orig.shape and np.allclose(on_ct.affine, orig.affine)
    assert not (out2 / "input.nii.gz").exists()
    from monai_peft.interpret._common import resample_to_grid

    back = resample_to_grid(label.get_fdata(), label.affine, orig.shape, orig.affine, order=0)
    inside = back > 0
    assert inside.sum() > 500 and np.mean(orig.get_fdata()[back == 1] == 5) > 0.98
    np.testing.assert_allclose(on_ct.get_fdata(), resample_to_grid(cam, label.affine, orig.shape, orig.affine),
                               atol=1e-5)


@pytest.mark.slow
def test_protoseg_real_ct_end_to_end(tmp_path, capsys):
    out = tmp_path / "protoseg"
    argv = [*CASE, "--method", "convadapter", "--output-dir", str(out), "--save-maps", "conv_final.2.conv", "--json"]
    assert run_command("protoseg", argv) == 0
    record = json.loads(capsys.readouterr().out)
    assert record == json.loads((out / "protoseg.json").read_text())
    assert record["targets"] == ["foreground"]
    names = [layer["name"] for layer in record["layers"]]
    assert names[-1].endswith("conv_final.2.conv")
    # ConvAdapter on every ResBlock of SuPreM's SegResNet layout (blocks 1+2+2+4 down, 1+1+1 up): down + up conv each
    assert sum(layer["adapter"] for layer in record["layers"]) == 2 * (1 + 2 + 2 + 4 + 1 + 1 + 1)
    shapes = {tuple(layer["shape"][1:]) for layer in record["layers"]}
    assert {(48, 48, 32), (24, 24, 16), (12, 12, 8), (6, 6, 4)} <= shapes
    assert record["files"]["png"] == ["protoseg.png"] and (out / "protoseg.png").stat().st_size > 5000
    sam = nib.load(out / record["files"]["nifti"][0])
    assert sam.shape == (48, 48, 32)
    assert set(np.unique(np.asarray(sam.dataobj)).tolist()) == {0.0, 1.0}  # a mask, neither empty nor full
    # (each layer's SA against a numpy Dice of its own map: tests/test_protoseg.py)


def test_cli_errors_name_the_argument(tmp_path, capsys):
    from monai_peft.cli import main

    with pytest.raises(SystemExit) as exit_info:  # argparse: one line, exit 2
        main(["gradcam", "--image", str(tmp_path / "missing.nii.gz"), "--output-dir", str(tmp_path)])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith("error: argument --image: no such file: ")
    with pytest.raises(SystemExit):
        main(["protoseg", *CASE, "--checkpoint", str(tmp_path / "none.pt"), "--output-dir", str(tmp_path)])
    assert capsys.readouterr().err.startswith("error: argument --checkpoint: no such file: ")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    assert main(["protoseg", *CASE, "--checkpoint", str(tmp_path / "junk.pt"), "--output-dir", str(tmp_path)]) == 2
    assert "error: --checkpoint " in capsys.readouterr().err


def test_pareto_cli_json_plot_and_tables(tmp_path, capsys):
    csv = tmp_path / "table_5_5.csv"
    csv.write_text("backbone,method,params,dice\nunet,full,19e6,0.90\nunet,lora,12.8e6,0.68\n"
                   "unet,convadapter,12.5e6,0.83\nsegresnet,full,4.7e6,0.89\nsegresnet,lora,1.1e6,0.60\n"
                   "segresnet,convadapter,0.7e6,0.84\n")
    argv = [str(csv), "--json", "--tables", "--plot", str(tmp_path / "tradeoff.png"),
            "--output", str(tmp_path / "p.json")]
    assert run_command("pareto", argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result == json.loads((tmp_path / "p.json").read_text())
    assert result["best"] == {"unet": "convadapter", "segresnet": "convadapter"}
    assert (tmp_path / "tradeoff.png").stat().st_size > 5000
    assert result["tables"]["5.5"]["rows"]["Mean Dice"] == [0.90, 0.68, 0.83, 0.89, 0.60, 0.84]
    assert run_command("pareto", [str(csv)]) == 0
    text = capsys.readouterr().out
    assert "0.914" in text and "0.841" in text


BUNDLES = Path(__file__).resolve().parents[1] / "bundles"


@pytest.mark.parametrize("bundle", sorted(p.parent.parent.name for p in BUNDLES.glob("*/configs/interpret.json")))
def test_bundle_interpret_config_builds_its_handlers(bundle, tmp_path):
    from monai.bundle import ConfigParser

    from monai_peft.interpret import GradCAMHandler, ProtoSegHandler

    root = BUNDLES / bundle
    parser = ConfigParser()
    parser.read_config([str(root / "configs" / "train.json"), str(root / "configs" / "interpret.json")])
    parser["pretrained"] = None  # no SuPreM weights in CI: random backbone
    parser["output_dir"] = str(tmp_path)
    handlers = parser.get_parsed_content("validate#handlers", instantiate=True)
    gradcam = next(h for h in handlers if isinstance(h, GradCAMHandler))
    protoseg = next(h for h in handlers if isinstance(h, ProtoSegHandler))
    assert gradcam.output_dir == tmp_path / "interpret" / "gradcam"
    assert protoseg.output_dir == tmp_path / "interpret" / "protoseg"
    names = parser.get_parsed_content("class_names")
    # thesis Table 5.10's classes, as channels of the bundle's class group
    assert [gradcam.class_names[c] for c in gradcam.classes] == [
        "lung_lower_lobe_right", "lung_middle_lobe_right", "lung_lower_lobe_left", "lung_upper_lobe_left", "aorta"]
    assert gradcam.class_names == dict(enumerate(names, start=1))
    assert "'test'" in parser["validate#datalist"], "interpretation runs on the test split"
    assert parser["validate#preprocessing#roi_size"] == "@roi_size", "centre crop (96^3), not whole volumes"


def test_the_segresnet_bundle_ships_an_interpret_config():
    assert (BUNDLES / "totalseg_organs_suprem_segresnet_peft" / "configs" / "interpret.json").is_file()


@pytest.mark.slow
def test_bundle_interpret_runs_on_a_phantom_dataset(tmp_path):
    """train.json + interpret.json end to end: evaluator, adapter loading, both handlers (decollated batches)."""
    from monai.bundle import ConfigParser

    from monai_peft.data.phantoms import write_phantom_dataset

    root = BUNDLES / "totalseg_organs_suprem_segresnet_peft"
    write_phantom_dataset(tmp_path / "data", n_cases=4, shape=(32, 32, 32), seed=0)
    parser = ConfigParser()
    parser.read_config([str(root / "configs" / "train.json"), str(root / "configs" / "interpret.json")])
    parser.update({"pretrained": None, "bundle_root": str(root), "output_dir": str(tmp_path / "run"),
                   "dataset_dir": str(tmp_path / "data"), "cache_dir": str(tmp_path / "cache"),
                   "roi_size": [24, 24, 24], "num_workers": 0, "gradcam_classes": [7],
                   "device": "$torch.device('cpu')"})
    network = parser.get_parsed_content("network")
    network.save_pretrained(str(tmp_path / "run" / "adapter" / "best"))  # the adapter AdapterLoader loads
    parser.get_parsed_content("run")
    out = tmp_path / "run" / "interpret"
    gradcam = json.loads((out / "gradcam" / "gradcam_summary.json").read_text())
    assert len(gradcam["cases"]) == 1 and gradcam["cases"][0].startswith("case000_s")
    layers = gradcam["mean_dice"]["aorta"]
    assert len(layers) == 3 and any("modules_to_save" in n for n in layers)  # the head trained fully
    case = out / "gradcam" / gradcam["cases"][0]
    assert (case / "gradcam_aorta.png").is_file() and len(list(case.glob("cam_*.nii.gz"))) == 3
    protoseg = json.loads((out / "protoseg" / "protoseg_summary.json").read_text())
    kinds = {layer["adapter"] for layer in protoseg["layers"]}
    assert kinds == {True, False}, "adapter and backbone convs are both scored"
