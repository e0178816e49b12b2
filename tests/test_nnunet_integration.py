"""End-to-end nnU-Net v2 runs on CPU with the plugin's trainers, as the user types them (subprocesses).

Tiny phantom datasets (16^3, 5 cases): Dataset901 (2 labels) pretrains a plain nnU-Net, Dataset902 (1 label, same
plans architecture) is fine-tuned with ConvAdapter / LoRA / SSF from that checkpoint. Short runs come from the
plugin's ``nnUNet_peft_*`` variables. ``nnUNet_extTrainer`` is removed from the subprocesses' environment: the
``.pth`` hook that ``pip install`` puts into site-packages must find the trainers by itself, as for a user.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from nnunet_plugin import ext_trainer_value
from nnunet_plugin.checkpoints import adapter_path_for, load_adapter_file, plain_key, safe_load_checkpoint
from nnunet_plugin.phantoms import make_phantom_dataset

pytestmark = pytest.mark.slow
warnings.filterwarnings("ignore", message="Unsupported layer type")

CONFIG = "3d_fullres"


def _entry(script: str) -> str:
    (ep,) = importlib.metadata.entry_points(group="console_scripts", name=script)
    return ep.value


def nnunet(script: str, *args: str, env: dict[str, str], expect_ok: bool = True,
           timeout: int = 400) -> subprocess.CompletedProcess:
    """Run an nnU-Net console script (``nnUNetv2_train`` ...) exactly as its installed launcher does."""
    module, func = _entry(script).split(":")
    code = f"import sys; sys.argv[0] = {script!r}; from {module} import {func} as f; sys.exit(f())"
    proc = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True,
                          timeout=timeout)
    if expect_ok and proc.returncode != 0:
        pytest.fail(f"{script} {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def _build_pipeline(root: Path) -> dict:
    env = dict(os.environ)
    env.update({
        "nnUNet_raw": str(root / "raw"), "nnUNet_preprocessed": str(root / "preprocessed"),
        "nnUNet_results": str(root / "results"),
        "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "nnUNet_def_n_proc": "1", "nnUNet_n_proc_DA": "0",
        "nnUNet_compile": "0", "nnUNet_peft_epochs": "1", "nnUNet_peft_iterations": "2",
        "nnUNet_peft_val_iterations": "1", "nnUNet_peft_final_validation": "0", "nnUNet_peft_lr": "1e-3",
    })
    env.pop("PYTEST_XDIST_WORKER", None)
    env.pop("nnUNet_extTrainer", None)  # the installed .pth hook sets it in every new interpreter
    pipeline = {"root": root, "env": env, "images": root / "test_images",
                "pretrained": root / "results" / "Dataset901_PhantomA" /
                f"nnUNetTrainerFull__nnUNetPlans__{CONFIG}" / "fold_0" / "checkpoint_final.pth"}
    if (root / "ready").is_file():  # built by another pytest-xdist worker
        return pipeline
    make_phantom_dataset(root / "raw", 901, "PhantomA", num_cases=5, shape=(16, 16, 16), num_labels=2, seed=0)
    target = make_phantom_dataset(root / "raw", 902, "PhantomB", num_cases=5, shape=(16, 16, 16), num_labels=1,
                                  seed=1)
    # nnUNet_n_proc_DA=0 (single-threaded augmentation in training) breaks the planner's torch.set_num_threads
    plan_env = {k: v for k, v in env.items() if k != "nnUNet_n_proc_DA"}
    nnunet("nnUNetv2_plan_and_preprocess", "-d", "901", "902", "-c", CONFIG, "-np", "1", "-npfp", "1", env=plan_env)
    plans = [json.loads((root / "preprocessed" / d / "nnUNetPlans.json").read_text())["configurations"][CONFIG]
             for d in ("Dataset901_PhantomA", "Dataset902_PhantomB")]
    assert plans[0]["architecture"] == plans[1]["architecture"]  # same geometry -> same network
    nnunet("nnUNetv2_train", "901", CONFIG, "0", "-tr", "nnUNetTrainerFull", "-device", "cpu", env=env)
    assert pipeline["pretrained"].is_file()
    pipeline["images"].mkdir()
    for case in ("phantomb_000", "phantomb_003"):
        (pipeline["images"] / f"{case}_0000.nii.gz").write_bytes(
            (target / "imagesTr" / f"{case}_0000.nii.gz").read_bytes())
    (root / "ready").write_text("ok")
    return pipeline


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """Plan + preprocess both datasets, pretrain a plain nnU-Net for one short epoch on Dataset901.

    Built once per test session, also under pytest-xdist (the workers share it through a file lock).
    """
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # shared by all workers of this session
    root = base / "nnunet_plugin_pipeline"
    root.mkdir(exist_ok=True)
    with FileLock(str(root) + ".lock"):
        return _build_pipeline(root)


def _fold(pipeline, trainer: str) -> Path:
    return pipeline["root"] / "results" / "Dataset902_PhantomB" / f"{trainer}__nnUNetPlans__{CONFIG}" / "fold_0"


def _check_finetuned(pipeline, trainer: str, pretrained: Path, method: str) -> dict:
    fold = _fold(pipeline, trainer)
    checkpoint = fold / "checkpoint_final.pth"
    adapter = adapter_path_for(checkpoint)
    assert checkpoint.is_file() and adapter.is_file()
    ratio = adapter.stat().st_size / checkpoint.stat().st_size
    assert ratio < 0.10, f"{trainer}: adapter file is {100 * ratio:.1f}% of the checkpoint"
    base = safe_load_checkpoint(pretrained)["network_weights"]
    tuned = safe_load_checkpoint(checkpoint)
    frozen = 0
    for key, value in tuned["network_weights"].items():
        plain = plain_key(key)
        if plain in base and ".seg_layers." not in plain:
            assert torch.equal(value, base[plain]), f"{trainer}: frozen tensor {key} changed"
            frozen += 1
    assert frozen > 50
    seg = [v for k, v in tuned["network_weights"].items() if k.endswith("seg_layers.0.modules_to_save.default.weight")]
    assert seg and seg[0].shape[0] == 2  # re-initialised for Dataset902: background + 1 label
    assert tuned["init_args"]["plans"]["monai_peft"]["method"] == method
    tensors, meta = load_adapter_file(adapter)
    trained = [k for k in tensors if ".seg_layers." not in k]
    assert trained and meta["trainer"] == trainer and meta["base_weights"]["file"] == str(pretrained.resolve())
    return {"ratio": ratio, "tuned": tuned, "adapter": adapter}


def _assert_on_image_grid(path: Path, reference: Path) -> None:
    pred = nib.load(str(path))
    assert pred.shape == nib.load(str(reference)).shape
    np.testing.assert_allclose(pred.affine, nib.load(str(reference)).affine, atol=1e-5)


def test_convadapter_train_predict_validate_rebuild(pipeline):
    env, pretrained = pipeline["env"], pipeline["pretrained"]
    trainer = "nnUNetTrainerConvAdapter"
    nnunet("nnUNetv2_train", "902", CONFIG, "0", "-tr", trainer, "-device", "cpu",
           "-pretrained_weights", str(pretrained), env=env)
    result = _check_finetuned(pipeline, trainer, pretrained, "convadapter")
    log = next(_fold(pipeline, trainer).glob("training_log_*.txt")).read_text()
    assert "pretrained weights" in log and "4 skipped" in log  # 2 seg layers x (weight, bias) not transferred

    # stock nnUNetv2_predict rebuilds the adapted network from plans.json + checkpoint
    out = pipeline["root"] / "pred_convadapter"
    nnunet("nnUNetv2_predict", "-i", str(pipeline["images"]), "-o", str(out), "-d", "902", "-c", CONFIG,
           "-f", "0", "-tr", trainer, "-device", "cpu", "-npp", "1", "-nps", "1", "--disable_progress_bar", env=env)
    cases = ("phantomb_000", "phantomb_003")
    for case in cases:
        _assert_on_image_grid(out / f"{case}.nii.gz", pipeline["images"] / f"{case}_0000.nii.gz")

    # --val validates the finished run with the adapters in place
    nnunet("nnUNetv2_train", "902", CONFIG, "0", "-tr", trainer, "-device", "cpu", "--val", env=env)
    summary = json.loads((_fold(pipeline, trainer) / "validation" / "summary.json").read_text())
    assert "foreground_mean" in summary

    # base weights + adapter file -> the same network and the same predictions
    from monai_peft.cli import main as monai_peft_main
    from nnunet_plugin.rebuild import predictor_from_adapter

    model_dir = pipeline["root"] / "rebuilt"
    assert monai_peft_main(["nnunet-rebuild", "--base", str(pretrained), "--adapter", str(result["adapter"]),
                            "-o", str(model_dir)]) == 0
    rebuilt = safe_load_checkpoint(model_dir / "fold_0" / "checkpoint_final.pth")["network_weights"]
    tuned = result["tuned"]["network_weights"]
    assert rebuilt.keys() == tuned.keys() and all(torch.equal(rebuilt[k], tuned[k]) for k in tuned)
    predictor = predictor_from_adapter(pretrained, result["adapter"])
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    for case in cases:  # the stock predictions equal the rebuilt network's
        image, props = SimpleITKIO().read_images([str(pipeline["images"] / f"{case}_0000.nii.gz")])
        seg = predictor.predict_single_npy_array(image, props, None, None, False)
        stock = SimpleITKIO().read_seg(str(out / f"{case}.nii.gz"))[0][0]
        assert np.array_equal(seg, stock), case


def _as_if_saved_on_gpu(src: Path, dst: Path) -> Path:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            if item.filename.endswith("data.pkl"):
                data = data.replace(b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0")
                data = data.replace(b"\x8c\x03cpu", b"\x8c\x06cuda:0")
            zout.writestr(item, data)
    return dst


def _predict_in_process(pipeline, trainer: str, base_weights: Path) -> None:
    """``nnUNetv2_predict``'s own code path (initialize_from_trained_model_folder), without new processes, gives the
    same segmentation as the network rebuilt from the base weights + the adapter file alone (a missing or misread
    adapter tensor, or batch-norm statistics that moved, would change it)."""
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from nnunet_plugin.rebuild import predictor_from_adapter

    old = os.environ.get("nnUNet_extTrainer")
    os.environ["nnUNet_extTrainer"] = ext_trainer_value(old)
    try:
        predictor = nnUNetPredictor(device=torch.device("cpu"), perform_everything_on_device=False, allow_tqdm=False)
        predictor.initialize_from_trained_model_folder(str(_fold(pipeline, trainer).parent), (0,))
    finally:
        if old is None:
            os.environ.pop("nnUNet_extTrainer")
        else:
            os.environ["nnUNet_extTrainer"] = old
    image, props = SimpleITKIO().read_images([str(pipeline["images"] / "phantomb_003_0000.nii.gz")])
    seg = predictor.predict_single_npy_array(image, props, None, None, False)
    assert seg.shape == image.shape[1:]
    adapter = adapter_path_for(_fold(pipeline, trainer) / "checkpoint_final.pth")
    rebuilt = predictor_from_adapter(base_weights, adapter).predict_single_npy_array(image, props, None, None, False)
    assert np.array_equal(seg, rebuilt)


def test_lora_from_gpu_saved_checkpoint(pipeline):
    """LoRA (rank from nnUNet_peft_rank) fine-tunes from a checkpoint whose tensors were saved on a GPU."""
    gpu_file = _as_if_saved_on_gpu(pipeline["pretrained"], pipeline["root"] / "pretrained_on_gpu.pth")
    env = dict(pipeline["env"], nnUNet_peft_rank="4")
    trainer = "nnUNetTrainerLoRA"
    nnunet("nnUNetv2_train", "902", CONFIG, "0", "-tr", trainer, "-device", "cpu",
           "-pretrained_weights", str(gpu_file), env=env)
    result = _check_finetuned(pipeline, trainer, gpu_file, "lora")
    assert result["tuned"]["init_args"]["plans"]["monai_peft"]["rank"] == 4
    lora_a = [v for k, v in result["tuned"]["network_weights"].items() if "lora_A.default.weight" in k]
    assert lora_a and all(v.shape[0] == 4 for v in lora_a)
    _predict_in_process(pipeline, trainer, gpu_file)


def test_ssf_train_then_resume_with_c(pipeline):
    env, pretrained = pipeline["env"], pipeline["pretrained"]
    trainer = "nnUNetTrainerSSF"
    nnunet("nnUNetv2_train", "902", CONFIG, "0", "-tr", trainer, "-device", "cpu",
           "-pretrained_weights", str(pretrained), env=env)
    first = _check_finetuned(pipeline, trainer, pretrained, "ssf")
    assert first["tuned"]["current_epoch"] == 1
    # --c continues from checkpoint_final for one more epoch; the backbone stays the pretrained one
    nnunet("nnUNetv2_train", "902", CONFIG, "0", "-tr", trainer, "-device", "cpu", "--c",
           env=dict(env, nnUNet_peft_epochs="2"))
    second = _check_finetuned(pipeline, trainer, pretrained, "ssf")
    assert second["tuned"]["current_epoch"] == 2
    scale = [k for k in second["tuned"]["network_weights"] if "ssf_scale" in k]
    assert scale and any(not torch.equal(first["tuned"]["network_weights"][k], second["tuned"]["network_weights"][k])
                         for k in scale)
    _predict_in_process(pipeline, trainer, pretrained)


def test_suprem_segresnet_convadapter_in_nnunet(pipeline):
    """SuPreM's SegResNet (a SuPreM-layout checkpoint) fine-tuned with ConvAdapter by nnU-Net's pipeline."""
    from monai_peft.checkpoints import write_suprem_layout_checkpoint
    from monai_peft.networks import suprem_backbone

    torch.manual_seed(0)
    source = suprem_backbone("segresnet", 32)
    suprem_file = write_suprem_layout_checkpoint(source, pipeline["root"] / "supervised_suprem_segresnet_2100.pth",
                                                 "segresnet", 32)
    trainer = "nnUNetTrainerSuPreMSegResNetConvAdapter"
    nnunet("nnUNetv2_train", "902", CONFIG, "0", "-tr", trainer, "-device", "cpu",
           "-pretrained_weights", str(suprem_file), env=pipeline["env"])
    checkpoint = _fold(pipeline, trainer) / "checkpoint_final.pth"
    adapter = adapter_path_for(checkpoint)
    assert adapter.stat().st_size < 0.10 * checkpoint.stat().st_size
    tuned = safe_load_checkpoint(checkpoint)["network_weights"]
    ref = source.state_dict()
    # the head region (conv_final: norm + conv) trains as a copy ("modules_to_save"), its output conv is new;
    # everything else is frozen
    frozen = [k for k in tuned if plain_key(k) in ref and ".modules_to_save." not in k
              and not plain_key(k).startswith("conv_final.2.conv")]
    assert len(frozen) > 50 and all(torch.equal(tuned[k], ref[plain_key(k)]) for k in frozen)
    assert any("conv_adapter" in k for k in load_adapter_file(adapter)[0])
    _predict_in_process(pipeline, trainer, suprem_file)


def test_suprem_unet3d_convadapter_with_the_nnunetv2_train_command(pipeline):
    """SuPreM's UNet3D (a file in the released layout, tests/data) fine-tuned with ConvAdapter by the installed
    ``nnUNetv2_train`` command itself; the frozen backbone, batch-norm buffers included, stays the released one."""
    from suprem_layouts import BACKBONE_PREFIX, fake_released_checkpoint

    suprem_file = pipeline["root"] / "supervised_suprem_unet_2100.pth"
    released = fake_released_checkpoint("unet", suprem_file)
    trainer = "nnUNetTrainerSuPreMUNet3DConvAdapter"
    command = shutil.which("nnUNetv2_train")
    assert command, "nnUNetv2_train is not on PATH"
    proc = subprocess.run([command, "902", CONFIG, "0", "-tr", trainer, "-device", "cpu",
                           "-pretrained_weights", str(suprem_file)], env=pipeline["env"], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    fold = _fold(pipeline, trainer)
    checkpoint = fold / "checkpoint_final.pth"
    adapter = adapter_path_for(checkpoint)
    assert adapter.stat().st_size < 0.10 * checkpoint.stat().st_size
    tuned = safe_load_checkpoint(checkpoint)["network_weights"]
    prefix = BACKBONE_PREFIX["unet"]
    frozen = [k for k in tuned if prefix + plain_key(k) in released and ".modules_to_save." not in k]
    assert len(frozen) > 100 and any(k.endswith("running_mean") for k in frozen)
    changed = [k for k in frozen if not torch.equal(tuned[k], released[prefix + plain_key(k)].to(tuned[k].dtype))]
    assert not changed, f"frozen SuPreM tensors changed by training: {changed[:5]}"
    assert any("conv_adapter" in k for k in load_adapter_file(adapter)[0])
    record = json.loads((fold / "results.json").read_text())
    assert record["method"] == "convadapter" and record["backbone"] == "unet"
    assert [h["epoch"] for h in record["history"]] == [1] and "val_mean_dice" in record["history"][0]
    _predict_in_process(pipeline, trainer, suprem_file)


def test_pretrained_weights_from_other_architecture_fail_clearly(pipeline, tmp_path):
    """A checkpoint of another architecture stops with the plugin's message, before any training."""
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    other = PlainConvUNet(1, 3, (8, 16, 24), torch.nn.Conv3d, 3, (1, 2, 2), (2, 2, 2), 3, (2, 2), conv_bias=True,
                          norm_op=torch.nn.InstanceNorm3d, norm_op_kwargs={"eps": 1e-5, "affine": True},
                          nonlin=torch.nn.LeakyReLU)
    bad = tmp_path / "other_architecture.pth"
    torch.save({"network_weights": other.state_dict()}, bad)
    proc = nnunet("nnUNetv2_train", "902", CONFIG, "0", "-tr", "nnUNetTrainerConvAdapterResidual", "-device", "cpu",
                  "-pretrained_weights", str(bad), env=pipeline["env"], expect_ok=False)
    assert proc.returncode != 0
    last_line = proc.stderr.strip().splitlines()[-1]
    assert last_line.startswith("nnunet_plugin.checkpoints.PretrainedWeightsError")
    assert "other_architecture.pth" in last_line and "another shape" in last_line
    assert "Epoch 0" not in proc.stdout


def test_peft_trainer_without_pretrained_weights_stops_unless_opted_in(pipeline):
    """Adapters on a random frozen backbone are a silent waste: the trainer refuses before the first epoch."""
    trainer = "nnUNetTrainerHeadOnly"
    proc = nnunet("nnUNetv2_train", "902", CONFIG, "0", "-tr", trainer, "-device", "cpu", env=pipeline["env"],
                  expect_ok=False)
    assert proc.returncode != 0 and "Epoch 0" not in proc.stdout
    last_line = proc.stderr.strip().splitlines()[-1]
    assert last_line.startswith("nnunet_plugin.checkpoints.PretrainedWeightsError")
    assert "no -pretrained_weights given" in last_line and "nnUNet_peft_allow_random_backbone=1" in last_line
    nnunet("nnUNetv2_train", "902", CONFIG, "0", "-tr", trainer, "-device", "cpu",
           env=dict(pipeline["env"], nnUNet_peft_allow_random_backbone="1"))
    logs = [f.read_text() for f in _fold(pipeline, trainer).glob("training_log_*.txt")]  # the refused run's too
    assert any("frozen backbone keeps its random initialisation" in log for log in logs)
    assert (_fold(pipeline, trainer) / "checkpoint_final.pth").is_file()
