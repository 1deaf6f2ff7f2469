"""Training of the DFlash drafter by distillation (``specdiff train-dflash``).

The recipe matches drafting (docs/design.md section 4):
- data: the target's greedy continuations of training prompts (`training.data` shards); the
  labels are the target's own tokens;
- features: the target's feature-layer states in the dtype it decodes in, of each window as the
  target computes them over the whole sequence (a window starting past 0 reads the states of
  the full prefix, as decoding does: `training.features`); ``--feature-cache`` keeps each
  sequence's states once computed (in memory, or in a folder a later run reuses), ``none``
  recomputes them per batch;
- blocks: up to ``--anchors`` anchors per sequence, drawn among the positions whose next token
  the target generated, all in one forward pass (a block sees the context before its anchor and
  itself); every block fully masked (the only state T = 1 drafting sees), except a fraction
  ``--partial-prob`` with a random subset of positions revealed (the states T > 1 produces;
  revealed positions carry no loss);
- loss: cross-entropy weighted exp(-(k - 1) / g) at block position k; with ``--kl-weight w``
  against the mixture (1 - w) x the target's token + w x the target's next-token distribution
  (its top ``--kl-topk`` at temperature 1, computed in the same feature pass and cached with
  the features), which is w x KL(p || q) + (1 - w) x CE up to a constant;
- AdamW, warm-up + cosine; checkpoints in the DFlash layout, resumable (``--resume``); the
  acceptance eval runs the real decoder on held-out prompts (with the drafter's top-1 / top-4
  hit rates per block position, `bench.evals.position_hit_rates`); the best eval is kept in
  ``best/``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F

from ..drafter.checkpoint import load_drafter, save_dflash
from .data import TokenData, generated_token_counts, load_shards, read_heldout
from .features import FeatureCache, feature_bytes, window_targets
from .train import lr_at
from ..drafter.dflash import DFlashConfig, DFlashDrafter, frequent_vocab

__all__ = ["build_parser", "train", "main", "position_weights", "sample_batch", "block_loss",
           "draft_labels", "soft_targets",
           "make_feature_cache", "evaluate_dflash"]

STATE_NAME = "trainer_state.pt"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="specdiff train-dflash", formatter_class=argparse.ArgumentDefaultsHelpFormatter, description=__doc__.split("\n")[0])
    ap.add_argument("--data", action="append", required=True,
                    help="dataset folder (make-data format); repeat for several")
    ap.add_argument("--out", required=True, help="checkpoint folder (DFlash layout)")
    ap.add_argument("--target", default=None, help="target folder (default: SmolLM2-135M)")
    ap.add_argument("--dtype", default="auto", help="target dtype: float32, bfloat16 or auto")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--layers", type=int, default=None,
                    help="drafter layers (default: 3; with --init-from / --resume: the drafter's)")
    ap.add_argument("--target-layer-ids", default=None,
                    help="comma list of 0-based target layers (default: DFlash's spread)")
    ap.add_argument("--block-size", type=int, default=None,
                    help="last token + drafts (default: 8; with --init-from: the drafter's, and a "
                         "different size retrains it at that block)")
    ap.add_argument("--train-steps", "--steps", dest="steps", type=int, default=4000,
                    help="optimizer steps (--steps: the older name; generate's --steps are denoising steps)")
    ap.add_argument("--batch", type=int, default=4, help="sequences per step")
    ap.add_argument("--anchors", type=int, default=48, help="anchors per sequence")
    ap.add_argument("--max-len", type=int, default=384, help="tokens per sequence window")
    ap.add_argument("--lr", type=float, default=6e-4)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--min-lr-ratio", type=float, default=0.1)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--decay-g", type=float, default=4.0,
                    help="position weights exp(-(k-1)/g); 0 = flat")
    ap.add_argument("--partial-prob", type=float, default=0.1,
                    help="fraction of blocks with some positions revealed (for T > 1)")
    ap.add_argument("--draft-vocab", type=int, default=None, metavar="K",
                    help="draft vocabulary: score only the K target tokens most frequent among "
                         "the training data's generated tokens (labels outside it carry no "
                         "loss); 0: the full vocabulary; default: the --init-from / resumed "
                         "drafter's")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast for the drafter")
    ap.add_argument("--norm-init", choices=["ones", "target"], default="ones",
                    help="final norm gain at init: ones, or the target's final norm")
    ap.add_argument("--eval-every", type=int, default=500)
    ap.add_argument("--eval-prompts", type=int, default=16)
    ap.add_argument("--eval-gamma", type=int, default=None, help="default: block_size - 1")
    ap.add_argument("--eval-rounds", type=int, default=8)
    ap.add_argument("--save-every", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--init-from", default=None,
                    help="start from this drafter's weights (a DFlash folder, e.g. the embedded "
                         "one) with a fresh optimizer, instead of a random init")
    ap.add_argument("--log", default=None, help="also append log lines to this file")
    ap.add_argument("--feature-cache", default="auto", metavar="{auto,none,memory,DIR}",
                    help="keep the target's features of each sequence once computed: memory, a "
                         "folder (reused by later runs on the same data and target), none "
                         "(recompute per batch); auto: memory when the whole dataset's features "
                         "fit in --feature-cache-gb, else none")
    ap.add_argument("--kl-weight", type=float, default=0.0,
                    help="weight of the KL term: each position's target is (1 - w) x the "
                         "target's token + w x the target's next-token distribution (its top "
                         "--kl-topk at temperature 1, computed in the feature pass); 0: the "
                         "token alone")
    ap.add_argument("--kl-topk", type=int, default=32,
                    help="target tokens kept per position for the KL term")
    ap.add_argument("--feature-cache-gb", type=float, default=8.0,
                    help="most GB of features --feature-cache auto keeps in memory")
    return ap


# ------------------------------------------------------------------------------ pieces

def position_weights(n: int, g: float, device: Any = None) -> torch.Tensor:
    """exp(-(k - 1) / g) for k = 1..n (flat when g <= 0). Shape: (n,)."""
    k = torch.arange(n, dtype=torch.float32, device=device)
    return torch.ones(n, device=device) if g <= 0 else torch.exp(-k / g)


def sample_batch(data: TokenData, B: int, A: int, bs: int, max_len: int, mask_id: int,
                 partial_prob: float, gen: torch.Generator) -> dict:
    """B random sequences with up to A anchors each.

    An anchor a is a window position with a generated next token (a >= prompt_len - 1); its
    block is [x_a, MASK x (bs - 1)] and its labels x_{a+1..a+bs-1} (-1 past the end).

    Returns dict of seqs (B, L), attn (B, L), anchors (B, A) (-1 pads), block (B, A, bs),
    labels (B, A, bs - 1), idx (B,) (the sequences drawn) and starts (B,) (their windows' first
    tokens).
    """
    idx = torch.randint(0, len(data), (B,), generator=gen).tolist()
    rows, plens, starts = [], [], []
    for i in idx:
        o0, o1 = int(data.offsets[i]), int(data.offsets[i + 1])
        p = int(data.prompt_lens[i])
        start = max(0, min(p - 1 - max_len // 2, o1 - o0 - max_len))  # keep the continuation
        rows.append(data.tokens[o0 + start: o0 + min(o1 - o0, start + max_len)])
        plens.append(p - start)
        starts.append(start)
    L = max(r.numel() for r in rows)
    seqs = torch.zeros(B, L, dtype=torch.int64)
    attn = torch.zeros(B, L, dtype=torch.int64)
    anchors = torch.full((B, A), -1, dtype=torch.int64)
    for b, r in enumerate(rows):
        n = r.numel()
        seqs[b, :n], attn[b, :n] = r, 1
        lo, hi = max(plens[b] - 1, 0), n - 2  # anchors lo..hi have a next token
        if hi >= lo:
            cand = torch.arange(lo, hi + 1)
            pick = cand[torch.randperm(cand.numel(), generator=gen)[:A]].sort().values
            anchors[b, :pick.numel()] = pick
    a = anchors.clamp(min=0)
    lens = attn.sum(1)  # (B,)
    off = torch.arange(bs)
    pos = a[:, :, None] + off  # (B, A, bs)
    inside = (pos < lens[:, None, None]) & (anchors[:, :, None] >= 0)
    tok = torch.gather(seqs, 1, pos.clamp(max=L - 1).view(B, -1)).view(B, A, bs)
    labels = torch.where(inside, tok, torch.full_like(tok, -1))[:, :, 1:]  # (B, A, bs-1)
    block = torch.full((B, A, bs), mask_id, dtype=torch.int64)
    block[:, :, 0] = tok[:, :, 0]
    if partial_prob > 0:  # reveal a random subset of a few blocks' positions (no loss there)
        part = torch.rand(B, A, 1, generator=gen) < partial_prob
        frac = torch.rand(B, A, 1, generator=gen)
        reveal = part & (torch.rand(B, A, bs, generator=gen) < frac) & inside
        reveal[:, :, 0] = False
        block = torch.where(reveal, tok, block)
        labels = labels.masked_fill(reveal[:, :, 1:], -1)
    return {"seqs": seqs, "attn": attn, "anchors": anchors, "block": block, "labels": labels,
            "idx": torch.tensor(idx, dtype=torch.int64),
            "starts": torch.tensor(starts, dtype=torch.int64)}


KEEP_BYTES = 1 << 29  # the head loss keeps its (N, V) gradient rows up to this size


class _HeadCrossEntropy(torch.autograd.Function):
    """sum_i w_i * CE(h_i @ head.T, t_i), in row chunks, with no log_softmax backward over the
    vocabulary; also whether each row's hard label is its argmax (for rows in `need`).

    The target t_i is the one-hot of labels[i] when `labels` is (N,); with (N, J) `labels` and
    `probs` it is sum_j probs[i, j] * onehot(labels[i, j]) (rows of `probs` sum to 1; column 0
    holds the hard label, the one `hit` checks; ids may repeat, entries of weight 0 are unused).

    The forward keeps softmax - t of every row in the head's dtype when those N x V values
    take at most `keep_bytes` (then the backward is one matmul, rows scaled by w); beyond, it
    keeps nothing and the backward recomputes the logits chunk by chunk (large GPU batches).
    Both give the gradient up to the rounding of that dtype.

    Shape: h (N, H), head (V, H) frozen, labels (N,) or (N, J), w (N,), need (N,) bool, probs
    None or (N, J) -> loss (), hit (N,) bool (argmax == hard label; False outside `need`).
    """

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, head: torch.Tensor, labels: torch.Tensor,
                w: torch.Tensor, need: torch.Tensor, chunk: int, keep_bytes: int,
                probs: Optional[torch.Tensor] = None) -> tuple:
        hc = h.to(head.dtype)
        N, V = h.shape[0], head.shape[0]
        if labels.dim() == 1:
            labels = labels[:, None]
            probs = torch.ones(N, 1, dtype=torch.float32, device=h.device)
        elif probs is None or probs.shape != labels.shape:
            raise ValueError("labels of shape (N, J) need probs of the same shape")
        probs = probs.float()
        keep = N * V * head.element_size() <= keep_bytes
        lse = torch.empty(N, dtype=torch.float32, device=h.device)
        tgt = torch.empty_like(lse)
        hit = torch.zeros(N, dtype=torch.bool, device=h.device)
        grad = torch.empty(N, V, dtype=head.dtype, device=h.device) if keep else None
        for i in range(0, N, chunk):
            j = slice(i, i + chunk)
            lg = F.linear(hc[j], head).float()  # (c, V)
            m = lg.amax(-1)
            t = lg.gather(1, labels[j, :1])[:, 0]
            cand = (t >= m) & need[j]  # the label holds the max: is it the first max (argmax)?
            if bool(cand.any()):
                hit[j][cand] = lg[cand].argmax(-1) == labels[j, 0][cand]
            tgt[j] = (lg.gather(1, labels[j]) * probs[j]).sum(-1)
            se = lg.sub_(m[:, None]).exp_().sum(-1)  # lg is now exp(logits - max)
            lse[j] = m + se.log()
            if grad is not None:
                lg /= se[:, None]
                lg.scatter_add_(1, labels[j], -probs[j])
                grad[j] = lg
        ctx.save_for_backward(hc, head, labels, w, lse, grad, probs)
        ctx.chunk, ctx.h_dtype = chunk, h.dtype
        return ((lse - tgt) * w).sum(), hit

    @staticmethod
    def backward(ctx: Any, g_loss: torch.Tensor, _g_hit: Any) -> tuple:
        hc, head, labels, w, lse, grad, probs = ctx.saved_tensors
        scale = (w * g_loss).float()
        none = (None,) * 7
        if grad is not None:  # (softmax - t) @ head, each row scaled by w_i * g
            return ((grad @ head).float() * scale[:, None]).to(ctx.h_dtype), *none
        gh = torch.empty(hc.shape, dtype=ctx.h_dtype, device=hc.device)
        for i in range(0, hc.shape[0], ctx.chunk):
            j = slice(i, i + ctx.chunk)
            p = F.linear(hc[j], head).float().sub_(lse[j, None]).exp_()  # softmax (c, V)
            p.scatter_add_(1, labels[j], -probs[j])
            p *= scale[j, None]
            gh[j] = (p.to(head.dtype) @ head).to(ctx.h_dtype)
        return gh, *none


def draft_labels(labels: torch.Tensor, vocab_map: Optional[torch.Tensor], V: int) -> torch.Tensor:
    """Target-id labels as drafter columns: unchanged without a draft vocabulary; with one, the
    column of each id in `vocab_map` and -1 (no loss) for ids outside it and for -1 pads.
    Shape: as labels."""
    if vocab_map is None:
        return labels
    col = torch.full((V,), -1, dtype=torch.int64, device=labels.device)
    col[vocab_map.to(labels.device)] = torch.arange(vocab_map.numel(), device=labels.device)
    return torch.where(labels >= 0, col[labels.clamp(min=0)], labels)


def soft_targets(labels: torch.Tensor, anchors: torch.Tensor, soft_ids: torch.Tensor,
                 soft_logp: torch.Tensor, vocab_map: Optional[torch.Tensor], V: int,
                 kl_weight: float) -> tuple:
    """The training targets of the KL term: at block position k of anchor a the mixture
    (1 - kl_weight) * onehot(label) + kl_weight * p, p the target's next-token distribution at
    window position a + k - 1 (the one that predicts the label) over its stored top-k, kept to
    the draft vocabulary and renormalised there. Where none of the top-k lies in the draft
    vocabulary the target is the hard label alone.

    Shape: labels (B, A, n) drafter columns (-1: no loss), anchors (B, A), soft_ids / soft_logp
    (B, L, k) target ids (-1 pads) and log-probabilities -> cols (B, A, n, 1 + k) int64 (0 where
    unused), probs (B, A, n, 1 + k) float32; column 0 is the hard label.
    """
    B, A, n = labels.shape
    L, k = soft_ids.shape[1], soft_ids.shape[2]
    pos = (anchors.clamp(min=0)[:, :, None] + torch.arange(n, device=labels.device)).clamp(max=L - 1)
    flat = pos.view(B, A * n)
    sid = torch.gather(soft_ids, 1, flat[:, :, None].expand(B, A * n, k)).view(B, A, n, k)
    slp = torch.gather(soft_logp, 1, flat[:, :, None].expand(B, A * n, k)).view(B, A, n, k)
    scol = draft_labels(sid, vocab_map, V)
    p = torch.where(scol >= 0, slp.exp(), torch.zeros_like(slp))
    tot = p.sum(-1, keepdim=True)
    has = tot > 0
    lam = torch.where(has, torch.full_like(tot, float(kl_weight)), torch.zeros_like(tot))
    p = p / tot.clamp(min=1e-30) * lam
    cols = torch.cat([labels.clamp(min=0)[..., None], scol.clamp(min=0)], -1)
    probs = torch.cat([1.0 - lam, p], -1)
    return cols, probs


def block_loss(drafter: DFlashDrafter, feats: torch.Tensor, batch: dict,
               pos_w: torch.Tensor, chunk: int = 128, keep_bytes: int = KEEP_BYTES,
               soft: Optional[tuple] = None, kl_weight: float = 0.0) -> tuple:
    """Weighted cross-entropy of the drafts against the labels, over the drafter's vocabulary
    (labels outside a draft vocabulary carry no loss); (loss, first-position acc among the
    first positions that carry a loss).

    With `soft` = (ids, logp), the windows' stored top-k of the target (`window_targets`), and
    kl_weight > 0, the target at each position is `soft_targets`' mixture: the cross-entropy
    against it is kl_weight * KL(p || q) + (1 - kl_weight) * CE(label) up to a constant."""
    h = drafter.forward_blocks(feats, batch["anchors"], batch["block"])[:, :, 1:]  # (B,A,bs-1,H)
    V = drafter.config.vocab_size
    labels = draft_labels(batch["labels"], drafter.vocab_map, V)
    keep = labels >= 0
    w = pos_w.expand_as(labels)[keep]
    w = w / w.sum().clamp(min=1e-6)
    first = keep.clone()
    first[:, :, 1:] = False
    need = first[keep]
    cols, probs = labels[keep], None  # hard labels
    if soft is not None and kl_weight > 0:
        cols, probs = soft_targets(labels, batch["anchors"], soft[0], soft[1], drafter.vocab_map,
                                   V, kl_weight)
        cols, probs = cols[keep], probs[keep]
    loss, hit = _HeadCrossEntropy.apply(h[keep], drafter.head_weight(), cols, w, need, chunk,
                                        keep_bytes, probs)
    hit = hit[need]
    return loss, (hit.float().mean().item() if hit.numel() else 0.0)


def _save(out: Path, drafter: DFlashDrafter, opt: Any, step: int, gen: torch.Generator,
          args: dict, history: list) -> None:
    tmp = out / ".ckpt.tmp"
    save_dflash(drafter, tmp, extra={"step": step, "args": args})
    torch.save({"step": step, "optimizer": opt.state_dict(), "gen": gen.get_state(),
                "torch_rng": torch.get_rng_state(), "history": history}, tmp / STATE_NAME)
    for name in os.listdir(tmp):
        os.replace(tmp / name, out / name)
    tmp.rmdir()


def _load_state(path: Path) -> dict:
    """The trainer state, loaded without unpickling code (weights_only), and checked."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not {"step", "optimizer", "gen"} <= set(state):
        raise ValueError(f"{path} is not a train-dflash state (needs step, optimizer, gen)")
    return state


def make_feature_cache(mode: str, budget_gb: float, data: TokenData, target: Any,
                       layers: Sequence[int], say: Any = print,
                       soft_topk: int = 0) -> Optional[FeatureCache]:
    """The `FeatureCache` ``--feature-cache`` asks for: None for ``none`` (and for ``auto`` when
    the dataset's features exceed `budget_gb`), in memory for ``memory`` / ``auto``, else on disk
    in the folder `mode` names. With `soft_topk` it also keeps that many soft labels per token
    (8 bytes each)."""
    width, dtype = len(layers) * int(target.hidden_size), target.dtype
    need = feature_bytes(data, width, dtype) + int(data.offsets[-1]) * 8 * int(soft_topk)
    gb = need / 1e9
    if mode == "auto":
        mode = "memory" if gb <= budget_gb else "none"
        why = f"auto: {gb:.2f} GB {'<=' if mode == 'memory' else '>'} {budget_gb:g} GB"
    else:
        why = "asked"
    if mode == "none":
        say(f"feature cache: none ({why}); the target runs on every batch")
        return None
    cache = FeatureCache(data, layers, width, dtype, None if mode == "memory" else mode,
                         target_name=target.name, soft_topk=soft_topk)
    where = "memory" if cache.path is None else str(cache.path)
    say(f"feature cache: {where} ({why}), {gb:.2f} GB of {str(dtype).replace('torch.', '')} "
        f"states for {len(data)} sequences, {int(cache.filled.sum())} stored already; each "
        f"sequence is computed on first use")
    return cache


def evaluate_dflash(drafter: DFlashDrafter, target: Any, prompts: Sequence[str], gamma: int,
                    rounds: int, steps: int = 1, commit: str = "left_to_right") -> dict:
    """The trainer's eval: greedy decoding of each prompt with `decoding.SpecDiffDecoder`
    (`gamma`, `steps`, `commit`) for ``rounds * (gamma + 1)`` new tokens. Returns
    accepted_per_round, first_accept_rate, tokens_per_round, rounds, accepted_histogram and the
    drafter's hit rates by block position (top1_by_position, top4_by_position, counted_by_position:
    `bench.evals.position_hit_rates`), all from the same decoding runs."""
    from ..bench.evals import position_hit_rates

    was_training = drafter.training
    drafter.eval()
    try:
        r = position_hit_rates(target, drafter, prompts, rounds * (gamma + 1), gamma=gamma,
                               steps=steps, commit=commit)
    finally:
        drafter.train(was_training)
    return {"accepted_per_round": r.get("mean_accepted", 0.0),
            "first_accept_rate": r.get("first_accept_rate", 0.0),
            "tokens_per_round": r.get("tokens_per_round", 0.0),
            "rounds": r.get("rounds", 0),
            "accepted_histogram": r.get("accepted_histogram", []),
            **{k: r[k] for k in ("top1_by_position", "top4_by_position", "counted_by_position")}}


# ------------------------------------------------------------------------------ training

def train(args: argparse.Namespace, target: Any = None, log: Any = print) -> dict:
    """Run (or resume) training as `args` say. Returns {'step', 'loss', 'history', 'drafter'}."""
    from ..pretrained import parse_dtype
    from ..prompts import humaneval_prompts
    from ..target import load_target

    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    logf = open(args.log, "a") if args.log else None

    def say(msg: str) -> None:
        log(msg)
        if logf is not None:
            logf.write(msg + "\n")
            logf.flush()

    if target is None:
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        target = load_target(args.target, dtype=parse_dtype(args.dtype, device), device=device)
    dev = target.device
    datas, heldout = [], []
    for folder in args.data:
        d, manifest = load_shards(folder, [0.0])
        if manifest["settings"]["target"] != target.name:
            raise ValueError(f"data {folder} was generated by {manifest['settings']['target']!r}, "
                             f"not {target.name!r}")
        datas.append(d)
        heldout += [p for p in read_heldout(folder) if p not in heldout]
    data = datas[0] if len(datas) == 1 else _concat(datas)
    # the eval takes held-out prompts from the ends of both lists; `specdiff bench` and
    # `eval-drafter` start at the fronts, so checkpoint selection never sees their prompts
    ne = args.eval_prompts
    he = humaneval_prompts()
    he = he[len(he) - ne // 2:] if ne // 2 else []
    sg = heldout[len(heldout) - (ne - ne // 2):]
    prompts = [x for i in range(max(len(he), len(sg))) for x in (sg[i:i + 1] + he[i:i + 1])]
    embed, head = target.input_embeddings.weight, target.lm_head_weight
    resume = args.resume and (out / STATE_NAME).is_file()
    if resume or args.init_from:
        drafter = load_drafter(out if resume else args.init_from, embed, head,
                               target_name=target.name)
        if not isinstance(drafter, DFlashDrafter):
            raise ValueError(f"--init-from {args.init_from} is not a DFlash drafter")
        _adopt_shape(drafter.config, args, str(out) if resume else str(args.init_from), resume)
    else:
        ids = ([int(x) for x in args.target_layer_ids.split(",")] if args.target_layer_ids
               else [])
        cfg = DFlashConfig.from_hf_config(target.model.config, target.name,
                                          n_layers=3 if args.layers is None else args.layers,
                                          target_layer_ids=ids,
                                          block_size=args.block_size or 8)
        torch.manual_seed(args.seed)
        drafter = DFlashDrafter(cfg, embed, head)
        norm = getattr(getattr(target.model, "model", None), "norm", None)
        if args.norm_init == "target" and norm is not None:  # the head's expected scale
            with torch.no_grad():
                drafter.norm.weight.copy_(norm.weight.float())
    if args.draft_vocab is not None and not (resume and args.draft_vocab == (
            drafter.config.draft_vocab_size or 0)):
        if resume:
            raise ValueError(f"--draft-vocab {args.draft_vocab}: the run in {out} trains a draft "
                             f"vocabulary of {drafter.config.draft_vocab_size or 'all'} tokens; "
                             f"resume without --draft-vocab or start a new --out")
        V = drafter.config.vocab_size
        if not 0 <= args.draft_vocab <= V:
            raise ValueError(f"--draft-vocab must lie in [0, {V}], got {args.draft_vocab}")
        if args.draft_vocab in (0, V):
            drafter.set_draft_vocab(None)
        else:
            counts = generated_token_counts(data, V)
            vm = frequent_vocab(counts, args.draft_vocab)
            cover = float(counts[vm].sum()) / max(1, int(counts.sum()))
            drafter.set_draft_vocab(vm)
            say(f"draft vocabulary: the {args.draft_vocab} most frequent generated tokens, "
                f"{100 * cover:.1f}% of the training labels")
    drafter.to(dev).float().train()
    cfg = drafter.config
    params = list(drafter.parameters())
    decay = [p for p in params if p.dim() >= 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(args.seed)
    step, history = 0, []
    if resume:
        state = _load_state(out / STATE_NAME)
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["gen"])
        if "torch_rng" in state:
            torch.set_rng_state(state["torch_rng"])
        step, history = int(state["step"]), list(state.get("history", []))
        say(f"resumed from {out} at step {step}")
    best = max((h["accepted_per_round"] for h in history if "accepted_per_round" in h),
               default=-1.0)
    pos_w = position_weights(cfg.block_size - 1, args.decay_g, dev)
    egamma = args.eval_gamma or cfg.block_size - 1
    adict = dict(vars(args))
    if not 0.0 <= args.kl_weight <= 1.0:
        raise ValueError(f"--kl-weight must lie in [0, 1], got {args.kl_weight}")
    if args.kl_weight > 0 and not 1 <= args.kl_topk <= cfg.vocab_size:
        raise ValueError(f"--kl-topk must lie in [1, {cfg.vocab_size}], got {args.kl_topk}")
    soft_k = args.kl_topk if args.kl_weight > 0 else 0
    cache = make_feature_cache(args.feature_cache, args.feature_cache_gb, data, target,
                               cfg.feature_layers, say, soft_topk=soft_k)
    if soft_k:
        say(f"KL term: weight {args.kl_weight:g} on the target's top-{soft_k} next-token "
            f"distribution (temperature 1)")
    say(f"dflash drafter: {cfg.n_layers} layers, features of target layers "
        f"{cfg.target_layer_ids}, block {cfg.block_size}, "
        f"{sum(p.numel() for p in params) / 1e6:.1f}M parameters; data {len(data)} sequences, "
        f"{data.tokens.numel()} tokens; eval on {len(prompts)} held-out prompts")
    t0, acc_ema, loss_ema = time.perf_counter(), None, None
    wall0 = float(history[-1].get("wall", 0.0)) if history else 0.0
    seen = int(history[-1].get("labels", 0)) if history else 0  # supervised labels so far

    while step < args.steps:
        batch = sample_batch(data, args.batch, args.anchors, cfg.block_size, args.max_len,
                             cfg.mask_token_id, args.partial_prob, gen)
        feats, sid, slp = window_targets(target, data, batch["idx"].tolist(),
                                         batch["starts"].tolist(), batch["seqs"].shape[1],
                                         cfg.feature_layers, cache, soft_k)
        lr = lr_at(step, args.lr, args.warmup, args.steps, args.min_lr_ratio)
        for g in opt.param_groups:
            g["lr"] = lr
        batch = {k: v.to(dev) for k, v in batch.items()}
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=args.bf16):
            loss, acc = block_loss(drafter, feats.float(), batch, pos_w,
                                   soft=(sid, slp) if soft_k else None,
                                   kl_weight=args.kl_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, args.clip)
        opt.step()
        step += 1
        seen += int((batch["labels"] >= 0).sum())
        lv = float(loss.detach())
        loss_ema = lv if loss_ema is None else 0.98 * loss_ema + 0.02 * lv
        acc_ema = acc if acc_ema is None else 0.98 * acc_ema + 0.02 * acc
        wall = wall0 + time.perf_counter() - t0
        if step % 20 == 0 or step == 1:
            fc = (f" features cached {int(cache.filled.sum())}/{len(data)}"
                  if cache is not None else "")
            say(f"step {step} loss {lv:.3f} (ema {loss_ema:.3f}) first-pos acc ema "
                f"{acc_ema:.3f} lr {lr:.2e} labels {seen} wall {wall:.0f}s{fc}")
        rec: dict = {}
        if args.eval_every and (step % args.eval_every == 0 or step == args.steps):
            # the fp32 drafter reads the target's features in whatever dtype they come
            ev = evaluate_dflash(drafter, target, prompts, egamma, args.eval_rounds)
            rec = {"step": step, "wall": wall, "labels": seen, "loss": lv,
                   "loss_ema": loss_ema, "acc_ema": acc_ema, **ev}
            history.append(rec)
            say("eval " + json.dumps(rec))
        if rec or step % args.save_every == 0 or step == args.steps:
            if not rec:
                history.append({"step": step, "wall": wall, "labels": seen, "loss": lv,
                                "loss_ema": loss_ema, "acc_ema": acc_ema})
            if cache is not None:
                cache.flush()
            _save(out, drafter, opt, step, gen, adict, history)
            if rec and rec["accepted_per_round"] > best:
                best = rec["accepted_per_round"]
                save_dflash(drafter, out / "best", extra={"step": step, "eval": rec},
                            dtype=torch.bfloat16)
                say(f"new best {best:.3f} at step {step} -> {out / 'best'}")
    if logf is not None:
        logf.close()
    return {"step": step, "loss": loss_ema, "history": history, "drafter": drafter}


def _concat(datas: list) -> TokenData:
    toks = torch.cat([d.tokens for d in datas])
    lens = torch.cat([d.lengths for d in datas])
    offsets = torch.zeros(lens.numel() + 1, dtype=torch.int64)
    offsets[1:] = lens.cumsum(0)
    return TokenData(toks, offsets, torch.cat([d.prompt_lens for d in datas]))


def _adopt_shape(cfg: DFlashConfig, args: argparse.Namespace, source: str,
                 resume: bool) -> None:
    """Check the shape flags against a loaded drafter's config (the weights fix layers and
    feature layers; the block size is a training choice, so --init-from may change it)."""
    if args.layers is not None and args.layers != cfg.n_layers:
        raise ValueError(f"--layers {args.layers}: the drafter in {source} has {cfg.n_layers} "
                         f"layers")
    if args.target_layer_ids:
        ids = [int(x) for x in args.target_layer_ids.split(",")]
        if ids != list(cfg.target_layer_ids):
            raise ValueError(f"--target-layer-ids {args.target_layer_ids}: the drafter in "
                             f"{source} reads target layers {list(cfg.target_layer_ids)}")
    if args.block_size is not None and args.block_size != cfg.block_size:
        if resume:
            raise ValueError(f"--block-size {args.block_size}: the run in {source} trains "
                             f"block {cfg.block_size}; resume without --block-size")
        if args.block_size < 2:
            raise ValueError(f"--block-size must be >= 2, got {args.block_size}")
        cfg.block_size = args.block_size


def main(argv: Optional[Sequence[str]] = None) -> int:
    train(build_parser().parse_args(argv))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
