"""Training objective of the masked-diffusion drafter (docs/design.md section 4).

Many draft blocks per sequence in one forward pass: each row is a clean sequence (the context,
encoded causally exactly as `DiffusionDrafter.append_context` does) followed by K noised blocks
of G positions. Block k sits at the positions following its anchor a_k (a_k + 1 .. a_k + G); it
attends to the clean context at positions <= a_k and to itself (bidirectionally), never to the
other blocks nor to the clean tokens it is asked to predict. This is the attention pattern of
`DiffusionDrafter.block_logits` over a cache holding positions 0..a_k, K times over, at the
cost of one forward of L + K G positions.

Loss: the MDLM masked cross-entropy. Every block draws its own mask rate t ~ U(eps, 1) (or
t = 1, a fully masked block, with probability ``full_mask_prob``: the first denoising step at
inference sees exactly that); each position is masked independently with probability t, and a
masked position contributes w_j CE_j / t, where w_j weights early block positions more
(``pos_decay ** j``, normalised to mean 1: a draft is only worth its accepted prefix). Optional
soft labels: the target's top-k distribution at the position replaces part of the one-hot label.

Shapes: B rows, L context length, K blocks per row, G block size, H hidden, Vd drafter vocab.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..drafter.config import ContextMode
from ..drafter.model import DiffusionDrafter, _rope_cos_sin

__all__ = ["IGNORE", "MultiBlockBatch", "make_blocks", "multi_block_hidden", "mdlm_loss",
           "position_weights"]

IGNORE = -100  # label of block positions past the end of a sequence


@dataclass
class MultiBlockBatch:
    """Inputs of one training step.

    Attributes
    ----------
    context : int64 (B, L)
        Clean sequences (right padded; padding is never visible to a block).
    anchors : int64 (B, K)
        Block k covers positions anchors[:, k] + 1 .. anchors[:, k] + G.
    noised : int64 (B, K, G)
        Block inputs: the clean token, or mask_id where masked.
    labels : int64 (B, K, G)
        Clean tokens (target ids), IGNORE past the end of the sequence.
    masked : bool (B, K, G)
        Positions masked (and so supervised).
    t : float32 (B, K)
        Mask rate of each block.
    soft_ids, soft_logits : (B, K, G, k) int64 / float32, optional
        The target's top-k ids and logits at each block position.
    """

    context: Tensor
    anchors: Tensor
    noised: Tensor
    labels: Tensor
    masked: Tensor
    t: Tensor
    soft_ids: Optional[Tensor] = None
    soft_logits: Optional[Tensor] = None
    features: Optional[Tensor] = None  # (B, L, H_f) context features (target_features mode)


def position_weights(G: int, decay: float, device=None) -> Tensor:
    """decay ** j for j < G, normalised to mean 1. Shape: (G,)."""
    w = torch.tensor([decay ** j for j in range(G)], dtype=torch.float32, device=device)
    return w * (G / w.sum())


def make_blocks(seqs: Tensor, lengths: Tensor, lo: Tensor, G: int, K: int, mask_id: int,
                gen: Optional[torch.Generator] = None, eps: float = 1e-3,
                full_mask_prob: float = 0.0) -> MultiBlockBatch:
    """Draw K random anchors per row and noise their blocks.

    Parameters
    ----------
    seqs : int64 (B, L)
        Clean, right-padded sequences.
    lengths : int64 (B,)
        Valid length of each row.
    lo : int64 (B,)
        Smallest allowed anchor (the last prompt position: blocks cover continuations only).
        Anchors are drawn uniformly from lo .. lengths - 2 (the block may run past the end:
        those positions get IGNORE labels).
    """
    B, L = seqs.shape
    dev = seqs.device
    hi = (lengths - 2).clamp(min=0)
    lo = torch.minimum(lo.clamp(min=0), hi)
    span = (hi - lo + 1).clamp(min=1)  # (B,)
    u = torch.rand(B, K, generator=gen, device=dev)
    anchors = lo[:, None] + (u * span[:, None]).long().clamp(max=span[:, None] - 1)  # (B, K)
    pos = anchors[..., None] + 1 + torch.arange(G, device=dev)  # (B, K, G)
    inside = pos < lengths[:, None, None]
    labels = torch.gather(seqs, 1, pos.clamp(max=L - 1).view(B, -1)).view(B, K, G)
    labels = labels.masked_fill(~inside, IGNORE)
    t = eps + (1 - eps) * torch.rand(B, K, generator=gen, device=dev)  # (B, K)
    if full_mask_prob > 0:
        full = torch.rand(B, K, generator=gen, device=dev) < full_mask_prob
        t = torch.where(full, torch.ones_like(t), t)
    masked = torch.rand(B, K, G, generator=gen, device=dev) < t[..., None]
    masked |= ~inside  # never show a token past the end; not supervised (IGNORE)
    noised = torch.where(masked, torch.full_like(labels, mask_id), labels)
    return MultiBlockBatch(seqs, anchors, noised, labels, masked & inside, t)


def _block_layout(context: Tensor, anchors: Tensor, G: int) -> tuple:
    """Positions and block visibility shared by both context modes.

    Returns ctx_pos (B, L), blk_pos (B, KG), bc (B, KG, L): block k sees context <= a_k, and
    bb (B, KG, KG): a block sees itself only.
    """
    B, L = context.shape
    K = anchors.shape[1]
    dev = context.device
    ctx_pos = torch.arange(L, device=dev).expand(B, L)
    blk_pos = (anchors[..., None] + 1 + torch.arange(G, device=dev)).view(B, K * G)
    ar = torch.arange(L, device=dev)
    bc = (ar[None, None, :] <= anchors[..., None]).repeat_interleave(G, dim=1)
    kid = torch.arange(K, device=dev).repeat_interleave(G)
    bb = (kid[:, None] == kid[None, :]).expand(B, K * G, K * G)
    return ctx_pos, blk_pos, bc, bb


def _multi_block_hidden_features(drafter: DiffusionDrafter, context: Tensor, features: Tensor,
                                 anchors: Tensor, noised: Tensor) -> Tensor:
    """target_features mode: the context is projected straight into every layer's keys and
    values (as `DrafterCache.append_context` does); only the blocks run through the layers."""
    cfg = drafter.config
    B, L = context.shape
    _, K, G = noised.shape
    dt = next(drafter.parameters()).dtype
    ctx_pos, blk_pos, bc, bb = _block_layout(context, anchors, G)
    cc, sc = _rope_cos_sin(ctx_pos, drafter.inv_freq, dt)  # (B, L, 1, hs)
    cb, sb = _rope_cos_sin(blk_pos, drafter.inv_freq, dt)  # (B, KG, 1, hs)
    mask = torch.cat([bc, bb], 2)[:, None]  # (B, 1, KG, L + KG)
    f = drafter.feature_norm(features.to(dt))  # (B, L, H_f)
    if cfg.features_with_tokens:
        f = torch.cat([f, drafter.token_norm(drafter._embed(context, dt))], dim=-1)
    x = drafter._embed(noised.view(B, K * G), dt)  # (B, KG, H)
    if cfg.block_conditioning:  # block k reads the conditioning of its anchor position
        c = drafter.block_cond_proj(f)  # (B, L, H)
        ca = torch.gather(c, 1, anchors[..., None].expand(B, K, c.shape[-1]))  # (B, K, H)
        x = x + ca.repeat_interleave(G, dim=1)
    for i, layer in enumerate(drafter.layers):
        kc, vc = layer.self_attn.kv(layer.input_layernorm(drafter.feature_proj[i](f)), cc, sc)
        h = layer.input_layernorm(x)  # (B, KG, H)
        kb, vb = layer.self_attn.kv(h, cb, sb)  # (B, KG, nkv, hs)
        k = torch.cat([kc, kb], 1).transpose(1, 2)  # (B, nkv, L + KG, hs)
        v = torch.cat([vc, vb], 1).transpose(1, 2)
        x = layer.finish(x, h, cb, sb, k, v, mask)
    return drafter.norm(x).view(B, K, G, -1)


def multi_block_hidden(drafter: DiffusionDrafter, context: Tensor, anchors: Tensor,
                       noised: Tensor, features: Optional[Tensor] = None) -> Tensor:
    """Final hidden states (after the drafter's norm) at the K G block positions.

    Shape: context (B, L), anchors (B, K), noised (B, K, G), features (B, L, H_f) in
    target_features mode (position t's features: the target's hidden states at t - 1)
    -> (B, K, G, H).
    """
    cfg = drafter.config
    if cfg.context_mode is ContextMode.TARGET_FEATURES:
        if features is None:
            raise ValueError("target_features mode needs the context features")
        return _multi_block_hidden_features(drafter, context, features, anchors, noised)
    if features is not None:
        raise ValueError("features given, but the drafter's context mode is tokens")
    B, L = context.shape
    _, K, G = noised.shape
    dev = context.device
    dt = next(drafter.parameters()).dtype
    ctx_pos, blk_pos, bc, bb = _block_layout(context, anchors, G)
    pos = torch.cat([ctx_pos, blk_pos], dim=1)  # (B, N), N = L + K G
    cos, sin = _rope_cos_sin(pos, drafter.inv_freq, dt)  # (B, N, 1, hs)
    # visibility (B, N, N): context causal; block k sees context <= a_k and its own block
    ar = torch.arange(L, device=dev)
    cc = (ar[None, :] <= ar[:, None]).expand(B, L, L)
    cb = torch.zeros(B, L, K * G, dtype=torch.bool, device=dev)
    mask = torch.cat([torch.cat([cc, cb], 2), torch.cat([bc, bb], 2)], 1)[:, None]  # (B,1,N,N)
    x = torch.cat([drafter._embed(context, dt), drafter._embed(noised.view(B, K * G), dt)], 1)
    last = len(drafter.layers) - 1
    for i, layer in enumerate(drafter.layers):
        h = layer.input_layernorm(x)  # (B, N, H)
        k, v = layer.self_attn.kv(h, cos, sin)  # (B, N, nkv, hs)
        k, v = k.transpose(1, 2), v.transpose(1, 2)
        if i == last:  # only the block outputs are read
            x = layer.finish(x[:, L:], h[:, L:], cos[:, L:], sin[:, L:], k, v, mask[:, :, L:])
        else:
            x = layer.finish(x, h, cos, sin, k, v, mask)
    return drafter.norm(x).view(B, K, G, -1)


def mdlm_loss(drafter: DiffusionDrafter, batch: MultiBlockBatch, pos_weight: Optional[Tensor] = None,
              soft_weight: float = 0.0, label_map: Optional[Tensor] = None) -> tuple[Tensor, dict]:
    """The weighted MDLM loss of a batch, and statistics.

    Parameters
    ----------
    pos_weight : float (G,), optional
        Weight of each block position (see `position_weights`).
    soft_weight : float
        alpha in (1 - alpha) CE(one-hot) + alpha CE(target top-k distribution); needs
        batch.soft_ids / soft_logits.
    label_map : int64 (V,), optional
        Target id -> drafter column (-1 outside a reduced vocabulary: those labels are dropped
        from the hard loss, and their probability mass from the soft one). None: identity.

    Returns
    -------
    loss : scalar tensor
        sum over masked positions of w_j CE / t, divided by the number of in-sequence block
        positions (the MDLM per-token bound).
    stats : dict
        'ce' (unweighted mean CE over masked positions), 'acc' (argmax accuracy over masked
        positions), 'acc1' (accuracy at block position 0 when masked), 'n' (masked count).
    """
    B, K, G = batch.labels.shape
    sel = batch.masked  # (B, K, G)
    hid = multi_block_hidden(drafter, batch.context, batch.anchors, batch.noised,
                             batch.features)  # (B, K, G, H)
    head = drafter.head_weight()
    h = hid[sel]  # (M, H)
    logits = F.linear(h.to(head.dtype), head).float()  # (M, Vd)
    labels = batch.labels[sel]  # (M,)
    if label_map is not None:
        labels = label_map[labels]
    logp = torch.log_softmax(logits, dim=-1)
    ok = labels >= 0
    ce = -logp.gather(1, labels.clamp(min=0)[:, None])[:, 0] * ok  # (M,)
    per = ce
    if soft_weight > 0:
        if batch.soft_ids is None or batch.soft_logits is None:
            raise ValueError("soft_weight > 0 needs soft labels in the batch")
        sid = batch.soft_ids[sel]  # (M, k)
        if label_map is not None:
            sid = label_map[sid]
        p = torch.softmax(batch.soft_logits[sel].float(), dim=-1) * (sid >= 0)  # (M, k)
        p = p / p.sum(-1, keepdim=True).clamp(min=1e-9)
        soft = -(p * logp.gather(1, sid.clamp(min=0))).sum(-1)  # (M,)
        per = (1 - soft_weight) * ce + soft_weight * soft
    w = 1.0 / batch.t[..., None].expand(B, K, G)[sel]  # (M,)
    if pos_weight is not None:
        w = w * pos_weight.to(w.device).expand(B, K, G)[sel]
    denom = (batch.labels != IGNORE).sum().clamp(min=1)
    loss = (per * w).sum() / denom
    with torch.no_grad():
        hit = (logits.argmax(-1) == labels) & ok
        first = sel[..., 0]
        first_in_sel = torch.zeros_like(sel)
        first_in_sel[..., 0] = first
        hit1 = hit[first_in_sel[sel]]
        stats = {
            "ce": float(ce.sum() / ok.sum().clamp(min=1)),
            "acc": float(hit.float().sum() / ok.sum().clamp(min=1)),
            "acc1": float(hit1.float().mean()) if hit1.numel() else float("nan"),
            "n": int(sel.sum()),
        }
    return loss, stats
