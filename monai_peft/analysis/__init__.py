"""Analysis of fine-tuning runs: the Pareto trade-off (thesis eq. 4.1), data-size / OOD sweeps and the
thesis's result tables (5.5, 5.6, 5.8, 5.9)."""

from __future__ import annotations

from monai_peft.analysis.pareto import (
    ParetoPoint,
    RunRecord,
    load_run_records,
    pareto_scores,
    plot_tradeoff,
    read_results_json,
    read_runs_csv,
    record_from_dict,
    scores_table,
)
from monai_peft.analysis.sweeps import collect_sweep, plan_sweep, subsample
from monai_peft.analysis.tables import thesis_tables

__all__ = [
    "collect_sweep",
    "plan_sweep",
    "subsample",
    "thesis_tables",
    "ParetoPoint",
    "RunRecord",
    "load_run_records",
    "pareto_scores",
    "plot_tradeoff",
    "read_results_json",
    "read_runs_csv",
    "record_from_dict",
    "scores_table",
]
