"""Tree rounds in the decode loop (`drafting.TreeDrafting`, `ops.verify_tree`,
`TargetModel.forward_tree` / `keep_path`): greedy float32 output identical to plain decoding
for every budget, with and without the n-gram branch; full acceptance of an oracle's tree;
the best-first expansion; penalised calls falling back to the chain; and the sampled law.

The law test draws the first two tokens of 1200 generate calls at temperature 1 with a tree
decoder over a tiny V = 4 target and compares them with the exact law by Pearson's
chi-square; it passes when p > ALPHA = 1e-6 (its false-alarm rate). Its negative control (a
plausible loop bug), must be rejected by the same test. The tiny target's law barely depends on
its context, so the control is a stream bug rather than a masking one: every round's walk at
offset 0 (the rounds then reuse one another's draws).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import Tensor

from specdiff_ext import ops
from specdiff_ext.decoding import ARDecoder, SpecDiffDecoder, SpeculativeDecoder
from specdiff_ext.drafting import DiffusionDrafting, PromptLookup, TreeDrafting, best_first_tree
from specdiff_ext.drafting.tree import SOURCE_DRAFTER, SOURCE_NGRAM, _Tree
from specdiff_ext.target import TargetModel

pytest.importorskip("transformers")

from test_decoding import (OracleDrafter, _controlled_counts, _exact_law, law_world,  # noqa: E402,F401
                           tiny_drafter, tiny_target)
from test_dflash import _drafter  # noqa: E402
from test_distribution import chi_square  # noqa: E402

ALPHA = 1e-6
RUNS = 1200


@pytest.fixture(scope="module")
def tiny() -> TargetModel:
    return tiny_target()


@pytest.fixture(scope="module")
def prompt() -> Tensor:
    # a repeated phrase, so that the n-gram branch finds matches
    return torch.tensor([[5, 17, 3, 42, 8, 11, 5, 17, 3]])


def test_best_first_tree_takes_the_most_probable_paths() -> None:
    lp = torch.log(torch.tensor([[0.6, 0.3, 0.1], [0.5, 0.4, 0.1], [0.9, 0.05, 0.05]]))
    ids = torch.tensor([[10, 11, 12], [20, 21, 22], [30, 31, 32]])
    tree = _Tree()
    best_first_tree(tree, lp, ids, 4)
    # path scores: 10 (.6), 10-20 (.3), 10-20-30 (.27), 10-21 (.24), 11 (.3) -> the top 4
    assert tree.tokens[1:] == [10, 20, 11, 30] or tree.tokens[1:] == [10, 11, 20, 30]
    assert all(0 <= p < i for i, p in enumerate(tree.parents) if i > 0)
    got = {(tree.parents[i], tree.tokens[i]) for i in range(1, 5)}
    assert got == {(0, 10), (0, 11), (1, 20), (tree.kids[(1, 20)], 30)}
    # an n-gram node already there is reused without spending the budget
    t2 = _Tree()
    t2.child(0, 10, SOURCE_NGRAM)
    best_first_tree(t2, lp, ids, 1)
    assert t2.size() == 2 and t2.source[1] == SOURCE_NGRAM | SOURCE_DRAFTER


@pytest.mark.parametrize("budget", [1, 4, 12])
@pytest.mark.parametrize("ngram", [False, True])
def test_greedy_trees_equal_plain_decoding(tiny: TargetModel, prompt: Tensor, budget: int,
                                           ngram: bool) -> None:
    want = ARDecoder(tiny).generate(prompt, 40).ids
    dflash = _drafter(tiny, bs=5)
    got = SpecDiffDecoder(tiny, dflash, tree_budget=budget, tree_ngram=ngram).generate(prompt, 40)
    assert got.ids == want
    assert got.stats["draft_nodes"] >= got.stats["rounds"] - 1
    other = tiny_drafter(tiny)  # blocks of 8 drafts: the given gamma caps the tree's depth
    got = SpecDiffDecoder(tiny, other, gamma=4, tree_budget=budget, tree_ngram=ngram).generate(prompt, 40)
    assert got.ids == want


def test_an_oracle_tree_is_accepted_whole(tiny: TargetModel, prompt: Tensor) -> None:
    want = ARDecoder(tiny).generate(prompt, 30).ids
    seq = prompt[0].tolist() + want
    res = SpecDiffDecoder(tiny, OracleDrafter(tiny, seq), gamma=4, tree_budget=10,
                          tree_ngram=False).generate(prompt, 30)
    assert res.ids == want
    assert res.stats["mean_accepted"] == 4.0 and res.stats["rounds"] == 6
    assert res.stats["accepted_by_source"]["drafter"] == 24


def test_ngram_branch_is_counted_and_penalties_fall_back_to_the_chain(tiny: TargetModel,
                                                                      prompt: Tensor) -> None:
    dec = SpecDiffDecoder(tiny, _drafter(tiny, bs=5), tree_budget=8, tree_ngram=True)
    assert isinstance(dec.drafter, TreeDrafting)
    res = dec.generate(prompt, 40)
    src = res.stats.get("accepted_by_source", {})
    assert sum(src.values()) == res.stats["accepted"]
    want = ARDecoder(tiny).generate(prompt, 30, repetition_penalty=1.3).ids
    got = dec.generate(prompt, 30, repetition_penalty=1.3)
    assert got.ids == want and "accepted_by_source" not in got.stats


def test_tree_budget_is_checked(tiny: TargetModel) -> None:
    for bad in (-1, 1.5, True, 5000):
        with pytest.raises(ValueError, match="tree_budget"):
            SpecDiffDecoder(tiny, _drafter(tiny), tree_budget=bad)
    assert SpecDiffDecoder(tiny, _drafter(tiny), tree_budget=0).drafter.__class__ is DiffusionDrafting
    with pytest.raises(ValueError, match="budget"):
        TreeDrafting(None, 0, PromptLookup())
    with pytest.raises(ValueError, match="block drafter"):
        TreeDrafting(None, 4, None)


def _tree_law_p(target: TargetModel, prompt: Tensor, soft_spine: bool) -> float:
    block = DiffusionDrafting(tiny_drafter(target, init_std=0.5), 1, "left_to_right")
    block.max_drafts = 2
    tree = TreeDrafting(block, 6, None, topk=3, soft_spine=soft_spine)
    dec = SpeculativeDecoder(target, tree, None)
    counts = _controlled_counts(dec, target, prompt, RUNS, controls={})
    return chi_square(counts, _exact_law(target, prompt))[2]


@pytest.mark.parametrize("soft_spine", [False, True])
def test_sampled_tree_decoding_has_the_target_law(law_world: tuple, soft_spine: bool) -> None:
    target, prompt = law_world
    assert _tree_law_p(target, prompt, soft_spine) > ALPHA


def test_tree_law_negative_control_is_rejected(law_world: tuple, monkeypatch) -> None:
    target, prompt = law_world
    real = ops.verify_tree
    # the walk of every round at offset 0: rounds reuse one another's draws
    monkeypatch.setattr(ops, "verify_tree", lambda *a, **k: real(*a, **{**k, "offset": 0}))
    assert _tree_law_p(target, prompt, False) < ALPHA


def test_soft_spine_negative_control_is_rejected(law_world: tuple, monkeypatch) -> None:
    # a spine of the drafter's top-1 tokens verified as if drawn from q (min(1, p/q) with the
    # residual): not the law
    target, prompt = law_world
    real = DiffusionDrafting.draft

    def top1(self, gamma, rnd):
        d = real(self, gamma, rnd)
        ids = d.logits.argmax(-1)
        if d.vocab_map is not None:
            ids = d.vocab_map[ids]
        return dataclasses.replace(d, ids=ids)

    monkeypatch.setattr(DiffusionDrafting, "draft", top1)
    assert _tree_law_p(target, prompt, True) < ALPHA


def test_soft_spine_trees(tiny: TargetModel, prompt: Tensor) -> None:
    block = DiffusionDrafting(_drafter(tiny, bs=5), 1, "left_to_right")
    tree = TreeDrafting(block, 6, PromptLookup(), topk=3)
    block.start(prompt, 7, 1.0, None)
    tree.start(prompt, 7, 1.0, None)
    d = tree.draft(4, 0)
    # the spine: a chain from the root of the block's 4 sampled tokens, inside the budget
    assert d.spine is not None and d.spine.shape == (1, 4) and d.ids.shape[1] <= 6
    par = [-1] + d.parents[0].tolist()
    sp = [0] + d.spine[0].tolist()
    assert all(par[sp[j + 1]] == sp[j] for j in range(4))
    assert not d.point_mass[0, d.spine[0] - 1].any()
    assert int(d.point_mass.sum()) == d.ids.shape[1] - 4
    # greedy rounds and a tree drafter without the option draw no spine
    block.start(prompt, 7, 0.0, None)
    tree.start(prompt, 7, 0.0, None)
    assert tree.draft(4, 0).spine is None
    off = TreeDrafting(block, 6, None, topk=3, soft_spine=False)
    block.start(prompt, 7, 1.0, None)
    off.start(prompt, 7, 1.0, None)
    assert off.draft(4, 0).spine is None
    # sampled decoding with spines runs and reports no budget prefixes
    dec = SpecDiffDecoder(tiny, _drafter(tiny, bs=5), tree_budget=8)
    res = dec.generate(prompt, 30, temperature=1.0, seed=3)
    assert len(res.ids) == 30 and "accepted_by_budget" not in res.stats
