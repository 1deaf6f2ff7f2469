"""Draft trees: a best-first expansion of a block drafter's per-position marginals under a node
budget, with prompt lookup's n-gram continuation as a further branch (docs/design.md, section 5).

One target forward scores every node (`TargetModel.forward_tree`) and `ops.verify_tree` walks
the tree. The tree is a function of the drafter's block logits and of the text so far, fixed
before the target's draws, so the walk is exact at every temperature.

At temperature > 0 the tree also carries a soft spine: the block drafter's sampled chain
(each position drawn from its marginal q), merged into the tree from the root. `walk_soft_tree`
verifies it with the chain rule of `ops.verify` (accept with min(1, p/q), else draw from the
residual max(p - q, 0)) and matches the drawn token against the deterministic siblings, then
walks on with `ops.verify_tree` (docs/design.md, section 5).
"""

from __future__ import annotations

import heapq
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .. import ops
from ..types import Draft, TreeVerifyResult
from .diffusion import DiffusionDrafting
from .ngram import PromptLookup, lookup_ngram

__all__ = ["TreeDrafting", "best_first_tree", "walk_soft_tree", "SOURCE_DRAFTER", "SOURCE_NGRAM",
           "check_budget"]

SOURCE_DRAFTER = 1  # bit of a node proposed by the block drafter's marginals
SOURCE_NGRAM = 2    # bit of a node on the n-gram branch
MAX_BUDGET = 1024


def check_budget(budget: Any, name: str = "tree_budget") -> int:
    """A node budget: an int in [0, MAX_BUDGET] (0: the plain chain)."""
    if isinstance(budget, bool) or not isinstance(budget, int) or not 0 <= budget <= MAX_BUDGET:
        raise ValueError(f"{name} must be an int in [0, {MAX_BUDGET}] (draft tree nodes per "
                         f"round; 0: the plain chain), got {budget!r}")
    return budget


class _Tree:
    """Nodes in creation order (parents first); node 0 is the root."""

    def __init__(self) -> None:
        self.tokens: List[int] = [0]
        self.parents: List[int] = [-1]
        self.source: List[int] = [0]
        self.kids: Dict[Tuple[int, int], int] = {}

    def child(self, parent: int, token: int, source: int) -> Tuple[int, bool]:
        """The child of `parent` carrying `token` (created when new); (node, created)."""
        key = (parent, token)
        node = self.kids.get(key)
        if node is not None:
            self.source[node] |= source
            return node, False
        node = len(self.tokens)
        self.tokens.append(token)
        self.parents.append(parent)
        self.source.append(source)
        self.kids[key] = node
        return node, True

    def size(self) -> int:
        return len(self.tokens) - 1


def best_first_tree(tree: _Tree, logprobs: Tensor, ids: Tensor, budget: int) -> None:
    """Adds up to `budget` nodes to `tree`: the paths of highest product probability when
    block position k proposes ``ids[k, r]`` with log-probability ``logprobs[k, r]`` (sorted
    by rank r), independently of the positions before it (a block's marginals). A node at
    depth k + 1 takes position k. Nodes already in the tree (the n-gram branch) are reused
    without spending the budget.

    Shape:
        logprobs, ids: (g, K), ranks sorted by decreasing log-probability.
    """
    if budget <= 0:
        return
    added = 0
    for _ in best_first_nodes(tree, logprobs, ids):
        added += 1
        if added >= budget:
            return


def best_first_nodes(tree: _Tree, logprobs: Tensor, ids: Tensor) -> Iterator[int]:
    """`best_first_tree` one node at a time: yields each node it creates, in the order of
    the expansion (reused nodes are passed over), until the ranks run out."""
    g, K = logprobs.shape
    if g == 0 or K == 0:
        return
    lp = logprobs.tolist()
    tk = ids.tolist()
    # (-score, tie, parent node, parent score, position, rank)
    heap: List[tuple] = [(-lp[0][0], 0, 0, 0.0, 0, 0)]
    tie = 1
    while heap:
        neg, _, par, pscore, pos, rank = heapq.heappop(heap)
        node, created = tree.child(par, tk[pos][rank], SOURCE_DRAFTER)
        if rank + 1 < K:
            heapq.heappush(heap, (-(pscore + lp[pos][rank + 1]), tie, par, pscore, pos, rank + 1))
            tie += 1
        if pos + 1 < g:
            heapq.heappush(heap, (neg - lp[pos + 1][0], tie, node, -neg, pos + 1, 0))
            tie += 1
        if created:
            yield node


def _ngram_nodes(tree: _Tree, tokens: Sequence[int]) -> Iterator[int]:
    """The n-gram continuation as a branch from the root, one created node at a time (nodes
    already in the tree are passed over)."""
    node = 0
    for t in tokens:
        node, created = tree.child(node, int(t), SOURCE_NGRAM)
        if created:
            yield node


# The walk below the spine draws from its own Philox streams: `offset` with this bit set, a
# range no round's `offset` (its round number) reaches.
SUBTREE_STREAM = 1 << 55


def walk_soft_tree(target_logits: Tensor, tokens: Tensor, parents: Tensor, draft: Draft, *,
                   temperature: float, seed: Any, offset: int,
                   filters: Optional[dict] = None) -> TreeVerifyResult:
    """Verify one draft tree with a soft spine (`TreeDrafting` at temperature > 0).

    The spine (``draft.spine``: a chain of nodes from the root, node ``spine[j]`` drawn from
    the drafter's law ``draft.logits[:, j]``) is verified by `ops.verify`: each spine node is
    accepted with min(1, p/q); at the first rejection the token is drawn from the residual
    max(p - q, 0) (point-mass positions: from p without the draft), and after the whole spine
    from p. That token is emitted as it is, or, when a deterministic child of the spine node
    where the chain stopped carries it, accepted there; the walk then goes on below that child
    with `ops.verify_tree` (a sample-and-match walk over the deterministic subtree, on the
    streams of ``offset | SUBTREE_STREAM``).

    Exact at every temperature: at each node the token leaving it is a draw of the target's
    law given the path (the spine draws are independent of everything that decides whether the
    walk reaches their parent, since the deterministic nodes were chosen before them), and
    which child it leads to is a function of that token.

    Shapes:
        target_logits: (1, N, V), row i for the token after node i; tokens, parents: (1, N)
        with node 0 the root (``parents[0, 0] = -1``; -1 also marks unused nodes); seed an
        int or a (1,) int64 tensor, as the ops take it. Returns `TreeVerifyResult` of one row.
    """
    if draft.spine is None or draft.logits is None:
        raise ValueError("walk_soft_tree needs a draft with a soft spine (draft.spine, draft.logits)")
    if target_logits.shape[0] != 1:
        raise ValueError(f"walk_soft_tree verifies one row, got {target_logits.shape[0]}")
    filters = filters or {}
    N = tokens.shape[1]
    dev = target_logits.device
    spine = [0] + draft.spine[0].tolist()
    g = len(spine) - 1
    sp = torch.tensor(spine, dtype=torch.int64, device=dev)
    pm = draft.point_mass[:, sp[1:] - 1] if draft.point_mass is not None else None
    res = ops.verify(target_logits[:, sp], tokens[:, sp[1:]], draft.logits[:, :g],
                     draft_point_mass=pm, temperature=temperature,
                     draft_temperature=draft.temperature, seed=seed, offset=offset,
                     vocab_map=draft.vocab_map, check_values=False, **filters)
    flat = torch.cat([res.ids[0], res.num_accepted, res.valid.long()]).tolist()  # host sync
    k, ok = flat[g + 1], flat[g + 2]
    ids = flat[: k + 1]
    path = spine[1: k + 1]
    out_ids = torch.full((1, N), -1, dtype=torch.int64, device=dev)
    out_path = torch.full((1, N), -1, dtype=torch.int64, device=dev)
    invalid = TreeVerifyResult(out_ids, torch.zeros(1, dtype=torch.int64, device=dev), out_path,
                               torch.zeros(1, dtype=torch.bool, device=dev))
    if not ok:
        return invalid
    par = parents[0].tolist()
    tok = tokens[0].tolist()
    at, x = spine[k], ids[k]
    nxt = spine[k + 1] if k < g else -1
    child = next((i for i in range(at + 1, N) if par[i] == at and tok[i] == x and i != nxt), -1)
    if child >= 0:  # a deterministic child carries the drawn token: walk on below it
        sub = [child]
        inside = {child}
        for i in range(child + 1, N):
            if par[i] in inside:
                sub.append(i)
                inside.add(i)
        where = {v: j for j, v in enumerate(sub)}
        sub_par = torch.tensor([-1] + [where[par[i]] for i in sub[1:]], dtype=torch.int64,
                               device=dev).view(1, -1)
        st = torch.tensor(sub, dtype=torch.int64, device=dev)
        r = ops.verify_tree(target_logits[:, st], tokens[:, st], sub_par, temperature=temperature,
                            seed=seed, offset=offset | SUBTREE_STREAM, check_values=False,
                            **filters)
        ns = len(sub)
        rf = torch.cat([r.ids[0], r.path[0], r.num_accepted, r.valid.long()]).tolist()
        m = rf[2 * ns]
        if not rf[2 * ns + 1]:
            return invalid
        path = path + [child] + [sub[j] for j in rf[ns: ns + m]]
        ids = ids + rf[: m + 1]
    n = len(path)
    out_ids[0, : n + 1] = torch.tensor(ids, dtype=torch.int64)
    if n:
        out_path[0, :n] = torch.tensor(path, dtype=torch.int64)
    return TreeVerifyResult(out_ids, torch.tensor([n], dtype=torch.int64, device=dev), out_path,
                            torch.ones(1, dtype=torch.bool, device=dev))


class TreeDrafting:
    """Draft trees from a block drafter's marginals and, optionally, prompt lookup.

    Each round: the n-gram continuation of the text so far (up to ``ngram_len`` tokens, the
    longest suffix match of ``max_ngram`` down to ``min_ngram`` tokens) becomes a branch from
    the root, then the block drafter's marginals (one block, `DiffusionDrafting`) fill the rest
    of the budget best-first (`best_first_tree`).

    Parameters
    ----------
    block : DiffusionDrafting or None
        The block drafter (None: n-gram branches only).
    budget : int
        Draft nodes per round (the root, the last emitted token, not counted), >= 1.
    lookup : PromptLookup or None
        The n-gram source (None: the drafter's marginals only).
    ngram_len : int
        The longest n-gram branch.
    topk : int
        Ranks of each block position considered (the expansion's width).
    soft_spine : bool
        At temperature > 0, spend ``min(g, budget)`` of the nodes on the block drafter's
        sampled chain (the soft spine, verified by `walk_soft_tree`); the n-gram branch and
        the best-first expansion share the rest. The spine is merged into the tree after the
        deterministic nodes, so which deterministic nodes exist never depends on its draws.
        Greedy rounds and penalised calls are unaffected.
    """

    def __init__(self, block: Optional[DiffusionDrafting], budget: int,
                 lookup: Optional[PromptLookup] = None, ngram_len: int = 8, topk: int = 8,
                 soft_spine: bool = True) -> None:
        if block is None and lookup is None:
            raise ValueError("a tree drafter needs a block drafter, prompt lookup or both")
        budget = check_budget(budget, "budget")
        if budget < 1:
            raise ValueError("budget must be >= 1 for a tree drafter (0 is the plain chain)")
        for name, v in (("ngram_len", ngram_len), ("topk", topk)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        self.block, self.lookup, self.budget = block, lookup, budget
        self.ngram_len, self.topk = ngram_len, topk
        self.soft_spine = bool(soft_spine)
        self.feature_layers = block.feature_layers if block is not None else None
        depth = [ngram_len] if lookup is not None else []
        if block is not None:
            depth.append(block.max_drafts)
        self.max_drafts: Optional[int] = max(depth) if depth else None
        # what a call that needs chain drafts (repetition penalties) drafts with instead
        self.chain_drafter = block if block is not None else lookup

    @property
    def draws_spine(self) -> bool:
        """Whether this call's trees carry a soft spine (after `start`: the block drafter
        samples, at a draft temperature > 0). Such trees are not budget prefixes of one
        another, so the decode loop reports no ``accepted_by_budget`` for them."""
        return self.soft_spine and self.block is not None and getattr(self.block, "_dtau", 0) > 0

    @property
    def cache(self) -> Any:
        """The block drafter's context cache (None without one)."""
        return self.block.cache if self.block is not None else None

    def fork(self) -> "TreeDrafting":
        """A fresh adapter with the same settings and models and its own state (a batch row)."""
        import copy

        new = copy.copy(self)
        new.block = copy.copy(self.block) if self.block is not None else None
        new.lookup = copy.copy(self.lookup) if self.lookup is not None else None
        new.chain_drafter = new.block if new.block is not None else new.lookup
        return new

    @property
    def last_logits(self) -> Optional[Tensor]:
        """The last block's drafter logits (`DiffusionDrafting.last_logits`)."""
        return self.block.last_logits if self.block is not None else None

    @property
    def drafter(self) -> Any:
        """The block drafter's model (None without one)."""
        return self.block.drafter if self.block is not None else None

    def start(self, prompt: Tensor, seed: int, temperature: float,
              hidden: Optional[Tensor], filters: Optional[dict] = None) -> None:
        self._dev = prompt.device
        if self.block is not None:
            self.block.start(prompt, seed, temperature, hidden, filters)
        if self.lookup is not None:
            self.lookup.start(prompt, seed, temperature, hidden, filters)

    def draft(self, gamma: int, rnd: int) -> Draft:
        tree = _Tree()
        g = min(gamma, self.block.max_drafts) if self.block is not None else 0
        # the soft spine: the block's sampled chain (temperature > 0 only; one drafter pass
        # gives both the draws and the marginals the best-first expansion reads)
        chain = self.block.draft(min(g, self.budget), rnd) if self.draws_spine and g > 0 \
            else None
        spine_len = chain.ids.shape[1] if chain is not None else 0
        budget = self.budget - spine_len  # the deterministic nodes' share
        # the n-gram branch and the drafter's best-first expansion take turns, a node each
        # (the order does not depend on the budget: a tree of b nodes is nodes 1 .. b of any
        # larger one, which `accepted_by_budget` reads)
        sources: List[Iterator[int]] = []
        if self.lookup is not None and gamma > 0 and budget > 0:
            n = min(gamma, self.ngram_len, budget)
            found = lookup_ngram(self.lookup._text, n, self.lookup.max_ngram, self.lookup.min_ngram)
            sources.append(_ngram_nodes(tree, found))
        if self.block is not None and budget > 0 and g > 0:
            logits = self.block.last_logits if chain is not None else self.block.marginals(g, rnd)
            lp = torch.log_softmax(logits[0].float(), dim=-1)  # (g', Vd)
            k = min(self.topk, lp.shape[-1])
            top = lp.topk(k, dim=-1)  # (g', k), sorted
            ids = top.indices
            vmap = getattr(self.block.drafter, "vocab_map", None)  # drafter column -> target id
            if vmap is not None:
                ids = vmap.to(ids.device)[ids]
            sources.append(best_first_nodes(tree, top.values.cpu(), ids.cpu()))
        while sources and tree.size() < budget:
            for src in list(sources):
                if tree.size() >= budget:
                    break
                if next(src, None) is None:
                    sources.remove(src)
        spine: List[int] = []
        if chain is not None:  # merged last: a spine token equal to a node's reuses it
            node = 0
            for t in chain.ids[0].tolist():
                node, _ = tree.child(node, int(t), SOURCE_DRAFTER)
                spine.append(node)
        n = tree.size()
        dev = self._dev
        ids_t = torch.tensor(tree.tokens[1:], dtype=torch.int64, device=dev).view(1, n)
        par_t = torch.tensor(tree.parents[1:], dtype=torch.int64, device=dev).view(1, n)
        src_t = torch.tensor(tree.source[1:], dtype=torch.int64).view(1, n)
        pm = torch.ones((1, n), dtype=torch.bool, device=dev)
        if chain is None:
            return Draft(ids_t, None, pm, 0.0, None, parents=par_t, source=src_t)
        spine_t = torch.tensor(spine, dtype=torch.int64, device=dev)
        cpm = chain.point_mass if chain.point_mass is not None else \
            torch.zeros((1, spine_len), dtype=torch.bool, device=dev)
        pm[0, spine_t - 1] = cpm[0].to(dev)  # a spine node keeps its chain position's rule
        return Draft(ids_t, chain.logits, pm, chain.temperature, chain.vocab_map,
                     parents=par_t, source=src_t, spine=spine_t.view(1, -1))

    def accept(self, emitted: Tensor, n_acc: int, hidden: Optional[Tensor]) -> None:
        if self.block is not None:
            self.block.accept(emitted, n_acc, hidden)
        if self.lookup is not None:
            self.lookup.accept(emitted, n_acc, hidden)
