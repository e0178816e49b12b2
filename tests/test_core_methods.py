"""Issue 2 must-holds: every method on SegResNet, BasicUNet and a 2D CNN."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import pytest
import torch
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file, save_file

import monai_peft
from conftest import REPO, make

NETS = ["segresnet", "basicunet", "cnn2d"]
# method -> adapt() keyword arguments used in these tests; the head trains fully where a new head would
METHOD_ARGS = {
    "convadapter": dict(train_fully="head"),
    "convadapter-sequential": dict(insertion="sequential", gamma=2),
    "lora": dict(r=4, train_fully="head"),
    "lora-dynamic-pca": dict(r="dynamic", init_pca=True),
    "ssf": dict(),
    "bitfit": dict(),
    "norm": dict(),
    "full": dict(),
    "decoder": dict(),
    "head": dict(),
}


def _adapt(model, key, **extra):
    method = key.split("-")[0]
    return monai_peft.adapt(model, method, **{**METHOD_ARGS[key], **extra})


def _randomise_trainable(model: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))


@pytest.mark.parametrize("net", NETS)
@pytest.mark.parametrize("key", list(METHOD_ARGS))
def test_identity_at_init_and_one_step_trains_only_adapters(net, key):
    model, x = make(net)
    with torch.no_grad():
        ref = model(x)
    pm = _adapt(model, key)
    pm.eval()
    with torch.no_grad():
        out = pm(x)
    assert out.shape == ref.shape
    assert (out - ref).abs().max().item() < 1e-6, f"{key} on {net} is not the identity at init"

    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable, f"{key} on {net}: nothing trainable"
    before = {n: p.detach().clone() for n, p in pm.named_parameters()}
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    pm.train()
    loss = (pm(x) - torch.rand_like(ref)).pow(2).mean()
    loss.backward()
    opt.step()
    changed = {n for n, p in pm.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed, f"{key} on {net}: the optimizer step changed nothing"
    assert changed <= trainable, f"frozen parameters changed: {sorted(changed - trainable)[:5]}"
    if "head" in METHOD_ARGS[key].get("train_fully", ""):
        assert any("modules_to_save" in n for n in changed)


@pytest.mark.parametrize("net", NETS)
def test_two_named_adapters_switch_disable_delete(net):
    model, x = make(net)
    with torch.no_grad():
        ref = model(x)
    pm = monai_peft.adapt(model, "convadapter", adapter_name="organs")
    monai_peft.adapt(pm, "convadapter", adapter_name="vertebrae", gamma=2, activation="gelu")
    assert set(pm.peft_config) == {"organs", "vertebrae"}
    pm.eval()
    outs = {}
    for i, name in enumerate(("organs", "vertebrae")):
        pm.set_adapter(name)
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if f".{name}" in n:
                    p.add_(0.05 * torch.randn_like(p))
        with torch.no_grad():
            outs[name] = pm(x)
    assert not torch.allclose(outs["organs"], outs["vertebrae"])
    for name in ("organs", "vertebrae"):
        pm.set_adapter(name)
        with torch.no_grad():
            assert torch.equal(pm(x), outs[name]), f"switching back to {name} changed its output"
    with pm.disable_adapter(), torch.no_grad():
        assert torch.allclose(pm(x), ref, atol=1e-6)
    pm.delete_adapter("vertebrae")
    assert set(pm.peft_config) == {"organs"}
    assert not any(".vertebrae" in n for n, _ in pm.named_parameters())
    pm.set_adapter("organs")
    with torch.no_grad():
        assert torch.equal(pm(x), outs["organs"])


@pytest.mark.parametrize("net", NETS)
@pytest.mark.parametrize("key", ["lora", "lora-dynamic-pca", "ssf", "bitfit"])
def test_merge_and_unload_gives_a_plain_equal_network(net, key):
    model, x = make(net)
    pm = _adapt(model, key, train_fully="head")  # a fully trained head (modules_to_save) merges back too
    _randomise_trainable(pm)
    pm.eval()
    with torch.no_grad():
        adapted = pm(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = pm.merge_and_unload()
    assert not any(isinstance(m, BaseTunerLayer) for m in merged.modules())
    assert type(merged).__name__ == type(model).__name__
    assert not any("modules_to_save" in n or "original_module" in n for n, _ in merged.named_modules())
    with torch.no_grad():
        out = merged(x)
    rel = ((out - adapted).norm() / adapted.norm()).item()
    assert rel < 1e-5, f"{key} on {net}: merged network differs (relative {rel:.2e})"


def test_ssf_merge_into_bias_free_conv_warns_and_adds_bias():
    model, x = make("cnn2d")
    pm = monai_peft.adapt(model, "ssf", target=["enc1.conv1"])
    _randomise_trainable(pm)
    pm.eval()
    with torch.no_grad():
        adapted = pm(x)
    with pytest.warns(UserWarning, match=r"without bias adds bias parameter\(s\) of shape \(16,\)"):
        merged = pm.merge_and_unload()
    assert merged.enc1.conv1.bias is not None and merged.enc1.conv1.bias.shape == (16,)
    with torch.no_grad():
        assert torch.allclose(merged(x), adapted, atol=1e-5)


@pytest.mark.parametrize("net", ["cnn2d", "segresnet"])
def test_convadapter_cannot_merge_but_unloads(net):
    model, x = make(net)
    pm = monai_peft.adapt(model, "convadapter", train_fully="head")  # SegResNet: adapters wrap whole ResBlocks
    _randomise_trainable(pm)
    with pytest.raises(ValueError, match="cannot be merged"):
        pm.merge_and_unload()
    with torch.no_grad():  # the network without adapter branches but with the trained head
        for n, p in pm.named_parameters():
            if "conv_adapter_up" in n:
                p.zero_()
        expected = pm(x)
    base = pm.unload()
    assert not any(isinstance(m, BaseTunerLayer) for m in base.modules())
    assert type(base).__name__ == type(model).__name__
    with torch.no_grad():
        assert torch.allclose(base(x), expected, atol=1e-6)


LOADER = r"""
import json, sys, torch
sys.path.insert(0, sys.argv[1])
import monai_peft  # registers ConvAdapter and SSF with peft
from peft import PeftModel
from safetensors.torch import load_file, save_file
from conftest import make
jobs = json.load(open(sys.argv[2]))
outs = {}
for job in jobs:
    model, x = make(job["net"], seed=123)  # different random init: the base weights come from the file
    model.load_state_dict(load_file(job["base"]))
    pm = PeftModel.from_pretrained(model, job["adapter"], low_cpu_mem_usage=job["low_cpu"])
    pm.eval()
    with torch.no_grad():
        outs[job["key"]] = pm(load_file(job["x"])["x"]).contiguous()
save_file(outs, sys.argv[3])
"""


def test_save_pretrained_then_from_pretrained_in_fresh_process(tmp_path):
    jobs, expected = [], {}
    for net in NETS:
        for i, key in enumerate(["convadapter", "lora-dynamic-pca", "ssf", "decoder"]):
            model, x = make(net)
            base_file = tmp_path / f"{net}_base.safetensors"
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(base_file))
            save_file({"x": x}, str(tmp_path / f"{net}_x.safetensors"))
            pm = _adapt(model, key)
            _randomise_trainable(pm, seed=i)
            pm.eval()
            adapter_dir = tmp_path / f"{net}_{key}"
            pm.save_pretrained(str(adapter_dir))
            files = sorted(p.name for p in adapter_dir.iterdir())
            assert "adapter_model.safetensors" in files and not any(f.endswith(".bin") for f in files), files
            with torch.no_grad():
                expected[f"{net}/{key}"] = pm(x)
            jobs.append(dict(net=net, key=f"{net}/{key}", base=str(base_file), adapter=str(adapter_dir),
                             x=str(tmp_path / f"{net}_x.safetensors"), low_cpu=(i % 2 == 1)))
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    script = tmp_path / "load.py"
    script.write_text(LOADER)
    out_file = tmp_path / "outs.safetensors"
    proc = subprocess.run([sys.executable, str(script), str(REPO / "tests"), str(tmp_path / "jobs.json"), str(out_file)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = load_file(str(out_file))
    for key, ref in expected.items():
        if "lora" in key:  # trained fused (one conv with W + s*B@A, the default), reloaded as peft's two-branch
            # layers: the same function, rounded differently (tests/test_lora_fused.py checks the two paths agree)
            torch.testing.assert_close(got[key], ref, rtol=1e-5, atol=1e-5, msg=f"{key}: reloaded adapter differs")
        else:
            assert torch.equal(got[key], ref), f"{key}: reloaded adapter gives different outputs"
    cfg = json.loads((tmp_path / "segresnet_convadapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "CONV_ADAPTER"


def test_adapter_file_with_wrong_keys_is_an_error_naming_them(tmp_path):
    model, _ = make("segresnet")
    pm = monai_peft.adapt(model, "convadapter")
    pm.save_pretrained(str(tmp_path))
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    dropped = sorted(tensors)[0]
    tensors.pop(dropped)
    tensors["base_model.model.down_layers.9.conv_adapter_up.weight"] = torch.zeros(1)
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    fresh, _ = make("segresnet")
    with pytest.raises(ValueError) as err:
        PeftModel.from_pretrained(fresh, str(tmp_path))
    msg = str(err.value)
    assert "missing keys" in msg and dropped.replace("base_model.model.", "") in msg
    assert "down_layers.9.conv_adapter_up" in msg


def test_adapter_from_a_different_width_fails_naming_the_tensor(tmp_path):
    from monai.networks.nets import SegResNet

    small = SegResNet(spatial_dims=3, init_filters=8, blocks_down=(1, 2, 2, 4), blocks_up=(1, 1, 1), out_channels=3)
    monai_peft.adapt(small, "convadapter").save_pretrained(str(tmp_path))
    model, _ = make("segresnet")
    with pytest.raises(ValueError, match=r"other channel counts: down_layers\.0\.1\.conv_adapter_alpha\.default "
                                         r"\(file \(8,\), model \(16,\)\)"):
        PeftModel.from_pretrained(model, str(tmp_path))


def test_default_targets_is_the_one_rule_with_regions_and_placement():
    """adapt(), the presets and the nnU-Net plugin ask default_targets; regions and block/conv placement are its
    arguments, and an undeclared region is an error naming what the network declares."""
    from monai.networks.nets import SegResNet

    from monai_peft.adapt import default_targets
    from monai_peft.regions import module_in_region
    from monai_peft.targeting import resolve_targets

    net = SegResNet(spatial_dims=3, in_channels=1, out_channels=2, init_filters=8, blocks_down=(1, 1), blocks_up=(1,))
    everywhere = resolve_targets(net, default_targets(net, "lora"))
    encoder = resolve_targets(net, default_targets(net, "lora", regions=("encoder",)))
    assert encoder and set(encoder) < set(everywhere)
    assert all(module_in_region(net, n, "encoder") for n in encoder)
    blocks = resolve_targets(net, default_targets(net, "convadapter"))
    convs = resolve_targets(net, default_targets(net, "convadapter", blocks=False))
    assert blocks == resolve_targets(net, default_targets(net, "convadapter", blocks=True))
    assert all(type(net.get_submodule(n)).__name__ == "ResBlock" for n in blocks)
    assert all(isinstance(net.get_submodule(n), torch.nn.Conv3d) for n in convs) and len(convs) > len(blocks)
    with pytest.raises(ValueError, match="declares"):
        default_targets(net, "lora", regions=("middle",))
