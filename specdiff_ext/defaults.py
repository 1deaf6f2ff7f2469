"""Every decoder default, written once (`DEFAULTS`), with where each value came from.

Imported by the drafters' adapters (`specdiff_ext.drafting`) and the decode loop
(`specdiff_ext.decoding`, which re-exports it); constructors take None for "the default" and read
it here, so no default is written twice.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DecoderDefaults", "DEFAULTS"]


@dataclass(frozen=True)
class DecoderDefaults:
    """The defaults of the decoders and their drafters.

    - The specdiff decoder's drafts per round are not here: they come from the loaded drafter
      (a DFlash drafter's trained ``block_size`` minus one: 3 for the embedded drafter; the
      gamma sweep, ``benchmarks/sweep_gamma.sh``, found the smallest blocks fastest at this
      acceptance).
    - ``steps`` 1 and ``commit`` left_to_right: the DFlash drafter is trained to fill a fully
      masked block in one pass.
    - ``ar_gamma`` 2 and ``pld_gamma`` 4: the baselines' drafts per round that the same sweep
      found fastest (on other held-out prompts than the benchmarks').
    - ``draft_filters``: drafters sample with the target's top-k / top-p / min-p (more
      accepted, ``benchmarks/results/draft_filters_cpu.md``).
    - ``pld_max_ngram`` 3, ``pld_min_ngram`` 1: the n-gram lengths prompt lookup tries.
    - ``tree_budget``: specdiff's draft tree nodes per round (0: the chain); ``tree_ngram``:
      prompt lookup's continuation (up to ``tree_ngram_len`` tokens) joins each tree;
      ``tree_topk``: ranks per block position the best-first expansion considers.
    - ``batch_tree_budgets``: the tree budget `generate_batch` uses at batch size B when the
      decoder's budget was left at its default: the first ``(max_B, budget)`` pair with
      B <= max_B (a wide forward is cheap for one row, not for many: smaller trees at larger
      batches; measured by ``benchmarks/batch_cpu.py``, ``benchmarks/results/batch_cpu.md``).
    """

    steps: int = 1
    commit: str = "left_to_right"
    ar_gamma: int = 2
    pld_gamma: int = 4
    draft_filters: bool = True
    pld_max_ngram: int = 3
    pld_min_ngram: int = 1
    tree_budget: int = 16
    tree_ngram: bool = True
    tree_ngram_len: int = 8
    tree_topk: int = 8
    batch_tree_budgets: tuple = ((8, 16), (1 << 30, 4))

    def batch_tree_budget(self, batch: int) -> int:
        """The default tree budget at batch size `batch` (``batch_tree_budgets``)."""
        for max_b, budget in self.batch_tree_budgets:
            if batch <= max_b:
                return budget
        return self.batch_tree_budgets[-1][1]


DEFAULTS = DecoderDefaults()
