"""The kernels as torch custom ops (``torch.ops.specdiff.*``), with numpy and DLPack front doors.

Every op runs on the CPU (C++, OpenMP over rows) and on CUDA with the same semantics
(docs/ops.md). Inputs may be torch tensors, numpy arrays (numpy in, numpy out, zero-copy),
or CuPy / JAX arrays (anything with ``__dlpack__``; outputs come back in the same framework).
Arguments are checked before any work; bad input raises ValueError or TypeError naming the
argument. The ops are registered with ``torch.library`` and have fake implementations, so
``torch.compile`` traces through them.
"""

from __future__ import annotations

import math
import sys
import warnings
from typing import Any, Optional, Tuple, Union

import numpy as np
import torch
from torch import Tensor
from torch.utils.dlpack import to_dlpack as _to_dlpack

from .types import CommitMode, DenoiseResult, GatherResult, VerifyResult

try:
    from . import _C
except ImportError as exc:  # pragma: no cover - only without a build
    raise ImportError(
        "specdiff_ext._C is not built: install the package with `pip install .` "
        f"(compiles the extension; CUDA kernels when nvcc is found). Cause: {exc}"
    ) from exc

__all__ = [
    "verify",
    "verify_unchecked",
    "rejection_sample",
    "gather_logprobs",
    "denoise_step",
    "point_mass_mask",
    "VerifyResult",
    "GatherResult",
    "DenoiseResult",
    "CommitMode",
]

ArrayLike = Any
Scalar = Union[float, int]
_INT64_MOD = 1 << 64


# --------------------------------------------------------------------------- conversions
class _Frontend:
    """Remembers which framework the caller used, to hand results back in it."""

    def __init__(self) -> None:
        self.kind = "torch"

    def tensor(self, x: Any, name: str) -> Tensor:
        if isinstance(x, Tensor):
            return x.detach() if x.requires_grad else x
        if isinstance(x, np.ndarray):
            self.kind = "numpy"
            if x.dtype == np.float64:
                raise TypeError(f"{name} must be float32, bfloat16 or float16 logits or integer ids, got float64")
            if not x.flags.writeable:
                # Inputs are only read: wrap read-only arrays without a copy.
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)
                    return torch.from_numpy(x)
            return torch.from_numpy(x)
        if hasattr(x, "__dlpack__"):
            mod = type(x).__module__.split(".")[0]
            self.kind = "jax" if mod in ("jax", "jaxlib") else mod
            return torch.from_dlpack(x)
        raise TypeError(
            f"{name} must be a torch tensor, a numpy array or a DLPack array, got {type(x).__name__}"
        )

    def out(self, t: Tensor) -> Any:
        if self.kind == "torch":
            return t
        if self.kind == "numpy":
            return t.numpy()
        if self.kind == "cupy":
            import cupy

            return cupy.from_dlpack(t)
        if self.kind == "jax":
            import jax.numpy as jnp

            return jnp.from_dlpack(t)
        return t


def _opt(front: _Frontend, x: Any, name: str) -> Optional[Tensor]:
    return None if x is None else front.tensor(x, name)


def _last_contiguous(x: Tensor) -> Tensor:
    return x if x.dim() == 0 or x.shape[-1] <= 1 or x.stride(-1) == 1 else x.contiguous()


def _row_scalar(front: _Frontend, value: Any, name: str, B: int, device: torch.device) -> Tuple[Optional[Tensor], float]:
    """A per-row float argument: (tensor or None, scalar)."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a float or a (B,) tensor, got bool")
    if isinstance(value, (int, float)):
        v = float(value)
        if not math.isfinite(v) or v < 0:
            raise ValueError(f"{name} must be finite and >= 0, got {value}")
        return None, v
    t = front.tensor(value, name)
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got {t.dtype}")
    if t.dim() != 1 or t.shape[0] != B:
        raise ValueError(f"{name} must have shape (B,) = ({B},), got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} must be on the same device as the logits ({device}), got {t.device}")
    return t.to(torch.float32).contiguous(), 0.0


def _seed_arg(front: _Frontend, seed: Any, B: int, device: torch.device) -> Tuple[Optional[Tensor], int]:
    if isinstance(seed, bool):
        raise TypeError("seed must be an int or a (B,) int64 tensor, got bool")
    if isinstance(seed, (int, np.integer)):
        s = int(seed) % _INT64_MOD
        return None, s - _INT64_MOD if s >= 1 << 63 else s
    t = front.tensor(seed, "seed")
    if t.dtype != torch.int64:
        raise TypeError(f"seed must be an int or an int64 tensor, got {t.dtype}")
    if t.dim() != 1 or t.shape[0] != B:
        raise ValueError(f"seed must have shape (B,) = ({B},), got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"seed must be on the same device as the logits ({device}), got {t.device}")
    return t.contiguous(), 0


def _offset_arg(offset: Any) -> int:
    if isinstance(offset, bool) or not isinstance(offset, (int, np.integer)):
        raise TypeError(f"offset must be an int, got {type(offset).__name__}")
    if not 0 <= int(offset) < 1 << 56:
        raise ValueError(f"offset must be in [0, 2^56), got {offset}")
    return int(offset)


class _DeviceChecks:
    """Value checks of GPU tensors (id ranges, temperatures), run together with one device sync
    queued right after the op's kernels, so the GPU never waits for the host. The kernels never
    read or write out of bounds whatever the values (an out-of-range id or a negative
    temperature makes its row invalid), so the check may follow them; on a bad value the
    results are dropped and ValueError is raised. Skipped inside CUDA-graph capture. Callers
    that want no host sync at all use ``verify_unchecked`` or ``torch.ops.specdiff.*``."""

    def __init__(self) -> None:
        self.items: list = []

    def ids(self, t: Tensor, hi: int, name: str, bound: str) -> None:
        if t.device.type == "cuda" and t.numel() > 0:
            self.items.append(("ids", t, hi, name, bound))

    def temperature(self, t: Optional[Tensor], name: str) -> None:
        if t is not None and t.device.type == "cuda" and t.numel() > 0:
            self.items.append(("tau", t, 0, name, ""))

    def run(self) -> None:
        if not self.items or torch.cuda.is_current_stream_capturing():
            return
        vals = []
        for kind, t, _, _, _ in self.items:
            if kind == "ids":
                vals += [t.min().to(torch.float64), t.max().to(torch.float64)]
            else:
                vals += [((t < 0) | ~torch.isfinite(t)).sum().to(torch.float64), t.min().to(torch.float64)]
        got = torch.stack(vals).tolist()
        for j, (kind, _, hi, name, bound) in enumerate(self.items):
            a, b = got[2 * j], got[2 * j + 1]
            if kind == "ids" and (a < 0 or b >= hi):
                bad = int(a) if a < 0 else int(b)
                raise ValueError(f"{name} holds {bad}, outside [0, {bound}) = [0, {hi})")
            if kind == "tau" and a > 0:
                raise ValueError(f"{name} must be finite and >= 0 in every row, got {b}")


def _vocab_inverse(vocab_map: Tensor, V: int) -> Tensor:
    """(V,) int32: the drafter index of each target id, -1 outside the map.

    Cached on the vocab_map tensor object itself (so the cache lives and dies with it) and
    keyed by its version counter, which in-place writes through torch bump."""
    cached = getattr(vocab_map, "_specdiff_vocab_inv", None)
    if cached is not None and cached[0] == vocab_map._version and cached[1] == V:
        return cached[2]
    if vocab_map.dim() != 1:
        raise ValueError(f"vocab_map must have shape (Vd,), got {tuple(vocab_map.shape)}")
    if vocab_map.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"vocab_map must be int32 or int64, got {vocab_map.dtype}")
    Vd = vocab_map.shape[0]
    if not 1 <= Vd <= V:
        raise ValueError(f"vocab_map must have 1 <= Vd <= V = {V} entries, got {Vd}")
    lo, hi = torch.stack([vocab_map.min(), vocab_map.max()]).tolist()
    if lo < 0 or hi >= V:
        raise ValueError(f"vocab_map holds {lo if lo < 0 else hi}, outside [0, V) = [0, {V})")
    inv = torch.full((V,), -1, dtype=torch.int32, device=vocab_map.device)
    inv[vocab_map.long()] = torch.arange(Vd, dtype=torch.int32, device=vocab_map.device)
    if int((inv >= 0).sum()) != Vd:
        raise ValueError("vocab_map must not repeat a target id")
    try:
        vocab_map._specdiff_vocab_inv = (vocab_map._version, V, inv)
    except (AttributeError, RuntimeError):  # pragma: no cover - tensors without a __dict__
        pass
    return inv


def _dl(t: Optional[Tensor]) -> Any:
    """A DLPack capsule of t (torch's C-level export: no stream sync, about 0.5 us)."""
    return None if t is None else _to_dlpack(t)


def _stream(t: Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream if t.device.type == "cuda" else 0


def _workspace(op: str, t: Tensor, B: int, G: int, V: int, Vd: int) -> Optional[Tensor]:
    if t.device.type != "cuda":
        return None
    n = _C.workspace_bytes(op, B, G, V, Vd, t.device.index or 0)
    return torch.empty(max(n, 1), dtype=torch.uint8, device=t.device)


# --------------------------------------------------------------------------- custom ops
@torch.library.custom_op("specdiff::verify", mutates_args=())
def _verify_op(
    target_logits: Tensor,
    draft_ids: Tensor,
    draft_logits: Optional[Tensor],
    draft_point_mass: Optional[Tensor],
    vocab_map: Optional[Tensor],
    vocab_inv: Optional[Tensor],
    temperature: Optional[Tensor],
    temperature_value: float,
    draft_temperature: Optional[Tensor],
    draft_temperature_value: float,
    seed: Optional[Tensor],
    seed_value: int,
    offset: int,
    target_lse: Optional[Tensor],
    draft_lse: Optional[Tensor],
) -> Tuple[Tensor, Tensor, Tensor]:
    B, G1, V = target_logits.shape
    dev = target_logits.device
    ids = torch.empty((B, G1), dtype=torch.int64, device=dev)
    num = torch.empty((B,), dtype=torch.int64, device=dev)
    valid = torch.empty((B,), dtype=torch.bool, device=dev)
    Vd = vocab_map.shape[0] if vocab_map is not None else V
    _C.verify(
        _dl(target_logits), _dl(draft_ids), _dl(draft_logits), _dl(draft_point_mass),
        _dl(vocab_map), _dl(vocab_inv), _dl(temperature), temperature_value,
        _dl(draft_temperature), draft_temperature_value, _dl(seed), seed_value, offset,
        _dl(target_lse), _dl(draft_lse), _dl(ids), _dl(num), _dl(valid),
        _dl(_workspace("verify", target_logits, B, G1 - 1, V, Vd)), _stream(target_logits),
    )
    return ids, num, valid


@_verify_op.register_fake
def _verify_fake(target_logits, draft_ids, *args):  # noqa: ANN001, ANN002
    B, G1, _ = target_logits.shape
    dev = target_logits.device
    return (
        target_logits.new_empty((B, G1), dtype=torch.int64),
        torch.empty((B,), dtype=torch.int64, device=dev),
        torch.empty((B,), dtype=torch.bool, device=dev),
    )


@torch.library.custom_op("specdiff::gather_logprobs", mutates_args=())
def _gather_op(
    logits: Tensor, ids: Tensor, temperature: Optional[Tensor], temperature_value: float
) -> Tuple[Tensor, Tensor]:
    B, N, V = logits.shape
    lse = torch.empty((B, N), dtype=torch.float32, device=logits.device)
    lp = torch.empty((B, N), dtype=torch.float32, device=logits.device)
    _C.gather_logprobs(
        _dl(logits), _dl(ids), _dl(temperature), temperature_value, _dl(lse), _dl(lp),
        _dl(_workspace("gather_logprobs", logits, B, N, V, V)), _stream(logits),
    )
    return lse, lp


@_gather_op.register_fake
def _gather_fake(logits, ids, *args):  # noqa: ANN001, ANN002
    B, N, _ = logits.shape
    return (logits.new_empty((B, N), dtype=torch.float32), logits.new_empty((B, N), dtype=torch.float32))


@torch.library.custom_op("specdiff::denoise_step", mutates_args=())
def _denoise_op(
    logits: Tensor,
    tokens: Tensor,
    commit_step: Tensor,
    step: int,
    num_steps: int,
    mode: int,
    vocab_map: Optional[Tensor],
    temperature: Optional[Tensor],
    temperature_value: float,
    seed: Optional[Tensor],
    seed_value: int,
    offset: int,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    B, G, Vd = logits.shape
    dev = logits.device
    out_tokens = torch.empty((B, G), dtype=torch.int64, device=dev)
    out_cs = torch.empty((B, G), dtype=torch.int32, device=dev)
    out_lse = torch.empty((B, G), dtype=torch.float32, device=dev)
    out_valid = torch.empty((B,), dtype=torch.bool, device=dev)
    _C.denoise_step(
        _dl(logits), _dl(tokens), _dl(commit_step), step, num_steps, mode, _dl(vocab_map),
        _dl(temperature), temperature_value, _dl(seed), seed_value, offset, _dl(out_tokens),
        _dl(out_cs), _dl(out_lse), _dl(out_valid),
        _dl(_workspace("denoise_step", logits, B, G, Vd, Vd)), _stream(logits),
    )
    return out_tokens, out_cs, out_lse, out_valid


@_denoise_op.register_fake
def _denoise_fake(logits, tokens, commit_step, *args):  # noqa: ANN001, ANN002
    B, G, _ = logits.shape
    return (
        logits.new_empty((B, G), dtype=torch.int64),
        logits.new_empty((B, G), dtype=torch.int32),
        logits.new_empty((B, G), dtype=torch.float32),
        logits.new_empty((B,), dtype=torch.bool),
    )


def _call(op: Any, *args: Any) -> Any:
    """Eager calls skip the dispatcher (lower latency); traced calls go through the custom op."""
    if torch.compiler.is_compiling():
        return op(*args)
    return op._init_fn(*args) if hasattr(op, "_init_fn") else op(*args)


# --------------------------------------------------------------------------- public API
def _verify_common(
    target_logits: ArrayLike,
    draft_ids: ArrayLike,
    draft_logits: Optional[ArrayLike],
    draft_point_mass: Optional[ArrayLike],
    temperature: Any,
    draft_temperature: Any,
    seed: Any,
    offset: Any,
    vocab_map: Optional[ArrayLike],
    target_lse: Optional[ArrayLike],
    draft_lse: Optional[ArrayLike],
    check_values: bool = True,
) -> VerifyResult:
    f = _Frontend()
    tl = f.tensor(target_logits, "target_logits")
    if tl.dim() != 3:
        raise ValueError(f"target_logits must have 3 dimensions (B, G+1, V), got shape {tuple(tl.shape)}")
    B, G1, V = tl.shape
    dev = tl.device
    tl = _last_contiguous(tl)
    di = f.tensor(draft_ids, "draft_ids")
    dl = _opt(f, draft_logits, "draft_logits")
    dl = _last_contiguous(dl) if dl is not None else None
    pm = _opt(f, draft_point_mass, "draft_point_mass")
    vm = _opt(f, vocab_map, "vocab_map")
    vinv = None
    if vm is not None:
        if vm.device != dev:
            raise ValueError(f"vocab_map must be on the same device as target_logits ({dev}), got {vm.device}")
        vinv = _vocab_inverse(vm, V)
    ta, tv = _row_scalar(f, temperature, "temperature", B, dev)
    dta, dtv = _row_scalar(f, draft_temperature, "draft_temperature", B, dev)
    sd, sv = _seed_arg(f, seed, B, dev)
    off = _offset_arg(offset)
    tlse = _opt(f, target_lse, "target_lse")
    dlse = _opt(f, draft_lse, "draft_lse")
    checks = _DeviceChecks()
    if di.dim() == 2 and tuple(di.shape) == (B, G1 - 1):
        checks.ids(di, V, "draft_ids", "V")
    checks.temperature(ta, "temperature")
    checks.temperature(dta, "draft_temperature")
    ids, num, valid = _call(
        _verify_op, tl, di, dl, pm, vm, vinv, ta, tv, dta, dtv, sd, sv, off, tlse, dlse
    )
    if check_values:
        checks.run()
    return VerifyResult(f.out(ids), f.out(num), f.out(valid))


def verify(
    target_logits: ArrayLike,
    draft_ids: ArrayLike,
    draft_logits: Optional[ArrayLike] = None,
    *,
    draft_point_mass: Optional[ArrayLike] = None,
    temperature: Union[float, ArrayLike] = 1.0,
    draft_temperature: Union[float, ArrayLike] = 1.0,
    seed: Union[int, ArrayLike] = 0,
    offset: int = 0,
    vocab_map: Optional[ArrayLike] = None,
) -> VerifyResult:
    """Verify a block of drafts against the target: chain speculative sampling, fused with the
    normalisation of the target (and draft) rows it needs.

    Emits the longest accepted prefix of the drafts and one more token (the correction drawn
    from the residual at the first rejection, or the bonus token drawn from the last target
    row), distributed exactly as the target samples at ``temperature`` (greedy at 0).

    Parameters
    ----------
    target_logits : float32, bfloat16 or float16
        Shape: (B, G+1, V). Target logits at the G draft positions and the bonus position.
    draft_ids : int32 or int64
        Shape: (B, G). Draft tokens (target ids).
    draft_logits : float32, bfloat16 or float16, optional
        Shape: (B, G, Vd). Logits each draft was drawn from; None means every draft is a
        point mass (drafts fixed given the state, e.g. argmax drafts).
    draft_point_mass : bool, optional
        Shape: (B, G). Positions that must use a point mass (``point_mass_mask`` of the
        sampler's commit steps keeps out-of-order unmasking exact).
    temperature, draft_temperature : float or float tensor
        Shape: () or (B,). 0 means greedy (target) / argmax drafts (drafter).
    seed : int or int64 tensor
        Shape: () or (B,). One seed for the batch (rows draw independent streams), or a seed
        per row (a row's result then does not depend on its neighbours).
    offset : int
        Advances the random stream between calls.
    vocab_map : int32 or int64, optional
        Shape: (Vd,). Target id of each drafter vocabulary entry (reduced drafter vocabulary).

    Returns
    -------
    VerifyResult(ids, num_accepted, valid)
        ids: (B, G+1) int64, the accepted drafts, the correction or bonus, then -1;
        num_accepted: (B,) int64; valid: (B,) bool, false where a needed row held NaN or
        +inf or no finite logit (that row is then all -1).

    Examples
    --------
    >>> import torch, specdiff_ext
    >>> logits = torch.randn(2, 5, 100)
    >>> drafts = torch.randint(0, 100, (2, 4))
    >>> res = specdiff_ext.ops.verify(logits, drafts, torch.randn(2, 4, 100), seed=7)
    >>> res.ids.shape, res.num_accepted.shape
    (torch.Size([2, 5]), torch.Size([2]))
    """
    return _verify_common(
        target_logits, draft_ids, draft_logits, draft_point_mass, temperature,
        draft_temperature, seed, offset, vocab_map, None, None,
    )


def verify_unchecked(
    target_logits: ArrayLike,
    draft_ids: ArrayLike,
    draft_logits: Optional[ArrayLike] = None,
    *,
    draft_point_mass: Optional[ArrayLike] = None,
    temperature: Union[float, ArrayLike] = 1.0,
    draft_temperature: Union[float, ArrayLike] = 1.0,
    seed: Union[int, ArrayLike] = 0,
    offset: int = 0,
    vocab_map: Optional[ArrayLike] = None,
) -> VerifyResult:
    """:func:`verify` without the value checks of GPU tensors, so without their host sync.

    For loops whose inputs are valid by construction (a decode round: drafts come from the
    drafter). Types, shapes and devices are still checked, and CPU inputs are still checked in
    full (that costs no sync). On a GPU an out-of-range id or a negative temperature is not
    raised: the kernels never read or write out of bounds and mark that row invalid.

    Parameters and result are those of :func:`verify`.

    Examples
    --------
    >>> import torch, specdiff_ext
    >>> r = specdiff_ext.ops.verify_unchecked(torch.randn(1, 3, 10), torch.tensor([[1, 2]]), temperature=0.0)
    >>> r.ids.shape
    torch.Size([1, 3])
    """
    return _verify_common(
        target_logits, draft_ids, draft_logits, draft_point_mass, temperature,
        draft_temperature, seed, offset, vocab_map, None, None, check_values=False,
    )


def rejection_sample(
    target_logits: ArrayLike,
    draft_ids: ArrayLike,
    draft_logits: Optional[ArrayLike] = None,
    *,
    target_lse: ArrayLike,
    draft_lse: Optional[ArrayLike] = None,
    draft_point_mass: Optional[ArrayLike] = None,
    temperature: Union[float, ArrayLike] = 1.0,
    draft_temperature: Union[float, ArrayLike] = 1.0,
    seed: Union[int, ArrayLike] = 0,
    offset: int = 0,
    vocab_map: Optional[ArrayLike] = None,
) -> VerifyResult:
    """Chain speculative sampling with precomputed row statistics (the unfused half of verify).

    Same as :func:`verify`, but the log-sum-exp of the target rows (and of the soft draft
    rows) come from the caller, e.g. from :func:`gather_logprobs` at the same temperatures.

    Parameters
    ----------
    target_lse : float32
        Shape: (B, G+1). Log-sum-exp of target_logits / temperature.
    draft_lse : float32, optional
        Shape: (B, G). Log-sum-exp of draft_logits / draft_temperature (needed with soft drafts).

    Other parameters and the result are those of :func:`verify`.

    Examples
    --------
    >>> import torch, specdiff_ext
    >>> tl, dl = torch.randn(1, 4, 50), torch.randn(1, 3, 50)
    >>> x = torch.randint(0, 50, (1, 3))
    >>> t = specdiff_ext.ops.gather_logprobs(tl, torch.zeros(1, 4, dtype=torch.long)).lse
    >>> d = specdiff_ext.ops.gather_logprobs(dl, x).lse
    >>> specdiff_ext.ops.rejection_sample(tl, x, dl, target_lse=t, draft_lse=d).ids.shape
    torch.Size([1, 4])
    """
    if target_lse is None:
        raise ValueError("target_lse is required (use verify() to compute it in the same pass)")
    if draft_logits is not None and draft_lse is None:
        raise ValueError("draft_lse is required with draft_logits")
    return _verify_common(
        target_logits, draft_ids, draft_logits, draft_point_mass, temperature,
        draft_temperature, seed, offset, vocab_map, target_lse, draft_lse,
    )


def gather_logprobs(logits: ArrayLike, ids: ArrayLike, temperature: Union[float, ArrayLike] = 1.0) -> GatherResult:
    """Parallel verification logit gathering: the log-sum-exp of each row at ``temperature`` and
    the log-probability of one id per row, in one read of the logits (no probabilities stored).

    Parameters
    ----------
    logits : float32, bfloat16 or float16
        Shape: (B, N, V).
    ids : int32 or int64
        Shape: (B, N).
    temperature : float or float tensor
        Shape: () or (B,). At 0: lse is the row max and logprob is 0 for the argmax, else -inf.

    Returns
    -------
    GatherResult(lse, logprobs)
        Both (B, N) float32; NaN for rows holding NaN or +inf or no finite logit.

    Examples
    --------
    >>> import torch, specdiff_ext
    >>> r = specdiff_ext.ops.gather_logprobs(torch.zeros(1, 2, 4), torch.tensor([[0, 3]]))
    >>> torch.allclose(r.logprobs, torch.full((1, 2), -1.3862944))
    True
    """
    f = _Frontend()
    lg = f.tensor(logits, "logits")
    if lg.dim() != 3:
        raise ValueError(f"logits must have 3 dimensions (B, N, V), got shape {tuple(lg.shape)}")
    lg = _last_contiguous(lg)
    ix = f.tensor(ids, "ids")
    ta, tv = _row_scalar(f, temperature, "temperature", lg.shape[0], lg.device)
    checks = _DeviceChecks()
    if ix.dim() == 2 and tuple(ix.shape) == tuple(lg.shape[:2]):
        checks.ids(ix, lg.shape[2], "ids", "V")
    checks.temperature(ta, "temperature")
    lse, lp = _call(_gather_op, lg, ix, ta, tv)
    checks.run()
    return GatherResult(f.out(lse), f.out(lp))


def denoise_step(
    logits: ArrayLike,
    tokens: ArrayLike,
    commit_step: ArrayLike,
    *,
    step: int,
    num_steps: int,
    mode: Union[CommitMode, str, int] = CommitMode.RANDOM,
    temperature: Union[float, ArrayLike] = 1.0,
    seed: Union[int, ArrayLike] = 0,
    offset: int = 0,
    vocab_map: Optional[ArrayLike] = None,
) -> DenoiseResult:
    """One reverse step of the masked-diffusion drafter over a batch of draft blocks.

    Each still-masked position (``commit_step < 0``) draws a token from softmax(logits / tau)
    (argmax at tau = 0); the commit mode decides, from the drafter state alone and never from
    the drawn tokens, which positions commit now: ``random`` (MDLM ancestral, probability
    1 / remaining steps), ``confidence`` (the ceil(M / R) most peaked distributions) or
    ``left_to_right``. Committed tokens never change.

    Parameters
    ----------
    logits : float32, bfloat16 or float16
        Shape: (B, G, Vd). Drafter logits of this step.
    tokens : int32 or int64
        Shape: (B, G). Current block (values at masked positions are carried unchanged).
    commit_step : int32
        Shape: (B, G). Step at which each position was committed, -1 while masked.
    step, num_steps : int
        This step (0-based) and the number of steps T; the last step commits everything.
    mode : CommitMode or str
    temperature : float or float tensor
        Shape: () or (B,).
    seed, offset : as in :func:`verify` (use a new offset for every step and round).
    vocab_map : int32 or int64, optional
        Shape: (Vd,). Target id of each drafter entry; tokens are written as target ids.

    Returns
    -------
    DenoiseResult(tokens, commit_step, lse, valid)
        tokens (B, G) int64, commit_step (B, G) int32, lse (B, G) float32 (log-sum-exp at the
        effective temperature of every position masked before this step, NaN elsewhere),
        valid (B,) bool.

    Examples
    --------
    >>> import torch, specdiff_ext
    >>> cs = torch.full((1, 4), -1, dtype=torch.int32)
    >>> r = specdiff_ext.ops.denoise_step(torch.randn(1, 4, 10), torch.zeros(1, 4, dtype=torch.long),
    ...                                   cs, step=1, num_steps=2, mode="left_to_right")
    >>> r.commit_step.tolist()
    [[1, 1, 1, 1]]
    """
    f = _Frontend()
    lg = f.tensor(logits, "logits")
    if lg.dim() != 3:
        raise ValueError(f"logits must have 3 dimensions (B, G, Vd), got shape {tuple(lg.shape)}")
    lg = _last_contiguous(lg)
    tk = f.tensor(tokens, "tokens")
    cs = f.tensor(commit_step, "commit_step")
    for name, val in (("step", step), ("num_steps", num_steps)):
        if isinstance(val, bool) or not isinstance(val, (int, np.integer)):
            raise TypeError(f"{name} must be an int, got {type(val).__name__}")
    m = CommitMode.parse(mode)
    vm = _opt(f, vocab_map, "vocab_map")
    ta, tv = _row_scalar(f, temperature, "temperature", lg.shape[0], lg.device)
    checks = _DeviceChecks()
    if vm is not None:
        checks.ids(vm, sys.maxsize, "vocab_map", "2^63")
    checks.temperature(ta, "temperature")
    checks.run()
    sd, sv = _seed_arg(f, seed, lg.shape[0], lg.device)
    off = _offset_arg(offset)
    out = _call(_denoise_op, lg, tk, cs, int(step), int(num_steps), int(m), vm, ta, tv, sd, sv, off)
    return DenoiseResult(*(f.out(t) for t in out))


def point_mass_mask(commit_step: ArrayLike) -> Any:
    """The order-aware exactness rule (DESIGN section 3): position l must be verified against a
    point mass on its draft when some position to its left was committed at a later step.

    ``point_mass[b, l] = max(commit_step[b, :l]) > commit_step[b, l]`` (False at l = 0).

    Parameters
    ----------
    commit_step : integer tensor or array
        Shape: (B, G). Denoising step at which each draft was committed.

    Returns
    -------
    bool tensor (numpy array for numpy input)
        Shape: (B, G).

    Examples
    --------
    >>> import torch, specdiff_ext
    >>> specdiff_ext.point_mass_mask(torch.tensor([[2, 1, 0, 3]])).tolist()
    [[False, True, True, False]]
    """
    f = _Frontend()
    cs = f.tensor(commit_step, "commit_step")
    if cs.dim() != 2:
        raise ValueError(f"commit_step must have 2 dimensions (B, G), got shape {tuple(cs.shape)}")
    if cs.dtype.is_floating_point or cs.dtype == torch.bool or cs.is_complex():
        raise TypeError(f"commit_step must be an integer tensor, got {cs.dtype}")
    B, G = cs.shape
    if G == 0:
        return f.out(torch.zeros((B, 0), dtype=torch.bool, device=cs.device))
    cs64 = cs.to(torch.int64)
    left_max = torch.cummax(cs64, dim=1).values[:, :-1]
    pm = torch.zeros((B, G), dtype=torch.bool, device=cs.device)
    pm[:, 1:] = left_max > cs64[:, 1:]
    return f.out(pm)
