"""Batched decoding (`batching`, `generate_batch` on every decoder): each row exactly as if
decoded alone.

- float32 greedy, prompts of different lengths: every row of ar, specdiff (chain and tree),
  ar-spec and pld equals that prompt decoded alone;
- B = 1, 3, 8 with scripted drafts that force 0 .. G accepted drafts per row and round (each
  row's counts checked round by round);
- NaN written into every stale slot after each round: no effect;
- rows permuted, or a row added: no other row changes (temperature 1, per-row seeds);
- the sampled law of a row decoded among neighbours (temperature 1): Pearson's chi-square of
  its first two tokens over RUNS rows against the exact law; passes when p > ALPHA = 1e-6 (its
  false-alarm rate); its negative control (every row of a batch on one seed, a plausible
  batching bug) is rejected by the same test.
"""

from __future__ import annotations

from typing import Any, List, Optional

import pytest
import torch
from torch import Tensor

from specdiff_ext import batching
from specdiff_ext.decoding import (ARDecoder, ARSpecDecoder, PLDDecoder, SpecDiffDecoder,
                                   SpeculativeDecoder)
from specdiff_ext.drafting import DiffusionDrafting
from specdiff_ext.target import TargetModel
from specdiff_ext.types import Draft

pytest.importorskip("transformers")

from test_decoding import _exact_law, law_world, tiny_drafter, tiny_target  # noqa: E402,F401
from test_dflash import _drafter  # noqa: E402
from test_distribution import chi_square  # noqa: E402

ALPHA = 1e-6
RUNS = 1200


@pytest.fixture(scope="module")
def tiny() -> TargetModel:
    return tiny_target()


def _prompts(lengths, seed: int = 0, V: int = 61) -> List[Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, V, (1, n), generator=g) for n in lengths]


def _decoders(tiny: TargetModel) -> dict:
    d = _drafter(tiny, std=0.5)
    return {"ar": ARDecoder(tiny), "pld": PLDDecoder(tiny, gamma=3),
            "specdiff-chain": SpecDiffDecoder(tiny, d, gamma=4, tree_budget=0),
            "specdiff-tree": SpecDiffDecoder(tiny, d, gamma=4, tree_budget=7),
            "specdiff-steps": SpecDiffDecoder(tiny, tiny_drafter(tiny, init_std=0.5), gamma=3,
                                              steps=2, commit="random", tree_budget=0),
            "ar-spec": ARSpecDecoder(tiny, tiny_target(seed=7), gamma=4)}


def test_every_row_is_its_prompt_decoded_alone(tiny: TargetModel) -> None:
    prompts = _prompts((5, 9, 1, 13))  # B = 4, ragged
    for name, dec in _decoders(tiny).items():
        solo = [dec.generate(p, 20, seed=i) for i, p in enumerate(prompts)]
        batch = dec.generate_batch(prompts, 20, seed=0)  # row i: seed i
        assert [r.ids for r in batch] == [r.ids for r in solo], name
        assert all(r.stats["batch_size"] == 4 and r.stats["new_tokens"] == 20 for r in batch)
        # each row's own rounds and acceptance, as decoded alone (same drafter streams)
        for k in ("rounds", "accepted", "accepted_histogram", "draft_nodes"):
            assert [r.stats.get(k, 0) for r in batch] == [r.stats.get(k, 0) for r in solo], (name, k)
    # a row stops at its own EOS, the others go on
    dec = ARDecoder(tiny)
    solo = [dec.generate(p, 20).ids for p in prompts]
    eos = solo[1][4]
    got = dec.generate_batch(prompts, 20, eos_token_id=eos)
    for s, r in zip(solo, got):
        want = s[: s.index(eos) + 1] if eos in s else s
        assert r.ids == want


class Scripted:
    """Drafts the row's reference continuation for the first a tokens and a wrong token after,
    a = SCHEDULE[(row + round) % len]: the round must accept exactly min(a, g) drafts."""

    feature_layers = None
    max_drafts = None
    SCHEDULE = (0, 3, 1, 4, 2, 0, 4)

    def __init__(self, refs: dict, V: int, log: list) -> None:
        self.refs, self.V, self.log = refs, V, log

    def start(self, prompt: Tensor, seed: int, temperature: float, hidden: Optional[Tensor],
              filters: Optional[dict] = None) -> None:
        self.row, self.ref = self.refs[tuple(prompt[0].tolist())]
        self.n, self.want = 0, None

    def draft(self, gamma: int, rnd: int) -> Draft:
        a = min(self.SCHEDULE[(self.row + rnd) % len(self.SCHEDULE)], gamma)
        ids = self.ref[self.n:self.n + a] + [(t + 1) % self.V
                                             for t in self.ref[self.n + a:self.n + gamma]]
        self.want = min(a, len(ids))
        t = torch.tensor([ids], dtype=torch.int64)
        return Draft(t, None, torch.ones_like(t, dtype=torch.bool))

    def accept(self, emitted: Tensor, n_acc: int, hidden: Optional[Tensor]) -> None:
        self.log.append((self.row, n_acc, self.want))
        self.n += int(emitted.shape[1])


@pytest.mark.parametrize("B", [1, 3, 8])
def test_scripted_acceptance_from_none_to_all(tiny: TargetModel, B: int) -> None:
    prompts = _prompts([3 + 2 * i for i in range(B)], seed=B)
    refs = {tuple(p[0].tolist()): (i, ARDecoder(tiny).generate(p, 40).ids)
            for i, p in enumerate(prompts)}
    log: list = []
    dec = SpeculativeDecoder(tiny, Scripted(refs, tiny.vocab_size, log), gamma=4)
    got = dec.generate_batch(prompts, 30)
    assert [r.ids for r in got] == [refs[tuple(p[0].tolist())][1][:30] for p in prompts]
    assert log and all(n == want for _, n, want in log)
    seen = {n for _, n, _ in log}
    assert {0, 1, 2, 3, 4} <= seen  # 0 .. G accepted, in one batch
    assert {row for row, _, _ in log} == set(range(B))


def test_nan_in_stale_slots_changes_nothing(tiny: TargetModel, monkeypatch) -> None:
    prompts = _prompts((4, 11, 7))
    decs = _decoders(tiny)
    names = ("specdiff-chain", "specdiff-tree", "ar-spec", "pld")
    clean = {n: [r.ids for r in decs[n].generate_batch(prompts, 16, temperature=1.0, seed=3)]
             for n in names}
    real = batching.BatchedTarget.commit
    poisoned = []

    def commit(self, keep):
        real(self, keep)
        for store in (self.cache.keys, self.cache.values):
            for t in store:
                for b, n in enumerate(self.lengths):
                    t[b, :, n:] = float("nan")  # every slot the row has not accepted
        poisoned.append(1)

    monkeypatch.setattr(batching.BatchedTarget, "commit", commit)
    for n in names:
        assert [r.ids for r in decs[n].generate_batch(prompts, 16, temperature=1.0,
                                                      seed=3)] == clean[n], n
    assert poisoned
    greedy = [ARDecoder(tiny).generate(p, 16).ids for p in prompts]
    assert [r.ids for r in decs["specdiff-tree"].generate_batch(prompts, 16)] == greedy


def test_rows_do_not_depend_on_their_neighbours(tiny: TargetModel) -> None:
    p = _prompts((6, 3, 10, 8), seed=9)
    for name, dec in _decoders(tiny).items():
        a = dec.generate_batch(p[:3], 18, temperature=1.0, seed=[10, 11, 12])
        b = dec.generate_batch([p[2], p[0], p[3], p[1]], 18, temperature=1.0,
                               seed=[12, 10, 13, 11])
        assert [a[0].ids, a[1].ids, a[2].ids] == [b[1].ids, b[3].ids, b[0].ids], name
        if name == "ar":  # its solo generate samples from torch's generator: same law only
            continue
        # an int seed is seed + i per row: row i is the solo call with that seed
        c = dec.generate_batch(p[:2], 18, temperature=1.0, seed=20)
        assert [r.ids for r in c] == [dec.generate(x, 18, temperature=1.0, seed=20 + i).ids
                                      for i, x in enumerate(p[:2])], name


def test_bad_batch_input_names_the_argument(tiny: TargetModel) -> None:
    dec = ARDecoder(tiny)
    with pytest.raises(TypeError, match="prompts"):
        dec.generate_batch(torch.zeros(2, 3, dtype=torch.int64), 4)
    with pytest.raises(ValueError, match="seed"):
        dec.generate_batch(_prompts((3, 4)), 4, seed=[1])
    with pytest.raises(ValueError, match="input_ids"):
        dec.generate_batch([torch.zeros(2, 3, dtype=torch.int64)], 4)
    with pytest.raises(ValueError, match="max_new_tokens"):
        dec.generate_batch(_prompts((3,)), -1)
    assert dec.generate_batch([], 4) == []
    assert [r.ids for r in dec.generate_batch(_prompts((3, 5)), 0)] == [[], []]


def _batched_law_counts(target: TargetModel, prompt: Tensor, dec: Any) -> Tensor:
    """First two tokens of RUNS rows holding `prompt`, decoded in batches of 6 such rows and
    2 neighbours of other lengths, at temperature 1 with distinct seeds."""
    V = target.vocab_size
    counts = torch.zeros(V * V, dtype=torch.int64)
    others = _prompts((2, 7), seed=1, V=V)
    for k in range(RUNS // 6):
        rows = [prompt] * 3 + [others[0]] + [prompt] * 3 + [others[1]]
        res = dec.generate_batch(rows, 3, temperature=1.0, seed=8 * k)
        for i in (0, 1, 2, 4, 5, 6):
            ids = res[i].ids
            counts[ids[0] * V + ids[1]] += 1
    return counts


def _law_decoder(target: TargetModel) -> Any:
    # the chain with soft q: the batch's padded draft logits and per-row streams
    return SpeculativeDecoder(target, DiffusionDrafting(tiny_drafter(target, init_std=0.5), 1,
                                                        "left_to_right"), gamma=2)


def test_batched_rows_have_the_target_law(law_world: tuple) -> None:
    target, prompt = law_world
    counts = _batched_law_counts(target, prompt, _law_decoder(target))
    assert chi_square(counts, _exact_law(target, prompt))[2] > ALPHA


def test_batched_law_negative_control_is_rejected(law_world: tuple, monkeypatch) -> None:
    target, prompt = law_world
    # every row of a batch on the first row's seed (an int seed not spread over the rows):
    # the batch's copies of the prompt then repeat one another
    monkeypatch.setattr(batching, "_seeds", lambda seed, B: [seed] * B)
    counts = _batched_law_counts(target, prompt, _law_decoder(target))
    assert chi_square(counts, _exact_law(target, prompt))[2] < ALPHA


def test_batched_block_logits_equal_each_row_alone(tiny: TargetModel) -> None:
    """`DFlashDrafter.batch_block_logits`: rows of different context lengths and block sizes in
    one pass give each row's own `block_logits` (float32)."""
    d = _drafter(tiny, std=0.5)
    g = torch.Generator().manual_seed(2)
    caches, gammas = [], [4, 2, 3]
    for n, last in ((7, 3), (2, 9), (12, 40)):
        feats = torch.randn(1, n, d.config.feature_size, generator=g)
        caches.append(d.new_cache(1).append_context(feats, last=torch.tensor([[last]])))
    with torch.no_grad():
        got = d.batch_block_logits(caches, gammas)
        for c, k, lg in zip(caches, gammas, got):
            want = d.block_logits(c, torch.full((1, k), d.config.mask_id))
            torch.testing.assert_close(lg, want, atol=1e-5, rtol=1e-5)
    # negative control: without the per-row block mask, the shorter blocks' logits change
    with torch.no_grad():
        wide = d.batch_block_logits(caches, [4, 4, 4])
    assert not torch.allclose(wide[1][:, :2], got[1], atol=1e-4)
    with pytest.raises(ValueError, match="same length"):
        d.batch_block_logits(caches, [1])


def test_default_tree_budget_shrinks_with_the_batch(tiny: TargetModel) -> None:
    """A decoder left at the default budget drafts `DEFAULTS.batch_tree_budget(B)` nodes per
    round in a batch of B; an explicit budget is kept at every B."""
    from specdiff_ext.defaults import DEFAULTS

    d = _drafter(tiny, std=0.5)
    prompts = _prompts([4 + i for i in range(10)], seed=11)
    dflt, fixed = SpecDiffDecoder(tiny, d, gamma=4), SpecDiffDecoder(tiny, d, gamma=4,
                                                                      tree_budget=16)
    assert DEFAULTS.batch_tree_budget(1) == DEFAULTS.tree_budget
    assert DEFAULTS.batch_tree_budget(10) < DEFAULTS.tree_budget
    assert dflt.batch_drafter(10).budget == DEFAULTS.batch_tree_budget(10)
    assert dflt.batch_drafter(1) is dflt.drafter and fixed.batch_drafter(10) is fixed.drafter
    small = dflt.generate_batch(prompts, 12)
    assert all(r.stats["draft_nodes"] <= DEFAULTS.batch_tree_budget(10) * r.stats["rounds"]
               for r in small)
    assert [r.ids for r in small] == [ARDecoder(tiny).generate(p, 12).ids for p in prompts]
    assert dflt.drafter.budget == DEFAULTS.tree_budget  # the decoder's own drafter untouched


@pytest.mark.parametrize("mbs", [2, 3])
def test_continuous_batching_rows_equal_each_prompt_alone(tiny: TargetModel, mbs: int) -> None:
    """More prompts than rows: a finished row takes the next waiting prompt, and every prompt
    still decodes as alone (float32 greedy, and temperature 1 on its own seed), stats too."""
    prompts = _prompts((5, 9, 1, 13, 4, 7), seed=5)
    for name, dec in _decoders(tiny).items():
        for tau in ((0.0, 1.0) if name != "ar" else (0.0,)):
            solo = [dec.generate(p, 14, temperature=tau, seed=30 + i)
                    for i, p in enumerate(prompts)]
            got = dec.generate_batch(prompts, 14, temperature=tau, seed=30, max_batch_size=mbs)
            assert [r.ids for r in got] == [r.ids for r in solo], (name, tau)
            assert all(r.stats["batch_size"] == mbs for r in got)
            for k in ("rounds", "accepted", "accepted_histogram", "draft_nodes"):
                assert [r.stats.get(k, 0) for r in got] == [r.stats.get(k, 0) for r in solo], \
                    (name, tau, k)
    # rows that stop at their own EOS free their batch row early for the queue
    dec = ARDecoder(tiny)
    solo = [dec.generate(p, 20).ids for p in prompts]
    eos = solo[1][4]
    got = dec.generate_batch(prompts, 20, eos_token_id=eos, max_batch_size=mbs)
    for s, r in zip(solo, got):
        assert r.ids == (s[: s.index(eos) + 1] if eos in s else s)


def test_continuous_batching_runs_each_prompt_on_its_own_rounds(tiny: TargetModel) -> None:
    """Scripted drafts keyed by each prompt's own round count: with 3 rows for 8 prompts the
    rows refill at different rounds, and every round still accepts exactly what it must."""
    prompts = _prompts([3 + 2 * i for i in range(8)], seed=4)
    refs = {tuple(p[0].tolist()): (i, ARDecoder(tiny).generate(p, 40).ids)
            for i, p in enumerate(prompts)}
    log: list = []
    dec = SpeculativeDecoder(tiny, Scripted(refs, tiny.vocab_size, log), gamma=4)
    got = dec.generate_batch(prompts, 25, max_batch_size=3)
    assert [r.ids for r in got] == [refs[tuple(p[0].tolist())][1][:25] for p in prompts]
    assert log and all(n == want for _, n, want in log)
    assert {row for row, _, _ in log} == set(range(8))
    assert {0, 1, 2, 3, 4} <= {n for _, n, _ in log}


def test_continuous_batching_ignores_the_previous_occupant(tiny: TargetModel,
                                                           monkeypatch) -> None:
    """NaN in every slot a row has not accepted, including what the row's previous prompt left
    behind: the prompts that take over the row decode as before."""
    prompts = _prompts((4, 11, 7, 3, 9))
    decs = _decoders(tiny)
    names = ("specdiff-chain", "specdiff-tree", "pld")
    clean = {n: [r.ids for r in decs[n].generate_batch(prompts, 12, temperature=1.0, seed=3)]
             for n in names}
    real = batching.BatchedTarget.commit
    poisoned = []

    def commit(self, keep):
        real(self, keep)
        for store in (self.cache.keys, self.cache.values):
            for t in store:
                for b, n in enumerate(self.lengths):
                    t[b, :, n:] = float("nan")
        poisoned.append(1)

    monkeypatch.setattr(batching.BatchedTarget, "commit", commit)
    for n in names:
        assert [r.ids for r in decs[n].generate_batch(prompts, 12, temperature=1.0, seed=3,
                                                      max_batch_size=2)] == clean[n], n
    assert poisoned


def test_bad_max_batch_size_names_the_argument(tiny: TargetModel) -> None:
    dec = SpecDiffDecoder(tiny, _drafter(tiny, std=0.5), gamma=3)
    p = _prompts((3, 4))
    for bad, err in ((0, ValueError), (-1, ValueError), (True, TypeError), (1.5, TypeError),
                     ("2", TypeError)):
        with pytest.raises(err, match="max_batch_size"):
            dec.generate_batch(p, 4, max_batch_size=bad)
        with pytest.raises(err, match="max_batch_size"):
            ARDecoder(tiny).generate_batch(p, 4, max_batch_size=bad)
    # more rows than prompts: as many rows as prompts
    assert all(r.stats["batch_size"] == 2 for r in dec.generate_batch(p, 4, max_batch_size=9))
    bt = batching.BatchedTarget(tiny, 3, 32)
    for rows in ([0], [1, 0], [0, 0], [2, 3], [-1, 1]):
        with pytest.raises(ValueError, match="rows"):
            bt.prefill(p, rows=rows)
