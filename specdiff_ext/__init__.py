"""specdiff_ext: exact speculative diffusion decoding.

Kernels (CPU and CUDA) for batched denoising-step sampling, verification logit gathering and
chain rejection sampling, exposed as torch custom ops in :mod:`specdiff_ext.ops`, with a
pure-torch twin in :mod:`specdiff_ext.reference`.
"""

try:
    from . import _C
except ImportError as _exc:  # the source tree, without a compiled core beside it
    import os as _os

    _here = _os.path.dirname(_os.path.abspath(__file__))
    raise ImportError(
        f"specdiff_ext's compiled core (_C) is not in {_here}: this is the source tree, which "
        "shadows the installed package when Python runs from the repository root. Run from "
        "another folder, or build in place with `pip install -e .` (an editable install puts _C "
        "here)."
    ) from _exc
from .types import CommitMode, DenoiseResult, GatherResult, TreeVerifyResult, VerifyResult

__version__ = _C.build_info()["version"]


def build_info() -> dict:
    """What this build holds.

    Returns
    -------
    dict
        ``version`` (str), ``cuda`` (bool: CUDA kernels compiled in), ``cuda_archs``
        (list of int, e.g. [80, 90]), ``cuda_available`` (bool: a usable GPU now),
        ``cuda_device_count`` (int), ``openmp`` (bool).

    Examples
    --------
    >>> import specdiff_ext
    >>> sorted(specdiff_ext.build_info())[:3]
    ['cuda', 'cuda_archs', 'cuda_available']
    """
    return dict(_C.build_info())


from . import ops  # noqa: E402  (needs _C)
from .ops import point_mass_mask  # noqa: E402

__all__ = [
    "build_info",
    "ops",
    "point_mass_mask",
    "CommitMode",
    "DenoiseResult",
    "GatherResult",
    "VerifyResult",
    "TreeVerifyResult",
    "__version__",
]
