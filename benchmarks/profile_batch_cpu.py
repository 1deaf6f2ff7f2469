"""Where a batched round's time goes: cProfile of `SpecDiffDecoder.generate_batch` (the default
decoder, --dtype) over two batches of 4 default prompts (`prompts.default_prompts(8)`), 64 new
tokens each (`--continuous`: the 8 prompts in one call, at most 4 in flight), after a warm-up; prints tokens/s, the draft / verify split, the rounds of each
batch and the functions by internal time.

    PYTHONPATH=. python benchmarks/profile_batch_cpu.py --threads 2
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch

from specdiff_ext.decoding import SpecDiffDecoder
from specdiff_ext.pretrained import load_pair, parse_dtype
from specdiff_ext.prompts import default_prompts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--dtype", default="auto",
                    help="float32, bfloat16 or auto (bfloat16 on a CPU with native bf16)")
    ap.add_argument("--sort", default="tottime", help="pstats sort key (tottime, cumulative)")
    ap.add_argument("--continuous", action="store_true",
                    help="the 2B prompts in one generate_batch with max_batch_size=B")
    ap.add_argument("--tree-budget", type=int, default=None, help="default: the decoder's")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    pair = load_pair(dtype=parse_dtype(a.dtype))
    tgt, B = pair.target, a.batch_size
    prompts = [tgt.chat_prompt(p) for p in default_prompts(2 * B)]
    dec = SpecDiffDecoder(tgt, pair.drafter, tree_budget=a.tree_budget)
    dec.generate_batch(prompts[:2], 8)  # warm-up
    prof = cProfile.Profile()
    prof.enable()
    t0 = time.perf_counter()
    runs = ([dec.generate_batch(prompts, a.max_new_tokens, max_batch_size=B)] if a.continuous
            else [dec.generate_batch(prompts[:B], a.max_new_tokens),
                  dec.generate_batch(prompts[B:], a.max_new_tokens)])
    wall = time.perf_counter() - t0
    prof.disable()
    toks = sum(len(r.ids) for run in runs for r in run)
    print(f"{toks / wall:.1f} tok/s; draft {sum(run[0].stats['draft_seconds'] for run in runs):.2f}"
          f" s, verify {sum(run[0].stats['verify_seconds'] for run in runs):.2f} s; rounds of "
          f"each batch {[max(r.stats['rounds'] for r in run) for run in runs]}, of each row "
          f"{[r.stats['rounds'] for run in runs for r in run]}")
    pstats.Stats(prof).sort_stats(a.sort).print_stats(a.top)


if __name__ == "__main__":
    main()
