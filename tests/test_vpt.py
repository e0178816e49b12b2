"""Visual Prompt Tuning: where the prompts go (ViT, VideoMAE, MONAI ViT, Segformer), the initial behaviour, errors."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import get_peft_model

from monai_peft import VPTConfig
from monai_peft.tuners.vpt import VPTLayer, default_vpt_targets
from tiny_transformers import MODELS, make, tokens


def _prompts(pm, name: str, adapter: str = "default") -> torch.Tensor:
    return pm.base_model.model.get_submodule(name).vpt_prompts[adapter]


def _with_prompts(x: torch.Tensor, p: torch.Tensor, at: int) -> torch.Tensor:
    return torch.cat([x[:, :at], p.expand(x.shape[0], -1, -1), x[:, at:]], dim=1)


def _without(x: torch.Tensor, at: int, n: int) -> torch.Tensor:
    return torch.cat([x[:, :at], x[:, at + n:]], dim=1)


def _run_blocks(x, blocks, names, pm, variant, at):
    """The VPT paper's token flow, written out on the plain blocks: deep = new prompts before each block, dropped
    after it; shallow = prompts before the first block, dropped after the last."""
    n = _prompts(pm, names[0]).shape[0]
    for i, (block, name) in enumerate(zip(blocks, names)):
        if variant == "deep" or i == 0:
            x = _with_prompts(x, _prompts(pm, name), at)
        x = block(x)
        x = x[0] if isinstance(x, tuple) else x
        if variant == "deep" or i == len(blocks) - 1:
            x = _without(x, at, n)
    return x


@pytest.mark.parametrize("variant", ["deep", "shallow"])
def test_vit_prompts_go_after_the_class_token_without_position_embedding(variant):
    model, inputs = make("vit-wide-nobias")
    base = copy.deepcopy(model)
    pm = get_peft_model(model, VPTConfig(variant=variant, num_tokens=3))
    assert pm.peft_config["default"].num_prefix_tokens == 1, "ViT has a class token"
    names = [f"layers.{i}" for i in range(3)]
    with torch.no_grad():
        x = base.embeddings(inputs["pixel_values"])  # class token + position embeddings, as without prompts
        expected = base.layernorm(_run_blocks(x, base.layers, names, pm, variant, at=1))
        out = pm(**inputs)
    torch.testing.assert_close(out.last_hidden_state, expected)
    torch.testing.assert_close(out.pooler_output, base.pooler(expected))  # the pooler still reads the class token


@pytest.mark.parametrize("variant", ["deep", "shallow"])
def test_videomae_without_class_token_prompts_lead_the_sequence(variant):
    model, inputs = make("videomae")
    base = copy.deepcopy(model)
    pm = get_peft_model(model, VPTConfig(variant=variant, num_tokens=2))
    assert pm.peft_config["default"].num_prefix_tokens == 0
    names = ["encoder.layer.0", "encoder.layer.1"]
    with torch.no_grad():
        x = base.embeddings(inputs["pixel_values"], None)
        expected = _run_blocks(x, base.encoder.layer, names, pm, variant, at=0)
        torch.testing.assert_close(pm(**inputs).last_hidden_state, expected)


@pytest.mark.parametrize("variant", ["deep", "shallow"])
def test_monai_vit_classification_reads_the_class_token(variant):
    model, inputs = make("monai-vit")
    base = copy.deepcopy(model)
    pm = get_peft_model(model, VPTConfig(variant=variant, num_tokens=4))
    with torch.no_grad():
        x = base.patch_embedding(inputs["x"])
        x = torch.cat([base.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = base.norm(_run_blocks(x, base.blocks, ["blocks.0", "blocks.1"], pm, variant, at=1))
        logits, hidden = pm(**inputs)
    torch.testing.assert_close(logits, base.classification_head(x[:, 0]))
    if variant == "deep":  # every block hands on the image tokens alone
        assert [tuple(h.shape) for h in hidden] == [(2, 17, 16)] * 2


def test_segformer_prompts_join_the_key_value_sequence():
    """In a stage without spatial reduction, joining prompts to key/value is what transformers' own attention does
    for the image tokens when it runs on [image tokens, prompts]."""
    model, inputs = make("segformer")  # stage 1: sr=1
    pm = get_peft_model(model, VPTConfig(num_tokens=3, init_weights=False))
    assert default_vpt_targets(model)[0] == "stages.0.blocks.0.attention"
    layer = pm.base_model.model.stages[1].blocks[0].attention
    attn = layer.get_base_layer()
    h = torch.randn(2, 4 * 4, 16)
    with torch.no_grad():
        joined = attn(torch.cat([h, layer.vpt_prompts["default"].expand(2, -1, -1)], 1), 4, 4)[0][:, :16]
        torch.testing.assert_close(layer(h, 4, 4)[0], joined)
        stage0 = pm.base_model.model.stages[0].blocks[0].attention  # sr=4: our code path without prompts
        h0 = torch.randn(2, 64, 8)
        with pm.disable_adapter():
            ref = stage0.get_base_layer()(h0, 8, 8)[0]
        from monai_peft.tuners.vpt.layer import segformer_attention_with_prompts

        torch.testing.assert_close(segformer_attention_with_prompts(stage0.get_base_layer(), h0, 8, 8, None)[0], ref)
        assert not torch.allclose(stage0(h0, 8, 8)[0], ref, atol=1e-4)


def test_segformer_shallow_prompts_only_the_first_block_of_each_stage():
    model, _ = make("segformer-3stage")  # depths (1, 2, 1)
    pm = get_peft_model(model, VPTConfig(variant="shallow"))
    prompted = sorted(n for n, m in pm.base_model.model.named_modules() if isinstance(m, VPTLayer))
    assert prompted == [f"stages.{i}.blocks.0.attention" for i in range(3)]


# ------------------------------------------------------------------------------------------ initial behaviour
@pytest.mark.parametrize("variant", ["deep", "shallow"])
@pytest.mark.parametrize("name", list(MODELS))
def test_prompts_are_not_the_identity_at_init(name, variant):
    model, inputs = make(name)
    with torch.no_grad():
        ref = tokens(model(**inputs))
    try:
        pm = get_peft_model(model, VPTConfig(variant=variant))
    except ValueError as e:
        assert name == "monai-unetr" and variant == "shallow" and "use variant='deep'" in str(e)
        return
    with torch.no_grad():
        out = tokens(pm(**inputs))
    assert out.shape == ref.shape
    assert (out - ref).abs().max() > 1e-4, f"VPT-{variant} on {name} left the output unchanged"
    with pm.disable_adapter(), torch.no_grad():
        assert torch.equal(tokens(pm(**inputs)), ref)


def _slot_mix(a_base, o_bias, logits_real, logit_prompt, n_prompts):
    """Attention output with ``n`` extra slots of logit ``s_p`` and (projected) value ``o_bias``: the image-token
    part keeps its softmax weights relative to each other, the slots take ``n e^s_p / (Z + n e^s_p)``."""
    z = torch.logsumexp(logits_real, dim=-1, keepdim=True)
    w_slots = torch.sigmoid(torch.log(torch.tensor(float(n_prompts))) + logit_prompt - z)
    return (1 - w_slots) * a_base + w_slots * o_bias


def test_zero_prompts_in_segformer_pull_attention_towards_the_value_bias():
    """Documented claim: a zero prompt has key b_k and value b_v, so each head's output moves to
    b_v + Z / (Z + P) (a - b_v) with Z = sum_j exp(q . (k_j - b_k) / sqrt(d))."""
    model, _ = make("segformer")  # 1 head in stage 0
    pm = get_peft_model(model, VPTConfig(num_tokens=5, init_weights="zeros"))
    layer = pm.base_model.model.stages[0].blocks[0].attention
    attn = layer.get_base_layer()
    h = torch.randn(2, 64, 8)
    with torch.no_grad():
        a = attn(h, 8, 8)[0]
        q = attn.q_proj(h)
        k = attn.k_proj(attn.sequence_reduction(h, 8, 8)) - attn.k_proj.bias
        logits = q @ k.transpose(1, 2) * attn.scaling
        o_bias = attn.o_proj(attn.v_proj.bias)
        expected = _slot_mix(a, o_bias, logits, torch.zeros(()), 5)
        torch.testing.assert_close(layer(h, 8, 8)[0], expected)


def test_zero_prompts_in_vit_are_slots_holding_the_layernorm_bias():
    """Documented claim (sequence form): a zero prompt enters the attention as LN(0) = beta, the LayerNorm's bias,
    i.e. a slot with key W_k beta + b_k and value W_v beta + b_v; the image tokens' MLP never sees it."""
    model, inputs = make("vit", seed=1)
    model = type(model)(model.config.__class__(**{**model.config.to_dict(), "num_attention_heads": 1})).eval()
    block = model.layers[0]
    with torch.no_grad():
        block.layernorm_before.bias.normal_()
    base = copy.deepcopy(block)
    pm = get_peft_model(model, VPTConfig(num_tokens=3, init_weights="zeros", target_modules=["layers.0"]))
    x = torch.randn(2, 17, 16)
    with torch.no_grad():
        hn = base.layernorm_before(x)
        at = base.attention
        a = at(hn)[0]
        beta = base.layernorm_before.bias
        logits = at.q_proj(hn) @ at.k_proj(hn).transpose(1, 2) * at.scaling
        logit_p = (at.q_proj(hn) @ at.k_proj(beta)).unsqueeze(-1) * at.scaling
        attn_out = _slot_mix(a, at.o_proj(at.v_proj(beta)), logits, logit_p, 3)
        h1 = x + attn_out
        expected = h1 + base.mlp(base.layernorm_after(h1))
        torch.testing.assert_close(pm.base_model.model.layers[0](x), expected)


# ----------------------------------------------------------------------------------------------- masks, windows
def test_deep_prompts_pass_monai_attention_masks():
    from monai.networks.blocks import TransformerBlock

    class Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList(TransformerBlock(16, 32, 2) for _ in range(2))

        def forward(self, x, mask):
            for b in self.blocks:
                x = b(x, attn_mask=mask)
            return x

    torch.manual_seed(0)
    pm = get_peft_model(Encoder().eval(), VPTConfig(num_tokens=3))
    x, mask = torch.randn(2, 6, 16), torch.ones(2, 6)
    mask[:, 4:] = 0
    y = torch.randn(2, 6, 16)
    y[:, :4] = x[:, :4]
    with torch.no_grad():
        a, b = pm(x, mask), pm(y, mask)
    torch.testing.assert_close(a[:, :4], b[:, :4])  # masked tokens stay invisible, prompts are seen
    with pm.disable_adapter(), torch.no_grad():
        assert not torch.allclose(pm(x, mask)[:, :4], a[:, :4])
    pm2 = get_peft_model(Encoder().eval(), VPTConfig(variant="shallow"))
    with pytest.raises(ValueError, match="use variant='deep' with attention masks"):
        pm2(x, mask)


def test_shallow_adapters_on_one_block_list_share_their_window():
    model, inputs = make("vit-wide-nobias")
    pm = get_peft_model(model, VPTConfig(variant="shallow"), adapter_name="a")
    pm.add_adapter("b", VPTConfig(variant="shallow", num_tokens=2))
    pm.add_adapter("d", VPTConfig(variant="deep", num_tokens=1, target_modules=["layers.1"]))
    with pytest.raises(ValueError, match="adapter 'a' spans layers.0 .. layers.2"):
        pm.add_adapter("c", VPTConfig(variant="shallow", target_modules=["layers.0", "layers.1"]))
    assert "c" not in pm.peft_config
    pm.base_model.set_adapter(["a", "b", "d"])
    with torch.no_grad():
        out = pm(**inputs).last_hidden_state
    assert out.shape == (2, 17, 24)


# ------------------------------------------------------------------------------------------------- bad input
def test_a_network_without_token_blocks_is_an_error_naming_it():
    from monai.networks.nets import SegResNet

    def cnn():
        return SegResNet(spatial_dims=2, init_filters=8, blocks_down=(1, 1), blocks_up=(1,), out_channels=2)

    with pytest.raises(ValueError, match="SegResNet contains no transformer block that takes a token sequence"):
        get_peft_model(cnn(), VPTConfig())
    with pytest.raises(TypeError, match=r"VPT cannot prompt 'down_layers.1' \(Sequential\): it is not a transformer"):
        get_peft_model(cnn(), VPTConfig(target_modules=["down_layers.1"]))
    model, _ = make("segformer")
    with pytest.raises(TypeError, match=r"'stages.0.blocks.0' \(SegformerLayer\).*target its 'attention'"):
        get_peft_model(model, VPTConfig(target_modules=["stages.0.blocks.0"]))


def test_bad_options_merge_and_state_dict_injection_are_refused():
    for bad in (dict(variant="medium"), dict(num_tokens=0), dict(prompt_dropout=1.0), dict(init_weights="ones"),
                dict(num_prefix_tokens=-1)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            VPTConfig(**bad)
    model, inputs = make("vit")
    pm = get_peft_model(model, VPTConfig())
    with pytest.raises(ValueError, match="cannot be merged"):
        pm.merge_and_unload()
    from peft import inject_adapter_in_model

    with pytest.raises(ValueError, match="not from state_dict keys"):
        inject_adapter_in_model(VPTConfig(), make("vit")[0], state_dict={"layers.0.vpt_prompts": torch.zeros(1)})
    plain = pm.unload()
    assert not any(isinstance(m, VPTLayer) for m in plain.modules())


@pytest.mark.parametrize("variant", ["deep", "shallow"])
def test_adapt_vpt_is_the_peft_method_on_every_block(variant):
    from monai.networks.nets import SegResNet

    from monai_peft import adapt

    model, inputs = make("segformer")
    torch.manual_seed(0)
    ours = adapt(copy.deepcopy(model), "vpt", variant=variant, num_tokens=2)
    torch.manual_seed(0)
    plain = get_peft_model(copy.deepcopy(model), VPTConfig(variant=variant, num_tokens=2))
    mine, theirs = ours.state_dict(), plain.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    with pytest.raises(ValueError, match="SegResNet contains no transformer block"):
        adapt(SegResNet(spatial_dims=2, init_filters=8, blocks_down=(1, 1), blocks_up=(1,)), "vpt")
