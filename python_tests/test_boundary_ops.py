"""Boundary reproducers of the ops (the issue "One house"): each ends in the right answer --
the float64 reference where it is defined for the case, or the exact greedy law -- or in a
ValueError / TypeError naming the argument. No statistical tests here: every assertion is exact
or within float32 rounding."""

from __future__ import annotations

import math

import pytest
import torch

from specdiff_ext import ops
from specdiff_ext import reference as R

# 1 / tau is infinite in float32 below 2^-128 (about 2.94e-39): such temperatures are read as 0.
VANISHING = [1e-45, 1e-40, 1e-39]


def _greedy_verify(tl: torch.Tensor, ids: torch.Tensor):
    return R.verify(tl.double(), ids, temperature=0.0)


def _same_verify(got, want) -> None:
    assert torch.equal(got.ids, want.ids)
    assert torch.equal(got.num_accepted, want.num_accepted)
    assert torch.equal(got.valid, want.valid)


# ----------------------------------------------------------- 1. subnormal temperatures, filters
@pytest.mark.parametrize("tau", VANISHING)
@pytest.mark.parametrize("filters", [dict(top_k=2), dict(top_k=5, top_p=0.9)], ids=str)
def test_verify_at_a_subnormal_temperature_with_filters_is_the_greedy_law(tau, filters) -> None:
    tl = torch.zeros(2, 3, 64)
    ids = torch.tensor([[0, 1], [5, 6]])
    got = ops.verify(tl, ids, temperature=tau, **filters)
    _same_verify(got, _greedy_verify(tl, ids))
    assert got.ids.tolist() == [[0, 0, -1], [0, -1, -1]] and bool(got.valid.all())
    # with drafts, random rows, and a per-row temperature too
    g = torch.Generator().manual_seed(1)
    tl = torch.randn(3, 4, 50, generator=g)
    ids = tl[:, :3].argmax(-1)
    ids[1, 1] = (ids[1, 1] + 1) % 50
    dl = torch.randn(3, 3, 50, generator=g)
    got = ops.verify(tl, ids, dl, temperature=torch.tensor([tau, tau, tau]), seed=3, **filters)
    _same_verify(got, _greedy_verify(tl, ids))
    _same_verify(got, ops.verify(tl, ids, dl, temperature=0.0, seed=3, **filters))


def test_filter_logits_at_a_subnormal_temperature_passes_rows_through() -> None:
    x = torch.zeros(2, 3, 64)
    out = ops.filter_logits(x, temperature=1e-45, top_k=3, top_p=0.5, min_p=0.5)
    assert torch.equal(out, x)  # as at temperature 0
    y = torch.randn(2, 3, 64, generator=torch.Generator().manual_seed(0))
    for tau in VANISHING:
        assert torch.equal(ops.filter_logits(y, temperature=tau, top_k=3, top_p=0.5, min_p=0.5), y)


@pytest.mark.parametrize("tau", [1e-45, 1e-40])
@pytest.mark.parametrize("filters", [dict(top_k=2), dict(top_p=0.5)], ids=str)
@pytest.mark.parametrize("mode", ["random", "confidence", "left_to_right"])
def test_denoise_step_on_tied_rows_at_a_subnormal_temperature_is_the_argmax(tau, filters, mode) -> None:
    lg = torch.zeros(2, 3, 8)
    lg[1, :, 5] = 1.0  # row 1: a unique max at 5; row 0: all tied (argmax 0)
    tk = torch.zeros(2, 3, dtype=torch.long)
    cs = torch.full((2, 3), -1, dtype=torch.int32)
    r = ops.denoise_step(lg, tk, cs, step=0, num_steps=1, mode=mode, temperature=tau, **filters)
    assert r.tokens.tolist() == [[0, 0, 0], [5, 5, 5]] and bool(r.valid.all())
    g = ops.denoise_step(lg, tk, cs, step=0, num_steps=1, mode=mode, temperature=0.0, **filters)
    for a, b in zip(r, g):
        assert torch.equal(a, b) or torch.equal(a.isnan(), b.isnan())


# ----------------------------------------------------------- 2. no read before the vocabulary map
@pytest.mark.parametrize("filters", [{}, dict(top_k=2), dict(top_p=0.5)], ids=str)
@pytest.mark.parametrize("tau", [1e-45, 0.0, 1.0])
def test_denoise_step_never_reads_before_a_map_view(filters, tau) -> None:
    vm = torch.tensor([777777, 100, 101, 102, 103])[1:]  # a view past a poison entry
    r = ops.denoise_step(torch.zeros(1, 2, 4), torch.zeros(1, 2, dtype=torch.long),
                         torch.full((1, 2), -1, dtype=torch.int32), step=0, num_steps=1,
                         temperature=tau, vocab_map=vm, **filters)
    assert bool(r.valid.all())
    assert bool(torch.isin(r.tokens, vm).all()), r.tokens
    if tau != 1.0:
        assert r.tokens.tolist() == [[100, 100]]  # the argmax, through the map
    strided = torch.tensor([100, 9, 101, 9, 102, 9, 103, 9])[::2]
    r = ops.denoise_step(torch.zeros(1, 2, 4), torch.zeros(1, 2, dtype=torch.long),
                         torch.full((1, 2), -1, dtype=torch.int32), step=0, num_steps=1,
                         temperature=tau, vocab_map=strided, **filters)
    assert bool(torch.isin(r.tokens, strided).all())


# ----------------------------------------------------------- 3. lengths at the int64 edges
@pytest.mark.parametrize("lengths", [2**63 - 1, 2**64, 2**63, -2**63, -1, 7])
def test_apply_penalties_lengths_at_the_int64_edges_are_named(lengths) -> None:
    with pytest.raises(ValueError, match="lengths"):
        ops.apply_penalties(torch.randn(2, 3, 20), torch.randint(0, 20, (2, 8)), lengths,
                            repetition_penalty=1.3)


def test_raw_apply_penalties_checks_lengths_without_overflow() -> None:
    x, ids = torch.randn(2, 3, 20), torch.randint(0, 20, (2, 8))
    for v in (2**63 - 1, -2**63, 2**62 + 5):
        ln = torch.full((2,), v, dtype=torch.int64)
        with pytest.raises(ValueError, match="lengths"):
            torch.ops.specdiff.apply_penalties(x, ids, ln, None, 1.3, None, 0.0, None, 0.0)
    # the largest legal length still works: L - (N - 1) = 6
    out = ops.apply_penalties(x, ids, 6, repetition_penalty=1.3)
    want = R.apply_penalties(x.double(), ids, 6, repetition_penalty=1.3)
    torch.testing.assert_close(out, want.float())


# ----------------------------------------------------------- 4. vanishing temperature, max 0
ROWS0 = torch.tensor([[[0.0, -1.0, -2.0, 0.0, -1e-30], [-3.0, 0.0, -0.5, -1.0, -2.0]]])


@pytest.mark.parametrize("tau", VANISHING)
def test_gather_logprobs_at_a_vanishing_temperature_is_the_greedy_law(tau) -> None:
    ids = torch.tensor([[0, 2]])
    got = ops.gather_logprobs(ROWS0, ids, tau)
    want = R.gather_logprobs(ROWS0.double(), ids, 0.0)
    assert torch.equal(got.lse, want.lse.float()) and torch.equal(got.logprobs, want.logprobs.float())
    assert got.logprobs.tolist() == [[0.0, -math.inf]] and got.lse.tolist() == [[0.0, 0.0]]
    for j in range(5):  # every non-argmax id is -inf, not a huge finite number
        lp = ops.gather_logprobs(ROWS0, torch.tensor([[j, j]]), tau).logprobs
        assert lp.tolist() == [[0.0 if j == 0 else -math.inf, 0.0 if j == 1 else -math.inf]]


@pytest.mark.parametrize("tau", VANISHING)
def test_verify_and_denoise_at_a_vanishing_temperature_keep_rows_with_max_0_valid(tau) -> None:
    tl = torch.cat([ROWS0, ROWS0.flip(-1)], 1)  # (1, 4, 5)
    ids = torch.tensor([[0, 1, 3]])
    got = ops.verify(tl, ids, temperature=tau)
    _same_verify(got, _greedy_verify(tl, ids))
    assert bool(got.valid.all())
    cs = torch.full((1, 2), -1, dtype=torch.int32)
    tk = torch.zeros(1, 2, dtype=torch.long)
    r = ops.denoise_step(ROWS0, tk, cs, step=0, num_steps=1, temperature=tau)
    assert r.tokens.tolist() == [[0, 1]] and bool(r.valid.all())
    vm = torch.tensor([-5, 40, 41, 42, 43, 44])[1:]
    for step, T in ((0, 1), (0, 2)):
        r = ops.denoise_step(ROWS0, tk, cs, step=step, num_steps=T, mode="confidence",
                             temperature=tau, vocab_map=vm)
        assert bool(r.valid.all())
        new = r.tokens[r.commit_step >= 0]
        assert new.numel() >= 1 and bool(torch.isin(new, vm).all())
        assert r.tokens.tolist()[0][0] in (0, 40) and r.tokens.tolist()[0][1] in (0, 41)


@pytest.mark.parametrize("tau", VANISHING)
def test_filter_logits_min_p_at_a_vanishing_temperature_keeps_an_entry(tau) -> None:
    out = ops.filter_logits(ROWS0, temperature=tau, min_p=0.5)
    assert bool(torch.isfinite(out).any(-1).all())
    assert torch.equal(out, ROWS0)  # read as temperature 0: passed through


def test_log_probabilities_near_the_float_range_are_float32s_answer() -> None:
    """A finite 1 / tau whose scaled max overflows (tau 1e-38, max 3): the row is read at a
    safe inverse temperature, and a non-max id's log-probability is (l - max) / tau in float32:
    -3e38 where that is finite, -inf where it is not -- never a finite stand-in (-3e37)."""
    x = torch.tensor([[[3.0, 2.0, 0.0, -5.0, 3.0]]])
    for j in range(5):
        got = ops.gather_logprobs(x, torch.tensor([[j]]), 1e-38).logprobs
        shifted = (x.double() - 3.0)
        want = R.gather_logprobs(shifted, torch.tensor([[j]]), 1e-38).logprobs.float()
        assert torch.equal(got, want), (j, got, want)
    assert ops.gather_logprobs(x, torch.tensor([[2]]), 1e-38).logprobs.item() == pytest.approx(-3e38, rel=1e-6)
    assert ops.gather_logprobs(x, torch.tensor([[3]]), 1e-38).logprobs.item() == -math.inf


def test_a_vanishing_draft_temperature_is_a_point_mass() -> None:
    g = torch.Generator().manual_seed(5)
    tl, dl = torch.randn(4, 4, 30, generator=g), torch.randn(4, 3, 30, generator=g)
    ids = dl.argmax(-1)
    for tau in VANISHING:
        _same_verify(ops.verify(tl, ids, dl, temperature=0.7, draft_temperature=tau, seed=2),
                     ops.verify(tl, ids, dl, temperature=0.7, draft_temperature=0.0, seed=2))


# ----------------------------------------------------------- 5. precision of a large scaled max
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_gather_logprobs_subtracts_the_max_before_scaling(dtype) -> None:
    big = 65504.0 if dtype != torch.bfloat16 else 65280.0
    x = torch.full((1, 1, 64), big).to(dtype)
    got = ops.gather_logprobs(x, torch.tensor([[3]]), 1e-3)
    assert got.logprobs.item() == pytest.approx(-math.log(64), abs=2e-6)
    assert got.lse.item() == pytest.approx(big * 1e3 + math.log(64), rel=1e-7)
    y = x.clone()
    y[0, 0, 5] = big - 32 if dtype != torch.bfloat16 else big - 256
    lp = ops.gather_logprobs(y, torch.tensor([[0]]), 10.0).logprobs.item()
    want = R.gather_logprobs(y.double() - big, torch.tensor([[0]]), 10.0).logprobs.item()
    assert lp == pytest.approx(want, abs=2e-6)


# ----------------------------------------------------------- 6. raw ops given 2-D logits
RAW_2D = {
    "verify": (torch.zeros(2, 64), torch.zeros(2, 0, dtype=torch.long), None, None, None, None,
               1.0, None, 1.0, None, 0, 0, None, None),
    "gather_logprobs": (torch.zeros(2, 64), torch.zeros(2, dtype=torch.long), None, 1.0),
    "denoise_step": (torch.zeros(2, 64), torch.zeros(2, dtype=torch.long),
                     torch.zeros(2, dtype=torch.int32), 0, 1, 0, None, None, 1.0, None, 0, 0),
    "apply_penalties": (torch.zeros(2, 64), torch.zeros(2, 3, dtype=torch.long),
                        torch.zeros(2, dtype=torch.long), None, 1.0, None, 0.0, None, 0.0),
    "filter_logits": (torch.zeros(2, 64), None, 1.0, None, 2, None, 1.0, None, 0.0),
}


@pytest.mark.parametrize("name", sorted(RAW_2D))
def test_raw_ops_name_logits_of_the_wrong_rank(name) -> None:
    arg = "target_logits" if name == "verify" else "logits"
    with pytest.raises(ValueError, match=rf"^{arg} must have 3 dimensions"):
        getattr(torch.ops.specdiff, name)(*RAW_2D[name])


@pytest.mark.parametrize("name", sorted(RAW_2D))
def test_fake_ops_name_logits_of_the_wrong_rank(name) -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    arg = "target_logits" if name == "verify" else "logits"
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        args = tuple(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in RAW_2D[name])
        with pytest.raises(ValueError, match=rf"^{arg} must have 3 dimensions"):
            getattr(torch.ops.specdiff, name)(*args)


# ----------------------------------------------------------- 8. one validator: check_sampling
def test_check_sampling_normalises_and_leaves_out_none() -> None:
    import numpy as np

    assert ops.check_sampling() == {}
    got = ops.check_sampling(temperature=1, top_k=np.int64(50), top_p=np.float32(0.5), min_p=0,
                             repetition_penalty=1.2, presence_penalty=-0.5, frequency_penalty=0)
    assert got == {"temperature": 1.0, "top_k": 50, "top_p": 0.5, "min_p": 0.0,
                   "repetition_penalty": 1.2, "presence_penalty": -0.5, "frequency_penalty": 0.0}
    assert type(got["temperature"]) is float and type(got["top_k"]) is int
    assert ops.check_sampling(temperature=1e-45) == {"temperature": 1e-45}  # valid: read as 0


def _op_error(kw: dict) -> str:
    x = torch.randn(2, 3, 10)
    pen = {k: v for k, v in kw.items() if k.endswith("_penalty")}
    try:
        if pen:
            ops.apply_penalties(x, torch.zeros(2, 4, dtype=torch.long), 0, **pen)
        else:
            ops.filter_logits(x, **kw)
    except (ValueError, TypeError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return "no error"


@pytest.mark.parametrize("kw", [
    dict(temperature=-1.0), dict(temperature=float("nan")), dict(temperature=float("inf")),
    dict(temperature=10**400), dict(top_k=-1), dict(top_k=-2**70), dict(top_p=0.0),
    dict(top_p=1.5), dict(top_p=float("nan")), dict(min_p=-0.1), dict(min_p=1.01),
    dict(repetition_penalty=0.0), dict(repetition_penalty=float("nan")),
    dict(presence_penalty=float("inf")), dict(frequency_penalty=float("-inf")),
    dict(top_k=2.0), dict(top_k=True), dict(temperature=False), dict(top_p="0.5"),
    dict(temperature=3.5e38), dict(top_p=1e-46), dict(repetition_penalty=1e-50),  # float32's
], ids=str)
def test_check_sampling_raises_what_the_ops_raise(kw) -> None:
    with pytest.raises((ValueError, TypeError)) as info:
        ops.check_sampling(**kw)
    name = next(iter(kw))
    assert name in str(info.value)
    if not isinstance(kw[name], str):  # the ops take a string as an array (a different message)
        assert f"{type(info.value).__name__}: {info.value}" == _op_error(kw)


def test_check_sampling_accepts_what_the_ops_accept() -> None:
    for kw in (dict(temperature=0.0), dict(top_k=0), dict(top_k=2**64), dict(top_p=1.0),
               dict(min_p=1.0), dict(presence_penalty=-3.0)):
        ops.check_sampling(**kw)
        assert _op_error(kw) == "no error"


# ----------------------------------------------------------- the same rule on CUDA
@pytest.mark.cuda
def test_vanishing_temperatures_read_as_0_on_cuda_as_on_the_cpu() -> None:
    g = torch.Generator().manual_seed(7)
    tl = torch.randn(3, 4, 300, generator=g)
    tl[0] = 0.0  # tied rows, max 0
    ids = tl[:, :3].argmax(-1)
    ids[2, 1] = (ids[2, 1] + 1) % 300
    vm = torch.cat([torch.tensor([999999]), torch.randperm(400)[:300]])[1:]
    cs = torch.full((3, 4), -1, dtype=torch.int32)
    tk = torch.zeros(3, 4, dtype=torch.long)
    for tau in VANISHING:
        for flt in ({}, dict(top_k=2), dict(top_p=0.5, min_p=0.5)):
            for dev in ("cpu", "cuda"):
                v = ops.verify(tl.to(dev), ids.to(dev), temperature=tau, **flt)
                _same_verify(type(v)(*(t.cpu() for t in v)), _greedy_verify(tl, ids))
                f = ops.filter_logits(tl.to(dev), temperature=tau, **flt)
                assert torch.equal(f.cpu(), tl)
                r = ops.denoise_step(tl.to(dev), tk.to(dev), cs.to(dev), step=0, num_steps=1,
                                     temperature=tau, vocab_map=vm.to(dev), **flt)
                assert torch.equal(r.tokens.cpu(), vm[tl.argmax(-1)]) and bool(r.valid.all())
            a = ops.gather_logprobs(tl, ids[:, :1].expand(3, 4).contiguous(), tau)
            b = ops.gather_logprobs(tl.cuda(), ids[:, :1].expand(3, 4).contiguous().cuda(), tau)
            assert torch.equal(a.lse, b.lse.cpu()) and torch.equal(a.logprobs, b.logprobs.cpu())
