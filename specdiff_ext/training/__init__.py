"""Distillation of drafters (imports `specdiff_ext.drafter`; never imported by it).

- data.py: ShareGPT prompts (held-out split) and the target's continuations as resumable token
  shards (``specdiff make-data``).
- train.py, losses.py, features.py: the tokens-context masked-diffusion drafter's and the
  ar-spec drafter's trainer (``specdiff train-drafter``), and `evaluate_acceptance`, the
  acceptance eval both trainers run.

- dflash.py: the DFlash drafter's recipe (``specdiff train-dflash``): the target's feature-layer
  states computed per batch in the decode dtype, every anchor of a sequence in one pass, fully
  masked blocks, position weights exp(-(k-1)/g), resumable, with the acceptance eval.
"""
