"""Ignite handlers for PEFT runs, usable from MONAI bundle JSON (``"_target_": "monai_peft.handlers.CostMeter"``)."""

from __future__ import annotations

from monai_peft.handlers.adapter_checkpoint import (
    AdapterCheckpoint,
    AdapterLoader,
    load_adapter_folder,
    save_adapter_folder,
    unwrap_network,
)
from monai_peft.handlers.case_metrics import CaseMetricsWriter, case_id_of, case_metrics
from monai_peft.handlers.cost_meter import CostMeter, batch_size_of, peak_memory_gb
from monai_peft.handlers.parameter_report import ParameterReportHandler, count_parameters, frozen_fingerprint
from monai_peft.handlers.per_class_dice import PerClassDice
from monai_peft.handlers.run_record import EpochHistory, RunRecordWriter, history_entry

__all__ = [
    "AdapterCheckpoint",
    "AdapterLoader",
    "CaseMetricsWriter",
    "CostMeter",
    "EpochHistory",
    "ParameterReportHandler",
    "PerClassDice",
    "RunRecordWriter",
    "batch_size_of",
    "case_id_of",
    "case_metrics",
    "count_parameters",
    "frozen_fingerprint",
    "history_entry",
    "load_adapter_folder",
    "peak_memory_gb",
    "save_adapter_folder",
    "unwrap_network",
]
