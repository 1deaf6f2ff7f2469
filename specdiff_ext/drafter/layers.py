"""Layers shared by the drafters' transformer blocks (docs/design.md section 4): RMSNorm, RoPE,
grouped-query attention projections, SwiGLU, the weight init, and the frozen target embedding
and head a drafter reads (with an optional draft vocabulary of the head's rows).

Shapes: B batch rows, n positions, S keys, H hidden size, nh query heads, nkv key/value heads,
hs head size, V target vocabulary, Vd drafter vocabulary (K with a draft vocabulary).
"""

from __future__ import annotations

import math
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["RMSNorm", "Attention", "SwiGLU", "init_weights", "frozen_target_weights",
           "check_vocab_map", "head_rows"]

# scaled_dot_product_attention(enable_gqa=...) exists from torch 2.5 on; older torch gets the
# key/value heads repeated instead.
_SDPA_GQA = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5)


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned gain, computed in float32.

    Shape:
        x: (..., H) -> (..., H), same dtype.
    """

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).to(x.dtype)


def _rope_cos_sin(pos: Tensor, inv_freq: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos and sin of the rotary angles (Hugging Face Llama layout: halves, not interleaved).

    Shape:
        pos: (B, n) int64; inv_freq: (hs/2,) -> cos, sin: (B, n, 1, hs).
    """
    ang = pos.to(torch.float32)[..., None] * inv_freq.float()  # (B, n, hs/2)
    ang = torch.cat([ang, ang], dim=-1)[:, :, None, :]  # (B, n, 1, hs)
    return ang.cos().to(dtype), ang.sin().to(dtype)


def _apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x by the angles. Shape: x (B, n, heads, hs), cos/sin (B, n, 1, hs)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def init_weights(module: nn.Module, std: float, n_layers: int) -> None:
    """Normal(0, std) linear weights (output projections o_proj / down_proj scaled by
    1/sqrt(2 n_layers)), zero biases, unit RMSNorm gains."""
    for name, mod in module.named_modules():
        if isinstance(mod, nn.Linear):
            s = std / math.sqrt(2 * n_layers) if name.endswith(("o_proj", "down_proj")) else std
            nn.init.normal_(mod.weight, 0.0, s)
            if mod.bias is not None:
                nn.init.zeros_(mod.bias)
        elif isinstance(mod, RMSNorm):
            nn.init.ones_(mod.weight)


def frozen_target_weights(cfg: Any, target_embed: Union[nn.Embedding, Tensor],
                          target_head: Tensor) -> tuple[Tensor, Tensor]:
    """The target's embedding and head, checked against cfg's (V, H) and detached: a drafter
    keeps them as plain attributes (frozen, never saved). Shapes: (V, H) each."""
    emb = target_embed.weight if isinstance(target_embed, nn.Embedding) else target_embed
    want = (cfg.vocab_size, cfg.hidden_size)
    for name, t in (("target_embed", emb), ("target_head", target_head)):
        if tuple(t.shape) != want:
            raise ValueError(f"{name} must have shape (V, H) = {want}, got {tuple(t.shape)}")
    return emb.detach(), target_head.detach()


def check_vocab_map(vocab_map: Any, V: int, K: Optional[int] = None) -> Tensor:
    """`vocab_map` as an int64 CPU tensor, checked: shape (K,) (any K >= 1 when K is None),
    distinct ids in [0, V). ValueError naming vocab_map otherwise."""
    vm = torch.as_tensor(vocab_map)
    if vm.dtype.is_floating_point or vm.dtype == torch.bool or vm.is_complex():
        raise ValueError(f"vocab_map must hold integer target ids, got dtype {vm.dtype}")
    vm = vm.detach().to("cpu", torch.int64)
    if vm.dim() != 1 or vm.numel() == 0 or (K is not None and vm.numel() != K):
        want = f"({K},)" if K is not None else "(K,) with K >= 1"
        raise ValueError(f"vocab_map must have shape {want}, got {tuple(vm.shape)}")
    if int(vm.min()) < 0 or int(vm.max()) >= V:
        raise ValueError(f"vocab_map ids must lie in [0, V) = [0, {V}), got "
                         f"[{int(vm.min())}, {int(vm.max())}]")
    if vm.unique().numel() != vm.numel():
        raise ValueError("vocab_map must not repeat a target id")
    return vm


def head_rows(drafter: nn.Module) -> Tensor:
    """A drafter's output head: its target head (``_head_weight``), or that head's rows at its
    ``vocab_map``, cached in ``_head_cache`` until the map or the head changes. Shape: (Vd, H)."""
    vm, head = drafter.vocab_map, drafter._head_weight
    if vm is None:
        return head
    key = (vm.data_ptr(), vm._version, head.data_ptr(), head.device)
    cached = drafter.__dict__.get("_head_cache")
    if cached is None or cached[0] != key:
        cached = (key, head.index_select(0, vm.to(head.device)))
        drafter.__dict__["_head_cache"] = cached
    return cached[1]


class Attention(nn.Module):
    """Grouped-query attention projections (Hugging Face Llama names and layouts)."""

    def __init__(self, cfg: Any, o_bias: bool = False) -> None:
        super().__init__()
        H, hs = cfg.hidden_size, cfg.head_dim
        self.nh, self.nkv, self.hs = cfg.n_heads, cfg.n_kv_heads, hs
        self.q_proj = nn.Linear(H, self.nh * hs, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(H, self.nkv * hs, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(H, self.nkv * hs, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.nh * hs, H, bias=o_bias)

    def q(self, h: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """Rotated queries. Shape: h (B, n, H) -> (B, nh, n, hs)."""
        B, n, _ = h.shape
        q = self.q_proj(h).view(B, n, self.nh, self.hs)  # (B, n, nh, hs)
        return _apply_rope(q, cos, sin).transpose(1, 2)  # (B, nh, n, hs)

    def kv(self, h: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        """Rotated keys and values. Shape: h (B, n, H) -> two (B, n, nkv, hs)."""
        B, n, _ = h.shape
        k = self.k_proj(h).view(B, n, self.nkv, self.hs)  # (B, n, nkv, hs)
        v = self.v_proj(h).view(B, n, self.nkv, self.hs)  # (B, n, nkv, hs)
        return _apply_rope(k, cos, sin), v

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor]) -> Tensor:
        """Attention output. Shape: q (B, nh, n, hs), k/v (B, nkv, S, hs),
        mask (B or 1, 1, n, S) bool (True = visible) or None -> (B, n, H)."""
        if self.nkv == self.nh:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, nh, n, hs)
        elif _SDPA_GQA:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        else:  # pragma: no cover - torch < 2.5
            rep = self.nh // self.nkv
            y = F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1),
                                               v.repeat_interleave(rep, 1), attn_mask=mask)
        B, _, n, _ = y.shape
        return self.o_proj(y.transpose(1, 2).reshape(B, n, self.nh * self.hs))  # (B, n, H)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)). Shape: (B, n, H) -> (B, n, H)."""

    def __init__(self, cfg: Any) -> None:
        super().__init__()
        H, I = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = nn.Linear(H, I, bias=False)
        self.up_proj = nn.Linear(H, I, bias=False)
        self.down_proj = nn.Linear(I, H, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
