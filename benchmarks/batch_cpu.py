"""Batched decoding's gain against the batch size: tokens/s of `ar` and `specdiff` (tree
budgets: calibrated, 16, 8, 4 and the chain) through `generate_batch` at B = 1, 2, 4, 8, 16, over the same
held-out prompts (half ShareGPT, half HumanEval), greedy, in the machine's default dtype (or
--dtype), in one process; B = 1 is
the prompts one at a time (`generate`). Each (B, decoder) runs every prompt once, in one of
two modes: static (batches of B in prompt order, each batch until its slowest row is done) and
continuous (every prompt in one `generate_batch(..., max_batch_size=B)`: a finished row takes
the next waiting prompt). The speedups are ratios against runs of this same process.

    PYTHONPATH=. python benchmarks/batch_cpu.py --threads 2 \
        --out benchmarks/results/batch_cpu.json > benchmarks/results/batch_cpu.md
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import torch

from specdiff_ext.decoding import ARDecoder, SpecDiffDecoder
from specdiff_ext.pretrained import load_pair, parse_dtype
from specdiff_ext.prompts import default_prompts


def _run(dec, prompts, B: int, max_new: int, mode: str = "static") -> dict:
    t0 = time.perf_counter()
    toks = rounds = acc = 0
    outs = []
    step = len(prompts) if mode == "continuous" else B
    for i in range(0, len(prompts), step):
        chunk = prompts[i:i + step]
        res = ([dec.generate(chunk[0], max_new, seed=i)] if B == 1
               else dec.generate_batch(chunk, max_new, seed=i, max_batch_size=B))
        for r in res:
            toks += r.stats["new_tokens"]
            rounds += r.stats.get("rounds", 0)
            acc += r.stats.get("accepted", 0)
            outs.append(r.ids)
    sec = time.perf_counter() - t0
    return {"tokens": toks, "seconds": sec, "tokens_per_second": toks / sec,
            "accepted_per_round": acc / rounds if rounds else 0.0, "outputs": outs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch-sizes", default="1,2,4,8,16")
    ap.add_argument("--budgets", default="auto,16,8,4,0",
                    help="specdiff tree budgets; 0 = chain; auto = the default decoder (its budget "
                         "calibrated at each B on this machine, specdiff_ext.calibrate)")
    ap.add_argument("--dtype", default="auto",
                    help="float32, bfloat16 or auto (bfloat16 on a CPU with native bf16)")
    ap.add_argument("--num-prompts", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1,
                    help="passes over every cell, interleaved; each cell's median is shown")
    ap.add_argument("--modes", default="static,continuous",
                    help="batching modes at B > 1: static, continuous or both")
    ap.add_argument("--cpu-linear", choices=["auto", "on", "off"], default="auto",
                    help="the target's linear layers through the packed CPU kernel")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    pair = load_pair(dtype=parse_dtype(a.dtype), cpu_linear=a.cpu_linear)
    tgt = pair.target
    prompts = [tgt.chat_prompt(p) for p in default_prompts(a.num_prompts)]
    budgets = [x.strip() if x.strip() == "auto" else int(x) for x in a.budgets.split(",")]
    decs = {"ar": ARDecoder(tgt)}
    for k in budgets:
        decs[f"specdiff-{k}"] = SpecDiffDecoder(tgt, pair.drafter,
                                                tree_budget=None if k == "auto" else k)
    for d in decs.values():  # warm-up
        d.generate(prompts[0][:, :16], 8)
        d.generate_batch([prompts[0][:, :16], prompts[1][:, :12]], 8)
    modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    if not modes or set(modes) - {"static", "continuous"}:
        ap.error(f"--modes: static and/or continuous, got {a.modes!r}")
    cells = [(B, mode) for B in [int(x) for x in a.batch_sizes.split(",")]
             for mode in (["one at a time"] if B == 1 else modes)]
    rows = [{"B": B, "mode": mode} for B, mode in cells]
    ref = None
    # repeats: every (B, mode, decoder) once per pass, passes in turn, so that a drift of the
    # machine's speed hits every cell alike; the table shows each cell's median pass
    for rep in range(a.repeats):
        for row in rows:
            B, mode = row["B"], row["mode"]
            for name, d in decs.items():
                if name == "specdiff-auto":  # calibrate outside the timed run
                    r_budget = d.default_tree_budget(B, 0.0)
                r = _run(d, prompts, B, a.max_new_tokens, mode)
                if name == "specdiff-auto":
                    r["tree_budget"] = r_budget
                if ref is None:
                    ref = r["outputs"] if name == "ar" and B == 1 else [None] * len(prompts)
                r["matches_ar"] = sum(x == y for x, y in zip(r.pop("outputs"), ref))
                row.setdefault("passes", {}).setdefault(name, []).append(r)
                print(f"pass {rep} B={B} {mode} {name}: {r['tokens_per_second']:.1f} tok/s, "
                      f"{r['accepted_per_round']:.2f} acc/round, matches {r['matches_ar']}",
                      file=sys.stderr, flush=True)
    for row in rows:
        for name, runs in row["passes"].items():
            row[name] = sorted(runs, key=lambda r: r["tokens_per_second"])[len(runs) // 2]
    solo = max(rows[0][f"specdiff-{k}"]["tokens_per_second"] for k in budgets) if \
        rows[0]["B"] == 1 else None
    ref_name = "specdiff-auto" if "auto" in budgets else "specdiff-16"
    default = rows[0].get(ref_name, {}).get("tokens_per_second") if rows[0]["B"] == 1 \
        else None
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    print(f"Batched decoding on {cpu}, {a.threads} threads, "
          f"{str(tgt.dtype).replace('torch.', '')} target and drafter, "
          f"{len(prompts)} held-out prompts ({a.num_prompts // 2} ShareGPT + "
          f"{a.num_prompts - a.num_prompts // 2} HumanEval), {a.max_new_tokens} new tokens, "
          f"greedy; B = 1 is generate() one prompt at a time, B > 1 generate_batch (static: "
          f"batches of B; continuous: max_batch_size=B over all prompts). "
          f"tok/s = all new tokens / wall time of all batches"
          + (f"; the median of {a.repeats} interleaved passes" if a.repeats > 1 else "")
          + ".\n")
    def label(k):
        return "chain" if k == 0 else "calibrated" if k == "auto" else f"tree {k}"

    heads = ["B", "mode", "ar tok/s"] + [f"specdiff {label(k)} tok/s" for k in budgets]
    heads += ["best specdiff", "x ar (same B)",
              f"x specdiff one at a time ({label(ref_name.split('-', 1)[1]) if ref_name.endswith('auto') else 'tree 16'}, B = 1)"]
    print("| " + " | ".join(heads) + " |")
    print("|" + "---|" * len(heads))
    for row in rows:
        best = max(budgets, key=lambda k: row[f"specdiff-{k}"]["tokens_per_second"])
        bt = row[f"specdiff-{best}"]["tokens_per_second"]
        cells = [str(row["B"]), row["mode"], f"{row['ar']['tokens_per_second']:.1f}"]
        cells += [f"{row[f'specdiff-{k}']['tokens_per_second']:.1f} "
                  f"({row[f'specdiff-{k}']['accepted_per_round']:.2f}"
                  + (f", tree {row[f'specdiff-{k}']['tree_budget']}" if k == "auto" else "")
                  + ")" for k in budgets]
        cells += [label(best),
                  f"{bt / row['ar']['tokens_per_second']:.2f}",
                  f"{bt / default:.2f}" if default else "-"]
        print("| " + " | ".join(cells) + " |")
    print("\n(in parentheses: drafts accepted per round; greedy outputs equal to ar's "
          "one-at-a-time output, the fewest of any decoder at each B: "
          + ", ".join(f"{min(r[n]['matches_ar'] for n in decs)}" for r in rows)
          + f" of {len(prompts)} prompts, row by row"
          + (": bfloat16 batched matmuls round differently, float32 is identical, "
             "python_tests/test_batching.py)" if tgt.dtype == torch.bfloat16 else ")"))
    if a.out:
        with open(a.out, "w") as fh:
            json.dump({"rows": rows, "settings": vars(a), "solo_best": solo,
                       "when": time.strftime("%Y-%m-%d")}, fh, indent=1)


if __name__ == "__main__":
    main()
