"""One comparison of the PEFT families on the echo tasks: LoRA, VPT (shallow / deep), bottleneck adapters (Houlsby /
parallel), BitFit, head-only and full fine-tuning from one pretrained backbone (lecture 003; echo seed 000, the
comparison its Tables I-IV stop short of).

Every method trains the same task head plus its own parameters, at each learning rate of its grid
(:data:`METHODS`); the rate with the best validation metric is kept and that model is scored on the test split.
Costs come from a separate pass: training steps of all methods interleaved on one fixed batch after a warm-up, the
median step time per method, its ratio to full fine-tuning, and the peak memory one step allocates on top of what is
held before it (weights, optimizer state; reported separately).

A task is one :data:`COMPARE_TASKS` entry: its ``prepare(settings)`` returns the datasets, a factory for fresh copies
of the pretrained backbone, the head, the loss, the scorer and the task's LoRA placement. The echo-seed tasks
(``segmentation``, ``view``, ``volume``, ``age``) share :func:`camus_task` (Segformer); ``ef`` is the video EF task
(:func:`monai_peft.echo.video.compare_task.video_ef_task`: MAE-pretrained VideoMAE, EF MAE / RMSE / R^2; VPT and
bottleneck adapters find VideoMAE's blocks themselves).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn as nn
from monai.data import DataLoader
from torch.utils.data import Dataset

from monai_peft.io import atomic_save_figure

from .data import camus_task_dataset
from .models import MIT_VARIANTS, EchoTaskModel
from .multitask import echo_lora_config, load_backbone
from .tasks import get_task
from .training import evaluate, fit, pretrain, write_json

__all__ = ["CompareSettings", "CompareMethod", "CompareTask", "TaskSetup", "METHODS", "COMPARE_TASKS", "camus_task",
           "choose_lr", "measure_costs", "run_comparison", "comparison_table", "plot_comparison", "fast_settings",
           "FAST_LRS"]

logger = logging.getLogger(__name__)

# narrow MiT-B0 for CPU runs (as `monai-peft echo demo --tiny`)
TINY_SEGFORMER = {"hidden_sizes": [8, 16, 32, 64], "decoder_hidden_size": 16, "num_attention_heads": [1, 1, 2, 2]}
SMALL_HEAD = {"conv_channels": [8, 16, 32], "fc_features": [64, 32]}  # echo seed Table I note d


@dataclass(frozen=True)
class CompareSettings:
    """Data, backbone and budget of one comparison.

    Args:
        out: output folder (phantoms, the pretrained backbone, ``comparison.json`` / ``.png``).
        camus: CAMUS folder; None writes a phantom (``num_patients`` patients) into ``out/data/camus``.
        echonet: EchoNet-Dynamic folder for pretraining; None writes a phantom into ``out/data/echonet``.
        backbone: pretrained backbone folder (``monai-peft echo pretrain``); None pretrains on ``echonet``.
        size: input side. epochs: training epochs per run. batch_size: batch size.
        pretrain_epochs: epochs of the pretext task when pretraining here.
        tiny: narrow MiT-B0 (TINY_SEGFORMER) when pretraining here; False uses MiT-B0.
        num_patients / num_videos: phantom sizes.
        video_checkpoint: VideoMAE checkpoint folder for the ``ef`` task (``monai-peft echo video-pretrain``
            ``OUT/checkpoint``); None MAE-pretrains the tiny VideoMAE of ``echo video-demo`` on the EF videos' TRAIN
            split. The EF videos are ``echonet`` when given, else ``num_ef_videos`` phantom videos.
        num_ef_videos: EF phantom videos (60 / 20 / 20 % train / validation / test). video_pretrain_epochs: MAE
            epochs when pretraining here. video_epochs: EF training epochs per run (instead of ``epochs``).
        video_stride: frame step inside a clip (the tiny VideoMAE's 2; EchoNet-Dynamic at 30 fps with 16-frame
            VideoMAE clips: 4). video_clips: clips averaged per video at evaluation.
        video_cache_rate: fraction of decoded, resized videos kept in memory (EchoNet-Dynamic at 112 pixels: about
            2 MB per video).
        cost_rounds: interleaved timing rounds per method (after one warm-up step each).
        seed: seed of every run (weights of new parameters, batch order). device: torch device.
        progress: tqdm bars.
    """

    out: str
    camus: Optional[str] = None
    echonet: Optional[str] = None
    backbone: Optional[str] = None
    size: int = 64
    epochs: int = 8
    batch_size: int = 8
    pretrain_epochs: int = 6
    tiny: bool = True
    num_patients: int = 30
    num_videos: int = 16
    video_checkpoint: Optional[str] = None
    num_ef_videos: int = 120
    video_pretrain_epochs: int = 150
    video_epochs: int = 30
    video_stride: int = 2
    video_clips: int = 2
    video_cache_rate: float = 1.0
    cost_rounds: int = 5
    seed: int = 0
    device: str = "cpu"
    progress: bool = False


@dataclass
class TaskSetup:
    """What one task gives the comparison (returned by :attr:`CompareTask.prepare`).

    Args:
        train, val, test: datasets of ``{"image": input, "label": target, ...}`` samples.
        new_backbone: a fresh copy of the pretrained backbone (frozen or not is up to the method).
        new_head: the task head for a backbone: ``new_head(backbone) -> nn.Module``.
        loss: ``loss(output, label)``.
        score: ``score(model, dataset) -> dict`` holding the task's metric.
        lora_config: the task's LoRA config for a backbone (LoRA placement is model-specific).
        epochs: training epochs of every run of this task; None uses ``CompareSettings.epochs``.
        reference: a result without training shown beside the methods, on the test split, e.g.
            ``{"label": "predict the training mean EF", "mae": ..., ...}``; None shows none.
    """

    train: Dataset
    val: Dataset
    test: Dataset
    new_backbone: Callable[[], nn.Module]
    new_head: Callable[[nn.Module], nn.Module]
    loss: nn.Module
    score: Callable[[nn.Module, Dataset], dict]
    lora_config: Callable[[nn.Module], Any]
    epochs: Optional[int] = None
    reference: Optional[dict] = None


@dataclass(frozen=True)
class CompareTask:
    """One row of :data:`COMPARE_TASKS`.

    Args:
        name: task name. metric: key of the score dict (``mean_dice``, ``accuracy``, ``mae``).
        higher_is_better: direction of the metric. prepare: ``prepare(settings) -> TaskSetup``.
        extra_metrics: further keys of the score dict shown in the table (test split), e.g. ``("rmse", "r2")``.
        lrs: learning-rate grids of this task replacing a method's default grid (:data:`METHODS`), by method name.
    """

    name: str
    metric: str
    higher_is_better: bool
    prepare: Callable[[CompareSettings], TaskSetup]
    extra_metrics: tuple[str, ...] = ()
    lrs: dict[str, tuple[float, ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class CompareMethod:
    """One row of :data:`METHODS`: how to make a backbone trainable, and the learning rates to try.

    Args:
        label: shown in the table. lrs: learning-rate grid (Adam), chosen on the validation split.
        wrap: ``wrap(backbone, setup) -> nn.Module``: the backbone with this method's trainable parameters (a peft
            method's config is recorded in the JSON).
    """

    label: str
    lrs: tuple[float, ...]
    wrap: Callable[[nn.Module, TaskSetup], nn.Module]


def _peft(config_factory: Callable[[nn.Module, TaskSetup], Any], backbone: nn.Module, setup: TaskSetup) -> nn.Module:
    import peft

    return peft.get_peft_model(backbone, config_factory(backbone, setup))


def _adapt(method: str, options: dict, backbone: nn.Module, setup: TaskSetup) -> nn.Module:
    from monai_peft.adapt import adapt

    return adapt(backbone, method, **options)


def _frozen(backbone: nn.Module, setup: TaskSetup) -> nn.Module:
    return backbone.requires_grad_(False)


def _full(backbone: nn.Module, setup: TaskSetup) -> nn.Module:
    return backbone.requires_grad_(True)


# Adam learning-rate grids, widened on the default run until most methods' best rate lay inside them
# (docs/transformer_peft.md, "Learning rates")
_PEFT_LRS = (3e-3, 1e-2, 3e-2, 1e-1)
_VPT_LRS = (1e-2, 3e-2, 1e-1, 3e-1)  # prompts take larger steps (Jia et al. tune base rates up to 50 with SGD)
# method name -> row; each method trains the task head too (the echo seed's "adapter" = LoRA + task head)
METHODS: dict[str, CompareMethod] = {
    "lora": CompareMethod("LoRA (the task's placement)", _PEFT_LRS, partial(_peft, lambda b, s: s.lora_config(b))),
    "vpt-shallow": CompareMethod("VPT-shallow", _VPT_LRS, partial(_adapt, "vpt", {"variant": "shallow"})),
    "vpt-deep": CompareMethod("VPT-deep", _VPT_LRS, partial(_adapt, "vpt", {"variant": "deep"})),
    "houlsby": CompareMethod("bottleneck, sequential (Houlsby)", _PEFT_LRS,
                             partial(_adapt, "bottleneck", {"insertion": "sequential"})),
    "parallel": CompareMethod("bottleneck, parallel (He et al.)", _PEFT_LRS,
                              partial(_adapt, "bottleneck", {"insertion": "parallel"})),
    "bitfit": CompareMethod("BitFit", _PEFT_LRS, partial(_adapt, "bitfit", {})),
    "head": CompareMethod("head only", _PEFT_LRS, _frozen),
    "full": CompareMethod("full fine-tuning", (3e-4, 1e-3, 3e-3, 1e-2), _full),
}


# ----------------------------------------------------------------------------------------------- echo-seed tasks
def _ensure_backbone(settings: CompareSettings) -> str:
    """The pretrained backbone folder: ``settings.backbone``, or pretrained here on (phantom) EchoNet once."""
    if settings.backbone:
        return settings.backbone
    out = Path(settings.out)
    widths = (TINY_SEGFORMER if settings.tiny else MIT_VARIANTS["b0"])["hidden_sizes"]
    meta = out / "backbone" / "backbone.json"
    if (out / "backbone" / "backbone.safetensors").is_file() and meta.is_file():
        if json.loads(meta.read_text()).get("segformer_config", {}).get("hidden_sizes") == widths:
            return str(out / "backbone")  # pretrained by an earlier run with the same widths
    echonet = settings.echonet
    if echonet is None:
        from .phantom import write_echonet_phantom

        echonet = str(out / "data" / "echonet")
        write_echonet_phantom(echonet, settings.num_videos, 16, 112, seed=settings.seed + 1)
    torch.manual_seed(settings.seed)  # the pretrained backbone, and so the whole comparison, follows the seed
    pretrain(echonet, out, "b0", settings.size, settings.pretrain_epochs, settings.batch_size, 1e-3, 1e-4,
             config_overrides=TINY_SEGFORMER if settings.tiny else None, device=settings.device,
             progress=settings.progress)
    return str(out / "backbone")


def _ensure_camus(settings: CompareSettings) -> str:
    if settings.camus:
        return settings.camus
    root = Path(settings.out) / "data" / "camus"
    if not (root / "database_split").is_dir():
        from .phantom import write_camus_phantom

        write_camus_phantom(root, settings.num_patients, "2023", (128, 112), seed=settings.seed + 2)
    return str(root)


def camus_task(task: str, settings: CompareSettings) -> TaskSetup:
    """An echo-seed task on CAMUS (official training / validation / testing splits) on the pretrained Segformer."""
    spec = get_task(task) if task == "segmentation" else get_task(task, **SMALL_HEAD)
    backbone_dir, camus = _ensure_backbone(settings), _ensure_camus(settings)
    pretrained, _ = load_backbone(backbone_dir)
    splits = {}
    for split in ("training", "validation", "testing"):
        try:
            splits[split] = camus_task_dataset(camus, spec, split=split, size=settings.size)
        except ValueError as e:
            raise ValueError(f"{camus}: the comparison needs CAMUS '{split}' frames (database_split/subgroup_"
                             f"{split}.txt): {e}") from e
    return TaskSetup(
        train=splits["training"], val=splits["validation"], test=splits["testing"],
        new_backbone=lambda: copy.deepcopy(pretrained),
        new_head=lambda backbone: spec.build_head(backbone.out_channels),
        loss=spec.loss(),
        score=lambda model, ds: evaluate(model, ds, spec, settings.batch_size, settings.device)["all"],
        lora_config=lambda backbone: echo_lora_config("attention", r=4),
    )


def _video_ef_task(settings: CompareSettings) -> TaskSetup:
    from .video.compare_task import video_ef_task  # imports this module's TaskSetup

    return video_ef_task(settings)


COMPARE_TASKS: dict[str, CompareTask] = {
    "segmentation": CompareTask("segmentation", "mean_dice", True, partial(camus_task, "segmentation")),
    "view": CompareTask("view", "accuracy", True, partial(camus_task, "view")),
    "volume": CompareTask("volume", "mae", False, partial(camus_task, "volume")),
    "age": CompareTask("age", "mae", False, partial(camus_task, "age")),
    # LoRA and bottleneck adapters had their best EF rate at the lower edge of the default grid: one step lower here
    "ef": CompareTask("ef", "mae", False, _video_ef_task, extra_metrics=("rmse", "r2"),
                      lrs={m: (1e-3, 3e-3, 1e-2, 3e-2) for m in ("lora", "houlsby", "parallel")}),
}


# ----------------------------------------------------------------------------------------------------- running
def choose_lr(grid: Sequence[dict], higher_is_better: bool) -> int:
    """Index of the best ``grid[i]["val"]`` (ties: the first); runs that gave NaN count as worst.

    Raises:
        ValueError: empty grid or every run gave NaN.
    """
    vals = [g["val"] for g in grid]
    ok = [i for i, v in enumerate(vals) if v is not None and math.isfinite(v)]
    if not ok:
        raise ValueError(f"choose_lr: no learning rate gave a finite validation metric ({vals}).")
    return max(ok, key=lambda i: (vals[i] if higher_is_better else -vals[i], -i))


def _build(method: str, setup: TaskSetup) -> tuple[nn.Module, int]:
    """The task model for ``method`` and the parameter count of the plain (unadapted) task model."""
    backbone = setup.new_backbone()
    head = setup.new_head(backbone)
    base_total = sum(p.numel() for p in backbone.parameters()) + sum(p.numel() for p in head.parameters())
    return EchoTaskModel(METHODS[method].wrap(backbone, setup), head.requires_grad_(True)), base_total


def _peft_config(model: nn.Module) -> Optional[dict]:
    """The adapter config of a task model whose backbone is a ``PeftModel`` (JSON-ready), else None."""
    configs = getattr(getattr(model, "backbone", None), "peft_config", None)
    if not configs:
        return None
    d = next(iter(configs.values())).to_dict()
    return json.loads(json.dumps({k: v for k, v in d.items() if v is not None},
                                 default=lambda o: sorted(o) if isinstance(o, (set, frozenset)) else str(o)))


def _loader(dataset: Dataset, batch_size: int, seed: int) -> DataLoader:
    """Shuffled batches; MONAI's loader also seeds the random transforms (e.g. video clip starts) from ``seed``, so
    every run of a grid sees the same batches."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))


def _train_one(method: str, lr: float, setup: TaskSetup, settings: CompareSettings) -> tuple[nn.Module, dict]:
    torch.manual_seed(settings.seed)
    model, base_total = _build(method, setup)
    t0 = time.perf_counter()
    epochs = setup.epochs if setup.epochs is not None else settings.epochs
    history = fit(model, _loader(setup.train, settings.batch_size, settings.seed), setup.loss, epochs, lr,
                  device=settings.device, progress=settings.progress)
    record = {"lr": lr, "train_loss": history, "seconds": time.perf_counter() - t0, "peft_config": _peft_config(model),
              "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
              "total_params": base_total}
    return model, record


def _step(model: nn.Module, opt: torch.optim.Optimizer, loss_fn: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    opt.zero_grad(set_to_none=True)
    loss_fn(model(x), y).backward()
    opt.step()


def _peak_step_bytes(model, opt, loss_fn, x, y, device: torch.device) -> int:
    """Peak bytes one training step allocates above what is allocated before it (CUDA: allocator statistics;
    CPU: the allocations and frees the profiler records, replayed in order)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        _step(model, opt, loss_fn, x, y)
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - before)
    from torch.profiler import ProfilerActivity, profile

    os.environ.setdefault("KINETO_LOG_LEVEL", "99")  # keep the profiler's start/stop lines out of the output
    opt.zero_grad(set_to_none=True)  # free the last gradients outside the record: they count as the step's own
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        _step(model, opt, loss_fn, x, y)
    raw = getattr(getattr(prof.profiler, "kineto_results", None), "events", None)
    if raw is not None:  # the raw allocation records: fast (the parsed event tree takes seconds per step)
        changes = sorted((e.start_ns(), e.nbytes()) for e in raw() if e.name() == "[memory]")
    else:
        changes = sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events())
    live = peak = 0
    for _, nbytes in changes:
        live += nbytes
        peak = max(peak, live)
    return int(peak)


def measure_costs(models: dict[str, tuple[nn.Module, float]], loss_fn: nn.Module, batch: dict,
                  device: str | torch.device = "cpu", rounds: int = 5) -> dict[str, dict]:
    """Step time and memory of each model, measured interleaved after a warm-up.

    Args:
        models: method name -> (task model, learning rate).
        loss_fn: ``loss_fn(output, label)``.
        batch: one batch ``{"image", "label"}``, the same for all methods.
        device: device. rounds: timed steps per method; each round visits the methods in a rotated order.

    Returns:
        Per method: ``step_seconds`` (median), ``peak_step_mb`` (see :func:`_peak_step_bytes`), ``optimizer_state_mb``
        (Adam moments held between steps) and ``step_time_vs_full`` / ``peak_vs_full`` when ``"full"`` is measured.
    """
    device = torch.device(device)
    x, y = batch["image"].to(device), batch["label"].to(device)
    opts = {}
    for name, (model, lr) in models.items():
        model.to(device).train()
        opts[name] = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
        _step(model, opts[name], loss_fn, x, y)  # warm-up, creates the optimizer state
    times: dict[str, list[float]] = {name: [] for name in models}
    names = list(models)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            _step(models[name][0], opts[name], loss_fn, x, y)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times[name].append(time.perf_counter() - t0)
    out = {}
    for name, (model, _) in models.items():
        state = sum(t.numel() * t.element_size() for s in opts[name].state.values() for t in s.values()
                    if torch.is_tensor(t))
        out[name] = {"step_seconds": statistics.median(times[name]),
                     "peak_step_mb": _peak_step_bytes(model, opts[name], loss_fn, x, y, device) / 2**20,
                     "optimizer_state_mb": state / 2**20}
    if "full" in out:
        for name in out:
            out[name]["step_time_vs_full"] = out[name]["step_seconds"] / out["full"]["step_seconds"]
            out[name]["peak_vs_full"] = out[name]["peak_step_mb"] / max(out["full"]["peak_step_mb"], 1e-9)
    return out


def _compare_task(task: CompareTask, methods: Sequence[str], settings: CompareSettings,
                  lrs: dict[str, Sequence[float]]) -> dict:
    setup = task.prepare(settings)
    rows: dict[str, dict] = {}
    chosen: dict[str, tuple[nn.Module, float]] = {}
    for method in methods:
        grid, models = [], []
        for lr in lrs.get(method, task.lrs.get(method, METHODS[method].lrs)):
            model, record = _train_one(method, float(lr), setup, settings)
            record["val"] = float(setup.score(model, setup.val)[task.metric])
            logger.info("%s / %s lr %g: validation %s %.4f", task.name, method, lr, task.metric, record["val"])
            grid.append(record)
            models.append(model)
        best = choose_lr(grid, task.higher_is_better)
        test = setup.score(models[best], setup.test)
        rows[method] = {
            "label": METHODS[method].label, "peft_config": grid[best]["peft_config"],
            "trainable_params": grid[best]["trainable_params"], "total_params": grid[best]["total_params"],
            "percent_trainable": 100.0 * grid[best]["trainable_params"] / grid[best]["total_params"],
            "lr": grid[best]["lr"], "val": grid[best]["val"], "test": float(test[task.metric]), "test_scores": test,
            "train_seconds": grid[best]["seconds"],
            "lr_grid": [{k: g[k] for k in ("lr", "val", "train_loss", "seconds")} for g in grid],
        }
        chosen[method] = (_build(method, setup)[0], grid[best]["lr"])
        del models
    batch = next(iter(_loader(setup.train, settings.batch_size, settings.seed)))
    costs = measure_costs(chosen, setup.loss, batch, settings.device, settings.cost_rounds)
    for method in methods:
        rows[method].update(costs[method])
    return {"metric": task.metric, "higher_is_better": task.higher_is_better,
            "extra_metrics": list(task.extra_metrics), "num_train": len(setup.train), "num_val": len(setup.val),
            "num_test": len(setup.test), "reference": setup.reference, "methods": rows}


def run_comparison(settings: CompareSettings, tasks: Sequence[str] = ("segmentation",),
                   methods: Optional[Sequence[str]] = None,
                   lrs: Optional[dict[str, Sequence[float]]] = None) -> dict:
    """Run the comparison and write ``comparison.json`` and ``comparison.png`` into ``settings.out``.

    Args:
        settings: data, backbone and budget (:class:`CompareSettings`).
        tasks: :data:`COMPARE_TASKS` keys. Default ``("segmentation",)``.
        methods: :data:`METHODS` keys. Default all, in table order.
        lrs: per-method learning-rate grids replacing the defaults (the task's, else the method's), e.g.
            ``{"lora": [1e-3]}``.

    Returns:
        ``{"settings", "tasks": {task: {"metric", "methods": {method: row}}}, "seconds"}``; a row holds the
        trainable / total parameters, the chosen learning rate with its validation and test metric, every grid
        run, the median step time, peak step memory and optimizer state, and their ratios to full fine-tuning.

    Raises:
        ValueError: an unknown task or method (named), or a split without frames.
    """
    methods = list(methods) if methods is not None else list(METHODS)
    lrs = dict(lrs or {})
    for kind, names, table in (("task", tasks, COMPARE_TASKS), ("method", methods, METHODS),
                               ("method in lrs", lrs, METHODS)):
        bad = [n for n in names if n not in table]
        if bad:
            raise ValueError(f"unknown {kind} {bad[0]!r}; expected one of {', '.join(table)}.")
    for name, grid in lrs.items():
        if not grid or any(not (float(lr) > 0) for lr in grid):
            raise ValueError(f"lrs[{name!r}]: expected positive learning rates, got {list(grid)!r}.")
    t0 = time.time()
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    result: dict = {"settings": asdict(settings), "tasks": {}}
    for name in tasks:
        logger.info("comparison: task %s, methods %s", name, ", ".join(methods))
        result["tasks"][name] = _compare_task(COMPARE_TASKS[name], methods, settings, lrs)
    result["seconds"] = time.time() - t0
    result["device"] = settings.device
    write_json(result, out / "comparison.json")
    plot_comparison(result, out / "comparison.png")
    return result


# ----------------------------------------------------------------------------------------------------- report
def comparison_table(result: dict) -> str:
    """A Markdown table per task: method, trainable parameters, chosen lr, validation / test metric (and the task's
    extra test metrics), costs."""
    lines = []
    for task, res in result["tasks"].items():
        m, extra = res["metric"], res.get("extra_metrics", [])
        lines += [f"### {task} ({m}, {'higher' if res['higher_is_better'] else 'lower'} is better; "
                  f"{res['num_train']} / {res['num_val']} / {res['num_test']} train / val / test samples)", "",
                  f"| method | trainable params | % of model | lr | val {m} | test {m} | "
                  + "".join(f"test {k} | " for k in extra)
                  + "step ms | step vs full | peak step MB | optimizer state MB |",
                  "|---|" + "---:|" * (9 + len(extra))]
        ref = res.get("reference")
        if ref:
            scores = "".join("- | " if ref.get(k) is None else f"{ref[k]:.3f} | " for k in (m, *extra))
            lines.append(f"| ({ref['label']}) | 0 | 0.00 | - | - | {scores}- | - | - | - |")
        for name, r in res["methods"].items():
            ratio = f"{r['step_time_vs_full']:.2f}" if "step_time_vs_full" in r else "-"
            more = "".join("- | " if r["test_scores"].get(k) is None else f"{r['test_scores'][k]:.3f} | "
                           for k in extra)
            lines.append(f"| {name} | {r['trainable_params']:,} | {r['percent_trainable']:.2f} | {r['lr']:g} | "
                         f"{r['val']:.3f} | {r['test']:.3f} | {more}{1000 * r['step_seconds']:.1f} | {ratio} | "
                         f"{r['peak_step_mb']:.1f} | {r['optimizer_state_mb']:.2f} |")
        lines.append("")
    return "\n".join(lines)


def plot_comparison(result: dict, png: str | os.PathLike) -> Path:
    """Per task: test metric vs trainable parameters, validation metric vs learning rate, step time and memory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(result["tasks"].items())
    fig, axes = plt.subplots(len(tasks), 3, figsize=(16, 4.6 * len(tasks)), squeeze=False)
    for row, (task, res) in zip(axes, tasks):
        names = list(res["methods"])
        colors = {n: plt.cm.tab10(i % 10) for i, n in enumerate(names)}
        ax = row[0]
        for n, r in res["methods"].items():
            ax.scatter(r["trainable_params"], r["test"], color=colors[n], s=50)
            ax.annotate(n, (r["trainable_params"], r["test"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ref = res.get("reference")
        if ref and ref.get(res["metric"]) is not None:
            ax.axhline(ref[res["metric"]], color="k", ls="--", lw=1, label=ref["label"])
            ax.legend(fontsize=7)
        ax.set(xscale="log", xlabel="trainable parameters", ylabel=f"test {res['metric']}", title=f"{task}: test")
        ax = row[1]
        for n, r in res["methods"].items():
            g = r["lr_grid"]
            ax.plot([x["lr"] for x in g], [x["val"] for x in g], "o-", color=colors[n], label=n)
            ax.plot([r["lr"]], [r["val"]], "*", color=colors[n], markersize=14)
        ax.set(xscale="log", xlabel="learning rate (Adam)", ylabel=f"validation {res['metric']}",
               title="learning-rate grid (star: chosen)")
        ax.legend(fontsize=7)
        ax = row[2]
        pos = np.arange(len(names))
        ax.bar(pos - 0.2, [1000 * res["methods"][n]["step_seconds"] for n in names], 0.4, label="step ms",
               color="tab:blue")
        ax2 = ax.twinx()
        ax2.bar(pos + 0.2, [res["methods"][n]["peak_step_mb"] for n in names], 0.4, label="peak step MB",
                color="tab:orange")
        ax.set_xticks(pos, names, rotation=35, ha="right", fontsize=8)
        ax.set(ylabel="median step time (ms)", title=f"costs ({result.get('device', 'cpu')})")
        ax2.set_ylabel("peak memory of a step (MB)")
        ax.legend(loc="upper left", fontsize=7)
        ax2.legend(loc="upper right", fontsize=7)
    fig.tight_layout()
    try:
        return atomic_save_figure(fig, png, dpi=90)
    finally:
        plt.close(fig)


# one learning rate per method for smoke runs (the middle of each default grid)
FAST_LRS: dict[str, tuple[float, ...]] = {name: (m.lrs[len(m.lrs) // 2],) for name, m in METHODS.items()}


def fast_settings(out: str | os.PathLike, **overrides: Any) -> CompareSettings:
    """Settings for tests and smoke runs: tiny phantoms (10 EF videos), 32-pixel inputs, one epoch (MAE pretraining
    too), two timing rounds."""
    base = CompareSettings(out=str(out), size=32, epochs=1, batch_size=4, pretrain_epochs=1, num_patients=5,
                           num_videos=4, num_ef_videos=10, video_pretrain_epochs=1, video_epochs=1, cost_rounds=2)
    return replace(base, **overrides)
