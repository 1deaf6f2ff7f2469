"""Drafter checkpoints: DFlash folders (``config.json`` in the published DFlash layout,
``model.safetensors`` with the drafter's own weights, optionally ``draft_vocab.safetensors``).

The target's embedding and output head are not stored: `load_drafter` takes them from the
loaded target and refuses a target that differs from the one named in the checkpoint. Folders
of the retired tokens-context drafter are refused with a message saying so (the DFlash drafter
has another architecture, so there is nothing to convert them to).
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from .config import (MAX_BLOCK, MAX_FFN_RATIO, MAX_LAYERS, MAX_TARGET_LAYERS, FieldError,
                     check_field, check_hf_layers, require)
from .dflash import DFlashConfig, DFlashDrafter, check_vocab_map

__all__ = ["load_drafter", "save_dflash", "read_dflash_config", "is_dflash_folder",
           "CONFIG_NAME", "WEIGHTS_NAME", "DRAFT_VOCAB_NAME"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
# a DFlash folder's draft vocabulary (`DFlashDrafter.vocab_map`), beside the published weights
# so that their layout stays the published one
DRAFT_VOCAB_NAME = "draft_vocab.safetensors"


def _safetensors() -> Any:
    try:
        import safetensors.torch as st
    except ImportError as exc:  # pragma: no cover - optional dependency
        raise ImportError("drafter checkpoints need the `safetensors` package "
                          "(pip install safetensors)") from exc
    return st


# ------------------------------------------------------------------------------ DFlash layout

def _dflash_hf_config(cfg: DFlashConfig, dtype: torch.dtype, extra: Optional[dict],
                      draft_vocab: bool = True) -> dict:
    """The published DFlash config.json (Qwen3 layer fields, block_size, num_target_layers,
    dflash_config), plus a ``specdiff`` entry naming the target and the draft vocabulary's size
    (other readers ignore it)."""
    n = cfg.n_layers
    own: dict = {"target_name": cfg.target_name, "target_hidden_size": cfg.target_hidden_size,
                 "extra": extra or {}}
    if draft_vocab and cfg.draft_vocab_size is not None:
        own["draft_vocab_size"] = cfg.draft_vocab_size
    return {
        "architectures": ["DFlashDraftModel"],
        "model_type": "qwen3",
        "attention_bias": cfg.attention_bias,
        "attention_dropout": 0.0,
        "block_size": cfg.block_size,
        "dflash_config": {"mask_token_id": cfg.mask_token_id,
                          "target_layer_ids": list(cfg.target_layer_ids)},
        "dtype": str(dtype).replace("torch.", ""),
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "hidden_size": cfg.hidden_size,
        "initializer_range": cfg.init_std,
        "intermediate_size": cfg.intermediate_size,
        "layer_types": ["full_attention"] * n,
        "max_position_embeddings": 8192,
        "max_window_layers": n,
        "num_attention_heads": cfg.n_heads,
        "num_hidden_layers": n,
        "num_key_value_heads": cfg.n_kv_heads,
        "num_target_layers": cfg.num_target_layers,
        "rms_norm_eps": cfg.rms_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "rope_scaling": None,
        "rope_theta": cfg.rope_theta,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": cfg.vocab_size,
        "specdiff": own,
    }


def is_dflash_folder(folder: Union[str, os.PathLike]) -> bool:
    """True when folder/config.json names the DFlashDraftModel architecture."""
    path = os.path.join(folder, CONFIG_NAME)
    try:
        with open(path) as fh:
            meta = json.load(fh)
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and "DFlashDraftModel" in (meta.get("architectures") or [])


def _read_json(path: str) -> dict:
    """A config file as a dict; a clear ValueError naming the file otherwise."""
    try:
        with open(path) as fh:
            meta = json.load(fh)
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file (not a drafter folder)") from None
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not readable JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    return meta


def read_dflash_config(folder: Union[str, os.PathLike]) -> tuple[DFlashConfig, dict]:
    """The DFlashConfig of a DFlash folder (published or written here) and its config dict.

    Every field read is type- and range-checked by `config.check_field` under its JSON name
    (``num_hidden_layers``, ``dflash_config.target_layer_ids``, ``specdiff.target_hidden_size``):
    a ValueError naming the file and the field otherwise.
    """
    path = os.path.join(folder, CONFIG_NAME)
    hf = _read_json(path)
    try:
        layers = check_hf_layers(hf)
        if any(t != "full_attention" for t in hf.get("layer_types") or []):
            raise FieldError("layer_types", "layer_types: sliding-window drafter layers are "
                                            "not supported")
        for key in ("rope_scaling", "rope_parameters"):  # the drafter rotates by plain RoPE
            rs = check_field(key, hf.get(key), "dict", optional=True) or {}
            rtype = rs.get("rope_type", rs.get("type", "default"))
            if rtype != "default":
                raise FieldError(key, f"{key}.rope_type must be 'default' (plain RoPE), got "
                                      f"{rtype!r}")
        nt = check_field("num_target_layers", require(hf, "num_target_layers"), "int", lo=1,
                         hi=MAX_TARGET_LAYERS)
        block = check_field("block_size", hf.get("block_size", 16), "int", lo=2, hi=MAX_BLOCK)
        dcfg = check_field("dflash_config", require(hf, "dflash_config"), "dict")
        mask = check_field("dflash_config.mask_token_id",
                           require(dcfg, "mask_token_id", "dflash_config."), "int", lo=0,
                           hi=layers["vocab_size"] - 1)
        # the target layers whose states are the drafter's only context: never empty
        ids = check_field("dflash_config.target_layer_ids",
                          require(dcfg, "target_layer_ids", "dflash_config."), "ints", lo=0,
                          hi=nt - 1, nonempty=True, max_len=MAX_LAYERS)
        own = check_field("specdiff", hf.get("specdiff", {}), "dict")
        h_t = check_field("specdiff.target_hidden_size", own.get("target_hidden_size"), "int",
                          lo=1, hi=MAX_FFN_RATIO * layers["hidden_size"], optional=True)
        name = check_field("specdiff.target_name", own.get("target_name", ""), "str")
        check_field("specdiff.extra", own.get("extra", {}), "dict")
        k = check_field("specdiff.draft_vocab_size", own.get("draft_vocab_size"), "int", lo=1,
                        hi=layers["vocab_size"], optional=True)
        cfg = DFlashConfig(**layers, num_target_layers=nt, target_layer_ids=ids,
                           target_hidden_size=h_t, mask_token_id=mask, block_size=block,
                           target_name=name, draft_vocab_size=k)
    except FieldError as exc:
        raise exc.located(path, "DFlash") from None
    return cfg, hf


def save_dflash(model: DFlashDrafter, folder: Union[str, os.PathLike],
                extra: Optional[dict] = None, dtype: Optional[torch.dtype] = None,
                draft_vocab: bool = True) -> None:
    """Write a DFlash folder: ``config.json`` in the published layout and ``model.safetensors``
    with the published weight names (``layers.i.self_attn.q_proj.weight``, ``fc.weight``, ...),
    in `dtype` (default: the model's).

    A drafter with a draft vocabulary also gets ``draft_vocab.safetensors`` (its vocab_map) and
    ``specdiff.draft_vocab_size`` in the config, unless `draft_vocab` is False: then the folder
    is the published architecture alone, which scores the full head (``export-dflash``).

    Examples
    --------
    >>> import tempfile, torch
    >>> from specdiff_ext.drafter.dflash import DFlashConfig, DFlashDrafter
    >>> cfg = DFlashConfig(vocab_size=50, hidden_size=32, n_heads=4, n_kv_heads=2, head_dim=8,
    ...                    intermediate_size=64, num_target_layers=6, mask_token_id=3,
    ...                    target_name="tiny")
    >>> emb, head = torch.randn(50, 32), torch.randn(50, 32)
    >>> with tempfile.TemporaryDirectory() as d:
    ...     save_dflash(DFlashDrafter(cfg, emb, head), d)
    ...     type(load_drafter(d, emb, head, target_name="tiny")).__name__
    'DFlashDrafter'
    """
    st = _safetensors()
    os.makedirs(folder, exist_ok=True)
    dt = dtype if dtype is not None else model.fc.weight.dtype
    state = {k: v.detach().to("cpu", dt).contiguous() for k, v in model.state_dict().items()}
    st.save_file(state, os.path.join(folder, WEIGHTS_NAME), metadata={"format": "pt"})
    vocab = os.path.join(folder, DRAFT_VOCAB_NAME)
    if draft_vocab and model.vocab_map is not None:
        st.save_file({"vocab_map": model.vocab_map.detach().to("cpu", torch.int64).contiguous()},
                     vocab, metadata={"format": "pt"})
    elif os.path.exists(vocab):  # never leave another drafter's vocabulary beside these weights
        os.remove(vocab)
    with open(os.path.join(folder, CONFIG_NAME), "w") as fh:
        json.dump(_dflash_hf_config(model.config, dt, extra, draft_vocab), fh, indent=2,
                  sort_keys=True)
        fh.write("\n")


def _load_weights(model: nn.Module, folder: Union[str, os.PathLike], kind: str,
                  device: Any, dtype: Optional[torch.dtype], fallback_device: Any) -> Any:
    """Strictly load folder/model.safetensors into `model`, then place it (eval mode)."""
    path = os.path.join(folder, WEIGHTS_NAME)
    try:
        state = _safetensors().load_file(path)
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise ValueError(f"{path}: not a readable safetensors file ({type(exc).__name__}: {exc})") from None
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # size mismatches
        first = str(exc).strip().splitlines()
        raise ValueError(f"{path}: weights do not fit the config ({' '.join(first[1:3]) or first[0]})") from None
    if missing or unexpected:
        raise ValueError(f"{kind} checkpoint {os.fspath(folder)!r} does not match its config: "
                         f"missing {sorted(missing)}, unexpected {sorted(unexpected)}")
    model.to(device=device if device is not None else fallback_device,
             dtype=dtype if dtype is not None else torch.float32)
    return model.eval()


def _check_target_shapes(emb: Tensor, head: Tensor, V: int, H: int) -> None:
    for name, t in (("target_embed", emb), ("target_head", head)):
        if tuple(t.shape) != (V, H):
            raise ValueError(f"{name} must have shape (V, H) = ({V}, {H}) for this drafter, "
                             f"got {tuple(t.shape)}")


def _load_dflash(folder: Union[str, os.PathLike], emb: Tensor, target_head: Tensor,
                 target_name: str, device: Any, dtype: Optional[torch.dtype]) -> DFlashDrafter:
    cfg, _ = read_dflash_config(folder)
    if cfg.target_name and cfg.target_name != target_name:
        raise ValueError(f"drafter checkpoint {os.fspath(folder)!r} was distilled from a target "
                         f"with target name {cfg.target_name!r}, but the target given has "
                         f"target name {target_name!r}")
    _check_target_shapes(emb, target_head, cfg.vocab_size, cfg.hidden_size)
    vocab_map = None
    if cfg.draft_vocab_size is not None:
        path = os.path.join(folder, DRAFT_VOCAB_NAME)
        try:
            vocab_map = _safetensors().load_file(path).get("vocab_map")
        except FileNotFoundError:
            raise ValueError(f"{path}: no such file (config.json sets specdiff.draft_vocab_size "
                             f"= {cfg.draft_vocab_size})") from None
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
            raise ValueError(f"{path}: not a readable safetensors file ({exc})") from None
        if vocab_map is None:
            raise ValueError(f"{path}: no tensor named vocab_map")
        try:
            vocab_map = check_vocab_map(vocab_map, cfg.vocab_size, cfg.draft_vocab_size)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None
    from ..calibrate import read_tree_acceptance

    table = read_tree_acceptance(folder)  # measured acceptance per tree budget, if any
    model = _load_weights(DFlashDrafter(cfg, emb, target_head, vocab_map), folder, "DFlash",
                          device, dtype, target_head.device)
    model.tree_acceptance = table
    return model


def _is_tokens_context_folder(meta: dict) -> bool:
    """True for the config.json of a retired tokens-context drafter folder: a ``drafter`` object
    beside ``format_version`` (and ``target``), as that drafter's checkpoints were written."""
    return isinstance(meta.get("drafter"), dict) and "format_version" in meta


def load_drafter(
    folder: Union[str, os.PathLike],
    target_embed: Union[nn.Embedding, Tensor],
    target_head: Tensor,
    *,
    target_name: str,
    device: Optional[Union[str, torch.device]] = None,
    dtype: Optional[torch.dtype] = None,
) -> DFlashDrafter:
    """Load a DFlash folder (published layout, e.g. from `save_dflash`) onto the given target.

    Parameters
    ----------
    folder : path
    target_embed : nn.Embedding or tensor
        Shape: (V, H). The loaded target's input embedding.
    target_head : tensor
        Shape: (V, H). The loaded target's output head weight.
    target_name : str
        Name of the loaded target; must equal the checkpoint's (when it names one).
    device, dtype : optional
        Where to put the drafter (default: target_head's device, float32).

    Returns
    -------
    DFlashDrafter
        In eval mode.

    Raises
    ------
    ValueError
        If the target differs from the checkpoint's (the message names the target name or the
        shapes), the checkpoint is malformed, or the folder is not a DFlash folder (one of the
        retired tokens-context drafter is named as such).
    """
    emb = target_embed.weight if isinstance(target_embed, nn.Embedding) else target_embed
    if is_dflash_folder(folder):
        return _load_dflash(folder, emb, target_head, target_name, device, dtype)
    path = os.path.join(folder, CONFIG_NAME)
    meta = _read_json(path)
    if _is_tokens_context_folder(meta):
        raise ValueError(
            f"{os.fspath(folder)!r} holds a tokens-context masked-diffusion drafter: "
            "tokens-context drafters were retired and no longer load (the DFlash drafter has "
            "another architecture, so there is nothing to convert); `specdiff train-dflash` "
            "trains the current drafter")
    raise ValueError(f"{path}: not a DFlash drafter folder (its architectures do not name "
                     "DFlashDraftModel)")
