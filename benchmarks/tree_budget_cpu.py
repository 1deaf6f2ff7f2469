#!/usr/bin/env python3
"""Which draft tree budget pays on this machine? Two measurements in one run.

1. The target's forward cost against the tokens in one forward (1 .. 64 after a KV cache of
   256 tokens), relative to one token: what a wider tree costs.
2. The default pair (SmolLM2-135M-Instruct + the embedded DFlash drafter) on held-out prompts
   (the first held-out ShareGPT prompts and HumanEval problems; never trained on): plain
   decoding (`ar`), prompt lookup (`pld`), the chain (`--tree-budget 0`) and trees of several
   budgets with and without the n-gram branch, at temperature 0 and 1, each with tok/s as a
   ratio over `ar` of the same run, accepted drafts per round and which source the accepted
   nodes came from.

Writes benchmarks/results/tree_budget_cpu.{md,json}.

    python3 benchmarks/tree_budget_cpu.py [--prompts 8] [--max-new-tokens 64] [--threads 1]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from specdiff_ext.bench.stats import pool_stats  # noqa: E402
from specdiff_ext.decoding import ARDecoder, PLDDecoder, SpecDiffDecoder  # noqa: E402
from specdiff_ext.pretrained import load_pair  # noqa: E402
from specdiff_ext.prompts import heldout_sharegpt_prompts, humaneval_prompts  # noqa: E402

CONFIGS = [("chain", 0, False), ("tree 8", 8, False), ("tree 16", 16, False),
           ("tree 32", 32, False), ("tree 8 + n-gram", 8, True), ("tree 16 + n-gram", 16, True),
           ("tree 32 + n-gram", 32, True), ("tree 64 + n-gram", 64, True)]


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def forward_costs(target, ctx: int = 256, sizes=(1, 4, 8, 16, 32, 64), reps: int = 8) -> dict:
    ids = torch.randint(0, target.vocab_size, (1, ctx + max(sizes)))
    cache = target.new_cache()
    target.forward(ids[:, :ctx], cache)
    out = {}
    for n in sizes:
        ts = []
        for _ in range(reps + 2):
            t0 = time.perf_counter()
            target.forward(ids[:, ctx:ctx + n], cache)
            ts.append(time.perf_counter() - t0)
            target.crop(cache, ctx)
        out[n] = sorted(ts[2:])[len(ts[2:]) // 2]
    return {n: out[n] / out[1] for n in sizes} | {"seconds_1": out[1]}


def run(dec, encoded, max_new, tau) -> dict:
    stats = [dec.generate(p, max_new, temperature=tau, seed=i).stats for i, p in enumerate(encoded)]
    out = pool_stats(stats)
    src: dict = {}
    for st in stats:
        for k, v in st.get("accepted_by_source", {}).items():
            src[k] = src.get(k, 0) + v
    out["accepted_by_source"] = src
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=8, help="half ShareGPT, half HumanEval")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--temperatures", default="0,1")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                  "results", "tree_budget_cpu"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    pair = load_pair(dtype=torch.bfloat16)
    tgt, drafter = pair.target, pair.drafter
    costs = forward_costs(tgt)
    print("forward cost vs 1 token:", {k: round(v, 2) for k, v in costs.items()}, flush=True)
    half = a.prompts // 2
    prompts = heldout_sharegpt_prompts(a.prompts - half) + humaneval_prompts(half)
    encoded = [tgt.chat_prompt(p) for p in prompts]
    rows = []
    for tau in [float(t) for t in a.temperatures.split(",")]:
        base = run(ARDecoder(tgt), encoded, a.max_new_tokens, tau)
        rows.append(dict(temperature=tau, decoder="ar", tok_s=base["tokens_per_second"], x_ar=1.0))
        decs = [("pld", PLDDecoder(tgt))] + [
            (name, SpecDiffDecoder(tgt, drafter, tree_budget=b, tree_ngram=ng)) for name, b, ng in CONFIGS]
        for name, dec in decs:
            st = run(dec, encoded, a.max_new_tokens, tau)
            srcs = st["accepted_by_source"]
            row = dict(temperature=tau, decoder="pld" if name == "pld" else f"specdiff {name}",
                       tok_s=st["tokens_per_second"], x_ar=st["tokens_per_second"] / base["tokens_per_second"],
                       accepted_per_round=st.get("mean_accepted"),
                       first_accept=st.get("first_accept_rate"), srcs=srcs)
            rows.append(row)
            print(json.dumps(row), flush=True)
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    meta = dict(cpu=cpu_name(), threads=a.threads, dtype="bfloat16", prompts=a.prompts,
                max_new_tokens=a.max_new_tokens, forward_cost=costs)
    with open(a.out + ".json", "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    with open(a.out + ".md", "w") as f:
        f.write(f"# Draft tree budget on {meta['cpu']} ({a.threads} thread(s)), bfloat16\n\n")
        f.write("`python3 benchmarks/tree_budget_cpu.py "
                f"--prompts {a.prompts} --max-new-tokens {a.max_new_tokens} --threads {a.threads}`\n\n")
        f.write("Target forward cost against tokens in one forward (KV cache of 256), relative to one token:\n\n")
        ks = [k for k in costs if k != "seconds_1"]
        f.write("| tokens | " + " | ".join(str(k) for k in ks) + " |\n|" + " --- |" * (len(ks) + 1) + "\n")
        f.write("| time vs 1 | " + " | ".join(f"{costs[k]:.2f}" for k in ks) + " |\n\n")
        f.write(f"Decoding {a.prompts} held-out prompts (half ShareGPT, half HumanEval), "
                f"{a.max_new_tokens} new tokens, batch 1:\n\n")
        f.write("| T | decoder | tok/s | x ar | accepted/round | first accepted | accepted nodes by source |\n"
                "| --- | --- | --- | --- | --- | --- | --- |\n")
        for r in rows:
            acc = r.get("accepted_per_round")
            fa = r.get("first_accept")
            f.write(f"| {r['temperature']:g} | {r['decoder']} | {r['tok_s']:.1f} | {r['x_ar']:.2f} | "
                    f"{'-' if acc is None else f'{acc:.2f}'} | {'-' if fa is None else f'{fa:.2f}'} | "
                    f"{', '.join(f'{k} {v}' for k, v in r.get('srcs', {}).items()) or '-'} |\n")
    print("wrote", a.out + ".md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
