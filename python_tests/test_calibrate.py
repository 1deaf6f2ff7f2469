"""The tree budget chosen on the machine at hand (`specdiff_ext.calibrate`) and the acceptance it
rests on (`decoding.budget_prefix`, ``stats["accepted_by_budget"]``).

- One tree round measures every smaller budget: `ops.verify_tree` over the first b nodes of a
  tree accepts exactly `budget_prefix(path, b)` of the full tree's path, with the same ids, at
  temperature 0 and 1 (deterministic equalities, no false alarms).
- `choose_budget` takes the argmax of tokens per second; the acceptance table reads, writes and
  refuses bad files by name; the decoder's default budget is calibrated per batch size and
  temperature from measured costs, explicit budgets and drafters without a table are left alone.
"""

from __future__ import annotations

import json

import pytest
import torch

from specdiff_ext import calibrate, ops
from specdiff_ext.calibrate import (acceptance_at, choose_budget, measure_costs,
                                    read_tree_acceptance, write_tree_acceptance)
from specdiff_ext.decoding import SpecDiffDecoder, budget_prefix
from specdiff_ext.defaults import DEFAULTS

from test_verify_tree import random_tree

pytest.importorskip("transformers")

from test_decoding import tiny_target  # noqa: E402
from test_dflash import _drafter  # noqa: E402


@pytest.fixture(scope="module")
def tiny():
    return tiny_target()


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_tree_round_measures_every_smaller_budget(temperature: float) -> None:
    g = torch.Generator().manual_seed(5)
    B, N, V = 64, 24, 6
    logits = torch.randn(B, N, V, generator=g) * 2
    tokens, parents = random_tree(B, N, V, logits, g, unused_frac=0.05, match_frac=0.7)
    seeds = torch.randint(0, 2**62, (B,), generator=g)
    full = ops.verify_tree(logits, tokens, parents, temperature=temperature, seed=seeds,
                           offset=3)
    deep = 0
    for b in range(1, N):
        part = ops.verify_tree(logits[:, :b + 1], tokens[:, :b + 1], parents[:, :b + 1],
                               temperature=temperature, seed=seeds, offset=3)
        for r in range(B):
            n_full = int(full.num_accepted[r])
            path = full.path[r, :n_full].tolist()
            n = budget_prefix(path, b)
            assert int(part.num_accepted[r]) == n, (r, b, path)
            # the same accepted tokens, then the same draw at the depth where the walk stops
            assert part.ids[r, :n + 1].tolist() == full.ids[r, :n + 1].tolist()
            deep += n >= 2
    assert deep > 50  # the walks went deep enough for the prefixes to matter


def test_budget_prefix() -> None:
    assert budget_prefix([1, 3, 9, 10], 2) == 1
    assert budget_prefix([1, 3, 9, 10], 9) == 3
    assert budget_prefix([1, 3, 9, 10], 16) == 4
    assert budget_prefix([5], 4) == 0 and budget_prefix([], 4) == 0


def test_decode_stats_carry_the_smaller_budgets(tiny) -> None:
    prompt = torch.tensor([[5, 17, 3, 42, 8, 11, 5, 17, 3]])
    res = SpecDiffDecoder(tiny, _drafter(tiny, bs=5), tree_budget=12).generate(prompt, 40)
    by = res.stats["accepted_by_budget"]
    assert sorted(by) == [1, 2, 4, 8, 12] and res.stats["tree_budget"] == 12
    assert by[12] == res.stats["accepted"]
    assert all(by[a] <= by[b] for a, b in zip(sorted(by), sorted(by)[1:]))
    chain = SpecDiffDecoder(tiny, _drafter(tiny, bs=5), tree_budget=0).generate(prompt, 20)
    assert "accepted_by_budget" not in chain.stats


def test_choose_budget_is_the_argmax_of_tokens_per_second() -> None:
    acc = {1: 0.4, 4: 1.0, 16: 1.6, 32: 1.8}
    flat = {1: 0.10, 4: 0.10, 16: 0.11, 32: 0.115}
    steep = {1: 0.10, 4: 0.13, 16: 0.25, 32: 0.45}
    assert choose_budget(acc, flat) == 32
    assert choose_budget(acc, steep) == 4
    # drafting's fixed cost per row favours more tokens per round
    assert choose_budget({4: 1.0, 16: 1.5}, {4: 0.10, 16: 0.14}) == 4
    assert choose_budget({4: 1.0, 16: 1.5}, {4: 0.10, 16: 0.14}, draft=0.2) == 16
    assert choose_budget({4: 1.0, 8: 1.0}, {4: 0.1, 8: 0.1}) == 4  # ties: the smaller
    with pytest.raises(ValueError, match="no budget is in both"):
        choose_budget({4: 1.0}, {8: 0.1})


def test_table_round_trip_and_bad_files_are_named(tmp_path) -> None:
    assert read_tree_acceptance(tmp_path) is None
    write_tree_acceptance(tmp_path, {0.0: {1: 0.5, 16: 1.7}, 1.0: {1: 0.4, 16: 0.9}},
                          measured_with="test")
    got = read_tree_acceptance(tmp_path)
    assert got == {0.0: {1: 0.5, 16: 1.7}, 1.0: {1: 0.4, 16: 0.9}}
    assert acceptance_at(got, 0.0)[16] == 1.7 and acceptance_at(got, 0.7)[16] == 0.9
    path = tmp_path / calibrate.TREE_ACCEPTANCE_NAME
    for body, match in (("{", "not a readable JSON"), ("[]", "accepted_per_round"),
                        ('{"accepted_per_round": {"x": {"1": 0.5}}}', "temperature 'x'"),
                        ('{"accepted_per_round": {"0": {"0": 0.5}}}', "budget '0'"),
                        ('{"accepted_per_round": {"0": {"4": -1}}}', "finite number >= 0"),
                        ('{"accepted_per_round": {"0": {}}}', "non-empty")):
        path.write_text(body)
        with pytest.raises(ValueError, match=match) as exc:
            read_tree_acceptance(tmp_path)
        assert str(path) in str(exc.value) or "table" in str(exc.value)


def test_a_drafter_folder_carries_its_table(tmp_path) -> None:
    from specdiff_ext.drafter.checkpoint import load_drafter as load_dflash_drafter, save_dflash

    tiny = tiny_target()
    d = _drafter(tiny, bs=5)
    save_dflash(d, tmp_path)
    loaded = load_dflash_drafter(tmp_path, tiny.input_embeddings, tiny.lm_head_weight,
                                 target_name=tiny.name)
    assert loaded.tree_acceptance is None
    write_tree_acceptance(tmp_path, {0.0: {2: 0.7, 8: 1.2}})
    loaded = load_dflash_drafter(tmp_path, tiny.input_embeddings, tiny.lm_head_weight,
                                 target_name=tiny.name)
    assert loaded.tree_acceptance == {0.0: {2: 0.7, 8: 1.2}}
    (tmp_path / calibrate.TREE_ACCEPTANCE_NAME).write_text(json.dumps({"accepted_per_round": 3}))
    with pytest.raises(ValueError, match="tree_acceptance.json"):
        load_dflash_drafter(tmp_path, tiny.input_embeddings, tiny.lm_head_weight,
                            target_name=tiny.name)


def test_default_budget_is_calibrated_per_batch_and_temperature(tiny, monkeypatch) -> None:
    d = _drafter(tiny, bs=5)
    d.tree_acceptance = {0.0: {2: 0.5, 4: 1.0, 8: 1.6, 16: 2.0}, 1.0: {2: 0.4, 4: 0.6, 8: 0.7,
                                                                     16: 0.75}}
    # fake costs: forward over b + 1 nodes at `batch` rows grows with batch * b
    seen = []

    def costs(target, drafter, budgets, batch=1, **kw):
        seen.append(batch)
        return {"forward": {b: 0.1 + 0.004 * batch * b for b in budgets}, "draft": 0.0,
                "plain": 1.0}  # plain decoding slow here: trees always pay

    monkeypatch.setattr(calibrate, "measure_costs", costs)
    dec = SpecDiffDecoder(tiny, d)
    want = {(B, t): choose_budget(d.tree_acceptance[t],
                                  {b: 0.1 + 0.004 * B * b for b in (2, 4, 8, 16)}, plain=1.0)
            for B in (1, 8) for t in (0.0, 1.0)}
    assert all(b > 0 for b in want.values())
    assert len(set(want.values())) > 1  # the fake costs do move the choice
    for (B, t), b in want.items():
        assert dec.default_tree_budget(B, t) == b
    assert seen == [1, 1, 8, 8]  # once per batch size and temperature row, then cached
    prompt = torch.tensor([[5, 17, 3, 42, 8, 11, 5, 17, 3]])
    res = dec.generate(prompt, 12, temperature=1.0, seed=0)
    assert res.stats["tree_budget"] == want[(1, 1.0)]
    assert dec.batch_drafter(8, 0.0).budget == want[(8, 0.0)]
    # an explicit budget, or no table: nothing is measured
    seen.clear()
    assert SpecDiffDecoder(tiny, d, tree_budget=6).generate(prompt, 8).stats["tree_budget"] == 6
    d.tree_acceptance = None
    plain = SpecDiffDecoder(tiny, d)
    assert plain.default_tree_budget(1, 0.0) == DEFAULTS.tree_budget
    assert plain.default_tree_budget(64, 0.0) == DEFAULTS.batch_tree_budget(64)
    assert seen == []


@pytest.mark.parametrize("batch", [1, 3])
def test_measure_costs_times_every_budget(tiny, batch: int) -> None:
    dec = SpecDiffDecoder(tiny, _drafter(tiny, bs=5), tree_budget=4)
    c = measure_costs(tiny, dec.drafter, [1, 4, 8], batch=batch, context=16, reps=1)
    assert sorted(c["forward"]) == [1, 4, 8] and c["batch"] == batch
    assert all(v > 0 for v in c["forward"].values()) and c["draft"] > 0
    assert measure_costs(tiny, dec.drafter, [1, 4, 8], batch=batch, context=16, reps=1) is c


def test_plain_decoding_when_no_tree_pays(tiny, monkeypatch) -> None:
    """Costs under which every tree loses to plain decoding: the default decoder decodes
    plainly (the same greedy tokens, the same law), in generate and in batches; a drafter
    whose trees pay keeps them."""
    from specdiff_ext.decoding import ARDecoder

    d = _drafter(tiny, bs=5)
    d.tree_acceptance = {0.0: {4: 0.5, 8: 0.6}}
    monkeypatch.setattr(calibrate, "measure_costs", lambda t, dr, budgets, batch=1, **kw: {
        "forward": {b: 0.3 for b in budgets}, "draft": 0.05, "plain": 0.1})
    assert choose_budget({4: 0.5, 8: 0.6}, {4: 0.3, 8: 0.3}, 0.05, plain=0.1) == 0
    dec = SpecDiffDecoder(tiny, d)
    prompt = torch.tensor([[5, 17, 3, 42, 8, 11, 5, 17, 3]])
    want = ARDecoder(tiny).generate(prompt, 20)
    got = dec.generate(prompt, 20)
    assert got.ids == want.ids and got.stats["tree_budget"] == 0 and "speculation" in got.stats
    rows = dec.generate_batch([prompt, prompt[:, :5]], 12)
    assert rows[0].ids == want.ids[:12] and rows[0].stats["accepted"] == 0
    # the same drafter with cheap trees drafts them
    monkeypatch.setattr(calibrate, "measure_costs", lambda t, dr, budgets, batch=1, **kw: {
        "forward": {b: 0.1 for b in budgets}, "draft": 0.0, "plain": 0.1})
    res = SpecDiffDecoder(tiny, d).generate(prompt, 20)
    assert res.ids == want.ids and res.stats["tree_budget"] == 8 and "speculation" not in res.stats


def test_tree_acceptance_table_reads_prefixes_greedy_and_direct_runs_with_a_spine() -> None:
    from specdiff_ext.calibrate import tree_acceptance_table

    rows = [  # greedy: one run of the largest budget measures the smaller ones
        {"temperature": 0.0, "tree_budget": 8, "rounds": 10, "mean_accepted": 1.2,
         "accepted_by_budget": {"1": 4, "8": 12}},
        {"temperature": 0.0, "tree_budget": 2, "rounds": 50, "mean_accepted": 9.0,
         "accepted_by_budget": {"1": 1, "2": 2}},
        # temperature 1 with soft spines: no prefixes; each budget's own runs, pooled by rounds
        {"temperature": 1.0, "tree_budget": 8, "rounds": 10, "mean_accepted": 0.8},
        {"temperature": 1.0, "tree_budget": 8, "rounds": 30, "mean_accepted": 0.4},
        {"temperature": 1.0, "tree_budget": 2, "rounds": 20, "mean_accepted": 0.5},
        {"temperature": 1.0, "tree_budget": 0, "rounds": 20, "mean_accepted": 0.3},
    ]
    table, counted = tree_acceptance_table(rows, 8)
    assert table[0.0] == {1: 0.4, 8: 1.2}
    assert table[1.0] == pytest.approx({2: 0.5, 8: 0.5})
    assert counted == {"0.0": 10, "1.0@2": 20, "1.0@8": 40}
