"""SuPreM UNet3D trainers for nnU-Net (thesis Tables 5.1, 5.4): the networks they build, in process."""

from __future__ import annotations

import pytest
import torch

from monai_peft.networks import ContBatchNorm3d, suprem_backbone
from nnunet_plugin.network import build_suprem_peft_network
from nnunet_plugin.settings import resolve_settings
from nnunet_plugin.trainers import (
    nnUNetTrainerSuPreMUNet3DConvAdapter,
    nnUNetTrainerSuPreMUNet3DLoRA,
    nnUNetTrainerSuPreMUNet3DSSF,
)


@pytest.mark.parametrize("trainer", [nnUNetTrainerSuPreMUNet3DConvAdapter, nnUNetTrainerSuPreMUNet3DLoRA,
                                     nnUNetTrainerSuPreMUNet3DSSF])
def test_unet3d_trainer_networks_start_as_the_backbone_and_keep_frozen_bn_buffers(trainer):
    assert trainer.suprem_backbone == "unet"
    torch.manual_seed(0)
    plain = suprem_backbone("unet", 3).eval()
    torch.manual_seed(0)  # the same backbone and head weights
    model = build_suprem_peft_network(suprem_backbone("unet", 3), trainer.peft_method,
                                      resolve_settings(trainer.peft_defaults, {}, environ={}), "unet")
    x = torch.randn(2, 1, 16, 16, 16)
    with torch.no_grad():
        assert torch.allclose(model.eval()(x), plain(x), atol=1e-5)  # the adapters start as the identity
    trainable = {n.split(".")[2] for n, p in model.named_parameters() if p.requires_grad}
    assert "out_tr" in trainable  # the new head trains
    adapter = [n for n, p in model.named_parameters() if p.requires_grad and "out_tr" not in n]
    assert adapter and all(any(t in n for t in ("conv_adapter", "lora_", "ssf_")) for n in adapter)
    # SuPreM's batch-statistics BN: frozen layers normalise with the batch but no longer overwrite their buffers
    assert any(isinstance(m, ContBatchNorm3d) for m in model.modules())
    before = {n: b.clone() for n, b in model.named_buffers()}
    model.train()(x).sum().backward()
    assert all(torch.equal(b, before[n]) for n, b in model.named_buffers())
    with torch.no_grad():  # batch statistics in evaluation, as SuPreM: a batch of one differs from a batch of two
        assert not torch.allclose(model.eval()(x[:1]), model(x)[:1], atol=1e-4)
