"""Drafting a block: T denoising steps of the block-diffusion drafter over G positions.

Each step runs the drafter on the current block (committed tokens fed back, [MASK] elsewhere)
and `specdiff_ext.ops.denoise_step` draws tokens and decides which positions commit (the MDLM
log-linear schedule, commit probability 1/(T - s) at step s, lives in that op). The block keeps,
for every position, the logits row of the step at which it was committed, and the point-mass
flags of the order-aware exactness rule (docs/design.md section 3), so that `ops.verify` emits exactly
the target's distribution whatever the commit order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor

from .. import ops
from ..types import CommitMode
from .dflash import DFlashCache, DFlashDrafter

__all__ = ["DraftBlock", "sample_block"]

Temperature = Union[float, Tensor]
StepHook = Callable[[int, Tensor, Tensor, Tensor], None]


@dataclass
class DraftBlock:
    """One drafted block and everything `ops.verify` needs to stay exact.

    Attributes
    ----------
    ids : int64 tensor
        Shape: (B, G). Draft tokens as target ids (the vocab_map already applied).
    commit_step : int32 tensor
        Shape: (B, G). Denoising step at which each position was committed; -1 only in rows
        whose drafter logits were invalid (NaN / inf), where ids is 0 and point_mass True.
    logits : tensor
        Shape: (B, G, Vd). The drafter logits each token was drawn from (its commit step).
    point_mass : bool tensor
        Shape: (B, G). ``point_mass_mask(commit_step)``, everywhere True for argmax drafts
        (temperature 0) and in invalid rows.
    vocab_map : int64 tensor or None
        Shape: (Vd,). Target id of each drafter logit column (a draft vocabulary).
    temperature : float or float tensor
        Shape: () or (B,). The drafter temperature the tokens were drawn at.
    valid : bool tensor
        Shape: (B,). False where a drafter logits row was invalid.
    """

    ids: Tensor
    commit_step: Tensor
    logits: Tensor
    point_mass: Tensor
    vocab_map: Optional[Tensor]
    temperature: Temperature
    valid: Tensor

    def verify(self, target_logits: Tensor, *, temperature: Temperature = 1.0,
               seed: Any = 0, offset: int = 0) -> Any:
        """`ops.verify` of this block against the target.

        Shape:
            target_logits: (B, G+1, V). Returns a VerifyResult (ids (B, G+1), num_accepted (B,),
            valid (B,)).
        """
        return ops.verify(target_logits, self.ids, self.logits, draft_point_mass=self.point_mass,
                          temperature=temperature, draft_temperature=self.temperature,
                          seed=seed, offset=offset, vocab_map=self.vocab_map)


@torch.no_grad()
def sample_block(
    drafter: DFlashDrafter,
    cache: DFlashCache,
    gamma: int,
    steps: int,
    mode: Union[CommitMode, str] = CommitMode.RANDOM,
    temperature: Temperature = 1.0,
    seed: Any = 0,
    offset: int = 0,
    on_step: Optional[StepHook] = None,
    filters: Optional[dict] = None,
) -> DraftBlock:
    """Draft `gamma` tokens after each row's context in `steps` denoising steps.

    Parameters
    ----------
    drafter : DFlashDrafter
    cache : DFlashCache
        The context and last token of every row (read only).
    gamma : int
        G, the drafts of the block (the drafter is trained on blocks of block_size - 1).
    steps : int
        T >= 1 denoising steps; every position is committed after the last one.
    mode : CommitMode or str
        random (MDLM ancestral), confidence or left_to_right.
    temperature : float or float tensor
        Shape: () or (B,). Drafter temperature; 0 draws argmax tokens (then every draft is a
        point mass for verification).
    seed : int or int64 tensor
        Shape: () or (B,). As in `ops.denoise_step`.
    offset : int
        Round counter: step s of this call draws at op offset ``offset * steps + s``, so every
        step of every round gets fresh randomness (keep offset * steps + steps < 2^56).
    filters : dict, optional
        top_k / top_p / min_p (``ops.filter_logits``) to draft with; the returned logits are
        then the filtered ones (the law the drafts were drawn from).
    on_step : callable, optional
        Called after each step as on_step(s, logits (B, G, Vd), tokens (B, G),
        commit_step (B, G)) with the state after the step (inspection, tests).

    Returns
    -------
    DraftBlock

    Examples
    --------
    >>> import torch
    >>> from specdiff_ext.drafter import DFlashConfig, DFlashDrafter
    >>> cfg = DFlashConfig(vocab_size=50, hidden_size=32, n_heads=4, n_kv_heads=2, head_dim=8,
    ...                    intermediate_size=64, num_target_layers=6, mask_token_id=3)
    >>> d = DFlashDrafter(cfg, torch.randn(50, 32), torch.randn(50, 32))
    >>> cache = d.new_cache(2).append_context(torch.randn(2, 6, cfg.feature_size),
    ...                                       last=torch.tensor([[4], [9]]))
    >>> block = sample_block(d, cache, gamma=4, steps=2, mode="left_to_right", seed=1)
    >>> block.ids.shape, block.commit_step.tolist()
    (torch.Size([2, 4]), [[0, 0, 1, 1], [0, 0, 1, 1]])
    """
    for name, val in (("gamma", gamma), ("steps", steps)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 1:
            raise ValueError(f"{name} must be a positive int, got {val!r}")
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise ValueError(f"offset must be a non-negative int, got {offset!r}")
    mode = CommitMode.parse(mode)
    B, dev = cache.batch_size, cache.device
    vocab_map = drafter.vocab_map
    tokens = torch.full((B, gamma), drafter.config.mask_id, dtype=torch.int64, device=dev)
    commit = torch.full((B, gamma), -1, dtype=torch.int32, device=dev)
    kept: Optional[Tensor] = None  # (B, G, Vd): logits row of each position's commit step
    valid = torch.ones(B, dtype=torch.bool, device=dev)
    for s in range(steps):
        logits = drafter.block_logits(cache, tokens)  # (B, G, Vd)
        if filters:
            logits = ops.filter_logits(logits, temperature=temperature, **filters)
        res = ops.denoise_step(logits, tokens, commit, step=s, num_steps=steps, mode=mode,
                               temperature=temperature, seed=seed, offset=offset * steps + s,
                               vocab_map=vocab_map, check_values=False)
        newly = (res.commit_step >= 0) & (commit < 0)  # (B, G)
        kept = logits if kept is None else torch.where(newly[..., None], logits, kept)
        tokens, commit = res.tokens, res.commit_step
        valid &= res.valid
        if on_step is not None:
            on_step(s, logits, tokens, commit)
    assert kept is not None
    uncommitted = commit < 0  # only in invalid rows
    point_mass = ops.point_mass_mask(commit) | uncommitted
    if isinstance(temperature, Tensor):
        point_mass |= (temperature.to(dev) == 0)[:, None]
    elif float(temperature) == 0.0:
        point_mass[:] = True
    # A point-mass draft is exact whatever it is: invalid rows draft token 0 (and accept it
    # with probability p(0)), rather than handing the [MASK] id to verify.
    ids = tokens.masked_fill(uncommitted, 0)
    return DraftBlock(ids=ids, commit_step=commit, logits=kept, point_mass=point_mass,
                      vocab_map=vocab_map, temperature=temperature, valid=valid)
