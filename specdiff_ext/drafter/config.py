"""Configuration of the masked-diffusion drafter (docs/design.md section 4).

Kept free of torch so that configs can be read, written and compared without loading a model.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import numbers
from dataclasses import dataclass
from typing import Any, Mapping, Optional

__all__ = ["ContextMode", "DrafterConfig", "FieldError", "check_field", "check_hf_layers",
           "require"]


class ContextMode(enum.Enum):
    """What the drafter reads at context positions.

    TOKENS: the context tokens, through the target's frozen input embedding; context positions
    run through every drafter block (causal attention) and their keys and values are cached.
    TARGET_FEATURES: the target's hidden states at the context positions (B, T, H_t),
    RMS-normalised and projected, per drafter layer, into that layer's key/value input; the
    context then needs no attention of its own (the features already carry it).
    """

    TOKENS = "tokens"
    TARGET_FEATURES = "target_features"

    @classmethod
    def parse(cls, mode: "ContextMode | str") -> "ContextMode":
        """Return the ContextMode named by `mode` (member, or its value / name in any case).

        Examples
        --------
        >>> ContextMode.parse("target_features")
        <ContextMode.TARGET_FEATURES: 'target_features'>
        """
        if isinstance(mode, cls):
            return mode
        if isinstance(mode, str):
            key = mode.strip().lower()
            for m in cls:
                if key in (m.value, m.name.lower()):
                    return m
            names = ", ".join(repr(m.value) for m in cls)
            raise ValueError(f"context_mode must be one of {names}, got {mode!r}")
        raise TypeError(f"context_mode must be a ContextMode or str, got {type(mode).__name__}")


# ------------------------------------------------------------------------------ field checks
# One checker for every config field and numeric option: the drafter config dataclasses
# (DrafterConfig here, dflash.DFlashConfig), the config files read by checkpoint.py (DFlash and
# drafter folders) and ar.py (the ar drafter), and make-data's flags (training/data.py).

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
    `check_field` under its JSON name, returned under DrafterConfig's names: vocab_size,
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


@dataclass
class DrafterConfig:
    """Shape and behaviour of a `DiffusionDrafter`.

    The defaults describe a two-block drafter for a SmolLM2-135M-sized target (hidden 576,
    vocabulary 49152). `vocab_size` and `hidden_size` must be the target's: the drafter reads
    the target's input embedding (V, H) and output head (V, H). `from_hf_config` fills the
    target-dependent fields from a Hugging Face config.

    Examples
    --------
    >>> cfg = DrafterConfig(vocab_size=50, hidden_size=32, n_heads=4, n_kv_heads=2, head_dim=8)
    >>> cfg.mask_id, cfg.drafter_vocab_size
    (50, 50)
    >>> DrafterConfig.from_dict(cfg.to_dict()) == cfg
    True
    """

    vocab_size: int = 49152  # V: the target's vocabulary; the [MASK] id is V (one extra id)
    hidden_size: int = 576  # H: the target's hidden size (shared embedding and head are (V, H))
    n_layers: int = 2  # drafter blocks; 2-4 (docs/design.md section 4)
    n_heads: int = 9  # query heads
    n_kv_heads: int = 3  # key/value heads (grouped-query attention); divides n_heads
    head_dim: Optional[int] = 64  # per-head width (even, for RoPE); None: hidden_size // n_heads
    intermediate_size: int = 1536  # SwiGLU inner width
    rope_theta: float = 100000.0  # RoPE base (the target's, so target layers can seed the drafter)
    rms_eps: float = 1e-5  # RMSNorm epsilon
    reduced_vocab: Optional[int] = None  # K: predict only K target tokens (vocab_map); None: all V
    context_mode: ContextMode = ContextMode.TOKENS  # tokens or target hidden states at context
    target_feature_size: Optional[int] = None  # H_t (TARGET_FEATURES); None: hidden_size
    features_with_tokens: bool = False  # TARGET_FEATURES: also mix in the context token's embedding
    # TARGET_FEATURES: the target layers (TargetModel.forward's hidden_layers numbering) whose
    # hidden states, concatenated, are the features; position t reads those at t - 1
    # (training/features.py). None: not specified (the caller supplies features).
    feature_layers: Optional[list] = None
    # TARGET_FEATURES: also add a projection of the last context position's (features, token)
    # to the input of every block position, so the block reads the newest target state
    # directly rather than only through attention
    block_conditioning: bool = False
    learned_mask_embedding: bool = True  # [MASK] embedding trained; False: a fixed zero vector
    attention_bias: bool = False  # biases on the q/k/v projections (Qwen2-style targets)
    init_std: float = 0.02  # normal init of the drafter's own linear weights
    target_name: str = ""  # the target model it is distilled from (checked when loading)

    def __post_init__(self) -> None:
        """Every field type- and range-checked by `check_field` (an int must be an int: never a
        bool, float or string); FieldError (a ValueError) naming the field otherwise."""
        self.context_mode = ContextMode.parse(self.context_mode)
        for name in ("vocab_size", "hidden_size", "n_layers", "n_heads", "n_kv_heads",
                     "intermediate_size"):
            setattr(self, name, check_field(name, getattr(self, name), "int", lo=1))
        self.head_dim = check_field("head_dim", self.head_dim, "int", lo=1, optional=True)
        if self.head_dim is None:
            if self.hidden_size % self.n_heads:
                raise FieldError("head_dim",
                                 f"head_dim=None needs n_heads to divide hidden_size, got "
                                 f"{self.hidden_size} and {self.n_heads}")
            self.head_dim = self.hidden_size // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise FieldError("n_kv_heads",
                             f"n_kv_heads must divide n_heads, got n_heads={self.n_heads}, "
                             f"n_kv_heads={self.n_kv_heads}")
        if self.head_dim % 2:
            raise FieldError("head_dim",
                             f"head_dim must be even (RoPE rotates pairs), got {self.head_dim}")
        if self.reduced_vocab is not None:
            self.reduced_vocab = check_field("reduced_vocab", self.reduced_vocab, "int", lo=1,
                                             hi=self.vocab_size)
        self.feature_layers = check_field("feature_layers", self.feature_layers, "ints",
                                          optional=True)
        self.target_feature_size = check_field("target_feature_size", self.target_feature_size,
                                               "int", lo=1, optional=True)
        self.rope_theta = check_field("rope_theta", self.rope_theta, "real", above=0)
        self.rms_eps = check_field("rms_eps", self.rms_eps, "real", above=0)
        self.init_std = check_field("init_std", self.init_std, "real", lo=0)
        for name in ("features_with_tokens", "block_conditioning", "learned_mask_embedding",
                     "attention_bias"):
            check_field(name, getattr(self, name), "bool")
        check_field("target_name", self.target_name, "str")

    # ------------------------------------------------------------------ derived
    @property
    def mask_id(self) -> int:
        """The [MASK] token id: one past the target vocabulary."""
        return self.vocab_size

    @property
    def drafter_vocab_size(self) -> int:
        """Vd: the width of the drafter's logits (K with a reduced vocabulary, else V)."""
        return self.reduced_vocab if self.reduced_vocab is not None else self.vocab_size

    @property
    def feature_size(self) -> int:
        """H_t: width of the target features read in TARGET_FEATURES mode."""
        return self.target_feature_size if self.target_feature_size is not None else self.hidden_size

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (the context mode by its value)."""
        d = dataclasses.asdict(self)
        d["context_mode"] = self.context_mode.value
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DrafterConfig":
        """Inverse of `to_dict`; unknown keys raise ValueError (a config from another version)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown DrafterConfig fields {unknown}")
        return cls(**d)

    @classmethod
    def from_hf_config(cls, hf_config: Any, target_name: str, **overrides: Any) -> "DrafterConfig":
        """A drafter config shaped like the target's layers (duck-typed Hugging Face config).

        Reads vocab_size, hidden_size, num_attention_heads, num_key_value_heads, head_dim,
        intermediate_size, rope_theta and rms_norm_eps where present; `overrides` win.

        Examples
        --------
        >>> from types import SimpleNamespace
        >>> hf = SimpleNamespace(vocab_size=100, hidden_size=64, num_attention_heads=4,
        ...                      num_key_value_heads=2, intermediate_size=128)
        >>> DrafterConfig.from_hf_config(hf, "tiny", n_layers=3).head_dim
        16
        """
        n_heads = getattr(hf_config, "num_attention_heads", cls.n_heads)
        kw: dict[str, Any] = dict(
            vocab_size=hf_config.vocab_size,
            hidden_size=hf_config.hidden_size,
            n_heads=n_heads,
            n_kv_heads=getattr(hf_config, "num_key_value_heads", None) or n_heads,
            head_dim=getattr(hf_config, "head_dim", None),
            intermediate_size=getattr(hf_config, "intermediate_size", cls.intermediate_size),
            rope_theta=float(getattr(hf_config, "rope_theta", cls.rope_theta)),
            rms_eps=float(getattr(hf_config, "rms_norm_eps", cls.rms_eps)),
            attention_bias=bool(getattr(hf_config, "attention_bias", False)),
            target_name=target_name,
        )
        kw.update(overrides)
        return cls(**kw)
