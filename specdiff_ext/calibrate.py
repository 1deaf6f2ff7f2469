"""The draft tree budget, chosen on the machine at hand (docs/design.md, section 5).

What a node budget buys is a property of the drafter (how many drafts a tree of b nodes
accepts per round on held-out prompts: measured once per checkpoint, stored beside it as
``tree_acceptance.json``); what it costs is a property of the machine (one target forward over
b + 1 nodes, against one over a single token: on a CPU with bf16 matrix units 32 nodes cost
1.3x one, in float32 without them 3.6x). `choose_budget` joins the two: the budget of most
tokens per second, (1 + accepted(b)) / (forward(b + 1) + drafting), with the costs timed here
by `measure_costs` at the batch size the decoder runs.

`SpecDiffDecoder` does this on its first call when its budget is left at the default and its
drafter carries a table; without a table it keeps `DEFAULTS.tree_budget`.

The other choices `load_pair` makes by timing live here too: `prefer_int8` (the drafter's
weights) and `prefer_packed` (the target's linear layers through `_C.linear_f32`).
"""

from __future__ import annotations

import json
import math
import os
import time
import weakref
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import torch

__all__ = ["TREE_ACCEPTANCE_NAME", "read_tree_acceptance", "write_tree_acceptance",
           "tree_acceptance_table", "nearest_temperature", "acceptance_at", "measure_costs", "choose_budget",
           "calibrated_budget", "chain_forward", "prefer_int8", "packed_forward_seconds",
           "prefer_packed"]

TREE_ACCEPTANCE_NAME = "tree_acceptance.json"
MAX_TABLE_BUDGET = 1024

# target model -> {(batch, threads, budgets, context): measured costs}; weak, so that a freed
# model's costs go with it (an id could be reused by another model)
_COSTS: "weakref.WeakKeyDictionary[Any, Dict[tuple, dict]]" = weakref.WeakKeyDictionary()


def _check_table(table: Any, where: str) -> Dict[float, Dict[int, float]]:
    """{temperature: {budget: accepted drafts per round}}, checked."""
    if not isinstance(table, Mapping) or not table:
        raise ValueError(f"{where}: 'accepted_per_round' must be a non-empty object of "
                         f"temperature -> {{budget: accepted per round}}")
    out: Dict[float, Dict[int, float]] = {}
    for t, row in table.items():
        try:
            tau = float(t)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: temperature {t!r} is not a number") from None
        if not math.isfinite(tau) or tau < 0:
            raise ValueError(f"{where}: temperature {t!r} must be finite and >= 0")
        if not isinstance(row, Mapping) or not row:
            raise ValueError(f"{where}: temperature {t}: expected a non-empty object of "
                             f"budget -> accepted per round")
        out[tau] = {}
        for b, a in row.items():
            try:
                bi = int(b)
            except (TypeError, ValueError):
                raise ValueError(f"{where}: temperature {t}: budget {b!r} is not an int") from None
            if not 1 <= bi <= MAX_TABLE_BUDGET or str(bi) != str(b).strip():
                raise ValueError(f"{where}: temperature {t}: budget {b!r} must be an int in "
                                 f"[1, {MAX_TABLE_BUDGET}]")
            if isinstance(a, bool) or not isinstance(a, (int, float)) or not \
                    math.isfinite(a) or a < 0:
                raise ValueError(f"{where}: temperature {t}: budget {b}: accepted per round "
                                 f"must be a finite number >= 0, got {a!r}")
            out[tau][bi] = float(a)
    return out


def read_tree_acceptance(folder: Union[str, os.PathLike]) -> Optional[Dict[float, Dict[int, float]]]:
    """The measured acceptance table in a drafter folder, or None when it has none.

    Format (``tree_acceptance.json``): ``{"accepted_per_round": {"<temperature>": {"<budget>":
    accepted drafts per round}}, ...}``; any other keys (how it was measured) are kept for
    people and ignored here. Raises ValueError naming the file when it does not parse."""
    path = os.path.join(os.fspath(folder), TREE_ACCEPTANCE_NAME)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as fh:
            meta = json.load(fh)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable JSON file ({exc})") from None
    if not isinstance(meta, Mapping) or "accepted_per_round" not in meta:
        raise ValueError(f"{path}: expected an object with 'accepted_per_round'")
    return _check_table(meta["accepted_per_round"], path)


def tree_acceptance_table(rows: Sequence[dict], top: int) -> Tuple[Dict[float, Dict[int, float]],
                                                                     Dict[str, int]]:
    """The accepted-per-round table of `eval-drafter` rows: per temperature, from the runs of
    the largest budget ``top`` (every smaller budget read off the same rounds,
    ``accepted_by_budget``), or, at temperature > 0 where trees carry a soft spine and the
    smaller budgets are not prefixes, from each budget's own runs. Returns (table, rounds
    behind each entry)."""
    table: Dict[float, Dict[int, float]] = {}
    counted: Dict[str, int] = {}
    for t in sorted({r["temperature"] for r in rows}):
        sel = [r for r in rows if r["tree_budget"] == top and r["temperature"] == t]
        rounds = sum(r["rounds"] for r in sel)
        acc: Dict[int, int] = {}
        for r in sel:
            for b, n in r.get("accepted_by_budget", {}).items():
                acc[int(b)] = acc.get(int(b), 0) + n
        if rounds and acc:
            table[t] = {b: n / rounds for b, n in sorted(acc.items())}
            counted[repr(t)] = rounds
        elif t > 0:
            direct: Dict[int, float] = {}
            for b in sorted({r["tree_budget"] for r in rows if r["tree_budget"] > 0}):
                sb = [r for r in rows if r["tree_budget"] == b and r["temperature"] == t]
                n = sum(r["rounds"] for r in sb)
                if n:
                    direct[b] = sum(r["mean_accepted"] * r["rounds"] for r in sb) / n
                    counted[f"{t!r}@{b}"] = n
            if direct:
                table[t] = direct
    return table, counted


def write_tree_acceptance(folder: Union[str, os.PathLike], table: Mapping, **about: Any) -> str:
    """Writes ``tree_acceptance.json`` (the table checked as `read_tree_acceptance` reads it,
    plus `about`: how it was measured). Returns the path."""
    checked = _check_table(table, "table")
    path = os.path.join(os.fspath(folder), TREE_ACCEPTANCE_NAME)
    body = {"accepted_per_round": {repr(t): {str(b): round(a, 4) for b, a in sorted(row.items())}
                                   for t, row in sorted(checked.items())}, **about}
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(body, fh, indent=1)
        fh.write("\n")
    return path


def nearest_temperature(table: Mapping[float, Any], temperature: float) -> float:
    """The temperature of `table`'s rows nearest `temperature` (the lower one on a tie, so
    greedy decoding takes the greedy row when there is one)."""
    return min(table, key=lambda t: (abs(t - temperature), t))


def acceptance_at(table: Mapping[float, Mapping[int, float]], temperature: float) -> Dict[int, float]:
    """The row of `table` measured at the temperature nearest `temperature`."""
    return dict(table[nearest_temperature(table, temperature)])


def _median(xs: Sequence[float]) -> float:
    s = sorted(xs)
    return s[len(s) // 2]


def chain_forward(target: Any, ids: Any, context: int,
                  hidden_layers: Optional[Sequence[int]] = None) -> tuple:
    """For timings: the target's cache filled with ``ids[:, :context]`` (one row), and
    ``run(n)``, one target forward over the next n ids as a chain of tree nodes after it (the
    cache cropped back after each). Returns ``(run, hidden)``: hidden is the prefill's
    `hidden_layers` states concatenated (None without layers). Shape: ids (1, >= context + n)."""
    cache = target.new_cache()
    hid = target.forward(ids[:, :context], cache, hidden_layers=hidden_layers).hidden
    dev = target.device

    def run(n: int) -> None:
        par = torch.arange(-1, n - 1, device=dev).view(1, n)
        target.forward_tree(ids[:, context:context + n], par, cache)
        target.crop(cache, context)

    return run, (torch.cat(list(hid), -1) if hid else None)


@torch.inference_mode()
def measure_costs(target: Any, drafter: Any, budgets: Sequence[int], batch: int = 1,
                  context: int = 128, reps: int = 3) -> dict:
    """Seconds of one round's parts on this machine, per budget, at `batch` rows.

    - ``forward[b]``: one target forward over b + 1 nodes per row (after `context` cached
      tokens; `TargetModel.forward_tree` at one row, `batching.BatchedTarget` at more);
    - ``draft``: one row's drafting per round (the tree drafter's `draft` and `accept`, the
      drafter's block forward and the tree expansion included);
    - ``plain``: one step of plain decoding (one token per row, `ARDecoder`'s forward).

    Each is the median of `reps` timed calls (the budgets interleaved, after one untimed
    call), the forward costs made non-decreasing in the budget (their running maximum).
    Cached per (target, batch, threads, budgets)."""
    budgets = sorted({int(b) for b in budgets})
    key = (batch, torch.get_num_threads(), tuple(budgets), context)
    done = _COSTS.setdefault(target.model, {})
    if key in done:
        return done[key]
    gen = torch.Generator().manual_seed(0)
    dev = target.device
    ids = torch.randint(0, target.vocab_size, (batch, context + max(budgets) + 1),
                        generator=gen).to(dev)
    layers = getattr(drafter, "feature_layers", None)
    if batch == 1:
        run, hidden = chain_forward(target, ids, context, layers)
        pcache = target.new_cache()
        target.forward(ids[:, :context], pcache)

        def plain() -> None:  # one token of plain decoding (`ARDecoder`'s call)
            target.forward(ids[:, context:context + 1], pcache)
            target.crop(pcache, context)
    else:
        from .batching import BatchedTarget

        bt = BatchedTarget(target, batch, context + max(budgets) + 3)
        hidden = bt.prefill([ids[i:i + 1, :context + 1] for i in range(batch)], layers)[0]

        def run(n: int) -> None:  # no commit: every call overwrites the same slots
            used = torch.ones(batch, n, dtype=torch.bool, device=dev)
            par = torch.arange(-1, n - 1).expand(batch, n)
            bt.forward_nodes(ids[:, context:context + n], par, used)

        def plain() -> None:
            run(1)

    def timed(f: Any, *args: Any) -> float:
        if dev.type == "cuda":  # CUDA runs asynchronously: time whole calls
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        f(*args)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return time.perf_counter() - t0

    run(max(budgets) + 1)  # warm-up
    plain()
    # budgets interleaved within each repetition, so that a drift of the machine's speed
    # touches every budget alike
    times: Dict[int, list] = {b: [] for b in budgets}
    plain_t: list = []
    for r in range(reps):
        for b in budgets:
            times[b].append(timed(run, b + 1))
        plain_t.append(timed(plain))
    # a wider forward is never cheaper than a narrower one: the running maximum of the
    # medians keeps noise from ranking a wide tree below a narrow one
    fwd: Dict[int, float] = {}
    top = 0.0
    for b in budgets:
        top = max(top, _median(times[b]))
        fwd[b] = top
    draft = 0.0
    if drafter is not None:
        from .batching import fork_drafter

        hidden = hidden[:1] if hidden is not None else None

        def one_round(d: Any, r: int) -> None:  # a round's draft and accept
            dr = d.draft(getattr(d, "max_drafts", None) or 3, r)
            em = dr.ids[:, :1] if dr.ids.shape[1] else ids[:1, :1]
            d.accept(torch.cat([em, em], 1), 1, hidden[:, -2:] if hidden is not None else None)

        ts = []
        for r in range(reps + 1):
            d = fork_drafter(drafter)
            d.start(ids[:1, :context + 1], 0, 0.0, hidden, None)
            ts.append(timed(one_round, d, r))
        draft = _median(ts[1:])
    res = {"forward": fwd, "draft": draft, "plain": _median(plain_t), "batch": batch,
           "threads": torch.get_num_threads(),
           "dtype": str(target.dtype).replace("torch.", ""), "context": context}
    done[key] = res
    return res


def choose_budget(acceptance: Mapping[int, float], forward: Mapping[int, float],
                  draft: float = 0.0, batch: int = 1, plain: Optional[float] = None) -> int:
    """The budget of most tokens per second: argmax over the budgets in both tables of
    (1 + acceptance[b]) / (forward[b] + batch * draft), the smallest on a tie; 0 when `plain`
    (the seconds of one plain decoding step) is given and plain decoding's 1 / plain beats
    every budget (speculation does not pay on this machine at this batch size).

    >>> choose_budget({4: 1.0, 16: 1.5}, {4: 0.10, 16: 0.12})
    16
    >>> choose_budget({4: 1.0, 16: 1.5}, {4: 0.10, 16: 0.20})
    4
    >>> choose_budget({4: 1.0, 16: 1.5}, {4: 0.10, 16: 0.20}, plain=0.04)
    0
    """
    common = sorted(set(acceptance) & set(forward))
    if not common:
        raise ValueError(f"no budget is in both the acceptance table {sorted(acceptance)} and "
                         f"the measured costs {sorted(forward)}")

    def rate(b: int) -> float:
        return (1.0 + acceptance[b]) / (forward[b] + batch * draft)

    best = max(common, key=lambda b: (rate(b), -b))
    if plain is not None and plain > 0 and 1.0 / plain > rate(best):
        return 0
    return best


def calibrated_budget(target: Any, drafter: Any, table: Mapping[float, Mapping[int, float]],
                      temperature: float, batch: int = 1, max_budget: int = 64) -> tuple:
    """(budget, costs): `choose_budget` over the drafter's measured acceptance at the nearest
    temperature and this machine's costs at `batch` rows (budgets up to `max_budget`); budget
    0 when plain decoding measures faster than every tree."""
    acc = {b: a for b, a in acceptance_at(table, temperature).items() if b <= max_budget}
    if not acc:
        raise ValueError(f"the acceptance table has no budget <= {max_budget}")
    costs = measure_costs(target, drafter, sorted(acc), batch=batch)
    return choose_budget(acc, costs["forward"], costs["draft"], batch,
                         plain=costs.get("plain")), costs


def prefer_int8(drafter: Any, context: int = 128, reps: int = 5, margin: float = 0.9) -> bool:
    """Whether drafting with int8 weights (`drafter.int8`) is faster than the drafter's float
    weights on this machine: one fully masked block (block_size - 1 drafts) after `context`
    positions, median of `reps` each way (after a warm-up call); int8 must take at most
    `margin` of the float time. The drafter is left packed when the answer is True, in float
    otherwise."""
    from .drafter.int8 import pack_int8, unpack_int8

    cfg = drafter.config
    dev = next(drafter.parameters()).device
    g = max(1, cfg.block_size - 1)
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(1, context, cfg.feature_size, generator=gen)
    cache = drafter.new_cache(1).append_context(feats.to(dev), last=torch.zeros(
        1, 1, dtype=torch.int64, device=dev))
    mask = torch.full((1, g), cfg.mask_id, dtype=torch.int64, device=dev)

    def timed() -> float:
        out = []
        for i in range(reps + 1):
            t0 = time.perf_counter()
            drafter.block_logits(cache, mask)
            if i:
                out.append(time.perf_counter() - t0)
        return _median(out)

    with torch.no_grad():
        unpack_int8(drafter)
        t_float = timed()
        pack_int8(drafter)
        t_int8 = timed()
    if t_int8 <= margin * t_float:
        return True
    unpack_int8(drafter)
    return False


def packed_forward_seconds(target: Any, nodes: Sequence[int] = (1, 17), context: int = 64,
                           reps: int = 2) -> Dict[str, Dict[int, float]]:
    """Seconds of one target forward over n chain nodes after `context` cached tokens, for each
    n in `nodes`, with the linear layers packed (`cpu_linear.PackedLinear`) and through torch
    ("plain"): median of `reps`, the two paths interleaved call by call after one warm-up
    round. Leaves the target's linear layers packed."""
    from .cpu_linear import PackedLinear, pack_model

    pack_model(target.model)
    layers = [m for m in target.model.modules() if isinstance(m, PackedLinear)]
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, target.vocab_size, (1, context + max(nodes)), generator=gen)
    run, _ = chain_forward(target, ids.to(target.device), context)
    times: Dict[str, Dict[int, list]] = {"packed": {n: [] for n in nodes},
                                         "plain": {n: [] for n in nodes}}
    try:
        for r in range(reps + 1):
            for n in nodes:
                for mode in ("packed", "plain"):
                    for m in layers:
                        m.enabled = mode == "packed"
                    t0 = time.perf_counter()
                    run(n)
                    if r:
                        times[mode][n].append(time.perf_counter() - t0)
    finally:
        for m in layers:
            m.enabled = True
    return {mode: {n: _median(ts) for n, ts in by.items()} for mode, by in times.items()}


def prefer_packed(target: Any, nodes: Sequence[int] = (1, 17), context: int = 64,
                  reps: int = 2, margin: float = 0.95) -> Dict[str, Any]:
    """Whether the target's forward is faster with its linear layers packed than through torch
    on this machine (`packed_forward_seconds` at one token of plain decoding and a tree): the
    packed forwards must take at most `margin` of torch's time in total. The target is left
    packed when the answer is True, plain otherwise (and always where the kernel cannot serve
    it: `cpu_linear.can_pack`). Returns ``{"packed": bool, "seconds": {"packed": s, "plain":
    s} or None}``."""
    from .cpu_linear import can_pack, unpack_model

    if not can_pack(target):
        unpack_model(target.model)
        return {"packed": False, "seconds": None}
    sec = packed_forward_seconds(target, nodes, context, reps)
    total = {mode: sum(by.values()) for mode, by in sec.items()}
    keep = total["packed"] <= margin * total["plain"]
    if not keep:
        unpack_model(target.model)
    return {"packed": keep, "seconds": total}
