"""Acceptance evals of drafters: the one measurement the trainers' evals, ``specdiff
eval-drafter`` and the benchmarks share.

- `evaluate_acceptance`: a decoder's generate on every prompt, statistics pooled.
- `eval_drafter`: mean accepted drafts per round over a grid of (prompt set, temperature,
  drafts per round G, denoising steps T, commit mode) for a diffusion drafter, with the hit
  rates by block position below.
- `position_hit_rates`: how often the drafter's logits at block position k rank the token the
  target emitted there first (top-1) or among their 4 highest (top-4), k = 1..G: what a draft
  tree built from the block's marginals would cover.

Hit rates by position, precisely: decode each prompt with the specdiff decoder (the real loop,
exact); at every round, the drafter's block holds logits for positions k = 1..g after the last
emitted token (g = the round's drafts: G, or fewer near the end; with T = 1 the block's
marginals given a fully masked block, with T > 1 each position's row of the step that committed
it). Position k of a round that starts after n emitted tokens is compared with emitted token
n + k of the final text (the target's own tokens: its greedy continuation at temperature 0),
whether or not the round's drafts got that far; positions past the end of the text (its
``max_new_tokens`` or its EOS) are not counted. top1_by_position[k - 1] is hits / counted at
position k over all rounds of all prompts (None where nothing was counted); counted_by_position
gives the counts.
"""

from __future__ import annotations

import sys
from typing import Any, Dict, List, Optional, Sequence, Union

from torch import Tensor

from .stats import pool_stats

__all__ = ["evaluate_acceptance", "eval_drafter", "position_hit_rates", "evaluate_positions"]

TOP_K = 4  # the wider of the two hit rates


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


class _BlockRecorder:
    """A `DiffusionDrafting` seen through: every `draft` also records (tokens emitted before the
    round, the top-4 target ids of each block position's logits); the decode loop is unchanged."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.emitted = 0
        self.rounds: List[tuple] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def start(self, prompt: Tensor, *args: Any, **kwargs: Any) -> None:
        self.emitted, self.rounds = 0, []
        self.inner.start(prompt, *args, **kwargs)

    def draft(self, gamma: int, rnd: int) -> Any:
        d = self.inner.draft(gamma, rnd)
        lg = getattr(self.inner, "last_logits", None)
        if lg is None:
            raise TypeError(f"{type(self.inner).__name__} keeps no last_logits: position hit "
                            "rates need a DiffusionDrafting")
        top = lg[0].topk(min(TOP_K, lg.shape[-1]), dim=-1).indices  # (g, 4)
        vmap = getattr(self.inner.drafter, "vocab_map", None)
        if vmap is not None:
            top = vmap.to(top.device)[top]
        self.rounds.append((self.emitted, top))
        return d

    def accept(self, emitted: Tensor, n_acc: int, hidden: Optional[Tensor]) -> None:
        self.emitted += int(emitted.shape[1])
        self.inner.accept(emitted, n_acc, hidden)


def evaluate_positions(decoder: Any, prompts: Sequence[Tensor], max_new_tokens: int,
                       temperature: float = 0.0, seed: int = 0,
                       controls: Optional[dict] = None) -> dict:
    """`evaluate_acceptance` of a `decoding.SpecDiffDecoder` (same runs, same seeds), with the
    drafter's hit rates by block position (module docstring): the pooled statistics plus
    top1_by_position, top4_by_position (length ``decoder.gamma``) and counted_by_position."""
    G = int(decoder.gamma)
    counted, hit1, hit4 = [0] * G, [0] * G, [0] * G
    inner = decoder.drafter
    rec = _BlockRecorder(inner)
    stats = []
    decoder.drafter = rec
    try:
        for i, ids in enumerate(prompts):
            res = decoder.generate(ids, max_new_tokens=max_new_tokens, temperature=temperature,
                                   seed=seed + i, **(controls or {}))
            stats.append(res.stats)
            out = res.ids
            for n0, top in rec.rounds:
                top = top.tolist()
                for k in range(min(len(top), len(out) - n0)):  # position k + 1 -> out[n0 + k]
                    t = out[n0 + k]
                    counted[k] += 1
                    hit1[k] += top[k][0] == t
                    hit4[k] += t in top[k]
    finally:
        decoder.drafter = inner
    pooled = pool_stats(stats)
    pooled.update(
        top1_by_position=[h / c if c else None for h, c in zip(hit1, counted)],
        top4_by_position=[h / c if c else None for h, c in zip(hit4, counted)],
        counted_by_position=counted)
    return pooled


def position_hit_rates(target: Any, drafter: Any, prompts: Sequence[Union[str, Tensor]],
                       max_new_tokens: int, *, gamma: Optional[int] = None, steps: int = 1,
                       commit: str = "left_to_right", temperature: float = 0.0, seed: int = 0,
                       controls: Optional[dict] = None) -> dict:
    """The drafter's top-1 / top-4 hit rates of the target's tokens by block position k = 1..G
    (module docstring), decoding every prompt (text: through the target's chat template; or
    encoded ids (1, T)) for `max_new_tokens` tokens with ``SpecDiffDecoder(target, drafter,
    gamma, steps, commit)`` at `temperature` (greedy by default), seed ``seed + i``.

    Returns the runs' pooled statistics (`pool_stats`: mean_accepted, first_accept_rate,
    accepted_histogram, ...) with top1_by_position, top4_by_position and counted_by_position
    (lists of length G; a rate is None where nothing was counted).
    """
    from ..decoding import SpecDiffDecoder

    enc = [target.chat_prompt(p) if isinstance(p, str) else p for p in prompts]
    # the drafter's own chain: position k's hit rates are read off one block of G drafts
    dec = SpecDiffDecoder(target, drafter, gamma=gamma, steps=steps, commit=commit, tree_budget=0)
    return evaluate_positions(dec, enc, max_new_tokens, temperature=temperature, seed=seed,
                              controls=controls)


def eval_drafter(target: Any, drafter: Any, prompt_sets: Dict[str, Sequence[str]], *,
                 gammas: Sequence[Optional[int]] = (None,), steps: Sequence[int] = (1, 2, 4, 8),
                 commits: Sequence[str] = ("left_to_right", "confidence", "random"),
                 temperatures: Sequence[float] = (0.0, 1.0), max_new_tokens: int = 64,
                 seed: int = 0, progress: bool = True,
                 tree_budgets: Sequence[int] = (0,)) -> List[dict]:
    """Mean accepted draft tokens per round for every (prompt set, temperature, G, T, commit).

    A gamma of None is the drafter's own (its trained block minus one). Each configuration
    decodes every prompt of the set for `max_new_tokens` tokens with
    `decoding.SpecDiffDecoder` and pools the rounds. Returns one dict per configuration, with
    the hit rates by block position of those runs (top1_by_position, top4_by_position,
    counted_by_position: module docstring). A tree budget b > 0 (`tree_budgets`; 0 is the
    chain) runs the specdiff tree decoder of b nodes with its n-gram branch instead: its rows
    carry accepted/round and the first-accept rate, no position rates (a tree's rounds do not
    all draft a block).
    """
    from ..decoding import SpecDiffDecoder

    encoded = {k: [target.chat_prompt(p) for p in v] for k, v in prompt_sets.items()}
    grid = [(s, t, g, T, c, b) for s in encoded for t in temperatures for g in gammas
            for T in steps for c in commits for b in tree_budgets]
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(grid), desc="eval-drafter", unit="config", dynamic_ncols=True,
                   file=sys.stderr)
    rows = []
    for s, t, g, T, c, b in grid:
        dec = SpecDiffDecoder(target, drafter, gamma=g, steps=T, commit=c, tree_budget=b)
        if b:
            pooled = evaluate_acceptance(dec, encoded[s], max_new_tokens, temperature=t,
                                         seed=seed)
        else:
            pooled = evaluate_positions(dec, encoded[s], max_new_tokens, temperature=t,
                                        seed=seed)
        # drafts per round: the chain's gamma, or the depth of a tree's block
        tree_block = getattr(dec.drafter, "block", None)
        G = tree_block.max_drafts if tree_block is not None else dec.gamma
        row = {"prompts": s, "temperature": t, "gamma": G, "steps": T, "commit": c,
               "tree_budget": b,
               **{k: pooled.get(k) for k in ("mean_accepted", "first_accept_rate",
                                             "tokens_per_round", "rounds", "accepted_histogram",
                                             "top1_by_position", "top4_by_position",
                                             "counted_by_position")}}
        if "accepted_by_budget" in pooled:  # tree runs: every smaller budget, same rounds
            row["accepted_by_budget"] = pooled["accepted_by_budget"]
        rows.append(row)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(set=s, t=t, G=g, T=T, tree=b, acc=f"{row['mean_accepted']:.2f}")
    if bar is not None:
        bar.close()
    return rows
