"""The thesis experiment grid by name: every configuration of Tables 5.1-5.4 and the SSF appendix (thesis 5.1).

Each :class:`Preset` names a SuPreM backbone, a method of :func:`monai_peft.adapt`, its options, where the
adapters go and what trains fully, with the thesis's parameter figure next to it. :func:`build_preset` turns a
name into a ready ``PeftModel``; ``monai-peft presets`` prints the grid with our counts beside the thesis's.

Choices made where the thesis is silent (see docs/suprem_and_data.md for the numbers):

- every PEFT preset trains the rebuilt output head fully (it is new for the target classes);
- ConvAdapter is the paper's adapter as thesis 3.2.2 describes it (depth-wise ``k x k`` down-projection, point-wise
  up-projection; :class:`~monai_peft.ConvAdapterConfig`) with ``gamma=4``, the thesis being silent on ``gamma``. It
  has 7-15x fewer parameters than the thesis reports; the thesis's figures fit a dense down-projection instead
  (``build_preset(name, ..., adapter_conv="dense")``; docs/suprem_and_data.md compares both);
- the 1-channel input convs (SegResNet ``convInit``, UNet ``down_tr64.ops.0.conv1``) hold a real adapter where
  the thesis places one (bottleneck width 1);
- SSF goes after the convolutions (thesis 5.1.3 "in sequence with the convolutional operations").
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from monai.networks.blocks.segresnet_block import ResBlock
from torch import nn

from monai_peft.networks import suprem_backbone
from monai_peft.targeting import SPATIAL_CONV, ModuleType, NameRegex, Region, Selector

__all__ = ["Preset", "PRESETS", "TARGETS", "get_preset", "build_preset", "preset_names", "preset_table"]


def _encdec() -> Selector:
    return Region("encoder") | Region("decoder")


def _scope(region: str | None) -> Selector:
    return Region(region) if region else _encdec()


def _t_resblocks(region: str | None) -> Selector:
    return ModuleType(ResBlock) & _scope(region)


def _t_resblock_conv2() -> Selector:
    return ModuleType(nn.Conv3d) & NameRegex(r".*\.conv2\.conv") & _encdec()


def _t_luconvs(region: str | None) -> Selector:
    return ModuleType(nn.Conv3d) & NameRegex(r"(down|up)_tr\d+\.ops\.\d\.conv1") & _scope(region)


def _t_spatial(region: str | None) -> Selector:
    return SPATIAL_CONV & _scope(region)


def _t_convs(region: str | None) -> Selector:
    return ModuleType(nn.Conv3d, nn.ConvTranspose3d) & _scope(region)


# target key -> (description, selector factory); keys are what presets and the CLI show
TARGETS: dict[str, tuple[str, Callable[[], Selector]]] = {
    "resblocks": ("every ResBlock in encoder + decoder", lambda: _t_resblocks(None)),
    "resblocks-encoder": ("every ResBlock in the encoder", lambda: _t_resblocks("encoder")),
    "resblock-conv2": ("the second conv of every ResBlock, encoder + decoder", _t_resblock_conv2),
    "convinit+resblocks": ("SegResNet's first conv and every ResBlock in encoder + decoder",
                           lambda: NameRegex(r"convInit\.conv") | _t_resblocks(None)),
    "luconvs": ("both LUConv convs of every down and up transition (the 1-channel input conv included)",
                lambda: _t_luconvs(None)),
    "luconvs-encoder": ("both LUConv convs of every down transition (the 1-channel input conv included)",
                        lambda: _t_luconvs("encoder")),
    "spatial-convs": ("every k>1 conv in encoder + decoder", lambda: _t_spatial(None)),
    "spatial-convs-encoder": ("every k>1 conv in the encoder", lambda: _t_spatial("encoder")),
    "spatial-convs-decoder": ("every k>1 conv in the decoder", lambda: _t_spatial("decoder")),
    "convs": ("every conv in encoder + decoder", lambda: _t_convs(None)),
    "convs-encoder": ("every conv in the encoder", lambda: _t_convs("encoder")),
    "convinit": ("SegResNet's first conv", lambda: NameRegex(r"convInit")),
    "unet-input-conv": ("UNet3D's first conv", lambda: NameRegex(r"down_tr64\.ops\.0\.conv1")),
}
_REGIONS = ("encoder", "decoder", "head")


@dataclass(frozen=True)
class Preset:
    """One named configuration of the thesis grid.

    Attributes:
        name: unique name, ``<backbone>-<method>-<placement>[-<option>]``.
        backbone: ``"segresnet"`` or ``"unet"`` (SuPreM's 3D UNet, ``unet3d-...`` names).
        method: a method of :func:`monai_peft.adapt`.
        method_kwargs: its options (``gamma``, ``adapter_conv``, ``r``, ``init_pca``, ...).
        target: a key of :data:`TARGETS`, or ``None`` for the method's default targets.
        train_fully: region names (``encoder``/``decoder``/``head``) or :data:`TARGETS` keys that train fully.
        table: thesis table (``"5.1"`` .. ``"5.4"``, ``"A"`` for the SSF appendix).
        placement: the thesis's words for the configuration.
        thesis_params_m: trainable parameters reported by the thesis, in millions (``None``: not reported).
        thesis_percent: the same as a percentage of the backbone.
        note: how this preset departs from the thesis, if it does.
    """

    name: str
    backbone: str
    method: str
    method_kwargs: Mapping[str, Any] = field(default_factory=dict)
    target: str | None = None
    train_fully: tuple[str, ...] = ("head",)
    table: str = ""
    placement: str = ""
    thesis_params_m: float | None = None
    thesis_percent: float | None = None
    note: str = ""

    def __post_init__(self) -> None:
        # read-only options: presets share option dicts and must not be changed through one of them
        object.__setattr__(self, "method_kwargs", MappingProxyType(dict(self.method_kwargs)))
        object.__setattr__(self, "train_fully", tuple(self.train_fully))

    def describe_target(self) -> str:
        """Human description of the adapted modules."""
        return TARGETS[self.target][0] if self.target else f"default {self.method} targets"

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "backbone": self.backbone, "method": self.method,
            "method_kwargs": dict(self.method_kwargs), "target": self.target, "target_description": self.describe_target(),
            "train_fully": list(self.train_fully), "table": self.table, "placement": self.placement,
            "thesis_params_m": self.thesis_params_m, "thesis_percent": self.thesis_percent, "note": self.note,
        }  # fmt: skip


# the paper's adapter (depth-wise down-projection); thesis 3.2.2 gives no gamma: the ConvAdapterConfig default
_CA = {"gamma": 4, "adapter_conv": "depthwise", "insertion": "parallel"}
_CA_NOTE = ("paper's depth-wise adapter: fewer parameters than the thesis reports, whose figure fits a dense "
            "down-projection (adapter_conv='dense'); see docs/suprem_and_data.md")
_CONVINIT_NOTE = ("the adapter on the 1-channel convInit has 76 parameters; the thesis's +0.05M over 'ResBlock "
                  "parallel' cannot come from an adapter on a 1-channel conv")

_GRID: list[Preset] = [
    # --- SegResNet (4.70M), thesis Tables 5.2 and 5.3 ---
    Preset("segresnet-full-finetune", "segresnet", "full", train_fully=(), table="5.2", placement="full fine-tuning",
           thesis_params_m=4.7, thesis_percent=100.0),
    Preset("segresnet-decoder-finetune", "segresnet", "decoder", train_fully=(), table="5.2",
           placement="decoder fine-tuning", thesis_params_m=0.3, thesis_percent=6.4),
    Preset("segresnet-lora-encoder+full-decoder-r16", "segresnet", "lora", {"r": 16}, "spatial-convs-encoder",
           ("decoder", "head"), "5.2", "LoRA encoder (+ full decoder), r=16, KU", 1.1, 23.4),
    Preset("segresnet-lora-encoder+full-decoder-r32", "segresnet", "lora", {"r": 32}, "spatial-convs-encoder",
           ("decoder", "head"), "5.2", "LoRA encoder (+ full decoder), r=32, KU", 1.6, 34.0),
    Preset("segresnet-lora-encoder+full-decoder-rdynamic", "segresnet", "lora", {"r": "dynamic"}, "spatial-convs-encoder",
           ("decoder", "head"), "5.2", "LoRA encoder (+ full decoder), r=out/2, KU", 2.4, 51.1),
    Preset("segresnet-convadapter-convinit+resblock-parallel", "segresnet", "convadapter", _CA,
           "convinit+resblocks", ("head",), "5.3", "ConvAdapter encoder + decoder, ConvInit + ResBlock parallel",
           0.75, 15.9, _CONVINIT_NOTE),
    Preset("segresnet-convadapter-resblock-parallel", "segresnet", "convadapter", _CA, "resblocks", ("head",),
           "5.3", "ConvAdapter encoder + decoder, ResBlock parallel (best SegResNet placement)", 0.7, 14.9, _CA_NOTE),
    Preset("segresnet-convadapter-resblock-conv2", "segresnet", "convadapter", _CA, "resblock-conv2", ("head",),
           "5.3", "ConvAdapter encoder + decoder, parallel to each ResBlock's conv2", 0.7, 14.9, _CA_NOTE),
    Preset("segresnet-convadapter-encoder+full-decoder", "segresnet", "convadapter", _CA, "resblocks-encoder",
           ("decoder", "head"), "5.3", "ConvAdapter encoder (+ full decoder), ResBlock parallel", 0.9, 19.2,
           _CA_NOTE),
    Preset("segresnet-convadapter-encoder-only", "segresnet", "convadapter", _CA, "resblocks-encoder", ("head",),
           "5.3", "ConvAdapter encoder (no full decoder), ResBlock parallel", 0.65, 13.8, _CA_NOTE),
    Preset("segresnet-ssf-encdec", "segresnet", "ssf", {}, "convs", ("head",), "A",
           "SSF after every conv, encoder + decoder"),
    Preset("segresnet-ssf-encoder+full-decoder", "segresnet", "ssf", {}, "convs-encoder", ("decoder", "head"), "A",
           "SSF after every encoder conv (+ full decoder)"),
    # --- UNet3D (19.08M), thesis Tables 5.1 and 5.4 ---
    Preset("unet3d-full-finetune", "unet", "full", train_fully=(), table="5.1", placement="full fine-tuning",
           thesis_params_m=19.0, thesis_percent=100.0),
    Preset("unet3d-decoder-finetune", "unet", "decoder", train_fully=(), table="5.1", placement="decoder fine-tuning",
           thesis_params_m=12.0, thesis_percent=63.2),
    Preset("unet3d-lora-encdec-r8", "unet", "lora", {"r": 8}, "spatial-convs", ("head",), "5.1",
           "LoRA encoder + decoder, r=8, KU", 0.6, 3.1),
    Preset("unet3d-lora-encdec-r16", "unet", "lora", {"r": 16}, "spatial-convs", ("head",), "5.1",
           "LoRA encoder + decoder, r=16, KU", 1.2, 6.3),
    Preset("unet3d-lora-encdec-r16-pca", "unet", "lora", {"r": 16, "init_pca": True}, "spatial-convs", ("head",), "5.1",
           "LoRA encoder + decoder, r=16, A from PCA of the pretrained filters", 1.2, 6.3),
    Preset("unet3d-lora-encdec-r64", "unet", "lora", {"r": 64}, "spatial-convs", ("head",), "5.1",
           "LoRA encoder + decoder, r=64, KU", 4.9, 25.3),
    Preset("unet3d-lora-encdec-rdynamic", "unet", "lora", {"r": "dynamic"}, "spatial-convs", ("head",), "5.1",
           "LoRA encoder + decoder, r=out/2, KU", 8.4, 44.2),
    Preset("unet3d-lora-encoder+full-decoder-r16", "unet", "lora", {"r": 16}, "spatial-convs-encoder",
           ("decoder", "head"), "5.1", "LoRA encoder (+ full decoder), r=16, KU", 12.8, 67.0),
    Preset("unet3d-lora-decoder+full-encoder-r16", "unet", "lora", {"r": 16}, "spatial-convs-decoder",
           ("encoder", "head"), "5.1", "LoRA decoder (+ full encoder), r=16, KU", 7.7, 40.5),
    Preset("unet3d-convadapter-luconv-parallel", "unet", "convadapter", _CA, "luconvs", ("head",), "5.4",
           "ConvAdapter encoder + decoder, parallel to both LUConv convs", 1.6, 8.4, _CA_NOTE),
    Preset("unet3d-convadapter-encoder+full-decoder", "unet", "convadapter", _CA, "luconvs-encoder",
           ("decoder", "head"), "5.4", "ConvAdapter encoder (+ full decoder), LUConv parallel", 12.5, 65.8, _CA_NOTE),
    Preset("unet3d-ssf-encdec", "unet", "ssf", {}, "convs", ("head",), "A", "SSF after every conv, encoder + decoder"),
    Preset("unet3d-ssf-encoder+full-decoder", "unet", "ssf", {}, "convs-encoder", ("decoder", "head"), "A",
           "SSF after every encoder conv (+ full decoder)"),
]  # fmt: skip

PRESETS: dict[str, Preset] = {p.name: p for p in _GRID}
if len(PRESETS) != len(_GRID):  # pragma: no cover - guards the table above
    raise RuntimeError("duplicate preset names in monai_peft.presets._GRID")


def preset_names(backbone: str | None = None) -> list[str]:
    """All preset names, optionally only those of one backbone (``"segresnet"`` / ``"unet"``)."""
    return [n for n, p in PRESETS.items() if backbone is None or p.backbone == backbone]


def get_preset(name: str) -> Preset:
    """The :class:`Preset` called ``name``.

    Raises:
        KeyError: unknown name; the message lists close and all names.
    """
    if name not in PRESETS:
        import difflib

        close = difflib.get_close_matches(name, PRESETS, n=3)
        raise KeyError(f"unknown preset {name!r}; did you mean {close}? Known presets: {sorted(PRESETS)}")
    return PRESETS[name]


def _selector(keys: tuple[str, ...]) -> Selector:
    parts = [Region(k) if k in _REGIONS else TARGETS[k][1]() for k in keys]
    sel = parts[0]
    for p in parts[1:]:
        sel = sel | p
    return sel


def _train_fully_names(model: nn.Module, keys: tuple[str, ...]) -> list[str]:
    """Outermost modules selected by ``keys``, with ``ModuleList``/``ModuleDict`` containers (SegResNet's
    ``up_layers``) replaced by their children: peft's ``modules_to_save`` cannot wrap containers."""
    from monai_peft.targeting import resolve_targets

    modules = dict(model.named_modules())
    out: list[str] = []
    todo = resolve_targets(model, _selector(keys), outermost=True)
    while todo:
        name = todo.pop(0)
        module = modules[name]
        if isinstance(module, (nn.ModuleList, nn.ModuleDict)):
            todo[:0] = [f"{name}.{child}" for child, m in module.named_children() if any(True for _ in m.parameters())]
        elif any(True for _ in module.parameters()):
            out.append(name)
    return out


def build_preset(
    name: str | Preset,
    out_channels: int,
    pretrained: str | Path | None = None,
    model: nn.Module | None = None,
    adapter_name: str = "default",
    **overrides: Any,
):
    """Build the SuPreM backbone of a preset and adapt it with :func:`monai_peft.adapt`.

    Args:
        name: a preset name (see :data:`PRESETS`, ``monai-peft presets``) or a :class:`Preset`.
        out_channels: classes of the new head (e.g. 18 = background + thesis organs_17).
        pretrained: SuPreM checkpoint path for the backbone (loaded with
            :func:`~monai_peft.checkpoints.load_suprem_checkpoint`); ``None`` keeps random weights.
        model: use this backbone instead of building one (must match the preset's backbone); ``pretrained`` is
            then ignored.
        adapter_name: peft adapter name.
        overrides: replace method options of the preset (e.g. ``gamma=8``, ``r=4``).

    Returns:
        ``peft.PeftModel`` with the backbone frozen and the preset's adapters / fully trained modules trainable.
    """
    from monai_peft import adapt

    preset = name if isinstance(name, Preset) else get_preset(name)
    if model is None:
        model = suprem_backbone(preset.backbone, out_channels, pretrained)
    kwargs = {**preset.method_kwargs, **overrides}
    target = TARGETS[preset.target][1]() if preset.target else None
    train_fully = _train_fully_names(model, preset.train_fully) if preset.train_fully else None
    return adapt(model, preset.method, target=target, train_fully=train_fully, adapter_name=adapter_name, **kwargs)


def preset_table(out_channels: int = 18, names: list[str] | None = None) -> list[dict[str, Any]]:
    """Trainable and total parameters of presets, next to the thesis's figures.

    Args:
        out_channels: head size used for the counts (default 18: background + organs_17).
        names: presets to count (default all).

    Returns:
        One dict per preset: ``name``, ``backbone``, ``method``, ``target``, ``trainable``, ``total``,
        ``percent``, ``thesis_params_m``, ``thesis_percent``, ``table``, ``note``.
    """
    from monai_peft import parameter_report

    rows = []
    for n in names or list(PRESETS):
        p = get_preset(n)
        # PCA init does not change counts; skip its SVDs here
        peft_model = build_preset(p, out_channels, init_pca=False) if p.method_kwargs.get("init_pca") else build_preset(p, out_channels)
        rep = parameter_report(peft_model)
        rows.append({
            "name": p.name, "backbone": p.backbone, "method": p.method, "target": p.describe_target(),
            "trainable": rep.trainable, "total": rep.total, "percent": round(rep.percent, 2),
            "thesis_params_m": p.thesis_params_m, "thesis_percent": p.thesis_percent, "table": p.table, "note": p.note,
        })  # fmt: skip
    return rows
