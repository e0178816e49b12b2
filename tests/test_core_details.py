"""Issue 2: conv geometry, ConvAdapter schemes, LoRA extras, selectors, report, precision, errors, peft internals."""

from __future__ import annotations

import json
import math

import pytest
import torch
from monai.networks.blocks import ResidualUnit
from monai.networks.blocks.segresnet_block import ResBlock
from peft import PeftModel, get_peft_model
from torch import nn

import monai_peft
from monai_peft import ConvAdapterConfig, ModuleType, NameRegex, Region, SSFConfig, resolve_targets
from conftest import TwoConvBlock, make
from single_layer import Wrap

# ---------------------------------------------------------------------------------------------------------- geometry
CONVS = {
    "1d-k5-s2": lambda: nn.Conv1d(8, 12, 5, stride=2, padding=2),
    "2d-k3-dil2": lambda: nn.Conv2d(8, 8, 3, padding=2, dilation=2),
    "2d-groups2-reflect": lambda: nn.Conv2d(8, 16, 3, padding=1, groups=2, padding_mode="reflect"),
    "2d-k3x1": lambda: nn.Conv2d(8, 8, (3, 1), padding=(1, 0)),
    "2d-k2-s2-nobias": lambda: nn.Conv2d(8, 8, 2, stride=2, bias=False),
    "2d-same": lambda: nn.Conv2d(8, 8, 3, padding="same"),
    "3d-k3-s2": lambda: nn.Conv3d(8, 16, 3, stride=2, padding=1),
    "3d-k1": lambda: nn.Conv3d(8, 4, 1),
}
SHAPES = {"1d": (2, 8, 17), "2d": (2, 8, 12, 10), "3d": (2, 8, 9, 8, 7)}


@pytest.mark.parametrize("geom", list(CONVS))
@pytest.mark.parametrize(
    "config",
    [
        lambda: ConvAdapterConfig(target_modules=["layer"], gamma=2),
        lambda: ConvAdapterConfig(target_modules=["layer"], gamma=4, insertion="sequential"),
        lambda: ConvAdapterConfig(target_modules=["layer"], gamma=2, adapter_conv="full", activation="gelu"),
        lambda: SSFConfig(target_modules=["layer"]),
    ],
    ids=["ca-parallel", "ca-sequential", "ca-full-gelu", "ssf"],
)
def test_any_conv_geometry(geom, config):
    torch.manual_seed(0)
    model = Wrap(CONVS[geom]())
    x = torch.randn(*SHAPES[geom[:2]])
    ref = model(x)
    pm = get_peft_model(model, config())
    out = pm(x)
    assert out.shape == ref.shape and torch.allclose(out, ref, atol=1e-6)
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    out = pm(x)
    assert not torch.allclose(out, ref, atol=1e-4), "adapter weights have no effect"
    out.square().mean().backward()
    assert all(p.grad is not None for p in pm.parameters() if p.requires_grad)
    assert model.layer.base_layer.weight.grad is None


# ----------------------------------------------------------------------------------------- ConvAdapter on blocks
BLOCKS = {
    "monai-ResBlock": (lambda: ResBlock(3, 16, norm=("group", {"num_groups": 4})), (1, 16, 8, 8, 8), (1, 16, 8, 8, 8)),
    "monai-ResidualUnit-s2-16to32": (lambda: ResidualUnit(3, 16, 32, strides=2, subunits=2), (1, 16, 8, 8, 8), (1, 32, 4, 4, 4)),
    "two-conv-s2-8to16": (lambda: TwoConvBlock(8, 16, stride=2), (2, 8, 10, 10), (2, 16, 5, 5)),
}


@pytest.mark.parametrize("block", list(BLOCKS))
@pytest.mark.parametrize("insertion", ["parallel", "sequential"])
def test_residual_schemes_handle_stride_and_channel_change(block, insertion):
    factory, in_shape, out_shape = BLOCKS[block]
    torch.manual_seed(0)
    model = Wrap(factory()).eval()
    x = torch.randn(*in_shape)
    ref = model(x)
    assert ref.shape == out_shape
    pm = get_peft_model(model, ConvAdapterConfig(target_modules=["layer"], gamma=4, insertion=insertion)).eval()
    layer = pm.base_model.model.layer
    assert layer.geometry.is_block and layer.geometry.out_channels == out_shape[1]
    assert torch.allclose(pm(x), ref, atol=1e-6)
    down = layer.conv_adapter_down["default"]
    expected_in = in_shape[1] if insertion == "parallel" else out_shape[1]
    assert down.in_channels == expected_in and down.groups == expected_in // 4
    with torch.no_grad():
        layer.conv_adapter_up["default"].weight.normal_()
    assert pm(x).shape == out_shape and not torch.allclose(pm(x), ref, atol=1e-4)


def test_convadapter_parameter_count_matches_formula():
    model = Wrap(nn.Conv3d(32, 64, 3, padding=1))
    pm = get_peft_model(model, ConvAdapterConfig(target_modules=["layer"], gamma=4))
    # grouped down conv: (32/4 filters) x (4 input channels) x 27 + bias; up: 8 -> 64 1x1x1 + bias; alpha: 64
    expected = (8 * 4 * 27 + 8) + (8 * 64 + 64) + 64
    assert sum(p.numel() for p in pm.parameters() if p.requires_grad) == expected


# -------------------------------------------------------------------------------------------------- LoRA extras
def test_dynamic_rank_is_half_the_output_channels_and_takes_1x1():
    model, _ = make("segresnet")
    pm = monai_peft.adapt(model, "lora", r="dynamic")
    from peft.tuners.lora import LoraLayer

    layers = {n: m for n, m in pm.base_model.model.named_modules() if isinstance(m, LoraLayer)}
    assert layers
    pointwise = [n for n, layer in layers.items() if max(layer.get_base_layer().kernel_size) == 1]
    assert pointwise and all(n.startswith("up_samples.") for n in pointwise), pointwise  # SegResNet's 1x1x1 up convs
    for name, layer in layers.items():
        base = layer.get_base_layer()
        assert layer.r["default"] == base.out_channels // 2
        assert layer.scaling["default"] == 1.0
    assert not any(n.startswith("conv_final") for n in layers)


def test_pca_init_spans_the_principal_components():
    torch.manual_seed(0)
    model = Wrap(nn.Conv2d(6, 32, 3, padding=1))
    pm = monai_peft.adapt(model, "lora", target=["layer"], r=4, init_pca=True)
    layer = pm.base_model.model.layer
    a = layer.lora_A["default"].weight.detach().reshape(4, -1)
    w = layer.get_base_layer().weight.detach().reshape(32, -1)
    _, _, vh = torch.linalg.svd(w - w.mean(0, keepdim=True), full_matrices=False)
    for i in range(4):
        cos = torch.nn.functional.cosine_similarity(a[i], vh[i], dim=0).abs().item()
        assert cos > 0.999
        assert math.isclose(a[i].norm().item(), 1 / math.sqrt(3), rel_tol=1e-4)
    x = torch.randn(1, 6, 8, 8)
    assert torch.allclose(pm(x), model.layer.get_base_layer()(x), atol=1e-6)


# ---------------------------------------------------------------------------------------------------- selectors
def test_region_and_type_selectors_compose():
    model, _ = make("segresnet")
    enc_convs = resolve_targets(model, Region("encoder") & ModuleType(nn.Conv3d))
    assert enc_convs[0] == "convInit.conv" and all(n.startswith(("convInit", "down_layers")) for n in enc_convs)
    assert len(enc_convs) == 1 + 3 + 2 * (1 + 2 + 2 + 4)  # convInit, 3 strided downsamples, 2 convs per ResBlock
    dec = resolve_targets(model, Region("decoder") & ~ModuleType(nn.Conv3d) & ModuleType(ResBlock))
    assert dec == ["up_layers.0.0", "up_layers.1.0", "up_layers.2.0"]
    either = resolve_targets(model, Region("head") | NameRegex(r"up_samples\.0\.0\.conv"))
    head_names = [n for n, _ in model.named_modules() if n == "conv_final" or n.startswith("conv_final.")]
    assert either == ["up_samples.0.0.conv"] + head_names
    assert resolve_targets(model, "head", outermost=True) == ["conv_final"]


def test_parameter_report_counts_and_json(tmp_path):
    model, _ = make("segresnet")
    total = sum(p.numel() for p in model.parameters())
    pm = monai_peft.adapt(model, "convadapter", train_fully="decoder", adapter_conv="full")
    rep = monai_peft.parameter_report(pm)
    assert rep.total == total
    assert rep.trainable == sum(p.numel() for p in pm.parameters() if p.requires_grad)
    assert rep.by_region["decoder"]["trainable"] >= rep.by_region["decoder"]["total"]  # full decoder + adapters
    assert rep.by_region["head"]["trainable"] == 0
    assert set(rep.by_kind) == {"conv_adapter", "full_copy"}
    assert math.isclose(rep.percent, 100 * rep.trainable / total)
    data = json.loads(rep.to_json(tmp_path / "r.json").read_text())
    assert data["trainable"] == rep.trainable and "encoder" in data["by_region"]
    assert "region encoder" in rep.table()


# --------------------------------------------------------------------------------------------- precision, loading
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", ["convadapter", "ssf", "lora"])
def test_half_precision_model_and_autocast(method, dtype):
    model, x = make("cnn2d")
    with torch.no_grad():
        ref = model(x)
    model = model.to(dtype)
    pm = monai_peft.adapt(model, method)
    adapter_dtypes = {p.dtype for p in pm.parameters() if p.requires_grad}
    assert adapter_dtypes == {torch.float32}, "peft autocasts adapter weights to float32"
    out = pm(x.to(dtype))
    assert out.dtype == dtype and torch.isfinite(out.float()).all()
    assert torch.allclose(out.float(), ref, atol=0.05), "half-precision identity at init drifted"
    model32, x32 = make("cnn2d")
    pm32 = monai_peft.adapt(model32, method)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = pm32(x32)
    y.float().square().mean().backward()
    assert all(p.grad is not None for p in pm32.parameters() if p.requires_grad)


def test_low_cpu_mem_usage_creates_meta_adapters_then_loads(tmp_path):
    model, x = make("segresnet")
    pm = monai_peft.adapt(model, "convadapter")
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.add_(0.05)
        ref = pm(x)
    pm.save_pretrained(str(tmp_path))
    fresh, _ = make("segresnet")
    lazy = monai_peft.adapt(fresh, "convadapter", low_cpu_mem_usage=True)
    assert any(p.device.type == "meta" for p in lazy.parameters())
    base2, _ = make("segresnet")
    loaded = PeftModel.from_pretrained(base2, str(tmp_path), low_cpu_mem_usage=True)
    assert not any(p.device.type == "meta" for p in loaded.parameters())
    with torch.no_grad():
        assert torch.equal(loaded(x), ref)


# ---------------------------------------------------------------------------------------------------- bad input
def test_target_matching_nothing_names_selector_and_model():
    model, _ = make("segresnet")
    with pytest.raises(ValueError, match=r"matched no module of SegResNet"):
        monai_peft.adapt(model, "lora", target=NameRegex(r"no_such_layer.*"))
    with pytest.raises(KeyError, match="region 'bottleneck' is not declared for SegResNet"):
        resolve_targets(model, Region("bottleneck"))
    with pytest.raises(ValueError, match=r"\['nope'\] do not exist"):
        resolve_targets(model, ["nope"])


def test_unsupported_module_types_are_named():
    model, _ = make("cnn2d")
    with pytest.raises(TypeError, match=r"ConvAdapter cannot adapt 'up' \(Upsample\).*contains no Conv1d"):
        get_peft_model(model, ConvAdapterConfig(target_modules=["up"]))
    with pytest.raises(TypeError, match=r"SSF cannot follow 'stem.2' \(ReLU\)"):
        get_peft_model(model, SSFConfig(target_modules=["stem.2"]))


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="insertion"):
        ConvAdapterConfig(target_modules=["x"], insertion="diagonal")
    with pytest.raises(ValueError, match="unknown method 'prompt'"):
        monai_peft.adapt(nn.Conv2d(1, 1, 1), "prompt")
    model, _ = make("segresnet")
    with pytest.raises(ValueError, match="overlaps"):
        monai_peft.adapt(model, "lora", target=Region("encoder") & ModuleType(nn.Conv3d), train_fully="encoder")
    encoder_lora = monai_peft.adapt(make("segresnet")[0], "lora", train_fully="decoder")  # thesis Table 5.2 layout
    assert all("lora_" not in n for n, _ in encoder_lora.named_parameters() if n.startswith("base_model.model.up_"))
    with pytest.raises(ValueError, match="rank r must be"):
        monai_peft.adapt(model, "lora", r=0)


# ------------------------------------------------------------------------------------------------ peft internals
def test_peft_internals_that_monai_peft_patches_are_in_place():
    from peft import PeftConfig
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils import PeftType

    from monai_peft._peft_compat import check_peft_compat

    check_peft_compat()  # raises with the list of what moved after a peft upgrade
    assert PeftType("CONV_ADAPTER") is PeftType.CONV_ADAPTER and PeftType.SSF in list(PeftType)
    assert PEFT_TYPE_TO_TUNER_MAPPING["CONV_ADAPTER"] is monai_peft.ConvAdapterModel
    cfg = ConvAdapterConfig(target_modules=["a"], gamma=2)
    again = PeftConfig.from_peft_type(**json.loads(json.dumps(cfg.to_dict(), default=list)))
    assert isinstance(again, ConvAdapterConfig) and again.gamma == 2
    monai_peft._peft_compat.register_monai_peft_methods()  # idempotent


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (float16 3D convolutions)")
@pytest.mark.parametrize("method", ["convadapter", "ssf", "lora"])
def test_float16_on_cuda(method):
    model, x = make("segresnet")
    pm = monai_peft.adapt(model.half().cuda(), method)
    with torch.no_grad():
        out = pm(x.half().cuda())
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    with pm.disable_adapter(), torch.no_grad():
        base_out = pm(x.half().cuda())
    assert torch.allclose(out, base_out, atol=1e-3)


def test_frozen_batchnorm_uses_running_statistics_trained_copies_do_not():
    from monai_peft.tuners.frozen_norm import keep_frozen_batchnorm_statistics

    model, x = make("cnn2d")
    pm = monai_peft.adapt(model, "convadapter", target=["enc1", "enc2"], train_fully="dec1")
    base = pm.get_base_model()
    frozen_bn = base.enc1.base_layer.bn1
    frozen_before = frozen_bn.running_mean.clone()
    copy_bn = base.dec1.modules_to_save["default"].bn1
    copy_before = copy_bn.running_mean.clone()
    pm.train()
    with torch.no_grad():
        y_train = pm(x)
    assert torch.equal(frozen_bn.running_mean, frozen_before)  # frozen: eval statistics, not updated
    assert not torch.equal(copy_bn.running_mean, copy_before)  # trained copy: PyTorch's usual behaviour
    assert frozen_bn.training
    assert keep_frozen_batchnorm_statistics(pm) == 0  # idempotent
    pm.eval()
    base.dec1.modules_to_save["default"].train()  # only the trained copy differs between modes now
    with torch.no_grad():
        assert torch.allclose(pm(x), y_train, atol=1e-6)
    assert keep_frozen_batchnorm_statistics(pm, enabled=False) > 0
    pm.train()
    with torch.no_grad():
        pm(x)
    assert not torch.equal(frozen_bn.running_mean, frozen_before)
