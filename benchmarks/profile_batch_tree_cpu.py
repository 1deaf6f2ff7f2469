#!/usr/bin/env python3
"""cProfile of one static batch of 4 default prompts x 64 tokens through `generate_batch` with
4-node trees (greedy, float32, 2 threads, packed target linears), after a warm-up; prints
tokens/s, rounds per row, the draft / verify split and the functions by internal time.

    PYTHONPATH=. python benchmarks/profile_batch_tree_cpu.py
"""
import cProfile, pstats, time, torch
torch.set_num_threads(2)
from specdiff_ext.pretrained import load_pair
from specdiff_ext.decoding import SpecDiffDecoder
from specdiff_ext.prompts import default_prompts
pair = load_pair(dtype=torch.float32, cpu_linear="on")
tgt = pair.target
dec = SpecDiffDecoder(tgt, pair.drafter, tree_budget=4)
ps = [tgt.chat_prompt(t) for t in default_prompts(8)]
dec.generate_batch(ps[:4], 8)
pr = cProfile.Profile()
t = time.perf_counter()
pr.enable()
res = dec.generate_batch(ps[:4], 64)
pr.disable()
el = time.perf_counter() - t
print("tok/s", sum(len(r.ids) for r in res) / el, "rounds", [r.stats["rounds"] for r in res], res[0].stats.get("draft_seconds"), res[0].stats.get("verify_seconds"), el)
pstats.Stats(pr).sort_stats("tottime").print_stats(28)
