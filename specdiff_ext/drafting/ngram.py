"""Prompt-lookup drafting: n-grams of the text so far, no model."""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import Tensor

from ..defaults import DEFAULTS
from ..types import Draft

__all__ = ["PromptLookup", "lookup_ngram"]


class PromptLookup:
    """Prompt-lookup drafting: the tokens that followed the most recent earlier occurrence of
    the text's last n tokens (n = max_ngram down to min_ngram) in the prompt and the output;
    none when nothing matches. The drafts are a function of the text so far, so they are point
    masses and verification is exact at every temperature.

    Parameters
    ----------
    max_ngram, min_ngram : int, optional
        The suffix lengths tried, longest first. None: `DEFAULTS.pld_max_ngram` /
        `DEFAULTS.pld_min_ngram`.
    """

    feature_layers = None
    max_drafts = None

    def __init__(self, max_ngram: Optional[int] = None, min_ngram: Optional[int] = None) -> None:
        max_ngram = DEFAULTS.pld_max_ngram if max_ngram is None else max_ngram
        min_ngram = DEFAULTS.pld_min_ngram if min_ngram is None else min_ngram
        for name, v in (("max_ngram", max_ngram), ("min_ngram", min_ngram)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if min_ngram > max_ngram:
            raise ValueError(f"min_ngram must be <= max_ngram, got {min_ngram} > {max_ngram}")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def start(self, prompt: Tensor, seed: int, temperature: float,
              hidden: Optional[Tensor], filters: Optional[dict] = None) -> None:
        self._text: List[int] = prompt[0].tolist()
        self._dev = prompt.device

    def draft(self, gamma: int, rnd: int) -> Draft:
        found = lookup_ngram(self._text, gamma, self.max_ngram, self.min_ngram)
        ids = torch.tensor([found], dtype=torch.int64, device=self._dev).view(1, len(found))
        return Draft(ids, None, torch.ones_like(ids, dtype=torch.bool))

    def accept(self, emitted: Tensor, n_acc: int, hidden: Optional[Tensor]) -> None:
        self._text.extend(emitted[0].tolist())


def lookup_ngram(text: Sequence[int], gamma: int, max_ngram: int = 3,
                 min_ngram: int = 1) -> List[int]:
    """Up to `gamma` tokens that followed the most recent earlier occurrence of the longest
    suffix of `text` (max_ngram down to min_ngram tokens); [] when none occurs.

    >>> lookup_ngram([1, 2, 3, 9, 1, 2], 3)
    [3, 9, 1]
    >>> lookup_ngram([5, 6, 7], 2)
    []
    """
    n_text = len(text)
    for n in range(min(max_ngram, n_text - 1), min_ngram - 1, -1):
        suffix = list(text[n_text - n:])
        for start in range(n_text - n - 1, -1, -1):
            if list(text[start:start + n]) == suffix:
                return list(text[start + n: start + n + gamma])
    return []
