"""SuPreM checkpoint loaders on files written in exactly the released layouts."""

from __future__ import annotations

import pickle

import pytest
import torch

from monai_peft.checkpoints import HEAD_PREFIXES, load_suprem_checkpoint, write_suprem_layout_checkpoint
from monai_peft.networks import suprem_backbone, suprem_segresnet


def _pair(backbone: str, src_classes: int = 4, dst_classes: int = 7):
    torch.manual_seed(1)
    src = suprem_backbone(backbone, src_classes)
    with torch.no_grad():  # non-trivial BN buffers so buffers are checked too
        for name, buf in src.named_buffers():
            if "running" in name:
                buf.uniform_(0.5, 1.5)
    torch.manual_seed(2)
    dst = suprem_backbone(backbone, dst_classes)
    return src, dst


@pytest.mark.parametrize("backbone", ["segresnet", "unet"])
def test_fake_suprem_checkpoint_loads_exactly(tmp_path, backbone):
    src, dst = _pair(backbone)
    path = write_suprem_layout_checkpoint(src, tmp_path / f"supervised_suprem_{backbone}_2100.pth", backbone)
    raw = torch.load(path, weights_only=True)
    prefix = "module." if backbone == "segresnet" else "module.backbone."
    assert set(raw) >= {"net"} and all(k.startswith("module.") for k in raw["net"])
    assert sum(k.startswith(prefix) for k in raw["net"]) == len(src.state_dict())
    head = HEAD_PREFIXES[backbone]
    head_before = {k: v.clone() for k, v in dst.state_dict().items() if k.startswith(head)}

    report = load_suprem_checkpoint(dst, path, backbone=backbone)

    src_sd, dst_sd = src.state_dict(), dst.state_dict()
    backbone_keys = [k for k in src_sd if not k.startswith(head)]
    for k in backbone_keys:
        assert torch.equal(src_sd[k], dst_sd[k]), k
    assert sorted(report.loaded) == sorted(backbone_keys)
    assert sorted(report.missing) == sorted(head_before)  # new head for 7 classes stays at its init
    for k, v in head_before.items():
        assert torch.equal(dst_sd[k], v) and dst_sd[k].shape[0] == 7
    head_weight = {"segresnet": "conv_final.2.conv.weight", "unet": "out_tr.final_conv.weight"}[backbone]
    assert prefix + head_weight in report.skipped
    if backbone == "unet":
        assert {"module.controller.weight", "module.organ_embedding", "module.precls_conv.2.weight"} <= set(report.skipped)
    assert report.as_dict()["backbone"] == backbone


def test_factory_loads_pretrained_path(tmp_path):
    src, _ = _pair("segresnet")
    path = write_suprem_layout_checkpoint(src, tmp_path / "seg.pth", "segresnet")
    model = suprem_segresnet(out_channels=3, pretrained=path)
    assert torch.equal(model.convInit.conv.weight, src.convInit.conv.weight)


def test_keep_head_loads_matching_head(tmp_path):
    src, _ = _pair("unet", src_classes=32)
    path = write_suprem_layout_checkpoint(src, tmp_path / "unet.pth", "unet", pretrain_classes=32)
    dst = suprem_backbone("unet", 32)
    report = load_suprem_checkpoint(dst, path, "unet", keep_head=True)
    raw = torch.load(path, weights_only=True)["net"]
    assert torch.equal(dst.out_tr.final_conv.weight, raw["module.backbone.out_tr.final_conv.weight"])
    assert "out_tr.final_conv.weight" in report.loaded and not report.missing


def test_wrong_backbone_fails_naming_keys(tmp_path):
    src, _ = _pair("segresnet")
    path = write_suprem_layout_checkpoint(src, tmp_path / "seg.pth", "segresnet")
    with pytest.raises(ValueError, match=r"seg\.pth.*no key matches.*module\.convInit"):
        load_suprem_checkpoint(suprem_backbone("unet", 2), path, backbone="unet")


def test_missing_backbone_keys_fail_with_names(tmp_path):
    src, dst = _pair("unet")
    path = write_suprem_layout_checkpoint(src, tmp_path / "unet.pth", "unet")
    ckpt = torch.load(path, weights_only=True)
    del ckpt["net"]["module.backbone.up_tr64.ops.1.conv1.weight"]
    torch.save(ckpt, tmp_path / "broken.pth")
    before = dst.down_tr64.ops[0].conv1.weight.clone()
    with pytest.raises(ValueError, match=r"broken\.pth.*up_tr64\.ops\.1\.conv1\.weight"):
        load_suprem_checkpoint(dst, tmp_path / "broken.pth", backbone="unet")
    assert torch.equal(dst.down_tr64.ops[0].conv1.weight, before)  # nothing half-loaded


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_shape_mismatch_and_bad_files(tmp_path):
    src, dst = _pair("segresnet")
    path = write_suprem_layout_checkpoint(src, tmp_path / "seg.pth", "segresnet")
    ckpt = torch.load(path, weights_only=True)
    ckpt["net"]["module.convInit.conv.weight"] = torch.zeros(8, 1, 3, 3, 3)
    torch.save(ckpt, tmp_path / "shape.pth")
    with pytest.raises(ValueError, match=r"wrong shape.*convInit\.conv\.weight"):
        load_suprem_checkpoint(dst, tmp_path / "shape.pth")
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_suprem_checkpoint(dst, tmp_path / "nope.pth")
    torch.save({"epoch": 3, "optimizer": "adam"}, tmp_path / "nostate.pth")
    with pytest.raises(ValueError, match=r"nostate\.pth.*no state dict.*epoch"):
        load_suprem_checkpoint(dst, tmp_path / "nostate.pth")
    (tmp_path / "evil.pth").write_bytes(pickle.dumps(object()))  # not loadable with weights_only=True
    with pytest.raises(ValueError, match=r"evil\.pth"):
        load_suprem_checkpoint(dst, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="backbone"):
        load_suprem_checkpoint(dst, path, backbone="swin")
