"""ProtoSeg segmentation ability (SA) of every conv layer, adapters included (thesis 2.6.2, 5.2.4.2).

For a layer with features ``F (C, h, w, d)`` and the network's own prediction as guidance (thesis
2.6.2: "using segmentation outputs from the neural network as guidance"), ProtoSeg

1. resizes the predicted foreground mask to the layer's resolution (nearest neighbour),
2. averages the features over foreground and over background voxels: the two prototypes,
3. assigns every voxel to the more similar prototype (cosine similarity by default): the binary
   segmentation-ability map (SAM), at the layer's resolution,
4. brings the SAM back to input resolution (nearest neighbour) and scores it against the ground truth
   with Dice (:func:`monai_peft.metrics.mask_dice`): the segmentation ability (SA), NaN for a target the
   ground truth lacks.

A voxel equally similar to both prototypes goes to the background, so a layer whose features are
constant (no information) gets SA 0 instead of a chance score.

Memory: the features are never all held at once. One forward pass (no gradients) gives the
prediction; a second pass runs with a forward hook on every conv layer that computes that layer's SA
the moment its output exists and lets the features go ("streaming"), so the peak is the network's own
inference footprint plus one layer's features. ``per_layer=True`` instead hooks one layer per pass.
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
import torch.nn.functional as F
from torch import nn

from monai_peft.io import atomic_save_figure, atomic_write_json, json_default
from monai_peft.tuners.module_types import ANY_CONV_TYPES
from monai_peft.metrics import mask_dice, nan_mean
from monai_peft.interpret._common import (
    PerCaseAnalysisHandler,
    adapter_names,
    as_batch,
    as_label,
    find_module,
    first_output,
    image_affine,
    is_adapter_module,
    preserved_mode,
    safe_name,
    save_nifti,
    short_name,
)

logger = logging.getLogger(__name__)

__all__ = [
    "LayerSA",
    "ProtoSegHandler",
    "plot_segmentation_ability",
    "protoseg",
    "run_protoseg",
    "segmentation_ability_map",
]


@dataclass
class LayerSA:
    """Segmentation ability of one layer.

    Attributes:
        name: module name.
        adapter: whether the layer belongs to an adapter rather than to the backbone.
        shape: feature shape ``(C, h, w, d)``.
        sa: Dice of the SAM with the ground truth, per explained target (``"foreground"`` or a class name).
        order: execution index of the layer.
        trainable: whether the layer has trainable parameters (adapters; backbone layers trained fully,
            e.g. a new head in peft's ``modules_to_save``).
        sam: the SAMs at input resolution, when asked to keep them.
    """

    name: str
    adapter: bool
    shape: tuple[int, ...]
    sa: dict[str, float]
    order: int
    trainable: bool = False
    sam: dict[str, np.ndarray] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "adapter": self.adapter, "trainable": self.trainable, "shape": list(self.shape),
                "order": self.order, "sa": self.sa}


def _resize_mask(mask: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Nearest-neighbour resize of a boolean mask ``(*spatial)``."""
    if tuple(mask.shape) == tuple(size):
        return mask
    return F.interpolate(mask[None, None].float(), size=tuple(size), mode="nearest")[0, 0] > 0.5


def segmentation_ability_map(features: torch.Tensor, guide: torch.Tensor, metric: str = "cosine") -> torch.Tensor:
    """Binary SAM of one feature map (thesis 2.6.2).

    Args:
        features: ``(C, *spatial)`` layer output (any resolution).
        guide: boolean foreground mask ``(*spatial_in)`` from the network's prediction; resized to the
            features' resolution with nearest neighbour.
        metric: ``"cosine"`` (default) or ``"euclidean"`` similarity to the prototypes.

    Returns:
        boolean SAM ``(*spatial)`` at the features' resolution; all background when the guide has no
        foreground or no background at that resolution.
    """
    if metric not in ("cosine", "euclidean"):
        raise ValueError(f"metric must be 'cosine' or 'euclidean', got {metric!r}")
    feats = features.detach().float()
    c = feats.shape[0]
    g = _resize_mask(guide.to(feats.device), feats.shape[1:])
    flat = feats.reshape(c, -1)
    gf = g.reshape(-1)
    if not gf.any() or gf.all():
        return torch.zeros(feats.shape[1:], dtype=torch.bool, device=feats.device)
    fg = flat[:, gf].mean(1, keepdim=True)
    bg = flat[:, ~gf].mean(1, keepdim=True)
    if metric == "cosine":
        norm = flat.norm(dim=0, keepdim=True).clamp_min(1e-8)
        s_fg = (flat * fg).sum(0) / (norm[0] * fg.norm().clamp_min(1e-8))
        s_bg = (flat * bg).sum(0) / (norm[0] * bg.norm().clamp_min(1e-8))
    else:
        s_fg = -((flat - fg) ** 2).sum(0)
        s_bg = -((flat - bg) ** 2).sum(0)
    # ties (e.g. constant features) go to the background; a small margin absorbs rounding
    margin = 1e-6 * torch.maximum(s_fg.abs(), s_bg.abs()).clamp_min(1.0)
    return (s_fg > s_bg + margin).reshape(feats.shape[1:])


def _targets(
    pred: torch.Tensor, gt: torch.Tensor, classes: Sequence[int] | None, names: Mapping[int, str]
) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(name, guide from prediction, ground truth) per explained target."""
    if classes is None:
        return [("foreground", pred > 0, gt > 0)]
    return [(names.get(c, f"class{c}"), pred == c, gt == c) for c in classes]


def protoseg(
    model: nn.Module,
    image: torch.Tensor | np.ndarray,
    label: torch.Tensor | np.ndarray,
    layers: Sequence[str] | None = None,
    classes: Sequence[int] | None = None,
    class_names: Mapping[int, str] | None = None,
    metric: str = "cosine",
    keep_maps: Sequence[str] = (),
    per_layer: bool = False,
) -> list[LayerSA]:
    """Segmentation ability of every conv layer of ``model`` on one image.

    Args:
        model: segmentation network (``peft.PeftModel`` too) returning logits ``(1, K, *spatial)``.
        image: ``(C, H, W, D)`` or ``(1, C, H, W, D)``.
        label: ground truth ``(H, W, D)`` in channel indices.
        layers: module names to score; default every ``Conv{1,2,3}d``/``ConvTranspose`` module,
            adapter convs included. Non-conv modules given by name work too (their output must be a
            feature tensor ``(1, C, *spatial)``).
        classes: channels scored one against the rest; default ``None`` scores the foreground
            (all channels but 0 merged) as one binary target, like the thesis's binary SAM.
        class_names: channel -> name for the result keys.
        metric: prototype similarity, ``"cosine"`` or ``"euclidean"``.
        keep_maps: names of layers whose SAM (at input resolution) is kept in the result.
        per_layer: one forward pass per layer instead of one streaming pass for all (slower, the
            same numbers; for networks whose hooks must not overlap).

    Returns:
        one :class:`LayerSA` per executed layer, in execution order (``per_layer``: in the order of
        ``layers`` / ``named_modules()``); layers that never run (e.g. peft's ``original_module`` copy
        of a head trained in ``modules_to_save``) are logged and left out.
    """
    device = next(model.parameters()).device
    x = as_batch(image).to(device)
    spatial = tuple(x.shape[2:])
    gt = torch.as_tensor(as_label(label, spatial), device=device)
    names = adapter_names(model)
    cls_names = dict(class_names or {})
    if layers is None:
        chosen = [(n, m) for n, m in model.named_modules() if isinstance(m, ANY_CONV_TYPES)]
    else:
        chosen = [find_module(model, n) for n in layers]
    if not chosen:
        raise ValueError(f"{type(model).__name__} has no conv layer to score")
    keep = {find_module(model, n)[0] for n in keep_maps}
    trainable = {n: any(p.requires_grad for p in m.parameters()) for n, m in chosen}
    results: list[LayerSA] = []

    with preserved_mode(model), torch.no_grad():
        model.eval()
        logits = first_output(model(x))
        if tuple(logits.shape[2:]) != spatial:
            raise ValueError(f"network output {tuple(logits.shape)} does not match the input's spatial shape {spatial}")
        pred = logits.argmax(1)[0]
        if classes is not None:
            bad = [c for c in classes if not 0 <= int(c) < logits.shape[1]]
            if bad:
                raise ValueError(f"classes {bad} out of range for a network with {logits.shape[1]} output channels")
        targets = _targets(pred, gt, None if classes is None else [int(c) for c in classes], cls_names)
        del logits

        def score(name: str, output: Any) -> None:
            if any(r.name == name for r in results):  # a module called twice: its first call counts
                return
            feats = first_output(output)
            if feats.ndim != len(spatial) + 2:
                logger.info("ProtoSeg: %s gives shape %s, not a feature map; skipped", name, tuple(feats.shape))
                return
            sa, maps = {}, {}
            for tname, guide, truth in targets:
                sam = segmentation_ability_map(feats[0], guide, metric=metric)
                sam_full = _resize_mask(sam, spatial)
                sa[tname] = mask_dice(sam_full, truth)
                if name in keep:
                    maps[tname] = sam_full.cpu().numpy()
            adapter = is_adapter_module(name, names)
            results.append(LayerSA(name, adapter, tuple(feats.shape[1:]), sa, len(results), trainable[name], maps))

        def hook_for(name: str):
            return lambda module, args, output: score(name, output)

        groups = [[item] for item in chosen] if per_layer else [chosen]
        for group in groups:
            handles = [m.register_forward_hook(hook_for(n)) for n, m in group]
            try:
                model(x)
            finally:
                for h in handles:
                    h.remove()
    missing = [n for n, _ in chosen if not any(r.name == n for r in results)]
    if missing:
        logger.info("ProtoSeg: %d layer(s) did not run or gave no feature map: %s", len(missing), missing[:5])
    if per_layer:
        results.sort(key=lambda r: [n for n, _ in chosen].index(r.name))
        for i, r in enumerate(results):
            r.order = i
    return results


def _anchor(name: str, backbone: list[str]) -> int:
    """Index of the backbone layer sharing the longest dotted prefix with adapter layer ``name``."""
    parts = name.split(".")
    best, best_len = 0, -1
    for i, b in enumerate(backbone):
        common = 0
        for p, q in zip(parts, b.split(".")):
            if p != q:
                break
            common += 1
        if common >= best_len:
            best, best_len = i, common
    return best


def plot_segmentation_ability(
    layers: Sequence[LayerSA], path: str | os.PathLike, target: str | None = None, title: str | None = None
) -> Path:
    """SA by layer (thesis Fig. 5.10 / 5.11): frozen backbone convs as one line in execution order,
    each adapter conv drawn beside the backbone conv it runs parallel to (longest shared name prefix).

    Args:
        layers: the result of :func:`protoseg`.
        path: PNG to write (atomically).
        target: which SA entry to plot; default the first.
        title: figure title.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not layers:
        raise ValueError("plot_segmentation_ability: no layers")
    target = target or next(iter(layers[0].sa))
    backbone = [r for r in layers if not r.adapter]
    adapters = [r for r in layers if r.adapter]
    bnames = [r.name for r in backbone]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.28 * len(backbone) + 2), 4.2))
    ax.plot(range(len(backbone)), [r.sa[target] for r in backbone], "o-", color="C0", ms=4,
            label="backbone conv (frozen)")
    trained = [(i, r) for i, r in enumerate(backbone) if r.trainable]
    if trained:
        ax.scatter([i for i, _ in trained], [r.sa[target] for _, r in trained], marker="^", color="C2", s=30,
                   zorder=3, label="backbone conv (trained fully)")
    if adapters and backbone:
        xs = [_anchor(r.name, bnames) + 0.25 for r in adapters]
        ax.scatter(xs, [r.sa[target] for r in adapters], marker="s", color="C3", s=22, zorder=3,
                   label="adapter conv (trained)")
    ax.set_xticks(range(len(backbone)))
    ax.set_xticklabels([short_name(n)[-32:] for n in bnames], rotation=90, fontsize=6)
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel(f"segmentation ability (Dice), {target}")
    ax.set_title(title or "ProtoSeg segmentation ability by layer")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = atomic_save_figure(fig, path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return out


def sa_table(layers: Sequence[LayerSA]) -> str:
    """Plain-text table: order, layer, kind, feature shape and SA per target."""
    if not layers:
        return "(no layers)"
    keys = list(layers[0].sa)
    head = f"{'#':>3} {'layer':<48} {'kind':<8} {'shape':<20} " + " ".join(f"{k[:12]:>12}" for k in keys)
    lines = [head, "-" * len(head)]
    for r in layers:
        kind = "adapter" if r.adapter else ("trained" if r.trainable else "backbone")
        shape = "x".join(map(str, r.shape))
        scores = " ".join(f"{r.sa[k]:>12.3f}" for k in keys)
        lines.append(f"{r.order:>3} {short_name(r.name)[-48:]:<48} {kind:<8} {shape:<20} {scores}")
    return "\n".join(lines)


def run_protoseg(
    model: nn.Module,
    image: torch.Tensor | np.ndarray,
    label: torch.Tensor | np.ndarray,
    out_dir: str | os.PathLike,
    layers: Sequence[str] | None = None,
    classes: Sequence[int] | None = None,
    class_names: Mapping[int, str] | None = None,
    metric: str = "cosine",
    save_maps: Sequence[str] = (),
    affine: np.ndarray | None = None,
    save_png: bool = True,
) -> dict[str, Any]:
    """ProtoSeg of one image written to ``out_dir``: ``protoseg.json`` (SA per layer and target),
    ``protoseg.png`` (SA by layer, backbone and adapters side by side) and, for the layers in
    ``save_maps``, the SAMs as NIfTI (``sam_<layer>_<target>.nii.gz``, the input's affine).

    Args:
        model, image, label, layers, classes, class_names, metric: as :func:`protoseg`.
        out_dir: output folder.
        save_maps: layers whose SAM is written as NIfTI (thesis Fig. 5.12).
        affine: 4x4 affine of the input; default the ``MetaTensor``'s, else identity.
        save_png: write the plot.

    Returns:
        the content of ``protoseg.json``.
    """
    out_dir = Path(out_dir)
    affine = image_affine(image, affine)
    res = protoseg(model, image, label, layers=layers, classes=classes, class_names=class_names, metric=metric,
                   keep_maps=save_maps)
    record: dict[str, Any] = {
        "method": "protoseg",
        "metric": metric,
        "targets": list(res[0].sa) if res else [],
        "layers": [r.as_dict() for r in res],
        "files": {"nifti": [], "png": []},
    }
    for r in res:
        for tname, sam in r.sam.items():
            name = f"sam_{safe_name(r.name)}_{safe_name(tname)}.nii.gz"
            p = save_nifti(sam.astype(np.float32), affine, out_dir / name)
            record["files"]["nifti"].append(p.name)
    if save_png and res:
        record["files"]["png"].append(plot_segmentation_ability(res, out_dir / "protoseg.png").name)
    atomic_write_json(out_dir / "protoseg.json", record, default=json_default)
    return record


class ProtoSegHandler(PerCaseAnalysisHandler):
    """Ignite handler running :func:`run_protoseg` on the first ``max_cases`` images an evaluator sees
    and writing the mean SA per layer over them at epoch end (``protoseg_summary.json``).

    Usable from bundle JSON, e.g.::

        {"_target_": "monai_peft.interpret.ProtoSegHandler", "output_dir": "$@output_dir + '/protoseg'"}

    Args:
        output_dir: folder; each case gets a sub-folder.
        layers: module names, default every conv layer.
        classes: channels scored one against the rest; default ``None``: the merged foreground.
        class_names: channel -> name.
        network: network to explain; default ``engine.network``.
        image_key: batch key of the image ``(B, C, H, W, D)``. Defaults to ``"image"``.
        label_key: batch key of the label ``(B, 1, H, W, D)``. Defaults to ``"label"``.
        max_cases: number of images. Defaults to 1.
        metric: ``"cosine"`` or ``"euclidean"``.
    """

    handler_name = "ProtoSegHandler"
    analysis_name = "ProtoSeg"
    summary_filename = "protoseg_summary.json"

    def __init__(
        self,
        output_dir: str | os.PathLike,
        layers: Sequence[str] | None = None,
        classes: Sequence[int] | None = None,
        class_names: Mapping[Any, str] | None = None,
        network: nn.Module | None = None,
        image_key: str = "image",
        label_key: str = "label",
        max_cases: int = 1,
        metric: str = "cosine",
    ) -> None:
        super().__init__(
            output_dir, layers=layers, classes=classes, class_names=class_names, network=network,
            image_key=image_key, label_key=label_key, max_cases=max_cases,
        )
        if metric not in ("cosine", "euclidean"):
            raise ValueError(f"metric must be 'cosine' or 'euclidean', got {metric!r}")
        self.metric = metric

    def analyse_case(self, network: nn.Module, item: dict[str, Any], case_dir: Path) -> dict[str, Any]:
        """:func:`run_protoseg` on one image and its label, written to ``case_dir``."""
        return run_protoseg(network, item["image"], item["label"], case_dir, layers=self.layers,
                            classes=self.classes, class_names=self.class_names, metric=self.metric,
                            affine=item["affine"])

    def summary(self) -> dict[str, Any]:
        """Mean SA per layer and target over the cases."""
        acc: dict[str, dict[str, list[float]]] = {}
        kinds: dict[str, bool] = {}
        for r in self.records:
            for layer in r["layers"]:
                kinds[layer["name"]] = layer["adapter"]
                for t, v in layer["sa"].items():
                    acc.setdefault(layer["name"], {}).setdefault(t, []).append(v)
        return {
            "cases": [r["case"] for r in self.records],
            "layers": [{"name": n, "adapter": kinds[n], "mean_sa": {t: nan_mean(v) for t, v in tv.items()}}
                       for n, tv in acc.items()],
        }
