"""The decode loop (docs/design.md section 5): one speculative round loop over the `Drafter`
protocol, plain autoregressive decoding, and the decoders the package ships.

- `SpeculativeDecoder(target, drafter, gamma)`: the round loop. A round asks the drafter for at
  most `gamma` tokens, runs the target once over ``[last token, x_1 .. x_G]`` with its KV cache,
  keeps the accepted prefix plus the correction or bonus token (`ops.verify`), crops the
  target's cache, and tells the drafter what was emitted.
- `Drafter` (``start``, ``draft(g, round) -> Draft``, ``accept``): what the loop asks of a
  drafter. The adapters live with the drafters, in `specdiff_ext.drafting`:
  `DiffusionDrafting` (a block-diffusion drafter, T denoising steps), `ARDrafting` (a small
  causal LM) and `PromptLookup` (n-grams of the text so far).
- `SpecDiffDecoder`, `ARSpecDecoder`, `PLDDecoder`: the loop over each of them;
  `ARDecoder`: plain autoregressive decoding of the target (the baseline); `make_decoder`: a
  decoder by kind, with `DEFAULTS` (`specdiff_ext.defaults`).
- What a run measured (`GenerateResult.stats`) is timed and pooled by `specdiff_ext.bench.stats`.

All take a prompt of shape (1, T) and return a `GenerateResult`. Temperature 0 is greedy
decoding, and the speculative decoders then emit exactly the target's greedy output; at
temperature > 0 they emit exactly the target's sampling law (the order-aware point masses of
docs/design.md section 3 keep this true for every commit mode). A speculative round
synchronises with the host once: the ``.tolist()`` of the verify result, which the loop needs to
know how many tokens it got.

Randomness: ``seed`` fixes a base seed (None draws one from the OS); round r draws the drafter's
and the verifier's random numbers at offset r of streams derived from it, so a run is a pure
function of (prompt, seed, settings). The speculative and the plain decoders draw different
random numbers: their samples differ, their laws do not.

Checks: a decoder checks what is its own (the prompt, `max_new_tokens`, `gamma`); sampling
settings are checked by their one owner, `ops.check_sampling` (the bindings' validators).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from enum import Enum
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Protocol, Sequence, Union

import torch
from torch import Tensor

from . import ops
from .bench.stats import PhaseClock, run_stats
from .defaults import DEFAULTS, DecoderDefaults
from .drafter.dflash import DFlashDrafter
from .drafting import ARDrafting, DiffusionDrafting, PromptLookup
from .drafting.tree import TreeDrafting, check_budget, walk_soft_tree
from .types import CommitMode, Draft

__all__ = ["GenerateResult", "SamplingControls", "DecoderKind", "DEFAULTS", "DecoderDefaults",
           "make_decoder", "Draft", "Drafter", "SpeculativeDecoder", "ARDecoder", "ARSpecDecoder",
           "SpecDiffDecoder", "PLDDecoder", "check_gamma", "check_max_new_tokens",
           "MAX_GAMMA", "MAX_NEW_TOKENS"]

Stream = Callable[[List[int]], None]
_SEED_MASK = (1 << 62) - 1
MAX_GAMMA = 256  # drafts per round
MAX_NEW_TOKENS = 1 << 16  # new tokens per generate call


class GenerateResult(NamedTuple):
    """Output of ``generate``.

    Attributes
    ----------
    ids : list of int
        The new tokens (the prompt excluded), ending with EOS if one was emitted.
    stats : dict
        new_tokens, seconds, tokens_per_second, rounds, mean_accepted (draft tokens accepted per
        round, the correction / bonus token excluded), tokens_per_round, draft_seconds,
        verify_seconds, other_seconds, seed, accepted (drafts accepted in all), accepted_histogram
        (entry n: rounds that accepted n drafts).
    """

    ids: List[int]
    stats: dict


# ------------------------------------------------------------------------------ checks


def check_gamma(gamma: Any, name: str = "gamma") -> int:
    """Drafts per round, checked: an int in [1, MAX_GAMMA]."""
    if isinstance(gamma, bool) or not isinstance(gamma, int) or not 1 <= gamma <= MAX_GAMMA:
        raise ValueError(f"{name} must be an int in [1, {MAX_GAMMA}], got {gamma!r}")
    return gamma


def check_max_new_tokens(n: Any) -> int:
    """New tokens per call, checked: an int in [0, MAX_NEW_TOKENS]."""
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= MAX_NEW_TOKENS:
        raise ValueError(f"max_new_tokens must be an int in [0, {MAX_NEW_TOKENS}], got {n!r}")
    return n


def _base_seed(seed: Optional[int]) -> int:
    if seed is None:
        return int.from_bytes(os.urandom(8), "little") & _SEED_MASK
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
    return seed & _SEED_MASK


def _streams(base: int) -> tuple:
    """(verifier seed, drafter seed) of a run with base seed `base`: 2b and 2b + 1."""
    return (2 * base) & _SEED_MASK, (2 * base + 1) & _SEED_MASK


def _check_prompt(input_ids: Tensor, device: torch.device) -> Tensor:
    if not isinstance(input_ids, Tensor):
        raise TypeError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
    if input_ids.dim() != 2 or input_ids.shape[0] != 1 or input_ids.shape[1] < 1:
        raise ValueError(f"input_ids must have shape (1, T) with T >= 1, got {tuple(input_ids.shape)}")
    if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
        raise TypeError(f"input_ids must hold integer ids, got {input_ids.dtype}")
    return input_ids.to(device=device, dtype=torch.int64)


@dataclass(frozen=True)
class SamplingControls:
    """Sampling controls of a generate call, as transformers' ``generate()`` applies them:
    the repetition penalty (over prompt and output), then temperature, top-k, top-p, min-p.
    Defaults are off. Every decoder emits exactly this law (greedy: the argmax of the
    penalised logits)."""

    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0

    @classmethod
    def make(cls, top_k: Optional[int] = None, top_p: Optional[float] = None,
             min_p: Optional[float] = None, repetition_penalty: Optional[float] = None) -> "SamplingControls":
        """Checked controls (by `ops.check_sampling`, their one validator); None means off."""
        v = ops.check_sampling(top_k=top_k, top_p=top_p, min_p=min_p,
                               repetition_penalty=repetition_penalty)
        return cls(v.get("top_k", 0), v.get("top_p", 1.0), v.get("min_p", 0.0),
                   v.get("repetition_penalty", 1.0))

    @property
    def filters(self) -> dict:
        """The top_k / top_p / min_p keyword arguments of the ops that are on."""
        out: dict = {}
        if self.top_k > 0:
            out["top_k"] = self.top_k
        if self.top_p < 1.0:
            out["top_p"] = self.top_p
        if self.min_p > 0.0:
            out["min_p"] = self.min_p
        return out

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1.0

    def penalize(self, logits: Tensor, history: Tensor, drafts: Optional[Tensor] = None) -> Tensor:
        """Logits (1, N, V) of the positions after `history` (1, T) and then each draft."""
        if not self.penalized:
            return logits
        ids = history if drafts is None or drafts.shape[1] == 0 else torch.cat([history, drafts], 1)
        return ops.apply_penalties(logits, ids, history.shape[1],
                                   repetition_penalty=self.repetition_penalty)


def _cat_hidden(out: Any, n: Union[int, List[int], None] = None,
                row: Optional[int] = None) -> Optional[Tensor]:
    """The requested hidden states of a target forward at its first `n` positions (all when
    None; a list: those positions, e.g. a tree's accepted path), concatenated over layers:
    (B, n, H_f) -- or (1, n, H_f) of batch row `row` only -- or None when none were
    requested."""
    hid = getattr(out, "hidden", None)
    if not hid:
        return None
    if row is not None:
        hid = [h[row:row + 1] for h in hid]
    if isinstance(n, list):
        hid = [h[:, n] for h in hid]
    elif n is not None:
        hid = [h[:, :n] for h in hid]
    return hid[0] if len(hid) == 1 else torch.cat(hid, dim=-1)


def _emit(out: List[int], new: Sequence[int], eos: Optional[int], limit: int,
          stream: Optional[Stream]) -> bool:
    """Append `new` to `out`, cut at the first EOS or at `limit` tokens; True when done."""
    new = list(new)[: limit - len(out)]
    done = False
    if eos is not None and eos in new:
        new = new[: new.index(eos) + 1]
        done = True
    out.extend(new)
    if stream is not None and new:
        stream(new)
    return done or len(out) >= limit


# ------------------------------------------------------------------------------ the loop


class Drafter(Protocol):
    """What `SpeculativeDecoder` needs of a drafter.

    ``feature_layers``: target layers whose hidden states `start` and `accept` receive (None:
    none). ``start(prompt, seed, temperature, hidden, filters)`` begins a text (hidden: the
    states at prompt positions 0 .. T-2, concatenated over the layers; filters: the top_k /
    top_p / min_p of the target law, which a drafter may also sample with -- any law is exact
    as long as `Draft.logits` is the one the drafts were drawn from); ``draft(g, round)`` proposes at most
    g tokens after the text so far; ``accept(emitted, n_acc, hidden)`` extends the text by the
    round's emitted tokens (n_acc accepted drafts, then the correction or bonus token; hidden: the
    states at [last, x_1 .. x_{n_acc}]).

    ``max_drafts``: the most drafts one ``draft`` call can return (None: no limit of its own).
    """

    feature_layers: Optional[List[int]]
    max_drafts: Optional[int]

    def start(self, prompt: Tensor, seed: int, temperature: float,
              hidden: Optional[Tensor], filters: Optional[dict] = None) -> None: ...

    def draft(self, gamma: int, rnd: int) -> Draft: ...

    def accept(self, emitted: Tensor, n_acc: int, hidden: Optional[Tensor]) -> None: ...


class BatchDecoding:
    """`generate_batch` for a decoder with a ``target`` and a ``_plan(batch, controls) ->
    (drafter, gamma)``: the round loop of `batching.generate_batch` over that drafter."""

    target: Any

    def _plan(self, batch: int, controls: "SamplingControls", temperature: Any = 0.0) -> tuple:
        raise NotImplementedError

    def generate_batch(self, prompts: Sequence[Tensor], max_new_tokens: int,
                       temperature: float = 0.0, seed: Union[int, Sequence[int], None] = None,
                       eos_token_id: Optional[int] = None, *, top_k: Optional[int] = None,
                       top_p: Optional[float] = None, min_p: Optional[float] = None,
                       repetition_penalty: Optional[float] = None,
                       max_batch_size: Optional[int] = None) -> List[GenerateResult]:
        """`generate` for B prompts at once (`batching.generate_batch`): each row's law is that
        of decoding it alone (float32 greedy: the same tokens), with its own EOS and limit.

        Shape:
            prompts: a list of (1, T_i) tensors. seed: an int (row i: seed + i, the streams of a
            solo call with that seed) or a list of B ints. Returns one GenerateResult per
            prompt, in order.

        max_batch_size: at most this many prompts decode at once (None: all); a finished row's
        batch row goes to the next waiting prompt (continuous batching), the tree budget
        follows the rows in flight.
        """
        from .batching import check_max_batch_size, generate_batch

        ctl = SamplingControls.make(top_k, top_p, min_p, repetition_penalty)
        batch = len(prompts) if isinstance(prompts, (list, tuple)) else 0
        rows = check_max_batch_size(max_batch_size, batch)
        drafter, gamma = self._plan(rows, ctl, temperature)
        return generate_batch(self, drafter, gamma, prompts, max_new_tokens, temperature, seed,
                              eos_token_id, ctl, max_nodes=_max_nodes(drafter, gamma),
                              max_batch_size=max_batch_size)


class SpeculativeDecoder(BatchDecoding):
    """The speculative round loop: draft, one target forward over [last, drafts], `ops.verify`,
    crop the target's cache to what was accepted, tell the drafter.

    Parameters
    ----------
    target : TargetModel
    drafter : Drafter
        `DiffusionDrafting`, `ARDrafting`, `PromptLookup` or any object with that protocol.
    gamma : int, optional
        At most this many drafts per round. None: the drafter's own limit (``max_drafts``, e.g.
        a DFlash drafter's trained block_size - 1); a drafter without one needs it given.
    """

    def __init__(self, target: Any, drafter: Drafter, gamma: Optional[int] = None) -> None:
        limit = getattr(drafter, "max_drafts", None)
        if gamma is None:
            if limit is None:
                raise ValueError(f"gamma is required: {type(drafter).__name__} has no block "
                                 "size of its own (max_drafts)")
            gamma = limit
        check_gamma(gamma)
        if limit is not None and gamma > limit:
            raise ValueError(f"gamma must be <= {limit} for this drafter (its blocks hold at most "
                             f"{limit} drafts: a DFlash drafter trained on blocks of {limit + 1}), "
                             f"got {gamma}")
        self.target, self.drafter, self.gamma = target, drafter, gamma

    @torch.inference_mode()
    def generate(self, input_ids: Tensor, max_new_tokens: int, temperature: float = 0.0,
                 seed: Optional[int] = None, eos_token_id: Optional[int] = None,
                 stream: Optional[Stream] = None, *, top_k: Optional[int] = None,
                 top_p: Optional[float] = None, min_p: Optional[float] = None,
                 repetition_penalty: Optional[float] = None) -> GenerateResult:
        """Generate up to `max_new_tokens` tokens after the prompt (stops after EOS, also
        inside a block), distributed exactly as the target's own decoding at `temperature`.

        Shape:
            input_ids: (1, T). Returns GenerateResult(ids: list of new tokens, stats).
        """
        ctl = SamplingControls.make(top_k, top_p, min_p, repetition_penalty)
        tgt = self.target
        drafter, gamma = self._plan(1, ctl, temperature)
        tau, prompt, base, eos, clock = _setup(tgt, input_ids, max_new_tokens, temperature,
                                               seed, eos_token_id, ctl)
        seen = prompt  # every token so far (the penalties' history)
        vseed, dseed = _streams(base)
        layers = drafter.feature_layers
        out: List[int] = []
        rounds = accepted = nodes = 0
        hist = [0] * (gamma + 1)
        by_source = [0, 0, 0, 0]  # accepted tree nodes by source bits (drafting.tree)
        # what each smaller budget would have accepted in the same rounds (`budget_prefix`)
        budgets = _sub_budgets(getattr(drafter, "budget", 0))
        by_budget = [0] * len(budgets)
        cache, hidden = tgt.new_cache(), None
        if max_new_tokens > 0:
            with clock("verify"):  # the target caches everything but the last token
                if prompt.shape[1] > 1:
                    hidden = _cat_hidden(tgt.forward(prompt[:, :-1], cache, hidden_layers=layers))
            with clock("draft"):
                drafter.start(prompt, dseed, tau, hidden, ctl.filters)
            if getattr(drafter, "draws_spine", False):  # node numbers are no budget prefixes
                budgets, by_budget = [], []
        length, last = prompt.shape[1] - 1, prompt[:, -1:]  # cached positions, (1, 1)
        while len(out) < max_new_tokens:
            g = min(gamma, max_new_tokens - len(out) - 1)  # the last token is free
            with clock("draft"):
                d = drafter.draft(g, rounds) if g > 0 else Draft(last.new_zeros((1, 0)))
            g = d.ids.shape[1]
            tree = d.parents is not None
            with clock("verify"):
                seq = torch.cat([last, d.ids], dim=1)  # (1, g + 1): the root, then the drafts
                if tree:  # one forward over every node, the walk, the accepted path kept
                    parents = torch.cat([d.parents.new_full((1, 1), -1), d.parents], 1)
                    tout = tgt.forward_tree(seq, parents, cache, hidden_layers=layers)
                    if d.spine is not None:  # a soft spine: min(1, p/q) along it
                        tres = walk_soft_tree(tout.logits, seq, parents, d, temperature=tau,
                                              seed=vseed, offset=rounds, filters=ctl.filters)
                    else:
                        tres = ops.verify_tree(tout.logits, seq, parents, temperature=tau,
                                               seed=vseed, offset=rounds, check_values=False,
                                               **ctl.filters)
                    ids_t = tres.ids
                    # the one host sync of the round (a spine walk has synced already)
                    flat = torch.cat([tres.ids[0], tres.num_accepted, tres.valid.long(),
                                      tres.path[0]]).tolist()
                    path = flat[g + 3: g + 3 + flat[g + 1]]
                else:
                    tout = tgt.forward(seq, cache, hidden_layers=layers)
                    res = ops.verify(ctl.penalize(tout.logits, seen, d.ids), d.ids, d.logits,
                                     draft_point_mass=d.point_mass, temperature=tau,
                                     draft_temperature=d.temperature, seed=vseed,
                                     offset=rounds, vocab_map=d.vocab_map, check_values=False,
                                     **ctl.filters)
                    ids_t = res.ids
                    # the one host sync of the round: ids, count and validity together
                    flat = torch.cat([res.ids[0], res.num_accepted, res.valid.long()]).tolist()
                    path = list(range(1, flat[g + 1] + 1))
                n_acc = flat[g + 1]
                if not flat[g + 2]:
                    raise RuntimeError("the target's logits held NaN / inf or no finite value")
                keep = [0] + path  # the root and the accepted nodes stay cached
                if tree:  # moves the path's entries into place, then crops
                    tgt.keep_path(cache, length, keep)
                else:
                    tgt.crop(cache, length + 1 + n_acc)
                length += 1 + n_acc
            rounds, accepted, nodes = rounds + 1, accepted + n_acc, nodes + g
            if n_acc >= len(hist):
                hist += [0] * (n_acc + 1 - len(hist))
            hist[n_acc] += 1
            if d.source is not None and path:
                for s in d.source[0, [i - 1 for i in path]].tolist():
                    by_source[s & 3] += 1
            if tree and path:
                for j, b in enumerate(budgets):
                    by_budget[j] += budget_prefix(path, b)
            if _emit(out, flat[: n_acc + 1], eos, max_new_tokens, stream):
                break
            if ctl.penalized:
                seen = torch.cat([seen, ids_t[:, : n_acc + 1]], 1)
            with clock("draft"):
                drafter.accept(ids_t[:, : n_acc + 1], n_acc,
                               _cat_hidden(tout, keep if tree else n_acc + 1))
            last = ids_t[:, n_acc: n_acc + 1]
        st = run_stats(clock, len(out), rounds, accepted, base, hist)
        st["draft_nodes"] = nodes
        if any(by_source):
            st["accepted_by_source"] = {"drafter": by_source[1], "ngram": by_source[2],
                                        "both": by_source[3]}
        if getattr(drafter, "budget", None) is not None:
            st["tree_budget"] = drafter.budget
        if budgets:
            st["accepted_by_budget"] = dict(zip(budgets, by_budget))
        if getattr(drafter, "speculation", None):
            st["speculation"] = drafter.speculation
        return GenerateResult(out, st)

    def _plan(self, batch: int, controls: "SamplingControls", temperature: Any = 0.0) -> tuple:
        """(drafter, gamma) a call of `batch` rows (`generate`: 1) decodes with: this
        decoder's, or its tree drafter's chain for a penalised call (penalties read each
        position's history: a tree's nodes have different ones)."""
        drafter, gamma = self.drafter, self.gamma
        chain = getattr(drafter, "chain_drafter", None)
        if controls.penalized and chain is not None:
            drafter, gamma = chain, min(gamma, chain.max_drafts or gamma)
        return drafter, gamma


def _sub_budgets(budget: Any) -> List[int]:
    """The budgets whose acceptance a tree round of `budget` nodes also measures: the powers
    of two below it, and itself (none for a chain)."""
    if not isinstance(budget, int) or isinstance(budget, bool) or budget < 1:
        return []
    out, b = [], 1
    while b < budget:
        out.append(b)
        b *= 2
    return out + [budget]


def budget_prefix(path: Sequence[int], budget: int) -> int:
    """Accepted drafts of a tree round had the tree held only its first `budget` nodes.

    `drafting.TreeDrafting` numbers nodes in creation order: the n-gram branch first, then the
    best-first expansion in the order it pops nodes, which is the same whatever the budget, so
    the tree of b nodes is exactly nodes 1 .. b of a larger one (parents first). The walk of
    `ops.verify_tree` draws at each depth from the same counter, so in the smaller tree it
    accepts the accepted path's longest prefix of nodes numbered <= b: one round of the larger
    tree measures every smaller budget exactly (at every temperature), round for round.

    path: the accepted node indices (root = 0 excluded), in walk order.
    """
    n = 0
    for node in path:
        if node > budget:
            break
        n += 1
    return n


def _max_nodes(drafter: Any, gamma: int) -> int:
    """The most nodes (root included) one round of `drafter` sends to the target."""
    budget = getattr(drafter, "budget", None)
    return 1 + (int(budget) if budget is not None else gamma)


def _setup(target: Any, input_ids: Tensor, max_new_tokens: int, temperature: float,
           seed: Optional[int], eos_token_id: Optional[int], controls: SamplingControls) -> tuple:
    """Checked arguments of a generate call: (tau, prompt, base seed, eos id, clock)."""
    check_max_new_tokens(max_new_tokens)
    tau = ops.check_sampling(temperature=temperature)["temperature"]
    if not isinstance(controls, SamplingControls):
        raise TypeError(f"controls must be SamplingControls, got {type(controls).__name__}")
    prompt = _check_prompt(input_ids, target.device)
    limit = getattr(target, "max_positions", None)
    if isinstance(limit, int) and prompt.shape[1] >= limit:
        raise ValueError(f"input_ids holds {prompt.shape[1]} tokens: the target's context is "
                         f"{limit} positions, so no token would be left to generate")
    eos = target.eos_token_id if eos_token_id is None else eos_token_id
    return tau, prompt, _base_seed(seed), eos, PhaseClock(target.device)


class ARDecoder(BatchDecoding):
    """Plain autoregressive decoding of the target with its KV cache (the baseline).

    Parameters
    ----------
    target : TargetModel
    """

    def __init__(self, target: Any) -> None:
        self.target = target

    @torch.inference_mode()
    def generate(self, input_ids: Tensor, max_new_tokens: int, temperature: float = 0.0,
                 seed: Optional[int] = None, eos_token_id: Optional[int] = None,
                 stream: Optional[Stream] = None, *, top_k: Optional[int] = None,
                 top_p: Optional[float] = None, min_p: Optional[float] = None,
                 repetition_penalty: Optional[float] = None) -> GenerateResult:
        """Generate up to `max_new_tokens` tokens after the prompt (stops after EOS).

        Shape:
            input_ids: (1, T). Returns GenerateResult(ids: list of new tokens, stats).
        """
        tgt = self.target
        ctl = SamplingControls.make(top_k, top_p, min_p, repetition_penalty)
        tau, prompt, base, eos, clock = _setup(tgt, input_ids, max_new_tokens, temperature,
                                               seed, eos_token_id, ctl)
        gen = torch.Generator(device=tgt.device).manual_seed(base)
        out: List[int] = []
        cache = tgt.new_cache()
        x, rounds, hist = prompt, 0, prompt
        while len(out) < max_new_tokens:
            with clock("verify"):
                logits = ctl.penalize(tgt.forward(x, cache).logits[:, -1:], hist)  # (1, 1, V)
                if tau == 0.0:
                    nxt = logits[:, -1].argmax(-1, keepdim=True)  # (1, 1)
                else:
                    if ctl.filters:
                        logits = ops.filter_logits(logits, temperature=tau, **ctl.filters)
                    probs = torch.softmax(logits[:, -1].float() / tau, -1)
                    nxt = torch.multinomial(probs, 1, generator=gen)
            rounds += 1
            if _emit(out, [int(nxt.item())], eos, max_new_tokens, stream):
                break
            x = nxt
            if ctl.penalized:
                hist = torch.cat([hist, nxt], 1)
        return GenerateResult(out, run_stats(clock, len(out), rounds, 0, base))

    def _plan(self, batch: int, controls: "SamplingControls", temperature: Any = 0.0) -> tuple:
        """A drafter that never drafts: each round is one plain step of every row (the token
        drawn by `ops.verify`'s bonus draw: the same law as `generate`, other draws)."""
        from .batching import NullDrafting

        return NullDrafting(), 0


# ------------------------------------------------------------------------------ decoders


class SpecDiffDecoder(SpeculativeDecoder):
    """Speculative diffusion decoding: `SpeculativeDecoder` over `DiffusionDrafting`.

    Parameters
    ----------
    target : TargetModel
    drafter : DFlashDrafter
        See `DiffusionDrafting`.
    gamma : int, optional
        Drafts per round; at most the drafter's block_size - 1. None: block_size - 1 (its
        trained block).
    steps, commit, draft_temperature, draft_filters : optional
        See `DiffusionDrafting` (None: `DEFAULTS`).
    tree_budget : int, optional
        Draft tree nodes per round (`drafting.TreeDrafting`: a best-first tree over the
        drafter's block marginals, verified in one target forward by `ops.verify_tree`); 0:
        the plain chain of `gamma` drafts (`ops.verify`, soft q). None: calibrated on this
        machine when the drafter carries a measured acceptance table (its
        ``tree_acceptance``, `calibrate`): at the first call for each batch size, the target's
        forward over each budget's nodes is timed and the budget of most tokens per second at
        the call's temperature is kept (``stats["tree_budget"]`` says which); when plain
        decoding measured faster than every tree, the call decodes plainly (budget 0,
        ``stats["speculation"]``); without a table `DEFAULTS.tree_budget`
        (`DEFAULTS.batch_tree_budget` in batches).
    tree_ngram : bool, optional
        Add prompt lookup's n-gram continuation (up to `DEFAULTS.tree_ngram_len` tokens) to
        each tree as a further branch. None: `DEFAULTS.tree_ngram`.
    """

    def __init__(self, target: Any, drafter: DFlashDrafter,
                 gamma: Optional[int] = None, steps: Optional[int] = None,
                 commit: Union[CommitMode, str, None] = None,
                 draft_temperature: Optional[float] = None,
                 draft_filters: Optional[bool] = None, tree_budget: Optional[int] = None,
                 tree_ngram: Optional[bool] = None) -> None:
        block = DiffusionDrafting(drafter, steps, commit, draft_temperature, draft_filters)
        budget = check_budget(DEFAULTS.tree_budget if tree_budget is None else tree_budget)
        self.tree_budget = budget
        self.default_budget = tree_budget is None  # then calibrated, or `batch_tree_budget`
        # the drafter's measured acceptance per budget (calibrate.read_tree_acceptance)
        self.tree_acceptance = getattr(drafter, "tree_acceptance", None) \
            if self.default_budget else None
        self.calibrated: Dict[tuple, int] = {}  # (batch, temperature row, threads) -> budget
        self.costs: Dict[int, dict] = {}  # batch -> calibrate.measure_costs
        if budget == 0:
            super().__init__(target, block, gamma)
            return
        if gamma is not None:  # the tree's drafter part drafts at most gamma deep
            block.max_drafts = min(check_gamma(gamma), block.max_drafts)
        ngram = DEFAULTS.tree_ngram if tree_ngram is None else bool(tree_ngram)
        tree = TreeDrafting(block, budget, PromptLookup() if ngram else None,
                            ngram_len=DEFAULTS.tree_ngram_len, topk=DEFAULTS.tree_topk)
        super().__init__(target, tree, None)

    def default_tree_budget(self, batch: int = 1, temperature: Any = 0.0) -> int:
        """The budget a call of `batch` rows at `temperature` drafts with when the decoder's
        budget was left at the default: calibrated on this machine when the drafter has a
        measured acceptance table (`calibrate.calibrated_budget`, once per batch size,
        temperature row and thread count; 0: plain decoding measured faster than every tree),
        else `DEFAULTS.batch_tree_budget(batch)`."""
        if self.tree_acceptance is None or not isinstance(self.drafter, TreeDrafting):
            return DEFAULTS.batch_tree_budget(batch)
        from .calibrate import calibrated_budget, nearest_temperature

        tau = float(temperature) if isinstance(temperature, (int, float)) else 1.0
        ops.check_sampling(temperature=tau)  # bad input fails before seconds of timing
        key = (batch, nearest_temperature(self.tree_acceptance, tau), torch.get_num_threads())
        if key not in self.calibrated:
            budget, costs = calibrated_budget(self.target, self.drafter, self.tree_acceptance,
                                              tau, batch)
            self.calibrated[key] = budget
            self.costs[batch] = costs
        return self.calibrated[key]

    def batch_drafter(self, batch: int, temperature: Any = 0.0) -> Any:
        """The drafter a call of `batch` rows drafts with: this decoder's, or, when its tree
        budget was left at the default, the same tree drafter with
        `default_tree_budget(batch, temperature)` nodes (smaller trees at larger batches), or a
        drafter that never drafts where the calibration found plain decoding faster (the call
        then decodes plainly: the same law; ``stats["speculation"]`` says so)."""
        d = self.drafter
        if not (self.default_budget and isinstance(d, TreeDrafting)):
            return d
        budget = self.default_tree_budget(batch, temperature)
        if budget == 0:
            from .batching import NullDrafting

            return NullDrafting(budget=0, speculation="off (calibrated: plain decoding "
                                                      "measured faster)")
        if budget == d.budget:
            return d
        d = d.fork()
        d.budget = budget
        return d

    def _plan(self, batch: int, controls: "SamplingControls", temperature: Any = 0.0) -> tuple:
        drafter, gamma = super()._plan(batch, controls, temperature)
        if drafter is self.drafter:
            drafter = self.batch_drafter(batch, temperature)
            if drafter.max_drafts == 0:  # speculation off: plain decoding
                gamma = 0
        return drafter, gamma


class ARSpecDecoder(SpeculativeDecoder):
    """Speculative decoding with a small autoregressive drafter: `SpeculativeDecoder` over
    `ARDrafting` (see there for `ar_drafter`, `draft_temperature` and `draft_filters`).
    gamma None: `DEFAULTS.ar_gamma`."""

    def __init__(self, target: Any, ar_drafter: Any, gamma: Optional[int] = None,
                 draft_temperature: Optional[float] = None,
                 draft_filters: Optional[bool] = None) -> None:
        super().__init__(target, ARDrafting(ar_drafter, draft_temperature, draft_filters),
                         DEFAULTS.ar_gamma if gamma is None else gamma)


class PLDDecoder(SpeculativeDecoder):
    """Prompt-lookup decoding: `SpeculativeDecoder` over `PromptLookup` (at most `gamma`
    drafts per round copied from the text so far; None: `DEFAULTS.pld_gamma`)."""

    def __init__(self, target: Any, gamma: Optional[int] = None, max_ngram: Optional[int] = None,
                 min_ngram: Optional[int] = None) -> None:
        super().__init__(target, PromptLookup(max_ngram, min_ngram),
                         DEFAULTS.pld_gamma if gamma is None else gamma)


# ----------------------------------------------------------------------------- kinds


class DecoderKind(str, Enum):
    """The decoders of this package, by the names the CLI and `bench` use."""

    AR = "ar"
    SPECDIFF = "specdiff"
    AR_SPEC = "ar-spec"
    PLD = "pld"


def make_decoder(kind: Union[DecoderKind, str], target: Any, drafter: Any = None,
                 ar_drafter: Any = None, *, gamma: Optional[int] = None,
                 steps: Optional[int] = None, commit: Optional[str] = None,
                 draft_filters: Optional[bool] = None, tree_budget: Optional[int] = None,
                 tree_ngram: Optional[bool] = None) -> Any:
    """A decoder by kind; whatever is None takes the decoder's default (`DEFAULTS`, or the
    drafter's own block for specdiff).

    Parameters
    ----------
    kind : DecoderKind or its name
    target : TargetModel
    drafter, ar_drafter : the diffusion drafter (specdiff) and the autoregressive one (ar-spec)
    gamma : drafts per round
    steps, commit : specdiff's denoising steps and commit mode
    draft_filters : draft with the target's top-k / top-p / min-p (specdiff, ar-spec)
    tree_budget, tree_ngram : specdiff's draft tree nodes per round (0: the chain) and its
        n-gram branch
    """
    try:
        k = DecoderKind(kind)
    except ValueError:
        raise ValueError(f"unknown decoder {kind!r}; choose from "
                         f"{', '.join(x.value for x in DecoderKind)}") from None
    if k is DecoderKind.AR:
        return ARDecoder(target)
    if k is DecoderKind.SPECDIFF:
        if drafter is None:
            raise ValueError("the specdiff decoder needs a diffusion drafter")
        return SpecDiffDecoder(target, drafter, gamma=gamma, steps=steps, commit=commit,
                               draft_filters=draft_filters, tree_budget=tree_budget,
                               tree_ngram=tree_ngram)
    if k is DecoderKind.AR_SPEC:
        if ar_drafter is None:
            raise ValueError("the ar-spec decoder needs an autoregressive drafter")
        return ARSpecDecoder(target, ar_drafter, gamma=gamma, draft_filters=draft_filters)
    return PLDDecoder(target, gamma=gamma)
