"""Run-time settings of the PEFT trainers: class defaults < plans field ``"monai_peft"`` < environment variables.

One place lists every setting (``SETTINGS``), its environment variable and its parser; ``docs/nnunet.md`` is
generated from the same facts by hand. The merged settings are written into the trainer's plans (field
``"monai_peft"``), so ``plans.json`` in the results folder records them and ``nnUNetv2_predict`` rebuilds the same
network whatever the environment is at prediction time.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any, Optional, Union

__all__ = [
    "PLANS_FIELD", "ENV_VARS", "PEFTSettings", "PLACEMENTS", "resolve_settings", "training_length",
    "final_validation_enabled", "random_backbone_allowed", "speed_options",
]

PLANS_FIELD = "monai_peft"

# setting -> environment variable (the three training-length variables are read by every plugin trainer)
ENV_VARS: dict[str, str] = {
    "epochs": "nnUNet_peft_epochs",
    "iterations": "nnUNet_peft_iterations",
    "val_iterations": "nnUNet_peft_val_iterations",
    "rank": "nnUNet_peft_rank",
    "gamma": "nnUNet_peft_gamma",
    "placement": "nnUNet_peft_placement",
    "target": "nnUNet_peft_target",
    "lr": "nnUNet_peft_lr",
    "final_validation": "nnUNet_peft_final_validation",
    "allow_random_backbone": "nnUNet_peft_allow_random_backbone",
    "lora_fused": "nnUNet_peft_lora_fused",
    "activation_checkpointing": "nnUNet_peft_activation_checkpointing",
}

# thesis 3.2.2 / 5.1.2: ConvAdapter location (conv | residual block) x insertion (parallel | sequential)
PLACEMENTS = ("conv-parallel", "conv-sequential", "residual-parallel", "residual-sequential")


@dataclass
class PEFTSettings:
    """Architecture-relevant settings of a PEFT trainer (stored in the plans; training length is not).

    Args:
        rank: LoRA rank ``r`` (int) or ``"dynamic"`` (out_channels / 2 per layer, thesis 5.1.1). Default 8.
        gamma: ConvAdapter channel compression factor (thesis 3.2.2). Default 4.
        placement: ConvAdapter scheme, one of ``PLACEMENTS``. Default ``"conv-parallel"`` (best in Chen et al.,
            thesis 3.2.2).
        target: regions the adapters go into, a subset of ``("encoder", "decoder")``. Default both.
        lr: initial learning rate of AdamW. Default ``None``: the method's rate from
            :func:`monai_peft.defaults.default_learning_rate` (adapters take larger steps than full fine-tuning;
            the thesis's 1e-4, 4.2.3, is one ``nnUNet_peft_lr=1e-4`` away). The trainers fill it in.
    """

    rank: Union[int, str] = 8
    gamma: int = 4
    placement: str = "conv-parallel"
    target: tuple[str, ...] = ("encoder", "decoder")
    lr: Optional[float] = None

    def __post_init__(self) -> None:
        if isinstance(self.rank, str) and self.rank != "dynamic":
            try:
                self.rank = int(self.rank)
            except ValueError:
                raise ValueError(f"rank must be a positive integer or 'dynamic', got {self.rank!r}.") from None
        if not isinstance(self.rank, str) and int(self.rank) < 1:
            raise ValueError(f"rank must be a positive integer or 'dynamic', got {self.rank!r}.")
        if int(self.gamma) < 1:
            raise ValueError(f"gamma must be a positive integer, got {self.gamma!r}.")
        self.gamma = int(self.gamma)
        if self.placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {PLACEMENTS}, got {self.placement!r}.")
        if isinstance(self.target, str):
            self.target = tuple(t.strip() for t in self.target.split(",") if t.strip())
        self.target = tuple(self.target)
        bad = [t for t in self.target if t not in ("encoder", "decoder")]
        if not self.target or bad:
            raise ValueError(f"target must be a non-empty subset of ('encoder', 'decoder'), got {self.target!r}.")
        if self.lr is not None:
            if float(self.lr) <= 0:
                raise ValueError(f"lr must be positive, got {self.lr!r}.")
            self.lr = float(self.lr)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["target"] = list(self.target)
        return d


def _from_env(name: str, environ: Mapping[str, str]) -> Optional[str]:
    value = environ.get(ENV_VARS[name])
    return value if value not in (None, "") else None


def resolve_settings(
    defaults: Mapping[str, Any],
    plans: Optional[Mapping[str, Any]] = None,
    environ: Optional[Mapping[str, str]] = None,
    use_env: bool = True,
) -> PEFTSettings:
    """Merge class defaults, the plans field and (optionally) environment variables.

    Args:
        defaults: the trainer class's ``peft_defaults`` (keys of :class:`PEFTSettings`).
        plans: an nnU-Net plans dict; its ``"monai_peft"`` field (if any) overrides ``defaults``.
        environ: environment to read (default ``os.environ``); ``nnUNet_peft_*`` override the plans.
        use_env: ``False`` at prediction time, where the stored plans are authoritative.

    Raises:
        ValueError: an unknown key in the plans field, or an invalid value; the message names the source.
    """
    environ = os.environ if environ is None else environ
    known = {f.name for f in fields(PEFTSettings)}
    merged: dict[str, Any] = {k: v for k, v in defaults.items() if k in known}
    stored = dict((plans or {}).get(PLANS_FIELD, {}) or {})
    unknown = sorted(set(stored) - known - {"method", "trainer"})
    if unknown:
        raise ValueError(f"plans field {PLANS_FIELD!r}: unknown keys {unknown}; known: {sorted(known)}.")
    merged.update({k: v for k, v in stored.items() if k in known})
    if use_env:
        for name in known:
            value = _from_env(name, environ)
            if value is not None:
                merged[name] = value
    try:
        return PEFTSettings(**merged)
    except ValueError as e:
        sources = [ENV_VARS[k] for k in known if use_env and _from_env(k, environ) is not None]
        raise ValueError(f"invalid monai-peft nnU-Net setting ({', '.join(sources) or PLANS_FIELD!r}): {e}") from e


def training_length(environ: Optional[Mapping[str, str]] = None) -> dict[str, int]:
    """``nnUNet_peft_epochs`` / ``_iterations`` / ``_val_iterations`` as ``{"num_epochs": ..., ...}`` (only those set).

    Raises:
        ValueError: a value that is not a positive integer (``val_iterations`` may be 0); names the variable.
    """
    environ = os.environ if environ is None else environ
    out: dict[str, int] = {}
    for name, attr, minimum in (
        ("epochs", "num_epochs", 1),
        ("iterations", "num_iterations_per_epoch", 1),
        ("val_iterations", "num_val_iterations_per_epoch", 1),
    ):
        raw = _from_env(name, environ)
        if raw is None:
            continue
        try:
            value = int(raw)
        except ValueError:
            raise ValueError(f"{ENV_VARS[name]} must be an integer, got {raw!r}.") from None
        if value < minimum:
            raise ValueError(f"{ENV_VARS[name]} must be >= {minimum}, got {value}.")
        out[attr] = value
    return out


def _flag(name: str, default: bool, environ: Optional[Mapping[str, str]]) -> bool:
    environ = os.environ if environ is None else environ
    raw = _from_env(name, environ)
    if raw is None:
        return default
    if raw.lower() in ("1", "true", "yes", "t"):
        return True
    if raw.lower() in ("0", "false", "no", "f"):
        return False
    raise ValueError(f"{ENV_VARS[name]} must be 0 or 1, got {raw!r}.")


def final_validation_enabled(environ: Optional[Mapping[str, str]] = None) -> bool:
    """``nnUNet_peft_final_validation`` (default ``1``): ``0`` skips the validation nnU-Net runs right after
    training (for smoke runs; ``nnUNetv2_train ... --val`` still validates later).

    Raises:
        ValueError: a value other than 0/1/true/false/yes/no (names the variable).
    """
    return _flag("final_validation", True, environ)


def random_backbone_allowed(environ: Optional[Mapping[str, str]] = None) -> bool:
    """``nnUNet_peft_allow_random_backbone`` (default ``0``): ``1`` lets a PEFT trainer start without
    ``-pretrained_weights``, i.e. train adapters on a frozen *random* backbone (smoke tests, ablations). Without it
    such a run stops before the first epoch.

    Raises:
        ValueError: a value other than 0/1/true/false/yes/no (names the variable).
    """
    return _flag("allow_random_backbone", False, environ)


def speed_options(method: str, environ: Optional[Mapping[str, str]] = None) -> dict[str, Any]:
    """``monai_peft.adapt`` options that change speed and memory, never the network (so not stored in the plans).

    - ``nnUNet_peft_lora_fused``: LoRA's conv path, ``auto`` (default: one merged conv per layer with the faster
      backward), ``merged``, ``factored`` or ``off`` (peft's layers);
    - ``nnUNet_peft_activation_checkpointing``: ``off`` (default), ``full-resolution`` (or ``1``) or ``all``:
      blocks recompute their activations in backward (:mod:`monai_peft.memory`).

    Raises:
        ValueError: another value (names the variable and the accepted values).
    """
    from monai_peft.lora.fused import FUSED_MODES
    from monai_peft.memory import ACTIVATION_CHECKPOINTING

    environ = os.environ if environ is None else environ
    out: dict[str, Any] = {}
    fused = (_from_env("lora_fused", environ) or "auto").lower()
    if fused not in (*FUSED_MODES, "off"):
        raise ValueError(f"{ENV_VARS['lora_fused']} must be one of {(*FUSED_MODES, 'off')}, got {fused!r}.")
    if method == "lora":
        out["fused"] = False if fused == "off" else fused
    checkpointing = (_from_env("activation_checkpointing", environ) or "off").lower()
    checkpointing = {"0": "off", "false": "off", "1": "full-resolution", "true": "full-resolution"}.get(
        checkpointing, checkpointing)
    if checkpointing not in ("off", *ACTIVATION_CHECKPOINTING):
        raise ValueError(f"{ENV_VARS['activation_checkpointing']} must be 0, 1, off or one of "
                         f"{ACTIVATION_CHECKPOINTING}, got {checkpointing!r}.")
    if checkpointing != "off":
        out["activation_checkpointing"] = checkpointing
    return out
