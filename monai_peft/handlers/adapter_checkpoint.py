"""Adapter-only checkpointing: the peft folder of the last and the best epoch, written atomically, with resume."""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from monai.utils import IgniteInfo, min_version, optional_import

from monai_peft.io import atomic_replace_dir
from monai_peft.workflows.records import atomic_write_json, process_rank

if TYPE_CHECKING:
    from ignite.engine import Engine, Events
else:
    Engine, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine")
    Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")

load_safetensors, _ = optional_import("safetensors.torch", name="load_file")
save_safetensors, _ = optional_import("safetensors.torch", name="save_file")

__all__ = ["AdapterCheckpoint", "AdapterLoader", "save_adapter_folder", "load_adapter_folder", "unwrap_network"]

STATE_FILE = "training_state.pt"
INFO_FILE = "checkpoint.json"
PLAIN_WEIGHTS = "model.safetensors"
PEFT_WEIGHTS = "adapter_model.safetensors"


def unwrap_network(network: torch.nn.Module) -> torch.nn.Module:
    """The module inside ``DistributedDataParallel`` / ``DataParallel`` wrappers."""
    while isinstance(network, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
        network = network.module
    return network


def _is_peft(network: torch.nn.Module) -> bool:
    return hasattr(network, "peft_config") and hasattr(network, "save_pretrained")


def save_adapter_folder(network: torch.nn.Module, folder: str | Path, info: dict[str, Any] | None = None,
                        extra_state: dict[str, Any] | None = None) -> Path:
    """Write the trainable part of ``network`` to ``folder`` atomically.

    A peft model is saved with ``save_pretrained`` (``adapter_config.json`` + ``adapter_model.safetensors``:
    adapters and ``modules_to_save`` only); a plain module (full fine-tuning) as ``model.safetensors``.

    Args:
        network: the model, optionally wrapped in (Distributed)DataParallel.
        folder: destination folder; replaced as a whole, never left half written.
        info: JSON-able facts stored as ``checkpoint.json`` (epoch, metric, ...).
        extra_state: optimizer / scheduler / engine state stored as ``training_state.pt`` (``torch.save``,
            loadable with ``weights_only=True``).

    Returns:
        The folder.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    net = unwrap_network(network)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        if _is_peft(net):
            net.save_pretrained(str(tmp), safe_serialization=True)
        else:
            state = {k: v.detach().contiguous().cpu() for k, v in net.state_dict().items()}
            save_safetensors(state, str(tmp / PLAIN_WEIGHTS))
        if extra_state is not None:
            torch.save(extra_state, tmp / STATE_FILE)
        atomic_write_json(tmp / INFO_FILE, info or {})
        atomic_replace_dir(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def _existing(folder: Path) -> Path | None:
    """``folder`` or, after a crash between the two renames of ``_replace_dir``, its ``.old`` copy."""
    if (folder / INFO_FILE).exists():
        return folder
    old = folder.parent / f".{folder.name}.old"
    return old if (old / INFO_FILE).exists() else None


def _check_shapes(path: Path, loaded: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """Raise a readable error when saved tensors do not fit the model (e.g. another class count)."""
    wrong = [f"{k}: file {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
             for k, v in loaded.items() if k in expected and tuple(v.shape) != tuple(expected[k].shape)]
    if wrong:
        raise ValueError(
            f"{path} does not fit the network: {len(wrong)} tensors differ in shape, e.g. {wrong[:3]}. "
            "A different output class count usually means --classes differs from the run that wrote it."
        )


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """``safetensors.torch.load_file`` whose errors name the file (safetensors' own say "header too large")."""
    try:
        return load_safetensors(str(path), device="cpu")
    except Exception as e:  # SafetensorError, OSError from a truncated file, ...
        raise ValueError(f"{path}: not a readable safetensors file ({e}).") from e


def load_adapter_folder(network: torch.nn.Module, folder: str | Path, adapter_name: str | None = None) -> None:
    """Load weights written by :func:`save_adapter_folder` into ``network`` (strict: every key must match).

    Raises:
        FileNotFoundError: when ``folder`` holds neither ``adapter_model.safetensors`` nor ``model.safetensors``.
        ValueError: when the weights do not fit ``network`` (names listed).
    """
    folder = Path(folder)
    net = unwrap_network(network)
    if _is_peft(net):
        if not (folder / PEFT_WEIGHTS).exists():
            raise FileNotFoundError(
                f"{folder} has no {PEFT_WEIGHTS}: expected a peft adapter folder written by save_pretrained."
            )
        from peft import get_peft_model_state_dict, set_peft_model_state_dict

        state = _read_safetensors(folder / PEFT_WEIGHTS)
        name = adapter_name or getattr(net, "active_adapter", "default")
        # every adapter tensor of the model must come from the file: a half-loaded adapter is random weights
        expected_state = get_peft_model_state_dict(net, adapter_name=name)
        expected = set(expected_state)
        _check_shapes(folder / PEFT_WEIGHTS, state, expected_state)
        missing = sorted(expected - set(state))
        if missing:
            raise ValueError(
                f"{folder / PEFT_WEIGHTS} lacks {len(missing)} adapter tensors of the model, e.g. {missing[:3]}; "
                "was it saved from a different preset or placement?"
            )
        extra = sorted(set(state) - expected)
        if extra:
            raise ValueError(
                f"{folder / PEFT_WEIGHTS} holds {len(extra)} tensors not in the model, e.g. {extra[:3]}; "
                "was it saved from a different preset or placement?"
            )
        result = set_peft_model_state_dict(net, state, adapter_name=name)
        unexpected = list(getattr(result, "unexpected_keys", []) or [])
        if unexpected:
            raise ValueError(f"{folder / PEFT_WEIGHTS}: tensors not in the model, e.g. {unexpected[:3]}.")
        return
    if (folder / PLAIN_WEIGHTS).exists():
        state = _read_safetensors(folder / PLAIN_WEIGHTS)
        _check_shapes(folder / PLAIN_WEIGHTS, state, net.state_dict())
        try:
            net.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise ValueError(f"{folder / PLAIN_WEIGHTS} does not fit the network: {e}") from e
        return
    raise FileNotFoundError(f"{folder} holds neither {PEFT_WEIGHTS} (peft model) nor {PLAIN_WEIGHTS} (plain model).")


class AdapterCheckpoint:
    """Save the adapter (peft folder, safetensors) after every epoch and at the best validation metric; resume.

    Folder layout under ``save_dir``::

        last/   adapter_config.json, adapter_model.safetensors, checkpoint.json, training_state.pt
        best/   adapter_config.json, adapter_model.safetensors, checkpoint.json

    ``last/training_state.pt`` holds the optimizer, LR scheduler and engine counters, so ``resume=True``
    continues a killed run at the epoch after the last one saved, with the same best metric. Each folder is
    written to a temporary folder beside it and renamed into place. Only rank 0 writes in a distributed run;
    every rank resumes.

    Args:
        save_dir: folder for ``last/`` and ``best/``.
        network: the model being trained (peft model, plain module, or DDP-wrapped).
        optimizer: saved with ``last`` for resuming; ``None`` skips it.
        lr_scheduler: saved with ``last`` for resuming; ``None`` skips it.
        evaluator: validation engine whose key metric picks ``best``; ``None`` disables ``best``.
        key_metric_name: metric in ``evaluator.state.metrics`` to rank epochs by; default the evaluator's
            key metric (``evaluator.state.key_metric_name``).
        higher_is_better: True for Dice (default), False for losses.
        save_last: keep ``last/`` (needed for resume). Default True.
        resume: on ``STARTED``, load ``last/`` if it exists and continue from its epoch. Default False.
        adapter_name: peft adapter to load into when resuming. Default the active adapter.
    """

    def __init__(
        self,
        save_dir: str | Path,
        network: torch.nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        lr_scheduler: Any | None = None,
        evaluator: Engine | None = None,
        key_metric_name: str | None = None,
        higher_is_better: bool = True,
        save_last: bool = True,
        resume: bool = False,
        adapter_name: str | None = None,
    ) -> None:
        if save_dir is None or str(save_dir) == "":
            raise ValueError("AdapterCheckpoint needs save_dir, the folder for last/ and best/.")
        if not isinstance(network, torch.nn.Module):
            raise ValueError(f"AdapterCheckpoint network must be a torch.nn.Module, got {type(network).__name__}.")
        self.save_dir = Path(save_dir)
        self.network = network
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.evaluator = evaluator
        self.key_metric_name = key_metric_name
        self.higher_is_better = higher_is_better
        self.save_last = save_last
        self.resume = resume
        self.adapter_name = adapter_name
        self.best_metric: float | None = None
        self.best_epoch: int | None = None
        self.resumed_from: int | None = None
        self._trainer: Engine | None = None
        self.logger = logging.getLogger(__name__)

    @property
    def last_dir(self) -> Path:
        return self.save_dir / "last"

    @property
    def best_dir(self) -> Path:
        return self.save_dir / "best"

    def attach(self, engine: Engine) -> None:
        """Attach to the trainer (resume at ``STARTED``, ``last`` at ``EPOCH_COMPLETED``) and its evaluator."""
        if engine.has_event_handler(self.save_last_epoch, Events.EPOCH_COMPLETED):
            return
        self._trainer = engine
        self.logger = engine.logger
        engine.add_event_handler(Events.STARTED, self.load_last)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.save_last_epoch)
        if self.evaluator is not None and not self.evaluator.has_event_handler(self.save_if_best, Events.COMPLETED):
            self.evaluator.add_event_handler(Events.COMPLETED, self.save_if_best)

    # ---- resume -------------------------------------------------------------------------------------
    def load_last(self, engine: Engine) -> None:
        """Restore adapter, optimizer, scheduler and epoch/iteration from ``last/`` when ``resume`` is on."""
        best = _existing(self.best_dir)
        if self.resume and best is not None:
            info = json.loads((best / INFO_FILE).read_text())
            self.best_metric, self.best_epoch = info.get("metric"), info.get("epoch")
        last = _existing(self.last_dir)
        if not self.resume or last is None:
            if self.resume:
                engine.logger.info(f"resume: no checkpoint in {self.last_dir}, starting at epoch 1")
            return
        load_adapter_folder(self.network, last, self.adapter_name)
        info = json.loads((last / INFO_FILE).read_text())
        state_file = last / STATE_FILE
        if state_file.exists():
            state = torch.load(state_file, map_location="cpu", weights_only=True)
            if self.optimizer is not None and "optimizer" in state:
                self.optimizer.load_state_dict(state["optimizer"])
            if self.lr_scheduler is not None and "lr_scheduler" in state:
                self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        epoch, iteration = int(info["epoch"]), int(info["iteration"])
        if engine.state.max_epochs is not None and epoch >= engine.state.max_epochs:
            engine.logger.info(
                f"resume: {last} is at epoch {epoch}, max_epochs is {engine.state.max_epochs}: nothing left to train"
            )
        engine.state.epoch = epoch
        engine.state.iteration = iteration
        self.resumed_from = epoch
        engine.state.resumed_from_epoch = epoch
        engine.logger.info(f"resume: loaded {last} (epoch {epoch}); continuing at epoch {epoch + 1}")

    # ---- saving -------------------------------------------------------------------------------------
    def save_last_epoch(self, engine: Engine) -> None:
        """Write ``last/`` with the training state of the epoch that just completed."""
        if not self.save_last or process_rank() != 0:
            return
        extra: dict[str, Any] = {}
        if self.optimizer is not None:
            extra["optimizer"] = self.optimizer.state_dict()
        if self.lr_scheduler is not None:
            extra["lr_scheduler"] = self.lr_scheduler.state_dict()
        info = {"epoch": engine.state.epoch, "iteration": engine.state.iteration,
                "max_epochs": engine.state.max_epochs, "best_metric": self.best_metric, "best_epoch": self.best_epoch}
        save_adapter_folder(self.network, self.last_dir, info=info, extra_state=extra)
        engine.logger.debug(f"saved {self.last_dir} (epoch {engine.state.epoch})")

    def save_if_best(self, evaluator: Engine) -> None:
        """Write ``best/`` when the evaluator's key metric improves on the best seen so far."""
        name = self.key_metric_name or getattr(evaluator.state, "key_metric_name", None)
        if name is None:
            raise ValueError("AdapterCheckpoint: set key_metric_name or give the evaluator a key metric.")
        if name not in evaluator.state.metrics:
            raise KeyError(f"AdapterCheckpoint: metric '{name}' not in evaluator metrics {sorted(evaluator.state.metrics)}.")
        value = float(evaluator.state.metrics[name])
        if math.isnan(value):
            return
        better = self.best_metric is None or (
            value > self.best_metric if self.higher_is_better else value < self.best_metric
        )
        if not better:
            return
        epoch = self._trainer.state.epoch if self._trainer is not None else evaluator.state.epoch
        self.best_metric, self.best_epoch = value, int(epoch)
        if process_rank() == 0:
            save_adapter_folder(self.network, self.best_dir, info={"epoch": self.best_epoch, "metric": value,
                                                                   "metric_name": name})
            evaluator.logger.info(f"new best {name}={value:.4f} at epoch {epoch}: saved {self.best_dir}")



class AdapterLoader:
    """Load an adapter folder (``best/`` or ``last/`` of :class:`AdapterCheckpoint`) into a network at ``STARTED``.

    The evaluation / inference counterpart of MONAI's ``CheckpointLoader`` for peft folders. Loading is strict:
    every adapter tensor of the model must be in the file.

    Args:
        load_dir: the folder written by :class:`AdapterCheckpoint` (or ``save_pretrained``).
        network: the model to load into, built with the same preset as the saved one.
        adapter_name: peft adapter to load into. Default the active adapter.
    """

    def __init__(self, load_dir: str | Path, network: torch.nn.Module, adapter_name: str | None = None) -> None:
        self.load_dir = Path(load_dir)
        self.network = network
        self.adapter_name = adapter_name

    def attach(self, engine: Engine) -> None:
        if not engine.has_event_handler(self, Events.STARTED):
            engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine) -> None:
        if not self.load_dir.is_dir():
            raise FileNotFoundError(
                f"adapter folder {self.load_dir} does not exist: train first (it is written by AdapterCheckpoint) "
                "or point the load_dir / --ckpt_dir override at one."
            )
        load_adapter_folder(self.network, self.load_dir, self.adapter_name)
        engine.logger.info(f"loaded adapter weights from {self.load_dir}")
