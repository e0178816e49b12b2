"""Segformer backbone, LoRA target patterns, multi-task adapters (identity, isolation, switching), predictor."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import transformers

from monai_peft.echo import (LORA_TARGETS, EchoBackbone, EchoPredictor, MultiTaskEchoModel, echo_lora_config, fit,
                             get_task, load_backbone, load_backbone_weights, lora_target_modules, render_frame,
                             random_heart, save_backbone, segformer_config)

TINY = {"hidden_sizes": [8, 16, 32, 64], "decoder_hidden_size": 16, "num_attention_heads": [1, 1, 2, 2]}
SMALL_HEAD = {"conv_channels": [8, 16, 16], "fc_features": [32, 16]}


def tiny_backbone(seed: int = 0) -> EchoBackbone:
    torch.manual_seed(seed)
    return EchoBackbone(segformer_config("b0", **TINY)).eval()


@pytest.fixture(scope="module")
def backbone_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("echo") / "backbone"
    save_backbone(tiny_backbone(), d, extra={"image_size": 64})
    return d


def _x(seed: int = 1, n: int = 2, size: int = 64) -> torch.Tensor:
    return torch.rand(n, 1, size, size, generator=torch.Generator().manual_seed(seed))


def _randomise_lora(model: torch.nn.Module, task: str, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if f"lora_B.{task}." in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def test_mit_variants_and_grayscale_input():
    b0 = EchoBackbone(segformer_config("b0"))
    n0 = sum(p.numel() for p in b0.encoder.parameters())
    assert 3.2e6 < n0 < 3.8e6  # MiT-B0 encoder: 3.7M with RGB input
    first_conv = next(m for m in b0.encoder.modules() if isinstance(m, torch.nn.Conv2d))
    assert first_conv.in_channels == 1 and first_conv.kernel_size == (7, 7)  # overlapping patch embedding
    assert segformer_config("MiT-B2").hidden_sizes == [64, 128, 320, 512]
    with pytest.raises(ValueError, match="variant"):
        segformer_config("b7")
    feats = tiny_backbone()(_x())
    assert feats.shape == (2, 4 * 16, 16, 16)


def test_lora_targets_match_installed_transformers():
    bb = tiny_backbone()
    attn = lora_target_modules(bb, "attention")
    n_blocks = sum(segformer_config("b0", **TINY).depths)
    assert len(attn) == 4 * n_blocks
    major = int(transformers.__version__.split(".")[0])
    leaf = {n.rsplit(".", 1)[-1] for n in attn}
    if major >= 5:
        assert leaf == {"q_proj", "k_proj", "v_proj", "o_proj"}
    everything = lora_target_modules(bb, "all")
    assert set(attn) < set(everything)
    if major >= 5:
        assert {"fc1", "fc2", "proj", "sequence_reduction"} <= {n.rsplit(".", 1)[-1] for n in everything}
    assert sum(n.startswith("neck.proj.") for n in everything) == 4
    # the peft regexes select exactly these modules when the backbone is nested (as in a PeftModel)
    assert all(re.fullmatch(LORA_TARGETS["attention"], "base_model.model." + n) for n in attn)
    with pytest.raises(ValueError, match="layers"):
        lora_target_modules(bb, "mlp")


def test_adapters_are_identity_at_init(backbone_dir):
    bb, _ = load_backbone(backbone_dir)
    x = _x()
    with torch.no_grad():
        ref = bb.eval()(x)
    model = MultiTaskEchoModel(bb).eval()
    model.add_task(get_task("view", **SMALL_HEAD), echo_lora_config("all", r=4))
    model.add_task(get_task("segmentation"), echo_lora_config("attention", r=2))
    for task in ("view", "segmentation"):
        model.set_task(task)
        with torch.no_grad():
            assert torch.equal(model.body(x), ref)
            assert torch.equal(model(x), model.heads[task](ref))
    assert model(x).shape == (2, 4, 64, 64)


def test_only_active_adapter_and_head_train(backbone_dir):
    model = MultiTaskEchoModel(load_backbone(backbone_dir)[0])
    model.add_task(get_task("view", **SMALL_HEAD), echo_lora_config("all", r=2))
    model.add_task(get_task("volume", **SMALL_HEAD), echo_lora_config("attention", r=4))
    model.set_task("view")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all((".view." in n and "lora_" in n) or n.startswith("heads.view.") for n in trainable)
    assert sum(p.numel() for n, p in model.named_parameters() if n in trainable) < 0.5 * sum(
        p.numel() for p in model.parameters())
    batch = {"image": _x(n=4), "label": torch.tensor([0, 1, 0, 1])}
    losses = fit(model, [batch] * 3, get_task("view").loss(), epochs=2, lr=1e-2, progress=False)
    assert len(losses) == 2
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= trainable
    assert any("lora_B.view" in n for n in changed) and any(n.startswith("heads.view.") for n in changed)
    assert not any(".volume." in n or n.startswith("heads.volume") for n in changed)


def test_switching_adapters_reproduces_each_adapter(backbone_dir, tmp_path):
    trained = MultiTaskEchoModel(load_backbone(backbone_dir)[0]).eval()
    configs = {"segmentation": ("all", 2), "view": ("attention", 4), "age": ("all", 1)}
    for i, (task, (layers, r)) in enumerate(configs.items()):
        head = {} if task == "segmentation" else SMALL_HEAD
        trained.add_task(get_task(task, **head), echo_lora_config(layers, r))
        _randomise_lora(trained, task, seed=10 + i)
        trained.save_task(task, tmp_path / task)
    assert {f.name for f in (tmp_path / "view").iterdir()} >= {"adapter_config.json", "adapter_model.safetensors",
                                                                  "head.safetensors", "task.json"}
    x = _x(seed=3)
    own = {}
    for task in configs:  # each adapter alone on its own freshly loaded backbone
        single = MultiTaskEchoModel.from_pretrained(backbone_dir, [tmp_path / task]).eval()
        with torch.no_grad():
            own[task] = single(x)
        trained.set_task(task)
        with torch.no_grad():
            assert torch.equal(trained(x), own[task])
    shared = MultiTaskEchoModel.from_pretrained(backbone_dir, [tmp_path / t for t in configs]).eval()
    for task in ["view", "segmentation", "age", "view", "age", "segmentation"]:
        shared.set_task(task)
        with torch.no_grad():
            assert torch.equal(shared(x), own[task]), task
    assert not torch.equal(own["view"], trained.heads["view"](load_backbone(backbone_dir)[0].eval()(x)))
    with pytest.raises(ValueError, match="not loaded"):
        shared.set_task("volume")
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        shared.load_task(tmp_path)


def test_backbone_weights_from_local_hf_folder(tmp_path):
    cfg = transformers.SegformerConfig(num_channels=3, **TINY)
    torch.manual_seed(0)
    hf = transformers.SegformerModel(cfg)
    hf.save_pretrained(tmp_path / "mit")
    bb = load_backbone_weights(tiny_backbone(seed=5), tmp_path / "mit")
    hf_sd, own = hf.state_dict(), bb.state_dict()
    name = next(k for k in hf_sd if k.endswith("patch_embeddings.proj.weight") and hf_sd[k].shape[1] == 3)
    assert torch.allclose(own[f"encoder.{name}"], hf_sd[name].sum(dim=1, keepdim=True))
    k2 = next(k for k in hf_sd if k.endswith("q_proj.weight"))
    assert torch.equal(own[f"encoder.{k2}"], hf_sd[k2])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_backbone_weights(bb, tmp_path / "missing.safetensors")


def test_predictor_runs_all_tasks(backbone_dir, tmp_path):
    model = MultiTaskEchoModel(load_backbone(backbone_dir)[0])
    for task in ("segmentation", "view", "volume", "age"):
        model.add_task(get_task(task, **({} if task == "segmentation" else SMALL_HEAD)), echo_lora_config("all", 2))
        model.save_task(task, tmp_path / task)
    pred = EchoPredictor(backbone_dir, [tmp_path / t for t in ("segmentation", "view", "volume", "age")])
    assert pred.image_size == 64 and pred.tasks == ["segmentation", "view", "volume", "age"]
    p = random_heart(np.random.default_rng(0))
    frames = {}
    for view in ("2CH", "4CH"):
        for phase in ("ED", "ES"):
            img, _, sp, _ = render_frame(p, view, phase, (96, 80))
            frames[(view, phase)] = (img, sp)
    out = pred.predict(frames[("2CH", "ED")][0])
    assert out["segmentation"].shape == (96, 80) and out["segmentation"].max() <= 3
    assert out["view"]["label"] in ("2CH", "4CH")
    assert sum(out["view"]["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    assert isinstance(out["volume"], float) and isinstance(out["age"], float)
    study = pred.predict_study(frames)
    assert set(study["frames"]) == {"2CH_ED", "2CH_ES", "4CH_ED", "4CH_ES"}
    assert {"EDV", "ESV", "EF"} <= set(study["volume_adapter"]) and "simpson" in study
    with pytest.raises(ValueError, match="4CH_ES"):
        pred.predict_study({k: v for k, v in frames.items() if k != ("4CH", "ES")})
