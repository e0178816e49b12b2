"""Fake SuPreM checkpoints in the released layouts, built from the key lists in ``tests/data`` (not from our writer).

``tests/data/README.md`` says where the key lists come from.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

DATA = Path(__file__).resolve().parent / "data"
RELEASED = {"segresnet": "supervised_suprem_segresnet_2100.net.keys.json",
            "unet": "supervised_suprem_unet_2100.net.keys.json"}
BACKBONE_PREFIX = {"segresnet": "module.", "unet": "module.backbone."}


def released_layout(backbone: str) -> dict[str, list[int]]:
    """``{key: shape}`` of the ``"net"`` dict of SuPreM's released ``backbone`` checkpoint."""
    return json.loads((DATA / RELEASED[backbone]).read_text())


def fake_released_checkpoint(backbone: str, path: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors in the released layout, saved as ``{"net": ..., "epoch": ...}``; returns the ``net`` dict."""
    gen = torch.Generator().manual_seed(seed)
    net = {}
    for key, shape in released_layout(backbone).items():
        if key.endswith("num_batches_tracked"):
            net[key] = torch.tensor(2100, dtype=torch.long)
        elif key.endswith("running_var"):
            net[key] = torch.rand(shape, generator=gen) + 0.5
        else:
            net[key] = torch.randn(shape, generator=gen) * (0.05 if len(shape) > 1 else 1.0)
    torch.save({"net": net, "epoch": 2100}, path)
    return net
