"""The packed float32 kernel over 24 cold 1536 x 576 layers (weights out of cache, as in a real
forward) at 1-17 rows, 2 threads: us per layer, GB/s of weights, GFLOP/s.

    PYTHONPATH=. python benchmarks/linear_cold_cpu.py
"""
import torch, time, numpy as np
from specdiff_ext import cpu_linear, _C
torch.set_num_threads(2)
L = 24
ws = [cpu_linear.pack_weight(torch.randn(1536, 576)).numpy() for _ in range(L)]
for M in (1, 2, 4, 6, 7, 9, 12, 17):
    x = np.random.randn(M, 576).astype(np.float32); out = np.empty((M, 1536), np.float32)
    for _ in range(2):
        for w in ws: _C._linear_f32_np(x, w, out, 2)
    ts = []
    for _ in range(5):
        t = time.perf_counter()
        for w in ws: _C._linear_f32_np(x, w, out, 2)
        ts.append(time.perf_counter() - t)
    dt = min(ts) / L
    print(M, "%.1f us per layer cold, %.1f GB/s, %.1f GFLOP/s" % (dt * 1e6, 1536 * 576 * 4 / dt / 1e9, 2 * M * 1536 * 576 / dt / 1e9))
