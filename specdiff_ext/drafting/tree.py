"""Draft trees: a best-first expansion of a block drafter's per-position marginals under a node
budget, with prompt lookup's n-gram continuation as a further branch (docs/design.md, section 5).

One target forward scores every node (`TargetModel.forward_tree`) and `ops.verify_tree` walks
the tree. The tree is a function of the drafter's block logits and of the text so far, fixed
before the target's draws, so the walk is exact at every temperature.
"""

from __future__ import annotations

import heapq
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from ..types import Draft
from .diffusion import DiffusionDrafting
from .ngram import PromptLookup, lookup_ngram

__all__ = ["TreeDrafting", "best_first_tree", "SOURCE_DRAFTER", "SOURCE_NGRAM", "check_budget"]

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
    g, K = logprobs.shape
    if g == 0 or K == 0 or budget <= 0:
        return
    lp = logprobs.tolist()
    tk = ids.tolist()
    # (-score, tie, parent node, parent score, position, rank)
    heap: List[tuple] = [(-lp[0][0], 0, 0, 0.0, 0, 0)]
    tie, added = 1, 0
    while heap and added < budget:
        neg, _, par, pscore, pos, rank = heapq.heappop(heap)
        node, created = tree.child(par, tk[pos][rank], SOURCE_DRAFTER)
        added += created
        if rank + 1 < K:
            heapq.heappush(heap, (-(pscore + lp[pos][rank + 1]), tie, par, pscore, pos, rank + 1))
            tie += 1
        if pos + 1 < g:
            heapq.heappush(heap, (neg - lp[pos + 1][0], tie, node, -neg, pos + 1, 0))
            tie += 1


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
    """

    def __init__(self, block: Optional[DiffusionDrafting], budget: int,
                 lookup: Optional[PromptLookup] = None, ngram_len: int = 8, topk: int = 8) -> None:
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
        self.feature_layers = block.feature_layers if block is not None else None
        depth = [ngram_len] if lookup is not None else []
        if block is not None:
            depth.append(block.max_drafts)
        self.max_drafts: Optional[int] = max(depth) if depth else None
        # what a call that needs chain drafts (repetition penalties) drafts with instead
        self.chain_drafter = block if block is not None else lookup

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
        if self.lookup is not None and gamma > 0:
            n = min(gamma, self.ngram_len, self.budget)
            found = lookup_ngram(self.lookup._text, n, self.lookup.max_ngram, self.lookup.min_ngram)
            node = 0
            for t in found:
                node, _ = tree.child(node, int(t), SOURCE_NGRAM)
        left = self.budget - tree.size()
        if self.block is not None and left > 0 and gamma > 0:
            g = min(gamma, self.block.max_drafts)
            logits = self.block.marginals(g, rnd)  # (1, g, Vd)
            lp = torch.log_softmax(logits[0].float(), dim=-1)
            k = min(self.topk, lp.shape[-1])
            top = lp.topk(k, dim=-1)  # (g, k), sorted
            ids = top.indices
            vmap = getattr(self.block.drafter, "vocab_map", None)  # drafter column -> target id
            if vmap is not None:
                ids = vmap.to(ids.device)[ids]
            best_first_tree(tree, top.values.cpu(), ids.cpu(), left)
        n = tree.size()
        dev = self._dev
        ids_t = torch.tensor(tree.tokens[1:], dtype=torch.int64, device=dev).view(1, n)
        par_t = torch.tensor(tree.parents[1:], dtype=torch.int64, device=dev).view(1, n)
        src_t = torch.tensor(tree.source[1:], dtype=torch.int64).view(1, n)
        return Draft(ids_t, None, torch.ones_like(ids_t, dtype=torch.bool), 0.0, None,
                     parents=par_t, source=src_t)

    def accept(self, emitted: Tensor, n_acc: int, hidden: Optional[Tensor]) -> None:
        if self.block is not None:
            self.block.accept(emitted, n_acc, hidden)
        if self.lookup is not None:
            self.lookup.accept(emitted, n_acc, hidden)
