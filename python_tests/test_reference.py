"""The reference itself: Philox known answers, random-number helpers, point_mass_mask and the
structural invariants of its verify / denoise_step."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from sd_testutil import check_verify_structure, gen, rand_logits
from specdiff_ext import reference as R

M32 = 0xFFFFFFFF


def _philox_int(c: list[int], k: list[int]) -> list[int]:
    """Philox-4x32-10 on Python ints: an independent check of the int64 emulation."""
    c, k = list(c), list(k)
    for r in range(10):
        if r:
            k = [(k[0] + 0x9E3779B9) & M32, (k[1] + 0xBB67AE85) & M32]
        p0, p1 = 0xD2511F53 * c[0], 0xCD9E8D57 * c[2]
        c = [((p1 >> 32) ^ c[1] ^ k[0]) & M32, p1 & M32, ((p0 >> 32) ^ c[3] ^ k[1]) & M32, p0 & M32]
    return c


# Random123 known-answer vectors (kat_vectors, philox4x32_10).
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((M32, M32, M32, M32), (M32, M32), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter,key,expected", KAT)
def test_philox_known_answers(counter, key, expected) -> None:
    out = R.philox4x32_10(torch.tensor(counter), torch.tensor(key))
    assert tuple(int(w) for w in out) == expected


def test_philox_matches_integer_arithmetic_and_broadcasts() -> None:
    g = np.random.default_rng(0)
    c = g.integers(0, 2**32, size=(64, 4), dtype=np.int64)
    c[:8] = M32  # extremes of the 16-bit split
    k = g.integers(0, 2**32, size=(64, 2), dtype=np.int64)
    out = R.philox4x32_10(torch.from_numpy(c), torch.from_numpy(k))
    assert out.shape == (64, 4) and out.dtype == torch.int64
    for i in range(64):
        assert out[i].tolist() == _philox_int(c[i].tolist(), k[i].tolist()), i
    # broadcasting one key over many counters
    one = R.philox4x32_10(torch.from_numpy(c), torch.from_numpy(k[0]))
    assert one[5].tolist() == _philox_int(c[5].tolist(), k[0].tolist())


def test_splitmix64_and_row_keys() -> None:
    assert R.splitmix64(0) == 0xE220A8397B1DCDAF  # first output of SplitMix64 seeded with 0
    for seed in (0, 1, -1, 2**63 - 1, -(2**63), 12345678901234567):
        keys = R.row_keys(seed, 5)
        assert keys.shape == (5, 2) and keys.dtype == torch.int64
        for b in range(5):
            k = R.splitmix64((seed + 0x9E3779B97F4A7C15 * (b + 1)) & (2**64 - 1))
            assert keys[b].tolist() == [k & M32, k >> 32]
    seeds = torch.tensor([0, -1, 2**62, -(2**63)], dtype=torch.int64)
    keys = R.row_keys(seeds, 4)
    for b, s in enumerate(seeds.tolist()):
        k = R.splitmix64(s & (2**64 - 1))
        assert keys[b].tolist() == [k & M32, k >> 32]
    with pytest.raises(ValueError, match="seed"):
        R.row_keys(seeds, 3)


def test_uniform_strictly_inside_unit_interval() -> None:
    words = torch.tensor([0, 1, 2**24, 2**31, M32 - 200, M32 - 1, M32], dtype=torch.int64)
    w = R._words_to_uniform(words)
    assert w.dtype == torch.float32
    assert float(w[0]) == 2.0**-33
    assert float(w[-1]) == float.fromhex("0x1.fffffep-1")
    assert bool(((w > 0) & (w < 1)).all())
    # float32 formula: (float(x) + 0.5f) * 2^-32, against NumPy float32 arithmetic
    xs = np.random.default_rng(1).integers(0, 2**32, size=100_000, dtype=np.int64)
    want = np.minimum((xs.astype(np.float32) + np.float32(0.5)) * np.float32(2.0**-32),
                      np.float32(float.fromhex("0x1.fffffep-1")))
    np.testing.assert_array_equal(R._words_to_uniform(torch.from_numpy(xs)).numpy(), want)
    keys = R.row_keys(3, 1000)
    u = R.uniform(keys[:, None, :], 5, 2, torch.arange(7)[None, :], R.TAG_CORRECTION)
    assert u.shape == (1000, 7)
    assert bool(((u > 0) & (u < 1)).all())
    assert abs(float(u.double().mean()) - 0.5) < 0.01
    e = R.exponential(keys, 0, 0, 0, R.TAG_ACCEPT)
    assert bool((torch.isfinite(e) & (e > 0)).all())


def test_counter_layout() -> None:
    """random_words addresses (index >> 2, position, offset low, offset high | tag << 24)."""
    key = torch.tensor([0x12345678, 0x9ABCDEF0])
    offset = (0xABCDEF << 32) | 0x01234567
    for index, position, tag in [(0, 0, 1), (5, 3, 2), (4099, 17, 3), (2, 9, 4)]:
        word = R.random_words(key, offset, position, index, tag)
        c = [index >> 2, position, offset & M32, (offset >> 32) | (tag << 24)]
        assert int(word) == _philox_int(c, key.tolist())[index & 3]
    ranged = R._exponentials_range(key[None], offset, 3, 11, 2, torch.float64)
    single = R.exponential(key, offset, 3, torch.arange(11), 2)
    torch.testing.assert_close(ranged[0], single, rtol=0, atol=0)
    with pytest.raises(ValueError, match="offset"):
        R.random_words(key, 1 << 56, 0, 0, 1)


def test_matches_cpp_twin() -> None:
    """The reference draws the very words of the compiled extension (when it is built)."""
    C = pytest.importorskip("specdiff_ext._C")
    for c, k, expected in KAT:
        assert tuple(C.philox4x32_10(*c, *k)) == expected
    g = np.random.default_rng(2)
    for _ in range(50):
        seed = int(g.integers(-(2**63), 2**63 - 1))
        row = int(g.integers(0, 100))
        offset = int(g.integers(0, 2**56))
        position, index = int(g.integers(0, 64)), int(g.integers(0, 2**20))
        tag = int(g.integers(1, 5))
        word, u, gumbel = C.philox_word(seed, row, offset, position, index, tag)
        key = R.row_keys(seed, row + 1)[row]
        assert word == int(R.random_words(key, offset, position, index, tag))
        assert u == float(R.uniform(key, offset, position, index, tag))
        want_g = -math.log(float(R.exponential(key, offset, position, index, tag)))
        assert math.isclose(gumbel, want_g, rel_tol=1e-5, abs_tol=1e-5), (gumbel, want_g)


# ---------------------------------------------------------------------------- point_mass_mask

@pytest.mark.parametrize(
    "steps,expected",
    [
        ([0, 0, 0], [0, 0, 0]),
        ([2, 1, 0], [0, 1, 1]),
        ([0, 1, 2], [0, 0, 0]),
        ([1, 0, 1], [0, 1, 0]),
        ([2, 2, 1, 2], [0, 0, 1, 0]),
        ([0, 3, 1, 2, 3], [0, 0, 1, 1, 0]),
        ([0, -1, 1], [0, 1, 0]),
        ([5], [0]),
    ],
)
def test_point_mass_mask_cases(steps, expected) -> None:
    for dtype in (torch.int32, torch.int64):
        out = R.point_mass_mask(torch.tensor([steps], dtype=dtype))
        assert out.dtype == torch.bool
        assert out[0].tolist() == [bool(e) for e in expected]


def test_point_mass_mask_shapes_and_brute_force() -> None:
    assert R.point_mass_mask(torch.zeros(0, 4, dtype=torch.int32)).shape == (0, 4)
    assert R.point_mass_mask(torch.zeros(3, 0, dtype=torch.int32)).shape == (3, 0)
    cs = torch.randint(-1, 4, (50, 7), generator=gen(0), dtype=torch.int32)
    out = R.point_mass_mask(cs)
    for b in range(50):
        row = cs[b].tolist()
        want = [l > 0 and max(row[:l]) > row[l] for l in range(7)]
        assert out[b].tolist() == want
    np_out = R.point_mass_mask(cs.numpy())
    assert isinstance(np_out, np.ndarray) and np_out.tolist() == out.tolist()


# ------------------------------------------------------------------------------------ verify

def _drafts(tl: torch.Tensor, seed: int) -> torch.Tensor:
    """Drafts that are often the target's argmax (so that some get accepted)."""
    B, G1, V = tl.shape
    g = gen(seed)
    am = tl[:, : G1 - 1].float().argmax(-1)
    rnd = torch.randint(0, V, (B, G1 - 1), generator=g)
    return torch.where(torch.rand(B, G1 - 1, generator=g) < 0.7, am, rnd)


@pytest.mark.parametrize("draft", ["point", "soft", "soft_pm"])
@pytest.mark.parametrize("tau", [0.0, 0.8, "per_row"])
def test_reference_verify_structure(draft, tau) -> None:
    B, G, V = 300, 5, 9
    tl = rand_logits((B, G + 1, V), seed=1)
    x = _drafts(tl, 2)
    dl = rand_logits((B, G, V), seed=3) if draft != "point" else None
    pm = torch.rand(B, G, generator=gen(4)) < 0.3 if draft == "soft_pm" else None
    if tau == "per_row":
        tau = torch.where(torch.arange(B) % 3 == 0, 0.0, 1.3)
    res = R.verify(tl, x, dl, draft_point_mass=pm, temperature=tau, seed=5)
    check_verify_structure(res, x, V)
    assert bool(res.valid.all())
    if draft == "point" and not isinstance(tau, torch.Tensor) and tau == 0.0:
        am = tl.argmax(-1)
        for b in range(B):
            k = int(res.num_accepted[b])
            assert res.ids[b, : k + 1].tolist() == am[b, : k + 1].tolist()
    # rejection_sample with the gathered lse is verify
    zeros = torch.zeros(B, G + 1, dtype=torch.long)  # float64 logits: float64 lse, as verify's
    t_lse = R.gather_logprobs(tl.double(), zeros, tau).lse
    d_lse = R.gather_logprobs(dl.double(), zeros[:, :G], 1.0).lse if dl is not None else None
    rs = R.rejection_sample(tl, x, dl, target_lse=t_lse, draft_lse=d_lse, draft_point_mass=pm,
                            temperature=tau, seed=5)
    assert torch.equal(rs.ids, res.ids) and torch.equal(rs.num_accepted, res.num_accepted)
    # float32 compute agrees but for near-ties
    r32 = R.verify(tl, x, dl, draft_point_mass=pm, temperature=tau, seed=5,
                   compute_dtype=torch.float32)
    assert (r32.ids != res.ids).any(dim=1).sum() <= 2


def test_reference_one_hot_target_reproduces_target_tokens() -> None:
    B, G, V = 64, 6, 11
    g = gen(7)
    tgt = torch.randint(0, V, (B, G + 1), generator=g)
    tl = torch.full((B, G + 1, V), -math.inf).scatter(2, tgt[..., None], 0.0)
    x = torch.where(torch.rand(B, G, generator=g) < 0.8, tgt[:, :G], (tgt[:, :G] + 1) % V)
    for dl in (None, rand_logits((B, G, V), seed=8)):
        res = R.verify(tl, x, dl, temperature=0.9, seed=9)
        k = res.num_accepted
        for b in range(B):
            kb = int(k[b])
            assert res.ids[b, : kb + 1].tolist() == tgt[b, : kb + 1].tolist()
            mism = (x[b] != tgt[b, :G]).nonzero()
            assert kb == (int(mism[0]) if len(mism) else G)


def test_reference_invalid_rows() -> None:
    B, G, V = 6, 3, 5
    tl = rand_logits((B, G + 1, V), seed=1)
    x = tl[:, :G].argmax(-1)  # always accepted at tau = 0
    tl[1, 0, 2] = math.nan
    tl[2, 1] = -math.inf
    tl[3, 3, 0] = math.inf
    tl[4, 0, 0] = -math.inf  # one -inf entry: still valid
    x[5, 0] = (x[5, 0] + 1) % V  # greedy rejection at 0 ...
    tl[5, 1, 0] = math.nan  # ... so the NaN at position 1 is never read
    res = R.verify(tl, x, temperature=0.0)
    assert res.valid.tolist() == [True, False, False, False, True, True]
    assert bool((res.ids[1:4] == -1).all()) and res.num_accepted[1:4].tolist() == [0, 0, 0]
    assert res.num_accepted[5] == 0 and res.ids[5, 0] == tl[5, 0].argmax()


# ------------------------------------------------------------------------------- denoise_step

@pytest.mark.parametrize("mode", list(R.CommitMode))
def test_reference_denoise_structure(mode) -> None:
    B, G, Vd, T = 40, 6, 5, 3
    logits = rand_logits((B, G, Vd), seed=1)
    tokens = torch.zeros(B, G, dtype=torch.int64)
    cs = torch.full((B, G), -1, dtype=torch.int32)
    for step in range(T):
        res = R.denoise_step(logits, tokens, cs, step=step, num_steps=T, mode=mode, seed=step)
        newly = (res.commit_step == step) & (cs < 0)
        assert bool((res.commit_step[cs >= 0] == cs[cs >= 0]).all()), "commits never change"
        assert bool((res.tokens[cs >= 0] == tokens[cs >= 0]).all())
        assert bool(torch.isnan(res.lse[cs >= 0]).all())
        assert bool(torch.isfinite(res.lse[cs < 0]).all())
        M = (cs < 0).sum(1)
        n = (M + (T - step) - 1) // (T - step)
        if mode != R.CommitMode.RANDOM or step == T - 1:
            assert newly.sum(1).tolist() == n.tolist()
        if mode == R.CommitMode.LEFT_TO_RIGHT:
            assert bool((res.commit_step[:, :-1] <= res.commit_step[:, 1:]).all() | (step < T - 1))
        tokens, cs = res.tokens, res.commit_step
    assert bool((cs >= 0).all()), "everything is committed at the last step"


def test_reference_denoise_invalid_position_stays_masked() -> None:
    logits = rand_logits((2, 3, 4), seed=2)
    logits[0, 1, 0] = math.nan
    cs = torch.full((2, 3), -1, dtype=torch.int32)
    res = R.denoise_step(logits, torch.zeros(2, 3, dtype=torch.long), cs, step=0, num_steps=1)
    assert res.valid.tolist() == [False, True]
    assert res.commit_step.tolist() == [[0, -1, 0], [0, 0, 0]]
    assert math.isnan(float(res.lse[0, 1]))


# ------------------------------------------------------------------------------ naive_verify

@pytest.mark.parametrize("draft_logits", [False, True])
@pytest.mark.parametrize("tau", [0.0, 1.0])
def test_naive_verify_structure(draft_logits, tau) -> None:
    B, G, V = 200, 4, 6
    tl = rand_logits((B, G + 1, V), seed=3)
    x = _drafts(tl, 4)
    dl = rand_logits((B, G, V), seed=5) if draft_logits else None
    res = R.naive_verify(tl, x, dl, temperature=tau, generator=gen(0))
    check_verify_structure(res, x, V)
    if tau == 0.0:
        want = R.verify(tl, x, temperature=0.0)
        assert torch.equal(res.ids, want.ids)
    assert R.naive_verify(tl[:0], x[:0], temperature=tau).ids.shape == (0, G + 1)


def test_commit_mode_parse() -> None:
    assert R.CommitMode.parse("Confidence") is R.CommitMode.CONFIDENCE
    assert R.CommitMode.parse(2) is R.CommitMode.LEFT_TO_RIGHT
    with pytest.raises(ValueError, match="mode"):
        R.CommitMode.parse("bogus")
    with pytest.raises(TypeError, match="mode"):
        R.CommitMode.parse(1.5)
    assert list(itertools.islice(R.CommitMode, 3)) == [0, 1, 2]


# ------------------------------------------------------------------- the twin of the ops

TWINS = ["verify", "rejection_sample", "gather_logprobs", "denoise_step", "point_mass_mask",
         "filter_logits", "apply_penalties"]


@pytest.mark.parametrize("name", TWINS)
def test_reference_has_the_ops_signatures(name) -> None:
    """Same names, argument names, kinds and defaults as specdiff_ext.ops; the reference adds
    only compute_dtype (keyword-only, last)."""
    import inspect

    ops = pytest.importorskip("specdiff_ext.ops")
    want = [(p.name, p.kind, p.default)
            for p in inspect.signature(getattr(ops, name)).parameters.values()]
    params = list(inspect.signature(getattr(R, name)).parameters.values())
    if params and params[-1].name == "compute_dtype":
        assert params[-1].kind == inspect.Parameter.KEYWORD_ONLY
        params = params[:-1]
    assert [(p.name, p.kind, p.default) for p in params] == want
    assert name in R.__all__


def test_reference_output_dtypes_follow_the_ops_and_float64() -> None:
    """The ops' output dtypes for the ops' input dtypes; float64 logits (the reference only)
    give float64 outputs."""
    B, N, V = 3, 2, 11
    ids = torch.zeros(B, N, dtype=torch.long)
    cs = torch.full((B, N), -1, dtype=torch.int32)
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        x = rand_logits((B, N, V), dtype, seed=1)
        out = torch.float64 if dtype == torch.float64 else torch.float32
        g = R.gather_logprobs(x, ids, 0.8, top_k=3)
        assert g.lse.dtype == out and g.logprobs.dtype == out
        assert R.denoise_step(x, ids, cs, step=0, num_steps=2, min_p=0.1).lse.dtype == out
        assert R.apply_penalties(x, ids, 0, repetition_penalty=1.2).dtype == out
        f = R.filter_logits(x, temperature=0.7, top_p=0.5)
        assert f.dtype == dtype and f.shape == x.shape
        kept = torch.isfinite(f)
        assert torch.equal(f[kept], x[kept]), "kept entries are the input's"


def test_reference_filters_per_row_equal_one_row_at_a_time() -> None:
    B, N, V = 6, 2, 40
    x = rand_logits((B, N, V), torch.float64, seed=2, scale=3.0)
    tau = torch.tensor([1.0, 0.7, 0.0, 1.4, 1.0, 0.9])
    k = torch.tensor([0, 5, 3, 0, 50, 1])
    p = torch.tensor([0.9, 1.0, 0.5, 0.3, 0.95, 1.0])
    mp = torch.tensor([0.0, 0.05, 0.0, 0.1, 0.0, 0.2])
    out = R.filter_logits(x, temperature=tau, top_k=k, top_p=p, min_p=mp)
    for b in range(B):
        one = R.filter_logits(x[b:b + 1], temperature=float(tau[b]), top_k=int(k[b]),
                              top_p=float(p[b]), min_p=float(mp[b]))
        assert torch.equal(out[b:b + 1], one), b
    assert torch.equal(out[2], x[2]), "a greedy row passes through"
    # verify / gather / denoise with the filters are those ops on the filtered logits
    tl = rand_logits((B, 4, V), seed=3)
    xd = torch.randint(0, V, (B, 3), generator=gen(4))
    kw = dict(temperature=tau.float(), top_k=k, top_p=p.float(), min_p=mp.float())
    filt = R.filter_logits(tl, **kw)
    a = R.verify(tl, xd, seed=5, **kw)
    b = R.verify(filt, xd, seed=5, temperature=tau.float())
    assert torch.equal(a.ids, b.ids) and torch.equal(a.num_accepted, b.num_accepted)
    ga = R.gather_logprobs(tl, torch.zeros(B, 4, dtype=torch.long), tau.float(), top_k=k,
                           top_p=p.float(), min_p=mp.float())
    gb = R.gather_logprobs(filt, torch.zeros(B, 4, dtype=torch.long), tau.float())
    torch.testing.assert_close(ga.lse, gb.lse, rtol=0, atol=0, equal_nan=True)


def test_reference_penalties_count_each_position_s_history() -> None:
    x = torch.tensor([[[2.0, -2.0, 1.0, 0.5]] * 3])  # (1, 3, 4)
    ids = torch.tensor([[1, 1, 0, 3, 2]])  # context [1, 1]; drafts 0, 3 at positions 0, 1
    out = R.apply_penalties(x, ids, 2, repetition_penalty=2.0, presence_penalty=0.5,
                            frequency_penalty=0.25)
    pen1 = -2.0 * 2 - 0.5 - 0.25 * 2  # token 1 seen twice
    pen0 = 2.0 / 2 - 0.5 - 0.25  # token 0 seen once (from position 1 on)
    assert out[0, 0].tolist() == [2.0, pen1, 1.0, 0.5]
    assert out[0, 1].tolist() == [pen0, pen1, 1.0, 0.5]
    assert out[0, 2].tolist() == [pen0, pen1, 1.0, 0.5 / 2 - 0.5 - 0.25]
    with pytest.raises(ValueError, match="lengths"):
        R.apply_penalties(x, ids, 4)  # 4 > L - (N - 1) = 3
