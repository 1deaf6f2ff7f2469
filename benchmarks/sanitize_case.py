#!/usr/bin/env python3
"""Every op once on CUDA at small, awkward sizes: the workload for compute-sanitizer.

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck python3 benchmarks/sanitize_case.py
    compute-sanitizer --tool racecheck python3 benchmarks/sanitize_case.py

torch's caching allocator is turned off (set here too, before torch loads) so that each tensor
is its own cudaMalloc and memcheck sees an access past its end. Sizes are off the tile
boundaries (V = 1031, a drafter vocabulary of 517 mapped into it), plus one row of 151936; each
op runs in float32, bfloat16 and float16, sampled and greedy, with soft and point-mass drafts,
per-row temperatures and seeds, a vocab_map, an invalid (NaN) row, and every commit mode.
Exits 1 if any call raised or returned something malformed; compute-sanitizer's own exit code
and summary report the memory errors and races. `--device cpu` runs the same calls on the CPU
(to check this script where there is no GPU).
"""
from __future__ import annotations

import os

os.environ.setdefault("PYTORCH_NO_CUDA_MEMORY_CACHING", "1")

import sys  # noqa: E402
import traceback  # noqa: E402
from typing import Any, Callable, List  # noqa: E402

import torch  # noqa: E402

try:  # an installed specdiff_ext first, else the checkout this script sits in
    import specdiff_ext  # noqa: F401
except ModuleNotFoundError:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from specdiff_ext import ops  # noqa: E402

FAILURES: List[str] = []
CALLS = 0
DEV = "cuda"


def sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def run(name: str, fn: Callable[[], Any], check: Callable[[Any], None]) -> None:
    """Call fn, synchronise (so a kernel fault surfaces here), check its output."""
    global CALLS
    CALLS += 1
    try:
        out = fn()
        sync()
        check(out)
    except Exception as e:  # noqa: BLE001
        FAILURES.append(f"{name}: {type(e).__name__}: {e}")
        traceback.print_exc()


def check_verify(G: int, V: int) -> Callable[[Any], None]:
    def check(r: Any) -> None:
        ids, k, valid = r.ids.cpu(), r.num_accepted.cpu(), r.valid.cpu()
        assert ids.shape[1] == G + 1, f"ids shape {tuple(ids.shape)}"
        for b in range(ids.shape[0]):
            if not bool(valid[b]):
                assert (ids[b] == -1).all() and int(k[b]) == 0, f"invalid row {b} not cleared"
                continue
            kb = int(k[b])
            assert 0 <= kb <= G, f"num_accepted {kb}"
            assert 0 <= int(ids[b, kb]) < V, f"token {int(ids[b, kb])} outside [0, {V})"
            assert (ids[b, kb + 1:] == -1).all(), "non -1 after the emitted tokens"
    return check


def main() -> int:
    global DEV
    if "--device" in sys.argv:
        DEV = sys.argv[sys.argv.index("--device") + 1]
    if DEV == "cuda" and not torch.cuda.is_available():
        print("sanitize_case: no CUDA device")
        return 1
    dev = DEV
    gen = torch.Generator(device=dev).manual_seed(0)
    B, G, V, Vd = 3, 5, 1031, 517

    def randn(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (torch.randn(*shape, device=dev, generator=gen) * 2.0).to(dtype)

    vocab_map = torch.randperm(V, device=dev, generator=gen)[:Vd].contiguous()
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        tl = randn(B, G + 1, V, dtype=dt)
        dl = tl[:, :G].clone()  # q == p: long accepted runs and a bonus draw
        dl[1] += randn(G, V, dtype=dt)  # row 1: rejections and residual draws
        ids = torch.randint(0, V, (B, G), device=dev, generator=gen)
        ids[0] = tl[0, :G].float().argmax(-1)
        tau_rows = torch.tensor([1.0, 0.0, 0.7], device=dev)
        seeds = torch.tensor([1, 2, 3], dtype=torch.int64, device=dev)
        pm = torch.rand(B, G, device=dev, generator=gen) < 0.4
        bad = tl.clone()
        bad[2, 1, 7] = float("nan")  # row 2 invalid
        chk = check_verify(G, V)
        tag = str(dt).replace("torch.", "")

        run(f"verify soft {tag}", lambda: ops.verify(tl, ids, dl, seed=7), chk)
        run(f"verify int32 ids {tag}", lambda: ops.verify(tl, ids.int(), dl, seed=7, offset=3), chk)
        run(f"verify point mass {tag}", lambda: ops.verify(tl, ids, None, seed=7), chk)
        run(f"verify greedy {tag}", lambda: ops.verify(tl, ids, dl, temperature=0.0), chk)
        run(f"verify per-row tau/seed {tag}",
            lambda: ops.verify(tl, ids, dl, temperature=tau_rows, draft_temperature=tau_rows,
                               seed=seeds), chk)
        run(f"verify draft_point_mass {tag}",
            lambda: ops.verify(tl, ids, dl, draft_point_mass=pm, seed=5), chk)
        run(f"verify nan row {tag}", lambda: ops.verify(bad, ids, dl, seed=5), chk)
        dmap = randn(B, G, Vd, dtype=dt)
        ids_m = vocab_map[torch.randint(0, Vd, (B, G), device=dev, generator=gen)]
        run(f"verify vocab_map {tag}",
            lambda: ops.verify(tl, ids_m, dmap, vocab_map=vocab_map, seed=9), chk)
        run(f"verify non-contiguous {tag}",
            lambda: ops.verify(randn(B, V, G + 1, dtype=dt).transpose(1, 2), ids,
                               randn(B, V, G, dtype=dt).transpose(1, 2), seed=1), chk)

        def gather_chk(r: Any) -> None:
            assert r.lse.shape == (B, G + 1) and r.logprobs.shape == (B, G + 1)
            assert torch.isfinite(r.lse).all(), "non-finite lse on finite logits"

        all_ids = torch.randint(0, V, (B, G + 1), device=dev, generator=gen)
        run(f"gather {tag}", lambda: ops.gather_logprobs(tl, all_ids, 1.0), gather_chk)
        run(f"gather greedy {tag}", lambda: ops.gather_logprobs(tl, all_ids, 0.0),
            lambda r: None)
        run(f"gather per-row tau {tag}", lambda: ops.gather_logprobs(tl, all_ids, tau_rows),
            lambda r: None)

        t_lse = ops.gather_logprobs(tl, all_ids, 1.0).lse
        d_lse = ops.gather_logprobs(dl, ids, 1.0).lse
        run(f"rejection_sample {tag}",
            lambda: ops.rejection_sample(tl, ids, dl, target_lse=t_lse, draft_lse=d_lse, seed=4),
            chk)
        run(f"rejection_sample point mass {tag}",
            lambda: ops.rejection_sample(tl, ids, None, target_lse=t_lse, seed=4), chk)

        logits_d = randn(B, G, Vd, dtype=dt)
        tokens = torch.randint(0, V, (B, G), device=dev, generator=gen)
        cs = torch.where(torch.rand(B, G, device=dev, generator=gen) < 0.4, 0, -1).to(torch.int32)

        def denoise_chk(r: Any) -> None:
            assert r.tokens.shape == (B, G) and r.commit_step.shape == (B, G)
            newly = (cs < 0) & (r.commit_step >= 0)
            assert (r.tokens[newly] >= 0).all() and (r.tokens[newly] < V).all()

        for mode in ("random", "confidence", "left_to_right"):
            for tau in (1.0, 0.0):
                run(f"denoise {mode} tau={tau} {tag}",
                    lambda: ops.denoise_step(logits_d, tokens, cs, step=1, num_steps=4, mode=mode,
                                             temperature=tau, seed=3, vocab_map=vocab_map),
                    denoise_chk)
            run(f"denoise {mode} last step {tag}",
                lambda: ops.denoise_step(logits_d, tokens, cs, step=3, num_steps=4, mode=mode,
                                         seed=seeds), denoise_chk)

        # sampling controls: the filter kernel (per-row settings, ties) and the penalty kernel
        kk = torch.tensor([0, 5, V + 3, 1][:B] + [2] * max(0, B - 4), device=dev)
        pp = torch.full((B,), 0.8, device=dev)

        def filt_chk(r: Any) -> None:
            assert r.shape == tl.shape and torch.isfinite(r.float()).any(-1).all()

        run(f"filter_logits {tag}",
            lambda: ops.filter_logits(tl, temperature=tau_rows, top_k=kk, top_p=pp, min_p=0.01),
            filt_chk)
        run(f"filter_logits ties {tag}",
            lambda: ops.filter_logits(tl.round(), top_k=3, top_p=0.5), filt_chk)
        run(f"verify filtered {tag}",
            lambda: ops.verify(tl, ids, dl, seed=7, top_k=kk, top_p=pp, min_p=0.02), chk)
        run(f"gather filtered {tag}",
            lambda: ops.gather_logprobs(tl, all_ids, 1.0, top_k=4, top_p=0.9), lambda r: None)
        hist = torch.randint(0, V, (B, 40), device=dev, generator=gen)
        run(f"apply_penalties {tag}",
            lambda: ops.apply_penalties(tl, hist, torch.full((B,), 30, device=dev),
                                        repetition_penalty=1.3, presence_penalty=0.2,
                                        frequency_penalty=0.1),
            lambda r: None)

    # one large vocabulary row set: multi-block paths of the kernels
    Vbig = 151936
    tl = randn(2, 4, Vbig, dtype=torch.bfloat16)
    dl = tl[:, :3].clone()
    ids = tl[:, :3].float().argmax(-1)
    run("verify V=151936 bf16", lambda: ops.verify(tl, ids, dl, seed=11), check_verify(3, Vbig))
    run("gather V=151936 bf16", lambda: ops.gather_logprobs(tl, torch.zeros(2, 4, dtype=torch.int64,
                                                                            device=dev)),
        lambda r: None)
    run("denoise V=151936 bf16",
        lambda: ops.denoise_step(tl[:, :3], ids, torch.full((2, 3), -1, dtype=torch.int32,
                                                            device=dev),
                                 step=0, num_steps=2, mode="confidence", seed=2), lambda r: None)

    sync()
    if FAILURES:
        print(f"sanitize_case: {len(FAILURES)} of {CALLS} calls failed:")
        for f in FAILURES:
            print("  " + f)
        return 1
    print(f"sanitize_case: {CALLS} calls ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
