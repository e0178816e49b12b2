"""Log which parameters train at the start of a run and put the counts in the run record (thesis 4.2.5.1)."""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from monai.utils import IgniteInfo, min_version, optional_import

from monai_peft.handlers.adapter_checkpoint import unwrap_network
from monai_peft.workflows.records import atomic_write_json, process_rank, update_run_record

if TYPE_CHECKING:
    from ignite.engine import Engine, Events
else:
    Engine, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine")
    Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")

__all__ = ["ParameterReportHandler", "count_parameters", "frozen_fingerprint"]

# peft wrappers that train a copy of the module they wrap: (attribute of the copies, attribute of the idle original)
_TRAINED_COPY_WRAPPERS = (("modules_to_save", "original_module"), ("ln_tuning_layers", "base_layer"))


def frozen_fingerprint(network: torch.nn.Module) -> dict[str, Any] | None:
    """SHA-256 over the names, dtypes, shapes and raw bytes of every frozen parameter of ``network`` in the forward
    path (not the idle originals peft keeps beside the copies it trains).

    Equal fingerprints before and after training show that the backbone did not change.

    Returns:
        ``{"sha256": hex digest, "tensors": n, "parameters": numel}``, or None when nothing is frozen (full
        fine-tuning, pretraining): there is no frozen backbone to fingerprint.
    """
    import hashlib

    net = unwrap_network(network)
    # peft trains some modules as copies (modules_to_save, LN tuning = "full") and keeps each original frozen but out
    # of the forward pass: such originals are no frozen backbone (with full fine-tuning they are the whole network)
    spare = {id(q) for m in net.modules() for copies, original in _TRAINED_COPY_WRAPPERS
             if isinstance(getattr(m, copies, None), torch.nn.ModuleDict)
             and isinstance(getattr(m, original, None), torch.nn.Module)
             for q in getattr(m, original).parameters()}
    digest = hashlib.sha256()
    tensors = numel = 0
    for name, p in net.named_parameters():
        if p.requires_grad or id(p) in spare:
            continue
        data = p.detach().cpu().contiguous()
        digest.update(f"{name}|{data.dtype}|{tuple(data.shape)}|".encode())
        digest.update(data.view(-1).view(torch.uint8).numpy().tobytes())  # the bytes themselves, any dtype
        tensors += 1
        numel += data.numel()
    if tensors == 0:
        return None
    return {"sha256": digest.hexdigest(), "tensors": tensors, "parameters": numel}


def count_parameters(network: torch.nn.Module) -> dict[str, Any]:
    """Trainable and total parameter counts of ``network`` (shared tensors counted once).

    Returns:
        ``{"trainable": int, "total": int, "trainable_percent": float}``.
    """
    seen: set[int] = set()
    trainable = total = 0
    for p in unwrap_network(network).parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return {"trainable": trainable, "total": total, "trainable_percent": 100.0 * trainable / total if total else 0.0}


def _core_report(network: torch.nn.Module) -> Any | None:
    """``monai_peft.parameter_report(network)`` when the core provides it, else None."""
    try:
        core = importlib.import_module("monai_peft")
        fn = getattr(core, "parameter_report", None)
        return fn(unwrap_network(network)) if fn is not None else None
    except Exception as e:  # the core report is a nicety: the counts below always work
        logging.getLogger(__name__).debug(f"parameter_report unavailable: {e}")
        return None


class ParameterReportHandler:
    """At ``STARTED``, log the parameter report of ``network`` and store the counts.

    The counts go to ``engine.state.parameters`` and, when given, to the run record under ``parameters``
    together with ``method`` / ``placement`` / ``preset``; the full report (per region and module type,
    from ``monai_peft.parameter_report``) goes to ``report_path``.

    Args:
        network: the model to report on (peft model, plain module, or DDP-wrapped).
        record_path: run record (``results.json``) to update; ``None`` writes none.
        report_path: JSON file for the full parameter report; ``None`` writes none.
        run_info: extra top-level facts for the run record, e.g. ``{"method": "lora", "preset": "..."}``.
        write_rank0_only: only rank 0 writes files in a distributed run. Default True.
    """

    def __init__(
        self,
        network: torch.nn.Module,
        record_path: str | Path | None = None,
        report_path: str | Path | None = None,
        run_info: dict[str, Any] | None = None,
        write_rank0_only: bool = True,
    ) -> None:
        if not isinstance(network, torch.nn.Module):
            raise ValueError(f"ParameterReportHandler network must be a torch.nn.Module, got {type(network).__name__}.")
        self.network = network
        self.record_path = Path(record_path) if record_path is not None else None
        self.report_path = Path(report_path) if report_path is not None else None
        self.run_info = dict(run_info or {})
        self.write_rank0_only = write_rank0_only
        self._start_fingerprint: dict[str, Any] | None = None

    def attach(self, engine: Engine) -> None:
        if not engine.has_event_handler(self, Events.STARTED):
            engine.add_event_handler(Events.STARTED, self)
            engine.add_event_handler(Events.COMPLETED, self.check_frozen)

    def check_frozen(self, engine: Engine) -> None:
        """At the end of the run, record whether the frozen parameters are bit-identical to the start.

        A run that freezes nothing (full fine-tuning) records ``"frozen_backbone": null``.
        """
        start, end = self._start_fingerprint, frozen_fingerprint(self.network)
        if start is None and end is None:
            engine.state.frozen_unchanged = None
            section: dict[str, Any] | None = None
        else:
            unchanged = start is not None and end is not None and start == end
            engine.state.frozen_unchanged = unchanged
            if not unchanged:
                engine.logger.warning("frozen parameters changed during training (fingerprints differ)")
            section = {"tensors": (end or start)["tensors"], "parameters": (end or start)["parameters"],
                       "start": start["sha256"] if start else None, "end": end["sha256"] if end else None,
                       "unchanged": unchanged}
        rank = process_rank()
        if self.record_path is not None and (not self.write_rank0_only or rank == 0):
            update_run_record(self.record_path, {"frozen_backbone": section})

    def __call__(self, engine: Engine) -> None:
        self._start_fingerprint = frozen_fingerprint(self.network)
        counts = count_parameters(self.network)
        report = _core_report(self.network)
        if report is not None and hasattr(report, "trainable"):
            # the core counts the original network as total (trained copies of base modules once), thesis style
            counts = {"trainable": int(report.trainable), "total": int(report.total),
                      "trainable_percent": float(report.percent), "added": int(getattr(report, "added", 0))}
        engine.state.parameters = counts
        table = report.table() if report is not None and hasattr(report, "table") else None
        engine.logger.info(
            f"parameters: {counts['trainable']:,} trainable of {counts['total']:,} "
            f"({counts['trainable_percent']:.3f}%)" + (f"\n{table}" if table else "")
        )
        rank = process_rank()
        if self.write_rank0_only and rank != 0:
            return
        if self.report_path is not None:
            data = report.as_dict() if report is not None and hasattr(report, "as_dict") else counts
            atomic_write_json(self.report_path, data)
        if self.record_path is not None:
            update_run_record(self.record_path, {**self.run_info, "parameters": counts})
