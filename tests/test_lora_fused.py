"""Issue 12.3: fused conv LoRA (one conv with ``W + s * B @ A``) equals peft's path and stays a plain peft adapter."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from torch import nn

import monai_peft
from monai_peft import ModuleType
from monai_peft.lora import FusedConvLoraMixin, use_fused_conv_lora
from single_layer import Wrap

GEOMETRIES = {
    "1d-k3-s2": (lambda: nn.Conv1d(4, 6, 3, stride=2, padding=1), (2, 4, 11)),
    "2d-k3-dil2-same": (lambda: nn.Conv2d(4, 6, 3, padding="same", dilation=2), (2, 4, 9, 8)),
    "2d-k4-same-reflect": (lambda: nn.Conv2d(4, 6, 4, padding="same", padding_mode="reflect"), (2, 4, 9, 8)),
    "3d-k3": (lambda: nn.Conv3d(4, 6, 3, padding=1), (1, 4, 6, 5, 4)),
    "3d-k1": (lambda: nn.Conv3d(4, 6, 1), (1, 4, 6, 5, 4)),
    "3d-k113-s2-nobias": (lambda: nn.Conv3d(4, 6, (1, 1, 3), stride=2, bias=False), (1, 4, 6, 5, 7)),
}


def _pair(make_conv, dtype=torch.float64, r=3, **config_kwargs):
    """The same LoRA adapter (random ``B``) on two copies of one conv: peft's path and the fused one."""
    torch.manual_seed(0)
    conv = make_conv().to(dtype)
    models = []
    for fused in (False, True):
        copy = make_conv().to(dtype)
        copy.load_state_dict(conv.state_dict())
        config = LoraConfig(target_modules=["layer"], r=r, lora_alpha=5, init_lora_weights=False, **config_kwargs)
        models.append(get_peft_model(Wrap(copy), use_fused_conv_lora(config) if fused else config))
    models[1].load_state_dict(models[0].state_dict())
    assert not isinstance(models[0].base_model.model.layer, FusedConvLoraMixin)
    assert isinstance(models[1].base_model.model.layer, FusedConvLoraMixin)
    return models


def _grads(pm, x, probe):
    x = x.clone().requires_grad_(True)
    out = pm(x)
    (out * probe).sum().backward()
    grads = {n: p.grad for n, p in pm.named_parameters() if p.requires_grad}
    return out, x.grad, grads


@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_fused_forward_and_gradients_equal_peft(name):
    make_conv, shape = GEOMETRIES[name]
    peft_model, fused_model = _pair(make_conv, lora_bias=name == "3d-k3")
    x = torch.randn(*shape, dtype=torch.float64)
    probe = torch.randn_like(peft_model(x))
    out_p, gx_p, g_p = _grads(peft_model, x, probe)
    out_f, gx_f, g_f = _grads(fused_model, x, probe)
    torch.testing.assert_close(out_f, out_p, rtol=0, atol=1e-12)
    torch.testing.assert_close(gx_f, gx_p, rtol=0, atol=1e-12)
    assert sorted(g_p) == sorted(g_f) and any("lora_A" in n for n in g_p) and any("lora_B" in n for n in g_p)
    for n in g_p:
        torch.testing.assert_close(g_f[n], g_p[n], rtol=0, atol=1e-10, msg=n)


def test_fused_several_adapters_disable_and_merge():
    make_conv, shape = GEOMETRIES["3d-k3"]
    peft_model, fused_model = _pair(make_conv)
    x = torch.randn(*shape, dtype=torch.float64)
    for pm in (peft_model, fused_model):
        torch.manual_seed(1)
        pm.add_adapter("other", LoraConfig(target_modules=["layer"], r=2, lora_alpha=1, init_lora_weights=False))
        pm.base_model.set_adapter(["default", "other"])
    assert isinstance(fused_model.base_model.model.layer, FusedConvLoraMixin)
    with torch.no_grad():
        both = peft_model(x)
        torch.testing.assert_close(fused_model(x), both, rtol=0, atol=1e-12)
        base = fused_model.base_model.model.layer.get_base_layer()(x)
        with fused_model.disable_adapter():
            torch.testing.assert_close(fused_model(x), base, rtol=0, atol=0)
        fused_model.base_model.merge_adapter(["default", "other"])
        torch.testing.assert_close(fused_model(x), both, rtol=0, atol=1e-12)
        fused_model.base_model.unmerge_adapter()
        torch.testing.assert_close(fused_model(x), both, rtol=0, atol=1e-12)
        torch.testing.assert_close(fused_model.merge_and_unload(adapter_names=["default", "other"])(x), both,
                                   rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_in_half_precision_and_autocast(dtype):
    make_conv, shape = GEOMETRIES["3d-k3"]
    x = torch.randn(*shape)
    peft_model, fused_model = _pair(make_conv, dtype=torch.float32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ref, out = peft_model(x), fused_model(x)
    assert out.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref.float(), rtol=0.05, atol=0.05)
    # a half-precision base keeps float32 adapters (peft's autocast_adapter_dtype); the output stays half
    peft_model, fused_model = _pair(make_conv, dtype=dtype)
    assert fused_model.base_model.model.layer.lora_A["default"].weight.dtype == torch.float32
    with torch.no_grad():
        ref, out = peft_model(x.to(dtype)), fused_model(x.to(dtype))
    assert out.dtype == ref.dtype == dtype
    torch.testing.assert_close(out.float(), ref.float(), rtol=0.05, atol=0.05)


def test_grouped_conv_keeps_peft_path_under_fused():
    make_conv = lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2)  # noqa: E731
    with pytest.warns(UserWarning, match="groups > 1"):
        peft_model, fused_model = _pair(make_conv, r=2)
    x = torch.randn(1, 4, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(fused_model(x), peft_model(x), rtol=0, atol=1e-12)
    with pytest.raises(NotImplementedError, match="groups > 1"):
        fused_model.base_model.merge_adapter()


def test_dropout_and_dora_are_refused_with_the_reason():
    net = Wrap(nn.Conv2d(4, 6, 3))
    with pytest.raises(ValueError, match="lora_dropout=0.1.*fused=False"):
        monai_peft.lora_config(net, ["layer"], r=2, fused=True, lora_dropout=0.1)
    with pytest.raises(ValueError, match="DoRA"):
        use_fused_conv_lora(LoraConfig(target_modules=["layer"], use_dora=True))
    with pytest.raises(TypeError, match="LoraConfig"):
        use_fused_conv_lora(monai_peft.SSFConfig(target_modules=["layer"]))
    pm = get_peft_model(net, monai_peft.lora_config(net, ["layer"], r=2, fused=True))
    with pytest.raises(ValueError, match="adapter 'drop'.*lora_dropout=0.2"):
        pm.add_adapter("drop", LoraConfig(target_modules=["layer"], r=2, lora_dropout=0.2))


def test_fused_adapter_is_a_plain_peft_file_loadable_both_ways(tiny_segresnet, tmp_path):
    state = {k: v.clone() for k, v in tiny_segresnet.state_dict().items()}
    pm = monai_peft.adapt(tiny_segresnet, "lora", target=ModuleType(nn.Conv3d), r=2, fused=True)
    layers = [m for m in pm.modules() if hasattr(m, "lora_A")]
    assert layers and all(isinstance(m, FusedConvLoraMixin) for m in layers)
    x = torch.randn(1, 1, 8, 8, 8)
    opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.5)
    before = pm(x).detach()
    pm(x).square().mean().backward()
    assert all(("lora_" in n) == (p.grad is not None) for n, p in pm.named_parameters())
    opt.step()
    with torch.no_grad():
        ref = pm(x)
    assert not torch.allclose(ref, before)
    pm.save_pretrained(str(tmp_path / "fused"))
    saved = json.loads((tmp_path / "fused" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and "custom" not in json.dumps(saved).lower()

    def fresh():
        from monai.networks.nets import SegResNet

        net = SegResNet(spatial_dims=3, init_filters=8, blocks_down=(1, 2), blocks_up=(1,), in_channels=1,
                        out_channels=2)
        net.load_state_dict(state)
        return net.eval()

    plain_model = monai_peft.adapt(fresh(), "lora", target=ModuleType(nn.Conv3d), r=2)
    plain_model.save_pretrained(str(tmp_path / "plain"))
    fused_file = load_file(str(tmp_path / "fused" / "adapter_model.safetensors"))
    plain_file = load_file(str(tmp_path / "plain" / "adapter_model.safetensors"))
    assert {k: v.shape for k, v in fused_file.items()} == {k: v.shape for k, v in plain_file.items()}

    loaded_plain = PeftModel.from_pretrained(fresh(), str(tmp_path / "fused"))
    assert not any(isinstance(m, FusedConvLoraMixin) for m in loaded_plain.modules())
    config = use_fused_conv_lora(LoraConfig.from_pretrained(str(tmp_path / "fused")))
    loaded_fused = PeftModel.from_pretrained(fresh(), str(tmp_path / "fused"), config=config)
    assert any(isinstance(m, FusedConvLoraMixin) for m in loaded_fused.modules())
    with torch.no_grad():
        torch.testing.assert_close(loaded_plain(x), ref, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(loaded_fused(x), ref, rtol=1e-4, atol=1e-5)

