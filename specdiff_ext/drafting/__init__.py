"""Where a round's candidates come from: the drafters' adapters to the decode loop's `Drafter`
protocol (`specdiff_ext.decoding`).

- `DiffusionDrafting` (`diffusion`): the DFlash block-diffusion drafter, T denoising steps per
  block.
- `ARDrafting` (`ar`): a small causal LM, one forward per draft.
- `PromptLookup` (`ngram`): n-grams of the text so far, no model.
- `TreeDrafting` (`tree`): draft trees, best-first over a block drafter's marginals plus an
  n-gram branch, verified in one forward (`ops.verify_tree`).
"""

from .ar import ARDrafter, ARDrafting
from .diffusion import MAX_STEPS, DiffusionDrafting, check_steps
from .ngram import PromptLookup, lookup_ngram
from .tree import TreeDrafting, best_first_tree, check_budget

__all__ = ["DiffusionDrafting", "ARDrafting", "ARDrafter", "PromptLookup", "lookup_ngram",
           "check_steps", "MAX_STEPS", "TreeDrafting", "best_first_tree", "check_budget"]
