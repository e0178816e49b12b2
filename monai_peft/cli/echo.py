"""Echocardiography: phantoms, CAMUS self-check, Segformer adapters, the echo paper's tables, video EF (EchoAI).

Examples::

    monai-peft echo phantom --layout camus2023 --out data/camus --num 20
    monai-peft echo phantom --layout echonet --out data/echonet --num 20
    monai-peft echo quality --camus data/camus --out quality.json          # Simpson / EF self-check
    monai-peft echo pretrain --echonet data/echonet --out runs/echo --epochs 20
    monai-peft echo presets                                               # Tables I-IV configurations
    monai-peft echo train --backbone runs/echo/backbone --camus data/camus --task view --out runs/echo/runs   # best row
    monai-peft echo train --backbone runs/echo/backbone --camus data/camus --task view --preset view-b0-head \
        --out runs/echo/runs                                              # "fully train adapter head", no LoRA
    monai-peft echo table --runs runs/echo/runs --out tables.md           # Tables I-IV layout, paper beside
    monai-peft echo train --backbone runs/echo/backbone --camus data/camus --task view \
        --preset view-b0-backbone-all-r2 --out runs/echo/adapters         # a "backbone of" adapter for predict
    monai-peft echo predict --backbone runs/echo/backbone --adapters runs/echo/adapters/*/adapter \
        --camus data/camus --out runs/echo/pred --plot study.png
    monai-peft echo demo --out runs/echo_demo                             # the Segformer steps on phantoms
    monai-peft echo compare --out runs/echo_compare --tasks segmentation ef  # LoRA vs VPT vs adapters vs ...
    monai-peft echo video-pretrain --echonet data/echonet --out runs/video # VideoMAE, 90% tube masking
    monai-peft echo video-train --checkpoint runs/video/checkpoint --echonet data/echonet --method lora \
        --out runs/video_lora
    monai-peft echo video-evaluate --run runs/video_lora --echonet data/echonet
    monai-peft echo video-predict --run runs/video_lora --videos a.avi b.avi --out ef.json
    monai-peft echo video-demo --out runs/video_demo                      # LoRA vs full vs linear probe
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from monai_peft.cli._arg_types import existing_dir, non_negative_float, positive_float, positive_int

TASK_NAMES = ("segmentation", "view", "volume", "age")
TINY = {"hidden_sizes": [8, 16, 32, 64], "decoder_hidden_size": 16, "num_attention_heads": [1, 1, 2, 2]}
SMALL_HEAD = {"conv_channels": [8, 16, 32], "fc_features": [64, 32]}  # echo seed Table I note d


# ------------------------------------------------------------------------------------------- arguments
def _args_phantom(p: argparse.ArgumentParser) -> None:
    p.add_argument("--layout", choices=("camus2019", "camus2023", "echonet"), required=True)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--num", type=positive_int, default=10, help="patients (CAMUS) or videos (EchoNet); default 10")
    p.add_argument("--size", type=positive_int, default=128, help="frame height in pixels; default 128")
    p.add_argument("--frames", type=positive_int, default=16, help="frames per EchoNet video; default 16")
    p.add_argument("--depth-mm", type=positive_float, default=160.0,
                   help="imaging depth; smaller makes the heart fill the frame (EchoNet); default 160")
    p.add_argument("--seed", type=int, default=0)


def _args_quality(p: argparse.ArgumentParser) -> None:
    p.add_argument("--camus", required=True, type=existing_dir, help="CAMUS folder (2019 or 2023 release)")
    p.add_argument("--out", default=None, help="write the full report JSON here")
    p.add_argument("--tolerance", type=positive_float, default=5.0, help="flag EF differences above this (points)")


def _args_pretrain(p: argparse.ArgumentParser) -> None:
    p.add_argument("--echonet", required=True, type=existing_dir)
    p.add_argument("--out", required=True, help="writes OUT/backbone/ and OUT/pretrain_metrics.json")
    p.add_argument("--variant", choices=("b0", "b2"), default="b0")
    p.add_argument("--init-weights", default=None, help="local backbone weights (file or HF folder)")
    _train_args(p, lr=1e-3, batch_size=16, epochs=10)


def _args_train(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backbone", required=True, type=existing_dir, help="pretrained backbone folder")
    p.add_argument("--camus", required=True, type=existing_dir)
    p.add_argument("--task", choices=TASK_NAMES, required=True)
    p.add_argument("--preset", default=None,
                   help="a Tables I-IV configuration (monai-peft echo presets); default: the task's best one for "
                        "the backbone's MiT variant")
    p.add_argument("--layers", choices=("attention", "all"), default=None, help="LoRA placement (overrides the preset)")
    p.add_argument("--rank", type=positive_int, default=None, help="LoRA rank (overrides the preset)")
    p.add_argument("--small-head", action="store_true", help="8/16/32-channel CNN head (seed Table I, note d)")
    p.add_argument("--out", required=True, help="writes OUT/<run>/ (adapter, results.json)")
    _train_args(p, lr=None, batch_size=None, epochs=None)


def _args_predict(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backbone", required=True, type=existing_dir)
    p.add_argument("--adapters", nargs="+", required=True, type=existing_dir, help="task folders")
    p.add_argument("--camus", required=True, type=existing_dir)
    p.add_argument("--split", default="testing", help="official split (default testing); 'all' for every patient")
    p.add_argument("--out", required=True, help="writes masks and predictions.json here")
    p.add_argument("--plot", default=None, metavar="PNG", help="figure of the first patient's study")


def _args_demo(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True)
    p.add_argument("--size", type=positive_int, default=64, help="network input side; default 64")
    p.add_argument("--epochs", type=positive_int, default=3)
    p.add_argument("--tiny", action="store_true", help="narrow MiT-B0 (seconds on a laptop CPU)")


def _args_presets(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", choices=TASK_NAMES, default=None, help="only this task's table")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")


def _args_table(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runs", nargs="+", required=True, help="run folders (results.json) or folders holding them")
    p.add_argument("--out", default=None, help="write the tables as Markdown here (and .json beside it)")


def _args_video_pretrain(p: argparse.ArgumentParser) -> None:
    p.add_argument("--echonet", required=True, type=existing_dir, help="EchoNet-Dynamic folder (videos; labels unused)")
    p.add_argument("--out", required=True, help="writes OUT/checkpoint/ (config.json + model.safetensors), results.json")
    p.add_argument("--model-size", choices=("small", "base"), default="base", help="VideoMAE size; default base")
    p.add_argument("--init-checkpoint", default=None, help="continue from a local VideoMAE checkpoint folder")
    p.add_argument("--mask-ratio", type=non_negative_float, default=0.9, help="hidden fraction of the tubes; default 0.9 (EchoAI)")
    p.add_argument("--tiny", action="store_true", help="a 2-layer, 32-wide VideoMAE with 8-pixel patches (tests, demos)")
    _video_args(p, lr=1.5e-4, epochs=10)


def _args_video_train(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True,
                   help="local VideoMAE checkpoint: a folder (video-pretrain OUT/checkpoint) or a weights file; never a Hub id")
    p.add_argument("--echonet", required=True, type=existing_dir)
    p.add_argument("--out", required=True, help="run folder: adapter/, ef_model.json, results.json, test_predictions.*")
    p.add_argument("--method", default="lora",
                   help="lora, full, head (linear probe), ssf, bitfit, norm, vpt (visual prompts), bottleneck "
                        "(bottleneck adapters), or another monai_peft.adapt method; default lora")
    p.add_argument("--layers", choices=("attention", "all"), default="attention", help="LoRA placement")
    p.add_argument("--rank", type=positive_int, default=None, help="LoRA rank (default 8)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="a method option of monai_peft.adapt (VALUE read as JSON, else text), repeatable, e.g. "
                        "--option variant=shallow --option num_tokens=5 (vpt), --option insertion=parallel "
                        "(bottleneck)")
    p.add_argument("--clips", type=positive_int, default=4, help="clips averaged per video at evaluation; default 4")
    p.add_argument("--resume", action="store_true", help="continue from OUT/adapter/last")
    _video_args(p, lr=None, epochs=10)


def _args_video_evaluate(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, type=existing_dir, help="video-train run folder")
    p.add_argument("--echonet", required=True, type=existing_dir)
    p.add_argument("--split", default="TEST", help="FileList split; default TEST")
    p.add_argument("--out", default=None, help="folder for results.json / predictions (default: the run folder)")
    p.add_argument("--clips", type=positive_int, default=None, help="clips per video (default: the run's)")
    p.add_argument("--device", default="cpu")


def _args_video_predict(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, type=existing_dir, help="video-train run folder")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--videos", nargs="+", help="AVI files")
    src.add_argument("--echonet", help="an EchoNet-Dynamic folder: every video of its FileList")
    p.add_argument("--out", required=True, help="JSON file of per-video EF")
    p.add_argument("--clips", type=positive_int, default=None, help="clips per video (default: the run's)")
    p.add_argument("--device", default="cpu")


def _args_video_demo(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="folder for phantoms, runs, comparison.json and comparison.png")
    p.add_argument("--methods", nargs="+", default=["lora", "full", "head"], help="methods to compare")
    p.add_argument("--videos", type=positive_int, default=240, help="phantom videos (60%% train); default 240")
    p.add_argument("--pretrain-epochs", type=positive_int, default=150, help="MAE pretraining epochs; default 150")
    p.add_argument("--epochs", type=positive_int, default=30, help="fine-tuning epochs per method; default 30")
    p.add_argument("--mask-ratio", type=non_negative_float, default=0.9, help="MAE masking ratio; default 0.9 (EchoAI)")
    p.add_argument("--seed", type=int, default=0)


def _args_compare(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="writes OUT/comparison.json and OUT/comparison.png")
    p.add_argument("--camus", default=None, help="CAMUS folder; default: a phantom in OUT/data/camus")
    p.add_argument("--echonet", default=None, help="EchoNet-Dynamic folder: Segformer pretraining and the ef task's "
                   "videos; default: phantoms")
    p.add_argument("--backbone", default=None, help="pretrained backbone folder; default: pretrain on --echonet")
    p.add_argument("--video-checkpoint", default=None, help="VideoMAE checkpoint folder for the ef task "
                   "(video-pretrain OUT/checkpoint); default: MAE-pretrain a tiny VideoMAE on the ef videos")
    p.add_argument("--tasks", nargs="+", default=["segmentation"], help="segmentation (default), view, volume, age, "
                   "ef (video EF)")
    p.add_argument("--methods", nargs="+", default=None, help="default: lora vpt-shallow vpt-deep houlsby parallel "
                   "bitfit head full")
    p.add_argument("--lr", action="append", default=[], metavar="METHOD=LR[,LR...]",
                   help="replace a method's learning-rate grid, e.g. --lr lora=1e-3,3e-3")
    p.add_argument("--size", type=positive_int, default=64, help="input side; default 64")
    p.add_argument("--epochs", type=positive_int, default=8, help="epochs per run; default 8")
    p.add_argument("--video-epochs", type=positive_int, default=30, help="epochs per run of the ef task; default 30")
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--pretrain-epochs", type=positive_int, default=6, help="pretext epochs when pretraining here; default 6")
    p.add_argument("--mit-b0", action="store_true", help="pretrain full-width MiT-B0 instead of the narrow one")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--fast", action="store_true", help="seconds-long smoke run: 32-pixel inputs, 1 epoch, one lr")


def _train_args(p: argparse.ArgumentParser, lr: float | None, batch_size: int | None, epochs: int | None) -> None:
    dflt = "default: the preset's" if lr is None else "default %(default)s"
    p.add_argument("--size", type=positive_int, default=128, help="input side after center crop + resize; default 128")
    p.add_argument("--epochs", type=positive_int, default=epochs, help=dflt)
    p.add_argument("--batch-size", type=positive_int, default=batch_size, help=dflt)
    p.add_argument("--lr", type=positive_float, default=lr, help=dflt)
    p.add_argument("--lr-min", type=positive_float, default=None, help="cosine annealing end value (seed: 'lr to lr_min')")
    p.add_argument("--device", default="cpu")


def _video_args(p: argparse.ArgumentParser, lr: float | None, epochs: int) -> None:
    p.add_argument("--frames", type=positive_int, default=16, help="frames per clip; default 16")
    p.add_argument("--stride", type=int, default=4, help="frame step inside a clip; default 4")
    p.add_argument("--image-size", type=int, default=112, help="frame side; default 112 (EchoNet-Dynamic)")
    p.add_argument("--epochs", type=positive_int, default=epochs)
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--lr", type=positive_float, default=lr, help="AdamW learning rate" + ("" if lr is None else f"; default {lr}")
                   + ("; default: the method's" if lr is None else ""))
    p.add_argument("--amp", action="store_true", help="automatic mixed precision (CUDA)")
    p.add_argument("--accumulation-steps", type=int, default=1, help="mini-batches per optimizer step; default 1")
    p.add_argument("--cache-rate", type=float, default=0.0, help="fraction of decoded videos kept in memory; default 0")
    p.add_argument("--device", default="cpu")


# ---------------------------------------------------------------------------------------------- actions
def _phantom(args: argparse.Namespace) -> int:
    from monai_peft.echo import write_camus_phantom, write_echonet_phantom

    if args.layout == "echonet":
        rows = write_echonet_phantom(args.out, args.num, args.frames, size=args.size, seed=args.seed,
                                     depth_mm=args.depth_mm)
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
    from monai_peft.echo import load_backbone, resolve_preset, train_preset

    variant = load_backbone(args.backbone)[1].get("variant", "b0")
    preset = resolve_preset(args.task, args.preset, variant)
    overrides = {k: v for k, v in (("layers", args.layers), ("rank", args.rank), ("lr", args.lr),
                                   ("lr_min", args.lr_min), ("epochs", args.epochs),
                                   ("batch_size", args.batch_size)) if v is not None}
    if args.small_head and args.task != "segmentation":
        overrides["head_kwargs"] = SMALL_HEAD
    m = train_preset(preset, args.backbone, args.camus, args.out, size=args.size, device=args.device, **overrides)
    print(json.dumps(m, indent=2, default=str))
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
        summary[task] = {k: m.get(k) for k in ("parameters", "test", "train_seconds")}
    report = infer_camus(out / "backbone", [out / "adapters" / t / "adapter" for t in TASK_NAMES],
                         out / "data" / "camus", out / "predictions")
    plot_study(report, out / "data" / "camus", out / "predictions", out / "study.png")
    summary["seconds"] = time.time() - t0
    from monai_peft.echo import write_json

    write_json(summary, out / "demo_summary.json")
    print(json.dumps(summary, indent=2, default=float))
    print(f"wrote {out / 'demo_summary.json'}, {out / 'predictions' / 'predictions.json'}, {out / 'study.png'}")
    return 0


def _presets(args: argparse.Namespace) -> int:
    from monai_peft.echo import ECHO_PRESETS, presets_markdown

    rows = [p for p in ECHO_PRESETS.values() if args.task is None or p.task == args.task]
    if args.json:
        print(json.dumps([p.to_dict() for p in rows], indent=2))
    else:
        print(presets_markdown(rows))
    return 0


def _table(args: argparse.Namespace) -> int:
    from monai_peft.echo import echo_tables, find_run_records
    from monai_peft.io import atomic_write_json, atomic_write_text

    tables = echo_tables(find_run_records(args.runs))
    text = "\n\n".join(t["markdown"] for t in tables.values())
    if args.out:
        atomic_write_text(args.out, text + "\n")
        atomic_write_json(Path(args.out).with_suffix(".json"), tables)
    print(text)
    return 0


def _video_pretrain(args: argparse.Namespace) -> int:
    from monai_peft.echo.video import pretrain_video

    from monai_peft.echo.video.demo import TINY_VIDEOMAE

    tiny = TINY_VIDEOMAE if args.tiny else None
    r = pretrain_video(args.echonet, args.out, args.model_size, args.frames, args.stride, args.image_size,
                       args.mask_ratio, args.epochs, args.batch_size, args.lr, init_checkpoint=args.init_checkpoint,
                       config_overrides=tiny, amp=args.amp, accumulation_steps=args.accumulation_steps,
                       device=args.device, cache_rate=args.cache_rate, log_stats=False)
    print(json.dumps(r, indent=2, default=str))
    return 0


def _video_train(args: argparse.Namespace) -> int:
    from monai_peft.echo.video import finetune_video_ef

    kwargs = {"r": args.rank} if args.rank is not None else {}
    for item in args.option:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--option {item!r}: expected KEY=VALUE, e.g. variant=shallow.")
        try:
            kwargs[key] = json.loads(value)
        except json.JSONDecodeError:
            kwargs[key] = value
    r = finetune_video_ef(args.checkpoint, args.echonet, args.out, args.method, args.layers, kwargs, args.epochs,
                          args.batch_size, args.lr, stride=args.stride, clips=args.clips, num_frames=args.frames,
                          image_size=args.image_size, amp=args.amp, accumulation_steps=args.accumulation_steps,
                          resume=args.resume, device=args.device, cache_rate=args.cache_rate, log_stats=False)
    print(json.dumps({k: r.get(k) for k in ("method", "parameters", "validation", "test", "costs")}, indent=2))
    return 0


def _video_evaluate(args: argparse.Namespace) -> int:
    from monai_peft.echo.video import evaluate_video_ef

    print(json.dumps(evaluate_video_ef(args.run, args.echonet, args.split, args.out, args.clips, device=args.device,
                                       log_stats=False), indent=2))
    return 0


def _video_predict(args: argparse.Namespace) -> int:
    from monai_peft.echo.video import predict_video_ef

    r = predict_video_ef(args.run, args.videos or args.echonet, args.out, args.clips, device=args.device)
    print(json.dumps(r, indent=2))
    return 0


def _video_demo(args: argparse.Namespace) -> int:
    from monai_peft.echo.video.demo import format_comparison, run_video_demo

    result = run_video_demo(args.out, args.methods, args.videos, args.pretrain_epochs, args.epochs, args.mask_ratio,
                            seed=args.seed)
    print(format_comparison(result))
    print(f"wrote {Path(args.out) / 'comparison.json'} and {Path(args.out) / 'comparison.png'}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from monai_peft.echo.compare import FAST_LRS, CompareSettings, comparison_table, fast_settings, run_comparison

    lrs = {}
    for item in args.lr:
        method, _, values = item.partition("=")
        try:
            lrs[method] = [float(v) for v in values.split(",")]
        except ValueError:
            raise ValueError(f"--lr {item!r}: expected METHOD=LR[,LR...], e.g. lora=1e-3,3e-3.") from None
    common = dict(camus=args.camus, echonet=args.echonet, backbone=args.backbone,
                  video_checkpoint=args.video_checkpoint, seed=args.seed, device=args.device, tiny=not args.mit_b0)
    if args.fast:
        settings, lrs = fast_settings(args.out, **common), {**FAST_LRS, **lrs}
    else:
        settings = CompareSettings(out=args.out, size=args.size, epochs=args.epochs, batch_size=args.batch_size,
                                   pretrain_epochs=args.pretrain_epochs, video_epochs=args.video_epochs,
                                   progress=True, **common)
    result = run_comparison(settings, args.tasks, args.methods, lrs)
    print(comparison_table(result))
    print(f"wrote {Path(args.out) / 'comparison.json'}, {Path(args.out) / 'comparison.png'}")
    return 0


# name -> (help, add arguments, run); one row per action, in the order ``--help`` lists them.
ACTIONS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {
    "phantom": ("write a CAMUS (2019/2023) or EchoNet-Dynamic phantom dataset", _args_phantom, _phantom),
    "quality": ("CAMUS self-check: EF from cfg volumes and Simpson's method vs cfg EF", _args_quality, _quality),
    "pretrain": ("pretrain the Segformer on EchoNet-Dynamic ED/ES LV masks", _args_pretrain, _pretrain),
    "presets": ("the echo paper's Tables I-IV configurations, with the paper's figures", _args_presets, _presets),
    "train": ("train one CAMUS task with a Tables I-IV configuration (LoRA, head only, full MiT...)", _args_train,
              _train),
    "table": ("results of train runs in the paper's Tables I-IV layout, the paper's figures beside", _args_table,
              _table),
    "predict": ("run all task adapters on the CAMUS patients of a split", _args_predict, _predict),
    "demo": ("phantoms -> pretraining -> four adapters -> multi-task prediction", _args_demo, _demo),
    "compare": ("LoRA vs VPT vs bottleneck adapters vs BitFit vs head-only vs full fine-tuning, phantoms by default",
                _args_compare, _compare),
    "video-pretrain": ("VideoMAE masked-autoencoder pretraining on EchoNet videos (EchoAI)", _args_video_pretrain,
                       _video_pretrain),
    "video-train": ("fine-tune video EF regression with LoRA, full fine-tuning, linear probe...", _args_video_train,
                    _video_train),
    "video-evaluate": ("EF MAE / RMSE / R^2 of a video-train run", _args_video_evaluate, _video_evaluate),
    "video-predict": ("per-video EF of a video-train run", _args_video_predict, _video_predict),
    "video-demo": ("phantom videos -> MAE pretraining -> LoRA / full / linear probe, compared", _args_video_demo,
                   _video_demo),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    for name, (help_text, add, _) in ACTIONS.items():
        add(sub.add_parser(name, help=help_text, description=help_text))


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return int(ACTIONS[args.action][2](args) or 0)


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
    def num(x) -> str:
        return "-" if x is None else f"{x:.1f}"

    for k in ("volume_adapter", "simpson"):
        if k in entry:
            v = entry[k]
            lines.append(f"{k}: EDV {num(v['EDV'])} ml, ESV {num(v['ESV'])} ml, EF {num(v['EF'])}%")
    fig.suptitle("\n".join(lines), fontsize=9)
    fig.tight_layout()
    try:
        atomic_save_figure(fig, png, dpi=90, format="png")
    finally:
        plt.close(fig)
