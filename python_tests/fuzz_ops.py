"""Hostile-input fuzzing of every op (run by test_fuzz.py in subprocesses, or by hand):

    python python_tests/fuzz_ops.py --seed 0 --cases 100

Each case draws an op and hostile arguments: odd shapes (B, N, G = 0, V = 1), dtypes (float64
logits, bool ids, float ids), layouts (transposed, sliced, stride-0 expanded, numpy), values
(NaN, +-inf, +-3e38, ids out of range, negative / NaN / tiny temperatures, bad filter
settings, huge seeds and offsets). Every case must end in one of:

* a ValueError / TypeError whose message names an argument of the op, or
* a result that keeps the contract: ids in range where valid is true (accepted drafts, then the
  correction or bonus, then -1), committed tokens inside the vocabulary map, and -- where the
  op is deterministic (gather_logprobs, greedy verify, filter_logits masks, apply_penalties) --
  equal to the float64 reference.

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


def rand_logits(rng: random.Random, shape: tuple, hostile: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(rng.randrange(1 << 30))
    x = torch.randn(shape, generator=g) * rng.choice([0.1, 1.0, 3.0, 30.0])
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
    k = rng.randrange(10)
    if k == 0:
        return rng.choice([-1.0, float("nan"), float("inf"), 1e-38, 1e-30, 1e-25, 1e30])
    if k == 1:
        return torch.tensor([rng.choice([0.0, 0.5, 1.0, 1e-20]) for _ in range(B)])
    if k == 2:
        return rng.choice([0.0, 0.0, 1e-6])
    return rng.choice([0.5, 1.0, 1.7])


def filters(rng: random.Random) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    if rng.random() < 0.3:
        out["top_k"] = rng.choice([0, 1, 3, 10**9, -1])
    if rng.random() < 0.3:
        out["top_p"] = rng.choice([0.5, 0.99, 1.0, 0.0, 1.5, float("nan")])
    if rng.random() < 0.3:
        out["min_p"] = rng.choice([0.0, 0.1, 1.0, -0.5, float("nan")])
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
                  seed=rng.choice([0, -1, 1 << 62, 12345]), offset=rng.choice([0, 7, -1, 1 << 57]))
        if rng.random() < 0.2:
            kw["draft_point_mass"] = torch.rand(B, G) < 0.5
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
        kw = dict(step=rng.choice([0, T - 1, T, -1]), num_steps=rng.choice([T, T, 0]),
                  mode=rng.choice(["random", "confidence", "left_to_right", "nope"]),
                  temperature=temperature(rng, B), seed=rng.randrange(1 << 20), offset=rng.randrange(50))
        if rng.random() < 0.3 and V > 1:
            kw["vocab_map"] = torch.randperm(3 * V)[:V]
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
                rng.choice([0, 1, 5, -1, L])]
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
        if (isinstance(tau, float) and 0.0 < tau <= 1e-20 and "draft_point_mass" not in kw
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
        if not any(k in kw for k in ("top_k", "top_p", "min_p")):
            ref = R.gather_logprobs(_t(args[0]).float(), _t(args[1]), kw["temperature"])
            lse, lp = (_t(r) for r in res)
            for got, want, name in ((lse, ref.lse, "lse"), (lp, ref.logprobs, "logprobs")):
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
    elif op == "filter_logits":
        x = _t(args[0])
        out = _t(res)
        if out.shape != x.shape:
            bad.append("shape changed")
        kept = torch.isfinite(out.float()) | torch.isnan(out.float())
        if x.numel() and bool(((out.float() != x.float()) & kept & ~torch.isnan(x.float())).any()):
            bad.append("a kept entry changed")
    elif op == "apply_penalties":
        if _t(res).dtype != torch.float32:
            bad.append("not float32")
    return bad


def names_an_argument(op: str, msg: str) -> bool:
    return any(n in msg for n in NAMES[op]) or "ids" in msg


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
