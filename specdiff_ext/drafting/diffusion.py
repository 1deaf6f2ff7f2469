"""Drafting with the DFlash block-diffusion drafter: T denoising steps per block through
`drafter.sample_block`, as the decode loop's `Drafter` protocol asks."""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
from torch import Tensor

from .. import ops
from ..defaults import DEFAULTS
from ..drafter.dflash import DFlashDrafter
from ..drafter.sampler import sample_block
from ..types import CommitMode, Draft

__all__ = ["DiffusionDrafting", "check_steps", "MAX_STEPS"]

MAX_STEPS = 64  # denoising steps per block: more than the block's positions buys nothing


def check_steps(steps: Any) -> int:
    """The denoising steps per block, checked: an int in [1, MAX_STEPS]."""
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
        raise ValueError(f"steps must be an int in [1, {MAX_STEPS}] (denoising steps per block), "
                         f"got {steps!r}")
    return steps


class DiffusionDrafting:
    """Drafting with a block-diffusion drafter: T denoising steps through `sample_block`.

    Parameters
    ----------
    drafter : DFlashDrafter
        On the target's device. It reads the target's feature-layer states at every context
        position (the verification forward returns those of the accepted tokens) and drafts at
        most block_size - 1 tokens.
    steps : int, optional
        Denoising steps T per block (1: one parallel pass). None: `DEFAULTS.steps`.
    commit : CommitMode or str, optional
        random, confidence or left_to_right (exact at every temperature in each mode). None:
        `DEFAULTS.commit`.
    draft_temperature : float, optional
        None: the target's temperature (0 for greedy decoding).
    draft_filters : bool, optional
        Draft with the target's top-k / top-p / min-p too (q is then the filtered law);
        False: from the drafter's plain tempered law. Both are exact; the filtered law accepts
        more (`benchmarks/results/draft_filters_cpu.md`). None: `DEFAULTS.draft_filters`.

    Attributes
    ----------
    max_drafts : int
        The most drafts one block can hold: the drafter's trained block_size - 1.
    cache : DFlashCache
        The drafter's context cache of the current text (after `start`).
    last_logits : tensor or None
        Shape: (1, g, Vd). The last `draft` block's drafter logits (each position's row of the
        step that committed it: with T = 1 the block's marginals), at every temperature, columns
        mapped to target ids by the drafter's ``vocab_map``; kept by reference for evals
        (`bench.evals.position_hit_rates`), at no cost to the round.
    """

    def __init__(self, drafter: DFlashDrafter, steps: Optional[int] = None,
                 commit: Union[CommitMode, str, None] = None,
                 draft_temperature: Optional[float] = None,
                 draft_filters: Optional[bool] = None) -> None:
        self.steps = check_steps(DEFAULTS.steps if steps is None else steps)
        if not isinstance(drafter, DFlashDrafter):
            raise TypeError(f"drafter must be a DFlashDrafter, got {type(drafter).__name__}")
        cfg = drafter.config
        self.drafter = drafter
        self.commit = CommitMode.parse(DEFAULTS.commit if commit is None else commit)
        self.draft_temperature = draft_temperature
        self.draft_filters = bool(DEFAULTS.draft_filters if draft_filters is None else draft_filters)
        self.feature_layers = list(cfg.feature_layers)
        self.max_drafts: int = cfg.block_size - 1
        self.cache: Any = None
        self.last_logits: Optional[Tensor] = None
        # the next round's first-step logits, computed for a batch of rows at once
        # (`batching.prefetch_blocks`); used by `draft` when they fit, then dropped
        self.prefetched: Optional[Tensor] = None

    def start(self, prompt: Tensor, seed: int, temperature: float,
              hidden: Optional[Tensor], filters: Optional[dict] = None) -> None:
        self._seed = seed
        self._dtau = temperature if self.draft_temperature is None else float(self.draft_temperature)
        self._filters = (filters or None) if self.draft_filters else None
        self.cache = self.drafter.new_cache(1)
        if hidden is None:  # context position t holds the target's states at t
            hidden = prompt.new_zeros((1, 0, self.drafter.config.feature_size),
                                      dtype=self.cache.dtype)
        self.cache.append_context(hidden, last=prompt[:, -1:])

    def _first_step(self, gamma: int) -> Any:
        """The drafter for this round's block: the model, or the model answering its first
        step with the logits `batching.prefetch_blocks` computed for it (a prefetch is used
        once, by the round it was made for)."""
        pre, self.prefetched = self.prefetched, None
        if pre is not None and pre.shape[1] == gamma:
            return _FirstStep(self.drafter, pre)
        return self.drafter

    def draft(self, gamma: int, rnd: int) -> Draft:
        b = sample_block(self._first_step(gamma), self.cache, gamma, self.steps, self.commit,
                         temperature=self._dtau, seed=self._seed, offset=rnd,
                         filters=self._filters)
        self.last_logits = b.logits
        return Draft(b.ids, b.logits if self._dtau > 0 else None, b.point_mass, self._dtau,
                     b.vocab_map)

    def marginals(self, gamma: int, rnd: int) -> Tensor:
        """The block's per-position logits a tree is grown from ((1, gamma, Vd), filtered as
        `draft`'s, columns in the drafter's vocabulary), also kept as `last_logits`. With one
        denoising step these are the fully masked block's marginals: one drafter pass, no
        draws (the tree does not use the block's sampled tokens). With more steps, `draft`'s
        logits (each position's row of the step that committed it)."""
        if self.steps != 1:
            self.draft(gamma, rnd)
            assert self.last_logits is not None
            return self.last_logits
        mask = torch.full((1, gamma), self.drafter.config.mask_id, dtype=torch.int64,
                          device=self.cache.device)
        with torch.no_grad():
            logits = self._first_step(gamma).block_logits(self.cache, mask)
        if self._filters:
            logits = ops.filter_logits(logits, temperature=self._dtau, **self._filters)
        self.last_logits = logits
        return logits

    def accept(self, emitted: Tensor, n_acc: int, hidden: Optional[Tensor]) -> None:
        # states at [last, x_1 .. x_n]; the correction (or bonus) token starts the next block
        self.cache.append_context(hidden, last=emitted[:, n_acc:])


class _FirstStep:
    """The drafter, but its first `block_logits` call answers with logits computed already."""

    def __init__(self, drafter: Any, logits: Tensor) -> None:
        self._drafter, self._logits = drafter, logits

    def __getattr__(self, name: str) -> Any:
        return getattr(self._drafter, name)

    def block_logits(self, cache: Any, block_tokens: Tensor) -> Tensor:
        lg, self._logits = self._logits, None
        return lg if lg is not None else self._drafter.block_logits(cache, block_tokens)
