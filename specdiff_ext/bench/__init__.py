"""Measurement, kept out of the package core:

- `stats`: the decode loop's phase clock, one run's statistics, runs pooled;
- `evals`: acceptance evals (`evaluate_acceptance`, `eval_drafter`: ``specdiff eval-drafter``);
- `runner`: ``specdiff bench``, decoders side by side on held-out prompts;
- `tables`: every results table and plot.
"""

from .evals import eval_drafter, evaluate_acceptance
from .runner import DECODERS, _HF, build_decoders, run_bench
from .stats import PhaseClock, pool_stats, run_stats
from .tables import format_e2e_table, format_eval_table, format_table, plot_bench

__all__ = ["DECODERS", "build_decoders", "run_bench", "eval_drafter", "evaluate_acceptance",
           "PhaseClock", "pool_stats", "run_stats", "format_table", "plot_bench",
           "format_e2e_table", "format_eval_table"]
