"""How long ``monai-peft --help`` and every ``monai-peft COMMAND --help`` take, against a bare Python start.

Each measurement is a fresh interpreter started the way the installed console script starts (``argv[0]`` is
``monai-peft``), interleaved with a baseline interpreter that only imports ``argparse``, after one warm-up round;
prints the median seconds per command and the ratio to the baseline. The target (issue 13) is under 1 s each.

    python benchmarks/cli_help.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

LAUNCH = "import sys; sys.argv[0] = 'monai-peft'; from monai_peft.cli import main; sys.exit(main())"
BASELINE = "import argparse"


def _seconds(args: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, *args], check=False, capture_output=True)
    return time.perf_counter() - t0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    from monai_peft.cli import SUBCOMMANDS

    commands = [[]] + [[name] for name in SUBCOMMANDS]
    runs: dict[str, list[float]] = {" ".join(c) or "(top level)": [] for c in commands}
    base: list[float] = []
    for repeat in range(args.repeats + 1):  # round 0 warms the file cache and is dropped
        for command in commands:
            b = _seconds(["-c", BASELINE])
            t = _seconds(["-c", LAUNCH, *command, "--help"])
            if repeat:
                base.append(b)
                runs[" ".join(command) or "(top level)"].append(t)
    b = statistics.median(base)
    print(f"{'monai-peft ... --help':<24}{'median s':>10}{'x bare python':>15}")
    print(f"{'(bare python)':<24}{b:>10.3f}{1.0:>15.1f}")
    for name, times in runs.items():
        m = statistics.median(times)
        print(f"{name:<24}{m:>10.3f}{m / b:>15.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
