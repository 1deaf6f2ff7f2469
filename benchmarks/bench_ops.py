#!/usr/bin/env python3
"""Kernel benchmarks: specdiff_ext.ops against its baselines, measured in the same run.

For each op (verify, rejection_sample, gather_logprobs, denoise_step) and shape, times

    ours     specdiff_ext.ops (the compiled CPU / CUDA kernels)
    ref      specdiff_ext.reference, eager, compute_dtype=float32
    compile  torch.compile of that reference (skipped when compiling fails or runs too long)
    naive    reference.naive_verify: plain torch (softmax of every row, gather, first
             rejection, residual draw), the speed baseline for verify
    fi       FlashInfer (CUDA only, when importable): for verify flashinfer.sampling.softmax of
             the target and draft logits + chain_speculative_sampling (FlashInfer takes
             probabilities, so its time includes both softmaxes); for rejection_sample
             chain_speculative_sampling alone on probabilities computed beforehand (as our
             rejection_sample gets its log-sum-exps)

and prints the ratios baseline / ours ("x naive" = how many times faster ours is than
naive_verify). Workload: target logits ~ N(0, 2^2); draft logits are by default an exact copy
of the target's first G rows (--accept all: q == p, every draft is accepted, the most work
for ours, which on the CPU reads nothing past the first rejection); --accept mixed adds
N(0, 0.5^2) noise to the draft logits (each draft accepted with probability ~0.8, ~3.4 of 8). Draft ids are drawn from the draft distribution.

Timing. CPU: wall clock, median of repeated calls after a warm-up, the implementations called
in turn so that background load hits them alike. CUDA: CUDA events around
each call, median after warm-up, L2 flushed before each call and inputs rotated over several
buffer sets so that repeated calls do not just measure the cache. GB/s is the effective
bandwidth of ours: the bytes of logits the op must read (verify, gather: every row; denoise:
masked rows; rejection_sample: the bonus/residual rows) over its time.

Sampling controls (--filters): verify with top-k / top-p / min-p against verify at plain
temperature, same shapes, same run (both on blocks whose every draft is accepted, so every
target row is read: the drafts are drawn from the law verification tests them against), on
"model" logits (the default target, SmolLM2-135M-Instruct, over held-out prompts: rows of
real next-token distributions; skipped when it cannot be loaded), "normal" N(0, 2^2) logits
(flat: the hardest case for the windowed candidate search) and "peaked" ones (8 tokens per
row lifted by 12); on CUDA also
FlashInfer's top_k_top_p_sampling_from_logits against ours sampling one token per row under
the same top-k / top-p (verify with G = 0 over the B * (G+1) rows).

Tree verification (--tree): ops.verify_tree against a plain-torch walk of the same trees
(softmax of every node row at once, then the walk: a draw per depth with torch.multinomial, or
the argmax, and the child lookup on the host), on random trees of --N nodes (each child carries
its parent row's argmax with probability 0.6, and rows are peaked at their argmax, p ~ 0.9, so
walks go deep), per batch size.

Usage:
    python3 benchmarks/bench_ops.py --quick --device cpu
    python3 benchmarks/bench_ops.py --tree --device cpu --B 1,8,32 --N 16,64 --V 49152
    python3 benchmarks/bench_ops.py --filters --device cpu --B 1,8,32 --G 8 --V 49152
    python3 benchmarks/bench_ops.py --device cuda --json bench.json
    python3 benchmarks/bench_ops.py --ops verify --B 1,8,32 --G 8 --V 49152
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import json
import logging
import math
import os
import platform
import signal
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

try:  # an installed specdiff_ext first, else the checkout this script sits in
    import specdiff_ext.reference  # noqa: F401
except ModuleNotFoundError:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

OPS = ("verify", "rejection_sample", "gather_logprobs", "denoise_step")
ALIASES = {"gather": "gather_logprobs", "rejection": "rejection_sample", "rs": "rejection_sample",
           "denoise": "denoise_step"}
IMPLS = ("ours", "ref", "compile", "naive", "fi")
GRID_B, GRID_G, GRID_V = (1, 8, 32), (4, 8, 16), (32000, 49152, 151936)
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
SHORT = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
SEED, OFFSET = 1234, 0
LOGIT_STD = 2.0
MIXED_NOISE_STD = 0.5  # draft = target + N(0, 0.5^2): each draft accepted w.p. ~0.8


# ------------------------------------------------------------------------------------------
# Cases and results
# ------------------------------------------------------------------------------------------


@dataclass
class Case:
    op: str
    device: str
    dtype: torch.dtype
    B: int
    G: int
    V: int
    mode: Optional[str] = None  # denoise commit mode


@dataclass
class Result:
    op: str
    device: str
    dtype: str
    B: int
    G: int
    V: int
    mode: Optional[str]
    ms: Dict[str, Optional[float]] = field(default_factory=dict)  # impl -> median ms
    reps: Dict[str, int] = field(default_factory=dict)
    skipped: Dict[str, str] = field(default_factory=dict)  # impl -> why not timed
    accepted: Dict[str, float] = field(default_factory=dict)  # impl -> mean num_accepted
    compile_s: Optional[float] = None  # first-call (compile) time of the compiled reference
    bytes_read: Optional[int] = None  # logits bytes ours must read
    gbps: Optional[float] = None  # bytes_read / ours time
    buffer_sets: int = 1

    def speedup(self, impl: str) -> Optional[float]:
        """How many times faster ours is than `impl` (baseline ms / ours ms)."""
        ours, other = self.ms.get("ours"), self.ms.get(impl)
        if ours is None or other is None or ours <= 0:
            return None
        return other / ours

    def to_json(self) -> Dict[str, Any]:
        d = asdict(self)
        d["speedup"] = {impl: self.speedup(impl) for impl in IMPLS if impl != "ours"}
        return d


def parse_int_list(s: str) -> Tuple[int, ...]:
    return tuple(int(x) for x in s.split(",") if x.strip())


def build_cases(args: argparse.Namespace, devices: List[str]) -> List[Case]:
    cases: List[Case] = []
    for dev in devices:
        if args.dtypes:
            dtypes = [DTYPES[d.strip()] for d in args.dtypes.split(",")]
        else:
            dtypes = [torch.float32] if dev == "cpu" else [torch.bfloat16]
        for dt in dtypes:
            for op in args.ops:
                modes = args.denoise_modes if op == "denoise_step" else [None]
                if args.quick and not (args.B or args.G or args.V):
                    # the issue's check (verify, G=8, V=49152, B=1..32) plus one shape per op
                    if op == "verify":
                        shapes = [(b, 8, 49152) for b in GRID_B]
                        if dev == "cuda":
                            shapes += [(32, 8, 151936)]
                    else:
                        shapes = [(8, 8, 49152)] + ([(32, 8, 151936)] if dev == "cuda" else [])
                    modes = modes[:1]
                else:
                    shapes = [(b, g, v) for b in (args.B or GRID_B) for g in (args.G or GRID_G)
                              for v in (args.V or GRID_V)]
                for (b, g, v) in shapes:
                    for m in modes:
                        cases.append(Case(op, dev, dt, b, g, v, m))
    return cases


# ------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------


def _draw(logits: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Sample one id per row of (..., V) logits (Gumbel-max in float32)."""
    u = torch.rand(logits.shape, device=logits.device, generator=gen).clamp_(1e-20, 1.0)
    return (logits.float() - torch.log(-torch.log(u))).argmax(-1)


def make_inputs(case: Case, args: argparse.Namespace, gen: torch.Generator) -> Dict[str, Any]:
    """One set of inputs for `case` (all baselines read the same tensors)."""
    B, G, V, dev, dt = case.B, case.G, case.V, case.device, case.dtype
    tau = args.temperature
    inp: Dict[str, Any] = {}
    if case.op in ("verify", "rejection_sample"):
        target = (torch.randn(B, G + 1, V, device=dev, generator=gen) * LOGIT_STD).to(dt)
        if args.accept == "all":
            draft = target[:, :G].clone()  # q == p bit for bit: every draft accepted
        else:
            noise = torch.randn(B, G, V, device=dev, generator=gen) * MIXED_NOISE_STD
            draft = (target[:, :G].float() + noise).to(dt)
        ids = _draw(draft / max(tau, 1e-6), gen)  # (B, G) int64
        inp.update(target=target, draft_ids=ids,
                   draft_logits=None if args.draft == "point" else draft)
        if case.op == "rejection_sample":
            t = max(tau, 1e-6) if tau > 0 else 1.0
            inp["target_lse"] = torch.logsumexp(target.float() / t, -1) if tau > 0 else \
                target.float().amax(-1)
            if inp["draft_logits"] is not None:
                inp["draft_lse"] = torch.logsumexp(draft.float() / t, -1) if tau > 0 else \
                    draft.float().amax(-1)
        if dev == "cuda" and args.flashinfer != "off":
            inp["ids32"] = ids.to(torch.int32)
            if case.op == "rejection_sample" and tau > 0:
                inp["t_probs"] = torch.softmax(target.float() / tau, -1)
                inp["d_probs"] = torch.softmax(draft.float() / tau, -1)
    elif case.op == "gather_logprobs":
        inp["logits"] = (torch.randn(B, G + 1, V, device=dev, generator=gen) * LOGIT_STD).to(dt)
        inp["ids"] = torch.randint(0, V, (B, G + 1), device=dev, generator=gen)
    elif case.op == "denoise_step":
        inp["logits"] = (torch.randn(B, G, V, device=dev, generator=gen) * LOGIT_STD).to(dt)
        inp["tokens"] = torch.randint(0, V, (B, G), device=dev, generator=gen)
        masked = torch.rand(B, G, device=dev, generator=gen) < 0.5  # half still masked
        inp["commit_step"] = torch.where(masked, -1, 0).to(torch.int32)
    else:
        raise ValueError(f"unknown op {case.op!r}")
    return inp


def input_bytes(inp: Dict[str, Any]) -> int:
    return sum(t.numel() * t.element_size() for t in inp.values() if isinstance(t, torch.Tensor))


def bytes_read(case: Case, inp: Dict[str, Any], num_accepted: Optional[torch.Tensor]) -> int:
    """Bytes of logits ours must read at least (see the module docstring)."""
    es = torch.tensor([], dtype=case.dtype).element_size()
    B, G, V = case.B, case.G, case.V
    if case.op == "verify":
        rows = B * (G + 1) + (B * G if inp["draft_logits"] is not None else 0)
        return rows * V * es
    if case.op == "gather_logprobs":
        return B * (G + 1) * V * es
    if case.op == "denoise_step":
        return int((inp["commit_step"] < 0).sum()) * V * es
    # rejection_sample: target row k of each batch row, plus draft row k on a soft rejection
    rows = B
    if num_accepted is not None and inp.get("draft_logits") is not None:
        rows += int((num_accepted.cpu() < G).sum())
    return rows * V * es


# ------------------------------------------------------------------------------------------
# The implementations
# ------------------------------------------------------------------------------------------


class Impls:
    """Callables per (impl, op) taking one input set; each returns (output, num_accepted)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.ref = importlib.import_module("specdiff_ext.reference")
        try:
            self.ours = importlib.import_module("specdiff_ext.ops")
            self.ours_name = "specdiff_ext.ops"
        except Exception as e:  # noqa: BLE001
            if not args.ours_reference:
                sys.exit(f"cannot import specdiff_ext.ops ({type(e).__name__}: {e}); build it "
                         "(pip install .) or pass --ours-reference to test the harness")
            self.ours = None
            self.ours_name = "specdiff_ext.reference (float32; --ours-reference)"
        if args.ours_reference:
            self.ours = None
            self.ours_name = "specdiff_ext.reference (float32; --ours-reference)"
        self.compiled: Dict[str, Callable] = {}
        self.compile_dead: Dict[str, str] = {}  # op -> why compile is off for it
        self.compile_spent = 0.0
        self.fi: Any = None
        self.fi_dead: Optional[str] = None

    # -- reference-style call (same signature for ours, ref and compiled ref) -------------

    def _ref_kwargs(self, fn: Callable) -> Dict[str, Any]:
        try:
            params = inspect.signature(fn).parameters
        except (TypeError, ValueError):
            return {}
        return {"compute_dtype": torch.float32} if "compute_dtype" in params else {}

    def call(self, mod_fn: Callable, op: str, inp: Dict[str, Any], extra: Dict[str, Any],
             mode: Optional[str] = None) -> Any:
        tau = self.args.temperature
        if op == "verify":
            r = mod_fn(inp["target"], inp["draft_ids"], inp["draft_logits"], temperature=tau,
                       draft_temperature=tau, seed=SEED, offset=OFFSET, **extra)
            return r, r.num_accepted
        if op == "rejection_sample":
            r = mod_fn(inp["target"], inp["draft_ids"], inp["draft_logits"],
                       target_lse=inp["target_lse"], draft_lse=inp.get("draft_lse"),
                       temperature=tau, draft_temperature=tau, seed=SEED, offset=OFFSET, **extra)
            return r, r.num_accepted
        if op == "gather_logprobs":
            return mod_fn(inp["logits"], inp["ids"], temperature=tau, **extra), None
        if op == "denoise_step":
            return mod_fn(inp["logits"], inp["tokens"], inp["commit_step"], step=1, num_steps=4,
                          mode=mode or "random", temperature=tau, seed=SEED, offset=OFFSET,
                          **extra), None
        raise ValueError(op)

    def get(self, impl: str, case: Case) -> Tuple[Optional[Callable], Optional[str]]:
        """The callable for `impl` on `case`, or (None, reason)."""
        op, args, mode = case.op, self.args, case.mode
        if impl == "ours":
            if self.ours is None:
                fn = getattr(self.ref, op)
                kw = self._ref_kwargs(fn)
                return (lambda inp: self.call(fn, op, inp, kw, mode)), None
            fn = getattr(self.ours, op)
            return (lambda inp: self.call(fn, op, inp, {}, mode)), None
        if impl == "ref":
            if args.no_ref:
                return None, "--no-ref"
            fn = getattr(self.ref, op)
            kw = self._ref_kwargs(fn)
            return (lambda inp: self.call(fn, op, inp, kw, mode)), None
        if impl == "compile":
            return self._get_compiled(case)
        if impl == "naive":
            if op != "verify":
                return None, "verify only"
            gen = torch.Generator(device=case.device).manual_seed(0)
            nv = self.ref.naive_verify

            def naive(inp: Dict[str, Any]) -> Any:
                r = nv(inp["target"], inp["draft_ids"], inp["draft_logits"],
                       temperature=args.temperature, generator=gen)
                return r, r.num_accepted

            return naive, None
        if impl == "fi":
            return self._get_flashinfer(case)
        raise ValueError(impl)

    # -- torch.compile of the reference ---------------------------------------------------

    def _get_compiled(self, case: Case) -> Tuple[Optional[Callable], Optional[str]]:
        args, op = self.args, case.op
        if not args.compile_on:
            return None, args.compile_off_reason
        if args.compile_ops and op not in args.compile_ops:
            return None, "not in --compile-ops"
        if op in self.compile_dead:
            return None, self.compile_dead[op]
        if self.compile_spent > args.compile_budget:
            return None, f"compile budget ({args.compile_budget:.0f} s) spent"
        if op not in self.compiled:
            self.compiled[op] = torch.compile(getattr(self.ref, op))
        cfn = self.compiled[op]
        kw = self._ref_kwargs(getattr(self.ref, op))
        return (lambda inp: self.call(cfn, op, inp, kw, case.mode)), None

    # -- FlashInfer -----------------------------------------------------------------------

    def _get_flashinfer(self, case: Case) -> Tuple[Optional[Callable], Optional[str]]:
        args = self.args
        if case.device != "cuda":
            return None, "CUDA only"
        if args.flashinfer == "off":
            return None, "--flashinfer off"
        if case.op not in ("verify", "rejection_sample"):
            return None, "no FlashInfer counterpart"
        if args.temperature <= 0:
            return None, "greedy"
        if args.draft == "point":
            return None, "takes draft probabilities"
        if self.fi_dead:
            return None, self.fi_dead
        if self.fi is None:
            t0 = time.perf_counter()
            try:
                with time_limit(args.flashinfer_timeout):
                    import flashinfer.sampling as fs  # noqa: PLC0415

                    # first call JIT-compiles the sampling module (or loads it from the cache)
                    x = torch.randn(2, 16, device="cuda")
                    fs.softmax(x)
                    p = torch.softmax(x, -1)
                    fs.chain_speculative_sampling(p[:1, None].expand(1, 1, 16).contiguous(),
                                                  torch.zeros(1, 1, dtype=torch.int32,
                                                              device="cuda"),
                                                  p[None].contiguous(), seed=SEED, offset=OFFSET)
                    torch.cuda.synchronize()
                self.fi = fs
                import flashinfer  # noqa: PLC0415

                print(f"# FlashInfer {getattr(flashinfer, '__version__', '?')} ready after "
                      f"{time.perf_counter() - t0:.1f} s", flush=True)
            except BaseException as e:  # noqa: BLE001  (TimeoutError, ImportError, JIT errors)
                if isinstance(e, KeyboardInterrupt):
                    raise
                msg = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:160]
                self.fi_dead = f"unavailable ({msg})"
                print(f"# FlashInfer skipped: {msg}", flush=True)
                return None, self.fi_dead
        fs, tau = self.fi, args.temperature
        B, G, V = case.B, case.G, case.V
        temp = None if tau == 1.0 else tau

        if case.op == "verify":
            def fi_verify(inp: Dict[str, Any]) -> Any:
                tp = fs.softmax(inp["target"].view(B * (G + 1), V), temperature=temp)
                dp = fs.softmax(inp["draft_logits"].reshape(B * G, V), temperature=temp)
                out, _, emitted = fs.chain_speculative_sampling(
                    dp.view(B, G, V), inp["ids32"], tp.view(B, G + 1, V), seed=SEED,
                    offset=OFFSET)
                return out, emitted

            return fi_verify, None

        def fi_rs(inp: Dict[str, Any]) -> Any:
            out, _, emitted = fs.chain_speculative_sampling(
                inp["d_probs"], inp["ids32"], inp["t_probs"], seed=SEED, offset=OFFSET)
            return out, emitted

        return fi_rs, None


# ------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise TimeoutError in the main thread after `seconds` (SIGALRM; no-op if <= 0)."""
    if seconds <= 0 or not hasattr(signal, "setitimer"):
        yield
        return

    def handler(signum, frame):  # noqa: ANN001, ARG001
        raise TimeoutError(f"no result within {seconds:.0f} s")

    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def time_cpu_interleaved(fns: Dict[str, Callable], sets: List[Dict[str, Any]], budget_s: float,
                         min_reps: int, max_reps: int) -> Dict[str, Tuple[float, int]]:
    """Median wall-clock ms of each fn, calling them in turn (ours, ref, naive, ours, ...).

    Interleaving puts every implementation under the same background load, so the ratios stay
    meaningful on a shared machine. An implementation stops after `min_reps` calls once its
    calls add up to `budget_s`, or after max(5 * budget_s, 2 s) whatever its count.
    """
    times: Dict[str, List[float]] = {k: [] for k in fns}
    spent = {k: 0.0 for k in fns}
    hard = max(5 * budget_s, 2.0)

    def done(k: str) -> bool:
        n = len(times[k])
        return n >= max_reps or spent[k] >= hard or (n >= min_reps and spent[k] >= budget_s)

    i = 0
    while not all(done(k) for k in fns):
        for k, fn in fns.items():
            if done(k):
                continue
            t0 = time.perf_counter()
            fn(sets[i % len(sets)])
            dt = time.perf_counter() - t0
            times[k].append(dt)
            spent[k] += dt
        i += 1
    return {k: (statistics.median(v) * 1e3, len(v)) for k, v in times.items()}


def _l2_bytes() -> int:
    """The GPU's L2 size (60 MB if torch does not say)."""
    return int(getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 60 << 20) or 60 << 20)


def time_cuda(fn: Callable, sets: List[Dict[str, Any]], flush: torch.Tensor, warmup_ms: float,
              rep_ms: float, min_reps: int, max_reps: int) -> Tuple[float, int]:
    """Median ms per call, CUDA events around each call, L2 flushed before each call."""
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for i in range(3):
        flush.zero_()
        fn(sets[i % len(sets)])
    end.record()
    torch.cuda.synchronize()
    est = max(start.elapsed_time(end) / 3, 1e-3)
    for i in range(min(max(1, int(warmup_ms / est)), 200)):
        fn(sets[i % len(sets)])
    n = int(min(max(rep_ms / est, min_reps), max_reps))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for i in range(n):
        flush.zero_()
        starts[i].record()
        fn(sets[i % len(sets)])
        ends[i].record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends)), n


def mean_accepted(na: Any) -> Optional[float]:
    if na is None:
        return None
    return float(torch.as_tensor(na).float().mean())


def run_case(case: Case, impls: Impls, args: argparse.Namespace,
             flush: Optional[torch.Tensor]) -> Result:
    res = Result(case.op, case.device, SHORT[case.dtype], case.B, case.G, case.V, case.mode)
    gen = torch.Generator(device=case.device).manual_seed(SEED)
    first = make_inputs(case, args, gen)
    per_set = input_bytes(first)
    if case.device == "cuda":
        l2 = _l2_bytes()
        n_sets = min(max(2, math.ceil(4 * l2 / per_set)), args.max_sets, max(1, args.max_set_bytes // per_set))
    else:
        n_sets = min(max(1, math.ceil(64e6 / per_set)), 4, max(1, args.max_set_bytes // per_set))
    sets = [first] + [make_inputs(case, args, gen) for _ in range(n_sets - 1)]
    res.buffer_sets = n_sets
    ready: Dict[str, Callable] = {}

    def failed(impl: str, e: BaseException) -> None:
        if isinstance(e, KeyboardInterrupt):
            raise e
        msg = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:160]
        res.ms[impl] = None
        res.skipped[impl] = msg
        ready.pop(impl, None)
        if impl == "compile":
            impls.compile_dead[case.op] = f"failed earlier ({msg[:60]})"
        if impl == "fi":
            impls.fi_dead = f"failed earlier ({msg[:60]})"
        print(f"#   {case.op} B={case.B} G={case.G} V={case.V} {impl}: {msg}", flush=True)
        if case.device == "cuda":
            with contextlib.suppress(Exception):
                torch.cuda.synchronize()

    for impl in IMPLS:
        fn, why = impls.get(impl, case)
        if fn is None:
            res.ms[impl] = None
            res.skipped[impl] = why or "n/a"
            continue
        try:
            # first call: warm-up (and, for compile, the compilation itself)
            t0 = time.perf_counter()
            limit = args.compile_timeout if impl == "compile" else args.call_timeout
            with time_limit(limit):
                out, na = fn(first)
                if case.device == "cuda":
                    torch.cuda.synchronize()
            first_s = time.perf_counter() - t0
            if impl == "compile":
                impls.compile_spent += first_s
                res.compile_s = first_s
                with time_limit(args.compile_timeout):  # a recompile for the next set is rare
                    fn(sets[-1])
            acc = mean_accepted(na)
            if acc is not None:
                res.accepted[impl] = acc
            if impl == "ours":
                res.bytes_read = bytes_read(case, first, None if na is None else torch.as_tensor(na))
            ready[impl] = fn
            if case.device == "cuda":  # one implementation at a time on a dedicated GPU
                with time_limit(args.call_timeout * 20):
                    ms, n = time_cuda(fn, sets, flush, args.warmup_ms, args.rep_ms, args.min_reps,
                                      args.max_reps)
                res.ms[impl], res.reps[impl] = ms, n
        except BaseException as e:  # noqa: BLE001
            failed(impl, e)
    if case.device != "cuda" and ready:
        try:
            with time_limit(args.call_timeout * 20):
                timed = time_cpu_interleaved(ready, sets, args.budget_s, args.min_reps,
                                             args.max_reps)
            for impl, (ms, n) in timed.items():
                res.ms[impl], res.reps[impl] = ms, n
        except BaseException as e:  # noqa: BLE001
            for impl in list(ready):
                failed(impl, e)
    if res.ms.get("ours") and res.bytes_read:
        res.gbps = res.bytes_read / (res.ms["ours"] * 1e-3) / 1e9
    del sets, first
    if case.device == "cuda":
        torch.cuda.empty_cache()
    return res


# ------------------------------------------------------------------------------------------
# Reporting
# ------------------------------------------------------------------------------------------

COLS = [("op", 18), ("dev", 4), ("dtype", 5), ("B", 3), ("G", 3), ("V", 7), ("ours ms", 9),
        ("ref ms", 9), ("comp ms", 9), ("naive ms", 9), ("fi ms", 9), ("x ref", 7),
        ("x comp", 7), ("x naive", 7), ("x fi", 6), ("GB/s", 7), ("acc", 5)]


def _fmt_ms(v: Optional[float]) -> str:
    if v is None:
        return "-"
    return f"{v:.4f}" if v < 1 else (f"{v:.3f}" if v < 100 else f"{v:.1f}")


def _fmt_x(v: Optional[float]) -> str:
    if v is None:
        return "-"
    return f"{v:.2f}" if v < 10 else f"{v:.1f}" if v < 1000 else f"{v:.0f}"


def header_line() -> str:
    return " ".join(f"{name:>{w}}" if i > 0 else f"{name:<{w}}" for i, (name, w) in enumerate(COLS))


def row_line(r: Result) -> str:
    op = r.op if r.mode is None else f"{r.op}:{r.mode[:4]}"
    vals = [op, r.device, r.dtype, str(r.B), str(r.G), str(r.V), _fmt_ms(r.ms.get("ours")),
            _fmt_ms(r.ms.get("ref")), _fmt_ms(r.ms.get("compile")), _fmt_ms(r.ms.get("naive")),
            _fmt_ms(r.ms.get("fi")), _fmt_x(r.speedup("ref")), _fmt_x(r.speedup("compile")),
            _fmt_x(r.speedup("naive")), _fmt_x(r.speedup("fi")),
            "-" if r.gbps is None else f"{r.gbps:.1f}",
            "-" if "ours" not in r.accepted else f"{r.accepted['ours']:.2f}"]
    return " ".join(f"{v:>{w}}" if i > 0 else f"{v:<{w}}" for i, (v, (_, w)) in enumerate(zip(vals, COLS)))


def device_desc(dev: str) -> str:
    if dev == "cuda":
        p = torch.cuda.get_device_properties(0)
        return (f"{p.name}, {p.multi_processor_count} SMs, L2 {_l2_bytes() / 2**20:.0f} MiB, "
                f"{p.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}")
    name = platform.processor() or "cpu"
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    return f"{name}, {torch.get_num_threads()} torch threads, OMP_NUM_THREADS=" \
           f"{os.environ.get('OMP_NUM_THREADS', 'unset')}"


def copy_bandwidth_cuda() -> float:
    """Device-to-device copy GB/s (bytes read + written) on 1 GiB: the practical ceiling."""
    n = 2**28
    a = torch.empty(n, dtype=torch.float32, device="cuda").normal_()
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(10):
        b.copy_(a)
    e.record()
    torch.cuda.synchronize()
    gbps = 2 * a.numel() * 4 * 10 / (s.elapsed_time(e) * 1e-3) / 1e9
    del a, b
    torch.cuda.empty_cache()
    return gbps


def issue_check(results: List[Result]) -> List[str]:
    """The issue's bar: CPU verify >= 3x faster than naive_verify at G=8, V=49152, B=1..32."""
    lines = []
    rows = [r for r in results if r.op == "verify" and r.device == "cpu" and r.G == 8
            and r.V == 49152 and r.B in (1, 8, 32)]
    for dt in sorted({r.dtype for r in rows}):
        sel = sorted((r for r in rows if r.dtype == dt), key=lambda r: r.B)
        xs = [(r.B, r.speedup("naive")) for r in sel]
        ok = all(x is not None and x >= 3.0 for _, x in xs)
        verdict = ("PASS" if ok else "FAIL") if len(xs) == 3 else \
            ("incomplete (run B=1,8,32)" if ok else "FAIL")
        parts = ", ".join(f"B={b}: {'-' if x is None else f'{x:.2f}x'}" for b, x in xs)
        lines.append(f"CPU verify vs naive_verify, G=8, V=49152, {dt}: {parts} -> {verdict} "
                     "(bar: >= 3x at B=1, 8, 32)")
    return lines


def write_json(path: str, meta: Dict[str, Any], results: List[Result]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"meta": meta, "results": [r.to_json() for r in results]}, f, indent=1)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--device", default="all", choices=("all", "cpu", "cuda"),
                    help="all = cpu, and cuda when present (default)")
    ap.add_argument("--ops", default=",".join(OPS), help=f"comma list of {', '.join(OPS)} "
                    "(or gather, rejection, denoise)")
    ap.add_argument("--quick", action="store_true",
                    help="a subset: verify at G=8, V=49152, B=1,8,32 and one shape per other op")
    ap.add_argument("--B", type=parse_int_list, default=None, help="batch sizes (default 1,8,32)")
    ap.add_argument("--G", type=parse_int_list, default=None, help="draft lengths (default 4,8,16)")
    ap.add_argument("--V", type=parse_int_list, default=None,
                    help="vocabulary sizes (default 32000,49152,151936)")
    ap.add_argument("--dtypes", default=None,
                    help="comma list (float32, bfloat16, float16); default fp32 on cpu, bf16 on cuda")
    ap.add_argument("--denoise-modes", default="random",
                    help="commit modes for denoise_step (random, confidence, left_to_right)")
    ap.add_argument("--temperature", type=float, default=1.0, help="target and draft temperature")
    ap.add_argument("--accept", default="all", choices=("all", "mixed"),
                    help="all: draft == target (every draft accepted); mixed: noisy drafts")
    ap.add_argument("--draft", default="soft", choices=("soft", "point"),
                    help="soft: draft logits given; point: point-mass drafts (no draft logits)")
    ap.add_argument("--compile", default="auto", choices=("auto", "on", "off"),
                    help="time torch.compile of the reference (auto: on unless --quick)")
    ap.add_argument("--compile-ops", default="", help="only these ops for compile (default all)")
    ap.add_argument("--compile-timeout", type=float, default=300.0,
                    help="seconds allowed for one compilation")
    ap.add_argument("--compile-budget", type=float, default=900.0,
                    help="total compile seconds, after which compile is skipped")
    ap.add_argument("--verbose-compile", action="store_true",
                    help="keep torch.compile's warnings (graph breaks, guard errors)")
    ap.add_argument("--flashinfer", default="auto", choices=("auto", "off"))
    ap.add_argument("--flashinfer-timeout", type=float, default=600.0,
                    help="seconds allowed for the import + JIT build of FlashInfer's sampling ops")
    ap.add_argument("--no-ref", action="store_true", help="skip the eager reference")
    ap.add_argument("--ours-reference", action="store_true",
                    help="time the float32 reference as 'ours' (to test this harness)")
    ap.add_argument("--call-timeout", type=float, default=120.0,
                    help="seconds allowed for one warm-up call")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="CPU: seconds of timed calls per measurement (0.3 quick, 1.0 else)")
    ap.add_argument("--min-reps", type=int, default=3)
    ap.add_argument("--max-reps", type=int, default=1000)
    ap.add_argument("--warmup-ms", type=float, default=25.0, help="CUDA warm-up per measurement")
    ap.add_argument("--rep-ms", type=float, default=100.0, help="CUDA timed time per measurement")
    ap.add_argument("--max-sets", type=int, default=8, help="CUDA: most rotated input sets")
    ap.add_argument("--max-set-bytes", type=int, default=4 << 30,
                    help="most bytes of rotated input sets per case")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--json", default=None, help="write all results to this path")
    ap.add_argument("--filters", action="store_true",
                    help="benchmark the sampling controls instead (see above)")
    ap.add_argument("--tree", action="store_true",
                    help="benchmark verify_tree against a plain-torch walk instead (see above)")
    ap.add_argument("--N", default="16,64", help="--tree: comma list of tree nodes per row")
    args = ap.parse_args(argv)

    ops = []
    for o in args.ops.split(","):
        o = ALIASES.get(o.strip(), o.strip())
        if o not in OPS:
            ap.error(f"--ops: unknown op {o!r} (choose from {', '.join(OPS)})")
        ops.append(o)
    args.ops = ops
    args.compile_ops = [ALIASES.get(o.strip(), o.strip()) for o in args.compile_ops.split(",")
                        if o.strip()]
    args.denoise_modes = [m.strip() for m in args.denoise_modes.split(",") if m.strip()]
    args.compile_on = args.compile == "on" or (args.compile == "auto" and not args.quick)
    args.compile_off_reason = "--compile off" if args.compile == "off" else \
        "off under --quick (--compile on)"
    if args.budget_s is None:
        args.budget_s = 0.3 if args.quick else 1.0
    return args


FILTER_SETTINGS = [
    ("top_k=50", dict(top_k=50)),
    ("top_p=0.9", dict(top_p=0.9)),
    ("min_p=0.05", dict(min_p=0.05)),
    ("all three", dict(top_k=50, top_p=0.9, min_p=0.05)),
]


_MODEL_ROWS: Dict[str, Any] = {}


def _model_rows(n: int, start: int = 0) -> Optional[torch.Tensor]:
    """n rows of the default target's logits (float32) at consecutive positions of held-out
    prompts, from row `start` on (cyclically); None when the target cannot be loaded."""
    if "rows" not in _MODEL_ROWS:
        try:
            from specdiff_ext.pretrained import load_pair
            from specdiff_ext.prompts import default_prompts

            tgt = load_pair(with_drafter=False, dtype=torch.float32).target
            rows = []
            with torch.inference_mode():
                for p in default_prompts(16):
                    ids = tgt.chat_prompt(p)[:, -256:]
                    rows.append(tgt.forward(ids).logits[0].float())
            _MODEL_ROWS["rows"] = torch.cat(rows)
        except Exception as e:  # noqa: BLE001
            print(f"# model logits unavailable ({type(e).__name__}: {e})", flush=True)
            _MODEL_ROWS["rows"] = None
    rows = _MODEL_ROWS["rows"]
    if rows is None:
        return None
    return rows[(start + torch.arange(n)) % rows.shape[0]]


def _filter_inputs(B: int, G: int, V: int, kind: str, dtype: torch.dtype, dev: str,
                   settings: Dict[str, Any], gen: torch.Generator) -> Dict[str, Any]:
    from specdiff_ext import ops

    tl = torch.randn(B, G + 1, V, generator=gen) * 2.0
    if kind == "model":
        start = int(torch.randint(0, 1 << 20, (1,), generator=gen))
        tl = _model_rows(B * (G + 1), start).reshape(B, G + 1, -1)
    if kind == "peaked":
        hot = torch.randint(0, V, (B, G + 1, 8), generator=gen)
        tl.scatter_add_(-1, hot, torch.full(hot.shape, 12.0))
    tl = tl.to(dtype)
    masked = ops.filter_logits(tl, **settings) if settings else tl
    x = torch.distributions.Categorical(logits=masked[:, :G].float()).sample()
    return {"tl": tl.to(dev), "x": x.to(dev), "dl": tl[:, :G].contiguous().to(dev),
            "dlf": masked[:, :G].contiguous().to(dev)}


def _median_ms(fns: Dict[str, Callable], sets: List[Dict[str, Any]], dev: str, flush: torch.Tensor,
               args: argparse.Namespace) -> Dict[str, float]:
    """Median ms of each fn over the input sets: interleaved wall clock after a warm-up call on
    the CPU, CUDA events with the L2 flushed on a GPU."""
    if dev == "cpu":
        for f in fns.values():
            f(sets[0])
        t = time_cpu_interleaved(fns, sets, args.budget_s, args.min_reps, args.max_reps)
        return {k: v[0] for k, v in t.items()}
    return {k: time_cuda(f, sets, flush, args.warmup_ms, args.rep_ms, args.min_reps,
                         args.max_reps)[0] for k, f in fns.items()}


def bench_filters(args: argparse.Namespace, devices: List[str]) -> int:
    """verify with the sampling controls against verify at plain temperature (and FlashInfer's
    top-k / top-p sampler on CUDA); prints a markdown table, optionally JSON."""
    from specdiff_ext import ops

    Bs = args.B or (1, 8, 32)
    G = (args.G or (8,))[0]
    V = (args.V or (49152,))[0]
    rows: List[Dict[str, Any]] = []
    print(f"# sampling controls: verify, G = {G}, V = {V}, temperature {args.temperature}; "
          "median ms per call; every draft accepted (all G+1 rows read)", flush=True)
    for d in devices:
        print(f"# {d}: {device_desc(d)}", flush=True)
    print("| device | dtype | logits | B | filters | temperature only ms | with filters ms | "
          "ratio | filter_logits ms |", flush=True)
    print("|---|---|---|---|---|---|---|---|---|", flush=True)
    fi = None
    if "cuda" in devices and args.flashinfer != "off":
        try:
            fi = importlib.import_module("flashinfer.sampling")
        except Exception as e:  # noqa: BLE001
            print(f"# FlashInfer not importable ({type(e).__name__}: {e})", flush=True)
    tau = args.temperature
    for dev in devices:
        dtype = torch.float32 if dev == "cpu" else torch.bfloat16
        if args.dtypes:
            dtype = getattr(torch, args.dtypes.split(",")[0].strip())
        flush = torch.empty(2 * _l2_bytes() if dev == "cuda" else 1, dtype=torch.uint8,
                            device=dev)
        kinds = ["normal", "peaked"]
        if V == 49152 and _model_rows(1) is not None:
            kinds.insert(0, "model")
        for kind in kinds:
            for B in Bs:
                for label, st in FILTER_SETTINGS:
                    gen = torch.Generator().manual_seed(B * 7 + len(label))
                    sets = [_filter_inputs(B, G, V, kind, dtype, dev, st, gen) for _ in range(2)]
                    fns = {
                        "base": lambda i: ops.verify(i["tl"], i["x"], i["dl"], temperature=tau,
                                                      draft_temperature=tau, seed=1, check_values=False),
                        "filt": lambda i, st=st: ops.verify(i["tl"], i["x"], i["dlf"], temperature=tau,
                                                            draft_temperature=tau, seed=1, check_values=False, **st),
                        "mask": lambda i, st=st: ops.filter_logits(i["tl"], temperature=tau, **st),
                    }
                    ms = _median_ms(fns, sets, dev, flush, args)
                    acc = float(fns["filt"](sets[0]).num_accepted.float().mean())
                    row = {"device": dev, "dtype": str(dtype).replace("torch.", ""), "logits": kind,
                           "B": B, "G": G, "V": V, "filters": label, "base_ms": ms["base"],
                           "filters_ms": ms["filt"], "ratio": ms["filt"] / ms["base"],
                           "filter_logits_ms": ms["mask"], "mean_accepted_with_filters": acc}
                    if dev == "cuda" and fi is not None and "min_p" not in st:
                        flat = [{"l": i["tl"].reshape(-1, V).float(),
                                 "e": torch.zeros(B * (G + 1), 0, dtype=torch.long, device=dev)}
                                for i in sets]
                        k = st.get("top_k", 0) or V
                        p = st.get("top_p", 1.0)
                        try:
                            row["flashinfer_ms"] = time_cuda(
                                lambda i: fi.top_k_top_p_sampling_from_logits(i["l"] / tau, k, p), flat, flush,
                                args.warmup_ms, args.rep_ms, args.min_reps, args.max_reps)[0]
                            row["ours_sample_ms"] = time_cuda(
                                lambda i: ops.verify(i["l"][:, None], i["e"], temperature=tau,
                                                     seed=1, check_values=False, **st), flat, flush,
                                args.warmup_ms, args.rep_ms, args.min_reps, args.max_reps)[0]
                        except Exception as e:  # noqa: BLE001
                            row["flashinfer_error"] = f"{type(e).__name__}: {e}"
                    rows.append(row)
                    line = (f"| {dev} | {row['dtype']} | {kind} | {B} | {label} | {ms['base']:.3f} | "
                            f"{ms['filt']:.3f} | {row['ratio']:.2f} | {ms['mask']:.3f} |")
                    if "flashinfer_ms" in row:
                        line += f" fi {row['flashinfer_ms']:.3f} vs ours {row['ours_sample_ms']:.3f}"
                    print(line, flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"filters": rows, "torch": torch.__version__}, fh, indent=1)
    return 0


def _torch_tree_walk(tl: torch.Tensor, tokens: torch.Tensor, parents: torch.Tensor, tau: float,
                     gen: Optional[torch.Generator]) -> torch.Tensor:
    """The plain-torch baseline of verify_tree: softmax of every node row, then the walk."""
    B, N, _ = tl.shape
    probs = torch.softmax(tl.float() / tau, dim=-1) if tau > 0 else None
    am = tl.argmax(dim=-1) if tau == 0 else None
    par, tok = parents.tolist(), tokens.tolist()
    out = torch.full((B, N), -1, dtype=torch.int64)
    for b in range(B):
        node = 0
        for d in range(N):
            x = int(am[b, node]) if am is not None else int(torch.multinomial(probs[b, node], 1, generator=gen))
            out[b, d] = x
            nxt = next((j for j in range(node + 1, N) if par[b][j] == node and tok[b][j] == x), -1)
            if nxt < 0:
                break
            node = nxt
    return out


def _tree_inputs(B: int, N: int, V: int, dtype: torch.dtype, dev: str, gen: torch.Generator) -> Dict[str, Any]:
    tl = torch.randn(B, N, V, generator=gen) * 2.0
    am = tl.argmax(-1)
    parents = torch.full((B, N), -1, dtype=torch.int64)
    tokens = torch.zeros((B, N), dtype=torch.int64)
    for i in range(1, N):
        q = torch.randint(0, i, (B,), generator=gen)
        parents[:, i] = q
        rnd = torch.randint(0, V, (B,), generator=gen)
        tokens[:, i] = torch.where(torch.rand(B, generator=gen) < 0.6, am.gather(1, q[:, None])[:, 0], rnd)
    # peak each row at its argmax (p ~ 0.9), so that sampled walks go deep too
    tl.scatter_add_(2, am[..., None], torch.full((B, N, 1), 12.0))
    return {"tl": tl.to(dtype).to(dev), "tk": tokens.to(dev), "pa": parents.to(dev)}


def bench_tree(args: argparse.Namespace, devices: List[str]) -> int:
    from specdiff_ext import ops  # noqa: PLC0415

    Bs = args.B or (1, 8, 32)
    Ns = parse_int_list(args.N)
    V = (args.V or (49152,))[0]
    tau = args.temperature
    rows: List[Dict[str, Any]] = []
    print(f"# verify_tree vs a plain-torch walk, V = {V}, temperature {tau}; median ms per call",
          flush=True)
    print("| device | dtype | B | N | ours ms | torch walk ms | x torch | mean accepted |", flush=True)
    print("|---|---|---|---|---|---|---|---|", flush=True)
    for dev in devices:
        dtype = torch.float32 if dev == "cpu" else torch.bfloat16
        if args.dtypes:
            dtype = getattr(torch, args.dtypes.split(",")[0].strip())
        flush = torch.empty(2 * _l2_bytes() if dev == "cuda" else 1, dtype=torch.uint8, device=dev)
        for B in Bs:
            for N in Ns:
                gen = torch.Generator().manual_seed(B * 31 + N)
                sets = [_tree_inputs(B, N, V, dtype, dev, gen) for _ in range(2)]
                wgen = torch.Generator(device=dev).manual_seed(0)
                fns = {
                    "ours": lambda i: ops.verify_tree(i["tl"], i["tk"], i["pa"], temperature=tau,
                                                      seed=1, check_values=False),
                    "torch": lambda i: _torch_tree_walk(i["tl"], i["tk"], i["pa"], tau, wgen),
                }
                ms = _median_ms(fns, sets, dev, flush, args)
                acc = float(fns["ours"](sets[0]).num_accepted.float().mean())
                row = {"device": dev, "dtype": str(dtype).replace("torch.", ""), "B": B, "N": N,
                       "V": V, "temperature": tau, "ours_ms": ms["ours"], "torch_walk_ms": ms["torch"],
                       "speedup": ms["torch"] / ms["ours"], "mean_accepted": acc}
                rows.append(row)
                print(f"| {dev} | {row['dtype']} | {B} | {N} | {ms['ours']:.3f} | {ms['torch']:.3f} | "
                      f"{row['speedup']:.1f} | {acc:.2f} |", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"verify_tree": rows, "torch": torch.__version__}, fh, indent=1)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    have_cuda = torch.cuda.is_available()
    if args.device == "cuda" and not have_cuda:
        print("# --device cuda: no CUDA device; nothing to do", flush=True)
        return 1
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    if not have_cuda:
        devices = [d for d in devices if d != "cuda"]
    if args.filters:
        return bench_filters(args, devices)
    if args.tree:
        return bench_tree(args, devices)
    if not args.verbose_compile:  # graph-break warnings and guard errors would swamp the table
        for name in ("torch._dynamo", "torch._inductor", "torch._guards", "torch.fx"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    with contextlib.suppress(AttributeError):  # recompiles per new shape, not eager fallback
        torch._dynamo.config.cache_size_limit = 256
    with contextlib.suppress(AttributeError):
        torch._dynamo.config.recompile_limit = 256
    with contextlib.suppress(AttributeError):
        torch._dynamo.config.accumulated_recompile_limit = 4096

    impls = Impls(args)
    build = None
    if impls.ours is not None:
        with contextlib.suppress(Exception):
            import specdiff_ext  # noqa: PLC0415

            build = specdiff_ext.build_info()
    meta: Dict[str, Any] = {
        "argv": sys.argv[1:], "ours": impls.ours_name, "build_info": build,
        "torch": torch.__version__, "python": platform.python_version(),
        "devices": {d: device_desc(d) for d in devices}, "temperature": args.temperature,
        "accept": args.accept, "draft": args.draft, "compile": args.compile_on,
        "seed": SEED, "logit_std": LOGIT_STD,
    }
    print(f"# specdiff_ext bench_ops: ours = {impls.ours_name}; build {build}", flush=True)
    print(f"# torch {torch.__version__}, python {platform.python_version()}; temperature "
          f"{args.temperature}, accept={args.accept}, draft={args.draft}, compile="
          f"{'on' if args.compile_on else 'off'}", flush=True)
    flush = None
    if "cuda" in devices:
        meta["cuda_copy_gbps"] = copy_bandwidth_cuda()
        l2 = _l2_bytes()
        flush = torch.empty(max(256 << 20, 4 * l2), dtype=torch.int8, device="cuda")
    for d in devices:
        extra = f"; device-to-device copy {meta['cuda_copy_gbps']:.0f} GB/s (read+write)" \
            if d == "cuda" else ""
        print(f"# {d}: {meta['devices'][d]}{extra}", flush=True)
    print("# columns: median ms per call; x ref / x comp / x naive / x fi = baseline ms / ours "
          "ms (>1: ours faster); GB/s = logits bytes ours reads / ours time; acc = mean "
          "accepted drafts (ours)", flush=True)

    cases = build_cases(args, devices)
    results: List[Result] = []
    print(header_line(), flush=True)
    t_start = time.perf_counter()
    for case in cases:
        try:
            r = run_case(case, impls, args, flush)
        except torch.cuda.OutOfMemoryError as e:
            print(f"#   {case}: out of memory ({e})", flush=True)
            torch.cuda.empty_cache()
            continue
        results.append(r)
        print(row_line(r), flush=True)
        if args.json:
            meta["elapsed_s"] = time.perf_counter() - t_start
            write_json(args.json, meta, results)

    # skipped baselines, once per reason
    reasons: Dict[Tuple[str, str], List[str]] = {}
    for r in results:
        for impl, why in r.skipped.items():
            if not why.startswith(("verify only", "CUDA only", "no FlashInfer counterpart",
                                   "failed earlier")):
                ops_seen = reasons.setdefault((impl, why), [])
                if r.op not in ops_seen:
                    ops_seen.append(r.op)
    for (impl, why), ops_seen in reasons.items():
        print(f"# {impl} skipped ({', '.join(ops_seen)}): {why}", flush=True)
    print(f"\n# summary ({len(results)} cases, {time.perf_counter() - t_start:.0f} s)", flush=True)
    for d in devices:
        sel = [r for r in results if r.device == d]
        if not sel:
            continue
        print(f"# {d}: {meta['devices'][d]}; dtypes {', '.join(sorted({r.dtype for r in sel}))}",
              flush=True)
        print(header_line())
        for r in sel:
            print(row_line(r))
    for line in issue_check(results):
        print(line)
    if args.json:
        meta["elapsed_s"] = time.perf_counter() - t_start
        write_json(args.json, meta, results)
        print(f"# wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
