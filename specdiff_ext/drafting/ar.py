"""Drafting with a small autoregressive drafter, one forward per draft, as the decode loop's
`Drafter` protocol asks."""

from __future__ import annotations

from typing import Any, Optional, Protocol

import torch
from torch import Tensor

from .. import ops
from ..defaults import DEFAULTS
from ..types import Draft

__all__ = ["ARDrafter", "ARDrafting"]


class ARDrafter(Protocol):
    """What `ARDrafting` needs of an autoregressive drafter (a `TargetModel` qualifies).

    ``forward(input_ids (1, n), cache)`` returns logits (1, n, V) -- or an object with a
    ``.logits`` field; only the last row is read -- and extends the cache in place;
    ``crop(cache, length)`` rolls it back. An optional ``vocab_map`` attribute (Vd,) says that
    the logits have Vd columns, column j scoring target id vocab_map[j].
    """

    def new_cache(self) -> Any: ...

    def forward(self, input_ids: Tensor, cache: Any) -> Any: ...

    def crop(self, cache: Any, length: int) -> Any: ...


def _logits(out: Any) -> Tensor:
    return out.logits if hasattr(out, "logits") else out


class ARDrafting:
    """Drafting with a small autoregressive drafter (see `ARDrafter`), one forward per draft.

    Parameters
    ----------
    ar_drafter : ARDrafter
        A causal LM over the target's tokenizer, e.g. ``load_target(small_model_folder)`` or
        the shipped baseline drafter (`drafter.ar.load_ar_drafter`).
    draft_temperature : float, optional
        None: the target's temperature. Drafts are drawn left to right, so the soft q is exact.
    draft_filters : bool, optional
        Draft with the target's top-k / top-p / min-p too (as `DiffusionDrafting`). None:
        `DEFAULTS.draft_filters`.
    """

    feature_layers = None
    max_drafts = None

    def __init__(self, ar_drafter: Any, draft_temperature: Optional[float] = None,
                 draft_filters: Optional[bool] = None) -> None:
        self.drafter, self.draft_temperature = ar_drafter, draft_temperature
        self.draft_filters = bool(DEFAULTS.draft_filters if draft_filters is None else draft_filters)

    def start(self, prompt: Tensor, seed: int, temperature: float,
              hidden: Optional[Tensor], filters: Optional[dict] = None) -> None:
        self._dtau = temperature if self.draft_temperature is None else float(self.draft_temperature)
        self._filters = (filters or None) if self.draft_filters else None
        self._gen = torch.Generator(device=prompt.device).manual_seed(seed)
        self._cache = self.drafter.new_cache()
        self._vmap = getattr(self.drafter, "vocab_map", None)  # (Vd,) reduced vocabulary
        self._pending = prompt  # tokens the drafter has not read yet (the last one included)
        self._length = 0  # positions in the drafter's cache

    def draft(self, gamma: int, rnd: int) -> Draft:
        x, ids, rows = self._pending, [], []
        for _ in range(gamma):
            row = _logits(self.drafter.forward(x, self._cache))[:, -1]  # (1, Vd)
            if self._filters and self._dtau > 0.0:
                row = ops.filter_logits(row[:, None], temperature=self._dtau, **self._filters)[:, 0]
            self._length += x.shape[1]
            if self._dtau == 0.0:
                x = row.argmax(-1, keepdim=True)
            else:  # exponential race: argmax p / E, no host sync
                e = torch.empty(row.shape, device=row.device, dtype=torch.float32)
                e.exponential_(generator=self._gen)
                x = (torch.softmax(row.float() / self._dtau, -1) / e).argmax(-1, keepdim=True)
            if self._vmap is not None:  # drafter column -> target id
                x = self._vmap[x]
            ids.append(x)
            rows.append(row)
        self._g = gamma
        logits = torch.stack(rows, dim=1) if self._dtau > 0 else None  # (1, G, Vd)
        return Draft(torch.cat(ids, dim=1), logits, None, self._dtau, self._vmap)

    def accept(self, emitted: Tensor, n_acc: int, hidden: Optional[Tensor]) -> None:
        # the drafter read the last token and x_1 .. x_{G-1}; keep last + the accepted ones
        keep = self._length - self._g + 1 + n_acc
        if n_acc == self._g:  # x_G was never fed: read it with the bonus token
            self._pending = emitted[:, n_acc - 1:]
            keep -= 1
        else:
            self._pending = emitted[:, n_acc:]
        self.drafter.crop(self._cache, keep)
        self._length = keep
