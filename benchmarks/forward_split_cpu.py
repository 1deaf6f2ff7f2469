"""Where a target tree forward's time goes on a CPU: perf_counter around the packed linears (head
separately) and the attention function, the rest by difference; medians of 12 after 200 cached
tokens, float32, packed linears.

    PYTHONPATH=. python benchmarks/forward_split_cpu.py
"""
import time, torch
from specdiff_ext.target import load_target
from specdiff_ext import cpu_linear, target as tm
torch.set_num_threads(2)
tgt = load_target(dtype=torch.float32)
cpu_linear.pack_model(tgt.model)
acc = {"lin": 0.0, "head": 0.0, "attn": 0.0}
PL = cpu_linear.PackedLinear; of = PL.forward
def f(self, x):
    t = time.perf_counter(); r = of(self, x); d = time.perf_counter() - t
    acc["head" if self.out_features > 10000 else "lin"] += d; return r
PL.forward = f
from transformers import AttentionInterface
oa = tm._gqa_sdpa_attention
def att(*a, **k):
    t = time.perf_counter(); r = oa(*a, **k); acc["attn"] += time.perf_counter() - t; return r
AttentionInterface.register(tm.GQA_SDPA, att)
ids = torch.randint(100, 20000, (1, 600))
cache = tgt.new_cache(); tgt.forward(ids[:, :200], cache)
for n in (1, 9, 17):
    par = torch.tensor([[-1] + [max(0, i - 2) if i > 1 else 0 for i in range(1, n)]])
    x = ids[:, 200:200 + n]
    tot = []; parts = []
    for rep in range(12):
        for k in acc: acc[k] = 0.0
        t = time.perf_counter(); tgt.forward_tree(x, par, cache, hidden_layers=[1, 14, 27]); tot.append(time.perf_counter() - t)
        parts.append(dict(acc)); cache.crop(-n)
    i = sorted(range(12), key=lambda j: tot[j])[6]
    p = parts[i]; T = tot[i] * 1e3
    print(n, "total %.1f ms: linears %.1f, head %.1f, attention %.1f, rest %.1f" % (T, p["lin"] * 1e3, p["head"] * 1e3, p["attn"] * 1e3, T - 1e3 * sum(p.values())))
