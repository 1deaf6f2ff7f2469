"""Target features for the drafter's target_features context mode (docs/design.md section 4).

Convention (shared by training and `decoding.SpecDiffDecoder`): the drafter's context position t
holds the token x_t and the target's hidden states at position t - 1 (zeros at t = 0), taken
from the layers ``config.feature_layers`` and concatenated. Those are exactly what a
speculative round has: the verification pass computes hidden states at [last, x_1 .. x_n], which
become the features of the n + 1 tokens [x_1 .. x_n, correction] the round appends.

`compute_features` runs the target once over every training sequence and stores, per token, the
hidden states *at* that token (the shift is applied when batches are drawn), as one
(N_tokens, H_f) bfloat16 tensor aligned with `TokenData.tokens`.

`FeatureCache` and `window_features` serve the DFlash trainer (``specdiff train-dflash
--feature-cache``). The target's states at a position are those of the *whole sequence* before
it: a training window that starts at s > 0 reads the states the target computes over tokens
0 .. s + j, not a forward restarted at the window's start. That is what decoding sees (the
verification pass runs over the whole text, prompt included), so it is the correct feature for
drafting; it also makes every window a slice of one per-sequence tensor, so a sequence's
features are computed once and reused by every window and epoch. (The trainer before the cache
restarted the target at the window start; the two agree whenever the window starts at 0, which is
every window of the shared distillation data at the default ``--max-len 384``: no sequence there
is longer.)
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor

__all__ = ["target_features", "compute_features", "load_features", "shifted_window_features",
           "features_file", "FeatureCache", "window_features", "feature_bytes"]


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


# ------------------------------------------------------------------------------ DFlash trainer

def _rows(data: Any, idx: Sequence[int], ends: Optional[Sequence[int]] = None) -> tuple:
    """Sequences idx[b] of `data` (their first ends[b] tokens; all when None), right-padded.

    Shape: returns ids, attn (B, L) int64.
    """
    spans = []
    for b, i in enumerate(idx):
        o0, o1 = int(data.offsets[i]), int(data.offsets[i + 1])
        spans.append((o0, o1 if ends is None else min(o1, o0 + int(ends[b]))))
    L = max(o1 - o0 for o0, o1 in spans)
    ids = torch.zeros(len(spans), L, dtype=torch.int64)
    att = torch.zeros(len(spans), L, dtype=torch.int64)
    for b, (o0, o1) in enumerate(spans):
        ids[b, : o1 - o0], att[b, : o1 - o0] = data.tokens[o0:o1], 1
    return ids, att


def window_features(target: Any, data: Any, idx: Sequence[int], starts: Sequence[int], L: int,
                    layers: Sequence[int], cache: Optional["FeatureCache"] = None) -> Tensor:
    """The target's states of `layers` at every position of the windows a batch drew.

    Row b is the window of sequence idx[b] that starts at token starts[b] (up to L tokens):
    position j holds the states at token starts[b] + j computed over the sequence from its first
    token (module docstring), zeros past the sequence's end. With a `cache` the states come
    from it (computed there on first use); without, the target runs over each sequence up to its
    window's end.

    Shape: returns (B, L, len(layers) * H_t) in the target's dtype (the cache's).
    """
    if cache is not None:
        return cache.windows(target, idx, starts, L)
    ends = [int(s) + L for s in starts]
    ids, att = _rows(data, idx, ends)
    full = target_features(target, ids, att, layers)  # (B, L', Hf)
    out = full.new_zeros((len(idx), L, full.shape[-1]))
    for b, s in enumerate(starts):
        n = max(0, min(L, int(att[b].sum()) - int(s)))
        out[b, :n] = full[b, int(s): int(s) + n]
    return out


def feature_bytes(data: Any, width: int, dtype: torch.dtype) -> int:
    """Bytes of the features of every token of `data` (`width` states of `dtype` per token)."""
    return int(data.offsets[-1]) * int(width) * torch.empty((), dtype=dtype).element_size()


_INT_OF_SIZE = {1: "uint8", 2: "int16", 4: "int32", 8: "int64"}


class FeatureCache:
    """The target's feature-layer states of every token of a dataset, each sequence computed once
    (on first use) over the whole sequence and kept, so that every window of it is a slice.

    Parameters
    ----------
    data : TokenData
    layers : sequence of int
        Target layers (TargetModel numbering), concatenated.
    width : int
        len(layers) * the target's hidden size.
    dtype : torch.dtype
        The states' dtype: the target's decode dtype (bfloat16 on CPU), kept as computed.
    folder : path, optional
        None: in memory (pages are only taken as sequences are filled). A folder: numpy memmaps
        on disk under ``folder/<key>/`` (``features.bin``, ``filled.bin``, ``meta.json``), the
        key a digest of the target name, the layers, the dtype and the tokens; a later run over
        the same data and target (a ``--resume``, or a fresh run) reuses every sequence filled
        before. One writer at a time.
    target_name : str
        Recorded in the key and the meta file.

    Attributes
    ----------
    filled : bool tensor (N_seq,)
        Sequences whose states are stored.
    computed, hits : int
        Sequences computed by this object, and windows served from stored states.
    """

    def __init__(self, data: Any, layers: Sequence[int], width: int, dtype: torch.dtype,
                 folder: Union[str, os.PathLike, None] = None, target_name: str = "") -> None:
        self.data, self.layers = data, [int(k) for k in layers]
        self.width, self.dtype = int(width), dtype
        n_tok, n_seq = int(data.offsets[-1]), len(data)
        self.computed = self.hits = 0
        self.path: Optional[Path] = None
        self._mm: list = []
        if folder is None:
            self.feats = torch.empty(n_tok, self.width, dtype=dtype)
            self.filled = torch.zeros(n_seq, dtype=torch.bool)
            return
        import numpy as np

        h = hashlib.sha1()
        h.update(json.dumps([target_name, self.layers, self.width, str(dtype)]).encode())
        h.update(data.tokens.numpy().tobytes())
        h.update(data.offsets.numpy().tobytes())
        key = h.hexdigest()[:16]
        self.path = Path(folder) / key
        self.path.mkdir(parents=True, exist_ok=True)
        meta = {"target": target_name, "layers": self.layers, "width": self.width,
                "dtype": str(dtype).replace("torch.", ""), "tokens": n_tok, "sequences": n_seq}
        mfile = self.path / "meta.json"
        fresh = not (mfile.is_file() and (self.path / "features.bin").is_file()
                     and (self.path / "filled.bin").is_file())
        if not fresh and json.loads(mfile.read_text()) != meta:
            raise ValueError(f"{self.path}: a feature cache of other settings ({mfile})")
        esize = torch.empty((), dtype=dtype).element_size()
        mode = "w+" if fresh else "r+"
        fm = np.memmap(self.path / "features.bin", dtype=_INT_OF_SIZE[esize], mode=mode,
                       shape=(n_tok, self.width))
        flags = np.memmap(self.path / "filled.bin", dtype="uint8", mode=mode, shape=(n_seq,))
        if fresh:
            tmp = mfile.with_suffix(".tmp")
            tmp.write_text(json.dumps(meta))
            os.replace(tmp, mfile)
        self._mm = [fm, flags]
        self.feats = torch.from_numpy(fm).view(dtype)  # shares the mapping: writes go through
        self.filled = torch.from_numpy(flags).view(torch.bool)

    @property
    def nbytes(self) -> int:
        return self.feats.numel() * self.feats.element_size()

    @torch.no_grad()
    def fill(self, target: Any, idx: Sequence[int]) -> int:
        """Compute and store the sequences of `idx` not stored yet (one target forward over
        them, each whole). Returns how many were computed."""
        todo = sorted({int(i) for i in idx if not bool(self.filled[int(i)])})
        if not todo:
            return 0
        ids, att = _rows(self.data, todo)
        full = target_features(target, ids, att, self.layers).to("cpu", self.dtype)
        for b, i in enumerate(todo):
            o0, o1 = int(self.data.offsets[i]), int(self.data.offsets[i + 1])
            self.feats[o0:o1] = full[b, : o1 - o0]
        self.filled[todo] = True
        self.computed += len(todo)
        return len(todo)

    def windows(self, target: Any, idx: Sequence[int], starts: Sequence[int], L: int) -> Tensor:
        """`window_features` of a batch, the missing sequences computed first.

        Shape: returns (B, L, width) in `dtype`, on the target's device.
        """
        new = self.fill(target, idx)
        self.hits += len(idx) - new
        out = torch.zeros(len(idx), L, self.width, dtype=self.dtype)
        for b, (i, s) in enumerate(zip(idx, starts)):
            o0, o1 = int(self.data.offsets[int(i)]), int(self.data.offsets[int(i) + 1])
            n = max(0, min(L, o1 - o0 - int(s)))
            out[b, :n] = self.feats[o0 + int(s): o0 + int(s) + n]
        return out.to(target.device)

    def flush(self) -> None:
        """Write a disk cache's pages out, the states before the flags that vouch for them (a
        no-op in memory). A killed process loses nothing (the pages are the kernel's); this
        guards against a machine crash, at every checkpoint."""
        for m in self._mm:
            m.flush()
