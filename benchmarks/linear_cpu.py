"""The target's linear layers on this CPU: `_C.linear_f32` (packed, `specdiff_ext.cpu_linear`)
against torch's `F.linear`, per layer shape and row count, and the whole target forward over n
tree nodes both ways (what the tree budget and the speedup of speculation follow).

    PYTHONPATH=. python benchmarks/linear_cpu.py --threads 2 [--out benchmarks/results/linear_cpu.md]

Float32. Medians of --reps timed calls after a warm-up; the two paths interleaved call by
call, so that a drift of the machine touches both alike. Layer rows: the weights stay in cache
between calls (a kernel's best case); forward rows: the model's 540 MB of float32 weights
stream from memory, as in decoding.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from specdiff_ext.bench.runner import _device_name
from specdiff_ext.calibrate import _median


def layer_table(threads: int, reps: int, rows) -> list:
    from specdiff_ext import _C
    from specdiff_ext.cpu_linear import pack_weight

    g = torch.Generator().manual_seed(0)
    res = []
    for n, k, what in [(576, 576, "q/o proj"), (1536, 576, "gate/up proj"),
                       (576, 1536, "down proj"), (49152, 576, "head")]:
        w = torch.randn(n, k, generator=g)
        wp = pack_weight(w)
        for m in rows:
            x = torch.randn(m, k, generator=g)
            out = torch.empty(m, n)
            ts = {"torch": [], "packed": []}
            for r in range(reps + 1):
                t0 = time.perf_counter()
                F.linear(x, w)
                t1 = time.perf_counter()
                _C.linear_f32(x, wp, out, threads)
                t2 = time.perf_counter()
                if r:
                    ts["torch"].append(t1 - t0)
                    ts["packed"].append(t2 - t1)
            res.append({"layer": what, "N": n, "K": k, "M": m,
                        "torch_ms": 1e3 * _median(ts["torch"]),
                        "packed_ms": 1e3 * _median(ts["packed"])})
    return res


def forward_table(reps: int, nodes, context: int) -> list:
    from specdiff_ext.calibrate import packed_forward_seconds
    from specdiff_ext.target import load_target

    sec = packed_forward_seconds(load_target(dtype=torch.float32), nodes, context, reps)
    return [{"nodes": n, "torch_ms": 1e3 * sec["plain"][n], "packed_ms": 1e3 * sec["packed"][n]}
            for n in nodes]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--rows", default="1,2,4,8,17,33,64,256")
    ap.add_argument("--nodes", default="1,2,4,8,17,33,65")
    ap.add_argument("--context", type=int, default=256, help="cached tokens before the forward")
    ap.add_argument("--out", default=None, help="write the tables here (.md; .json beside it)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    rows = [int(x) for x in a.rows.split(",")]
    nodes = [int(x) for x in a.nodes.split(",")]
    lay = layer_table(a.threads, a.reps, rows)
    fwd = forward_table(a.reps, nodes, a.context)
    head = (f"{_device_name(torch.device('cpu'))}, float32, torch {torch.__version__}; medians of "
            f"{a.reps}, the two paths interleaved")
    lines = [head, "", "Linear layers (weights cached between calls), ms:", "",
             "| layer | N x K | rows | torch F.linear | linear_f32 | torch / packed |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in lay:
        lines.append(f"| {r['layer']} | {r['N']} x {r['K']} | {r['M']} | {r['torch_ms']:.2f} | "
                     f"{r['packed_ms']:.2f} | {r['torch_ms'] / r['packed_ms']:.2f} |")
    b1 = {k: fwd[0][k] for k in ("torch_ms", "packed_ms")}
    lines += ["", f"SmolLM2-135M forward over n tree nodes after {a.context} cached tokens, ms "
                  f"(and relative to one node of the same path):", "",
              "| nodes | torch | packed | torch / packed |", "| --- | --- | --- | --- |"]
    for r in fwd:
        lines.append(f"| {r['nodes']} | {r['torch_ms']:.1f} ({r['torch_ms'] / b1['torch_ms']:.2f}) "
                     f"| {r['packed_ms']:.1f} ({r['packed_ms'] / b1['packed_ms']:.2f}) | "
                     f"{r['torch_ms'] / r['packed_ms']:.2f} |")
    text = "\n".join(lines)
    print(text)
    if a.out:
        with open(a.out, "w") as fh:
            fh.write(text + "\n")
        with open(a.out.rsplit(".", 1)[0] + ".json", "w") as fh:
            json.dump({"device": _device_name(torch.device("cpu")), "threads": a.threads, "layers": lay,
                       "forward": fwd}, fh, indent=1)


if __name__ == "__main__":
    main()
