"""The masked-diffusion drafter of speculative diffusion decoding (DESIGN section 4).

- `DrafterConfig`, `ContextMode` (config.py): shapes and options, torch-free.
- `DiffusionDrafter`, `DrafterCache` (model.py): transformer blocks over the target's frozen
  embedding and head, block-causal attention with a cached context.
- `sample_block`, `DraftBlock` (sampler.py): T denoising steps through `ops.denoise_step`, with
  what `ops.verify` needs to stay exact.
- `save_drafter`, `load_drafter` (checkpoint.py): safetensors + JSON naming the target.
"""

from .checkpoint import load_drafter, save_drafter
from .config import ContextMode, DrafterConfig
from .model import DiffusionDrafter, DrafterCache
from .sampler import DraftBlock, sample_block

__all__ = [
    "ContextMode",
    "DrafterConfig",
    "DiffusionDrafter",
    "DrafterCache",
    "DraftBlock",
    "sample_block",
    "save_drafter",
    "load_drafter",
]
