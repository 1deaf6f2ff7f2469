"""The drafter's hit rates by block position (`bench.evals.position_hit_rates`, the trainer's
eval and ``eval-drafter`` rows): checked against an independent replay of greedy decoding with
a tiny target and DFlash drafter, and their place in the eval-drafter table."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from test_decoding import tiny_target  # noqa: E402
from test_dflash import _drafter  # noqa: E402

from specdiff_ext.bench.evals import eval_drafter, position_hit_rates  # noqa: E402
from specdiff_ext.bench.tables import format_eval_table  # noqa: E402
from specdiff_ext.decoding import ARDecoder, SpecDiffDecoder  # noqa: E402


def _replay(tgt, d, prompt, out, gamma, max_new):
    """Hit counts by position from scratch: greedy rounds (T = 1, left to right) re-run on fresh
    drafter caches built from the target's states of the final text."""
    G = gamma
    cnt, h1, h4 = [0] * G, [0] * G, [0] * G
    full = torch.cat([prompt, torch.tensor([out])], 1)
    hid = torch.cat(tgt.forward(full, hidden_layers=d.config.feature_layers).hidden, -1)
    P, n0 = prompt.shape[1], 0
    while n0 < len(out):
        g = min(G, max_new - n0 - 1)
        if g <= 0:
            break
        t = P - 1 + n0  # the round's last token
        cache = d.new_cache(1).append_context(hid[:, :t], last=full[:, t:t + 1])
        lg = d.block_logits(cache, torch.full((1, g), d.config.mask_token_id))[0]
        top = lg.topk(4, -1).indices
        acc = 0
        while acc < g and n0 + acc < len(out) and int(top[acc, 0]) == out[n0 + acc]:
            acc += 1
        for k in range(min(g, len(out) - n0)):
            cnt[k] += 1
            h1[k] += int(top[k, 0]) == out[n0 + k]
            h4[k] += out[n0 + k] in top[k].tolist()
        n0 += acc + 1
    return cnt, h1, h4


def test_position_hit_rates_match_a_replay() -> None:
    tgt = tiny_target()
    d = _drafter(tgt, std=0.5, bs=5)
    prompts = [torch.tensor([[5, 17, 3, 42, 8, 11]]), torch.tensor([[9, 2, 30, 4]])]
    max_new = 30
    with torch.no_grad():
        r = position_hit_rates(tgt, d, prompts, max_new)
        cnt, h1, h4 = [0] * 4, [0] * 4, [0] * 4
        for p in prompts:
            out = ARDecoder(tgt).generate(p, max_new).ids  # the decoder is exact
            c, a, b = _replay(tgt, d, p, out, 4, max_new)
            cnt, h1, h4 = ([x + y for x, y in zip(u, v)] for u, v in ((cnt, c), (h1, a), (h4, b)))
    assert r["counted_by_position"] == cnt and cnt[0] > cnt[-1] > 0
    assert r["top1_by_position"] == pytest.approx([a / c for a, c in zip(h1, cnt)])
    assert r["top4_by_position"] == pytest.approx([b / c for b, c in zip(h4, cnt)])
    assert sum(h1) > 0 and sum(h4) > sum(h1)
    # position 1's top-1 hits are the rounds that accepted a draft
    assert h1[0] == r["rounds"] - r["accepted_histogram"][0]
    # the same runs as the acceptance eval: the pooled statistics agree with a plain generate
    dec = SpecDiffDecoder(tgt, d, tree_budget=0)  # the hit rates are the chain's
    plain = [dec.generate(p, max_new, seed=i).stats for i, p in enumerate(prompts)]
    assert r["rounds"] == sum(s["rounds"] for s in plain)
    assert r["accepted_histogram"] == [sum(x) for x in zip(*(s["accepted_histogram"]
                                                            for s in plain))]
    # the hook leaves the decoder's drafter in place
    assert type(dec.drafter).__name__ == "DiffusionDrafting"


def test_eval_drafter_rows_and_table_carry_the_rates() -> None:
    tgt = tiny_target()
    d = _drafter(tgt, std=0.5, bs=4)

    class Chat:  # tiny_target has no tokenizer: prompts pass through as their ids
        def __getattr__(self, k):
            return getattr(tgt, k)

        def chat_prompt(self, text):
            return torch.tensor([[int(w) for w in text.split()]])

    rows = eval_drafter(Chat(), d, {"a": ["5 17 3 42", "9 2 30"], "b": ["1 2 3 4 5"]},
                        steps=(1, 2), commits=("left_to_right",), temperatures=(0.0, 1.0),
                        max_new_tokens=12, progress=False)
    assert len(rows) == 2 * 2 * 2
    for r in rows:
        assert len(r["top1_by_position"]) == len(r["top4_by_position"]) == r["gamma"] == 3
        assert all(c > 0 for c in r["counted_by_position"])
        assert all(0 <= a <= b <= 1 for a, b in zip(r["top1_by_position"], r["top4_by_position"]))
    table = format_eval_table(rows)
    assert "top-1 by position" in table and "| all |" in table
    r0 = rows[0]
    assert " / ".join(f"{x:.2f}" for x in r0["top1_by_position"]) in table
    old = [{k: v for k, v in r.items() if "position" not in k} for r in rows]  # older JSON rows
    assert "| - | - |" in format_eval_table(old)
    # a tree budget adds the tree decoder's rows: acceptance, no position rates
    both = eval_drafter(Chat(), d, {"a": ["5 17 3 42 5 17 3"]}, steps=(1,),
                        commits=("left_to_right",), temperatures=(0.0,), max_new_tokens=12,
                        progress=False, tree_budgets=(0, 6))
    chain, tree = both
    assert (chain["tree_budget"], tree["tree_budget"]) == (0, 6)
    assert tree["top1_by_position"] is None and tree["mean_accepted"] >= 0
    assert tree["rounds"] > 0 and sum(tree["accepted_histogram"]) == tree["rounds"]
    assert "| 6 + n-gram |" in format_eval_table(both) and "| chain |" in format_eval_table(both)
