"""The drafters as decoding needs them (docs/design.md section 4); training lives in
`specdiff_ext.training`, which imports this package and never the reverse.

- `DFlashConfig`, `DFlashDrafter`, `DFlashCache` (dflash.py): the DFlash-architecture
  block-diffusion drafter, reading the target's feature-layer states; layers.py holds its
  building blocks, config.py the field checks of every drafter config.
- `sample_block`, `DraftBlock` (sampler.py): T denoising steps through `ops.denoise_step`, with
  what `ops.verify` needs to stay exact.
- `save_dflash`, `load_drafter` (checkpoint.py): DFlash folders in the published layout
  (safetensors + JSON naming the target).
- ar.py: the ar-spec baseline drafter (a small causal LM).
"""

from .checkpoint import load_drafter, save_dflash
from .dflash import DFlashCache, DFlashConfig, DFlashDrafter
from .sampler import DraftBlock, sample_block

__all__ = [
    "DFlashConfig",
    "DFlashDrafter",
    "DFlashCache",
    "DraftBlock",
    "sample_block",
    "save_dflash",
    "load_drafter",
]
