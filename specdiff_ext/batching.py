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
from .target import MASKED_ATTENTION, TargetOutput, _tree_ancestry

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
        self.window: Optional[int] = None  # W: the slots this call reads (0 .. W - 1)
        # (batch rows, slots) of the window that no node of this call reads: zeroed by `update`
        self.stale: Optional[tuple] = None
        self.rows: Optional[Tensor] = None  # (B',) the batch rows this call runs; None: all
        self.is_sliding = [False] * layers

    @property
    def trash(self) -> int:
        return self.slots - 1

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int,
               *args: Any, **kwargs: Any) -> tuple:
        """Write the new entries (B, nkv, T, hd) at `write` and return the layer's first W
        slots, with the `stale` ones zeroed first (in place): whatever a stale slot held (even
        NaN, which a mask would not hide: NaN + mask is NaN) never reaches the attention."""
        if self.write is None or self.window is None:
            raise RuntimeError("SlotCache.update outside a BatchedTarget forward (no write slots)")
        k, v = self.keys[layer_idx], self.values[layer_idx]
        B, H, T, D = key_states.shape
        W = self.window
        # one index_put through the (B, S, H, D) view: row r's entry t goes to slot write[r, t]
        r = (torch.arange(B, device=k.device) if self.rows is None else self.rows)[:, None]
        r = r.expand(B, T)
        k.permute(0, 2, 1, 3)[r, self.write] = key_states.permute(0, 2, 1, 3).to(k.dtype)
        v.permute(0, 2, 1, 3)[r, self.write] = value_states.permute(0, 2, 1, 3).to(v.dtype)
        if self.stale is not None and self.stale[0].numel():
            # zeroed in place, those slots only (no copy of the window): a row writes a slot
            # again before any node reads it
            zero = k.new_zeros(())
            for t in (k, v):
                t.permute(0, 2, 1, 3).index_put_(self.stale, zero)
        if self.rows is None:
            kw, vw = k[:, :, :W], v[:, :, :W]
        else:  # a subset of the rows: their windows
            kw, vw = k[:, :, :W].index_select(0, self.rows), v[:, :, :W].index_select(0, self.rows)
        return kw, vw

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
        if impl not in MASKED_ATTENTION:
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
        sb, ss = (~live).nonzero(as_tuple=True)  # the window's slots no node reads
        stale = ((rows_t[sb] if sub else sb), ss)
        self.cache.write, self.cache.window, self.cache.rows = slot, W, rows_t
        self.cache.stale = stale
        layers = None if hidden_layers is None else tgt._check_layers(hidden_layers)
        try:
            return tgt._run(ids, self.cache, layers, attention_mask=mask,
                            position_ids=L[:, None] + depth)
        finally:
            self.cache.write = self.cache.window = self.cache.rows = self.cache.stale = None

    def prefill(self, prompts: Sequence[Tensor],
                hidden_layers: Optional[Sequence[int]] = None,
                rows: Optional[Sequence[int]] = None) -> List[Optional[Tensor]]:
        """Cache every prompt but its last token (right-padded, one call) in batch rows `rows`
        (increasing, one per prompt; None: rows 0 .. B - 1, one prompt each); those rows start
        over (a row a finished request held takes the next one: its old slots are stale) and
        their lengths become T_b - 1. Returns, per prompt, its hidden states at positions
        0 .. T_b - 2 concatenated over `hidden_layers` ((1, T_b - 1, H_f)), or None (no
        layers, or T_b = 1).
        """
        dev = self.target.device
        rows = list(range(self.batch)) if rows is None else [int(b) for b in rows]
        if len(rows) != len(prompts) or sorted(set(rows)) != rows or \
                (rows and not 0 <= rows[0] <= rows[-1] < self.batch):
            raise ValueError(f"rows must be {len(prompts)} increasing batch rows in "
                             f"[0, {self.batch}), one per prompt, got {rows}")
        for b in rows:
            self.lengths[b] = 0
        self._len = torch.tensor(self.lengths, dtype=torch.int64, device=dev)
        n = [int(p.shape[1]) - 1 for p in prompts]
        out: List[Optional[Tensor]] = [None] * len(prompts)
        T = max(n, default=0)
        if T == 0:
            return out
        P = len(prompts)
        ids = torch.zeros(P, T, dtype=torch.int64, device=dev)
        used = torch.zeros(P, T, dtype=torch.bool, device=dev)
        for i, p in enumerate(prompts):
            ids[i, :n[i]] = p[0, :n[i]]
            used[i, :n[i]] = True
        o = self.forward_nodes(ids, None, used, hidden_layers, rows=rows)
        keep: List[List[int]] = [[] for _ in range(self.batch)]
        for b, k in zip(rows, n):
            keep[b] = list(range(k))
        self.commit(keep)
        if o.hidden:
            hid = torch.cat(o.hidden, -1) if len(o.hidden) > 1 else o.hidden[0]
            out = [hid[i:i + 1, :n[i]] if n[i] else None for i in range(P)]
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
    (one token per round, sampled by `ops.verify`'s bonus draw).

    budget, speculation: reported in a call's stats when given (a speculative decoder whose
    calibration turned speculation off: budget 0 and why)."""

    feature_layers = None
    max_drafts = 0

    def __init__(self, budget: Optional[int] = None, speculation: Optional[str] = None) -> None:
        self.budget, self.speculation = budget, speculation

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
    (`DFlashDrafter.batch_block_logits`), for rows of the DFlash drafter drafting in one step
    (`DiffusionDrafting`, alone or inside a `TreeDrafting`); each row's ``draft`` then uses
    its logits. Other drafters are left alone (they draft row by row)."""
    from .drafting import DiffusionDrafting

    rows = [getattr(d, "block", d) for d in drafters]
    for blk in rows:  # a round's prefetch never outlives it (a tree may not draft its block)
        if isinstance(blk, DiffusionDrafting):
            blk.prefetched = None
    blocks, gs = [], []
    for blk, g in zip(rows, gammas):
        if not isinstance(blk, DiffusionDrafting):
            return
        if blk.steps != 1 or blk.cache is None:
            return
        g = min(g, blk.max_drafts)
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


def check_max_batch_size(max_batch_size: Optional[int], B: int) -> int:
    """Rows in flight for B prompts: `max_batch_size` (an int >= 1, or None: all B)."""
    if max_batch_size is None:
        return B
    if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int):
        raise TypeError(f"max_batch_size must be an int or None, got "
                        f"{type(max_batch_size).__name__}")
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
    return min(max_batch_size, B)


def generate_batch(decoder: Any, drafter: Any, gamma: int, prompts: Sequence[Tensor],
                   max_new_tokens: int, temperature: float = 0.0,
                   seed: Union[int, Sequence[int], None] = None,
                   eos_token_id: Optional[int] = None, controls: Any = None,
                   max_nodes: Optional[int] = None,
                   max_batch_size: Optional[int] = None) -> list:
    """The round loop over the prompts (see the module docstring); `decoder.generate_batch`
    calls it with its drafter adapter and gamma. Row i's seed is ``seed + i`` for an int seed
    (a solo ``generate(prompts[i], seed=seed + i)`` draws from the same streams), or
    ``seed[i]`` for a list.

    max_batch_size: at most this many prompts in flight (None: all of them). The others wait
    in prompt order; when a row finishes, the next waiting prompt takes its batch row at the
    end of that round (its prefill is one target call over the rows that start together), so
    the batch stays full (continuous batching). Every prompt runs its own rounds: its drafter,
    its streams and its round count (the verify offset), exactly as decoded alone.

    Returns one `GenerateResult` per prompt, in order; each row's stats are its own, with the
    whole call's wall time (``seconds``) and ``batch_size`` (rows in flight)."""
    from .bench.stats import run_stats
    from .decoding import GenerateResult, SamplingControls, _cat_hidden, _emit, _setup, _streams
    from .types import Draft

    tgt = decoder.target
    if isinstance(prompts, Tensor) or not isinstance(prompts, (list, tuple)):
        raise TypeError(f"prompts must be a list of (1, T_i) tensors, got "
                        f"{type(prompts).__name__}")
    if not prompts:
        check_max_batch_size(max_batch_size, 0)
        return []
    B = len(prompts)
    R = check_max_batch_size(max_batch_size, B)
    ctl = controls if controls is not None else SamplingControls()
    seeds = _seeds(seed, B)
    setups = [_setup(tgt, p, max_new_tokens, temperature, s, eos_token_id, ctl)
              for p, s in zip(prompts, seeds)]
    tau, eos, clock = setups[0][0], setups[0][3], setups[0][4]
    prompt = [r[1] for r in setups]
    base = [r[2] for r in setups]
    dev = tgt.device
    vseed = torch.tensor([_solo_row_seed(_streams(b)[0]) for b in base], dtype=torch.int64,
                         device=dev)
    width = (max_nodes or gamma + 1)
    bt = BatchedTarget(tgt, R, max(int(p.shape[1]) for p in prompt) + max_new_tokens + width + 1)
    layers = drafter.feature_layers
    # per prompt (request q): its drafter, output, counters, text for the penalty, last token
    drafters: List[Any] = [None] * B
    outs: List[List[int]] = [[] for _ in range(B)]
    seen = list(prompt)
    rounds, acc, nodes = [0] * B, [0] * B, [0] * B
    hist = [[0] * (gamma + 1) for _ in range(B)]
    last = [p[:, -1:] for p in prompt]
    waiting = list(range(B)) if max_new_tokens > 0 else []
    held = [-1] * R  # the request each batch row decodes (-1: free)

    def admit() -> None:
        """The next waiting prompts into the free rows: one prefill call, then their drafters."""
        take = []
        for row in range(R):
            if held[row] < 0 and waiting:
                held[row] = waiting.pop(0)
                take.append(row)
        if not take:
            return
        qs = [held[row] for row in take]
        with clock("verify"):
            hidden = bt.prefill([prompt[q] for q in qs], layers, rows=take)
        with clock("draft"):
            for q, h in zip(qs, hidden):
                drafters[q] = fork_drafter(drafter)
                drafters[q].start(prompt[q], _streams(base[q])[1], tau, h, ctl.filters)

    admit()
    while any(q >= 0 for q in held):
        act = [row for row in range(R) if held[row] >= 0]  # free rows sit the round out
        qa = [held[row] for row in act]
        A = len(act)
        with clock("draft"):
            lim = [min(gamma, max_new_tokens - len(outs[q]) - 1) for q in qa]
            prefetch_blocks([drafters[q] for q in qa], lim)
            ds = [drafters[q].draft(g, rounds[q]) if g > 0 else Draft(last[q].new_zeros((1, 0)))
                  for q, g in zip(qa, lim)]
        tree = any(d.parents is not None for d in ds)
        N = max(int(d.ids.shape[1]) for d in ds) + 1
        with clock("verify"):
            seq = torch.zeros(A, N, dtype=torch.int64, device=dev)
            used = torch.zeros(A, N, dtype=torch.bool, device=dev)
            par = torch.full((A, N), -1, dtype=torch.int64)
            for i, (q, d) in enumerate(zip(qa, ds)):
                g = int(d.ids.shape[1])
                seq[i, 0] = last[q][0, 0]
                seq[i, 1:g + 1] = d.ids[0]
                used[i, :g + 1] = True
                if tree:
                    if d.parents is not None:
                        par[i, 1:g + 1] = d.parents[0].cpu()
                    else:  # a chain inside a tree round (point masses only)
                        par[i, 1:g + 1] = torch.arange(g)
            out = bt.forward_nodes(seq, par if tree else None, used, layers,
                                   rows=act if A < R else None)
            seeds_a = vseed[qa]
            offs = [rounds[q] for q in qa]  # each prompt's own round: its solo verify offset
            if tree:
                res = _verify_trees(out.logits, seq, par.to(dev), ds, tau, seeds_a, offs,
                                    ctl.filters)
                flat = torch.cat([res.ids.reshape(-1), res.num_accepted, res.valid.long(),
                                  res.path.reshape(-1)]).tolist()
            else:
                logits = out.logits
                if ctl.penalized:
                    logits = torch.cat([ctl.penalize(logits[i:i + 1], seen[q], seq[i:i + 1, 1:])
                                        for i, q in enumerate(qa)], 0)
                res = _verify_chains(logits, seq, ds, tau, seeds_a, offs, ctl.filters)
                flat = torch.cat([res.ids.reshape(-1), res.num_accepted,
                                  res.valid.long()]).tolist()
            # the one host sync of the round, for every row
            keep: List[List[int]] = [[] for _ in range(R)]
            n_acc: List[int] = [0] * A
            for i, (row, q) in enumerate(zip(act, qa)):
                if not flat[A * N + A + i]:
                    raise RuntimeError(f"prompt {q}: the target's logits held NaN / inf or no "
                                       f"finite value")
                n_acc[i] = flat[A * N + i]
                if tree:
                    pth = flat[A * N + 2 * A + i * N: A * N + 2 * A + (i + 1) * N]
                    keep[row] = [0] + pth[:n_acc[i]]
                else:
                    keep[row] = list(range(n_acc[i] + 1))
            bt.commit(keep)
        with clock("draft"):
            for i, (row, q, d) in enumerate(zip(act, qa, ds)):
                n = n_acc[i]
                rounds[q] += 1
                acc[q] += n
                nodes[q] += int(d.ids.shape[1])
                if n >= len(hist[q]):
                    hist[q] += [0] * (n + 1 - len(hist[q]))
                hist[q][n] += 1
                if _emit(outs[q], flat[i * N: i * N + n + 1], eos, max_new_tokens, None):
                    held[row] = -1  # done: the row is free for the next waiting prompt
                    drafters[q] = None
                    continue
                em = res.ids[i:i + 1, : n + 1]
                if ctl.penalized:
                    seen[q] = torch.cat([seen[q], em], 1)
                # this row's states at its kept nodes (not every row's, then one)
                hid = _cat_hidden(out, keep[row], row=i) if layers else None
                drafters[q].accept(em, n, hid)
                last[q] = em[:, n:n + 1]
        if waiting and min(held) < 0:
            admit()
    results = []
    total = clock.finish()
    for q in range(B):
        st = run_stats(_Fixed(total), len(outs[q]), rounds[q], acc[q], base[q], hist[q])
        st.update(draft_nodes=nodes[q], batch_size=R)
        if getattr(drafter, "speculation", None):
            st["speculation"] = drafter.speculation
        results.append(GenerateResult(outs[q], st))
    return results


class _Fixed:
    """A finished clock's split, handed to `run_stats` for every row of a batch."""

    def __init__(self, split: dict) -> None:
        self.split = split

    def finish(self) -> dict:
        return dict(self.split)


def _groups(keys: Sequence[Any]) -> dict:
    """Row indices by key, in first-seen order."""
    out: dict = {}
    for i, k in enumerate(keys):
        out.setdefault(k, []).append(i)
    return out


def _verify_trees(logits: Tensor, seq: Tensor, par: Tensor, drafts: list, tau: float,
                  vseed: Tensor, offsets: Sequence[int], filters: dict) -> Any:
    """Every row's tree walk, each at its own seed and its own round: the call its solo round
    makes. Rows whose tree carries a soft spine go through `drafting.tree.walk_soft_tree`
    (one host sync each); the others through `ops.verify_tree`, one call per distinct round
    offset (one call while every row started together)."""
    from .drafting.tree import walk_soft_tree
    from .types import TreeVerifyResult

    spined = [i for i, d in enumerate(drafts) if d.spine is not None]
    plain = [i for i, d in enumerate(drafts) if d.spine is None]
    groups = _groups([offsets[i] for i in plain])
    if not spined and len(groups) == 1:
        return ops.verify_tree(logits, seq, par, temperature=tau, seed=vseed, offset=offsets[0],
                               check_values=False, **filters)
    B, N = seq.shape
    dev = seq.device
    ids = torch.full((B, N), -1, dtype=torch.int64, device=dev)
    path = torch.full((B, N), -1, dtype=torch.int64, device=dev)
    num = torch.zeros(B, dtype=torch.int64, device=dev)
    valid = torch.ones(B, dtype=torch.bool, device=dev)
    for off, at in groups.items():
        sel = torch.tensor([plain[j] for j in at], dtype=torch.int64, device=dev)
        r = ops.verify_tree(logits[sel], seq[sel], par[sel], temperature=tau, seed=vseed[sel],
                            offset=off, check_values=False, **filters)
        ids[sel], path[sel] = r.ids, r.path
        num[sel], valid[sel] = r.num_accepted.to(torch.int64), r.valid
    for i in spined:
        r = walk_soft_tree(logits[i:i + 1], seq[i:i + 1], par[i:i + 1], drafts[i],
                           temperature=tau, seed=vseed[i:i + 1], offset=offsets[i],
                           filters=filters)
        ids[i], path[i] = r.ids[0], r.path[0]
        num[i], valid[i] = r.num_accepted[0], r.valid[0]
    return TreeVerifyResult(ids, num, path, valid)


def _verify_chains(logits: Tensor, seq: Tensor, drafts: list, tau: float, vseed: Tensor,
                   offsets: Sequence[int], filters: dict) -> Any:
    """`ops.verify` of every row's chain, one call per distinct (draft count g, round offset)
    (usually one: every row at gamma, all started together), each row over its own g drafts at
    its own seed and round: the very call a solo round makes, so a row's draws never depend on
    its neighbours. Returns ids (B, G + 1), num_accepted (B,) and valid (B,)."""
    from .types import VerifyResult

    B, N = seq.shape
    dev = seq.device
    ids = torch.zeros(B, N, dtype=torch.int64, device=dev)
    num = torch.zeros(B, dtype=torch.int64, device=dev)
    valid = torch.ones(B, dtype=torch.bool, device=dev)
    groups = _groups([(int(d.ids.shape[1]), int(o)) for d, o in zip(drafts, offsets)])
    for (g, rnd), rows in groups.items():
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
