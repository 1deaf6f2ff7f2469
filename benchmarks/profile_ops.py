"""Where the time of a CUDA verify call goes: kernel times (torch.profiler) against the wall
time of the checked Python call (ops.verify) and of the raw custom op (torch.ops.specdiff.verify,
no host checks, no sync).

    python benchmarks/profile_ops.py [--shapes 1x8x49152,32x16x151936] [--dtype bf16]
"""

import argparse
import json
import time

import torch
from torch.profiler import ProfilerActivity, profile

from specdiff_ext import ops


def wall_us(fn, iters=200):
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / iters * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shapes", default="1x8x49152,8x8x49152,32x8x151936,32x16x151936")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    dt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[a.dtype]
    rows = []
    print(f"# {torch.cuda.get_device_name()} {a.dtype}; us per call; kernels: device time summed per call")
    print(f"{'B':>3} {'G':>3} {'V':>7} {'ops.verify':>11} {'raw op':>8} {'kernels':>8} {'GB/s(k)':>8}  per kernel")
    for spec in a.shapes.split(","):
        B, G, V = (int(x) for x in spec.split("x"))
        g = torch.Generator(device="cuda").manual_seed(0)
        tl = torch.randn(B, G + 1, V, device="cuda", generator=g).to(dt)
        dl = tl[:, :G].clone()  # drafts from the target: every draft accepted (most work)
        ids = torch.distributions.Categorical(logits=dl.float()).sample()
        raw_args = (tl, ids, dl, None, None, None, None, 1.0, None, 1.0, None, 0, 0, None, None)
        checked = lambda: ops.verify(tl, ids, dl, seed=1)  # noqa: E731
        raw = lambda: torch.ops.specdiff.verify(*raw_args)  # noqa: E731
        w_checked, w_raw = wall_us(checked), wall_us(raw)
        n = 50
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(n):
                raw()
            torch.cuda.synchronize()
        per = {}
        for ev in prof.key_averages():
            t = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
            if t and ("specdiff" in ev.key or "kernel" in ev.key.lower()):
                name = ev.key.replace("(anonymous namespace)::", "").split("<")[0].split("(")[0]
                short = name.replace("void ", "").split("::")[-1]
                per[short] = per.get(short, 0.0) + t / n
        k_us = sum(per.values())
        gbs = tl.numel() * tl.element_size() * 2 / (k_us * 1e-6) / 1e9 if k_us else 0.0
        detail = ", ".join(f"{k} {v:.1f}" for k, v in sorted(per.items(), key=lambda kv: -kv[1]))
        print(f"{B:>3} {G:>3} {V:>7} {w_checked:>11.1f} {w_raw:>8.1f} {k_us:>8.1f} {gbs:>8.0f}  {detail}")
        rows.append(dict(B=B, G=G, V=V, dtype=a.dtype, ops_verify_us=w_checked, raw_op_us=w_raw,
                         kernels_us=k_us, kernels=per))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
