"""End-to-end decoding benchmark (``specdiff bench``); drafter evals are in `bench.evals`.

`run_bench` loads the models once and runs every decoder on every prompt, interleaved prompt by
prompt (so slow drifts of the machine hit all decoders alike), after one warm-up generation per
decoder. Decoders:

- ``ar``: `decoding.ARDecoder` (the baseline every speedup is relative to);
- ``specdiff``: `decoding.SpecDiffDecoder` with the diffusion drafter;
- ``ar-spec``: `decoding.ARSpecDecoder` with the autoregressive drafter of the same pipeline;
- ``hf``: transformers' own ``generate()`` of the target (the check that ``ar`` is honest);
- ``hf-assisted``: transformers' assisted generation with the same autoregressive drafter;
- ``pld``: `decoding.PLDDecoder`, prompt-lookup drafts (n-grams of the text so far) verified by
  the same op;
- ``hf-pld``: transformers' prompt-lookup decoding (``prompt_lookup_num_tokens``).

Per decoder it reports tokens_per_second (all new tokens over all seconds), mean_accepted
(draft tokens accepted per round), tokens_per_round, speedup_vs_ar, the time split (draft,
verify, other), the histogram of accepted lengths, and at temperature 0 matches_ar (prompts
whose output equals ar's).
"""

from __future__ import annotations

import platform
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

import torch

from .stats import pool_stats

__all__ = ["DECODERS", "build_decoders", "run_bench"]

DECODERS = ("ar", "specdiff", "ar-spec", "pld", "hf", "hf-assisted", "hf-pld")


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu} ({torch.get_num_threads()} threads)"


class _HF:
    """transformers' generate(), plain or assisted, behind the decoders' interface."""

    def __init__(self, target: Any, assistant: Any = None, num_assistant_tokens: Optional[int] = None,
                 prompt_lookup: Optional[int] = None):
        self.target, self.assistant = target, assistant
        self.num_assistant_tokens = num_assistant_tokens
        self.prompt_lookup = prompt_lookup  # transformers' prompt_lookup_num_tokens

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
                 seed: Optional[int] = None, eos_token_id: Optional[int] = None,
                 stream: Any = None, *, top_k: Optional[int] = None, top_p: Optional[float] = None,
                 min_p: Optional[float] = None, repetition_penalty: Optional[float] = None) -> Any:
        from transformers import GenerationConfig

        from ..decoding import GenerateResult, SamplingControls

        tgt = self.target
        eos = tgt.eos_token_id if eos_token_id is None else eos_token_id
        kw: Dict[str, Any] = dict(max_new_tokens=max_new_tokens, eos_token_id=eos,
                                  pad_token_id=eos, min_new_tokens=0)
        ctl = SamplingControls.make(top_k, top_p, min_p, repetition_penalty)
        if temperature > 0:  # the same law as the specdiff decoders sample
            kw.update(do_sample=True, temperature=float(temperature), top_k=ctl.top_k,
                      top_p=ctl.top_p, min_p=ctl.min_p if ctl.min_p > 0 else None)
        else:
            kw.update(do_sample=False, temperature=None, top_k=None, top_p=None)
        if ctl.penalized:
            kw.update(repetition_penalty=ctl.repetition_penalty)
        if self.assistant is not None and self.num_assistant_tokens is not None:
            kw.update(num_assistant_tokens=self.num_assistant_tokens,
                      num_assistant_tokens_schedule="constant")
        if self.prompt_lookup is not None:
            kw.update(prompt_lookup_num_tokens=self.prompt_lookup)
        cfg = GenerationConfig(**kw)
        if seed is not None:
            torch.manual_seed(seed)
        ids = input_ids.to(tgt.device)
        t0 = time.perf_counter()
        extra = {"assistant_model": self.assistant.model} if self.assistant is not None else {}
        out = tgt.model.generate(ids, generation_config=cfg,
                                 attention_mask=torch.ones_like(ids), **extra)
        sec = time.perf_counter() - t0
        new = out[0, ids.shape[1]:].tolist()
        if eos is not None and eos in new:
            new = new[: new.index(eos) + 1]
        stats = {"new_tokens": len(new), "seconds": sec,
                 "tokens_per_second": len(new) / sec if sec > 0 else 0.0}
        return GenerateResult(new, stats)


def build_decoders(names: Sequence[str], target: Any, drafter: Any, ar_drafter: Any, *,
                   gamma: Optional[int] = None, steps: Optional[int] = None,
                   commit: Optional[str] = None, ar_gamma: Optional[int] = None,
                   hf_assistant_tokens: Optional[int] = None,
                   pld_gamma: Optional[int] = None, tree_budget: Optional[int] = None,
                   tree_ngram: Optional[bool] = None) -> Dict[str, Any]:
    """Decoder objects by name (see the module doc): this package's through
    `decoding.make_decoder` (defaults: `decoding.DEFAULTS`), transformers' peers here."""
    from ..decoding import DEFAULTS, DecoderKind, make_decoder

    out: Dict[str, Any] = {}
    for n in names:
        if n == "hf":
            out[n] = _HF(target)
        elif n == "hf-assisted":
            out[n] = _HF(target, ar_drafter, hf_assistant_tokens)
        elif n == "hf-pld":
            out[n] = _HF(target, prompt_lookup=pld_gamma if pld_gamma is not None else DEFAULTS.pld_gamma)
        elif n in {k.value for k in DecoderKind}:
            g = {"specdiff": gamma, "ar-spec": ar_gamma, "pld": pld_gamma}.get(n)
            kw = dict(tree_budget=tree_budget, tree_ngram=tree_ngram) if n == "specdiff" else {}
            out[n] = make_decoder(n, target, drafter, ar_drafter, gamma=g, steps=steps,
                                  commit=commit, **kw)
        else:
            raise ValueError(f"unknown decoder {n!r}; choose from {', '.join(DECODERS)}")
    return out


def _batch_record(results: Sequence[Any]) -> dict:
    """One batch's rows as one run record for `pool_stats`: the rows' tokens, rounds,
    acceptance and histograms summed, the batch's wall time (and its split) counted once."""
    st = [r.stats for r in results]
    rec = {k: st[0][k] for k in ("seconds", "draft_seconds", "verify_seconds", "other_seconds")
           if k in st[0]}
    rec["new_tokens"] = sum(s["new_tokens"] for s in st)
    if "rounds" in st[0]:
        rec["rounds"] = sum(s["rounds"] for s in st)
        rec["accepted"] = sum(s["accepted"] for s in st)
        hist = [0] * max(len(s["accepted_histogram"]) for s in st)
        for s in st:
            for j, c in enumerate(s["accepted_histogram"]):
                hist[j] += c
        rec["accepted_histogram"] = hist
    return rec


def run_bench(target: Any, decoders: Dict[str, Any], prompts: Sequence[str], *,
              max_new_tokens: int = 128, temperature: float = 0.0, seed: int = 0,
              chat_template: bool = True, warmup: bool = True, progress: bool = True,
              keep_outputs: bool = False, controls: Optional[dict] = None,
              batch_size: int = 1, continuous: bool = False) -> dict:
    """Run every decoder on every prompt (interleaved) and aggregate; see the module doc.
    controls: top_k / top_p / min_p / repetition_penalty for every decoder's generate().
    batch_size B > 1: the prompts go B at a time through each decoder's ``generate_batch``
    (row i of the batch starting at prompt j gets seed ``seed + j + i``, the seed of its
    one-at-a-time run); tokens/s is then all new tokens over the batches' wall time.
    continuous: instead of static batches of B, every prompt in one ``generate_batch`` call
    per decoder with ``max_batch_size=B`` (a finished row takes the next waiting prompt; prompt
    j still on seed ``seed + j``); tokens/s is all new tokens over that call's wall time."""
    ctl = dict(controls or {})
    if "ar" not in decoders:
        raise ValueError("the decoders must include 'ar' (the baseline of every speedup)")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if batch_size > 1:
        lacking = [n for n, d in decoders.items() if not hasattr(d, "generate_batch")]
        if lacking:
            raise ValueError(f"batch_size {batch_size}: the decoders {lacking} have no "
                             f"generate_batch (transformers' decoders run one prompt at a time)")
    encoded = [target.chat_prompt(p) if chat_template else
               torch.tensor([target.tokenizer.encode(p)], device=target.device) for p in prompts]
    if warmup:
        w = encoded[0][:, :16]
        for d in decoders.values():
            d.generate(w, max_new_tokens=min(16, max_new_tokens), temperature=temperature,
                       seed=seed, **ctl)
    runs: Dict[str, List[Any]] = {n: [] for n in decoders}
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(encoded) * len(decoders), desc="bench", unit="gen",
                   dynamic_ncols=True, file=sys.stderr)
    records: Dict[str, List[dict]] = {n: [] for n in decoders}
    step = len(encoded) if continuous and batch_size > 1 else batch_size
    for i in range(0, len(encoded), step):
        chunk = encoded[i:i + step]
        for name, dec in decoders.items():
            if batch_size == 1:
                got = [dec.generate(chunk[0], max_new_tokens=max_new_tokens,
                                    temperature=temperature, seed=seed + i, **ctl)]
                records[name].append(got[0].stats)
            else:
                got = dec.generate_batch(chunk, max_new_tokens, temperature=temperature,
                                         seed=seed + i, max_batch_size=batch_size, **ctl)
                records[name].append(_batch_record(got))
            runs[name].extend(got)
            if bar is not None:
                bar.update(len(chunk))
                bar.set_postfix(prompt=i, decoder=name)
    if bar is not None:
        bar.close()
    report: Dict[str, Any] = {
        "device": _device_name(target.device), "dtype": str(target.dtype).replace("torch.", ""),
        "max_new_tokens": max_new_tokens, "temperature": temperature, "prompts": len(encoded),
        "controls": ctl, "batch_size": batch_size,
        "continuous": bool(continuous and batch_size > 1),
        "torch": torch.__version__, "decoders": {}}
    for name, rs in runs.items():
        d = pool_stats(records[name])
        if name == "ar":  # plain decoding: its "rounds" are tokens, nothing is drafted
            d = {k: d[k] for k in ("new_tokens", "seconds", "tokens_per_second")}
        if keep_outputs:
            d["outputs"] = [r.ids for r in rs]
        report["decoders"][name] = d
    ar_tps = report["decoders"]["ar"]["tokens_per_second"]
    for name, d in report["decoders"].items():
        d["speedup_vs_ar"] = d["tokens_per_second"] / ar_tps if ar_tps else float("nan")
        if temperature == 0.0:
            d["matches_ar"] = sum(a.ids == b.ids for a, b in zip(runs[name], runs["ar"]))
            d["prompts"] = len(encoded)
    return report
