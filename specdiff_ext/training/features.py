"""Target features for the drafter's target_features context mode (DESIGN section 4).

Convention (shared by training and `decoding.SpecDiffDecoder`): the drafter's context position t
holds the token x_t and the target's hidden states at position t - 1 (zeros at t = 0), taken
from the layers ``config.feature_layers`` and concatenated. Those are exactly what a
speculative round has: the verification pass computes hidden states at [last, x_1 .. x_n], which
become the features of the n + 1 tokens [x_1 .. x_n, correction] the round appends.

`compute_features` runs the target once over every training sequence and stores, per token, the
hidden states *at* that token (the shift is applied when batches are drawn), as one
(N_tokens, H_f) bfloat16 tensor aligned with `TokenData.tokens`.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor

__all__ = ["target_features", "compute_features", "load_features", "shifted_window_features",
           "features_file"]


def features_file(folder: Union[str, os.PathLike], layers: Sequence[int]) -> Path:
    """Where `compute_features` stores the features of `layers` for a dataset folder."""
    return Path(folder) / ("features_" + "_".join(str(int(i)) for i in layers) + ".safetensors")


@torch.no_grad()
def target_features(target: Any, seqs: torch.Tensor, attn: torch.Tensor,
                    layers: Sequence[int]) -> torch.Tensor:
    """The target's states of `layers` (TargetModel numbering) at every position, concatenated.

    Shape: seqs, attn (B, L) -> (B, L, len(layers) * H_t), in the target's dtype.
    """
    out = target.model.model(input_ids=seqs.to(target.device), attention_mask=attn.to(target.device),
                             output_hidden_states=True)
    return torch.cat([out.hidden_states[k] for k in layers], dim=-1)


@torch.inference_mode()
def compute_features(target: Any, data: Any, layers: Sequence[int], out: Union[str, os.PathLike],
                     batch_tokens: int = 4096, progress: bool = True,
                     dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """Target hidden states of `layers` (concatenated) at every token of `data`.

    Shape: returns (N_tokens, len(layers) * H) in `dtype`; also written to `out` (safetensors,
    key "features", with the layer list), atomically.
    """
    from safetensors.torch import save_file

    n = len(data)
    lens = (data.offsets[1:] - data.offsets[:-1]).tolist()
    order = sorted(range(n), key=lambda i: lens[i])
    H = target.hidden_size
    feats = torch.zeros(int(data.offsets[-1]), len(layers) * H, dtype=dtype)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=int(data.offsets[-1]), desc="features", unit="tok", dynamic_ncols=True)
    t0 = time.perf_counter()
    i = 0
    while i < n:
        L = lens[order[i]]
        j = i
        while j < n and (j - i + 1) * lens[order[j]] <= max(batch_tokens, lens[order[j]]):
            j += 1
        rows = order[i:j]
        L = max(lens[r] for r in rows)
        ids = torch.zeros(len(rows), L, dtype=torch.int64)
        att = torch.zeros(len(rows), L, dtype=torch.int64)
        for b, r in enumerate(rows):
            o0, o1 = int(data.offsets[r]), int(data.offsets[r + 1])
            ids[b, : o1 - o0] = data.tokens[o0:o1]
            att[b, : o1 - o0] = 1
        cat = target_features(target, ids, att, layers).to("cpu", dtype)  # (b, L, Hf)
        for b, r in enumerate(rows):
            o0, o1 = int(data.offsets[r]), int(data.offsets[r + 1])
            feats[o0:o1] = cat[b, : o1 - o0]
        if bar is not None:
            bar.update(int(att.sum()))
        i = j
    if bar is not None:
        bar.close()
    out = Path(out)
    tmp = out.with_suffix(".tmp")
    save_file({"features": feats}, str(tmp),
              metadata={"layers": ",".join(str(int(k)) for k in layers), "target": target.name,
                        "seconds": f"{time.perf_counter() - t0:.1f}"})
    os.replace(tmp, out)
    return feats


def load_features(path: Union[str, os.PathLike], layers: Optional[Sequence[int]] = None) -> Tensor:
    """Features written by `compute_features` (checked against `layers` when given)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as fh:
        meta = fh.metadata() or {}
        if layers is not None and meta.get("layers") != ",".join(str(int(k)) for k in layers):
            raise ValueError(f"{path} holds features of layers {meta.get('layers')}, "
                             f"not {list(layers)}")
        return fh.get_tensor("features")


def shifted_window_features(feats: Tensor, data: Any, idx: Sequence[int], starts: Sequence[int],
                            L: int) -> Tensor:
    """Context features of the windows a batch drew: position j of row b gets the features of
    the token before it (zeros for a sequence's first token, and past the row's end).

    Shape: returns (B, L, H_f) float32.
    """
    B = len(idx)
    out = torch.zeros(B, L, feats.shape[1], dtype=torch.float32)
    for b, (i, s) in enumerate(zip(idx, starts)):
        o0, o1 = int(data.offsets[i]), int(data.offsets[i + 1])
        n = min(L, o1 - o0 - s)
        lo = o0 + s - 1  # the token before the window's first
        if lo >= o0:
            out[b, :n] = feats[lo: lo + n].float()
        else:
            out[b, 1:n] = feats[o0: o0 + n - 1].float()
    return out
