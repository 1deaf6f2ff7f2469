#!/usr/bin/env python3
"""Should the drafter draft with the target's sampling controls? Both are exact (verification
sees the law each draft was drawn from); this measures which accepts more.

For each setting of top-k / top-p / min-p at temperature 1, the default pair (SmolLM2-135M-
Instruct + the embedded drafter, bfloat16, G = the drafter's trained block minus one) decodes the same held-out prompts
with the same seeds twice: drafts from the drafter's plain tempered law (draft_filters=False)
and from its filtered law (draft_filters=True). Prints mean accepted drafts per round and
tokens/s; writes benchmarks/results/draft_filters_cpu.{md,json}.

    python3 benchmarks/draft_filters_cpu.py [--prompts 16] [--max-new-tokens 64] [--threads 1]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from specdiff_ext.bench.evals import evaluate_acceptance  # noqa: E402
from specdiff_ext.decoding import SpecDiffDecoder  # noqa: E402
from specdiff_ext.pretrained import load_pair  # noqa: E402
from specdiff_ext.prompts import default_prompts  # noqa: E402

SETTINGS = [
    ("top_p=0.9", dict(top_p=0.9)),
    ("top_k=50", dict(top_k=50)),
    ("min_p=0.05", dict(min_p=0.05)),
    ("top_k=50, top_p=0.9, min_p=0.05", dict(top_k=50, top_p=0.9, min_p=0.05)),
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/results/draft_filters_cpu")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    pair = load_pair(dtype=torch.bfloat16)
    tgt = pair.target
    prompts = [tgt.chat_prompt(p) for p in default_prompts(a.prompts)]
    rows = []
    lines = [f"Default pair, bfloat16, CPU ({a.threads} thread), G = {pair.drafter.config.block_size - 1}, temperature 1, "
             f"{a.prompts} held-out prompts, {a.max_new_tokens} new tokens, seeds 0..{a.prompts - 1}\n",
             "| controls | drafts from | accepted/round | first draft accepted | tok/s |",
             "| --- | --- | --- | --- | --- |"]
    for label, ctl in SETTINGS:
        for df in (False, True):
            dec = SpecDiffDecoder(tgt, pair.drafter, draft_filters=df)
            st = evaluate_acceptance(dec, prompts, a.max_new_tokens, temperature=1.0, seed=0,
                                     controls=ctl)
            row = {"controls": label, "draft_filters": df, "mean_accepted": st["mean_accepted"],
                   "first_accept_rate": st["first_accept_rate"],
                   "tokens_per_second": st["tokens_per_second"], "rounds": st["rounds"]}
            rows.append(row)
            lines.append(f"| {label} | {'filtered' if df else 'plain'} law | {st['mean_accepted']:.3f} | "
                         f"{st['first_accept_rate']:.3f} | {st['tokens_per_second']:.1f} |")
            print(lines[-1], flush=True)
    with open(a.out + ".json", "w") as fh:
        json.dump(rows, fh, indent=1)
    with open(a.out + ".md", "w") as fh:
        fh.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
