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
from typing import Any, NamedTuple, Optional, Tuple, Union

import numpy as np
import torch
from torch import Tensor
from torch.utils.dlpack import to_dlpack as _to_dlpack

from .types import CommitMode, DenoiseResult, GatherResult, TreeVerifyResult, VerifyResult

try:
    from . import _C
except ImportError as exc:  # pragma: no cover - only without a build
    raise ImportError(
        "specdiff_ext._C is not built: install the package with `pip install .` "
        f"(compiles the extension; CUDA kernels when nvcc is found). Cause: {exc}"
    ) from exc

__all__ = [
    "verify",
    "verify_tree",
    "rejection_sample",
    "gather_logprobs",
    "denoise_step",
    "point_mass_mask",
    "filter_logits",
    "apply_penalties",
    "check_sampling",
    "VerifyResult",
    "TreeVerifyResult",
    "GatherResult",
    "DenoiseResult",
    "CommitMode",
]

ArrayLike = Any
Scalar = Union[float, int]
_INT64_MOD = 1 << 64
_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1


# --------------------------------------------------------------------------- conversions
class _Frontend:
    """Remembers which framework the caller's primary array (the first one converted: logits)
    came from, to hand results back in it; later arguments (a numpy seed with torch logits)
    do not change it."""

    def __init__(self) -> None:
        self.kind = ""

    def _mark(self, kind: str) -> None:
        if not self.kind:
            self.kind = kind

    def tensor(self, x: Any, name: str, allow_float64: bool = False) -> Tensor:
        if isinstance(x, Tensor):
            self._mark("torch")
            return x.detach() if x.requires_grad else x
        if isinstance(x, np.ndarray):
            self._mark("numpy")
            if x.dtype == np.float64 and not allow_float64:
                raise TypeError(f"{name} must be float32, bfloat16 or float16 logits or integer ids, got float64")
            if x.dtype == object or x.dtype.kind not in "biuf":
                raise TypeError(f"{name} must be a numeric array, got dtype {x.dtype}")
            if not x.dtype.isnative:
                raise TypeError(f"{name} must be in the machine's byte order, got dtype {x.dtype.str!r} "
                                f"(use {name}.astype({name}.dtype.newbyteorder('=')))")
            if any(st < 0 for st in x.strides):
                x = np.ascontiguousarray(x)  # negative strides: torch cannot view them
            if not x.flags.writeable:
                # Inputs are only read: wrap read-only arrays without a copy.
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)
                    return torch.from_numpy(x)
            return torch.from_numpy(x)
        if hasattr(x, "__dlpack__"):
            mod = type(x).__module__.split(".")[0]
            self._mark("jax" if mod in ("jax", "jaxlib") else mod)
            try:
                return torch.from_dlpack(x)
            except (RuntimeError, TypeError, BufferError) as exc:
                raise TypeError(f"{name}: cannot read this array through DLPack ({exc})") from exc
        raise TypeError(
            f"{name} must be a torch tensor, a numpy array or a DLPack array, got {type(x).__name__}"
        )

    def out(self, t: Tensor) -> Any:
        if self.kind in ("torch", ""):
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


# Conversions only: the values are checked by the bindings (scalars and CPU arrays, by the one
# implementation of each rule) and by _DeviceChecks (GPU arrays).
def _float_scalar(value: Any, name: str) -> Optional[float]:
    """A Python / numpy number as a float (None when value is not a scalar); bool is refused."""
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a float or a (B,) tensor, got bool")
    if isinstance(value, (int, float, np.integer, np.floating)):
        try:
            return float(value)
        except OverflowError:  # an int beyond the float range: the rule refuses an infinity
            return math.inf if value > 0 else -math.inf
    return None


def _int_scalar(value: Any, name: str) -> Optional[int]:
    """A Python / numpy int, clamped into int64 (None when value is not a scalar); bool and
    float are refused. (Clamping keeps the rules' verdicts: past int64 a setting is far out
    of any range a rule accepts, or, for top_k, as off as k >= V.)"""
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be an int or an integer (B,) tensor, got bool")
    if isinstance(value, (float, np.floating)):
        raise TypeError(f"{name} must be an int, got float {value!r}")
    if isinstance(value, (int, np.integer)):
        return min(max(int(value), _INT64_MIN), _INT64_MAX)
    return None


def _row_scalar(front: _Frontend, value: Any, name: str, B: int, device: torch.device) -> Tuple[Optional[Tensor], float]:
    """A per-row float argument: (tensor or None, scalar)."""
    v = _float_scalar(value, name)
    if v is not None:
        return None, v
    return _per_row(front, value, name, B, device, integer=False), 0.0


def _seed_arg(front: _Frontend, seed: Any, B: int, device: torch.device) -> Tuple[Optional[Tensor], int]:
    if isinstance(seed, bool):
        raise TypeError("seed must be an int or a (B,) int64 tensor, got bool")
    if isinstance(seed, (int, np.integer)):
        s = int(seed) % _INT64_MOD
        return None, s - _INT64_MOD if s >= 1 << 63 else s
    t = front.tensor(seed, "seed")
    if t.dtype != torch.int64:
        raise TypeError(f"seed must be an int or an int64 tensor, got {t.dtype}")
    if t.dim() == 0:
        return _seed_arg(front, int(t), B, device)
    if t.dim() != 1 or t.shape[0] != B:
        raise ValueError(f"seed must have shape (B,) = ({B},), got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"seed must be on the same device as the logits ({device}), got {t.device}")
    return t.contiguous(), 0


class _Filters(NamedTuple):
    """top_k / top_p / min_p as the bindings take them: (tensor or None, scalar) each."""

    k: Optional[Tensor]
    k_value: int
    p: Optional[Tensor]
    p_value: float
    mp: Optional[Tensor]
    mp_value: float

    @property
    def any(self) -> bool:
        """Whether the filter op must run: a setting other than exactly off (a bad value too,
        so that the bindings see and refuse it)."""
        return (self.k is not None or self.p is not None or self.mp is not None
                or self.k_value != 0 or self.p_value != 1.0 or self.mp_value != 0.0)

    def args(self) -> tuple:
        return (self.k, self.k_value, self.p, self.p_value, self.mp, self.mp_value)


def _per_row(front: _Frontend, value: Any, name: str, B: int, device: torch.device,
             integer: bool) -> Tensor:
    t = front.tensor(value, name, allow_float64=not integer)
    if integer and (t.is_floating_point() or t.dtype == torch.bool or t.is_complex()):
        raise TypeError(f"{name} must be an int or an integer (B,) tensor, got {t.dtype}")
    if not integer and not t.is_floating_point():
        raise TypeError(f"{name} must be a float or a floating (B,) tensor, got {t.dtype}")
    if t.dim() == 0:
        t = t.reshape(1).expand(B)
    if t.dim() != 1 or t.shape[0] != B:
        raise ValueError(f"{name} must have shape (B,) = ({B},), got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} must be on the same device as the logits ({device}), got {t.device}")
    return t.to(torch.int64 if integer else torch.float32).contiguous()


# The GPU value checks of the per-row settings given as (B,) arrays (the bindings check scalars
# and CPU arrays, with the same rules): integer?, the bad-value mask, the message.
_GPU_RULES = {
    "top_k": (True, lambda t: t < 0, "top_k must be >= 0 (0 = off)"),
    "top_p": (False, lambda x: ~((x > 0) & (x <= 1)), "top_p must be in (0, 1] (1 = off)"),
    "min_p": (False, lambda x: ~((x >= 0) & (x <= 1)), "min_p must be in [0, 1] (0 = off)"),
    "repetition_penalty": (False, lambda x: ~(torch.isfinite(x) & (x > 0)),
                           "repetition_penalty must be finite and > 0"),
    "presence_penalty": (False, lambda x: ~torch.isfinite(x), "presence_penalty must be finite"),
    "frequency_penalty": (False, lambda x: ~torch.isfinite(x), "frequency_penalty must be finite"),
}


def _setting(front: _Frontend, value: Any, name: str, default: Scalar, B: int,
             device: torch.device, checks: "_DeviceChecks") -> Tuple[Optional[Tensor], Any]:
    """A per-row setting as the bindings take it: (tensor or None, scalar); None is `default`."""
    if value is None:
        return None, default
    integer, bad, message = _GPU_RULES[name]
    v = (_int_scalar if integer else _float_scalar)(value, name)
    if v is not None:
        return None, v
    t = _per_row(front, value, name, B, device, integer)
    checks.bad(t, bad, message)
    return t, default


def _filter_args(front: _Frontend, top_k: Any, top_p: Any, min_p: Any, B: int,
                 device: torch.device, checks: "_DeviceChecks") -> _Filters:
    """top_k / top_p / min_p (None, a scalar, or a (B,) tensor per row)."""
    kt, kv = _setting(front, top_k, "top_k", 0, B, device, checks)
    pt, pv = _setting(front, top_p, "top_p", 1.0, B, device, checks)
    mt, mv = _setting(front, min_p, "min_p", 0.0, B, device, checks)
    return _Filters(kt, kv, pt, pv, mt, mv)


_NO_FILTER = _Filters(None, 0, None, 1.0, None, 0.0)


def _offset_arg(offset: Any) -> int:
    """offset as an int64 (the bindings check its range)."""
    if isinstance(offset, bool) or not isinstance(offset, (int, np.integer)):
        raise TypeError(f"offset must be an int, got {type(offset).__name__}")
    return min(max(int(offset), _INT64_MIN), _INT64_MAX)


class _DeviceChecks:
    """Value checks of GPU tensors (id ranges, temperatures), run together with one device sync
    queued right after the op's kernels, so the GPU never waits for the host. The kernels never
    read or write out of bounds whatever the values (an out-of-range id or a negative
    temperature makes its row invalid), so the check may follow them; on a bad value the
    results are dropped and ValueError is raised. Skipped inside CUDA-graph capture. Callers
    that want no host sync at all pass ``check_values=False`` or call ``torch.ops.specdiff.*``."""

    def __init__(self) -> None:
        self.items: list = []

    def ids(self, t: Tensor, hi: int, name: str, bound: str) -> None:
        if t.device.type == "cuda" and t.numel() > 0:
            self.items.append(("ids", t, hi, name, bound))

    def temperature(self, t: Optional[Tensor], name: str) -> None:
        if t is not None and t.device.type == "cuda" and t.numel() > 0:
            self.items.append(("tau", t, 0, name, ""))

    def bad(self, t: Optional[Tensor], bad_mask: Any, message: str) -> None:
        """Raise `message` (with the first bad value) where bad_mask(t) holds in some row."""
        if t is not None and t.device.type == "cuda" and t.numel() > 0:
            self.items.append(("bad", t, bad_mask, message, ""))

    def run(self) -> None:
        if not self.items or torch.cuda.is_current_stream_capturing():
            return
        vals = []
        for kind, t, aux, _, _ in self.items:
            if kind == "ids":
                vals += [t.min().to(torch.float64), t.max().to(torch.float64)]
            elif kind == "bad":
                m = aux(t)
                vals += [m.sum().to(torch.float64),
                         torch.where(m, t.to(torch.float64), 0.0).sum() if t.is_floating_point()
                         else torch.where(m, t, 0).sum().to(torch.float64)]
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
            if kind == "bad" and a > 0:
                raise ValueError(f"{name} in {int(a)} row(s) (sum of the bad values {b})")


def _check_vocab_map(vocab_map: Tensor, V: int) -> None:
    """The checks of a vocab_map (checked calls; one host sync on a GPU)."""
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
    if int(torch.unique(vocab_map).numel()) != Vd:
        raise ValueError("vocab_map must not repeat a target id")


def _vocab_inverse(vocab_map: Tensor, V: int) -> Tensor:
    """(V,) int32: the drafter index of each target id, -1 outside the map.

    Derived inside the op from the map itself on every call (one scatter over V, no host
    sync), so no caller ever hands the kernels an index table: map entries outside [0, V)
    are dropped, and of repeated ids one entry is kept (checked calls refuse both first)."""
    vm = vocab_map.to(torch.int64)
    Vd = vm.shape[0]
    pos = torch.where((vm >= 0) & (vm < V), vm, V)  # out-of-range entries land in a spare slot
    inv = torch.full((V + 1,), -1, dtype=torch.int32, device=vm.device)
    inv.scatter_(0, pos, torch.arange(Vd, dtype=torch.int32, device=vm.device))
    return inv[:V].contiguous()


def _dims3(t: Tensor, name: str, dims: str) -> Tuple[int, int, int]:
    """The sizes of a 3-dimensional argument (ValueError naming it otherwise): the custom ops
    and their fake implementations unpack logits shapes through this."""
    if t.dim() != 3:
        raise ValueError(f"{name} must have 3 dimensions {dims}, got shape {tuple(t.shape)}")
    B, N, V = t.shape
    return B, N, V


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
    temperature: Optional[Tensor],
    temperature_value: float,
    draft_temperature: Optional[Tensor],
    draft_temperature_value: float,
    seed: Optional[Tensor],
    seed_value: int,
    offset: int,
    target_lse: Optional[Tensor],
    draft_lse: Optional[Tensor],
    top_k: Optional[Tensor] = None,
    top_k_value: int = 0,
    top_p: Optional[Tensor] = None,
    top_p_value: float = 1.0,
    min_p: Optional[Tensor] = None,
    min_p_value: float = 0.0,
) -> Tuple[Tensor, Tensor, Tensor]:
    B, G1, V = _dims3(target_logits, "target_logits", "(B, G+1, V)")
    dev = target_logits.device
    ids = torch.empty((B, G1), dtype=torch.int64, device=dev)
    num = torch.empty((B,), dtype=torch.int64, device=dev)
    valid = torch.empty((B,), dtype=torch.bool, device=dev)
    # a map of the wrong rank goes to the bindings as it is (they name it); no inverse then
    ok_map = vocab_map is not None and vocab_map.dim() == 1
    Vd = vocab_map.shape[0] if ok_map else V
    vocab_inv = _vocab_inverse(vocab_map, V) if ok_map else None
    _C.verify(
        _dl(target_logits), _dl(draft_ids), _dl(draft_logits), _dl(draft_point_mass),
        _dl(vocab_map), _dl(vocab_inv), _dl(temperature), temperature_value,
        _dl(draft_temperature), draft_temperature_value, _dl(seed), seed_value, offset,
        _dl(target_lse), _dl(draft_lse), _dl(top_k), top_k_value, _dl(top_p), top_p_value,
        _dl(min_p), min_p_value, _dl(ids), _dl(num), _dl(valid),
        _dl(_workspace("verify", target_logits, B, G1 - 1, V, Vd)), _stream(target_logits),
    )
    return ids, num, valid


@_verify_op.register_fake
def _verify_fake(target_logits, draft_ids, *args):  # noqa: ANN001, ANN002
    B, G1, _ = _dims3(target_logits, "target_logits", "(B, G+1, V)")
    dev = target_logits.device
    return (
        target_logits.new_empty((B, G1), dtype=torch.int64),
        torch.empty((B,), dtype=torch.int64, device=dev),
        torch.empty((B,), dtype=torch.bool, device=dev),
    )


@torch.library.custom_op("specdiff::verify_tree", mutates_args=())
def _verify_tree_op(
    target_logits: Tensor,
    tokens: Tensor,
    parents: Tensor,
    temperature: Optional[Tensor],
    temperature_value: float,
    seed: Optional[Tensor],
    seed_value: int,
    offset: int,
    top_k: Optional[Tensor] = None,
    top_k_value: int = 0,
    top_p: Optional[Tensor] = None,
    top_p_value: float = 1.0,
    min_p: Optional[Tensor] = None,
    min_p_value: float = 0.0,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    B, N, _ = _dims3(target_logits, "target_logits", "(B, N, V)")
    dev = target_logits.device
    ids = torch.empty((B, N), dtype=torch.int64, device=dev)
    num = torch.empty((B,), dtype=torch.int64, device=dev)
    path = torch.empty((B, N), dtype=torch.int64, device=dev)
    valid = torch.empty((B,), dtype=torch.bool, device=dev)
    _C.verify_tree(
        _dl(target_logits), _dl(tokens), _dl(parents), _dl(temperature), temperature_value,
        _dl(seed), seed_value, offset, _dl(top_k), top_k_value, _dl(top_p), top_p_value,
        _dl(min_p), min_p_value, _dl(ids), _dl(num), _dl(path), _dl(valid),
        _stream(target_logits),
    )
    return ids, num, path, valid


@_verify_tree_op.register_fake
def _verify_tree_fake(target_logits, tokens, parents, *args):  # noqa: ANN001, ANN002
    B, N, _ = _dims3(target_logits, "target_logits", "(B, N, V)")
    dev = target_logits.device
    return (
        target_logits.new_empty((B, N), dtype=torch.int64),
        torch.empty((B,), dtype=torch.int64, device=dev),
        target_logits.new_empty((B, N), dtype=torch.int64),
        torch.empty((B,), dtype=torch.bool, device=dev),
    )


@torch.library.custom_op("specdiff::gather_logprobs", mutates_args=())
def _gather_op(
    logits: Tensor, ids: Tensor, temperature: Optional[Tensor], temperature_value: float
) -> Tuple[Tensor, Tensor]:
    B, N, V = _dims3(logits, "logits", "(B, N, V)")
    lse = torch.empty((B, N), dtype=torch.float32, device=logits.device)
    lp = torch.empty((B, N), dtype=torch.float32, device=logits.device)
    _C.gather_logprobs(
        _dl(logits), _dl(ids), _dl(temperature), temperature_value, _dl(lse), _dl(lp),
        _dl(_workspace("gather_logprobs", logits, B, N, V, V)), _stream(logits),
    )
    return lse, lp


@_gather_op.register_fake
def _gather_fake(logits, ids, *args):  # noqa: ANN001, ANN002
    B, N, _ = _dims3(logits, "logits", "(B, N, V)")
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
    B, G, Vd = _dims3(logits, "logits", "(B, G, Vd)")
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
    B, G, _ = _dims3(logits, "logits", "(B, G, Vd)")
    return (
        logits.new_empty((B, G), dtype=torch.int64),
        logits.new_empty((B, G), dtype=torch.int32),
        logits.new_empty((B, G), dtype=torch.float32),
        logits.new_empty((B,), dtype=torch.bool),
    )


@torch.library.custom_op("specdiff::filter_logits", mutates_args=())
def _filter_op(
    logits: Tensor,
    temperature: Optional[Tensor],
    temperature_value: float,
    top_k: Optional[Tensor],
    top_k_value: int,
    top_p: Optional[Tensor],
    top_p_value: float,
    min_p: Optional[Tensor],
    min_p_value: float,
) -> Tensor:
    out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    _C.filter_logits(
        _dl(logits), _dl(temperature), temperature_value, _dl(top_k), top_k_value, _dl(top_p),
        top_p_value, _dl(min_p), min_p_value, _dl(out), _stream(logits),
    )
    return out


@_filter_op.register_fake
def _filter_fake(logits, *args):  # noqa: ANN001, ANN002
    _dims3(logits, "logits", "(B, N, V)")
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


@torch.library.custom_op("specdiff::apply_penalties", mutates_args=())
def _penalty_op(
    logits: Tensor,
    ids: Tensor,
    lengths: Tensor,
    repetition: Optional[Tensor],
    repetition_value: float,
    presence: Optional[Tensor],
    presence_value: float,
    frequency: Optional[Tensor],
    frequency_value: float,
) -> Tensor:
    B, N, V = _dims3(logits, "logits", "(B, N, V)")
    out = torch.empty((B, N, V), dtype=torch.float32, device=logits.device)
    ws = None
    if logits.device.type == "cuda":
        n = _C.workspace_bytes("apply_penalties", B, N, V, V, logits.device.index or 0)
        ws = torch.empty(max(n, 1), dtype=torch.uint8, device=logits.device)
    _C.apply_penalties(
        _dl(logits), _dl(ids), _dl(lengths), _dl(repetition), repetition_value, _dl(presence),
        presence_value, _dl(frequency), frequency_value, _dl(out), _dl(ws), _stream(logits),
    )
    return out


@_penalty_op.register_fake
def _penalty_fake(logits, *args):  # noqa: ANN001, ANN002
    return logits.new_empty(_dims3(logits, "logits", "(B, N, V)"), dtype=torch.float32)


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
    top_k: Any = None,
    top_p: Any = None,
    min_p: Any = None,
) -> VerifyResult:
    f = _Frontend()
    tl = f.tensor(target_logits, "target_logits")
    B, G1, V = _dims3(tl, "target_logits", "(B, G+1, V)")
    dev = tl.device
    tl = _last_contiguous(tl)
    di = f.tensor(draft_ids, "draft_ids")
    dl = _opt(f, draft_logits, "draft_logits")
    dl = _last_contiguous(dl) if dl is not None else None
    pm = _opt(f, draft_point_mass, "draft_point_mass")
    vm = _opt(f, vocab_map, "vocab_map")
    if vm is not None:
        if vm.device != dev:
            raise ValueError(f"vocab_map must be on the same device as target_logits ({dev}), got {vm.device}")
        if check_values:  # unchecked: the CPU bindings still refuse out-of-range ids
            _check_vocab_map(vm, V)
    ta, tv = _row_scalar(f, temperature, "temperature", B, dev)
    dta, dtv = _row_scalar(f, draft_temperature, "draft_temperature", B, dev)
    sd, sv = _seed_arg(f, seed, B, dev)
    off = _offset_arg(offset)
    tlse = _opt(f, target_lse, "target_lse")
    dlse = _opt(f, draft_lse, "draft_lse")
    checks = _DeviceChecks()
    flt = _filter_args(f, top_k, top_p, min_p, B, dev, checks)
    if di.dim() == 2 and tuple(di.shape) == (B, G1 - 1):
        checks.ids(di, V, "draft_ids", "V")
    checks.temperature(ta, "temperature")
    checks.temperature(dta, "draft_temperature")
    if flt.any and dev.type != "cpu":
        # CUDA: the filter kernel writes the filtered rows, the verify kernels read them.
        tl = _call(_filter_op, tl, ta, tv, *flt.args())
        flt = _NO_FILTER
    ids, num, valid = _call(
        _verify_op, tl, di, dl, pm, vm, ta, tv, dta, dtv, sd, sv, off, tlse, dlse, *flt.args()
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
    top_k: Union[int, ArrayLike, None] = None,
    top_p: Union[float, ArrayLike, None] = None,
    min_p: Union[float, ArrayLike, None] = None,
    check_values: bool = True,
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
        Shape: () or (B,). 0 means greedy (target) / argmax drafts (drafter); so does a
        temperature whose float32 inverse is infinite (below about 2.9e-39, docs/ops.md).
    seed : int or int64 tensor
        Shape: () or (B,). One seed for the batch (rows draw independent streams), or a seed
        per row (a row's result then does not depend on its neighbours).
    offset : int
        Advances the random stream between calls.
    vocab_map : int32 or int64, optional
        Shape: (Vd,). Target id of each drafter vocabulary entry (reduced drafter vocabulary).
    top_k, top_p, min_p : int / float or (B,) tensor, optional
        Sampling controls of the target law, per row (0 / 1.0 / 0.0 turn one off in a row):
        the ids come out distributed exactly as transformers' ``generate()`` samples with the
        same settings (temperature, then top-k, then top-p, then min-p), correction and bonus
        included. Ignored for greedy rows. See :func:`filter_logits`.
    check_values : bool
        False skips the value checks of GPU arrays (id ranges, temperatures, filter settings)
        and so their host sync, for loops whose inputs are valid by construction (a decode
        round). Types, shapes and devices are still checked, and CPU values always (no sync).
        Unchecked, a bad GPU value never reads or writes out of bounds: its row is invalid.

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
        draft_temperature, seed, offset, vocab_map, None, None, bool(check_values), top_k, top_p,
        min_p,
    )


def verify_tree(
    target_logits: ArrayLike,
    tokens: ArrayLike,
    parents: ArrayLike,
    *,
    temperature: Union[float, ArrayLike] = 1.0,
    seed: Union[int, ArrayLike] = 0,
    offset: int = 0,
    top_k: Union[int, ArrayLike, None] = None,
    top_p: Union[float, ArrayLike, None] = None,
    min_p: Union[float, ArrayLike, None] = None,
    check_values: bool = True,
) -> TreeVerifyResult:
    """Verify a tree of drafts against the target in one call: a sample-and-match walk.

    Starting at the root, the op draws x from the target's law at the current node
    (``temperature``, then the filters in transformers' order, as :func:`verify`; greedy is
    the argmax). If a child of the node carries x, x is accepted and the walk moves there;
    otherwise x is emitted and the walk stops (at a leaf, x is the bonus token). The emitted
    sequence is distributed exactly as the target samples it, for any tree fixed before the
    target's draws. Draws are counter-based Philox keyed by (row seed, ``offset``, depth), the
    numbers of :func:`verify`'s bonus draw at position = depth. Only the rows on the walked
    path are read.

    Parameters
    ----------
    target_logits : float32, bfloat16 or float16
        Shape: (B, N, V). Row i is the target's logits for the token after node i.
    tokens : int32 or int64
        Shape: (B, N). The token of each node; node 0 is the root (the last emitted token),
        whose token is ignored.
    parents : int32 or int64
        Shape: (B, N). ``parents[:, 0] = -1``; for i >= 1, ``0 <= parents[b, i] < i``, or -1
        for an unused node (one batch may hold trees of different sizes). Siblings should
        carry different tokens (of repeated ones, the lowest index is the one matched).
    temperature : float or float tensor
        Shape: () or (B,). 0 (or a temperature whose float32 inverse is infinite) is greedy.
    seed : int or int64 tensor
        Shape: () or (B,). One seed for the batch, or a seed per row.
    offset : int
        Advances the random stream between calls.
    top_k, top_p, min_p : int / float or (B,) tensor, optional
        Sampling controls of the target law, per row, as in :func:`verify`.
    check_values : bool
        False skips the value checks of GPU arrays (tree structure, tokens, temperatures,
        filter settings) and their host sync. CPU values are always checked. Unchecked, a bad
        GPU value never reads or writes out of bounds.

    Returns
    -------
    TreeVerifyResult(ids, num_accepted, path, valid)
        ids: (B, N) int64, the accepted tokens, then the emitted one, then -1;
        num_accepted: (B,) int64; path: (B, N) int64, the node of each accepted token, then
        -1; valid: (B,) bool, false where a row on the path held NaN or +inf or no finite
        logit (that row is then all -1).

    Examples
    --------
    >>> import torch, specdiff_ext
    >>> logits = torch.randn(1, 4, 50)
    >>> tokens = torch.tensor([[0, 7, 9, 3]])       # root, then three drafted nodes
    >>> parents = torch.tensor([[-1, 0, 0, 1]])     # 7 and 9 follow the root, 3 follows 7
    >>> res = specdiff_ext.ops.verify_tree(logits, tokens, parents, seed=1)
    >>> res.ids.shape, res.path.shape
    (torch.Size([1, 4]), torch.Size([1, 4]))
    """
    f = _Frontend()
    tl = f.tensor(target_logits, "target_logits")
    B, N, V = _dims3(tl, "target_logits", "(B, N, V)")
    dev = tl.device
    tl = _last_contiguous(tl)
    tk = f.tensor(tokens, "tokens")
    pa = f.tensor(parents, "parents")
    ta, tv = _row_scalar(f, temperature, "temperature", B, dev)
    sd, sv = _seed_arg(f, seed, B, dev)
    off = _offset_arg(offset)
    checks = _DeviceChecks()
    flt = _filter_args(f, top_k, top_p, min_p, B, dev, checks)
    checks.temperature(ta, "temperature")
    if (pa.dim() == 2 and tuple(pa.shape) == (B, N) and tk.dim() == 2 and tuple(tk.shape) == (B, N)
            and not pa.is_floating_point() and not tk.is_floating_point()):
        checks.bad(_tree_faults(pa, tk, V), lambda t: t != 0,
                   "parents must be -1 at the root and, for i >= 1, in [0, i) or -1 (unused), and "
                   "a used node's token in [0, V): bad nodes")
    if flt.any and dev.type != "cpu":
        tl = _call(_filter_op, tl, ta, tv, *flt.args())
        flt = _NO_FILTER
    ids, num, path, valid = _call(_verify_tree_op, tl, tk, pa, ta, tv, sd, sv, off, *flt.args())
    if check_values:
        checks.run()
    return TreeVerifyResult(f.out(ids), f.out(num), f.out(path), f.out(valid))


def _tree_faults(parents: Tensor, tokens: Tensor, V: int) -> Optional[Tensor]:
    """(B, N) int64, 1 at each node that breaks the tree rules (GPU trees only; the CPU
    bindings check them on the host with a message naming the node)."""
    if parents.device.type != "cuda":
        return None
    N = parents.shape[1]
    pa = parents.to(torch.int64)
    idx = torch.arange(N, device=pa.device)
    bad = (pa < -1) | (pa >= idx) & (idx > 0)
    bad[:, 0] = pa[:, 0] != -1
    tk = tokens.to(torch.int64)
    bad |= (pa >= 0) & ((tk < 0) | (tk >= V))
    return bad.to(torch.int64)


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
    top_k: Union[int, ArrayLike, None] = None,
    top_p: Union[float, ArrayLike, None] = None,
    min_p: Union[float, ArrayLike, None] = None,
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
    top_k, top_p, min_p : as in :func:`verify`. With a filter on, target_lse must be the
        log-sum-exp of the filtered rows (``gather_logprobs`` with the same settings); the CPU
        kernel, which must read the row to find the kept entries anyway, computes it itself.

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
        draft_temperature, seed, offset, vocab_map, target_lse, draft_lse, True, top_k, top_p,
        min_p,
    )


def gather_logprobs(logits: ArrayLike, ids: ArrayLike, temperature: Union[float, ArrayLike] = 1.0,
                    *, top_k: Union[int, ArrayLike, None] = None,
                    top_p: Union[float, ArrayLike, None] = None,
                    min_p: Union[float, ArrayLike, None] = None) -> GatherResult:
    """Parallel verification logit gathering: the log-sum-exp of each row at ``temperature`` and
    the log-probability of one id per row, in one read of the logits (no probabilities stored).

    Parameters
    ----------
    logits : float32, bfloat16 or float16
        Shape: (B, N, V).
    ids : int32 or int64
        Shape: (B, N).
    temperature : float or float tensor
        Shape: () or (B,). At 0 (or a vanishing temperature, read as 0): lse is the row max
        and logprob is 0 for the argmax, else -inf.
    top_k, top_p, min_p : as in :func:`verify`: lse and logprobs of the filtered law (-inf for
        a dropped id).

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
    _dims3(lg, "logits", "(B, N, V)")
    lg = _last_contiguous(lg)
    ix = f.tensor(ids, "ids")
    ta, tv = _row_scalar(f, temperature, "temperature", lg.shape[0], lg.device)
    checks = _DeviceChecks()
    flt = _filter_args(f, top_k, top_p, min_p, lg.shape[0], lg.device, checks)
    if ix.dim() == 2 and tuple(ix.shape) == tuple(lg.shape[:2]):
        checks.ids(ix, lg.shape[2], "ids", "V")
    checks.temperature(ta, "temperature")
    if flt.any:
        lg = _call(_filter_op, lg, ta, tv, *flt.args())
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
    top_k: Union[int, ArrayLike, None] = None,
    top_p: Union[float, ArrayLike, None] = None,
    min_p: Union[float, ArrayLike, None] = None,
    check_values: bool = True,
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
    top_k, top_p, min_p : as in :func:`verify`: tokens are drawn from the filtered law, lse
        (and the confidence of ``confidence`` mode) is that law's.
    check_values : bool
        As in :func:`verify`: False skips the GPU value checks (vocab_map range, temperature)
        and their host sync -- the sampler's denoising steps run without one.

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
    _dims3(lg, "logits", "(B, G, Vd)")
    lg = _last_contiguous(lg)
    tk = f.tensor(tokens, "tokens")
    cs = f.tensor(commit_step, "commit_step")
    steps = []
    for name, val in (("step", step), ("num_steps", num_steps)):
        if isinstance(val, bool) or not isinstance(val, (int, np.integer)):
            raise TypeError(f"{name} must be an int, got {type(val).__name__}")
        steps.append(_int_scalar(val, name))  # the bindings check the range
    m = CommitMode.parse(mode)
    vm = _opt(f, vocab_map, "vocab_map")
    ta, tv = _row_scalar(f, temperature, "temperature", lg.shape[0], lg.device)
    checks = _DeviceChecks()
    if vm is not None:
        checks.ids(vm, sys.maxsize, "vocab_map", "2^63")
    checks.temperature(ta, "temperature")
    flt = _filter_args(f, top_k, top_p, min_p, lg.shape[0], lg.device, checks)
    if check_values:
        checks.run()
    sd, sv = _seed_arg(f, seed, lg.shape[0], lg.device)
    off = _offset_arg(offset)
    if flt.any:
        lg = _call(_filter_op, lg, ta, tv, *flt.args())
    out = _call(_denoise_op, lg, tk, cs, steps[0], steps[1], int(m), vm, ta, tv, sd, sv, off)
    return DenoiseResult(*(f.out(t) for t in out))


def filter_logits(
    logits: ArrayLike,
    *,
    temperature: Union[float, ArrayLike] = 1.0,
    top_k: Union[int, ArrayLike, None] = None,
    top_p: Union[float, ArrayLike, None] = None,
    min_p: Union[float, ArrayLike, None] = None,
) -> Any:
    """Top-k, top-p and min-p as transformers' ``generate()`` applies them: the logits with
    every entry the filters drop set to -inf (the kept entries are unchanged).

    The filters act on softmax(logits / temperature), in transformers' order: top-k (the k
    largest, ties with the k-th kept), then top-p over the survivors (the smallest head whose
    mass reaches p; entries tied at the boundary are taken in the order of a stable ascending
    sort, as transformers' sort takes them), then min-p (probability >= min_p * the largest).
    At least one entry is always kept. No full sort: selection and pivot searches (docs/ops.md).
    Rows at temperature 0 (greedy; a vanishing temperature, whose float32 inverse is infinite,
    reads as 0), rows with every filter off and rows holding NaN / +inf come back unchanged. A boundary decided by a cumulative sum may differ from transformers'
    only where that sum lies within float32 rounding of the threshold.

    Parameters
    ----------
    logits : float32, bfloat16 or float16
        Shape: (B, N, V).
    temperature : float or float tensor
        Shape: () or (B,).
    top_k : int or integer tensor, optional
        Shape: () or (B,). >= 0; 0 (or k >= V) is off.
    top_p : float or float tensor, optional
        Shape: () or (B,). In (0, 1]; 1 is off.
    min_p : float or float tensor, optional
        Shape: () or (B,). In [0, 1]; 0 is off.

    Returns
    -------
    (B, N, V) array of the dtype of ``logits``.

    Examples
    --------
    >>> import torch, specdiff_ext
    >>> x = torch.tensor([[[3.0, 1.0, 2.0, 0.0]]])
    >>> specdiff_ext.ops.filter_logits(x, top_k=2)
    tensor([[[3., -inf, 2., -inf]]])
    """
    f = _Frontend()
    lg = f.tensor(logits, "logits")
    _dims3(lg, "logits", "(B, N, V)")
    lg = _last_contiguous(lg)
    ta, tv = _row_scalar(f, temperature, "temperature", lg.shape[0], lg.device)
    checks = _DeviceChecks()
    checks.temperature(ta, "temperature")
    flt = _filter_args(f, top_k, top_p, min_p, lg.shape[0], lg.device, checks)
    out = _call(_filter_op, lg, ta, tv, *flt.args())
    checks.run()
    return f.out(out)


def apply_penalties(
    logits: ArrayLike,
    ids: ArrayLike,
    lengths: Union[int, ArrayLike],
    *,
    repetition_penalty: Union[float, ArrayLike] = 1.0,
    presence_penalty: Union[float, ArrayLike] = 0.0,
    frequency_penalty: Union[float, ArrayLike] = 0.0,
) -> Any:
    """Repetition, presence and frequency penalties of a block of positions, each given the
    tokens before it: position n of row b has seen ``ids[b, :lengths[b] + n]`` (the context,
    then the draft tokens before n). Apply before :func:`verify`, and to the rows drafts are
    drawn from if the drafter should see them too.

    For every token seen c > 0 times before the position: the repetition penalty r of
    transformers' ``RepetitionPenaltyLogitsProcessor`` (logit * r if negative, logit / r
    otherwise; once per token), then ``logit - presence - frequency * c`` (the OpenAI / vLLM
    definitions). transformers and vLLM apply the repetition penalty over prompt and output;
    vLLM counts presence and frequency over the output only: pass ``ids`` and ``lengths`` of
    the output for that.

    Parameters
    ----------
    logits : float32, bfloat16 or float16
        Shape: (B, N, V).
    ids : int32 or int64
        Shape: (B, L). Tokens seen, per row; entries past ``lengths[b] + N - 1`` are not read.
    lengths : int or int64 tensor
        Shape: () or (B,). Context length of each row; 0 <= lengths[b] <= L - (N - 1).
    repetition_penalty : float or float tensor
        Shape: () or (B,). > 0; 1 is off.
    presence_penalty, frequency_penalty : float or float tensor
        Shape: () or (B,). Finite; 0 is off.

    Returns
    -------
    (B, N, V) float32 array.

    Examples
    --------
    >>> import torch, specdiff_ext
    >>> x = torch.tensor([[[2.0, -2.0, 1.0], [2.0, -2.0, 1.0]]])
    >>> ids = torch.tensor([[1, 0]])     # context [1]; the draft at position 0 is token 0
    >>> specdiff_ext.ops.apply_penalties(x, ids, 1, repetition_penalty=2.0)
    tensor([[[ 2., -4.,  1.],
             [ 1., -4.,  1.]]])
    """
    f = _Frontend()
    lg = f.tensor(logits, "logits")
    _dims3(lg, "logits", "(B, N, V)")
    lg = _last_contiguous(lg)
    B, N, V = lg.shape
    ix = f.tensor(ids, "ids")
    n = _int_scalar(lengths, "lengths")  # past int64: clamped, and refused by the bindings
    if n is not None:
        ln = torch.full((B,), n, dtype=torch.int64, device=lg.device)
    else:
        ln = _per_row(f, lengths, "lengths", B, lg.device, True)
    checks = _DeviceChecks()
    rt, rv = _setting(f, repetition_penalty, "repetition_penalty", 1.0, B, lg.device, checks)
    pt, pv = _setting(f, presence_penalty, "presence_penalty", 0.0, B, lg.device, checks)
    qt, qv = _setting(f, frequency_penalty, "frequency_penalty", 0.0, B, lg.device, checks)
    if ix.dim() == 2 and ix.shape[0] == B:
        L = ix.shape[1]
        checks.bad(ln, lambda t: (t < 0) | (t > L - max(N - 1, 0)),  # t + N - 1 could wrap
                   f"lengths must satisfy 0 <= lengths[b] <= L - (N - 1) = {L - max(N - 1, 0)}")
        if ix.device.type == "cuda" and ix.numel() > 0:
            checks.ids(ix, V, "ids", "V")
    out = _call(_penalty_op, lg, ix, ln, rt, rv, pt, pv, qt, qv)
    checks.run()
    return f.out(out)


def check_sampling(
    temperature: Optional[Scalar] = None,
    top_k: Optional[int] = None,
    top_p: Optional[Scalar] = None,
    min_p: Optional[Scalar] = None,
    repetition_penalty: Optional[Scalar] = None,
    presence_penalty: Optional[Scalar] = None,
    frequency_penalty: Optional[Scalar] = None,
) -> dict:
    """Check scalar sampling settings before any tensor exists (a decoder's or the CLI's
    settings), by the very rules the ops apply: the same C++ routines the bindings run, so a
    setting passes here exactly when the ops take it.

    Parameters
    ----------
    temperature, top_p, min_p, repetition_penalty, presence_penalty, frequency_penalty : float, optional
    top_k : int, optional
        None means not given (not checked, left out of the result).

    Returns
    -------
    dict
        The given settings, normalised: floats, and an int for ``top_k``.

    Raises
    ------
    TypeError
        A bool, a non-number, or a float top_k (the ops' own TypeErrors).
    ValueError
        A value the ops refuse, naming the setting (e.g. ``top_p must be in (0, 1] (1 = off)``).

    Examples
    --------
    >>> import specdiff_ext
    >>> specdiff_ext.ops.check_sampling(temperature=0.7, top_k=50, top_p=0.9)
    {'temperature': 0.7, 'top_k': 50, 'top_p': 0.9}
    """
    out: dict = {}
    for name, value in (("temperature", temperature), ("top_k", top_k), ("top_p", top_p),
                        ("min_p", min_p), ("repetition_penalty", repetition_penalty),
                        ("presence_penalty", presence_penalty),
                        ("frequency_penalty", frequency_penalty)):
        if value is None:
            continue
        integer = name in _GPU_RULES and _GPU_RULES[name][0]
        v = (_int_scalar if integer else _float_scalar)(value, name)
        if v is None:
            raise TypeError(f"{name} must be {'an int' if integer else 'a float'}, "
                            f"got {type(value).__name__}")
        out[name] = v
    _C.check_sampling(**out)
    return out


def point_mass_mask(commit_step: ArrayLike) -> Any:
    """The order-aware exactness rule (docs/design.md section 3): position l must be verified against a
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
