"""The drafters as decoding needs them (docs/design.md section 4); training lives in
`specdiff_ext.training`, which imports this package and never the reverse.

- `DFlashConfig`, `DFlashDrafter`, `DFlashCache` (dflash.py): the DFlash-architecture
  block-diffusion drafter (the default), reading the target's feature-layer states.
- `DrafterConfig`, `ContextMode` (config.py), `DiffusionDrafter`, `DrafterCache` (model.py): the
  earlier tokens-context masked-diffusion drafter.
- `sample_block`, `DraftBlock` (sampler.py): T denoising steps through `ops.denoise_step`, with
  what `ops.verify` needs to stay exact (either drafter).
- `save_drafter`, `save_dflash`, `load_drafter` (checkpoint.py): safetensors + JSON naming the
  target; DFlash folders in the published layout.
- ar.py: the ar-spec baseline drafter (a small causal LM).
"""

from .checkpoint import load_drafter, save_dflash, save_drafter
from .config import ContextMode, DrafterConfig
from .dflash import DFlashCache, DFlashConfig, DFlashDrafter
from .model import DiffusionDrafter, DrafterCache
from .sampler import DraftBlock, sample_block

__all__ = [
    "ContextMode",
    "DrafterConfig",
    "DiffusionDrafter",
    "DrafterCache",
    "DFlashConfig",
    "DFlashDrafter",
    "DFlashCache",
    "DraftBlock",
    "sample_block",
    "save_drafter",
    "save_dflash",
    "load_drafter",
]
