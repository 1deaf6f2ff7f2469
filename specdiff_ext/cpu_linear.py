"""The target's linear layers on CPUs through the extension's float32 kernel.

A verification forward runs every linear layer of the target on a few rows (the nodes of a
draft tree), where the time goes to reading the weights. ``_C.linear_f32`` reads each weight
once per tile of 6 rows from a packed copy (panels of 16 output columns, K-major), so a forward
over 16 rows costs little more than one over a single row; some BLAS builds pay for each row
again (``docs/design.md``, "The target's linear layers on CPUs").

Each output is accumulated by fused multiply-adds in a fixed order whatever the other rows, so
a row's logits are the same bits alone, in a tree, or in a batch: greedy speculative decoding
then reproduces plain decoding exactly in float32.

>>> import torch
>>> lin = torch.nn.Linear(64, 40, bias=False)
>>> packed = PackedLinear(lin)
>>> x = torch.randn(3, 64)
>>> torch.allclose(packed(x), lin(x), atol=1e-5)
True
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["PackedLinear", "pack_weight", "available", "pack_model", "unpack_model",
           "is_packed", "can_pack"]

PANEL = 16  # output columns per panel (csrc/cpu/linear.cpp)


def available() -> bool:
    """Whether the extension with ``linear_f32`` is importable."""
    try:
        from . import _C
    except ImportError:
        return False
    return hasattr(_C, "_linear_f32_np")


_KERNEL: Any = None


def _kernel() -> Any:
    global _KERNEL
    if _KERNEL is None:
        from . import _C

        _KERNEL = _C._linear_f32_np
    return _KERNEL


def pack_weight(weight: Tensor) -> Tensor:
    """(N, K) float32 weight -> (ceil(N / 16), K, 16) panels, zero-padded: ``w[p, k, j] =
    weight[16 p + j, k]``."""
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (N, K), got shape {tuple(weight.shape)}")
    w = weight.detach().to(device="cpu", dtype=torch.float32)
    n, k = w.shape
    p = (n + PANEL - 1) // PANEL
    if p * PANEL != n:
        w = torch.cat([w, w.new_zeros(p * PANEL - n, k)])
    return w.view(p, PANEL, k).transpose(1, 2).contiguous()


class PackedLinear(torch.nn.Module):
    """A drop-in for an ``nn.Linear`` whose float32 CPU calls run ``_C.linear_f32``.

    It shares the layer's ``weight`` and ``bias`` parameters (so ties, ``state_dict`` and the
    drafter's use of the head are unchanged) and keeps a packed copy beside them, rebuilt if
    the weight is changed in place. Calls it cannot serve (another device or dtype, autograd)
    go to ``F.linear``.
    """

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        if not isinstance(linear, torch.nn.Linear):
            raise TypeError(f"linear must be a torch.nn.Linear, got {type(linear).__name__}")
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self._packed: Optional[Tensor] = None
        self._packed_np: Any = None  # a numpy view of _packed (the kernel's cheap front end)
        self._packed_version = -1
        self.enabled = True  # False: torch's path (calibrate times both on one model)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, kernel=linear_f32")

    def _weight_version(self) -> int:
        try:
            return self._parameters["weight"]._version
        except RuntimeError:  # an inference tensor keeps no version: it cannot change in place
            return 0

    def packed(self) -> Tensor:
        """The packed weight, (re)built when the weight changed since the last call."""
        v = self._weight_version()
        if self._packed is None or self._packed_version != v:
            self._packed = pack_weight(self.weight)
            self._packed_np = self._packed.numpy()
            self._packed_version = v
        return self._packed

    def _serves(self, x: Tensor) -> bool:
        if not self.enabled:
            return False
        w = self._parameters["weight"]  # not through Module.__getattr__ (about 2 us)
        if x.dtype is not torch.float32 or w.dtype is not torch.float32:
            return False
        if not (x.is_cpu and w.is_cpu) or x.shape[-1] != self.in_features:
            return False
        return not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))

    def forward(self, x: Tensor) -> Tensor:
        # The kernel itself takes about 1.2 us to call, while a torch call around it costs 2-5
        # us on a slow core and a target forward makes over 200 of these calls: this path
        # keeps to numpy where it can (43 -> 16 us a call on the AMD EPYC development machine).
        if not self._serves(x):
            return F.linear(x, self.weight, self.bias)
        shape = x.shape
        xn = (x.detach() if x.requires_grad else x).numpy().reshape(-1, self.in_features)
        if not xn.flags.c_contiguous:
            xn = np.ascontiguousarray(xn)
        out = np.empty(tuple(shape[:-1]) + (self.out_features,), dtype=np.float32)
        self.packed()
        _kernel()(xn, self._packed_np, out.reshape(xn.shape[0], self.out_features),
                  torch.get_num_threads())
        res = torch.from_numpy(out)  # (from_numpy of a reshaped view costs about 10 us more)
        if self.bias is not None:
            res += self.bias
        return res


def pack_model(model: torch.nn.Module) -> int:
    """Swap every ``nn.Linear`` of `model` for a :class:`PackedLinear` sharing its parameters;
    returns how many were swapped (0 when the extension lacks the kernel)."""
    if not available():
        return 0
    n = 0
    for mod in list(model.modules()):
        for name, child in list(mod.named_children()):
            if type(child) is torch.nn.Linear:
                setattr(mod, name, PackedLinear(child))
                n += 1
    return n


def unpack_model(model: torch.nn.Module) -> int:
    """Undo :func:`pack_model`: plain ``nn.Linear`` layers with the same parameters."""
    n = 0
    for mod in list(model.modules()):
        for name, child in list(mod.named_children()):
            if isinstance(child, PackedLinear):
                lin = torch.nn.Linear(child.in_features, child.out_features,
                                      bias=child.bias is not None, device="meta")
                lin.weight = child.weight
                lin.bias = child.bias
                setattr(mod, name, lin)
                n += 1
    return n


def can_pack(target: Any) -> bool:
    """Whether the kernel can serve `target` (a `TargetModel`): float32 on the CPU, and an
    extension built with it."""
    return target.device.type == "cpu" and target.dtype == torch.float32 and available()


def is_packed(model: torch.nn.Module) -> bool:
    """Whether any layer of `model` runs through :class:`PackedLinear`."""
    return any(isinstance(m, PackedLinear) for m in model.modules())
