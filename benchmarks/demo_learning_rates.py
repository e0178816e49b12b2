"""Choose the learning rate of each ``monai-peft demo`` method by its validation Dice (the demo's DEMO_METHODS).

Fine-tunes the demo's foundation model once per (method, learning rate) of a small grid on the demo's target task
and prints, per method, the best validation Mean Dice of each rate (the demo validates every epoch on held-out
phantoms; the test cases are not looked at). The winner of each method is the rate the demo uses. Data and the
foundation model are made once and shared by every run; a finished (method, rate) run is read back, not repeated.

    python benchmarks/demo_learning_rates.py --output-dir runs/demo_lr      # ~20 min on 2 idle CPU cores

Writes ``<output-dir>/learning_rates.json``: ``{"grid": {method: {lr: best validation Dice}}, "chosen": {...}}``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

GRID = {"full": (1e-3, 3e-3, 1e-2, 3e-2), "convadapter": (3e-3, 1e-2, 3e-2, 1e-1),
        "lora": (3e-3, 1e-2, 3e-2, 1e-1), "ssf": (3e-3, 1e-2, 3e-2, 1e-1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", type=Path, default=Path("runs/demo_lr"))
    parser.add_argument("--methods", nargs="+", default=list(GRID), choices=list(GRID))
    parser.add_argument("--epochs", type=int, default=None, help="fine-tuning epochs (default: the demo's)")
    args = parser.parse_args()

    from monai_peft.workflows.demo import run_demo

    root = args.output_dir
    extra = {} if args.epochs is None else {"epochs": args.epochs}
    t0 = time.perf_counter()
    # data and the foundation model, made once (one short full fine-tuning run creates them)
    run_demo(root / "base", methods=["full"], epochs=1, progress=False)
    grid: dict[str, dict[str, float | None]] = {}
    for method in args.methods:
        for lr in GRID[method]:
            out = root / f"{method}_lr{lr:g}"
            out.mkdir(parents=True, exist_ok=True)
            for shared in ("data", "pretrain"):
                link = out / shared
                if not link.exists():
                    os.symlink((root / "base" / shared).resolve(), link, target_is_directory=True)
            done = out / "comparison.json"
            result = json.loads(done.read_text()) if done.exists() else None
            if result is None or result["rows"][0]["lr"] != lr or (args.epochs and result["settings"]["epochs"] != args.epochs):
                result = run_demo(out, methods=[method], learning_rates={method: lr}, progress=False, **extra)
            row = result["rows"][0]
            grid.setdefault(method, {})[f"{lr:g}"] = row["best_val_dice"]
            print(f"{method:<12} lr {lr:<7g} best validation Dice {row['best_val_dice']:.3f}  "
                  f"(test {row['test_dice']:.3f}, {time.perf_counter() - t0:.0f} s so far)", flush=True)
            shutil.rmtree(out / method / "adapter", ignore_errors=True)  # keep the records, not the weights
    chosen = {m: float(max(lrs, key=lambda k: -1.0 if lrs[k] is None else lrs[k])) for m, lrs in grid.items()}
    report = {"grid": grid, "chosen": chosen, "seconds": time.perf_counter() - t0,
              "note": "best validation Mean Dice over the demo's fine-tuning epochs, one run per rate"}
    (root / "learning_rates.json").write_text(json.dumps(report, indent=2))
    print("chosen:", ", ".join(f"{m} {lr:g}" for m, lr in chosen.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
