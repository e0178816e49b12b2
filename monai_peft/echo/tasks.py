"""Task definitions of the echo seed: one place for heads, losses, targets and metrics of every task.

``segmentation`` (CAMUS LV endocardium / myocardium / left atrium, Segformer decoder head, cross-entropy,
section III.D), ``view`` (2CH vs 4CH, CNN head with dropout, cross-entropy, III.A), ``volume`` (the frame's
LV volume: EDV on ED frames, ESV on ES frames, CNN head without dropout, Huber loss, III.B), ``age`` (same
head and loss, III.C) and the pretext task ``lv_segmentation`` (EchoNet-Dynamic LV masks, section II).
Regression targets are standardised with fixed ``target_mean`` / ``target_std``; heads predict the
standardised value and :meth:`TaskSpec.decode` maps it back to ml or years.
"""

from __future__ import annotations

import inspect
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.nn as nn

from .models import CNNHead, SegmentationHead

__all__ = ["TaskSpec", "TASKS", "get_task"]

KINDS = ("segmentation", "classification", "regression")


@dataclass(frozen=True)
class TaskSpec:
    """What one task predicts and how it is trained.

    Args:
        name: task name (also the adapter name).
        kind: ``"segmentation"``, ``"classification"`` or ``"regression"``.
        num_outputs: classes (background included) or regressed values.
        target: sample field holding the target (``"label"``, ``"view"``, ``"volume"``, ``"age"``).
        class_names: names of the classes (segmentation / classification).
        target_mean: regression standardisation mean. Default 0.
        target_std: regression standardisation std. Default 1.
        dropout: head dropout (view: 0.3, regression: 0, segmentation: 0.1).
        head_kwargs: extra :class:`CNNHead` arguments, e.g. ``{"conv_channels": [8, 16, 32]}`` (the seed's
            "less complex adapter head", Table I note d).
    """

    name: str
    kind: str
    num_outputs: int
    target: str
    class_names: tuple = ()
    target_mean: float = 0.0
    target_std: float = 1.0
    dropout: float = 0.0
    head_kwargs: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"TaskSpec {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}.")

    def build_head(self, in_channels: int) -> nn.Module:
        """The task head for backbone features with ``in_channels`` channels."""
        cls = SegmentationHead if self.kind == "segmentation" else CNNHead
        allowed = set(inspect.signature(cls).parameters) - {"in_channels", "num_classes", "num_outputs", "dropout"}
        bad = sorted(set(self.head_kwargs) - allowed)
        if bad:
            raise ValueError(f"task {self.name!r}: head_kwargs {bad} are not arguments of {cls.__name__} "
                             f"(allowed: {sorted(allowed)}).")
        return cls(in_channels, self.num_outputs, dropout=self.dropout, **self.head_kwargs)

    def loss(self) -> nn.Module:
        """Cross-entropy for segmentation / classification, Huber for regression (echo seed, III.A-D)."""
        if self.kind == "regression":
            return nn.HuberLoss()
        if self.kind == "segmentation":
            return _SegCE()
        return nn.CrossEntropyLoss()

    def encode(self, value) -> torch.Tensor:
        """A sample's target as the tensor the loss expects (segmentation labels are passed unchanged)."""
        if self.kind == "regression":
            return torch.tensor([(float(value) - self.target_mean) / self.target_std], dtype=torch.float32)
        if self.kind == "classification":
            return torch.tensor(int(value), dtype=torch.long)
        return value

    def decode(self, output: torch.Tensor) -> torch.Tensor:
        """Head output -> prediction: class map ``(B, H, W)``, class ``(B,)`` or value in units ``(B, K)``."""
        if self.kind == "regression":
            return output * self.target_std + self.target_mean
        return output.argmax(dim=1)

    def with_head(self, **head_kwargs) -> TaskSpec:
        """A copy with other head arguments (e.g. a small head for tests)."""
        return replace(self, head_kwargs=dict(head_kwargs))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["class_names"] = list(self.class_names)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TaskSpec:
        d = dict(d)
        d["class_names"] = tuple(d.get("class_names", ()))
        return cls(**d)


class _SegCE(nn.Module):
    """Cross-entropy on ``(B, K, H, W)`` logits with ``(B, 1, H, W)`` or ``(B, H, W)`` integer labels."""

    def __init__(self) -> None:
        super().__init__()
        self.ce = nn.CrossEntropyLoss()

    def forward(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        if label.ndim == logits.ndim:
            label = label[:, 0]
        return self.ce(logits, label.long())


TASKS: dict[str, TaskSpec] = {
    "segmentation": TaskSpec("segmentation", "segmentation", 4, "label",
                             ("background", "LV endocardium", "myocardium", "left atrium"), dropout=0.1),
    "view": TaskSpec("view", "classification", 2, "view", ("2CH", "4CH"), dropout=0.3),
    "volume": TaskSpec("volume", "regression", 1, "volume", target_mean=70.0, target_std=40.0),
    "age": TaskSpec("age", "regression", 1, "age", target_mean=65.0, target_std=15.0),
    "lv_segmentation": TaskSpec("lv_segmentation", "segmentation", 2, "label", ("background", "LV"), dropout=0.1),
}


def get_task(name: str, **head_kwargs) -> TaskSpec:
    """The :data:`TASKS` entry ``name``, optionally with other head arguments."""
    if name not in TASKS:
        raise ValueError(f"task: expected one of {sorted(TASKS)}, got {name!r}.")
    spec = TASKS[name]
    return spec.with_head(**head_kwargs) if head_kwargs else spec
