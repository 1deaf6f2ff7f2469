"""The target's tree forward with transformers' `sdpa` attention against `specdiff_sdpa_gqa`
(`target.use_gqa_attention`: the same attention under a mask without the per-head copies of
the cache), the two interleaved, medians of `--reps`, packed float32 linears as decoding uses
them.

    PYTHONPATH=. python benchmarks/attention_cpu.py --threads 2 --out benchmarks/results/attention_cpu.md
"""

from __future__ import annotations

import argparse
import time

import torch

from specdiff_ext import cpu_linear
from specdiff_ext.bench.runner import _device_name
from specdiff_ext.target import GQA_SDPA, load_target


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--contexts", default="128,400")
    ap.add_argument("--nodes", default="1,9,17,33")
    ap.add_argument("--out", default=None, help="also write the table here (markdown)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    tgt = load_target(dtype=torch.float32)
    if not cpu_linear.pack_model(tgt.model):
        print("(the extension lacks the packed kernel: torch linears)")
    layers = [1, 14, 27]  # the embedded drafter's feature layers, as decoding asks for them
    ctxs = [int(x) for x in a.contexts.split(",")]
    nodes = [int(x) for x in a.nodes.split(",")]
    ids = torch.randint(100, 20000, (1, max(ctxs) + max(nodes)),
                        generator=torch.Generator().manual_seed(0))
    impls = ("sdpa", GQA_SDPA)
    lines = [f"{_device_name(torch.device('cpu'))}, {a.threads} threads, float32, torch "
             f"{torch.__version__}; SmolLM2-135M `forward_tree` (packed linears), medians of "
             f"{a.reps}, the two attentions interleaved", "",
             "| cached tokens | nodes | sdpa ms (x 1 node) | specdiff_sdpa_gqa ms (x 1 node) "
             "| sdpa / gqa |", "| --- | --- | --- | --- | --- |"]
    for P in ctxs:
        cache = tgt.new_cache()
        tgt.forward(ids[:, :P], cache)
        one = {}
        for n in nodes:
            par = torch.tensor([[-1] + [max(0, i - 2) if i > 1 else 0 for i in range(1, n)]])
            x = ids[:, P:P + n]
            times: dict = {k: [] for k in impls}
            for rep in range(a.reps + 1):
                for impl in impls:
                    tgt.model.config._attn_implementation = impl
                    t = time.perf_counter()
                    tgt.forward_tree(x, par, cache, hidden_layers=layers)
                    if rep:  # the first round warms up
                        times[impl].append(time.perf_counter() - t)
                    cache.crop(-n)
            med = {k: sorted(v)[len(v) // 2] * 1e3 for k, v in times.items()}
            if n == nodes[0]:
                one = med
            lines.append(f"| {P} | {n} | {med['sdpa']:.1f} ({med['sdpa'] / one['sdpa']:.2f}) | "
                         f"{med[GQA_SDPA]:.1f} ({med[GQA_SDPA] / one[GQA_SDPA]:.2f}) | "
                         f"{med['sdpa'] / med[GQA_SDPA]:.2f} |")
            print(lines[-1], flush=True)
    tgt.model.config._attn_implementation = GQA_SDPA
    lines += ["", "Command: `PYTHONPATH=. python benchmarks/attention_cpu.py " +
              f"--threads {a.threads} --reps {a.reps} --contexts {a.contexts} --nodes {a.nodes}`"]
    if a.out:
        with open(a.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
