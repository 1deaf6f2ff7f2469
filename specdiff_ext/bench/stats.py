"""Statistics of generate runs: the per-phase clock of a decode loop, one run's statistics and
several runs pooled.

- `PhaseClock`: wall time split into named phases (``with clock("draft"): ...``); on CUDA the
  phases are timed with events read once at the end, so timing adds no host synchronisation to
  a round.
- `run_stats`: the ``stats`` dict of one `GenerateResult` (see `decoding.GenerateResult`).
- `pool_stats`: the statistics of several runs pooled (totals, then ratios of the totals).

This module imports nothing of the package: the decode loop (`specdiff_ext.decoding`) uses it,
and the benchmark runner and evals above it read its results.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Iterator, List, Optional, Sequence

import torch

__all__ = ["PhaseClock", "run_stats", "pool_stats"]


class PhaseClock:
    """Wall time split into named phases (``draft``, ``verify``; the rest is ``other``)."""

    PHASES = ("draft", "verify")

    def __init__(self, device: torch.device) -> None:
        self.cuda = torch.device(device).type == "cuda"
        self.spans: dict = {p: [] for p in self.PHASES}
        self.t0 = time.perf_counter()

    def _mark(self) -> Any:
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        start = self._mark()
        try:
            yield
        finally:
            self.spans[phase].append((start, self._mark()))

    def finish(self) -> dict:
        """seconds (wall time since construction), draft_seconds, verify_seconds,
        other_seconds."""
        if self.cuda:
            torch.cuda.synchronize()
            secs = {k: sum(a.elapsed_time(b) for a, b in v) / 1e3 for k, v in self.spans.items()}
        else:
            secs = {k: sum(b - a for a, b in v) for k, v in self.spans.items()}
        total = time.perf_counter() - self.t0
        return {"seconds": total, "draft_seconds": secs["draft"], "verify_seconds": secs["verify"],
                "other_seconds": max(total - secs["draft"] - secs["verify"], 0.0)}


def run_stats(clock: PhaseClock, new_tokens: int, rounds: int, accepted: int, seed: int,
              hist: Optional[List[int]] = None) -> dict:
    """The statistics of one generate run (the fields `decoding.GenerateResult` lists)."""
    s = clock.finish()
    s.update(
        accepted_histogram=list(hist) if hist is not None else [rounds],
        new_tokens=new_tokens,
        tokens_per_second=new_tokens / s["seconds"] if s["seconds"] > 0 else float("inf"),
        rounds=rounds,
        accepted=accepted,
        mean_accepted=accepted / rounds if rounds else 0.0,
        tokens_per_round=new_tokens / rounds if rounds else 0.0,
        seed=seed,
    )
    return s


def pool_stats(stats: Sequence[dict]) -> dict:
    """The statistics of several `generate` runs pooled: totals of new_tokens, seconds,
    rounds, accepted, the time split and the accepted histogram, and the ratios over the
    totals (tokens_per_second, mean_accepted, tokens_per_round, first_accept_rate: rounds that
    accepted at least one draft). Runs without rounds (transformers' generate) contribute
    tokens and seconds only."""
    toks = sum(st["new_tokens"] for st in stats)
    secs = sum(st["seconds"] for st in stats)
    out: dict = {"new_tokens": toks, "seconds": secs,
                 "tokens_per_second": toks / secs if secs > 0 else 0.0}
    spec = [st for st in stats if "rounds" in st]
    if spec:
        rounds = sum(st["rounds"] for st in spec)
        acc = sum(st["accepted"] for st in spec)
        hist = [0] * max(len(st["accepted_histogram"]) for st in spec)
        for st in spec:
            for j, c in enumerate(st["accepted_histogram"]):
                hist[j] += c
        out.update(rounds=rounds, accepted=acc,
                   mean_accepted=acc / rounds if rounds else 0.0,
                   tokens_per_round=sum(st["new_tokens"] for st in spec) / rounds if rounds else 0.0,
                   first_accept_rate=(rounds - hist[0]) / rounds if rounds else 0.0,
                   accepted_histogram=hist)
        for k in ("draft_seconds", "verify_seconds", "other_seconds"):
            out[k] = sum(st[k] for st in spec)
        by_budget: dict = {}  # tree runs: accepted in the same rounds by each smaller budget
        for st in spec:
            for b, n in st.get("accepted_by_budget", {}).items():
                by_budget[b] = by_budget.get(b, 0) + n
        if by_budget:
            out["accepted_by_budget"] = by_budget
    return out
