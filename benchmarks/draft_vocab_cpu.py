"""The draft vocabulary's size, set by measurement: for each K, the drafter scores only the K
target tokens most frequent among the training data's generated tokens, and we measure

- coverage: the share of the held-out prompts' target tokens inside the K (from the same runs);
- acceptance as a chain (greedy, ``--tree-budget 0``): accepted drafts per round, first draft
  accepted;
- the tree decoder's time split: drafting seconds / verification seconds, and tokens/s, over
  the same prompts (``--tree-budget``, default 16: a fixed budget, so that the calibration's
  choice on the machine does not change what is timed);
- each with the drafter's float weights and with int8 ones (``--int8 off,on``; CPU only).

The drafter's weights are the same for every K (the embedded default unless --drafter):
restricting the head changes only which tokens it may propose.

    PYTHONPATH=. python benchmarks/draft_vocab_cpu.py --threads 2 \
        --out benchmarks/results/draft_vocab_cpu.json > benchmarks/results/draft_vocab_cpu.md
    PYTHONPATH=. python benchmarks/draft_vocab_cpu.py --threads 2 --sizes 16384 --int8 off,on \
        --dtype float32    # the drafting share with float and int8 drafter weights
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from specdiff_ext.bench.evals import evaluate_acceptance
from specdiff_ext.decoding import SpecDiffDecoder
from specdiff_ext.drafter.dflash import frequent_vocab
from specdiff_ext.drafter.int8 import pack_int8, unpack_int8
from specdiff_ext.pretrained import load_diffusion_drafter, parse_dtype
from specdiff_ext.prompts import heldout_sharegpt_prompts, humaneval_prompts
from specdiff_ext.target import load_target
from specdiff_ext.training.data import generated_token_counts, load_shards
from specdiff_ext.training.dflash import _concat


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", action="append", default=None,
                    help="training data folders the vocabulary is counted on (default: the "
                         "shared greedy set and data/distill_smollm2)")
    ap.add_argument("--drafter", default=None)
    ap.add_argument("--sizes", default="4096,8192,16384,32768,0", help="K list; 0 = full")
    ap.add_argument("--num-prompts", type=int, default=16, help="per set (ShareGPT, HumanEval)")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="bfloat16", help="float32, bfloat16 or auto")
    ap.add_argument("--int8", default="off", help="comma list of off / on: the drafter's weights")
    ap.add_argument("--tree-budget", type=int, default=16)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    folders = a.data or ["/work/shared/data/distill_smollm2_greedy_fp32", "data/distill_smollm2"]
    datas = [load_shards(f, [0.0])[0] for f in folders]
    data = datas[0] if len(datas) == 1 else _concat(datas)
    dtype = parse_dtype(a.dtype)
    tgt = load_target(dtype=dtype)
    drafter = load_diffusion_drafter(tgt, a.drafter)
    V = drafter.config.vocab_size
    counts = generated_token_counts(data, V)
    texts = heldout_sharegpt_prompts(a.num_prompts) + humaneval_prompts(a.num_prompts)
    prompts = [tgt.chat_prompt(p) for p in texts]
    # the held-out tokens the coverage is measured on: the target's own greedy continuations
    ref = SpecDiffDecoder(tgt, drafter, tree_budget=0)
    outs = [ref.generate(p, max_new_tokens=a.max_new_tokens).ids for p in prompts]
    held = torch.bincount(torch.tensor([t for o in outs for t in o]), minlength=V)
    rows = []
    modes = [m.strip() for m in a.int8.split(",")]
    if not set(modes) <= {"on", "off"}:
        ap.error(f"--int8 takes a comma list of on / off, got {a.int8!r}")
    for K, mode in [(int(x), m) for x in a.sizes.split(",") for m in modes]:
        vm = None if K in (0, V) else frequent_vocab(counts, K)
        drafter.set_draft_vocab(vm)
        (pack_int8 if mode == "on" else unpack_int8)(drafter)
        cover = 1.0 if vm is None else float(held[vm].sum()) / float(held.sum())
        chain = evaluate_acceptance(SpecDiffDecoder(tgt, drafter, tree_budget=0), prompts,
                                    a.max_new_tokens)
        tree = evaluate_acceptance(SpecDiffDecoder(tgt, drafter, tree_budget=a.tree_budget),
                                   prompts, a.max_new_tokens)
        row = {"K": K or V, "int8": mode, "coverage": cover,
               "chain_accepted": chain["mean_accepted"],
               "chain_first": chain["first_accept_rate"], "tree_accepted": tree["mean_accepted"],
               "tree_tokens_per_second": tree["tokens_per_second"],
               "tree_draft_seconds": tree["draft_seconds"],
               "tree_verify_seconds": tree["verify_seconds"],
               "draft_over_verify": tree["draft_seconds"] / tree["verify_seconds"]}
        rows.append(row)
        print(json.dumps(row), flush=True, file=__import__("sys").stderr)
    drafter.set_draft_vocab(None)
    unpack_int8(drafter)
    head = (f"Draft vocabulary sizes: {platform.processor() or platform.machine()}, "
            f"{a.threads} threads, {str(dtype).replace('torch.', '')} target and drafter "
            f"(int8 rows: the drafter's linear weights and head in int8), tree budget "
            f"{a.tree_budget}, {len(prompts)} held-out prompts "
            f"({a.num_prompts} ShareGPT + {a.num_prompts} HumanEval), {a.max_new_tokens} new "
            f"tokens, greedy; the embedded drafter's weights for every K; vocabulary counted on "
            f"{int(counts.sum())} generated training tokens ({', '.join(folders)}).")
    print(head + "\n")
    print("| K | int8 | held-out coverage | chain accepted/round | chain first accepted | tree "
          "accepted/round | tree tokens/s | draft s | verify s | draft / verify |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['K']} | {r['int8']} | {100 * r['coverage']:.1f}% | "
              f"{r['chain_accepted']:.3f} | "
              f"{100 * r['chain_first']:.1f}% | {r['tree_accepted']:.3f} | "
              f"{r['tree_tokens_per_second']:.1f} | {r['tree_draft_seconds']:.2f} | "
              f"{r['tree_verify_seconds']:.2f} | {100 * r['draft_over_verify']:.1f}% |")
    if a.out:
        with open(a.out, "w") as fh:
            json.dump({"rows": rows, "settings": vars(a), "when": time.strftime("%Y-%m-%d")}, fh,
                      indent=2)


if __name__ == "__main__":
    main()
