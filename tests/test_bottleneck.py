"""Bottleneck adapters (Houlsby sequential, He et al. parallel) on ViT, VideoMAE, Segformer and MONAI's ViT/UNETR."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from peft import get_peft_model

from monai_peft import BottleneckAdapterConfig
from monai_peft.tuners.bottleneck import BottleneckAdapterLayer, default_bottleneck_targets
from tiny_transformers import MODELS, make, tokens

INSERTIONS = ("sequential", "parallel")


@pytest.mark.parametrize("insertion", INSERTIONS)
@pytest.mark.parametrize("name", list(MODELS))
def test_identity_at_init_then_one_step_trains_only_adapters(name, insertion):
    model, inputs = make(name)
    with torch.no_grad():
        ref = tokens(model(**inputs))
    pm = get_peft_model(model, BottleneckAdapterConfig(insertion=insertion, bottleneck_size=4))
    n_layers = sum(isinstance(m, BottleneckAdapterLayer) for m in pm.modules())
    assert n_layers >= 2 and n_layers % 2 == 0, "one adapter after/beside the attention and one at the MLP per block"
    with torch.no_grad():
        out = tokens(pm(**inputs))
    # equal up to the last bit a kernel choice on a non-contiguous input may flip
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5, msg=f"{insertion} adapter on {name} is not the identity")

    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable and all("bottleneck_" in n for n in trainable)
    before = {n: p.detach().clone() for n, p in pm.named_parameters()}
    pm.train()
    opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.5)
    (tokens(pm(**inputs)) - 1.0).square().mean().backward()
    opt.step()
    changed = {n for n, p in pm.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= trainable
    assert any("bottleneck_up" in n for n in changed), "the zero up-projection must receive a gradient"
    pm.eval()
    with torch.no_grad():
        assert not torch.allclose(tokens(pm(**inputs)), ref), "a trained adapter must change the output"


def _adapter_fn(layer: BottleneckAdapterLayer, adapter: str = "default"):
    down, up = layer.bottleneck_down[adapter], layer.bottleneck_up[adapter]
    scale = layer.bottleneck_scale[adapter]
    return lambda h: F.linear(torch.relu(F.linear(h, down.weight, down.bias)), up.weight, up.bias) * scale


def _hooked_reference(base: torch.nn.Module, pm, insertion: str) -> list:
    """Forward hooks on the plain network that add what the paper's formula says at each adapted module:
    ``f(x) + A(f(x))`` (sequential) or ``f(x) + A(x)`` (parallel, x = the branch input)."""
    handles, captured = [], {}
    for name, layer in pm.base_model.model.named_modules():
        if not isinstance(layer, BottleneckAdapterLayer):
            continue
        module, adapter = base.get_submodule(name), _adapter_fn(layer)

        def add(out, delta):
            return (out[0] + delta, *out[1:]) if isinstance(out, tuple) else out + delta

        if insertion == "sequential":
            handles.append(module.register_forward_hook(
                lambda m, a, out, A=adapter: add(out, A(out[0] if isinstance(out, tuple) else out))))
        elif name.endswith(".output") and hasattr(base.get_submodule(name[:-7]), "intermediate"):
            # VideoMAE: the MLP's input is what enters `intermediate`; `output` adds the residual itself
            inter = base.get_submodule(name[:-7] + ".intermediate")
            handles.append(inter.register_forward_pre_hook(lambda m, a, k=name: captured.__setitem__(k, a[0])))
            handles.append(module.register_forward_hook(lambda m, a, out, A=adapter, k=name: out + A(captured[k])))
        else:
            handles.append(module.register_forward_hook(lambda m, a, out, A=adapter: add(out, A(a[0]))))
    return handles


@pytest.mark.parametrize("insertion", INSERTIONS)
@pytest.mark.parametrize("name", ["vit", "videomae-cls-first-token", "segformer-3stage", "monai-vit"])
def test_adapters_sit_where_houlsby_and_he_put_them(name, insertion):
    model, inputs = make(name)
    base = copy.deepcopy(model)
    pm = get_peft_model(model, BottleneckAdapterConfig(insertion=insertion, bottleneck_size=3, init_weights=False,
                                                       scale=2.0, activation="relu"))
    handles = _hooked_reference(base, pm, insertion)
    with torch.no_grad():
        expected, out = tokens(base(**inputs)), tokens(pm(**inputs))
    for h in handles:
        h.remove()
    with torch.no_grad():
        unadapted = tokens(base(**inputs))
    assert not torch.allclose(expected, unadapted, atol=1e-5), "the random adapters must matter for this test"
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_default_targets_per_family_and_parameter_count():
    model, _ = make("videomae")
    assert default_bottleneck_targets(model, "sequential") == [
        "encoder.layer.0.attention", "encoder.layer.0.output.dense", "encoder.layer.1.attention",
        "encoder.layer.1.output.dense"]
    assert default_bottleneck_targets(model, "parallel")[1] == "encoder.layer.0.output"
    model, _ = make("echo-backbone")
    names = default_bottleneck_targets(model)
    assert len(names) == 2 * 8 and names[0] == "encoder.stages.0.blocks.0.attention"
    model, _ = make("vit-wide-nobias")  # D=24, 3 blocks
    pm = get_peft_model(model, BottleneckAdapterConfig(bottleneck_size=5))
    d, m = 24, 5
    assert sum(p.numel() for p in pm.parameters() if p.requires_grad) == 3 * 2 * (d * m + m + m * d + d)


def test_an_explicit_linear_target_reads_its_output_or_input():
    model, inputs = make("vit")
    base = copy.deepcopy(model)
    pm = get_peft_model(model, BottleneckAdapterConfig(target_modules=["layers.0.mlp.fc1"], insertion="parallel",
                                                       bottleneck_size=2, init_weights=False))
    layer = pm.base_model.model.layers[0].mlp.fc1
    assert (layer.bottleneck_down["default"].in_features, layer.bottleneck_up["default"].out_features) == (16, 32)
    A = _adapter_fn(layer)
    h = base.layers[0].mlp.fc1.register_forward_hook(lambda m, a, out: out + A(a[0]))
    with torch.no_grad():
        torch.testing.assert_close(tokens(pm(**inputs)), tokens(base(**inputs)))
    h.remove()


def test_bad_targets_and_options_are_named():
    from monai.networks.nets import SegResNet

    cnn = SegResNet(spatial_dims=2, init_filters=8, blocks_down=(1,), blocks_up=(), out_channels=2)
    with pytest.raises(ValueError, match="SegResNet contains no transformer block"):
        get_peft_model(cnn, BottleneckAdapterConfig())
    cnn = SegResNet(spatial_dims=2, init_filters=8, blocks_down=(1,), blocks_up=(), out_channels=2)
    with pytest.raises(TypeError, match=r"cannot wrap 'convInit.conv' \(Conv2d\)"):
        get_peft_model(cnn, BottleneckAdapterConfig(target_modules=["convInit.conv"]))
    model, _ = make("videomae")
    with pytest.raises(TypeError, match=r"'encoder.layer.0.output'.*adds the residual itself.*output Linear"):
        get_peft_model(model, BottleneckAdapterConfig(target_modules=["encoder.layer.0.output"]))
    for bad in (dict(insertion="diagonal"), dict(activation="swish"), dict(bottleneck_size=0)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            BottleneckAdapterConfig(**bad)


def test_cannot_merge_but_unloads_to_the_base_model():
    model, inputs = make("segformer")
    with torch.no_grad():
        ref = tokens(model(**inputs))
    pm = get_peft_model(model, BottleneckAdapterConfig(init_weights=False))
    with pytest.raises(ValueError, match="cannot be merged"):
        pm.merge_and_unload()
    plain = pm.unload()
    assert not any(isinstance(m, BottleneckAdapterLayer) for m in plain.modules())
    with torch.no_grad():
        assert torch.equal(tokens(plain(**inputs)), ref)


@pytest.mark.parametrize("insertion", INSERTIONS)
def test_adapt_bottleneck_is_the_peft_method_on_the_default_sites(insertion):
    from monai_peft import adapt

    model, inputs = make("videomae")
    ours = adapt(copy.deepcopy(model), "bottleneck", insertion=insertion, bottleneck_size=4, train_fully="embeddings")
    plain = get_peft_model(copy.deepcopy(model), BottleneckAdapterConfig(insertion=insertion, bottleneck_size=4,
                                                                         modules_to_save=["embeddings"]))
    assert ours.state_dict().keys() == plain.state_dict().keys()
    assert ours.peft_config["default"].insertion == insertion
    with pytest.raises(ValueError, match="a module is either adapted or trained fully"):
        adapt(copy.deepcopy(model), "bottleneck", target=["encoder.layer.0.attention"], train_fully="encoder.layer.0")
