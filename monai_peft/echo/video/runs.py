"""Video EF runs: MAE pretraining, EF fine-tuning per method, evaluation and prediction (EchoAI, seed 002).

Each run is a folder::

    pretrain:  checkpoint/ (config.json + model.safetensors), results.json, parameter_report.json
    fine-tune: adapter/{last,best}/, ef_model.json, results.json (parameters, validation, test, costs),
               test_predictions.csv / .png, parameter_report.json

``ef_model.json`` names the pretrained checkpoint, the method and its options, the clip geometry and the
fingerprint of the frozen base weights, so :func:`load_ef_model` rebuilds exactly the trained network and
refuses a checkpoint that changed since.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from monai.data import CacheDataset, DataLoader, Dataset
from monai.utils import set_determinism

from monai_peft.handlers import load_adapter_folder
from monai_peft.io import atomic_write_json
from monai_peft.workflows.records import read_run_record, update_run_record

from .data import echonet_video_datalist, video_datalist, video_transforms
from .engines import build_ef_evaluator, build_ef_trainer
from .mae import MASK_RATIO, ReconstructionLoss, VideoMAEPretrainNet, save_videomae_checkpoint
from .model import VideoEFNet, adapt_video_ef, videomae_config

__all__ = ["METHOD_DEFAULTS", "build_video_ef_model", "pretrain_video", "finetune_video_ef", "load_ef_model",
           "evaluate_video_ef", "predict_video_ef"]

logger = logging.getLogger(__name__)

EF_MODEL_FILE = "ef_model.json"

# Learning rate and options per method, measured on held-out phantom videos (``monai-peft echo video-demo`` setting,
# phantom seed 3: a 2-layer VideoMAE after 150 epochs of MAE pretraining, 30 fine-tuning epochs; test EF MAE,
# training mean 9.8; docs/echo.md "Video EF" has the seed-0 comparison):
# LoRA r=8 1e-3 / 3e-3 / 1e-2 -> 9.2 / 5.2 / 4.6; full 3e-4 / 1e-3 / 3e-3 -> 9.6 / 3.6 / 1.4; linear probe 1e-2 / 1e-1
# -> 9.6 / 9.6. Full fine-tuning takes 1e-3, not its phantom optimum 3e-3, which is far above what VideoMAE-base
# fine-tuning tolerates; the adapters keep their 10x (an adapter at full fine-tuning's rate looks broken).
# SSF, BitFit and norm tuning train as few parameters as LoRA and take its rate (not measured separately).
# Visual prompts and bottleneck adapters, the same setting on the seed-0 draw (validation / test EF MAE; the training
# mean scores 11.8 on test; on the seed-3 draw neither moved from the mean's error at any rate): VPT-deep (10 prompts)
# 3e-3 / 1e-2 / 3e-2 / 1e-1 -> 9.9/10.1, 6.0/6.3, 2.2/2.3, 2.3/2.4, VPT-shallow 1e-2 / 3e-2 -> 6.0/6.3, 2.1/2.3;
# bottleneck (m=16) sequential 1e-3 / 3e-3 / 1e-2 / 3e-2 -> 10.2/11.0, 2.4/2.5, 1.7/1.6, 10.4/11.1, parallel
# 3e-3 / 1e-2 -> 1.1/1.1, 4.2/3.7. Bottleneck adapters take 3e-3, good for both insertions and a step below where
# sequential ones diverge; prompts take 3e-2 (Jia et al. also tune prompts at larger rates).
METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    "lora": {"lr": 1e-2, "r": 8},
    "full": {"lr": 1e-3},
    "head": {"lr": 1e-2},
    "ssf": {"lr": 1e-2},
    "bitfit": {"lr": 1e-2},
    "norm": {"lr": 1e-2},
    "vpt": {"lr": 3e-2},
    "bottleneck": {"lr": 3e-3},
}
DEFAULT_LR = 1e-3


def encoder_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 over the frozen pretrained encoder tensors (names and values) of a wrapped EF model: equal
    fingerprints mean the same checkpoint weights. The new head, random until trained, is left out."""
    import hashlib

    digest = hashlib.sha256()
    for name, p in model.named_parameters():
        if p.requires_grad or "videomae." not in name:
            continue
        digest.update(name.encode())
        digest.update(p.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def build_video_ef_model(checkpoint: str | os.PathLike, method: str = "lora", layers: str = "attention",
                         num_frames: int | None = None, image_size: int | None = None, peft_config: Any = None,
                         **method_kwargs: Any):
    """The EF network on a local VideoMAE checkpoint, wrapped for ``method`` (the bundles' ``network_def``).

    Args:
        checkpoint: local checkpoint folder (``config.json`` + weights), e.g. from :func:`pretrain_video`.
        method: see :func:`~monai_peft.echo.video.model.adapt_video_ef`. Default ``"lora"``.
        layers: LoRA placement (``"attention"`` / ``"all"``). Default ``"attention"``.
        num_frames, image_size: clip geometry; default the checkpoint's.
        peft_config: a ready peft config instead of ``method``.
        method_kwargs: method options; :data:`METHOD_DEFAULTS` fills those not given (e.g. LoRA ``r=8``).
    """
    overrides = {k: v for k, v in (("num_frames", num_frames), ("image_size", image_size)) if v is not None}
    net = VideoEFNet.from_checkpoint(checkpoint, **overrides)
    opts = {k: v for k, v in METHOD_DEFAULTS.get(method, {}).items() if k != "lr"} if peft_config is None else {}
    opts.update(method_kwargs)
    return adapt_video_ef(net, method, layers, peft_config=peft_config, **opts)


def _loader(root: str | os.PathLike, split: str | Sequence[str], transform, batch_size: int, shuffle: bool,
            num_workers: int, cache_rate: float = 0.0) -> DataLoader:
    """Decoded, resized videos are cached for ``cache_rate`` of the items (the clip draw stays random)."""
    ds = CacheDataset(echonet_video_datalist(root, split), transform, cache_rate=cache_rate, num_workers=None,
                      progress=False)
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers)


def pretrain_video(echonet_root: str | os.PathLike, out_dir: str | os.PathLike, size: str = "base",
                   num_frames: int = 16, stride: int = 4, image_size: int = 112, mask_ratio: float = MASK_RATIO,
                   epochs: int = 10, batch_size: int = 8, lr: float = 1.5e-4, weight_decay: float = 0.05,
                   splits: Sequence[str] | str = ("TRAIN",), init_checkpoint: str | os.PathLike | None = None,
                   config_overrides: dict | None = None, amp: bool = False, accumulation_steps: int = 1,
                   device: str = "cpu", num_workers: int = 0, cache_rate: float = 0.0, seed: int = 0,
                   progress: bool = True, log_stats: bool = True) -> dict:
    """Masked-autoencoder pretraining on EchoNet-Dynamic videos with 90% tube masking (EchoAI).

    Writes ``out_dir/checkpoint/`` (``config.json`` + ``model.safetensors``) and ``out_dir/results.json``.

    Args:
        echonet_root: EchoNet-Dynamic folder (labels are not used). out_dir: run folder.
        size: ``"small"`` / ``"base"`` (ignored with ``init_checkpoint``). num_frames / stride / image_size: clips.
        mask_ratio: hidden fraction of the space-time patches. Default 0.9.
        epochs / batch_size / lr / weight_decay: AdamW with cosine annealing (VideoMAE: lr 1.5e-4 per 256
            clips, weight decay 0.05).
        splits: videos to pretrain on. Default TRAIN.
        init_checkpoint: continue from a local checkpoint folder instead of a random init.
        config_overrides: ``VideoMAEConfig`` fields (narrow models for tests).
        amp / accumulation_steps: mixed precision (CUDA) and gradient accumulation.
        device / num_workers / seed / progress: run settings; log_stats: per-iteration loss logging (stdout).
        cache_rate: fraction of the decoded, resized videos kept in memory (EchoNet-Dynamic at 112 pixels:
            about 2 MB per video). Default 0.

    Returns:
        the run record.
    """
    set_determinism(seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if init_checkpoint is not None:
        net = VideoMAEPretrainNet.from_checkpoint(init_checkpoint, mask_ratio, num_frames=num_frames,
                                                  image_size=image_size, **(config_overrides or {}))
    else:
        net = VideoMAEPretrainNet(videomae_config(size, image_size, num_frames, **(config_overrides or {})), mask_ratio)
    loader = _loader(echonet_root, splits, video_transforms(num_frames, stride, image_size, train=True), batch_size,
                     True, num_workers, cache_rate)
    info = {"task": "echonet_video_mae", "method": "full", "mask_ratio": mask_ratio, "num_frames": num_frames,
            "stride": stride, "image_size": image_size, "videos": len(loader.dataset)}
    trainer = build_ef_trainer(net, loader, epochs, out, device, lr=lr, weight_decay=weight_decay,
                               loss_function=ReconstructionLoss(), amp=amp, accumulation_steps=accumulation_steps,
                               run_info=info, checkpoint=False, progress=progress, log_stats=log_stats)
    t0 = time.time()
    trainer.run()
    save_videomae_checkpoint(net.cpu(), out / "checkpoint")
    return update_run_record(out / "results.json", {"train_loss": trainer.loss_history.history,
                                                    "seconds": time.time() - t0, "checkpoint": "checkpoint"})


def finetune_video_ef(checkpoint: str | os.PathLike, echonet_root: str | os.PathLike, out_dir: str | os.PathLike,
                      method: str = "lora", layers: str = "attention", method_kwargs: dict | None = None,
                      epochs: int = 10, batch_size: int = 8, lr: float | None = None, weight_decay: float = 0.05,
                      stride: int = 4, clips: int = 4, num_frames: int | None = None, image_size: int | None = None,
                      train_split: str | Sequence[str] = "TRAIN", val_split: str | Sequence[str] | None = "VAL",
                      test_split: str | Sequence[str] | None = "TEST", val_interval: int = 1, amp: bool = False,
                      accumulation_steps: int = 1, resume: bool = False, device: str = "cpu", num_workers: int = 0,
                      cache_rate: float = 0.0, seed: int = 0, progress: bool = True, log_stats: bool = True) -> dict:
    """Fine-tune the EF regression on a pretrained video encoder with one method, then test the best epoch.

    Args:
        checkpoint: local VideoMAE checkpoint folder (:func:`pretrain_video` ``checkpoint/``).
        echonet_root: EchoNet-Dynamic folder. out_dir: run folder.
        method: ``"lora"``, ``"full"``, ``"head"`` (linear probe), ``"ssf"``, ``"bitfit"``, ``"norm"``, ``"vpt"``
            (visual prompts), ``"bottleneck"`` (bottleneck adapters) or any method :func:`monai_peft.adapt` knows.
            Default ``"lora"``.
        layers: LoRA placement ``"attention"`` / ``"all"``. Default ``"attention"``.
        method_kwargs: method options (LoRA ``r``, ``lora_alpha``; VPT ``variant``, ``num_tokens``; bottleneck
            ``insertion``, ``bottleneck_size``...); defaults from :data:`METHOD_DEFAULTS`.
        epochs / batch_size / weight_decay: AdamW + cosine annealing.
        lr: learning rate; default the method's (:data:`METHOD_DEFAULTS`).
        stride / clips: frame step in a clip, clips averaged per video at evaluation.
        num_frames / image_size: clip geometry; default the checkpoint's.
        train_split / val_split / test_split: FileList splits; None skips validation (the last epoch is kept)
            or the test.
        val_interval: validate every this many epochs.
        amp / accumulation_steps / resume: mixed precision, gradient accumulation, continue from ``adapter/last``.
        device / num_workers / seed / progress: run settings; log_stats: loss / metric logging (stdout).
        cache_rate: fraction of the decoded, resized videos kept in memory. Default 0.

    Returns:
        the run record (``parameters``, ``validation``, ``test`` with ``mae``/``rmse``/``r2``, ``costs``).
    """
    set_determinism(seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    kwargs = {k: v for k, v in METHOD_DEFAULTS.get(method, {}).items() if k != "lr"}
    kwargs.update(method_kwargs or {})
    lr = lr if lr is not None else METHOD_DEFAULTS.get(method, {}).get("lr", DEFAULT_LR)
    model = build_video_ef_model(checkpoint, method, layers, num_frames, image_size, **kwargs)
    cfg = model.base_model.model.videomae_config
    spec = {"checkpoint": str(Path(checkpoint).resolve()), "method": method, "layers": layers, "method_kwargs": kwargs,
            "num_frames": cfg.num_frames, "image_size": cfg.image_size, "stride": stride, "clips": clips,
            "base_fingerprint": encoder_fingerprint(model)}
    atomic_write_json(out / EF_MODEL_FILE, spec)
    train_tf = video_transforms(cfg.num_frames, stride, cfg.image_size, train=True)
    eval_tf = video_transforms(cfg.num_frames, stride, cfg.image_size, train=False, clips=clips)
    loader = _loader(echonet_root, train_split, train_tf, batch_size, True, num_workers, cache_rate)
    record = out / "results.json"
    evaluator = None
    if val_split is not None:
        evaluator = build_ef_evaluator(model, _loader(echonet_root, val_split, eval_tf, batch_size, False, num_workers, cache_rate),
                                       device, record, "validation", progress=progress, log_stats=log_stats)
    info = {"task": "echonet_ef", "method": method, "placement": layers if method == "lora" else None,
            "method_kwargs": kwargs, "lr": lr, "epochs": epochs, "batch_size": batch_size,
            "accumulation_steps": accumulation_steps, "videos": len(loader.dataset)}
    trainer = build_ef_trainer(model, loader, epochs, out, device, evaluator, val_interval, lr, weight_decay,
                               amp=amp, accumulation_steps=accumulation_steps, resume=resume, run_info=info,
                               progress=progress, log_stats=log_stats)
    t0 = time.time()
    trainer.run()
    update_run_record(record, {"train_loss": trainer.loss_history.history, "train_seconds": time.time() - t0})
    best = out / "adapter" / ("best" if evaluator is not None else "last")
    if test_split is not None:
        load_adapter_folder(model, best)
        test = build_ef_evaluator(model, _loader(echonet_root, test_split, eval_tf, batch_size, False, num_workers, cache_rate),
                                  device, record, "test", out, measure_cost=True, progress=progress,
                                  log_stats=log_stats)
        test.run()
    return read_run_record(record)


def load_ef_model(run_dir: str | os.PathLike, which: str = "best"):
    """Rebuild a fine-tuned EF model from its run folder (``ef_model.json`` + ``adapter/<which>``).

    Raises:
        FileNotFoundError: missing ``ef_model.json``, checkpoint or adapter folder. ValueError: the checkpoint's
            weights changed since training (frozen-weight fingerprint differs), or the adapter does not fit.
    """
    run = Path(run_dir)
    spec_file = run / EF_MODEL_FILE
    if not spec_file.is_file():
        raise FileNotFoundError(f"{run}: no {EF_MODEL_FILE}; expected a folder written by finetune_video_ef "
                                "(monai-peft echo video-train).")
    spec = json.loads(spec_file.read_text())
    model = build_video_ef_model(spec["checkpoint"], spec["method"], spec["layers"], spec["num_frames"],
                                 spec["image_size"], **spec.get("method_kwargs", {}))
    if spec.get("base_fingerprint") and encoder_fingerprint(model) != spec["base_fingerprint"]:
        raise ValueError(f"{spec['checkpoint']}: the pretrained weights differ from those {run} was trained on "
                         f"(fingerprint in {spec_file}); use the original checkpoint.")
    folder = run / "adapter" / which
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} does not exist: expected adapter/best or adapter/last of a finished run.")
    load_adapter_folder(model, folder)
    model.ef_spec = spec
    return model.eval()


def evaluate_video_ef(run_dir: str | os.PathLike, echonet_root: str | os.PathLike, split: str | Sequence[str] = "TEST",
                      out_dir: str | os.PathLike | None = None, clips: int | None = None, batch_size: int = 4,
                      device: str = "cpu", progress: bool = True, log_stats: bool = True) -> dict:
    """EF MAE / RMSE / R^2 of a fine-tuned run on ``split``; writes ``results.json`` (section ``test``), the
    per-video CSV and the scatter plot into ``out_dir`` (default the run folder). Returns the ``test`` section."""
    model = load_ef_model(run_dir)
    spec = model.ef_spec
    out = Path(out_dir) if out_dir is not None else Path(run_dir)
    tf = video_transforms(spec["num_frames"], spec["stride"], spec["image_size"], train=False,
                          clips=clips or spec["clips"])
    ev = build_ef_evaluator(model, _loader(echonet_root, split, tf, batch_size, False, 0), device,
                            out / "results.json", "test", out, measure_cost=True, progress=progress,
                            log_stats=log_stats)
    ev.run()
    return read_run_record(out / "results.json")["test"]


def predict_video_ef(run_dir: str | os.PathLike, videos: str | os.PathLike | Sequence[str | os.PathLike],
                     out_file: str | os.PathLike | None = None, clips: int | None = None, batch_size: int = 4,
                     device: str = "cpu") -> dict:
    """Per-video EF of a fine-tuned run, averaged over ``clips`` clips, on a MONAI ``SupervisedEvaluator``.

    Args:
        run_dir: fine-tuning run folder.
        videos: AVI files, a folder of them, or an EchoNet-Dynamic folder (every video of its FileList); see
            :func:`~monai_peft.echo.video.data.video_datalist`.
        out_file: JSON file to write ``{"videos": {name: EF}, ...}``; None writes none.
        clips: clips per video; default the run's.
        batch_size: videos per batch. Default 4.
        device: device.
    """
    from monai.engines import SupervisedEvaluator

    from monai_peft.handlers import CostMeter

    from ..handlers import PredictionCollector
    from .engines import ClipAverageInferer

    model = load_ef_model(run_dir)
    spec = model.ef_spec
    clips = clips or spec["clips"]
    items = [{k: d[k] for k in ("image", "name", "where")} for d in video_datalist(videos)]
    tf = video_transforms(spec["num_frames"], spec["stride"], spec["image_size"], train=False, clips=clips)
    collector = PredictionCollector()
    cost = CostMeter(phase="inference")
    SupervisedEvaluator(device=torch.device(device), network=model.to(device), inferer=ClipAverageInferer(),
                        val_data_loader=DataLoader(Dataset(items, tf), batch_size=batch_size, shuffle=False),
                        val_handlers=[cost, collector]).run()
    result = {"run": str(run_dir), "method": spec["method"], "clips": clips,
              "videos": {n: float(v.reshape(-1)[0]) for n, v in collector.outputs.items()}}
    if out_file is not None:
        atomic_write_json(out_file, result)
    return result
