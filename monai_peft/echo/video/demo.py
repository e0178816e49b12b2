"""Video EF on phantoms: MAE pretraining, then LoRA / full fine-tuning / linear probe, compared (a measurement).

Phantom EchoNet-Dynamic videos (``write_echonet_phantom(..., same_geometry=True)``: one beating LV whose
contraction alone carries the EF, speckle, random ED frame and image quality) at 32 x 32 pixels, a 2-layer,
32-wide VideoMAE with 8-pixel patches pretrained with 90% tube masking on the training videos, then one EF
fine-tuning run per method with the method's default learning rate (:data:`~monai_peft.echo.video.runs.METHOD_DEFAULTS`).
The comparison holds, per method, trainable parameters, test EF MAE / RMSE / R^2 and training time, next to the
baseline that predicts the training mean. Used to choose the defaults; rerun it on a quiet machine for timings.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from monai_peft.io import atomic_save_figure, atomic_write_json

from ..echonet import find_echonet
from ..metrics import regression_metrics
from ..phantom import write_echonet_phantom
from .runs import METHOD_DEFAULTS, finetune_video_ef, pretrain_video

__all__ = ["TINY_VIDEOMAE", "TINY_CLIP", "write_video_phantom", "pretrain_tiny_videomae", "run_video_demo",
           "format_comparison"]

logger = logging.getLogger(__name__)

# a VideoMAE small enough for CPU tests and demos (32-pixel frames, 8 frames, 64 tokens)
TINY_VIDEOMAE = {"patch_size": 8, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                 "intermediate_size": 64, "decoder_hidden_size": 32, "decoder_num_hidden_layers": 1,
                 "decoder_num_attention_heads": 2, "decoder_intermediate_size": 64}
TINY_CLIP = {"num_frames": 8, "stride": 2, "image_size": 32}


def write_video_phantom(root: str | os.PathLike, num_videos: int, seed: int = 0) -> Path:
    """EF phantom videos for :data:`TINY_CLIP`: 16 frames of 32 x 32 pixels, one LV geometry (the contraction alone
    carries the EF), 60 / 20 / 20 % TRAIN / VAL / TEST. Returns ``root``."""
    write_echonet_phantom(root, num_videos, 16, TINY_CLIP["image_size"], seed=seed, depth_mm=110.0, same_geometry=True)
    return Path(root)


def pretrain_tiny_videomae(echonet_root: str | os.PathLike, out_dir: str | os.PathLike, epochs: int,
                           mask_ratio: float = 0.9, seed: int = 0, progress: bool = False) -> Path:
    """MAE pretraining of the :data:`TINY_VIDEOMAE` on :data:`TINY_CLIP` clips of the TRAIN videos (batch 16, AdamW
    2e-3, cosine, all decoded videos cached); returns the checkpoint folder ``out_dir/checkpoint``."""
    pretrain_video(echonet_root, out_dir, "small", TINY_CLIP["num_frames"], TINY_CLIP["stride"],
                   TINY_CLIP["image_size"], mask_ratio, epochs, 16, 2e-3, config_overrides=TINY_VIDEOMAE,
                   cache_rate=1.0, seed=seed, progress=progress, log_stats=False)
    return Path(out_dir) / "checkpoint"


def run_video_demo(out_dir: str | os.PathLike, methods: Sequence[str] = ("lora", "full", "head"),
                   num_videos: int = 240, pretrain_epochs: int = 150, epochs: int = 30, mask_ratio: float = 0.9,
                   seed: int = 0, progress: bool = False) -> dict:
    """Phantom videos -> MAE pretraining -> one EF fine-tuning per method -> ``comparison.json`` / ``.png``.

    Existing phantoms and an existing pretrained checkpoint in ``out_dir`` are reused.

    Args:
        out_dir: folder for ``data/``, ``pretrain/``, ``runs/<method>/`` and the comparison.
        methods: fine-tuning methods. Default LoRA, full fine-tuning, linear probe (``head``).
        num_videos: phantom videos (60% train, 20% validation, 20% test). Default 240.
        pretrain_epochs: MAE pretraining epochs. Default 150.
        epochs: fine-tuning epochs per method. Default 30.
        mask_ratio: MAE masking ratio. Default 0.9 (EchoAI).
        seed: random seed of phantoms and runs.
        progress: progress bars.

    Returns:
        ``{"baseline": {...}, "methods": {method: {...}}, "settings": {...}}``.
    """
    out = Path(out_dir)
    data = out / "data"
    if not (data / "FileList.csv").is_file():
        write_video_phantom(data, num_videos, seed)
    checkpoint = out / "pretrain" / "checkpoint"
    t0 = time.time()
    if not (checkpoint / "config.json").is_file():
        pretrain_tiny_videomae(data, out / "pretrain", pretrain_epochs, mask_ratio, seed, progress)
    pretrain_s = time.time() - t0
    train_ef = np.array([r.ef for r in find_echonet(data, "TRAIN", require_tracings=False)])
    test_ef = np.array([r.ef for r in find_echonet(data, "TEST", require_tracings=False)])
    baseline = regression_metrics(np.full_like(test_ef, train_ef.mean()), test_ef)
    result: dict = {"baseline": {"prediction": "training mean EF", "ef": float(train_ef.mean()), **baseline},
                    "methods": {}, "settings": {"videos": num_videos, "pretrain_epochs": pretrain_epochs,
                                                "epochs": epochs, "mask_ratio": mask_ratio, "seed": seed,
                                                "pretrain_seconds": pretrain_s, **TINY_CLIP}}
    for method in methods:
        rec = finetune_video_ef(checkpoint, data, out / "runs" / method, method, epochs=epochs, batch_size=16,
                                stride=TINY_CLIP["stride"], clips=2, val_interval=5, cache_rate=1.0, seed=seed,
                                progress=progress, log_stats=False)
        result["methods"][method] = {
            "lr": rec.get("lr", METHOD_DEFAULTS.get(method, {}).get("lr")), "parameters": rec["parameters"],
            "test": rec["test"]["all"], "train_seconds": rec.get("train_seconds"),
            "inference_s_per_video": rec.get("costs", {}).get("inference_s_per_volume")}
        logger.info("%s: %s", method, result["methods"][method]["test"])
    atomic_write_json(out / "comparison.json", result)
    _plot(result, out / "comparison.png")
    return result


def format_comparison(result: dict) -> str:
    """The comparison as a text table."""
    b = result["baseline"]
    lines = [f"{'method':<10}{'lr':>9}{'trainable':>11}{'%':>7}{'EF MAE':>9}{'RMSE':>8}{'R2':>7}{'train s':>9}",
             f"{'mean':<10}{'-':>9}{0:>11}{0:>7.1f}{b['mae']:>9.2f}{b['rmse']:>8.2f}{'-':>7}{'-':>9}"]
    for m, r in result["methods"].items():
        t, p = r["test"], r["parameters"]
        r2 = "-" if t["r2"] is None else f"{t['r2']:.2f}"
        lines.append(f"{m:<10}{r['lr']:>9.0e}{p['trainable']:>11,}{p['trainable_percent']:>7.1f}{t['mae']:>9.2f}"
                     f"{t['rmse']:>8.2f}{r2:>7}{(r['train_seconds'] or 0):>9.0f}")
    return "\n".join(lines)


def _plot(result: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["methods"])
    mae = [result["methods"][m]["test"]["mae"] for m in names]
    pct = [result["methods"][m]["parameters"]["trainable_percent"] for m in names]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    bars = ax.bar(names, mae, color="tab:blue")
    ax.axhline(result["baseline"]["mae"], color="k", ls="--", lw=1, label="training mean")
    for b, p in zip(bars, pct):
        ax.annotate(f"{p:.1f}% trained", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom",
                    fontsize=8)
    ax.set_ylabel("test EF MAE (points)")
    ax.set_title("phantom videos: EF fine-tuning of a MAE-pretrained VideoMAE", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        atomic_save_figure(fig, png, dpi=90, format="png")
    finally:
        plt.close(fig)
