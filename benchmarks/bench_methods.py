"""Cost of every fine-tuning method against full fine-tuning (FFT), measured side by side (issue 12).

For each network (SuPreM SegResNet and UNet3D from ``monai_peft.networks``) and each configuration (a method with
its options and levers), all in one process on copies of one network:

- **training step** (forward, DiceCE loss, backward, AdamW step) in interleaved rounds after warm-up
  (``harness.interleaved_times``); reported as the median time and the median over rounds of the per-round ratio
  to FFT (``x FFT``), and for a lever (activation checkpointing, channels-last, autocast) also to the same method
  without it (``x own``);
- **peak training memory** of one step in a fresh subprocess per configuration: CUDA max allocated; on CPU the peak
  resident set minus the process's resident set before the network was built (why a subprocess and how the peak
  is read: ``harness``); ratio to FFT's;
- **inference** (eval mode, no gradients), interleaved the same way, as ratio to the plain network: the adapted
  network unmerged, and merged (``merge_and_unload``) for the methods that merge (LoRA, SSF, BitFit);
- **adapter file**: bytes of ``adapter_model.safetensors`` against the full network's safetensors checkpoint.

``frozen (floor)`` is the whole network frozen behind one trainable input scale: the backward runs every layer's
input gradient and no weight gradient, the least that an adapter deep inside the network can cost.

Timings on a shared machine are disturbed by other load; the per-round ratios absorb slow drifts, and a quiet
machine gives the figures to quote. Usage::

    python benchmarks/bench_methods.py --device cpu                 # 64^3, batch 2, both networks (long on CPU)
    python benchmarks/bench_methods.py --device cuda                # 96^3, batch 2
    python benchmarks/bench_methods.py --device cpu --quick         # 16^3, batch 1, four configurations (a minute)

Writes ``<out>.json`` (settings, environment, every measurement) and ``<out>.png``; prints a Markdown table.
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

logger = logging.getLogger("bench_methods")
NETWORKS = ("segresnet", "unet")
GROUPS = ("methods", "memory", "precision")


@dataclass(frozen=True)
class Config:
    """One row: ``method`` (``None``: FFT; ``"floor"``: frozen network) with ``adapt()`` options and levers."""

    name: str
    method: str | None
    options: dict[str, Any] = field(default_factory=dict)
    checkpointing: str | None = None
    channels_last: bool = False
    amp: bool = False
    own: str | None = None  # the configuration this one adds a lever to


def configurations(ranks: list[int], groups: list[str], quick: bool) -> list[Config]:
    """The rows of the benchmark, FFT first."""
    rows = [Config("fft", None), Config("frozen (floor)", "floor")]
    if "methods" in groups:
        rows += [Config("convadapter", "convadapter"),
                 Config("convadapter dense", "convadapter", {"adapter_conv": "dense"})]
        for r in ranks:
            rows += [Config(f"lora r{r} peft", "lora", {"r": r, "fused": False}),
                     Config(f"lora r{r} fused", "lora", {"r": r, "fused": True})]
        rows += [Config("ssf", "ssf"), Config("bitfit", "bitfit"), Config("decoder-only", "decoder")]
    r0 = ranks[0]
    if "memory" in groups:
        rows += [
            Config("convadapter +ckpt", "convadapter", checkpointing="full-resolution", own="convadapter"),
            Config("convadapter +ckpt all", "convadapter", checkpointing="all", own="convadapter"),
            Config(f"lora r{r0} fused +ckpt", "lora", {"r": r0, "fused": True}, checkpointing="full-resolution",
                   own=f"lora r{r0} fused"),
            Config("ssf +ckpt", "ssf", checkpointing="full-resolution", own="ssf"),
        ]
    if "precision" in groups:
        rows += [Config("fft +channels-last", None, channels_last=True, own="fft"),
                 Config("convadapter +channels-last", "convadapter", channels_last=True, own="convadapter"),
                 Config("ssf +channels-last", "ssf", channels_last=True, own="ssf"),
                 Config("fft +autocast", None, amp=True, own="fft"),
                 Config("convadapter +autocast", "convadapter", amp=True, own="convadapter")]
    if quick:
        keep = {"fft", "convadapter", f"lora r{r0} fused", "ssf +ckpt"}
        rows = [c for c in rows if c.name in keep]
    names = {c.name for c in rows}
    return [c if c.own is None or c.own in names else Config(**{**asdict(c), "own": None}) for c in rows]


class FrozenFloor(nn.Module):
    """The network frozen behind one trainable input scale (``x -> network(scale * x)``)."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network.requires_grad_(False)
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x * self.scale)


def build_network(name: str, classes: int) -> nn.Module:
    from monai_peft.networks import suprem_segresnet, suprem_unet

    return suprem_segresnet(classes) if name == "segresnet" else suprem_unet(classes)


def build_model(config: Config, network: nn.Module) -> nn.Module:
    """A training-mode copy of ``network`` set up as ``config`` says."""
    import monai_peft

    net = copy.deepcopy(network)
    if config.method is None:
        model = net
    elif config.method == "floor":
        model = FrozenFloor(net)
    else:
        head = None if config.method == "decoder" else "head"  # a new head for the new classes trains fully
        model = monai_peft.adapt(net, config.method, train_fully=head,
                                 activation_checkpointing=config.checkpointing or False, **config.options)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last_3d)
    return model.train()


class Runner:
    """A model, its AdamW and the loss, with one training step and one inference pass on fixed inputs."""

    def __init__(self, config: Config, network: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device,
                 amp_dtype: torch.dtype) -> None:
        from monai_peft.workflows import build_loss

        self.config, self.device, self.amp_dtype = config, device, amp_dtype
        self.model = build_model(config, network).to(device)
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=1e-5)
        self.loss = build_loss()
        self.x = x.contiguous(memory_format=torch.channels_last_3d) if config.channels_last else x
        self.y = y

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.config.amp)

    def step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            loss = self.loss(self.model(self.x), self.y)
        loss.backward()
        self.optimizer.step()

    def trainable(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)


def _inputs(args: argparse.Namespace, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    shape = (args.batch, 1, args.size, args.size, args.size)
    x = torch.randn(shape, generator=g).to(device)
    y = torch.randint(0, args.classes, shape, generator=g).to(device)
    return x, y


def _amp_dtype(name: str) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[name]


def memory_probe(probe: dict[str, Any]) -> dict[str, Any]:
    """One configuration in this (fresh) process: warm-up step, then the peak of one step (see ``harness``)."""
    import monai_peft.networks  # noqa: F401  (imports before the baseline: their memory is no training memory)
    import monai_peft.workflows  # noqa: F401

    method = probe["config"]["method"]
    if method not in (None, "floor", "decoder"):  # the method's lazily imported layers, also before the baseline
        monai_peft.adapt(nn.Sequential(nn.Conv3d(1, 2, 3)), method, target=["0"])
    args = argparse.Namespace(**probe["args"])
    device = torch.device(args.device)
    torch.set_num_threads(args.threads or torch.get_num_threads())
    torch.manual_seed(0)
    x, y = _inputs(args, device)
    before = harness.rss_mb() if device.type == "cpu" else 0.0
    network = build_network(probe["network"], args.classes)
    runner = Runner(Config(**probe["config"]), network, x, y, device, _amp_dtype(args.amp_dtype))
    del network
    runner.step()
    harness.sync(device)
    harness.reset_peak(device)
    runner.step()
    harness.sync(device)
    return {"peak_mb": harness.peak_mb(device) - before}


def _checkpoint_bytes(network: nn.Module, tmp: Path) -> int:
    """Bytes of the full network as one safetensors file (what full fine-tuning keeps per task)."""
    from safetensors.torch import save_file

    full = tmp / "full.safetensors"
    save_file({k: v.detach().contiguous().cpu() for k, v in network.state_dict().items()}, str(full))
    return full.stat().st_size


def _adapter_bytes(runner: Runner, tmp: Path) -> int | None:
    """Bytes of ``adapter_model.safetensors`` (``None`` for FFT and the floor, which keep the full network)."""
    if runner.config.method in (None, "floor"):
        return None
    folder = tmp / runner.config.name.replace(" ", "_")
    runner.model.save_pretrained(str(folder))
    return (folder / "adapter_model.safetensors").stat().st_size


def bench_network(name: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Every measurement of one network; see the module docstring."""
    torch.manual_seed(0)
    network = build_network(name, args.classes).to(device)
    x, y = _inputs(args, device)
    amp_dtype = _amp_dtype(args.amp_dtype)
    configs = configurations(args.ranks, args.groups, args.quick)
    runners = {c.name: Runner(c, network, x, y, device, amp_dtype) for c in configs}
    log = lambda line: logger.info("%s training: %s", name, line)  # noqa: E731
    step_times = harness.interleaved_times({k: r.step for k, r in runners.items()}, device, args.warmup,
                                           args.rounds, log)
    vs_fft = harness.ratio_medians(step_times, "fft")

    # inference: the plain network, each configuration unmerged, and merged where the method merges
    infer: dict[str, Any] = {"base": _eval_call(network.eval(), x, None, amp_dtype)}
    merged_of: dict[str, str] = {}
    for key, r in runners.items():
        if r.config.method in (None, "floor") or r.config.checkpointing:
            continue
        infer[key] = _eval_call(r.model, r.x, r.config, amp_dtype)
        if r.config.method in ("lora", "ssf", "bitfit"):
            merged = copy.deepcopy(r.model).merge_and_unload().eval()
            infer[key + " merged"] = _eval_call(merged, r.x, r.config, amp_dtype)
            merged_of[key] = key + " merged"
    for r in runners.values():  # training mode again for the memory probes below (CUDA runs them in-process)
        r.model.train()
    infer_times = harness.interleaved_times(infer, device, args.warmup, args.rounds,
                                            lambda line: logger.info("%s inference: %s", name, line))
    infer_vs_base = harness.ratio_medians(infer_times, "base")

    # one fresh process per configuration (on CUDA too: max allocated then holds this configuration alone); they
    # measure their own peaks, so a few may run side by side
    with ThreadPoolExecutor(max_workers=args.probe_jobs) as pool:
        futures = {key: pool.submit(_probe_peak, name, r.config, args) for key, r in runners.items()}
        peaks = {key: f.result() for key, f in futures.items()}
    rows: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        full = _checkpoint_bytes(network, Path(tmp))
        for key, r in runners.items():
            adapter = _adapter_bytes(r, Path(tmp)) or full
            peak = peaks[key]
            rows[key] = {
                "config": asdict(r.config), "trainable": r.trainable(),
                "step_s": step_times[key], "median_step_s": statistics.median(step_times[key]),
                "step_vs_fft": vs_fft[key],
                "step_vs_own": (harness.ratio_medians(step_times, r.config.own)[key] if r.config.own else None),
                "peak_mb": peak, "adapter_bytes": adapter, "checkpoint_bytes": full,
                "adapter_vs_checkpoint": adapter / full,
                "infer_vs_base": infer_vs_base.get(key), "merged_infer_vs_base": infer_vs_base.get(merged_of.get(key)),
                "median_infer_s": statistics.median(infer_times[key]) if key in infer_times else None,
            }
            logger.info("%s %s: peak %.0f MiB", name, key, peak)
    for key, row in rows.items():
        row["peak_vs_fft"] = row["peak_mb"] / rows["fft"]["peak_mb"]
        own = row["config"]["own"]
        row["peak_vs_own"] = row["peak_mb"] / rows[own]["peak_mb"] if own else None
    return {"median_infer_base_s": statistics.median(infer_times["base"]), "rows": rows}


def _eval_call(model: nn.Module, x: torch.Tensor, config: Config | None, amp_dtype: torch.dtype):
    model.eval()
    amp = bool(config and config.amp)

    def call() -> None:
        with torch.no_grad(), torch.autocast(x.device.type, dtype=amp_dtype, enabled=amp):
            model(x)

    return call


def _probe_peak(network: str, config: Config, args: argparse.Namespace) -> float:
    probe = {"network": network, "config": asdict(config),
             "args": {k: v for k, v in vars(args).items() if k != "memory_probe"}}
    return harness.measure_in_subprocess(Path(__file__).resolve(), probe)["peak_mb"]


def _fmt(v: float | None, spec: str) -> str:
    return "" if v is None else format(v, spec)


def table(result: dict[str, Any]) -> str:
    """The results as a Markdown table, one row per network and configuration."""
    head = ("| network | configuration | trainable | step s | x FFT | x own | peak MiB | x FFT | x own | "
            "infer x base | merged x base | adapter % ckpt |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for net, res in result["networks"].items():
        for key, row in res["rows"].items():
            lines.append(
                f"| {net} | {key} | {row['trainable']:,} | {row['median_step_s']:.2f} | {row['step_vs_fft']:.2f} | "
                f"{_fmt(row['step_vs_own'], '.2f')} | {row['peak_mb']:.0f} | {row['peak_vs_fft']:.2f} | "
                f"{_fmt(row['peak_vs_own'], '.2f')} | {_fmt(row['infer_vs_base'], '.2f')} | "
                f"{_fmt(row['merged_infer_vs_base'], '.2f')} | {100 * row['adapter_vs_checkpoint']:.2f} |")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    """Step time, peak memory and inference of every configuration as ratios (one panel per network)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from monai_peft.io import atomic_save_figure

    nets = list(result["networks"])
    fig, axes = plt.subplots(len(nets), 1, figsize=(max(8, 0.75 * max(len(result["networks"][n]["rows"])
                                                                        for n in nets)), 4 * len(nets)),
                             squeeze=False)
    for ax, net in zip(axes[:, 0], nets):
        rows = result["networks"][net]["rows"]
        keys = list(rows)
        pos = range(len(keys))
        w = 0.2
        bars = [("step_vs_fft", "training step / FFT"), ("peak_vs_fft", "peak memory / FFT"),
                ("infer_vs_base", "inference unmerged / plain network"),
                ("merged_infer_vs_base", "inference merged / plain network")]
        for i, (key, label) in enumerate(bars):
            ax.bar([p + (i - 1.5) * w for p in pos], [rows[k][key] or 0 for k in keys], w, label=label)
        ax.axhline(1.0, color="black", lw=0.8)
        ax.set_xticks(list(pos), keys, rotation=40, ha="right")
        s = result["settings"]
        ax.set_title(f"{net}: {s['size']}^3, batch {s['batch']}, {result['environment']['device']}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_save_figure(fig, path, dpi=110)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    parser.add_argument("--networks", nargs="+", default=list(NETWORKS), choices=NETWORKS,
                        help="default: segresnet unet")
    parser.add_argument("--size", type=int, default=None, help="input edge in voxels (default 64 on CPU, 96 on CUDA)")
    parser.add_argument("--batch", type=int, default=2, help="batch size (default 2)")
    parser.add_argument("--classes", type=int, default=18, help="output classes (default 18: organs_17 + background)")
    parser.add_argument("--ranks", type=int, nargs="+", default=[4, 16], help="LoRA ranks (default 4 16)")
    parser.add_argument("--groups", nargs="+", default=list(GROUPS), choices=GROUPS,
                        help="methods (the methods), memory (activation checkpointing), precision (channels-last, "
                             "autocast); default all")
    parser.add_argument("--amp-dtype", default="bf16", choices=["bf16", "fp16"], help="autocast dtype (default bf16)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (default 3)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    parser.add_argument("--probe-jobs", type=int, default=1,
                        help="CPU memory probes run side by side (default 1; each is its own process)")
    parser.add_argument("--quick", action="store_true",
                        help="16^3, batch 1, 1 round and four configurations: checks that everything runs")
    parser.add_argument("--out", default=None, help="output path without suffix (default ./bench_methods_<device>)")
    parser.add_argument("--memory-probe", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.size = args.size or 16
        args.batch, args.warmup, args.rounds, args.probe_jobs = 1, 1, 1, max(args.probe_jobs, 2)
    args.size = args.size or (96 if args.device.startswith("cuda") else 64)
    args.out = args.out or f"bench_methods_{args.device.split(':')[0]}"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if (code := harness.probe_or_device_check(args, memory_probe)) is not None:
        return code
    if (args.size % 8 or args.size < 8 or args.batch < 1 or args.rounds < 1 or args.warmup < 0 or min(args.ranks) < 1
            or args.probe_jobs < 1):
        print("error: --size must be a multiple of 8, --batch/--rounds/--probe-jobs/ranks >= 1, --warmup >= 0",
              file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    result = {
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "memory_probe")},
        "environment": harness.environment(device),
        "networks": {name: bench_network(name, args, device) for name in args.networks},
    }
    return harness.write_outputs(result, args.out, plot, table)


if __name__ == "__main__":
    sys.exit(main())
