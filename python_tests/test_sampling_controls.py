"""Sampling controls: top-k, top-p, min-p (ops.filter_logits and the filter arguments of
verify, rejection_sample, gather_logprobs and denoise_step) and the repetition / presence /
frequency penalties (ops.apply_penalties).

Filter semantics are checked against transformers' own logits warpers and against the float64
reference (reference.filter_logits); the fused CPU verify against verify of filter_logits'
output, bit for bit; the law verification emits against exact enumeration (chi-square, with
negative controls that the same test must reject). The ops under test are sd_testutil.impl()
(the reference itself under SPECDIFF_TEST_IMPL=reference).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from specdiff_ext import reference as R

from sd_testutil import filtered_law, gen, impl
from test_distribution import World, chi_square, draft_autoregressive

ops = impl()  # specdiff_ext.ops, or the reference under SPECDIFF_TEST_IMPL=reference

transformers = pytest.importorskip("transformers")
from transformers.generation.logits_process import (  # noqa: E402
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)


def hf_dropped(x: torch.Tensor, tau: float, k: int, p: float, mp: float) -> torch.Tensor:
    """Entries transformers' generate() warpers drop (in its order). Shape: x (B, V)."""
    s = TemperatureLogitsWarper(tau)(None, x.clone())
    if k:
        s = TopKLogitsWarper(k)(None, s)
    if p < 1.0:
        s = TopPLogitsWarper(p)(None, s)
    if mp > 0.0:
        s = MinPLogitsWarper(mp)(None, s)
    return torch.isinf(s)


def dropped(x: torch.Tensor, **kw) -> torch.Tensor:
    return torch.isinf(ops.filter_logits(x[:, None], **kw)[:, 0])


def ref_dropped(x: torch.Tensor, tau: float, k: int, p: float, mp: float) -> torch.Tensor:
    """Entries the float64 reference drops. Shape: x (B, V)."""
    out = R.filter_logits(x[:, None].double(), temperature=tau, top_k=k, top_p=p, min_p=mp)
    return torch.isinf(out[:, 0])


SETTINGS = [  # (tau, top_k, top_p, min_p)
    (1.0, 0, 1.0, 0.0), (1.0, 1, 1.0, 0.0), (0.7, 5, 1.0, 0.0), (1.3, 50, 1.0, 0.0),
    (1.0, 0, 0.9, 0.0), (0.8, 0, 0.5, 0.0), (1.5, 0, 0.05, 0.0), (1.0, 0, 1.0, 0.1),
    (0.6, 0, 1.0, 0.01), (1.0, 40, 0.9, 0.05), (1.2, 3, 0.95, 0.2), (1.0, 10_000, 0.8, 0.0),
    (2.0, 20, 0.7, 0.0), (1.0, 0, 0.99, 0.02),
]


@pytest.mark.parametrize("V", [7, 300, 5000])
@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: "t{}-k{}-p{}-m{}".format(*s))
def test_filter_matches_transformers_warpers(V: int, setting: tuple) -> None:
    tau, k, p, mp = setting
    x = torch.randn(6, V, generator=gen(V + k)) * 3.0  # continuous values: no ties
    want = hf_dropped(x, tau, k, p, mp)
    got = dropped(x, temperature=tau, top_k=k, top_p=p, min_p=mp)
    assert torch.equal(got, want)
    assert bool((~got).any(1).all())  # at least one entry kept
    # the float64 reference agrees too
    assert torch.equal(ref_dropped(x, tau, k, p, mp), want)


def test_filter_edge_settings() -> None:
    x = torch.randn(4, 100, generator=gen(1)) * 2
    for off in (dict(top_k=0), dict(top_k=100), dict(top_k=10**9), dict(top_p=1.0),
                dict(min_p=0.0), {}):
        assert torch.equal(ops.filter_logits(x[:, None], **off)[:, 0], x)
    k1 = ops.filter_logits(x[:, None], top_k=1)[:, 0]  # k = 1 is greedy
    assert torch.equal(torch.isfinite(k1).nonzero()[:, 1], x.argmax(-1))
    # temperature 0 rows pass through whatever the filters say (greedy ignores them)
    assert torch.equal(ops.filter_logits(x[:, None], temperature=0.0, top_k=1)[:, 0], x)
    # min_p = 1 keeps the top entry (and entries tied with it)
    m1 = ops.filter_logits(torch.tensor([[[1.0, 3.0, 3.0, 2.0]]]), min_p=1.0)
    assert torch.isfinite(m1).tolist() == [[[False, True, True, False]]]


def test_filter_ties() -> None:
    # top-k keeps every entry tied with the k-th, as transformers' TopKLogitsWarper
    x = torch.tensor([[2.0, 1.0, 2.0, 1.0, 1.0, 0.0]])
    assert torch.isfinite(ops.filter_logits(x[:, None], top_k=2)[:, 0]).tolist() == [[True, False, True, False, False, False]]
    assert torch.isfinite(ops.filter_logits(x[:, None], top_k=3)[:, 0]).tolist() == [[True, True, True, True, True, False]]
    assert torch.equal(dropped(x, top_k=3), hf_dropped(x, 1.0, 3, 1.0, 0.0))
    # top-p walks a stable ascending sort: of tied entries the lower indices go first
    y = torch.tensor([[1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0]])
    got = dropped(y, top_p=0.5)
    assert got.tolist() == [[True, True, False, True, False, True, False, True]]
    assert torch.equal(got, hf_dropped(y, 1.0, 0, 0.5, 0.0))  # torch's sort is stable here
    # heavy ties against the float64 reference (p chosen so that no boundary is an exact tie)
    for trial in range(60):
        V = 20 + 37 * trial
        z = (torch.randn(3, V, generator=gen(trial)) * 1.5).round().clamp(-3, 3) + 0.0
        for tau, k, p, mp in ((1.0, 0, 0.37, 0.0), (1.5, 0, 0.83, 0.0), (0.7, V // 3, 0.61, 0.0),
                              (1.0, V // 2, 0.43, 0.13), (1.3, 0, 0.71, 0.3)):
            want = ref_dropped(z, tau, k, p, mp)
            assert torch.equal(dropped(z, temperature=tau, top_k=k, top_p=p, min_p=mp), want), (trial, tau, k, p, mp)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_filter_per_row_settings_and_dtypes(dtype: torch.dtype) -> None:
    B, N, V = 5, 3, 2000
    x = (torch.randn(B, N, V, generator=gen(3)) * 3).to(dtype)
    tau = torch.tensor([1.0, 0.7, 0.0, 1.4, 1.0])
    k = torch.tensor([0, 20, 5, 0, 300])
    p = torch.tensor([0.9, 1.0, 0.5, 0.3, 0.95])
    mp = torch.tensor([0.0, 0.05, 0.0, 0.1, 0.01])
    out = ops.filter_logits(x, temperature=tau, top_k=k, top_p=p, min_p=mp)
    assert out.dtype == dtype
    for b in range(B):
        row = ops.filter_logits(x[b:b + 1], temperature=float(tau[b]), top_k=int(k[b]),
                                top_p=float(p[b]), min_p=float(mp[b]))
        assert torch.equal(out[b:b + 1], row)
        if tau[b] > 0:
            want = ref_dropped(x[b].float(), float(tau[b]), int(k[b]), float(p[b]), float(mp[b]))
            assert torch.equal(torch.isinf(out[b]), want)
        kept = torch.isfinite(out[b])
        assert torch.equal(out[b][kept], x[b][kept])  # kept entries are untouched
    # numpy in, numpy out
    xn = x.float().numpy()
    assert np.array_equal(ops.filter_logits(xn, top_k=7), ops.filter_logits(x.float(), top_k=7).numpy())


def test_filtered_row_with_nan_passes_through() -> None:
    x = torch.randn(2, 1, 50, generator=gen(4))
    x[1, 0, 7] = float("nan")
    out = ops.filter_logits(x, top_k=3)
    assert torch.isnan(out[1, 0, 7]) and int(torch.isfinite(out[0, 0]).sum()) == 3
    r = ops.verify(x, torch.zeros(2, 0, dtype=torch.long), top_k=3)
    assert r.valid.tolist() == [True, False]


# ----------------------------------------------------------------------- verify, bit for bit
@pytest.mark.parametrize("draft", ["soft", "point", "mixed", "vocab_map"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_verify_equals_verify_of_filtered_logits(draft: str, dtype: torch.dtype) -> None:
    B, G, V = 64, 4, 3000
    g = gen(11)
    tl = (torch.randn(B, G + 1, V, generator=g) * 2.5).to(dtype)
    vm = None
    if draft == "vocab_map":
        vm = torch.randperm(V, generator=g)[: V // 2]
        dl = (tl[:, :G, vm].float() + torch.randn(B, G, V // 2, generator=g)).to(dtype)
        x = vm[tl[:, :G, vm].float().argmax(-1)]
    else:
        # drafts correlated with the target so that some are accepted
        dl = (tl[:, :G].float() + torch.randn(B, G, V, generator=g)).to(dtype)
        x = torch.distributions.Categorical(logits=tl[:, :G].float() / 0.5).sample()
    if draft == "point":
        dl = None
    pm = (torch.rand(B, G, generator=g) < 0.3) if draft == "mixed" else None
    tau = torch.rand(B, generator=g) * 1.2 + 0.3
    tau[::7] = 0.0  # greedy rows in the same batch
    kw = dict(temperature=tau, top_k=torch.randint(0, 60, (B,), generator=g),
              top_p=torch.rand(B, generator=g) * 0.6 + 0.4, min_p=torch.rand(B, generator=g) * 0.1)
    n_acc = 0
    for seed in range(6):
        fused = ops.verify(tl, x, dl, draft_point_mass=pm, seed=seed, offset=seed, vocab_map=vm, **kw)
        masked = ops.filter_logits(tl, temperature=tau, top_k=kw["top_k"], top_p=kw["top_p"], min_p=kw["min_p"])
        plain = ops.verify(masked, x, dl, draft_point_mass=pm, temperature=tau, seed=seed, offset=seed, vocab_map=vm)
        assert torch.equal(fused.ids, plain.ids)
        assert torch.equal(fused.num_accepted, plain.num_accepted)
        assert bool(fused.valid.all())
        # every emitted token is one the filters keep at its position
        G1 = fused.ids.shape[1]
        for i in range(G1):
            ids = fused.ids[:, i]
            ok = ids >= 0
            assert bool(torch.isfinite(masked[ok, i].float().gather(-1, ids[ok, None])).all())
        n_acc += int(fused.num_accepted.sum())
    assert n_acc > 0
    # greedy rows are unchanged by the filters
    g0 = ops.verify(tl, x, dl, temperature=0.0, top_k=1, top_p=0.1, min_p=0.5, vocab_map=vm)
    assert torch.equal(g0.ids, ops.verify(tl, x, dl, temperature=0.0, vocab_map=vm).ids)


def test_rejection_sample_and_gather_with_filters() -> None:
    B, G, V = 8, 3, 500
    g = gen(12)
    tl = torch.randn(B, G + 1, V, generator=g) * 2
    dl = tl[:, :G] + torch.randn(B, G, V, generator=g)
    x = torch.distributions.Categorical(logits=tl[:, :G]).sample()
    kw = dict(top_k=30, top_p=0.8, min_p=0.02)
    gt = ops.gather_logprobs(tl, torch.cat([x, x[:, :1]], 1), 0.9, **kw)
    ref = filtered_law(tl, 0.9, **kw)  # (B, G+1, V)
    lp_ref = torch.log(ref.gather(-1, torch.cat([x, x[:, :1]], 1)[..., None])[..., 0])
    fin = torch.isfinite(lp_ref)
    assert torch.equal(torch.isfinite(gt.logprobs), fin)
    assert torch.allclose(gt.logprobs[fin].double(), lp_ref[fin], atol=2e-5)
    dlse = ops.gather_logprobs(dl, x, 0.9).lse
    a = ops.rejection_sample(tl, x, dl, target_lse=gt.lse, draft_lse=dlse, temperature=0.9,
                             draft_temperature=0.9, seed=3, **kw)
    b = ops.verify(tl, x, dl, temperature=0.9, draft_temperature=0.9, seed=3, **kw)
    assert torch.equal(a.ids, b.ids)


def test_denoise_step_draws_from_the_filtered_law() -> None:
    """Chi-square of 40k one-step draws per row setting against the filtered law (false-alarm
    rate 1e-5 / 3 per setting); the unfiltered law is rejected by the same test."""
    V, n = 12, 40_000
    logits = torch.randn(V, generator=gen(13)) * 1.5
    for tau, k, p, mp in ((1.0, 4, 1.0, 0.0), (0.8, 0, 0.7, 0.0), (1.2, 6, 0.9, 0.1)):
        lg = logits.expand(n, 1, V).contiguous()
        res = ops.denoise_step(lg, torch.zeros(n, 1, dtype=torch.long),
                               torch.full((n, 1), -1, dtype=torch.int32), step=0, num_steps=1,
                               temperature=tau, seed=k + 17, top_k=k, top_p=p, min_p=mp)
        counts = res.tokens[:, 0].bincount(minlength=V)
        want = filtered_law(logits, tau, top_k=k, top_p=p, min_p=mp)
        assert chi_square(counts, want)[2] > 1e-5 / 3
        assert chi_square(counts, torch.softmax(logits.double() / tau, -1))[2] < 1e-5 / 3
        kept = R.filter_logits(logits.double()[None, None], temperature=tau, top_k=k, top_p=p,
                               min_p=mp)[0, 0]
        lse = torch.logsumexp(kept / float(torch.tensor(tau, dtype=torch.float32)), -1)
        assert abs(float(res.lse[0, 0]) - float(lse)) < 1e-5


# -------------------------------------------------------------------- penalties
def _penalized_row(row: torch.Tensor, seen: list, r: float, presence: float,
                   frequency: float) -> torch.Tensor:
    """docs/ops.md's penalties of one row, token by token (float64). Shape: row (V,)."""
    out = row.clone()
    for t in set(seen):
        c = seen.count(t)
        y = float(out[t])
        y = y * r if y < 0 else y / r
        out[t] = y - presence - frequency * c
    return out


def test_penalties_match_transformers_and_the_reference() -> None:
    B, N, V, L = 3, 4, 40, 20
    g = gen(14)
    logits = torch.randn(B, N, V, generator=g) * 3
    ids = torch.randint(0, 12, (B, L), generator=g)  # small range: repeats
    lengths = torch.tensor([5, 0, 16])
    out = ops.apply_penalties(logits, ids, lengths, repetition_penalty=1.3)
    for b in range(B):
        for n in range(N):
            seen = ids[b, : int(lengths[b]) + n]
            if len(seen):
                want = RepetitionPenaltyLogitsProcessor(1.3)(seen[None], logits[b, n][None].clone())[0]
            else:
                want = logits[b, n]
            assert torch.allclose(out[b, n], want, atol=1e-6, rtol=1e-6), (b, n)
    rep = torch.tensor([1.0, 1.2, 0.8])
    pres = torch.tensor([0.5, 0.0, -0.2])
    freq = torch.tensor([0.1, 0.3, 0.0])
    out = ops.apply_penalties(logits.to(torch.bfloat16), ids.int(), lengths,
                              repetition_penalty=rep, presence_penalty=pres, frequency_penalty=freq)
    assert out.dtype == torch.float32
    ref = R.apply_penalties(logits.to(torch.bfloat16).double(), ids.int(), lengths,
                            repetition_penalty=rep, presence_penalty=pres, frequency_penalty=freq)
    for b in range(B):
        for n in range(N):
            want = _penalized_row(logits[b, n].to(torch.bfloat16).double(),
                                  ids[b, : int(lengths[b]) + n].tolist(), float(rep[b]),
                                  float(pres[b]), float(freq[b]))
            assert torch.allclose(out[b, n].double(), want, atol=1e-5), (b, n)
            assert torch.allclose(ref[b, n], want, atol=1e-12), (b, n)
    # off is the identity
    assert torch.equal(ops.apply_penalties(logits, ids, lengths), logits)


# ------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("kw, match", [
    (dict(top_k=-1), "top_k must be >= 0"),
    (dict(top_k=2.5), "top_k must be an int"),
    (dict(top_k=True), "top_k must be"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5), "top_p must be in"),
    (dict(top_p=float("nan")), "top_p must be in"),
    (dict(min_p=-0.1), r"min_p must be in \[0, 1\]"),
    (dict(min_p=float("nan")), "min_p must be in"),
    (dict(top_k=torch.tensor([1, -2])), "top_k must be >= 0"),
    (dict(top_p=torch.tensor([0.5, 0.0])), "top_p must be in"),
    (dict(top_p=torch.tensor([0.5])), r"top_p must have shape \(B,\)"),
    (dict(min_p=torch.tensor([0, 1])), "min_p must be a float"),
])
def test_bad_filter_values_are_named(kw: dict, match: str) -> None:
    x = torch.randn(2, 3, 10)
    d = torch.zeros(2, 2, dtype=torch.long)
    for call in (lambda: ops.filter_logits(x, **kw), lambda: ops.verify(x, d, **kw),
                 lambda: ops.gather_logprobs(x, torch.zeros(2, 3, dtype=torch.long), **kw),
                 lambda: ops.denoise_step(x, torch.zeros(2, 3, dtype=torch.long),
                                          torch.full((2, 3), -1, dtype=torch.int32), step=0,
                                          num_steps=1, **kw)):
        with pytest.raises((ValueError, TypeError), match=match):
            call()


@pytest.mark.parametrize("kw, match", [
    (dict(repetition_penalty=0.0), "repetition_penalty must be finite and > 0"),
    (dict(repetition_penalty=float("nan")), "repetition_penalty"),
    (dict(presence_penalty=float("inf")), "presence_penalty must be finite"),
    (dict(frequency_penalty=torch.tensor([0.0, float("nan")])), "frequency_penalty"),
    (dict(lengths=7), "lengths"),
    (dict(lengths=-1), "lengths"),
    (dict(ids=torch.full((2, 8), 10)), r"ids holds 10"),
])
def test_bad_penalty_values_are_named(kw: dict, match: str) -> None:
    x = torch.randn(2, 3, 10)
    args = dict(ids=torch.zeros(2, 8, dtype=torch.long), lengths=2)
    args.update({k: kw.pop(k) for k in list(kw) if k in args})
    with pytest.raises((ValueError, TypeError), match=match):
        ops.apply_penalties(x, args["ids"], args["lengths"], **kw)


# ---------------------------------------------------------------- the emitted law (chi-square)
# Rows of one batch carry different settings; each setting's rows are tested against that
# setting's exact law of the first L tokens. Positive tests: len(LAW_CONFIGS) x settings,
# Bonferroni at a family-wide false-alarm rate of 1e-5.
ROW_SETTINGS = [  # (top_k, top_p, min_p)
    (2, 1.0, 0.0), (0, 0.6, 0.0), (0, 1.0, 0.3), (3, 0.8, 0.1),
]
PENALTY = dict(repetition_penalty=1.6, presence_penalty=0.3, frequency_penalty=0.2)
LAW_CONFIGS = [  # (name, V, G, L, tau, dtau, drafts, penalties)
    ("soft", 4, 3, 3, 1.0, 1.0, "soft", False),
    ("soft_hot", 4, 2, 3, 1.4, 0.8, "soft", False),
    ("point_mass", 4, 3, 3, 0.9, 1.0, "point", False),
    ("penalties", 4, 3, 3, 1.0, 1.0, "soft", True),
]
ALPHA = 1e-5 / (len(LAW_CONFIGS) * len(ROW_SETTINGS))
ROWS = 160_000


def exact_law(world: World, tau: float, setting: tuple, penalties: bool) -> torch.Tensor:
    V, L = world.V, world.L
    k, p, mp = setting
    probs = torch.zeros(V**L, dtype=torch.float64)
    for code in range(V**L):
        seq = [(code // V**j) % V for j in range(L)]
        pr, c = 1.0, 0
        for j, t in enumerate(seq):
            row = world.T[world.index(torch.tensor(j), torch.tensor(c))]
            if penalties:
                seen = torch.tensor([seq[:j]], dtype=torch.long)
                row = R.apply_penalties(row.double()[None, None], seen, j, **PENALTY)[0, 0]
            pr *= float(filtered_law(row, tau, top_k=k, top_p=p, min_p=mp)[t])
            c += t * V**j
        probs[code] = pr
    return probs


def run_law(world: World, tau: float, dtau: float, drafts: str, penalties: bool,
            control: str = "", seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode rounds (draft, penalise, verify with per-row filters) until every row has L
    tokens. Returns (codes of the first L tokens, setting index of each row)."""
    V, L, G = world.V, world.L, world.G
    g = gen(seed)
    n = ROWS
    which = torch.arange(n) % len(ROW_SETTINGS)
    st = torch.tensor(ROW_SETTINGS, dtype=torch.float64)[which]
    out = torch.full((n, L), -1, dtype=torch.int64)
    count = torch.zeros(n, dtype=torch.int64)
    rnd = 0
    while bool((count < L).any()):
        rows = (count < L).nonzero().squeeze(1)
        c = count[rows]
        code = (out[rows].clamp_min(0) * V ** torch.arange(L) * (torch.arange(L)[None] < c[:, None])).sum(1)
        block = draft_autoregressive(world, c, code, g, dtau=dtau)
        x = block.draft_ids
        tl = block.target_logits.float()
        dl = block.draft_logits.float() if drafts == "soft" else None
        k, p, mp = st[rows, 0].long(), st[rows, 1].float(), st[rows, 2].float()
        if penalties:
            ids = torch.cat([out[rows].clamp_min(0), torch.zeros(len(rows), G, dtype=torch.long)], 1)
            ids.scatter_(1, c[:, None] + torch.arange(G)[None], x)
            pen = PENALTY
            if control == "penalties_without_drafts":  # every position sees the context only
                tl = torch.cat([ops.apply_penalties(tl[:, i:i + 1], ids, c, **pen) for i in range(G + 1)], 1)
            else:
                tl = ops.apply_penalties(tl, ids, c, **pen)
        kw = dict(top_k=k, top_p=p, min_p=mp)
        if control == "unfiltered_p":
            kw = {}
        if control == "filtered_q":  # the filters applied to the drafts' q instead of p
            dl = ops.filter_logits(dl, temperature=dtau, **kw)
            kw = {}
        res = ops.verify(tl, x, dl, temperature=tau, draft_temperature=dtau, seed=seed + 5,
                         offset=rnd, **kw)
        assert bool(res.valid.all())
        ids_, acc = res.ids, res.num_accepted
        for j in range(G + 1):
            put = (j <= acc) & (c + j < L)
            out[rows[put], (c + j)[put]] = ids_[put, j]
        count[rows] = torch.minimum(c + acc + 1, torch.tensor(L))
        rnd += 1
    return (out * V ** torch.arange(L)).sum(1), which


def _worst_p(cfg: tuple, control: str = "") -> float:
    name, V, G, L, tau, dtau, drafts, penalties = cfg
    world = World(V, G, L, seed=len(name) + 31)
    codes, which = run_law(world, tau, dtau, drafts, penalties, control, seed=len(name))
    pv = []
    for s, setting in enumerate(ROW_SETTINGS):
        counts = codes[which == s].bincount(minlength=V**L)
        pv.append(chi_square(counts, exact_law(world, tau, setting, penalties))[2])
    return min(pv)


@pytest.mark.parametrize("cfg", LAW_CONFIGS, ids=lambda c: c[0])
def test_verify_emits_the_filtered_law(cfg: tuple) -> None:
    p = _worst_p(cfg)
    assert p > ALPHA, f"{cfg[0]}: smallest chi-square p-value {p:.3g} <= {ALPHA:.3g}"


@pytest.mark.parametrize("control, cfg", [
    ("unfiltered_p", LAW_CONFIGS[0]),
    ("filtered_q", LAW_CONFIGS[0]),
    ("penalties_without_drafts", LAW_CONFIGS[3]),
])
def test_filtered_law_negative_controls_are_rejected(control: str, cfg: tuple) -> None:
    p = _worst_p(cfg, control)
    assert p < ALPHA, f"control {control} was not rejected (p-value {p:.3g})"


@pytest.mark.parametrize("spike", [10.0, 18.0, 30.0, 60.0, 150.0])
def test_filter_confident_rows(spike: float) -> None:
    """Rows whose top entries stand far above the rest (the k-th largest can lie beyond every
    window of the candidate search)."""
    g = gen(int(spike))
    x = torch.randn(8, 3000, generator=g) * 2
    for r in range(8):
        x[r, torch.randint(0, 3000, (r + 1,), generator=g)] += spike * (1 + 0.1 * r)
    for tau, k, p, mp in ((1.0, 50, 0.9, 0.05), (0.7, 50, 0.9, 0.0), (1.0, 5, 0.999, 0.0),
                          (1.3, 200, 1.0, 0.0), (1.0, 0, 0.999, 0.0), (1.0, 0, 0.99, 0.0),
                          (1.0, 100, 1.0, 1e-6)):
        want = hf_dropped(x, tau, k, p, mp)
        assert torch.equal(dropped(x, temperature=tau, top_k=k, top_p=p, min_p=mp), want), (tau, k, p, mp)
