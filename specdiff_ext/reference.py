"""Pure-torch reference of every specdiff_ext op.

This module implements ``docs/ops.md`` literally, in float64 by default, with no compiled code:
it is the oracle the kernels (`specdiff_ext.ops`) are tested against and the executable form of
the documentation. The random numbers are the very same Philox-4x32-10 words the kernels draw
(uint32 arithmetic emulated with int64 tensors), so for a given seed and offset the reference
samples the same ids as the CPU and CUDA kernels, up to decisions that fall within rounding of
a tie (float32 in the kernels against ``compute_dtype`` here).

Rows are processed together (vectorised over the batch), positions one after the other: it is
written to be read and checked, not to be fast. `naive_verify` is different: the plain-torch
speed baseline of the benchmarks, which does not follow the Philox stream.

Every public op is the twin of the one of the same name in `specdiff_ext.ops`: the same
arguments (per-row (B,) settings and the filters top_k / top_p / min_p included), the same
checks and the same output shapes and dtypes (float32 for the float outputs). The reference
adds one keyword, ``compute_dtype`` (float64 by default, the arithmetic), where the result
involves arithmetic beyond a filter's decisions, and it also takes float64 logits (which the
ops refuse), giving float64 outputs for them. ``check_values`` is taken and ignored: the
reference always checks every value. Inputs may be torch tensors or NumPy arrays; NumPy inputs
give NumPy outputs.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import Tensor

from .types import CommitMode, DenoiseResult, GatherResult, TreeVerifyResult, VerifyResult

__all__ = [
    "CommitMode",
    "DenoiseResult",
    "GatherResult",
    "VerifyResult",
    "TreeVerifyResult",
    "TAG_ACCEPT",
    "TAG_CORRECTION",
    "TAG_DENOISE_TOKEN",
    "TAG_DENOISE_COMMIT",
    "philox4x32_10",
    "splitmix64",
    "row_seeds",
    "row_keys",
    "random_words",
    "uniform",
    "exponential",
    "gather_logprobs",
    "rejection_sample",
    "verify",
    "verify_tree",
    "denoise_step",
    "point_mass_mask",
    "naive_verify",
    "filter_logits",
    "apply_penalties",
]

ArrayLike = Union[Tensor, np.ndarray]
Temperature = Union[float, ArrayLike]
Seed = Union[int, ArrayLike]

# Philox-4x32-10 constants (Salmon et al. 2011, Random123).
PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
GOLDEN_GAMMA = 0x9E3779B97F4A7C15  # splitmix64 increment, also the per-row seed stride
MASK32 = 0xFFFFFFFF
MASK64 = 0xFFFFFFFFFFFFFFFF
MAX_OFFSET = 1 << 56

# Stream tags (counter word 3, bits 24..31).
TAG_ACCEPT = 1  # acceptance uniform, index 0, position i
TAG_CORRECTION = 2  # correction / bonus race, index v (target vocabulary), position k
TAG_DENOISE_TOKEN = 3  # denoise token race, index j (drafter vocabulary), position g
TAG_DENOISE_COMMIT = 4  # denoise commit coin, index 0, position g

_ONE_MINUS_ULP = float.fromhex("0x1.fffffep-1")  # largest float32 below 1


# --------------------------------------------------------------------------------------------
# Random numbers
# --------------------------------------------------------------------------------------------


def _mulhilo32(a: int, b: Tensor) -> tuple[Tensor, Tensor]:
    """(hi, lo) 32-bit halves of the 64-bit product of the constant `a` and uint32 values `b`.

    The product can reach 2^64, beyond int64, so `b` is split into 16-bit halves: each partial
    product stays below 2^48.
    """
    p_lo = a * (b & 0xFFFF)  # < 2^48
    p_hi = a * (b >> 16)  # < 2^48; the full product is p_lo + p_hi * 2^16
    t = p_lo + ((p_hi & 0xFFFF) << 16)  # < 2^49
    return (p_hi >> 16) + (t >> 32), t & MASK32


def philox4x32_10(counter: Tensor, key: Tensor) -> Tensor:
    """Philox-4x32-10 block function on uint32 values held in int64 tensors.

    Parameters
    ----------
    counter : Tensor
        int64, values in [0, 2^32). Shape: (..., 4).
    key : Tensor
        int64, values in [0, 2^32); broadcast against `counter`. Shape: (..., 2).

    Returns
    -------
    Tensor
        The four output words, int64 in [0, 2^32). Shape: broadcast(...), 4.

    Examples
    --------
    >>> out = philox4x32_10(torch.zeros(4, dtype=torch.int64), torch.zeros(2, dtype=torch.int64))
    >>> [hex(int(w)) for w in out]
    ['0x6627e8d5', '0xe169c58d', '0xbc57ac4c', '0x9b00dbd8']
    """
    counter = torch.as_tensor(counter, dtype=torch.int64)
    key = torch.as_tensor(key, dtype=torch.int64, device=counter.device)
    if counter.shape[-1:] != (4,) or key.shape[-1:] != (2,):
        raise ValueError(
            f"counter must have shape (..., 4) and key (..., 2), got {tuple(counter.shape)} "
            f"and {tuple(key.shape)}"
        )
    c0, c1, c2, c3 = counter.unbind(-1)
    k0, k1 = key.unbind(-1)
    for r in range(10):
        if r:
            k0 = (k0 + PHILOX_W0) & MASK32
            k1 = (k1 + PHILOX_W1) & MASK32
        hi0, lo0 = _mulhilo32(PHILOX_M0, c0)
        hi1, lo1 = _mulhilo32(PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    c0, c1, c2, c3 = torch.broadcast_tensors(c0, c1, c2, c3)
    return torch.stack([c0, c1, c2, c3], dim=-1)


def splitmix64(x: int) -> int:
    """splitmix64 finaliser of one 64-bit value (Python ints, arithmetic mod 2^64).

    Examples
    --------
    >>> hex(splitmix64(0))
    '0xe220a8397b1dcdaf'
    """
    z = (x + GOLDEN_GAMMA) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def _splitmix64_np(z: np.ndarray) -> np.ndarray:
    """Vectorised splitmix64 over a uint64 array (NumPy array arithmetic wraps mod 2^64)."""
    z = z + np.uint64(GOLDEN_GAMMA)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def row_seeds(seed: Seed, batch_size: int) -> np.ndarray:
    """The 64-bit seed of every row, as documented in docs/ops.md.

    One int seed for the batch gives row b the seed ``seed + 0x9E3779B97F4A7C15 * (b + 1)``
    (mod 2^64); a (B,) int64 tensor gives each row its own seed (read as uint64).

    Shape:
        seed: int or (B,) int64. Returns (B,) uint64 (NumPy).
    """
    if isinstance(seed, (Tensor, np.ndarray)):
        s = seed.detach().cpu().numpy() if isinstance(seed, Tensor) else np.asarray(seed)
        if s.shape != (batch_size,):
            raise ValueError(
                f"seed must be an int or have shape (B,) = ({batch_size},), got {tuple(s.shape)}"
            )
        if s.dtype != np.int64 and s.dtype != np.uint64:
            raise TypeError(f"seed must be int64, got {s.dtype}")
        return np.ascontiguousarray(s).view(np.uint64)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an int or an int64 tensor, got {type(seed).__name__}")
    b = np.arange(1, batch_size + 1, dtype=np.uint64)
    return np.uint64(int(seed) & MASK64) + np.uint64(GOLDEN_GAMMA) * b


def _signed64(x: int) -> int:
    x &= MASK64
    return x - (1 << 64) if x >= 1 << 63 else x


def _lsr64(z: Tensor, k: int) -> Tensor:
    """Logical right shift of int64 tensors read as uint64."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def _splitmix64_t(z: Tensor) -> Tensor:
    """splitmix64 over an int64 tensor read as uint64 (torch int64 arithmetic wraps mod 2^64)."""
    z = z + _signed64(GOLDEN_GAMMA)
    z = (z ^ _lsr64(z, 30)) * _signed64(0xBF58476D1CE4E5B9)
    z = (z ^ _lsr64(z, 27)) * _signed64(0x94D049BB133111EB)
    return z ^ _lsr64(z, 31)


@torch.compiler.disable  # Inductor would constant-fold the wrapping uint64 products as Python ints
def row_keys(seed: Seed, batch_size: int, device: Any = "cpu") -> Tensor:
    """Philox key of every row: ``k = splitmix64(row_seed)``, ``(k & 0xFFFFFFFF, k >> 32)``.

    Pure torch (no numpy); torch.compile of the reference runs it eagerly.

    Shape:
        seed: int or (B,) int64. Returns (B, 2) int64.
    """
    if isinstance(seed, np.ndarray):
        seed = torch.from_numpy(np.ascontiguousarray(seed).view(np.int64))
    if isinstance(seed, Tensor):
        if tuple(seed.shape) != (batch_size,):
            raise ValueError(
                f"seed must be an int or have shape (B,) = ({batch_size},), got {tuple(seed.shape)}"
            )
        if seed.dtype != torch.int64:
            raise TypeError(f"seed must be int64, got {seed.dtype}")
        s = seed.to(device)
    else:
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise TypeError(f"seed must be an int or an int64 tensor, got {type(seed).__name__}")
        b = torch.arange(1, batch_size + 1, dtype=torch.int64, device=device)
        s = b * _signed64(GOLDEN_GAMMA) + _signed64(int(seed))
    k = _splitmix64_t(s)
    return torch.stack([k & MASK32, _lsr64(k, 32)], dim=-1).reshape(batch_size, 2)


def _counter(index: Tensor, position: Any, offset: int, tag: int) -> Tensor:
    """Philox counter of draws addressed by (offset, position, index, tag). Shape: (..., 4)."""
    index = torch.as_tensor(index, dtype=torch.int64)
    position = torch.as_tensor(position, dtype=torch.int64, device=index.device)
    c0, c1 = torch.broadcast_tensors(index >> 2, position)
    c2 = torch.full_like(c0, offset & MASK32)
    c3 = torch.full_like(c0, ((offset >> 32) & 0xFFFFFF) | (tag << 24))
    return torch.stack([c0, c1, c2, c3], dim=-1)


def random_words(key: Any, offset: int, position: Any, index: Any, tag: int) -> Tensor:
    """The 32-bit random word addressed by (row key, offset, position, index, tag).

    Counter ``(index >> 2, position, offset & 0xFFFFFFFF,
    ((offset >> 32) & 0xFFFFFF) | tag << 24)``; the draw is output word ``index & 3``.

    Parameters
    ----------
    key : Tensor or tuple of two ints
        Row key(s) (k0, k1). Shape: (..., 2).
    offset : int
        Call offset, 0 <= offset < 2^56.
    position, index : int or Tensor
        Broadcast against each other and against ``key[..., 0]``.
    tag : int
        Stream tag (TAG_ACCEPT, TAG_CORRECTION, TAG_DENOISE_TOKEN, TAG_DENOISE_COMMIT).

    Returns
    -------
    Tensor
        int64 words in [0, 2^32). Shape: broadcast(key[..., 0], position, index).
    """
    if not 0 <= offset < MAX_OFFSET:
        raise ValueError(f"offset must be in [0, 2^56), got {offset}")
    key = torch.as_tensor(key, dtype=torch.int64)
    index = torch.as_tensor(index, dtype=torch.int64, device=key.device)
    position = torch.as_tensor(position, dtype=torch.int64, device=key.device)
    index, position, _ = torch.broadcast_tensors(index, position, key[..., 0])
    words = philox4x32_10(_counter(index, position, offset, tag), key)
    return torch.gather(words, -1, (index & 3).unsqueeze(-1)).squeeze(-1)


def _words_to_uniform(words: Tensor) -> Tensor:
    """float32 uniform in (0, 1): ``min((float(x) + 0.5f) * 2^-32, 0x1.fffffep-1f)``."""
    w = (words.to(torch.float32) + 0.5) * 2.0**-32  # all float32 arithmetic
    return w.clamp_max(_ONE_MINUS_ULP)


def uniform(key: Any, offset: int, position: Any, index: Any, tag: int) -> Tensor:
    """float32 uniform in (0, 1) addressed by (row key, offset, position, index, tag).

    Same arguments and shape as `random_words`.

    Examples
    --------
    >>> keys = row_keys(seed=0, batch_size=2)  # (2, 2)
    >>> uniform(keys, offset=0, position=0, index=0, tag=TAG_ACCEPT).shape
    torch.Size([2])
    """
    return _words_to_uniform(random_words(key, offset, position, index, tag))


def exponential(
    key: Any, offset: int, position: Any, index: Any, tag: int,
    compute_dtype: torch.dtype = torch.float64,
) -> Tensor:
    """Standard exponential ``E = -log1p(-w)`` of the uniform `w` at the same address."""
    w = uniform(key, offset, position, index, tag).to(compute_dtype)
    return -torch.log1p(-w)


def _exponentials_range(
    keys: Tensor, offset: int, position: int, n: int, tag: int, dtype: torch.dtype
) -> Tensor:
    """Exponentials at indices 0..n-1 for each row key: one Philox call per 4 indices.

    Shape:
        keys: (R, 2). Returns (R, n).
    """
    m = (n + 3) // 4
    c0 = torch.arange(m, dtype=torch.int64, device=keys.device) * 4  # index of word 0
    counter = _counter(c0, position, offset, tag)  # (m, 4)
    words = philox4x32_10(counter.unsqueeze(0), keys.unsqueeze(1))  # (R, m, 4)
    words = words.reshape(keys.shape[0], 4 * m)[:, :n]
    w = _words_to_uniform(words).to(dtype)
    return -torch.log1p(-w)


def _race(a: Tensor, e: Tensor) -> tuple[Tensor, Tensor]:
    """Exponential race ``argmax_v (a_v - log E_v)`` (ties to the lowest index) and its margin.

    The margin is the gap between the two best race values relative to the best one: the
    amount of rounding that could change the winner.

    Shape:
        a, e: (R, V). Returns (R,) int64 and (R,) float.
    """
    vals = a - torch.log(e)
    tok = vals.argmax(dim=-1)
    if vals.shape[-1] >= 2:
        top = vals.topk(2, dim=-1).values
        gap = (top[:, 0] - top[:, 1]) / top[:, 0].abs().clamp_min(1.0)
        gap = torch.where(torch.isfinite(top[:, 1]), gap, torch.full_like(gap, math.inf))
    else:
        gap = torch.full(tok.shape, math.inf, dtype=vals.dtype, device=vals.device)
    return tok, gap


# --------------------------------------------------------------------------------------------
# Argument handling (light: the ops do the full validation)
# --------------------------------------------------------------------------------------------


def _tensor(x: Any, name: str) -> Tensor:
    if isinstance(x, Tensor):
        return x.detach() if x.requires_grad else x
    if isinstance(x, np.ndarray):
        if not x.flags.writeable:  # inputs are only read: wrap read-only arrays as they are
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                return torch.from_numpy(x)
        return torch.from_numpy(x)
    raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(x).__name__}")


def _check_rank(x: Tensor, ndim: int, name: str, shape: str) -> None:
    if x.dim() != ndim:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(x.shape)}")


def _check_device(x: Tensor, device: Any, name: str) -> None:
    if x.device != torch.device(device):
        raise ValueError(f"{name} must be on the same device as the logits ({device}), "
                         f"got {x.device}")


def _check_ids(x: Tensor, name: str, vocab: int) -> None:
    if x.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be int32 or int64, got {x.dtype}")
    if x.numel() and (int(x.min()) < 0 or int(x.max()) >= vocab):
        bad = int(x.min()) if int(x.min()) < 0 else int(x.max())
        raise ValueError(f"{name} holds {bad}, outside [0, {vocab})")


def _check_logits(x: Tensor, name: str) -> None:
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        raise TypeError(f"{name} must be float32, bfloat16, float16 or (reference only) float64, "
                        f"got {x.dtype}")


def _out_dtype(logits: Tensor) -> torch.dtype:
    """The ops' float output dtype, float32; float64 for float64 logits (the reference only)."""
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def _row_shape(t: Tensor, name: str, batch: int) -> Tensor:
    """A () or (B,) setting as (B,), as the ops take it."""
    if t.dim() == 0:
        t = t.reshape(1).expand(batch)
    if tuple(t.shape) != (batch,):
        raise ValueError(f"{name} must have shape (B,) = ({batch},), got {tuple(t.shape)}")
    return t


def _per_row(value: Temperature, batch: int, name: str, dtype: torch.dtype, device: Any) -> Tensor:
    """A float or () / (B,) float tensor as a (B,) tensor, rounded through float32 as the kernels
    see it."""
    if isinstance(value, (Tensor, np.ndarray)):
        t = _tensor(value, name)
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a float or a floating (B,) tensor, got {t.dtype}")
        _check_device(t, device, name)
        t = _row_shape(t, name, batch).to(dtype=torch.float32)
    elif isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
            value, (bool, np.bool_)):
        v = float(value)
        with np.errstate(over="ignore"):
            v32 = float(np.float32(v))  # valid as given and as the float32 the kernels read
        for i, w in enumerate((v, v32)):
            if not (math.isfinite(w) and w >= 0):
                extra = f" ({w} as the kernels' float32)" if i else ""
                raise ValueError(f"{name} must be finite and >= 0, got {value!r}{extra}")
        t = torch.full((batch,), v32, dtype=torch.float32, device=device)
    else:
        raise TypeError(f"{name} must be a float or a tensor, got {type(value).__name__}")
    if t.numel() and not bool(((t >= 0) & torch.isfinite(t)).all()):
        raise ValueError(f"{name} must be finite and >= 0, got {t.tolist()[:8]}")
    # A vanishing temperature, whose float32 inverse is infinite (tau < 2^-128), is read as 0:
    # the greedy law, in every op (docs/ops.md, temperatures).
    t = torch.where(torch.isinf(1.0 / t) & (t > 0), 0.0, t)
    return t.to(dtype)


def _seed(seed: Seed, batch: int, device: Any) -> Tensor:
    """Row keys of an int seed or a () / (B,) int64 seed tensor (on the logits' device)."""
    if isinstance(seed, (Tensor, np.ndarray)):
        t = _tensor(seed, "seed")
        if t.dtype != torch.int64:
            raise TypeError(f"seed must be an int or an int64 tensor, got {t.dtype}")
        if t.dim() == 0:
            return row_keys(int(t), batch, device)
        _check_device(t, device, "seed")
    return row_keys(seed, batch, device)


def _int_setting(value: Any, name: str, batch: int, device: Any) -> Tensor:
    """top_k: None (off), an int or a () / (B,) integer tensor, >= 0. Returns (B,) int64."""
    if value is None:
        return torch.zeros(batch, dtype=torch.int64, device=device)
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be an int or an integer (B,) tensor, got bool")
    if isinstance(value, (int, np.integer)):
        if int(value) < 0:
            raise ValueError(f"{name} must be >= 0 (0 = off), got {int(value)}")
        return torch.full((batch,), int(value), dtype=torch.int64, device=device)
    if isinstance(value, (float, np.floating)):
        raise TypeError(f"{name} must be an int, got float {value!r}")
    t = _tensor(value, name)
    if t.is_floating_point() or t.dtype == torch.bool or t.is_complex():
        raise TypeError(f"{name} must be an int or an integer (B,) tensor, got {t.dtype}")
    _check_device(t, device, name)
    t = _row_shape(t, name, batch).to(torch.int64)
    if t.numel() and bool((t < 0).any()):
        raise ValueError(f"{name} must be >= 0 (0 = off), got {t.tolist()[:8]}")
    return t


def _unit_setting(value: Any, name: str, batch: int, device: Any, default: float,
                  open_below: bool) -> Tensor:
    """top_p (in (0, 1]) or min_p (in [0, 1]): None, a float or a () / (B,) float tensor.
    Returns (B,) float64 holding the float32 values the kernels see."""
    if value is None:
        return torch.full((batch,), default, dtype=torch.float64, device=device)
    rng = "(0, 1] (1 = off)" if open_below else "[0, 1] (0 = off)"
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a float or a (B,) tensor, got bool")
    if isinstance(value, (int, float, np.integer, np.floating)):
        v = float(value)
        v32 = float(np.float32(v))  # valid as given and as the float32 the kernels read
        for i, w in enumerate((v, v32)):
            if not ((w > 0.0) if open_below else (w >= 0.0)) or not w <= 1.0:
                extra = f" ({w} as the kernels' float32)" if i else ""
                raise ValueError(f"{name} must be in {rng}, got {value!r}{extra}")
        t = torch.full((batch,), v, dtype=torch.float32, device=device)
    else:
        t = _tensor(value, name)
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a float or a floating (B,) tensor, got {t.dtype}")
        _check_device(t, device, name)
        t = _row_shape(t, name, batch).to(torch.float32)
        ok = ((t > 0) if open_below else (t >= 0)) & (t <= 1)
        if t.numel() and not bool(ok.all()):
            raise ValueError(f"{name} must be in {rng}, got {t[~ok].tolist()[:8]}")
    return t.to(torch.float64)


def _penalty_setting(value: Any, name: str, batch: int, device: Any, positive: bool) -> Tensor:
    """A penalty: a float or a () / (B,) float tensor, finite (and > 0 if `positive`).
    Returns (B,) float64 holding the float32 values the kernels see."""
    what = f"{name} must be finite{' and > 0' if positive else ''}"
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a float or a (B,) tensor, got bool")
    if isinstance(value, (int, float, np.integer, np.floating)):
        v = float(value)
        with np.errstate(over="ignore"):
            v32 = float(np.float32(v))  # valid as given and as the float32 the kernels read
        for i, w in enumerate((v, v32)):
            if not math.isfinite(w) or (positive and w <= 0):
                extra = f" ({w} as the kernels' float32)" if i else ""
                raise ValueError(f"{what}, got {value!r}{extra}")
        t = torch.full((batch,), v, dtype=torch.float32, device=device)
    else:
        t = _tensor(value, name)
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a float or a floating (B,) tensor, got {t.dtype}")
        _check_device(t, device, name)
        t = _row_shape(t, name, batch).to(torch.float32)
    ok = torch.isfinite(t) & (t > 0) if positive else torch.isfinite(t)
    if t.numel() and not bool(ok.all()):
        raise ValueError(f"{what}, got {t[~ok].tolist()[:8]}")
    return t.to(torch.float64)


Filters = Optional[tuple[Tensor, Tensor, Tensor]]


def _filter_settings(top_k: Any, top_p: Any, min_p: Any, batch: int, device: Any) -> Filters:
    """Checked top_k / top_p / min_p as (B,) tensors (k int64, p and min_p float64), or None when
    every filter is off in every row."""
    k = _int_setting(top_k, "top_k", batch, device)
    p = _unit_setting(top_p, "top_p", batch, device, 1.0, open_below=True)
    mp = _unit_setting(min_p, "min_p", batch, device, 0.0, open_below=False)
    if not bool(((k > 0) | (p < 1.0) | (mp > 0.0)).any()):
        return None
    return k, p, mp


def _check_offset(offset: int) -> int:
    if isinstance(offset, bool) or not isinstance(offset, (int, np.integer)):
        raise TypeError(f"offset must be an int, got {type(offset).__name__}")
    if not 0 <= offset < MAX_OFFSET:
        raise ValueError(f"offset must be in [0, 2^56), got {offset}")
    return int(offset)


def _vocab_map(vocab_map: Optional[ArrayLike], vd: int, v: int, device: Any) -> Tensor:
    if vocab_map is None:
        if vd != v:
            raise ValueError(f"draft vocabulary Vd = {vd} differs from V = {v}: pass vocab_map")
        return torch.arange(v, dtype=torch.int64, device=device)
    m = _tensor(vocab_map, "vocab_map")
    _check_rank(m, 1, "vocab_map", f"(Vd,) = ({vd},)")
    if m.shape[0] != vd:
        raise ValueError(f"vocab_map must have shape (Vd,) = ({vd},), got {tuple(m.shape)}")
    _check_device(m, device, "vocab_map")
    _check_ids(m, "vocab_map", v)
    if int(torch.unique(m).numel()) != vd:
        raise ValueError("vocab_map must not repeat a target id")
    return m.to(torch.int64)


def _invalid_rows(x: Tensor) -> Tensor:
    """Rows (last dim) holding NaN or +inf, or no finite value. Shape: (..., V) -> (...)."""
    return (torch.isnan(x) | torch.isposinf(x)).any(-1) | ~torch.isfinite(x).any(-1)


def _numpy_out(result: Any, as_numpy: bool) -> Any:
    if not as_numpy:
        return result
    return type(result)(*(t.cpu().numpy() for t in result))


# --------------------------------------------------------------------------------------------
# Ops
# --------------------------------------------------------------------------------------------


def _filter(l: Tensor, tau: Tensor, flt: Filters, cd: torch.dtype) -> Tensor:
    """The logits with the entries the filters drop set to -inf (docs/ops.md, sampling controls).

    transformers' generate() warpers written out in `cd`, per row: a = l / tau, then top-k (the
    k largest, ties with the k-th kept; k = 0 or k >= V is off), top-p over the survivors
    (stable ascending sort, drop the entries whose cumulative probability is <= 1 - p, keep the
    last), min-p (drop probabilities below min_p times the largest). Rows at tau = 0, rows
    with every filter off and invalid rows (NaN, +inf, no finite logit) come back unchanged;
    kept entries are the input's, bit for bit.

    Shape:
        l: (B, N, V), any float dtype; tau, and each of flt: (B,). Returns (B, N, V), l's dtype.
    """
    if flt is None or l.numel() == 0:
        return l
    k, p, mp = flt
    V = l.shape[-1]
    k = torch.where(k < V, k, 0)  # k >= V keeps everything
    on = (tau > 0) & ((k > 0) | (p < 1.0) | (mp > 0.0))  # (B,)
    if not bool(on.any()):
        return l
    x = l.to(cd) / torch.where(tau > 0, tau, 1.0).to(cd)[:, None, None]
    rows = (on[:, None] & ~_invalid_rows(x))[..., None]  # (B, N, 1)
    drop = torch.zeros(x.shape, dtype=torch.bool, device=x.device)
    if bool((k > 0).any()):
        srt = torch.sort(x, dim=-1, descending=True).values
        kth = srt.gather(-1, (k.clamp_min(1) - 1)[:, None, None].expand(*x.shape[:2], 1))
        drop |= (k > 0)[:, None, None] & (x < kth)
        x = x.masked_fill(drop, -math.inf)
    if bool((p < 1.0).any()):
        srt, idx = torch.sort(x, dim=-1, stable=True)
        d = torch.softmax(srt, dim=-1).cumsum(dim=-1) <= (1.0 - p).to(cd)[:, None, None]
        d[..., -1] = False
        d &= (p < 1.0)[:, None, None]
        d = torch.zeros_like(d).scatter(-1, idx, d)
        drop |= d
        x = x.masked_fill(d, -math.inf)
    if bool((mp > 0.0).any()):
        pr = torch.softmax(x, dim=-1)
        floor = mp.to(cd)[:, None, None] * pr.amax(-1, keepdim=True)
        drop |= (mp > 0.0)[:, None, None] & (pr < floor)
    return l.masked_fill(drop & rows, -math.inf)


def filter_logits(
    logits: ArrayLike,
    *,
    temperature: Temperature = 1.0,
    top_k: Any = None,
    top_p: Any = None,
    min_p: Any = None,
) -> Any:
    """Top-k, top-p and min-p as transformers' ``generate()`` applies them: the logits with every
    entry the filters drop set to -inf (the kept entries unchanged). See `_filter`.

    The decisions are made in float64 (transformers' definitions); the kernels' float32 may
    decide a top-p boundary otherwise only where a cumulative mass lies within float32
    rounding of its threshold.

    Parameters
    ----------
    logits : Tensor
        float32, bfloat16, float16 or float64. Shape: (B, N, V).
    temperature : float or Tensor
        >= 0; rows at 0 (greedy) pass through. Shape: scalar, () or (B,).
    top_k : int or integer Tensor, optional
        >= 0; 0 (or k >= V) is off. Shape: scalar, () or (B,).
    top_p : float or float Tensor, optional
        In (0, 1]; 1 is off. Shape: scalar, () or (B,).
    min_p : float or float Tensor, optional
        In [0, 1]; 0 is off. Shape: scalar, () or (B,).

    Returns
    -------
    Tensor
        (B, N, V), the dtype of `logits`.

    Examples
    --------
    >>> filter_logits(torch.tensor([[[3.0, 1.0, 2.0, 0.0]]]), top_k=2)
    tensor([[[3., -inf, 2., -inf]]])
    """
    as_numpy = isinstance(logits, np.ndarray)
    l = _tensor(logits, "logits")
    _check_logits(l, "logits")
    _check_rank(l, 3, "logits", "(B, N, V)")
    B = l.shape[0]
    tau = _per_row(temperature, B, "temperature", torch.float64, l.device)
    out = _filter(l, tau, _filter_settings(top_k, top_p, min_p, B, l.device), torch.float64)
    out = out.clone(memory_format=torch.contiguous_format) if out is l else out.contiguous()
    return out.cpu().numpy() if as_numpy else out


def apply_penalties(
    logits: ArrayLike,
    ids: ArrayLike,
    lengths: Union[int, ArrayLike],
    *,
    repetition_penalty: Temperature = 1.0,
    presence_penalty: Temperature = 0.0,
    frequency_penalty: Temperature = 0.0,
) -> Any:
    """Repetition, presence and frequency penalties of a block of positions, each given the
    tokens before it: position n of row b has seen ``ids[b, :lengths[b] + n]``.

    For every token seen c > 0 times before the position: ``l * r`` if l < 0 else ``l / r``
    (transformers' RepetitionPenaltyLogitsProcessor, once per token), then
    ``l - presence - frequency * c`` (OpenAI / vLLM). Computed in float64.

    Parameters
    ----------
    logits : Tensor
        float32, bfloat16, float16 or float64. Shape: (B, N, V).
    ids : Tensor
        int32 or int64 in [0, V) (entries past ``lengths[b] + N - 1`` are not read). Shape: (B, L).
    lengths : int or integer Tensor
        0 <= lengths[b] <= L - (N - 1). Shape: scalar, () or (B,).
    repetition_penalty : float or Tensor
        > 0; 1 is off. Shape: scalar, () or (B,).
    presence_penalty, frequency_penalty : float or Tensor
        Finite; 0 is off. Shape: scalar, () or (B,).

    Returns
    -------
    Tensor
        (B, N, V) float32 (float64 for float64 logits).

    Examples
    --------
    >>> x = torch.tensor([[[2.0, -2.0, 1.0], [2.0, -2.0, 1.0]]])
    >>> apply_penalties(x, torch.tensor([[1, 0]]), 1, repetition_penalty=2.0)
    tensor([[[ 2., -4.,  1.],
             [ 1., -4.,  1.]]])
    """
    as_numpy = isinstance(logits, np.ndarray)
    l = _tensor(logits, "logits")
    _check_logits(l, "logits")
    _check_rank(l, 3, "logits", "(B, N, V)")
    B, N, V = l.shape
    dev = l.device
    ix = _tensor(ids, "ids")
    if ix.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"ids must be int32 or int64, got {ix.dtype}")
    if ix.dim() != 2 or ix.shape[0] != B:
        raise ValueError(f"ids must have shape (B, L) = ({B}, L), got {tuple(ix.shape)}")
    _check_device(ix, dev, "ids")
    L = ix.shape[1]
    if isinstance(lengths, (bool, np.bool_)):
        raise TypeError("lengths must be an int or a (B,) int64 tensor, got bool")
    if isinstance(lengths, (int, np.integer)):
        ln = torch.full((B,), int(lengths), dtype=torch.int64, device=dev)
    else:
        ln = _tensor(lengths, "lengths")
        if ln.is_floating_point() or ln.dtype == torch.bool or ln.is_complex():
            raise TypeError(f"lengths must be an int or an integer (B,) tensor, got {ln.dtype}")
        _check_device(ln, dev, "lengths")
        ln = _row_shape(ln, "lengths", B).to(torch.int64)
    r = _penalty_setting(repetition_penalty, "repetition_penalty", B, dev, positive=True)
    pres = _penalty_setting(presence_penalty, "presence_penalty", B, dev, positive=False)
    freq = _penalty_setting(frequency_penalty, "frequency_penalty", B, dev, positive=False)
    hi = L - max(N - 1, 0)
    if ln.numel() and bool(((ln < 0) | (ln > hi)).any()):
        raise ValueError(f"lengths must satisfy 0 <= lengths[b] <= L - (N - 1) = {hi}, got "
                         f"{ln.tolist()[:8]}")
    upto = ln[:, None] + torch.arange(N, device=dev)  # (B, N): position n sees ids[b, :upto]
    seen = torch.arange(L, device=dev)[None, None, :] < upto[:, :, None]  # (B, N, L)
    read = seen.any(dim=1)  # (B, L): the entries of ids read by some position
    if bool(read.any()):
        _check_ids(ix[read], "ids", V)
    cd = torch.float64
    x = l.to(cd)
    if x.numel() and L:
        at = torch.where(read, ix.to(torch.int64), 0)[:, None, :].expand(B, N, L)
        c = torch.zeros(B, N, V, dtype=cd, device=dev).scatter_add_(2, at, seen.to(cd))
        rep = r[:, None, None]
        y = torch.where(x < 0, x * rep, x / rep) - pres[:, None, None] - freq[:, None, None] * c
        x = torch.where(c > 0, y, x)
    out = x.to(_out_dtype(l))
    return out.cpu().numpy() if as_numpy else out


def _gather(l: Tensor, ids: Tensor, tau: Tensor) -> tuple[Tensor, Tensor]:
    """lse and logprob for logits (B, N, V) in the compute dtype, ids (B, N), tau (B,).

    tau > 0: ``lse = m + log(s)`` with ``m = max(l) / tau``, ``s = sum exp((l - max(l)) / tau)``,
    and ``logprob = (l[id] - max(l)) / tau - log(s)``: the difference to the row max is taken
    before scaling (docs/ops.md).
    """
    greedy = (tau == 0)[:, None]  # (B, 1)
    inv_tau = torch.where(tau > 0, 1.0 / torch.where(tau > 0, tau, 1.0), 1.0)[:, None, None]
    bad = _invalid_rows(l)
    mx = l.max(dim=-1, keepdim=True).values  # (B, N, 1)
    mx_safe = torch.where(torch.isfinite(mx), mx, 0.0)  # invalid rows: NaN below in any case
    d = (l - mx_safe) * inv_tau  # (B, N, V), <= 0
    log_s = torch.log(torch.exp(d).sum(dim=-1))  # (B, N)
    lse_s = mx_safe.squeeze(-1) * inv_tau[..., 0] + log_s
    lp_s = d.gather(-1, ids[..., None]).squeeze(-1) - log_s
    am = l.argmax(dim=-1)  # lowest index among maxima
    lp_g = torch.where(am == ids, 0.0, -math.inf).to(l.dtype)
    lse = torch.where(greedy, mx.squeeze(-1), lse_s)
    lp = torch.where(greedy, lp_g, lp_s)
    nan = torch.full_like(lse, math.nan)
    return torch.where(bad, nan, lse), torch.where(bad, nan, lp)


def gather_logprobs(
    logits: ArrayLike,
    ids: ArrayLike,
    temperature: Temperature = 1.0,
    *,
    top_k: Any = None,
    top_p: Any = None,
    min_p: Any = None,
    compute_dtype: torch.dtype = torch.float64,
) -> GatherResult:
    """Log-sum-exp of each logits row and the log-probability of the given id.

    tau > 0: ``lse = logsumexp(l / tau)``, ``logprob = l[id] / tau - lse``.
    tau == 0: ``lse = max(l)``, ``logprob = 0`` if id is the argmax (lowest index among maxima)
    else -inf. A row holding NaN or +inf, or only -inf, gives NaN in both outputs. With a
    filter on, both are those of the filtered law (`filter_logits`; -inf for a dropped id).

    Parameters
    ----------
    logits : Tensor
        float32, bfloat16, float16 or float64. Shape: (B, N, V).
    ids : Tensor
        int32 or int64 in [0, V). Shape: (B, N).
    temperature : float or Tensor
        >= 0. Shape: scalar, () or (B,).
    top_k, top_p, min_p : optional
        As in `filter_logits`.
    compute_dtype : torch.dtype
        float64 (default) or float32: the arithmetic (the reference only).

    Returns
    -------
    GatherResult
        lse, logprobs: (B, N) each, float32 (float64 for float64 logits).

    Examples
    --------
    >>> r = gather_logprobs(torch.zeros(1, 1, 4), torch.zeros(1, 1, dtype=torch.int64))
    >>> round(float(r.logprobs), 6) == round(-math.log(4), 6)
    True
    """
    as_numpy = isinstance(logits, np.ndarray)
    logits, ids = _tensor(logits, "logits"), _tensor(ids, "ids")
    _check_logits(logits, "logits")
    _check_rank(logits, 3, "logits", "(B, N, V)")
    _check_rank(ids, 2, "ids", "(B, N)")
    B, N, V = logits.shape
    if tuple(ids.shape) != (B, N):
        raise ValueError(f"ids must have shape (B, N) = ({B}, {N}), got {tuple(ids.shape)}")
    _check_device(ids, logits.device, "ids")
    _check_ids(ids, "ids", V)
    tau = _per_row(temperature, B, "temperature", compute_dtype, logits.device)
    flt = _filter_settings(top_k, top_p, min_p, B, logits.device)
    l = _filter(logits, tau, flt, compute_dtype).to(compute_dtype)
    lse, lp = _gather(l, ids.to(torch.int64), tau)
    out = _out_dtype(logits)
    return _numpy_out(GatherResult(lse.to(out), lp.to(out)), as_numpy)


def _chain(
    tl: Tensor,  # (B, G+1, V) target logits
    x_all: Tensor,  # (B, G) int64 draft ids
    dl: Optional[Tensor],  # (B, G, Vd) draft logits or None
    pm: Tensor,  # (B, G) bool forced point masses
    tau: Tensor,  # (B,)
    dtau: Tensor,  # (B,)
    target_lse: Tensor,  # (B, G+1)
    draft_lse: Optional[Tensor],  # (B, G)
    keys: Tensor,  # (B, 2)
    offset: int,
    vmap: Tensor,  # (Vd,) int64
    cd: torch.dtype,
) -> tuple[VerifyResult, Tensor]:
    """Chain rejection sampling (docs/ops.md, verify steps 1-5), vectorised over rows.

    Returns the result and, per row, the smallest decision margin met on the way (relative
    distance of an acceptance test or a race from a tie): rows where a kernel and the
    reference may legitimately disagree through rounding have a tiny margin.
    """
    B, G1, V = tl.shape
    G = G1 - 1
    dev = tl.device
    ids = torch.full((B, G1), -1, dtype=torch.int64, device=dev)
    num = torch.zeros(B, dtype=torch.int64, device=dev)
    valid = torch.ones(B, dtype=torch.bool, device=dev)
    active = torch.ones(B, dtype=torch.bool, device=dev)
    margin = torch.full((B,), math.inf, dtype=cd, device=dev)
    greedy = tau == 0
    inv_tau = torch.where(greedy, 1.0, 1.0 / torch.where(greedy, 1.0, tau))
    inv_dtau = torch.where(dtau > 0, 1.0 / torch.where(dtau > 0, dtau, 1.0), 1.0)
    for i in range(G1):
        if not bool(active.any()):
            break
        l = tl[:, i].to(cd)  # (B, V)
        bad = active & _invalid_rows(l)
        valid &= ~bad
        active &= ~bad
        s = l * inv_tau[:, None]  # (B, V) logits at temperature
        am = l.argmax(dim=-1)  # (B,)
        if i == G:  # bonus token
            rows = active.nonzero().squeeze(1)
            tok = am[rows].clone()
            samp = ~greedy[rows]
            if bool(samp.any()):
                r = rows[samp]
                e = _exponentials_range(keys[r], offset, G, V, TAG_CORRECTION, cd)
                tok[samp], gap = _race(s[r], e)
                margin[r] = torch.minimum(margin[r], gap)
            ids[rows, G] = tok
            num[rows] = G
            break
        x = x_all[:, i]  # (B,)
        soft = ~greedy & (dtau > 0) & ~pm[:, i] if dl is not None else torch.zeros_like(greedy)
        qfull = torch.zeros(B, V, dtype=cd, device=dev)  # q_i over the target vocabulary
        if dl is not None:
            d = dl[:, i].to(cd)  # (B, Vd)
            dbad = active & soft & _invalid_rows(d)
            valid &= ~dbad
            active &= ~dbad
            qd = torch.exp(d * inv_dtau[:, None] - draft_lse[:, i, None])  # (B, Vd)
            qd = torch.where(soft[:, None], qd, 0.0)
            qfull.index_add_(1, vmap, qd)
        p_x = torch.exp(s.gather(1, x[:, None]).squeeze(1) - target_lse[:, i])  # (B,)
        q_x = torch.where(soft, qfull.gather(1, x[:, None]).squeeze(1), 1.0)
        u = uniform(keys, offset, i, 0, TAG_ACCEPT).to(cd)  # (B,)
        uq = u * q_x
        acc = torch.where(greedy, x == am, uq < p_x)
        samp_active = active & ~greedy
        rel = (p_x - uq).abs() / torch.maximum(p_x, uq).clamp_min(1e-300)
        margin = torch.where(samp_active, torch.minimum(margin, rel), margin)
        ids[:, i] = torch.where(active & acc, x, ids[:, i])
        rej = active & ~acc
        ids[:, i] = torch.where(rej & greedy, am, ids[:, i])
        r = (rej & ~greedy).nonzero().squeeze(1)
        if r.numel():
            e = _exponentials_range(keys[r], offset, i, V, TAG_CORRECTION, cd)
            base = s[r]  # (R, V)
            p_full = torch.exp(base - target_lse[r, i, None])
            resid = torch.log((p_full - qfull[r]).clamp_min(0.0))
            without_x = base.scatter(1, x[r, None], -math.inf)
            a = torch.where(soft[r, None], resid, without_x)
            none = ~(a > -math.inf).any(dim=-1)
            a = torch.where(none[:, None], base, a)
            tok, gap = _race(a, e)
            ids[r, i] = tok
            margin[r] = torch.minimum(margin[r], gap)
        num = torch.where(rej, i, num)
        active &= ~rej
    ids[~valid] = -1
    num[~valid] = 0
    return VerifyResult(ids, num, valid), margin


def _prepare_chain(
    target_logits: ArrayLike,
    draft_ids: ArrayLike,
    draft_logits: Optional[ArrayLike],
    draft_point_mass: Optional[ArrayLike],
    temperature: Temperature,
    draft_temperature: Temperature,
    seed: Seed,
    offset: int,
    vocab_map: Optional[ArrayLike],
    top_k: Any,
    top_p: Any,
    min_p: Any,
    cd: torch.dtype,
) -> dict:
    """Checked verify arguments; "tl" is the target logits after the filters."""
    tl = _tensor(target_logits, "target_logits")
    x = _tensor(draft_ids, "draft_ids")
    _check_logits(tl, "target_logits")
    _check_rank(tl, 3, "target_logits", "(B, G+1, V)")
    B, G1, V = tl.shape
    G = G1 - 1
    dev = tl.device
    if G < 0:
        raise ValueError(f"target_logits must have shape (B, G+1, V), got {tuple(tl.shape)}")
    if tuple(x.shape) != (B, G):
        raise ValueError(f"draft_ids must have shape (B, G) = ({B}, {G}), got {tuple(x.shape)}")
    _check_device(x, dev, "draft_ids")
    _check_ids(x, "draft_ids", V)
    dl = None
    vmap = torch.arange(V, dtype=torch.int64, device=dev)
    if draft_logits is not None:
        dl = _tensor(draft_logits, "draft_logits")
        _check_logits(dl, "draft_logits")
        _check_rank(dl, 3, "draft_logits", f"(B, G, Vd) = ({B}, {G}, Vd)")
        if tuple(dl.shape[:2]) != (B, G):
            raise ValueError(
                f"draft_logits must have shape (B, G, Vd) = ({B}, {G}, Vd), got {tuple(dl.shape)}"
            )
        _check_device(dl, dev, "draft_logits")
        vmap = _vocab_map(vocab_map, dl.shape[2], V, dev)
    elif vocab_map is not None:  # unused without draft logits, but checked as the ops do
        m = _tensor(vocab_map, "vocab_map")
        _check_rank(m, 1, "vocab_map", "(Vd,)")
        _vocab_map(m, m.shape[0], V, dev)
    pm = torch.zeros(B, G, dtype=torch.bool, device=dev)
    if draft_point_mass is not None:
        pmt = _tensor(draft_point_mass, "draft_point_mass")
        if pmt.dtype != torch.bool:
            raise TypeError(f"draft_point_mass must be bool, got {pmt.dtype}")
        if tuple(pmt.shape) != (B, G):
            raise ValueError(f"draft_point_mass must have shape (B, G) = ({B}, {G}), got "
                             f"{tuple(pmt.shape)}")
        _check_device(pmt, dev, "draft_point_mass")
        pm = pmt
    tau = _per_row(temperature, B, "temperature", cd, dev)
    dtau = _per_row(draft_temperature, B, "draft_temperature", cd, dev)
    keys = _seed(seed, B, dev)
    offset = _check_offset(offset)
    flt = _filter_settings(top_k, top_p, min_p, B, dev)
    return dict(tl=_filter(tl, tau, flt, cd), x_all=x.to(torch.int64), dl=dl, pm=pm, tau=tau,
                dtau=dtau, keys=keys, offset=offset, vmap=vmap)


def _lse_arg(value: ArrayLike, name: str, shape: tuple, device: Any) -> Tensor:
    t = _tensor(value, name)
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got {t.dtype}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    _check_device(t, device, name)
    return t


def rejection_sample(
    target_logits: ArrayLike,
    draft_ids: ArrayLike,
    draft_logits: Optional[ArrayLike] = None,
    *,
    target_lse: ArrayLike,
    draft_lse: Optional[ArrayLike] = None,
    draft_point_mass: Optional[ArrayLike] = None,
    temperature: Temperature = 1.0,
    draft_temperature: Temperature = 1.0,
    seed: Seed = 0,
    offset: int = 0,
    vocab_map: Optional[ArrayLike] = None,
    top_k: Any = None,
    top_p: Any = None,
    min_p: Any = None,
    compute_dtype: torch.dtype = torch.float64,
) -> VerifyResult:
    """Chain speculative sampling with caller-supplied log-sum-exps (see `verify`).

    Parameters
    ----------
    target_logits, draft_ids, draft_logits, draft_point_mass, temperature, draft_temperature,
    seed, offset, vocab_map, top_k, top_p, min_p, compute_dtype
        As in `verify`.
    target_lse : Tensor
        ``gather_logprobs(target_logits, ., temperature).lse`` (with the same filters).
        Shape: (B, G+1).
    draft_lse : Tensor or None
        ``gather_logprobs(draft_logits, ., draft_temperature).lse``; required with draft_logits.
        Shape: (B, G).

    Returns
    -------
    VerifyResult
        ids (B, G+1) int64, num_accepted (B,) int64, valid (B,) bool.

    Examples
    --------
    >>> tl = torch.randn(2, 3, 8)
    >>> x = torch.randint(0, 8, (2, 2))
    >>> lse = gather_logprobs(tl, torch.zeros(2, 3, dtype=torch.long)).lse
    >>> rejection_sample(tl, x, target_lse=lse, seed=1).ids.shape
    torch.Size([2, 3])
    """
    as_numpy = isinstance(target_logits, np.ndarray)
    if target_lse is None:
        raise ValueError("target_lse is required (use verify() to compute it in the same pass)")
    if draft_logits is not None and draft_lse is None:
        raise ValueError("draft_lse is required with draft_logits")
    a = _prepare_chain(target_logits, draft_ids, draft_logits, draft_point_mass, temperature,
                       draft_temperature, seed, offset, vocab_map, top_k, top_p, min_p,
                       compute_dtype)
    B, G1, _ = a["tl"].shape
    dev = a["tl"].device
    t_lse = _lse_arg(target_lse, "target_lse", (B, G1), dev).to(compute_dtype)
    d_lse = None
    if a["dl"] is not None:
        d_lse = _lse_arg(draft_lse, "draft_lse", (B, G1 - 1), dev).to(compute_dtype)
    res, _ = _chain(a["tl"], a["x_all"], a["dl"], a["pm"], a["tau"], a["dtau"], t_lse, d_lse,
                    a["keys"], a["offset"], a["vmap"], compute_dtype)
    return _numpy_out(res, as_numpy)


def _verify_with_margin(
    target_logits: ArrayLike,
    draft_ids: ArrayLike,
    draft_logits: Optional[ArrayLike] = None,
    *,
    draft_point_mass: Optional[ArrayLike] = None,
    temperature: Temperature = 1.0,
    draft_temperature: Temperature = 1.0,
    seed: Seed = 0,
    offset: int = 0,
    vocab_map: Optional[ArrayLike] = None,
    top_k: Any = None,
    top_p: Any = None,
    min_p: Any = None,
    compute_dtype: torch.dtype = torch.float64,
) -> tuple[VerifyResult, Tensor]:
    """`verify` plus the per-row decision margin (see `_chain`); torch inputs only."""
    a = _prepare_chain(target_logits, draft_ids, draft_logits, draft_point_mass, temperature,
                       draft_temperature, seed, offset, vocab_map, top_k, top_p, min_p,
                       compute_dtype)
    tl, dl = a["tl"], a["dl"]
    B, G1, V = tl.shape
    zeros_t = torch.zeros(B, G1, dtype=torch.int64, device=tl.device)
    t_lse, _ = _gather(tl.to(compute_dtype), zeros_t, a["tau"])
    d_lse = None
    if dl is not None:
        zeros_d = torch.zeros(B, G1 - 1, dtype=torch.int64, device=tl.device)
        d_lse, _ = _gather(dl.to(compute_dtype), zeros_d, a["dtau"])
    return _chain(tl, a["x_all"], dl, a["pm"], a["tau"], a["dtau"], t_lse, d_lse, a["keys"],
                  a["offset"], a["vmap"], compute_dtype)


def verify(
    target_logits: ArrayLike,
    draft_ids: ArrayLike,
    draft_logits: Optional[ArrayLike] = None,
    *,
    draft_point_mass: Optional[ArrayLike] = None,
    temperature: Temperature = 1.0,
    draft_temperature: Temperature = 1.0,
    seed: Seed = 0,
    offset: int = 0,
    vocab_map: Optional[ArrayLike] = None,
    top_k: Any = None,
    top_p: Any = None,
    min_p: Any = None,
    check_values: bool = True,
    compute_dtype: torch.dtype = torch.float64,
) -> VerifyResult:
    """Chain speculative sampling: accept the longest exact prefix of the drafts, plus one token.

    Per row, positions in order: accept draft i while ``u_i * q_i(x_i) < p_i(x_i)``; at the
    first rejection draw from ``normalise(max(p - q, 0))`` (from p without x_i for a point-mass
    draft); after G acceptances draw the bonus token from p at position G. Greedy rows (tau = 0)
    accept while the draft equals argmax p and correct with that argmax. Position i uses a point
    mass on x_i when draft_logits is None, when the row's draft temperature is 0 or where
    draft_point_mass is True, else the soft q = softmax(draft_logits / draft_temperature).
    With top_k / top_p / min_p, p is the law of the filtered target logits (`filter_logits`;
    greedy rows ignore the filters). Randomness: Philox keyed by (seed of the row, offset,
    position, index, tag), docs/ops.md.

    Parameters
    ----------
    target_logits : Tensor
        float32, bfloat16, float16 or float64. Shape: (B, G+1, V).
    draft_ids : Tensor
        int32 or int64 target ids in [0, V). Shape: (B, G).
    draft_logits : Tensor or None
        Drafter logits at commit time. Shape: (B, G, Vd).
    draft_point_mass : Tensor or None
        bool, True where q is a point mass (`point_mass_mask`). Shape: (B, G).
    temperature, draft_temperature : float or Tensor
        >= 0; 0 is greedy (target) or point-mass drafts (drafter). Shape: scalar, () or (B,).
    seed : int or Tensor
        One int for the batch or one int64 per row. Shape: scalar, () or (B,).
    offset : int
        Philox offset, 0 <= offset < 2^56; advance it per call.
    vocab_map : Tensor or None
        Target id of each drafter id (Vd < V). Shape: (Vd,).
    top_k, top_p, min_p : optional
        Sampling controls of the target law, per row; as in `filter_logits`.
    check_values : bool
        Taken for the ops' signature; the reference always checks every value.
    compute_dtype : torch.dtype
        float64 (default) or float32: the arithmetic (the reference only).

    Returns
    -------
    VerifyResult
        ids (B, G+1) int64: accepted drafts, the correction or bonus, then -1;
        num_accepted (B,) int64; valid (B,) bool (False: the row is all -1).

    Examples
    --------
    >>> tl = torch.randn(4, 3, 10)
    >>> r = verify(tl, torch.randint(0, 10, (4, 2)), seed=7)
    >>> r.ids.shape, r.num_accepted.shape
    (torch.Size([4, 3]), torch.Size([4]))
    """
    as_numpy = isinstance(target_logits, np.ndarray)
    if as_numpy:
        to_t = lambda v: torch.from_numpy(v) if isinstance(v, np.ndarray) else v  # noqa: E731
        target_logits, draft_ids, draft_logits = map(to_t, (target_logits, draft_ids, draft_logits))
        draft_point_mass, vocab_map = to_t(draft_point_mass), to_t(vocab_map)
    res, _ = _verify_with_margin(
        target_logits, draft_ids, draft_logits, draft_point_mass=draft_point_mass,
        temperature=temperature, draft_temperature=draft_temperature, seed=seed, offset=offset,
        vocab_map=vocab_map, top_k=top_k, top_p=top_p, min_p=min_p, compute_dtype=compute_dtype,
    )
    return _numpy_out(res, as_numpy)


def _check_tree(pa: Tensor, tk: Tensor, V: int) -> None:
    """The tree rules of verify_tree, with the node that breaks one named."""
    B, N = pa.shape
    idx = torch.arange(N, device=pa.device).expand(B, N)
    root_bad = pa[:, 0] != -1
    if bool(root_bad.any()):
        b = int(root_bad.nonzero()[0, 0])
        raise ValueError(f"parents must be -1 at the root (node 0), got {int(pa[b, 0])} at ({b}, 0)")
    bad = ((pa < -1) | (pa >= idx)) & (idx > 0)
    if bool(bad.any()):
        b, i = (int(v) for v in bad.nonzero()[0])
        raise ValueError("parents must hold a node before each node (0 <= parents[b, i] < i) or -1 "
                         f"for an unused node, got {int(pa[b, i])} at ({b}, {i})")
    tbad = (pa >= 0) & ((tk < 0) | (tk >= V)) & (idx > 0)
    if bool(tbad.any()):
        b, i = (int(v) for v in tbad.nonzero()[0])
        raise ValueError(f"tokens holds {int(tk[b, i])} at ({b}, {i}), outside [0, V) = [0, {V})")


def verify_tree(
    target_logits: ArrayLike,
    tokens: ArrayLike,
    parents: ArrayLike,
    *,
    temperature: Temperature = 1.0,
    seed: Seed = 0,
    offset: int = 0,
    top_k: Any = None,
    top_p: Any = None,
    min_p: Any = None,
    check_values: bool = True,
    compute_dtype: torch.dtype = torch.float64,
) -> TreeVerifyResult:
    """Tree verification by a sample-and-match walk (docs/design.md, section 2).

    Per row, from the root (node 0) at depth d = 0: draw x from the target's law at the current
    node (row ``target_logits[b, node]``, at ``temperature`` after the filters; the argmax at
    temperature 0) by the race of position d, tag TAG_CORRECTION (the numbers of verify's bonus
    draw); if a child of the node (``parents == node``, lowest index first) carries x, accept
    it and move there (d + 1), else emit x and stop. The emitted tokens follow the target's
    law exactly for any tree fixed before the draws.

    Parameters
    ----------
    target_logits : Tensor
        float32, bfloat16, float16 or float64. Shape: (B, N, V).
    tokens : Tensor
        int32 or int64; a used node's token in [0, V) (node 0's is ignored). Shape: (B, N).
    parents : Tensor
        int32 or int64: -1 at node 0, else in [0, i), or -1 for an unused node. Shape: (B, N).
    temperature : float or Tensor
        >= 0; 0 is greedy. Shape: scalar, () or (B,).
    seed : int or Tensor
        One int for the batch or one int64 per row.
    offset : int
        Philox offset, 0 <= offset < 2^56.
    top_k, top_p, min_p : optional
        Sampling controls of the target law, per row; as in `filter_logits`.
    check_values : bool
        Taken for the ops' signature; the reference always checks every value.
    compute_dtype : torch.dtype
        float64 (default) or float32: the arithmetic (the reference only).

    Returns
    -------
    TreeVerifyResult
        ids (B, N) int64: the accepted tokens, the emitted one, then -1; num_accepted (B,)
        int64; path (B, N) int64: the node of each accepted token, then -1; valid (B,) bool
        (False: a row on the path held NaN / +inf or no finite logit; the row is all -1).

    Examples
    --------
    >>> tl = torch.randn(2, 4, 10)
    >>> tokens = torch.tensor([[0, 3, 5, 1]] * 2)
    >>> parents = torch.tensor([[-1, 0, 0, 1]] * 2)
    >>> verify_tree(tl, tokens, parents, seed=3).path.shape
    torch.Size([2, 4])
    """
    as_numpy = isinstance(target_logits, np.ndarray)
    cd = compute_dtype
    tl = _tensor(target_logits, "target_logits")
    tk = _tensor(tokens, "tokens")
    pa = _tensor(parents, "parents")
    _check_logits(tl, "target_logits")
    _check_rank(tl, 3, "target_logits", "(B, N, V)")
    B, N, V = tl.shape
    dev = tl.device
    if N < 1:
        raise ValueError(f"target_logits must have N >= 1 nodes (the root), got {tuple(tl.shape)}")
    for t, name in ((tk, "tokens"), (pa, "parents")):
        if t.is_floating_point() or t.dtype == torch.bool or t.is_complex():
            raise TypeError(f"{name} must be int32 or int64, got {t.dtype}")
        if tuple(t.shape) != (B, N):
            raise ValueError(f"{name} must have shape (B, N) = ({B}, {N}), got {tuple(t.shape)}")
        _check_device(t, dev, name)
    tk, pa = tk.to(torch.int64), pa.to(torch.int64)
    _check_tree(pa, tk, V)
    tau = _per_row(temperature, B, "temperature", cd, dev)
    keys = _seed(seed, B, dev)
    offset = _check_offset(offset)
    tl = _filter(tl, tau, _filter_settings(top_k, top_p, min_p, B, dev), cd)

    ids = torch.full((B, N), -1, dtype=torch.int64, device=dev)
    path = torch.full((B, N), -1, dtype=torch.int64, device=dev)
    num = torch.zeros(B, dtype=torch.int64, device=dev)
    valid = torch.ones(B, dtype=torch.bool, device=dev)
    active = torch.ones(B, dtype=torch.bool, device=dev)
    node = torch.zeros(B, dtype=torch.int64, device=dev)
    greedy = tau == 0
    inv_tau = torch.where(greedy, 1.0, 1.0 / torch.where(greedy, 1.0, tau))
    rows_all = torch.arange(B, device=dev)
    for d in range(N):
        l = tl[rows_all, node].to(cd)  # (B, V): each row's current node
        bad = active & _invalid_rows(l)
        valid &= ~bad
        active &= ~bad
        rows = active.nonzero().squeeze(1)
        if rows.numel() == 0:
            break
        tok = l[rows].argmax(dim=-1)
        samp = ~greedy[rows]
        if bool(samp.any()):
            r = rows[samp]
            e = _exponentials_range(keys[r], offset, d, V, TAG_CORRECTION, cd)
            tok[samp], _ = _race(l[r] * inv_tau[r, None], e)
        ids[rows, d] = tok
        child = (pa[rows] == node[rows, None]) & (tk[rows] == tok[:, None])  # (R, N)
        has = child.any(dim=-1)
        first = child.to(torch.int8).argmax(dim=-1)  # the lowest matching index
        stop = rows[~has]
        num[stop] = d
        active[stop] = False
        go = rows[has]
        path[go, d] = first[has]
        node[go] = first[has]
    ids[~valid] = -1
    path[~valid] = -1
    num[~valid] = 0
    return _numpy_out(TreeVerifyResult(ids, num, path, valid), as_numpy)


def _denoise(
    logits: ArrayLike,
    tokens: ArrayLike,
    commit_step: ArrayLike,
    *,
    step: int,
    num_steps: int,
    mode: Union[CommitMode, str, int],
    temperature: Temperature,
    seed: Seed,
    offset: int,
    vocab_map: Optional[ArrayLike],
    top_k: Any = None,
    top_p: Any = None,
    min_p: Any = None,
    compute_dtype: torch.dtype,
) -> tuple[DenoiseResult, Tensor]:
    """denoise_step and its per-row decision margin (token races, confidence ranking); lse in
    `compute_dtype`."""
    cd = compute_dtype
    l_all = _tensor(logits, "logits")
    tok_in = _tensor(tokens, "tokens")
    cs_in = _tensor(commit_step, "commit_step")
    _check_logits(l_all, "logits")
    _check_rank(l_all, 3, "logits", "(B, G, Vd)")
    B, G, Vd = l_all.shape
    dev = l_all.device
    for name, t in (("tokens", tok_in), ("commit_step", cs_in)):
        if tuple(t.shape) != (B, G):
            raise ValueError(f"{name} must have shape (B, G) = ({B}, {G}), got {tuple(t.shape)}")
        _check_device(t, dev, name)
    if tok_in.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"tokens must be int32 or int64, got {tok_in.dtype}")
    if cs_in.dtype != torch.int32:
        raise TypeError(f"commit_step must be int32, got {cs_in.dtype}")
    for name, val in (("step", step), ("num_steps", num_steps)):
        if isinstance(val, (bool, np.bool_)) or not isinstance(val, (int, np.integer)):
            raise TypeError(f"{name} must be an int, got {type(val).__name__}")
    if not 0 <= step < num_steps:
        raise ValueError(f"step must be in [0, num_steps) = [0, {num_steps}), got {step}")
    mode = CommitMode.parse(mode)
    if vocab_map is None:
        vmap = torch.arange(Vd, dtype=torch.int64, device=dev)
    else:  # the target vocabulary size is not known here: only check the map's shape and sign
        vm = _tensor(vocab_map, "vocab_map")
        if tuple(vm.shape) != (Vd,):
            raise ValueError(f"vocab_map must have shape (Vd,) = ({Vd},), got {tuple(vm.shape)}")
        _check_device(vm, dev, "vocab_map")
        _check_ids(vm, "vocab_map", 2**63 - 1)
        vmap = vm.to(torch.int64)
    tau = _per_row(temperature, B, "temperature", cd, dev)
    keys = _seed(seed, B, dev)
    offset = _check_offset(offset)
    l_all = _filter(l_all, tau, _filter_settings(top_k, top_p, min_p, B, dev), cd)
    R = num_steps - step  # remaining steps, >= 1

    masked = cs_in < 0  # (B, G)
    te = torch.where(tau > 0, tau, 1.0)
    inv_te = 1.0 / te
    ok = torch.zeros(B, G, dtype=torch.bool, device=dev)  # masked and its row valid
    lse = torch.full((B, G), math.nan, dtype=cd, device=dev)
    conf = torch.full((B, G), -math.inf, dtype=cd, device=dev)
    draw = torch.zeros(B, G, dtype=torch.int64, device=dev)
    margin = torch.full((B,), math.inf, dtype=cd, device=dev)
    for g in range(G):
        l = l_all[:, g].to(cd)  # (B, Vd)
        good = masked[:, g] & ~_invalid_rows(l)
        ok[:, g] = good
        s = l * inv_te[:, None]
        lse_g = torch.logsumexp(s, dim=-1)
        lse[:, g] = torch.where(good, lse_g, math.nan)
        mx = l.max(dim=-1).values
        conf[:, g] = torch.where(good, torch.exp(mx * inv_te - lse_g), -math.inf)
        j = l.argmax(dim=-1)
        r = (good & (tau > 0)).nonzero().squeeze(1)
        if r.numel():
            e = _exponentials_range(keys[r], offset, g, Vd, TAG_DENOISE_TOKEN, cd)
            j[r], gap = _race(s[r], e)  # tau > 0 on these rows, so s = l / tau
            margin[r] = torch.minimum(margin[r], gap)
        draw[:, g] = vmap[j]
    valid = ~(masked & ~ok).any(dim=1)

    # n counts every masked position, M = masked.sum(); invalid positions are never chosen.
    M = masked.sum(dim=1, keepdim=True)  # (B, 1)
    n = (M + R - 1) // R  # ceil(M / R)
    if R == 1:
        commit = ok
    elif mode == CommitMode.RANDOM:
        g_idx = torch.arange(G, device=dev)
        w = uniform(keys[:, None, :], offset, g_idx[None, :], 0, TAG_DENOISE_COMMIT)  # (B, G)
        thr = torch.tensor(1.0, dtype=torch.float32) / torch.tensor(float(R), dtype=torch.float32)
        commit = ok & (w < thr.to(dev))
    elif mode == CommitMode.CONFIDENCE:
        c_h, c_g = conf[:, None, :], conf[:, :, None]  # (B, 1, G) other, (B, G, 1) self
        h_lt_g = torch.arange(G, device=dev)[None, :] < torch.arange(G, device=dev)[:, None]
        ahead = (c_h > c_g) | ((c_h == c_g) & h_lt_g)  # (B, G, G): h ranks before g
        rank = (ahead & ok[:, None, :]).sum(dim=-1)  # among valid masked positions
        commit = ok & (rank < n)
        if G >= 2:  # margin: gap between the n-th and (n+1)-th confidence
            srt = conf.sort(dim=-1, descending=True).values
            nn = n.squeeze(1).clamp(1, G - 1)
            a = srt.gather(1, (nn - 1)[:, None]).squeeze(1)
            b = srt.gather(1, nn[:, None]).squeeze(1)
            gap = torch.where(torch.isfinite(b), (a - b) / a.clamp_min(1e-300), math.inf)
            margin = torch.minimum(margin, gap)
    else:  # LEFT_TO_RIGHT: the n leftmost masked positions whose rows are valid
        rank = ok.cumsum(dim=1) - 1
        commit = ok & (rank < n)
    out_tokens = torch.where(commit, draw, tok_in.to(torch.int64))
    out_cs = torch.where(commit, torch.full_like(cs_in, step), cs_in)
    return DenoiseResult(out_tokens, out_cs, lse, valid), margin


def denoise_step(
    logits: ArrayLike,
    tokens: ArrayLike,
    commit_step: ArrayLike,
    *,
    step: int,
    num_steps: int,
    mode: Union[CommitMode, str, int] = CommitMode.RANDOM,
    temperature: Temperature = 1.0,
    seed: Seed = 0,
    offset: int = 0,
    vocab_map: Optional[ArrayLike] = None,
    top_k: Any = None,
    top_p: Any = None,
    min_p: Any = None,
    check_values: bool = True,
    compute_dtype: torch.dtype = torch.float64,
) -> DenoiseResult:
    """One reverse step of the masked-diffusion drafter for the positions still masked.

    Masked positions have ``commit_step < 0``. Each draws a token from softmax(l / tau)
    (argmax at tau = 0) and is committed per `mode`: RANDOM with probability 1/R, R =
    num_steps - step (the MDLM log-linear schedule); CONFIDENCE the ceil(M/R) most peaked
    positions; LEFT_TO_RIGHT the ceil(M/R) leftmost; at the last step (R = 1) all of them.

    Parameters
    ----------
    logits : Tensor
        Drafter logits, float32, bfloat16, float16 or float64. Shape: (B, G, Vd).
    tokens : Tensor
        int32 or int64, current tokens (read at committed positions only). Shape: (B, G).
    commit_step : Tensor
        int32, step at which each position was committed, -1 while masked. Shape: (B, G).
    step, num_steps : int
        0 <= step < num_steps.
    mode : CommitMode or str
        "random", "confidence" or "left_to_right".
    temperature : float or Tensor
        Drafter temperature, >= 0. Shape: scalar, () or (B,).
    seed : int or Tensor
        Shape: scalar, () or (B,) int64.
    offset : int
        Philox offset, 0 <= offset < 2^56.
    vocab_map : Tensor or None
        Target id of each drafter id. Shape: (Vd,).
    top_k, top_p, min_p : optional
        As in `filter_logits`: tokens are drawn from the filtered law, lse and the confidence
        are that law's.
    check_values : bool
        Taken for the ops' signature; the reference always checks every value.
    compute_dtype : torch.dtype
        float64 (default) or float32: the arithmetic (the reference only).

    Returns
    -------
    DenoiseResult
        tokens (B, G) int64, commit_step (B, G) int32, lse (B, G) float32 (float64 for float64
        logits; NaN where committed earlier), valid (B,) bool.

    Examples
    --------
    >>> cs = torch.full((1, 4), -1, dtype=torch.int32)
    >>> r = denoise_step(torch.randn(1, 4, 6), torch.zeros(1, 4, dtype=torch.long), cs,
    ...                  step=1, num_steps=2, mode="left_to_right")
    >>> r.commit_step.tolist()
    [[1, 1, 1, 1]]
    """
    as_numpy = isinstance(logits, np.ndarray)
    res, _ = _denoise(logits, tokens, commit_step, step=step, num_steps=num_steps, mode=mode,
                      temperature=temperature, seed=seed, offset=offset, vocab_map=vocab_map,
                      top_k=top_k, top_p=top_p, min_p=min_p, compute_dtype=compute_dtype)
    res = res._replace(lse=res.lse.to(_out_dtype(_tensor(logits, "logits"))))
    return _numpy_out(res, as_numpy)


def point_mass_mask(commit_step: ArrayLike) -> Any:
    """Which draft positions need a point-mass q: ``max(commit_step[:, :l]) > commit_step[:, l]``.

    A position keeps its soft q only if every position to its left was committed at the same
    step or earlier (docs/design.md section 3).

    Parameters
    ----------
    commit_step : Tensor
        int32 or int64. Shape: (B, G).

    Returns
    -------
    Tensor
        bool. Shape: (B, G).

    Examples
    --------
    >>> point_mass_mask(torch.tensor([[2, 1, 0, 2]])).tolist()
    [[False, True, True, False]]
    """
    as_numpy = isinstance(commit_step, np.ndarray)
    cs = _tensor(commit_step, "commit_step")
    _check_rank(cs, 2, "commit_step", "(B, G)")
    if cs.is_floating_point() or cs.dtype == torch.bool or cs.is_complex():
        raise TypeError(f"commit_step must be an integer tensor, got {cs.dtype}")
    cs = cs.to(torch.int64)
    if cs.shape[1] == 0:
        out = torch.zeros(cs.shape, dtype=torch.bool, device=cs.device)
    else:
        prev = torch.cummax(cs, dim=1).values[:, :-1]  # max(commit_step[:, :l]) for l >= 1
        out = torch.cat([torch.zeros_like(cs[:, :1], dtype=torch.bool), prev > cs[:, 1:]], dim=1)
    return out.cpu().numpy() if as_numpy else out


# --------------------------------------------------------------------------------------------
# Plain-torch baseline
# --------------------------------------------------------------------------------------------


def naive_verify(
    target_logits: Tensor,
    draft_ids: Tensor,
    draft_logits: Optional[Tensor] = None,
    temperature: float = 1.0,
    generator: Optional[torch.Generator] = None,
) -> VerifyResult:
    """Plain-torch chain speculative sampling: the speed baseline of the benchmarks.

    Materialises softmax(target_logits / tau) and softmax(draft_logits / tau) for every
    position, accepts with torch.rand, and draws the correction from the residual with
    torch.multinomial. Exact in law, but it draws from torch's generator, not from the Philox
    stream of the ops. draft_logits None means point-mass drafts; tau = 0 is greedy.

    Parameters
    ----------
    target_logits : Tensor
        Shape: (B, G+1, V).
    draft_ids : Tensor
        int64. Shape: (B, G).
    draft_logits : Tensor or None
        Over the target vocabulary, same temperature as the target. Shape: (B, G, V).
    temperature : float
        >= 0.
    generator : torch.Generator or None

    Returns
    -------
    VerifyResult
        ids (B, G+1) int64, num_accepted (B,) int64, valid (B,) bool (always True).

    Examples
    --------
    >>> r = naive_verify(torch.randn(3, 5, 11), torch.randint(0, 11, (3, 4)))
    >>> r.ids.shape
    torch.Size([3, 5])
    """
    B, G1, V = target_logits.shape
    G = G1 - 1
    dev = target_logits.device
    x = draft_ids.to(torch.int64)
    ar = torch.arange(B, device=dev)
    if temperature == 0:
        am = target_logits.argmax(dim=-1)  # (B, G+1)
        accept = x == am[:, :G]
        k = accept.to(torch.int64).cumprod(dim=1).sum(dim=1)  # (B,)
        tok = am[ar, k]
    else:
        p = torch.softmax(target_logits.float() / temperature, dim=-1)  # (B, G+1, V)
        p_x = p[:, :G].gather(-1, x[..., None]).squeeze(-1)  # (B, G)
        if draft_logits is None:
            q = torch.nn.functional.one_hot(x, V).to(p.dtype)  # (B, G, V)
        else:
            q = torch.softmax(draft_logits.float() / temperature, dim=-1)
        q_x = q.gather(-1, x[..., None]).squeeze(-1)
        u = torch.rand(B, G, device=dev, generator=generator)
        accept = u * q_x < p_x
        k = accept.to(torch.int64).cumprod(dim=1).sum(dim=1)  # first rejection, or G
        q_pad = torch.cat([q, torch.zeros_like(p[:, :1])], dim=1)  # no q at the bonus position
        resid = (p[ar, k] - q_pad[ar, k]).clamp_min(0.0)  # (B, V)
        empty = resid.sum(dim=-1, keepdim=True) <= 0
        resid = torch.where(empty, p[ar, k], resid)
        tok = (torch.multinomial(resid, 1, generator=generator).squeeze(1) if B
               else torch.zeros(0, dtype=torch.int64, device=dev))
    pos = torch.arange(G1, device=dev)
    x_pad = torch.cat([x, torch.full_like(x[:, :1], -1)], dim=1)
    ids = torch.where(pos[None, :] < k[:, None], x_pad, -1)
    ids[ar, k] = tok
    return VerifyResult(ids, k, torch.ones(B, dtype=torch.bool, device=dev))
