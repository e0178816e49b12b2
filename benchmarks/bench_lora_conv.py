"""Training step of one LoRA conv layer, per backward path, as ratios to full fine-tuning of that layer (issue 12).

The measurement behind :func:`monai_peft.lora.factored.factored_is_faster`: for 3x3x3 convs ``C -> C`` at the
channel counts and sizes of a 3D U-Net's levels, the forward and backward (input gradient included, as for a
layer inside the network) of

- ``fft``: the conv with a trainable kernel;
- ``peft``: peft's LoRA conv (``conv(x, W) + s * B(A(x))``);
- ``merged`` / ``factored``: ``fused="merged"`` / ``fused="factored"`` (:mod:`monai_peft.lora.fused`);
- ``auto``: ``fused=True``, which picks one of the two per layer and device.

All in one process, interleaved rounds after warm-up, medians of the per-round ratios to ``fft``
(``harness.interleaved_times``). Whole networks are measured by ``bench_methods.py``. Usage::

    python benchmarks/bench_lora_conv.py                          # CPU: 16@64^3 ... 256@8^3, ranks 4 16
    python benchmarks/bench_lora_conv.py --device cuda --layers 32x96 64x48 128x24 256x12

Writes ``<out>.json`` and ``<out>.png``; prints a table.
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

logger = logging.getLogger("bench_lora_conv")
PATHS = ("peft", "merged", "factored", "auto")


class _Layer(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def layer_calls(channels: int, size: int, rank: int, batch: int, device: torch.device) -> dict[str, object]:
    """One training-step function per path for a ``channels -> channels`` 3x3x3 conv on a ``size^3`` input."""
    import monai_peft

    torch.manual_seed(0)
    layer = _Layer(channels).to(device)
    x = torch.randn(batch, channels, size, size, size, device=device)
    models = {"fft": copy.deepcopy(layer)}
    for path, fused in zip(PATHS, (False, "merged", "factored", True)):
        models[path] = monai_peft.adapt(copy.deepcopy(layer), "lora", target=["conv"], r=rank, fused=fused)

    def step(model: nn.Module):
        def call() -> None:
            model.zero_grad(set_to_none=True)
            model(x.requires_grad_(True)).sum().backward()
            x.grad = None
        return call

    return {name: step(m) for name, m in models.items()}


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    rows = []
    for spec in args.layers:
        channels, size = (int(v) for v in spec.split("x"))
        for rank in args.ranks:
            calls = layer_calls(channels, size, rank, args.batch, device)
            times = harness.interleaved_times(calls, device, args.warmup, args.rounds)
            ratios = harness.ratio_medians(times, "fft")
            rows.append({"channels": channels, "size": size, "rank": rank,
                         "fft_s": statistics.median(times["fft"]), "ratio_vs_fft": {p: ratios[p] for p in PATHS},
                         "times_s": times})
            logger.info("%d channels at %d^3, r=%d: %s", channels, size, rank,
                        " ".join(f"{p} {ratios[p]:.2f}" for p in PATHS))
    return {"settings": {k: v for k, v in vars(args).items() if k != "out"},
            "environment": harness.environment(device), "layers": rows}


def table(result: dict) -> str:
    lines = ["| channels | size | r | fft s | " + " | ".join(f"{p} x FFT" for p in PATHS) + " |",
             "|" + "---|" * (4 + len(PATHS))]
    for row in result["layers"]:
        lines.append(f"| {row['channels']} | {row['size']}^3 | {row['rank']} | {row['fft_s']:.3f} | "
                     + " | ".join(f"{row['ratio_vs_fft'][p]:.2f}" for p in PATHS) + " |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from monai_peft.io import atomic_save_figure

    rows = result["layers"]
    labels = [f"{r['channels']}@{r['size']}^3\nr{r['rank']}" for r in rows]
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(rows), 3.8))
    w = 0.8 / len(PATHS)
    for i, p in enumerate(PATHS):
        ax.bar([j + (i - 1.5) * w for j in range(len(rows))], [r["ratio_vs_fft"][p] for r in rows], w, label=p)
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_xticks(range(len(rows)), labels, fontsize=8)
    ax.set_ylabel("training step / FFT step")
    ax.set_title(f"one conv layer with LoRA, batch {result['settings']['batch']}, {result['settings']['device']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_save_figure(fig, path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    parser.add_argument("--layers", nargs="+", default=["16x64", "32x32", "64x32", "128x16", "256x8"],
                        help="CHANNELSxSIZE per layer (default 16x64 32x32 64x32 128x16 256x8)")
    parser.add_argument("--ranks", type=int, nargs="+", default=[4, 16], help="LoRA ranks (default 4 16)")
    parser.add_argument("--batch", type=int, default=2, help="batch size (default 2)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (default 5)")
    parser.add_argument("--out", default="bench_lora_conv",
                        help="output path without suffix (default ./bench_lora_conv)")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"error: --device {args.device}: no CUDA device is available", file=sys.stderr)
        return 2
    try:
        bad = [s for s in args.layers if min(int(v) for v in s.split("x")) < 1 or len(s.split("x")) != 2]
    except ValueError:
        bad = args.layers
    if bad or args.rounds < 1 or args.warmup < 0 or args.batch < 1 or min(args.ranks) < 1:
        print(f"error: --layers takes CHANNELSxSIZE (e.g. 32x32){f', got {bad}' if bad else ''}; --rounds, --batch "
              "and ranks >= 1, --warmup >= 0 expected", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    result = run(args)
    return harness.write_outputs(result, args.out, plot, table)


if __name__ == "__main__":
    sys.exit(main())
