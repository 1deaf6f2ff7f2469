"""Field checks shared by the drafters' configs (docs/design.md section 4): `check_field`, the
one checker of every config field and numeric option, `check_hf_layers` for the layer fields of a
Hugging Face config, and the size bounds a drafter config must keep.

Kept free of torch so that configs can be read and checked without loading a model.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Mapping, Optional

__all__ = ["FieldError", "check_field", "check_hf_layers", "require"]


# ------------------------------------------------------------------------------ field checks
# One checker for every config field and numeric option: the drafter config dataclass
# (dflash.DFlashConfig), the config files read by checkpoint.py (DFlash folders) and ar.py (the
# ar drafter), and make-data's flags (training/data.py).

# Bounds of a drafter config (a malformed or hostile config.json must not allocate without
# limit; sizes beyond these are no drafter of any target this package serves).
MAX_LAYERS = 64  # drafter layers, and feature layers read from the target
MAX_FFN_RATIO = 64  # intermediate_size (and feature width) per unit of hidden_size
MAX_HIDDEN = 1 << 16
MAX_VOCAB = 1 << 24
MAX_TARGET_LAYERS = 4096
MAX_BLOCK = 4096


class FieldError(ValueError):
    """A config field (or command-line option) of the wrong type or value; the message names it.

    `category`: "type" (not of the field's kind at all: a string, list, bool or null where a
    number belongs), "value" (the right kind, a wrong value: 3.7 for an int, NaN, out of range)
    or "missing".
    """

    def __init__(self, field: str, message: str, category: str = "value") -> None:
        super().__init__(message)
        self.field = field
        self.category = category

    def located(self, source: str, kind: str) -> "FieldError":
        """The same error, prefixed with the file it came from and the kind of config."""
        if self.category == "missing":
            msg = f"{source}: {kind} config field {self.field!r} is missing"
        elif self.category == "type":
            a = "an" if kind[:1].lower() in "aeiou" else "a"
            msg = f"{source}: {a} {kind} config field has the wrong type: {self}"
        else:
            msg = f"{source}: invalid {kind} config: {self}"
        return FieldError(self.field, msg, self.category)


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _bounds(lo: Any, hi: Any, above: Any, below: Any) -> str:
    if lo is not None and hi is not None:
        return f" in [{lo}, {hi}]"
    parts = [f"{op} {b}" for op, b in ((">=", lo), (">", above), ("<=", hi), ("<", below))
             if b is not None]
    return (" " + " and ".join(parts)) if parts else ""


def _want(kind: str, lo: Any, hi: Any, above: Any, below: Any, nonempty: bool,
          max_len: Optional[int]) -> str:
    if kind == "int":
        if hi is None and above is None and below is None and lo in (0, 1):
            return "a positive int" if lo == 1 else "a non-negative int"
        return "an int" + _bounds(lo, hi, above, below)
    if kind == "real":
        return "a finite number" + _bounds(lo, hi, above, below)
    if kind in ("ints", "strs"):
        what = "ints" + _bounds(lo, hi, above, below) if kind == "ints" else "strings"
        size = f" (at most {max_len} entries)" if max_len is not None else ""
        return ("a non-empty list of " if nonempty else "a list of ") + what + size
    return {"bool": "true or false", "str": "a string", "dict": "a JSON object"}[kind]


def check_field(name: str, value: Any, kind: str, *, lo: Any = None, hi: Any = None,
                above: Any = None, below: Any = None, optional: bool = False,
                nonempty: bool = False, max_len: Optional[int] = None) -> Any:
    """`value`, normalised, if it is a valid `kind`; else a FieldError naming `name`.

    Parameters
    ----------
    name : str
        The field as its reader knows it (``num_hidden_layers``, ``dflash_config.mask_token_id``,
        ``--shard-size``).
    kind : str
        "int": an integer, never a bool, a float (3.0 included) or a string. "real": a finite
        int or float, never a bool or a string. "bool", "str", "dict" (a JSON object).
        "ints" / "strs": a list (or tuple) of such.
    lo, hi : inclusive bounds of an int or real, or of every entry of "ints".
    above, below : exclusive bounds (above=0: > 0).
    optional : None passes (and is returned).
    nonempty, max_len : the length of a list.

    Returns
    -------
    A Python int / float / bool / str / dict / list.

    Examples
    --------
    >>> check_field("block_size", 4, "int", lo=2)
    4
    >>> check_field("block_size", "4", "int", lo=2)
    Traceback (most recent call last):
    ...
    specdiff_ext.drafter.config.FieldError: block_size must be an int >= 2, got '4'
    >>> check_field("rope_theta", float("nan"), "real", above=0)
    Traceback (most recent call last):
    ...
    specdiff_ext.drafter.config.FieldError: rope_theta must be a finite number > 0, got nan
    """
    if value is None and optional:
        return None
    want = _want(kind, lo, hi, above, below, nonempty, max_len)

    def fail(category: str, msg: Optional[str] = None) -> FieldError:
        return FieldError(name, msg or f"{name} must be {want}, got {value!r}", category)

    def in_range(v: Any) -> bool:
        return ((lo is None or v >= lo) and (hi is None or v <= hi)
                and (above is None or v > above) and (below is None or v < below))

    if kind in ("int", "real"):
        if not _is_real(value):
            raise fail("type")
        if kind == "int" and not _is_int(value):
            raise fail("value")  # a number, but not an integer (3.7, 3.0)
        if kind == "real" and not math.isfinite(value):
            raise fail("value")
        if not in_range(value):
            if lo is not None and hi is not None:
                raise fail("value", f"{name} = {value!r} is outside [{lo}, {hi}]")
            raise fail("value")
        return int(value) if kind == "int" else float(value)
    if kind == "bool":
        if not isinstance(value, bool):
            raise fail("type")
        return value
    if kind == "str":
        if not isinstance(value, str):
            raise fail("type")
        return value
    if kind == "dict":
        if not isinstance(value, dict):
            raise fail("type")
        return value
    if kind in ("ints", "strs"):
        if not isinstance(value, (list, tuple)):
            raise fail("type")
        if kind == "strs":
            if not all(isinstance(v, str) for v in value):
                raise fail("type")
        else:
            if not all(_is_real(v) for v in value):
                raise fail("type")
            if not all(_is_int(v) for v in value):
                raise fail("value")
            if not all(in_range(v) for v in value):
                rule = (f"must lie in [{lo}, {hi}]" if lo is not None and hi is not None
                        else f"entries must be{_bounds(lo, hi, above, below)}")
                raise fail("value", f"{name} {rule}, got {list(value)!r}")
        if (nonempty and not value) or (max_len is not None and len(value) > max_len):
            raise fail("value")
        return [int(v) for v in value] if kind == "ints" else list(value)
    raise ValueError(f"check_field: unknown kind {kind!r}")


def require(d: Mapping[str, Any], key: str, prefix: str = "") -> Any:
    """d[key]; a FieldError of category "missing" naming ``prefix + key`` when absent."""
    if key not in d:
        raise FieldError(prefix + key, f"{prefix}{key} is missing", "missing")
    return d[key]


def check_hf_layers(hf: Mapping[str, Any]) -> dict:
    """The layer fields of a Hugging Face (Llama / Qwen-style) config dict, each checked by
    `check_field` under its JSON name, returned under the drafter configs' names: vocab_size,
    hidden_size, n_layers, n_heads, n_kv_heads, head_dim, intermediate_size, rope_theta,
    rms_eps, attention_bias.

    Defaults as Hugging Face has them: num_key_value_heads = num_attention_heads, head_dim =
    hidden_size // num_attention_heads, rope_theta from ``rope_parameters`` or 10000,
    rms_norm_eps 1e-6. Sizes are bounded (MAX_LAYERS, MAX_FFN_RATIO, ...).

    Examples
    --------
    >>> check_hf_layers({"vocab_size": 50, "hidden_size": 32, "num_hidden_layers": 2,
    ...                  "num_attention_heads": 4, "intermediate_size": 64})["head_dim"]
    8
    >>> check_hf_layers({"vocab_size": 50, "hidden_size": 32, "num_hidden_layers": "2",
    ...                  "num_attention_heads": 4, "intermediate_size": 64})
    Traceback (most recent call last):
    ...
    specdiff_ext.drafter.config.FieldError: num_hidden_layers must be an int in [1, 64], got '2'
    """
    hidden = check_field("hidden_size", require(hf, "hidden_size"), "int", lo=1, hi=MAX_HIDDEN)
    vocab = check_field("vocab_size", require(hf, "vocab_size"), "int", lo=1, hi=MAX_VOCAB)
    n_layers = check_field("num_hidden_layers", require(hf, "num_hidden_layers"), "int", lo=1,
                           hi=MAX_LAYERS)
    n_heads = check_field("num_attention_heads", require(hf, "num_attention_heads"), "int",
                          lo=1, hi=4 * hidden)
    n_kv = check_field("num_key_value_heads", hf.get("num_key_value_heads"), "int", lo=1,
                       hi=n_heads, optional=True)
    n_kv = n_heads if n_kv is None else n_kv
    if n_heads % n_kv:
        raise FieldError("num_key_value_heads", f"num_attention_heads {n_heads} is not a "
                                                f"multiple of num_key_value_heads {n_kv}")
    head_dim = check_field("head_dim", hf.get("head_dim"), "int", lo=1, hi=4 * hidden,
                           optional=True)
    if head_dim is None:
        head_dim = hidden // n_heads
        if head_dim < 1:
            raise FieldError("head_dim", f"head_dim is not given and hidden_size {hidden} // "
                                         f"num_attention_heads {n_heads} is 0")
    if head_dim % 2:
        raise FieldError("head_dim", f"head_dim must be even (RoPE rotates pairs), got {head_dim}")
    inter = check_field("intermediate_size", require(hf, "intermediate_size"), "int", lo=1,
                        hi=MAX_FFN_RATIO * hidden)
    params = check_field("rope_parameters", hf.get("rope_parameters"), "dict", optional=True)
    rope = check_field("rope_theta", hf.get("rope_theta"), "real", above=0, optional=True)
    if rope is None:
        rope = check_field("rope_parameters.rope_theta", (params or {}).get("rope_theta"), "real",
                           above=0, optional=True)
    eps = check_field("rms_norm_eps", hf.get("rms_norm_eps", 1e-6), "real", above=0, below=1)
    bias = check_field("attention_bias", hf.get("attention_bias", False), "bool")
    check_field("layer_types", hf.get("layer_types"), "strs", optional=True)
    return dict(vocab_size=vocab, hidden_size=hidden, n_layers=n_layers, n_heads=n_heads,
                n_kv_heads=n_kv, head_dim=head_dim, intermediate_size=inter,
                rope_theta=10000.0 if rope is None else rope, rms_eps=eps, attention_bias=bias)
