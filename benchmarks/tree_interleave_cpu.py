#!/usr/bin/env python3
"""Greedy acceptance of draft trees over 16 default prompts x 64 tokens (float32, 2 threads):
a 32-node tree (with what every smaller budget accepts in the same rounds), then budgets 4 and
8 each by its own runs, for each cap on the n-gram branch's length (`TreeDrafting.ngram_len`).
Acceptance only: no timings.

    PYTHONPATH=. python benchmarks/tree_interleave_cpu.py [CAPS=8]   # e.g. 8,4,2,1
"""
import sys

import torch

from specdiff_ext import prompts
from specdiff_ext.decoding import SpecDiffDecoder
from specdiff_ext.pretrained import load_pair

torch.set_num_threads(2)
caps = [int(c) for c in (sys.argv[1] if len(sys.argv) > 1 else "8").split(",")]
pair = load_pair(dtype=torch.float32)
tgt = pair.target
encoded = [tgt.chat_prompt(t) for t in prompts.default_prompts(16)]
for cap in caps:
    for budget in (32, 4, 8):
        d = SpecDiffDecoder(tgt, pair.drafter, tree_budget=budget)
        d.drafter.ngram_len = cap
        acc = rounds = 0
        byb: dict = {}
        for ids in encoded:
            r = d.generate(ids, 64)
            acc += r.stats["accepted"]
            rounds += r.stats["rounds"]
            for b, n in r.stats.get("accepted_by_budget", {}).items():
                byb[b] = byb.get(b, 0) + n
        extra = ""
        if budget == 32:
            extra = f"; by budget in the same rounds { {b: round(n / rounds, 3) for b, n in byb.items()} }"
        print(f"n-gram cap {cap}, budget {budget}: accepted/round {acc / rounds:.3f} "
              f"({rounds} rounds){extra}", flush=True)
