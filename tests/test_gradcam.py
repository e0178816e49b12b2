"""3D Grad-CAM (thesis 2.6.1, 5.2.4.1): phantom localisation, adapter convs in a peft model, in-place
residuals, outputs and the ignite handler."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

from monai_peft.interpret import GradCAMHandler, gradcam_3d, otsu_dice, run_gradcam

SIZE = 24
CUBE_A = (slice(4, 12), slice(4, 12), slice(4, 12))
CUBE_B = (slice(14, 22), slice(12, 20), slice(10, 18))


class TwoCubeNet(nn.Module):
    """Class 1's logit is 4 * (3x3x3 box mean of input channel 0) - 2, class 2's the same of channel 1:
    a known function of the input, so the region driving each class is known."""

    def __init__(self) -> None:
        super().__init__()
        self.feat = nn.Conv3d(2, 2, 3, padding=1, bias=False)
        self.head = nn.Conv3d(2, 3, 1)
        with torch.no_grad():
            self.feat.weight.zero_()
            self.feat.weight[0, 0] = 1.0 / 27
            self.feat.weight[1, 1] = 1.0 / 27
            self.head.weight.zero_()
            self.head.weight[1, 0] = 4.0
            self.head.weight[2, 1] = 4.0
            self.head.bias.copy_(torch.tensor([0.0, -2.0, -2.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.feat(x)))


def two_cubes() -> tuple[torch.Tensor, np.ndarray]:
    x = torch.zeros(2, SIZE, SIZE, SIZE)
    x[(0, *CUBE_A)] = 1.0
    x[(1, *CUBE_B)] = 1.0
    gt = np.zeros((SIZE,) * 3, dtype=np.int64)
    gt[CUBE_A] = 1
    gt[CUBE_B] = 2
    return x, gt


def no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks for m in model.modules())


def test_phantom_recovers_driving_region_and_restores_model():
    net = TwoCubeNet().train()
    x, gt = two_cubes()
    res = gradcam_3d(net, x, layers=["feat"], classes=[1, 2], label=gt)
    assert res.layers == ["feat"] and res.classes == [1, 2]
    for c, other in ((1, 2), (2, 1)):
        cam = res.cams["feat"][c]
        assert cam.shape == (SIZE,) * 3 and cam.dtype == np.float32
        d, t = otsu_dice(cam, gt == c)
        assert d > 0.8, f"class {c}: Otsu Dice {d:.3f} with its own cube"
        assert 0.0 < t < 1.0
        assert otsu_dice(cam, gt == other)[0] < 0.1, "the heatmap must not light up the other class's cube"
    assert res.target_masks == {1: "prediction", 2: "prediction"}
    assert net.training and net.feat.training, "train/eval mode must be restored"
    assert no_hooks(net)


def test_label_mask_source_and_bad_arguments():
    net = TwoCubeNet().eval()
    x, gt = two_cubes()
    res = gradcam_3d(net, x, layers=["feat"], classes=[1], label=gt, mask_source="label")
    assert otsu_dice(res.cams["feat"][1], gt == 1)[0] > 0.8
    assert not net.training
    with pytest.raises(ValueError, match="feat2"):
        gradcam_3d(net, x, layers=["feat2"], classes=[1])
    with pytest.raises(ValueError, match="out of range"):
        gradcam_3d(net, x, layers=["feat"], classes=[5])
    with pytest.raises(ValueError, match="label"):
        gradcam_3d(net, x, layers=["feat"], mask_source="label")
    assert otsu_dice(np.zeros((4, 4, 4)), np.ones((4, 4, 4), bool))[0] == 0.0


def test_default_layers_follow_table_5_10():
    from monai_peft.interpret._common import default_gradcam_layers, is_adapter_module

    order = ["convInit.conv", "up.0.conv_adapter_down.default", "up.0.conv_adapter_up.default",
             "up.0.base_layer.conv1.conv", "up.0.base_layer.conv2.conv",
             "conv_final.modules_to_save.default.2.conv"]  # a head trained fully (peft modules_to_save)
    assert default_gradcam_layers(order, {"default"}) == [
        "conv_final.modules_to_save.default.2.conv", "up.0.base_layer.conv2.conv", "up.0.conv_adapter_up.default"]
    assert default_gradcam_layers(order[3:], {"default"}) == order[-1:] + order[-2:-1]
    assert is_adapter_module("enc.conv.lora_A.default", None) and is_adapter_module("x.lora_B.other", {"other"})
    assert not is_adapter_module("enc.conv.base_layer", {"default"})
    assert not is_adapter_module("head.original_module.conv", {"default"})


class _OutOfPlaceResBlock(nn.Module):
    """MONAI's SegResNet ResBlock with the residual added out of place (the reference)."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.block
        identity = x
        x = b.conv1(b.act(b.norm1(x)))
        x = b.conv2(b.act(b.norm2(x)))
        return x + identity


def test_adapter_conv_of_peft_segresnet_and_inplace_residual():
    import peft
    from monai.networks.nets import SegResNet
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import SemanticSegmentationTarget

    import monai_peft

    torch.manual_seed(0)
    net = SegResNet(spatial_dims=3, in_channels=1, out_channels=3, init_filters=8, blocks_down=(1, 1, 1),
                    blocks_up=(1, 1))
    model = peft.get_peft_model(net, monai_peft.ConvAdapterConfig(target_modules=["up_layers.1.0"], gamma=2))
    with torch.no_grad():  # trained-looking adapter: non-zero up-projection
        for n, p in model.named_parameters():
            if "conv_adapter" in n:
                p.normal_(0.0, 0.3)
    model.train()
    adapter_param = next(p for n, p in model.named_parameters() if p.requires_grad)
    adapter_param.grad = torch.full_like(adapter_param, 0.5)  # e.g. a gradient being accumulated
    x = torch.randn(1, 1, 16, 16, 16)
    res = gradcam_3d(model, x, classes=[1, 2])
    # default layers = thesis Table 5.10: final conv, last conv of the last ResBlock, its adapter conv
    assert res.layers[0].endswith("conv_final.2.conv")
    assert res.layers[1].endswith("up_layers.1.0.base_layer.conv2.conv")
    assert "conv_adapter" in res.layers[2] and res.layers[2].endswith(".default")
    for layer in res.layers:
        for c in (1, 2):
            cam = res.cams[layer][c]
            assert cam.shape == (16, 16, 16) and np.isfinite(cam).all()
            assert cam.min() >= 0.0 and cam.max() <= 1.0
    assert np.ptp(res.cams[res.layers[2]][1]) > 0.1, "adapter conv heatmap should not be flat"
    assert model.training and no_hooks(model)
    assert torch.equal(adapter_param.grad, torch.full_like(adapter_param, 0.5)), "gradients left as they were"
    assert all(p.grad is None for p in model.parameters() if p is not adapter_param)

    # reference: the same network with an out-of-place residual and plain pytorch_grad_cam
    conv2_name = res.layers[1]
    ref_net = model.get_base_model()
    wrapper = ref_net.up_layers[1][0]
    wrapper.base_layer = _OutOfPlaceResBlock(wrapper.base_layer)
    target = dict(model.named_modules())[conv2_name.replace("base_layer.conv2", "base_layer.block.conv2")]
    # gradcam_3d hooked the adapter's up-projection, which then runs as a module (not the fused channel product):
    # the reference watches it too, so both runs take the same forward path to the last bit
    watch = dict(model.named_modules())[res.layers[2]].register_forward_hook(lambda *_: None)
    pred = model(x).argmax(1)[0].numpy()
    with GradCAM(model=model, target_layers=[target]) as cam:  # input needs grad: backbone is frozen
        seg_target = SemanticSegmentationTarget(1, (pred == 1).astype(np.float32))
        ref = cam(input_tensor=x.clone().requires_grad_(True), targets=[seg_target])[0]
    watch.remove()
    np.testing.assert_allclose(res.cams[conv2_name][1], np.clip(ref, 0, 1), atol=2e-4)


def test_run_gradcam_writes_aligned_nifti_json_png(tmp_path):
    from monai.data import MetaTensor

    net = TwoCubeNet()
    x, gt = two_cubes()
    affine = np.diag([3.0, 2.0, 1.5, 1.0])
    affine[:3, 3] = [-10.0, 5.0, 7.0]
    image = MetaTensor(x, affine=torch.as_tensor(affine))
    rec = run_gradcam(net, image, tmp_path, layers=["feat"], classes=[1, 2], label=gt[None],
                      class_names={1: "liver", 2: "spleen"})
    saved = json.loads((tmp_path / "gradcam.json").read_text())
    assert saved == json.loads(json.dumps(rec))
    assert saved["dice"]["liver"]["feat"] > 0.8 and saved["dice"]["spleen"]["feat"] > 0.8
    assert sorted(saved["files"]["png"]) == ["gradcam_liver.png", "gradcam_spleen.png"]
    for name in saved["files"]["nifti"]:
        img = nib.load(tmp_path / name)
        assert img.shape == (SIZE,) * 3
        np.testing.assert_allclose(img.affine, affine)
    cam = nib.load(tmp_path / "cam_feat_liver.nii.gz").get_fdata()
    assert otsu_dice(cam, gt == 1)[0] > 0.8
    assert (tmp_path / "gradcam_liver.png").stat().st_size > 1000
    assert not list(tmp_path.glob(".*")), "no temporary files left"


def test_handler_on_an_engine(tmp_path):
    from ignite.engine import Engine

    from monai.data import MetaTensor

    net = TwoCubeNet()
    x, gt = two_cubes()
    affines = torch.stack([torch.diag(torch.tensor([s, s, s, 1.0])) for s in (1.0, 2.0)])
    image = MetaTensor(torch.stack([x, x]), affine=affines, meta={"filename_or_obj": ["a/ct1.nii.gz", "b/ct2.nii.gz"]})
    image.is_batch = True
    batch = {"image": image, "label": torch.as_tensor(gt)[None, None].repeat(2, 1, 1, 1, 1)}
    engine = Engine(lambda e, b: None)
    engine.network = net
    handler = GradCAMHandler(tmp_path, layers=["feat"], classes=[1], class_names={"1": "cubeA"}, max_cases=3,
                             save_png=False)
    handler.attach(engine)
    handler.attach(engine)  # attaching twice registers once
    engine.run([batch, batch], max_epochs=1)
    summary = json.loads((tmp_path / "gradcam_summary.json").read_text())
    assert summary["cases"] == ["case000_ct1", "case001_ct2", "case002_ct1"]
    # each case's heatmap carries its own item's affine
    np.testing.assert_allclose(nib.load(tmp_path / "case001_ct2" / "cam_feat_cubeA.nii.gz").affine, affines[1].numpy())
    assert summary["mean_dice"]["cubeA"]["feat"] > 0.8
    with pytest.raises(ValueError, match="max_cases"):
        GradCAMHandler(tmp_path, max_cases=0)
