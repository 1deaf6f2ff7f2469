"""The generate loops (DESIGN section 5): one speculative round loop over a `Drafter` protocol,
and plain autoregressive decoding.

- `SpeculativeDecoder(target, drafter, gamma)`: the round loop. A round asks the drafter for at
  most `gamma` tokens, runs the target once over ``[last token, x_1 .. x_G]`` with its KV cache,
  keeps the accepted prefix plus the correction or bonus token (`ops.verify`), crops the
  target's cache, and tells the drafter what was emitted.
- Drafters (`Drafter`: ``start``, ``draft(g, round) -> Draft``, ``accept``): `DiffusionDrafting`
  (a block-diffusion drafter, DFlash or tokens-context, T denoising steps), `ARDrafting` (a small
  causal LM) and `PromptLookup` (n-grams of the text so far).
- `SpecDiffDecoder`, `ARSpecDecoder`, `PLDDecoder`: the loop over each of them;
  `ARDecoder`: plain autoregressive decoding of the target (the baseline).

All take a prompt of shape (1, T) and return a `GenerateResult`. Temperature 0 is greedy
decoding, and the speculative decoders then emit exactly the target's greedy output; at
temperature > 0 they emit exactly the target's sampling law (the order-aware point masses of
DESIGN section 3 keep this true for every commit mode). A speculative round synchronises with
the host once: the ``.tolist()`` of the verify result, which the loop needs to know how many
tokens it got.

Randomness: ``seed`` fixes a base seed (None draws one from the OS); round r draws the drafter's
and the verifier's random numbers at offset r of streams derived from it, so a run is a pure
function of (prompt, seed, settings). The speculative and the plain decoders draw different
random numbers: their samples differ, their laws do not.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from enum import Enum
from typing import Any, Callable, Iterator, List, NamedTuple, Optional, Protocol, Sequence, Union

import torch
from torch import Tensor

from . import ops
from .drafter.config import ContextMode
from .drafter.dflash import DFlashDrafter
from .drafter.model import DiffusionDrafter
from .drafter.sampler import sample_block
from .types import CommitMode

__all__ = ["GenerateResult", "SamplingControls", "DecoderKind", "DEFAULTS", "make_decoder", "Draft", "Drafter", "ARDrafter", "SpeculativeDecoder",
           "DiffusionDrafting", "ARDrafting", "PromptLookup", "ARDecoder", "ARSpecDecoder",
           "SpecDiffDecoder", "PLDDecoder", "pool_stats", "evaluate_acceptance", "lookup_ngram"]

Stream = Callable[[List[int]], None]
_SEED_MASK = (1 << 62) - 1


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


class ARDrafter(Protocol):
    """What `ARSpecDecoder` needs of an autoregressive drafter (a `TargetModel` qualifies).

    ``forward(input_ids (1, n), cache)`` returns logits (1, n, V) -- or an object with a
    ``.logits`` field; only the last row is read -- and extends the cache in place;
    ``crop(cache, length)`` rolls it back. An optional ``vocab_map`` attribute (Vd,) says that
    the logits have Vd columns, column j scoring target id vocab_map[j].
    """

    def new_cache(self) -> Any: ...

    def forward(self, input_ids: Tensor, cache: Any) -> Any: ...

    def crop(self, cache: Any, length: int) -> Any: ...


# ------------------------------------------------------------------------------ helpers


def _base_seed(seed: Optional[int]) -> int:
    if seed is None:
        return int.from_bytes(os.urandom(8), "little") & _SEED_MASK
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
    return seed & _SEED_MASK


def _check_prompt(input_ids: Tensor, device: torch.device) -> Tensor:
    if not isinstance(input_ids, Tensor):
        raise TypeError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
    if input_ids.dim() != 2 or input_ids.shape[0] != 1 or input_ids.shape[1] < 1:
        raise ValueError(f"input_ids must have shape (1, T) with T >= 1, got {tuple(input_ids.shape)}")
    if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
        raise TypeError(f"input_ids must hold integer ids, got {input_ids.dtype}")
    return input_ids.to(device=device, dtype=torch.int64)


def _check_args(max_new_tokens: int, temperature: float) -> float:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be a non-negative int, got {max_new_tokens!r}")
    t = float(temperature)
    if not t >= 0.0 or t == float("inf"):
        raise ValueError(f"temperature must be finite and >= 0, got {temperature!r}")
    return t


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
        """Checked controls; None means off."""
        k = 0 if top_k is None else top_k
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 = off), got {top_k!r}")
        p = 1.0 if top_p is None else float(top_p)
        if not 0.0 < p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {top_p!r}")
        mp = 0.0 if min_p is None else float(min_p)
        if not 0.0 <= mp <= 1.0:
            raise ValueError(f"min_p must be in [0, 1] (0 = off), got {min_p!r}")
        r = 1.0 if repetition_penalty is None else float(repetition_penalty)
        if not (r > 0.0 and r < float("inf")):
            raise ValueError(f"repetition_penalty must be finite and > 0 (1 = off), got {repetition_penalty!r}")
        return cls(k, p, mp, r)

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


def _logits(out: Any) -> Tensor:
    return out.logits if hasattr(out, "logits") else out


class _Clock:
    """Wall time split into named phases (``with clock("draft"): ...``). On CUDA the phases are
    timed with events (read once at the end), so timing adds no host synchronisation to a
    round."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.spans: dict = {"draft": [], "verify": []}
        self.t0 = time.perf_counter()

    def _mark(self) -> Any:
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        start = self._mark()
        try:
            yield
        finally:
            self.spans[phase].append((start, self._mark()))

    def finish(self) -> dict:
        if self.cuda:
            torch.cuda.synchronize()
            secs = {k: sum(a.elapsed_time(b) for a, b in v) / 1e3 for k, v in self.spans.items()}
        else:
            secs = {k: sum(b - a for a, b in v) for k, v in self.spans.items()}
        total = time.perf_counter() - self.t0
        return {"seconds": total, "draft_seconds": secs["draft"], "verify_seconds": secs["verify"],
                "other_seconds": max(total - secs["draft"] - secs["verify"], 0.0)}


def _stats(clock: _Clock, new_tokens: int, rounds: int, accepted: int, seed: int,
           hist: Optional[List[int]] = None) -> dict:
    s = clock.finish()
    s.update(
        accepted_histogram=list(hist) if hist is not None else [rounds],
        new_tokens=new_tokens,
        tokens_per_second=new_tokens / s["seconds"] if s["seconds"] > 0 else float("inf"),
        rounds=rounds,
        accepted=accepted,
        mean_accepted=accepted / rounds if rounds else 0.0,
        tokens_per_round=new_tokens / rounds if rounds else 0.0,
        seed=seed,
    )
    return s


def pool_stats(stats: Sequence[dict]) -> dict:
    """The statistics of several `generate` runs pooled: totals of new_tokens, seconds,
    rounds, accepted, the time split and the accepted histogram, and the ratios over the
    totals (tokens_per_second, mean_accepted, tokens_per_round, first_accept_rate: rounds that
    accepted at least one draft). Runs without rounds (transformers' generate) contribute
    tokens and seconds only."""
    toks = sum(st["new_tokens"] for st in stats)
    secs = sum(st["seconds"] for st in stats)
    out: dict = {"new_tokens": toks, "seconds": secs,
                 "tokens_per_second": toks / secs if secs > 0 else 0.0}
    spec = [st for st in stats if "rounds" in st]
    if spec:
        rounds = sum(st["rounds"] for st in spec)
        acc = sum(st["accepted"] for st in spec)
        hist = [0] * max(len(st["accepted_histogram"]) for st in spec)
        for st in spec:
            for j, c in enumerate(st["accepted_histogram"]):
                hist[j] += c
        out.update(rounds=rounds, accepted=acc,
                   mean_accepted=acc / rounds if rounds else 0.0,
                   tokens_per_round=sum(st["new_tokens"] for st in spec) / rounds if rounds else 0.0,
                   first_accept_rate=(rounds - hist[0]) / rounds if rounds else 0.0,
                   accepted_histogram=hist)
        for k in ("draft_seconds", "verify_seconds", "other_seconds"):
            out[k] = sum(st[k] for st in spec)
    return out


def evaluate_acceptance(decoder: Any, prompts: Sequence[Tensor], max_new_tokens: int,
                        temperature: float = 0.0, seed: int = 0,
                        controls: Optional[dict] = None) -> dict:
    """`decoder.generate` on every encoded prompt (1, T) with seed ``seed + i`` (and the
    sampling `controls`: top_k / top_p / min_p / repetition_penalty), the statistics pooled by
    `pool_stats` (mean_accepted, first_accept_rate, accepted_histogram, ...): the one
    acceptance measurement of the trainers' evals and ``specdiff eval-drafter``."""
    return pool_stats([decoder.generate(ids, max_new_tokens=max_new_tokens,
                                        temperature=temperature, seed=seed + i,
                                        **(controls or {})).stats
                       for i, ids in enumerate(prompts)])


def _cat_hidden(out: Any, n: Optional[int] = None) -> Optional[Tensor]:
    """The requested hidden states of a target forward at its first `n` positions (all when
    None), concatenated over layers: (B, n, H_f), or None when none were requested."""
    hid = getattr(out, "hidden", None)
    if not hid:
        return None
    hid = [h[:, :n] for h in hid] if n is not None else hid
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


# ------------------------------------------------------------------------------ decoders


def _setup(target: Any, input_ids: Tensor, max_new_tokens: int, temperature: float,
           seed: Optional[int], eos_token_id: Optional[int], controls: SamplingControls) -> tuple:
    """Checked arguments of a generate call: (tau, prompt, base seed, eos id, clock)."""
    tau = _check_args(max_new_tokens, temperature)
    if not isinstance(controls, SamplingControls):
        raise TypeError(f"controls must be SamplingControls, got {type(controls).__name__}")
    prompt = _check_prompt(input_ids, target.device)
    eos = target.eos_token_id if eos_token_id is None else eos_token_id
    return tau, prompt, _base_seed(seed), eos, _Clock(target.device)


class ARDecoder:
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
        return GenerateResult(out, _stats(clock, len(out), rounds, 0, base))


@dataclass
class Draft:
    """One round's drafts and what `ops.verify` needs to stay exact.

    Attributes
    ----------
    ids : int64 tensor
        Shape: (1, g). Target ids; g may be smaller than asked (0: a plain target step).
    logits : tensor or None
        Shape: (1, g, Vd). The law each draft was drawn from (soft q); None: point masses only.
    point_mass : bool tensor or None
        Shape: (1, g). Drafts to verify as point masses (the order-aware rule).
    temperature : float
        The temperature `logits` are read at.
    vocab_map : int64 tensor or None
        Shape: (Vd,). Target id of each logits column (reduced vocabulary).
    """

    ids: Tensor
    logits: Optional[Tensor] = None
    point_mass: Optional[Tensor] = None
    temperature: float = 0.0
    vocab_map: Optional[Tensor] = None


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
    """

    feature_layers: Optional[List[int]]

    def start(self, prompt: Tensor, seed: int, temperature: float,
              hidden: Optional[Tensor], filters: Optional[dict] = None) -> None: ...

    def draft(self, gamma: int, rnd: int) -> Draft: ...

    def accept(self, emitted: Tensor, n_acc: int, hidden: Optional[Tensor]) -> None: ...


class SpeculativeDecoder:
    """The speculative round loop: draft, one target forward over [last, drafts], `ops.verify`,
    crop the target's cache to what was accepted, tell the drafter.

    Parameters
    ----------
    target : TargetModel
    drafter : Drafter
        `DiffusionDrafting`, `ARDrafting`, `PromptLookup` or any object with that protocol.
    gamma : int
        At most this many drafts per round.
    """

    def __init__(self, target: Any, drafter: Drafter, gamma: int) -> None:
        if isinstance(gamma, bool) or not isinstance(gamma, int) or gamma < 1:
            raise ValueError(f"gamma must be a positive int, got {gamma!r}")
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
        tgt, drafter = self.target, self.drafter
        ctl = SamplingControls.make(top_k, top_p, min_p, repetition_penalty)
        tau, prompt, base, eos, clock = _setup(tgt, input_ids, max_new_tokens, temperature,
                                               seed, eos_token_id, ctl)
        seen = prompt  # every token so far (the penalties' history)
        vseed = (2 * base) & _SEED_MASK  # verifier stream; the drafter uses 2 * base + 1
        layers = drafter.feature_layers
        out: List[int] = []
        rounds = accepted = 0
        hist = [0] * (self.gamma + 1)
        cache, hidden = tgt.new_cache(), None
        if max_new_tokens > 0:
            with clock("verify"):  # the target caches everything but the last token
                if prompt.shape[1] > 1:
                    hidden = _cat_hidden(tgt.forward(prompt[:, :-1], cache, hidden_layers=layers))
            with clock("draft"):
                drafter.start(prompt, (2 * base + 1) & _SEED_MASK, tau, hidden, ctl.filters)
        length, last = prompt.shape[1] - 1, prompt[:, -1:]  # cached positions, (1, 1)
        while len(out) < max_new_tokens:
            g = min(self.gamma, max_new_tokens - len(out) - 1)  # the last token is free
            with clock("draft"):
                d = drafter.draft(g, rounds) if g > 0 else Draft(last.new_zeros((1, 0)))
            g = d.ids.shape[1]
            with clock("verify"):
                tout = tgt.forward(torch.cat([last, d.ids], dim=1), cache, hidden_layers=layers)
                res = ops.verify(ctl.penalize(tout.logits, seen, d.ids), d.ids, d.logits,
                                 draft_point_mass=d.point_mass, temperature=tau,
                                 draft_temperature=d.temperature, seed=vseed, offset=rounds,
                                 vocab_map=d.vocab_map, check_values=False, **ctl.filters)
                # the one host sync of the round: ids, count and validity together
                flat = torch.cat([res.ids[0], res.num_accepted, res.valid.long()]).tolist()
                n_acc = flat[g + 1]
                if not flat[g + 2]:
                    raise RuntimeError("the target's logits held NaN / inf or no finite value")
                length += 1 + n_acc  # the last token and the accepted drafts are now cached
                tgt.crop(cache, length)
            rounds, accepted = rounds + 1, accepted + n_acc
            hist[n_acc] += 1
            if _emit(out, flat[: n_acc + 1], eos, max_new_tokens, stream):
                break
            if ctl.penalized:
                seen = torch.cat([seen, res.ids[:, : n_acc + 1]], 1)
            with clock("draft"):
                drafter.accept(res.ids[:, : n_acc + 1], n_acc, _cat_hidden(tout, n_acc + 1))
            last = res.ids[:, n_acc: n_acc + 1]
        return GenerateResult(out, _stats(clock, len(out), rounds, accepted, base, hist))


# ------------------------------------------------------------------------------ drafters


class DiffusionDrafting:
    """Drafting with a block-diffusion drafter: T denoising steps through `sample_block`.

    Parameters
    ----------
    drafter : DFlashDrafter or DiffusionDrafter
        On the target's device. A `DFlashDrafter` reads the target's feature-layer states at
        every context position (the verification forward returns those of the accepted tokens)
        and drafts at most block_size - 1 tokens. A `DiffusionDrafter` in TOKENS context mode
        encodes the context tokens itself; in TARGET_FEATURES mode (with
        ``features_with_tokens``) position t reads the states at t - 1 (training/features.py).
    steps : int
        Denoising steps T per block (1: one parallel pass).
    commit : CommitMode or str
        random, confidence or left_to_right (exact at every temperature in each mode).
    draft_temperature : float, optional
        None: the target's temperature (0 for greedy decoding).
    draft_filters : bool
        Draft with the target's top-k / top-p / min-p too (q is then the filtered law);
        False: from the drafter's plain tempered law. Both are exact; the filtered law accepts
        more (`benchmarks/results/draft_filters_cpu.md`: 0.41 against 0.27 drafts per round with
        top_k=50, top_p=0.9, min_p=0.05 at temperature 1), so it is the default.

    Attributes
    ----------
    cache : DFlashCache or DrafterCache
        The drafter's context cache of the current text (after `start`).
    """

    def __init__(self, drafter: Union[DFlashDrafter, DiffusionDrafter], steps: int = 1,
                 commit: Union[CommitMode, str] = CommitMode.LEFT_TO_RIGHT,
                 draft_temperature: Optional[float] = None, draft_filters: bool = True) -> None:
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be a positive int, got {steps!r}")
        cfg = drafter.config
        self.dflash = isinstance(drafter, DFlashDrafter)
        feats = self.dflash or cfg.context_mode is ContextMode.TARGET_FEATURES
        if feats and not self.dflash:
            if not cfg.feature_layers:
                raise ValueError("a target_features drafter must name its feature_layers")
            if not cfg.features_with_tokens:
                raise ValueError("SpecDiffDecoder drives target_features drafters that also read "
                                 "the context tokens (features_with_tokens=True)")
        self.drafter, self.steps = drafter, steps
        self.commit = CommitMode.parse(commit)
        self.draft_temperature = draft_temperature
        self.draft_filters = bool(draft_filters)
        self.feature_layers = list(cfg.feature_layers) if feats else None
        self.cache: Any = None

    def start(self, prompt: Tensor, seed: int, temperature: float,
              hidden: Optional[Tensor], filters: Optional[dict] = None) -> None:
        self._seed = seed
        self._dtau = temperature if self.draft_temperature is None else float(self.draft_temperature)
        self._filters = (filters or None) if self.draft_filters else None
        self.cache = self.drafter.new_cache(1)
        if self.dflash:  # context position t holds the target's states at t
            if hidden is None:
                hidden = prompt.new_zeros((1, 0, self.drafter.config.feature_size),
                                          dtype=self.cache.dtype)
            self.cache.append_context(hidden, last=prompt[:, -1:])
        elif self.feature_layers is None:  # the context holds every token, the last included
            self.cache.append_context(prompt)
        else:  # position t reads the target's states at t - 1 (zeros at t = 0)
            feats = prompt.new_zeros((1, prompt.shape[1], self.drafter.config.feature_size),
                                     dtype=self.cache.dtype)
            if hidden is not None:
                feats[:, 1:] = hidden
            self.cache.append_context(prompt, feats)

    def draft(self, gamma: int, rnd: int) -> Draft:
        b = sample_block(self.drafter, self.cache, gamma, self.steps, self.commit,
                         temperature=self._dtau, seed=self._seed, offset=rnd,
                         filters=self._filters)
        return Draft(b.ids, b.logits if self._dtau > 0 else None, b.point_mass, self._dtau,
                     b.vocab_map)

    def accept(self, emitted: Tensor, n_acc: int, hidden: Optional[Tensor]) -> None:
        if self.dflash:  # states at [last, x_1 .. x_n]; the correction starts the next block
            self.cache.append_context(hidden, last=emitted[:, n_acc:])
        else:  # tokens [x_1 .. x_n, correction] with the states at [last, x_1 .. x_n]
            self.cache.append_context(emitted, hidden)


class ARDrafting:
    """Drafting with a small autoregressive drafter (see `ARDrafter`), one forward per draft.

    Parameters
    ----------
    ar_drafter : ARDrafter
        A causal LM over the target's tokenizer, e.g. ``load_target(small_model_folder)`` or
        the shipped baseline drafter (`drafter.ar.load_ar_drafter`).
    draft_temperature : float, optional
        None: the target's temperature. Drafts are drawn left to right, so the soft q is exact.
    draft_filters : bool
        Draft with the target's top-k / top-p / min-p too (as `DiffusionDrafting`).
    """

    feature_layers = None

    def __init__(self, ar_drafter: Any, draft_temperature: Optional[float] = None,
                 draft_filters: bool = True) -> None:
        self.drafter, self.draft_temperature = ar_drafter, draft_temperature
        self.draft_filters = bool(draft_filters)

    def start(self, prompt: Tensor, seed: int, temperature: float,
              hidden: Optional[Tensor], filters: Optional[dict] = None) -> None:
        self._dtau = temperature if self.draft_temperature is None else float(self.draft_temperature)
        self._filters = (filters or None) if self.draft_filters else None
        self._gen = torch.Generator(device=prompt.device).manual_seed(seed)
        self._cache = self.drafter.new_cache()
        self._vmap = getattr(self.drafter, "vocab_map", None)  # (Vd,) reduced vocabulary
        self._pending = prompt  # tokens the drafter has not read yet (the last one included)
        self._length = 0  # positions in the drafter's cache

    def draft(self, gamma: int, rnd: int) -> Draft:
        x, ids, rows = self._pending, [], []
        for _ in range(gamma):
            row = _logits(self.drafter.forward(x, self._cache))[:, -1]  # (1, Vd)
            if self._filters and self._dtau > 0.0:
                row = ops.filter_logits(row[:, None], temperature=self._dtau, **self._filters)[:, 0]
            self._length += x.shape[1]
            if self._dtau == 0.0:
                x = row.argmax(-1, keepdim=True)
            else:  # exponential race: argmax p / E, no host sync
                e = torch.empty(row.shape, device=row.device, dtype=torch.float32)
                e.exponential_(generator=self._gen)
                x = (torch.softmax(row.float() / self._dtau, -1) / e).argmax(-1, keepdim=True)
            if self._vmap is not None:  # drafter column -> target id
                x = self._vmap[x]
            ids.append(x)
            rows.append(row)
        self._g = gamma
        logits = torch.stack(rows, dim=1) if self._dtau > 0 else None  # (1, G, Vd)
        return Draft(torch.cat(ids, dim=1), logits, None, self._dtau, self._vmap)

    def accept(self, emitted: Tensor, n_acc: int, hidden: Optional[Tensor]) -> None:
        # the drafter read the last token and x_1 .. x_{G-1}; keep last + the accepted ones
        keep = self._length - self._g + 1 + n_acc
        if n_acc == self._g:  # x_G was never fed: read it with the bonus token
            self._pending = emitted[:, n_acc - 1:]
            keep -= 1
        else:
            self._pending = emitted[:, n_acc:]
        self.drafter.crop(self._cache, keep)
        self._length = keep


class PromptLookup:
    """Prompt-lookup drafting: the tokens that followed the most recent earlier occurrence of
    the text's last n tokens (n = max_ngram down to min_ngram) in the prompt and the output;
    none when nothing matches. The drafts are a function of the text so far, so they are point
    masses and verification is exact at every temperature."""

    feature_layers = None

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1) -> None:
        for name, v in (("max_ngram", max_ngram), ("min_ngram", min_ngram)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if min_ngram > max_ngram:
            raise ValueError(f"min_ngram must be <= max_ngram, got {min_ngram} > {max_ngram}")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def start(self, prompt: Tensor, seed: int, temperature: float,
              hidden: Optional[Tensor], filters: Optional[dict] = None) -> None:
        self._text: List[int] = prompt[0].tolist()
        self._dev = prompt.device

    def draft(self, gamma: int, rnd: int) -> Draft:
        found = lookup_ngram(self._text, gamma, self.max_ngram, self.min_ngram)
        ids = torch.tensor([found], dtype=torch.int64, device=self._dev).view(1, len(found))
        return Draft(ids, None, torch.ones_like(ids, dtype=torch.bool))

    def accept(self, emitted: Tensor, n_acc: int, hidden: Optional[Tensor]) -> None:
        self._text.extend(emitted[0].tolist())


# ------------------------------------------------------------------------------ decoders


class SpecDiffDecoder(SpeculativeDecoder):
    """Speculative diffusion decoding: `SpeculativeDecoder` over `DiffusionDrafting`.

    Parameters
    ----------
    target : TargetModel
    drafter : DFlashDrafter or DiffusionDrafter
        See `DiffusionDrafting`.
    gamma : int, optional
        Block size G (drafts per round); at most block_size - 1 for a DFlash drafter. None:
        block_size - 1 for a DFlash drafter (its trained block), 8 otherwise.
    steps, commit, draft_temperature, draft_filters
        See `DiffusionDrafting`.
    """

    def __init__(self, target: Any, drafter: Union[DFlashDrafter, DiffusionDrafter],
                 gamma: Optional[int] = None, steps: int = 1,
                 commit: Union[CommitMode, str] = CommitMode.LEFT_TO_RIGHT,
                 draft_temperature: Optional[float] = None, draft_filters: bool = True) -> None:
        drafting = DiffusionDrafting(drafter, steps, commit, draft_temperature, draft_filters)
        if gamma is None:
            gamma = drafter.config.block_size - 1 if drafting.dflash else 8
        super().__init__(target, drafting, gamma)
        if drafting.dflash and gamma > drafter.config.block_size - 1:
            raise ValueError(f"gamma must be <= block_size - 1 = {drafter.config.block_size - 1} "
                             f"for this DFlash drafter (trained on blocks of "
                             f"{drafter.config.block_size}), got {gamma}")


class ARSpecDecoder(SpeculativeDecoder):
    """Speculative decoding with a small autoregressive drafter: `SpeculativeDecoder` over
    `ARDrafting` (see there for `ar_drafter`, `draft_temperature` and `draft_filters`)."""

    def __init__(self, target: Any, ar_drafter: Any, gamma: Optional[int] = None,
                 draft_temperature: Optional[float] = None, draft_filters: bool = True) -> None:
        super().__init__(target, ARDrafting(ar_drafter, draft_temperature, draft_filters),
                         DEFAULTS.ar_gamma if gamma is None else gamma)


class PLDDecoder(SpeculativeDecoder):
    """Prompt-lookup decoding: `SpeculativeDecoder` over `PromptLookup` (at most `gamma`
    drafts per round copied from the text so far)."""

    def __init__(self, target: Any, gamma: Optional[int] = None, max_ngram: int = 3,
                 min_ngram: int = 1) -> None:
        gamma = DEFAULTS.pld_gamma if gamma is None else gamma
        super().__init__(target, PromptLookup(max_ngram, min_ngram), gamma)


def lookup_ngram(text: Sequence[int], gamma: int, max_ngram: int = 3,
                 min_ngram: int = 1) -> List[int]:
    """Up to `gamma` tokens that followed the most recent earlier occurrence of the longest
    suffix of `text` (max_ngram down to min_ngram tokens); [] when none occurs.

    >>> lookup_ngram([1, 2, 3, 9, 1, 2], 3)
    [3, 9, 1]
    >>> lookup_ngram([5, 6, 7], 2)
    []
    """
    n_text = len(text)
    for n in range(min(max_ngram, n_text - 1), min_ngram - 1, -1):
        suffix = list(text[n_text - n:])
        for start in range(n_text - n - 1, -1, -1):
            if list(text[start:start + n]) == suffix:
                return list(text[start + n: start + n + gamma])
    return []


# ----------------------------------------------------------------------- kinds and defaults


class DecoderKind(str, Enum):
    """The decoders of this package, by the names the CLI and `bench` use."""

    AR = "ar"
    SPECDIFF = "specdiff"
    AR_SPEC = "ar-spec"
    PLD = "pld"


@dataclass(frozen=True)
class DecoderDefaults:
    """Every decoder default, written once.

    specdiff_gamma None: the DFlash drafter's trained block minus one (3 for the embedded
    drafter, `pretrained.DEFAULT_GAMMA`; the gamma sweep, `benchmarks/sweep_gamma.sh`, found
    the smallest blocks fastest at this acceptance and 8 the slowest), 8 for the older drafters
    without a block. steps 1 and left_to_right: the DFlash drafter is trained to fill a fully
    masked block in one pass. ar_gamma 2 and pld_gamma 4: the baselines' drafts per round that
    the same sweep found fastest (on other held-out prompts than the benchmarks'). draft_filters: drafters sample with the
    target's top-k / top-p / min-p (more accepted, `benchmarks/results/draft_filters_cpu.md`)."""

    specdiff_gamma: Optional[int] = None
    steps: int = 1
    commit: str = "left_to_right"
    ar_gamma: int = 2
    pld_gamma: int = 4
    draft_filters: bool = True


DEFAULTS = DecoderDefaults()


def make_decoder(kind: Union[DecoderKind, str], target: Any, drafter: Any = None,
                 ar_drafter: Any = None, *, gamma: Optional[int] = None,
                 steps: Optional[int] = None, commit: Optional[str] = None,
                 draft_filters: Optional[bool] = None) -> Any:
    """A decoder by kind, with `DEFAULTS` for whatever is not given.

    Parameters
    ----------
    kind : DecoderKind or its name
    target : TargetModel
    drafter, ar_drafter : the diffusion drafter (specdiff) and the autoregressive one (ar-spec)
    gamma : drafts per round (the kind's default when None)
    steps, commit : specdiff's denoising steps and commit mode
    draft_filters : draft with the target's top-k / top-p / min-p (specdiff, ar-spec)
    """
    if draft_filters is None:
        draft_filters = DEFAULTS.draft_filters
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
        return SpecDiffDecoder(target, drafter, gamma=gamma if gamma is not None else DEFAULTS.specdiff_gamma,
                               steps=steps if steps is not None else DEFAULTS.steps,
                               commit=commit if commit is not None else DEFAULTS.commit,
                               draft_filters=draft_filters)
    if k is DecoderKind.AR_SPEC:
        if ar_drafter is None:
            raise ValueError("the ar-spec decoder needs an autoregressive drafter")
        return ARSpecDecoder(target, ar_drafter, gamma=gamma if gamma is not None else DEFAULTS.ar_gamma,
                             draft_filters=draft_filters)
    return PLDDecoder(target, gamma=gamma if gamma is not None else DEFAULTS.pld_gamma)
