"""The echo paper's experiments as named presets: every row of Tables I-IV, the paper's figures beside it.

Echo seed (``000``) Tables I (view), II (volume), III (age) and IV (segmentation) vary the composition of the
adapter ("backbone of MiT-B0/B2", "full MiT-B0", "full MiT-B0 with FCN only", "fully train adapter head",
"fully train MiT-B0/B2"), the layers with LoRA weights, the rank, the learning rate (schedule) and, in the
notes, the batch size and head. :data:`ECHO_PRESETS` holds each row with the paper's test metric (with / without
poor-quality images), trainable and total parameters and training minutes. :func:`best_preset` is the default
configuration of a task: the paper's best LoRA row for the backbone's MiT variant (no-poor metric).

Compositions (our reading of the row labels, see docs/echo.md):

* ``backbone``: LoRA in the backbone (MiT encoder + decoder projections), task head trained;
* ``full_mit``: the whole pretrained Segformer (encoder, decoder projections and the decoder's fusion layer)
  with LoRA in the encoder and the decoder trained fully, task head on the fused features;
* ``head``: the frozen backbone without LoRA, task head trained ("fully train adapter head, no LoRA");
* ``full``: backbone and head trained fully ("fully train MiT-B0/B2").

Batch sizes follow the tables' defaults (Table I and IV: 32; Table II: 8; Table III, section III.C: "the same
... batch size ... as regression of ventricular volume", 8) and their notes. Epochs: view 200 (III.A), volume
and age 100 (III.B, III.C), segmentation 100 (III.D).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["COMPOSITIONS", "EchoPreset", "ECHO_PRESETS", "TABLE_OF_TASK", "METRIC_OF_TASK", "best_preset",
           "resolve_preset", "get_preset", "presets_markdown"]

COMPOSITIONS = ("backbone", "full_mit", "head", "full")
TABLE_OF_TASK = {"view": "I", "volume": "II", "age": "III", "segmentation": "IV"}
METRIC_OF_TASK = {"view": "accuracy", "volume": "mae", "age": "mae", "segmentation": "mean_dice"}
_EPOCHS = {"view": 200, "volume": 100, "age": 100, "segmentation": 100}
_LESS_IS_BETTER = {"mae"}
SMALL_HEAD_D = {"conv_channels": [8, 16, 32]}  # Table I note d: "only 8, 16 and 32 hidden dimensions"
FCN_ONLY = {"conv_channels": []}  # Table I "with FCN only": the fully connected part of the head alone


@dataclass(frozen=True)
class EchoPreset:
    """One row of the echo paper's Tables I-IV.

    Args:
        name: preset name, ``<task>-<variant>-<composition>[-<layers>-r<rank>]`` plus a suffix when rows differ
            only by learning rate or head.
        task: ``view``, ``volume``, ``age`` or ``segmentation``.
        experiment: the paper's row label.
        composition: one of :data:`COMPOSITIONS`.
        variant: ``"b0"`` or ``"b2"``.
        layers: ``"all"`` / ``"attention"`` LoRA layers, None without LoRA.
        rank: LoRA rank, None without LoRA.
        lr: learning rate; lr_min: cosine annealing end value (None: constant).
        batch_size / epochs: optimisation.
        head_kwargs: :class:`~monai_peft.echo.models.CNNHead` arguments (notes d and "FCN only").
        dropout: head dropout override (Table III note b), None keeps the task's.
        paper: the paper's figures: ``with_poor``, ``no_poor`` (test metric), ``trainable``, ``total``,
            ``minutes``.
        note: the table note that applies.
    """

    name: str
    task: str
    experiment: str
    composition: str
    variant: str
    layers: str | None
    rank: int | None
    lr: float
    lr_min: float | None
    batch_size: int
    epochs: int
    head_kwargs: dict = field(default_factory=dict)
    dropout: float | None = None
    paper: dict = field(default_factory=dict)
    note: str = ""

    def __post_init__(self) -> None:
        if self.composition not in COMPOSITIONS:
            raise ValueError(f"preset {self.name!r}: composition must be one of {COMPOSITIONS}, got {self.composition!r}.")
        if (self.layers is None) != (self.composition in ("head", "full")):
            raise ValueError(f"preset {self.name!r}: LoRA layers go with the backbone / full_mit compositions only.")

    @property
    def table(self) -> str:
        return TABLE_OF_TASK[self.task]

    @property
    def metric(self) -> str:
        return METRIC_OF_TASK[self.task]

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "table": self.table, "metric": self.metric}


def _row(task: str, experiment: str, layers: str | None, rank: int | None, lr: float, lr_min: float | None,
         with_poor: float, no_poor: float, trainable: int, total: int, minutes: float, batch_size: int | None = None,
         head_kwargs: dict | None = None, dropout: float | None = None, note: str = "", suffix: str = "") -> EchoPreset:
    exp = experiment.lower()
    variant = "b2" if "b2" in exp else "b0"
    if exp.startswith("backbone of"):
        comp = "backbone"
    elif exp.startswith("full mit"):
        comp = "full_mit"
    elif "adapter head" in exp:
        comp = "head"
    else:
        comp = "full"
    lora = f"-{'attn' if layers == 'attention' else layers}-r{rank}" if layers else ""
    name = f"{task}-{variant}-{comp.replace('_', '-')}{lora}{suffix}"
    default_bs = {"view": 32, "volume": 8, "age": 8, "segmentation": 32}[task]
    return EchoPreset(name, task, experiment, comp, variant, layers, rank, lr, lr_min, batch_size or default_bs,
                      _EPOCHS[task], head_kwargs or {}, dropout,
                      {"with_poor": with_poor, "no_poor": no_poor, "trainable": trainable, "total": total,
                       "minutes": minutes}, note)


_A, _S = "all", "attention"
_ROWS = [
    # Table I: view classification, accuracy (section III.A)
    _row("view", "backbone of MiT-B0", _A, 2, 1e-3, None, 0.97, 0.981, 35_362_308, 99_085_766, 126),
    _row("view", "backbone of MiT-B0", _A, 4, 1e-3, None, 0.965, 0.962, 36_124_774, 99_848_232, 123),
    _row("view", "backbone of MiT-B0", _S, 4, 1e-3, None, 0.95, 0.956, 35_826_594, 99_550_052, 75),
    _row("view", "full MiT-B0", _A, 4, 1e-3, None, 0.985, 0.988, 136_412_550, 300_681_058, 137,
         head_kwargs=SMALL_HEAD_D, note="d: less complex adapter head with only 8, 16 and 32 hidden dimensions"),
    _row("view", "full MiT-B0", _S, 4, 1e-3, None, 0.955, 0.956, 539_112_164, 1_106_121_192, 109),
    _row("view", "backbone of MiT-B2", _A, 4, 1e-3, None, 0.955, 0.962, 39_758_950, 265_848_840, 409.5,
         batch_size=16, note="b: batch size 16 instead of 32"),
    _row("view", "backbone of MiT-B2", _S, 4, 1e-3, None, 0.93, 0.956, 38_659_490, 264_749_380, 191.5,
         batch_size=16, note="b: batch size 16 instead of 32"),
    _row("view", "full MiT-B0 with FCN only", _A, 4, 1e-3, None, 0.97, 0.981, 1_531_084, 568_446_704, 129.5,
         head_kwargs=FCN_ONLY, suffix="-fcn"),
    _row("view", "full MiT-B0 with FCN only", _S, 4, 1e-3, None, 0.93, 0.944, 1_490_178, 568_405_798, 80,
         head_kwargs=FCN_ONLY, suffix="-fcn"),
    _row("view", "fully train adapter head", None, None, 1e-3, None, 0.895, 0.931, 537_621_698, 537_621_698, 60.5,
         batch_size=64, note="c: batch size 64 instead of 32"),
    # Table II: LV volume regression, MAE ml (section III.B)
    _row("volume", "backbone of MiT-B0", _A, 4, 1e-3, 1e-4, 32.88, 30.255, 71_122_789, 169_844_262, 99.5),
    _row("volume", "backbone of MiT-B0", _S, 2, 1e-3, None, 24.613, 22.304, 70_211_233, 168_932_706, 74.5),
    _row("volume", "backbone of MiT-B0", _S, 4, 1e-3, None, 23.98, 22.27, 70_824_609, 169_546_082, 71.5),
    _row("volume", "full MiT-B0", _A, 4, 1e-3, 1e-4, 29.963, 26.988, 1_077_467_565, 2_182_791_088, 155.5),
    _row("volume", "full MiT-B0", _S, 4, 1e-3, None, 25.701, 23.401, 1_077_426_659, 2_182_750_182, 127.5),
    _row("volume", "backbone of MiT-B2", _A, 4, 1e-3, None, 52.442, 52.35, 74_756_965, 335_844_870, 269),
    _row("volume", "backbone of MiT-B2", _S, 4, 1e-3, 1e-4, 23.458, 19.622, 73_657_505, 334_745_410, 184),
    _row("volume", "fully train adapter head", None, None, 1e-3, 1e-4, 29.208, 26.047, 1_075_936_193,
         1_075_936_193, 47, batch_size=64, note="b: batch size 64 instead of 8"),
    # Table III: age regression, MAE years (section III.C)
    _row("age", "backbone of MiT-B0", _A, 4, 1e-2, None, 39.098, 39.114, 71_122_789, 169_844_262, 98.5),
    _row("age", "backbone of MiT-B0", _S, 2, 1e-2, None, 15.332, 14.627, 70_211_233, 168_932_706, 73),
    _row("age", "backbone of MiT-B0", _S, 4, 1e-2, None, 15.27, 14.741, 70_824_609, 169_546_082, 73.5),
    _row("age", "full MiT-B0", _A, 4, 1e-2, None, 45.45, 45.532, 539_152_813, 1_106_161_584, 153.5, dropout=0.3,
         note="b: with dropout layers"),
    _row("age", "full MiT-B0", _S, 4, 1e-3, None, 15.385, 14.717, 1_077_426_659, 2_182_750_182, 127.5),
    _row("age", "backbone of MiT-B2", _S, 4, 1e-2, None, 16.233, 15.458, 73_657_505, 334_745_410, 183),
    _row("age", "backbone of MiT-B2", _A, 4, 1e-2, None, 23.649, 23.56, 74_756_965, 335_844_870, 266),
    _row("age", "fully train adapter head", None, None, 1e-3, None, 13.83, 13.484, 1_075_936_193, 1_075_936_193, 64),
    # Table IV: segmentation, Dice (section III.D)
    _row("segmentation", "backbone of MiT-B0", _A, 2, 1e-4, 1e-5, 0.89, 0.897, 1_025_892, 30_412_934, 81.5),
    _row("segmentation", "backbone of MiT-B0", _A, 4, 1e-4, 1e-5, 0.891, 0.896, 1_788_358, 31_175_400, 82.5),
    _row("segmentation", "backbone of MiT-B0", _S, 4, 1e-2, 1e-5, 0.876, 0.885, 1_490_178, 30_877_220, 79.5,
         batch_size=8, note="b: batch size 8 instead of 32"),
    _row("segmentation", "backbone of MiT-B2", _S, 4, 1e-2, 1e-5, 0.879, 0.885, 4_815_874, 197_062_148, 146.5,
         batch_size=16, note="c: batch size 16 instead of 32"),
    _row("segmentation", "backbone of MiT-B2", _A, 4, 1e-4, 1e-5, 0.891, 0.897, 5_915_334, 198_161_608, 233.5,
         batch_size=16, note="c: batch size 16 instead of 32"),
    _row("segmentation", "fully train MiT-B0", None, None, 1e-3, 1e-4, 0.883, 0.89, 29_387_042, 29_387_042, 70.5),
    _row("segmentation", "fully train MiT-B2", None, None, 1e-3, 1e-4, 0.881, 0.887, 192_246_274, 192_246_274, 200.5,
         batch_size=16, note="c: batch size 16 instead of 32"),
]

ECHO_PRESETS: dict[str, EchoPreset] = {p.name: p for p in _ROWS}
if len(ECHO_PRESETS) != len(_ROWS):  # two rows would share a name
    raise RuntimeError(f"echo presets: duplicate names among {[p.name for p in _ROWS]}.")


def get_preset(name: str) -> EchoPreset:
    """The preset ``name`` (see ``monai-peft echo presets``)."""
    if name not in ECHO_PRESETS:
        raise ValueError(f"preset: unknown name {name!r}; known: {sorted(ECHO_PRESETS)}.")
    return ECHO_PRESETS[name]


def best_preset(task: str, variant: str = "b0", compositions: Sequence[str] = ("backbone", "full_mit")) -> EchoPreset:
    """The paper's best LoRA configuration of ``task`` for the MiT ``variant`` (by the no-poor test metric;
    ties go to the smaller rank, then the earlier row).

    Args:
        task: ``view``, ``volume``, ``age`` or ``segmentation``.
        variant: ``"b0"`` or ``"b2"``. Default ``"b0"``.
        compositions: compositions to choose from. Default the LoRA ones (``backbone``, ``full_mit``); the
            multi-task bundle, whose adapters share one frozen backbone, passes ``["backbone"]``.
    """
    if task not in TABLE_OF_TASK:
        raise ValueError(f"task: expected one of {sorted(TABLE_OF_TASK)}, got {task!r}.")
    rows = [p for p in _ROWS if p.task == task and p.variant == variant and p.layers is not None
            and p.composition in compositions]
    if not rows:
        raise ValueError(f"no LoRA preset of task {task!r} for MiT variant {variant!r} and compositions "
                         f"{list(compositions)}; variants: b0, b2.")
    sign = 1.0 if METRIC_OF_TASK[task] in _LESS_IS_BETTER else -1.0
    return min(rows, key=lambda p: (sign * p.paper["no_poor"], p.rank or 0, _ROWS.index(p)))


def resolve_preset(task: str, name: str | None, variant: str = "b0",
                   compositions: Sequence[str] = COMPOSITIONS) -> EchoPreset:
    """``name``'s preset, or :func:`best_preset` among ``compositions`` when ``name`` is None or ``"best"``.

    Raises:
        ValueError: unknown name, a preset of another task or MiT variant, or a composition not in
            ``compositions``.
    """
    if name is None or name == "best":
        return best_preset(task, variant, [c for c in compositions if c in ("backbone", "full_mit")])
    preset = get_preset(name)
    if preset.task != task:
        raise ValueError(f"preset {name!r} is a {preset.task!r} configuration, not {task!r}.")
    if preset.variant != variant:
        raise ValueError(f"preset {name!r} is for a MiT-{preset.variant.upper()} backbone, the backbone is "
                         f"MiT-{variant.upper()}.")
    if preset.composition not in compositions:
        raise ValueError(f"preset {name!r} has composition {preset.composition!r}; expected one of {list(compositions)}.")
    return preset


def _fmt_lr(p: EchoPreset) -> str:
    return f"{p.lr:g}" if p.lr_min is None else f"{p.lr:g} to {p.lr_min:g}"


def presets_markdown(presets: list[EchoPreset] | None = None) -> str:
    """The presets as Markdown tables, one per paper table, the default (best) row of each variant marked *."""
    presets = list(ECHO_PRESETS.values()) if presets is None else presets
    out = []
    for task, table in TABLE_OF_TASK.items():
        rows = [p for p in presets if p.task == task]
        if not rows:
            continue
        best = {best_preset(task, v).name for v in ("b0", "b2")}
        metric = METRIC_OF_TASK[task]
        out += [f"**Table {table}: {task}** (test {metric}: paper, with / no poor images)", "",
                "| preset | experiment | LoRA layers | rank | lr | batch | paper with poor | paper no poor | "
                "paper trainable | paper total |",
                "|---|---|---|---|---|---|---|---|---|---|"]
        for p in rows:
            mark = " *" if p.name in best else ""
            out.append(f"| {p.name}{mark} | {p.experiment} | {p.layers or 'no LoRA'} | {p.rank or '-'} | {_fmt_lr(p)} | "
                       f"{p.batch_size} | {p.paper['with_poor']:g} | {p.paper['no_poor']:g} | "
                       f"{p.paper['trainable']:,} | {p.paper['total']:,} |")
        out.append("")
    out.append("\\* the default of `monai-peft echo train --task T`: the best LoRA row for the backbone's MiT variant.")
    return "\n".join(out)
