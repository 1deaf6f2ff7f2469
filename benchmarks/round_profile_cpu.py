#!/usr/bin/env python3
"""Where one-row specdiff rounds' time goes: wall time around the target's forward_tree /
forward (the prompt's prefill), keep_path, ops.verify_tree, and the tree drafter's draft /
accept / start, over N default prompts x 64 tokens, greedy, float32, after one warm-up call.

    PYTHONPATH=. python benchmarks/round_profile_cpu.py [PROMPTS=8] [BUDGET=-1: calibrated]
"""
import sys
import time
from collections import defaultdict

import torch

from specdiff_ext import ops, prompts
from specdiff_ext.decoding import SamplingControls, make_decoder
from specdiff_ext.pretrained import load_pair

torch.set_num_threads(2)
n_prompts = int(sys.argv[1]) if len(sys.argv) > 1 else 8
budget = int(sys.argv[2]) if len(sys.argv) > 2 else -1
pair = load_pair(dtype=torch.float32)
tgt = pair.target
dec = make_decoder("specdiff", tgt, pair.drafter, tree_budget=None if budget < 0 else budget)
acc, cnt = defaultdict(float), defaultdict(int)


def wrap(obj, name, key):
    f = getattr(obj, name)

    def g(*a, **k):
        t = time.perf_counter()
        r = f(*a, **k)
        acc[key] += time.perf_counter() - t
        cnt[key] += 1
        return r
    setattr(obj, name, g)


for n in ("forward_tree", "keep_path", "forward"):
    wrap(type(tgt), n, n)
wrap(ops, "verify_tree", "verify_tree")
drafter, _ = dec._plan(1, SamplingControls.make(None, None, None, None), 0.0)
for n in ("draft", "accept", "start"):
    wrap(type(drafter), n, "drafter." + n)
texts = prompts.default_prompts(n_prompts)
dec.generate(tgt.chat_prompt(texts[0]), 16)
acc.clear()
cnt.clear()
wall = toks = rounds = 0
for t in texts:
    t0 = time.perf_counter()
    r = dec.generate(tgt.chat_prompt(t), 64)
    wall += time.perf_counter() - t0
    toks += len(r.ids)
    rounds += r.stats["rounds"]
print(f"budget {getattr(drafter, 'budget', None)}: {toks} tokens, {rounds} rounds, {wall:.2f} s, "
      f"{toks / wall:.1f} tok/s, {1e3 * wall / rounds:.1f} ms/round")
for k in sorted(acc, key=lambda k: -acc[k]):
    print(f"{k:16s} {acc[k]:7.2f} s {cnt[k]:6d} calls {1e3 * acc[k] / cnt[k]:6.2f} ms/call "
          f"{1e3 * acc[k] / rounds:5.1f} ms/round")
