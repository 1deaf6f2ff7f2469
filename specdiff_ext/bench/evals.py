"""Acceptance evals of drafters: the one measurement the trainers' evals, ``specdiff
eval-drafter`` and the benchmarks share.

- `evaluate_acceptance`: a decoder's generate on every prompt, statistics pooled.
- `eval_drafter`: mean accepted drafts per round over a grid of (prompt set, temperature,
  drafts per round G, denoising steps T, commit mode) for a diffusion drafter.
"""

from __future__ import annotations

import sys
from typing import Any, Dict, List, Optional, Sequence

from torch import Tensor

from .stats import pool_stats

__all__ = ["evaluate_acceptance", "eval_drafter"]


def evaluate_acceptance(decoder: Any, prompts: Sequence[Tensor], max_new_tokens: int,
                        temperature: float = 0.0, seed: int = 0,
                        controls: Optional[dict] = None) -> dict:
    """`decoder.generate` on every encoded prompt (1, T) with seed ``seed + i`` (and the
    sampling `controls`: top_k / top_p / min_p / repetition_penalty), the statistics pooled by
    `pool_stats` (mean_accepted, first_accept_rate, accepted_histogram, ...)."""
    return pool_stats([decoder.generate(ids, max_new_tokens=max_new_tokens,
                                        temperature=temperature, seed=seed + i,
                                        **(controls or {})).stats
                       for i, ids in enumerate(prompts)])


def eval_drafter(target: Any, drafter: Any, prompt_sets: Dict[str, Sequence[str]], *,
                 gammas: Sequence[Optional[int]] = (None,), steps: Sequence[int] = (1, 2, 4, 8),
                 commits: Sequence[str] = ("left_to_right", "confidence", "random"),
                 temperatures: Sequence[float] = (0.0, 1.0), max_new_tokens: int = 64,
                 seed: int = 0, progress: bool = True) -> List[dict]:
    """Mean accepted draft tokens per round for every (prompt set, temperature, G, T, commit).

    A gamma of None is the drafter's own (its trained block minus one). Each configuration
    decodes every prompt of the set for `max_new_tokens` tokens with
    `decoding.SpecDiffDecoder` and pools the rounds. Returns one dict per configuration.
    """
    from ..decoding import SpecDiffDecoder

    encoded = {k: [target.chat_prompt(p) for p in v] for k, v in prompt_sets.items()}
    grid = [(s, t, g, T, c) for s in encoded for t in temperatures for g in gammas
            for T in steps for c in commits]
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(grid), desc="eval-drafter", unit="config", dynamic_ncols=True,
                   file=sys.stderr)
    rows = []
    for s, t, g, T, c in grid:
        dec = SpecDiffDecoder(target, drafter, gamma=g, steps=T, commit=c)
        pooled = evaluate_acceptance(dec, encoded[s], max_new_tokens, temperature=t, seed=seed)
        row = {"prompts": s, "temperature": t, "gamma": dec.gamma, "steps": T, "commit": c,
               **{k: pooled[k] for k in ("mean_accepted", "first_accept_rate", "tokens_per_round",
                                         "rounds", "accepted_histogram")}}
        rows.append(row)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(set=s, t=t, G=g, T=T, acc=f"{row['mean_accepted']:.2f}")
    if bar is not None:
        bar.close()
    return rows
