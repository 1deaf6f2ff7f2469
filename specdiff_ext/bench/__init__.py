"""Benchmarks of the package, kept out of its core: `runner` (``specdiff bench``: decoders
side by side; ``specdiff eval-drafter``: acceptance over a grid) and `tables` (every results
table and plot)."""

from .runner import DECODERS, _HF, build_decoders, eval_drafter, run_bench
from .tables import format_e2e_table, format_eval_table, format_table, plot_bench

__all__ = ["DECODERS", "build_decoders", "run_bench", "eval_drafter", "format_table",
           "plot_bench", "format_e2e_table", "format_eval_table"]
