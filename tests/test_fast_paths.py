"""Issue 12: the faster formulations compute what the plain ones compute (float64: outputs and every gradient).

- LoRA ``fused="factored"`` (merged-kernel forward, factored backward) against peft's own path;
- SSF folded into a norm's affine parameters, and SSF after a conv as a unit-statistics batch norm, against
  ``scale * layer(x) + shift`` written out;
- ConvAdapter's delta as one channel product (channels-last down-projection on CPU) against its modules run
  one after the other.
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

import monai_peft
from monai_peft.lora import factored as factored_module
from monai_peft.lora import use_fused_conv_lora
from monai_peft.lora.factored import factored_is_faster
from monai_peft.networks.unet3d import ContBatchNorm3d
from monai_peft.tuners.conv_adapter import ConvAdapterConfig
from monai_peft.tuners.ssf import SSFConfig
from monai_peft.tuners.frozen_norm import keep_frozen_batchnorm_statistics
from single_layer import Wrap

CL3 = torch.channels_last_3d


def _run(model: nn.Module, x: torch.Tensor, probe: torch.Tensor | None = None):
    """Output, input gradient and the gradients of the trainable parameters (keyed by the parameter's name in peft's
    model, whichever module holds it) for the loss ``sum(out * probe)``."""
    x = x.detach().clone().requires_grad_(True)
    out = model(x)
    probe = torch.randn_like(out, generator=torch.Generator().manual_seed(7)) if probe is None else probe
    (out * probe).sum().backward()
    return out, x.grad, {n.split("layer.", 1)[-1]: p.grad for n, p in model.named_parameters() if p.requires_grad}


def _assert_same(a, b, atol=1e-11):
    out_a, gx_a, g_a = a
    out_b, gx_b, g_b = b
    torch.testing.assert_close(out_b, out_a, rtol=0, atol=atol)
    torch.testing.assert_close(gx_b, gx_a, rtol=0, atol=atol)
    assert sorted(g_a) == sorted(g_b) and g_a
    for name in g_a:
        torch.testing.assert_close(g_b[name], g_a[name], rtol=0, atol=atol, msg=name)


# ------------------------------------------------------------------------------------------------ LoRA
LORA_GEOMETRIES = {
    "1d-s2": (lambda: nn.Conv1d(4, 6, 3, stride=2, padding=1), (2, 4, 11)),
    "2d-dil2-same": (lambda: nn.Conv2d(4, 6, 3, padding="same", dilation=2), (2, 4, 9, 8)),
    "2d-k4-same-zeros": (lambda: nn.Conv2d(4, 6, 4, padding="same"), (2, 4, 9, 8)),
    "2d-k4-same-reflect": (lambda: nn.Conv2d(4, 6, 4, padding="same", padding_mode="reflect"), (2, 4, 9, 8)),
    "3d-k3": (lambda: nn.Conv3d(4, 6, 3, padding=1), (2, 4, 6, 5, 4)),
    "3d-k3-channels-last": (lambda: nn.Conv3d(4, 6, 3, padding=1), (2, 4, 6, 5, 4)),
    "3d-k1": (lambda: nn.Conv3d(4, 6, 1), (1, 4, 6, 5, 4)),
    "3d-k113-s2-valid-nobias": (lambda: nn.Conv3d(4, 6, (1, 1, 3), stride=2, bias=False, padding="valid"),
                                (1, 4, 6, 5, 7)),
}


def _lora_pair(make_conv, mode: str, **config_kwargs):
    torch.manual_seed(0)
    conv = make_conv().double()
    models = []
    for fused in (False, True):
        copy = make_conv().double()
        copy.load_state_dict(conv.state_dict())
        config = LoraConfig(target_modules=["layer"], r=3, lora_alpha=5, init_lora_weights=False, **config_kwargs)
        models.append(get_peft_model(Wrap(copy), use_fused_conv_lora(config, mode) if fused else config))
    models[1].load_state_dict(models[0].state_dict())
    return models


@pytest.mark.parametrize("name", list(LORA_GEOMETRIES))
def test_factored_lora_equals_peft(name, monkeypatch):
    calls = []
    real = factored_module._FactoredConvLora.apply
    monkeypatch.setattr(factored_module._FactoredConvLora, "apply", lambda *a: calls.append(1) or real(*a))
    make_conv, shape = LORA_GEOMETRIES[name]
    peft_model, fast = _lora_pair(make_conv, "factored", lora_bias=name == "3d-k3")
    x = torch.randn(*shape, dtype=torch.float64)
    if "channels-last" in name:
        x = x.contiguous(memory_format=CL3)
    _assert_same(_run(peft_model, x), _run(fast, x))
    assert calls, "the factored path did not run"


def test_factored_lora_with_two_adapters_equals_peft():
    make_conv, shape = LORA_GEOMETRIES["3d-k3"]
    peft_model, fast = _lora_pair(make_conv, "factored")
    for pm in (peft_model, fast):
        torch.manual_seed(1)
        pm.add_adapter("other", LoraConfig(target_modules=["layer"], r=2, lora_alpha=3, init_lora_weights=False))
        pm.base_model.set_adapter(["default", "other"])
        pm.base_model.model.layer.lora_A["other"].weight.requires_grad_(True)
    fast.load_state_dict(peft_model.state_dict())
    x = torch.randn(*shape, dtype=torch.float64)
    _assert_same(_run(peft_model, x), _run(fast, x))


def test_factored_lora_on_a_meta_tensor_allows_an_in_place_op_after_the_conv():
    """MONAI's engines feed MetaTensors; SegResNet's ResBlock adds its identity in place to the conv's output."""
    from monai.data import MetaTensor

    make_conv, shape = LORA_GEOMETRIES["3d-k3"]
    peft_model, fast = _lora_pair(make_conv, "factored")
    x = torch.randn(*shape, dtype=torch.float64)
    grads = []
    for model, inp in ((peft_model, x.clone()), (fast, MetaTensor(x.clone()))):
        out = model(inp)
        out += 1.0  # in place, as x += identity
        out.square().sum().backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_auto_picks_the_faster_backward_per_layer(monkeypatch):
    """CPU: factored only where the input has >= 64 channels and 2r < C_out (measured, see factored_is_faster)."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not factored_is_faster(cpu, 16, 16, 4) and not factored_is_faster(cpu, 32, 64, 4)
    assert factored_is_faster(cpu, 64, 64, 4) and not factored_is_faster(cpu, 64, 64, 32)
    assert factored_is_faster(cuda, 16, 16, 4) and not factored_is_faster(cuda, 16, 16, 8)
    used = []
    real = factored_module._FactoredConvLora.apply
    monkeypatch.setattr(factored_module._FactoredConvLora, "apply", lambda *a: used.append(a[1].shape) or real(*a))

    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.small, self.wide = nn.Conv3d(1, 16, 3, padding=1), nn.Conv3d(64, 64, 3, padding=1)

        def forward(self, x):
            return self.small(x).sum() + self.wide(x.expand(-1, 64, -1, -1, -1)).sum()

    pm = monai_peft.adapt(Two(), "lora", target=["small", "wide"], r=4, fused=True)
    pm(torch.randn(1, 1, 4, 4, 4)).backward()
    assert used == [torch.Size([64, 64, 3, 3, 3])]
    with torch.no_grad():  # inference: one merged conv, no custom backward
        pm(torch.randn(1, 1, 4, 4, 4))
    assert len(used) == 1


def test_factored_lora_under_autocast_runs_the_merged_conv():
    make_conv, shape = LORA_GEOMETRIES["3d-k3"]
    peft_model, fast = [m.float() for m in _lora_pair(make_conv, "factored")]
    x = torch.randn(*shape)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, ref = fast(x), peft_model(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref.float(), rtol=0.05, atol=0.05)


def test_fused_option_values_are_checked():
    with pytest.raises(ValueError, match="fused must be True, False or one of"):
        monai_peft.adapt(Wrap(nn.Conv2d(2, 3, 3)), "lora", target=["layer"], r=2, fused="fast")
    with pytest.raises(ValueError, match="mode must be one of"):
        use_fused_conv_lora(LoraConfig(target_modules=["layer"]), "fast")


# ------------------------------------------------------------------------------------------------- SSF
def _ssf_reference(base: nn.Module, x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, dim: int):
    shape = [1] * x.dim()
    shape[dim] = -1
    return base(x) * scale.view(shape) + shift.view(shape)


class SSFReference(nn.Module):
    """``scale * base(x) + shift`` written out, sharing the SSF layer's parameters."""

    def __init__(self, layer: nn.Module, dim: int) -> None:
        super().__init__()
        self.layer, self.dim = layer, dim

    def forward(self, x):
        return _ssf_reference(self.layer.get_base_layer(), x, self.layer.ssf_scale["default"],
                              self.layer.ssf_shift["default"], self.dim)


SSF_LAYERS = {
    "groupnorm": (lambda: nn.GroupNorm(2, 6), (2, 6, 5, 4, 3), 1),
    "batchnorm3d-frozen": (lambda: nn.BatchNorm3d(6), (2, 6, 5, 4, 3), 1),
    "instancenorm-no-affine": (lambda: nn.InstanceNorm3d(6), (2, 6, 5, 4, 3), 1),
    "contbatchnorm3d": (lambda: ContBatchNorm3d(6), (2, 6, 5, 4, 3), 1),
    "layernorm": (lambda: nn.LayerNorm(6), (2, 5, 6), -1),
    "conv3d": (lambda: nn.Conv3d(3, 6, 3, padding=1), (2, 3, 5, 4, 3), 1),
    "conv3d-channels-last": (lambda: nn.Conv3d(3, 6, 3, padding=1), (2, 3, 5, 4, 3), 1),
    "convtranspose2d": (lambda: nn.ConvTranspose2d(3, 6, 2, stride=2), (2, 3, 5, 4), 1),
}


@pytest.mark.parametrize("name", list(SSF_LAYERS))
def test_ssf_fast_forms_equal_scale_times_layer_plus_shift(name):
    make_layer, shape, dim = SSF_LAYERS[name]
    torch.manual_seed(0)
    pm = get_peft_model(Wrap(make_layer().double()), SSFConfig(target_modules=["layer"], init_weights=False))
    keep_frozen_batchnorm_statistics(pm)
    pm.train()
    layer = pm.base_model.model.layer
    buffers = {k: v.clone() for k, v in layer.get_base_layer().named_buffers()}
    x = torch.randn(*shape, dtype=torch.float64)
    if "channels-last" in name:
        x = x.contiguous(memory_format=CL3)
    fast = _run(pm, x)
    reference = _run(SSFReference(layer, dim), x)
    for p in pm.parameters():
        p.grad = None
    _assert_same(reference, fast)
    # a frozen batch norm keeps its running statistics in the folded form too
    for k, v in layer.get_base_layer().named_buffers():
        assert torch.equal(v, buffers[k]), f"{name}: buffer {k} changed"


def test_ssf_on_a_trained_batchnorm_updates_its_statistics_as_before():
    torch.manual_seed(0)
    pm = get_peft_model(Wrap(nn.BatchNorm3d(4).double()), SSFConfig(target_modules=["layer"], init_weights=False))
    bn = pm.base_model.model.layer.get_base_layer()
    bn.weight.requires_grad_(True)  # trained: PyTorch's usual batch statistics and updates
    pm.train()
    x = torch.randn(2, 4, 3, 3, 3, dtype=torch.float64)
    ref_bn = nn.BatchNorm3d(4).double()
    ref_bn.load_state_dict(bn.state_dict())
    pm(x)
    ref_bn(x)
    torch.testing.assert_close(bn.running_mean, ref_bn.running_mean)


def test_ssf_half_precision_keeps_the_elementwise_form():
    pm = get_peft_model(Wrap(nn.Conv3d(2, 4, 1).to(torch.bfloat16)), SSFConfig(target_modules=["layer"]))
    out = pm(torch.randn(1, 2, 3, 3, 3, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16


@pytest.mark.parametrize("name", ["layernorm", "groupnorm"])
def test_ssf_on_a_norm_gives_the_same_output_under_fsdp(name, tmp_path):
    """FSDP (``use_orig_params=True``) swaps the norm's parameters for plain views in forward, which ``functional_call``
    ignores: the folded form would silently drop SSF there (found by peft's FSDP round-trip test)."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    make_layer, shape, _ = SSF_LAYERS[name]
    torch.manual_seed(0)
    pm = get_peft_model(Wrap(make_layer()), SSFConfig(target_modules=["layer"], init_weights=False)).eval()
    x = torch.randn(*shape)
    with torch.no_grad():
        expected = pm(x)
        without_ssf = pm.base_model.model.layer.get_base_layer()(x)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        with torch.no_grad():
            got = FSDP(pm, use_orig_params=True, device_id="cpu")(x)
    finally:
        dist.destroy_process_group()
    assert not torch.allclose(expected, without_ssf, atol=1e-3)  # SSF changes the output: the check below can fail
    torch.testing.assert_close(got, expected)


# ------------------------------------------------------------------------------------------- ConvAdapter
class AdapterReference(nn.Module):
    """``base(x) + alpha * up(act(down(x)))`` with the adapter's modules called one after the other."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x):
        a = self.layer
        h = a.conv_adapter_up["default"](a.conv_adapter_act["default"](a.conv_adapter_down["default"](x)))
        alpha = a.conv_adapter_alpha["default"].view(1, -1, *([1] * (x.dim() - 2)))
        return a.get_base_layer()(x) + h * alpha


CONV_ADAPTER_TARGETS = {
    "conv3d-depthwise": (lambda: nn.Conv3d(8, 6, 3, padding=1), (2, 8, 5, 4, 6), {}),
    "conv3d-dense-stride2": (lambda: nn.Conv3d(8, 6, 3, stride=2, padding=1), (2, 8, 6, 4, 6),
                             {"adapter_conv": "dense"}),
    "conv3d-channels-last-input": (lambda: nn.Conv3d(8, 6, 3, padding=1), (2, 8, 5, 4, 6), {}),
    "conv2d": (lambda: nn.Conv2d(8, 6, 3, padding=1), (2, 8, 5, 4), {}),
    "convtranspose3d": (lambda: nn.ConvTranspose3d(8, 6, 2, stride=2), (2, 8, 3, 2, 3), {}),
}


@pytest.mark.parametrize("name", list(CONV_ADAPTER_TARGETS))
def test_conv_adapter_fast_delta_equals_its_modules_in_turn(name):
    make_layer, shape, options = CONV_ADAPTER_TARGETS[name]
    torch.manual_seed(0)
    pm = get_peft_model(Wrap(make_layer().double()),
                        ConvAdapterConfig(target_modules=["layer"], init_weights=False, **options))
    with torch.no_grad():
        pm.base_model.model.layer.conv_adapter_alpha["default"].uniform_(0.5, 1.5)
    x = torch.randn(*shape, dtype=torch.float64)
    if "channels-last" in name:
        x = x.contiguous(memory_format=CL3)
    fast = _run(pm, x)
    for p in pm.parameters():
        p.grad = None
    _assert_same(_run(AdapterReference(pm.base_model.model.layer), x), fast)
