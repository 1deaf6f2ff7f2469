"""The masked-diffusion drafter of speculative diffusion decoding (DESIGN section 4).

- `DrafterConfig`, `ContextMode` (config.py): shapes and options, torch-free.
- `DiffusionDrafter`, `DrafterCache` (model.py): transformer blocks over the target's frozen
  embedding and head, block-causal attention with a cached context.
- `sample_block`, `DraftBlock` (sampler.py): T denoising steps through `ops.denoise_step`, with
  what `ops.verify` needs to stay exact.
- `save_drafter`, `load_drafter` (checkpoint.py): safetensors + JSON naming the target.
- `read_sharegpt`, `generate_dataset`, `load_shards` (data.py): distillation prompts and the
  target's continuations as token shards with a manifest (resumable).
- `mdlm_loss`, `make_blocks`, `multi_block_hidden` (losses.py): the MDLM loss over many draft
  blocks per sequence in one forward pass.
- train.py: the training loop and CLI (``python -m specdiff_ext.drafter.train``); imported
  lazily, not re-exported here.
"""

from .checkpoint import load_drafter, save_drafter
from .config import ContextMode, DrafterConfig
from .data import generate_dataset, load_shards, read_sharegpt
from .losses import make_blocks, mdlm_loss, multi_block_hidden
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
    "read_sharegpt",
    "generate_dataset",
    "load_shards",
    "make_blocks",
    "mdlm_loss",
    "multi_block_hidden",
]
