"""Int8 drafting on CPUs: the DFlash drafter's linear layers and head with int8 weights.

Drafting reads the drafter's weights once per round for a handful of rows: on a CPU that is
memory-bound work, and the float weights (11.6M of the layers plus 16,384 x 576 of the head,
80 MB in float32, 40 MB in bfloat16) cost a measurable share of a round. Int8 weights, one
scale per output row, with the activations quantized per call (`torch.ops.quantized.
linear_dynamic`, fbgemm / x86 engine), read a quarter of the float32 bytes.

Exactness does not depend on it: the decoder verifies against the logits the drafter actually
produced (q is whatever the drafter's law is), so int8 drafting changes what is accepted, never
the output's law. Training, `state_dict` and `export-dflash` keep seeing the float weights: the
packed copies live beside them, are built by `pack_int8` and dropped by `unpack_int8` (call it
again after changing the weights).
"""

from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
from torch import Tensor, nn

__all__ = ["Int8Linear", "pack_int8", "unpack_int8", "int8_available", "int8_head",
           "FLOAT_MODULES"]

# Modules that stay in float: `fc` reads the target's raw feature-layer states, whose few
# outlier dimensions (and outlier positions) set a per-call activation scale that crushes
# everything else; in int8 it costs the drafter most of its hit rate (a probe on held-out
# ShareGPT prompts: top-1 of the target's token at block position 1 fell from 0.58 to 0.20;
# with `fc` in float, 0.57). It is 1728 x 576, a few percent of the drafter's bytes.
FLOAT_MODULES = ("fc",)


def int8_available() -> bool:
    """True where the dynamic int8 linear op runs (a CPU build with fbgemm / x86 / onednn)."""
    engines = set(getattr(torch.backends.quantized, "supported_engines", []))
    return bool(engines & {"x86", "fbgemm", "onednn"}) and hasattr(torch.ops.quantized,
                                                                   "linear_dynamic")


def _engine() -> str:
    eng = torch.backends.quantized.engine
    if eng in ("x86", "fbgemm", "onednn"):
        return eng
    for e in ("x86", "fbgemm", "onednn"):
        if e in torch.backends.quantized.supported_engines:
            torch.backends.quantized.engine = e
            return e
    raise RuntimeError("int8 drafting needs torch's x86 / fbgemm quantized engine, which this "
                       "torch build lacks")


def _pack(weight: Tensor, bias: Optional[Tensor]) -> Any:
    """Per-row symmetric int8 weights, packed for `linear_dynamic`. Shape: weight (N, K)."""
    _engine()
    w = weight.detach().float().cpu()
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12).double()
    with warnings.catch_warnings():  # the packing op takes a quantized tensor (deprecated)
        warnings.simplefilter("ignore", UserWarning)
        q = torch.quantize_per_channel(w, scale, torch.zeros(w.shape[0], dtype=torch.int64), 0,
                                       torch.qint8)
    b = bias.detach().float().cpu() if bias is not None else None
    return torch.ops.quantized.linear_prepack(q, b)


def _linear(x: Tensor, packed: Any) -> Tensor:
    """y = x W^T (+ b) with the packed int8 W; x float on the CPU. Shape: (..., K) -> (..., N)
    float32. One activation scale per call, so the rows of a 3-D input (dim 0: a batch) go
    one call each: no row's result depends on the others. reduce_range: 7-bit activations,
    so that CPUs without VNNI cannot saturate int16 sums."""
    if x.dim() == 3 and x.shape[0] > 1:
        return torch.cat([_linear(r, packed) for r in x.split(1)], 0)
    shape = x.shape
    y = torch.ops.quantized.linear_dynamic(x.reshape(-1, shape[-1]).float().contiguous(),
                                           packed, True)
    return y.view(*shape[:-1], y.shape[-1])


class Int8Linear(nn.Linear):
    """An `nn.Linear` that computes with a packed int8 copy of its weight. ``weight`` and
    ``bias`` stay the float parameters (the state dict is unchanged); `repack` after changing
    them."""

    @classmethod
    def from_linear(cls, lin: nn.Linear) -> "Int8Linear":
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = lin.in_features, lin.out_features
        new.weight = lin.weight
        new.bias = lin.bias
        new.repack()
        return new

    def repack(self) -> None:
        self.__dict__["_packed"] = _pack(self.weight, self.bias)

    def to_linear(self) -> nn.Linear:
        lin = nn.Linear.__new__(nn.Linear)
        nn.Module.__init__(lin)
        lin.in_features, lin.out_features = self.in_features, self.out_features
        lin.weight, lin.bias = self.weight, self.bias
        return lin

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        return _linear(x, self.__dict__["_packed"]).to(x.dtype)


def _swap(module: nn.Module, to_int8: bool) -> int:
    """Swap `module`'s linear layers to `Int8Linear` (or back), those named in `FLOAT_MODULES`
    left alone; returns how many were swapped."""
    n = 0
    for name, child in list(module.named_children()):
        if name in FLOAT_MODULES:
            continue
        if to_int8 and type(child) is nn.Linear:
            setattr(module, name, Int8Linear.from_linear(child))
            n += 1
        elif not to_int8 and isinstance(child, Int8Linear):
            setattr(module, name, child.to_linear())
            n += 1
        else:
            n += _swap(child, to_int8)
    return n


def pack_int8(drafter: nn.Module) -> nn.Module:
    """Draft with int8 weights from now on: every linear layer of `drafter` but those in
    `FLOAT_MODULES`, and its head (the target head's rows at its draft vocabulary). CPU only; the drafter stays in eval use
    (its float parameters are untouched and still trainable, but the packed copies do not
    follow them: `unpack_int8` first).

    Raises
    ------
    ValueError
        If the drafter is not on the CPU.
    RuntimeError
        If this torch build has no int8 CPU engine.
    """
    dev = next(drafter.parameters()).device
    if dev.type != "cpu":
        raise ValueError(f"int8 drafting runs on the CPU; the drafter is on {dev}")
    if not int8_available():
        raise RuntimeError("int8 drafting needs torch's x86 / fbgemm quantized engine, which "
                           "this torch build lacks")
    unpack_int8(drafter)
    _swap(drafter, True)
    drafter.__dict__["_int8"] = True
    drafter.__dict__["_head_int8"] = None
    return drafter


def unpack_int8(drafter: nn.Module) -> nn.Module:
    """Back to the float weights (a no-op on a drafter that was never packed)."""
    _swap(drafter, False)
    drafter.__dict__["_int8"] = False
    drafter.__dict__["_head_int8"] = None
    return drafter


def int8_head(drafter: Any, head: Tensor, h: Tensor) -> Optional[Tensor]:
    """The head's logits with the packed int8 head, or None when `drafter` drafts in float.
    The packed head follows `head` (the drafter's current head rows): a new draft vocabulary or
    target head repacks it. Shape: head (Vd, H), h (..., H) -> (..., Vd) float32 (a 3-D h one
    row at a time, as `_linear`)."""
    if not drafter.__dict__.get("_int8"):
        return None
    try:
        version = head._version
    except RuntimeError:  # an inference-mode tensor: never modified in place
        version = -1
    key = (head.data_ptr(), tuple(head.shape), version)
    cached = drafter.__dict__.get("_head_int8")
    if cached is None or cached[0] != key:
        cached = (key, _pack(head, None))
        drafter.__dict__["_head_int8"] = cached
    return _linear(h, cached[1])
