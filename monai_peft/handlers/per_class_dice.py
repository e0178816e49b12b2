"""Per-class Dice for validation: the mean Dice the thesis reports plus one entry per organ (thesis 4.2.5.1)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from monai.handlers import IgniteMetricHandler
from monai.metrics import DiceMetric
from monai.utils import IgniteInfo, min_version, optional_import

from monai_peft.metrics import IGNORE_EMPTY

if TYPE_CHECKING:
    from ignite.engine import Engine
else:
    Engine, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine")

__all__ = ["PerClassDice"]


class PerClassDice(IgniteMetricHandler):
    """Mean Dice over foreground classes, plus ``<name>_<class>`` entries for each class.

    The value stored under the metric's own name is the mean over classes of the per-class Dice
    averaged over cases (classes absent from every case are left out of the mean), so it can be the key
    metric of an evaluator. Each class gets its own entry in ``engine.state.metrics`` named
    ``f"{name}_{class_name}"``. A case whose ground truth lacks a class gives NaN for it and is skipped
    (:data:`monai_peft.metrics.IGNORE_EMPTY`, the one Dice convention).

    Args:
        class_names: names of the foreground classes in channel order (channel 1 is ``class_names[0]``
            when ``include_background`` is False). ``None`` names them ``"1"``, ``"2"``, ...
        include_background: whether channel 0 counts as a class. Default False.
        output_transform: maps ``engine.state.output`` to ``(y_pred, y)``, one-hot tensors of shape
            ``(B, C, H, W[, D])`` or lists of ``(C, H, W[, D])``. MONAI's ``from_engine(["pred", "label"])``
            is the usual choice after decollating post-transforms.
        save_details: keep the per-case Dice buffer in ``engine.state.metric_details[name]``. Default True.
    """

    def __init__(
        self,
        class_names: Sequence[str] | None = None,
        include_background: bool = False,
        output_transform: Callable = lambda x: x,
        save_details: bool = True,
    ) -> None:
        if class_names is not None and (isinstance(class_names, str) or len(class_names) == 0):
            raise ValueError(f"class_names must be a non-empty list of names, got {class_names!r}.")
        self.class_names = list(class_names) if class_names is not None else None
        self.include_background = include_background
        metric = DiceMetric(include_background=include_background, reduction="mean_batch", ignore_empty=IGNORE_EMPTY)
        super().__init__(metric_fn=metric, output_transform=output_transform, save_details=save_details)

    def compute(self) -> Any:
        """Return the per-class Dice, a float tensor of shape ``(C,)``."""
        # per-case values (N, C), gathered across ranks; NaN marks a class absent from a case's ground truth.
        # nanmean keeps a class absent from every case NaN (MONAI's "mean_batch" would report 0 for it).
        buffer = self.metric_fn.get_buffer()
        if buffer is None or not isinstance(buffer, torch.Tensor) or buffer.numel() == 0:
            raise RuntimeError("PerClassDice: no case was evaluated (empty buffer).")
        self._is_reduced = True
        if self.save_details and self._engine is not None and self._name is not None:
            self._engine.state.metric_details[self._name] = buffer
        return torch.nanmean(buffer.float().reshape(buffer.shape[0], -1), dim=0).cpu()

    def completed(self, engine: Engine, name: str) -> None:
        """Store the mean under ``name`` and each class under ``f"{name}_{class_name}"``."""
        per_class = self.compute()
        names = self.class_names or [str(i + (0 if self.include_background else 1)) for i in range(per_class.numel())]
        if len(names) != per_class.numel():
            raise ValueError(
                f"PerClassDice '{name}': class_names has {len(names)} entries but the prediction has "
                f"{per_class.numel()} {'classes' if self.include_background else 'foreground channels'}."
            )
        valid = per_class[~torch.isnan(per_class)]
        engine.state.metrics[name] = float(valid.mean()) if valid.numel() else float("nan")
        for cls, value in zip(names, per_class.tolist()):
            engine.state.metrics[f"{name}_{cls}"] = value
