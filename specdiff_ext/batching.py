"""Batched decoding with ragged acceptance (docs/design.md section 5, Batches): B prompts decoded at
once, each row exactly as if decoded alone.

- `SlotCache`: the target's KV cache with one slot per logical position per row. A row's
  accepted prefix occupies slots ``0 .. length[b] - 1``; a round writes its nodes at
  ``length[b] + i`` and an attention mask hides every slot the row has not accepted, so nothing
  moves when a row rejects drafts: its stale slots are overwritten by its next round. Padding
  (right-padded prompts, unused tree nodes, finished rows) writes to the last slot, which no
  used position reads. Buffers are allocated once per call (fixed shapes). It plugs into any
  Hugging Face Llama / Qwen-style causal LM through the model's own ``cache.update`` call and
  a 4-D additive mask; the model code is HF's.
- `BatchedTarget`: the target over a `SlotCache`: `prefill`, `forward_nodes` (a chain or a
  tree per row, positions ``length[b] + depth``) and `commit` (each row keeps its root and
  accepted path; a tree's path entries are gathered into place per row).
- `generate_batch`: the round loop of `decoding.SpeculativeDecoder` over B rows. Each row has
  its own drafter state (`fork_drafter`), its own seed streams (the ones a solo call with that
  seed uses) and its own limit and EOS; the target runs once per round for the whole batch, and
  verification is one batched `ops.verify` / `ops.verify_tree` call, followed by the round's one
  host sync for every row.

Exactness: a row's drafts only ever decide how many tokens its round emits; the verify op makes
every emitted token distributed as the target's next token given the row's own text. Rows
whose drafter returned fewer drafts than the round's widest are padded with point-mass drafts
(token 0), which are valid drafts like any other, so the row's law is unchanged.
"""

from __future__ import annotations

import copy
from typing import Any, List, Optional, Sequence, Union

import torch
from torch import Tensor

from . import ops
from .target import TargetOutput, _tree_ancestry

__all__ = ["SlotCache", "BatchedTarget", "generate_batch", "fork_drafter", "prefetch_blocks",
           "NullDrafting"]


class SlotCache:
    """Per-row KV slots for a Hugging Face decoder (the object passed as its cache).

    Keys / values of layer l: (B, n_kv_heads, S, head_dim), zero-filled once. Before each model
    call `BatchedTarget` sets `write` (B, T): the slot each new position's entry goes to; the
    model's attention layers call `update`, which writes there and returns the whole buffers
    (the mask decides what is read). Slot S - 1 is the trash slot (padding writes, never read by
    a used position).
    """

    is_compileable = False

    def __init__(self, config: Any, batch: int, slots: int, dtype: torch.dtype,
                 device: Union[str, torch.device]) -> None:
        heads = int(config.num_attention_heads)
        nkv = int(getattr(config, "num_key_value_heads", None) or heads)
        hd = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
        layers = int(config.num_hidden_layers)
        self.batch, self.slots = batch, slots
        self.keys = [torch.zeros(batch, nkv, slots, hd, dtype=dtype, device=device)
                     for _ in range(layers)]
        self.values = [torch.zeros_like(k) for k in self.keys]
        self.write: Optional[Tensor] = None
        self.live: Optional[Tensor] = None  # (B', W) bool: slots a row may read this call
        self.rows: Optional[Tensor] = None  # (B',) the batch rows this call runs; None: all
        self.is_sliding = [False] * layers

    @property
    def trash(self) -> int:
        return self.slots - 1

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int,
               *args: Any, **kwargs: Any) -> tuple:
        """Write the new entries (B, nkv, T, hd) at `write` and return the layer's first W
        slots, with every slot outside `live` read as zero: whatever a stale slot holds (even
        NaN, which a mask would not hide: NaN + mask is NaN) never reaches the attention."""
        if self.write is None or self.live is None:
            raise RuntimeError("SlotCache.update outside a BatchedTarget forward (no write slots)")
        k, v = self.keys[layer_idx], self.values[layer_idx]
        B, H, T, D = key_states.shape
        W = self.live.shape[1]
        # one index_put through the (B, S, H, D) view: row r's entry t goes to slot write[r, t]
        r = (torch.arange(B, device=k.device) if self.rows is None else self.rows)[:, None]
        r = r.expand(B, T)
        k.permute(0, 2, 1, 3)[r, self.write] = key_states.permute(0, 2, 1, 3).to(k.dtype)
        v.permute(0, 2, 1, 3)[r, self.write] = value_states.permute(0, 2, 1, 3).to(v.dtype)
        if self.rows is None:
            kw, vw = k[:, :, :W], v[:, :, :W]
        else:  # a subset of the rows: their windows
            kw, vw = k[:, :, :W].index_select(0, self.rows), v[:, :, :W].index_select(0, self.rows)
        live = self.live[:, None, :, None]
        zero = k.new_zeros(())
        return torch.where(live, kw, zero), torch.where(live, vw, zero)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """The slot count (positions are always passed explicitly)."""
        return self.slots

    def __len__(self) -> int:
        return len(self.keys)


class BatchedTarget:
    """A `TargetModel` run over a `SlotCache` of B rows with per-row lengths.

    Parameters
    ----------
    target : TargetModel
    batch : int
        B rows.
    slots : int
        Slots per row (the trash slot included): more than any row's prompt + new tokens +
        nodes of one round.
    """

    def __init__(self, target: Any, batch: int, slots: int) -> None:
        impl = getattr(target.model.config, "_attn_implementation", None)
        if impl not in (None, "eager", "sdpa"):
            raise NotImplementedError(f"batched decoding needs the 'eager' or 'sdpa' attention "
                                      f"implementation (a 4-D additive mask), the model uses "
                                      f"{impl!r}")
        self.target, self.batch, self.slots = target, batch, slots
        self.cache = SlotCache(target.model.config, batch, slots, target.dtype, target.device)
        self.lengths = [0] * batch  # accepted entries per row (host copy)
        self._len = torch.zeros(batch, dtype=torch.int64, device=target.device)

    def forward_nodes(self, ids: Tensor, parents: Optional[Tensor], used: Tensor,
                      hidden_layers: Optional[Sequence[int]] = None,
                      rows: Optional[Sequence[int]] = None) -> TargetOutput:
        """One model call over N nodes per row, after each row's accepted prefix; `rows`
        (increasing batch-row indices, one per row of ids; None: all B) runs a subset, e.g.
        the rows still decoding.

        Parameters
        ----------
        ids : int64 tensor
            Shape: (B, N). Node tokens (node 0: the row's root, the last emitted token).
        parents : int64 tensor or None
            Shape: (B, N). As `TargetModel.forward_tree` (-1: an unused node); None: a chain
            (node i's parent is i - 1).
        used : bool tensor
            Shape: (B, N). Nodes that are real (False: padding, finished rows).

        Returns
        -------
        TargetOutput
            logits (B, N, V), cache, hidden (one (B, N, H) per requested layer or None).
        """
        tgt, dev = self.target, self.target.device
        B, N = ids.shape
        sub = rows is not None and len(rows) < self.batch
        if rows is not None and len(rows) != B:
            raise ValueError(f"rows must name one batch row per row of ids ({B}), got {len(rows)}")
        used = used.to(dev)
        if parents is None:
            anc = torch.ones(N, N, dtype=torch.bool).tril().expand(B, N, N)
            depth = torch.arange(N).expand(B, N)
        else:
            anc, depth = _tree_ancestry(parents.detach().to("cpu"), B)  # (B, N, N), (B, N)
        anc, depth = anc.to(dev), depth.to(dev)
        S = self.slots
        rows_t = torch.tensor(list(rows), dtype=torch.int64, device=dev) if sub else None
        L = self._len[rows_t] if sub else self._len  # (B,)
        lens = [self.lengths[b] for b in rows] if sub else self.lengths
        slot = torch.where(used, L[:, None] + torch.arange(N, device=dev),
                           self.cache.trash)  # (B, N)
        # the call reads the first W slots only: every row's prefix and this round's nodes
        W = max(lens) + N
        if W >= S:
            raise ValueError(f"the batch's slots are full: a row at {max(lens)} "
                             f"positions cannot take {N} more nodes in {S - 1} slots")
        j = torch.arange(W, device=dev)
        rel = j[None, :] - L[:, None]  # (B, S): slot's node index in this round
        in_round = (rel >= 0) & (rel < N)
        node_vis = torch.gather(anc, 2, rel.clamp(0, N - 1)[:, None, :].expand(B, N, W))
        # the slot of node i' is read by node i iff i' is an ancestor of i (or i itself) and used
        used_at = torch.gather(used, 1, rel.clamp(0, N - 1))  # (B, S)
        prefix = j[None, :] < L[:, None]  # (B, W)
        live = prefix | (in_round & used_at)
        vis = prefix[:, None, :] | (in_round & used_at)[:, None, :] & node_vis  # (B, N, W)
        # padding reads its row's prefix only (an empty prefix: every slot at the same finite
        # score); its outputs are meaningless but finite, and nothing reads its entries
        vis = torch.where(used[:, :, None], vis, prefix[:, None, :])
        mask = torch.zeros(B, 1, N, W, dtype=tgt.dtype, device=dev)
        mask.masked_fill_(~vis[:, None], torch.finfo(tgt.dtype).min)
        self.cache.write, self.cache.live, self.cache.rows = slot, live, rows_t
        layers = None if hidden_layers is None else tgt._check_layers(hidden_layers)
        try:
            return tgt._run(ids, self.cache, layers, attention_mask=mask,
                            position_ids=L[:, None] + depth)
        finally:
            self.cache.write = self.cache.live = self.cache.rows = None

    def prefill(self, prompts: Sequence[Tensor],
                hidden_layers: Optional[Sequence[int]] = None) -> List[Optional[Tensor]]:
        """Cache every prompt but its last token (right-padded, one call); the rows' lengths
        become T_b - 1. Returns, per row, its hidden states at positions 0 .. T_b - 2
        concatenated over `hidden_layers` ((1, T_b - 1, H_f)), or None (no layers, or T_b = 1).
        """
        dev = self.target.device
        n = [int(p.shape[1]) - 1 for p in prompts]
        T = max(n)
        out: List[Optional[Tensor]] = [None] * self.batch
        if T == 0:
            return out
        ids = torch.zeros(self.batch, T, dtype=torch.int64, device=dev)
        used = torch.zeros(self.batch, T, dtype=torch.bool, device=dev)
        for b, p in enumerate(prompts):
            ids[b, :n[b]] = p[0, :n[b]]
            used[b, :n[b]] = True
        o = self.forward_nodes(ids, None, used, hidden_layers)
        self.commit([list(range(k)) for k in n])
        if o.hidden:
            hid = torch.cat(o.hidden, -1) if len(o.hidden) > 1 else o.hidden[0]
            out = [hid[b:b + 1, :n[b]] if n[b] else None for b in range(self.batch)]
        return out

    def commit(self, keep: Sequence[Sequence[int]]) -> None:
        """Keep, per row, the nodes `keep[b]` (node indices of the last forward, root first,
        increasing): their entries move to slots ``length[b] + j`` (a chain's are in place and
        do not move) and the row's length grows by ``len(keep[b])``."""
        K = max((len(k) for k in keep), default=0)
        moves = [b for b, k in enumerate(keep) if list(k) != list(range(len(k)))]
        if moves and K:
            dev = self.target.device
            src = torch.tensor([self.lengths[b] + (list(keep[b]) + list(range(len(keep[b]), K)))[j]
                                for b in range(self.batch) for j in range(K)],
                               dtype=torch.int64, device=dev).view(self.batch, K)
            dst = self._len[:, None] + torch.arange(K, device=dev)
            for store in (self.cache.keys, self.cache.values):
                for t in store:
                    B, H, _, D = t.shape
                    moved = t.gather(2, src[:, None, :, None].expand(B, H, K, D))
                    t.scatter_(2, dst[:, None, :, None].expand(B, H, K, D), moved)
        for b, k in enumerate(keep):
            self.lengths[b] += len(k)
        self._len = torch.tensor(self.lengths, dtype=torch.int64, device=self.target.device)


class NullDrafting:
    """A drafter that never drafts: the round loop over it is plain decoding of the target
    (one token per round, sampled by `ops.verify`'s bonus draw)."""

    feature_layers = None
    max_drafts = None

    def start(self, prompt: Tensor, seed: int, temperature: float,
              hidden: Optional[Tensor], filters: Optional[dict] = None) -> None:
        self._dev = prompt.device

    def draft(self, gamma: int, rnd: int) -> Any:
        from .types import Draft
        return Draft(torch.zeros(1, 0, dtype=torch.int64, device=self._dev))

    def accept(self, emitted: Tensor, n_acc: int, hidden: Optional[Tensor]) -> None:
        pass


def prefetch_blocks(drafters: Sequence[Any], gammas: Sequence[int]) -> None:
    """Compute the first denoising step of every row's coming block in one drafter pass
    (`DFlashDrafter.batch_block_logits`), for DFlash rows drafting in one step
    (`DiffusionDrafting`, alone or inside a `TreeDrafting`); each row's ``draft`` then uses
    its logits. Other drafters are left alone (they draft row by row)."""
    from .drafter.dflash import DFlashDrafter
    from .drafting import DiffusionDrafting

    rows = [getattr(d, "block", d) for d in drafters]
    for blk in rows:  # a round's prefetch never outlives it (a tree may not draft its block)
        if isinstance(blk, DiffusionDrafting):
            blk.prefetched = None
    blocks, gs = [], []
    for blk, g in zip(rows, gammas):
        if not isinstance(blk, DiffusionDrafting) or not isinstance(blk.drafter, DFlashDrafter):
            return
        if blk.steps != 1 or blk.cache is None:
            return
        g = min(g, blk.max_drafts or g)
        if g > 0:
            blocks.append(blk)
            gs.append(g)
    if len(blocks) < 2:
        return
    with torch.no_grad():
        logits = blocks[0].drafter.batch_block_logits([b.cache for b in blocks], gs)
    for blk, lg in zip(blocks, logits):
        blk.prefetched = lg


def fork_drafter(drafter: Any) -> Any:
    """A fresh copy of a drafter adapter for one more row: its own state (set by ``start``), the
    same settings and the same (shared, read-only) models."""
    fork = getattr(drafter, "fork", None)
    return fork() if callable(fork) else copy.copy(drafter)


_GOLDEN = 0x9E3779B97F4A7C15


def _solo_row_seed(seed: int) -> int:
    """The per-row seed (an int64 value) under which a row of a batched op draws what row 0 of
    a solo call with the int `seed` draws: the ops spread an int seed over rows as
    ``seed + golden * (row + 1)`` (docs/design.md, Randomness)."""
    v = (seed + _GOLDEN) & ((1 << 64) - 1)
    return v - (1 << 64) if v >= 1 << 63 else v


def _seeds(seed: Union[int, Sequence[int], None], B: int) -> List[Optional[int]]:
    if seed is None:
        return [None] * B
    if isinstance(seed, (list, tuple)):
        if len(seed) != B:
            raise ValueError(f"seed must be an int or a list of {B} ints (one per prompt), "
                             f"got a list of {len(seed)}")
        return list(seed)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, a list of ints or None, got {type(seed).__name__}")
    return [seed + i for i in range(B)]


def generate_batch(decoder: Any, drafter: Any, gamma: int, prompts: Sequence[Tensor],
                   max_new_tokens: int, temperature: float = 0.0,
                   seed: Union[int, Sequence[int], None] = None,
                   eos_token_id: Optional[int] = None, controls: Any = None,
                   max_nodes: Optional[int] = None) -> list:
    """The round loop over B prompts (see the module docstring); `decoder.generate_batch`
    calls it with its drafter adapter and gamma. Row i's seed is ``seed + i`` for an int seed
    (a solo ``generate(prompts[i], seed=seed + i)`` draws from the same streams), or
    ``seed[i]`` for a list. Returns one `GenerateResult` per prompt, in order; each row's stats
    are its own, with the batch's wall time (``seconds``) and ``batch_size``."""
    from .bench.stats import run_stats
    from .decoding import GenerateResult, SamplingControls, _cat_hidden, _emit, _setup, _streams
    from .types import Draft

    tgt = decoder.target
    if isinstance(prompts, Tensor) or not isinstance(prompts, (list, tuple)):
        raise TypeError(f"prompts must be a list of (1, T_i) tensors, got "
                        f"{type(prompts).__name__}")
    if not prompts:
        return []
    B = len(prompts)
    ctl = controls if controls is not None else SamplingControls()
    seeds = _seeds(seed, B)
    rows = [_setup(tgt, p, max_new_tokens, temperature, s, eos_token_id, ctl)
            for p, s in zip(prompts, seeds)]
    tau, eos, clock = rows[0][0], rows[0][3], rows[0][4]
    prompt = [r[1] for r in rows]
    base = [r[2] for r in rows]
    dev = tgt.device
    vseed = torch.tensor([_solo_row_seed(_streams(b)[0]) for b in base], dtype=torch.int64,
                         device=dev)
    width = (max_nodes or gamma + 1)
    bt = BatchedTarget(tgt, B, max(int(p.shape[1]) for p in prompt) + max_new_tokens + width + 1)
    drafters = [fork_drafter(drafter) for _ in range(B)]
    layers = drafter.feature_layers
    outs: List[List[int]] = [[] for _ in range(B)]
    active = [max_new_tokens > 0] * B
    seen = list(prompt)
    rounds, acc, nodes = [0] * B, [0] * B, [0] * B
    hist = [[0] * (gamma + 1) for _ in range(B)]
    if any(active):
        with clock("verify"):
            hidden = bt.prefill(prompt, layers)
        with clock("draft"):
            for b in range(B):
                drafters[b].start(prompt[b], _streams(base[b])[1], tau, hidden[b], ctl.filters)
    last = [p[:, -1:] for p in prompt]
    r = 0
    while any(active):
        with clock("draft"):
            prefetch_blocks([drafters[b] for b in range(B) if active[b]],
                            [min(gamma, max_new_tokens - len(outs[b]) - 1)
                             for b in range(B) if active[b]])
            drafts: List[Any] = []
            for b in range(B):
                if not active[b]:
                    drafts.append(None)
                    continue
                g = min(gamma, max_new_tokens - len(outs[b]) - 1)
                drafts.append(drafters[b].draft(g, r) if g > 0
                              else Draft(last[b].new_zeros((1, 0))))
        act = [b for b in range(B) if drafts[b] is not None]  # finished rows leave the batch
        ds = [drafts[b] for b in act]
        A = len(act)
        tree = any(d.parents is not None for d in ds)
        N = max(int(d.ids.shape[1]) for d in ds) + 1
        with clock("verify"):
            seq = torch.zeros(A, N, dtype=torch.int64, device=dev)
            used = torch.zeros(A, N, dtype=torch.bool, device=dev)
            par = torch.full((A, N), -1, dtype=torch.int64)
            for i, (b, d) in enumerate(zip(act, ds)):
                g = int(d.ids.shape[1])
                seq[i, 0] = last[b][0, 0]
                seq[i, 1:g + 1] = d.ids[0]
                used[i, :g + 1] = True
                if tree:
                    if d.parents is not None:
                        par[i, 1:g + 1] = d.parents[0].cpu()
                    else:  # a chain inside a tree round (point masses only)
                        par[i, 1:g + 1] = torch.arange(g)
            out = bt.forward_nodes(seq, par if tree else None, used, layers, rows=act)
            seeds_a = vseed[act] if A < B else vseed
            if tree:
                res = ops.verify_tree(out.logits, seq, par.to(dev), temperature=tau,
                                      seed=seeds_a, offset=r, check_values=False, **ctl.filters)
                flat = torch.cat([res.ids.reshape(-1), res.num_accepted, res.valid.long(),
                                  res.path.reshape(-1)]).tolist()
            else:
                logits = out.logits
                if ctl.penalized:
                    logits = torch.cat([ctl.penalize(logits[i:i + 1], seen[b], seq[i:i + 1, 1:])
                                        for i, b in enumerate(act)], 0)
                res = _verify_chains(logits, seq, ds, tau, seeds_a, r, ctl.filters)
                flat = torch.cat([res.ids.reshape(-1), res.num_accepted,
                                  res.valid.long()]).tolist()
            # the one host sync of the round, for every row
            keep: List[List[int]] = [[] for _ in range(B)]
            n_acc: List[int] = [0] * B
            for i, b in enumerate(act):
                if not flat[A * N + A + i]:
                    raise RuntimeError(f"row {b}: the target's logits held NaN / inf or no "
                                       f"finite value")
                n_acc[b] = flat[A * N + i]
                if tree:
                    pth = flat[A * N + 2 * A + i * N: A * N + 2 * A + (i + 1) * N]
                    keep[b] = [0] + pth[:n_acc[b]]
                else:
                    keep[b] = list(range(n_acc[b] + 1))
            bt.commit(keep)
        with clock("draft"):
            for i, (b, d) in enumerate(zip(act, ds)):
                n = n_acc[b]
                rounds[b] += 1
                acc[b] += n
                nodes[b] += int(d.ids.shape[1])
                if n >= len(hist[b]):
                    hist[b] += [0] * (n + 1 - len(hist[b]))
                hist[b][n] += 1
                if _emit(outs[b], flat[i * N: i * N + n + 1], eos, max_new_tokens, None):
                    active[b] = False
                    continue
                em = res.ids[i:i + 1, : n + 1]
                if ctl.penalized:
                    seen[b] = torch.cat([seen[b], em], 1)
                # this row's states at its kept nodes (not every row's, then one)
                hid = _cat_hidden(out, keep[b], row=i) if layers else None
                drafters[b].accept(em, n, hid)
                last[b] = em[:, n:n + 1]
        r += 1
    results = []
    total = clock.finish()
    for b in range(B):
        st = run_stats(_Fixed(total), len(outs[b]), rounds[b], acc[b], base[b], hist[b])
        st.update(draft_nodes=nodes[b], batch_size=B)
        results.append(GenerateResult(outs[b], st))
    return results


class _Fixed:
    """A finished clock's split, handed to `run_stats` for every row of a batch."""

    def __init__(self, split: dict) -> None:
        self.split = split

    def finish(self) -> dict:
        return dict(self.split)


def _verify_chains(logits: Tensor, seq: Tensor, drafts: list, tau: float, vseed: Tensor,
                   rnd: int, filters: dict) -> Any:
    """`ops.verify` of every row's chain, one call per distinct draft count g (usually one:
    every row at gamma), each row over its own g drafts at its own seed: the very call a solo
    round makes, so a row's draws never depend on its neighbours. Returns ids (B, G + 1),
    num_accepted (B,) and valid (B,) (finished rows: zeros, valid)."""
    from .types import VerifyResult

    B, N = seq.shape
    dev = seq.device
    ids = torch.zeros(B, N, dtype=torch.int64, device=dev)
    num = torch.zeros(B, dtype=torch.int64, device=dev)
    valid = torch.ones(B, dtype=torch.bool, device=dev)
    groups: dict = {}
    for b, d in enumerate(drafts):
        if d is not None:
            groups.setdefault(int(d.ids.shape[1]), []).append(b)
    for g, rows in groups.items():
        sel = torch.tensor(rows, dtype=torch.int64, device=dev)
        ds = [drafts[b] for b in rows]
        q = pm = None
        dtemp: Any = 1.0
        vmap = None
        if g > 0 and all(d.logits is not None for d in ds):
            q = torch.cat([d.logits for d in ds], 0)
            pm = torch.cat([d.point_mass if d.point_mass is not None
                            else torch.zeros_like(d.ids, dtype=torch.bool) for d in ds], 0)
            temps = [d.temperature for d in ds]
            if any(isinstance(t, Tensor) for t in temps) or len({float(t) for t in temps}) > 1:
                dtemp = torch.tensor([float(t) for t in temps], device=dev)
            else:
                dtemp = temps[0]
            vmap = ds[0].vocab_map
        elif g > 0:
            pm = torch.cat([d.point_mass if d.point_mass is not None
                            else torch.ones_like(d.ids, dtype=torch.bool) for d in ds], 0)
        res = ops.verify(logits[sel, :g + 1], seq[sel, 1:g + 1], q, draft_point_mass=pm,
                         temperature=tau, draft_temperature=dtemp, seed=vseed[sel], offset=rnd,
                         vocab_map=vmap, check_values=False, **filters)
        ids[sel, :g + 1] = res.ids
        num[sel] = res.num_accepted.to(torch.int64)
        valid[sel] = res.valid
    return VerifyResult(ids, num, valid)
