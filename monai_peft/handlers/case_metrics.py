"""Per-case, per-class Dice and NSD on a test set, written to JSON/CSV and summarised in the run record."""

from __future__ import annotations

import csv
import io
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from monai.metrics import compute_surface_dice
from monai.utils import IgniteInfo, min_version, optional_import

from monai_peft.metrics import nan_mean, onehot_dice
from monai_peft.io import atomic_write_json, atomic_write_text
from monai_peft.workflows.records import update_run_record

if TYPE_CHECKING:
    from ignite.engine import Engine, Events
else:
    Engine, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine")
    Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")

__all__ = ["CaseMetricsWriter", "case_id_of", "case_metrics"]


def case_id_of(filename: str | None, index: int) -> str:
    """A readable case id: the case folder for TotalSegmentator layout (``s0001/ct.nii.gz``), else the file stem."""
    if not filename:
        return f"case_{index:04d}"
    path = Path(str(filename))
    name = path.name
    for ext in (".nii.gz", ".nii", ".mha", ".nrrd", ".npy"):
        if name.endswith(ext):
            name = name[: -len(ext)]
            break
    return path.parent.name if name in ("ct", "mr", "image", "img") and path.parent.name else name


def _spacing_of(t: Any) -> list[float] | None:
    pixdim = getattr(t, "pixdim", None)
    if pixdim is None:
        return None
    values = [float(v) for v in torch.as_tensor(pixdim).reshape(-1).tolist()]
    return values if values and all(v > 0 for v in values) else None


def case_metrics(
    pred: torch.Tensor, label: torch.Tensor, nsd_tolerance_mm: float | None = 2.0, spacing: Sequence[float] | None = None
) -> tuple[list[float], list[float] | None]:
    """Dice and normalised surface Dice per foreground class for one case.

    Args:
        pred: one-hot prediction ``(C, H, W[, D])`` (channel 0 background).
        label: one-hot ground truth, same shape.
        nsd_tolerance_mm: NSD boundary tolerance in mm (same for every class); ``None`` skips NSD.
        spacing: voxel size in mm per spatial axis; ``None`` means 1 mm.

    Returns:
        ``(dice, nsd)`` lists of length ``C - 1``; NaN where the class is absent from both.
    """
    if pred.shape != label.shape:
        raise ValueError(f"pred shape {tuple(pred.shape)} differs from label shape {tuple(label.shape)}.")
    p, y = pred.unsqueeze(0).float(), label.unsqueeze(0).float()
    dice = onehot_dice(p, y)[0].tolist()
    nsd = None
    if nsd_tolerance_mm is not None:
        n_fg = pred.shape[0] - 1
        with warnings.catch_warnings():
            # empty classes are expected (absent organs); their NSD comes back as NaN and is skipped in means
            warnings.filterwarnings("ignore", message=".*may result in nan/inf distance.*")
            warnings.filterwarnings("ignore", category=FutureWarning, module="monai")
            nsd_t = compute_surface_dice(
                p.cpu(), y.cpu(), class_thresholds=[float(nsd_tolerance_mm)] * n_fg, include_background=False,
                spacing=list(spacing) if spacing is not None else None,
            )[0]
        nsd = nsd_t.tolist()
    return dice, nsd


class CaseMetricsWriter:
    """Collect per-case, per-class Dice (and NSD) from an evaluator and write them when it completes.

    Expects ``engine.state.output`` to be a list of per-case dicts (MONAI decollated output) whose ``pred``
    and ``label`` are one-hot ``(C, H, W[, D])`` tensors (``AsDiscreted(argmax=..., to_onehot=C)``).
    Writes ``<output_dir>/test_metrics.json`` (cases + summary), ``<output_dir>/test_metrics.csv`` (one row
    per case) and merges the summary into the run record under ``section``.

    Args:
        output_dir: folder for the JSON and CSV files.
        class_names: foreground class names in channel order (channel 1 = ``class_names[0]``).
        record_path: run record (``results.json``) to update; ``None`` writes none.
        nsd_tolerance_mm: NSD tolerance in mm; ``None`` skips NSD. Default 2.0.
        pred_key: key of the prediction in each output dict. Default ``"pred"``.
        label_key: key of the ground truth in each output dict. Default ``"label"``.
        image_key: key of the input image, whose file name gives the case id. Default ``"image"``.
        section: run record section. Default ``"test"``.
        prefix: file name prefix. Default ``"test_metrics"``.
    """

    def __init__(
        self,
        output_dir: str | Path,
        class_names: Sequence[str],
        record_path: str | Path | None = None,
        nsd_tolerance_mm: float | None = 2.0,
        pred_key: str = "pred",
        label_key: str = "label",
        image_key: str = "image",
        section: str = "test",
        prefix: str = "test_metrics",
    ) -> None:
        if isinstance(class_names, str) or not class_names:
            raise ValueError(f"CaseMetricsWriter class_names must be a non-empty list, got {class_names!r}.")
        if nsd_tolerance_mm is not None and nsd_tolerance_mm <= 0:
            raise ValueError(f"CaseMetricsWriter nsd_tolerance_mm must be > 0 or None, got {nsd_tolerance_mm}.")
        self.output_dir = Path(output_dir)
        self.class_names = list(class_names)
        self.record_path = Path(record_path) if record_path is not None else None
        self.nsd_tolerance_mm = nsd_tolerance_mm
        self.pred_key, self.label_key, self.image_key = pred_key, label_key, image_key
        self.section, self.prefix = section, prefix
        self.cases: list[dict[str, Any]] = []

    def attach(self, engine: Engine) -> None:
        if engine.has_event_handler(self.collect, Events.ITERATION_COMPLETED):
            return
        engine.add_event_handler(Events.STARTED, self.reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.collect)
        engine.add_event_handler(Events.COMPLETED, self)

    def reset(self, engine: Engine | None = None) -> None:
        self.cases = []

    def collect(self, engine: Engine) -> None:
        """Compute the metrics of every case of the batch just evaluated."""
        outputs = engine.state.output
        if isinstance(outputs, dict):
            raise ValueError("CaseMetricsWriter needs decollated output (a list of per-case dicts); set decollate=True.")
        for item in outputs:
            for key in (self.pred_key, self.label_key):
                if key not in item:
                    raise KeyError(f"CaseMetricsWriter: output has no '{key}' (keys: {sorted(item)}).")
            pred, label = item[self.pred_key], item[self.label_key]
            if pred.shape[0] != len(self.class_names) + 1:
                raise ValueError(
                    f"CaseMetricsWriter: prediction has {pred.shape[0]} channels, expected "
                    f"{len(self.class_names) + 1} (background + {len(self.class_names)} class_names)."
                )
            # the image's file names the case; the label may be a cached merged map with a hashed name
            filename = None
            for source in (item.get(self.image_key), label, pred):
                meta = getattr(source, "meta", None) or {}
                if meta.get("filename_or_obj"):
                    filename = meta["filename_or_obj"]
                    break
            spacing = _spacing_of(label) or _spacing_of(pred)
            dice, nsd = case_metrics(pred.detach(), label.detach(), self.nsd_tolerance_mm, spacing)
            case = {"case": case_id_of(filename, len(self.cases)), "image": str(filename) if filename else None,
                    "dice": dict(zip(self.class_names, dice)), "mean_dice": nan_mean(dice)}
            if nsd is not None:
                case["nsd"] = dict(zip(self.class_names, nsd))
                case["mean_nsd"] = nan_mean(nsd)
            self.cases.append(case)

    def summary(self) -> dict[str, Any]:
        """Mean over cases per class (absent classes ignored) and the mean over classes."""
        out: dict[str, Any] = {"n_cases": len(self.cases)}
        for metric in ("dice", "nsd"):
            if not self.cases or metric not in self.cases[0]:
                continue
            per_class = {c: nan_mean([case[metric][c] for case in self.cases]) for c in self.class_names}
            out[f"per_class_{metric}"] = per_class
            out[f"mean_{metric}"] = nan_mean(list(per_class.values()))
        return out

    def _csv(self) -> str:
        buf = io.StringIO()
        has_nsd = bool(self.cases) and "nsd" in self.cases[0]
        header = ["case", "image", "mean_dice"] + [f"dice_{c}" for c in self.class_names]
        if has_nsd:
            header += ["mean_nsd"] + [f"nsd_{c}" for c in self.class_names]
        writer = csv.writer(buf)
        writer.writerow(header)

        def fmt(v: Any) -> str:
            return "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.6f}"

        for case in self.cases:
            row = [case["case"], case["image"] or "", fmt(case["mean_dice"])]
            row += [fmt(case["dice"][c]) for c in self.class_names]
            if has_nsd:
                row += [fmt(case["mean_nsd"])] + [fmt(case["nsd"][c]) for c in self.class_names]
            writer.writerow(row)
        return buf.getvalue()

    def __call__(self, engine: Engine) -> None:
        """Write the JSON, the CSV and the run record section."""
        summary = self.summary()
        summary["nsd_tolerance_mm"] = self.nsd_tolerance_mm
        json_path = self.output_dir / f"{self.prefix}.json"
        csv_path = self.output_dir / f"{self.prefix}.csv"
        atomic_write_json(json_path, {"class_names": self.class_names, "summary": summary, "cases": self.cases},
                          nan_as_null=True)
        atomic_write_text(csv_path, self._csv())
        engine.state.case_metrics = summary
        engine.logger.info(
            f"{self.section}: {summary['n_cases']} cases, mean Dice {summary.get('mean_dice', float('nan')):.4f}"
            + (f", mean NSD {summary['mean_nsd']:.4f}" if "mean_nsd" in summary else "")
            + f" -> {json_path}"
        )
        if self.record_path is not None:
            update_run_record(self.record_path, {self.section: {**summary, "cases_csv": csv_path.name,
                                                                "cases_json": json_path.name}})
