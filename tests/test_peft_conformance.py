"""peft conformance (issue 10, part 4; issue 15, part 4): what peft's own ``tests/test_custom_models.py`` checks for a
non-LoRA method, checked for every monai-peft method:

- ConvAdapter and SSF on peft-style mock models (MLP, Conv1d, Conv2d incl. 1x1 / groups / valid padding, Conv3d,
  ConvTranspose2d, with 1-, 5- and 10-channel layers);
- VPT and bottleneck adapters on tiny ``transformers`` ViT / VideoMAE / Segformer and MONAI ViT models built from
  configs (``tests/tiny_transformers.py``).

Save/load (safetensors and pickle, with a fully trained head), loading into a network with other widths,
low_cpu_mem_usage, float16/bfloat16 with and without autocast, disable/enable, delete_adapter leaving no per-adapter
state, several active adapters independent of their order (and, per layer, combined by the method's rule),
set_requires_grad, modules_to_save with several adapters, merging (or refusing to) and in/out features.

The battery is a table of cases: a model factory (returns a seeded eval-mode model and its forward keyword
arguments), a config factory (keyword overrides such as ``init_weights=False`` or ``modules_to_save=[head]``), the
head's module name, whether the method merges (then the merge tests run too), whether it starts as the identity
(visual prompts do not), and a factory of the same network with other widths. Another method adds its rows to
:data:`CASES`.
"""

from __future__ import annotations

import copy
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Optional

import pytest
import torch
import transformers
from peft import PeftModel, get_peft_model, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import save_file
from torch import nn

from monai_peft import BottleneckAdapterConfig, ConvAdapterConfig, SSFConfig, VPTConfig
from monai_peft.tuners.bottleneck import BottleneckAdapterLayer
from monai_peft.tuners.conv_adapter.layer import ConvAdapterLayer
from monai_peft.tuners.ssf.layer import SSFLayer
from monai_peft.tuners.vpt import VPTLayer
from tiny_transformers import monai_vit, tokens, videomae, vit


# ------------------------------------------------------------------------------------------------ CNN mock models
class MLP(nn.Module):
    def __init__(self, layernorm: bool = False) -> None:
        super().__init__()
        self.norm0 = nn.LayerNorm(10) if layernorm else nn.Identity()
        self.lin0 = nn.Linear(10, 20)
        self.relu = nn.ReLU()
        self.lin1 = nn.Linear(20, 20)
        self.norm1 = nn.LayerNorm(20) if layernorm else nn.Identity()
        self.head = nn.Linear(20, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, x):
        return self.sm(self.head(self.norm1(self.lin1(self.relu(self.lin0(self.norm0(x)))))))


class ConvNet(nn.Module):
    """``conv`` (optionally followed by ``norm``), ReLU, flatten, a linear ``head``; input ``(B, C, *spatial)``."""

    def __init__(self, conv: nn.Module, input_shape: tuple[int, ...], norm: nn.Module | None = None) -> None:
        super().__init__()
        self.conv = conv
        self.norm = norm if norm is not None else nn.Identity()
        self.relu = nn.ReLU()
        self.flat = nn.Flatten()
        with torch.no_grad():  # norms keep the shape
            n = conv(torch.zeros(1, *input_shape[1:])).numel()
        self.head = nn.Linear(n, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, x):
        return self.sm(self.head(self.flat(self.relu(self.norm(self.conv(x))))))


def _mlp(layernorm: bool = False):
    torch.manual_seed(0)
    return MLP(layernorm).eval(), {"x": torch.randn(9, 10, generator=torch.Generator().manual_seed(1))}


def _conv(conv: Callable[[], nn.Module], shape: tuple[int, ...], norm: Callable[[], nn.Module] | None = None):
    torch.manual_seed(0)
    model = ConvNet(conv(), shape, norm() if norm else None).eval()
    return model, {"x": torch.randn(*shape, generator=torch.Generator().manual_seed(1))}


def _widened(factory: Callable[[], tuple[nn.Module, dict]]) -> nn.Module:
    """The network of ``factory`` with more output channels in its first adapted layer: same module names, other
    shapes."""
    model = factory()[0]
    if isinstance(model, MLP):
        model.lin1, model.head = nn.Linear(20, 21), nn.Linear(21, 2)
        if isinstance(model.norm1, nn.LayerNorm):
            model.norm1 = nn.LayerNorm(21)
        return model
    conv = model.conv[0] if isinstance(model.conv, nn.Sequential) else model.conv
    wider = type(conv)(conv.in_channels, conv.out_channels + conv.groups, conv.kernel_size, stride=conv.stride,
                       padding=conv.padding, groups=conv.groups)
    model.conv = nn.Sequential(wider, nn.BatchNorm2d(wider.out_channels)) if isinstance(model.conv, nn.Sequential) \
        else wider
    if not isinstance(model.norm, nn.Identity):
        model.norm = type(model.norm)(wider.out_channels)
    return model


# ------------------------------------------------------------------------------------------------ tiny transformers
def _segformer_seg(hidden=(8, 16)):
    cfg = transformers.SegformerConfig(num_channels=1, num_encoder_blocks=2, hidden_sizes=list(hidden),
                                       num_attention_heads=[1, 2], sr_ratios=[4, 1], depths=[2, 1],
                                       patch_sizes=[7, 3], strides=[4, 2], mlp_ratios=[2, 2], decoder_hidden_size=8,
                                       initializer_range=0.3, num_labels=3)
    x = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(3))
    return transformers.SegformerForSemanticSegmentation(cfg).eval(), {"pixel_values": x}


# model name -> (factory, head module name, factory arguments of the same model with other widths)
TRANSFORMERS: dict[str, tuple[Callable, str, dict]] = {
    "vit": (partial(vit, classifier=True), "classifier", {"hidden": 24, "heads": 3}),
    "videomae": (partial(videomae, classifier=True), "classifier", {"hidden": 24, "heads": 3}),
    "segformer": (_segformer_seg, "decode_head.classifier", {"hidden": (12, 24)}),
    "monai-vit": (monai_vit, "classification_head", {"hidden": 24, "heads": 3}),
}


def _seeded(factory: Callable, **kwargs):
    torch.manual_seed(0)
    return factory(**kwargs)


# ------------------------------------------------------------------------------------------------ the table
@dataclass(frozen=True)
class Case:
    id: str
    model: Callable[[], tuple[nn.Module, dict]]
    config: Callable[..., object]
    head: str = "head"
    mergeable: bool = False
    identity: bool = True
    wider: Optional[Callable[[], nn.Module]] = None


def _cnn(id: str, factory: Callable[[], tuple[nn.Module, dict]], config: Callable[..., object],
         mergeable: bool = False) -> Case:
    return Case(id, factory, config, mergeable=mergeable, wider=partial(_widened, factory))


def _transformer(id: str, model: str, config: Callable[..., object]) -> Case:
    factory, head, wide = TRANSFORMERS[model]
    return Case(id, partial(_seeded, factory), config, head=head, identity=not id.startswith("vpt"),
                wider=lambda: _seeded(factory, **wide)[0])


def _ca(targets=("conv",), **kw):
    return partial(ConvAdapterConfig, target_modules=list(targets), **kw)


def _ssf(targets=("conv",), **kw):
    return partial(SSFConfig, target_modules=list(targets), **kw)


CASES = [
    _cnn("ca-conv1d-1ch", partial(_conv, lambda: nn.Conv1d(1, 1, 2), (9, 1, 10)), _ca()),
    _cnn("ca-conv1d-groups", partial(_conv, lambda: nn.Conv1d(8, 8, 3, groups=2), (9, 8, 10)), _ca()),
    _cnn("ca-conv2d-5to10", partial(_conv, lambda: nn.Conv2d(5, 10, 3), (9, 5, 3, 3)), _ca()),
    _cnn("ca-conv2d-1x1-1ch", partial(_conv, lambda: nn.Conv2d(1, 10, 1), (9, 1, 3, 3)), _ca()),
    _cnn("ca-conv2d-groups", partial(_conv, lambda: nn.Conv2d(16, 16, 3, groups=8), (2, 16, 3, 3)), _ca()),
    _cnn("ca-conv2d-valid-seq-dense", partial(_conv, lambda: nn.Conv2d(5, 10, 3, padding="valid"), (9, 5, 4, 4)),
         _ca(insertion="sequential", adapter_conv="dense", activation="prelu")),
    _cnn("ca-conv3d", partial(_conv, lambda: nn.Conv3d(5, 10, 3), (9, 5, 3, 3, 3)), _ca()),
    _cnn("ca-convT2d", partial(_conv, lambda: nn.ConvTranspose2d(5, 10, 2, stride=2), (9, 5, 3, 3)), _ca()),
    _cnn("ca-mlp", _mlp, _ca(("lin0", "lin1"))),
    _cnn("ca-mlp-layernorm-sequential", partial(_mlp, True), _ca(("lin0", "lin1"), insertion="sequential", gamma=2)),
    _cnn("ca-block-with-bn", partial(_conv, lambda: nn.Sequential(nn.Conv2d(5, 10, 3, padding=1), nn.BatchNorm2d(10)),
                                     (9, 5, 4, 4)), _ca(gamma=2)),
    _cnn("ssf-mlp", _mlp, _ssf(("lin0", "lin1")), True),
    _cnn("ssf-mlp-layernorm", partial(_mlp, True), _ssf(("norm0", "lin0", "norm1")), True),
    _cnn("ssf-conv1d-1ch", partial(_conv, lambda: nn.Conv1d(1, 1, 2), (9, 1, 10)), _ssf(), True),
    _cnn("ssf-conv2d-5to10-bn", partial(_conv, lambda: nn.Conv2d(5, 10, 3), (9, 5, 4, 4), lambda: nn.BatchNorm2d(10)),
         _ssf(("conv", "norm")), True),
    _cnn("ssf-conv2d-groups-nobias", partial(_conv, lambda: nn.Conv2d(16, 16, 3, groups=8, bias=False), (2, 16, 3, 3)),
         _ssf(), True),
    # SSF on the norm only: an instance norm would cancel a scale and shift on the conv before it
    _cnn("ssf-conv3d-instancenorm", partial(_conv, lambda: nn.Conv3d(5, 10, 3), (9, 5, 4, 4, 4),
                                            lambda: nn.InstanceNorm3d(10)), _ssf(("norm",)), True),
    _cnn("ssf-convT2d-groups", partial(_conv, lambda: nn.ConvTranspose2d(4, 6, 2, stride=2, groups=2), (9, 4, 3, 3)),
         _ssf(), True),
    _cnn("ssf-bitfit-conv2d-1x1", partial(_conv, lambda: nn.Conv2d(1, 10, 1), (9, 1, 3, 3)), _ssf(scale=False), True),
    _transformer("vpt-deep-vit", "vit", partial(VPTConfig, num_tokens=3)),
    _transformer("vpt-shallow-vit", "vit", partial(VPTConfig, variant="shallow", num_tokens=2)),
    _transformer("vpt-deep-videomae", "videomae", partial(VPTConfig, num_tokens=2, prompt_dropout=0.1)),
    _transformer("vpt-deep-segformer", "segformer", partial(VPTConfig, num_tokens=3)),
    _transformer("vpt-shallow-segformer", "segformer", partial(VPTConfig, variant="shallow", num_tokens=2)),
    _transformer("vpt-shallow-monai-vit", "monai-vit", partial(VPTConfig, variant="shallow", num_tokens=2)),
    _transformer("bn-sequential-vit", "vit", partial(BottleneckAdapterConfig, bottleneck_size=4)),
    _transformer("bn-parallel-videomae", "videomae",
                 partial(BottleneckAdapterConfig, insertion="parallel", bottleneck_size=3)),
    _transformer("bn-sequential-videomae", "videomae",
                 partial(BottleneckAdapterConfig, bottleneck_size=3, activation="gelu")),
    _transformer("bn-parallel-segformer", "segformer",
                 partial(BottleneckAdapterConfig, insertion="parallel", scale=0.5)),
    _transformer("bn-sequential-monai-vit", "monai-vit",
                 partial(BottleneckAdapterConfig, bottleneck_size=2, activation="tanh")),
]
MERGEABLE = [c for c in CASES if c.mergeable]
ids = [c.id for c in CASES]
BY_ID = {c.id: c for c in CASES}
PREFIXES = ("conv_adapter_", "ssf_", "vpt_", "bottleneck_")


def _run(model: nn.Module, inputs: dict) -> torch.Tensor:
    return tokens(model(**inputs))


def _adapter_params(model: nn.Module, adapter: str | None = None) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if any(t in n for t in PREFIXES)
            and (adapter is None or n.endswith(f".{adapter}") or f".{adapter}." in n)}


def _perturb(model: nn.Module, seed: int = 0, scale: float = 0.3) -> None:
    """Random adapter weights (and trainable copies): the adapted network then differs from the base."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g).to(p.dtype))


def _loss(out: torch.Tensor) -> torch.Tensor:
    return (out - 1.0).square().mean()


def _train(model: nn.Module, inputs: dict, steps: int = 3, lr: float = 0.5) -> None:
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for m in model.modules():  # frozen batch norms (Segformer's decode head) would still update running statistics
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    for _ in range(steps):
        opt.zero_grad()
        _loss(_run(model, inputs)).backward()
        opt.step()
    model.eval()


def _differs(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Clearly different, relative to the output's size (the tiny models' outputs are small: 1e-4 for Segformer)."""
    return bool((a.float() - b.float()).abs().max() > 1e-3 * b.float().abs().max())


def _close_to_base(out: torch.Tensor, base: torch.Tensor) -> None:
    """Equal up to the last bit that Linear's kernel choice may flip (it depends on whether weights need gradients
    and on the input's memory layout)."""
    torch.testing.assert_close(out, base, atol=1e-6, rtol=1e-5)


def _cast_inputs(inputs: dict, dtype: torch.dtype) -> dict:
    return {k: v.to(dtype) for k, v in inputs.items()}


# ------------------------------------------------------------------------------------------------ save / load
@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "pickle"])
@pytest.mark.parametrize("head", [False, True], ids=["adapter", "adapter+head"])
@pytest.mark.parametrize("case", CASES, ids=ids)
def test_save_load_roundtrip(case, safe, head, tmp_path):
    model, x = case.model()
    with torch.no_grad():
        base_out = _run(model, x)
    config = case.config(init_weights=False, modules_to_save=[case.head] if head else None)
    torch.manual_seed(1)
    pm = get_peft_model(model, config).eval()
    if head:
        _perturb(pm)
    with torch.no_grad():
        out = _run(pm, x)
    assert _differs(out, base_out)
    pm.save_pretrained(tmp_path, safe_serialization=safe)
    files = {p.name for p in tmp_path.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors" if safe else "adapter_model.bin"} <= files
    assert not {"model.safetensors", "config.json"} & files
    fresh, _ = case.model()
    torch.manual_seed(54321)
    loaded = PeftModel.from_pretrained(fresh, tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(_run(loaded, x), out)
    before, after = pm.state_dict(), loaded.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    with torch.no_grad():  # the PeftModel itself deep-copies and pickles
        assert torch.equal(_run(copy.deepcopy(pm), x), out)
        if not isinstance(fresh, transformers.PreTrainedModel):  # transformers' output-capturing hooks do not pickle
            assert torch.equal(_run(pickle.loads(pickle.dumps(pm)), x), out)


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_low_cpu_mem_usage(case, tmp_path):
    model, x = case.model()
    pm = get_peft_model(model, case.config(init_weights=False)).eval()
    with torch.no_grad():
        out = _run(pm, x)
    pm.save_pretrained(tmp_path)
    fresh, _ = case.model()
    loaded = PeftModel.from_pretrained(fresh, tmp_path, low_cpu_mem_usage=True).eval()
    assert {p.device.type for p in loaded.parameters()} == {"cpu"}
    loaded.load_adapter(tmp_path, adapter_name="other", low_cpu_mem_usage=True)
    assert {p.device.type for p in loaded.parameters()} == {"cpu"}
    loaded.set_adapter("other")
    with torch.no_grad():
        assert torch.equal(_run(loaded, x), out)
    bare, _ = case.model()
    inject_adapter_in_model(case.config(), bare, low_cpu_mem_usage=True)
    assert "meta" in {p.device.type for p in bare.parameters()}


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_load_into_a_network_with_other_widths_names_key_and_shapes(case, tmp_path):
    model, _ = case.model()
    get_peft_model(model, case.config()).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"other channel counts: \S+ \(file \([\d, ]+\), model \([\d, ]+\)\)"):
        PeftModel.from_pretrained(case.wider(), tmp_path)


# ------------------------------------------------------------------------------------------------ precision
@pytest.mark.parametrize("autocast_adapter_dtype", [True, False])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=ids)
def test_half_precision_model(case, dtype, autocast_adapter_dtype):
    model, x = case.model()
    model = model.to(dtype)
    pm = get_peft_model(model, case.config(init_weights=False), autocast_adapter_dtype=autocast_adapter_dtype).eval()
    pm.add_adapter("other", case.config(), autocast_adapter_dtype=autocast_adapter_dtype)
    checked = 0
    for layer in (m for m in pm.modules() if isinstance(m, BaseTunerLayer)):
        # adapters follow the base layer's dtype unless peft autocasts them; a layer without any tensor (a norm
        # without affine parameters or statistics) has no dtype to follow: its adapter stays float32
        has_dtype = any(t.is_floating_point() for t in [*layer.get_base_layer().parameters(),
                                                        *layer.get_base_layer().buffers()])
        expected = torch.float32 if autocast_adapter_dtype or not has_dtype else dtype
        params = _adapter_params(layer)
        if params:  # the last block of a VPT-shallow window holds no prompts
            assert {p.dtype for p in params.values()} == {expected}
            checked += 1
    assert checked
    out = _run(pm, _cast_inputs(x, dtype))
    assert out.dtype == dtype and torch.isfinite(out).all()
    if case.mergeable:  # peft: merging in half precision "should simply work"
        for safe in (False, True):
            pm.merge_adapter(safe_merge=safe)
            assert torch.isfinite(_run(pm, _cast_inputs(x, dtype))).all()
            pm.unmerge_adapter()
        assert torch.isfinite(_run(pm.merge_and_unload(), _cast_inputs(x, dtype))).all()


@pytest.mark.parametrize("half", ["base", "adapters"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=ids)
def test_mixed_precision_base_and_adapters(case, dtype, half):
    """A half-precision model with float32 adapters runs, and the reverse; both stay close to float32."""
    model, x = case.model()
    pm = get_peft_model(model, case.config(init_weights=False)).eval()
    with torch.no_grad():
        ref = _run(pm, x)
        for name, tensor in [*pm.named_parameters(), *pm.named_buffers()]:
            if tensor.is_floating_point() and (half == "base") != any(t in name for t in PREFIXES):
                tensor.data = tensor.data.to(dtype)
        out = _run(pm, _cast_inputs(x, dtype) if half == "base" else x)
    assert out.dtype == (dtype if half == "base" else torch.float32)
    assert torch.allclose(out.float(), ref, atol=0.05, rtol=0.05), (out.float() - ref).abs().max()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=ids)
def test_autocast_forward_and_backward(case, dtype):
    model, x = case.model()
    pm = get_peft_model(model, case.config(init_weights=False))
    with torch.autocast("cpu", dtype=dtype):
        out = _run(pm, x)
    out.float().sum().backward()
    grads = [p.grad for p in _adapter_params(pm).values()]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


# ------------------------------------------------------------------------------------------------ training state
@pytest.mark.parametrize("case", CASES, ids=ids)
def test_only_adapter_parameters_and_the_saved_head_train(case):
    model, x = case.model()
    pm = get_peft_model(model, case.config(init_weights=False, modules_to_save=[case.head]))
    before = {n: p.detach().clone() for n, p in pm.named_parameters()}
    opt = torch.optim.SGD(pm.parameters(), lr=0.5)
    pm.train()
    for _ in range(3):
        opt.zero_grad()
        _loss(_run(pm, x)).backward()
        opt.step()
    for name, p in pm.named_parameters():
        if any(t in name for t in PREFIXES) or "modules_to_save" in name:
            assert p.requires_grad and not torch.allclose(p, before[name], atol=1e-6, rtol=1e-6), name
        else:
            assert not p.requires_grad and torch.equal(p, before[name]), name


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_disable_and_enable_adapters(case):
    model, x = case.model()
    with torch.no_grad():
        base_out = _run(model, x)
    pm = get_peft_model(model, case.config()).eval()
    with torch.no_grad():
        init = _run(pm, x)
    if case.identity:
        _close_to_base(init, base_out)
    else:  # prompts are not the identity (test_vpt.py checks by how much)
        assert not torch.equal(init, base_out)
    _train(pm, x)
    with torch.no_grad():
        trained = _run(pm, x)
        with pm.disable_adapter():
            disabled = _run(pm, x)
        enabled_again = _run(pm, x)
    assert not torch.allclose(trained, init)
    _close_to_base(disabled, base_out)
    assert torch.equal(enabled_again, trained)
    assert all(p.requires_grad for p in _adapter_params(pm).values())  # trainability restored after the context


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_delete_adapter_leaves_no_state(case):
    model, x = case.model()
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


def _combined(layer: nn.Module, base: torch.Tensor, y1: torch.Tensor, y2: torch.Tensor) -> Optional[torch.Tensor]:
    """What a layer with adapters a1 and a2 active outputs, from its outputs with each alone (None: no layer rule)."""
    if isinstance(layer, (ConvAdapterLayer, BottleneckAdapterLayer)):  # contributions add up
        return base + (y1 - base) + (y2 - base)
    if isinstance(layer, SSFLayer):  # scales multiply, shifts add
        s = [layer.ssf_scale[a] if a in layer.ssf_scale else torch.ones(layer.channels) for a in ("a1", "a2")]
        t = [layer.ssf_shift[a] if a in layer.ssf_shift else torch.zeros(layer.channels) for a in ("a1", "a2")]
        return base * layer._view(s[0] * s[1], base.dim()) + layer._view(t[0] + t[1], base.dim())
    assert isinstance(layer, VPTLayer), type(layer)  # prompts of both side by side: checked on the model output
    return None


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_several_active_adapters_combine_in_any_order(case):
    model, x = case.model()
    pm = get_peft_model(model, case.config(init_weights=False), adapter_name="a1").eval()
    torch.manual_seed(7)
    pm.add_adapter("a2", case.config(init_weights=False))
    _perturb(pm.base_model, seed=3, scale=0.05)  # only active adapters train: a1
    pm.set_adapter("a2")
    _perturb(pm.base_model, seed=4, scale=0.05)
    layers = [m for m in pm.modules() if isinstance(m, BaseTunerLayer)]
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
    ruled = 0
    for m, base, y1, y2, y12 in zip(layers, base_layer_outs, layer_outs[("a1",)], layer_outs[("a2",)],
                                    layer_outs[("a1", "a2")]):
        expected = _combined(m, base, y1, y2)
        if expected is not None:
            torch.testing.assert_close(y12, expected, msg=type(m).__name__)
            ruled += 1
    assert ruled or case.id.startswith("vpt")


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_set_requires_grad(case):
    model, _ = case.model()
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


@pytest.mark.parametrize("case", [BY_ID[i] for i in ("ca-conv2d-5to10", "ssf-conv2d-5to10-bn", "vpt-deep-vit")],
                         ids=lambda c: c.id)
def test_modules_to_save_with_several_active_adapters(case):
    model, x = case.model()
    pm = get_peft_model(model, case.config(modules_to_save=[case.head]), adapter_name="a1").eval()
    pm.add_adapter("a2", case.config())
    pm.base_model.set_adapter(["a1", "a2"])  # different modules_to_save: fine
    with torch.no_grad():
        _run(pm, x)
    pm.add_adapter("a3", case.config(modules_to_save=[case.head]))
    with pytest.raises(ValueError, match="Only one adapter can be set at a time for ModulesToSaveWrapper"):
        pm.base_model.set_adapter(["a1", "a3"])


@pytest.mark.parametrize("case", [BY_ID[i] for i in ("ca-conv2d-5to10", "vpt-deep-vit", "bn-parallel-segformer")],
                         ids=lambda c: c.id)
def test_each_adapter_keeps_its_own_copy_of_the_saved_head(case):
    model, x = case.model()
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


# ------------------------------------------------------------------------------------------------ merging
@pytest.mark.parametrize("case", [c for c in CASES if not c.mergeable], ids=lambda c: c.id)
def test_unmergeable_methods_refuse_to_merge_and_unload_to_the_base(case):
    model, x = case.model()
    with torch.no_grad():
        base_out = _run(model, x)
    pm = get_peft_model(model, case.config(init_weights=False))
    for call in (pm.merge_adapter, pm.merge_and_unload):
        with pytest.raises(ValueError, match="cannot be merged"):
            call()
    assert not any(m.merged for m in pm.modules() if isinstance(m, BaseTunerLayer))
    with torch.no_grad():
        _close_to_base(_run(pm.unload(), x), base_out)


@pytest.mark.parametrize("case", MERGEABLE, ids=[c.id for c in MERGEABLE])
def test_merge_unmerge_and_unload(case, tmp_path):
    model, x = case.model()
    with torch.no_grad():
        base_out = _run(model, x)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    pm = get_peft_model(model, case.config(init_weights=False)).eval()
    with torch.no_grad():
        out = _run(pm, x)
        pm.merge_adapter()
        assert torch.allclose(_run(pm, x), out, atol=1e-5)
        with pytest.warns(UserWarning, match="already merged"):
            pm.merge_adapter()
        with pm.disable_adapter():  # disabling a merged adapter unmerges it
            assert torch.allclose(_run(pm, x), base_out, atol=1e-5)
        pm.merge_adapter(safe_merge=True)
        pm.unmerge_adapter()
        assert torch.allclose(_run(pm, x), out, atol=1e-5)
        restored = pm.get_base_model().state_dict()
        for key, value in base_state.items():
            real = next(k for k in restored if k.replace(".base_layer", "") == key)
            assert torch.allclose(restored[real], value, rtol=1e-6, atol=1e-7), key
        merged = pm.merge_and_unload()
        assert not any(isinstance(m, BaseTunerLayer) for m in merged.modules())
        assert torch.allclose(_run(merged, x), out, atol=1e-5)
        assert torch.allclose(_run(pickle.loads(pickle.dumps(merged)), x), out, atol=1e-5)
    save_file(merged.state_dict(), str(tmp_path / "merged.safetensors"))  # merged tensors are contiguous


@pytest.mark.parametrize("groups", [1, 2])
def test_ssf_merges_a_float64_layer_to_float64_precision(groups):
    """The merge computes in the layer's precision (at least float32): a float64 model merged gives its unmerged output
    to ~1e-15, not float32's ~1e-7 (a float32 merge of a float64 layer was off by 5e-8 here)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1, groups=groups)).double()
    pm = get_peft_model(model, SSFConfig(target_modules=["0"], init_weights=False)).eval()
    x = torch.randn(2, 16, 5, 5, dtype=torch.float64)
    base_weight = pm.base_model.model[0].get_base_layer().weight.clone()
    with torch.no_grad():
        out = pm(x)
        pm.merge_adapter()
        torch.testing.assert_close(pm(x), out, rtol=0.0, atol=1e-12)
        pm.unmerge_adapter()
    torch.testing.assert_close(pm.base_model.model[0].get_base_layer().weight, base_weight, rtol=0.0, atol=1e-15)


@pytest.mark.parametrize("case", MERGEABLE, ids=[c.id for c in MERGEABLE])
def test_safe_merge_checks_the_merged_tensors_and_changes_nothing(case):
    model, x = case.model()
    pm = get_peft_model(model, case.config(init_weights=False))
    with torch.no_grad():
        for p in _adapter_params(pm).values():
            p[0] = torch.nan
    before = {k: v.clone() for k, v in pm.state_dict().items()}
    with pytest.raises(ValueError, match="NaNs detected in the merged weights. The adapter default seems to be broken"):
        pm.merge_and_unload(safe_merge=True)
    after = pm.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before if torch.isfinite(before[k]).all())
    assert not any(m.merged for m in pm.modules() if isinstance(m, BaseTunerLayer))


@pytest.mark.parametrize("case", MERGEABLE, ids=[c.id for c in MERGEABLE])
def test_several_adapters_merge_in_any_order(case):
    model, x = case.model()
    with torch.no_grad():
        base_out = _run(model, x)
    torch.manual_seed(0)
    pm = get_peft_model(model, case.config(init_weights=False), adapter_name="a1").eval()
    pm.add_adapter("a2", case.config(init_weights=False))
    with torch.no_grad():
        pm.set_adapter("a2")
        only_a2 = _run(pm, x)
        pm.base_model.set_adapter(["a1", "a2"])
        combined = _run(pm, x)
        sequential = copy.deepcopy(pm)
        pm.merge_adapter(["a1", "a2"])
        assert torch.allclose(_run(pm, x), combined, atol=1e-5)
        sequential.merge_adapter(["a2"])
        sequential.merge_adapter(["a1"])
        assert torch.allclose(_run(sequential, x), combined, atol=1e-5)
        sequential.unmerge_adapter()
        with sequential.disable_adapter():
            assert torch.allclose(_run(sequential, x), base_out, atol=1e-5)
        pm.unmerge_adapter()
        assert torch.allclose(_run(pm.merge_and_unload(adapter_names=["a2"]), x), only_a2, atol=1e-5)


@pytest.mark.parametrize("case", [c for c in MERGEABLE if "bitfit" not in c.id], ids=lambda c: c.id)
def test_unmerge_with_a_zero_scale_restores_the_base_weights(case):
    """Dividing by a scale of 0, or by one so small that the merged weights underflow, cannot undo a merge: those
    channels come back exactly from a copy the merge kept; the others by division (to within rounding)."""
    model, x = case.model()
    with torch.no_grad():
        base_out = _run(model, x)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    pm = get_peft_model(model, case.config(init_weights=False)).eval()
    with torch.no_grad():
        for name, p in _adapter_params(pm).items():
            if "ssf_scale" in name:
                p[0] = 0.0
                if len(p) > 2:
                    p[1], p[-1] = 1e-30, 1e-42  # tiny but invertible, underflowing
        adapted = _run(pm, x)
        pm.merge_adapter()
        assert torch.allclose(_run(pm, x), adapted, atol=1e-5)
        pm.unmerge_adapter()
        with pm.disable_adapter():
            assert torch.allclose(_run(pm, x), base_out, atol=1e-6)
    restored = pm.get_base_model().state_dict()
    for key, value in base_state.items():
        real = next(k for k in restored if k.replace(".base_layer", "") == key)
        assert torch.allclose(restored[real], value, rtol=1e-6, atol=0), key
        layer = pm.get_base_model().get_submodule(real.rsplit(".", 2)[0]) if ".base_layer." in real else None
        if layer is not None and key.endswith("weight"):  # channels 0 and -1 are exactly the base's again
            rows, base_rows = layer._channel_first(restored[real]), layer._channel_first(value)
            assert torch.equal(rows[0], base_rows[0]) and torch.equal(rows[-1], base_rows[-1]), key


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_in_and_out_features_are_exposed(case):
    model, _ = case.model()
    pm = get_peft_model(model, case.config())
    for m in pm.modules():
        if isinstance(m, BaseTunerLayer):
            base = m.get_base_layer()
            expected_out = getattr(base, "out_channels", getattr(base, "out_features", None))
            if expected_out is not None:
                assert m.out_features == expected_out
            assert isinstance(m.in_features, int) and isinstance(m.out_features, int)
