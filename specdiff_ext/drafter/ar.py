"""The autoregressive drafter of the ar-spec baseline (docs/design.md section 5), from the same pipeline.

The baseline drafter is a plain Hugging Face causal LM with the target's architecture cut to a
few layers, sharing the target's frozen input embedding and (tied) output head, exactly like the
diffusion drafter. ``specdiff train-drafter --ar`` trains it on the same data with the same
budget (steps, sequences per step, supervised tokens), by next-token cross-entropy on the
continuations. Being an ordinary ``PreTrainedModel``, it drives both `decoding.ARSpecDecoder`
(wrapped as a `TargetModel`) and Hugging Face assisted generation (``assistant_model=``), so
the two are compared with the very same drafter.

On disk: ``config.json`` (the Hugging Face config, plus ``specdiff`` metadata naming the
target) and ``model.safetensors`` holding the drafter's own weights only; the embedding and
head come from the target at load time.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import FieldError, check_field, check_hf_layers, require

__all__ = ["build_ar_drafter", "ar_loss", "save_ar_drafter", "load_ar_drafter", "load_ar_weights",
           "is_ar_checkpoint", "read_ar_config", "FORMAT"]

FORMAT = "specdiff-ar-drafter-1"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"


def _shared_names(model: Any) -> set:
    """Parameter names that belong to the target (embedding, tied head)."""
    names = set()
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    for n, p in model.named_parameters(remove_duplicate=False):
        if p is emb or p is head:
            names.add(n)
    return names


def build_ar_drafter(target: Any, n_layers: int = 2, init_layers: Optional[Sequence[int]] = None,
                     dtype: torch.dtype = torch.float32, seed: int = 0) -> Any:
    """A causal LM shaped like the target with `n_layers` decoder layers, sharing the target's
    frozen embedding (and tied head).

    Parameters
    ----------
    target : TargetModel
        Its model must tie the output head to the input embedding (SmolLM2 does).
    n_layers : int
    init_layers : sequence of int, optional
        Target layers whose weights seed the drafter's layers (one per layer).
    dtype : torch.dtype
        dtype of the drafter's own weights.
    seed : int
        Seed of the random initialisation (drawn from a forked RNG: the caller's global torch
        RNG state is left as it was).
    """
    from transformers import AutoModelForCausalLM

    if isinstance(n_layers, bool) or not isinstance(n_layers, int) or n_layers < 1:
        raise ValueError(f"n_layers must be a positive int, got {n_layers!r}")
    tcfg = target.model.config
    if not getattr(tcfg, "tie_word_embeddings", False):
        raise ValueError(f"the ar drafter shares a tied embedding/head; target {target.name!r} "
                         "does not tie them")
    cfg = tcfg.__class__.from_dict(tcfg.to_dict())
    cfg.num_hidden_layers = n_layers
    if hasattr(cfg, "layer_types") and cfg.layer_types is not None:
        cfg.layer_types = list(cfg.layer_types)[:n_layers]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    with torch.no_grad():
        if init_layers is not None:
            init_layers = list(init_layers)
            if len(init_layers) != n_layers:
                raise ValueError(f"init_layers needs {n_layers} entries, got {init_layers}")
            src = target.model.model.layers
            for dst, li in zip(model.model.layers, init_layers):
                dst.load_state_dict({k: v.to(dtype) for k, v in src[li].state_dict().items()})
            model.model.norm.weight.copy_(target.model.model.norm.weight.to(dtype))
    _attach_target(model, target)
    return model


def _attach_target(model: Any, target: Any) -> None:
    """Point the model's embedding (and tied head) at the target's frozen weight."""
    emb = target.input_embeddings.weight
    model.get_input_embeddings().weight = emb
    model.get_output_embeddings().weight = emb
    emb.requires_grad_(False)


def ar_loss(model: Any, seqs: Tensor, lengths: Tensor, lo: Tensor) -> tuple:
    """Next-token cross-entropy on the continuation tokens of each row.

    Shape: seqs (B, L) right-padded ids, lengths (B,), lo (B,): the first supervised prediction
    is made at position lo (the last prompt token). Returns (loss, {"ce", "acc1", "tokens"}).
    """
    B, L = seqs.shape
    dev = seqs.device
    att = torch.arange(L, device=dev)[None, :] < lengths[:, None]  # (B, L)
    hidden = model.model(input_ids=seqs, attention_mask=att.long()).last_hidden_state  # (B, L, H)
    tgt = seqs[:, 1:]
    pos = torch.arange(L - 1, device=dev)[None, :]
    sup = (pos >= lo[:, None]) & (pos + 1 < lengths[:, None])  # (B, L-1)
    # the head only where a prediction is supervised (the continuation)
    logits = model.lm_head(hidden[:, :-1][sup]).float()  # (N, V)
    ce = F.cross_entropy(logits, tgt[sup])
    with torch.no_grad():
        acc = (logits.argmax(-1) == tgt[sup]).float().mean()
    return ce, {"ce": float(ce.detach()), "acc": float(acc), "acc1": float(acc),
                "tokens": int(sup.sum())}


def save_ar_drafter(model: Any, folder: Union[str, os.PathLike], target: Any,
                    extra: Optional[dict] = None, dtype: Optional[torch.dtype] = None) -> None:
    """Write config.json and the drafter's own weights (not the target's embedding)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shared = _shared_names(model)
    state = {n: (p.detach().to(dtype) if dtype is not None else p.detach()).contiguous().cpu()
             for n, p in model.named_parameters() if n not in shared}
    save_file(state, str(folder / WEIGHTS))
    cfg = model.config.to_dict()
    cfg["specdiff"] = {"format": FORMAT, "target": {"name": target.name,
                                                    "vocab_size": target.vocab_size,
                                                    "hidden_size": target.hidden_size},
                       "extra": extra or {}}
    with open(folder / CONFIG, "w") as fh:
        json.dump(cfg, fh, indent=1, default=str)


def is_ar_checkpoint(folder: Union[str, os.PathLike]) -> bool:
    """True when `folder` holds a drafter written by `save_ar_drafter`."""
    p = Path(folder) / CONFIG
    if not p.is_file():
        return False
    try:
        meta = json.loads(p.read_text())
    except (OSError, ValueError):
        return False
    own = meta.get("specdiff") if isinstance(meta, dict) else None
    return isinstance(own, dict) and own.get("format") == FORMAT


def read_ar_config(folder: Union[str, os.PathLike]) -> tuple[dict, dict]:
    """(the Hugging Face config dict, the ``specdiff`` metadata) of an ar drafter folder.

    Every field the loader reads is type- and range-checked by `config.check_field` under its
    JSON name (the layer fields, ``model_type``, ``specdiff.target.vocab_size``, ...), and the
    config's vocab_size / hidden_size must be those of the target it names: a ValueError naming
    the file and the field otherwise.
    """
    from .checkpoint import _read_json

    path = os.path.join(folder, CONFIG)
    raw = _read_json(path)
    try:
        meta = check_field("specdiff", require(raw, "specdiff"), "dict")
        want = check_field("specdiff.target", require(meta, "target", "specdiff."), "dict")
        check_field("specdiff.target.name", require(want, "name", "specdiff.target."), "str")
        for key in ("vocab_size", "hidden_size"):
            check_field(f"specdiff.target.{key}", require(want, key, "specdiff.target."), "int",
                        lo=1)
        check_field("specdiff.extra", meta.get("extra", {}), "dict")
        layers = check_hf_layers(raw)
        for key in ("vocab_size", "hidden_size"):
            if layers[key] != want[key]:
                raise FieldError(key, f"{key} = {layers[key]} differs from specdiff.target."
                                      f"{key} = {want[key]} (the drafter shares the target's "
                                      "embedding)")
        check_field("model_type", require(raw, "model_type"), "str")
        check_field("tie_word_embeddings", raw.get("tie_word_embeddings", True), "bool")
        check_field("max_position_embeddings", raw.get("max_position_embeddings"), "int", lo=1,
                    optional=True)
    except FieldError as exc:
        raise exc.located(path, "ar drafter") from None
    return raw, meta


def load_ar_weights(model: Any, folder: Union[str, os.PathLike]) -> Any:
    """Load the drafter's own weights from `folder` into `model` (cast to its dtype); every
    weight but the target's shared embedding/head must be present and nothing else.

    Raises ValueError naming the missing and unexpected weights otherwise.
    """
    from safetensors.torch import load_file

    path = os.path.join(folder, WEIGHTS)
    try:
        state = load_file(path)
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise ValueError(f"{path}: not a readable safetensors file ({type(exc).__name__}: "
                         f"{exc})") from None
    shared = _shared_names(model)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # size mismatches
        lines = str(exc).strip().splitlines()
        raise ValueError(f"{path}: weights do not fit the config "
                         f"({' '.join(lines[1:3]) or lines[0]})") from None
    missing = [m for m in missing if m not in shared]
    if missing or unexpected:
        raise ValueError(f"ar drafter {os.fspath(folder)!r} does not match its config: missing "
                         f"{sorted(missing)}, unexpected {sorted(unexpected)}")
    return model


def load_ar_drafter(folder: Union[str, os.PathLike], target: Any) -> Any:
    """Load an ar drafter onto `target` as a `TargetModel` (what `ARSpecDecoder` drives; its
    ``.model`` is the ``PreTrainedModel`` for Hugging Face assisted generation).

    Raises ValueError when the checkpoint was distilled from another target (the message names
    the field). The drafter takes the target's dtype and device.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..target import TargetModel

    folder = Path(folder)
    if not is_ar_checkpoint(folder):
        raise ValueError(f"{os.fspath(folder)!r} does not hold an ar drafter ({CONFIG} with "
                         f"specdiff format {FORMAT!r})")
    raw, meta = read_ar_config(folder)
    raw = dict(raw)
    raw.pop("specdiff")
    want = meta["target"]
    given = {"name": target.name, "vocab_size": target.vocab_size, "hidden_size": target.hidden_size}
    for k, v in want.items():
        if given.get(k) != v:
            raise ValueError(f"ar drafter {os.fspath(folder)!r} was distilled from a target with "
                             f"{k} {v!r}, but the target given has {k} {given.get(k)!r}")
    model_type = raw.pop("model_type")
    try:
        cfg = AutoConfig.for_model(model_type, **raw)
    except (ValueError, TypeError, KeyError) as exc:  # an unknown model_type, a field it refuses
        why = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        why = why if len(why) <= 120 else why[:120] + "..."
        raise ValueError(f"{os.fspath(folder / CONFIG)}: invalid ar drafter config: model_type "
                         f"{model_type!r} is not a config transformers builds ({why})") from None
    model = AutoModelForCausalLM.from_config(cfg, dtype=target.dtype)
    load_ar_weights(model, folder)
    model.to(device=target.device)
    _attach_target(model, target)
    return TargetModel(model, target.tokenizer, folder.resolve().name)
