"""peft conformance for VPT and bottleneck adapters on tiny ``transformers`` / MONAI transformers built from configs.

The same battery as tests/test_peft_conformance.py (ConvAdapter and SSF on CNN mocks): save/load (safetensors and
pickle, with a fully trained head), low_cpu_mem_usage, float16/bfloat16 with and without autocast, disable/enable,
delete_adapter leaving no per-adapter state, several active adapters independent of their order,
set_requires_grad and modules_to_save. A row of :data:`CASES` is a model factory (a seeded eval-mode model, its
inputs and the name of its head) and a config factory; neither method can be merged.
"""

from __future__ import annotations

import copy
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import pytest
import torch
import transformers
from peft import PeftModel, get_peft_model, inject_adapter_in_model
from torch import nn

from monai_peft import BottleneckAdapterConfig, VPTConfig
from monai_peft.tuners.bottleneck import BottleneckAdapterLayer
from monai_peft.tuners.vpt import VPTLayer
from tiny_transformers import monai_vit, tokens, videomae, vit


def _segformer_seg():
    cfg = transformers.SegformerConfig(num_channels=1, num_encoder_blocks=2, hidden_sizes=[8, 16],
                                       num_attention_heads=[1, 2], sr_ratios=[4, 1], depths=[2, 1],
                                       patch_sizes=[7, 3], strides=[4, 2], mlp_ratios=[2, 2], decoder_hidden_size=8,
                                       initializer_range=0.3,
                                       num_labels=3)
    x = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(3))
    return transformers.SegformerForSemanticSegmentation(cfg).eval(), {"pixel_values": x}


# model name -> (factory, head module name)
MODELS: dict[str, tuple[Callable, str]] = {
    "vit": (partial(vit, classifier=True), "classifier"),
    "videomae": (partial(videomae, classifier=True), "classifier"),
    "segformer": (_segformer_seg, "decode_head.classifier"),
    "monai-vit": (monai_vit, "classification_head"),
}


@dataclass(frozen=True)
class Case:
    id: str
    model: str
    config: Callable[..., object]

    def make(self):
        torch.manual_seed(0)
        model, inputs = MODELS[self.model][0]()
        return model, inputs

    @property
    def head(self) -> str:
        return MODELS[self.model][1]


CASES = [
    Case("vpt-deep-vit", "vit", partial(VPTConfig, num_tokens=3)),
    Case("vpt-shallow-vit", "vit", partial(VPTConfig, variant="shallow", num_tokens=2)),
    Case("vpt-deep-videomae", "videomae", partial(VPTConfig, num_tokens=2, prompt_dropout=0.1)),
    Case("vpt-deep-segformer", "segformer", partial(VPTConfig, num_tokens=3)),
    Case("vpt-shallow-segformer", "segformer", partial(VPTConfig, variant="shallow", num_tokens=2)),
    Case("vpt-shallow-monai-vit", "monai-vit", partial(VPTConfig, variant="shallow", num_tokens=2)),
    Case("bn-sequential-vit", "vit", partial(BottleneckAdapterConfig, bottleneck_size=4)),
    Case("bn-parallel-videomae", "videomae", partial(BottleneckAdapterConfig, insertion="parallel", bottleneck_size=3)),
    Case("bn-sequential-videomae", "videomae", partial(BottleneckAdapterConfig, bottleneck_size=3, activation="gelu")),
    Case("bn-parallel-segformer", "segformer", partial(BottleneckAdapterConfig, insertion="parallel", scale=0.5)),
    Case("bn-sequential-monai-vit", "monai-vit",
         partial(BottleneckAdapterConfig, bottleneck_size=2, activation="tanh")),
]
ids = [c.id for c in CASES]
PREFIXES = ("vpt_", "bottleneck_")
LAYERS = (VPTLayer, BottleneckAdapterLayer)


def _run(model, inputs) -> torch.Tensor:
    return tokens(model(**inputs))


def _adapter_params(model: nn.Module, adapter: str | None = None) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if any(t in n for t in PREFIXES)
            and (adapter is None or n.endswith(f".{adapter}") or f".{adapter}." in n)}


def _perturb(model: nn.Module, seed: int = 0, scale: float = 0.3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g).to(p.dtype))


def _train(model: nn.Module, inputs: dict, steps: int = 3, lr: float = 0.5) -> None:
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for m in model.modules():  # frozen batch norms (Segformer's decode head) would still update running statistics
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    for _ in range(steps):
        opt.zero_grad()
        (_run(model, inputs) - 1.0).square().mean().backward()
        opt.step()
    model.eval()


def _differs(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Clearly different, relative to the output's size (the tiny models' outputs are small: 1e-4 for Segformer)."""
    return bool((a.float() - b.float()).abs().max() > 1e-3 * b.float().abs().max())


def _cast_inputs(inputs: dict, dtype: torch.dtype) -> dict:
    return {k: v.to(dtype) for k, v in inputs.items()}


# ------------------------------------------------------------------------------------------------ save / load
@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "pickle"])
@pytest.mark.parametrize("head", [False, True], ids=["adapter", "adapter+head"])
@pytest.mark.parametrize("case", CASES, ids=ids)
def test_save_load_roundtrip(case, safe, head, tmp_path):
    model, x = case.make()
    with torch.no_grad():
        base_out = _run(model, x)
    torch.manual_seed(1)
    pm = get_peft_model(model, case.config(init_weights=False, modules_to_save=[case.head] if head else None)).eval()
    if head:
        _perturb(pm)
    with torch.no_grad():
        out = _run(pm, x)
    assert _differs(out, base_out)
    pm.save_pretrained(tmp_path, safe_serialization=safe)
    files = {p.name for p in tmp_path.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors" if safe else "adapter_model.bin"} <= files
    assert not {"model.safetensors", "config.json"} & files
    fresh, _ = case.make()
    torch.manual_seed(54321)
    loaded = PeftModel.from_pretrained(fresh, tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(_run(loaded, x), out)
    before, after = pm.state_dict(), loaded.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    with torch.no_grad():
        assert torch.equal(_run(copy.deepcopy(pm), x), out)
    if not isinstance(fresh, transformers.PreTrainedModel):  # transformers' output-capturing hooks do not pickle
        with torch.no_grad():
            assert torch.equal(_run(pickle.loads(pickle.dumps(pm)), x), out)


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_low_cpu_mem_usage(case, tmp_path):
    model, x = case.make()
    pm = get_peft_model(model, case.config(init_weights=False)).eval()
    with torch.no_grad():
        out = _run(pm, x)
    pm.save_pretrained(tmp_path)
    fresh, _ = case.make()
    loaded = PeftModel.from_pretrained(fresh, tmp_path, low_cpu_mem_usage=True).eval()
    assert {p.device.type for p in loaded.parameters()} == {"cpu"}
    loaded.load_adapter(tmp_path, adapter_name="other", low_cpu_mem_usage=True)
    assert {p.device.type for p in loaded.parameters()} == {"cpu"}
    loaded.set_adapter("other")
    with torch.no_grad():
        assert torch.equal(_run(loaded, x), out)
    bare, _ = case.make()
    inject_adapter_in_model(case.config(), bare, low_cpu_mem_usage=True)
    assert "meta" in {p.device.type for p in bare.parameters()}


def test_loading_into_another_width_names_the_tensor(tmp_path):
    model, _ = vit(hidden=16, classifier=True)
    get_peft_model(model, VPTConfig()).save_pretrained(tmp_path)
    other, _ = vit(hidden=24, heads=3, classifier=True)
    with pytest.raises((ValueError, RuntimeError), match="vpt_prompts"):
        PeftModel.from_pretrained(other, tmp_path)


# ------------------------------------------------------------------------------------------------ precision
@pytest.mark.parametrize("autocast_adapter_dtype", [True, False])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=ids)
def test_half_precision_model(case, dtype, autocast_adapter_dtype):
    model, x = case.make()
    model = model.to(dtype)
    pm = get_peft_model(model, case.config(init_weights=False), autocast_adapter_dtype=autocast_adapter_dtype).eval()
    pm.add_adapter("other", case.config(), autocast_adapter_dtype=autocast_adapter_dtype)
    expected = torch.float32 if autocast_adapter_dtype else dtype
    assert {p.dtype for p in _adapter_params(pm).values()} == {expected}
    out = _run(pm, _cast_inputs(x, dtype))
    assert out.dtype == dtype and torch.isfinite(out).all()


@pytest.mark.parametrize("half", ["base", "adapters"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=ids)
def test_mixed_precision_base_and_adapters(case, dtype, half):
    """A half-precision model with float32 adapters runs, and the reverse; both stay close to float32."""
    model, x = case.make()
    pm = get_peft_model(model, case.config(init_weights=False)).eval()
    with torch.no_grad():
        ref = _run(pm, x)
        for name, p in [*pm.named_parameters(), *pm.named_buffers()]:
            if p.is_floating_point() and (half == "base") != any(t in name for t in PREFIXES):
                p.data = p.data.to(dtype)
        out = _run(pm, _cast_inputs(x, dtype) if half == "base" else x)
    if half == "base":
        assert out.dtype == dtype
    assert torch.allclose(out.float(), ref, atol=0.05, rtol=0.05), (out.float() - ref).abs().max()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=ids)
def test_autocast_forward_and_backward(case, dtype):
    model, x = case.make()
    pm = get_peft_model(model, case.config(init_weights=False))
    with torch.autocast("cpu", dtype=dtype):
        out = _run(pm, x)
    out.float().sum().backward()
    grads = [p.grad for p in _adapter_params(pm).values()]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


# ------------------------------------------------------------------------------------------------ training state
@pytest.mark.parametrize("case", CASES, ids=ids)
def test_only_adapter_parameters_and_the_saved_head_train(case):
    model, x = case.make()
    pm = get_peft_model(model, case.config(init_weights=False, modules_to_save=[case.head]))
    before = {n: p.detach().clone() for n, p in pm.named_parameters()}
    opt = torch.optim.SGD(pm.parameters(), lr=0.5)
    pm.train()
    for _ in range(3):
        opt.zero_grad()
        (_run(pm, x) - 1.0).square().mean().backward()
        opt.step()
    for name, p in pm.named_parameters():
        if any(t in name for t in PREFIXES) or "modules_to_save" in name:
            assert p.requires_grad and not torch.allclose(p, before[name], atol=1e-6, rtol=1e-6), name
        else:
            assert not p.requires_grad and torch.equal(p, before[name]), name


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_disable_and_enable_adapters(case):
    model, x = case.make()
    with torch.no_grad():
        base_out = _run(model, x)
    pm = get_peft_model(model, case.config()).eval()
    with torch.no_grad():
        init = _run(pm, x)
    if case.id.startswith("bn-"):  # adapters start as the identity (up to kernel choice on non-contiguous inputs)
        torch.testing.assert_close(init, base_out, atol=1e-6, rtol=1e-5)
    else:  # prompts do not (test_vpt.py checks by how much)
        assert not torch.equal(init, base_out)
    _train(pm, x)
    with torch.no_grad():
        trained = _run(pm, x)
        with pm.disable_adapter():
            disabled = _run(pm, x)
        enabled_again = _run(pm, x)
    assert not torch.equal(trained, init)
    # disabled == base up to the last bit that Linear's kernel choice (weights now frozen) may flip
    torch.testing.assert_close(disabled, base_out, atol=1e-6, rtol=1e-5)
    assert torch.equal(enabled_again, trained)
    assert all(p.requires_grad for p in _adapter_params(pm).values())


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_delete_adapter_leaves_no_state(case):
    model, x = case.make()
    pm = get_peft_model(model, case.config(modules_to_save=[case.head]), adapter_name="foobar")
    pm.add_adapter("other", case.config(init_weights=False))

    def holders():
        found = []
        for obj in [pm, *pm.modules()]:
            for attr, value in vars(obj).items():
                if hasattr(value, "keys") and hasattr(value, "__contains__") and "foobar" in value:
                    found.append(f"{type(obj).__name__}.{attr}")
        return found

    assert holders(), "no per-adapter container found: the check would be vacuous"
    pm.delete_adapter("foobar")
    assert not holders(), f"per-adapter state left behind: {holders()}"
    assert not [n for n in pm.state_dict() if ".foobar" in n or n.endswith("foobar")]
    assert pm.active_adapters == ["other"] and set(pm.peft_config) == {"other"}
    with torch.no_grad():
        _run(pm, x)
    with pytest.raises(ValueError, match="foobar"):
        pm.delete_adapter("foobar")


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_several_active_adapters_in_any_order(case):
    model, x = case.make()
    pm = get_peft_model(model, case.config(init_weights=False), adapter_name="a1").eval()
    torch.manual_seed(7)
    pm.add_adapter("a2", case.config(init_weights=False))
    pm.set_adapter("a2")
    _perturb(pm.base_model, seed=4, scale=0.05)
    layers = [m for m in pm.modules() if isinstance(m, BottleneckAdapterLayer)]
    inputs = {}  # each adapted layer's input in a pass without adapters, to compare the layers on equal inputs
    hooks = [m.register_forward_pre_hook(lambda mod, a, kw: inputs.__setitem__(id(mod), (a, kw)), with_kwargs=True)
             for m in layers]
    with pm.disable_adapter(), torch.no_grad():
        _run(pm, x)
        base_layer_outs = [tokens(m(*inputs[id(m)][0], **inputs[id(m)][1])) for m in layers]
    for h in hooks:
        h.remove()
    outs, layer_outs = {}, {}
    with torch.no_grad():
        for active in (["a1"], ["a2"], ["a1", "a2"], ["a2", "a1"]):
            pm.base_model.set_adapter(active)
            outs[tuple(active)] = _run(pm, x)
            layer_outs[tuple(active)] = [tokens(m(*inputs[id(m)][0], **inputs[id(m)][1])) for m in layers]
    assert torch.equal(outs[("a1", "a2")], outs[("a2", "a1")])
    for one in (("a1",), ("a2",)):
        assert _differs(outs[("a1", "a2")], outs[one])
    assert _differs(outs[("a1",)], outs[("a2",)])
    for base, y1, y2, y12 in zip(base_layer_outs, layer_outs[("a1",)], layer_outs[("a2",)], layer_outs[("a1", "a2")]):
        torch.testing.assert_close(y12, base + (y1 - base) + (y2 - base))  # bottleneck contributions add up


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_set_requires_grad(case):
    model, _ = case.make()
    pm = get_peft_model(model, case.config(), adapter_name="a0")
    pm.add_adapter("a1", case.config(modules_to_save=[case.head]))

    def flags(adapter):
        params = _adapter_params(pm, adapter)
        if adapter == "a1":
            params.update({n: p for n, p in pm.named_parameters() if f"modules_to_save.{adapter}." in n})
        assert params
        return {p.requires_grad for p in params.values()}

    assert flags("a0") == {True} and flags("a1") == {False}
    pm.set_requires_grad("a1")
    assert flags("a0") == {True} and flags("a1") == {True}
    pm.set_requires_grad(["a0", "a1"], requires_grad=False)
    assert flags("a0") == {False} and flags("a1") == {False}


@pytest.mark.parametrize("case", [CASES[0], CASES[9]], ids=[CASES[0].id, CASES[9].id])
def test_modules_to_save_with_several_adapters(case):
    model, x = case.make()
    pm = get_peft_model(model, case.config(modules_to_save=[case.head]), adapter_name="a1").eval()
    pm.add_adapter("a2", case.config(modules_to_save=[case.head]))
    head = pm.base_model.model.get_submodule(case.head)
    pm.set_adapter("a1")
    _perturb(pm.base_model, seed=1)
    with torch.no_grad():
        out1 = _run(pm, x)
    pm.set_adapter("a2")
    with torch.no_grad():
        out2 = _run(pm, x)
    assert set(head.modules_to_save) == {"a1", "a2"} and _differs(out1, out2)
    pm.set_adapter("a1")
    with torch.no_grad():
        assert torch.equal(_run(pm, x), out1)
    with pm.disable_adapter(), torch.no_grad():  # the original head is used without adapters
        assert not torch.allclose(_run(pm, x), out1)
