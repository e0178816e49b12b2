"""One frozen Segformer backbone, one LoRA adapter + task head per task (echo seed, Fig. 1).

Adapters are plain peft ``LoraConfig`` adapters named after their task; each task folder holds peft's
``adapter_config.json`` + ``adapter_model.safetensors`` and, alongside, ``head.safetensors`` (the task
head) and ``task.json`` (the :class:`~monai_peft.echo.tasks.TaskSpec`). Backbone folders hold
``backbone.safetensors`` + ``backbone.json`` (the ``SegformerConfig``) and, after pretraining, the pretext
head. Folders are written atomically (a temporary folder beside the target, swapped in with
:func:`monai_peft.io.atomic_replace_dir`).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn as nn

from monai.utils import optional_import

from monai_peft.io import atomic_replace_dir, atomic_write_json
from monai_peft.tuners.wrappers import adapter_kind

from .models import LORA_TARGETS, EchoBackbone, lora_target_modules
from .tasks import TaskSpec, get_task

peft, _has_peft = optional_import("peft")
transformers, _ = optional_import("transformers")
safetensors_torch, _ = optional_import("safetensors.torch")

__all__ = ["echo_lora_config", "save_backbone", "load_backbone", "load_pretrained_task_model", "MultiTaskEchoModel"]

logger = logging.getLogger(__name__)

BACKBONE_WEIGHTS = "backbone.safetensors"
BACKBONE_CONFIG = "backbone.json"
HEAD_WEIGHTS = "head.safetensors"
TASK_FILE = "task.json"


def echo_lora_config(layers: str = "attention", r: int = 4, alpha: float | None = None, dropout: float = 0.0,
                     **kwargs) -> peft.LoraConfig:
    """A peft ``LoraConfig`` for the echo backbone.

    Args:
        layers: ``"attention"`` (self-attention only) or ``"all"`` (echo seed, Tables I-IV). Default attention.
        r: LoRA rank; the seed found 1 too low and 8 too high, 2-4 best. Default 4.
        alpha: ``lora_alpha``. Default ``r`` (scaling 1).
        dropout: ``lora_dropout``. Default 0.
        kwargs: other ``LoraConfig`` fields.
    """
    if layers not in LORA_TARGETS:
        raise ValueError(f"layers: expected one of {sorted(LORA_TARGETS)}, got {layers!r}.")
    if not 1 <= int(r) <= 64:
        raise ValueError(f"r: expected a LoRA rank in 1..64, got {r!r}.")
    return peft.LoraConfig(r=int(r), lora_alpha=alpha if alpha is not None else int(r), lora_dropout=dropout,
                           target_modules=LORA_TARGETS[layers], bias="none", **kwargs)


def save_backbone(backbone: EchoBackbone, directory: str | os.PathLike, head: nn.Module | None = None,
                  task: TaskSpec | None = None, extra: dict | None = None) -> Path:
    """Write ``backbone.safetensors`` + ``backbone.json`` (and the pretext head) into ``directory``.

    Args:
        backbone: the backbone (plain, not peft-wrapped).
        directory: output folder (replaced atomically).
        head: optional head saved as ``head.safetensors`` with ``task.json``.
        task: the head's task spec (required with ``head``).
        extra: extra JSON metadata (e.g. ``{"image_size": 128}``).
    """
    final = Path(directory)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    sd = {k: v.detach().cpu().contiguous() for k, v in backbone.state_dict().items()}
    safetensors_torch.save_file(sd, str(tmp / BACKBONE_WEIGHTS))
    meta = {"segformer_config": backbone.segformer_config.to_dict(), **(extra or {})}
    atomic_write_json(tmp / BACKBONE_CONFIG, meta, default=str)
    if head is not None:
        if task is None:
            raise ValueError("save_backbone: 'task' is required when 'head' is given.")
        _save_head(head, task, tmp)
    atomic_replace_dir(tmp, final)
    return final


def load_backbone(directory: str | os.PathLike) -> tuple[EchoBackbone, dict]:
    """Rebuild a backbone from :func:`save_backbone` output; returns ``(backbone, metadata)``."""
    d = Path(directory)
    cfg_file, w_file = d / BACKBONE_CONFIG, d / BACKBONE_WEIGHTS
    for f in (cfg_file, w_file):
        if not f.is_file():
            raise FileNotFoundError(f"backbone folder {d}: missing {f.name}.")
    meta = json.loads(cfg_file.read_text())
    if "segformer_config" not in meta:
        raise ValueError(f"{cfg_file}: missing key 'segformer_config'.")
    cfg = transformers.SegformerConfig(**{k: v for k, v in meta["segformer_config"].items()
                                          if k not in ("transformers_version", "model_type")})
    backbone = EchoBackbone(cfg)
    sd = safetensors_torch.load_file(str(w_file))
    missing, unexpected = backbone.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ValueError(f"{w_file}: keys do not match the backbone (missing {missing[:5]}, unexpected {unexpected[:5]}).")
    return backbone, meta


def _save_head(head: nn.Module, task: TaskSpec, directory: Path) -> None:
    sd = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
    safetensors_torch.save_file(sd, str(directory / HEAD_WEIGHTS))
    atomic_write_json(directory / TASK_FILE, task.to_dict())


def _load_head(directory: Path, in_channels: int) -> tuple[nn.Module, TaskSpec]:
    for f in (TASK_FILE, HEAD_WEIGHTS):
        if not (directory / f).is_file():
            raise FileNotFoundError(f"task folder {directory}: missing {f}.")
    task = TaskSpec.from_dict(json.loads((directory / TASK_FILE).read_text()))
    head = task.build_head(in_channels)
    head.load_state_dict(safetensors_torch.load_file(str(directory / HEAD_WEIGHTS)))
    return head, task


class MultiTaskEchoModel(nn.Module):
    """A frozen backbone shared by task adapters: ``forward`` runs the active task's LoRA + head.

    Args:
        backbone: the (pretrained) :class:`EchoBackbone`; it is frozen here.

    Example::

        model = MultiTaskEchoModel(load_backbone("pretrain/backbone")[0])
        model.add_task(get_task("view"), echo_lora_config("all", r=2))
        model.add_task(get_task("segmentation"), echo_lora_config("all", r=2))
        model.set_task("view"); logits = model(x)          # (B, 2)
        model.save_task("view", "adapters/view")
    """

    def __init__(self, backbone: EchoBackbone) -> None:
        super().__init__()
        for p in backbone.parameters():
            p.requires_grad_(False)
        self.body: nn.Module = backbone
        self.heads = nn.ModuleDict()
        self.tasks: dict[str, TaskSpec] = {}
        self.active: str | None = None
        self.out_channels = backbone.out_channels

    @property
    def peft_model(self):
        """The peft ``PeftModel`` wrapping the backbone (None before the first task)."""
        return self.body if isinstance(self.body, peft.PeftModel) else None

    def add_task(self, task: TaskSpec | str, lora: peft.LoraConfig | None = None, head: nn.Module | None = None) -> None:
        """Add a LoRA adapter named ``task.name`` and its head, and make it the active task.

        Args:
            task: spec or task name.
            lora: adapter config. Default :func:`echo_lora_config` (attention, r=4).
            head: head module. Default ``task.build_head(out_channels)``.
        """
        spec = get_task(task) if isinstance(task, str) else task
        if spec.name in self.tasks:
            raise ValueError(f"task {spec.name!r} already exists in this model.")
        lora = lora if lora is not None else echo_lora_config()
        if self.peft_model is None:
            self.body = peft.get_peft_model(self.body, lora, adapter_name=spec.name)
        else:
            self.body.add_adapter(spec.name, lora)
        self.heads[spec.name] = (head if head is not None else spec.build_head(self.out_channels)).train(self.training)
        self.tasks[spec.name] = spec
        self.set_task(spec.name)

    def set_task(self, name: str) -> None:
        """Activate task ``name``: its adapter and head become the only trainable parameters."""
        if name not in self.tasks:
            raise ValueError(f"task {name!r} not loaded; available: {sorted(self.tasks)}.")
        self.body.set_adapter(name)
        for n, p in self.body.named_parameters():
            p.requires_grad_(f".{name}." in n and adapter_kind(n) == "lora")
        for n, h in self.heads.items():
            h.requires_grad_(n == name)
        self.active = name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 1, H, W)`` -> the active head's output (``(B, K, H, W)`` logits or ``(B, K)``)."""
        if self.active is None:
            raise RuntimeError("MultiTaskEchoModel has no task; call add_task() or load_task() first.")
        return self.heads[self.active](self.body(x))

    def predict(self, x: torch.Tensor, task: str | None = None) -> torch.Tensor:
        """Decoded prediction of ``task`` (default: the active one) in eval mode without gradients."""
        if task is not None:
            self.set_task(task)
        was = self.training
        self.eval()
        with torch.no_grad():
            out = self.tasks[self.active].decode(self(x))
        self.train(was)
        return out

    def save_task(self, name: str, directory: str | os.PathLike) -> Path:
        """Write task ``name``'s adapter (peft) and head into ``directory`` (replaced atomically)."""
        if name not in self.tasks:
            raise ValueError(f"task {name!r} not loaded; available: {sorted(self.tasks)}.")
        final = Path(directory)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
        self.body.save_pretrained(str(tmp), selected_adapters=[name])
        sub = tmp / name if name != "default" else tmp
        if sub != tmp:  # peft writes non-default adapters to a sub-folder
            for f in sub.iterdir():
                os.replace(f, tmp / f.name)
            sub.rmdir()
        _save_head(self.heads[name], self.tasks[name], tmp)
        atomic_replace_dir(tmp, final)
        return final

    def load_task(self, directory: str | os.PathLike, name: str | None = None, trainable: bool = False) -> str:
        """Load a task folder written by :meth:`save_task`; returns the task name (now active).

        Args:
            directory: the task folder.
            name: adapter name to use. Default: the name stored in ``task.json``.
            trainable: keep the loaded adapter trainable (to continue training). Default False.
        """
        d = Path(directory)
        if not (d / "adapter_config.json").is_file():
            raise FileNotFoundError(f"task folder {d}: missing adapter_config.json.")
        head, spec = _load_head(d, self.out_channels)
        name = name or spec.name
        if name in self.tasks:
            raise ValueError(f"task {name!r} already exists in this model.")
        if self.peft_model is None:
            self.body = peft.PeftModel.from_pretrained(self.body, str(d), adapter_name=name, is_trainable=trainable)
        else:
            self.body.load_adapter(str(d), adapter_name=name, is_trainable=trainable)
        self.heads[name] = head.train(self.training)
        self.tasks[name] = spec if spec.name == name else TaskSpec.from_dict({**spec.to_dict(), "name": name})
        self.set_task(name)
        if not trainable:
            for p in self.parameters():
                p.requires_grad_(False)
        return name

    @classmethod
    def from_pretrained(cls, backbone_dir: str | os.PathLike, task_dirs: Sequence[str | os.PathLike] = ()) -> MultiTaskEchoModel:
        """Load the backbone once and every task folder in ``task_dirs`` onto it."""
        backbone, _ = load_backbone(backbone_dir)
        model = cls(backbone)
        for d in task_dirs:
            model.load_task(d)
        return model

    @classmethod
    def for_training(cls, backbone_dir: str | os.PathLike, task: str, layers: str = "attention", r: int = 4,
                     head_kwargs: dict | None = None) -> MultiTaskEchoModel:
        """A model with one new trainable task on a pretrained backbone (used by the bundles)."""
        backbone, _ = load_backbone(backbone_dir)
        model = cls(backbone)
        lora_target_modules(backbone, layers)  # fail early if the installed transformers names differ
        model.add_task(get_task(task, **(head_kwargs or {})), echo_lora_config(layers, r))
        return model


def load_pretrained_task_model(backbone_dir: str | os.PathLike):
    """The pretrained backbone with its pretext head (as written by ``pretrain``), as an ``EchoTaskModel``."""
    from .models import EchoTaskModel

    backbone, _ = load_backbone(backbone_dir)
    head, _ = _load_head(Path(backbone_dir), backbone.out_channels)
    return EchoTaskModel(backbone, head)
