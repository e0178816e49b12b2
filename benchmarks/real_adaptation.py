"""Quality on a real task: a CT-pretrained residual U-Net adapted to a real MR with five fine-tuning methods.

Thesis 5.2.3.2 (Table 5.9) in miniature: a network trained on CT organ labels is adapted to the organs of an MR
(TotalSegmentator MR, thesis Table 4.5), where ConvAdapter reached 0.59 mean test Dice against 0.54 for full
fine-tuning. Here both scans are the real TotalSegmentator examples shipped with the package
(:func:`monai_peft.data.example_scan`: CT 122x101x30, MR 117x91x20, both at 3 mm), so the script needs no download
and runs on 2 CPU cores. It prints one table and writes ``real_adaptation.json`` (every run) and
``real_adaptation.png`` (the learning-rate grids and the chosen points). About 40 minutes on 2 quiet CPU cores
(the pretrained network is cached in ``--out``; ``--seeds 1`` halves the fine-tuning part).

Design, and why:

- **Network.** MONAI's ``DynUNet`` (the 3D U-Net of nnU-Net, Isensee et al. 2021) with residual encoder blocks
  (``res_block=True``), InstanceNorm without affine parameters, a 1-channel input conv, strided-conv
  down-sampling, ``ConvTranspose3d`` up-sampling, a 1x1x1 output conv and odd channel counts (:data:`FILTERS`
  starts at 15): none of the project's usual test networks, with every conv geometry issue 10 names.
- **Classes.** The organs of the thesis's MR class group (:data:`~monai_peft.data.MR_ORGANS_29`, Table 4.5) that
  both label maps contain, matched by TotalSegmentator name (16: spleen, kidneys, liver, stomach, pancreas,
  vessels, ...). The network is pretrained on these names in CT and keeps its head: the MR task is the same
  anatomy in another modality, the thesis's out-of-distribution case.
- **Grid.** The scans' 3 mm along S, 6 mm in-plane (:data:`PIXDIM`): a 48x40x8 patch then spans most of the
  abdomen's cross-section, and one step costs a fifth of a second instead of a second. Small structures
  (adrenals, 3 mm vessels) suffer; the scoring below leaves out what the grid cannot show.
- **Splits.** One MR means spatial splits: axial slabs along S (after reorienting the LPS MR to RAS), caudal
  slices ``[0, 5)`` ("val"), ``[5, 15)`` to train, cranial ``[15, 20)`` ("test") (:data:`MR_SLABS`). The training slab sits in the middle so that each held-out slab shares most organs with it.
  No voxel of a held-out slab reaches training: patches are cropped from the training slab alone, and
  sliding-window inference runs on each held-out slab alone (padded by replication, never by neighbouring
  slices). The MR intensity window (0.5-99.5 percentiles, as ``intensity="percentile"`` of
  :func:`monai_peft.data.preprocess_transforms`) comes from the training slab only and is applied to all three,
  so held-out intensities do not shape the normalisation either. The CT uses SuPreM's HU window
  ``[-175, 250]`` (thesis Table 4.3); both map to [0, 1].
- **Scoring.** MONAI's ``DiceMetric`` per class on each held-out slab; a slab's mean Dice averages the classes
  with at least :data:`MIN_ML` ml both in that slab and in the training slab (a structure the training slab does
  not show, or a sliver of a few voxels, measures nothing about adaptation); the JSON lists them.
- **Two folds.** A 5-slice slab holds 8-11 organs, and one slab's Dice moves by ~0.1 between learning rates that
  a second slab ranks the other way round. So both held-out slabs serve both roles: fold A chooses the learning
  rate on "val" and scores "test", fold B chooses it on "test" and scores "val"; the held-out Dice is the mean of
  the two scores (nested 2-fold selection: no score comes from the slab that chose its rate). The targets use
  the held-out Dice; the JSON keeps fold A alone too. The default learning rate of a method
  (:mod:`monai_peft.defaults`) is the rate with the best mean Dice over both slabs (``default_lr``).
- **Methods.** Full fine-tuning (every weight; the plain network), head only (linear probing of the 1x1x1
  output conv), ConvAdapter on every conv including the 1-channel stem, LoRA on every ``Conv3d`` (the largest rank
  within 5% of the parameters), SSF on :func:`monai_peft.adapt`'s default targets; the PEFT methods also train the
  head (thesis 4.2.5). ConvAdapter is parallel with a grouped down-projection (:class:`~monai_peft.ConvAdapterConfig`'s
  defaults) on every ``Conv3d`` and ``ConvTranspose3d``, with ``gamma`` 4 (the default, 4.2% of the parameters) or
  2 (the widest within 5%) and ReLU (the paper's) or leaky ReLU (the default) chosen together with the learning
  rate; LoRA has ``r=3``, the largest rank within 5%
  (peft 0.21's LoRA has no ``ConvTranspose3d`` layer). AdamW (weight decay 1e-5) with cosine annealing (thesis 4.2.3), DiceCE loss, random
  patches with light nnU-Net-style augmentation (affine, intensity, contrast, bias field, noise: one training
  slab invites over-fitting). Every method runs at every learning rate of its grid (:data:`METHODS`) and with
  ``--seeds`` seeds (default 2; the same patch sequences for every method; a grid point's Dice is the mean over
  its seeds). The same steps, patches and data for every method. Single runs differ by up to 0.1 Dice between
  seeds on slabs this small: read differences below ~0.05 as noise.
- **Cache.** Each finished run is stored in ``--out``/``runs/`` under a hash of what shapes it (:func:`run_key`):
  an interrupted benchmark resumes, and a widened grid runs only its new points.
- **Determinism.** Each run is seeded (``set_determinism``, the transforms' random state) and uses one intra-op
  thread; the runs are spread over ``--workers`` processes instead. So results do not depend on
  ``OMP_NUM_THREADS`` or the worker count, as far as torch's CPU kernels are deterministic. The pretrained
  network is cached in the output folder under a hash of its settings.

``adapt(net, "full")`` would also wrap DynUNet's ``skip_layers`` (which alias the encoder and decoder) and count
the network twice, so full fine-tuning trains the plain network.

Run ``python benchmarks/real_adaptation.py`` (``docs/core.md``, "Learning rates", has the latest table);
``--quick`` is a smoke run of seconds with meaningless numbers. The ``default_lr`` of each method is its entry in
:mod:`monai_peft.defaults`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import multiprocessing as mp
import os
import platform
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai import transforms as mt
from monai.inferers import sliding_window_inference
from monai.metrics import DiceMetric
from monai.networks.nets import DynUNet
from monai.networks.utils import one_hot
from monai.utils import set_determinism
from torch import nn

import monai_peft
from monai_peft import ModuleType, Region, parameter_report
from monai_peft.data import MR_ORGANS_29, example_scan, remap_label_map, task_id_map
from monai_peft.io import atomic_save_figure, atomic_torch_save, atomic_write_json, atomic_write_text
from monai_peft.workflows.engines import build_loss, build_optimizer

logger = logging.getLogger("real_adaptation")

RESULTS_DIR = Path(__file__).resolve().parent / "results"

# DynUNet widths per level: 15 is odd (ConvAdapter's grouping must cope), the stem conv sees 1 channel
FILTERS: tuple[int, ...] = (15, 30, 60, 120)
# MR slabs along S (RAS voxel index k), [start, stop): validation caudal, training in the middle, test cranial
MR_SLABS: dict[str, tuple[int, int]] = {"val": (0, 5), "train": (5, 15), "test": (15, 20)}
# voxel spacing (mm): the scans' 3 mm along S, 6 mm in-plane, so that a patch spans the abdomen's cross-section
PIXDIM: tuple[float, float, float] = (6.0, 6.0, 3.0)
# a class counts in a held-out slab's mean Dice with >= this volume (ml) there and in the training slab
MIN_ML = 2.7
CT_WINDOW: tuple[float, float] = (-175.0, 250.0)  # SuPreM's HU window (thesis Table 4.3)
MR_PERCENTILES: tuple[float, float] = (0.5, 99.5)
DYNUNET_REGIONS = {"encoder": [r"input_block", r"downsamples", r"bottleneck"], "decoder": [r"upsamples"],
                   "head": [r"output_block"]}


@dataclass(frozen=True)
class MethodSpec:
    """How one method is built and its learning-rate grid.

    ``adapt_kwargs`` are :func:`monai_peft.adapt`'s keyword arguments (``None``: train the plain network);
    ``conv_types`` makes the target every conv of these types outside the head (``None``: ``adapt``'s default);
    ``variants`` are further ``adapt`` options, each run at every rate of ``lr_grid`` and chosen like the rate.
    """

    adapt_kwargs: dict[str, Any] | None
    lr_grid: tuple[float, ...]
    conv_types: tuple[type[nn.Module], ...] | None = None
    variants: tuple[dict[str, Any], ...] = ({},)


# grids widened until no method's choice (fold A, fold B, default) sits at an edge in the committed run, or the
# edge is a clear decline (docs/core.md, "Learning rates")
METHODS: dict[str, MethodSpec] = {
    "full": MethodSpec(None, (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1)),
    "head": MethodSpec({}, (1e-2, 3e-2, 1e-1, 3e-1, 1.0)),
    # grouped down-projection (ConvAdapterConfig's default) on every conv, stem and up-sampling included; the widths
    # within 5% of the parameters: gamma=4 (the paper's and ConvAdapterConfig's default, 4.2%) and gamma=2 (5.0%);
    # gamma=1 is 6.8%, dense down-projections 8.3% at gamma=16. Activations: ReLU (the paper's) and leaky ReLU,
    # which cannot leave an adapter dead: a 1-channel stem's single bottleneck channel sees only positive
    # intensities, and where its kernel sums negative, ReLU gives 0 everywhere and neither projection ever trains
    "convadapter": MethodSpec({"train_fully": "head"}, (1e-2, 3e-2, 1e-1, 3e-1), (nn.Conv3d, nn.ConvTranspose3d),
                              tuple({"gamma": g, "activation": a} for a in ("relu", "leakyrelu") for g in (4, 2))),
    # the largest rank within 5% of the parameters (r=3: 4.5%, r=4: 6.0%); peft 0.21's LoRA has no ConvTranspose3d
    "lora": MethodSpec({"train_fully": "head", "r": 3}, (3e-3, 1e-2, 3e-2, 1e-1), (nn.Conv3d,)),
    "ssf": MethodSpec({"train_fully": "head"}, (1e-2, 3e-2, 1e-1, 3e-1, 1.0)),
}


@dataclass(frozen=True)
class Settings:
    """Sizes and budgets of one benchmark run (``--quick`` shrinks them to a smoke run)."""

    filters: tuple[int, ...] = FILTERS
    roi: tuple[int, int, int] = (48, 40, 8)
    batch: int = 2
    pretrain_steps: int = 600
    pretrain_lr: float = 1e-2
    steps: int = 300
    seed: int = 0  # pretraining seed and the first fine-tuning seed
    seeds: int = 2  # fine-tuning runs per grid point (seeds seed, seed + 1, ...); Dice is their mean
    overlap: float = 0.5
    grid_points: int | None = None  # None: every learning rate of each grid
    methods: tuple[str, ...] = tuple(METHODS)
    log_every: int = 50
    augment: bool = True


QUICK = dict(filters=(3, 6, 12, 24), roi=(32, 32, 8), batch=1, pretrain_steps=2, steps=2, seeds=1, overlap=0.25,
             grid_points=2, log_every=1)


# ----------------------------------------------------------------------------------------------------- data
@dataclass
class TaskData:
    """The prepared arrays, ``(1, H, W, D)`` float32 images in [0, 1] and int64 label maps of class indices."""

    classes: list[str]
    ct_image: np.ndarray
    ct_label: np.ndarray
    mr: dict[str, dict[str, np.ndarray]]  # slab name -> {"image", "label"}
    mr_window: tuple[float, float]
    scored: dict[str, list[str]]  # held-out slab -> classes in its mean Dice
    voxels: dict[str, dict[str, int]] = field(default_factory=dict)


def load_scan(modality: str, pixdim: Sequence[float] = PIXDIM) -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
    """A shipped example scan in RAS at ``pixdim``.

    Returns:
        ``(image (H, W, D) float32, label (H, W, D) TotalSegmentator task ids, {task id: structure name})``.
    """
    scan = example_scan(modality)
    keys = ["image", "label"]
    chain = mt.Compose([
        mt.LoadImaged(keys=keys, ensure_channel_first=True, image_only=True),
        mt.Orientationd(keys=keys, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
        mt.Spacingd(keys=keys, pixdim=tuple(pixdim), mode=("bilinear", "nearest")),
    ])
    d = chain({"image": str(scan.image), "label": str(scan.label)})
    image = np.asarray(d["image"][0], dtype=np.float32)
    label = np.asarray(d["label"][0]).round().astype(np.int64)
    return image, label, task_id_map(scan.class_map, scan.task)


def shared_classes(ct_label: np.ndarray, ct_ids: dict[int, str], mr_label: np.ndarray,
                   mr_ids: dict[int, str]) -> list[str]:
    """Thesis Table 4.5's MR organs present in both label maps, in that table's order."""
    in_ct = {ct_ids[int(i)] for i in np.unique(ct_label) if i}
    in_mr = {mr_ids[int(i)] for i in np.unique(mr_label) if i}
    return [name for name in MR_ORGANS_29 if name in in_ct and name in in_mr]


def _scale(image: np.ndarray, a_min: float, a_max: float) -> np.ndarray:
    scaler = mt.ScaleIntensityRange(a_min=a_min, a_max=a_max, b_min=0.0, b_max=1.0, clip=True)
    return np.asarray(scaler(image[None]), dtype=np.float32)


def split_mr(
    image: np.ndarray,
    label: np.ndarray,
    slabs: dict[str, tuple[int, int]] = MR_SLABS,
    percentiles: tuple[float, float] = MR_PERCENTILES,
) -> tuple[dict[str, dict[str, np.ndarray]], tuple[float, float]]:
    """Cut the MR into disjoint axial slabs and normalise each with the training slab's intensity window.

    Args:
        image: ``(H, W, D)`` MR in scanner units, RAS.
        label: ``(H, W, D)`` class indices.
        slabs: ``{"train": (k0, k1), "val": ..., "test": ...}`` half-open ranges along the last axis; disjoint.
        percentiles: lower/upper percentiles of the training slab mapped to 0 and 1.

    Returns:
        ``({slab: {"image": (1, H, W, d) float32, "label": (1, H, W, d) int64}}, (a_min, a_max))``.

    Raises:
        ValueError: slabs overlap, leave the volume, or there is no ``"train"`` slab.
    """
    if "train" not in slabs:
        raise ValueError(f"split_mr: slabs need a 'train' entry, got {sorted(slabs)}.")
    depth = image.shape[-1]
    taken = np.zeros(depth, dtype=int)
    for name, (k0, k1) in slabs.items():
        if not 0 <= k0 < k1 <= depth:
            raise ValueError(f"split_mr: slab {name!r} = [{k0}, {k1}) is not inside the {depth} slices.")
        taken[k0:k1] += 1
    if (taken > 1).any():
        raise ValueError(f"split_mr: slabs {slabs} overlap at slices {np.flatnonzero(taken > 1).tolist()}.")
    k0, k1 = slabs["train"]
    a_min, a_max = (float(v) for v in np.percentile(image[..., k0:k1], percentiles))
    out = {name: {"image": _scale(image[..., a:b], a_min, a_max), "label": label[None, ..., a:b].astype(np.int64)}
           for name, (a, b) in slabs.items()}
    return out, (a_min, a_max)


def prepare_data(pixdim: Sequence[float] = PIXDIM, min_ml: float = MIN_ML) -> TaskData:
    """Load both example scans, map their labels to the shared organ names and cut the MR into slabs."""
    ct_image, ct_task, ct_ids = load_scan("ct", pixdim)
    mr_image, mr_task, mr_ids = load_scan("mr", pixdim)
    min_voxels = math.ceil(min_ml * 1000.0 / math.prod(pixdim))
    classes = shared_classes(ct_task, ct_ids, mr_task, mr_ids)
    ct_label = remap_label_map(ct_task, ct_ids, classes).astype(np.int64)
    mr_label = remap_label_map(mr_task, mr_ids, classes).astype(np.int64)
    mr, window = split_mr(mr_image, mr_label)
    voxels = {slab: {c: int((d["label"] == i).sum()) for i, c in enumerate(classes, start=1)} for slab, d in mr.items()}
    scored = {slab: [c for c in classes if voxels[slab][c] >= min_voxels and voxels["train"][c] >= min_voxels]
              for slab in mr if slab != "train"}
    return TaskData(classes, _scale(ct_image, *CT_WINDOW), ct_label[None], mr, window, scored, voxels)


# --------------------------------------------------------------------------------------------- network
def residual_unet(out_channels: int, filters: Sequence[int] = FILTERS) -> DynUNet:
    """nnU-Net's 3D U-Net as MONAI builds it: residual encoder, InstanceNorm, transposed-conv decoder.

    Maps ``(B, 1, H, W, D)`` (sizes divisible by 8) to logits ``(B, out_channels, H, W, D)``.
    """
    net = DynUNet(spatial_dims=3, in_channels=1, out_channels=out_channels, kernel_size=[3] * len(filters),
                  strides=[1] + [2] * (len(filters) - 1), upsample_kernel_size=[2] * (len(filters) - 1),
                  filters=list(filters), norm_name="instance", res_block=True)
    net.peft_regions = DYNUNET_REGIONS
    return net


def build_model(method: str, state: dict[str, torch.Tensor], out_channels: int, filters: Sequence[int],
                options: dict[str, Any] | None = None) -> nn.Module:
    """The pretrained network prepared for ``method`` with variant ``options`` (a ``PeftModel``, or the plain network
    for ``full``)."""
    net = residual_unet(out_channels, filters)
    net.load_state_dict(state)
    spec = METHODS[method]
    if spec.adapt_kwargs is None:
        return net
    kwargs = dict(spec.adapt_kwargs) | dict(options or {})
    if spec.conv_types is not None:  # every conv but the head, which trains fully beside the adapters
        kwargs["target"] = ModuleType(*spec.conv_types) & ~Region("head")
    return monai_peft.adapt(net, method, **kwargs)


# ------------------------------------------------------------------------------------ training and scoring
def _patch_sampler(roi: Sequence[int], batch: int, seed: int, augment: bool = True) -> mt.Compose:
    keys = ["image", "label"]
    chain = [
        mt.RandCropByPosNegLabeld(keys=keys, label_key="label", spatial_size=tuple(roi), pos=2, neg=1,
                                  num_samples=batch, fg_indices_key="fg", bg_indices_key="bg"),
        mt.RandShiftIntensityd(keys="image", offsets=0.10, prob=0.20),  # thesis Table 4.3
    ]
    if augment:
        chain += [
            mt.RandAffined(keys=keys, prob=0.5, rotate_range=(0.0, 0.0, 0.26), scale_range=(0.1, 0.1, 0.1),
                           mode=("bilinear", "nearest"), padding_mode="border"),
            mt.RandScaleIntensityd(keys="image", factors=0.1, prob=0.5),
            mt.RandAdjustContrastd(keys="image", gamma=(0.7, 1.5), prob=0.3),
            mt.RandBiasFieldd(keys="image", coeff_range=(0.0, 0.1), prob=0.3),
            mt.RandGaussianNoised(keys="image", std=0.02, prob=0.2),
        ]
    sampler = mt.Compose(chain + [mt.EnsureTyped(keys=keys, data_type="tensor", track_meta=False)])
    sampler.set_random_state(seed)
    return sampler


def train(model: nn.Module, image: np.ndarray, label: np.ndarray, steps: int, lr: float, seed: int, s: Settings,
          tag: str) -> dict[str, float]:
    """``steps`` AdamW steps with cosine annealing on random patches of one ``(1, H, W, D)`` volume."""
    data = {"image": torch.from_numpy(image), "label": torch.from_numpy(label)}
    data.update(mt.FgBgToIndicesd(keys="label")(dict(data)))
    data["fg"], data["bg"] = data.pop("label_fg_indices"), data.pop("label_bg_indices")
    sampler = _patch_sampler(s.roi, s.batch, seed, s.augment)
    loss_fn = build_loss(include_background=False, batch=True)
    optimizer = build_optimizer(model, lr=lr, weight_decay=1e-5)  # thesis 4.2.3: AdamW, wd 1e-5, cosine
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, steps))
    model.train()
    losses = []
    for step in range(1, steps + 1):
        patches = sampler(data)
        x = torch.stack([p["image"] for p in patches])
        y = torch.stack([p["label"] for p in patches])
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(float(loss.detach()))
        if step % s.log_every == 0 or step == steps:
            logger.info(f"[{tag}] step {step}/{steps} loss {np.mean(losses[-s.log_every:]):.3f}")
    tail = losses[-min(10, len(losses)):] if losses else [float("nan")]
    return {"loss_first": losses[0] if losses else float("nan"), "loss_last": float(np.mean(tail))}


@torch.no_grad()
def evaluate(model: nn.Module, image: np.ndarray, label: np.ndarray, classes: Sequence[str], scored: Sequence[str],
             s: Settings) -> dict[str, Any]:
    """Sliding-window prediction of one ``(1, H, W, D)`` region and MONAI's Dice per class.

    Returns:
        ``{"mean_dice": mean over scored, "per_class": {name: Dice or None (absent)}}``.
    """
    model.eval()
    x = torch.from_numpy(image)[None]
    logits = sliding_window_inference(x, tuple(s.roi), sw_batch_size=4, predictor=model, overlap=s.overlap,
                                      mode="gaussian", padding_mode="replicate")
    n = len(classes) + 1
    pred = one_hot(logits.argmax(1, keepdim=True), n)
    gt = one_hot(torch.from_numpy(label)[None], n)
    dice = DiceMetric(include_background=False, reduction="none", ignore_empty=True)(pred, gt)[0]
    per_class = {c: (None if math.isnan(float(dice[i])) else float(dice[i])) for i, c in enumerate(classes)}
    values = [per_class[c] for c in scored]
    mean = float(np.mean([0.0 if v is None else v for v in values])) if values else float("nan")
    return {"mean_dice": mean, "per_class": per_class}


# ------------------------------------------------------------------------------------------------ runs
_CONTEXT: dict[str, Any] = {}


def _init_worker(context: dict[str, Any], log_level: int) -> None:
    torch.set_num_threads(1)
    logging.basicConfig(level=log_level, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    _CONTEXT.clear()
    _CONTEXT.update(context)


def run_one(method: str, options: dict[str, Any], lr: float, seed: int) -> dict[str, Any]:
    """Fine-tune the pretrained network with ``method`` (variant ``options``) at ``lr`` and seed ``seed``; score both
    held-out slabs."""
    data: TaskData = _CONTEXT["data"]
    s: Settings = _CONTEXT["settings"]
    set_determinism(seed)
    model = build_model(method, _CONTEXT["state"], len(data.classes) + 1, s.filters, options)
    report = parameter_report(model)
    tag = f"{method}{_label(options)} lr={lr:g} seed={seed}"
    t0 = time.perf_counter()
    fit = train(model, data.mr["train"]["image"], data.mr["train"]["label"], s.steps, lr, seed, s, tag)
    t1 = time.perf_counter()
    scores = {slab: evaluate(model, data.mr[slab]["image"], data.mr[slab]["label"], data.classes, data.scored[slab], s)
              for slab in ("val", "test")}
    t2 = time.perf_counter()
    return {"method": method, "options": dict(options), "lr": lr, "seed": seed, "trainable": report.trainable, "total": report.total,
            "trainable_percent": report.percent, "val_dice": scores["val"]["mean_dice"],
            "test_dice": scores["test"]["mean_dice"], "val_per_class": scores["val"]["per_class"],
            "test_per_class": scores["test"]["per_class"], "train_s": t1 - t0, "eval_s": t2 - t1, **fit}


def pretrain(data: TaskData, s: Settings, cache_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Train the network fully on the CT's organ labels (the "foundation model"); cached by settings."""
    key = json.dumps({"filters": s.filters, "roi": s.roi, "batch": s.batch, "steps": s.pretrain_steps,
                      "lr": s.pretrain_lr, "seed": s.seed, "classes": data.classes, "window": CT_WINDOW,
                      "pixdim": PIXDIM, "augment": s.augment}, sort_keys=True)
    path = cache_dir / f"pretrained-{hashlib.sha1(key.encode()).hexdigest()[:12]}.pt"
    set_determinism(s.seed)
    net = residual_unet(len(data.classes) + 1, s.filters)
    info: dict[str, Any] = {"steps": s.pretrain_steps, "lr": s.pretrain_lr, "cache": str(path)}
    if path.is_file():
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        logger.info(f"pretrained CT network from the cache {path}")
        info["from_cache"] = True
    else:
        logger.info(f"pretraining on the CT's {len(data.classes)} organs for {s.pretrain_steps} steps")
        t0 = time.perf_counter()
        info.update(train(net, data.ct_image, data.ct_label, s.pretrain_steps, s.pretrain_lr, s.seed, s, "pretrain CT"))
        info["train_s"] = time.perf_counter() - t0
        atomic_torch_save(net.state_dict(), path)
        info["from_cache"] = False
    state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    return state, info


def aggregate(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One grid point per ``(method, options, lr)``: Dice, per-class Dice, loss and seconds averaged over its seeds."""
    points: dict[tuple[str, str, float], list[dict[str, Any]]] = {}
    for r in runs:
        points.setdefault((r["method"], json.dumps(r["options"], sort_keys=True), r["lr"]), []).append(r)
    grid = []
    for (method, _, lr), rs in sorted(points.items(), key=lambda kv: (list(METHODS).index(kv[0][0]), kv[0][1:])):
        rs = sorted(rs, key=lambda r: r["seed"])
        point = {k: rs[0][k] for k in ("method", "options", "lr", "trainable", "total", "trainable_percent")}
        for key in ("val_dice", "test_dice", "train_s", "eval_s", "loss_first", "loss_last"):
            point[key] = float(np.mean([r[key] for r in rs]))
        for key in ("val_per_class", "test_per_class"):
            point[key] = {c: (None if any(r[key][c] is None for r in rs) else float(np.mean([r[key][c] for r in rs])))
                          for c in rs[0][key]}
        point["seeds"] = [r["seed"] for r in rs]
        point["val_dice_per_seed"] = [r["val_dice"] for r in rs]
        point["test_dice_per_seed"] = [r["test_dice"] for r in rs]
        grid.append(point)
    return grid


def choose(grid: Sequence[dict[str, Any]], on: str = "val") -> dict[str, Any]:
    """The grid point with the best mean Dice on slab ``on`` (``"val"``, ``"test"`` or ``"both"``: their mean).

    The smaller learning rate wins a tie (then the grid's first variant).
    """
    def score(r: dict[str, Any]) -> float:
        return 0.5 * (r["val_dice"] + r["test_dice"]) if on == "both" else r[f"{on}_dice"]

    return max(sorted(grid, key=lambda r: r["lr"]), key=lambda r: (score(r), -r["lr"]))


def _label(options: dict[str, Any]) -> str:
    return "".join(f" {k}={v}" for k, v in sorted(options.items()))


# ----------------------------------------------------------------------------------------------- output
def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """One line per method: trainable parameters, both folds (chosen LR, held-out Dice), their mean, seconds per run.

    Fold A chooses the learning rate on the validation slab and scores the test slab; fold B the reverse.
    """
    head = (f"{'method':<13}{'trainable':>11}{'%':>8}{'LR A':>8}{'test A':>8}{'LR B':>8}{'val B':>8}"
            f"{'held-out':>10}{'default':>9}{'s/run':>7}")
    lines = [head, "-" * len(head)]

    def lr(v: float | None) -> str:
        return "-" if v is None else f"{v:g}"

    for r in rows:
        wall = "-" if r.get("run_s") is None else f"{r['run_s']:.0f}"
        lines.append(f"{r['method']:<13}{r['trainable']:>11,}{r['trainable_percent']:>7.2f}%{lr(r['lr']):>8}"
                     f"{r['test_dice']:>8.3f}{lr(r['lr_b']):>8}{r['val_dice_b']:>8.3f}{r['heldout_dice']:>10.3f}"
                     f"{lr(r['default_lr']):>9}{wall:>7}")
    for r in rows:
        if r.get("options"):
            lines.append(f"{r['method']}: fold A{_label(r['options'])}, fold B{_label(r['options_b'])}, "
                         f"default{_label(r['default_options'])}")
    return "\n".join(lines)


def format_markdown(result: dict[str, Any]) -> str:
    """The docs' table (``docs/core.md``, "Learning rates"): each grid point's "val / test" Dice, fold A's and fold
    B's choice in bold and italics, the held-out Dice and the default rate."""
    lrs = sorted({g["lr"] for g in result["grid"]})
    lines = ["| method | options | trainable | " + " | ".join(f"{lr:g}" for lr in lrs) + " | held-out Dice | default |",
             "|---|---|---|" + "---|" * len(lrs) + "---|---|"]
    for row in result["rows"]:
        if row["method"] == "pretrained":
            continue
        for options in result["settings"]["variants"][row["method"]]:
            points = {g["lr"]: g for g in result["grid"] if g["method"] == row["method"] and g["options"] == options}
            cells = []
            for lr in lrs:
                g = points.get(lr)
                a = lr == row["lr"] and options == row["options"]
                b = lr == row["lr_b"] and options == row["options_b"]
                val = "" if g is None else (f"**{g['val_dice']:.3f}**" if a else f"{g['val_dice']:.3f}")
                test = "" if g is None else (f"*{g['test_dice']:.3f}*" if b else f"{g['test_dice']:.3f}")
                cells.append("" if g is None else f"{val} / {test}")
            percent = next(iter(points.values()))["trainable_percent"]
            default = f"**{row['default_lr']:g}**" if options == row["default_options"] else ""
            lines.append(f"| {row['method']} | {_label(options).strip()} | {percent:.2f}% | " + " | ".join(cells)
                         + f" | {row['heldout_dice']:.3f} | {default} |")
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> Path:
    """Left: validation and test Dice over each method's LR grid; right: test Dice of the chosen LR per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 5.6), dpi=110)
    colours = dict(zip(METHODS, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for method in result["settings"]["methods"]:
        for i, options in enumerate(result["settings"]["variants"][method]):
            pts = sorted((g for g in result["grid"] if g["method"] == method and g["options"] == options),
                         key=lambda g: g["lr"])
            lrs = [g["lr"] for g in pts]
            marker, style = ("o", "s", "^", "D")[i % 4], ("-", ":", "-.", (0, (5, 1)))[i % 4]
            ax.plot(lrs, [g["val_dice"] for g in pts], marker=marker, linestyle=style, color=colours[method],
                    label=f"{method}{_label(options)} (val)")
            ax.plot(lrs, [g["test_dice"] for g in pts], "x--", color=colours[method], alpha=0.6)
        best = choose([g for g in result["grid"] if g["method"] == method], "val")
        ax.plot([best["lr"]], [best["val_dice"]], "*", color=colours[method], markersize=14)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (AdamW, cosine)")
    ax.set_ylabel("mean Dice (o val, x test, * chosen)")
    ax.set_ylim(0, 1)
    ax.set_title("learning-rate grids")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2)
    rows = [r for r in result["rows"] if r["method"] in METHODS]
    names = [r["method"] for r in rows]
    bars = bx.bar(names, [r["heldout_dice"] for r in rows], color=[colours[n] for n in names])
    for bar, r in zip(bars, rows):
        bx.annotate(f"{r['trainable_percent']:.3g}%\nlr {r['default_lr']:g}",
                    (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=8)
    zero = next((r for r in result["rows"] if r["method"] == "pretrained"), None)
    if zero is not None:
        bx.axhline(zero["heldout_dice"], color="grey", ls=":", label="CT model, no MR training")
    full = next((r for r in rows if r["method"] == "full"), None)
    if full is not None:
        bx.axhline(full["heldout_dice"] - 0.05, color="k", ls="--", lw=0.8, label="full - 0.05")
        bx.axhline(full["heldout_dice"] - 0.15, color="k", ls="-.", lw=0.8, label="full - 0.15")
    bx.set_ylim(0, 1)
    bx.set_ylabel("held-out mean Dice (both folds)")
    bx.set_title("held-out Dice, trainable % and default LR")
    bx.legend(fontsize=8, loc="upper right")
    fig.suptitle("CT-pretrained DynUNet adapted to real MR (thesis 5.2.3.2 in miniature)")
    fig.tight_layout()
    try:
        atomic_save_figure(fig, path, format="png")
    finally:
        plt.close(fig)
    return path


def targets(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Issue 10's targets: ConvAdapter and LoRA within 0.05 held-out Dice of full at <= 5% trainable; SSF within 0.15.

    The held-out Dice is the mean of both folds (:func:`summary_rows`); ``gap_fold_a`` is the gap on the test slab
    alone with the learning rate chosen on the validation slab.
    """
    by = {r["method"]: r for r in rows}
    if "full" not in by:
        return {}
    out = {}
    for method, tol, budget in (("convadapter", 0.05, 5.0), ("lora", 0.05, 5.0), ("ssf", 0.15, None)):
        if method in by:
            gap = by["full"]["heldout_dice"] - by[method]["heldout_dice"]
            percent = max(by[method]["trainable_percent"], by[method]["trainable_percent_b"])  # both folds' variants
            ok = gap <= tol and (budget is None or percent <= budget)
            out[method] = {"gap_to_full": gap, "gap_fold_a": by["full"]["test_dice"] - by[method]["test_dice"],
                           "tolerance": tol, "trainable_percent": percent,
                           "max_trainable_percent": budget, "met": bool(ok)}
    return out


# ------------------------------------------------------------------------------------------------- main
def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    d = Settings()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help=f"output folder (default {RESULTS_DIR})")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny network, 2 steps, 2 LRs per method")
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                   help="processes for the runs, one thread each (default min(2, CPUs)); results do not depend on it")
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    p.add_argument("--steps", type=int, default=None, help=f"fine-tuning steps per run (default {d.steps})")
    p.add_argument("--pretrain-steps", type=int, default=None, help=f"CT pretraining steps ({d.pretrain_steps})")
    p.add_argument("--seed", type=int, default=0, help="pretraining seed and first fine-tuning seed (default 0)")
    p.add_argument("--seeds", type=int, default=None, help=f"fine-tuning seeds per grid point (default {d.seeds})")
    args = p.parse_args(argv)
    if args.workers < 1:
        p.error(f"--workers must be >= 1, got {args.workers}")
    for name in ("steps", "pretrain_steps", "seeds"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def _settings(args: argparse.Namespace) -> Settings:
    s = Settings(seed=args.seed, methods=tuple(args.methods))
    if args.quick:
        s = replace(s, **QUICK)
    overrides = {k: getattr(args, k) for k in ("steps", "pretrain_steps", "seeds") if getattr(args, k) is not None}
    return replace(s, **overrides)


def run_key(s: Settings, pretrained: str, method: str, options: dict[str, Any], lr: float, seed: int) -> str:
    """Cache key of one run: everything that shapes its result (settings, the method's spec, rate, seed, base net)."""
    spec = METHODS[method]
    fields = asdict(s)
    for name in ("methods", "log_every", "grid_points", "seeds"):  # choose which runs happen, not what they give
        fields.pop(name)
    key = {"settings": fields, "pretrained": pretrained, "method": method, "options": options, "lr": lr, "seed": seed,
           "adapt": {k: repr(v) for k, v in (spec.adapt_kwargs or {}).items()} if spec.adapt_kwargs is not None else None,
           "conv_types": [t.__name__ for t in spec.conv_types or ()], "slabs": MR_SLABS, "pixdim": PIXDIM,
           "min_ml": MIN_ML}
    return hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_grid(context: dict[str, Any], jobs: Sequence[tuple[str, dict[str, Any], float, int]], workers: int,
             cache_dir: Path | None = None) -> list[dict[str, Any]]:
    """Every ``(method, options, lr, seed)`` run, in ``workers`` processes of one thread each (in this one for ``workers=1``).

    With ``cache_dir``, each finished run is written there (``runs/<key>.json``, :func:`run_key`) and a run found
    there is not repeated: an interrupted benchmark resumes, and a wider grid only runs its new points. The key
    covers the settings, not the code: delete the folder after changing how runs train or score.
    """
    runs: list[dict[str, Any]] = []
    s: Settings = context["settings"]
    pretrained = Path(context["pretrained"]).stem

    def cached(job: tuple[str, dict[str, Any], float, int]) -> Path | None:
        return None if cache_dir is None else cache_dir / "runs" / f"{run_key(s, pretrained, *job)}.json"

    def done(r: dict[str, Any], from_cache: bool = False) -> None:
        runs.append(r)
        path = cached((r["method"], r["options"], r["lr"], r["seed"]))
        if path is not None and not from_cache:
            atomic_write_json(path, r)
        logger.info(f"[{len(runs)}/{len(jobs)}] {r['method']}{_label(r['options'])} lr={r['lr']:g} seed={r['seed']}: "
                    f"val {r['val_dice']:.3f} test {r['test_dice']:.3f} ({r['trainable_percent']:.2f}% trainable, "
                    f"{r['train_s'] + r['eval_s']:.0f} s{', cached' if from_cache else ''})")

    todo = []
    for job in jobs:
        path = cached(job)
        if path is not None and path.is_file():
            done(json.loads(path.read_text()), from_cache=True)
        else:
            todo.append(job)
    if workers == 1 or len(todo) <= 1:
        _init_worker(context, logging.INFO)
        for job in todo:
            done(run_one(*job))
        return runs
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_init_worker,
                             initargs=(context, logging.INFO)) as pool:
        for fut in as_completed([pool.submit(run_one, *job) for job in todo]):
            done(fut.result())
    return runs


def summary_rows(grid: Sequence[dict[str, Any]], zero_shot: dict[str, Any], methods: Sequence[str]) -> list[dict]:
    """The table: the CT network without MR training, then each method scored in two folds.

    Fold A chooses the learning rate on the validation slab and scores the test slab (``lr``, ``val_dice``,
    ``test_dice``); fold B chooses it on the test slab and scores the validation slab (``lr_b``, ``val_dice_b``).
    ``heldout_dice`` is the mean of the two held-out scores: each comes from a slab that played no part in choosing
    its learning rate, and together they cover both slabs (twice the anatomy of one slab, so half the variance
    of a single region). ``default_lr`` maximises the mean Dice over both slabs: the rate a user should start from.
    """
    keys = ("method", "options", "trainable", "total", "trainable_percent", "lr", "val_dice", "test_dice")
    zero_val, zero_test = zero_shot["val"]["mean_dice"], zero_shot["test"]["mean_dice"]
    rows = [{"method": "pretrained", "options": {}, "trainable": 0, "total": grid[0]["total"] if grid else 0,
             "trainable_percent": 0.0, "lr": None, "val_dice": zero_val, "test_dice": zero_test, "lr_b": None,
             "val_dice_b": zero_val, "trainable_percent_b": 0.0, "heldout_dice": 0.5 * (zero_val + zero_test), "default_lr": None, "run_s": None}]
    for method in methods:
        points = [g for g in grid if g["method"] == method]
        fold_a, fold_b = choose(points, "val"), choose(points, "test")
        rows.append({k: fold_a[k] for k in keys} | {
            "lr_b": fold_b["lr"], "options_b": fold_b["options"], "val_dice_b": fold_b["val_dice"],
            "trainable_percent_b": fold_b["trainable_percent"],
            "heldout_dice": 0.5 * (fold_a["test_dice"] + fold_b["val_dice"]),
            "default_lr": choose(points, "both")["lr"], "default_options": choose(points, "both")["options"],
            "run_s": fold_a["train_s"] + fold_a["eval_s"]})
    return rows


def _machine(load_start: tuple[float, ...]) -> dict[str, Any]:
    import monai
    import peft

    return {"cpus": os.cpu_count(), "load_avg_start": load_start, "load_avg_end": os.getloadavg(),
            "platform": platform.platform(), "python": sys.version.split()[0], "torch": torch.__version__,
            "monai": monai.__version__, "peft": peft.__version__}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark (see the module docstring); returns what it writes to ``real_adaptation.json``."""
    args = _parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(1)
    s = _settings(args)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    load_start = os.getloadavg()
    t_start = time.perf_counter()
    logger.info(f"{os.cpu_count()} CPUs, load average {load_start[0]:.2f} (1 min); settings {asdict(s)}")

    data = prepare_data()
    logger.info(f"{len(data.classes)} shared organs; MR window {data.mr_window[0]:.0f}..{data.mr_window[1]:.0f}; "
                f"scored: val {data.scored['val']}, test {data.scored['test']}")
    state, pre_info = pretrain(data, s, out)
    zero = build_model("full", state, len(data.classes) + 1, s.filters)
    zero_shot = {slab: evaluate(zero, data.mr[slab]["image"], data.mr[slab]["label"], data.classes,
                                data.scored[slab], s) for slab in ("val", "test")}
    pre_info["ct_dice"] = evaluate(zero, data.ct_image, data.ct_label, data.classes, data.classes, s)["mean_dice"]
    logger.info(f"CT network on MR without MR training: val {zero_shot['val']['mean_dice']:.3f}, "
                f"test {zero_shot['test']['mean_dice']:.3f} (on its own CT: {pre_info['ct_dice']:.3f})")

    grids = {m: list(METHODS[m].lr_grid[: s.grid_points]) for m in s.methods}
    jobs = [(m, dict(v), lr, s.seed + i) for i in range(s.seeds) for m in s.methods for v in METHODS[m].variants
            for lr in grids[m]]
    t_grid = time.perf_counter()
    runs = run_grid({"data": data, "settings": s, "state": state, "pretrained": pre_info["cache"]}, jobs,
                    args.workers, out)
    grid_s = time.perf_counter() - t_grid
    grid = aggregate(runs)
    rows = summary_rows(grid, zero_shot, s.methods)
    result = {
        "settings": asdict(s) | {
            "workers": args.workers, "quick": args.quick, "min_ml": MIN_ML, "pixdim": PIXDIM, "mr_slabs": MR_SLABS,
            "ct_window": CT_WINDOW, "mr_percentiles": MR_PERCENTILES, "lr_grids": grids,
            "adapt": {m: {k: repr(v) for k, v in (METHODS[m].adapt_kwargs or {}).items()} for m in s.methods},
            "conv_types": {m: [t.__name__ for t in METHODS[m].conv_types or ()] for m in s.methods},
            "variants": {m: [dict(v) for v in METHODS[m].variants] for m in s.methods},
        },
        "data": {"classes": data.classes, "scored": data.scored, "voxels": data.voxels, "mr_window": data.mr_window},
        "pretrain": pre_info,
        "zero_shot": zero_shot,
        "grid": grid,
        "runs": runs,
        "rows": rows,
        "targets": targets(rows[1:]),
        "machine": _machine(load_start),
        "grid_seconds": grid_s,
        # one-thread seconds of every run, also those read from the cache: the grid's cost on a single core
        "run_seconds_total": float(sum(r["train_s"] + r["eval_s"] for r in runs)),
        "wall_seconds": time.perf_counter() - t_start,
    }
    atomic_write_json(out / "real_adaptation.json", result)
    plot(result, out / "real_adaptation.png")
    atomic_write_text(out / "real_adaptation.md", format_markdown(result))
    print(format_table(rows))
    load_end = result["machine"]["load_avg_end"]
    print(f"wall time {result['wall_seconds']:.0f} s (runs {grid_s:.0f} s on {args.workers} workers; all runs "
          f"{result['run_seconds_total']:.0f} single-thread s, cached ones included); load average "
          f"{load_start[0]:.2f} at start, {load_end[0]:.2f} at end; results in {out}")
    for method, t in result["targets"].items():
        budget = "" if t["max_trainable_percent"] is None else f", {t['trainable_percent']:.2f}% trainable (<= 5%)"
        print(f"target {method}: held-out Dice {t['gap_to_full']:+.3f} below full fine-tuning (<= {t['tolerance']};"
              f" fold A alone {t['gap_fold_a']:+.3f}){budget}: {'met' if t['met'] else 'MISSED'}")
    return result


if __name__ == "__main__":
    main()
