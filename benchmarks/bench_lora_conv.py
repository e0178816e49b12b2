"""Training-step time of conv LoRA, peft's path against the fused one, as ratios to full fine-tuning (issue 12.3).

peft runs a LoRA conv as ``conv(x, W) + s * B(A(x))``; ``fused=True`` (:mod:`monai_peft.lora.fused`) runs one conv
with ``W + s * B @ A``. Each method gets its own copy of one network (same weights); a round times one training step
(forward, mean-square loss, backward, SGD step) of every method in turn, rounds are interleaved after warm-up, and
the medians are reported as ratios to full fine-tuning (FFT) measured in the same run. Timings on a shared machine
are disturbed by other load: compare ratios from one run, and re-run on a quiet machine for figures to quote.

    python benchmarks/bench_lora_conv.py                       # CPU, 32^3, ranks 4 8 16
    python benchmarks/bench_lora_conv.py --device cuda --size 96 --batch 2

``frozen`` (the network frozen, only the input gradient flows back through it) is the floor any adapter inside the
network pays. Writes ``<out>.json`` (settings, environment, per-method medians and ratios) and ``<out>.png`` (ratios).
"""

from __future__ import annotations

import argparse
import copy
import logging
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

import monai_peft
from monai_peft import ModuleType
from monai_peft.io import atomic_save_figure, atomic_write_json

logger = logging.getLogger("bench_lora_conv")


class ConvStack(nn.Module):
    """A SegResNet-like 3D encoder: a stem conv, then per level residual pairs of GroupNorm-ReLU-Conv3d (3x3x3) and
    a strided 3x3x3 conv doubling the channels; a 1x1x1 head. ``(B, 1, S, S, S) -> (B, 2, S/4, S/4, S/4)``."""

    def __init__(self, channels: tuple[int, ...] = (16, 32, 64), blocks: int = 1) -> None:
        super().__init__()
        self.stem = nn.Conv3d(1, channels[0], 3, padding=1)
        layers: list[nn.Module] = []
        for i, c in enumerate(channels):
            for _ in range(blocks):
                layers.append(_ResPair(c))
            if i + 1 < len(channels):
                layers.append(nn.Conv3d(c, channels[i + 1], 3, stride=2, padding=1))
        self.body = nn.Sequential(*layers)
        self.head = nn.Conv3d(channels[-1], 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.stem(x)))


class _ResPair(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.GroupNorm(8, c), nn.ReLU(), nn.Conv3d(c, c, 3, padding=1),
                                   nn.GroupNorm(8, c), nn.ReLU(), nn.Conv3d(c, c, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


def build_network(name: str) -> nn.Module:
    """``stack``: :class:`ConvStack`; ``segresnet``: MONAI SegResNet in SuPreM's layout (4.7M parameters)."""
    if name == "stack":
        return ConvStack()
    if name == "segresnet":
        from monai.networks.nets import SegResNet

        return SegResNet(spatial_dims=3, init_filters=16, blocks_down=(1, 2, 2, 4), blocks_up=(1, 1, 1),
                         in_channels=1, out_channels=2)
    raise ValueError(f"--network must be 'stack' or 'segresnet', got {name!r}.")


class FrozenBase(nn.Module):
    """The network frozen, behind one trainable input scale: the backward runs every layer's input gradient and no
    weight gradient, the least any adapter inside the network can cost (reported as ``frozen``)."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network.requires_grad_(False)
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x * self.scale)


def build_methods(network: nn.Module, ranks: list[int]) -> dict[str, nn.Module]:
    """FFT, the frozen-base floor, and peft LoRA and fused LoRA at each rank on every Conv3d, each on its own copy
    of ``network``."""
    methods: dict[str, nn.Module] = {"fft": copy.deepcopy(network).train(),
                                     "frozen": FrozenBase(copy.deepcopy(network)).train()}
    for r in ranks:
        for fused in (False, True):
            model = monai_peft.adapt(copy.deepcopy(network), "lora", target=ModuleType(nn.Conv3d), r=r, fused=fused)
            with torch.no_grad():  # a trained adapter, not B = 0 (the cost is the same; the check below needs it)
                for name, p in model.named_parameters():
                    if "lora_B" in name:
                        p.normal_(0, 1e-3)
            methods[f"{'fused' if fused else 'peft'}-r{r}"] = model.train()
    return methods


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor) -> None:
    optimizer.zero_grad(set_to_none=True)
    model(x).square().mean().backward()
    optimizer.step()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    torch.manual_seed(0)
    network = build_network(args.network).to(device)
    methods = {k: m.to(device) for k, m in build_methods(network, args.ranks).items()}
    optimizers = {k: torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=1e-4)
                  for k, m in methods.items()}
    x = torch.randn(args.batch, 1, args.size, args.size, args.size, device=device)

    # fused and peft compute the same function: check once before timing
    for r in args.ranks:
        methods[f"fused-r{r}"].load_state_dict(methods[f"peft-r{r}"].state_dict())
        with torch.no_grad():
            a, b = methods[f"peft-r{r}"](x), methods[f"fused-r{r}"](x)
        if not torch.allclose(a, b, rtol=1e-3, atol=1e-4):
            raise RuntimeError(f"fused and peft LoRA differ at r={r}: max |diff| {(a - b).abs().max().item():.3g}")

    times: dict[str, list[float]] = {k: [] for k in methods}
    peak: dict[str, float] = {}
    for round_ in range(args.warmup + args.rounds):
        for key, model in methods.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            _sync(device)
            start = time.perf_counter()
            train_step(model, optimizers[key], x)
            _sync(device)
            if round_ >= args.warmup:
                times[key].append(time.perf_counter() - start)
                if device.type == "cuda":
                    peak[key] = max(peak.get(key, 0.0), torch.cuda.max_memory_allocated(device) / 2**20)
        logger.info("round %d/%d done", round_ + 1, args.warmup + args.rounds)

    fft = statistics.median(times["fft"])
    rows = {}
    for key, model in methods.items():
        med = statistics.median(times[key])
        rows[key] = {
            "median_step_s": med, "ratio_vs_fft": med / fft, "step_s": times[key],
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
            **({"peak_mb": peak[key]} if key in peak else {}),
        }
    return {
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "environment": {"torch": torch.__version__, "device": str(device), "threads": torch.get_num_threads(),
                        "cpu": platform.processor() or platform.machine(),
                        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None},
        "methods": rows,
    }


def table(result: dict) -> str:
    lines = [f"{'method':<12} {'trainable':>10} {'step (s)':>9} {'x FFT':>6}"]
    for key, row in result["methods"].items():
        lines.append(f"{key:<12} {row['trainable']:>10,} {row['median_step_s']:>9.4f} {row['ratio_vs_fft']:>6.2f}")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(result["methods"])
    ratios = [result["methods"][k]["ratio_vs_fft"] for k in keys]
    colours = ["grey" if k in ("fft", "frozen") else "tab:orange" if k.startswith("peft") else "tab:blue" for k in keys]
    fig, ax = plt.subplots(figsize=(1 + 0.8 * len(keys), 3.5))
    ax.bar(keys, ratios, color=colours)
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_ylabel("training step / FFT step")
    s = result["settings"]
    ax.set_title(f"conv LoRA: peft vs fused ({s['network']}, {s['size']}^3, batch {s['batch']}, {s['device']})")
    ax.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    atomic_save_figure(fig, path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    parser.add_argument("--network", default="stack", choices=["stack", "segresnet"], help="default: stack")
    parser.add_argument("--size", type=int, default=32, help="input edge in voxels (default 32)")
    parser.add_argument("--batch", type=int, default=1, help="batch size (default 1)")
    parser.add_argument("--ranks", type=int, nargs="+", default=[4, 8, 16], help="LoRA ranks (default 4 8 16)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first (default 2)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (default 5)")
    parser.add_argument("--out", default="bench_lora_conv",
                        help="output path without suffix (default ./bench_lora_conv)")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"error: --device {args.device}: no CUDA device is available", file=sys.stderr)
        return 2
    if args.rounds < 1 or args.warmup < 0 or args.size < 4 or args.batch < 1 or min(args.ranks) < 1:
        print("error: --rounds >= 1, --warmup >= 0, --size >= 4, --batch >= 1 and ranks >= 1 expected", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    result = run(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out.with_suffix(".json"), result)
    plot(result, out.with_suffix(".png"))
    print(table(result))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
