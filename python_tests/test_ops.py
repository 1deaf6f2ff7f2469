"""Every op against the float64 reference (specdiff_ext.reference), over awkward sizes,
dtypes and memory layouts, plus the behaviour a caller relies on: seeds and offsets, greedy
rows, invalid rows, empty batches, numpy in / numpy out, reduced drafter vocabularies.

Sampled ids must equal the reference's (same Philox numbers). A row may differ only where the
reference shows a decision within 1e-4 (relative) of a tie, which float32 may decide the
other way (sd_testutil.assert_same_samples).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sd_testutil import (
    LAYOUTS,
    assert_same_samples,
    check_verify_structure,
    denoise_with_margin,
    gen,
    layout,
    rand_logits,
    tau_per_row,
    verify_with_margin,
)
from specdiff_ext import reference as R
from specdiff_ext.types import CommitMode

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
VERIFY_FIELDS = ("ids", "num_accepted", "valid")
DENOISE_FIELDS = ("tokens", "commit_step", "valid")

# (B, N, V): batch 0 / 1 / 33, vocabularies 1, 7, 1031, 32001, 49152; big V only with small B*N.
GATHER_SHAPES = [
    (0, 2, 7), (1, 1, 1), (33, 3, 1), (1, 5, 7), (33, 2, 7), (33, 2, 1031), (2, 3, 32001),
    (1, 2, 49152),
]
# (B, G, V)
VERIFY_SHAPES = [
    (0, 3, 7), (1, 0, 7), (33, 0, 1031), (1, 1, 1), (33, 8, 1), (33, 1, 7), (33, 8, 7),
    (33, 17, 7), (5, 8, 1031), (2, 3, 32001), (1, 2, 49152),
]
DENOISE_SHAPES = [(0, 4, 7), (1, 1, 1), (33, 8, 7), (33, 17, 7), (5, 8, 1031), (2, 3, 32001),
                  (1, 4, 49152)]


def _ids_dtype(i: int) -> torch.dtype:
    return torch.int32 if i % 2 else torch.int64


def _vocab_map(V: int, seed: int) -> torch.Tensor:
    """A reduced drafter vocabulary: Vd = ceil(V/2) target ids in random order."""
    return torch.randperm(V, generator=gen(seed))[: (V + 1) // 2]


def _drafts(tl: torch.Tensor, dl: torch.Tensor | None, vmap: torch.Tensor | None, seed: int):
    """Drafts: drawn from the draft logits when given, else mostly the target argmax."""
    B, G1, V = tl.shape
    G = G1 - 1
    g = gen(seed)
    if B * G == 0:
        return torch.zeros(B, G, dtype=torch.int64)
    if dl is not None:
        j = torch.multinomial(torch.softmax(dl.float().reshape(B * G, -1), -1), 1, generator=g)
        x = j.reshape(B, G)
        x = vmap[x] if vmap is not None else x
    else:
        x = tl[:, :G].float().argmax(-1)
    rnd = torch.randint(0, V, (B, G), generator=g)
    return torch.where(torch.rand(B, G, generator=g) < 0.85, x, rnd)


def _draft_logits(tl: torch.Tensor, vmap: torch.Tensor | None, seed: int) -> torch.Tensor:
    """Draft logits close to the target's (so that drafts get accepted), over Vd entries."""
    G = tl.shape[1] - 1
    base = tl[:, :G].float()
    if vmap is not None:
        base = base[:, :, vmap]
    noise = torch.randn(base.shape, generator=gen(seed))
    return (base + noise).where(torch.isfinite(base), base).to(tl.dtype)


def _verify_inputs(B, G, V, dtype, draft, seed=0):
    tl = rand_logits((B, G + 1, V), dtype, seed=seed, neg_inf_frac=0.1)
    vmap = _vocab_map(V, seed + 1) if draft == "vocab_map" else None
    dl = _draft_logits(tl, vmap, seed + 2) if draft != "point" else None
    x = _drafts(tl, dl, vmap, seed + 3)
    pm = torch.rand(B, G, generator=gen(seed + 4)) < 0.3 if draft == "soft_pm" else None
    return dict(target_logits=tl, draft_ids=x, draft_logits=dl, draft_point_mass=pm,
                vocab_map=vmap)


def _run_verify(ops, inp, device="cpu", **kw):
    """ops.verify and the reference (float64) on the same inputs; checks structure."""
    dev = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in inp.items()}
    kw_dev = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    tl, x, dl = dev.pop("target_logits"), dev.pop("draft_ids"), dev.pop("draft_logits")
    got = ops.verify(tl, x, dl, **dev, **kw_dev)
    want, margin = verify_with_margin(inp["target_logits"], inp["draft_ids"],
                                      inp["draft_logits"], draft_point_mass=inp["draft_point_mass"],
                                      vocab_map=inp["vocab_map"], **kw)
    check_verify_structure(got, inp["draft_ids"], inp["target_logits"].shape[-1])
    return got, want, margin


# ---------------------------------------------------------------------------- gather_logprobs

@pytest.mark.parametrize("tau", ["one", "scalar", "greedy", "per_row"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", GATHER_SHAPES, ids=str)
def test_gather_logprobs_matches_reference(ops, shape, dtype, tau) -> None:
    B, N, V = shape
    logits = rand_logits(shape, dtype, seed=V + N, neg_inf_frac=0.1)
    g = gen(B + V)
    ids = torch.randint(0, V, (B, N), generator=g, dtype=_ids_dtype(V + N))
    if B * N:  # hit the argmax too (matters at tau = 0)
        ids[:, 0] = logits[:, 0].float().argmax(-1).to(ids.dtype)
    t = tau_per_row(tau, B, seed=V)
    got = ops.gather_logprobs(logits, ids, t)
    want = R.gather_logprobs(logits.double(), ids, t)  # float64 logits: float64 results
    assert got.lse.dtype == torch.float32 and got.logprobs.dtype == torch.float32
    assert got.lse.shape == (B, N) and got.logprobs.shape == (B, N)
    torch.testing.assert_close(got.lse.double(), want.lse, rtol=2e-6, atol=2e-5)
    torch.testing.assert_close(got.logprobs.double(), want.logprobs, rtol=2e-6, atol=2e-5)


@pytest.mark.parametrize("kind", LAYOUTS)
def test_gather_logprobs_layouts(ops, kind) -> None:
    B, N, V = 6, 4, 1031
    logits = rand_logits((B, N, V), seed=1)
    ids = torch.randint(0, V, (B, N), generator=gen(2))
    t = tau_per_row("per_row", B, seed=3)
    want = ops.gather_logprobs(logits, ids, t)
    got = ops.gather_logprobs(layout(logits, kind), layout(ids, kind), layout(t, kind))
    torch.testing.assert_close(got.lse, want.lse, rtol=0, atol=0)
    torch.testing.assert_close(got.logprobs, want.logprobs, rtol=0, atol=0)


def test_gather_logprobs_invalid_rows(ops) -> None:
    logits = rand_logits((1, 5, 7), seed=0)
    logits[0, 1, 3] = math.nan
    logits[0, 2] = -math.inf
    logits[0, 3, 0] = math.inf
    logits[0, 4, :6] = -math.inf  # one finite entry: valid
    ids = torch.tensor([[0, 0, 0, 0, 6]])
    for tau in (1.0, 0.0):
        got = ops.gather_logprobs(logits, ids, tau)
        assert torch.isnan(got.lse[0, 1:4]).all() and torch.isnan(got.logprobs[0, 1:4]).all()
        assert torch.isfinite(got.lse[0, [0, 4]]).all()
        assert float(got.logprobs[0, 4]) == 0.0


def test_gather_logprobs_greedy_ties_lowest_index(ops) -> None:
    logits = torch.tensor([[[1.0, 3.0, 3.0, 2.0]]])
    got = ops.gather_logprobs(logits.expand(1, 2, 4), torch.tensor([[1, 2]]), 0.0)
    assert got.logprobs.tolist() == [[0.0, -math.inf]]
    assert got.lse.tolist() == [[3.0, 3.0]]


# ------------------------------------------------------------------------------------ verify

@pytest.mark.parametrize("draft", ["point", "soft", "soft_pm", "vocab_map"])
@pytest.mark.parametrize("shape", VERIFY_SHAPES, ids=str)
def test_verify_matches_reference(ops, shape, draft) -> None:
    B, G, V = shape
    i = B + G + V
    inp = _verify_inputs(B, G, V, DTYPES[i % 3], draft, seed=i)
    inp["draft_ids"] = inp["draft_ids"].to(_ids_dtype(i))
    kw = dict(temperature=tau_per_row("per_row", B, seed=i), seed=1234 + i, offset=i)
    if draft == "soft":
        kw["draft_temperature"] = torch.where(torch.arange(B) % 4 == 3, 0.0, 1.0)
    got, want, margin = _run_verify(ops, inp, **kw)
    assert_same_samples(got, want, margin, VERIFY_FIELDS, context=f"verify {shape} {draft}:")


@pytest.mark.parametrize("tau", ["one", "scalar", "greedy"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_verify_dtypes_and_temperatures(ops, dtype, tau) -> None:
    B, G, V = 33, 5, 1031
    inp = _verify_inputs(B, G, V, dtype, "soft", seed=5)
    kw = dict(temperature=tau_per_row(tau, B), draft_temperature=0.8, seed=99)
    got, want, margin = _run_verify(ops, inp, **kw)
    assert_same_samples(got, want, margin, VERIFY_FIELDS, context=f"verify {dtype} {tau}:")
    if tau == "greedy":
        assert torch.equal(got.ids, want.ids)


@pytest.mark.parametrize("kind", LAYOUTS)
def test_verify_layouts(ops, kind) -> None:
    B, G, V = 9, 6, 1031
    inp = _verify_inputs(B, G, V, torch.float32, "soft_pm", seed=8)
    kw = dict(temperature=tau_per_row("per_row", B, seed=1),
              draft_temperature=torch.full((B,), 0.9), seed=torch.arange(B) * 7 - 20, offset=3)
    want = ops.verify(inp["target_logits"], inp["draft_ids"], inp["draft_logits"],
                      draft_point_mass=inp["draft_point_mass"], **kw)
    got = ops.verify(layout(inp["target_logits"], kind), layout(inp["draft_ids"], kind),
                     layout(inp["draft_logits"], kind),
                     draft_point_mass=layout(inp["draft_point_mass"], kind),
                     **{k: layout(v, kind) if isinstance(v, torch.Tensor) else v
                        for k, v in kw.items()})
    for f in VERIFY_FIELDS:
        assert torch.equal(getattr(got, f), getattr(want, f)), f


def test_verify_vocab_map_layout(ops) -> None:
    inp = _verify_inputs(7, 4, 1031, torch.float32, "vocab_map", seed=3)
    args = (inp["target_logits"], inp["draft_ids"], inp["draft_logits"])
    want = ops.verify(*args, vocab_map=inp["vocab_map"], seed=1)
    got = ops.verify(*args, vocab_map=layout(inp["vocab_map"].to(torch.int32), "strided"), seed=1)
    assert torch.equal(got.ids, want.ids)


@pytest.mark.parametrize("draft", ["point", "soft", "vocab_map"])
def test_rejection_sample_matches_verify_and_reference(ops, draft) -> None:
    B, G, V = 33, 6, 1031
    inp = _verify_inputs(B, G, V, torch.bfloat16, draft, seed=11)
    tau = tau_per_row("per_row", B, seed=12)
    tl, x, dl, vmap = inp["target_logits"], inp["draft_ids"], inp["draft_logits"], inp["vocab_map"]
    t_lse = ops.gather_logprobs(tl, torch.zeros(B, G + 1, dtype=torch.long), tau).lse
    d_lse = (ops.gather_logprobs(dl, torch.zeros(B, G, dtype=torch.long), 0.9).lse
             if dl is not None else None)
    kw = dict(temperature=tau, draft_temperature=0.9, seed=5, offset=2, vocab_map=vmap)
    got = ops.rejection_sample(tl, x, dl, target_lse=t_lse, draft_lse=d_lse, **kw)
    fused = ops.verify(tl, x, dl, **kw)
    for f in VERIFY_FIELDS:
        assert torch.equal(getattr(got, f), getattr(fused, f)), f
    want = R.rejection_sample(tl, x, dl, target_lse=t_lse.double(),
                              draft_lse=d_lse.double() if d_lse is not None else None, **kw)
    _, margin = verify_with_margin(tl, x, dl, **kw)
    assert_same_samples(got, want, margin, VERIFY_FIELDS, context="rejection_sample:")


def test_verify_greedy_is_target_argmax_chain(ops) -> None:
    B, G, V = 33, 8, 1031
    inp = _verify_inputs(B, G, V, torch.bfloat16, "soft", seed=21)
    tl, x = inp["target_logits"], inp["draft_ids"]
    got = ops.verify(tl, x, inp["draft_logits"], temperature=0.0, seed=3)
    am = tl.float().argmax(-1)
    for b in range(B):
        k = int(got.num_accepted[b])
        mism = (x[b] != am[b, :G]).nonzero()
        assert k == (int(mism[0]) if len(mism) else G)
        assert got.ids[b, : k + 1].tolist() == am[b, : k + 1].tolist()
    # seeds and offsets play no part in greedy rows
    other = ops.verify(tl, x, inp["draft_logits"], temperature=0.0, seed=77, offset=9)
    assert torch.equal(other.ids, got.ids)


def test_verify_one_hot_target_reproduces_target_tokens(ops, device) -> None:
    B, G, V = 33, 8, 1031
    g = gen(31)
    tgt = torch.randint(0, V, (B, G + 1), generator=g)
    tl = torch.full((B, G + 1, V), -math.inf).scatter(2, tgt[..., None], 1.5)
    x = torch.where(torch.rand(B, G, generator=g) < 0.85, tgt[:, :G], (tgt[:, :G] + 1) % V)
    for dl in (None, rand_logits((B, G, V), seed=32)):
        got = ops.verify(tl.to(device), x.to(device), dl.to(device) if dl is not None else None,
                         temperature=tau_per_row("per_row", B).to(device), seed=6)
        got = type(got)(*(t.cpu() for t in got))
        check_verify_structure(got, x, V)
        for b in range(B):
            k = int(got.num_accepted[b])
            mism = (x[b] != tgt[b, :G]).nonzero()
            assert k == (int(mism[0]) if len(mism) else G)
            assert got.ids[b, : k + 1].tolist() == tgt[b, : k + 1].tolist()


def test_verify_per_row_seed_does_not_depend_on_batch(ops, device) -> None:
    B, G, V = 12, 5, 1031
    inp = _verify_inputs(B, G, V, torch.float32, "soft", seed=41)
    inp = {k: v.to(device) if v is not None else None for k, v in inp.items()}
    seeds = torch.randint(-(2**62), 2**62, (B,), generator=gen(42)).to(device)
    tau = torch.full((B,), 1.1, device=device)
    full = ops.verify(inp["target_logits"], inp["draft_ids"], inp["draft_logits"],
                      temperature=tau, seed=seeds, offset=17)
    for b in range(B):
        s = slice(b, b + 1)
        one = ops.verify(inp["target_logits"][s], inp["draft_ids"][s], inp["draft_logits"][s],
                         temperature=tau[s], seed=seeds[s], offset=17)
        assert one.ids[0].tolist() == full.ids[b].tolist(), b
    # a batch seed gives row b the seed seed + 0x9E3779B97F4A7C15 * (b + 1)
    batch = ops.verify(inp["target_logits"], inp["draft_ids"], inp["draft_logits"],
                       temperature=tau, seed=-5, offset=17)
    rs = torch.from_numpy(R.row_seeds(-5, B).view(np.int64).copy()).to(device)
    explicit = ops.verify(inp["target_logits"], inp["draft_ids"], inp["draft_logits"],
                          temperature=tau, seed=rs, offset=17)
    assert torch.equal(batch.ids, explicit.ids)


def test_verify_seed_and_offset(ops) -> None:
    B, G, V = 64, 4, 1031
    inp = _verify_inputs(B, G, V, torch.float32, "soft", seed=51)
    args = (inp["target_logits"], inp["draft_ids"], inp["draft_logits"])
    a = ops.verify(*args, seed=3, offset=0)
    b = ops.verify(*args, seed=3, offset=0)
    assert torch.equal(a.ids, b.ids), "same seed and offset, same result"
    c = ops.verify(*args, seed=3, offset=1)
    d = ops.verify(*args, seed=4, offset=0)
    assert not torch.equal(a.ids, c.ids), "a new offset must draw new numbers"
    assert not torch.equal(a.ids, d.ids), "a new seed must draw new numbers"
    # high offset bits (counter word 3) are used, and follow the reference
    big = (1 << 56) - 3
    e = ops.verify(*args, seed=3, offset=big)
    want, margin = verify_with_margin(*args, seed=3, offset=big)
    assert_same_samples(e, want, margin, VERIFY_FIELDS, context="offset 2^56-3:")
    f = ops.verify(*args, seed=3, offset=1 << 32)
    assert not torch.equal(a.ids, f.ids)


def test_verify_empty_batch(ops, device) -> None:
    for G in (0, 3):
        res = ops.verify(torch.zeros(0, G + 1, 5, device=device),
                         torch.zeros(0, G, dtype=torch.long, device=device),
                         torch.zeros(0, G, 5, device=device),
                         temperature=torch.zeros(0, device=device),
                         seed=torch.zeros(0, dtype=torch.long, device=device))
        assert res.ids.shape == (0, G + 1) and res.num_accepted.shape == (0,)
        assert res.valid.shape == (0,) and res.ids.dtype == torch.int64


def test_verify_invalid_rows(ops, device) -> None:
    B, G, V = 10, 4, 1031
    inp = _verify_inputs(B, G, V, torch.float32, "soft", seed=61)
    tl, x, dl = inp["target_logits"].clone(), inp["draft_ids"].clone(), inp["draft_logits"].clone()
    x[:, :] = tl[:, :G].argmax(-1)  # drafts equal the argmax: reached at tau=0
    kw = dict(temperature=torch.where(torch.arange(B) < 6, 0.0, 1.0), seed=5)
    kw_dev = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    clean = ops.verify(tl.to(device), x.to(device), dl.to(device), **kw_dev)
    clean = type(clean)(*(t.cpu() for t in clean))
    bad_tl, bad_dl = tl.clone(), dl.clone()
    bad_tl[0, 0, 5] = math.nan  # NaN
    bad_tl[1, 2] = -math.inf  # no finite logit
    bad_tl[2, 4, 7] = math.inf  # +inf at the bonus position
    bad_tl[6, 0] = math.nan  # sampled row, NaN row
    bad_dl[7, 0, 3] = math.nan  # soft draft row invalid
    x2 = x.clone()
    x2[3, 0] = (x2[3, 0] + 1) % V  # greedy rejection at 0 ...
    bad_tl[3, 1, 0] = math.nan  # ... the NaN behind it is never read
    got = ops.verify(bad_tl.to(device), x2.to(device), bad_dl.to(device), **kw_dev)
    got = type(got)(*(t.cpu() for t in got))
    want = R.verify(bad_tl, x2, bad_dl, **kw)
    assert got.valid.tolist() == want.valid.tolist()
    assert got.valid.tolist() == [False, False, False, True, True, True, False, False, True, True]
    bad = ~got.valid
    assert bool((got.ids[bad] == -1).all()) and bool((got.num_accepted[bad] == 0).all())
    untouched = [4, 5, 8, 9]
    assert torch.equal(got.ids[untouched], clean.ids[untouched]), "other rows are unaffected"
    assert got.ids[3, 0] == tl[3, 0].argmax() and got.num_accepted[3] == 0


def test_verify_vocab_map_edge_cases(ops) -> None:
    """Drafts outside the drafter vocabulary (q = 0): accepted whenever p > 0."""
    B, G, V = 33, 4, 1031
    inp = _verify_inputs(B, G, V, torch.float32, "vocab_map", seed=71)
    vmap = inp["vocab_map"]
    outside = torch.ones(V, dtype=torch.bool)
    outside[vmap] = False
    out_ids = outside.nonzero().squeeze(1)
    x = out_ids[torch.randint(0, len(out_ids), (B, G), generator=gen(72))]
    tl = inp["target_logits"].clone()
    tl[tl == -math.inf] = -30.0
    kw = dict(vocab_map=vmap, temperature=0.9, seed=73)
    got = ops.verify(tl, x, inp["draft_logits"], **kw)
    want, margin = verify_with_margin(tl, x, inp["draft_logits"], **kw)
    assert bool((got.num_accepted == G).all()), "q(x) = 0 < p(x): always accepted"
    assert_same_samples(got, want, margin, VERIFY_FIELDS, context="vocab_map outside:")
    # a map in sorted order that covers the whole vocabulary is the identity
    ident = ops.verify(tl, x, rand_logits((B, G, V), seed=74), vocab_map=torch.arange(V), seed=1)
    plain = ops.verify(tl, x, rand_logits((B, G, V), seed=74), seed=1)
    assert torch.equal(ident.ids, plain.ids)


def test_verify_new_vocab_maps_of_the_same_shape(ops) -> None:
    """Each call uses the vocab_map it is given, also when a new map reuses freed memory or
    an array is rewritten in place (no stale cached inverse)."""
    B, G, V, Vd = 16, 3, 50, 25
    tl = rand_logits((B, G + 1, V), seed=91)
    dl = rand_logits((B, G, Vd), seed=92)
    g = gen(93)
    for it in range(20):
        vmap = torch.randperm(V, generator=g)[:Vd]
        x = vmap[torch.randint(0, Vd, (B, G), generator=g)]
        got = ops.verify(tl, x, dl, vocab_map=vmap, seed=it)
        want, margin = verify_with_margin(tl, x, dl, vocab_map=vmap, seed=it)
        assert_same_samples(got, want, margin, VERIFY_FIELDS, context=f"new map {it}:")
        del vmap
    buf = np.arange(Vd, dtype=np.int64)
    ops.verify(tl, torch.zeros(B, G, dtype=torch.long), dl, vocab_map=buf, seed=0)
    buf[:] = torch.randperm(V, generator=g)[:Vd].numpy()  # rewritten in place
    x = torch.from_numpy(buf)[torch.randint(0, Vd, (B, G), generator=g)]
    got = ops.verify(tl, x, dl, vocab_map=torch.from_numpy(buf), seed=1)
    want, margin = verify_with_margin(tl, x, dl, vocab_map=torch.from_numpy(buf.copy()), seed=1)
    assert_same_samples(got, want, margin, VERIFY_FIELDS, context="rewritten map:")


def test_verify_numpy_in_numpy_out(ops) -> None:
    inp = _verify_inputs(5, 3, 7, torch.float32, "soft", seed=81)
    tl, x, dl = (inp[k].numpy() for k in ("target_logits", "draft_ids", "draft_logits"))
    got = ops.verify(tl, x, dl, temperature=np.full(5, 0.9, dtype=np.float32),
                     seed=np.arange(5, dtype=np.int64))
    assert all(isinstance(t, np.ndarray) for t in got)
    assert got.ids.dtype == np.int64 and got.valid.dtype == np.bool_
    want = ops.verify(torch.from_numpy(tl), torch.from_numpy(x), torch.from_numpy(dl),
                      temperature=torch.full((5,), 0.9), seed=torch.arange(5))
    np.testing.assert_array_equal(got.ids, want.ids.numpy())
    lse = ops.gather_logprobs(tl, np.zeros((5, 4), dtype=np.int64), 1.0)
    assert isinstance(lse.lse, np.ndarray) and lse.lse.dtype == np.float32
    pm = ops.point_mass_mask(np.array([[2, 1, 0]], dtype=np.int32))
    assert isinstance(pm, np.ndarray) and pm.tolist() == [[False, True, True]]


def test_numpy_read_only_input(ops) -> None:
    """Read-only arrays (e.g. from np.frombuffer or memory maps) are inputs like any other."""
    tl = rand_logits((3, 4, 7), seed=1).numpy()
    tl.flags.writeable = False
    ids = np.zeros((3, 4), dtype=np.int64)
    ids.flags.writeable = False
    got = ops.gather_logprobs(tl, ids, 1.0)
    want = ops.gather_logprobs(tl.copy(), ids.copy(), 1.0)
    np.testing.assert_array_equal(got.lse, want.lse)


# ------------------------------------------------------------------------------ denoise_step

def _denoise_inputs(B, G, Vd, dtype, step, seed):
    logits = rand_logits((B, G, Vd), dtype, seed=seed, neg_inf_frac=0.1)
    g = gen(seed + 1)
    tokens = torch.randint(0, max(Vd, 1), (B, G), generator=g)
    if step > 0:
        cs = torch.randint(-1, step, (B, G), generator=g, dtype=torch.int32)
        cs[torch.rand(B, G, generator=g) < 0.5] = -1
    else:
        cs = torch.full((B, G), -1, dtype=torch.int32)
    return logits, tokens, cs


@pytest.mark.parametrize("mode", list(CommitMode), ids=lambda m: m.name.lower())
@pytest.mark.parametrize("shape", DENOISE_SHAPES, ids=str)
def test_denoise_step_matches_reference(ops, shape, mode) -> None:
    B, G, Vd = shape
    for i, (step, T) in enumerate([(0, 4), (2, 5), (3, 4)]):
        seed = B + G + Vd + i
        logits, tokens, cs = _denoise_inputs(B, G, Vd, DTYPES[seed % 3], step, seed)
        tokens = tokens.to(_ids_dtype(seed))
        vmap = _vocab_map(2 * Vd, seed) if i == 1 else None
        kw = dict(step=step, num_steps=T, mode=mode, seed=seed, offset=i,
                  temperature=tau_per_row("per_row", B, seed), vocab_map=vmap)
        got = ops.denoise_step(logits, tokens, cs, **kw)
        want, margin = denoise_with_margin(logits, tokens, cs, **kw)
        assert got.tokens.dtype == torch.int64 and got.commit_step.dtype == torch.int32
        assert got.lse.dtype == torch.float32 and got.valid.dtype == torch.bool
        assert_same_samples(got, want, margin, DENOISE_FIELDS,
                            context=f"denoise {shape} {mode.name} step {step}/{T}:")
        torch.testing.assert_close(got.lse.double(), want.lse, rtol=2e-6, atol=2e-5,
                                   equal_nan=True)


@pytest.mark.parametrize("mode", ["random", "confidence", "left_to_right"])
def test_denoise_step_mode_strings_and_layouts(ops, mode) -> None:
    B, G, Vd = 9, 8, 1031
    logits, tokens, cs = _denoise_inputs(B, G, Vd, torch.float32, 2, seed=5)
    kw = dict(step=2, num_steps=5, seed=torch.arange(B) + 100, offset=7,
              temperature=tau_per_row("per_row", B))
    want = ops.denoise_step(logits, tokens, cs, mode=CommitMode.parse(mode), **kw)
    for kind in LAYOUTS:
        got = ops.denoise_step(layout(logits, kind), layout(tokens, kind), layout(cs, kind),
                               mode=mode, **{k: layout(v, kind) if isinstance(v, torch.Tensor)
                                             else v for k, v in kw.items()})
        for f in ("tokens", "commit_step", "valid"):
            assert torch.equal(getattr(got, f), getattr(want, f)), (kind, f)
        torch.testing.assert_close(got.lse, want.lse, rtol=0, atol=0, equal_nan=True)


def test_denoise_step_commit_rules(ops, device) -> None:
    B, G, Vd, T = 33, 8, 7, 4
    logits = rand_logits((B, G, Vd), seed=3).to(device)
    tokens = torch.zeros(B, G, dtype=torch.int64, device=device)
    for mode in CommitMode:
        cs = torch.full((B, G), -1, dtype=torch.int32, device=device)
        toks = tokens
        for step in range(T):
            res = ops.denoise_step(logits, toks, cs, step=step, num_steps=T, mode=mode, seed=9,
                                   offset=step)
            was = cs >= 0
            assert torch.equal(res.commit_step[was], cs[was]), "commits never change"
            assert torch.equal(res.tokens[was], toks[was])
            assert bool(torch.isnan(res.lse[was]).all())
            newly = (res.commit_step == step) & ~was
            M = (~was).sum(1)
            n = (M + (T - step) - 1) // (T - step)
            if mode != CommitMode.RANDOM or step == T - 1:
                assert newly.sum(1).tolist() == n.tolist(), (mode, step)
            if mode == CommitMode.LEFT_TO_RIGHT:  # the leftmost masked positions
                rank = (~was).cumsum(1) - 1
                assert torch.equal(newly, ~was & (rank < n[:, None]))
            if mode == CommitMode.CONFIDENCE:
                conf = torch.softmax(logits.double(), -1).amax(-1).masked_fill(was, -1)
                kth = conf.sort(1, descending=True).values.gather(1, (n - 1).clamp_min(0)[:, None])
                assert bool((newly == (~was & (conf >= kth)) | (n[:, None] == 0)).all())
            cs, toks = res.commit_step, res.tokens
        assert bool((cs >= 0).all()), mode


def test_denoise_step_greedy_is_argmax(ops) -> None:
    B, G, Vd = 33, 5, 1031
    logits = rand_logits((B, G, Vd), torch.bfloat16, seed=4)
    cs = torch.full((B, G), -1, dtype=torch.int32)
    res = ops.denoise_step(logits, torch.zeros(B, G, dtype=torch.long), cs, step=0, num_steps=1,
                           temperature=0.0, seed=1)
    assert torch.equal(res.tokens, logits.float().argmax(-1))
    vmap = torch.randperm(5000, generator=gen(1))[:Vd]
    res = ops.denoise_step(logits, torch.zeros(B, G, dtype=torch.long), cs, step=0, num_steps=1,
                           temperature=0.0, vocab_map=vmap)
    assert torch.equal(res.tokens, vmap[logits.float().argmax(-1)])


def test_denoise_step_per_row_seed_and_offset(ops) -> None:
    B, G, Vd = 10, 6, 1031
    logits, tokens, cs = _denoise_inputs(B, G, Vd, torch.float32, 0, seed=8)
    seeds = torch.randint(-(2**62), 2**62, (B,), generator=gen(9))
    kw = dict(step=1, num_steps=3, mode="random", temperature=1.0)
    full = ops.denoise_step(logits, tokens, cs, seed=seeds, offset=4, **kw)
    for b in range(B):
        s = slice(b, b + 1)
        one = ops.denoise_step(logits[s], tokens[s], cs[s], seed=seeds[s], offset=4, **kw)
        assert torch.equal(one.tokens[0], full.tokens[b]) and torch.equal(one.commit_step[0],
                                                                          full.commit_step[b])
    again = ops.denoise_step(logits, tokens, cs, seed=seeds, offset=4, **kw)
    assert torch.equal(again.tokens, full.tokens)
    other = ops.denoise_step(logits, tokens, cs, seed=seeds, offset=5, **kw)
    assert not torch.equal(other.commit_step, full.commit_step)


def test_denoise_step_invalid_rows(ops, device) -> None:
    B, G, Vd = 6, 4, 31
    logits, tokens, cs = _denoise_inputs(B, G, Vd, torch.float32, 0, seed=12)
    logits, tokens, cs = logits.to(device), tokens.to(device), cs.to(device)
    clean = ops.denoise_step(logits, tokens, cs, step=0, num_steps=1, seed=2)
    bad = logits.clone()
    bad[1, 2, 3] = math.nan
    bad[2, 0] = -math.inf
    bad[3, 1, 0] = math.inf
    got = ops.denoise_step(bad, tokens, cs, step=0, num_steps=1, seed=2)
    assert got.valid.tolist() == [True, False, False, False, True, True]
    assert got.valid.tolist() == R.denoise_step(bad.cpu(), tokens.cpu(), cs.cpu(), step=0,
                                                num_steps=1, seed=2).valid.tolist()
    for b, g in ((1, 2), (2, 0), (3, 1)):
        assert got.commit_step[b, g] == -1, "an invalid position stays masked"
        assert math.isnan(float(got.lse[b, g]))
        assert got.tokens[b, g] == tokens[b, g]
    ok = [0, 4, 5]
    assert torch.equal(got.tokens[ok], clean.tokens[ok])
    # positions committed earlier are not read: garbage there does not invalidate the row
    cs2 = cs.clone()
    cs2[1, 2] = 0
    again = ops.denoise_step(bad[:2], tokens[:2], cs2[:2], step=1, num_steps=2, seed=2)
    assert again.valid.tolist() == [True, True]


def test_denoise_step_empty_and_numpy(ops) -> None:
    res = ops.denoise_step(torch.zeros(0, 3, 5), torch.zeros(0, 3, dtype=torch.long),
                           torch.zeros(0, 3, dtype=torch.int32), step=0, num_steps=2)
    assert res.tokens.shape == (0, 3) and res.valid.shape == (0,)
    logits, tokens, cs = _denoise_inputs(4, 3, 7, torch.float32, 0, seed=1)
    got = ops.denoise_step(logits.numpy(), tokens.numpy(), cs.numpy(), step=0, num_steps=2, seed=3)
    assert all(isinstance(t, np.ndarray) for t in got)
    want = ops.denoise_step(logits, tokens, cs, step=0, num_steps=2, seed=3)
    np.testing.assert_array_equal(got.tokens, want.tokens.numpy())


# --------------------------------------------------------------------------- point_mass_mask

def test_point_mass_mask_matches_reference(ops) -> None:
    for B, G in ((0, 3), (1, 0), (1, 1), (33, 17)):
        for dtype in (torch.int32, torch.int64):
            cs = torch.randint(-1, 5, (B, G), generator=gen(B + G), dtype=dtype)
            got = ops.point_mass_mask(cs)
            assert got.dtype == torch.bool and got.shape == (B, G)
            assert torch.equal(got, R.point_mass_mask(cs))
            assert torch.equal(ops.point_mass_mask(layout(cs, "transposed")), got)
    import specdiff_ext

    assert specdiff_ext.point_mass_mask is ops.point_mass_mask or R is ops
