"""Statistical tests of the laws the ops sample from, each with negative controls.

Verify: a tiny "world" whose target and drafter condition on the whole prefix (random tables
indexed by the prefix), so that the target at draft position i depends on the drafts left of
it. Many independent rows (one batch) run decode rounds: draft a block, compute the target
logits for that prefix, verify, append the emitted tokens, and start another round from the
new context until every row has L tokens. Whatever the drafter, the first L generated tokens
must follow the target's law p(t_0) p(t_1 | t_0) ... exactly. Drafters: autoregressive with
soft q, point masses (no draft logits, or draft temperature 0), a reduced drafter vocabulary,
and masked-diffusion drafters that unmask out of order (fixed schedules, and denoise_step in
random and confidence mode) verified with q chosen by point_mass_mask.

Denoise: the joint law of (committed?, token) over the positions of a block (each committed
token ~ softmax(l / tau), independently of the commit decisions and of each other), the commit
count law Binomial(M, 1/R) in random mode, and the committed tokens in confidence,
left-to-right and last-step modes.

Each test is Pearson's chi-square against the exact law (float64 enumeration), with bins
merged (smallest expected first) until every bin expects >= 10 counts. A positive test passes
when its p-value exceeds ALPHA = 1e-5 / N_POSITIVE (Bonferroni over all N_POSITIVE positive
configurations of this module), so a correct implementation raises a false alarm somewhere in
this module with probability at most 1e-5 (over the choice of the fixed seeds).

Negative controls: deliberately wrong variants that the very same tests must reject
(p-value < ALPHA): always accept; resample the correction from p instead of the residual;
soft q everywhere despite out-of-order commits; target logits shifted by one position;
a denoise step whose commit coin shares the token race's random stream; a denoise step that
commits the positions whose drawn tokens are most probable.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import pytest
import torch
from torch import Tensor

from specdiff_ext import reference as R

from sd_testutil import gen

# Positive configurations below: VERIFY_CONFIGS + DENOISE_CONFIGS + 1 commit-count test.
FAMILY_ALPHA = 1e-5
MIN_EXPECTED = 10.0


def chi_square(counts: Tensor, probs: Tensor) -> tuple[float, int, float]:
    """Pearson chi-square of observed `counts` against the exact law `probs`.

    Bins are merged, smallest expected count first, until each expects >= MIN_EXPECTED.
    An observation in a bin of probability zero gives p-value 0.

    Shape:
        counts, probs: (K,). Returns (statistic, degrees of freedom, p-value).
    """
    counts = counts.to(torch.float64)
    probs = probs.to(torch.float64)
    assert abs(float(probs.sum()) - 1.0) < 1e-9, float(probs.sum())
    if bool((counts[probs <= 0] > 0).any()):
        return math.inf, 0, 0.0
    n = float(counts.sum())
    exp = n * probs
    order = torch.argsort(exp)
    groups_o, groups_e = [], []
    acc_o = acc_e = 0.0
    for i in order.tolist():
        acc_o += float(counts[i])
        acc_e += float(exp[i])
        if acc_e >= MIN_EXPECTED:
            groups_o.append(acc_o)
            groups_e.append(acc_e)
            acc_o = acc_e = 0.0
    if acc_e > 0 or acc_o > 0:
        if groups_e:
            groups_o[-1] += acc_o
            groups_e[-1] += acc_e
        else:
            groups_o.append(acc_o)
            groups_e.append(acc_e)
    o, e = torch.tensor(groups_o, dtype=torch.float64), torch.tensor(groups_e, dtype=torch.float64)
    stat = float(((o - e) ** 2 / e).sum())
    df = len(groups_o) - 1
    if df <= 0:
        return stat, 0, 1.0
    p = float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                      torch.tensor(stat / 2, dtype=torch.float64)))
    return stat, df, p


def test_chi_square_helper() -> None:
    probs = torch.tensor([0.5, 0.3, 0.2, 0.0], dtype=torch.float64)
    stat, df, p = chi_square(torch.tensor([500, 300, 200, 0]), probs)
    assert stat == 0 and df == 3 - 1 + 0 and p == 1.0
    assert chi_square(torch.tensor([500, 300, 199, 1]), probs)[2] == 0.0
    g = gen(0)
    pv = []
    for _ in range(200):  # p-values of a correct sampler are about uniform
        c = torch.multinomial(probs, 2000, replacement=True, generator=g).bincount(minlength=4)
        pv.append(chi_square(c, probs)[2])
    assert 0.35 < sum(pv) / len(pv) < 0.65
    assert chi_square(torch.tensor([600, 250, 150, 0]), probs)[2] < 1e-6


# ----------------------------------------------------------------------------------- worlds

def _f32(x: Tensor) -> Tensor:
    """Float64 values that are exact in float32 (what the kernels read)."""
    return x.to(torch.float32).to(torch.float64)


class World:
    """Target and drafters over a tiny vocabulary, conditioning on the whole prefix.

    T[prefix]: target logits; D[prefix]: an autoregressive drafter's logits (correlated with the
    target so that acceptance is neither rare nor certain); Dm[context, state, g]: a masked
    diffusion drafter whose logits for position g depend on the context and on the tokens
    committed so far (state digit V = still masked).
    """

    def __init__(self, V: int, G: int, L: int, seed: int, scale: float = 1.5, rho: float = 0.6):
        g = gen(seed)
        self.V, self.G, self.L = V, G, L
        max_len = L - 1 + G  # longest prefix a target row of a round conditions on
        offs = [0]
        for k in range(max_len + 1):
            offs.append(offs[-1] + V**k)
        self.offsets = torch.tensor(offs, dtype=torch.int64)  # prefix length -> first index
        n = offs[max_len + 1]
        t = torch.randn(n, V, generator=g, dtype=torch.float64) * scale
        self.T = _f32(t)
        self.D = _f32(rho * t + math.sqrt(1 - rho**2) * scale *
                      torch.randn(n, V, generator=g, dtype=torch.float64))
        n_ctx = offs[L]  # contexts shorter than L
        self.Dm = _f32(torch.randn(n_ctx, (V + 1) ** G, G, V, generator=g,
                                   dtype=torch.float64) * 2.0)

    def index(self, length: Tensor, code: Tensor) -> Tensor:
        return self.offsets[length] + code

    def target_law(self, tau: float) -> Tensor:
        """Exact law of the first L tokens: P[sum_j t_j V^j]. Shape: (V^L,)."""
        V, L = self.V, self.L
        probs = torch.zeros(V**L, dtype=torch.float64)
        for seq in itertools.product(range(V), repeat=L):
            p, length, code = 1.0, 0, 0
            for t in seq:
                row = self.T[self.index(torch.tensor(length), torch.tensor(code))]
                p *= float(torch.softmax(row / tau, -1)[t])
                code += t * V**length
                length += 1
            probs[code] = p
        return probs

    def target_rows(self, ctx_len: Tensor, ctx_code: Tensor, x: Tensor) -> Tensor:
        """Target logits for the G+1 positions of a block. Shape: (R, G+1, V)."""
        R_, G = x.shape
        out = torch.empty(R_, G + 1, self.V, dtype=torch.float64)
        length, code = ctx_len.clone(), ctx_code.clone()
        for i in range(G + 1):
            out[:, i] = self.T[self.index(length, code)]
            if i < G:
                code = code + x[:, i] * self.V**length
                length = length + 1
        return out


def _sample(logits: Tensor, tau: float, g: torch.Generator) -> Tensor:
    if tau == 0:
        return logits.argmax(-1)
    u = torch.rand(logits.shape, generator=g, dtype=torch.float64).clamp_min(1e-300)
    return (logits / tau - torch.log(-torch.log(u))).argmax(-1)  # Gumbel-max


@dataclass
class Block:
    """One round's draft block and what verification needs."""

    target_logits: Tensor  # (R, G+1, V)
    draft_ids: Tensor  # (R, G)
    draft_logits: Optional[Tensor]  # (R, G, Vd)
    point_mass: Optional[Tensor]  # (R, G) bool
    vocab_map: Optional[Tensor] = None


def draft_autoregressive(world: World, ctx_len: Tensor, ctx_code: Tensor, g: torch.Generator,
                         dtau: float, vocab_map: Optional[Tensor] = None, **_: Any) -> Block:
    R_, G, V = ctx_len.shape[0], world.G, world.V
    Vd = V if vocab_map is None else vocab_map.shape[0]
    x = torch.empty(R_, G, dtype=torch.int64)
    dl = torch.empty(R_, G, Vd, dtype=torch.float64)
    length, code = ctx_len.clone(), ctx_code.clone()
    for i in range(G):
        d = world.D[world.index(length, code)]
        d = d[:, vocab_map] if vocab_map is not None else d
        dl[:, i] = d
        j = _sample(d, dtau, g)
        x[:, i] = vocab_map[j] if vocab_map is not None else j
        code = code + x[:, i] * V**length
        length = length + 1
    return Block(world.target_rows(ctx_len, ctx_code, x), x, dl, None, vocab_map)


def draft_diffusion_schedule(world: World, ctx_len: Tensor, ctx_code: Tensor,
                             g: torch.Generator, dtau: float, schedule: tuple[int, ...],
                             soft_everywhere: bool = False, **_: Any) -> Block:
    """Masked diffusion with a fixed commit schedule: position p commits at step schedule[p]."""
    R_, G, V = ctx_len.shape[0], world.G, world.V
    ctx = world.index(ctx_len, ctx_code)
    state = torch.full((R_,), sum(V * (V + 1) ** p for p in range(G)), dtype=torch.int64)
    x = torch.empty(R_, G, dtype=torch.int64)
    dl = torch.empty(R_, G, V, dtype=torch.float64)
    for s in range(max(schedule) + 1):
        now = [p for p in range(G) if schedule[p] == s]
        logits = world.Dm[ctx, state]  # (R, G, V): all positions see the same state
        for p in now:
            dl[:, p] = logits[:, p]
            x[:, p] = _sample(logits[:, p], dtau, g)
        for p in now:
            state = state + (x[:, p] - V) * (V + 1) ** p
    cs = torch.tensor(schedule, dtype=torch.int32).expand(R_, G)
    pm = torch.zeros(R_, G, dtype=torch.bool) if soft_everywhere else R.point_mass_mask(cs)
    return Block(world.target_rows(ctx_len, ctx_code, x), x, dl, pm)


def draft_diffusion_ops(world: World, ctx_len: Tensor, ctx_code: Tensor, g: torch.Generator,
                        dtau: float, ops: Any, mode: str, steps: int, denoise_seed: int,
                        **_: Any) -> Block:
    """Masked diffusion drafted by ops.denoise_step (commit order from the op's mode)."""
    R_, G, V = ctx_len.shape[0], world.G, world.V
    ctx = world.index(ctx_len, ctx_code)
    state = torch.full((R_,), sum(V * (V + 1) ** p for p in range(G)), dtype=torch.int64)
    tokens = torch.zeros(R_, G, dtype=torch.int64)
    cs = torch.full((R_, G), -1, dtype=torch.int32)
    dl = torch.empty(R_, G, V, dtype=torch.float64)
    for step in range(steps):
        logits = world.Dm[ctx, state]  # (R, G, V)
        res = ops.denoise_step(logits.float(), tokens, cs, step=step, num_steps=steps, mode=mode,
                               temperature=dtau, seed=denoise_seed, offset=step)
        assert bool(res.valid.all())
        newly = (res.commit_step == step) & (cs < 0)
        dl[newly] = logits[newly]
        digit = (res.tokens - V) * (V + 1) ** torch.arange(G)
        state = state + (digit * newly).sum(1)
        tokens, cs = res.tokens, res.commit_step
    assert bool((cs >= 0).all())
    return Block(world.target_rows(ctx_len, ctx_code, tokens), tokens, dl,
                 ops.point_mass_mask(cs))


# ------------------------------------------------------------------------ verify variants

def torch_verify(block: Block, tau: float, dtau: float, g: torch.Generator,
                 variant: str) -> tuple[Tensor, Tensor]:
    """Chain speculative sampling in plain torch, with deliberate mistakes for the controls.

    variant: "always_accept" (every draft accepted, bonus from p) or "resample_p" (the
    correction drawn from p instead of the residual). Returns ids (R, G+1), num_accepted (R,).
    """
    tl, x = block.target_logits, block.draft_ids
    R_, G1, V = tl.shape
    G = G1 - 1
    p = torch.softmax(tl / tau, -1)  # (R, G+1, V)
    onehot = torch.nn.functional.one_hot(x, V).to(p.dtype)
    q = torch.softmax(block.draft_logits / dtau, -1) if block.draft_logits is not None else onehot
    if block.point_mass is not None:
        q = torch.where(block.point_mass[..., None], onehot, q)
    px, qx = p[:, :G].gather(-1, x[..., None])[..., 0], q.gather(-1, x[..., None])[..., 0]
    acc = torch.rand(R_, G, generator=g, dtype=torch.float64) * qx < px
    if variant == "always_accept":
        acc[:] = True
    k = acc.long().cumprod(1).sum(1)
    ar = torch.arange(R_)
    q_pad = torch.cat([q, torch.zeros_like(p[:, :1])], 1)
    resid = (p[ar, k] - q_pad[ar, k]).clamp_min(0)
    if variant == "resample_p":
        resid = p[ar, k]
    resid = torch.where(resid.sum(-1, keepdim=True) > 0, resid, p[ar, k])
    tok = torch.multinomial(resid, 1, generator=g).squeeze(1)
    ids = torch.where(torch.arange(G1)[None] < k[:, None], torch.cat([x, x[:, :1]], 1), -1)
    ids[ar, k] = tok
    return ids, k


def run_rounds(world: World, n_rows: int, draft: Callable[..., Block],
               verify: Callable[[Block, int], tuple[Tensor, Tensor]], seed: int,
               **draft_kw: Any) -> Tensor:
    """Decode rounds for n_rows independent rows until each has L tokens; returns the code
    sum_j t_j V^j of every row's first L tokens. Shape: (n_rows,)."""
    V, L = world.V, world.L
    g = gen(seed)
    out = torch.full((n_rows, L), -1, dtype=torch.int64)
    count = torch.zeros(n_rows, dtype=torch.int64)
    rnd = 0
    while bool((count < L).any()):
        rows = (count < L).nonzero().squeeze(1)
        c = count[rows]
        weights = V ** torch.arange(L)
        code = (out[rows].clamp_min(0) * weights * (torch.arange(L)[None] < c[:, None])).sum(1)
        block = draft(world, c, code, g, **draft_kw)
        ids, k = verify(block, rnd)
        for j in range(world.G + 1):
            put = (j <= k) & (c + j < L)
            out[rows[put], (c + j)[put]] = ids[put, j]
        count[rows] = torch.minimum(c + k + 1, torch.tensor(L))
        rnd += 1
        assert rnd <= L
    assert bool((out >= 0).all())
    return (out * V ** torch.arange(L)).sum(1)


def ops_verifier(ops: Any, tau: Any, dtau: Any, seed: Any, shift: bool = False,
                 soft_everywhere: bool = False) -> Callable[[Block, int], tuple[Tensor, Tensor]]:
    def verify(block: Block, rnd: int) -> tuple[Tensor, Tensor]:
        tl = block.target_logits
        if shift:  # negative control: the target one position ahead
            tl = torch.cat([tl[:, 1:], tl[:, -1:]], 1)
        R_ = tl.shape[0]
        t = tau(R_) if callable(tau) else tau
        s = seed(R_, rnd) if callable(seed) else seed
        pm = block.point_mass
        if soft_everywhere and pm is not None:
            pm = torch.zeros_like(pm)
        dl = block.draft_logits.float() if block.draft_logits is not None else None
        res = ops.verify(tl.float(), block.draft_ids, dl, draft_point_mass=pm,
                         temperature=t, draft_temperature=dtau, seed=s, offset=rnd,
                         vocab_map=block.vocab_map)
        assert bool(res.valid.all())
        return res.ids, res.num_accepted
    return verify


# --------------------------------------------------------------------------- verify configs

@dataclass
class VerifyConfig:
    name: str
    V: int
    G: int
    L: int
    tau: float
    dtau: float
    draft: str  # "ar", "ar_point", "ar_argmax", "ar_vocab", "schedule", "denoise"
    schedule: tuple[int, ...] = ()
    mode: str = ""
    per_row: bool = False  # per-row temperature and seed tensors
    rows: int = 100_000
    seed: int = 0


VERIFY_CONFIGS = [
    VerifyConfig("ar_soft", 4, 3, 3, 1.0, 1.0, "ar", seed=1),
    VerifyConfig("ar_soft_temps", 3, 2, 3, 0.6, 1.3, "ar", per_row=True, seed=2),
    VerifyConfig("ar_soft_hot", 3, 3, 3, 1.7, 0.8, "ar", seed=3),
    VerifyConfig("ar_point_mass", 4, 3, 3, 1.4, 1.0, "ar_point", seed=4),
    VerifyConfig("ar_argmax_drafts", 3, 3, 3, 1.0, 0.0, "ar_argmax", seed=5),
    VerifyConfig("ar_vocab_map", 4, 2, 3, 0.9, 1.0, "ar_vocab", seed=6),
    VerifyConfig("diffusion_210", 3, 3, 2, 1.0, 1.0, "schedule", schedule=(2, 1, 0), seed=7),
    VerifyConfig("diffusion_102", 3, 3, 2, 0.7, 1.2, "schedule", schedule=(1, 0, 2), seed=8),
    VerifyConfig("diffusion_020", 3, 3, 2, 1.0, 1.0, "schedule", schedule=(0, 2, 0),
                 per_row=True, seed=9),
    VerifyConfig("denoise_random", 3, 3, 2, 0.8, 1.0, "denoise", mode="random", seed=10),
    VerifyConfig("denoise_confidence", 3, 3, 2, 1.0, 0.9, "denoise", mode="confidence",
                 seed=11),
]
DENOISE_CONFIG_COUNT = 6  # test_denoise_joint_law cases
N_POSITIVE = len(VERIFY_CONFIGS) + DENOISE_CONFIG_COUNT + 1
ALPHA = FAMILY_ALPHA / N_POSITIVE


def _draft_fn(cfg: VerifyConfig, ops: Any) -> tuple[Callable[..., Block], dict]:
    if cfg.draft == "ar":
        return draft_autoregressive, dict(dtau=cfg.dtau)
    if cfg.draft == "ar_argmax":
        return draft_autoregressive, dict(dtau=0.0)
    if cfg.draft == "ar_point":
        def point(*a: Any, **k: Any) -> Block:
            b = draft_autoregressive(*a, **k)
            return Block(b.target_logits, b.draft_ids, None, None)
        return point, dict(dtau=cfg.dtau)
    if cfg.draft == "ar_vocab":
        vmap = torch.tensor([3, 0, 2])[: cfg.V - 1]  # the drafter never proposes token 1
        return draft_autoregressive, dict(dtau=cfg.dtau, vocab_map=vmap)
    if cfg.draft == "schedule":
        return draft_diffusion_schedule, dict(dtau=cfg.dtau, schedule=cfg.schedule)
    if cfg.draft == "denoise":
        return draft_diffusion_ops, dict(dtau=cfg.dtau, ops=ops, mode=cfg.mode, steps=3,
                                         denoise_seed=cfg.seed + 100)
    raise ValueError(cfg.draft)


def _verifier(cfg: VerifyConfig, ops: Any, **kw: Any) -> Callable:
    dtau = 0.0 if cfg.draft == "ar_argmax" else cfg.dtau
    if cfg.per_row:
        tau = lambda n: torch.full((n,), cfg.tau)  # noqa: E731
        seed = lambda n, rnd: torch.randint(-(2**62), 2**62, (n,), generator=gen(rnd))  # noqa: E731
        return ops_verifier(ops, tau, dtau, seed, **kw)
    return ops_verifier(ops, cfg.tau, dtau, cfg.seed, **kw)


def _p_value(world: World, cfg: VerifyConfig, draft, kw, verify) -> float:
    codes = run_rounds(world, cfg.rows, draft, verify, seed=cfg.seed + 1000, **kw)
    counts = codes.bincount(minlength=world.V**world.L)
    return chi_square(counts, world.target_law(cfg.tau))[2]


@pytest.mark.parametrize("cfg", VERIFY_CONFIGS, ids=lambda c: c.name)
def test_verify_emits_the_target_law(ops, cfg: VerifyConfig) -> None:
    world = World(cfg.V, cfg.G, cfg.L, seed=cfg.seed)
    draft, kw = _draft_fn(cfg, ops)
    p = _p_value(world, cfg, draft, kw, _verifier(cfg, ops))
    assert p > ALPHA, f"{cfg.name}: chi-square p-value {p:.3g} <= {ALPHA:.3g}"


NEGATIVE_CONTROLS = ["always_accept", "resample_p", "soft_q_out_of_order", "target_shifted"]


@pytest.mark.parametrize("control", NEGATIVE_CONTROLS)
def test_verify_negative_controls_are_rejected(ops, control: str) -> None:
    if control == "soft_q_out_of_order":
        cfg = VERIFY_CONFIGS[6]  # diffusion_210: commits right to left
        assert cfg.schedule == (2, 1, 0)
        verify = _verifier(cfg, ops, soft_everywhere=True)
    else:
        cfg = VERIFY_CONFIGS[0]  # ar_soft
        if control == "target_shifted":
            verify = _verifier(cfg, ops, shift=True)
        else:
            g = gen(77)
            verify = lambda block, rnd: torch_verify(block, cfg.tau, cfg.dtau, g,  # noqa: E731
                                                     control)
    world = World(cfg.V, cfg.G, cfg.L, seed=cfg.seed)
    draft, kw = _draft_fn(cfg, ops)
    p = _p_value(world, cfg, draft, kw, verify)
    assert p < ALPHA, f"negative control {control} not rejected: p-value {p:.3g}"


# ------------------------------------------------------------------------------ denoise_step

@dataclass
class DenoiseConfig:
    name: str
    mode: str
    G: int
    Vd: int
    step: int
    num_steps: int
    tau: float
    per_row: bool = False
    pre_committed: tuple[int, ...] = ()  # positions committed before this step
    rows: int = 40_000
    seed: int = 0


DENOISE_CONFIGS = [
    DenoiseConfig("random_R3", "random", 3, 4, 1, 4, 1.0, seed=1),
    DenoiseConfig("random_R2_cold", "random", 3, 4, 2, 4, 0.6, per_row=True,
                  pre_committed=(1,), seed=2),
    DenoiseConfig("confidence_R2", "confidence", 4, 3, 0, 2, 1.0, seed=3),
    DenoiseConfig("confidence_R3_hot", "confidence", 4, 3, 1, 4, 1.5, pre_committed=(0,), seed=4),
    DenoiseConfig("left_to_right_R2", "left_to_right", 4, 3, 1, 3, 0.8, per_row=True, seed=5),
    DenoiseConfig("last_step", "random", 3, 4, 3, 4, 1.2, pre_committed=(), seed=6),
]
assert len(DENOISE_CONFIGS) == DENOISE_CONFIG_COUNT


def _denoise_setup(cfg: DenoiseConfig) -> tuple[Tensor, Tensor, Tensor]:
    """One logits block (1, G, Vd) repeated over the rows, and the input commit state."""
    g = gen(cfg.seed)
    logits = _f32(torch.randn(1, cfg.G, cfg.Vd, generator=g, dtype=torch.float64) * 1.5)
    cs = torch.full((1, cfg.G), -1, dtype=torch.int32)
    for p in cfg.pre_committed:
        cs[0, p] = 0
    n = cfg.rows
    return logits.expand(n, -1, -1), torch.full((n, cfg.G), 0, dtype=torch.int64), cs.expand(n, -1)


def _denoise_expected(cfg: DenoiseConfig, logits: Tensor, cs: Tensor) -> Tensor:
    """Exact joint law of the per-position outcome o_g in {0 = not committed now, 1 + v}.

    Shape: ((1+Vd)^G,), index sum_g o_g (1+Vd)^g.
    """
    G, Vd = cfg.G, cfg.Vd
    R_ = cfg.num_steps - cfg.step
    masked = (cs[0] < 0).tolist()
    probs = torch.softmax(logits[0] / cfg.tau, -1)  # (G, Vd)
    M = sum(masked)
    n = -(-M // R_)
    if R_ == 1:
        commit_p = [1.0 if m else 0.0 for m in masked]
    elif cfg.mode == "random":
        commit_p = [1.0 / R_ if m else 0.0 for m in masked]
    else:
        if cfg.mode == "confidence":
            conf = torch.softmax(logits[0] / cfg.tau, -1).amax(-1)  # docs/ops.md: te = tau
            order = sorted((g for g in range(G) if masked[g]), key=lambda g: (-float(conf[g]), g))
        else:
            order = [g for g in range(G) if masked[g]]
        chosen = set(order[:n])
        commit_p = [1.0 if g in chosen else 0.0 for g in range(G)]
    law = torch.zeros((1 + Vd) ** G, dtype=torch.float64)
    for outcome in itertools.product(range(1 + Vd), repeat=G):
        p = 1.0
        for g, o in enumerate(outcome):
            p *= (1 - commit_p[g]) if o == 0 else commit_p[g] * float(probs[g, o - 1])
        law[sum(o * (1 + Vd) ** g for g, o in enumerate(outcome))] = p
    return law


def _denoise_codes(cfg: DenoiseConfig, res: Any, cs: Tensor) -> Tensor:
    newly = (res.commit_step == cfg.step) & (cs < 0)
    o = torch.where(newly, res.tokens + 1, 0)
    return (o * (1 + cfg.Vd) ** torch.arange(cfg.G)).sum(1)


def wrong_denoise(logits: Tensor, cs: Tensor, step: int, num_steps: int, tau: float, seed: int,
                  variant: str) -> tuple[Tensor, Tensor]:
    """A denoise step with a deliberate mistake, drawing from the reference's Philox streams.

    variant "coin_from_token_stream": the commit coin of position g is the token race's
    uniform for vocabulary entry 0 (a tag collision), so it is correlated with the token.
    variant "commit_most_probable_draws": commit the ceil(M/R) positions whose drawn tokens
    have the highest probability (selection by the token drawn, which biases it).
    Returns tokens (R, G) and commit_step (R, G).
    """
    n_rows, G, Vd = logits.shape
    keys = R.row_keys(seed, n_rows)
    lg = logits.to(torch.float64)
    tok = torch.empty(n_rows, G, dtype=torch.int64)
    for g in range(G):
        e = R._exponentials_range(keys, 0, g, Vd, R.TAG_DENOISE_TOKEN, torch.float64)
        tok[:, g] = R._race(lg[:, g] / tau, e)[0]
    masked = cs < 0
    Rm = num_steps - step
    if variant == "coin_from_token_stream":
        coin = R.uniform(keys[:, None, :], 0, torch.arange(G)[None, :], 0, R.TAG_DENOISE_TOKEN)
        commit = masked & (coin < 1.0 / Rm)
    else:
        n = -(-int(masked[0].sum()) // Rm)
        p_tok = torch.softmax(lg / tau, -1).gather(-1, tok[..., None])[..., 0]
        p_tok = p_tok.masked_fill(~masked, -1.0)
        top = p_tok.topk(n, dim=1).indices
        commit = torch.zeros_like(masked).scatter(1, top, True) & masked
    return tok, torch.where(commit, step, cs)


@pytest.mark.parametrize("cfg", DENOISE_CONFIGS, ids=lambda c: c.name)
def test_denoise_joint_law(ops, cfg: DenoiseConfig) -> None:
    logits, tokens, cs = _denoise_setup(cfg)
    tau = torch.full((cfg.rows,), cfg.tau) if cfg.per_row else cfg.tau
    seed = torch.arange(cfg.rows) * 3 + cfg.seed if cfg.per_row else cfg.seed
    res = ops.denoise_step(logits.float(), tokens, cs, step=cfg.step, num_steps=cfg.num_steps,
                           mode=cfg.mode, temperature=tau, seed=seed, offset=cfg.seed)
    assert bool(res.valid.all())
    if cfg.mode != "random" or cfg.step == cfg.num_steps - 1:
        # the commit set is a function of the logits alone: the same in every row
        newly = (res.commit_step == cfg.step) & (cs < 0)
        assert bool((newly == newly[0]).all())
    counts = _denoise_codes(cfg, res, cs).bincount(minlength=(1 + cfg.Vd) ** cfg.G)
    p = chi_square(counts, _denoise_expected(cfg, logits, cs))[2]
    assert p > ALPHA, f"{cfg.name}: chi-square p-value {p:.3g} <= {ALPHA:.3g}"


def test_denoise_random_commit_count_is_binomial(ops) -> None:
    n_rows, G, Vd, T, step = 20_000, 16, 5, 4, 1
    Rm = T - step
    logits = torch.randn(1, G, Vd, generator=gen(0)).expand(n_rows, -1, -1)
    cs = torch.full((n_rows, G), -1, dtype=torch.int32)
    cs[:, 3] = 0  # M = 15 masked positions
    res = ops.denoise_step(logits, torch.zeros(n_rows, G, dtype=torch.long), cs, step=step,
                           num_steps=T, mode="random", seed=123, offset=5)
    k = ((res.commit_step == step) & (cs < 0)).sum(1)
    M = G - 1
    law = torch.tensor([math.comb(M, j) * (1 / Rm) ** j * (1 - 1 / Rm) ** (M - j)
                        for j in range(M + 1)], dtype=torch.float64)
    p = chi_square(k.bincount(minlength=M + 1), law)[2]
    assert p > ALPHA, f"commit count: chi-square p-value {p:.3g}"


@pytest.mark.parametrize("variant", ["coin_from_token_stream", "commit_most_probable_draws"])
def test_denoise_negative_controls_are_rejected(variant: str) -> None:
    cfg = DENOISE_CONFIGS[0] if variant == "coin_from_token_stream" else DENOISE_CONFIGS[2]
    logits, _, cs = _denoise_setup(cfg)
    tok, new_cs = wrong_denoise(logits, cs, cfg.step, cfg.num_steps, cfg.tau, cfg.seed, variant)

    class Res:
        tokens, commit_step = tok, new_cs

    counts = _denoise_codes(cfg, Res, cs).bincount(minlength=(1 + cfg.Vd) ** cfg.G)
    p = chi_square(counts, _denoise_expected(cfg, logits, cs))[2]
    assert p < ALPHA, f"negative control {variant} not rejected: p-value {p:.3g}"
