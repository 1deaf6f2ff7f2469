"""Distillation of drafters (imports `specdiff_ext.drafter`; never imported by it).

- dflash.py: the DFlash drafter's recipe (``specdiff train-dflash``): the target's feature-layer
  states computed per batch in the decode dtype, every anchor of a sequence in one pass, fully
  masked blocks, position weights exp(-(k-1)/g), resumable, with the acceptance eval.
"""
