"""ProtoSeg segmentation ability (thesis 2.6.2, 5.2.4.2): exact predictions, constant features, layers at
every resolution, adapters of a peft SegResNet, streaming vs one-layer-per-pass, outputs, handler."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

from monai_peft.interpret import ProtoSegHandler, protoseg, run_protoseg, segmentation_ability_map

K = 3  # background + 2 classes
SIZE = 16


def aligned_phantom() -> tuple[torch.Tensor, np.ndarray]:
    """Two boxes on a 4-voxel grid (so 1/2 and 1/4 resolution features can segment them exactly);
    the input is the one-hot ground truth."""
    gt = np.zeros((SIZE,) * 3, dtype=np.int64)
    gt[4:12, 0:8, 4:8] = 1
    gt[8:16, 8:16, 8:16] = 2
    x = torch.nn.functional.one_hot(torch.as_tensor(gt), K).permute(3, 0, 1, 2).float()
    return x, gt


class ExactNet(nn.Module):
    """Predicts the ground truth exactly (the logits are 10 x the one-hot input) and has feature maps at
    full, 1/2 and 1/4 resolution plus one layer whose features are constant."""

    def __init__(self) -> None:
        super().__init__()
        self.down2 = nn.Conv3d(K, K, 2, stride=2, bias=False)  # 2x2x2 average pooling per channel
        self.down4 = nn.Conv3d(K, K, 2, stride=2, bias=False)
        self.up = nn.ConvTranspose3d(K, K, 2, stride=2, bias=False)  # back to 1/2, nearest upsampling
        self.const = nn.Conv3d(K, 4, 1)  # constant features: zero weights, bias 1
        self.final = nn.Conv3d(K, K, 1, bias=False)
        with torch.no_grad():
            eye = torch.eye(K)
            self.down2.weight.copy_(eye[:, :, None, None, None].expand(K, K, 2, 2, 2) / 8)
            self.down4.weight.copy_(eye[:, :, None, None, None].expand(K, K, 2, 2, 2) / 8)
            self.up.weight.copy_(eye[:, :, None, None, None].expand(K, K, 2, 2, 2))
            self.const.weight.zero_()
            self.const.bias.fill_(1.0)
            self.final.weight.copy_(10 * eye[:, :, None, None, None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up = self.up(self.down4(self.down2(x)))
        const = self.const(x)
        return self.final(x) + 0.0 * (up.mean() + const.mean())


def test_exact_prediction_constant_features_and_every_resolution():
    net = ExactNet().train()
    x, gt = aligned_phantom()
    res = protoseg(net, x, gt)
    by = {r.name: r for r in res}
    assert [r.name for r in res] == ["down2", "down4", "up", "const", "final"], "execution order"
    assert by["final"].sa == {"foreground": 1.0}
    assert by["down2"].shape == (K, 8, 8, 8) and by["down4"].shape == (K, 4, 4, 4) and by["up"].shape == (K, 8, 8, 8)
    for name in ("down2", "down4", "up"):
        assert by[name].sa["foreground"] == pytest.approx(1.0), name
    assert by["const"].sa["foreground"] < 0.1
    assert not any(r.adapter for r in res)
    assert net.training and all(not m._forward_hooks for m in net.modules())

    per_class = protoseg(net, x, gt, classes=[1, 2], class_names={1: "box1"})
    assert per_class[-1].sa == {"box1": 1.0, "class2": 1.0}
    assert {r.name: r.sa for r in protoseg(net, x, gt, per_layer=True)} == {r.name: r.sa for r in res}


def test_segmentation_ability_map_metrics_and_errors():
    x, gt = aligned_phantom()
    guide = torch.as_tensor(gt > 0)
    for metric in ("cosine", "euclidean"):
        sam = segmentation_ability_map(x, guide, metric=metric)
        assert torch.equal(sam, guide)
    assert not segmentation_ability_map(torch.ones(4, 8, 8, 8), guide).any(), "constant features -> background"
    assert not segmentation_ability_map(x, torch.zeros_like(guide)).any(), "no predicted foreground"
    with pytest.raises(ValueError, match="metric"):
        segmentation_ability_map(x, guide, metric="l1")
    with pytest.raises(ValueError, match="label shape"):
        protoseg(ExactNet(), x, gt[:8])
    with pytest.raises(ValueError, match="nope"):
        protoseg(ExactNet(), x, gt, layers=["nope"])


def test_peft_segresnet_adapter_layers_streaming_matches_per_layer():
    import peft
    from monai.networks.nets import SegResNet

    import monai_peft

    torch.manual_seed(0)
    net = SegResNet(spatial_dims=3, in_channels=1, out_channels=3, init_filters=8, blocks_down=(1, 1, 1),
                    blocks_up=(1, 1))
    model = peft.get_peft_model(net, monai_peft.ConvAdapterConfig(target_modules=["up_layers.1.0", "up_layers.0.0"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "conv_adapter" in n:
                p.normal_(0.0, 0.3)
    x = torch.randn(1, 1, 16, 16, 16)
    gt = np.zeros((16, 16, 16), dtype=np.int64)
    gt[3:9, 3:12, 2:10] = 1
    gt[10:15, 2:8, 9:15] = 2
    res = protoseg(model, x, gt)
    n_convs = sum(isinstance(m, nn.Conv3d) for m in model.modules())
    assert len(res) == n_convs
    adapters = [r for r in res if r.adapter]
    assert len(adapters) == 4 and all("conv_adapter" in r.name for r in adapters)
    assert not any("conv_adapter" in r.name for r in res if not r.adapter)
    assert all(r.trainable == r.adapter for r in res), "adapters train, the backbone is frozen"
    spatial = {r.shape[1:] for r in res}
    assert {(16, 16, 16), (8, 8, 8), (4, 4, 4)} <= spatial
    # each SA is the Dice of that layer's own SAM with the ground truth (checked here without MONAI)
    kept = protoseg(model, x, gt, keep_maps=[r.name for r in res])
    truth = gt > 0
    for r in kept:
        sam = np.asarray(r.sam["foreground"], bool)
        assert r.sa["foreground"] == pytest.approx(2 * (sam & truth).sum() / (sam.sum() + truth.sum()), abs=1e-6)
    assert len({round(r.sa["foreground"], 6) for r in kept}) > 3, "layers differ in how well they separate the organs"
    per_layer = protoseg(model, x, gt, per_layer=True)
    assert {r.name: r.sa for r in per_layer} == {r.name: r.sa for r in res}


def test_run_protoseg_outputs_and_handler(tmp_path):
    from ignite.engine import Engine

    net = ExactNet()
    x, gt = aligned_phantom()
    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    rec = run_protoseg(net, x, gt, tmp_path / "one", save_maps=["down4"], affine=affine)
    saved = json.loads((tmp_path / "one" / "protoseg.json").read_text())
    assert saved == json.loads(json.dumps(rec))
    assert [layer["name"] for layer in saved["layers"]][-1] == "final"
    assert saved["layers"][-1]["sa"]["foreground"] == 1.0
    sam = nib.load(tmp_path / "one" / "sam_down4_foreground.nii.gz")
    np.testing.assert_allclose(sam.affine, affine)
    np.testing.assert_array_equal(sam.get_fdata() > 0.5, gt > 0)
    assert (tmp_path / "one" / "protoseg.png").stat().st_size > 1000

    engine = Engine(lambda e, b: None)
    engine.network = net
    batch = {"image": x[None], "label": torch.as_tensor(gt)[None, None]}
    ProtoSegHandler(tmp_path / "h", max_cases=2).attach(engine)
    engine.run([batch, batch, batch], max_epochs=1)
    summary = json.loads((tmp_path / "h" / "protoseg_summary.json").read_text())
    assert summary["cases"] == ["case000", "case001"]
    assert {layer["name"]: layer["mean_sa"]["foreground"] for layer in summary["layers"]}["final"] == 1.0
