"""Helpers shared by Grad-CAM and ProtoSeg: layer look-up, conv tracing, adapter detection, train/eval
mode bookkeeping, NIfTI and slice utilities, and the per-case ignite handler skeleton."""

from __future__ import annotations

import difflib
import logging
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from monai.utils import IgniteInfo, min_version, optional_import
from torch import nn

from monai_peft.io import atomic_save_nifti, atomic_write_json, json_default
from monai_peft.tuners.module_types import ANY_CONV_TYPES
from monai_peft.tuners.wrappers import (
    TRAINED_COPY_ORIGINALS, TUNER_BASE, WRAPPED_PARTS, adapter_kind, strip_peft_prefix,
)

if TYPE_CHECKING:
    from ignite.engine import Engine, Events
else:
    Engine, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine")
    Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")

logger = logging.getLogger(__name__)

# name parts of adapters built by hand, outside peft (peft's own are told by monai_peft.tuners.wrappers.adapter_kind)
_HAND_MADE_ADAPTER = re.compile(r"(^|[._])(adapter|convadapter)[A-Za-z_]*($|[._])")


def adapter_names(model: nn.Module) -> set[str]:
    """Names of the peft adapters of ``model`` (keys of ``peft_config``), empty for a plain network."""
    cfg = getattr(model, "peft_config", None)
    return set(cfg) if isinstance(cfg, dict) else set()


def is_adapter_module(name: str, names: set[str] | None = None) -> bool:
    """Whether the module called ``name`` belongs to an adapter rather than to the frozen backbone.

    peft keeps one entry per adapter name in a ``ModuleDict`` (``...lora_A.default``), so a module
    whose dotted name contains an adapter name is an adapter module; ``base_layer`` and the copies peft
    keeps for ``modules_to_save`` never are.

    Args:
        name: dotted module name from ``named_modules()``.
        names: adapter names of the model (see :func:`adapter_names`); ``None`` falls back to the
            adapter prefixes of :mod:`monai_peft.tuners.wrappers` (``lora_*``, ``conv_adapter_*``, ``ssf_*`` ...) and
            hand-made ``adapter*`` modules.
    """
    parts = name.split(".")
    # base_layer: the wrapped frozen layer; modules_to_save / original_module: peft's trainable copy of a
    # backbone module (e.g. the new head) and the original beside it: backbone layers, not adapters
    if parts[-1] == TUNER_BASE or any(p in TRAINED_COPY_ORIGINALS or p in WRAPPED_PARTS[1:] for p in parts):
        return False
    if names and any(p in names for p in parts):
        return True
    return adapter_kind(name) is not None or bool(_HAND_MADE_ADAPTER.search(name))


def find_module(model: nn.Module, name: str) -> tuple[str, nn.Module]:
    """Look up a sub-module by dotted name; names may omit a peft model's ``base_model.model.`` prefix.

    Raises:
        ValueError: naming the layer and the closest existing names when there is no (unique) match.
    """
    modules = dict(model.named_modules())
    if name in modules:
        return name, modules[name]
    hits = [n for n in modules if n.endswith("." + name)]
    if len(hits) == 1:
        return hits[0], modules[hits[0]]
    if len(hits) > 1:
        raise ValueError(f"layer {name!r} is ambiguous, it matches {hits[:6]}; give the full name")
    close = difflib.get_close_matches(name, list(modules), n=6, cutoff=0.5)
    raise ValueError(f"layer {name!r} not found in {type(model).__name__}; close names: {close}")


@contextmanager
def preserved_mode(model: nn.Module) -> Iterator[None]:
    """Restore the ``training`` flag of every sub-module on exit (pytorch_grad_cam calls ``eval()``)."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def first_output(out: Any) -> torch.Tensor:
    """The segmentation logits of a network output (deep-supervision lists/tuples: the first item)."""
    while isinstance(out, (list, tuple)):
        out = out[0]
    if isinstance(out, dict):
        out = next(iter(out.values()))
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"network output must be a tensor (or list/tuple/dict of them), got {type(out).__name__}")
    return out


def trace_convs(model: nn.Module, x: torch.Tensor) -> tuple[list[str], torch.Tensor]:
    """Run ``model`` once without gradients and list its conv modules in execution order.

    Args:
        model: the network (peft-wrapped or not).
        x: input batch ``(1, C, H, W[, D])``.

    Returns:
        the names of the executed conv modules (first call order, each once) and the logits
        ``(1, K, H, W[, D])``.
    """
    order: list[str] = []

    def record(name: str) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if name not in order:
                order.append(name)

        return hook

    handles = [m.register_forward_hook(record(n)) for n, m in model.named_modules() if isinstance(m, ANY_CONV_TYPES)]
    try:
        with torch.no_grad():
            logits = first_output(model(x))
    finally:
        for h in handles:
            h.remove()
    return order, logits


def default_gradcam_layers(order: Sequence[str], names: set[str] | None = None) -> list[str]:
    """The three layers of thesis Table 5.10 from a conv execution order: the final conv, the conv
    before it in the backbone (the last conv of the last ResBlock in SegResNet), and the last adapter
    conv executed before the final conv (the ConvAdapter conv parallel to that ResBlock), if any."""
    backbone = [n for n in order if not is_adapter_module(n, names)]
    if not backbone:
        raise ValueError("the network executed no convolution outside adapters")
    final = backbone[-1]
    layers = [final]
    if len(backbone) > 1:
        layers.append(backbone[-2])
    before_final = order[: order.index(final)]
    adapters = [n for n in before_final if is_adapter_module(n, names)]
    if adapters:
        layers.append(adapters[-1])
    return layers


def as_batch(image: torch.Tensor | np.ndarray, spatial_dims: int = 3) -> torch.Tensor:
    """``(C, *spatial)`` or ``(1, C, *spatial)`` -> ``(1, C, *spatial)`` float tensor."""
    if hasattr(image, "as_tensor"):  # MONAI MetaTensor -> plain tensor (meta ops break autograd views)
        image = image.as_tensor()
    t = torch.as_tensor(image)
    if t.ndim == spatial_dims + 1:
        t = t[None]
    if t.ndim != spatial_dims + 2 or t.shape[0] != 1:
        raise ValueError(
            f"image must have shape (C, *spatial) or (1, C, *spatial) with {spatial_dims} spatial dims, "
            f"got {tuple(t.shape)}"
        )
    return t.detach().float().clone()


def as_label(label: torch.Tensor | np.ndarray | None, spatial_shape: Sequence[int]) -> np.ndarray | None:
    """A label map ``(*spatial)``, ``(1, *spatial)`` or ``(1, 1, *spatial)`` -> int array ``(*spatial)``."""
    if label is None:
        return None
    if hasattr(label, "as_tensor"):
        label = label.as_tensor()
    arr = np.asarray(label.detach().cpu() if isinstance(label, torch.Tensor) else label)
    while arr.ndim > len(spatial_shape) and arr.shape[0] == 1:
        arr = arr[0]
    if tuple(arr.shape) != tuple(spatial_shape):
        raise ValueError(
            f"label shape {tuple(arr.shape)} does not match the image's spatial shape {tuple(spatial_shape)}"
        )
    return np.rint(arr).astype(np.int64)


def image_affine(image: Any, affine: Any = None, index: int = 0) -> np.ndarray:
    """The 4x4 affine for an image's outputs: ``affine`` when given, else the MONAI ``MetaTensor``'s
    (item ``index`` of a batched one), else identity."""
    if affine is None:
        affine = getattr(image, "affine", None)
    if affine is not None:
        a = np.asarray(affine.detach().cpu() if isinstance(affine, torch.Tensor) else affine, dtype=np.float64)
        if a.ndim == 3:
            a = a[index]
        if a.shape != (4, 4):
            raise ValueError(f"affine must be 4x4, got shape {a.shape}")
        return a
    return np.eye(4)


def save_nifti(array: np.ndarray, affine: np.ndarray, path: str | os.PathLike) -> Path:
    """Write a 3D array as NIfTI (float32) with ``affine``, atomically."""
    import nibabel as nib

    img = nib.Nifti1Image(np.asarray(array, dtype=np.float32), np.asarray(affine, dtype=np.float64))
    return atomic_save_nifti(img, path)


def resample_to_grid(
    volume: np.ndarray, affine: np.ndarray, ref_shape: Sequence[int], ref_affine: np.ndarray, order: int = 1
) -> np.ndarray:
    """Resample a 3D ``volume`` with voxel-to-world ``affine`` onto another grid (e.g. the original image's).

    nibabel's ``resample_from_to``: each reference voxel is mapped through ``ref_affine`` to world coordinates and
    through ``inv(affine)`` into ``volume``; outside ``volume`` the result is 0.

    Args:
        volume: ``(H, W, D)`` array.
        affine: its 4x4 voxel-to-world matrix.
        ref_shape: ``(H', W', D')`` of the target grid.
        ref_affine: 4x4 voxel-to-world matrix of the target grid.
        order: spline order, 1 (linear) for heatmaps, 0 (nearest) for masks.

    Returns:
        the resampled ``(H', W', D')`` float32 array.
    """
    import nibabel as nib
    from nibabel.processing import resample_from_to

    source = nib.Nifti1Image(np.asarray(volume, dtype=np.float32), np.asarray(affine, dtype=np.float64))
    target = (tuple(int(s) for s in ref_shape), np.asarray(ref_affine, dtype=np.float64))
    out = resample_from_to(source, target, order=order, mode="constant", cval=0.0)
    return np.asarray(out.dataobj, dtype=np.float32)


def central_slices(volume: np.ndarray, center: Sequence[int]) -> list[np.ndarray]:
    """Three orthogonal 2D slices of ``volume (H, W, D)`` through ``center``, each transposed for display."""
    i, j, k = (int(c) for c in center)
    return [volume[:, :, k].T, volume[:, j, :].T, volume[i, :, :].T]


def slice_center(mask: np.ndarray | None, shape: Sequence[int]) -> list[int]:
    """Centre of mass of ``mask`` when it has voxels, else the volume centre."""
    if mask is not None and mask.any():
        return [int(round(float(c.mean()))) for c in np.nonzero(mask)]
    return [s // 2 for s in shape]


def _stem(value: Any) -> str | None:
    if value is None:
        return None
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(str(value)).name.split(".")[0]).strip("_")
    return stem or None


def batch_items(batch: Any, image_key: str, label_key: str | None, handler: str) -> list[dict[str, Any]]:
    """Per-image ``{"image": (C, *spatial), "label": (1, *spatial) or None, "affine": 4x4, "stem": str | None}``
    from an ignite ``engine.state.batch``: a collated dict of ``(B, ...)`` tensors, or the list of
    per-item dicts MONAI engines leave there after decollating.

    Raises:
        KeyError: naming ``handler``, the missing key and the keys present.
    """
    def check(d: Any) -> None:
        if not isinstance(d, dict):
            raise TypeError(f"{handler}: expected a dict batch or a list of dicts, got {type(d).__name__}")
        for key in (image_key, label_key):
            if key is not None and key not in d:
                raise KeyError(f"{handler}: batch has no key {key!r} (keys: {sorted(map(str, d))})")

    items = []
    if isinstance(batch, dict):
        check(batch)
        images = batch[image_key]
        labels = batch[label_key] if label_key else None
        names = (getattr(images, "meta", None) or {}).get("filename_or_obj")
        ids = batch.get("case_id")
        for b in range(images.shape[0]):
            stem = ids[b] if isinstance(ids, (list, tuple)) else (names[b] if isinstance(names, (list, tuple)) else None)
            items.append({"image": images[b], "label": None if labels is None else labels[b],
                          "affine": image_affine(images, index=b), "stem": _stem(stem)})
    else:
        for d in batch:
            check(d)
            image = d[image_key]
            fname = d.get("case_id") or (getattr(image, "meta", None) or {}).get("filename_or_obj")
            items.append({"image": image, "label": d[label_key] if label_key else None,
                          "affine": image_affine(image), "stem": _stem(fname)})
    return items


def short_name(name: str) -> str:
    """A module name without a peft model's ``base_model.model.`` prefix."""
    return strip_peft_prefix(name)


def safe_name(name: str) -> str:
    """A file-name friendly version of a module or class name (peft's ``base_model.model.`` dropped)."""
    name = short_name(name)
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "layer"


class PerCaseAnalysisHandler(ABC):
    """Skeleton of an ignite handler that analyses the first ``max_cases`` images an evaluator sees, one
    output folder per case, and writes a summary over them at epoch end.

    Attached to an engine it runs on ``ITERATION_COMPLETED`` (splitting ``engine.state.batch`` with
    :func:`batch_items`), writes ``<output_dir>/<summary_filename>`` on ``EPOCH_COMPLETED`` and forgets
    the cases on ``EPOCH_STARTED``. Case ``i`` goes to ``<output_dir>/case<iii>[_<stem>]``.

    Subclasses set ``handler_name`` (used in error messages), ``analysis_name`` (used in the log line)
    and ``summary_filename``, and implement :meth:`analyse_case` and :meth:`summary`.

    Args:
        output_dir: folder for the case sub-folders and the summary.
        layers: module names to analyse; ``None``: the subclass default.
        classes: output channels to analyse; ``None``: the subclass default.
        class_names: channel -> name (JSON keys may be strings).
        network: network to analyse; default ``engine.network``.
        image_key: batch key of the image ``(B, C, H, W, D)``. Defaults to ``"image"``.
        label_key: batch key of the label ``(B, 1, H, W, D)``, or ``None``. Defaults to ``"label"``.
        max_cases: number of images to analyse per epoch. Defaults to 1.

    Raises:
        ValueError: when ``max_cases < 1``.
    """

    handler_name: str = "PerCaseAnalysisHandler"
    analysis_name: str = "Analysis"
    summary_filename: str = "summary.json"

    def __init__(
        self,
        output_dir: str | os.PathLike,
        layers: Sequence[str] | None = None,
        classes: Sequence[int] | None = None,
        class_names: Mapping[Any, str] | None = None,
        network: nn.Module | None = None,
        image_key: str = "image",
        label_key: str | None = "label",
        max_cases: int = 1,
    ) -> None:
        if max_cases < 1:
            raise ValueError(f"max_cases must be >= 1, got {max_cases}")
        self.output_dir = Path(output_dir)
        self.layers = None if layers is None else list(layers)
        self.classes = None if classes is None else [int(c) for c in classes]
        self.class_names = {int(k): str(v) for k, v in (class_names or {}).items()}
        self.network = network
        self.image_key, self.label_key = image_key, label_key
        self.max_cases = max_cases
        self.records: list[dict[str, Any]] = []

    def attach(self, engine: Engine) -> None:
        """Register the handler, the summary writer and the reset with ``engine`` (each once)."""
        if not engine.has_event_handler(self, Events.ITERATION_COMPLETED):
            engine.add_event_handler(Events.ITERATION_COMPLETED, self)
        if not engine.has_event_handler(self.write_summary, Events.EPOCH_COMPLETED):
            engine.add_event_handler(Events.EPOCH_COMPLETED, self.write_summary)
        if not engine.has_event_handler(self.reset, Events.EPOCH_STARTED):
            engine.add_event_handler(Events.EPOCH_STARTED, self.reset)

    def reset(self, engine: Engine | None = None) -> None:
        self.records = []

    @abstractmethod
    def analyse_case(self, network: nn.Module, item: dict[str, Any], case_dir: Path) -> dict[str, Any]:
        """Analyse one image and write its outputs to ``case_dir``.

        Args:
            network: the network to analyse.
            item: one entry of :func:`batch_items` (``image``, ``label``, ``affine``, ``stem``).
            case_dir: the case's output folder.

        Returns:
            the case's record (JSON-serialisable); the handler adds its ``"case"`` name.
        """

    @abstractmethod
    def summary(self) -> dict[str, Any]:
        """The summary over ``self.records`` written at epoch end."""

    def __call__(self, engine: Engine) -> None:
        if len(self.records) >= self.max_cases:
            return
        network = self.network if self.network is not None else getattr(engine, "network", None)
        if network is None:
            raise ValueError(f"{self.handler_name}: no network given and the engine has no 'network' attribute")
        for item in batch_items(engine.state.batch, self.image_key, self.label_key, self.handler_name):
            if len(self.records) >= self.max_cases:
                break
            case = f"case{len(self.records):03d}" + (f"_{item['stem']}" if item["stem"] else "")
            record = self.analyse_case(network, item, self.output_dir / case)
            record["case"] = case
            self.records.append(record)
            engine.logger.info(f"{self.analysis_name} of {case} written to {self.output_dir / case}")

    def write_summary(self, engine: Engine | None = None) -> None:
        """Write :meth:`summary` to ``<output_dir>/<summary_filename>`` when any case was analysed."""
        if self.records:
            atomic_write_json(self.output_dir / self.summary_filename, self.summary(), default=json_default)
