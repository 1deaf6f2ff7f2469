"""Distillation of drafters (imports `specdiff_ext.drafter`; never imported by it).

- data.py: ShareGPT prompts (held-out split) and the target's continuations as resumable token
  shards (``specdiff make-data``).
- dflash.py: the DFlash drafter's recipe (``specdiff train-dflash``): the target's feature-layer
  states computed per batch in the decode dtype (or kept once computed, features.py), every
  anchor of a sequence in one pass, fully masked blocks, position weights exp(-(k-1)/g),
  resumable, with the acceptance eval.
- train.py: the ar-spec baseline drafter's trainer (``specdiff train-drafter``): next-token
  loss on the same data, resumable, with its acceptance eval.
"""
