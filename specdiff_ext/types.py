"""Result types and enums shared by the ops (`specdiff_ext.ops`), the reference
(`specdiff_ext.reference`), the drafters' adapters (`specdiff_ext.drafting`) and the decode loop
(`specdiff_ext.decoding`).

Kept free of torch and of the compiled extension so that both layers, the tests and type
checkers can import it cheaply.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, NamedTuple, Optional

__all__ = ["CommitMode", "DenoiseResult", "GatherResult", "VerifyResult", "TreeVerifyResult", "Draft"]


class VerifyResult(NamedTuple):
    """Output of `verify` and `rejection_sample`.

    Attributes
    ----------
    ids : int64, shape (B, G+1)
        The accepted drafts, then the correction or bonus token, then -1.
        An invalid row is all -1.
    num_accepted : int64, shape (B,)
        Number of accepted drafts k (0 for an invalid row).
    valid : bool, shape (B,)
        False where a row that was read held NaN or +inf, or had no finite logit.
    """

    ids: Any
    num_accepted: Any
    valid: Any


class TreeVerifyResult(NamedTuple):
    """Output of `verify_tree`.

    Attributes
    ----------
    ids : int64, shape (B, N)
        The accepted tokens (root to deepest accepted node), then the emitted one (the
        correction, or the bonus token after a leaf), then -1. An invalid row is all -1.
    num_accepted : int64, shape (B,)
        Number of accepted tree nodes k (0 for an invalid row); ``ids[b, :k+1]`` is emitted.
    path : int64, shape (B, N)
        The node index of each accepted token (``path[b, :k]``), then -1.
    valid : bool, shape (B,)
        False where a row on the walked path held NaN or +inf, or had no finite logit.
    """

    ids: Any
    num_accepted: Any
    path: Any
    valid: Any


class GatherResult(NamedTuple):
    """Output of `gather_logprobs`.

    Attributes
    ----------
    lse : float32, shape (B, N)
        Log-sum-exp of each logits row at its temperature (max of the row at temperature 0).
    logprobs : float32, shape (B, N)
        Log-probability of the gathered id.
    """

    lse: Any
    logprobs: Any


class DenoiseResult(NamedTuple):
    """Output of `denoise_step`.

    Attributes
    ----------
    tokens : int64, shape (B, G)
        Committed positions hold their draw; all other positions are copied from the input.
    commit_step : int32, shape (B, G)
        `step` at newly committed positions; all other positions are copied from the input.
    lse : float32, shape (B, G)
        Log-sum-exp of the logits row of every position masked before this step, NaN at
        positions committed earlier.
    valid : bool, shape (B,)
        False when the logits row of a masked position was invalid (that position stays masked).
    """

    tokens: Any
    commit_step: Any
    lse: Any
    valid: Any


class CommitMode(enum.IntEnum):
    """Which masked positions `denoise_step` commits at a step.

    RANDOM: MDLM ancestral sampling, each masked position commits with probability 1/R
    (R = remaining steps). CONFIDENCE: the ceil(M/R) positions whose distributions are most
    peaked. LEFT_TO_RIGHT: the ceil(M/R) leftmost masked positions.
    """

    RANDOM = 0
    CONFIDENCE = 1
    LEFT_TO_RIGHT = 2

    @classmethod
    def parse(cls, mode: CommitMode | str | int) -> CommitMode:
        """Return the CommitMode named by `mode` (enum member, case-insensitive name or int).

        Raises
        ------
        ValueError
            If `mode` names no commit mode (the message names the argument ``mode``).
        TypeError
            If `mode` is neither a CommitMode, a str nor an int.

        Examples
        --------
        >>> CommitMode.parse("left_to_right")
        <CommitMode.LEFT_TO_RIGHT: 2>
        """
        if isinstance(mode, cls):
            return mode
        if isinstance(mode, str):
            try:
                return cls[mode.strip().upper()]
            except KeyError:
                names = ", ".join(repr(m.name.lower()) for m in cls)
                raise ValueError(f"mode must be one of {names}, got {mode!r}") from None
        if isinstance(mode, int) and not isinstance(mode, bool):
            try:
                return cls(mode)
            except ValueError:
                raise ValueError(
                    f"mode must be one of {[int(m) for m in cls]}, got {mode!r}"
                ) from None
        raise TypeError(f"mode must be a CommitMode, str or int, got {type(mode).__name__}")


@dataclass
class Draft:
    """One round's drafts, as a drafter hands them to the decode loop, with what `ops.verify`
    needs to keep the round exact.

    Attributes
    ----------
    ids : int64 tensor
        Shape: (1, g). Target ids; g may be smaller than asked (0: a plain target step).
    logits : tensor or None
        Shape: (1, g, Vd). The law each draft was drawn from (soft q); None: point masses only.
    point_mass : bool tensor or None
        Shape: (1, g). Drafts to verify as point masses (the order-aware rule,
        docs/design.md section 3).
    temperature : float
        The temperature `logits` are read at.
    vocab_map : int64 tensor or None
        Shape: (Vd,). Target id of each logits column (reduced vocabulary).
    parents : int64 tensor or None
        Shape: (1, g). A draft tree: the parent of each draft node, numbering the root (the
        last emitted token) 0 and ``ids[:, j]`` node j + 1, so ``parents[:, j]`` is in
        [0, j]. None: a chain (``parents[:, j] = j``), verified by `ops.verify` (soft q
        allowed); a tree is verified by `ops.verify_tree` (point masses).
    source : int64 tensor or None
        Shape: (1, g). Bits of where each tree node came from (`drafting.tree`: 1 the
        drafter's marginals, 2 the n-gram branch), for statistics.
    spine : int64 tensor or None
        Shape: (1, s). A tree's soft spine (`drafting.tree.walk_soft_tree`): the node
        numbers (root 0) of a chain from the root whose j-th node was drawn from
        ``logits[:, j]``; None: every node is a point mass.
    """

    ids: Any
    logits: Optional[Any] = None
    point_mass: Optional[Any] = None
    temperature: float = 0.0
    vocab_map: Optional[Any] = None
    parents: Optional[Any] = None
    source: Optional[Any] = None
    spine: Optional[Any] = None
