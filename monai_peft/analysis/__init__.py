"""Analysis of fine-tuning runs: the Pareto trade-off (thesis eq. 4.1), data-size / OOD sweeps, validation Dice over
time (Figures 5.1-5.8) and the thesis's result tables (5.1-5.10) with its published figures beside."""

from __future__ import annotations

from monai_peft.analysis.curves import Curve, load_curves, plot_curves
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
    "Curve",
    "load_curves",
    "plot_curves",
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
