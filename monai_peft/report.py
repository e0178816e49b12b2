"""Trainable / total parameters per method and per region, as a table and JSON (thesis Tables 5.1-5.5 "# Param").

Percentages follow the thesis: trainable parameters over the parameters of the original network (e.g. ConvAdapter
in SegResNet: 0.7M trainable of 4.7M = 14.9%). Frozen originals kept by peft beside fully trained copies
(``modules_to_save``/LN-tuning) count once, in the original network's total.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Union

from torch import nn

from monai_peft.io import atomic_write_json
from monai_peft.regions import module_in_region, regions_of
from monai_peft.tuners.wrappers import adapter_kind, base_module_name, user_network

__all__ = ["ParameterReport", "parameter_report", "parameter_kind"]

def parameter_kind(name: str) -> str:
    """``conv_adapter``, ``ssf``, ``lora``, ``vpt``, ``bottleneck_adapter``, ``full_copy`` (a trained copy of a base
    module) or ``base`` (see :func:`monai_peft.tuners.wrappers.adapter_kind`)."""
    return adapter_kind(name) or "base"


@dataclass
class ParameterReport:
    """Result of :func:`parameter_report`.

    Attributes:
        trainable: parameters that require grad.
        total: parameters of the original network (adapters and trained copies excluded).
        added: parameters that adapters add on top of the original network (adapter layers, trained copies).
        percent: ``100 * trainable / total`` (the thesis's convention).
        by_kind: trainable parameters per kind (``conv_adapter``, ``lora``, ``ssf``, ``full_copy``, ``base``).
        by_region: per region (``encoder``, ``decoder``, ``head``, ... and ``other``): ``trainable`` and ``total``.
    """

    trainable: int
    total: int
    added: int
    percent: float
    by_kind: dict[str, int] = field(default_factory=dict)
    by_region: dict[str, dict[str, int]] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)

    def to_json(self, path: Union[str, os.PathLike]) -> Path:
        """Write the report atomically as JSON; returns the path."""
        return atomic_write_json(path, self.as_dict())

    def table(self) -> str:
        """A plain-text table: one row per region and per kind, then the total."""
        lines = [f"{'':<22}{'trainable':>14}{'total':>14}{'%':>9}"]
        for region, row in self.by_region.items():
            pct = 100.0 * row["trainable"] / row["total"] if row["total"] else 0.0
            lines.append(f"{'region ' + region:<22}{row['trainable']:>14,}{row['total']:>14,}{pct:>8.1f}%")
        for kind, n in self.by_kind.items():
            lines.append(f"{'kind ' + kind:<22}{n:>14,}{'':>14}{100.0 * n / self.total if self.total else 0:>8.1f}%")
        lines.append(f"{'all':<22}{self.trainable:>14,}{self.total:>14,}{self.percent:>8.2f}%")
        if self.added:
            lines.append(f"{'(added by adapters)':<22}{self.added:>14,}")
        return "\n".join(lines)


def parameter_report(model: nn.Module) -> ParameterReport:
    """Count trainable and total parameters of a (peft-wrapped) network, per kind and per region."""
    base = user_network(model)
    regions = list(regions_of(base))
    by_kind: dict[str, int] = {}
    by_region: dict[str, dict[str, int]] = {r: {"trainable": 0, "total": 0} for r in regions + ["other"]}
    trainable = total = added = 0
    region_cache: dict[str, str] = {}
    for name, p in model.named_parameters():
        kind = parameter_kind(name)
        n = p.numel()
        path = base_module_name(name.rpartition(".")[0])
        if path not in region_cache:
            region_cache[path] = next((r for r in regions if path and module_in_region(base, path, r)), "other")
        region = region_cache[path]
        if kind == "base":
            total += n
            by_region[region]["total"] += n
        else:
            added += n
        if p.requires_grad:
            trainable += n
            by_kind[kind] = by_kind.get(kind, 0) + n
            by_region[region]["trainable"] += n
    by_region = {r: v for r, v in by_region.items() if v["total"] or v["trainable"]}
    return ParameterReport(trainable, total, added, 100.0 * trainable / total if total else 0.0, by_kind, by_region)
