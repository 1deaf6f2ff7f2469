"""Drafter checkpoints: ``model.safetensors`` (the drafter's own weights only) and
``config.json`` (the DrafterConfig and the target it was distilled from).

The target's embedding and output head are not stored: `load_drafter` takes them from the
loaded target and refuses a target that differs from the one named in the checkpoint.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from .config import DrafterConfig
from .model import DiffusionDrafter

__all__ = ["save_drafter", "load_drafter", "CONFIG_NAME", "WEIGHTS_NAME"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 1


def _safetensors() -> Any:
    try:
        import safetensors.torch as st
    except ImportError as exc:  # pragma: no cover - optional dependency
        raise ImportError("drafter checkpoints need the `safetensors` package "
                          "(pip install safetensors)") from exc
    return st


def save_drafter(model: DiffusionDrafter, folder: Union[str, os.PathLike],
                 extra: Optional[dict] = None) -> None:
    """Write ``folder/model.safetensors`` and ``folder/config.json``.

    Parameters
    ----------
    model : DiffusionDrafter
        Its `state_dict()` is saved (own weights and the vocab_map buffer; never the target's
        embedding or head).
    folder : path
        Created if missing.
    extra : dict, optional
        JSON-serialisable metadata stored under ``"extra"`` (e.g. training step, data).

    Examples
    --------
    >>> import tempfile, torch
    >>> from specdiff_ext.drafter import DrafterConfig, DiffusionDrafter, load_drafter
    >>> cfg = DrafterConfig(vocab_size=50, hidden_size=32, n_heads=4, n_kv_heads=2, head_dim=8,
    ...                     intermediate_size=64, target_name="tiny")
    >>> emb, head = torch.nn.Embedding(50, 32), torch.randn(50, 32)
    >>> with tempfile.TemporaryDirectory() as d:
    ...     save_drafter(DiffusionDrafter(cfg, emb, head), d)
    ...     _ = load_drafter(d, emb, head, target_name="tiny")
    """
    st = _safetensors()
    os.makedirs(folder, exist_ok=True)
    cfg = model.config
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    meta = {
        "format_version": FORMAT_VERSION,
        "target": {"name": cfg.target_name, "vocab_size": cfg.vocab_size,
                   "hidden_size": cfg.hidden_size},
        "drafter": cfg.to_dict(),
        "extra": extra or {},
    }
    st.save_file(state, os.path.join(folder, WEIGHTS_NAME), metadata={"format": "pt"})
    with open(os.path.join(folder, CONFIG_NAME), "w") as fh:
        json.dump(meta, fh, indent=2, sort_keys=True)
        fh.write("\n")


def read_drafter_config(folder: Union[str, os.PathLike]) -> tuple[DrafterConfig, dict]:
    """The DrafterConfig of a checkpoint and its full config.json dict."""
    path = os.path.join(folder, CONFIG_NAME)
    with open(path) as fh:
        meta = json.load(fh)
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {version!r}, this code reads {FORMAT_VERSION}")
    return DrafterConfig.from_dict(meta["drafter"]), meta


def load_drafter(
    folder: Union[str, os.PathLike],
    target_embed: Union[nn.Embedding, Tensor],
    target_head: Tensor,
    *,
    target_name: str,
    vocab_size: Optional[int] = None,
    hidden_size: Optional[int] = None,
    device: Optional[Union[str, torch.device]] = None,
    dtype: Optional[torch.dtype] = None,
) -> DiffusionDrafter:
    """Load a drafter saved by `save_drafter` onto the given target.

    Parameters
    ----------
    folder : path
    target_embed : nn.Embedding or tensor
        Shape: (V, H). The loaded target's input embedding.
    target_head : tensor
        Shape: (V, H). The loaded target's output head weight.
    target_name : str
        Name of the loaded target; must equal the checkpoint's.
    vocab_size, hidden_size : int, optional
        The target's V and H (default: from target_head's shape); must equal the checkpoint's.
    device, dtype : optional
        Where to put the drafter (default: target_head's device, float32).

    Returns
    -------
    DiffusionDrafter
        In eval mode.

    Raises
    ------
    ValueError
        If the target differs from the checkpoint's (the message names the field: target
        name, vocab_size or hidden_size), or the checkpoint is malformed.
    """
    cfg, meta = read_drafter_config(folder)
    emb = target_embed.weight if isinstance(target_embed, nn.Embedding) else target_embed
    given = {
        "target name": target_name,
        "vocab_size": int(vocab_size) if vocab_size is not None else int(target_head.shape[0]),
        "hidden_size": int(hidden_size) if hidden_size is not None else int(target_head.shape[1]),
    }
    saved_target = meta.get("target", {})
    saved = {"target name": saved_target.get("name"), "vocab_size": saved_target.get("vocab_size"),
             "hidden_size": saved_target.get("hidden_size")}
    for field, want in saved.items():
        if given[field] != want:
            raise ValueError(
                f"drafter checkpoint {os.fspath(folder)!r} was distilled from a target with "
                f"{field} {want!r}, but the target given has {field} {given[field]!r}"
            )
    for name, t in (("target_embed", emb), ("target_head", target_head)):
        if tuple(t.shape) != (cfg.vocab_size, cfg.hidden_size):
            raise ValueError(f"{name} must have shape (V, H) = ({cfg.vocab_size}, "
                             f"{cfg.hidden_size}) for this drafter, got {tuple(t.shape)}")
    st = _safetensors()
    state = st.load_file(os.path.join(folder, WEIGHTS_NAME))
    model = DiffusionDrafter(cfg, emb, target_head)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"drafter checkpoint {os.fspath(folder)!r} does not match its config: "
                         f"missing {sorted(missing)}, unexpected {sorted(unexpected)}")
    model.to(device=device if device is not None else target_head.device,
             dtype=dtype if dtype is not None else torch.float32)
    return model.eval()
