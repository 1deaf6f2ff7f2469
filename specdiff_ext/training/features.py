"""The target's feature-layer states for the DFlash trainer (``specdiff train-dflash``,
``--feature-cache``; docs/design.md section 4).

The target's states at a position are those of the *whole sequence* before it: a training window
that starts at s > 0 reads the states the target computes over tokens 0 .. s + j, not a forward
restarted at the window's start. That is what decoding sees (the verification pass runs over the
whole text, prompt included), so it is the correct feature for drafting; it also makes every
window a slice of one per-sequence tensor, so that `FeatureCache` computes a sequence's features
once and reuses them for every window and epoch. (The trainer before the cache restarted the
target at the window start; the two agree whenever the window starts at 0, which is every window
of the shared distillation data at the default ``--max-len 384``: no sequence there is longer.)

- `target_features`: the states of some target layers at every position, concatenated;
- `target_states`: those, and the target's top-k next-token log-probabilities at every position
  (the soft labels of ``train-dflash --kl-weight``), from one forward;
- `window_features` / `window_targets`: those of the windows a batch drew (from a
  `FeatureCache`, or computed);
- `FeatureCache`: every sequence's states (and soft labels), computed on first use, in memory or
  on disk;
- `feature_bytes`: what caching a dataset's states takes.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor

__all__ = ["target_features", "target_states", "FeatureCache", "window_features",
           "window_targets", "feature_bytes"]


@torch.no_grad()
def target_features(target: Any, seqs: torch.Tensor, attn: torch.Tensor,
                    layers: Sequence[int]) -> torch.Tensor:
    """The target's states of `layers` (TargetModel numbering) at every position, concatenated.

    Shape: seqs, attn (B, L) -> (B, L, len(layers) * H_t), in the target's dtype.
    """
    return target_states(target, seqs, attn, layers)[0]


@torch.no_grad()
def target_states(target: Any, seqs: torch.Tensor, attn: torch.Tensor, layers: Sequence[int],
                  soft_topk: int = 0, chunk: int = 256) -> tuple:
    """`target_features`, and with ``soft_topk = k > 0`` the target's k most likely next tokens
    at every position with their log-probabilities (temperature 1, over the whole vocabulary:
    the soft labels of the KL term), from the same forward.

    Shape: seqs, attn (B, L) -> feats (B, L, len(layers) * H_t) in the target's dtype; ids
    (B, L, k) int32 and logp (B, L, k) float32, or None, None when k = 0. The head runs in row
    chunks of `chunk` positions (its (rows, V) logits are the only large temporary).
    """
    out = target.model.model(input_ids=seqs.to(target.device), attention_mask=attn.to(target.device),
                             output_hidden_states=True)
    feats = torch.cat([out.hidden_states[k] for k in layers], dim=-1)
    if soft_topk <= 0:
        return feats, None, None
    last = out.last_hidden_state  # after the final norm: the head's input
    B, L, H = last.shape
    flat = last.reshape(B * L, H)
    head = target.lm_head_weight
    ids = torch.empty(B * L, soft_topk, dtype=torch.int32, device=last.device)
    logp = torch.empty(B * L, soft_topk, dtype=torch.float32, device=last.device)
    for i in range(0, B * L, chunk):
        lg = torch.nn.functional.linear(flat[i:i + chunk], head).float()
        v, j = lg.log_softmax(-1).topk(soft_topk, dim=-1)
        ids[i:i + chunk], logp[i:i + chunk] = j.to(torch.int32), v
    return feats, ids.view(B, L, soft_topk), logp.view(B, L, soft_topk)


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
    return window_targets(target, data, idx, starts, L, layers, cache)[0]


def window_targets(target: Any, data: Any, idx: Sequence[int], starts: Sequence[int], L: int,
                   layers: Sequence[int], cache: Optional["FeatureCache"] = None,
                   soft_topk: int = 0) -> tuple:
    """`window_features`, and with ``soft_topk > 0`` the windows' soft labels (`target_states`;
    a `cache` must store them: built with that `soft_topk`).

    Shape: returns feats (B, L, width); ids (B, L, k) int64 (-1 past a sequence's end) and logp
    (B, L, k) float32, or None, None.
    """
    if cache is not None:
        if soft_topk and cache.soft_topk != soft_topk:
            raise ValueError(f"soft_topk {soft_topk}: the feature cache stores "
                             f"{cache.soft_topk or 'no'} soft labels per position")
        feats = cache.windows(target, idx, starts, L)
        if not soft_topk:
            return feats, None, None
        return (feats, *cache.soft_windows(idx, starts, L, target.device))
    ends = [int(s) + L for s in starts]
    ids, att = _rows(data, idx, ends)
    full, sid, slp = target_states(target, ids, att, layers, soft_topk)  # (B, L', Hf)
    out = full.new_zeros((len(idx), L, full.shape[-1]))
    oid = olp = None
    if soft_topk:
        oid = torch.full((len(idx), L, soft_topk), -1, dtype=torch.int64, device=full.device)
        olp = torch.full((len(idx), L, soft_topk), float("-inf"), device=full.device)
    for b, s in enumerate(starts):
        n = max(0, min(L, int(att[b].sum()) - int(s)))
        out[b, :n] = full[b, int(s): int(s) + n]
        if soft_topk:
            oid[b, :n], olp[b, :n] = sid[b, int(s): int(s) + n], slp[b, int(s): int(s) + n]
    return out, oid, olp


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
    soft_topk : int
        With k > 0 the cache also keeps the target's top-k next-token ids and log-probabilities
        at every token (`target_states`; ``soft_ids.bin`` / ``soft_logp.bin`` on disk, k in the
        key), from the same forward.

    Attributes
    ----------
    filled : bool tensor (N_seq,)
        Sequences whose states are stored.
    computed, hits : int
        Sequences computed by this object, and windows served from stored states.
    """

    def __init__(self, data: Any, layers: Sequence[int], width: int, dtype: torch.dtype,
                 folder: Union[str, os.PathLike, None] = None, target_name: str = "",
                 soft_topk: int = 0) -> None:
        self.data, self.layers = data, [int(k) for k in layers]
        self.width, self.dtype = int(width), dtype
        if int(soft_topk) < 0:
            raise ValueError(f"soft_topk must be >= 0, got {soft_topk}")
        self.soft_topk = k = int(soft_topk)
        n_tok, n_seq = int(data.offsets[-1]), len(data)
        self.computed = self.hits = 0
        self.path: Optional[Path] = None
        self._mm: list = []
        self.soft_ids: Optional[Tensor] = None
        self.soft_logp: Optional[Tensor] = None
        if folder is None:
            self.feats = torch.empty(n_tok, self.width, dtype=dtype)
            self.filled = torch.zeros(n_seq, dtype=torch.bool)
            if k:
                self.soft_ids = torch.empty(n_tok, k, dtype=torch.int32)
                self.soft_logp = torch.empty(n_tok, k, dtype=torch.float32)
            return
        import numpy as np

        h = hashlib.sha1()
        h.update(json.dumps([target_name, self.layers, self.width, str(dtype)]
                            + ([k] if k else [])).encode())
        h.update(data.tokens.numpy().tobytes())
        h.update(data.offsets.numpy().tobytes())
        key = h.hexdigest()[:16]
        self.path = Path(folder) / key
        self.path.mkdir(parents=True, exist_ok=True)
        meta = {"target": target_name, "layers": self.layers, "width": self.width,
                "dtype": str(dtype).replace("torch.", ""), "tokens": n_tok, "sequences": n_seq}
        if k:
            meta["soft_topk"] = k
        mfile = self.path / "meta.json"
        files = ["features.bin", "filled.bin"] + (["soft_ids.bin", "soft_logp.bin"] if k else [])
        fresh = not (mfile.is_file() and all((self.path / f).is_file() for f in files))
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
        if k:
            si = np.memmap(self.path / "soft_ids.bin", dtype="int32", mode=mode, shape=(n_tok, k))
            sl = np.memmap(self.path / "soft_logp.bin", dtype="float32", mode=mode,
                           shape=(n_tok, k))
            self._mm[1:1] = [si, sl]  # flushed before the flags
            self.soft_ids, self.soft_logp = torch.from_numpy(si), torch.from_numpy(sl)

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
        full, sid, slp = target_states(target, ids, att, self.layers, self.soft_topk)
        full = full.to("cpu", self.dtype)
        for b, i in enumerate(todo):
            o0, o1 = int(self.data.offsets[i]), int(self.data.offsets[i + 1])
            self.feats[o0:o1] = full[b, : o1 - o0]
            if self.soft_topk:
                self.soft_ids[o0:o1] = sid[b, : o1 - o0].cpu()
                self.soft_logp[o0:o1] = slp[b, : o1 - o0].cpu()
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
        for b, lo, n in self._spans(idx, starts, L):
            out[b, :n] = self.feats[lo: lo + n]
        return out.to(target.device)

    def _spans(self, idx: Sequence[int], starts: Sequence[int], L: int) -> list:
        """(row, first stored token, tokens) of each window: sequence idx[b] from its token
        starts[b], at most L tokens, none past the sequence's end."""
        spans = []
        for b, (i, s) in enumerate(zip(idx, starts)):
            o0, o1 = int(self.data.offsets[int(i)]), int(self.data.offsets[int(i) + 1])
            spans.append((b, o0 + int(s), max(0, min(L, o1 - o0 - int(s)))))
        return spans

    def soft_windows(self, idx: Sequence[int], starts: Sequence[int], L: int,
                     device: Any = "cpu") -> tuple:
        """The soft labels of windows already filled (`windows` first).

        Shape: returns ids (B, L, k) int64 (-1 past a sequence's end) and logp (B, L, k)
        float32 (-inf there), on `device`.
        """
        if not self.soft_topk:
            raise ValueError("this feature cache stores no soft labels (soft_topk = 0)")
        k = self.soft_topk
        ids = torch.full((len(idx), L, k), -1, dtype=torch.int64)
        logp = torch.full((len(idx), L, k), float("-inf"))
        missing = [int(i) for i in idx if not bool(self.filled[int(i)])]
        if missing:
            raise ValueError(f"sequences {missing} are not in the feature cache yet")
        for b, lo, n in self._spans(idx, starts, L):
            ids[b, :n] = self.soft_ids[lo: lo + n].long()
            logp[b, :n] = self.soft_logp[lo: lo + n]
        return ids.to(device), logp.to(device)

    def flush(self) -> None:
        """Write a disk cache's pages out, the states before the flags that vouch for them (a
        no-op in memory). A killed process loses nothing (the pages are the kernel's); this
        guards against a machine crash, at every checkpoint."""
        for m in self._mm:
            m.flush()
