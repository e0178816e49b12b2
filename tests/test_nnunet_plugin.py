"""nnU-Net plugin: registration, settings, adapted networks, pretrained loading, adapter files, converter.

Fast, in-process tests on tiny networks; the end-to-end ``nnUNetv2_*`` runs are in test_nnunet_integration.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

from nnunet_plugin import EXT_TRAINER_ENV, ext_trainer_folder, ext_trainer_value, register_ext_trainer_folder
from nnunet_plugin.checkpoints import (
    PretrainedWeightsError, adapter_state_dict, load_adapter_file, load_pretrained_backbone, plain_key,
    safe_load_checkpoint, save_adapter_file,
)
from nnunet_plugin.network import build_peft_network, seg_layer_names
from nnunet_plugin.settings import ENV_VARS, PEFTSettings, final_validation_enabled, resolve_settings, training_length

REPO = Path(__file__).resolve().parents[1]
TOTALSEG_EXAMPLE = Path(__file__).resolve().parents[1] / "monai_peft" / "data" / "totalseg_example"

warnings.filterwarnings("ignore", message="Unsupported layer type")


def _plain_unet(num_classes: int = 3, features=(8, 16, 32)) -> nn.Module:
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    return PlainConvUNet(1, len(features), features, nn.Conv3d, 3, (1, 2, 2), (2, 2, 2), num_classes, (2, 2),
                         conv_bias=True, norm_op=nn.InstanceNorm3d, norm_op_kwargs={"eps": 1e-5, "affine": True},
                         nonlin=nn.LeakyReLU, deep_supervision=True)


def _resenc_unet(num_classes: int = 3) -> nn.Module:
    from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet

    return ResidualEncoderUNet(1, 3, (8, 16, 32), nn.Conv3d, 3, (1, 2, 2), (1, 2, 2), num_classes, (1, 1),
                               conv_bias=True, norm_op=nn.InstanceNorm3d,
                               norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=nn.LeakyReLU,
                               deep_supervision=True)


def _nnunet_checkpoint(network: nn.Module, path: Path) -> Path:
    """What nnUNetTrainer.save_checkpoint writes, reduced to the keys the loaders read."""
    torch.save({"network_weights": network.state_dict(), "trainer_name": "nnUNetTrainer", "current_epoch": 1,
                "inference_allowed_mirroring_axes": (0, 1, 2), "_best_ema": np.float64(0.5)}, path)
    return path


# -- registration -------------------------------------------------------------------------------------------------
def test_ext_trainer_value_appends_and_keeps_existing(tmp_path):
    ours = ext_trainer_folder()
    assert Path(ours, "monai_peft_nnunet_trainers.py").is_file()
    assert ext_trainer_value(None) == ours
    existing = os.pathsep.join([str(tmp_path / "a"), str(tmp_path / "b")])
    value = ext_trainer_value(existing)
    assert value.split(os.pathsep) == [str(tmp_path / "a"), str(tmp_path / "b"), ours]
    assert ext_trainer_value(value) == value  # idempotent
    env = {EXT_TRAINER_ENV: str(tmp_path / "a")}
    register_ext_trainer_folder(env)
    register_ext_trainer_folder(env)
    assert env[EXT_TRAINER_ENV].split(os.pathsep) == [str(tmp_path / "a"), ours]


def test_pth_hook_and_main_print_the_folder(tmp_path):
    """The .pth file (processed by `site` at start-up) extends the variable; `python -m nnunet_plugin` prints it."""
    site_dir = tmp_path / "site"
    site_dir.mkdir()
    (site_dir / "monai_peft_nnunet.pth").write_text((REPO / "nnunet_plugin" / "monai_peft_nnunet.pth").read_text())
    env = {k: v for k, v in os.environ.items() if k not in (EXT_TRAINER_ENV, "MONAI_PEFT_NO_NNUNET_HOOK")}
    env[EXT_TRAINER_ENV] = "/opt/user_trainers"
    code = (f"import site, os, sys; site.addsitedir({str(site_dir)!r}); print(os.environ[{EXT_TRAINER_ENV!r}]); "
            "print(sorted(m for m in sys.modules if m.startswith('nnunet')))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    folders, modules = out.stdout.strip().splitlines()
    assert folders.split(os.pathsep) == ["/opt/user_trainers", ext_trainer_folder()]
    assert modules == "[]", "the hook registers the folder without importing the nnunet_plugin package"
    env["MONAI_PEFT_NO_NNUNET_HOOK"] = "1"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[0] == "/opt/user_trainers"
    out = subprocess.run([sys.executable, "-m", "nnunet_plugin"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ext_trainer_folder()


def test_nnunet_finds_plugin_and_user_trainers(tmp_path, monkeypatch):
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    from nnunet_plugin import trainers

    user = tmp_path / "user_trainers"
    user.mkdir()
    (user / "my_trainer.py").write_text(
        "from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer\n"
        "class MyOwnTrainer(nnUNetTrainer):\n    pass\n")
    monkeypatch.setenv(EXT_TRAINER_ENV, ext_trainer_value(str(user)))
    assert recursive_find_trainer_class_by_name("MyOwnTrainer").__name__ == "MyOwnTrainer"
    for name in ("nnUNetTrainerConvAdapter", "nnUNetTrainerLoRA", "nnUNetTrainerSSF", "nnUNetTrainerDecoderOnly"):
        assert recursive_find_trainer_class_by_name(name) is getattr(trainers, name)


# -- settings -----------------------------------------------------------------------------------------------------
def test_settings_precedence_and_errors():
    plans = {"monai_peft": {"gamma": 8, "rank": 4}}
    s = resolve_settings({"gamma": 2, "placement": "residual-parallel"}, plans, environ={})
    assert (s.gamma, s.rank, s.placement) == (8, 4, "residual-parallel")  # plans beat class defaults
    s = resolve_settings({}, plans, environ={ENV_VARS["gamma"]: "16", ENV_VARS["target"]: "encoder"})
    assert (s.gamma, s.target) == (16, ("encoder",))  # environment beats plans
    s = resolve_settings({}, plans, environ={ENV_VARS["gamma"]: "16"}, use_env=False)
    assert s.gamma == 8  # at prediction the stored plans are authoritative
    with pytest.raises(ValueError, match="nnUNet_peft_placement"):
        resolve_settings({}, None, environ={ENV_VARS["placement"]: "diagonal"})
    with pytest.raises(ValueError, match="unknown keys"):
        resolve_settings({}, {"monai_peft": {"gama": 2}}, environ={})
    assert training_length({"nnUNet_peft_epochs": "3", "nnUNet_peft_iterations": "5"}) == {
        "num_epochs": 3, "num_iterations_per_epoch": 5}
    with pytest.raises(ValueError, match="nnUNet_peft_val_iterations"):
        training_length({"nnUNet_peft_val_iterations": "0"})
    with pytest.raises(ValueError, match="nnUNet_peft_epochs"):
        training_length({"nnUNet_peft_epochs": "one"})
    assert final_validation_enabled({}) and not final_validation_enabled({"nnUNet_peft_final_validation": "0"})
    assert PEFTSettings(rank="dynamic").rank == "dynamic"


# -- adapted networks ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "make, method, settings",
    [
        (_plain_unet, "convadapter", PEFTSettings()),
        (_plain_unet, "convadapter", PEFTSettings(placement="residual-parallel")),
        (_resenc_unet, "convadapter", PEFTSettings(placement="residual-sequential", gamma=2)),
        (_resenc_unet, "convadapter", PEFTSettings(placement="conv-sequential")),
        (_plain_unet, "lora", PEFTSettings(rank=4)),
        (_resenc_unet, "lora", PEFTSettings(rank="dynamic", target=("encoder",))),
        (_plain_unet, "ssf", PEFTSettings()),
        (_resenc_unet, "bitfit", PEFTSettings()),
        (_plain_unet, "decoder", PEFTSettings()),
    ],
)
def test_build_peft_network_identity_at_init_and_adapters_in_forward_path(make, method, settings):
    torch.manual_seed(0)
    network = make()
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        reference = network(x)[0].clone()
    seg_modules = [dict(network.named_modules())[n] for n in seg_layer_names(network)]
    peft_model = build_peft_network(network, method, settings)
    with torch.no_grad():
        out = peft_model(x)[0]
    assert torch.allclose(out, reference, atol=1e-5), "adapters must start as identity"
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert any(".seg_layers." in n for n in trainable)  # the new head trains
    frozen = [n for n, p in peft_model.named_parameters() if not p.requires_grad]
    assert frozen and sum(p.numel() for p in peft_model.parameters() if p.requires_grad) < \
        0.6 * sum(p.numel() for p in peft_model.parameters())
    # every ConvDropoutNormReLU runs the adapted modules (nnU-Net registers conv/norm twice)
    from dynamic_network_architectures.building_blocks.simple_conv_blocks import ConvDropoutNormReLU

    for block in peft_model.base_model.model.modules():
        if isinstance(block, ConvDropoutNormReLU):
            assert block.all_modules[0] is block.conv
            if hasattr(block, "norm"):
                assert block.norm in list(block.all_modules)
    # changing the adapter (not the seg layers) changes the output: adapters sit in the forward path
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if p.requires_grad and ".seg_layers." not in name:
                p.add_(0.05)
        changed = peft_model(x)[0]
    assert not torch.allclose(changed, out, atol=1e-4)
    assert all(not p.requires_grad for m in seg_modules for p in m.parameters()) or method == "head"


def test_full_method_keeps_plain_network():
    network = _plain_unet()
    assert build_peft_network(network, "full", PEFTSettings()) is network
    assert all(p.requires_grad for p in network.parameters())


# -- pretrained weights -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["convadapter", "decoder", "bitfit"])
def test_load_pretrained_backbone_freezes_exact_tensors_and_reinits_seg_layers(tmp_path, method):
    """Every tensor with a pretrained counterpart (frozen base or trainable copy, e.g. the decoder-only copy)
    equals the file; the seg layers keep their fresh initialisation."""
    torch.manual_seed(1)
    pretrained = _plain_unet(num_classes=3)
    ckpt = _nnunet_checkpoint(pretrained, tmp_path / "checkpoint_final.pth")
    torch.manual_seed(2)
    target = build_peft_network(_plain_unet(num_classes=2), method, PEFTSettings())
    seg_before = {k: v.clone() for k, v in target.state_dict().items() if ".seg_layers." in k}
    report = load_pretrained_backbone(target, ckpt)
    ref = pretrained.state_dict()
    loaded = 0
    for key, value in target.state_dict().items():
        base = plain_key(key)
        if ".seg_layers." in base:
            assert torch.equal(value, seg_before[key])  # new label count: fresh init, not loaded
        elif base in ref:
            assert torch.equal(value, ref[base]), key
            loaded += 1
    assert report["loaded"] == loaded > 0
    if method == "decoder":  # the trainable decoder copy starts from the pretrained decoder too
        assert any("ln_tuning_layers" in k for k in target.state_dict())
    assert set(report["skipped"]) == {k for k in ref if ".seg_layers." in k}


def test_pretrained_from_other_architecture_is_a_clear_error(tmp_path):
    other = _nnunet_checkpoint(_plain_unet(features=(8, 16, 48)), tmp_path / "other_arch.pth")
    target = build_peft_network(_plain_unet(), "lora", PEFTSettings(rank=2))
    with pytest.raises(PretrainedWeightsError, match=r"other_arch\.pth.*another shape.*move_plans"):
        load_pretrained_backbone(target, other)
    not_a_checkpoint = tmp_path / "notes.pth"
    not_a_checkpoint.write_text("hello")
    with pytest.raises(PretrainedWeightsError, match="notes.pth"):
        load_pretrained_backbone(target, not_a_checkpoint)
    torch.save({"epoch": 3}, tmp_path / "no_weights.pth")
    with pytest.raises(PretrainedWeightsError, match=r"no_weights\.pth.*network_weights"):
        load_pretrained_backbone(target, tmp_path / "no_weights.pth")


def _as_if_saved_on_gpu(src: Path, dst: Path) -> Path:
    """Rewrite the storage locations of a CPU torch file to ``cuda:0`` (what a GPU run writes)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            if item.filename.endswith("data.pkl"):  # pickled location strings (protocol 2 or 4+ opcodes)
                before = data
                data = data.replace(b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0")
                data = data.replace(b"\x8c\x03cpu", b"\x8c\x06cuda:0")
                assert data != before
            zout.writestr(item, data)
    return dst


def test_gpu_saved_checkpoint_loads_on_cpu(tmp_path):
    torch.manual_seed(3)
    pretrained = _plain_unet()
    cpu_file = _nnunet_checkpoint(pretrained, tmp_path / "cpu.pth")
    gpu_file = _as_if_saved_on_gpu(cpu_file, tmp_path / "gpu.pth")
    if not torch.cuda.is_available():
        # nnU-Net's own loader (torch.load without map_location) fails on this machine ...
        from nnunetv2.run.load_pretrained_weights import load_pretrained_weights

        with pytest.raises(RuntimeError, match="CUDA"):
            load_pretrained_weights(_plain_unet(), str(gpu_file))
    # ... the plugin's maps it to CPU
    target = build_peft_network(_plain_unet(), "ssf", PEFTSettings())
    load_pretrained_backbone(target, gpu_file)
    ref = pretrained.state_dict()
    key = "encoder.stages.0.0.convs.0.conv.weight"
    loaded = {plain_key(k): v for k, v in target.state_dict().items()}
    assert loaded[key].device.type == "cpu" and torch.equal(loaded[key], ref[key])
    assert safe_load_checkpoint(gpu_file)["network_weights"][key].device.type == "cpu"


def test_stock_loader_route_only_for_plugin_networks(tmp_path):
    """Importing the trainers routes nnU-Net's -pretrained_weights call; plain networks keep nnU-Net's loader."""
    import nnunetv2.run.run_training as run_training

    import nnunet_plugin.trainers  # noqa: F401

    torch.manual_seed(4)
    pretrained = _plain_unet()
    ckpt = _nnunet_checkpoint(pretrained, tmp_path / "p.pth")
    adapted = build_peft_network(_plain_unet(num_classes=2), "convadapter", PEFTSettings())
    run_training.load_pretrained_weights(adapted, str(ckpt))  # nnU-Net's function would assert on peft keys
    key = "encoder.stages.1.0.convs.1.norm.weight"
    assert torch.equal({plain_key(k): v for k, v in adapted.state_dict().items()}[key], pretrained.state_dict()[key])
    plain = _plain_unet()
    run_training.load_pretrained_weights(plain, str(ckpt))  # nnU-Net's own path
    assert torch.equal(plain.state_dict()[key], pretrained.state_dict()[key])


# -- adapter files ------------------------------------------------------------------------------------------------
def test_adapter_file_roundtrip_holds_only_what_the_base_cannot_restore(tmp_path):
    torch.manual_seed(5)
    pretrained = _plain_unet()
    ckpt = _nnunet_checkpoint(pretrained, tmp_path / "base.pth")
    model = build_peft_network(_plain_unet(num_classes=2), "lora", PEFTSettings(rank=2))
    load_pretrained_backbone(model, ckpt)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_()
    path = save_adapter_file(model, tmp_path / "a.adapter.safetensors", {"trainer": "X", "settings": {"rank": 2}})
    tensors, meta = load_adapter_file(path)
    assert meta == {"trainer": "X", "settings": {"rank": 2}}
    assert set(tensors) == set(adapter_state_dict(model))
    assert all(not any(s in plain_key(k) for s in ("all_modules", "decoder.encoder")) for k in tensors)  # deduped
    assert any("lora_A" in k for k in tensors) and any(".seg_layers." in k for k in tensors)
    assert not any(k.endswith("conv.base_layer.weight") for k in tensors)  # frozen backbone stays out
    # rebuild: base + adapter reproduce every tensor and the output
    torch.manual_seed(6)
    rebuilt = build_peft_network(_plain_unet(num_classes=2), "lora", PEFTSettings(rank=2))
    load_pretrained_backbone(rebuilt, ckpt)
    rebuilt.load_state_dict(tensors, strict=False)
    for k, v in model.state_dict().items():
        assert torch.equal(v, rebuilt.state_dict()[k]), k
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        assert torch.equal(model(x)[0], rebuilt(x)[0])
    full_size = sum(v.numel() for v in model.state_dict().values())
    assert sum(v.numel() for v in tensors.values()) < 0.5 * full_size
    with pytest.raises(ValueError, match="no 'monai_peft_nnunet' metadata"):
        from safetensors.torch import save_file

        save_file({"w": torch.zeros(1)}, str(tmp_path / "foreign.safetensors"))
        load_adapter_file(tmp_path / "foreign.safetensors")


# -- TotalSegmentator converter -----------------------------------------------------------------------------------
@pytest.mark.slow  # nnU-Net's dataset check starts a worker process
def test_totalseg_to_nnunet_on_real_ct(tmp_path):
    from monai_peft.data import class_group, import_multilabel_case, task_id_map
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    from nnunet_plugin.totalseg import install_splits, totalseg_to_nnunet

    ct = nib.load(str(TOTALSEG_EXAMPLE / "example_ct_sm.nii.gz"))
    seg = nib.load(str(TOTALSEG_EXAMPLE / "example_seg.nii.gz"))
    ids = task_id_map(TOTALSEG_EXAMPLE / "class_map.json", "total")
    root = tmp_path / "totalseg"
    crops = {"s0001": (0, 0), "s0002": (40, 30), "s0003": (80, 60)}  # 40 x 40 x 30 crops of the real CT
    expected = {}
    organs = class_group("organs")
    for case, (x0, y0) in crops.items():
        sl = (slice(x0, x0 + 40), slice(y0, y0 + 40), slice(None))
        affine = ct.affine.copy()
        affine[:3, 3] = ct.affine[:3, :3] @ np.array([x0, y0, 0]) + ct.affine[:3, 3]
        img_path, seg_path = tmp_path / f"{case}_ct.nii.gz", tmp_path / f"{case}_seg.nii.gz"
        nib.save(nib.Nifti1Image(np.asanyarray(ct.dataobj)[sl], affine), str(img_path))
        crop_seg = np.asanyarray(seg.dataobj)[sl].astype(np.int16)
        nib.save(nib.Nifti1Image(crop_seg, affine), str(seg_path))
        import_multilabel_case(img_path, seg_path, ids, root / case)
        want = np.zeros(crop_seg.shape, np.uint8)
        by_name = {n: i for i, n in ids.items()}
        for index, name in enumerate(organs, start=1):
            want[crop_seg == by_name[name]] = index
        expected[case] = want
    (root / "meta.csv").write_text("image_id;age;split\ns0001;50;train\ns0002;60;val\ns0003;70;test\n")

    folder = totalseg_to_nnunet(root, tmp_path / "raw", 7, "organs", progress=False)
    assert folder.name == "Dataset007_TotalSegOrgans"
    assert sorted(p.name for p in (folder / "imagesTr").iterdir()) == ["s0001_0000.nii.gz", "s0002_0000.nii.gz"]
    assert sorted(p.name for p in (folder / "imagesTs").iterdir()) == ["s0003_0000.nii.gz"]
    for case, want in expected.items():
        sub = "labelsTs" if case == "s0003" else "labelsTr"
        got = nib.load(str(folder / sub / f"{case}.nii.gz"))
        assert np.array_equal(np.asanyarray(got.dataobj), want), case
        assert np.allclose(got.affine, nib.load(str(folder / sub.replace("labels", "images") /
                                                     f"{case}_0000.nii.gz")).affine)
    assert len(np.unique(expected["s0001"])) > 2  # real organs present, not an empty crop
    dataset = json.loads((folder / "dataset.json").read_text())
    assert dataset["labels"] == {"background": 0, **{n: i for i, n in enumerate(organs, start=1)}}
    assert dataset["numTraining"] == 2 and dataset["channel_names"] == {"0": "CT"}
    assert json.loads((folder / "splits_final.json").read_text()) == [{"train": ["s0001"], "val": ["s0002"]}]
    verify_dataset_integrity(str(folder), num_processes=1)  # nnU-Net's own checks (raises on problems)
    dst = install_splits(folder, tmp_path / "preprocessed")
    assert dst == tmp_path / "preprocessed" / folder.name / "splits_final.json" and dst.is_file()
    (root / "meta.csv").write_text("image_id;split\ns0001;train\ns0002;holdout\ns0003;test\n")
    with pytest.raises(ValueError, match="meta.csv.*s0002.*holdout"):
        totalseg_to_nnunet(root, tmp_path / "raw2", 8, "organs", progress=False)


# -- SuPreM backbone ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method, settings", [("convadapter", PEFTSettings(placement="residual-parallel")),
                                              ("lora", PEFTSettings(rank=4)), ("decoder", PEFTSettings())])
def test_suprem_segresnet_network_loads_suprem_layout(tmp_path, method, settings):
    from monai_peft.checkpoints import write_suprem_layout_checkpoint
    from monai_peft.networks import suprem_backbone

    from nnunet_plugin.network import build_suprem_peft_network

    torch.manual_seed(7)
    source = suprem_backbone("segresnet", 32)
    ckpt = write_suprem_layout_checkpoint(source, tmp_path / "supervised_suprem_segresnet_2100.pth", "segresnet", 32)
    network = build_suprem_peft_network(suprem_backbone("segresnet", 3), method, settings, "segresnet")
    report = load_pretrained_backbone(network, ckpt)
    assert report["skipped"] == ["conv_final.2.conv.bias", "conv_final.2.conv.weight"]  # 32-class head dropped
    ref = source.state_dict()
    compared = 0
    for key, value in network.state_dict().items():
        base = plain_key(key)
        if base in ref and not base.startswith("conv_final.2.conv"):
            assert torch.equal(value, ref[base]), key
            compared += 1
    assert compared == report["loaded"] > 50
    trainable = [n for n, p in network.named_parameters() if p.requires_grad]
    assert any("conv_final" in n for n in trainable)
    assert sum(p.numel() for p in network.parameters() if p.requires_grad) < 0.2 * sum(
        p.numel() for p in network.parameters())
    with torch.no_grad():
        assert network(torch.randn(1, 1, 16, 16, 16)).shape == (1, 3, 16, 16, 16)


def test_installed_package_registers_trainers_without_any_export():
    """After `pip install` (plain or -e) a new interpreter finds the trainer folder with no variable set by hand."""
    env = {k: v for k, v in os.environ.items() if k not in ("nnUNet_extTrainer", "MONAI_PEFT_NO_NNUNET_HOOK")}
    code = "import os; print(os.environ.get('nnUNet_extTrainer', ''))"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert ext_trainer_folder() in proc.stdout.split(os.pathsep)[-1], (
        "monai_peft_nnunet.pth is not in site-packages: reinstall the project with `pip install -e .` (setup.py "
        "ships the hook)"
    )


# -- nothing half-written, nothing silently missing -------------------------------------------------------------------
def test_totalseg_conversion_appears_whole_or_not_at_all(tmp_path):
    from monai_peft.data import write_phantom_dataset

    from nnunet_plugin.totalseg import totalseg_to_nnunet

    write_phantom_dataset(tmp_path / "ts", 4, (12, 12, 12), seed=0)
    raw = tmp_path / "raw"
    folder = totalseg_to_nnunet(tmp_path / "ts", raw, 501, ["liver", "spleen"], progress=False)
    before = {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    assert json.loads((folder / "dataset.json").read_text())["labels"] == {"background": 0, "liver": 1, "spleen": 2}
    with pytest.raises(FileExistsError, match="Dataset501_TotalSegCustom exists"):
        totalseg_to_nnunet(tmp_path / "ts", raw, 501, ["liver", "spleen"], progress=False)
    with pytest.raises(FileExistsError, match="dataset id 501 is taken by"):
        totalseg_to_nnunet(tmp_path / "ts", raw, 501, ["liver"], name="Other", progress=False)
    with pytest.raises(ValueError, match=r"'livr' \(did you mean 'liver'\?\)"):
        totalseg_to_nnunet(tmp_path / "ts", raw, 502, ["livr", "spleen"], progress=False)
    # a corrupt mask in the last case: the error names it, the earlier dataset stays as it was, nothing else is left
    mask = tmp_path / "ts" / "s0003" / "segmentations" / "spleen.nii.gz"
    mask.write_bytes(mask.read_bytes()[:40])
    with pytest.raises(ValueError, match=r"s0003/segmentations/spleen\.nii\.gz: cannot be read as NIfTI"):
        totalseg_to_nnunet(tmp_path / "ts", raw, 501, ["liver", "spleen"], progress=False, overwrite=True)
    with pytest.raises(ValueError, match="spleen.nii.gz"):
        totalseg_to_nnunet(tmp_path / "ts", raw, 503, ["liver", "spleen"], progress=False)
    assert sorted(p.name for p in raw.iterdir()) == ["Dataset501_TotalSegCustom"]
    assert {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before


def test_rebuild_loads_adapters_strictly_and_names_what_is_missing(tmp_path):
    from nnunet_plugin.rebuild import load_adapter_tensors

    torch.manual_seed(5)
    ckpt = _nnunet_checkpoint(_plain_unet(), tmp_path / "base.pth")
    model = build_peft_network(_plain_unet(num_classes=2), "convadapter", PEFTSettings())
    load_pretrained_backbone(model, ckpt)
    path = save_adapter_file(model, tmp_path / "a.adapter.safetensors", {"trainer": "X"})
    tensors, _ = load_adapter_file(path)
    rebuilt = build_peft_network(_plain_unet(num_classes=2), "convadapter", PEFTSettings())
    load_pretrained_backbone(rebuilt, ckpt)
    dropped = sorted(k for k in tensors if "conv_adapter" in k)[0]
    partial = {k: v for k, v in tensors.items() if k != dropped}
    with pytest.raises(ValueError, match=rf"a\.adapter\.safetensors: 1 adapter tensors .* missing, e\.g\. \['{dropped}'\]"):
        load_adapter_tensors(rebuilt, partial, path)
    wrong = dict(tensors, **{dropped: torch.zeros(1)})
    with pytest.raises(ValueError, match=rf"{dropped}: file \(1,\)"):
        load_adapter_tensors(rebuilt, wrong, path)
    load_adapter_tensors(rebuilt, tensors, path)
    assert all(torch.equal(rebuilt.state_dict()[k], v) for k, v in model.state_dict().items())
    # a file that is not safetensors at all is named
    junk = tmp_path / "junk.adapter.safetensors"
    junk.write_bytes(b"\xff" * 100)
    with pytest.raises(ValueError, match=r"junk\.adapter\.safetensors: not a safetensors file"):
        load_adapter_file(junk)


def test_random_backbone_needs_an_explicit_setting():
    from nnunet_plugin.settings import random_backbone_allowed

    assert random_backbone_allowed({}) is False
    assert random_backbone_allowed({ENV_VARS["allow_random_backbone"]: "1"}) is True
    with pytest.raises(ValueError, match="nnUNet_peft_allow_random_backbone must be 0 or 1"):
        random_backbone_allowed({ENV_VARS["allow_random_backbone"]: "maybe"})


def test_speed_settings_reach_the_network_and_bad_values_name_the_variable(monkeypatch):
    """``nnUNet_peft_lora_fused`` / ``nnUNet_peft_activation_checkpointing`` (issue 12): parsed, applied, refused."""
    from monai_peft.lora.fused import FusedConvLoraMixin
    from monai_peft.memory import checkpointed_blocks
    from nnunet_plugin.settings import speed_options

    assert speed_options("lora", {}) == {"fused": "auto"} and speed_options("ssf", {}) == {}
    assert speed_options("lora", {"nnUNet_peft_lora_fused": "off", "nnUNet_peft_activation_checkpointing": "all"}) \
        == {"fused": False, "activation_checkpointing": "all"}
    assert speed_options("convadapter", {"nnUNet_peft_activation_checkpointing": "1"}) == \
        {"activation_checkpointing": "full-resolution"}
    with pytest.raises(ValueError, match="nnUNet_peft_lora_fused must be one of"):
        speed_options("lora", {"nnUNet_peft_lora_fused": "fast"})
    with pytest.raises(ValueError, match="nnUNet_peft_activation_checkpointing must be 0, 1, off or one of"):
        speed_options("ssf", {"nnUNet_peft_activation_checkpointing": "yes please"})

    monkeypatch.setenv("nnUNet_peft_activation_checkpointing", "all")
    lora = build_peft_network(_plain_unet(), "lora", PEFTSettings(rank=2))
    assert any(isinstance(m, FusedConvLoraMixin) for m in lora.modules())  # the default conv path
    # every StackedConvBlocks once: the decoder's reference to the encoder does not wrap them twice
    assert len(checkpointed_blocks(lora)) == 5
    lora.train()(torch.randn(1, 1, 16, 16, 16))[0].sum().backward()
    monkeypatch.setenv("nnUNet_peft_lora_fused", "off")
    monkeypatch.delenv("nnUNet_peft_activation_checkpointing")
    plain = build_peft_network(_plain_unet(), "lora", PEFTSettings(rank=2))
    assert not any(isinstance(m, FusedConvLoraMixin) for m in plain.modules()) and not checkpointed_blocks(plain)


@pytest.mark.parametrize("make", [_plain_unet, _resenc_unet])
def test_plugin_targets_are_the_core_rule_with_nnunet_blocks(make):
    """One resolver: the plugin's targets are default_targets' for every method, placement and region set; the
    per-conv ConvAdapter placement takes the decoder's transposed convs, the block placement nnU-Net's conv blocks."""
    import dataclasses

    from dynamic_network_architectures.building_blocks.residual import BasicBlockD
    from dynamic_network_architectures.building_blocks.simple_conv_blocks import StackedConvBlocks

    from monai_peft.adapt import default_targets
    from monai_peft.targeting import resolve_targets
    from nnunet_plugin.network import adapter_targets

    net = make()
    modules = dict(net.named_modules())
    for method, placement in [("convadapter", "conv-parallel"), ("convadapter", "residual-parallel"),
                              ("lora", "conv-parallel"), ("ssf", "conv-parallel")]:
        for target in (("encoder",), ("decoder",), ("encoder", "decoder")):
            settings = dataclasses.replace(PEFTSettings(), placement=placement, target=target)
            names = adapter_targets(net, method, settings)
            if method == "convadapter" and placement.startswith("residual"):
                assert all(isinstance(modules[n], (StackedConvBlocks, BasicBlockD)) for n in names)
                assert not any(a != b and b.startswith(a + ".") for a in names for b in names)  # outermost only
            else:
                assert names == resolve_targets(net, default_targets(net, method, regions=target))
    conv_names = adapter_targets(net, "convadapter", PEFTSettings())
    assert any(isinstance(modules[n], nn.ConvTranspose3d) for n in conv_names)
    assert not any(isinstance(modules[n], nn.ConvTranspose3d) for n in adapter_targets(net, "lora", PEFTSettings()))
