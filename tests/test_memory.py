"""Issue 12, memory lever: activation checkpointing of blocks gives the same gradients while storing less; a frozen
prefix stores nothing; adapted networks run under ``torch.compile``."""

from __future__ import annotations

import copy

import pytest
import torch
from monai.networks.nets import SegResNet
from torch import nn

import monai_peft
from monai_peft import memory
from monai_peft.networks import suprem_unet


def _segresnet() -> nn.Module:
    torch.manual_seed(0)
    return SegResNet(spatial_dims=3, init_filters=8, blocks_down=(1, 2), blocks_up=(1,), in_channels=1,
                     out_channels=3).double()


def _randomise_adapters(model: nn.Module) -> None:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def _saved_bytes(model: nn.Module, x: torch.Tensor) -> tuple[int, torch.Tensor]:
    """Bytes of the distinct storages autograd keeps for backward during ``model(x)``, and the output."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    return sum(storages.values()), out


def _grads(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    out = model(x)
    out.square().mean().backward()
    return out.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("method,options", [("convadapter", {}), ("lora", {"r": 2, "fused": True}), ("ssf", {})])
def test_checkpointing_gives_the_same_gradients_and_stores_less(method, options):
    x = torch.randn(2, 1, 16, 16, 16, dtype=torch.float64)
    plain = monai_peft.adapt(_segresnet(), method, train_fully="head", **options)
    _randomise_adapters(plain)
    saved = {}
    results = {}
    for mode in (None, "full-resolution", "all"):
        model = copy.deepcopy(plain)
        if mode:
            assert memory.enable_activation_checkpointing(model, mode) == 4  # SegResNet(1, 2)+(1,): four ResBlocks
        model.train()
        saved[mode], _ = _saved_bytes(model, x)
        results[mode] = _grads(model, x)
        assert list(model.state_dict()) == list(plain.state_dict())
    for mode in ("full-resolution", "all"):
        torch.testing.assert_close(results[mode][0], results[None][0], rtol=0, atol=1e-12)
        assert results[mode][1].keys() == results[None][1].keys()
        for name, grad in results[None][1].items():
            torch.testing.assert_close(results[mode][1][name], grad, rtol=0, atol=1e-12, msg=name)
    assert saved["all"] < saved["full-resolution"] < saved[None]


def test_full_resolution_checkpoints_only_blocks_at_the_input_size(monkeypatch):
    calls = []
    real = memory.checkpoint
    monkeypatch.setattr(memory, "checkpoint", lambda f, *a, **k: calls.append(tuple(a[0].shape[2:])) or real(f, *a, **k))
    model = monai_peft.adapt(_segresnet(), "convadapter", activation_checkpointing=True)
    assert memory.checkpointed_blocks(model) and all("conv_adapter" not in n for n in memory.checkpointed_blocks(model))
    model.train()
    model(torch.randn(1, 1, 16, 16, 16, dtype=torch.float64)).sum().backward()
    assert calls == [(16, 16, 16), (16, 16, 16)]  # the first encoder block and the last decoder block
    calls.clear()
    with torch.no_grad():  # nothing to store: no checkpointing
        model(torch.randn(1, 1, 16, 16, 16, dtype=torch.float64))
    model.eval()
    model(torch.randn(1, 1, 16, 16, 16, dtype=torch.float64))
    assert calls == []
    assert memory.disable_activation_checkpointing(model) == 4 and memory.checkpointed_blocks(model) == []


def test_a_block_reachable_along_two_paths_is_wrapped_once():
    """nnU-Net's decoder keeps a reference to the encoder: its blocks must be wrapped once, not recurse forever."""

    class Decoder(nn.Module):
        def __init__(self, encoder: nn.Module) -> None:
            super().__init__()
            self.encoder, self.conv = encoder, nn.Conv3d(8, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = SegResNet(spatial_dims=3, init_filters=8, blocks_down=(1,), blocks_up=(), in_channels=1,
                                     out_channels=8).double()
            self.decoder = Decoder(self.encoder).double()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.decoder(self.encoder(x))

    model = monai_peft.adapt(Net(), "ssf", activation_checkpointing="all")
    assert memory.checkpointed_blocks(model) == ["base_model.model.encoder.down_layers.0.1"]
    model.train()(torch.randn(1, 1, 8, 8, 8, dtype=torch.float64)).sum().backward()


def test_frozen_batch_norm_statistics_survive_the_recompute():
    """SuPreM UNet3D (``LUConv`` blocks, batch norms): running buffers unchanged, gradients as without checkpointing."""
    torch.manual_seed(0)
    net = suprem_unet(2).double()
    x = torch.randn(2, 1, 8, 8, 8, dtype=torch.float64)  # SuPreM's batch norms use batch statistics: batch >= 2
    plain = monai_peft.adapt(net, "ssf")
    _randomise_adapters(plain)
    checkpointed = copy.deepcopy(plain)
    assert memory.enable_activation_checkpointing(checkpointed, "all") == 14
    buffers = {k: v.clone() for k, v in checkpointed.named_buffers()}
    ref, got = _grads(plain.train(), x), _grads(checkpointed.train(), x)
    torch.testing.assert_close(got[0], ref[0], rtol=0, atol=1e-12)
    for name, grad in ref[1].items():
        torch.testing.assert_close(got[1][name], grad, rtol=0, atol=1e-10, msg=name)
    assert all(torch.equal(v, buffers[k]) for k, v in checkpointed.named_buffers())


def test_a_block_with_a_training_batch_norm_is_not_recomputed(monkeypatch):
    calls = []
    real = memory.checkpoint
    monkeypatch.setattr(memory, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = monai_peft.adapt(suprem_unet(2), "norm", activation_checkpointing="all")  # batch norms train
    model.train()(torch.randn(2, 1, 8, 8, 8))
    assert calls == []


def test_option_errors_name_the_accepted_values():
    with pytest.raises(ValueError, match="activation_checkpointing must be True, False, 'off' or one of"):
        monai_peft.adapt(_segresnet(), "ssf", activation_checkpointing="some")
    with pytest.raises(ValueError, match="no block to checkpoint.*register_checkpoint_block"):
        monai_peft.adapt(nn.Sequential(nn.Conv3d(1, 2, 3)), "ssf", activation_checkpointing=True)
    with pytest.raises(TypeError, match="nn.Module subclass"):
        monai_peft.register_checkpoint_block("ResBlock")


def test_a_frozen_prefix_builds_no_graph():
    """Nothing before the first adapter is recorded: the stem's output has no autograd history."""
    model = monai_peft.adapt(_segresnet(), "convadapter")  # adapters on the ResBlocks, the stem conv is frozen
    seen = {}
    stem = model.base_model.model.convInit
    stem.register_forward_hook(lambda m, i, o: seen.update(stem=o))
    model.train()(torch.randn(1, 1, 16, 16, 16, dtype=torch.float64))
    assert seen["stem"].grad_fn is None and not seen["stem"].requires_grad


@pytest.mark.parametrize("method,options", [("convadapter", {"activation_checkpointing": "all"}),
                                            ("lora", {"r": 2, "fused": "factored"}), ("ssf", {})])
def test_torch_compile_runs_adapted_networks(method, options):
    """``aot_eager`` traces through dynamo and AOTAutograd (what inductor compiles) in seconds; the inductor backend
    also works on CPU (it needs a C++ compiler; ``benchmarks/bench_methods.py`` does not time it)."""
    torch.manual_seed(0)
    net = SegResNet(spatial_dims=3, init_filters=8, blocks_down=(1,), blocks_up=(), in_channels=1, out_channels=2)
    model = monai_peft.adapt(net, method, **options)
    _randomise_adapters(model)
    x = torch.randn(1, 1, 8, 8, 8)
    ref = _grads(model.train(), x)
    compiled = torch.compile(model, backend="aot_eager")
    got = _grads(compiled, x)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-6)
    for name, grad in ref[1].items():
        torch.testing.assert_close(got[1][name.replace("_orig_mod.", "")] if name in got[1] else
                                   got[1]["_orig_mod." + name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("bundle", ["totalseg_organs_suprem_segresnet_peft", "totalseg_organs_suprem_unet_peft"])
def test_bundle_key_reaches_adapt(bundle):
    """``--peft#activation_checkpointing all`` in a SuPreM bundle checkpoints the network it builds."""
    from monai.bundle import ConfigParser

    from conftest import REPO

    parser = ConfigParser()
    parser.read_config(str(REPO / "bundles" / bundle / "configs" / "train.json"))
    assert parser["peft"]["activation_checkpointing"] is False  # off unless asked for
    parser["pretrained"] = None
    parser["num_classes"] = 3
    parser["peft"]["activation_checkpointing"] = "all"
    network = parser.get_parsed_content("network_def")
    assert len(memory.checkpointed_blocks(network)) == (14 if "unet" in bundle else 12)  # UNet3D: 14 LUConvs; SegResNet: 9 + 3 ResBlocks
