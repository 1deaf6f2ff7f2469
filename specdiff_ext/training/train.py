"""Distilling the masked-diffusion drafter from the target (docs/design.md section 4).

``python -m specdiff_ext.training.train --data DIR --out DIR`` (``specdiff train-drafter``).

- Data: the shards of `specdiff_ext.training.data` (generate them first, or pass
  ``--generate N`` to do it here). Rows are windows of at most ``--max-len`` tokens that keep
  the continuation; K random anchors per row (``--blocks``), all supervised in one forward
  (`losses.multi_block_hidden`).
- Loss: MDLM masked cross-entropy (t ~ U(eps, 1), weight 1/t), early block positions weighted
  by ``--pos-decay``, optional soft labels (``--soft-weight``, needs data with ``--topk``).
- AdamW, linear warm-up then cosine decay; tqdm with loss and tokens/s; every
  ``--eval-every`` steps the mean accepted draft tokens per round on held-out prompts (greedy
  verification with `ops.verify`); every ``--save-every`` steps a checkpoint in ``--out``
  (``model.safetensors`` + ``config.json``, loadable with `load_drafter`, and
  ``trainer_state.pt`` with optimizer, schedule and RNG state). ``--resume`` continues from it.
- ``--init-from-target`` seeds the drafter blocks from target layers (same shapes: the drafter
  uses Hugging Face Llama weight names).
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

from ..drafter.checkpoint import load_drafter, save_drafter
from ..drafter.config import DrafterConfig
from .data import TokenData, generate_dataset, load_shards, read_heldout
from .losses import MultiBlockBatch, make_blocks, mdlm_loss, position_weights
from ..drafter.model import DiffusionDrafter

__all__ = ["build_parser", "train", "evaluate_acceptance", "init_from_target", "main"]

STATE_NAME = "trainer_state.pt"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="specdiff train-drafter", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                 description="Distil the masked-diffusion drafter from the target.")
    ap.add_argument("--data", required=True, help="dataset folder (specdiff_ext.training.data)")
    ap.add_argument("--out", required=True, help="checkpoint folder")
    ap.add_argument("--target", default=None, help="model folder (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--generate", type=int, default=0,
                    help="first generate (or resume) this many prompts into --data (greedy and t=1)")
    ap.add_argument("--temperatures", default=None, help="train only on shards of these temperatures")
    ap.add_argument("--train-steps", "--steps", dest="steps", type=int, default=2000,
                    help="optimizer steps (--steps: the older name; generate's --steps are denoising steps)")
    ap.add_argument("--batch", type=int, default=8, help="sequences per step")
    ap.add_argument("--blocks", type=int, default=16, help="anchor blocks per sequence (K)")
    ap.add_argument("--gamma", type=int, default=8, help="block size G")
    ap.add_argument("--max-len", type=int, default=256, help="longest window of a sequence")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--min-lr-ratio", type=float, default=0.1)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--grad-clip", type=float, default=1.0)
    ap.add_argument("--eps", type=float, default=1e-3, help="smallest mask rate")
    ap.add_argument("--full-mask-prob", type=float, default=0.25,
                    help="fraction of blocks fully masked (what one-pass drafting sees)")
    ap.add_argument("--pos-decay", type=float, default=0.9,
                    help="weight decay**j of block position j (1 = uniform)")
    ap.add_argument("--soft-weight", type=float, default=0.0, help="weight of the top-k soft labels")
    ap.add_argument("--ar", action="store_true",
                    help="train the autoregressive baseline drafter instead: a --layers-layer "
                         "causal LM over the target's embedding, next-token loss on the same "
                         "windows (drafter.ar)")
    ap.add_argument("--commit", default="left_to_right", help="commit mode of the acceptance eval")
    ap.add_argument("--context", choices=["tokens", "target_features"], default="tokens",
                    help="drafter context mode; target_features reads the target's hidden "
                         "states (--feature-layers) with the tokens, EAGLE-style shifted by one")
    ap.add_argument("--feature-layers", default="-1",
                    help="target_features: comma list of target layers (0 = embedding output, "
                         "-1 = the final normed state the head reads)")
    ap.add_argument("--features", default=None,
                    help="target_features: precomputed features file (default: computed once "
                         "into the data folder)")
    ap.add_argument("--layers", type=int, default=2, help="drafter blocks")
    ap.add_argument("--reduced-vocab", type=int, default=None,
                    help="predict only the K most frequent target tokens of the data")
    ap.add_argument("--init-from-target", default=None,
                    help="comma list of target layers to copy into the drafter blocks, 'first' "
                         "(layers 0 .. --layers - 1: fastest to learn in short runs of the "
                         "default pair) or 'spread' (evenly spread, last layer included)")
    ap.add_argument("--eval-every", type=int, default=200)
    ap.add_argument("--eval-prompts", type=int, default=8)
    ap.add_argument("--eval-rounds", type=int, default=8)
    ap.add_argument("--eval-steps", type=int, default=1, help="denoising steps when drafting")
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


def init_from_target(drafter: DiffusionDrafter, target_model: Any, layers: Sequence[int]) -> None:
    """Copy target decoder layers (and the final norm) into the drafter's blocks.

    The drafter's block parameters carry Hugging Face Llama names (``self_attn.q_proj``,
    ``mlp.gate_proj``, ``input_layernorm`` ...), so a target layer's state dict loads as is.
    """
    base = getattr(target_model, "model", target_model)
    tlayers = base.layers
    if len(layers) != len(drafter.layers):
        raise ValueError(f"need one target layer per drafter block ({len(drafter.layers)}), got {layers}")
    with torch.no_grad():
        for blk, li in zip(drafter.layers, layers):
            src = {k: v for k, v in tlayers[li].state_dict().items() if "rotary" not in k}
            missing, unexpected = blk.load_state_dict(
                {k: v.float() for k, v in src.items()}, strict=False)
            if unexpected or missing:
                raise ValueError(f"target layer {li} does not fit a drafter block: missing "
                                 f"{missing}, unexpected {unexpected}")
        if hasattr(base, "norm"):
            drafter.norm.weight.copy_(base.norm.weight.float())


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


def sample_batch(data: TokenData, B: int, K: int, G: int, max_len: int, mask_id: int,
                 gen: torch.Generator, eps: float, full_mask_prob: float,
                 features: Optional[torch.Tensor] = None) -> MultiBlockBatch:
    """B random sequences (windows of <= max_len tokens holding part of the continuation), K
    anchors each, with the target's top-k labels when the data has them, and the windows'
    (shifted) target features when `features` (N_tokens, H_f) is given."""
    seqs, lengths, lo, idx, starts = sample_windows(data, B, G, max_len, gen)
    batch = make_blocks(seqs, lengths, lo, G, K, mask_id, gen=gen, eps=eps,
                        full_mask_prob=full_mask_prob)
    if data.topk_ids is not None:
        k = data.topk_ids.shape[1]
        pos = batch.anchors[..., None] + 1 + torch.arange(G)  # (B, K, G) window positions
        sid = torch.zeros(B, K, G, k, dtype=torch.int64)
        slg = torch.full((B, K, G, k), -1e4)
        for b, i in enumerate(idx.tolist()):
            p = int(data.prompt_lens[i])
            g = pos[b] + starts[b] - p  # index among generated tokens
            ok = (g >= 0) & (pos[b] < lengths[b])
            gi = (int(data.gen_offsets[i]) + g.clamp(min=0))[ok]
            sid[b][ok] = data.topk_ids[gi]
            slg[b][ok] = data.topk_logits[gi]
        batch.soft_ids, batch.soft_logits = sid, slg
    if features is not None:
        from .features import shifted_window_features

        batch.features = shifted_window_features(features, data, idx.tolist(), starts,
                                                 seqs.shape[1])
    return batch


def _to(batch: MultiBlockBatch, device: torch.device) -> MultiBlockBatch:
    for f in ("context", "anchors", "noised", "labels", "masked", "t", "soft_ids", "soft_logits",
              "features"):
        v = getattr(batch, f)
        if v is not None:
            setattr(batch, f, v.to(device))
    return batch


def evaluate_acceptance(drafter: DiffusionDrafter, target: Any, prompts: Sequence[str], gamma: int,
                        rounds: int, steps: int = 1, ar: bool = False,
                        commit: str = "left_to_right", temperature: float = 0.0,
                        seed: int = 0) -> dict:
    """Mean accepted draft tokens per round over speculative rounds on each prompt.

    Runs the real decoders: `decoding.SpecDiffDecoder` (`gamma`, `steps`, `commit`), or with
    ``ar=True`` `decoding.ARSpecDecoder` with `drafter` a causal LM (`ar.build_ar_drafter`),
    for ``rounds * (gamma + 1)`` new tokens per prompt (at least `rounds` rounds; a prompt
    ends early at EOS).

    Returns
    -------
    dict
        accepted_per_round, first_accept_rate (rounds that accepted at least one draft),
        tokens_per_round, rounds.
    """
    from ..bench.evals import evaluate_acceptance as run
    from ..decoding import ARSpecDecoder, SpecDiffDecoder
    from ..target import TargetModel

    was_training = drafter.training
    if ar:  # TargetModel puts the model in eval mode and freezes it: restore both after
        grads = [p.requires_grad for p in drafter.parameters()]
        dec: Any = ARSpecDecoder(target, TargetModel(drafter, target.tokenizer, "ar"), gamma=gamma)
    else:
        drafter.eval()
        dec = SpecDiffDecoder(target, drafter, gamma=gamma, steps=steps, commit=commit,
                              tree_budget=0)
    try:
        pooled = run(dec, [target.chat_prompt(text) for text in prompts],
                     rounds * (gamma + 1), temperature=temperature, seed=seed)
    finally:
        drafter.train(was_training)
        if ar:
            for p, g in zip(drafter.parameters(), grads):
                p.requires_grad_(g)
    return {"accepted_per_round": pooled.get("mean_accepted", 0.0),
            "first_accept_rate": pooled.get("first_accept_rate", 0.0),
            "tokens_per_round": pooled.get("tokens_per_round", 0.0),
            "rounds": pooled.get("rounds", 0),
            "accepted_histogram": pooled.get("accepted_histogram", [])}


def _save(out: Path, drafter: Any, opt: torch.optim.Optimizer, step: int,
          gen: torch.Generator, args: dict, history: list, target: Any = None) -> None:
    tmp = out / ".ckpt.tmp"
    if args.get("ar"):
        from ..drafter.ar import save_ar_drafter

        save_ar_drafter(drafter, tmp, target, extra={"step": step, "args": args})
    else:
        save_drafter(drafter, tmp, extra={"step": step, "args": args})
    state = {"step": step, "optimizer": opt.state_dict(), "gen": gen.get_state(),
             "torch_rng": torch.get_rng_state(), "args": args, "history": history}
    torch.save(state, tmp / STATE_NAME)
    for name in os.listdir(tmp):
        os.replace(tmp / name, out / name)
    tmp.rmdir()


# ------------------------------------------------------------------------------ training

def train(args: argparse.Namespace, target: Any = None, log=print) -> dict:
    """Run (or resume) training as `args` say. Returns {'step', 'loss', 'history', ...}."""
    from ..target import load_target

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
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
    embed, head = target.input_embeddings.weight, target.lm_head_weight
    adict = {k: v for k, v in vars(args).items()}

    layers = None
    if args.init_from_target:
        L = target.num_layers
        if args.init_from_target in ("first", "auto"):
            layers = list(range(min(args.layers, L)))
        elif args.init_from_target == "spread":  # evenly spread, last layer included
            layers = [round((i + 1) * L / args.layers) - 1 for i in range(args.layers)]
        else:
            try:
                layers = [int(x) for x in args.init_from_target.split(",")]
            except ValueError:
                raise ValueError(f"--init-from-target must be 'first', 'spread' or a comma list "
                                 f"of layer indices, got {args.init_from_target!r}") from None
    feature_layers, feats = None, None
    if args.context == "target_features":
        from .features import compute_features, features_file, load_features

        if args.ar:
            raise ValueError("--context target_features does not apply to --ar")
        feature_layers = [int(x) for x in str(args.feature_layers).split(",") if x.strip()]
        fpath = Path(args.features) if args.features else features_file(args.data, feature_layers)
        if fpath.is_file():
            feats = load_features(fpath, feature_layers)
        else:
            log(f"computing target features of layers {feature_layers} into {fpath}")
            feats = compute_features(target, data, feature_layers, fpath,
                                     progress=not args.no_progress)
        if feats.shape[0] != data.tokens.numel():
            raise ValueError(f"features {fpath} cover {feats.shape[0]} tokens, the data "
                             f"{data.tokens.numel()}")
    resume = args.resume and (out / STATE_NAME).is_file()
    if args.ar:
        from ..drafter.ar import build_ar_drafter, load_ar_weights

        if args.reduced_vocab:
            raise ValueError("--reduced-vocab does not apply to --ar (the ar drafter keeps the "
                             "target's tied head, as Hugging Face assisted generation needs)")
        drafter = build_ar_drafter(target, args.layers, None if resume else layers,
                                   seed=args.seed)
        if resume:
            load_ar_weights(drafter, out)
        drafter = drafter.to(device)
    elif resume:
        drafter = load_drafter(out, embed, head, target_name=target.name, device=device)
    else:
        extra_cfg: dict = {}
        if args.context == "target_features":
            extra_cfg = dict(context_mode="target_features", features_with_tokens=True,
                             feature_layers=feature_layers, block_conditioning=True,
                             target_feature_size=len(feature_layers) * target.hidden_size)
        cfg = DrafterConfig.from_hf_config(target.model.config, target.name, n_layers=args.layers,
                                           reduced_vocab=args.reduced_vocab, **extra_cfg)
        vm = None
        if args.reduced_vocab:
            counts = torch.bincount(data.tokens, minlength=target.vocab_size)
            vm = counts.topk(args.reduced_vocab).indices.sort().values
        torch.manual_seed(args.seed)
        drafter = DiffusionDrafter(cfg, embed, head, vocab_map=vm).to(device)
        if layers is not None:
            init_from_target(drafter, target.model, layers)
    state = torch.load(out / STATE_NAME, map_location="cpu", weights_only=True) if resume else None
    return _train_loop(args, target, drafter, data, heldout, out, adict, state, device, log, feats)


def _train_loop(args: argparse.Namespace, target: Any, drafter: Any, data: TokenData,
                heldout: list, out: Path, adict: dict, state: Optional[dict],
                device: torch.device, log: Any, feats: Optional[torch.Tensor] = None) -> dict:
    """The optimisation loop shared by the diffusion drafter and (``--ar``) the ar drafter."""
    ar = bool(args.ar)
    drafter.train()
    cfg = drafter.config
    if ar:
        from ..drafter.ar import ar_loss
    label_map = None
    if not ar and drafter.vocab_map is not None:
        label_map = torch.full((cfg.vocab_size,), -1, dtype=torch.int64, device=device)
        label_map[drafter.vocab_map] = torch.arange(cfg.drafter_vocab_size, device=device)
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
    pw = (position_weights(args.gamma, args.pos_decay, device)
          if args.pos_decay != 1 and not ar else None)
    if args.soft_weight > 0 and data.topk_ids is None:
        raise ValueError("--soft-weight needs a dataset generated with --topk")
    nparams = sum(p.numel() for p in params)
    shape = (f"ar drafter: {cfg.num_hidden_layers} layers" if ar else
             f"drafter: {cfg.n_layers} blocks, Vd={cfg.drafter_vocab_size}")
    log(f"{shape}, {nparams / 1e6:.1f}M trainable parameters; data: {len(data)} sequences, "
        f"{data.tokens.numel()} tokens; device {device}")

    bar = None
    if not args.no_progress:
        from tqdm import tqdm
        bar = tqdm(total=args.steps, initial=step, desc="train", unit="step", dynamic_ncols=True)
    ema, last = None, {}
    t_start, blk_tok, ctx_tok = time.perf_counter(), 0, 0
    while step < args.steps:
        lr = lr_at(step, args.lr, args.warmup, args.steps, args.min_lr_ratio)
        for g in opt.param_groups:
            g["lr"] = lr
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bool(args.bf16)):
            if ar:
                seqs, lengths, lo, _, _ = sample_windows(data, args.batch, 1, args.max_len, gen)
                loss, st = ar_loss(drafter, seqs.to(device), lengths.to(device), lo.to(device))
                n_blk, n_ctx = st["tokens"], int(lengths.sum())
            else:
                batch = _to(sample_batch(data, args.batch, args.blocks, args.gamma, args.max_len,
                                         cfg.mask_id, gen, args.eps, args.full_mask_prob,
                                         feats), device)
                loss, st = mdlm_loss(drafter, batch, pw, args.soft_weight, label_map)
                n_blk, n_ctx = batch.labels.numel(), batch.context.numel()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = float(torch.nn.utils.clip_grad_norm_(params, args.grad_clip)) if args.grad_clip else 0.0
        opt.step()
        step += 1
        lv = float(loss.detach())
        if not math.isfinite(lv):
            raise FloatingPointError(f"loss is {lv} at step {step}")
        ema = lv if ema is None else 0.95 * ema + 0.05 * lv
        blk_tok += n_blk
        ctx_tok += n_ctx
        el = time.perf_counter() - t_start
        last = {"step": step, "loss": lv, "loss_ema": ema, "ce": st["ce"], "acc": st["acc"],
                "acc1": st["acc1"], "lr": lr, "grad_norm": gnorm,
                "block_tok_s": blk_tok / el, "tok_s": (blk_tok + ctx_tok) / el}
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{ema:.3f}", acc1=f"{st['acc1']:.2f}",
                            tok_s=f"{(blk_tok + ctx_tok) / el:.0f}", blk_s=f"{blk_tok / el:.0f}")
        if args.eval_every and heldout and (step % args.eval_every == 0 or step == args.steps):
            ev = evaluate_acceptance(drafter, target, heldout, args.gamma, args.eval_rounds,
                                     args.eval_steps, ar=args.ar, commit=args.commit)
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
