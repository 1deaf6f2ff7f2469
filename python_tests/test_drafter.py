"""The block sampler (`drafter.sample_block`) over the DFlash drafter, and what the sampler relies
on in the drafter: its invariants in every commit mode and at every temperature (with and
without a draft vocabulary), its randomness per seed and offset, the GPU against the CPU, the
drafter's own weights and read-only cache, and end-to-end exactness of drafting + verify.

Exactness: a tiny DFlash drafter (V = 3, G = 2, T = 2, random weights) over a fixed context (random
feature-layer states and a last token) and a target given by random logits tables p(y_0),
p(y_1 | y_0). Many independent rows (one batch, a seed per row) draft a block with
`sample_block` and verify it with `ops.verify`; the first two generated tokens (the second
taken from the target itself when only one token was emitted) must follow p(y_0) p(y_1 | y_0).
The exact law of the round is also enumerated in float64 from the drafter's own logits: with
the point-mass rule it equals the target's law, and with the soft q everywhere (the negative
control) it does not, by a margin that the same chi-square test at the same size rejects.
(The mask is a token of the target's vocabulary, as in DFlash: a block position committed to
the mask's id reads like a masked one. The enumeration feeds the drafter the same blocks as
the sampler, so it stays exact.)

Statistical tests: Pearson chi-square (the `chi_square` helper of test_distribution.py); the
positive configurations share FAMILY_ALPHA = 1e-6 by Bonferroni, so a correct implementation
raises a false alarm in this module with probability at most 1e-6 (over the fixed seeds).
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Optional

import numpy as np
import pytest
import torch
from torch import Tensor

from specdiff_ext import ops, point_mass_mask
from specdiff_ext.drafter import DFlashConfig, DFlashDrafter, sample_block
from specdiff_ext.types import CommitMode

from sd_testutil import gen
from test_distribution import chi_square

V, H = 50, 32
MASK = 3  # the mask token's id (a target token, as in DFlash)
MODES = [CommitMode.RANDOM, CommitMode.CONFIDENCE, CommitMode.LEFT_TO_RIGHT]


def tiny_config(**kw: Any) -> DFlashConfig:
    base = dict(vocab_size=V, hidden_size=H, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                intermediate_size=64, rope_theta=10000.0, init_std=0.2, num_target_layers=6,
                mask_token_id=MASK, block_size=9, target_name="tiny-target")
    base.update(kw)
    return DFlashConfig(**base)


def target_weights(seed: int = 0) -> tuple[Tensor, Tensor]:
    """A target's input embedding and output head. Shapes: (V, H) each."""
    g = gen(seed)
    return torch.randn(V, H, generator=g), torch.randn(V, H, generator=g)


def make_drafter(seed: int = 0, draft_vocab: Optional[int] = None, **kw: Any) -> DFlashDrafter:
    """A random tiny drafter, with a draft vocabulary of `draft_vocab` random target ids."""
    torch.manual_seed(seed)
    emb, head = target_weights(seed)
    vm = None
    if draft_vocab is not None:
        vm = torch.randperm(V, generator=gen(seed + 1))[:draft_vocab]
    return DFlashDrafter(tiny_config(**kw), emb, head, vocab_map=vm).eval()


def context(drafter: DFlashDrafter, B: int, T: int, seed: int = 0) -> dict[str, Tensor]:
    """append_context arguments: the feature-layer states of T positions and a last token."""
    g = gen(seed)
    return {"features": torch.randn(B, T, drafter.config.feature_size, generator=g) * 3.0,
            "last": torch.randint(0, V, (B, 1), generator=g)}


def masked_block(drafter: DFlashDrafter, B: int, G: int, seed: int = 0,
                 frac: float = 0.5) -> Tensor:
    """A block with some committed tokens and the mask elsewhere. Shape: (B, G)."""
    g = gen(seed)
    tok = torch.randint(0, V, (B, G), generator=g)
    return tok.masked_fill(torch.rand(B, G, generator=g) < frac, drafter.config.mask_id)


# ------------------------------------------------------------------------------ structure

def test_own_weights_only() -> None:
    d = make_drafter(draft_vocab=7)
    emb, head = d._embed_weight, d._head_weight
    params = {p.data_ptr() for p in d.parameters()}
    assert emb.data_ptr() not in params and head.data_ptr() not in params
    keys = set(d.state_dict())
    assert not any("embed" in k or "head" in k or "vocab_map" in k for k in keys), keys
    assert d.head_weight().shape == (7, H)
    torch.testing.assert_close(d.head_weight(), head[d.vocab_map], atol=0, rtol=0)


def test_gradients_reach_the_drafter_only() -> None:
    emb, head = target_weights(3)
    emb.requires_grad_(True)
    head.requires_grad_(True)
    d = DFlashDrafter(tiny_config(), emb, head)
    cache = d.new_cache(2).append_context(**context(d, 2, 5, seed=1))
    loss = d.block_logits(cache, torch.full((2, 4), MASK)).logsumexp(-1).sum()
    loss.backward()
    assert all(p.grad is not None for p in d.parameters())
    assert emb.grad is None and head.grad is None


def test_block_logits_read_the_cache_and_see_the_whole_block() -> None:
    d = make_drafter()
    B, G = 2, 5
    with torch.no_grad():
        cache = d.new_cache(B).append_context(**context(d, B, 7, seed=3))
        before = [t.clone() for t in cache.keys + cache.values]
        length, last = cache.length, cache.last.clone()
        blk1 = masked_block(d, B, G, seed=4)
        blk2 = blk1.clone()
        blk2[:, -1] = (blk1[:, -1] + 1) % V  # only the last block position differs
        l1 = d.block_logits(cache, blk1)
        l2 = d.block_logits(cache, blk2)
        other = d.new_cache(B).append_context(**context(d, B, 7, seed=5))
        l3 = d.block_logits(other, blk1)
    for t0, t1 in zip(before, cache.keys + cache.values):
        assert torch.equal(t0, t1), "block_logits must not write the context cache"
    assert cache.length == length and torch.equal(cache.last, last)
    # bidirectional inside the block: position 0 sees the last position
    assert (l1[:, 0] - l2[:, 0]).abs().max() > 1e-4
    assert (l1 - l3).abs().max() > 1e-4  # and the block reads the context


# -------------------------------------------------------------------------------- sampler

SAMPLER_CASES = [(m, t, r) for m in MODES for t in ("hot", "argmax", "per_row")
                 for r in (None, 9)]


@pytest.mark.parametrize("mode,temp,reduced", SAMPLER_CASES,
                         ids=[f"{m.name.lower()}-{t}-{'K9' if r else 'V'}"
                              for m, t, r in SAMPLER_CASES])
def test_sampler_invariants(mode: CommitMode, temp: str, reduced: Optional[int]) -> None:
    d = make_drafter(seed=5, draft_vocab=reduced)
    B, G, T = 16, 6, 4
    tau: Any = {"hot": 1.3, "argmax": 0.0,
                "per_row": torch.tensor([0.0, 0.7, 1.0, 2.0] * (B // 4))}[temp]
    with torch.no_grad():
        cache = d.new_cache(B).append_context(**context(d, B, 5, seed=14))
    trace = []
    block = sample_block(d, cache, G, T, mode, temperature=tau, seed=torch.arange(B) * 11 + 3,
                         offset=2, on_step=lambda s, lg, tk, cs: trace.append(
                             (lg.clone(), tk.clone(), cs.clone())))
    assert len(trace) == T
    cs = block.commit_step
    assert cs.dtype == torch.int32 and block.ids.dtype == torch.int64
    assert bool(block.valid.all())
    assert bool(((cs >= 0) & (cs < T)).all()), cs  # everything committed, steps in [0, T)
    assert torch.equal(block.ids, trace[-1][1])
    for s, (lg, tk, c) in enumerate(trace):  # committed tokens never change
        committed = c >= 0
        assert bool((c[committed] <= s).all())
        assert bool((tk[committed] == block.ids[committed]).all())
        assert bool((c[committed] == cs[committed]).all())
        assert bool((tk[~committed] == d.config.mask_id).all())
        # each kept logits row is the one of its commit step
        now = cs == s
        assert torch.equal(block.logits[now], lg[now])
    if mode is CommitMode.LEFT_TO_RIGHT:
        assert bool((cs[:, 1:] >= cs[:, :-1]).all()), cs
    if d.vocab_map is not None:
        assert bool(torch.isin(block.ids, d.vocab_map).all())
        assert torch.equal(block.vocab_map, d.vocab_map)
        assert block.logits.shape == (B, G, reduced)
    else:
        assert bool(((block.ids >= 0) & (block.ids < V)).all())
        assert block.vocab_map is None and block.logits.shape == (B, G, V)
    want_pm = point_mass_mask(cs)
    if temp == "argmax":
        want_pm = torch.ones_like(want_pm)
    elif temp == "per_row":
        want_pm = want_pm | (tau == 0)[:, None]
    assert torch.equal(block.point_mass, want_pm)
    if temp == "argmax":  # argmax drafts: the argmax of the kept row
        j = block.logits.argmax(-1)
        assert torch.equal(block.ids, d.vocab_map[j] if d.vocab_map is not None else j)
    res = block.verify(torch.randn(B, G + 1, V), temperature=0.8, seed=1)
    assert bool(res.valid.all())


def test_sampler_randomness_per_seed_and_offset() -> None:
    d = make_drafter(seed=6)
    B, G, T = 8, 8, 3
    with torch.no_grad():
        cache = d.new_cache(B).append_context(**context(d, B, 4, seed=15))
    a = sample_block(d, cache, G, T, "random", seed=1, offset=0)
    b = sample_block(d, cache, G, T, "random", seed=1, offset=0)
    c = sample_block(d, cache, G, T, "random", seed=1, offset=1)
    assert torch.equal(a.ids, b.ids) and torch.equal(a.commit_step, b.commit_step)
    assert not (torch.equal(a.ids, c.ids) and torch.equal(a.commit_step, c.commit_step))
    with pytest.raises(ValueError, match="steps"):
        sample_block(d, cache, G, 0)
    with pytest.raises(ValueError, match="gamma"):
        sample_block(d, cache, 0, 1)


@pytest.mark.cuda
def test_cuda_matches_cpu() -> None:
    """The drafter on a GPU: fp32 logits equal the CPU's, the sampler draws the same blocks
    (same Philox streams; rows near a tie may differ), and bf16 runs end to end."""
    emb, head = target_weights(8)
    cfg = tiny_config()
    d = DFlashDrafter(cfg, emb, head).eval()
    dc = DFlashDrafter(cfg, emb.cuda(), head.cuda())
    dc.load_state_dict(d.state_dict())
    dc = dc.cuda().eval()
    B, G, T = 16, 5, 3
    ctx = context(d, B, 9, seed=20)
    blk = masked_block(d, B, G, seed=21)
    with torch.no_grad():
        cache = d.new_cache(B).append_context(**ctx)
        cache_c = dc.new_cache(B).append_context(**{k: v.cuda() for k, v in ctx.items()})
        torch.testing.assert_close(dc.block_logits(cache_c, blk.cuda()).cpu(),
                                   d.block_logits(cache, blk), atol=1e-4, rtol=1e-4)
    seeds = torch.arange(B) * 5 + 1
    a = sample_block(d, cache, G, T, "random", seed=seeds, offset=1)
    b = sample_block(dc, cache_c, G, T, "random", seed=seeds.cuda(), offset=1)
    same = ((a.ids == b.ids.cpu()) & (a.commit_step == b.commit_step.cpu())).all(1)
    assert int(same.sum()) >= B - 2, (a.ids, b.ids)
    dh = DFlashDrafter(cfg, emb.cuda().bfloat16(), head.cuda().bfloat16())
    dh.load_state_dict(d.state_dict())
    dh = dh.cuda().to(torch.bfloat16).eval()
    with torch.no_grad():
        cache_h = dh.new_cache(B).append_context(**{k: v.cuda() for k, v in ctx.items()})
    blk_h = sample_block(dh, cache_h, G, T, "confidence", temperature=0.7, seed=seeds.cuda())
    assert blk_h.logits.dtype == torch.bfloat16 and bool((blk_h.commit_step >= 0).all())
    res = blk_h.verify(torch.randn(B, G + 1, V, device="cuda"), temperature=1.0, seed=3)
    assert bool(res.valid.all())


# ------------------------------------------------------------------------------ exactness
#
# V3 = 3 target tokens, G = 2, T = 2. The drafter's linear weights are drawn at a large scale
# (its norm gains near 1) so that its distribution for one position depends strongly on the
# token committed at the other one: that dependence is what makes the soft q wrong for
# out-of-order commits. Most such worlds have near one-hot drafts (and then soft q and point
# mass hardly differ); world seed SOFT_SEED (123) was picked by enumeration for a large soft-q
# bias (TV 0.028 with random commits), CONF_SEED (53) because confidence mode commits position
# 1 first there (soft-q TV 0.057).

V3, G2, T2 = 3, 2, 2
SOFT_SEED, CONF_SEED = 123, 53
ROWS = 20_000
FAMILY_ALPHA = 1e-6
EXACT_CONFIGS = [  # (name, mode, drafter temperature, draft vocabulary, world seed)
    ("random", CommitMode.RANDOM, 1.0, None, SOFT_SEED),
    ("confidence", CommitMode.CONFIDENCE, 0.8, None, CONF_SEED),  # commits position 1 first
    ("left_to_right", CommitMode.LEFT_TO_RIGHT, 1.0, None, SOFT_SEED),
    ("random_vocab_map", CommitMode.RANDOM, 1.0, (2, 0), SOFT_SEED),
    ("random_argmax", CommitMode.RANDOM, 0.0, None, SOFT_SEED),
]
ALPHA = FAMILY_ALPHA / len(EXACT_CONFIGS)
TAU = 1.0  # target temperature


class ExactWorld:
    """A tiny DFlash drafter over a fixed context, and target tables T0 (V3,), T1 (V3, V3)."""

    def __init__(self, seed: int = SOFT_SEED, vocab_map: Optional[tuple[int, ...]] = None,
                 weight_scale: float = 8.0, head_scale: float = 1.0, mask: int = 2):
        g = gen(seed)
        hid = 16
        cfg = DFlashConfig(vocab_size=V3, hidden_size=hid, n_layers=2, n_heads=2, n_kv_heads=1,
                           head_dim=8, intermediate_size=32, num_target_layers=2,
                           target_layer_ids=[0, 1], mask_token_id=mask, block_size=G2 + 1)
        emb = torch.randn(V3, hid, generator=g)
        head = torch.randn(V3, hid, generator=g) * head_scale
        vm = None if vocab_map is None else torch.tensor(vocab_map)
        self.drafter = DFlashDrafter(cfg, emb, head, vocab_map=vm).eval()
        with torch.no_grad():
            for p in self.drafter.parameters():
                if p.dim() == 1:  # norm gains near 1 (large random gains flatten the drafts)
                    p.copy_(0.5 + torch.rand(p.shape, generator=g))
                else:
                    p.copy_(torch.randn(p.shape, generator=g) * weight_scale
                            / math.sqrt(p.shape[-1]))
        self.features = torch.randn(1, 4, cfg.feature_size, generator=g)
        self.last = torch.randint(0, V3, (1, 1), generator=g)
        self.T0 = torch.randn(V3, generator=g, dtype=torch.float64) * 2
        self.T1 = torch.randn(V3, V3, generator=g, dtype=torch.float64) * 2
        self.T2 = torch.randn(V3, V3, V3, generator=g, dtype=torch.float64) * 2  # bonus row
        self.vocab_map = vm

    def cache(self, B: int) -> Any:
        with torch.no_grad():
            return self.drafter.new_cache(B).append_context(self.features.expand(B, -1, -1),
                                                            last=self.last.expand(B, 1))

    def target_law(self) -> np.ndarray:
        """P(y0, y1) = p0(y0) p1(y1 | y0). Shape: (V3 * V3,), index y0 * V3 + y1."""
        p0 = torch.softmax(self.T0 / TAU, -1)
        p1 = torch.softmax(self.T1 / TAU, -1)
        return (p0[:, None] * p1).flatten().numpy()

    def target_logits(self, ids: Tensor) -> Tensor:
        """Target logits for the block. Shape: ids (B, 2) -> (B, 3, V3) float32."""
        B = ids.shape[0]
        rows = [self.T0.expand(B, -1), self.T1[ids[:, 0]], self.T2[ids[:, 0], ids[:, 1]]]
        return torch.stack(rows, 1).float()

    def state_logits(self) -> dict[tuple[int, int], np.ndarray]:
        """Drafter logits (float64 copies) for every block state; digit V3 = masked (the block
        the sampler feeds then holds the mask's id there)."""
        states = list(itertools.product(range(V3 + 1), repeat=G2))
        mask = self.drafter.config.mask_id
        blocks = torch.tensor([[mask if x == V3 else x for x in st] for st in states])
        with torch.no_grad():
            lg = self.drafter.block_logits(self.cache(len(states)), blocks)
        return {s: lg[i].double().numpy() for i, s in enumerate(states)}


def _softmax(x: np.ndarray, tau: float) -> np.ndarray:
    if tau == 0:
        out = np.zeros_like(x)
        out[int(np.argmax(x))] = 1.0
        return out
    z = x / tau
    e = np.exp(z - z.max())
    return e / e.sum()


def enumerated_law(w: ExactWorld, mode: CommitMode, dtau: float, soft_everywhere: bool) -> np.ndarray:
    """Exact law of (y0, y1) for one round of sample_block + verify (docs/ops.md), float64.

    Shape: (V3 * V3,), index y0 * V3 + y1.
    """
    SL = w.state_logits()
    M = V3  # masked digit
    vm = np.arange(V3) if w.vocab_map is None else w.vocab_map.numpy()

    def q_of(row: np.ndarray) -> np.ndarray:  # draft distribution over target ids
        q = np.zeros(V3)
        q[vm] = _softmax(row, dtau)
        return q

    p0 = _softmax(w.T0.numpy(), TAU)
    p1 = np.stack([_softmax(w.T1[a].numpy(), TAU) for a in range(V3)])
    L0 = SL[(M, M)]
    if mode is CommitMode.RANDOM:  # step 0 of 2: each position commits with probability 1/2
        first = [((0, 1), 0.25), ((0,), 0.25), ((1,), 0.25), ((), 0.25)]
    elif mode is CommitMode.LEFT_TO_RIGHT:
        first = [((0,), 1.0)]
    else:  # confidence: ceil(2/2) = 1 position, the most peaked one (ties: lower index)
        conf = [_softmax(L0[g], dtau if dtau > 0 else 1.0).max() for g in range(G2)]
        first = [((0,) if conf[0] >= conf[1] else (1,), 1.0)]
    Q = np.zeros((V3, V3))
    for s0, prob_s0 in first:
        for x in itertools.product(range(V3), repeat=G2):
            pr, qs, cs = prob_s0, [None] * G2, [0] * G2
            for g in s0:
                qs[g] = q_of(L0[g])
                pr *= qs[g][x[g]]
            L1 = SL[tuple(x[g] if g in s0 else M for g in range(G2))]
            for g in range(G2):
                if g not in s0:
                    qs[g], cs[g] = q_of(L1[g]), 1
                    pr *= qs[g][x[g]]
            if pr == 0.0:
                continue
            pm = [dtau == 0, dtau == 0 or cs[0] > cs[1]]
            if soft_everywhere:
                pm = [False, False]
            reach = pr
            for i, p in enumerate((p0, p1[x[0]])):
                q = np.eye(V3)[x[i]] if pm[i] else qs[i]
                accept = min(1.0, p[x[i]] / q[x[i]])
                resid = np.maximum(p - q, 0.0)
                resid = resid / resid.sum() if resid.sum() > 0 else p
                for c in range(V3):
                    if i == 0:  # only y0 emitted: y1 from the target
                        Q[c] += reach * (1 - accept) * resid[c] * p1[c]
                    else:
                        Q[x[0], c] += reach * (1 - accept) * resid[c]
                reach *= accept
            Q[x[0], x[1]] += reach
    return Q.flatten()


def sampled_counts(w: ExactWorld, mode: CommitMode, dtau: float, soft_everywhere: bool,
                   rows: int = ROWS, seed: int = 0) -> Tensor:
    """Counts of (y0, y1) over `rows` independent rounds (a seed per row). Shape: (V3 * V3,)."""
    cache = w.cache(rows)
    seeds = torch.arange(rows, dtype=torch.int64) * 1_000_003 + seed
    block = sample_block(w.drafter, cache, G2, T2, mode, temperature=dtau, seed=seeds, offset=3)
    res = ops.verify(w.target_logits(block.ids), block.ids, block.logits,
                     draft_point_mass=None if soft_everywhere else block.point_mass,
                     temperature=TAU, draft_temperature=block.temperature, seed=seeds + 17,
                     offset=3, vocab_map=block.vocab_map)
    assert bool(res.valid.all())
    y0 = res.ids[:, 0]
    p1 = torch.softmax(w.T1[y0] / TAU, -1)
    cont = torch.multinomial(p1, 1, generator=gen(seed + 99)).squeeze(1)
    y1 = torch.where(res.num_accepted >= 1, res.ids[:, 1], cont)
    return (y0 * V3 + y1).bincount(minlength=V3 * V3)


def test_enumerated_law_is_exact_with_the_point_mass_rule() -> None:
    """The enumeration itself: the rule gives the target's law for every mode; the soft q
    everywhere does not when commits can be out of order (and does with left_to_right)."""
    for name, mode, dtau, vmap, seed in EXACT_CONFIGS:
        w = ExactWorld(seed, vocab_map=vmap)
        P = w.target_law()
        Q = enumerated_law(w, mode, dtau, soft_everywhere=False)
        assert np.abs(Q - P).max() < 1e-9, (name, np.abs(Q - P).max())
        if mode is CommitMode.CONFIDENCE:  # out of order: the point-mass path is exercised
            Q_soft = enumerated_law(w, mode, dtau, soft_everywhere=True)
            assert 0.5 * np.abs(Q_soft - P).sum() > 1e-3, name
    w = ExactWorld()
    P = w.target_law()
    assert np.abs(enumerated_law(w, CommitMode.LEFT_TO_RIGHT, 1.0, True) - P).max() < 1e-9
    tv = 0.5 * np.abs(enumerated_law(w, CommitMode.RANDOM, 1.0, True) - P).sum()
    assert tv > 0.02, tv


@pytest.mark.parametrize("name,mode,dtau,vmap,seed", EXACT_CONFIGS,
                         ids=[c[0] for c in EXACT_CONFIGS])
def test_draft_and_verify_emit_the_target_law(name: str, mode: CommitMode, dtau: float,
                                              vmap: Optional[tuple[int, ...]], seed: int) -> None:
    w = ExactWorld(seed, vocab_map=vmap)
    counts = sampled_counts(w, mode, dtau, soft_everywhere=False, seed=len(name))
    p = chi_square(counts, torch.from_numpy(w.target_law()))[2]
    assert p > ALPHA, f"{name}: chi-square p-value {p:.3g} <= {ALPHA:.3g}"
    # the first emitted token alone follows p0
    p0 = torch.softmax(w.T0 / TAU, -1)
    p_first = chi_square(counts.view(V3, V3).sum(1), p0)[2]
    assert p_first > ALPHA, f"{name}: first token p-value {p_first:.3g}"


def test_soft_q_out_of_order_is_rejected() -> None:
    """Negative control: soft q everywhere (draft_point_mass=None) with random commits.

    The enumerated control law is first shown to be far enough from the target's for this
    size (its expected counts alone give a p-value far below ALPHA); then the sampled rounds
    must be rejected by the same test that the correct rule passes.
    """
    w = ExactWorld()
    P = torch.from_numpy(w.target_law())
    Q = torch.from_numpy(enumerated_law(w, CommitMode.RANDOM, 1.0, soft_everywhere=True))
    expected_p = chi_square(Q * ROWS, P)[2]
    assert expected_p < 1e-12, f"control too weak at {ROWS} rows: {expected_p:.3g}"
    counts = sampled_counts(w, CommitMode.RANDOM, 1.0, soft_everywhere=True, seed=5)
    p = chi_square(counts, P)[2]
    assert p < ALPHA, f"soft q with out-of-order commits not rejected: p-value {p:.3g}"
    # and the sampled control agrees with its own enumerated law
    assert chi_square(counts, Q / Q.sum())[2] > ALPHA
