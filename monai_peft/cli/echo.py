"""Echocardiography: phantoms, CAMUS self-check, Segformer pretraining, LoRA task adapters, prediction, demo.

Examples::

    monai-peft echo phantom --layout camus2023 --out data/camus --num 20
    monai-peft echo phantom --layout echonet --out data/echonet --num 20
    monai-peft echo quality --camus data/camus --out quality.json          # Simpson / EF self-check
    monai-peft echo pretrain --echonet data/echonet --out runs/echo --epochs 20
    monai-peft echo train --backbone runs/echo/backbone --camus data/camus --task view --layers all --rank 2 \
        --out runs/echo/adapters
    monai-peft echo predict --backbone runs/echo/backbone --adapters runs/echo/adapters/{segmentation,view,volume,age} \
        --camus data/camus --out runs/echo/pred --plot study.png
    monai-peft echo demo --out runs/echo_demo                             # all of the above on phantoms
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

from monai_peft.cli._arg_types import existing_dir, non_negative_float, positive_float, positive_int

TASK_NAMES = ("segmentation", "view", "volume", "age")
TINY = {"hidden_sizes": [8, 16, 32, 64], "decoder_hidden_size": 16, "num_attention_heads": [1, 1, 2, 2]}
SMALL_HEAD = {"conv_channels": [8, 16, 32], "fc_features": [64, 32]}  # echo seed Table I note d


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = sub.add_parser("phantom", help="write a CAMUS (2019/2023) or EchoNet-Dynamic phantom dataset")
    p.add_argument("--layout", choices=("camus2019", "camus2023", "echonet"), required=True)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--num", type=positive_int, default=10, help="patients (CAMUS) or videos (EchoNet); default 10")
    p.add_argument("--size", type=positive_int, default=128, help="frame height in pixels; default 128")
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("quality", help="CAMUS self-check: EF from cfg volumes and Simpson's method vs cfg EF")
    p.add_argument("--camus", required=True, type=existing_dir, help="CAMUS folder (2019 or 2023 release)")
    p.add_argument("--out", default=None, help="write the full report JSON here")
    p.add_argument("--tolerance", type=positive_float, default=5.0, help="flag EF differences above this (points)")

    p = sub.add_parser("pretrain", help="pretrain the Segformer on EchoNet-Dynamic ED/ES LV masks")
    p.add_argument("--echonet", required=True, type=existing_dir, help="EchoNet-Dynamic folder")
    p.add_argument("--out", required=True, help="writes OUT/backbone/ and OUT/pretrain_metrics.json")
    p.add_argument("--variant", choices=("b0", "b2"), default="b0")
    p.add_argument("--init-weights", default=None, help="local backbone weights (file or HF folder)")
    _train_args(p, lr=1e-3)

    p = sub.add_parser("train", help="train one LoRA task adapter + head on CAMUS")
    p.add_argument("--backbone", required=True, type=existing_dir, help="pretrained backbone folder")
    p.add_argument("--camus", required=True, type=existing_dir, help="CAMUS folder")
    p.add_argument("--task", choices=TASK_NAMES, required=True)
    p.add_argument("--layers", choices=("attention", "all"), default="attention", help="LoRA placement")
    p.add_argument("--rank", type=positive_int, default=4, help="LoRA rank (1-8; seed: 2-4 best)")
    p.add_argument("--small-head", action="store_true", help="8/16/32-channel CNN head (seed Table I, note d)")
    p.add_argument("--out", required=True, help="writes OUT/<task>/ and OUT/<task>_metrics.json")
    _train_args(p, lr=1e-3)

    p = sub.add_parser("predict", help="run all task adapters on the CAMUS patients of a split")
    p.add_argument("--backbone", required=True, type=existing_dir, help="pretrained backbone folder")
    p.add_argument("--adapters", nargs="+", required=True, type=existing_dir, help="task folders")
    p.add_argument("--camus", required=True, type=existing_dir, help="CAMUS folder")
    p.add_argument("--split", default="testing", help="official split (default testing); 'all' for every patient")
    p.add_argument("--out", required=True, help="writes masks and predictions.json here")
    p.add_argument("--plot", default=None, metavar="PNG", help="figure of the first patient's study")

    p = sub.add_parser("demo", help="phantoms -> pretraining -> four adapters -> multi-task prediction")
    p.add_argument("--out", required=True)
    p.add_argument("--size", type=positive_int, default=64, help="network input side; default 64")
    p.add_argument("--epochs", type=positive_int, default=3)
    p.add_argument("--tiny", action="store_true", help="narrow MiT-B0 (seconds on a laptop CPU)")


def _train_args(p: argparse.ArgumentParser, lr: float) -> None:
    p.add_argument("--size", type=positive_int, default=128, help="input side after center crop + resize; default 128")
    p.add_argument("--epochs", type=positive_int, default=10)
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--lr", type=positive_float, default=lr)
    p.add_argument("--lr-min", type=non_negative_float, default=None, help="cosine annealing end value (seed: 'lr to lr_min')")
    p.add_argument("--device", default="cpu")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return int(globals()[f"_{args.action}"](args) or 0)


def _phantom(args: argparse.Namespace) -> int:
    from monai_peft.echo import write_camus_phantom, write_echonet_phantom

    if args.layout == "echonet":
        rows = write_echonet_phantom(args.out, args.num, size=args.size, seed=args.seed)
    else:
        shape = (args.size, max(8, int(args.size * 7 / 8)))
        rows = write_camus_phantom(args.out, args.num, layout=args.layout[-4:], shape=shape, seed=args.seed)
    print(json.dumps({"layout": args.layout, "out": str(args.out), "items": len(rows)}, indent=2))
    return 0


def _quality(args: argparse.Namespace) -> int:
    from monai_peft.echo import camus_quality_report, find_camus

    report = camus_quality_report(find_camus(args.camus), args.tolerance, args.out)
    print(json.dumps({"summary": report["summary"], "flagged": report["flagged"]}, indent=2))
    return 0


def _pretrain(args: argparse.Namespace) -> int:
    from monai_peft.echo import pretrain

    m = pretrain(args.echonet, args.out, args.variant, args.size, args.epochs, args.batch_size, args.lr, args.lr_min,
                 init_weights=args.init_weights, device=args.device)
    print(json.dumps(m, indent=2))
    return 0


def _train(args: argparse.Namespace) -> int:
    from monai_peft.echo import train_adapter

    head = SMALL_HEAD if args.small_head and args.task != "segmentation" else None
    m = train_adapter(args.backbone, args.camus, args.task, args.out, args.layers, args.rank, args.epochs,
                      args.batch_size, args.lr, args.lr_min, args.size, head, device=args.device)
    print(json.dumps(m, indent=2))
    return 0


def _predict(args: argparse.Namespace) -> int:
    from monai_peft.echo import infer_camus

    report = infer_camus(args.backbone, args.adapters, args.camus, args.out,
                         split=None if args.split == "all" else args.split)
    if args.plot and report["patients"]:
        plot_study(report, args.camus, args.out, args.plot)
    print(json.dumps({k: v for k, v in report.items() if k != "patients"} |
                     {"patients": {p: {k: e.get(k) for k in ("dataset", "volume_adapter", "simpson")}
                                   for p, e in report["patients"].items()}}, indent=2, default=float))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from monai_peft.echo import infer_camus, pretrain, train_adapter, write_camus_phantom, write_echonet_phantom

    t0 = time.time()
    out = Path(args.out)
    write_echonet_phantom(out / "data" / "echonet", 15, 16, 112, seed=1)
    write_camus_phantom(out / "data" / "camus", 15, "2023", (128, 112), seed=2)
    overrides = TINY if args.tiny else None
    summary: dict = {"pretrain": pretrain(out / "data" / "echonet", out, "b0", args.size, args.epochs, 8, 1e-3, 1e-4,
                                          config_overrides=overrides)}
    for task in TASK_NAMES:
        m = train_adapter(out / "backbone", out / "data" / "camus", task, out / "adapters", "all", 2, args.epochs, 8,
                          1e-3, None, args.size, None if task == "segmentation" else SMALL_HEAD)
        summary[task] = {k: m.get(k) for k in ("trainable_params", "total_params", "test", "seconds")}
    report = infer_camus(out / "backbone", [out / "adapters" / t for t in TASK_NAMES], out / "data" / "camus",
                         out / "predictions")
    plot_study(report, out / "data" / "camus", out / "predictions", out / "study.png")
    summary["seconds"] = time.time() - t0
    from monai_peft.echo import write_json

    write_json(summary, out / "demo_summary.json")
    print(json.dumps(summary, indent=2, default=float))
    print(f"wrote {out / 'demo_summary.json'}, {out / 'predictions' / 'predictions.json'}, {out / 'study.png'}")
    return 0


def plot_study(report: dict, camus_root: str | os.PathLike, pred_dir: str | os.PathLike, png: str | os.PathLike) -> None:
    """Figure of the first patient: 4 frames with predicted masks, and the volume / EF summary."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    import SimpleITK as sitk

    from monai_peft.echo import find_camus, read_image
    from monai_peft.io import atomic_save_figure

    name, entry = next(iter(report["patients"].items()))
    recs = {(r.view, r.phase): r for r in find_camus(camus_root) if r.patient == name}
    fig, axes = plt.subplots(1, 4, figsize=(14, 4.2))
    for ax, (view, phase) in zip(axes, [("2CH", "ED"), ("2CH", "ES"), ("4CH", "ED"), ("4CH", "ES")]):
        img, _ = read_image(recs[(view, phase)].image)
        ax.imshow(img, cmap="gray")
        frame = entry[f"{view}_{phase}"]
        seg = frame.get("segmentation")
        if isinstance(seg, str):
            mask = sitk.GetArrayFromImage(sitk.ReadImage(str(Path(pred_dir) / seg)))
            ax.imshow(np.ma.masked_equal(mask, 0), cmap="viridis", alpha=0.4, vmin=0, vmax=3)
        title = f"{view} {phase}"
        if isinstance(frame.get("view"), dict):
            title += f" | view: {frame['view']['label']}"
        ax.set_title(title)
        ax.axis("off")
    lines = [f"{name}  dataset: EDV {entry['dataset']['EDV']}, ESV {entry['dataset']['ESV']}, EF {entry['dataset']['EF']}"]
    for k in ("volume_adapter", "simpson"):
        if k in entry and entry[k]["EDV"] is not None:
            v = entry[k]
            ef = f"{v['EF']:.1f}" if v["EF"] is not None else "-"
            lines.append(f"{k}: EDV {v['EDV']:.1f} ml, ESV {v['ESV']:.1f} ml, EF {ef}%")
    fig.suptitle("\n".join(lines), fontsize=9)
    fig.tight_layout()
    try:
        atomic_save_figure(fig, png, dpi=90, format="png")
    finally:
        plt.close(fig)
