"""Issue 10.5: LoRA merges into every conv peft wraps: merge / unmerge / safe_merge / merge_and_unload equal the
unmerged output over a grid of conv geometries (1x1x1 and (1, 1, k) Conv3d, dilation, padding modes included)."""

from __future__ import annotations

import itertools

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

import monai_peft
from monai_peft import ModuleType
from single_layer import Wrap

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
INPUT = {1: (2, 3, 11), 2: (2, 3, 9, 8), 3: (1, 3, 7, 6, 5)}
KERNELS = {1: [1, 3], 2: [1, 3, (1, 3), (3, 1)], 3: [1, 3, (1, 1, 3), (3, 1, 1)]}
GRID = [(dims, k) for dims in (1, 2, 3) for k in KERNELS[dims]]


def _lora(conv: nn.Module, r: int = 2, **kwargs) -> nn.Module:
    """A LoRA model whose ``B`` is random (``init_lora_weights=False``), so the adapter changes the output."""
    config = LoraConfig(target_modules=["layer"], r=r, lora_alpha=2 * r, init_lora_weights=False, **kwargs)
    return get_peft_model(Wrap(conv.double()), config)


def _check_merges(conv: nn.Module, x: torch.Tensor, what: str) -> None:
    base_out = conv.double()(x)
    weight0 = conv.weight.detach().clone()
    pm = _lora(conv)
    ref = pm(x)
    assert ref.shape == base_out.shape and not torch.allclose(ref, base_out), what
    for safe in (False, True):
        pm.base_model.merge_adapter(safe_merge=safe)
        torch.testing.assert_close(pm(x), ref, rtol=0, atol=1e-12, msg=f"{what} merged (safe={safe})")
        pm.base_model.unmerge_adapter()
        torch.testing.assert_close(pm(x), ref, rtol=0, atol=1e-12, msg=f"{what} unmerged (safe={safe})")
        torch.testing.assert_close(conv.weight, weight0, rtol=0, atol=1e-12, msg=f"{what} weight after unmerge")
    plain = pm.merge_and_unload(safe_merge=True)
    assert type(plain.layer) is type(conv)
    torch.testing.assert_close(plain(x), ref, rtol=0, atol=1e-12, msg=f"{what} merge_and_unload")


@pytest.mark.parametrize("dims,kernel", GRID, ids=[f"{d}d-k{k}" for d, k in GRID])
def test_lora_merges_on_every_conv_geometry(dims, kernel):
    x = torch.randn(*INPUT[dims], dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for stride, dilation, padding in itertools.product((1, 2), (1, 2), (1, "same", "valid")):
        if padding == "same" and stride > 1:
            continue  # PyTorch refuses padding="same" with stride > 1
        what = f"Conv{dims}d(k={kernel}, stride={stride}, dilation={dilation}, padding={padding!r})"
        torch.manual_seed(0)
        _check_merges(CONV[dims](3, 5, kernel, stride=stride, padding=padding, dilation=dilation), x, what)


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_lora_merges_with_padding_modes(mode):
    x = torch.randn(1, 3, 9, 8, dtype=torch.float64)
    for dilation, padding in ((1, 1), (2, "same")):
        torch.manual_seed(0)
        conv = nn.Conv2d(3, 5, 3, padding=padding, dilation=dilation, padding_mode=mode)
        _check_merges(conv, x, f"Conv2d(padding={padding!r}, dilation={dilation}, padding_mode={mode!r})")


def test_several_adapters_merge_into_a_pointwise_conv3d():
    torch.manual_seed(0)
    conv = nn.Conv3d(4, 6, 1).double()
    x = torch.randn(1, 4, 3, 3, 3, dtype=torch.float64)
    pm = _lora(conv)
    pm.add_adapter("other", LoraConfig(target_modules=["layer"], r=3, lora_alpha=1, init_lora_weights=False))
    pm.base_model.set_adapter(["default", "other"])
    both = pm(x)
    pm.base_model.set_adapter("default")
    one = pm(x)
    assert not torch.allclose(both, one)
    pm.base_model.merge_adapter(["default", "other"])
    torch.testing.assert_close(pm.base_model.model.layer.get_base_layer()(x), both, rtol=0, atol=1e-12)
    pm.base_model.unmerge_adapter()
    plain = pm.merge_and_unload(adapter_names=["default", "other"])
    torch.testing.assert_close(plain(x), both, rtol=0, atol=1e-12)


@pytest.mark.parametrize("conv", [lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2),
                                  lambda: nn.Conv3d(4, 4, 3, padding=1, groups=4)], ids=["groups2", "depthwise"])
def test_grouped_conv_trains_but_merging_is_a_clear_error(conv):
    """peft's LoRA on a grouped conv is a dense conv beside it: it has no place in the grouped kernel."""
    torch.manual_seed(0)
    conv = conv()
    weight0 = conv.weight.detach().clone()
    x = torch.randn(1, 4, *(6,) * (conv.weight.dim() - 2), dtype=torch.float64)
    with pytest.warns(UserWarning, match="groups > 1"):
        pm = _lora(conv, r=4)
    assert pm(x).shape == conv(x).shape
    with pytest.raises(NotImplementedError, match="groups > 1"):
        pm.base_model.merge_adapter()
    with pytest.raises(NotImplementedError, match="groups > 1"):
        pm.merge_and_unload()
    assert torch.equal(conv.weight, weight0) and not pm.base_model.model.layer.merged
    with pytest.raises(ValueError, match="rank is divisible by groups"), pytest.warns(UserWarning, match="groups > 1"):
        _lora(nn.Conv2d(4, 6, 3, groups=2), r=3)


def test_every_conv_of_a_segresnet_merges(tiny_segresnet):
    """All Conv3d of a SegResNet, the 1x1x1 up-sampling convs and output conv included."""
    net = tiny_segresnet.double()
    pointwise = [n for n, m in net.named_modules() if isinstance(m, nn.Conv3d) and max(m.kernel_size) == 1]
    assert pointwise, "the test network must have 1x1x1 convs"
    pm = monai_peft.adapt(net, "lora", target=ModuleType(nn.Conv3d), r=2)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    x = torch.randn(1, 1, 8, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        ref = pm(x)
        plain = pm.merge_and_unload()
        torch.testing.assert_close(plain(x), ref, rtol=0, atol=1e-10)
