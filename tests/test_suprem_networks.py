"""SuPreM backbones: parameter counts (thesis Table 4.1), SuPreM key names, ContBatchNorm3d, regions."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from monai_peft.networks import ContBatchNorm3d, UNet3D, suprem_backbone, suprem_segresnet, suprem_unet


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_segresnet_has_4_70m_parameters():
    n = _count(suprem_segresnet(out_channels=1))
    assert abs(n - 4.70e6) / 4.70e6 < 1e-3, n


def test_unet3d_has_19_08m_parameters():
    n = _count(suprem_unet(out_channels=1))
    assert abs(n - 19.08e6) / 19.08e6 < 1e-3, n


def test_unet3d_key_names_and_shapes_follow_suprem():
    sd = UNet3D(in_channels=1, out_channels=32).state_dict()
    expected = {
        "down_tr64.ops.0.conv1.weight": (32, 1, 3, 3, 3),
        "down_tr64.ops.1.conv1.weight": (64, 32, 3, 3, 3),
        "down_tr128.ops.1.conv1.weight": (128, 64, 3, 3, 3),
        "down_tr512.ops.1.conv1.weight": (512, 256, 3, 3, 3),
        "up_tr256.up_conv.weight": (512, 512, 2, 2, 2),
        "up_tr256.ops.0.conv1.weight": (256, 768, 3, 3, 3),
        "up_tr128.ops.0.conv1.weight": (128, 384, 3, 3, 3),
        "up_tr64.ops.1.conv1.weight": (64, 64, 3, 3, 3),
        "out_tr.final_conv.weight": (32, 64, 1, 1, 1),
        "down_tr64.ops.0.bn1.running_mean": (32,),
        "up_tr64.ops.1.bn1.num_batches_tracked": (),
    }
    for key, shape in expected.items():
        assert tuple(sd[key].shape) == shape, key
    prefixes = {k.split(".")[0] for k in sd}
    assert prefixes == {"down_tr64", "down_tr128", "down_tr256", "down_tr512", "up_tr256", "up_tr128", "up_tr64", "out_tr"}


def test_unet3d_forward_shape_and_size_check():
    torch.manual_seed(0)
    model = UNet3D(in_channels=1, out_channels=3)
    with torch.no_grad():
        y = model(torch.randn(2, 1, 16, 16, 16))
    assert y.shape == (2, 3, 16, 16, 16) and torch.isfinite(y).all()
    with pytest.raises(ValueError, match="divisible by 8"):
        model(torch.randn(1, 1, 12, 16, 16))


def test_contbatchnorm_uses_batch_statistics_in_eval_mode():
    torch.manual_seed(0)
    bn = ContBatchNorm3d(4).eval()
    bn.running_mean.fill_(100.0)
    bn.running_var.fill_(1e-4)
    x = torch.randn(2, 4, 4, 4, 4) * 3 + 5
    y = bn(x)
    # normalised with the batch's own mean/var despite absurd running stats
    assert torch.allclose(y.mean(dim=(0, 2, 3, 4)), torch.zeros(4), atol=1e-5)
    assert torch.allclose(y.var(dim=(0, 2, 3, 4), unbiased=False), torch.ones(4), atol=1e-3)
    assert torch.all(bn.running_mean == 100.0)  # eval mode leaves buffers alone
    bn.train()
    bn(x)
    assert not torch.all(bn.running_mean == 100.0) and int(bn.num_batches_tracked) == 1
    with pytest.raises(ValueError, match="5D"):
        bn(torch.randn(2, 4, 4, 4))


def test_running_stats_option_uses_running_statistics_in_eval():
    torch.manual_seed(0)
    cont, run = UNet3D(out_channels=2), UNet3D(out_channels=2, running_stats=True)
    run.load_state_dict(cont.state_dict())  # same keys, same tensors
    assert type(run.down_tr64.ops[0].bn1) is nn.BatchNorm3d
    assert isinstance(cont.down_tr64.ops[0].bn1, ContBatchNorm3d)
    x = torch.randn(1, 1, 16, 16, 16) * 50 + 20
    cont.eval(), run.eval()
    with torch.no_grad():
        assert not torch.allclose(cont(x), run(x), atol=1e-3)
        cont.train(), run.train()
        assert torch.allclose(cont(x), run(x), atol=1e-4)  # identical in training mode


def test_regions_of_unet3d():
    from monai_peft import resolve_targets

    model = UNet3D(out_channels=2)
    enc = resolve_targets(model, "encoder", outermost=True)
    dec = resolve_targets(model, "decoder", outermost=True)
    head = resolve_targets(model, "head", outermost=True)
    assert enc == ["down_tr64", "down_tr128", "down_tr256", "down_tr512"]
    assert dec == ["up_tr256", "up_tr128", "up_tr64"]
    assert head == ["out_tr"]


def test_backbone_factory_names_and_errors():
    assert isinstance(suprem_backbone("unet3d", 2), UNet3D)
    assert suprem_backbone("segresnet", 5).conv_final[2].conv.out_channels == 5
    with pytest.raises(ValueError, match="backbone"):
        suprem_backbone("swinunetr", 2)
    with pytest.raises(ValueError, match="out_channels"):
        suprem_segresnet(0)


def test_frozen_batchnorm_base_checkpoint_plus_adapter_reproduces_the_trained_unet3d(tmp_path):
    """Issue 10, part 7: with running-statistics BN, training adapters leaves the frozen BN statistics alone, so the
    base checkpoint + the adapter file give back exactly the trained network (monai_peft.tuners.frozen_norm)."""
    from peft import PeftModel
    from safetensors.torch import load_file, save_file

    import monai_peft
    from monai_peft.tuners.frozen_norm import keep_frozen_batchnorm_statistics

    torch.manual_seed(0)
    model = suprem_unet(2, running_stats=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "base.safetensors"))
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running_" in k}
    x = 3 * torch.randn(2, 1, 8, 8, 8, generator=torch.Generator().manual_seed(1)) + 1  # not the init statistics
    pm = monai_peft.adapt(model, "convadapter", train_fully="head")
    opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.05)
    pm.train()
    for _ in range(2):
        opt.zero_grad()
        pm(x).square().mean().backward()
        opt.step()
    assert pm.training and pm.base_model.model.down_tr64.ops[0].bn1.training  # flags as the user set them
    now = pm.get_base_model().state_dict()
    for key, value in stats.items():
        assert torch.equal(now[key], value), f"frozen BN statistics {key} changed while training"
    pm.eval()
    with torch.no_grad():
        trained = pm(x)
    pm.save_pretrained(tmp_path / "adapter")
    fresh = suprem_unet(2, running_stats=True)
    fresh.load_state_dict(load_file(str(tmp_path / "base.safetensors")))
    loaded = PeftModel.from_pretrained(fresh, tmp_path / "adapter").eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), trained)
    # without the behaviour PyTorch would have updated them (what made the adapter file incomplete)
    keep_frozen_batchnorm_statistics(pm, enabled=False)
    pm.train()
    with torch.no_grad():
        pm(x)
    bn = pm.get_base_model().down_tr64.ops[0].bn1
    assert not torch.equal(bn.running_mean, stats["down_tr64.ops.0.bn1.running_mean"])
