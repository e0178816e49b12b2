"""The main demo: pretrain a small SegResNet on phantom CTs, fine-tune it with each method, compare.

A miniature of the thesis experiment (thesis 4.2, Tables 5.1 and 5.7) that runs in minutes on 2 CPU cores:

1. write synthetic CTs in TotalSegmentator layout (:func:`monai_peft.data.write_phantom_dataset`);
2. "foundation model": train a small SegResNet fully on a source task (:data:`SOURCE_CLASSES`), the role
   SuPreM's 2100-CT pretraining plays in the thesis;
3. swap the head for the target task (:data:`TARGET_CLASSES`) and fine-tune a copy per method: full
   fine-tuning, ConvAdapter, LoRA and SSF (adapters + new head train, the backbone stays frozen);
4. evaluate every model on held-out cases (per-class Dice and NSD) and compare trainable parameters, Dice
   and seconds per volume in a table, ``comparison.json`` and ``comparison.png``.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from monai.data import CacheDataset, DataLoader
from monai.networks.nets import SegResNet
from monai.utils import set_determinism

from monai_peft.io import atomic_save_figure, atomic_torch_save
from monai_peft.workflows.engines import build_loss, build_test_evaluator, build_trainer
from monai_peft.workflows.records import atomic_write_json, read_run_record

__all__ = ["SOURCE_CLASSES", "TARGET_CLASSES", "DEMO_METHODS", "demo_network", "run_demo", "format_table",
           "plot_comparison"]

logger = logging.getLogger(__name__)

# source task of the "foundation model" and the downstream task: partly shared organs, a new head
SOURCE_CLASSES: tuple[str, ...] = ("lung_upper_lobe_left", "lung_lower_lobe_left", "aorta", "liver", "stomach")
TARGET_CLASSES: tuple[str, ...] = ("lung_upper_lobe_left", "lung_lower_lobe_left", "lung_upper_lobe_right",
                                   "lung_lower_lobe_right", "aorta")
# a wide HU window: the phantoms' soft-tissue organs differ by less than their noise in SuPreM's [-175, 250]
# window, and a demo of a few hundred steps should learn structures it can see
DEMO_WINDOW: tuple[float, float] = (-1000.0, 500.0)
# phantoms are written at 1.5 mm (SuPreM's spacing) and resampled to 2 mm: 2.4x fewer voxels, more steps per minute
PHANTOM_SPACING = 1.5
DEMO_PIXDIM = 2.0


def demo_loss():
    """DiceCE without the background Dice, batch Dice and a light CE term.

    The thesis's plain DiceCE (4.2.3) spends a few hundred steps predicting background on volumes where organs are
    1-2% of the voxels; this variant learns the phantoms' structures within the demo's budget.
    """
    return build_loss(include_background=False, batch=True, lambda_ce=0.1)


def _roi_edge(size: int) -> int:
    """Edge of the resampled volume for a phantom of ``size`` voxels, rounded down to a multiple of 4."""
    return max(8, int(size * PHANTOM_SPACING / DEMO_PIXDIM) // 4 * 4)

# method -> adapt() keyword arguments; PEFT methods also train the new head (thesis 4.2.5)
DEMO_METHODS: dict[str, dict[str, Any]] = {
    "full": {},
    "convadapter": {"train_fully": "head", "gamma": 4},
    "lora": {"train_fully": "head", "r": 4},
    "ssf": {"train_fully": "head"},
}


def demo_network(out_channels: int, init_filters: int = 8) -> SegResNet:
    """The demo's small SegResNet: SuPreM's layout (thesis Table 4.1) with fewer filters and levels.

    Maps ``(B, 1, H, W, D)`` (sizes divisible by 4) to logits ``(B, out_channels, H, W, D)``.
    """
    return SegResNet(spatial_dims=3, init_filters=init_filters, in_channels=1, out_channels=out_channels,
                     blocks_down=(1, 2, 2), blocks_up=(1, 1), dropout_prob=0.0)


def _datasets(out: Path, size: int, n_pretrain: int, n_train: int, n_test: int, seed: int):
    from monai_peft.data import totalseg_datalist, train_transforms, val_transforms, write_phantom_dataset

    shape = (size, size, size)
    src_dir, tgt_dir = out / "data" / "source", out / "data" / "target"
    if not (src_dir / "meta.csv").exists():
        write_phantom_dataset(src_dir, n_pretrain, shape, seed=seed + 1000)
    if not (tgt_dir / "meta.csv").exists():
        write_phantom_dataset(tgt_dir, n_train + n_test, shape, seed=seed)
    src = totalseg_datalist(src_dir, list(SOURCE_CLASSES), progress=False)[:n_pretrain]
    tgt = totalseg_datalist(tgt_dir, list(TARGET_CLASSES), progress=False)
    if len(tgt) < n_train + n_test:
        raise ValueError(f"{tgt_dir} holds {len(tgt)} cases, the demo needs {n_train + n_test}; delete it to regenerate.")
    roi = (_roi_edge(size),) * 3
    a_min, a_max = DEMO_WINDOW
    pixdim = (DEMO_PIXDIM,) * 3
    t_train = train_transforms(roi_size=roi, pixdim=pixdim, a_min=a_min, a_max=a_max)
    t_val = val_transforms(roi_size=roi, pixdim=pixdim, a_min=a_min, a_max=a_max)
    return (
        CacheDataset(src, t_train, progress=False),
        CacheDataset(tgt[:n_train], t_train, progress=False),
        CacheDataset(tgt[n_train : n_train + n_test], t_val, progress=False),
    )


def _plain_copy_with_new_head(pretrained: SegResNet, out_channels: int, init_filters: int) -> SegResNet:
    net = demo_network(out_channels, init_filters)
    state = {k: v for k, v in pretrained.state_dict().items() if not k.startswith("conv_final")}
    missing, unexpected = net.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith("conv_final") for k in missing):
        raise RuntimeError(f"pretrained weights do not fit the demo network: missing {missing}, unexpected {unexpected}")
    return net


def run_demo(
    output_dir: str | Path = "monai_peft_demo",
    methods: Sequence[str] = tuple(DEMO_METHODS),
    epochs: int = 20,
    pretrain_epochs: int = 30,
    size: int = 32,
    n_pretrain: int = 8,
    n_train: int = 8,
    n_test: int = 4,
    lr: float = 3e-3,
    peft_lr: float = 1e-2,
    batch_size: int = 2,
    init_filters: int = 8,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
    verbose: bool = False,
) -> dict[str, Any]:
    """Run the demo and write ``comparison.json`` / ``comparison.png`` under ``output_dir``.

    Args:
        output_dir: folder for data, runs (``<method>/results.json``, adapters) and the comparison.
        methods: methods of :data:`DEMO_METHODS` to fine-tune.
        epochs: fine-tuning epochs per method.
        pretrain_epochs: epochs of source-task training of the "foundation model" (skipped when
            ``output_dir/pretrain/pretrained.pt`` exists).
        size: phantom edge length in voxels at 1.5 mm (a multiple of 4); networks see it resampled to 2 mm.
        n_pretrain, n_train, n_test: phantom cases for pretraining, fine-tuning and testing.
        lr: AdamW learning rate for pretraining and full fine-tuning. The thesis's 1e-4 (4.2.3) is tuned for
            thousands of iterations; these short runs need a larger step.
        peft_lr: learning rate for the PEFT methods (adapters start at zero and need larger steps than the
            weights full fine-tuning moves).
        batch_size: volumes per training step.
        init_filters: SegResNet width (SuPreM uses 16).
        seed: seed for phantoms, initialisation and shuffling.
        device: ``"cpu"``, ``"cuda"`` or a ``torch.device``.
        progress: show ignite progress bars.
        verbose: log the loss of every iteration.

    Returns:
        The comparison: ``{"rows": [{"method", "trainable", "total", "trainable_percent", "test_dice",
        "test_nsd", "train_s_per_volume", "inference_s_per_volume", ...}], "settings": {...}}``.
    """
    import monai_peft  # registers the peft methods; imported here so the module loads without the core

    unknown = [m for m in methods if m not in DEMO_METHODS]
    if unknown:
        raise ValueError(f"unknown demo methods {unknown}; choose from {list(DEMO_METHODS)}.")
    if size % 4 or size < 16:
        raise ValueError(f"size must be a multiple of 4 and >= 16, got {size}.")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    set_determinism(seed)
    src_ds, train_ds, test_ds = _datasets(out, size, n_pretrain, n_train, n_test, seed)
    roi = (_roi_edge(size),) * 3

    pretrained_file = out / "pretrain" / "pretrained.pt"
    pretrained = demo_network(len(SOURCE_CLASSES) + 1, init_filters)
    if pretrained_file.exists():
        pretrained.load_state_dict(torch.load(pretrained_file, map_location="cpu", weights_only=True))
        logger.info(f"using the pretrained demo network {pretrained_file}")
    else:
        logger.info(f"pretraining the 'foundation model' on {list(SOURCE_CLASSES)} for {pretrain_epochs} epochs")
        loader = DataLoader(src_ds, batch_size=batch_size, shuffle=True, num_workers=0)
        trainer = build_trainer(pretrained, loader, pretrain_epochs, out / "pretrain", device=device, lr=lr,
                                run_info={"method": "pretrain", "classes": list(SOURCE_CLASSES)}, progress=progress,
                                log_stats=verbose, loss_function=demo_loss())
        trainer.run()
        atomic_torch_save({k: v.cpu() for k, v in pretrained.state_dict().items()}, pretrained_file)
    pretrained = pretrained.cpu()

    rows = []
    for method in methods:
        set_determinism(seed)
        run_dir = out / method
        for stale in ("results.json",):
            if (run_dir / stale).exists():
                (run_dir / stale).unlink()
        net = _plain_copy_with_new_head(copy.deepcopy(pretrained), len(TARGET_CLASSES) + 1, init_filters)
        model = monai_peft.adapt(net, method, **DEMO_METHODS[method])
        logger.info(f"fine-tuning with {method} for {epochs} epochs")
        loader = DataLoader(train_ds, batch_size=batch_size, shuffle=True, num_workers=0)
        trainer = build_trainer(model, loader, epochs, run_dir, device=device, lr=lr if method == "full" else peft_lr,
                                run_info={"method": method, "classes": list(TARGET_CLASSES),
                                          "options": DEMO_METHODS[method]}, progress=progress, log_stats=verbose,
                                loss_function=demo_loss())
        trainer.run()
        evaluator = build_test_evaluator(model, DataLoader(test_ds, batch_size=1), list(TARGET_CLASSES), run_dir,
                                         device=device, roi_size=roi, progress=progress)
        evaluator.run()
        rec = read_run_record(run_dir / "results.json")
        params, test, costs = rec.get("parameters", {}), rec.get("test", {}), rec.get("costs", {})
        rows.append({
            "method": method,
            "trainable": params.get("trainable"),
            "total": params.get("total"),
            "trainable_percent": params.get("trainable_percent"),
            "test_dice": test.get("mean_dice"),
            "test_nsd": test.get("mean_nsd"),
            "per_class_dice": test.get("per_class_dice"),
            "train_s_per_volume": costs.get("train_s_per_volume"),
            "inference_s_per_volume": costs.get("inference_s_per_volume"),
            "peak_memory_gb": costs.get("inference_peak_memory_gb"),
            "run_dir": str(run_dir),
        })
    result = {
        "rows": rows,
        "settings": {"methods": list(methods), "epochs": epochs, "pretrain_epochs": pretrain_epochs, "size": size,
                     "n_pretrain": n_pretrain, "n_train": n_train, "n_test": n_test, "lr": lr, "peft_lr": peft_lr,
                     "seed": seed,
                     "init_filters": init_filters, "device": str(device), "source_classes": list(SOURCE_CLASSES),
                     "target_classes": list(TARGET_CLASSES)},
        "wall_seconds": time.perf_counter() - t_start,
    }
    atomic_write_json(out / "comparison.json", result)
    plot_comparison(rows, out / "comparison.png")
    return result


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """The comparison as a plain-text table (one row per method)."""

    def num(v: Any, fmt: str) -> str:
        return "n/a" if v is None else format(v, fmt)

    header = f"{'method':<13}{'trainable':>12}{'% of net':>10}{'Dice':>8}{'NSD':>8}{'train s/vol':>13}{'infer s/vol':>13}"
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r['method']:<13}{num(r['trainable'], ','):>12}{num(r['trainable_percent'], '.2f'):>10}"
            f"{num(r['test_dice'], '.3f'):>8}{num(r['test_nsd'], '.3f'):>8}"
            f"{num(r['train_s_per_volume'], '.3f'):>13}{num(r['inference_s_per_volume'], '.3f'):>13}"
        )
    return "\n".join(lines)


def plot_comparison(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Test Dice against trainable parameters (log scale), one point per method, as a PNG (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for r in rows:
        if r["trainable"] is None or r["test_dice"] is None:
            continue
        ax.scatter(r["trainable"], r["test_dice"], s=50)
        ax.annotate(r["method"], (r["trainable"], r["test_dice"]), textcoords="offset points", xytext=(5, 5))
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel("test mean Dice")
    ax.set_ylim(0, 1)
    ax.grid(True, alpha=0.3)
    ax.set_title("monai-peft demo: Dice vs trainable parameters")
    fig.tight_layout()
    try:
        atomic_save_figure(fig, path, format="png")
    finally:
        plt.close(fig)
    return path
