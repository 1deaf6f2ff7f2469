"""Configuration of the masked-diffusion drafter (DESIGN section 4).

Kept free of torch so that configs can be read, written and compared without loading a model.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass
from typing import Any, Optional

__all__ = ["ContextMode", "DrafterConfig"]


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
    n_layers: int = 2  # drafter blocks; 2-4 (DESIGN section 4)
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
        self.context_mode = ContextMode.parse(self.context_mode)
        if self.head_dim is None:
            if self.hidden_size % self.n_heads:
                raise ValueError(
                    f"head_dim=None needs n_heads to divide hidden_size, got {self.hidden_size} "
                    f"and {self.n_heads}"
                )
            self.head_dim = self.hidden_size // self.n_heads
        for name in ("vocab_size", "hidden_size", "n_layers", "n_heads", "n_kv_heads",
                     "head_dim", "intermediate_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_kv_heads must divide n_heads, got n_heads={self.n_heads}, "
                f"n_kv_heads={self.n_kv_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even (RoPE rotates pairs), got {self.head_dim}")
        if self.reduced_vocab is not None and not 1 <= self.reduced_vocab <= self.vocab_size:
            raise ValueError(
                f"reduced_vocab must be None or in [1, vocab_size] = [1, {self.vocab_size}], "
                f"got {self.reduced_vocab}"
            )
        if self.feature_layers is not None:
            self.feature_layers = [int(i) for i in self.feature_layers]
        if self.target_feature_size is not None and self.target_feature_size < 1:
            raise ValueError(f"target_feature_size must be positive, got {self.target_feature_size}")
        if self.rope_theta <= 0 or self.rms_eps <= 0:
            raise ValueError(
                f"rope_theta and rms_eps must be > 0, got {self.rope_theta}, {self.rms_eps}"
            )

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
