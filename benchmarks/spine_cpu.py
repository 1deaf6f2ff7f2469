#!/usr/bin/env python3
"""Draft trees with and without the soft spine at a temperature, against plain decoding and
prompt lookup, one prompt at a time, every decoder interleaved prompt by prompt (the machine's
drift hits all alike). Prints a markdown table; writes nothing.

    PYTHONPATH=. python benchmarks/spine_cpu.py [TEMPERATURE=1.0] [PROMPTS=16]
"""
import sys, time, json, torch
torch.set_num_threads(2)
from specdiff_ext.pretrained import load_pair
from specdiff_ext.decoding import ARDecoder, PLDDecoder, SpecDiffDecoder
from specdiff_ext import prompts as pr
TAU = float(sys.argv[1]) if len(sys.argv) > 1 else 1.0
NP = int(sys.argv[2]) if len(sys.argv) > 2 else 16
pair = load_pair(dtype=torch.float32)
tgt = pair.target
decs = {"ar": ARDecoder(tgt), "pld": PLDDecoder(tgt)}
for b in (2, 4, 8):
    decs[f"spine {b}"] = SpecDiffDecoder(tgt, pair.drafter, tree_budget=b)
for b in (4, 8):
    d = SpecDiffDecoder(tgt, pair.drafter, tree_budget=b); d.drafter.soft_spine = False
    decs[f"point {b}"] = d
texts = pr.default_prompts(NP)
agg = {k: dict(tok=0, sec=0.0, acc=0, rounds=0) for k in decs}
ar0 = decs["ar"].generate(tgt.chat_prompt(texts[0]), 8)  # warm
for i, t in enumerate(texts):
    ids = tgt.chat_prompt(t)
    for k, dec in decs.items():
        t0 = time.perf_counter(); r = dec.generate(ids, 64, temperature=TAU, seed=i); s = time.perf_counter() - t0
        a = agg[k]; a["tok"] += len(r.ids); a["sec"] += s; a["acc"] += r.stats.get("accepted", 0); a["rounds"] += r.stats.get("rounds", 0)
ar = agg["ar"]["tok"] / agg["ar"]["sec"]
print(f"T={TAU}, {NP} prompts x 64 tokens, float32, 2 threads")
print("| decoder | tok/s | x ar | accepted/round |\n| --- | --- | --- | --- |")
for k, a in agg.items():
    tps = a["tok"] / a["sec"]
    print(f"| {k} | {tps:.2f} | {tps/ar:.3f} | {a['acc']/max(a['rounds'],1):.3f} |")

