"""The main demo: a foundation model, then full fine-tuning against ConvAdapter, LoRA and SSF on a new task.

A miniature of the thesis experiment (thesis 4.2, Tables 5.1-5.5 and 5.7, Figures 5.1-5.4) that finishes in a few
minutes on 2 CPU cores and gives the same numbers on every run:

1. write contrast-enhanced phantom CTs in TotalSegmentator layout (:func:`monai_peft.data.write_phantom_dataset`,
   portal-venous phase, 32^3 voxels at 2 mm), one folder for the source task and one for the target task;
2. "foundation model": train a small SegResNet (SuPreM's layout, thesis Table 4.1, with 8 filters and 3 levels)
   fully on the source task, abdominal organs as in SuPreM's AbdomenAtlas pretraining (:data:`SOURCE_CLASSES`),
   and test it on held-out source cases: its own Dice shows it converged;
3. give a copy a new head for the target task (:data:`TARGET_CLASSES`: the same organs plus the two upper lung
   lobes, new to the foundation model, as TotalSegmentator's organs are to SuPreM) and fine-tune it per method:
   full fine-tuning, ConvAdapter, LoRA and SSF (adapters + new head train, the backbone stays frozen), each at its
   own learning rate (:data:`DEMO_METHODS`), validating every epoch;
4. test every model on held-out cases and write the comparison: trainable parameters beside test Dice, the
   validation Dice over epochs per method (``curves.png``, Figures 5.1-5.4 in miniature), and costs measured
   after a warm-up (``comparison.json``, ``comparison.png``).

Determinism: fixed seeds for phantoms, initialisation, shuffling and augmentation (MONAI ``set_determinism``), and
one CPU thread while the demo runs (reductions over several threads change the last bits, and small 3D
convolutions are fastest on one thread), so the printed Dice do not depend on ``OMP_NUM_THREADS``.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from monai.data import CacheDataset, DataLoader
from monai.losses import DiceCELoss
from monai.networks.nets import SegResNet
from monai.utils import set_determinism

from monai_peft.io import atomic_save_figure, atomic_torch_save
from monai_peft.workflows.demo_methods import DEMO_METHODS, PRETRAIN_LR
from monai_peft.workflows.engines import build_evaluator, build_test_evaluator, build_trainer
from monai_peft.workflows.records import atomic_write_json, read_run_record, update_run_record

__all__ = ["SOURCE_CLASSES", "TARGET_CLASSES", "DEMO_METHODS", "PRETRAIN_LR", "PHANTOM_SIZE", "PHANTOM_SPACING",
           "PHANTOM_ORGAN_SCALE", "ROI_SIZE", "demo_network", "demo_loss", "class_weights", "run_demo", "format_table",
           "plot_comparison"]

logger = logging.getLogger(__name__)

# the foundation model's task: abdominal organs, as SuPreM's AbdomenAtlas labels (thesis 4.2.1)
SOURCE_CLASSES: tuple[str, ...] = ("liver", "spleen", "kidney_right", "kidney_left", "stomach")
# the downstream task: the same organs and two structures the foundation model never saw (thesis 4.2.2)
TARGET_CLASSES: tuple[str, ...] = ("liver", "spleen", "kidney_right", "kidney_left", "lung_upper_lobe_right",
                                   "lung_upper_lobe_left")
# phantoms are written at the network's grid, so no resampling: 32^3 voxels of 2 mm, organs 1.4x the default
# phantom's radii so that the small ones (kidneys, spleen) hold ~100 voxels; the foreground crop keeps the body,
# 32 x 24 x 32 voxels (the body is 75 % as deep as it is wide)
PHANTOM_SIZE = 32
PHANTOM_SPACING = 2.0
PHANTOM_ORGAN_SCALE = 1.4
ROI_SIZE = (32, 24, 32)



def demo_network(out_channels: int, init_filters: int = 8) -> SegResNet:
    """The demo's small SegResNet: SuPreM's layout (thesis Table 4.1) with fewer filters and levels.

    Maps ``(B, 1, H, W, D)`` (sizes divisible by 4) to logits ``(B, out_channels, H, W, D)``.
    """
    return SegResNet(spatial_dims=3, init_filters=init_filters, in_channels=1, out_channels=out_channels,
                     blocks_down=(1, 2, 2), blocks_up=(1, 1), dropout_prob=0.0)


def demo_loss(class_weights: torch.Tensor | None = None) -> DiceCELoss:
    """Batch Dice over the organs plus class-weighted cross-entropy.

    Organs are 0.1-1.5 % of a phantom's voxels: with the thesis's plain DiceCE (4.2.3) a small network predicts
    background for a few hundred steps; weighting the cross-entropy by ``sqrt(1 / class frequency)`` and leaving
    the background out of the Dice term lets it learn within the demo's budget.

    Args:
        class_weights: ``(C,)`` cross-entropy weights, background first (:func:`class_weights`); ``None``: equal.
    """
    return DiceCELoss(to_onehot_y=True, softmax=True, include_background=False, batch=True, weight=class_weights)


def class_weights(dataset: Sequence[Mapping[str, Any]], num_classes: int) -> torch.Tensor:
    """``sqrt(1 / frequency)`` of each class over the labels of ``dataset``, scaled to mean 1, shape ``(C,)``."""
    counts = torch.zeros(num_classes, dtype=torch.float64)
    for item in dataset:
        counts += torch.bincount(torch.as_tensor(item["label"]).long().flatten(), minlength=num_classes)[:num_classes]
    weights = (counts.sum() / counts.clamp(min=1.0)).sqrt()
    return (weights / weights.mean()).float()


def _datasets(out: Path, n_source: Sequence[int], n_target: Sequence[int], seed: int) -> dict[str, CacheDataset]:
    from monai_peft.data import totalseg_datalist, train_transforms, val_transforms, write_phantom_dataset

    shape, spacing = (PHANTOM_SIZE,) * 3, (PHANTOM_SPACING,) * 3
    folders = {"source": (out / "data" / "source", sum(n_source), seed + 1000, SOURCE_CLASSES),
               "target": (out / "data" / "target", sum(n_target), seed, TARGET_CLASSES)}
    lists = {}
    for name, (folder, n, phantom_seed, classes) in folders.items():
        if not (folder / "meta.csv").exists():
            write_phantom_dataset(folder, n, shape, seed=phantom_seed, spacing=spacing, phase="venous",
                                  organ_scale=PHANTOM_ORGAN_SCALE)
        items = totalseg_datalist(folder, list(classes), progress=False)
        if len(items) < n:
            raise ValueError(f"{folder} holds {len(items)} cases, the demo needs {n}; delete it to regenerate.")
        lists[name] = items[:n]
    # the thesis chain (Table 4.3) at the phantoms' grid; no 90-degree turns: they swap left and right organs
    t_train = train_transforms(roi_size=ROI_SIZE, pixdim=spacing, rotate90_prob=0.0)
    t_val = val_transforms(roi_size=ROI_SIZE, pixdim=spacing)
    out_sets: dict[str, CacheDataset] = {}
    for name, sizes in (("source", n_source), ("target", n_target)):
        items, start = lists[name], 0
        for split, n, transform in zip(("train", "val", "test"), sizes, (t_train, t_val, t_val)):
            out_sets[f"{name}_{split}"] = CacheDataset(items[start : start + n], transform, progress=False)
            start += n
    return out_sets


def _plain_copy_with_new_head(pretrained: SegResNet, out_channels: int, init_filters: int) -> SegResNet:
    net = demo_network(out_channels, init_filters)
    state = {k: v for k, v in pretrained.state_dict().items() if not k.startswith("conv_final")}
    missing, unexpected = net.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith("conv_final") for k in missing):
        raise RuntimeError(f"pretrained weights do not fit the demo network: missing {missing}, unexpected {unexpected}")
    return net


def _train_and_test(
    model: torch.nn.Module, data: dict[str, CacheDataset], task: str, classes: Sequence[str], run_dir: Path,
    epochs: int, lr: float, seed: int, device: str | torch.device, progress: bool, verbose: bool,
    run_info: dict[str, Any],
) -> dict[str, Any]:
    """Train with validation every epoch, then test after a warm-up pass; returns the run record."""
    for stale in ("results.json", "test_metrics.json", "test_metrics.csv"):
        (run_dir / stale).unlink(missing_ok=True)
    set_determinism(seed)
    train_ds = data[f"{task}_train"]
    train_ds.transform.set_random_state(seed=seed)
    loader = DataLoader(train_ds, batch_size=2, shuffle=True, num_workers=0,
                        generator=torch.Generator().manual_seed(seed))
    evaluator = build_evaluator(model, DataLoader(data[f"{task}_val"], batch_size=1), list(classes), device=device,
                                roi_size=None, record_path=run_dir / "results.json", progress=progress)
    trainer = build_trainer(model, loader, epochs, run_dir, device=device, lr=lr, evaluator=evaluator,
                            run_info=run_info, progress=progress, log_stats=verbose,
                            loss_function=demo_loss(class_weights(train_ds, len(classes) + 1).to(device)))
    trainer.run()
    test_loader = DataLoader(data[f"{task}_test"], batch_size=1)
    model.eval()
    with torch.no_grad():  # warm-up: the first pass of a new input shape builds kernels, which is not a cost
        model(next(iter(test_loader))["image"].to(device))
    build_test_evaluator(model, test_loader, list(classes), run_dir, device=device, roi_size=None,
                         progress=progress).run()
    update_run_record(run_dir / "results.json", {
        "evaluation": {"protocol": "whole_volume", "roi_size": list(ROI_SIZE), "warm_up_passes": 1},
    })
    return read_run_record(run_dir / "results.json")


def run_demo(
    output_dir: str | Path = "monai_peft_demo",
    methods: Sequence[str] = tuple(DEMO_METHODS),
    epochs: int = 25,
    pretrain_epochs: int = 30,
    n_pretrain: Sequence[int] = (12, 4, 4),
    n_target: Sequence[int] = (12, 4, 4),
    learning_rates: Mapping[str, float] | None = None,
    init_filters: int = 8,
    seed: int = 0,
    device: str | torch.device = "cpu",
    threads: int | None = 1,
    progress: bool = True,
    verbose: bool = False,
) -> dict[str, Any]:
    """Run the demo and write ``comparison.json``, ``comparison.png`` and ``curves.png`` under ``output_dir``.

    Args:
        output_dir: folder for data, the foundation model (``pretrain/``), one run folder per method
            (``<method>/results.json`` with the per-epoch history, ``adapter/``) and the comparison.
        methods: methods of :data:`DEMO_METHODS` to fine-tune.
        epochs: fine-tuning epochs per method (validation after each).
        pretrain_epochs: epochs of source-task training of the foundation model (skipped when
            ``output_dir/pretrain/pretrained.pt`` exists).
        n_pretrain: ``(train, val, test)`` phantom cases of the source task.
        n_target: ``(train, val, test)`` phantom cases of the target task.
        learning_rates: ``{method: lr}`` replacing :data:`DEMO_METHODS`' rates (e.g. for a learning-rate grid).
        init_filters: SegResNet width (SuPreM uses 16).
        seed: seed for phantoms, initialisation, shuffling and augmentation.
        device: ``"cpu"``, ``"cuda"`` or a ``torch.device``.
        threads: CPU threads while the demo runs (default 1: deterministic, and the fastest for these sizes);
            ``None`` keeps torch's setting.
        progress: show ignite progress bars.
        verbose: log the loss of every iteration.

    Returns:
        ``{"foundation": {...}, "rows": [{"method", "lr", "trainable", "total", "trainable_percent", "test_dice",
        "test_nsd", "best_val_dice", "train_s_per_volume", "inference_s_per_volume", ...}], "settings": {...},
        "wall_seconds": float, "cpu_seconds": float}``.
    """
    import monai_peft  # registers the peft methods; imported here so the module loads without the core

    unknown = [m for m in methods if m not in DEMO_METHODS]
    if unknown:
        raise ValueError(f"unknown demo methods {unknown}; choose from {list(DEMO_METHODS)}.")
    for name, sizes in (("n_pretrain", n_pretrain), ("n_target", n_target)):
        if len(sizes) != 3 or min(sizes) < 1:
            raise ValueError(f"{name} must be three case counts >= 1 (train, val, test), got {tuple(sizes)}.")
    if min(epochs, pretrain_epochs) < 1:
        raise ValueError(f"epochs and pretrain_epochs must be >= 1, got {epochs} and {pretrain_epochs}.")
    lrs = {m: float(v["lr"]) for m, v in DEMO_METHODS.items()} | {k: float(v) for k, v in (learning_rates or {}).items()}
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    old_threads = torch.get_num_threads()
    if threads is not None and torch.device(device).type == "cpu":
        torch.set_num_threads(threads)
    try:
        t_start, cpu_start = time.perf_counter(), time.process_time()
        set_determinism(seed)
        data = _datasets(out, n_pretrain, n_target, seed)

        pretrain_dir = out / "pretrain"
        pretrained_file = pretrain_dir / "pretrained.pt"
        pretrained = demo_network(len(SOURCE_CLASSES) + 1, init_filters)
        if pretrained_file.exists() and read_run_record(pretrain_dir / "results.json").get("test"):
            pretrained.load_state_dict(torch.load(pretrained_file, map_location="cpu", weights_only=True))
            logger.info(f"using the foundation model {pretrained_file}")
        else:
            logger.info(f"pretraining the foundation model on {list(SOURCE_CLASSES)} for {pretrain_epochs} epochs")
            set_determinism(seed)
            pretrained = demo_network(len(SOURCE_CLASSES) + 1, init_filters)
            _train_and_test(pretrained, data, "source", SOURCE_CLASSES, pretrain_dir, pretrain_epochs, PRETRAIN_LR,
                            seed, device, progress, verbose,
                            {"method": "full", "preset": "foundation", "task": "source", "classes": list(SOURCE_CLASSES)})
            atomic_torch_save({k: v.cpu() for k, v in pretrained.state_dict().items()}, pretrained_file)
        pretrained = pretrained.cpu()
        rec = read_run_record(pretrain_dir / "results.json")
        foundation = {"classes": list(SOURCE_CLASSES), "test_dice": rec.get("test", {}).get("mean_dice"),
                      "per_class_dice": rec.get("test", {}).get("per_class_dice"),
                      "best_val_dice": rec.get("validation", {}).get("best_mean_dice"),
                      "epochs": len(rec.get("history", [])), "run_dir": str(pretrain_dir)}

        rows = []
        for method in methods:
            set_determinism(seed)
            net = _plain_copy_with_new_head(copy.deepcopy(pretrained), len(TARGET_CLASSES) + 1, init_filters)
            options = DEMO_METHODS[method]["options"]
            model = monai_peft.adapt(net, method, **options)
            logger.info(f"fine-tuning with {method} (lr {lrs[method]:g}) for {epochs} epochs")
            rec = _train_and_test(model, data, "target", TARGET_CLASSES, out / method, epochs, lrs[method], seed,
                                  device, progress, verbose,
                                  {"method": method, "preset": method, "classes": list(TARGET_CLASSES),
                                   "options": options, "lr": lrs[method]})
            params, test, costs = rec.get("parameters", {}), rec.get("test", {}), rec.get("costs", {})
            rows.append({
                "method": method,
                "lr": lrs[method],
                "trainable": params.get("trainable"),
                "total": params.get("total"),
                "trainable_percent": params.get("trainable_percent"),
                "test_dice": test.get("mean_dice"),
                "test_nsd": test.get("mean_nsd"),
                "per_class_dice": test.get("per_class_dice"),
                "best_val_dice": rec.get("validation", {}).get("best_mean_dice"),
                "train_s_per_volume": costs.get("train_s_per_volume"),
                "inference_s_per_volume": costs.get("inference_s_per_volume"),
                "peak_memory_gb": costs.get("train_peak_memory_gb"),
                "memory_source": costs.get("memory_source"),
                "run_dir": str(out / method),
            })
        result = {
            "foundation": foundation,
            "rows": rows,
            "settings": {"methods": list(methods), "epochs": epochs, "pretrain_epochs": pretrain_epochs,
                         "n_pretrain": list(n_pretrain), "n_target": list(n_target), "learning_rates": lrs,
                         "pretrain_lr": PRETRAIN_LR, "seed": seed, "init_filters": init_filters,
                         "phantom": {"size": PHANTOM_SIZE, "spacing_mm": PHANTOM_SPACING, "phase": "venous",
                                     "organ_scale": PHANTOM_ORGAN_SCALE, "roi_size": list(ROI_SIZE)},
                         "device": str(device), "threads": torch.get_num_threads(),
                         "source_classes": list(SOURCE_CLASSES), "target_classes": list(TARGET_CLASSES),
                         "costs": "seconds per volume of the network step; training skips its first iteration, "
                                  "inference follows one warm-up pass"},
            "wall_seconds": time.perf_counter() - t_start,
            # with one thread, the process's CPU time is about the wall time on an otherwise idle machine
            "cpu_seconds": time.process_time() - cpu_start,
        }
        atomic_write_json(out / "comparison.json", result)
        plot_comparison(rows, out / "comparison.png")
        _plot_curves([pretrain_dir] + [out / m for m in methods], out / "curves.png")
        return result
    finally:
        torch.set_num_threads(old_threads)


def _plot_curves(run_dirs: Sequence[Path], path: Path) -> Path:
    from monai_peft.analysis.curves import load_curves, plot_curves

    curves = load_curves([d / "results.json" for d in run_dirs])
    for c in curves:
        if c.preset == "foundation":
            c.label = "foundation model (source task)"
    return plot_curves(curves, path, title="monai-peft demo: validation Dice over epochs")


def format_table(rows: Sequence[dict[str, Any]], foundation: Mapping[str, Any] | None = None) -> str:
    """The comparison as a plain-text table (one row per method), under the foundation model's own Dice."""

    def num(v: Any, fmt: str) -> str:
        return "n/a" if v is None else format(v, fmt)

    lines = []
    if foundation is not None:
        lines.append(f"foundation model on its own task ({', '.join(foundation['classes'])}): test Dice "
                     f"{num(foundation.get('test_dice'), '.3f')}")
        lines.append("")
    header = (f"{'method':<13}{'lr':>8}{'trainable':>11}{'% of net':>10}{'test Dice':>11}{'NSD':>7}"
              f"{'train s/vol':>13}{'infer s/vol':>13}")
    lines += [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r['method']:<13}{num(r.get('lr'), 'g'):>8}{num(r['trainable'], ','):>11}"
            f"{num(r['trainable_percent'], '.2f'):>10}{num(r['test_dice'], '.3f'):>11}{num(r['test_nsd'], '.3f'):>7}"
            f"{num(r['train_s_per_volume'], '.3f'):>13}{num(r['inference_s_per_volume'], '.3f'):>13}"
        )
    lines.append("costs: seconds per volume of the network step, measured after a warm-up (training: its first "
                 "iteration left out; inference: one warm-up pass)")
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
