"""Epoch time and peak memory of the PEFT nnU-Net trainers against the stock ``nnUNetTrainer`` (issue 12).

One phantom dataset (``nnunet_plugin.phantoms``) is planned and preprocessed once (``nnUNetv2_plan_and_preprocess``,
``3d_fullres``); every trainer is built from the same plans with nnU-Net's own ``get_trainer_from_args``, the PEFT
trainers load the stock network's weights as ``-pretrained_weights`` would, and all of them live in one process:

- **epoch time**: ``--iterations`` calls of each trainer's own ``train_step`` (forward, deep-supervision loss,
  backward, gradient clipping, optimizer step, nnU-Net's autocast on CUDA) on the same pre-fetched augmented
  batches, in interleaved rounds after warm-up (``harness.interleaved_times``); median seconds and the median of the
  per-round ratios to the stock trainer. Data loading and augmentation are the same for every trainer (nnU-Net runs
  them in background workers); the time the stock loader took for those batches is reported beside, and
  ``epoch incl. data`` adds it to every trainer;
- **peak memory** of one training step in a fresh process per trainer (CUDA max allocated; CPU peak resident set
  minus the resident set before the trainer was built; see ``harness``);
- **trainable parameters** and the size of the adapter file the plugin writes beside nnU-Net's checkpoint
  (``save_adapter_file``) against the stock checkpoint's network weights.

A variant ``NAME+ckpt`` runs trainer ``NAME`` with ``nnUNet_peft_activation_checkpointing=1``. The environment is
nnU-Net's CPU-friendly one: ``nnUNet_compile=0`` (``--compile`` sets 1, nnU-Net's GPU default), ``nnUNet_def_n_proc=1``,
``nnUNet_n_proc_DA=0``. Timings on a shared machine are disturbed by other load; take quotable figures on a quiet
one. Usage::

    python benchmarks/bench_nnunet.py --device cpu                  # 48^3 phantoms, 10 iterations, 3 rounds
    python benchmarks/bench_nnunet.py --device cuda --shape 128 --iterations 50
    python benchmarks/bench_nnunet.py --device cpu --quick          # 24^3, 2 iterations, 1 round

Writes ``<out>.json`` and ``<out>.png``; prints a Markdown table.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

logger = logging.getLogger("bench_nnunet")
DATASET_ID = 987
DATASET_NAME = "BenchPhantom"
CONFIGURATION = "3d_fullres"
STOCK = "nnUNetTrainer"
TRAINERS = (STOCK, "nnUNetTrainerConvAdapter", "nnUNetTrainerLoRA", "nnUNetTrainerSSF",
            "nnUNetTrainerConvAdapter+ckpt")
CHECKPOINTING_SUFFIX = "+ckpt"


def nnunet_environment(work: Path, compile_network: bool) -> dict[str, str]:
    """nnU-Net's folders under ``work`` and the settings of this benchmark (set before nnunetv2 is imported)."""
    return {
        "nnUNet_raw": str(work / "raw"), "nnUNet_preprocessed": str(work / "preprocessed"),
        "nnUNet_results": str(work / "results"), "nnUNet_compile": "1" if compile_network else "0",
        "nnUNet_def_n_proc": "1", "nnUNet_n_proc_DA": "0", "nnUNet_peft_final_validation": "0",
    }


def prepare_dataset(work: Path, args: argparse.Namespace) -> None:
    """Phantom raw dataset, plans and preprocessed data (skipped when ``work`` already holds them)."""
    from nnunet_plugin.phantoms import make_phantom_dataset

    if (work / "preprocessed" / f"Dataset{DATASET_ID}_{DATASET_NAME}" / "nnUNetPlans.json").is_file():
        return
    make_phantom_dataset(work / "raw", DATASET_ID, DATASET_NAME, num_cases=args.cases, shape=(args.shape,) * 3,
                         num_labels=2)
    logger.info("planning and preprocessing %d phantoms of %d^3", args.cases, args.shape)
    proc = subprocess.run(
        [sys.executable, "-c", "import sys; from nnunetv2.experiment_planning.plan_and_preprocess_entrypoints import "
         "plan_and_preprocess_entry as f; sys.argv[0] = 'nnUNetv2_plan_and_preprocess'; f()",
         "-d", str(DATASET_ID), "-c", CONFIGURATION, "-np", "1", "-npfp", "1"],
        # nnU-Net's planner sets torch's threads to nnUNet_n_proc_DA, which must be > 0 there
        env={**os.environ, "nnUNet_n_proc_DA": "1"}, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"nnUNetv2_plan_and_preprocess failed:\n{proc.stderr[-3000:]}")


@contextmanager
def _checkpointing(on: bool):
    key = "nnUNet_peft_activation_checkpointing"
    old = os.environ.get(key)
    if on:
        os.environ[key] = "1"
    try:
        yield
    finally:
        if on:
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


def build_trainer(name: str, device: torch.device, pretrained: Path | None):
    """An initialised trainer ``name`` (``+ckpt``: with activation checkpointing) on ``device``; PEFT trainers load
    ``pretrained`` as ``nnUNetv2_train -pretrained_weights`` does."""
    from nnunetv2.run.run_training import get_trainer_from_args, maybe_load_checkpoint

    trainer_name = name.removesuffix(CHECKPOINTING_SUFFIX)
    torch.manual_seed(0)
    with _checkpointing(name.endswith(CHECKPOINTING_SUFFIX)):
        trainer = get_trainer_from_args(str(DATASET_ID), CONFIGURATION, 0, trainer_name, "nnUNetPlans",
                                        device=device)
        trainer.initialize()
    if trainer_name != STOCK and pretrained is not None:
        maybe_load_checkpoint(trainer, False, False, str(pretrained))
    trainer.network.train()
    return trainer


def fetch_batches(trainer, count: int) -> tuple[list[dict[str, Any]], float]:
    """``count`` augmented training batches from nnU-Net's own loader, and the seconds they took."""
    loader, _ = trainer.get_dataloaders()
    start = time.perf_counter()
    batches = [next(loader) for _ in range(count)]
    seconds = time.perf_counter() - start
    keep = [{"data": b["data"], "target": b["target"]} for b in batches]
    return keep, seconds


def _epoch(trainer, batches: list[dict[str, Any]]):
    def call() -> None:
        for batch in batches:
            trainer.train_step(batch)
    return call


def _trainable(trainer) -> tuple[int, int]:
    params = list(trainer.network.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def _file_bytes(trainer, tmp: Path) -> int:
    """Bytes of what a run of ``trainer`` must keep besides the base weights: the plugin's adapter file, or the
    stock network's weights as safetensors."""
    if trainer.__class__.__name__ == STOCK:
        from safetensors.torch import save_model  # nnU-Net's decoder shares the encoder's tensors: stored once

        path = tmp / "stock.safetensors"
        save_model(trainer.network, str(path))
        return path.stat().st_size
    from nnunet_plugin.checkpoints import save_adapter_file

    path = tmp / f"{trainer.__class__.__name__}.adapter.safetensors"
    save_adapter_file(trainer.network, path, {"trainer": trainer.__class__.__name__})
    return path.stat().st_size


def _import_everything(name: str) -> None:
    """Import what building trainer ``name`` imports (nnU-Net, the plugin, peft and the method's layers), so the
    memory baseline taken afterwards holds the code of every trainer alike and the peak only training memory."""
    from torch import nn

    import nnunetv2.run.run_training  # noqa: F401
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    cls = recursive_find_trainer_class_by_name(name.removesuffix(CHECKPOINTING_SUFFIX))
    method = getattr(cls, "peft_method", None)
    if method in ("convadapter", "lora", "ssf", "bitfit"):
        import monai_peft

        monai_peft.adapt(nn.Sequential(nn.Conv3d(1, 2, 3)), method, target=["0"])


def memory_probe(probe: dict[str, Any]) -> dict[str, Any]:
    """One trainer in this fresh process: a warm-up step, then the peak of one step (see ``harness``)."""
    _import_everything(probe["trainer"])
    device = torch.device(probe["device"])
    batches = torch.load(probe["batches"], weights_only=True)
    before = harness.rss_mb() if device.type == "cpu" else 0.0
    trainer = build_trainer(probe["trainer"], device, Path(probe["pretrained"]))
    trainer.train_step(batches[0])
    harness.sync(device)
    harness.reset_peak(device)
    trainer.train_step(batches[1 % len(batches)])
    harness.sync(device)
    return {"peak_mb": harness.peak_mb(device) - before}


def unknown_trainers(names: list[str]) -> list[str]:
    """The names in ``names`` that nnU-Net's trainer discovery does not find (the plugin's trainers included)."""
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    unknown = []
    for name in names:
        try:
            recursive_find_trainer_class_by_name(name.removesuffix(CHECKPOINTING_SUFFIX))
        except RuntimeError:
            unknown.append(name)
    return unknown


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Every measurement (see the module docstring); nnU-Net's environment must point at ``work`` already."""
    device = torch.device(args.device)
    prepare_dataset(work, args)
    stock = build_trainer(STOCK, device, None)
    pretrained = work / "stock_pretrained.pth"
    torch.save({"network_weights": stock.network.state_dict()}, pretrained)
    batches, data_s = fetch_batches(stock, args.iterations)
    batches_file = work / "batches.pt"
    torch.save(batches, batches_file)
    trainers = {STOCK: stock, **{n: build_trainer(n, device, pretrained) for n in args.trainers if n != STOCK}}
    times = harness.interleaved_times({n: _epoch(t, batches) for n, t in trainers.items()}, device, args.warmup,
                                      args.rounds, lambda line: logger.info("epochs: %s", line))
    vs_stock = harness.ratio_medians(times, STOCK)
    with_data = {n: [t + data_s for t in ts] for n, ts in times.items()}
    with_data_vs_stock = harness.ratio_medians(with_data, STOCK)
    probes = {n: {"trainer": n, "device": args.device, "batches": str(batches_file), "pretrained": str(pretrained)}
              for n in trainers}
    with ThreadPoolExecutor(max_workers=args.probe_jobs) as pool:
        futures = {n: pool.submit(harness.measure_in_subprocess, Path(__file__).resolve(), p)
                   for n, p in probes.items()}
        peaks = {n: f.result()["peak_mb"] for n, f in futures.items()}
    rows: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n, trainer in trainers.items():
            trainable, total = _trainable(trainer)
            rows[n] = {
                "trainable": trainable, "total": total, "epoch_s": times[n],
                "median_epoch_s": statistics.median(times[n]), "epoch_vs_stock": vs_stock[n],
                "epoch_with_data_vs_stock": with_data_vs_stock[n], "peak_mb": peaks[n],
                "peak_vs_stock": peaks[n] / peaks[STOCK], "file_bytes": _file_bytes(trainer, Path(tmp)),
            }
    for row in rows.values():
        row["file_vs_stock"] = row["file_bytes"] / rows[STOCK]["file_bytes"]
    plans = stock.configuration_manager
    return {
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "memory_probe", "work")},
        "environment": {**harness.environment(device), "nnunetv2": _nnunet_version()},
        "plans": {"patch_size": list(plans.patch_size), "batch_size": stock.batch_size,
                  "configuration": CONFIGURATION},
        "data_s_per_epoch": data_s, "rows": rows,
    }


def _nnunet_version() -> str:
    from importlib.metadata import version

    return version("nnunetv2")


def table(result: dict[str, Any]) -> str:
    """One Markdown row per trainer."""
    head = ("| trainer | trainable | epoch s | x stock | x stock incl. data | peak MiB | x stock | "
            "file % stock |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, row in result["rows"].items():
        lines.append(f"| {name} | {row['trainable']:,} | {row['median_epoch_s']:.2f} | {row['epoch_vs_stock']:.2f} | "
                     f"{row['epoch_with_data_vs_stock']:.2f} | {row['peak_mb']:.0f} | {row['peak_vs_stock']:.2f} | "
                     f"{100 * row['file_vs_stock']:.2f} |")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    """Epoch time and peak memory of every trainer as ratios to the stock trainer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from monai_peft.io import atomic_save_figure

    rows = result["rows"]
    names = list(rows)
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(names)), 4))
    w = 0.38
    ax.bar([i - w / 2 for i in range(len(names))], [rows[n]["epoch_vs_stock"] for n in names], w,
           label="epoch (train steps) / stock")
    ax.bar([i + w / 2 for i in range(len(names))], [rows[n]["peak_vs_stock"] for n in names], w,
           label="peak memory / stock")
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_xticks(range(len(names)), [n.removeprefix("nnUNetTrainer") or "stock" for n in names], rotation=20)
    p = result["plans"]
    ax.set_title(f"nnU-Net {p['configuration']}, patch {p['patch_size']}, batch {p['batch_size']}, "
                 f"{result['settings']['iterations']} iterations, {result['environment']['device']}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_save_figure(fig, path, dpi=110)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    parser.add_argument("--trainers", nargs="+", default=list(TRAINERS),
                        help=f"trainer classes ({STOCK} is always measured, as the baseline); a name ending in "
                             f"{CHECKPOINTING_SUFFIX} runs with activation checkpointing; default: {' '.join(TRAINERS)}")
    parser.add_argument("--shape", type=int, default=48, help="phantom edge in voxels (default 48)")
    parser.add_argument("--cases", type=int, default=6, help="phantom cases (default 6; nnU-Net splits 5 folds)")
    parser.add_argument("--iterations", type=int, default=10, help="training steps per epoch (default 10)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (default 3)")
    parser.add_argument("--compile", action="store_true", help="nnUNet_compile=1 (torch.compile, nnU-Net's GPU default)")
    parser.add_argument("--probe-jobs", type=int, default=1, help="memory probes run side by side (default 1)")
    parser.add_argument("--work", default=None,
                        help="folder for nnU-Net's raw/preprocessed/results (default: a temporary folder); a folder "
                             "that holds the preprocessed phantoms is reused")
    parser.add_argument("--quick", action="store_true", help="24^3, 2 iterations, 1 round: checks that it runs")
    parser.add_argument("--out", default=None, help="output path without suffix (default ./bench_nnunet_<device>)")
    parser.add_argument("--memory-probe", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.shape, args.iterations, args.warmup, args.rounds = 24, 2, 1, 1
        args.probe_jobs = max(args.probe_jobs, 2)
    args.trainers = [STOCK] + [t for t in args.trainers if t != STOCK]
    args.out = args.out or f"bench_nnunet_{args.device.split(':')[0]}"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if (code := harness.probe_or_device_check(args, memory_probe)) is not None:
        return code
    if args.shape < 16 or args.cases < 5 or args.iterations < 1 or args.rounds < 1 or args.warmup < 0 \
            or args.probe_jobs < 1:
        print("error: --shape >= 16, --cases >= 5, --iterations/--rounds/--probe-jobs >= 1 and --warmup >= 0 "
              "expected", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with tempfile.TemporaryDirectory(prefix="bench_nnunet_") as tmp:
        work = Path(args.work).resolve() if args.work else Path(tmp)
        os.environ.update(nnunet_environment(work, args.compile))  # before nnunetv2 reads its paths
        unknown = unknown_trainers(args.trainers)
        if unknown:
            print(f"error: --trainers: no nnU-Net trainer class named {', '.join(unknown)} (nnU-Net's trainers and "
                  "nnunet_plugin's are found)", file=sys.stderr)
            return 2
        result = run(args, work)
    return harness.write_outputs(result, args.out, plot, table)


if __name__ == "__main__":
    sys.exit(main())
