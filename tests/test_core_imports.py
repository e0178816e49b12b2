"""The core knows no nnU-Net (issue 10, part 8): importing monai_peft and its method modules loads neither
nnunet_plugin nor dynamic_network_architectures nor nnunetv2; method layers import no policy module; the plugin
registers the nnU-Net regions itself when it is imported."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys

from conftest import REPO

CORE_MODULES = [
    "monai_peft", "monai_peft.adapt", "monai_peft.lora", "monai_peft.targeting", "monai_peft.regions",
    "monai_peft.report", "monai_peft.presets", "monai_peft.networks", "monai_peft.tuners.conv_adapter",
    "monai_peft.tuners.ssf", "monai_peft.tuners.frozen_norm", "monai_peft.tuners.module_types",
]
NNUNET_PACKAGES = ("nnunet_plugin", "dynamic_network_architectures", "nnunetv2")

PROBE = r"""
import importlib, json, sys
from_nnunet = lambda names: sorted(m for m in names if m.split(".")[0] in {packages})
# the interpreter started with the plugin's .pth hook active: it must leave no nnU-Net module behind either
for name in sys.argv[1].split(","):
    importlib.import_module(name)
from monai_peft.regions import REGION_REGISTRY
registered = lambda: sorted(f"{c.__module__}.{c.__name__}" for c in REGION_REGISTRY)
core = {"loaded": from_nnunet(set(sys.modules)), "registered": registered()}
importlib.import_module("nnunet_plugin.network")
print(json.dumps({"core": core, "plugin": {"registered": registered()}}))
""".replace("{packages}", repr(set(NNUNET_PACKAGES)))


def test_core_loads_no_nnunet_module_and_the_plugin_registers_its_regions():
    """One fresh interpreter: first the core and every method module, then the plugin."""
    env = {k: v for k, v in os.environ.items() if k != "MONAI_PEFT_NO_NNUNET_HOOK"}
    proc = subprocess.run([sys.executable, "-c", PROBE, ",".join(CORE_MODULES)], capture_output=True, text=True,
                          timeout=600, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    core, plugin = result["core"], result["plugin"]
    assert core["loaded"] == [], f"the core imported {core['loaded']}"
    assert not [c for c in core["registered"] if c.startswith(NNUNET_PACKAGES)]
    assert "monai.networks.nets.segresnet.SegResNet" in core["registered"]
    assert any(c.endswith(".PlainConvUNet") for c in plugin["registered"]), plugin["registered"]
    assert any(c.endswith(".ResidualEncoderUNet") for c in plugin["registered"])


def test_method_layers_import_no_policy_module():
    """monai_peft/tuners/* may import peft, torch, the standard library and monai_peft.tuners only."""
    offenders = []
    for path in sorted((REPO / "monai_peft" / "tuners").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            offenders += [f"{path.relative_to(REPO)}: {n}" for n in names
                          if n.startswith("monai_peft") and not n.startswith("monai_peft.tuners")
                          or n.split(".")[0] in NNUNET_PACKAGES + ("monai",)]
    assert not offenders, offenders
