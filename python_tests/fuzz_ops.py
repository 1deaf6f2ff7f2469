"""Hostile-input fuzzing of every op (run by test_fuzz.py in subprocesses, or by hand):

    python python_tests/fuzz_ops.py --seed 0 --cases 100

Each case draws an op and hostile arguments: odd shapes (B, N, G = 0, V = 1), dtypes (float64
logits, bool ids, float ids), layouts (transposed, sliced, stride-0 expanded, numpy), values
(NaN, +-inf, +-3e38, ids out of range, negative / NaN / tiny temperatures, bad filter
settings, huge seeds and offsets), and the edges: subnormal and vanishing temperatures (1 / tau
infinite in float32) crossed with every filter and commit mode, tied rows and rows whose max is
0, vocabulary maps that are views into larger buffers (offset, strided), lengths, top_k, steps
and offsets at the edges of int64 and past it, strings and floats where ints belong. Every case
must end in one of:

* a ValueError / TypeError whose message names an argument of the op, or
* a result that keeps the contract: ids in range where valid is true (accepted drafts, then the
  correction or bonus, then -1), committed tokens inside the vocabulary map, and -- where the
  op is deterministic (gather_logprobs, greedy verify, filter_logits masks, apply_penalties) --
  equal to the float64 reference; at a vanishing temperature, the greedy law exactly (the
  reference at temperature 0; docs/ops.md).

A crash (signal, abort) kills the process: the parent sees the exit status, and the line
printed before each case names the culprit. Exit status 1 lists contract violations.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import sys
import traceback
from typing import Any, Callable, Dict, List

import numpy as np
import torch

try:  # the package the caller runs (test_fuzz.py passes its location), else this checkout
    import specdiff_ext  # noqa: F401
except ImportError:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from specdiff_ext import ops  # noqa: E402
from specdiff_ext import reference as R  # noqa: E402

NAMES = {
    "verify": ["target_logits", "draft_ids", "draft_logits", "draft_point_mass", "temperature",
               "draft_temperature", "seed", "offset", "vocab_map", "top_k", "top_p", "min_p"],
    "gather_logprobs": ["logits", "ids", "temperature", "top_k", "top_p", "min_p"],
    "denoise_step": ["logits", "tokens", "commit_step", "step", "num_steps", "mode", "temperature",
                     "seed", "offset", "vocab_map", "top_k", "top_p", "min_p"],
    "filter_logits": ["logits", "temperature", "top_k", "top_p", "min_p"],
    "apply_penalties": ["logits", "ids", "lengths", "repetition_penalty", "presence_penalty",
                        "frequency_penalty"],
    "point_mass_mask": ["commit_step"],
}

HOSTILE = [float("nan"), float("inf"), -float("inf"), 3e38, -3e38, 1e38, 0.0, -0.0]
# Temperatures at and below float32's smallest normal: 1 / tau is infinite below 2^-128.
TINY = [1e-45, 1e-44, 1e-40, 1e-39, 2.9e-39, 3e-39, 1e-38, 1.2e-38, 1e-37]
INT64_EDGES = [2**63 - 1, 2**63, 2**64, -2**63, -2**63 - 1, 10**30]


def rand_logits(rng: random.Random, shape: tuple, hostile: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(rng.randrange(1 << 30))
    x = torch.randn(shape, generator=g) * rng.choice([0.1, 1.0, 3.0, 30.0])
    k = rng.randrange(8)
    if k == 0:  # every entry tied
        x = torch.full(shape, rng.choice([0.0, 1.0, -2.5, 65504.0]))
    elif k == 1:  # ties: a few distinct values
        x = x.round()
    elif k == 2 and x.numel():  # every row's max is exactly 0
        x = x - x.amax(-1, keepdim=True)
    if hostile and x.numel():
        flat = x.view(-1)
        for _ in range(rng.randrange(1, 4)):
            flat[rng.randrange(flat.numel())] = rng.choice(HOSTILE)
    return x


def layout(rng: random.Random, x: torch.Tensor) -> Any:
    k = rng.randrange(6)
    if k == 0 and x.dim() >= 2:  # non-contiguous batch dimension
        big = torch.cat([x, x], 0)
        return big[::2]
    if k == 1:
        return x.numpy() if x.dtype != torch.bfloat16 else x
    if k == 2 and x.dim() >= 1 and x.shape[-1] > 1:  # last dimension not contiguous
        return torch.stack([x, x], -1)[..., 0]
    if k == 3 and x.dim() >= 1 and x.shape[0] == 1:
        return x.expand(3, *x.shape[1:])[:1]
    return x


def temperature(rng: random.Random, B: int) -> Any:
    k = rng.randrange(12)
    if k == 0:
        return rng.choice([-1.0, float("nan"), float("inf"), 1e-38, 1e-30, 1e-25, 1e30, -1e-45,
                           "0.5", True])
    if k == 1:
        return torch.tensor([rng.choice([0.0, 0.5, 1.0, 1e-20] + TINY) for _ in range(B)])
    if k == 2:
        return rng.choice([0.0, 0.0, 1e-6])
    if k in (3, 4):
        return rng.choice(TINY)
    return rng.choice([0.5, 1.0, 1.7])


def vanishing(tau: Any) -> Any:
    """Whether (per row) a temperature is read as 0: 1 / tau infinite in float32."""
    if isinstance(tau, torch.Tensor):
        t = tau.float()
        return (t > 0) & torch.isinf(1.0 / t)
    if isinstance(tau, float):
        t = np.float32(tau)
        return bool(t > 0 and np.isinf(np.float32(1.0) / t))
    return False


def all_vanishing(tau: Any) -> bool:
    v = vanishing(tau)
    return bool(v.all()) if isinstance(v, torch.Tensor) else bool(v)


def vocab_map_view(rng: random.Random, V: int, hi: int) -> torch.Tensor:
    """A map of V distinct ids below hi, as a view into a larger buffer (an offset past a
    poison entry, or every other element), or plain."""
    perm = torch.randperm(hi)[:V]
    k = rng.randrange(3)
    if k == 0:
        return torch.cat([torch.tensor([777777]), perm])[1:]
    if k == 1:
        return torch.stack([perm, torch.full_like(perm, 888888)], 1).reshape(-1)[::2]
    return perm


def filters(rng: random.Random) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    if rng.random() < 0.35:
        out["top_k"] = rng.choice([0, 1, 2, 3, 5, 10**9, 2**63 - 1, 2**64, -1, -2**63 - 1, "3", 2.0]
                                  if rng.random() < 0.3 else [1, 2, 3, 5, 10**9])
    if rng.random() < 0.35:
        out["top_p"] = rng.choice([0.5, 0.9, 0.99, 1.0, 0.0, 1.5, float("nan"), "0.5"]
                                  if rng.random() < 0.3 else [0.5, 0.9, 0.99, 1.0])
    if rng.random() < 0.35:
        out["min_p"] = rng.choice([0.0, 0.1, 0.5, 1.0, -0.5, float("nan")]
                                  if rng.random() < 0.3 else [0.0, 0.1, 0.5, 1.0])
    return out


def make_case(rng: random.Random) -> tuple:
    op = rng.choice(["verify", "verify", "gather_logprobs", "denoise_step", "filter_logits",
                     "apply_penalties", "point_mass_mask"])
    B = rng.choice([0, 1, 2, 3])
    V = rng.choice([1, 2, 7, 130])
    G = rng.choice([0, 1, 3])
    hostile = rng.random() < 0.5
    dtype = rng.choice([torch.float32, torch.float32, torch.bfloat16, torch.float16])
    kw: Dict[str, Any] = {}
    if op == "verify":
        tl = rand_logits(rng, (B, G + 1, V), hostile).to(dtype)
        ids = torch.randint(0, V, (B, G), generator=torch.Generator().manual_seed(rng.randrange(99)))
        if hostile and ids.numel() and rng.random() < 0.3:
            ids.view(-1)[0] = rng.choice([-1, V, 1 << 40])
        args = [layout(rng, tl), layout(rng, ids)]
        if rng.random() < 0.5:
            args.append(layout(rng, rand_logits(rng, (B, G, V), hostile).to(dtype)))
        kw = dict(temperature=temperature(rng, B), draft_temperature=temperature(rng, B),
                  seed=rng.choice([0, -1, 1 << 62, 12345, 2**64 - 1]),
                  offset=rng.choice([0, 7, 0, 7, 0, 7, -1, 1 << 57, 2**63 - 1, 2**64, 1.5]))
        if rng.random() < 0.2:
            kw["draft_point_mass"] = torch.rand(B, G) < 0.5
        if rng.random() < 0.2 and V > 1:  # a reduced drafter vocabulary, the map a view
            Vd = rng.randrange(1, V + 1)
            kw["vocab_map"] = vocab_map_view(rng, Vd, V)
            if len(args) == 3:
                args[2] = layout(rng, rand_logits(rng, (B, G, Vd), hostile).to(dtype))
        kw.update(filters(rng))
    elif op == "gather_logprobs":
        N = rng.choice([0, 1, 4])
        lg = rand_logits(rng, (B, N, V), hostile).to(dtype)
        ids = torch.randint(0, V, (B, N))
        if hostile and ids.numel() and rng.random() < 0.3:
            ids.view(-1)[0] = rng.choice([-1, V])
        args = [layout(rng, lg), layout(rng, ids)]
        kw = dict(temperature=temperature(rng, B))
        kw.update(filters(rng))
    elif op == "denoise_step":
        lg = rand_logits(rng, (B, G, V), hostile).to(dtype)
        tokens = torch.zeros(B, G, dtype=torch.long)
        cs = torch.full((B, G), -1, dtype=torch.int32)
        if G and B and rng.random() < 0.5:
            cs[:, 0] = 0
        T = rng.choice([1, 2, 4])
        args = [layout(rng, lg), tokens, cs]
        edge = rng.random() < 0.2
        kw = dict(step=rng.choice([0, T - 1, T, -1, 2**63, "0"] if edge else [0, T - 1]),
                  num_steps=rng.choice([T, 0, 2**63 - 1, 1.0] if edge else [T]),
                  mode=rng.choice(["random", "confidence", "confidence", "left_to_right", "nope"]),
                  temperature=temperature(rng, B), seed=rng.randrange(1 << 20), offset=rng.randrange(50))
        if rng.random() < 0.4:
            kw["vocab_map"] = vocab_map_view(rng, V, 3 * V)
        kw.update(filters(rng))
    elif op == "filter_logits":
        N = rng.choice([0, 1, 3])
        args = [layout(rng, rand_logits(rng, (B, N, V), hostile).to(dtype))]
        kw = dict(temperature=temperature(rng, B))
        kw.update(filters(rng))
    elif op == "apply_penalties":
        N = rng.choice([0, 1, 3])
        L = rng.choice([0, 2, 9])
        args = [layout(rng, rand_logits(rng, (B, N, V), hostile).to(dtype)),
                layout(rng, torch.randint(0, V, (B, L))),
                rng.choice([0, 1, 5, -1, L, 1.5, "2", torch.full((B,), 2**63 - 1)] + INT64_EDGES)]
        kw = dict(repetition_penalty=rng.choice([1.0, 1.3, 0.0, float("nan")]),
                  presence_penalty=rng.choice([0.0, 0.5, float("inf")]),
                  frequency_penalty=rng.choice([0.0, 0.2]))
    else:
        cs = torch.randint(-1, 3, (B, G), dtype=torch.int32)
        args = [layout(rng, cs)]
    return op, args, kw


def describe(op: str, args: list, kw: dict) -> str:
    def d(a: Any) -> str:
        if isinstance(a, torch.Tensor):
            return f"T{tuple(a.shape)}{str(a.dtype)[6:]}{'' if a.is_contiguous() else 'nc'}"
        if isinstance(a, np.ndarray):
            return f"N{a.shape}{a.dtype}"
        return repr(a)
    return f"{op}({', '.join(d(a) for a in args)}, {', '.join(f'{k}={d(v)}' for k, v in kw.items())})"


def _t(a: Any) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a)) if isinstance(a, np.ndarray) else a


def check(op: str, args: list, kw: dict, res: Any) -> List[str]:
    """Contract violations of a returned result."""
    bad: List[str] = []
    if op == "verify":
        tl = _t(args[0])
        V = tl.shape[-1]
        ids, n, valid = (_t(r) for r in res)
        for b in range(ids.shape[0]):
            if not bool(valid[b]):
                if bool((ids[b] != -1).any()) or int(n[b]) != 0:
                    bad.append(f"invalid row {b} not all -1")
                continue
            k = int(n[b])
            if not 0 <= k < ids.shape[1]:
                bad.append(f"row {b}: num_accepted {k}")
                continue
            head, tail = ids[b, : k + 1], ids[b, k + 1:]
            if bool(((head < 0) | (head >= V)).any()) or bool((tail != -1).any()):
                bad.append(f"row {b}: ids {ids[b].tolist()} with valid=True (V={V})")
        tau = kw.get("temperature")
        if all_vanishing(tau):
            # read as 0: greedy verification's result exactly, ties, filters and drafts included
            ref = R.verify(tl.float(), _t(args[1]), temperature=0.0)
            same = (ref.valid == valid) & (~valid | (ref.ids == ids).all(1))
            if not bool(same.all()):
                bad.append(f"vanishing temperature {tau}: {ids.tolist()} (valid {valid.tolist()}) "
                           f"vs the greedy law {ref.ids.tolist()} (valid {ref.valid.tolist()})")
        elif (isinstance(tau, float) and 0.0 < tau <= 1e-20 and "draft_point_mass" not in kw
                and len(args) == 2 and bool(torch.isfinite(tl.float()).all())):
            # a vanishing temperature is the argmax law: greedy verification's result (rows
            # with a tie for the max excepted)
            top2 = tl.float().topk(min(2, V), -1).values
            if V == 1 or bool((top2[..., 0] > top2[..., -1]).all()):
                ref = R.verify(tl.float(), _t(args[1]), temperature=0.0)
                if not torch.equal(ref.ids, ids) or not bool(valid.all()):
                    bad.append(f"temperature {tau}: {ids.tolist()} (valid {valid.tolist()}) "
                               f"vs the argmax law {ref.ids.tolist()}")
        if isinstance(tau, float) and tau == 0.0 and not any(k in kw for k in ("top_k", "top_p", "min_p")):
            ref = R.verify(tl.float(), _t(args[1]), temperature=0.0)
            same = (ref.valid == valid) & (~valid | (ref.ids == ids).all(1))
            if not bool(same.all()):
                bad.append(f"greedy differs from the reference: {ids.tolist()} vs {ref.ids.tolist()}")
    elif op == "gather_logprobs":
        tau = kw["temperature"]
        if all_vanishing(tau) or not any(k in kw for k in ("top_k", "top_p", "min_p")):
            # a vanishing temperature is read as 0 (filters pass such rows through)
            if isinstance(tau, torch.Tensor):
                tau = torch.where(vanishing(tau), 0.0, tau.float())
            elif vanishing(tau):
                tau = 0.0
            x = _t(args[0]).double()
            ref = R.gather_logprobs(x.float(), _t(args[1]), tau)
            # log-probabilities of the row less its max (float64): the same law, without the
            # precision a large scaled max costs the unshifted float64 sum (docs/ops.md)
            ref_lp = R.gather_logprobs(x - x.amax(-1, keepdim=True), _t(args[1]), tau).logprobs
            lse, lp = (_t(r) for r in res)
            for got, want, name in ((lse, ref.lse, "lse"), (lp, ref_lp, "logprobs")):
                w = want.float()
                ok = torch.isclose(got, w, rtol=1e-4, atol=1e-4) | (torch.isnan(got) & torch.isnan(w)) | (got == w)
                if not bool(ok.all()):
                    bad.append(f"{name} {got.tolist()} != reference {w.tolist()}")
    elif op == "denoise_step":
        toks, cs, lse, valid = (_t(r) for r in res)
        vm = kw.get("vocab_map")
        hi = int(vm.max()) + 1 if vm is not None else _t(args[0]).shape[-1]
        newly = (cs >= 0) & (_t(args[2]) < 0)  # committed by this call
        for b in range(toks.shape[0]):
            if bool(valid[b]):
                t = toks[b][newly[b]]
                if bool(((t < 0) | (t >= hi)).any()):
                    bad.append(f"row {b}: new tokens {t.tolist()} outside [0, {hi})")
                if vm is not None and not bool(torch.isin(t, vm).all()):
                    bad.append(f"row {b}: new tokens {t.tolist()} not in the vocabulary map")
                tau = kw["temperature"]
                if vanishing(tau) is True or (isinstance(tau, torch.Tensor) and bool(vanishing(tau)[b])):
                    # read as 0: the argmax (lowest index), through the map
                    j = _t(args[0])[b].float().argmax(-1)
                    want = (vm[j] if vm is not None else j)[newly[b]]
                    if not torch.equal(t, want):
                        bad.append(f"row {b}: vanishing temperature {tau}: tokens {t.tolist()} "
                                   f"vs the argmax {want.tolist()}")
    elif op == "filter_logits":
        x = _t(args[0])
        out = _t(res)
        if out.shape != x.shape:
            bad.append("shape changed")
        kept = torch.isfinite(out.float()) | torch.isnan(out.float())
        if x.numel() and bool(((out.float() != x.float()) & kept & ~torch.isnan(x.float())).any()):
            bad.append("a kept entry changed")
        if x.numel() and out.shape == x.shape:
            # at least one entry of every row is kept (rows holding NaN / +inf pass through)
            finite_rows = torch.isfinite(x.float()).all(-1)
            if bool(((~kept).all(-1) & finite_rows).any()):
                bad.append("a row keeps no entry")
            v = vanishing(kw["temperature"])
            rows = v if isinstance(v, torch.Tensor) else torch.full((x.shape[0],), bool(v))
            same = (out.float() == x.float()) | (torch.isnan(out.float()) & torch.isnan(x.float()))
            if bool((rows & ~same.flatten(1).all(1)).any()):
                bad.append("a row at a vanishing temperature was filtered (it passes through)")
    elif op == "apply_penalties":
        if _t(res).dtype != torch.float32:
            bad.append("not float32")
    return bad


def names_an_argument(op: str, msg: str) -> bool:
    # the message must start by naming it (a pybind11 signature dump would name every one)
    return (any(n in msg for n in NAMES[op]) or "ids" in msg) and "incompatible function" not in msg


def run(seed: int, cases: int) -> int:
    rng = random.Random(seed)
    failures = []
    outcomes = {"result": 0, "named error": 0}
    for i in range(cases):
        op, args, kw = make_case(rng)
        desc = describe(op, args, kw)
        print(f"case {seed}:{i} {desc}", flush=True)
        fn: Callable = getattr(ops, op)
        try:
            res = fn(*args, **kw)
        except (ValueError, TypeError) as exc:
            outcomes["named error"] += 1
            if not names_an_argument(op, str(exc)):
                failures.append(f"{seed}:{i} {desc}: error names no argument: {exc}")
            continue
        except Exception as exc:  # noqa: BLE001
            failures.append(f"{seed}:{i} {desc}: {type(exc).__name__}: {exc}\n{traceback.format_exc()}")
            continue
        outcomes["result"] += 1
        for b in check(op, args, kw, res):
            failures.append(f"{seed}:{i} {desc}: {b}")
    for f in failures:
        print("FAIL", f, flush=True)
    print(f"seed {seed}: {cases} cases, {outcomes}, {len(failures)} failures", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cases", type=int, default=100)
    a = ap.parse_args()
    torch.set_num_threads(1)
    sys.exit(run(a.seed, a.cases))
