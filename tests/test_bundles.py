"""The MONAI bundles under bundles/, run exactly as a user types ``python -m monai.bundle ...``.

A tiny phantom dataset in TotalSegmentator layout (4 cases of 24^3: train/train/val/test from meta.csv) and fake
SuPreM checkpoints in the released files' layout stand in for the real data and weights.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
BUNDLES = REPO / "bundles"
SEG = "totalseg_organs_suprem_segresnet_peft"
UNET = "totalseg_organs_suprem_unet_peft"
SCHEMA = BUNDLES / "schema" / "monai_peft_bundle_metadata.schema.json"  # monai-peft's own schema
ALL_BUNDLES = (SEG, UNET, "echo_segformer_pretrain", "camus_segformer_lora_multitask")
ROI = "[16,16,16]"


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Phantom dataset, fake SuPreM checkpoints and a copy of each bundle (runs write into models/)."""
    from monai_peft.checkpoints import write_suprem_layout_checkpoint
    from monai_peft.data import write_phantom_dataset
    from monai_peft.networks import suprem_segresnet, suprem_unet

    root = tmp_path_factory.mktemp("bundles")
    write_phantom_dataset(root / "data", 4, (24, 24, 24), seed=0)
    torch.manual_seed(0)
    write_suprem_layout_checkpoint(suprem_segresnet(18), root / "suprem_segresnet.pth", "segresnet")
    write_suprem_layout_checkpoint(suprem_unet(18), root / "suprem_unet.pth", "unet")
    for name in (SEG, UNET):
        shutil.copytree(BUNDLES / name, root / name, ignore=shutil.ignore_patterns("runs", "model.*"))
    return root


def _run_args(world: Path, config: str | list[str], backbone: str, out: Path, **overrides: str) -> list[str]:
    cfg = config if isinstance(config, str) else "[" + ",".join(f"'{c}'" for c in config) + "]"
    args = ["-m", "monai.bundle", "run", "--config_file", cfg, "--bundle_root", ".",
            "--dataset_dir", str(world / "data"), "--pretrained", str(world / f"suprem_{backbone}.pth"),
            "--output_dir", str(out), "--roi_size", ROI, "--num_workers", "0",
            "--logging_file", "configs/logging.conf"]
    for k, v in overrides.items():
        args += [f"--{k}", v]
    return args


def _bundle(world: Path, bundle: str, args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *args], cwd=world / bundle, env=_env(), capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"bundle command failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def _check_results(out: Path, n_classes: int = 17) -> dict:
    record = json.loads((out / "results.json").read_text())
    assert record["frozen_backbone"]["unchanged"] is True
    assert record["frozen_backbone"]["start"] == record["frozen_backbone"]["end"]
    assert 0 < record["parameters"]["trainable"] < record["parameters"]["total"]
    val = record["validation"]["mean_dice"]
    assert 0.0 <= val <= 1.0
    assert len(record["validation"]["per_class_dice"]) == n_classes
    assert record["costs"]["train_s_per_volume"] > 0
    return record


def _adapter_only(folder: Path, pretrained: Path) -> None:
    """The adapter file holds adapters and the new head, never a backbone tensor."""
    from safetensors.torch import load_file

    tensors = load_file(str(folder / "adapter_model.safetensors"))
    assert tensors, folder
    backbone = torch.load(pretrained, map_location="cpu", weights_only=True)["net"]
    n_backbone = sum(v.numel() for v in backbone.values())
    assert sum(v.numel() for v in tensors.values()) < 0.5 * n_backbone
    for key in tensors:
        assert any(t in key for t in ("conv_adapter", "lora_", "ssf_", "modules_to_save", "head", "conv_final",
                                      "out_tr")), key


@pytest.mark.slow
def test_segresnet_bundle_kill_resume_evaluate_infer(world):
    out = world / "run_seg"
    # 1) train, killed (SIGKILL) once epoch 1 is checkpointed
    args = _run_args(world, "configs/train.json", "segresnet", out, max_epochs="30")
    proc = subprocess.Popen([sys.executable, *args], cwd=world / SEG, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    info = out / "adapter" / "last" / "checkpoint.json"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not info.exists():
        time.sleep(0.05)
    assert proc.poll() is None, f"training ended before it could be killed:\n{proc.stdout.read()[-3000:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    proc.stdout.close()
    saved_epoch = json.loads(info.read_text())["epoch"]
    assert 1 <= saved_epoch < 30

    # 2) resume: continues at the next epoch from the checkpoint, not from scratch
    resumed = _bundle(world, SEG, _run_args(world, "configs/train.json", "segresnet", out,
                                            max_epochs=str(saved_epoch + 1), resume="True"))
    log = resumed.stdout + resumed.stderr
    assert f"continuing at epoch {saved_epoch + 1}" in log
    assert f"Epoch[{saved_epoch + 1}] Complete" in log
    assert "Epoch[1] Complete" not in log.replace(f"Epoch[{saved_epoch + 1}] Complete", "")
    assert json.loads(info.read_text())["epoch"] == saved_epoch + 1
    _check_results(out)
    _adapter_only(out / "adapter" / "best", world / "suprem_segresnet.pth")
    assert (out / "adapter" / "best" / "adapter_config.json").is_file()
    assert not list((out / "adapter").glob(".*tmp"))  # atomic writes leave no temporary folders

    # 3) test-set evaluation: per-case per-class Dice/NSD files and the run record
    _bundle(world, SEG, _run_args(world, ["configs/train.json", "configs/evaluate.json"], "segresnet", out))
    record = json.loads((out / "results.json").read_text())
    assert record["preset"] == "segresnet-convadapter-resblock-parallel" and record["method"] == "convadapter"
    assert 0.0 <= record["test"]["mean_dice"] <= 1.0
    assert record["test"]["n_cases"] == 1 and record["costs"]["inference_s_per_volume"] > 0
    rows = (out / "test_metrics.csv").read_text().strip().splitlines()
    assert len(rows) == 2 and rows[1].startswith("s0003,")
    cases = json.loads((out / "test_metrics.json").read_text())["cases"]
    assert set(cases[0]["dice"]) == set(cases[0]["nsd"]) and len(cases[0]["dice"]) == 17

    # 4) inference: NIfTI predictions on the image grid
    _bundle(world, SEG, _run_args(world, "configs/inference.json", "segresnet", out))
    pred = nib.load(str(out / "predictions" / "s0003" / "ct_seg.nii.gz"))
    image = nib.load(str(world / "data" / "s0003" / "ct.nii.gz"))
    assert pred.shape == image.shape and np.allclose(pred.affine, image.affine)
    labels = np.unique(np.asarray(pred.dataobj))
    assert labels.min() >= 0 and labels.max() <= 17


@pytest.mark.slow
def test_unet_bundle_lora_preset_export_evaluate_infer(world):
    from monai.bundle import ckpt_export

    from monai_peft.handlers import load_adapter_folder
    from monai_peft.networks import suprem_unet
    from monai_peft.presets import build_preset

    out = world / "run_unet"
    preset = "unet3d-lora-encdec-r8"
    _bundle(world, UNET, _run_args(world, "configs/train.json", "unet", out, max_epochs="1",
                                   **{"peft#preset": preset}))
    record = _check_results(out)
    assert record["preset"] == preset and record["method"] == "lora"
    _adapter_only(out / "adapter" / "best", world / "suprem_unet.pth")

    # the merged plain network and its TorchScript export carry the trained weights
    model_pt = world / UNET / "models" / "model.pt"
    assert model_pt.is_file()
    ts_file = world / UNET / "models" / "model.ts"
    cwd = os.getcwd()
    try:
        os.chdir(world / UNET)
        ckpt_export(net_id="export_network_def", filepath=str(ts_file), ckpt_file=str(model_pt),
                    meta_file="configs/metadata.json", config_file="configs/inference.json", bundle_root=".",
                    use_trace=True, input_shape=[1, 1, 16, 16, 16])
    finally:
        os.chdir(cwd)
    reference = build_preset(preset, 18, pretrained=world / "suprem_unet.pth")
    load_adapter_folder(reference, out / "adapter" / "best")
    reference.eval()
    x = torch.rand(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(1))
    ts = torch.jit.load(str(ts_file))
    with torch.no_grad():
        expected, exported = reference(x), ts(x)
        random_net = suprem_unet(18).eval()(x)
    assert torch.allclose(exported, expected, atol=1e-4)
    assert not torch.allclose(random_net, expected, atol=1e-2)
    # an adapter file is no plain network: ckpt_export refuses it instead of exporting random weights
    with pytest.raises(Exception):
        os.chdir(world / UNET)
        try:
            ckpt_export(net_id="export_network_def", filepath=str(world / "bad.ts"),
                        ckpt_file=str(out / "adapter" / "best" / "adapter_model.safetensors"),
                        config_file="configs/inference.json", bundle_root=".", use_trace=True,
                        input_shape=[1, 1, 16, 16, 16])
        finally:
            os.chdir(cwd)

    _bundle(world, UNET, _run_args(world, ["configs/train.json", "configs/evaluate.json"], "unet", out,
                                   **{"peft#preset": preset}))
    assert 0.0 <= json.loads((out / "results.json").read_text())["test"]["mean_dice"] <= 1.0
    _bundle(world, UNET, _run_args(world, "configs/inference.json", "unet", out, **{"peft#preset": preset}))
    assert (out / "predictions" / "s0003" / "ct_seg.nii.gz").is_file()


@pytest.mark.slow
def test_segresnet_bundle_ddp_two_processes_on_cpu(world):
    from monai_peft.data import write_phantom_dataset

    # 8 cases, meta.csv's split: 2 validation cases, one per rank (MONAI's DistributedSampler needs one per rank)
    data = world / "data_ddp"
    write_phantom_dataset(data, 8, (24, 24, 24), seed=1)
    out = world / "run_ddp"
    args = _run_args(world, ["configs/train.json", "configs/multi_gpu_train.json"], "segresnet", out,
                     max_epochs="1", batch_size="1", split_source="meta")
    args[args.index("--dataset_dir") + 1] = str(data)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2",
           *args]
    proc = subprocess.run(cmd, cwd=world / SEG, env=_env(), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-8000:]
    assert "Got new best metric of val_mean_dice" in proc.stdout + proc.stderr
    _check_results(out)
    assert json.loads((out / "adapter" / "last" / "checkpoint.json").read_text())["epoch"] == 1


@pytest.fixture
def no_download(monkeypatch):
    """verify_metadata must read the committed schema: any download attempt fails the test."""
    import monai.apps.utils as apps_utils

    def _refuse(*args, **kwargs):
        raise AssertionError(f"verify_metadata tried to download: {args} {kwargs}")

    monkeypatch.setattr(apps_utils, "_download_with_progress", _refuse)
    monkeypatch.setattr(apps_utils, "urlopen", _refuse)


@pytest.mark.parametrize("bundle", [SEG, UNET])
def test_verify_metadata_offline_and_required_files(bundle, no_download):
    from monai.bundle import verify_metadata

    root = BUNDLES / bundle
    for rel in ("configs/metadata.json", "configs/train.json", "configs/evaluate.json", "configs/inference.json",
                "configs/multi_gpu_train.json", "configs/logging.conf", "docs/README.md", "LICENSE"):
        assert (root / rel).is_file(), rel
    # the schema file exists, so nothing is downloaded (no_download fails the test otherwise)
    verify_metadata(meta_file=str(root / "configs" / "metadata.json"), filepath=str(SCHEMA))
    meta = json.loads((root / "configs" / "metadata.json").read_text())
    assert meta["version"] in meta["changelog"]
    assert "monai-peft" in meta["required_packages_version"]
    assert meta["network_data_format"]["outputs"]["pred"]["num_channels"] == 18


def test_schema_is_valid_and_names_itself():
    import jsonschema

    schema = json.loads(SCHEMA.read_text())
    jsonschema.validators.validator_for(schema).check_schema(schema)
    assert "monai-peft" in schema["description"] and "verify_metadata" in schema["description"]


@pytest.mark.parametrize("bundle", ALL_BUNDLES)
def test_metadata_of_every_bundle_matches_schema(bundle, no_download):
    from monai.bundle import verify_metadata

    meta_file = BUNDLES / bundle / "configs" / "metadata.json"
    meta = json.loads(meta_file.read_text())
    # the "schema" field is a path relative to the bundle root and names the committed schema
    assert (BUNDLES / bundle / meta["schema"]).resolve() == SCHEMA.resolve()
    verify_metadata(meta_file=str(meta_file), filepath=str(SCHEMA))
    assert meta["version"] in meta["changelog"]


@pytest.mark.parametrize("breakage", ["no_network_data_format", "version_not_semver", "no_outputs",
                                      "negative_channels"])
def test_verify_metadata_rejects_bad_metadata(tmp_path, breakage, no_download):
    from monai.bundle import verify_metadata

    meta = json.loads((BUNDLES / SEG / "configs" / "metadata.json").read_text())
    if breakage == "no_network_data_format":
        del meta["network_data_format"]
    elif breakage == "version_not_semver":
        meta["version"] = "1.0"
    elif breakage == "no_outputs":
        del meta["network_data_format"]["outputs"]
    else:
        meta["network_data_format"]["inputs"]["image"]["num_channels"] = -1
    bad = tmp_path / "metadata.json"
    bad.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="Failed validating"):
        verify_metadata(meta_file=str(bad), filepath=str(SCHEMA))


@pytest.mark.parametrize("bundle,backbone", [(SEG, "segresnet"), (UNET, "unet")])
def test_verify_net_in_out(world, bundle, backbone):
    from monai.bundle import verify_net_in_out

    verify_net_in_out(net_id="network_def", meta_file=str(world / bundle / "configs" / "metadata.json"),
                      config_file=str(world / bundle / "configs" / "inference.json"), bundle_root=str(world / bundle),
                      n=2, pretrained=str(world / f"suprem_{backbone}.pth"))


@pytest.mark.slow
def test_missing_dataset_dir_is_a_clear_error(world):
    missing = world / "no_such_folder"
    args = _run_args(world, "configs/train.json", "segresnet", world / "run_bad", max_epochs="1")
    args[args.index("--dataset_dir") + 1] = str(missing)
    proc = subprocess.run([sys.executable, *args], cwd=world / SEG, env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0
    # the last line names the cause (not MONAI's "Failed to evaluate ..."), and nothing ran before the check
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: --dataset_dir {missing} does not exist")
    assert "Traceback" not in proc.stderr and "ignite" not in proc.stderr


def test_bundle_inputs_accept_what_the_command_line_can_pass(world, tmp_path, monkeypatch):
    """MONAI's command line drops `--key None`; `none`, `null`, '' and `all` (split) are what it can pass."""
    from monai_peft.workflows.bundle_inputs import BundleInputError, check_inputs, optional_split, pretrained_file

    assert all(pretrained_file(v) is None for v in (None, "", "none", "None", "null"))
    assert [optional_split(v) for v in ("all", "none", "", "test")] == [None, None, None, "test"]
    with pytest.raises(BundleInputError, match=r"^error: --split 'tst': expected one of"):
        optional_split("tst")
    with pytest.raises(BundleInputError, match=r"^error: --pretrained .*missing\.pth: no such file; .*--pretrained none"):
        pretrained_file(tmp_path / "missing.pth")
    ok = check_inputs(world / "data", "organs", "segresnet-ssf-encdec", "segresnet", "none", roi_size=[16, 16, 16])
    assert ok["cases"] == 4 and len(ok["class_names"]) == 17
    bad = {
        "--classes: unknown structure name 'livr' (did you mean 'liver'?)": dict(classes=["livr", "spleen"]),
        "--peft#preset unet3d-lora-encdec-r16: a preset of the unet backbone": dict(preset="unet3d-lora-encdec-r16"),
        "--roi_size [20, 16, 16]: expected three sizes divisible by 8": dict(roi_size=[20, 16, 16]),
        "--pretrained nope.pth: no such file": dict(pretrained="nope.pth"),
    }
    for message, override in bad.items():
        args = dict(dataset_dir=world / "data", classes="organs", preset="segresnet-ssf-encdec",
                    backbone="segresnet", pretrained="none", roi_size=[16, 16, 16]) | override
        with pytest.raises(BundleInputError) as info:
            check_inputs(**args)
        assert str(info.value).startswith("error: " + message), str(info.value)
    monkeypatch.setenv("MONAI_PEFT_DEBUG", "1")  # the original exception, for its traceback
    with pytest.raises(ValueError, match="livr"):
        check_inputs(world / "data", ["livr"], need_labels=False)


def test_no_label_files_and_wrong_class_count_are_clear_errors(world, tmp_path):
    from monai_peft.handlers import load_adapter_folder, save_adapter_folder
    from monai_peft.networks import suprem_segresnet
    from monai_peft.presets import build_preset
    from monai_peft.workflows.bundle import bundle_datalist

    # a case folder with an image but no segmentations/
    case = tmp_path / "ds" / "s0000"
    case.mkdir(parents=True)
    shutil.copy(world / "data" / "s0000" / "ct.nii.gz", case / "ct.nii.gz")
    with pytest.raises(FileNotFoundError, match=r"--dataset_dir .*s0000 has no label files for --classes 'organs'"):
        bundle_datalist(tmp_path / "ds", "organs", "train")
    # an adapter trained for 17 organs loaded into a network built for 3 classes
    trained = build_preset("segresnet-ssf-encdec", 18, model=suprem_segresnet(18))
    save_adapter_folder(trained, tmp_path / "adapter")
    other = build_preset("segresnet-ssf-encdec", 3, model=suprem_segresnet(3))
    with pytest.raises(ValueError, match=r"differ in shape.*--classes differs"):
        load_adapter_folder(other, tmp_path / "adapter")
