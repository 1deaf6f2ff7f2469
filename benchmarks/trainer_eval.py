#!/usr/bin/env python3
"""The DFlash trainer's eval (`training.dflash.evaluate_dflash`: greedy, the chain of G = 3, 8
rounds of 16 held-out prompts, the same prompts `specdiff train-dflash --eval-prompts 16`
picks from the ends of the held-out lists) on saved drafter folders, so that checkpoints are
compared on one machine and one target dtype (the eval's figures move with both).

    python benchmarks/trainer_eval.py [--dtype float32] [--threads 1] FOLDER [FOLDER ...]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from specdiff_ext.drafter import load_drafter  # noqa: E402
from specdiff_ext.pretrained import parse_dtype  # noqa: E402
from specdiff_ext.prompts import humaneval_prompts  # noqa: E402
from specdiff_ext.target import load_target  # noqa: E402
from specdiff_ext.training.data import read_heldout  # noqa: E402
from specdiff_ext.training.dflash import evaluate_dflash  # noqa: E402

DATA = ["/work/shared/data/distill_smollm2_greedy_fp32", "data/distill_smollm2"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folders", nargs="+")
    ap.add_argument("--data", action="append", default=None,
                    help=f"dataset folders whose held-out prompts the trainer used (default {DATA})")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--eval-prompts", type=int, default=16)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    tgt = load_target(dtype=parse_dtype(a.dtype))
    heldout: list = []
    for folder in a.data or DATA:
        heldout += [p for p in read_heldout(folder) if p not in heldout]
    ne = a.eval_prompts
    he = humaneval_prompts()
    he = he[len(he) - ne // 2:] if ne // 2 else []
    sg = heldout[len(heldout) - (ne - ne // 2):]
    prompts = [x for i in range(max(len(he), len(sg))) for x in (sg[i:i + 1] + he[i:i + 1])]
    for folder in a.folders:
        d = load_drafter(folder, tgt.input_embeddings.weight, tgt.lm_head_weight,
                         target_name=tgt.name).float()
        r = evaluate_dflash(d, tgt, prompts, 3, 8)
        print(json.dumps({"drafter": folder, "dtype": str(tgt.dtype).replace("torch.", ""),
                          **{k: r[k] for k in ("accepted_per_round", "first_accept_rate",
                                               "rounds", "top1_by_position")}}), flush=True)


if __name__ == "__main__":
    main()
