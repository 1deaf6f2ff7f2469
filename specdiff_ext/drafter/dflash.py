"""The DFlash-architecture block-diffusion drafter (docs/design.md section 4; arXiv 2602.06036).

The drafter never re-reads context tokens. The hidden states of k target layers at every context
position are concatenated, projected by one linear layer (`fc`) and RMS-normed (`hidden_norm`);
in every drafter layer that one context vector becomes extra keys and values (through the
layer's own k/v projections and per-head k-norm, with RoPE at the context position). The block
is ``[last token, MASK x G]``, embedded with the target's frozen embedding (the mask is a token
id of the target's vocabulary), attends to the whole context and to itself (non-causal), runs
through every layer, and the target's frozen head gives the logits of positions 1..G.

Layers are Qwen3-style (q/k RMS-norm per head, SwiGLU), with the published DFlash module names,
so `state_dict()` is the published ``model.safetensors`` layout as it stands and a checkpoint
folder is a DFlash folder (`checkpoint.save_dflash` / `checkpoint.load_drafter`).

Position convention (as DFlash's own decode loop has it): context position t carries the target's
hidden states computed *at* t (while reading token x_t); the block starts at the position of the
last token, whose states the target has not computed yet.

Shapes: B batch rows, S context positions, n new context positions, G drafts (block of G + 1),
A anchors per row, H hidden size, F = k * H_t feature width, nh / nkv heads, hs head size.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .int8 import int8_head
from .config import FieldError, check_field
from .layers import (Attention, RMSNorm, SwiGLU, _apply_rope, _rope_cos_sin, check_vocab_map,
                     frozen_target_weights, head_rows, init_weights)

__all__ = ["DFlashConfig", "DFlashDrafter", "DFlashCache", "build_target_layer_ids",
           "check_vocab_map", "frequent_vocab"]


def frequent_vocab(counts: Tensor, K: int) -> Tensor:
    """The draft vocabulary of size K: the K most frequent target ids by `counts` (shape (V,);
    ties to the smaller id), sorted by id. Shape: (K,) int64.

    >>> frequent_vocab(torch.tensor([5, 0, 9, 5, 1]), 3).tolist()
    [0, 2, 3]
    """
    counts = torch.as_tensor(counts).to(torch.float64)
    if counts.dim() != 1 or not 1 <= K <= counts.numel():
        raise ValueError(f"K must lie in [1, V] = [1, {counts.numel()}] for counts of shape "
                         f"(V,), got K={K} and shape {tuple(counts.shape)}")
    V = counts.numel()
    # stable order: by count descending, then by id ascending
    key = counts * (V + 1) - torch.arange(V, dtype=torch.float64)
    top = key.topk(K).indices
    return top.sort().values.to(torch.int64)


def build_target_layer_ids(num_target_layers: int, num_draft_layers: int) -> list:
    """DFlash's default feature layers: one per drafter layer, evenly from layer 1 to L - 3
    (0-based decoder-layer indices; the middle layer for a one-layer drafter).

    >>> build_target_layer_ids(30, 3)
    [1, 14, 27]
    """
    if num_draft_layers == 1:
        return [num_target_layers // 2]
    start, end = 1, num_target_layers - 3
    return [int(round(start + i * (end - start) / (num_draft_layers - 1)))
            for i in range(num_draft_layers)]


@dataclass
class DFlashConfig:
    """Shape of a `DFlashDrafter` (torch-free; the defaults fit SmolLM2-135M).

    Examples
    --------
    >>> cfg = DFlashConfig(vocab_size=50, hidden_size=32, n_heads=4, n_kv_heads=2, head_dim=8,
    ...                    intermediate_size=64, num_target_layers=6, mask_token_id=3, n_layers=2)
    >>> cfg.target_layer_ids, cfg.feature_layers
    ([1, 3], [2, 4])
    """

    vocab_size: int = 49152  # V: the target's vocabulary (shared frozen embedding and head)
    hidden_size: int = 576  # H: the target's hidden size
    n_layers: int = 3  # drafter layers
    n_heads: int = 9  # query heads
    n_kv_heads: int = 3  # key/value heads; divides n_heads
    head_dim: int = 64  # per-head width (even, for RoPE)
    intermediate_size: int = 1536  # SwiGLU inner width
    rope_theta: float = 100000.0  # RoPE base
    rms_eps: float = 1e-5  # RMSNorm epsilon
    num_target_layers: int = 30  # L: decoder layers of the target
    # 0-based target decoder layers whose outputs, concatenated, are the context features
    # (DFlash numbering); empty: `build_target_layer_ids(num_target_layers, n_layers)`
    target_layer_ids: list = field(default_factory=list)
    target_hidden_size: Optional[int] = None  # H_t of the features; None: hidden_size
    mask_token_id: int = 16  # a target token id used as [MASK] (16 = <empty_output> in SmolLM2)
    block_size: int = 8  # trained block: the last token + block_size - 1 drafts
    attention_bias: bool = False  # biases on q/k/v/o
    init_std: float = 0.02  # normal init of the linear weights
    target_name: str = ""  # the target it was distilled from (checked when loading)
    # K: the drafter scores only K target tokens (its `vocab_map`, the draft vocabulary); None:
    # the whole vocabulary
    draft_vocab_size: Optional[int] = None

    def __post_init__(self) -> None:
        """Every field type- and range-checked by `config.check_field` (an int must be an int:
        never a bool, float or string); FieldError (a ValueError) naming the field otherwise."""
        for name in ("vocab_size", "hidden_size", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                     "intermediate_size", "num_target_layers"):
            setattr(self, name, check_field(name, getattr(self, name), "int", lo=1))
        if self.n_heads % self.n_kv_heads:
            raise FieldError("n_kv_heads", f"n_kv_heads must divide n_heads, got {self.n_heads} "
                                           f"and {self.n_kv_heads}")
        if self.head_dim % 2:
            raise FieldError("head_dim",
                             f"head_dim must be even (RoPE rotates pairs), got {self.head_dim}")
        self.block_size = check_field("block_size", self.block_size, "int", lo=2)  # last + a draft
        self.rope_theta = check_field("rope_theta", self.rope_theta, "real", above=0)
        self.rms_eps = check_field("rms_eps", self.rms_eps, "real", above=0)
        self.init_std = check_field("init_std", self.init_std, "real", lo=0)
        # empty: DFlash's default layers (a drafter always reads some context)
        ids = check_field("target_layer_ids", self.target_layer_ids, "ints", lo=0,
                          hi=self.num_target_layers - 1)
        self.target_layer_ids = ids or build_target_layer_ids(self.num_target_layers,
                                                              self.n_layers)
        self.target_hidden_size = check_field("target_hidden_size", self.target_hidden_size,
                                              "int", lo=1, optional=True)
        self.mask_token_id = check_field("mask_token_id", self.mask_token_id, "int", lo=0,
                                         hi=self.vocab_size - 1)
        check_field("attention_bias", self.attention_bias, "bool")
        check_field("target_name", self.target_name, "str")
        self.draft_vocab_size = check_field("draft_vocab_size", self.draft_vocab_size, "int",
                                            lo=1, hi=self.vocab_size, optional=True)

    @property
    def mask_id(self) -> int:
        """The [MASK] id the sampler writes into masked block positions."""
        return self.mask_token_id

    @property
    def drafter_vocab_size(self) -> int:
        """Vd: the columns of the drafter's logits (K with a draft vocabulary, else V)."""
        return self.draft_vocab_size or self.vocab_size

    @property
    def feature_size(self) -> int:
        """F: width of the concatenated features."""
        return len(self.target_layer_ids) * (self.target_hidden_size or self.hidden_size)

    @property
    def feature_layers(self) -> list:
        """The feature layers in `TargetModel.forward(hidden_layers=...)` numbering (1-based:
        the output of decoder layer i is index i + 1 there)."""
        return [i + 1 for i in self.target_layer_ids]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DFlashConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown DFlashConfig fields {unknown}")
        return cls(**d)

    @classmethod
    def from_hf_config(cls, hf_config: Any, target_name: str, **overrides: Any) -> "DFlashConfig":
        """A drafter shaped like the target's layers (duck-typed Hugging Face config)."""
        n_heads = int(hf_config.num_attention_heads)
        kw: dict = dict(
            vocab_size=int(hf_config.vocab_size), hidden_size=int(hf_config.hidden_size),
            n_heads=n_heads,
            n_kv_heads=int(getattr(hf_config, "num_key_value_heads", None) or n_heads),
            head_dim=int(getattr(hf_config, "head_dim", None)
                         or hf_config.hidden_size // n_heads),
            intermediate_size=int(hf_config.intermediate_size),
            rope_theta=float(getattr(hf_config, "rope_theta", None) or 10000.0),
            rms_eps=float(getattr(hf_config, "rms_norm_eps", 1e-6)),
            num_target_layers=int(hf_config.num_hidden_layers),
            target_name=target_name,
        )
        kw.update(overrides)
        return cls(**kw)


class DFlashAttention(Attention):
    """Qwen3-style attention (q/k RMS-norm per head) whose keys/values also come from the
    context features."""

    def __init__(self, cfg: DFlashConfig) -> None:
        super().__init__(cfg, o_bias=cfg.attention_bias)
        self.q_norm = RMSNorm(self.hs, cfg.rms_eps)
        self.k_norm = RMSNorm(self.hs, cfg.rms_eps)

    def q(self, h: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """Normed, rotated queries. Shape: h (B, n, H) -> (B, nh, n, hs)."""
        B, n, _ = h.shape
        q = self.q_norm(self.q_proj(h).view(B, n, self.nh, self.hs))  # (B, n, nh, hs)
        return _apply_rope(q, cos, sin).transpose(1, 2)

    def kv(self, h: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        """Normed, rotated keys and values. Shape: h (B, n, H) -> two (B, nkv, n, hs)."""
        B, n, _ = h.shape
        k = self.k_norm(self.k_proj(h).view(B, n, self.nkv, self.hs))  # (B, n, nkv, hs)
        v = self.v_proj(h).view(B, n, self.nkv, self.hs)
        return _apply_rope(k, cos, sin).transpose(1, 2), v.transpose(1, 2)

    def forward(self, h: Tensor, cos: Tensor, sin: Tensor, ctx_k: Tensor, ctx_v: Tensor,
                mask: Optional[Tensor]) -> Tensor:
        """Block attention over [context, block]. Shape: h (B, n, H), ctx_k/v (B, nkv, S, hs),
        mask (B or 1, 1, n, S + n) bool (True = visible) or None -> (B, n, H)."""
        kb, vb = self.kv(h, cos, sin)  # (B, nkv, n, hs)
        return self.attend(self.q(h, cos, sin), torch.cat([ctx_k, kb], dim=2),
                           torch.cat([ctx_v, vb], dim=2), mask)  # keys (B, nkv, S+n, hs)


class DFlashLayer(nn.Module):
    """Pre-norm layer: RMSNorm, attention over [context, block], RMSNorm, SwiGLU."""

    def __init__(self, cfg: DFlashConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.self_attn = DFlashAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.mlp = SwiGLU(cfg)  # type: ignore[arg-type]  # reads hidden/intermediate size

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, ctx_k: Tensor, ctx_v: Tensor,
                mask: Optional[Tensor]) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, ctx_k, ctx_v, mask)
        return x + self.mlp(self.post_attention_layernorm(x))  # (B, n, H)


class DFlashCache:
    """Per-layer context keys/values (uniform rows) and each row's last token.

    Attributes
    ----------
    length : int
        Context positions held (the same for every row).
    last : int64 tensor or None
        Shape: (B, 1). The token the next block starts from.
    """

    def __init__(self, drafter: "DFlashDrafter", batch_size: int) -> None:
        cfg = drafter.config
        p = drafter.fc.weight
        self.drafter, self.batch_size = drafter, batch_size
        self.device, self.dtype = p.device, p.dtype
        self.length = 0
        self.last: Optional[Tensor] = None
        shape = (batch_size, cfg.n_kv_heads, 0, cfg.head_dim)
        self.keys = [p.new_empty(shape) for _ in range(cfg.n_layers)]
        self.values = [p.new_empty(shape) for _ in range(cfg.n_layers)]

    def _reserve(self, size: int) -> None:
        cap = self.keys[0].shape[2]
        if size <= cap:
            return
        new = max(size, 2 * cap, 64)
        for store in (self.keys, self.values):
            for i, t in enumerate(store):
                grown = t.new_zeros(t.shape[0], t.shape[1], new, t.shape[3])
                grown[:, :, :cap] = t
                store[i] = grown

    def append_context(self, features: Tensor, last: Optional[Tensor] = None) -> "DFlashCache":
        """Append n context positions and (optionally) set the last token.

        Shape:
            features: (B, n, F), the target's feature-layer states at the next n positions;
            last: (B, 1) ids.
        """
        B, cfg = self.batch_size, self.drafter.config
        if features.dim() != 3 or features.shape[0] != B or features.shape[2] != cfg.feature_size:
            raise ValueError(f"features must have shape (B, n, F) = ({B}, n, {cfg.feature_size}), "
                             f"got {tuple(features.shape)}")
        n = features.shape[1]
        if n:
            self._reserve(self.length + n)
            kvs = self.drafter.context_kv(features.to(self.device, self.dtype), self.length)
            for i, (k, v) in enumerate(kvs):
                self.keys[i][:, :, self.length:self.length + n] = k
                self.values[i][:, :, self.length:self.length + n] = v
            self.length += n
        if last is not None:
            if tuple(last.shape) != (B, 1):
                raise ValueError(f"last must have shape (B, 1) = ({B}, 1), got {tuple(last.shape)}")
            self.last = last.to(self.device, torch.int64)
        return self


class DFlashDrafter(nn.Module):
    """DFlash block-diffusion drafter over a frozen target embedding and head.

    `parameters()` / `state_dict()` hold the drafter's own weights only, named as the published
    ``DFlashDraftModel`` names them (``layers.i.self_attn.q_proj.weight``, ``fc.weight``,
    ``hidden_norm.weight``, ``norm.weight``, ...).

    Parameters
    ----------
    config : DFlashConfig
    target_embed : nn.Embedding or tensor
        Shape: (V, H).
    target_head : tensor
        Shape: (V, H).
    vocab_map : int tensor, optional
        Shape: (K,), K = ``config.draft_vocab_size``. The draft vocabulary: logit column j is
        target id ``vocab_map[j]`` (distinct ids in [0, V)); the head is those rows of the
        target's. Required exactly when the config has a draft_vocab_size; a non-persistent
        buffer (`checkpoint.save_dflash` stores it beside the published weights).

    Examples
    --------
    >>> import torch
    >>> cfg = DFlashConfig(vocab_size=50, hidden_size=32, n_heads=4, n_kv_heads=2, head_dim=8,
    ...                    intermediate_size=64, num_target_layers=6, mask_token_id=3)
    >>> d = DFlashDrafter(cfg, torch.randn(50, 32), torch.randn(50, 32))
    >>> cache = d.new_cache(1).append_context(torch.randn(1, 5, cfg.feature_size),
    ...                                       last=torch.tensor([[7]]))
    >>> d.block_logits(cache, torch.full((1, 4), cfg.mask_id)).shape
    torch.Size([1, 4, 50])
    """

    def __init__(self, config: DFlashConfig, target_embed: Union[nn.Embedding, Tensor],
                 target_head: Tensor, vocab_map: Optional[Tensor] = None) -> None:
        super().__init__()
        cfg = self.config = config
        self.register_buffer("vocab_map", None, persistent=False)
        self.layers = nn.ModuleList(DFlashLayer(cfg) for _ in range(cfg.n_layers))
        self.fc = nn.Linear(cfg.feature_size, cfg.hidden_size, bias=False)
        self.hidden_norm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        hs = cfg.head_dim
        inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, hs, 2, dtype=torch.float32) / hs)
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # (hs/2,)
        self.set_target_weights(target_embed, target_head)
        if cfg.draft_vocab_size is not None and vocab_map is None:
            raise ValueError(f"config.draft_vocab_size is {cfg.draft_vocab_size}: give its "
                             f"vocab_map (K target ids)")
        self.set_draft_vocab(vocab_map)
        self.reset_parameters()
        # accepted drafts per round by tree budget, measured on held-out prompts for this
        # checkpoint (``tree_acceptance.json`` beside it, `calibrate`); None: not measured
        self.tree_acceptance: Optional[dict] = None

    def reset_parameters(self) -> None:
        """Normal(0, init_std) linear weights (output projections scaled by 1/sqrt(2 L)), unit
        norm gains."""
        init_weights(self, self.config.init_std, self.config.n_layers)

    def set_draft_vocab(self, vocab_map: Optional[Tensor]) -> "DFlashDrafter":
        """Score only the target ids `vocab_map` (shape (K,), distinct, in [0, V)) from now on,
        or the whole vocabulary (None); sets ``config.draft_vocab_size``. The weights are
        unchanged: a drafter trained on the full head can draft over a subset and back.
        ValueError naming vocab_map for a bad map."""
        V = self.config.vocab_size
        if vocab_map is None:
            self.vocab_map = None
            self.config.draft_vocab_size = None
        else:
            vm = check_vocab_map(vocab_map, V)
            self.vocab_map = vm.to(self.fc.weight.device)
            self.config.draft_vocab_size = int(vm.numel())
        self.__dict__["_head_cache"] = None
        return self

    def set_target_weights(self, target_embed: Union[nn.Embedding, Tensor],
                           target_head: Tensor) -> None:
        """Point the drafter at the target's embedding and head (frozen, never saved)."""
        emb, head = frozen_target_weights(self.config, target_embed, target_head)
        self.__dict__["_embed_weight"] = emb
        self.__dict__["_head_weight"] = head
        self.__dict__["_head_cache"] = None

    def head_weight(self) -> Tensor:
        """The head the drafter scores with: the target's, or its rows `vocab_map` (cached
        until the map or the head changes). Shape: (Vd, H)."""
        return head_rows(self)

    def new_cache(self, batch_size: int) -> DFlashCache:
        return DFlashCache(self, batch_size)

    # ------------------------------------------------------------------ math
    def context_kv(self, features: Tensor, start: int) -> list:
        """Every layer's keys/values of n context positions starting at position `start`.

        Shape: features (B, n, F) -> n_layers pairs of (B, nkv, n, hs).
        """
        B, n, _ = features.shape
        ctx = self.hidden_norm(self.fc(features))  # (B, n, H)
        pos = torch.arange(start, start + n, device=features.device).expand(B, n)
        cos, sin = _rope_cos_sin(pos, self.inv_freq, ctx.dtype)  # (B, n, 1, hs)
        return [layer.self_attn.kv(ctx, cos, sin) for layer in self.layers]

    def hidden(self, tokens: Tensor, pos: Tensor, ctx_kv: list, mask: Optional[Tensor]) -> Tensor:
        """Final normed hidden states of block tokens over the given context keys/values.

        Shape: tokens, pos (B, n); ctx_kv: n_layers pairs (B, nkv, S, hs); mask (B or 1, 1, n,
        S + n) bool or None -> (B, n, H).
        """
        dt = self.fc.weight.dtype
        x = F.embedding(tokens, self._embed_weight).to(dt)  # (B, n, H)
        cos, sin = _rope_cos_sin(pos, self.inv_freq, dt)  # (B, n, 1, hs)
        for layer, (k, v) in zip(self.layers, ctx_kv):
            x = layer(x, cos, sin, k, v, mask)
        return self.norm(x)

    def _head_logits(self, h: Tensor) -> Tensor:
        """The head over hidden states, (B, n, H) -> (B, n, Vd): float, or int8 after
        `pack_int8`."""
        head = self.head_weight()
        out = int8_head(self, head, h)
        if out is not None:
            return out
        # 2-D and contiguous: a strided 3-D input sends F.linear through a batched matmul that
        # copies the whole (V, H) head on every call
        flat = h.reshape(-1, h.shape[-1]).to(head.dtype).contiguous()  # (N, H)
        return F.linear(flat, head).view(*h.shape[:-1], -1)

    @property
    def int8(self) -> bool:
        """True while the drafter drafts with int8 weights (`drafter.int8.pack_int8`)."""
        return bool(self.__dict__.get("_int8"))

    def block_logits(self, cache: DFlashCache, block_tokens: Tensor) -> Tensor:
        """Logits of the G block positions after each row's last token.

        Parameters
        ----------
        cache : DFlashCache
            Context and last token of every row (read only).
        block_tokens : int tensor
            Shape: (B, G). Committed target ids, ``config.mask_id`` at masked positions.

        Returns
        -------
        tensor
            Shape: (B, G, Vd). Column j is target id ``vocab_map[j]`` with a draft vocabulary.
        """
        B = cache.batch_size
        if block_tokens.dim() != 2 or block_tokens.shape[0] != B:
            raise ValueError(f"block_tokens must have shape (B, G) with B = {B}, "
                             f"got {tuple(block_tokens.shape)}")
        if cache.last is None:
            raise ValueError("the cache has no last token: append_context(..., last=ids) first")
        G = block_tokens.shape[1]
        tokens = torch.cat([cache.last, block_tokens.to(cache.device)], dim=1)  # (B, G+1)
        pos = (cache.length + torch.arange(G + 1, device=cache.device)).expand(B, G + 1)
        S = cache.length
        kv = [(k[:, :, :S], v[:, :, :S]) for k, v in zip(cache.keys, cache.values)]
        h = self.hidden(tokens, pos, kv, None)[:, 1:]  # (B, G, H)
        return self._head_logits(h)  # (B, G, Vd)

    def batch_block_logits(self, caches: list, gammas: list) -> list:
        """`block_logits` of fully masked blocks for several single-row caches in one pass:
        row b's block ``[last, MASK x gammas[b]]`` over its own context (the rows' contexts
        padded to the longest, each masked to its own length, each block to its own size), so
        row b's logits are those `block_logits` gives it alone, up to rounding.

        Shape: caches: B `DFlashCache` of one row each; returns B tensors (1, gammas[b], Vd).
        """
        if len(caches) != len(gammas) or not caches:
            raise ValueError(f"caches and gammas must be non-empty lists of the same length, got "
                             f"{len(caches)} and {len(gammas)}")
        if any(c.batch_size != 1 or c.last is None for c in caches):
            raise ValueError("batch_block_logits takes caches of one row each, with a last token")
        cfg = self.config
        if self.int8:  # int8 scales cover a row's whole call, padding included: each row
            # runs its own block, as it would alone
            return [self.block_logits(c, torch.full((1, g), cfg.mask_id, dtype=torch.int64,
                                                    device=c.device))
                    for c, g in zip(caches, gammas)]
        B, G = len(caches), max(gammas)
        dev = caches[0].device
        lens = torch.tensor([c.length for c in caches], device=dev)  # (B,)
        S = int(max(c.length for c in caches))
        kv = []
        for i in range(cfg.n_layers):
            k = caches[0].keys[i].new_zeros(B, cfg.n_kv_heads, S, cfg.head_dim)
            v = torch.zeros_like(k)
            for b, c in enumerate(caches):
                k[b, :, :c.length] = c.keys[i][0, :, :c.length]
                v[b, :, :c.length] = c.values[i][0, :, :c.length]
            kv.append((k, v))
        last = torch.cat([c.last for c in caches], 0)  # (B, 1)
        tokens = torch.cat([last, last.new_full((B, G), cfg.mask_id)], 1)  # (B, G + 1)
        pos = lens[:, None] + torch.arange(G + 1, device=dev)
        ctx = torch.arange(S, device=dev)[None, :] < lens[:, None]  # (B, S)
        blk = torch.arange(G + 1, device=dev)[None, :] <= torch.tensor(gammas, device=dev)[:, None]
        mask = torch.cat([ctx, blk], 1)[:, None, None, :].expand(B, 1, G + 1, S + G + 1)
        h = self.hidden(tokens, pos, kv, mask)[:, 1:]  # (B, G, H)
        lg = self._head_logits(h)
        return [lg[b:b + 1, :g] for b, g in enumerate(gammas)]

    def forward_blocks(self, features: Tensor, anchors: Tensor, block_tokens: Tensor) -> Tensor:
        """Training forward: A blocks per row in one pass, each seeing the context before its
        anchor (block-diagonal mask), as `block_logits` would see it at that anchor.

        Parameters
        ----------
        features : tensor
            Shape: (B, L, F). Feature-layer states at every position of each row.
        anchors : int tensor
            Shape: (B, A). Position of each block's first (last-token) slot; -1 pads.
        block_tokens : int tensor
            Shape: (B, A, bs). Each block's tokens (token at the anchor, then mask / committed).

        Returns
        -------
        tensor
            Shape: (B, A, bs, H). Final hidden states (apply the head to the slots needed).
        """
        B, L, _ = features.shape
        A, bs = block_tokens.shape[1], block_tokens.shape[2]
        dev = features.device
        kv = self.context_kv(features, 0)  # (B, nkv, L, hs) each
        a = anchors.clamp(min=0)  # (B, A)
        pos = (a[:, :, None] + torch.arange(bs, device=dev)).reshape(B, A * bs)  # (B, A*bs)
        # context key j visible to block i iff j < anchor_i; block keys only within the block
        ctx_vis = torch.arange(L, device=dev)[None, None, :] < a[:, :, None]  # (B, A, L)
        ctx_vis = ctx_vis[:, :, None, :].expand(B, A, bs, L).reshape(B, A * bs, L)
        blk = torch.arange(A, device=dev).repeat_interleave(bs)  # (A*bs,)
        blk_vis = (blk[:, None] == blk[None, :]).expand(B, A * bs, A * bs)
        mask = torch.cat([ctx_vis, blk_vis], dim=-1)[:, None]  # (B, 1, A*bs, L + A*bs)
        h = self.hidden(block_tokens.reshape(B, A * bs), pos, kv, mask)  # (B, A*bs, H)
        return h.view(B, A, bs, -1)
