"""The masked-diffusion drafter: a few transformer blocks over the target's frozen embedding
and output head (docs/design.md section 4).

Attention is block-causal. Context positions attend causally to the context (TOKENS mode) and
their per-layer keys and values are cached in a `DrafterCache` across denoising steps and
decode rounds, so each round encodes only the newly accepted tokens. The G draft positions of
a block attend to the whole cached context and to each other (bidirectional inside the block);
context positions never see the block, and computing block logits never writes the cache. A
denoising step therefore reads the cached keys/values but recomputes nothing of the context:
its compute grows with G, not with the context length.

Shapes: B batch rows, T context positions, n new context positions, G draft positions,
H hidden size, nh query heads, nkv key/value heads, hs head size, V target vocabulary,
Vd drafter vocabulary (K with a reduced vocabulary), H_t width of the target features.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ContextMode, DrafterConfig
from .layers import (Attention, RMSNorm, SwiGLU, _rope_cos_sin, check_vocab_map,
                     frozen_target_weights, head_rows, init_weights)

__all__ = ["DiffusionDrafter", "DrafterCache", "RMSNorm"]

class Block(nn.Module):
    """Pre-norm transformer block: RMSNorm, RoPE grouped-query attention, RMSNorm, SwiGLU."""

    def __init__(self, cfg: DrafterConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.mlp = SwiGLU(cfg)

    def finish(self, x: Tensor, h: Tensor, cos: Tensor, sin: Tensor, k: Tensor, v: Tensor,
               mask: Optional[Tensor]) -> Tensor:
        """Attention of the normed input h over keys/values k, v, then the MLP.

        Shape: x, h (B, n, H); k, v (B, nkv, S, hs); mask (B or 1, 1, n, S) -> (B, n, H).
        """
        x = x + self.self_attn.attend(self.self_attn.q(h, cos, sin), k, v, mask)  # (B, n, H)
        return x + self.mlp(self.post_attention_layernorm(x))  # (B, n, H)


class DrafterCache:
    """Per-layer keys and values of the context, for one batch of B rows.

    Rows may hold contexts of different lengths (ragged batches): `lengths` (B,) is kept on the
    model's device, and `append_context` / `crop` take per-row counts. A host-side upper bound of
    the lengths sizes the buffers, so no call synchronises with the device. Create one with
    `DiffusionDrafter.new_cache`.

    Attributes
    ----------
    lengths : int64 tensor
        Shape: (B,). Context length of every row.
    keys, values : list of tensors, one per layer
        Shape: (B, nkv, capacity, hs). Positions >= lengths[b] hold stale data and are masked.
    """

    def __init__(self, drafter: "DiffusionDrafter", batch_size: int) -> None:
        self.drafter = drafter
        self.batch_size = batch_size
        cfg = drafter.config
        p = next(drafter.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.lengths = torch.zeros(batch_size, dtype=torch.int64, device=self.device)
        self.bound = 0  # host-side upper bound of lengths (== lengths when uniform)
        self.uniform = True  # every row has length == bound (no context mask needed)
        shape = (batch_size, cfg.n_kv_heads, 0, cfg.head_dim)
        self.keys = [torch.empty(shape, device=self.device, dtype=self.dtype)
                     for _ in range(cfg.n_layers)]
        self.values = [torch.empty(shape, device=self.device, dtype=self.dtype)
                       for _ in range(cfg.n_layers)]
        # block conditioning (TARGET_FEATURES): per position, what the block reads when that
        # position is the last of the context. Shape: (B, capacity, H).
        self.cond: Optional[Tensor] = None
        if cfg.context_mode is ContextMode.TARGET_FEATURES and cfg.block_conditioning:
            self.cond = torch.empty(batch_size, 0, cfg.hidden_size, device=self.device,
                                    dtype=self.dtype)

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    def _reserve(self, size: int) -> None:
        if size <= self.capacity:
            return
        new = max(size, 2 * self.capacity, 16)
        for store in (self.keys, self.values):
            for i, t in enumerate(store):
                grown = t.new_zeros(t.shape[0], t.shape[1], new, t.shape[3])
                grown[:, :, : t.shape[2]] = t
                store[i] = grown
        if self.cond is not None:
            grown = self.cond.new_zeros(self.cond.shape[0], new, self.cond.shape[2])
            grown[:, : self.cond.shape[1]] = self.cond
            self.cond = grown

    def append_context(self, tokens: Optional[Tensor] = None, features: Optional[Tensor] = None,
                       *, num_new: Optional[Tensor] = None) -> "DrafterCache":
        """Encode n new context positions per row and append their keys and values.

        Only the new positions are computed; earlier ones are read from the cache.

        Parameters
        ----------
        tokens : int tensor, optional
            Shape: (B, n). Target token ids (TOKENS mode; TARGET_FEATURES mode with
            ``features_with_tokens``, where tokens[t] pairs with features[t]).
        features : float tensor, optional
            Shape: (B, n, H_t). The target's hidden states at these positions (TARGET_FEATURES).
        num_new : int tensor, optional
            Shape: (B,). Ragged append: row b takes only its first num_new[b] positions (the
            rest is padding and ignored). None: every row takes all n.

        Returns
        -------
        DrafterCache
            self.

        Examples
        --------
        >>> import torch
        >>> from specdiff_ext.drafter import DiffusionDrafter, DrafterConfig
        >>> cfg = DrafterConfig(vocab_size=50, hidden_size=32, n_heads=4, n_kv_heads=2,
        ...                     head_dim=8, intermediate_size=64)
        >>> d = DiffusionDrafter(cfg, torch.nn.Embedding(50, 32), torch.randn(50, 32))
        >>> cache = d.new_cache(2).append_context(torch.randint(0, 50, (2, 5)))
        >>> cache.lengths.tolist()
        [5, 5]
        """
        self.drafter._encode_context(self, tokens, features, num_new)
        return self

    def crop(self, length: Union[int, Tensor]) -> "DrafterCache":
        """Keep the first `length` context positions of every row (or length[b] of row b).

        Shape:
            length: int, or (B,) int tensor with length[b] <= lengths[b].
        """
        if isinstance(length, Tensor):
            if length.shape != (self.batch_size,):
                raise ValueError(
                    f"length must have shape (B,) = ({self.batch_size},), got {tuple(length.shape)}"
                )
            self.lengths = torch.minimum(self.lengths, length.to(self.lengths))
            self.uniform = False
            return self
        if isinstance(length, bool) or not isinstance(length, int) or length < 0:
            raise ValueError(f"length must be a non-negative int or a (B,) tensor, got {length!r}")
        if self.uniform and length > self.bound:
            raise ValueError(f"cannot crop to length {length}: the context holds {self.bound}")
        self.lengths = torch.clamp(self.lengths, max=length)
        self.bound = min(self.bound, length)
        return self

    def context_mask(self) -> Optional[Tensor]:
        """Which cached positions are real context, or None when every row has `bound` of them.

        Shape: (B, 1, 1, bound) bool.
        """
        if self.uniform:
            return None
        ar = torch.arange(self.bound, device=self.device)
        return (ar[None, :] < self.lengths[:, None])[:, None, None, :]


class DiffusionDrafter(nn.Module):
    """Masked-diffusion drafter over a frozen target embedding and output head.

    The target's input embedding (V, H) and output head (V, H) are read but neither registered
    as parameters nor saved: `parameters()` and `state_dict()` hold the drafter's own weights
    only (blocks, norms, [MASK] embedding, feature projections) plus the `vocab_map` buffer.
    The shared weights stay where the caller keeps them; put the drafter on their device.

    Parameters
    ----------
    config : DrafterConfig
    target_embed : nn.Embedding or tensor
        Shape: (V, H). The target's input embedding.
    target_head : tensor
        Shape: (V, H). The target's output head weight (logits = h @ head.T).
    vocab_map : int tensor, optional
        Shape: (K,). Target id of each drafter vocabulary entry (reduced vocabulary); default
        arange(K) when ``config.reduced_vocab`` is K, until training sets it.

    Examples
    --------
    >>> import torch
    >>> cfg = DrafterConfig(vocab_size=50, hidden_size=32, n_heads=4, n_kv_heads=2,
    ...                     head_dim=8, intermediate_size=64)
    >>> d = DiffusionDrafter(cfg, torch.nn.Embedding(50, 32), torch.randn(50, 32))
    >>> cache = d.new_cache(1).append_context(torch.tensor([[1, 2, 3]]))
    >>> d.block_logits(cache, torch.full((1, 4), cfg.mask_id)).shape
    torch.Size([1, 4, 50])
    """

    def __init__(self, config: DrafterConfig, target_embed: Union[nn.Embedding, Tensor],
                 target_head: Tensor, vocab_map: Optional[Tensor] = None) -> None:
        super().__init__()
        cfg = self.config = config
        H = cfg.hidden_size
        self.set_target_weights(target_embed, target_head)
        if cfg.learned_mask_embedding:
            self.mask_embedding = nn.Parameter(torch.zeros(H))
        else:
            self.register_buffer("mask_embedding", torch.zeros(H), persistent=False)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(H, cfg.rms_eps)
        if cfg.context_mode is ContextMode.TARGET_FEATURES:
            self.feature_norm = RMSNorm(cfg.feature_size, cfg.rms_eps)
            width = cfg.feature_size
            if cfg.features_with_tokens:
                self.token_norm = RMSNorm(H, cfg.rms_eps)
                width += H
            # one projection per layer: the layer's key/value input at context positions
            self.feature_proj = nn.ModuleList(nn.Linear(width, H, bias=False)
                                              for _ in range(cfg.n_layers))
            if cfg.block_conditioning:
                self.block_cond_proj = nn.Linear(width, H, bias=False)
        hs = cfg.head_dim
        inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, hs, 2, dtype=torch.float32) / hs)
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # (hs/2,)
        if cfg.reduced_vocab is not None:
            if vocab_map is None:
                vocab_map = torch.arange(cfg.reduced_vocab)
            self.register_buffer("vocab_map", self._check_vocab_map(vocab_map))
        else:
            if vocab_map is not None:
                raise ValueError("vocab_map given but config.reduced_vocab is None")
            self.vocab_map = None
        self._head_cache: Optional[tuple] = None
        self.reset_parameters()

    # ------------------------------------------------------------------ weights
    def reset_parameters(self) -> None:
        """Normal(0, init_std) linear weights (output projections scaled by 1/sqrt(2 L)), zero
        biases, unit norm gains, and the [MASK] embedding at the embedding's scale."""
        std = self.config.init_std
        init_weights(self, std, self.config.n_layers)
        if isinstance(self.mask_embedding, nn.Parameter):
            with torch.no_grad():
                scale = float(self._embed_weight.float().std()) if self._embed_weight.numel() > 1 else std
                self.mask_embedding.normal_(0.0, scale)

    def set_target_weights(self, target_embed: Union[nn.Embedding, Tensor],
                           target_head: Tensor) -> None:
        """Point the drafter at (new copies of) the target's embedding and head. Shapes: (V, H)."""
        emb, head = frozen_target_weights(self.config, target_embed, target_head)
        # Plain attributes, not parameters or buffers: frozen and never saved.
        self.__dict__["_embed_weight"] = emb
        self.__dict__["_head_weight"] = head
        self.__dict__["_head_cache"] = None

    def _check_vocab_map(self, vocab_map: Tensor) -> Tensor:
        return check_vocab_map(vocab_map, self.config.vocab_size, self.config.reduced_vocab)

    def head_weight(self) -> Tensor:
        """The output head the drafter uses: target_head, or its rows vocab_map (cached).

        Shape: (Vd, H).
        """
        return head_rows(self)

    # ------------------------------------------------------------------ forward
    def new_cache(self, batch_size: int) -> DrafterCache:
        """An empty context cache for `batch_size` rows."""
        return DrafterCache(self, batch_size)

    def _embed(self, tokens: Tensor, dtype: torch.dtype) -> Tensor:
        """Target embedding of ids, [MASK] embedding at mask_id. Shape: (B, n) -> (B, n, H)."""
        is_mask = tokens == self.config.mask_id  # (B, n)
        e = F.embedding(tokens.masked_fill(is_mask, 0), self._embed_weight).to(dtype)  # (B, n, H)
        return torch.where(is_mask[..., None], self.mask_embedding.to(dtype), e)

    def _encode_context(self, cache: DrafterCache, tokens: Optional[Tensor],
                        features: Optional[Tensor], num_new: Optional[Tensor]) -> None:
        cfg = self.config
        feats_mode = cfg.context_mode is ContextMode.TARGET_FEATURES
        need_tokens = not feats_mode or cfg.features_with_tokens
        if need_tokens and tokens is None:
            raise ValueError(f"tokens are required in context mode {cfg.context_mode.value}"
                             + (" with features_with_tokens" if feats_mode else ""))
        if feats_mode and features is None:
            raise ValueError("features are required in context mode target_features")
        if not feats_mode and features is not None:
            raise ValueError("features given, but the drafter's context mode is tokens")
        B = cache.batch_size
        ref = tokens if tokens is not None else features
        if ref.dim() < 2 or ref.shape[0] != B:
            raise ValueError(f"context must have batch size B = {B}, got shape {tuple(ref.shape)}")
        n = ref.shape[1]
        if tokens is not None:
            if tokens.shape != (B, n) or tokens.dtype.is_floating_point:
                raise ValueError(f"tokens must be integer ids of shape (B, n) = ({B}, {n}), "
                                 f"got {tokens.dtype} {tuple(tokens.shape)}")
        if features is not None and tuple(features.shape) != (B, n, cfg.feature_size):
            raise ValueError(f"features must have shape (B, n, H_t) = ({B}, {n}, "
                             f"{cfg.feature_size}), got {tuple(features.shape)}")
        if num_new is not None and tuple(num_new.shape) != (B,):
            raise ValueError(f"num_new must have shape (B,) = ({B},), got {tuple(num_new.shape)}")
        if n == 0:
            return
        dev, dt = cache.device, cache.dtype
        start = cache.lengths  # (B,)
        pos = start[:, None] + torch.arange(n, device=dev)  # (B, n)
        cos, sin = _rope_cos_sin(pos, self.inv_freq, dt)  # (B, n, 1, hs)
        uniform = cache.uniform and num_new is None
        S = cache.bound + n  # keys 0..S-1 cover every new position
        cache._reserve(S)

        def write(layer: int, k: Tensor, v: Tensor) -> None:
            # k, v: (B, n, nkv, hs) -> cache (B, nkv, cap, hs) at positions pos
            if uniform:
                cache.keys[layer][:, :, cache.bound:S] = k.transpose(1, 2)
                cache.values[layer][:, :, cache.bound:S] = v.transpose(1, 2)
            else:
                rows = torch.arange(B, device=dev)[:, None]  # (B, 1)
                cache.keys[layer][rows, :, pos] = k  # indexed view (B, n, nkv, hs)
                cache.values[layer][rows, :, pos] = v

        if feats_mode:
            f = self.feature_norm(features.to(dt))  # (B, n, H_t)
            if cfg.features_with_tokens:
                f = torch.cat([f, self.token_norm(self._embed(tokens, dt))], dim=-1)
            for i, layer in enumerate(self.layers):
                kv_in = layer.input_layernorm(self.feature_proj[i](f))  # (B, n, H)
                write(i, *layer.self_attn.kv(kv_in, cos, sin))
            if cache.cond is not None:
                c = self.block_cond_proj(f)  # (B, n, H)
                if uniform:
                    cache.cond[:, cache.bound:S] = c
                else:
                    cache.cond[torch.arange(B, device=dev)[:, None], pos] = c
        else:
            x = self._embed(tokens, dt)  # (B, n, H)
            # query j (position pos[b, j]) sees keys at positions <= pos[b, j]
            causal = torch.arange(S, device=dev)[None, None, :] <= pos[:, :, None]  # (B, n, S)
            mask = causal[:, None]  # (B, 1, n, S)
            last = len(self.layers) - 1
            for i, layer in enumerate(self.layers):
                h = layer.input_layernorm(x)  # (B, n, H)
                write(i, *layer.self_attn.kv(h, cos, sin))
                if i == last:
                    break  # the last layer's context outputs are never read
                k, v = cache.keys[i][:, :, :S], cache.values[i][:, :, :S]  # (B, nkv, S, hs)
                x = layer.finish(x, h, cos, sin, k, v, mask)  # (B, n, H)
        if num_new is None:
            cache.lengths = start + n
        else:
            cache.lengths = start + num_new.to(device=dev, dtype=torch.int64).clamp(0, n)
        cache.bound = S
        cache.uniform = uniform

    def block_logits(self, cache: DrafterCache, block_tokens: Tensor) -> Tensor:
        """Drafter logits at the G positions following each row's context.

        Block positions attend to the cached context and to each other; the cache is read,
        never written.

        Parameters
        ----------
        cache : DrafterCache
            The context of every row (its rows' lengths give the block's positions).
        block_tokens : int tensor
            Shape: (B, G). Target ids at committed positions, ``config.mask_id`` (= V) at
            masked ones.

        Returns
        -------
        tensor
            Shape: (B, G, Vd), in the head's dtype. Column j is target id vocab_map[j] with a
            reduced vocabulary, else target id j.

        Examples
        --------
        >>> import torch
        >>> cfg = DrafterConfig(vocab_size=50, hidden_size=32, n_heads=4, n_kv_heads=2,
        ...                     head_dim=8, intermediate_size=64, reduced_vocab=10)
        >>> d = DiffusionDrafter(cfg, torch.nn.Embedding(50, 32), torch.randn(50, 32))
        >>> cache = d.new_cache(3).append_context(torch.randint(0, 50, (3, 7)))
        >>> d.block_logits(cache, torch.full((3, 2), cfg.mask_id)).shape
        torch.Size([3, 2, 10])
        """
        B = cache.batch_size
        if block_tokens.dim() != 2 or block_tokens.shape[0] != B:
            raise ValueError(f"block_tokens must have shape (B, G) with B = {B}, "
                             f"got {tuple(block_tokens.shape)}")
        G = block_tokens.shape[1]
        dev, dt = cache.device, cache.dtype
        pos = cache.lengths[:, None] + torch.arange(G, device=dev)  # (B, G)
        cos, sin = _rope_cos_sin(pos, self.inv_freq, dt)  # (B, G, 1, hs)
        S = cache.bound
        ctx_mask = cache.context_mask()  # (B, 1, 1, S) or None
        mask = None
        if ctx_mask is not None:  # context part as the cache says, the block fully visible
            mask = torch.cat([ctx_mask.expand(B, 1, G, S),
                              torch.ones(B, 1, G, G, dtype=torch.bool, device=dev)], dim=-1)
        x = self._embed(block_tokens.to(dev), dt)  # (B, G, H)
        if cache.cond is not None and S > 0:  # the last context position's conditioning
            last = (cache.lengths - 1).clamp(min=0)  # (B,)
            c = cache.cond[torch.arange(B, device=dev), last]  # (B, H)
            x = x + torch.where((cache.lengths > 0)[:, None], c, torch.zeros_like(c))[:, None]
        for i, layer in enumerate(self.layers):
            h = layer.input_layernorm(x)  # (B, G, H)
            kb, vb = layer.self_attn.kv(h, cos, sin)  # (B, G, nkv, hs)
            k = torch.cat([cache.keys[i][:, :, :S], kb.transpose(1, 2)], dim=2)  # (B, nkv, S+G, hs)
            v = torch.cat([cache.values[i][:, :, :S], vb.transpose(1, 2)], dim=2)
            x = layer.finish(x, h, cos, sin, k, v, mask)  # (B, G, H)
        head = self.head_weight()  # (Vd, H)
        return F.linear(self.norm(x).to(head.dtype), head)  # (B, G, Vd)

    def forward(self, context: Tensor, block_tokens: Tensor,
                features: Optional[Tensor] = None) -> Tensor:
        """Uncached convenience: encode the whole context, then the block's logits.

        Shape:
            context: (B, T) ids (TOKENS mode; None allowed in TARGET_FEATURES mode without
            tokens); features: (B, T, H_t); block_tokens: (B, G) -> (B, G, Vd).
        """
        B = block_tokens.shape[0]
        cache = self.new_cache(B).append_context(context, features)
        return self.block_logits(cache, block_tokens)
