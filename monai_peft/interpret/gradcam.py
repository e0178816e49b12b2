"""3D Grad-CAM for segmentation networks, adapters of peft-wrapped models included (thesis 2.6.1, 5.2.4.1).

Grad-CAM (thesis 2.6.1) weights the feature maps of one layer by the spatial mean of the gradient of a
class score and keeps the positive part of their sum. For segmentation the class score is the sum of
the class logits over a group of voxels (``pytorch_grad_cam``'s ``SemanticSegmentationTarget``): by
default the voxels the network predicts as that class. Thesis 5.2.4.1 applies it to the final conv,
the last conv of the last ResBlock and the ConvAdapter conv parallel to it, and scores each heatmap by
the Dice between its Otsu-thresholded map and the ground truth (Table 5.10).

Two network habits need care and are handled here:

* SegResNet's ResBlock adds its residual in place (``x += identity``) right after ``conv2``, which
  would overwrite the activation pytorch_grad_cam keeps; the hooked layer hands the rest of the
  network a copy of its output instead.
* a frozen backbone: no activation before the first trainable layer requires gradients, so the hooked
  layer's output is turned into a leaf that does.

Train/eval modes and parameter gradients are restored and every hook removed afterwards.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.utils import optional_import
from torch import nn

from monai_peft.io import atomic_save_figure, atomic_write_json, json_default
from monai_peft.metrics import mask_dice, nan_mean
from monai_peft.interpret._common import (
    PerCaseAnalysisHandler,
    adapter_names,
    as_batch,
    as_label,
    central_slices,
    default_gradcam_layers,
    find_module,
    image_affine,
    is_adapter_module,
    preserved_mode,
    resample_to_grid,
    safe_name,
    save_nifti,
    short_name,
    slice_center,
    trace_convs,
)

GradCAM, _has_gradcam = optional_import("pytorch_grad_cam", name="GradCAM")
SemanticSegmentationTarget, _ = optional_import(
    "pytorch_grad_cam.utils.model_targets", name="SemanticSegmentationTarget"
)
threshold_otsu, _ = optional_import("skimage.filters", name="threshold_otsu")

logger = logging.getLogger(__name__)

__all__ = ["GradCAMHandler", "GradCAMResult", "gradcam_3d", "otsu_dice", "run_gradcam", "save_gradcam_overlays"]


@dataclass
class GradCAMResult:
    """Heatmaps of one image.

    Attributes:
        cams: ``cams[layer][class] -> (H, W, D)`` float32 in [0, 1], at input resolution.
        layers: full module names, in the order asked for.
        classes: output channels explained.
        target_masks: which voxels defined each class score (``prediction``, ``label`` or ``all``).
        prediction: argmax of the logits, ``(H, W, D)`` int.
    """

    cams: dict[str, dict[int, np.ndarray]]
    layers: list[str]
    classes: list[int]
    target_masks: dict[int, str] = field(default_factory=dict)
    prediction: np.ndarray | None = None


class _SegModel(nn.Module):
    """Hands pytorch_grad_cam a plain logits tensor whatever the network returns."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from monai_peft.interpret._common import first_output

        return first_output(self.net(x))


def _needs_grad_hook(module: nn.Module, args: Any, output: Any) -> Any:
    # frozen backbone: make the hooked activation a leaf that requires grad so pytorch_grad_cam can
    # register its gradient hook on it (registered before pytorch_grad_cam's hooks).
    if isinstance(output, torch.Tensor) and not output.requires_grad:
        return output.detach().requires_grad_(True)
    return output


def _copy_for_network_hook(module: nn.Module, args: Any, output: Any) -> Any:
    # registered after pytorch_grad_cam's hooks: the network continues on a copy, so in-place ops
    # downstream (SegResNet's ``x += identity``) leave the recorded activation intact.
    return output.clone() if isinstance(output, torch.Tensor) else output


def _gradcam_all_layers(
    wrapped: nn.Module, x: torch.Tensor, modules: list[nn.Module], classes: list[int], targets: list[Any]
) -> list[dict[int, np.ndarray]]:
    """One forward and one backward pass per class for all layers at once.

    Each layer gets its own ``pytorch_grad_cam.GradCAM`` (one target layer each, so activations and
    gradients of different layers never mix, whatever order autograd visits parallel branches in);
    the network runs once per class with all of their hooks in place, then each CAM object turns its
    layer's activation and gradient into the heatmap exactly as ``GradCAM.__call__`` does.
    """
    unique = list(dict.fromkeys(modules))
    handles, cams = [], []
    try:
        for module in unique:
            handles.append(module.register_forward_hook(_needs_grad_hook, prepend=True))
            cams.append(GradCAM(model=wrapped, target_layers=[module]))
            handles.append(module.register_forward_hook(_copy_for_network_hook))
        per_module: list[dict[int, np.ndarray]] = [{} for _ in unique]
        for c, target in zip(classes, targets):
            for cam in cams:
                cam.activations_and_grads.activations, cam.activations_and_grads.gradients = [], []
            with torch.enable_grad():
                outputs = wrapped(x)
                wrapped.zero_grad(set_to_none=True)
                target(outputs[0]).backward()
            for k, cam in enumerate(cams):
                heat = cam.aggregate_multi_layers(cam.compute_cam_per_layer(x, [target], False))[0]
                per_module[k][c] = np.clip(np.nan_to_num(heat), 0.0, 1.0).astype(np.float32)
            del outputs
    finally:
        for cam in cams:
            cam.activations_and_grads.release()
        for h in handles:
            h.remove()
    return [per_module[unique.index(m)] for m in modules]


def gradcam_3d(
    model: nn.Module,
    image: torch.Tensor | np.ndarray,
    layers: Sequence[str] | None = None,
    classes: Sequence[int] | None = None,
    label: torch.Tensor | np.ndarray | None = None,
    mask_source: str = "prediction",
) -> GradCAMResult:
    """Grad-CAM heatmaps of ``image`` for each class and layer.

    Args:
        model: segmentation network returning logits ``(1, K, H, W, D)`` (or a list/tuple whose first
            item is that); may be a ``peft.PeftModel``.
        image: ``(C, H, W, D)`` or ``(1, C, H, W, D)``.
        layers: module names (``named_modules()``; a peft model's ``base_model.model.`` prefix may be
            left out). Default: the three layers of thesis Table 5.10 (final conv, the conv before it,
            the last adapter conv before the final conv).
        classes: output channels to explain; default every channel but 0 (background).
        label: ground truth ``(H, W, D)`` in channel indices; needed for ``mask_source="label"``.
        mask_source: voxels whose class logits form the score: ``"prediction"`` (default; the
            network's argmax, thesis 2.6.1), ``"label"`` (the ground truth). An empty mask falls back
            to all voxels.

    Returns:
        a :class:`GradCAMResult`; the model's train/eval modes and parameter gradients are as before
        and no hook stays.
    """
    if not _has_gradcam:
        raise ImportError("gradcam_3d needs the package grad-cam (pytorch_grad_cam)")
    if mask_source not in ("prediction", "label"):
        raise ValueError(f"mask_source must be 'prediction' or 'label', got {mask_source!r}")
    device = next(model.parameters()).device
    x = as_batch(image).to(device)
    spatial = tuple(x.shape[2:])
    gt = as_label(label, spatial)
    if mask_source == "label" and gt is None:
        raise ValueError("mask_source='label' needs a label")
    names = adapter_names(model)
    grads = [(p, p.grad) for p in model.parameters()]  # our backward passes must not leave a trace
    with preserved_mode(model):
        model.eval()
        order, logits = trace_convs(model, x)
        if tuple(logits.shape[2:]) != spatial:
            raise ValueError(f"network output {tuple(logits.shape)} does not match the input's spatial shape {spatial}")
        n_classes = logits.shape[1]
        classes = list(range(1, n_classes)) if classes is None else [int(c) for c in classes]
        bad = [c for c in classes if not 0 <= c < n_classes]
        if bad:
            raise ValueError(f"classes {bad} out of range for a network with {n_classes} output channels")
        pred = logits.argmax(1)[0].cpu().numpy()
        layer_names = default_gradcam_layers(order, names) if layers is None else list(layers)
        resolved = [find_module(model, name) for name in layer_names]
        targets, kinds = [], {}
        for c in classes:
            mask = (pred == c) if mask_source == "prediction" else (gt == c)
            kinds[c] = mask_source
            if not mask.any():
                mask, kinds[c] = np.ones(spatial, dtype=bool), "all"
                logger.info("class %d: empty %s mask, scoring all voxels", c, mask_source)
            targets.append(SemanticSegmentationTarget(c, mask.astype(np.float32)))
        wrapped = _SegModel(model)
        cams = _gradcam_all_layers(wrapped, x, [m for _, m in resolved], classes, targets)
        cams = {full_name: cams[i] for i, (full_name, _) in enumerate(resolved)}
        for p, g in grads:
            p.grad = g
    return GradCAMResult(
        cams=cams, layers=[n for n, _ in resolved], classes=classes, target_masks=kinds, prediction=pred
    )


def otsu_dice(cam: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    """Dice between the Otsu-thresholded heatmap and a ground-truth mask (thesis Table 5.10).

    Args:
        cam: heatmap ``(H, W, D)``.
        mask: binary ground truth of the same shape.

    Returns:
        ``(dice, threshold)``; Dice is :func:`monai_peft.metrics.mask_dice` (NaN for an empty mask); a constant
        heatmap has no threshold (``nan``) and lights up nothing (Dice 0, NaN for an empty mask).
    """
    cam = np.asarray(cam, dtype=np.float64)
    if cam.shape != np.shape(mask):
        raise ValueError(f"cam shape {cam.shape} differs from mask shape {np.shape(mask)}")
    if np.ptp(cam) <= 1e-12:
        return mask_dice(np.zeros(cam.shape, bool), mask), float("nan")
    t = float(threshold_otsu(cam))
    return mask_dice(cam > t, mask), t


def save_gradcam_overlays(
    image: np.ndarray,
    result: GradCAMResult,
    out_dir: str | os.PathLike,
    label: np.ndarray | None = None,
    class_names: Mapping[int, str] | None = None,
    layer_titles: Mapping[str, str] | None = None,
) -> list[Path]:
    """PNG per class: rows = axial / coronal / sagittal slices through the class's ground-truth centre
    (the volume centre without one), columns = the image with the ground-truth contour, then each
    layer's heatmap over the image (the layout of thesis Fig. 5.9).

    Args:
        image: ``(H, W, D)`` intensity volume (first input channel).
        result: heatmaps from :func:`gradcam_3d`.
        out_dir: folder for ``gradcam_<class>.png``.
        label: ground truth ``(H, W, D)`` in channel indices.
        class_names: channel -> name for titles and file names.
        layer_titles: layer name -> short column title.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    paths = []
    views = ("axial", "coronal", "sagittal")
    for c in result.classes:
        cname = (class_names or {}).get(c, f"class{c}")
        gt = None if label is None else label == c
        center = slice_center(gt, image.shape)
        img_slices = central_slices(image, center)
        gt_slices = central_slices(gt.astype(float), center) if gt is not None else [None] * 3
        ncols = 1 + len(result.layers)
        fig, axes = plt.subplots(3, ncols, figsize=(2.6 * ncols, 7.5), squeeze=False)
        for r in range(3):
            ax = axes[r][0]
            ax.imshow(img_slices[r], cmap="gray", origin="lower")
            if gt_slices[r] is not None and gt_slices[r].any():
                ax.contour(gt_slices[r], levels=[0.5], colors="lime", linewidths=0.8)
            ax.set_ylabel(views[r])
            if r == 0:
                ax.set_title(f"{cname}: image + GT", fontsize=8)
            for k, layer in enumerate(result.layers, start=1):
                ax = axes[r][k]
                ax.imshow(img_slices[r], cmap="gray", origin="lower")
                ax.imshow(central_slices(result.cams[layer][c], center)[r], cmap="jet", alpha=0.45,
                          vmin=0, vmax=1, origin="lower")
                if r == 0:
                    ax.set_title((layer_titles or {}).get(layer, short_name(layer))[-40:], fontsize=7)
        for ax in axes.flat:
            ax.set_xticks([])
            ax.set_yticks([])
        fig.tight_layout()
        paths.append(atomic_save_figure(fig, out_dir / f"gradcam_{safe_name(cname)}.png", dpi=120, bbox_inches="tight"))
        plt.close(fig)
    return paths


def run_gradcam(
    model: nn.Module,
    image: torch.Tensor | np.ndarray,
    out_dir: str | os.PathLike,
    layers: Sequence[str] | None = None,
    classes: Sequence[int] | None = None,
    label: torch.Tensor | np.ndarray | None = None,
    class_names: Mapping[int, str] | None = None,
    affine: np.ndarray | None = None,
    mask_source: str = "prediction",
    save_nifti_maps: bool = True,
    save_png: bool = True,
    reference_grid: tuple[Sequence[int], np.ndarray] | None = None,
) -> dict[str, Any]:
    """Grad-CAM of one image written to ``out_dir``: NIfTI heatmaps, ``gradcam.json``, PNG overlays.

    Files: ``cam_<layer>_<class>.nii.gz`` (float32 in [0, 1], the affine of the input, so it overlays
    the input in any viewer), ``gradcam.json`` (layers, classes, per class and layer the Otsu threshold
    and the Dice with the ground truth), ``gradcam_<class>.png``.

    Args:
        model, image, layers, classes, label, mask_source: as :func:`gradcam_3d`.
        out_dir: output folder (created).
        class_names: channel -> name.
        affine: 4x4 affine of the input; default: the ``MetaTensor``'s affine, else identity.
        save_nifti_maps: write the NIfTI heatmaps.
        save_png: write the PNG overlays.
        reference_grid: ``(shape, affine)`` of another grid (e.g. the original, unpreprocessed image):
            the NIfTI heatmaps are resampled onto it (linear, 0 outside the analysed crop). Otsu Dice
            is computed on the analysed grid either way.

    Returns:
        the content of ``gradcam.json``.
    """
    out_dir = Path(out_dir)
    affine = image_affine(image, affine)
    x = as_batch(image)
    gt = as_label(label, x.shape[2:])
    result = gradcam_3d(model, x, layers=layers, classes=classes, label=gt, mask_source=mask_source)
    names = {c: (class_names or {}).get(c, f"class{c}") for c in result.classes}
    adapters = adapter_names(model)
    record: dict[str, Any] = {
        "method": "gradcam",
        "image_shape": list(x.shape[2:]),
        "layers": [{"name": n, "adapter": is_adapter_module(n, adapters)} for n in result.layers],
        "classes": {str(c): names[c] for c in result.classes},
        "target_masks": {names[c]: kind for c, kind in result.target_masks.items()},
        "dice": {},
        "threshold": {},
        "files": {"nifti": [], "png": []},
        "nifti_grid": "analysed" if reference_grid is None else "reference",
    }
    for c in result.classes:
        record["dice"][names[c]], record["threshold"][names[c]] = {}, {}
        for layer in result.layers:
            cam = result.cams[layer][c]
            if gt is not None:
                d, t = otsu_dice(cam, gt == c)
                record["dice"][names[c]][layer] = d
                record["threshold"][names[c]][layer] = None if np.isnan(t) else t
            if save_nifti_maps:
                grid_cam, grid_affine = cam, affine
                if reference_grid is not None:
                    grid_cam = resample_to_grid(cam, affine, reference_grid[0], reference_grid[1], order=1)
                    grid_affine = np.asarray(reference_grid[1], dtype=np.float64)
                p = save_nifti(grid_cam, grid_affine, out_dir / f"cam_{safe_name(layer)}_{safe_name(names[c])}.nii.gz")
                record["files"]["nifti"].append(p.name)
    if gt is None:
        record["dice"], record["threshold"] = None, None
    else:
        record["mean_dice_per_layer"] = {
            layer: nan_mean(record["dice"][names[c]][layer] for c in result.classes) for layer in result.layers
        }
    if save_png:
        img = x[0, 0].detach().cpu().numpy()
        pngs = save_gradcam_overlays(img, result, out_dir, label=gt, class_names=names)
        record["files"]["png"] = [p.name for p in pngs]
    atomic_write_json(out_dir / "gradcam.json", record, default=json_default)
    return record


class GradCAMHandler(PerCaseAnalysisHandler):
    """Ignite handler running :func:`run_gradcam` on the first ``max_cases`` images an evaluator sees,
    and writing the mean Otsu Dice per class and layer over them (thesis Table 5.10) at epoch end.

    Usable from bundle JSON, e.g.::

        {"_target_": "monai_peft.interpret.GradCAMHandler", "output_dir": "$@output_dir + '/gradcam'",
         "layers": null, "classes": [1, 2], "max_cases": 2}

    Args:
        output_dir: folder; case ``i`` goes to ``<output_dir>/<case name>``, the summary to
            ``<output_dir>/gradcam_summary.json``.
        layers: module names, default the thesis Table 5.10 layers (see :func:`gradcam_3d`).
        classes: output channels, default all but background.
        class_names: channel -> name (JSON keys may be strings).
        network: the network to explain; default ``engine.network``.
        image_key: batch key of the image ``(B, C, H, W, D)``. Defaults to ``"image"``.
        label_key: batch key of the label ``(B, 1, H, W, D)``, or ``None``. Defaults to ``"label"``.
        max_cases: number of images to explain (each costs a forward and backward pass per class
            and layer). Defaults to 1.
        mask_source: ``"prediction"`` or ``"label"``, as :func:`gradcam_3d`.
        save_png: also write PNG overlays.
    """

    handler_name = "GradCAMHandler"
    analysis_name = "Grad-CAM"
    summary_filename = "gradcam_summary.json"

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
        mask_source: str = "prediction",
        save_png: bool = True,
    ) -> None:
        super().__init__(
            output_dir, layers=layers, classes=classes, class_names=class_names, network=network,
            image_key=image_key, label_key=label_key, max_cases=max_cases,
        )
        if mask_source not in ("prediction", "label"):
            raise ValueError(f"mask_source must be 'prediction' or 'label', got {mask_source!r}")
        self.mask_source, self.save_png = mask_source, save_png

    def analyse_case(self, network: nn.Module, item: dict[str, Any], case_dir: Path) -> dict[str, Any]:
        """:func:`run_gradcam` on one image, written to ``case_dir``."""
        return run_gradcam(
            network, item["image"], case_dir, layers=self.layers, classes=self.classes,
            label=item["label"], class_names=self.class_names, affine=item["affine"],
            mask_source=self.mask_source, save_png=self.save_png,
        )

    def summary(self) -> dict[str, Any]:
        """Mean Otsu Dice per class and layer over the explained cases (cases without the class skipped)."""
        scored = [r for r in self.records if r.get("dice")]
        out: dict[str, Any] = {"cases": [r["case"] for r in self.records], "mean_dice": {}}
        for r in scored:
            for cname, per_layer in r["dice"].items():
                for layer, d in per_layer.items():
                    out["mean_dice"].setdefault(cname, {}).setdefault(layer, []).append(d)
        out["mean_dice"] = {c: {k: nan_mean(v) for k, v in lv.items()} for c, lv in out["mean_dice"].items()}
        return out
