"""Distilling the ar-spec baseline drafter from the target (docs/design.md section 5).

``python -m specdiff_ext.training.train --data DIR --out DIR`` (``specdiff train-drafter``;
``--ar``, which used to pick this drafter, is still accepted). The block-diffusion drafter is
trained by `training.dflash` (``specdiff train-dflash``).

- Drafter: `drafter.ar.build_ar_drafter`, a ``--layers``-layer causal LM over the target's frozen
  (tied) embedding and head, its layers optionally copied from target layers
  (``--init-from-target``).
- Data: the shards of `specdiff_ext.training.data` (generate them first, or pass
  ``--generate N`` to do it here). Rows are windows of at most ``--max-len`` tokens that keep
  part of the continuation; the loss is next-token cross-entropy on the continuation tokens
  (`drafter.ar.ar_loss`).
- AdamW, linear warm-up then cosine decay; tqdm with loss and tokens/s; every
  ``--eval-every`` steps the mean accepted draft tokens per round on held-out prompts
  (`decoding.ARSpecDecoder`, ``--gamma`` drafts per round, greedy); every ``--save-every``
  steps a checkpoint in ``--out`` (`drafter.ar.save_ar_drafter`, loadable with
  `drafter.ar.load_ar_drafter`, and ``trainer_state.pt`` with optimizer, schedule and RNG
  state). ``--resume`` continues from it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from .data import TokenData, generate_dataset, load_shards, read_heldout

__all__ = ["build_parser", "train", "evaluate_acceptance", "lr_at", "sample_windows", "main"]

STATE_NAME = "trainer_state.pt"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="specdiff train-drafter", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Distil the autoregressive drafter of the ar-spec baseline from the target: "
                    "a --layers-layer causal LM over the target's embedding, next-token loss on "
                    "the target's continuations (drafter.ar). The block-diffusion (DFlash) "
                    "drafter is trained by `specdiff train-dflash`.")
    ap.add_argument("--data", required=True, help="dataset folder (specdiff_ext.training.data)")
    ap.add_argument("--out", required=True, help="checkpoint folder")
    ap.add_argument("--target", default=None, help="model folder (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--generate", type=int, default=0,
                    help="first generate (or resume) this many prompts into --data (greedy and t=1)")
    ap.add_argument("--temperatures", default=None, help="train only on shards of these temperatures")
    ap.add_argument("--train-steps", "--steps", dest="steps", type=int, default=2000,
                    help="optimizer steps (--steps: the older name)")
    ap.add_argument("--batch", type=int, default=8, help="sequences per step")
    ap.add_argument("--gamma", type=int, default=8, help="drafts per round in the acceptance eval")
    ap.add_argument("--max-len", type=int, default=256, help="longest window of a sequence")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--min-lr-ratio", type=float, default=0.1)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--grad-clip", type=float, default=1.0)
    ap.add_argument("--ar", action="store_true",
                    help="accepted for older command lines: the ar drafter is the only one this "
                         "command trains")
    ap.add_argument("--layers", type=int, default=2, help="drafter layers")
    ap.add_argument("--init-from-target", default=None,
                    help="comma list of target layers to copy into the drafter's layers, 'first' "
                         "(layers 0 .. --layers - 1) or 'spread' (evenly spread, last layer "
                         "included)")
    ap.add_argument("--eval-every", type=int, default=200)
    ap.add_argument("--eval-prompts", type=int, default=8)
    ap.add_argument("--eval-rounds", type=int, default=8)
    ap.add_argument("--save-every", type=int, default=200)
    ap.add_argument("--resume", action="store_true", help="continue from --out")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bf16", action="store_true",
                    help="bfloat16 autocast for the forward and backward (weights stay float32)")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-progress", action="store_true")
    return ap


# ------------------------------------------------------------------------------ pieces

def lr_at(step: int, base: float, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up to base, then cosine decay to base * min_ratio at `total`."""
    if step < warmup:
        return base * (step + 1) / warmup
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


def sample_windows(data: TokenData, B: int, G: int, max_len: int,
                   gen: torch.Generator) -> tuple:
    """B random sequences: windows of <= max_len tokens holding at least G continuation tokens.

    Returns (seqs (B, L) right-padded int64, lengths (B,), lo (B,): the last prompt position in
    the window (clamped at 0), idx: the data rows, starts: window starts in those rows).
    """
    idx = torch.randint(0, len(data), (B,), generator=gen)
    rows, lens, los, starts = [], [], [], []
    for i in idx.tolist():
        o0, o1 = int(data.offsets[i]), int(data.offsets[i + 1])
        n, p = o1 - o0, int(data.prompt_lens[i])
        start = 0
        if n > max_len:  # a random window holding at least G continuation tokens
            hi_s = n - max_len
            lo_s = min(hi_s, max(0, p + G - max_len))
            start = lo_s if lo_s >= hi_s else int(torch.randint(lo_s, hi_s + 1, (1,), generator=gen))
        seg = data.tokens[o0 + start:o0 + min(n, start + max_len)]
        rows.append(seg)
        lens.append(seg.numel())
        los.append(max(0, p - 1 - start))
        starts.append(start)
    L = max(lens)
    seqs = torch.zeros(B, L, dtype=torch.int64)
    for b, r in enumerate(rows):
        seqs[b, :r.numel()] = r
    return seqs, torch.tensor(lens), torch.tensor(los), idx, starts


def evaluate_acceptance(drafter: Any, target: Any, prompts: Sequence[str], gamma: int,
                        rounds: int, temperature: float = 0.0, seed: int = 0) -> dict:
    """Mean accepted draft tokens per round over speculative rounds on each prompt.

    Runs the real decoder, `decoding.ARSpecDecoder` with `drafter` (a causal LM from
    `drafter.ar.build_ar_drafter`) drafting `gamma` tokens per round, for
    ``rounds * (gamma + 1)`` new tokens per prompt (at least `rounds` rounds; a prompt ends
    early at EOS). The drafter's training mode and requires_grad flags are restored after.

    Returns
    -------
    dict
        accepted_per_round, first_accept_rate (rounds that accepted at least one draft),
        tokens_per_round, rounds, accepted_histogram.
    """
    from ..bench.evals import evaluate_acceptance as run
    from ..decoding import ARSpecDecoder
    from ..target import TargetModel

    was_training = drafter.training
    # TargetModel puts the model in eval mode and freezes it: restore both after
    grads = [p.requires_grad for p in drafter.parameters()]
    dec = ARSpecDecoder(target, TargetModel(drafter, target.tokenizer, "ar"), gamma=gamma)
    try:
        pooled = run(dec, [target.chat_prompt(text) for text in prompts],
                     rounds * (gamma + 1), temperature=temperature, seed=seed)
    finally:
        drafter.train(was_training)
        for p, g in zip(drafter.parameters(), grads):
            p.requires_grad_(g)
    return {"accepted_per_round": pooled.get("mean_accepted", 0.0),
            "first_accept_rate": pooled.get("first_accept_rate", 0.0),
            "tokens_per_round": pooled.get("tokens_per_round", 0.0),
            "rounds": pooled.get("rounds", 0),
            "accepted_histogram": pooled.get("accepted_histogram", [])}


def _save(out: Path, drafter: Any, opt: torch.optim.Optimizer, step: int,
          gen: torch.Generator, args: dict, history: list, target: Any = None) -> None:
    from ..drafter.ar import save_ar_drafter

    tmp = out / ".ckpt.tmp"
    save_ar_drafter(drafter, tmp, target, extra={"step": step, "args": args})
    state = {"step": step, "optimizer": opt.state_dict(), "gen": gen.get_state(),
             "torch_rng": torch.get_rng_state(), "args": args, "history": history}
    torch.save(state, tmp / STATE_NAME)
    for name in os.listdir(tmp):
        os.replace(tmp / name, out / name)
    tmp.rmdir()


def _init_layers(spec: Optional[str], n_layers: int, num_target_layers: int) -> Optional[list]:
    """The target layers ``--init-from-target`` names (None: no init from the target)."""
    if not spec:
        return None
    L = num_target_layers
    if spec in ("first", "auto"):
        return list(range(min(n_layers, L)))
    if spec == "spread":  # evenly spread, last layer included
        return [round((i + 1) * L / n_layers) - 1 for i in range(n_layers)]
    try:
        return [int(x) for x in spec.split(",")]
    except ValueError:
        raise ValueError(f"--init-from-target must be 'first', 'spread' or a comma list of "
                         f"layer indices, got {spec!r}") from None


# ------------------------------------------------------------------------------ training

def train(args: argparse.Namespace, target: Any = None, log=print) -> dict:
    """Run (or resume) training as `args` say. Returns {'step', 'last', 'history', 'drafter',
    'optimizer'}."""
    from ..drafter.ar import build_ar_drafter, load_ar_weights
    from ..target import load_target

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.ar:
        log("specdiff train-drafter trains the ar-spec baseline drafter (the block-diffusion "
            "drafter: specdiff train-dflash)")
    if target is None:
        target = load_target(args.target, dtype=torch.float32, device=device)
    if args.generate:
        generate_dataset(target, args.data, num_prompts=args.generate,
                         progress=not args.no_progress)
    temps = None if not args.temperatures else [float(x) for x in str(args.temperatures).split(",")]
    data, manifest = load_shards(args.data, temps)
    if manifest["settings"]["target"] != target.name:
        raise ValueError(f"data {args.data} was generated by {manifest['settings']['target']!r}, "
                         f"not {target.name!r}")
    heldout = read_heldout(args.data)[:args.eval_prompts]
    adict = {k: v for k, v in vars(args).items()}
    layers = _init_layers(args.init_from_target, args.layers, target.num_layers)
    resume = args.resume and (out / STATE_NAME).is_file()
    drafter = build_ar_drafter(target, args.layers, None if resume else layers, seed=args.seed)
    if resume:
        load_ar_weights(drafter, out)
    drafter = drafter.to(device)
    state = torch.load(out / STATE_NAME, map_location="cpu", weights_only=True) if resume else None
    return _train_loop(args, target, drafter, data, heldout, out, adict, state, device, log)


def _train_loop(args: argparse.Namespace, target: Any, drafter: Any, data: TokenData,
                heldout: list, out: Path, adict: dict, state: Optional[dict],
                device: torch.device, log: Any) -> dict:
    """The optimisation loop: AdamW over the drafter's own parameters, checkpoints, evals."""
    from ..drafter.ar import ar_loss

    drafter.train()
    cfg = drafter.config
    params = [p for p in drafter.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr,
                            betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(args.seed)
    step, history = 0, []
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["gen"])
        torch.set_rng_state(state["torch_rng"])
        step, history = int(state["step"]), list(state.get("history", []))
        log(f"resumed from {out} at step {step}")
    nparams = sum(p.numel() for p in params)
    log(f"ar drafter: {cfg.num_hidden_layers} layers, {nparams / 1e6:.1f}M trainable parameters; "
        f"data: {len(data)} sequences, {data.tokens.numel()} tokens; device {device}")

    bar = None
    if not args.no_progress:
        from tqdm import tqdm
        bar = tqdm(total=args.steps, initial=step, desc="train", unit="step", dynamic_ncols=True)
    ema, last = None, {}
    t_start, sup_tok, ctx_tok = time.perf_counter(), 0, 0
    while step < args.steps:
        lr = lr_at(step, args.lr, args.warmup, args.steps, args.min_lr_ratio)
        for g in opt.param_groups:
            g["lr"] = lr
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bool(args.bf16)):
            seqs, lengths, lo, _, _ = sample_windows(data, args.batch, 1, args.max_len, gen)
            loss, st = ar_loss(drafter, seqs.to(device), lengths.to(device), lo.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = float(torch.nn.utils.clip_grad_norm_(params, args.grad_clip)) if args.grad_clip else 0.0
        opt.step()
        step += 1
        lv = float(loss.detach())
        if not math.isfinite(lv):
            raise FloatingPointError(f"loss is {lv} at step {step}")
        ema = lv if ema is None else 0.95 * ema + 0.05 * lv
        sup_tok += st["tokens"]
        ctx_tok += int(lengths.sum())
        el = time.perf_counter() - t_start
        last = {"step": step, "loss": lv, "loss_ema": ema, "ce": st["ce"], "acc": st["acc"],
                "acc1": st["acc1"], "lr": lr, "grad_norm": gnorm,
                "block_tok_s": sup_tok / el, "tok_s": (sup_tok + ctx_tok) / el}
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{ema:.3f}", acc1=f"{st['acc1']:.2f}",
                            tok_s=f"{(sup_tok + ctx_tok) / el:.0f}", blk_s=f"{sup_tok / el:.0f}")
        if args.eval_every and heldout and (step % args.eval_every == 0 or step == args.steps):
            ev = evaluate_acceptance(drafter, target, heldout, args.gamma, args.eval_rounds)
            last.update({f"eval_{k}": v for k, v in ev.items()})
            msg = (f"step {step}: loss {ema:.3f} acc1 {st['acc1']:.3f} accepted/round "
                   f"{ev['accepted_per_round']:.3f} (first {ev['first_accept_rate']:.2f})")
            (bar.write if bar is not None else log)(msg)
        history.append({k: (round(v, 5) if isinstance(v, float) else v) for k, v in last.items()})
        if (args.save_every and step % args.save_every == 0) or step == args.steps:
            _save(out, drafter, opt, step, gen, adict, history, target)
    if bar is not None:
        bar.close()
    with open(out / "train_log.json", "w") as fh:
        json.dump(history, fh)
    return {"step": step, "last": last, "history": history, "drafter": drafter, "optimizer": opt}


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    res = train(args)
    print(json.dumps({k: v for k, v in res["last"].items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
