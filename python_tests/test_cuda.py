"""CUDA kernels against the CPU kernels and the reference: the same inputs and seeds give the
same ids on both devices (the Philox numbers are a function of the row, offset, position,
index and tag only), gathered statistics agree to float32 rounding. Large vocabularies, 16-bit
logits, non-contiguous inputs. Skipped without a GPU."""

from __future__ import annotations

import math

import pytest
import torch

from sd_testutil import (
    assert_same_samples,
    check_verify_structure,
    denoise_with_margin,
    gen,
    layout,
    rand_logits,
    tau_per_row,
    verify_with_margin,
)
from specdiff_ext.types import CommitMode

pytestmark = pytest.mark.cuda

VERIFY_FIELDS = ("ids", "num_accepted", "valid")
DENOISE_FIELDS = ("tokens", "commit_step", "valid")


def _cuda(x):
    return x.cuda() if isinstance(x, torch.Tensor) else x


def _inputs(B, G, V, dtype, draft, seed):
    tl = rand_logits((B, G + 1, V), dtype, seed=seed, neg_inf_frac=0.05)
    g = gen(seed + 1)
    vmap = torch.randperm(V, generator=g)[: V // 2] if draft == "vocab_map" else None
    dl = None
    if draft != "point":
        base = tl[:, :G].float()
        base = base[:, :, vmap] if vmap is not None else base
        dl = (base + torch.randn(base.shape, generator=g)).where(torch.isfinite(base), base)
        dl = dl.to(dtype)
    am = tl[:, :G].float().argmax(-1)
    rnd = torch.randint(0, V, (B, G), generator=g)
    x = torch.where(torch.rand(B, G, generator=g) < 0.8, am, rnd)
    pm = torch.rand(B, G, generator=g) < 0.3 if draft == "soft_pm" else None
    return tl, x, dl, pm, vmap


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(33, 3, 7), (33, 2, 32001), (4, 3, 152064), (1, 2, 262144),
                                   (300, 1, 1031)], ids=str)
def test_gather_cuda_matches_cpu(ops, shape, dtype) -> None:
    B, N, V = shape
    logits = rand_logits(shape, dtype, seed=V, neg_inf_frac=0.05)
    ids = torch.randint(0, V, (B, N), generator=gen(1))
    for tau in (1.0, 0.0, tau_per_row("per_row", B)):
        cpu = ops.gather_logprobs(logits, ids, tau)
        dev = ops.gather_logprobs(logits.cuda(), ids.cuda(), _cuda(tau))
        assert dev.lse.is_cuda and dev.lse.dtype == torch.float32
        torch.testing.assert_close(dev.lse.cpu(), cpu.lse, rtol=1e-5, atol=2e-5)
        torch.testing.assert_close(dev.logprobs.cpu(), cpu.logprobs, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("draft", ["point", "soft", "soft_pm", "vocab_map"])
@pytest.mark.parametrize("shape,dtype", [
    ((33, 8, 7), torch.float32), ((33, 17, 1031), torch.bfloat16), ((64, 5, 32001), torch.float16),
    ((4, 4, 152064), torch.bfloat16), ((2, 3, 262144), torch.float32), ((0, 3, 7), torch.float32),
    ((2048, 4, 128), torch.bfloat16),
], ids=str)
def test_verify_cuda_matches_cpu(ops, shape, dtype, draft) -> None:
    B, G, V = shape
    tl, x, dl, pm, vmap = _inputs(B, G, V, dtype, draft, seed=B + G)
    kw = dict(draft_point_mass=pm, vocab_map=vmap, temperature=tau_per_row("per_row", B),
              draft_temperature=0.9, seed=torch.arange(B) * 11 - 3, offset=B)
    cpu = ops.verify(tl, x, dl, **kw)
    dev = ops.verify(tl.cuda(), x.cuda(), _cuda(dl), **{k: _cuda(v) for k, v in kw.items()})
    assert dev.ids.is_cuda
    check_verify_structure(dev, x, V)
    want, margin = verify_with_margin(tl, x, dl, **kw)
    assert_same_samples(cpu, want, margin, VERIFY_FIELDS, context="cpu vs reference:")
    assert_same_samples(dev, cpu, margin, VERIFY_FIELDS, context="cuda vs cpu:")
    # batch seed and greedy rows
    for tau in (0.0, 1.0):
        a = ops.verify(tl, x, dl, temperature=tau, seed=5, vocab_map=vmap)
        b = ops.verify(tl.cuda(), x.cuda(), _cuda(dl), temperature=tau, seed=5,
                       vocab_map=_cuda(vmap))
        assert_same_samples(b, a, margin, VERIFY_FIELDS, context=f"tau {tau}:")


def test_rejection_sample_cuda_matches_cpu(ops) -> None:
    B, G, V = 64, 6, 32001
    tl, x, dl, _, _ = _inputs(B, G, V, torch.bfloat16, "soft", seed=3)
    t_lse = ops.gather_logprobs(tl, torch.zeros(B, G + 1, dtype=torch.long), 1.0).lse
    d_lse = ops.gather_logprobs(dl, torch.zeros(B, G, dtype=torch.long), 1.0).lse
    cpu = ops.rejection_sample(tl, x, dl, target_lse=t_lse, draft_lse=d_lse, seed=9)
    dev = ops.rejection_sample(tl.cuda(), x.cuda(), dl.cuda(), target_lse=t_lse.cuda(),
                               draft_lse=d_lse.cuda(), seed=9)
    _, margin = verify_with_margin(tl, x, dl, seed=9)
    assert_same_samples(dev, cpu, margin, VERIFY_FIELDS, context="rejection_sample:")


@pytest.mark.parametrize("mode", list(CommitMode), ids=lambda m: m.name.lower())
@pytest.mark.parametrize("shape,dtype", [((33, 8, 7), torch.float32),
                                         ((33, 17, 32001), torch.bfloat16),
                                         ((4, 8, 152064), torch.float16),
                                         ((1024, 16, 64), torch.bfloat16)], ids=str)
def test_denoise_cuda_matches_cpu(ops, shape, dtype, mode) -> None:
    B, G, Vd = shape
    logits = rand_logits(shape, dtype, seed=G, neg_inf_frac=0.05)
    g = gen(2)
    tokens = torch.randint(0, Vd, (B, G), generator=g)
    cs = torch.randint(-1, 2, (B, G), generator=g, dtype=torch.int32)
    cs[torch.rand(B, G, generator=g) < 0.5] = -1
    vmap = torch.randperm(2 * Vd, generator=g)[:Vd]
    for step, T, vm in ((2, 5, None), (4, 5, vmap)):
        kw = dict(step=step, num_steps=T, mode=mode, temperature=tau_per_row("per_row", B),
                  seed=torch.arange(B) - 7, offset=step, vocab_map=vm)
        cpu = ops.denoise_step(logits, tokens, cs, **kw)
        dev = ops.denoise_step(logits.cuda(), tokens.cuda(), cs.cuda(),
                               **{k: _cuda(v) for k, v in kw.items()})
        _, margin = denoise_with_margin(logits, tokens, cs, **kw)
        assert_same_samples(dev, cpu, margin, DENOISE_FIELDS, context=f"denoise step {step}:")
        torch.testing.assert_close(dev.lse.cpu(), cpu.lse, rtol=1e-5, atol=2e-5, equal_nan=True)


def test_cuda_layouts_and_invalid_rows(ops) -> None:
    B, G, V = 9, 5, 32001
    tl, x, dl, pm, _ = _inputs(B, G, V, torch.bfloat16, "soft_pm", seed=4)
    tl[1, 0, 3] = math.nan
    tl[2, 2] = -math.inf
    x[2] = tl[2, :G].float().argmax(-1)
    x[2, 2] = 0
    kw = dict(draft_point_mass=pm, temperature=0.0, seed=1)
    want = ops.verify(tl, x, dl, **kw)
    for kind in ("sliced", "transposed", "strided"):
        dev = ops.verify(layout(tl.cuda(), kind), layout(x.cuda(), kind), layout(dl.cuda(), kind),
                         draft_point_mass=layout(pm.cuda(), kind), temperature=0.0, seed=1)
        for f in VERIFY_FIELDS:
            assert torch.equal(getattr(dev, f).cpu(), getattr(want, f)), (kind, f)
    assert want.valid[1].item() is False


def test_cuda_current_stream_is_used(ops) -> None:
    B, G, V = 256, 4, 32001
    tl, x, dl, _, _ = _inputs(B, G, V, torch.bfloat16, "soft", seed=6)
    tl, x, dl = tl.cuda(), x.cuda(), dl.cuda()
    ref = ops.verify(tl, x, dl, seed=3)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        out = ops.verify(tl, x, dl, seed=3)
    torch.cuda.current_stream().wait_stream(s)
    assert torch.equal(out.ids, ref.ids)


# ------------------------------------------------------------------- sampling controls
FILTERS = [dict(top_k=50), dict(top_p=0.9), dict(min_p=0.05), dict(top_k=20, top_p=0.8, min_p=0.01),
           dict(top_k=torch.tensor([0, 5, 300, 1]), top_p=torch.tensor([0.5, 1.0, 0.95, 0.9]))]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kw", FILTERS, ids=lambda k: "-".join(sorted(k)))
def test_filter_logits_cuda_matches_cpu(dtype, kw) -> None:
    from specdiff_ext import ops

    x = (torch.randn(4, 3, 49152, generator=gen(5)) * 3).to(dtype)
    tau = torch.tensor([1.0, 0.7, 0.0, 1.3])
    got = ops.filter_logits(x.cuda(), temperature=tau.cuda(), **{k: _cuda(v) for k, v in kw.items()})
    want = ops.filter_logits(x, temperature=tau, **kw)
    assert torch.equal(got.cpu(), want)


@pytest.mark.parametrize("kw", FILTERS, ids=lambda k: "-".join(sorted(k)))
def test_verify_with_filters_cuda_matches_cpu(kw) -> None:
    from specdiff_ext import ops

    B, G, V = 4, 5, 49152
    g = gen(6)
    tl = torch.randn(B, G + 1, V, generator=g) * 3
    dl = tl[:, :G] + torch.randn(B, G, V, generator=g)
    x = torch.distributions.Categorical(logits=tl[:, :G] / 0.5).sample()
    for seed in range(4):
        a = ops.verify(tl, x, dl, seed=seed, **kw)
        b = ops.verify(tl.cuda(), x.cuda(), dl.cuda(), seed=seed, **{k: _cuda(v) for k, v in kw.items()})
        assert torch.equal(a.ids, b.ids.cpu()) and torch.equal(a.num_accepted, b.num_accepted.cpu())
    ga = ops.gather_logprobs(tl, torch.cat([x, x[:, :1]], 1), 0.8, **kw)
    gb = ops.gather_logprobs(tl.cuda(), torch.cat([x, x[:, :1]], 1).cuda(), 0.8, **{k: _cuda(v) for k, v in kw.items()})
    assert torch.allclose(ga.lse, gb.lse.cpu(), atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apply_penalties_cuda_matches_cpu(dtype) -> None:
    from specdiff_ext import ops

    B, N, V, L = 3, 5, 1000, 400
    g = gen(7)
    x = (torch.randn(B, N, V, generator=g) * 3).to(dtype)
    ids = torch.randint(0, 60, (B, L), generator=g)
    lengths = torch.tensor([0, 100, L - N + 1])
    kw = dict(repetition_penalty=torch.tensor([1.3, 0.9, 1.0]), presence_penalty=0.2, frequency_penalty=0.1)
    want = ops.apply_penalties(x, ids, lengths, **kw)
    got = ops.apply_penalties(x.cuda(), ids.cuda(), lengths.cuda(),
                              **{k: _cuda(v) for k, v in kw.items()})
    assert torch.equal(got.cpu(), want)
