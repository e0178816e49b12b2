"""SuPreM checkpoint loaders against the released files' key layouts, not against the project's own writer.

``tests/data/supervised_suprem_unet_2100.net.keys.json`` lists every tensor name and shape of the ``"net"`` dict of
SuPreM's released UNet file (copied from ``shared/data/suprem_layouts``, written out from SuPreM's model code);
``tests/data/supervised_suprem_segresnet_2100.net.keys.json`` those of the released SegResNet file (MONAI's SegResNet
in SuPreM's configuration with its 32-class head under ``module.``, written once and committed). The fake
checkpoints (``tests/suprem_layouts.py``) are random tensors of exactly those names and shapes, so a wrong prefix or key assumption in the
loader fails here.
"""

from __future__ import annotations

import pickle

import pytest
import torch
from suprem_layouts import BACKBONE_PREFIX, fake_released_checkpoint, released_layout

from monai_peft.checkpoints import HEAD_PREFIXES, load_suprem_checkpoint, write_suprem_layout_checkpoint
from monai_peft.networks import suprem_backbone, suprem_segresnet


@pytest.mark.parametrize("backbone", ["segresnet", "unet"])
def test_released_layout_loads_every_backbone_tensor(tmp_path, backbone):
    path = tmp_path / f"supervised_suprem_{backbone}_2100.pth"
    net = fake_released_checkpoint(backbone, path)
    torch.manual_seed(0)
    model = suprem_backbone(backbone, 7)
    head = HEAD_PREFIXES[backbone]
    head_before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(head)}

    report = load_suprem_checkpoint(model, path, backbone=backbone)

    prefix = BACKBONE_PREFIX[backbone]
    state = model.state_dict()
    backbone_keys = [k for k in state if not k.startswith(head)]
    for key in backbone_keys:  # every backbone tensor comes from the file, under the released name
        assert torch.equal(state[key], net[prefix + key].to(state[key].dtype)), key
    assert sorted(report.loaded) == sorted(backbone_keys)
    assert sorted(report.missing) == sorted(head_before)  # the new 7-class head keeps its initialisation
    assert all(torch.equal(state[k], v) and v.shape[0] == 7 for k, v in head_before.items())
    # what the released file holds beyond the backbone is skipped, not silently loaded: the 32-class head and,
    # for the UNet, the text-driven head of SuPreM's universal model
    extra = sorted(k for k in net if not (k.startswith(prefix) and k[len(prefix):] in backbone_keys))
    assert sorted(report.skipped) == extra
    if backbone == "unet":
        assert {"module.organ_embedding", "module.controller.weight", "module.text_to_vision.weight",
                "module.precls_conv.2.weight", "module.GAP.3.weight"} <= set(report.skipped)
    if backbone == "segresnet":
        assert "module.conv_final.2.conv.weight" in report.skipped  # the 32-class head of SuPreM's pretraining
    else:  # the universal model replaced the UNet's own output layer by the text-driven head: no out_tr at all
        assert not any(k.startswith("module.backbone.out_tr") for k in net)


@pytest.mark.parametrize("backbone", ["segresnet", "unet"])
def test_demo_writer_matches_the_released_layout(tmp_path, backbone):
    """``write_suprem_layout_checkpoint`` (for demos) writes the released names and shapes, nothing else."""
    path = write_suprem_layout_checkpoint(suprem_backbone(backbone, 3), tmp_path / "ours.pth", backbone,
                                          pretrain_classes=32)
    ours = {k: list(v.shape) for k, v in torch.load(path, weights_only=True)["net"].items()}
    assert ours == released_layout(backbone)


def test_factory_loads_pretrained_path(tmp_path):
    net = fake_released_checkpoint("segresnet", tmp_path / "seg.pth")
    model = suprem_segresnet(out_channels=3, pretrained=tmp_path / "seg.pth")
    assert torch.equal(model.convInit.conv.weight, net["module.convInit.conv.weight"])


def test_keep_head_loads_the_released_head_when_shapes_match(tmp_path):
    net = fake_released_checkpoint("segresnet", tmp_path / "seg.pth")
    model = suprem_backbone("segresnet", 32)
    report = load_suprem_checkpoint(model, tmp_path / "seg.pth", "segresnet", keep_head=True)
    assert torch.equal(model.conv_final[2].conv.weight, net["module.conv_final.2.conv.weight"])
    assert "conv_final.2.conv.weight" in report.loaded and not report.missing


def test_wrong_backbone_fails_naming_keys(tmp_path):
    fake_released_checkpoint("segresnet", tmp_path / "seg.pth")
    with pytest.raises(ValueError, match=r"seg\.pth.*no key matches.*module\.convInit"):
        load_suprem_checkpoint(suprem_backbone("unet", 2), tmp_path / "seg.pth", backbone="unet")


def test_missing_backbone_keys_fail_with_names(tmp_path):
    net = fake_released_checkpoint("unet", tmp_path / "unet.pth")
    del net["module.backbone.up_tr64.ops.1.conv1.weight"]
    torch.save({"net": net}, tmp_path / "broken.pth")
    model = suprem_backbone("unet", 3)
    before = model.down_tr64.ops[0].conv1.weight.clone()
    with pytest.raises(ValueError, match=r"broken\.pth.*up_tr64\.ops\.1\.conv1\.weight"):
        load_suprem_checkpoint(model, tmp_path / "broken.pth", backbone="unet")
    assert torch.equal(model.down_tr64.ops[0].conv1.weight, before)  # nothing half-loaded


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_shape_mismatch_and_bad_files(tmp_path):
    net = fake_released_checkpoint("segresnet", tmp_path / "seg.pth")
    net["module.convInit.conv.weight"] = torch.zeros(8, 1, 3, 3, 3)
    torch.save({"net": net}, tmp_path / "shape.pth")
    model = suprem_backbone("segresnet", 3)
    with pytest.raises(ValueError, match=r"wrong shape.*convInit\.conv\.weight"):
        load_suprem_checkpoint(model, tmp_path / "shape.pth")
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_suprem_checkpoint(model, tmp_path / "nope.pth")
    torch.save({"epoch": 3, "optimizer": "adam"}, tmp_path / "nostate.pth")
    with pytest.raises(ValueError, match=r"nostate\.pth.*no state dict.*epoch"):
        load_suprem_checkpoint(model, tmp_path / "nostate.pth")
    (tmp_path / "evil.pth").write_bytes(pickle.dumps(object()))  # not loadable with weights_only=True
    with pytest.raises(ValueError, match=r"evil\.pth"):
        load_suprem_checkpoint(model, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="backbone"):
        load_suprem_checkpoint(model, tmp_path / "seg.pth", backbone="swin")
