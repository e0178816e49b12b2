"""Run peft's own custom-model test battery (``tests/test_custom_models.py``) on monai-peft's ConvAdapter and SSF.

Issue 10, part 4: whatever peft checks for its own methods on its mock models (MLP, Conv1d, Conv2d incl. 1x1 and
groups, Conv3d; 1-, 5-, 8-, 10-, 16- and 64-channel layers) must hold for ConvAdapter and SSF. Our own tests
(``tests/test_peft_conformance.py``) say so in CI; this script runs peft's real battery, for a reviewer or a peft
upgrade:

1. takes peft's source distribution of the installed version (``--peft-src DIR``, or ``pip download`` from the
   package registry into ``--work``), whose ``tests/`` folder holds the battery;
2. adds ConvAdapter and SSF cases to its ``TEST_CASES`` (:data:`MODELS` x :data:`VARIANTS`) in a copy, and skips
   merging for ConvAdapter the way peft skips its own non-mergeable methods (its branch is non-linear);
3. runs ``pytest -k "ConvAdapterConfig or SSFConfig"`` and prints the failures grouped by test.

``diffusers`` and ``datasets``, which peft's test helpers import but no selected test uses, are stubbed when they
are not installed. Expected failures, with their reasons, are in ``benchmarks/README.md`` ("peft's test battery").
About 3 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile
from importlib.util import find_spec
from pathlib import Path

import peft

# peft mock models (model id, target module names, more config) with convs, then with linear and LayerNorm layers
MODELS: tuple[tuple[str, tuple[str, ...], dict], ...] = (
    ("Conv1d", ("conv1d",), {}), ("Conv1d", ("conv1d",), {"modules_to_save": ["lin0"]}),
    ("Conv1dBigger", ("conv1d",), {}), ("Conv1dGroups", ("conv1d",), {}),
    ("Conv2d", ("conv2d",), {}), ("Conv2d", ("conv2d",), {"modules_to_save": ["lin0"]}),
    ("Conv2d1x1", ("conv2d",), {}), ("Conv2dGroups", ("conv2d",), {}), ("Conv2dGroups2", ("conv2d",), {}),
    ("Conv2d2", ("conv2d",), {}), ("Conv3d", ("conv3d",), {}),
)
LINEAR_MODELS: tuple[tuple[str, tuple[str, ...], dict], ...] = (
    ("MLP", ("lin0",), {}), ("MLP", ("lin0",), {"modules_to_save": ["lin1"]}), ("MLP", ("lin0", "lin1"), {}),
    ("MLP_LayerNorm", ("lin0",), {"modules_to_save": ["lin1"]}),
)
NORM_MODELS: tuple[tuple[str, tuple[str, ...], dict], ...] = (  # SSF only: ConvAdapter follows no norm layer
    ("MLP_LayerNorm", ("layernorm0", "lin0"), {}),
    ("MLP_LayerNorm", ("layernorm0", "lin0"), {"modules_to_save": ["lin1"]}),
)
# config options per method; peft's tests set init_weights=False themselves where they need a non-identity start
VARIANTS: dict[str, tuple[dict, ...]] = {
    "ConvAdapterConfig": ({}, {"insertion": "sequential"}, {"adapter_conv": "dense"}, {"activation": "relu"}),
    "SSFConfig": ({}, {"scale": False}),
}

_CASES = '''
from monai_peft import ConvAdapterConfig, SSFConfig  # monai-peft's cases (benchmarks/peft_battery.py)
for _cls_name, _variants, _models in {cases!r}:
    _cls = {{"ConvAdapterConfig": ConvAdapterConfig, "SSFConfig": SSFConfig}}[_cls_name]
    for _extra in _variants:
        for _model, _targets, _more in _models:
            _options = "".join(f" {{k}}={{v}}" for k, v in _extra.items())
            _name = f"{{_cls_name}}{{_options}} {{_model}} {{list(_targets)}} {{_more or ''}}"
            TEST_CASES.append((_name.strip(), _model, _cls, {{"target_modules": list(_targets), **_extra, **_more}}))
'''
_MERGE_SKIP = ("    if config_cls.__name__ == 'ConvAdapterConfig':\n"
               "        pytest.skip('ConvAdapter adds a non-linear branch and cannot be merged.')\n")


def _fail(message: str) -> None:
    """Bad input: one line on stderr, exit status 2."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def peft_source(work: Path, given: Path | None) -> Path:
    """The root of peft's source tree for the installed version (with ``tests/``)."""
    if given is not None:
        if not (given / "tests" / "test_custom_models.py").is_file():
            _fail(f"--peft-src {given} has no tests/test_custom_models.py; expected peft's source tree")
        return given
    archive_dir = work / "sdist"
    archive_dir.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", f"peft=={peft.__version__}", "--no-deps", "--no-binary",
                    ":all:", "-d", str(archive_dir), "-q"], check=True)
    archive = next(archive_dir.glob(f"peft-{peft.__version__}.tar.gz"))
    shutil.unpack_archive(archive, work)
    return work / f"peft-{peft.__version__}"


def prepare(src: Path, work: Path) -> Path:
    """A copy of peft's tests with our cases added; returns the folder to run pytest in."""
    root = work / "battery"
    if root.exists():
        shutil.rmtree(root)
    shutil.copytree(src / "tests", root / "tests")
    (root / "tests" / "__init__.py").touch()
    cases = tuple((cls, VARIANTS[cls], MODELS + LINEAR_MODELS + (NORM_MODELS if cls == "SSFConfig" else ()))
                  for cls in VARIANTS)
    battery = (root / "tests" / "test_custom_models.py").read_text()
    marker = "ALL_PEFT_CONFIG_CLASSES = sorted("
    if marker not in battery:
        _fail(f"peft {peft.__version__}'s tests/test_custom_models.py has no '{marker}'; update this script")
    battery = battery.replace(marker, _CASES.format(cases=cases) + marker, 1)
    (root / "tests" / "test_custom_models.py").write_text(battery)
    common_path = root / "tests" / "testing_common.py"
    common = common_path.read_text()
    hook = "def _skip_if_merging_not_supported(model_id, config_cls, config_kwargs):\n"
    common_path.write_text(common.replace(hook, hook + _MERGE_SKIP, 1))
    stubs = root / "stubs"
    for name, body in (("diffusers", "class StableDiffusionPipeline:\n    pass\n"),
                       ("datasets", "def load_dataset(*args, **kwargs):\n    raise RuntimeError('stub')\n")):
        if find_spec(name) is None:
            (stubs / name).mkdir(parents=True, exist_ok=True)
            (stubs / name / "__init__.py").write_text(body)
    return root


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--peft-src", type=Path, default=None, help="peft's source tree (default: pip download the sdist)")
    p.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    p.add_argument("-n", "--workers", default="auto", help="pytest-xdist workers (default auto)")
    args = p.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="peft_battery_"))
    root = prepare(peft_source(work, args.peft_src), work)
    cmd = [sys.executable, "-m", "pytest", "-o", "addopts=", "-p", "no:cacheprovider", "-q", "-n", str(args.workers),
           "tests/test_custom_models.py", "-k", "ConvAdapterConfig or SSFConfig"]
    env_path = str(root / "stubs")
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": env_path, "OMP_NUM_THREADS": "1"})
    failed = re.findall(r"^FAILED tests/test_custom_models.py::(\w+)::(\w+)\[(.*)\]", proc.stdout, re.M)
    by_test = collections.defaultdict(list)
    for cls, test, params in failed:
        # "<case name>-<model id>-<config class>-config_kwargsN" for TEST_CASES, else the test's own parameters
        by_test[f"{cls}::{test}"].append(params.rsplit("-", 3)[0] if "config_kwargs" in params else params)
    for test, cases in sorted(by_test.items()):
        print(f"{len(cases):4d} failed  {test}")
        for case in cases:
            print(f"              {case}")
    summary = [line for line in proc.stdout.splitlines() if re.search(r"\d+ (passed|failed)", line)]
    print(f"peft {peft.__version__}: {summary[-1] if summary else proc.stdout[-2000:] + proc.stderr[-2000:]}")
    return 0 if proc.returncode in (0, 1) else proc.returncode


if __name__ == "__main__":
    sys.exit(main())
