"""Helpers shared by the test modules: inputs, memory layouts, and comparisons of sampled ids
between the ops and the float64 reference."""

from __future__ import annotations

import math
import os
from typing import Any, Optional

import numpy as np
import pytest
import torch
from torch import Tensor

from specdiff_ext import reference

# A kernel decision (acceptance test, race, confidence ranking) whose relative margin from a
# tie is below this may be decided differently in float32 than in the float64 reference.
NEAR_TIE = 1e-4


def impl() -> Any:
    """The module under test: specdiff_ext.ops (the reference if SPECDIFF_TEST_IMPL=reference)."""
    if os.environ.get("SPECDIFF_TEST_IMPL", "ops") == "reference":
        return reference
    from specdiff_ext import ops

    return ops


def compiled_only(reason: str) -> pytest.MarkDecorator:
    """Marks a test about the compiled kernels themselves (their array intake, raw schemas,
    device syncs, bit-identical fast paths): skipped, with `reason`, when the ops under test
    are the reference (SPECDIFF_TEST_IMPL=reference)."""
    return pytest.mark.skipif(impl() is reference, reason=f"compiled ops only: {reason}")


def filtered_law(logits: Tensor, temperature: float, **filters: Any) -> Tensor:
    """The law a sampler with these controls draws from, in float64: softmax of the reference's
    filter_logits at `temperature` (filters: top_k, top_p, min_p); the argmax at 0.

    Shape:
        logits: (..., V). Returns (..., V) float64.
    """
    x = cpu(logits).to(torch.float64)
    if temperature == 0:
        return torch.nn.functional.one_hot(x.argmax(-1), x.shape[-1]).to(torch.float64)
    kept = reference.filter_logits(x.reshape(-1, 1, x.shape[-1]), temperature=temperature,
                                   **filters).reshape(x.shape)
    tau = float(torch.tensor(temperature, dtype=torch.float32))  # as the kernels see it
    return torch.softmax(kept / tau, dim=-1)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rand_logits(
    shape: tuple[int, ...], dtype: torch.dtype = torch.float32, seed: int = 0,
    scale: float = 2.0, neg_inf_frac: float = 0.0,
) -> Tensor:
    """Normal logits (CPU) with a fraction of -inf entries (never a whole row). Shape: `shape`."""
    g = gen(seed)
    x = torch.randn(shape, generator=g) * scale
    if neg_inf_frac > 0 and shape[-1] > 1:
        drop = torch.rand(shape, generator=g) < neg_inf_frac
        drop[..., 0] = False  # keep one finite entry per row
        perm = torch.randperm(shape[-1], generator=g)
        x = torch.where(drop[..., perm], -math.inf, x)
    return x.to(dtype)


def tau_per_row(kind: str, batch: int, seed: int = 0) -> Any:
    """Temperatures of one kind: a float, or a (B,) float32 tensor mixing 0 and > 0."""
    if kind == "one":
        return 1.0
    if kind == "scalar":
        return 0.7
    if kind == "greedy":
        return 0.0
    assert kind == "per_row", kind
    g = gen(seed)
    t = 0.3 + 1.5 * torch.rand(batch, generator=g)
    t[torch.rand(batch, generator=g) < 0.3] = 0.0
    return t


LAYOUTS = ["contiguous", "sliced", "transposed", "strided"]


def layout(x: Tensor, kind: str) -> Tensor:
    """A tensor equal to `x` in another memory layout.

    sliced: a window of a bigger tensor; transposed: the first two dimensions stored swapped;
    strided: every other element of the last dimension.
    """
    if kind == "contiguous" or x.dim() == 0:
        return x.contiguous()
    if kind == "sliced":
        big = torch.zeros([s + 3 for s in x.shape], dtype=x.dtype, device=x.device)
        window = big[tuple(slice(1, 1 + s) for s in x.shape)]
        window.copy_(x)
        return window
    if kind == "transposed":
        if x.dim() < 2:
            return layout(x, "strided")
        y = x.transpose(0, 1).contiguous().transpose(0, 1)
        return y
    if kind == "strided":
        big = torch.zeros(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype, device=x.device)
        view = big[..., ::2]
        view.copy_(x)
        return view
    raise ValueError(kind)


def cpu(x: Any) -> Any:
    if isinstance(x, Tensor):
        return x.detach().cpu()
    if isinstance(x, np.ndarray):
        return torch.from_numpy(x)
    return x


def verify_with_margin(*args: Any, **kwargs: Any) -> tuple[Any, Tensor]:
    """Reference verify (float64) and the per-row margin of its decisions from a tie."""
    args = tuple(cpu(a) for a in args)
    kwargs = {k: cpu(v) for k, v in kwargs.items()}
    return reference._verify_with_margin(*args, **kwargs)


def denoise_with_margin(*args: Any, **kwargs: Any) -> tuple[Any, Tensor]:
    """Reference denoise_step (float64) and the per-row margin of its decisions from a tie."""
    args = tuple(cpu(a) for a in args)
    kwargs = {k: cpu(v) for k, v in kwargs.items()}
    return reference._denoise(*args, compute_dtype=torch.float64, **kwargs)


def _differing_rows(got: Any, want: Any, fields: tuple[str, ...]) -> Tensor:
    B = cpu(getattr(want, fields[0])).shape[0]
    diff = torch.zeros(B, dtype=torch.bool)
    for f in fields:
        g, w = cpu(getattr(got, f)), cpu(getattr(want, f))
        assert g.shape == w.shape, f"{f}: shape {tuple(g.shape)} != reference {tuple(w.shape)}"
        if g.is_floating_point():
            ne = ~(torch.isclose(g.double(), w.double(), rtol=1e-4, atol=1e-4, equal_nan=True))
        else:
            ne = g.to(torch.int64) != w.to(torch.int64)
        diff |= ne.flatten(1).any(dim=1) if ne.dim() > 1 else ne
    return diff


def assert_same_samples(
    got: Any, want: Any, margin: Tensor, fields: tuple[str, ...], *,
    max_near_ties: Optional[int] = None, context: str = "",
) -> None:
    """Sampled outputs of the op must equal the reference's, row for row.

    A row may differ only where the reference met a near-tie (a decision margin below
    NEAR_TIE, where float32 rounding may legitimately decide otherwise), and at most
    `max_near_ties` rows may (default: 1% of the rows, at least 1).
    """
    diff = _differing_rows(got, want, fields)
    if not bool(diff.any()):
        return
    B = diff.numel()
    rows = diff.nonzero().squeeze(1).tolist()
    lines = []
    for b in rows[:6]:
        parts = [f"row {b} (margin {float(margin[b]):.2e}):"]
        for f in fields:
            parts.append(f"{f} got {cpu(getattr(got, f))[b].tolist()} "
                         f"want {cpu(getattr(want, f))[b].tolist()}")
        lines.append(" ".join(parts))
    report = f"{context} {len(rows)}/{B} rows differ from the reference:\n" + "\n".join(lines)
    not_ties = [b for b in rows if float(margin[b]) >= NEAR_TIE]
    assert not not_ties, report + f"\nrows {not_ties[:10]} are not near-ties"
    limit = max_near_ties if max_near_ties is not None else max(1, B // 100)
    assert len(rows) <= limit, report + f"\nmore than {limit} near-tie rows"


def emitted(ids: Tensor, num_accepted: Tensor) -> list[list[int]]:
    """The emitted tokens of every row: ids[:k+1] (empty for an invalid row)."""
    out = []
    for row, k in zip(cpu(ids).tolist(), cpu(num_accepted).tolist()):
        out.append([t for t in row[: k + 1] if t >= 0])
    return out


def check_verify_structure(res: Any, draft_ids: Tensor, V: int) -> None:
    """Structural invariants of a VerifyResult (any implementation)."""
    ids, k, valid = cpu(res.ids), cpu(res.num_accepted), cpu(res.valid)
    B, G1 = ids.shape
    x = cpu(draft_ids).to(torch.int64)
    assert ids.dtype == torch.int64 and k.dtype == torch.int64 and valid.dtype == torch.bool
    assert k.shape == (B,) and valid.shape == (B,)
    pos = torch.arange(G1)
    assert bool(((k >= 0) & (k <= G1 - 1)).all()), k
    assert bool((k[~valid] == 0).all()), "invalid rows must report num_accepted 0"
    assert bool((ids[~valid] == -1).all()), "invalid rows must be all -1"
    after = pos[None, :] > k[:, None]
    assert bool((ids[after] == -1).all()), "nothing but -1 after the emitted tokens"
    v = valid[:, None]
    emitted_mask = (pos[None, :] <= k[:, None]) & v
    assert bool(((ids >= 0) & (ids < V))[emitted_mask].all()), "emitted ids out of range"
    acc = (pos[None, : G1 - 1] < k[:, None]) & v
    assert bool((ids[:, : G1 - 1] == x)[acc].all()), "accepted tokens must equal the drafts"
