"""Issue 10.5: PCA initialisation of LoRA on grouped convs and under ``low_cpu_mem_usage``."""

from __future__ import annotations

import math

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

import monai_peft
from monai_peft.lora import init_lora_pca_
from single_layer import Wrap


def _projector(rows: torch.Tensor) -> torch.Tensor:
    q, _ = torch.linalg.qr(rows.double().T)
    return q @ q.T


def test_grouped_conv_rows_span_each_groups_principal_subspace():
    torch.manual_seed(0)
    groups, rank, c_in, c_out = 2, 4, 6, 10
    conv = nn.Conv2d(c_in, c_out, 3, padding=1, groups=groups)
    x = torch.randn(2, c_in, 7, 7)
    with pytest.warns(UserWarning, match="groups > 1"):
        pm = monai_peft.adapt(Wrap(conv), "lora", target=["layer"], r=rank, init_pca=True)
    layer = pm.base_model.model.layer
    a = layer.lora_A["default"].weight.detach()  # (r, C_in, 3, 3): peft's dense A
    assert a.shape == (rank, c_in, 3, 3) and layer.lora_B["default"].weight.shape == (c_out, rank // groups, 1, 1)
    for j in range(groups):
        rows = a[2 * j:2 * j + 2]
        inside, outside = rows[:, 3 * j:3 * j + 3], torch.cat([rows[:, :3 * j], rows[:, 3 * j + 3:]], dim=1)
        assert torch.count_nonzero(outside) == 0, f"group {j}: A rows reach other groups' input channels"
        filters = conv.weight.detach()[5 * j:5 * j + 5].reshape(5, -1).double()
        _, _, vh = torch.linalg.svd(filters - filters.mean(0), full_matrices=False)
        torch.testing.assert_close(_projector(inside.reshape(2, -1)), _projector(vh[:2]), atol=1e-5, rtol=0)
        torch.testing.assert_close(rows.reshape(2, -1).norm(dim=1), torch.full((2,), 1 / math.sqrt(3)))
    assert torch.count_nonzero(layer.lora_B["default"].weight) == 0
    with torch.no_grad():
        torch.testing.assert_close(pm(x), conv(x), rtol=0, atol=0)


def test_depthwise_conv_rows_are_the_filters_themselves():
    """One filter per group: no spread to centre, so the component is the filter's own direction."""
    torch.manual_seed(0)
    conv = nn.Conv3d(4, 4, 3, padding=1, groups=4)
    with pytest.warns(UserWarning, match="groups > 1"):
        pm = monai_peft.adapt(Wrap(conv), "lora", target=["layer"], r=4, init_pca=True)
    a = pm.base_model.model.layer.lora_A["default"].weight.detach()
    for j in range(4):
        expected = conv.weight.detach()[j, 0] / conv.weight.detach()[j, 0].norm() / math.sqrt(3)
        sign = torch.sign((a[j, j] * expected).sum())
        torch.testing.assert_close(a[j, j] * sign, expected)
        assert torch.count_nonzero(torch.cat([a[j, :j], a[j, j + 1:]])) == 0


def test_more_rank_than_components_fills_unit_scale_rows():
    torch.manual_seed(0)
    conv = nn.Conv2d(5, 3, 3)  # 3 centred filters span 2 directions; r = 4 asks for 4
    pm = monai_peft.adapt(Wrap(conv), "lora", target=["layer"], r=4, init_pca=True)
    a = pm.base_model.model.layer.lora_A["default"].weight.detach().reshape(4, -1)
    filters = conv.weight.detach().reshape(3, -1).double()
    _, _, vh = torch.linalg.svd(filters - filters.mean(0), full_matrices=False)
    torch.testing.assert_close(_projector(a[:2]), _projector(vh[:2]), atol=1e-5, rtol=0)
    torch.testing.assert_close(a.norm(dim=1), torch.full((4,), 1 / math.sqrt(3)))
    assert torch.linalg.matrix_rank(a) == 4


def test_low_cpu_mem_usage_materialises_the_same_init():
    torch.manual_seed(0)
    conv = nn.Conv3d(4, 8, 3, padding=1)
    eager = monai_peft.adapt(Wrap(conv), "lora", target=["layer"], r=4, init_pca=True)
    a_eager = eager.base_model.model.layer.lora_A["default"].weight.detach().clone()
    eager.unload()
    lazy = monai_peft.adapt(Wrap(conv), "lora", target=["layer"], r=4, init_pca=True, low_cpu_mem_usage=True)
    layer = lazy.base_model.model.layer
    assert not any(p.is_meta for p in lazy.parameters())
    torch.testing.assert_close(layer.lora_A["default"].weight, a_eager, rtol=0, atol=0)
    assert torch.count_nonzero(layer.lora_B["default"].weight) == 0
    assert layer.lora_A["default"].weight.requires_grad and layer.lora_B["default"].weight.requires_grad
    x = torch.randn(1, 4, 5, 5, 5)
    lazy(x).square().mean().backward()
    assert layer.lora_B["default"].weight.grad.abs().sum() > 0


def test_base_weights_on_meta_are_a_clear_error():
    with torch.device("meta"):
        net = Wrap(nn.Conv2d(4, 8, 3))
    pm = get_peft_model(net, LoraConfig(target_modules=["layer"], r=2))
    with pytest.raises(ValueError, match=r"'base_model\.model\.layer' is on the meta device"):
        init_lora_pca_(pm)
