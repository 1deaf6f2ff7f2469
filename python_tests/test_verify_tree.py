"""verify_tree: structure, the reference twin, the CUDA twin, bad input, and the emitted law.

The law test enumerates exactly: for a fixed tree over a small vocabulary with one random
target row per node, the walk emits (the accepted path, then one token x that no child of the
last accepted node carries). Its probability is the product of the target's probabilities
along the path times p_last(x), and these events partition the outcomes. Many rows with
per-row seeds draw in one call; Pearson's chi-square (bins merged until each expects >= 10)
compares the counts with the exact law. A positive configuration passes when p > ALPHA =
FAMILY_ALPHA / N_POSITIVE, so a correct op raises a false alarm in this module with
probability at most 1e-5 (over the fixed seeds). Negative controls the same test must reject:
target rows shifted by one node (each node read with its parent's row), and a walk that redraws
once when the first draw matches no child (a plausible "retry" bug that favours the tree).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor

from specdiff_ext import reference as R

from sd_testutil import compiled_only, gen
from test_distribution import chi_square

FAMILY_ALPHA = 1e-5


def random_tree(B: int, N: int, V: int, logits: Tensor, g: torch.Generator,
                unused_frac: float = 0.1, match_frac: float = 0.6) -> tuple[Tensor, Tensor]:
    """Random trees of N nodes per row; a child's token is its parent's argmax with
    probability match_frac (so walks go deep), else random; a few nodes unused (-1).
    Siblings get distinct tokens."""
    parents = torch.full((B, N), -1, dtype=torch.int64)
    tokens = torch.zeros((B, N), dtype=torch.int64)
    for b in range(B):
        used = [0]
        taken: dict[int, set] = {0: set()}
        for i in range(1, N):
            if float(torch.rand((), generator=g)) < unused_frac:
                tokens[b, i] = int(torch.randint(-5, V + 5, (), generator=g))  # ignored
                continue
            q = used[int(torch.randint(0, len(used), (), generator=g))]
            if float(torch.rand((), generator=g)) < match_frac:
                t = int(logits[b, q].float().argmax())
            else:
                t = int(torch.randint(0, V, (), generator=g))
            if t in taken[q]:
                t = next(v for v in range(V) if v not in taken[q]) if len(taken[q]) < V else None
                if t is None:
                    continue
            taken[q].add(t)
            taken[i] = set()
            parents[b, i] = q
            tokens[b, i] = t
            used.append(i)
    return tokens, parents


def check_structure(res: Any, tokens: Tensor, parents: Tensor, V: int) -> None:
    ids, num, path, valid = (torch.as_tensor(x) for x in res)
    B, N = tokens.shape
    for b in range(B):
        k = int(num[b])
        if not bool(valid[b]):
            assert k == 0 and bool((ids[b] == -1).all()) and bool((path[b] == -1).all())
            continue
        prev = 0
        for j in range(k):
            n = int(path[b, j])
            assert int(parents[b, n]) == prev and int(tokens[b, n]) == int(ids[b, j])
            prev = n
        x = int(ids[b, k])
        assert 0 <= x < V
        kids = [(i, int(tokens[b, i])) for i in range(N) if int(parents[b, i]) == prev]
        assert all(t != x for _, t in kids), "the emitted token matches a child: it should be accepted"
        assert bool((ids[b, k + 1:] == -1).all()) and bool((path[b, k:] == -1).all())


def _setup(B: int = 48, N: int = 11, V: int = 37, seed: int = 0, dtype=torch.float32):
    g = gen(seed)
    logits = (torch.randn(B, N, V, generator=g) * 4.0).to(dtype)
    tokens, parents = random_tree(B, N, V, logits, g)
    return logits, tokens, parents


SETTINGS = [
    dict(temperature=0.0),
    dict(temperature=1.0),
    dict(temperature=0.6),
    dict(temperature="per_row"),
    dict(temperature=1.0, top_k=4),
    dict(temperature=0.8, top_p=0.8),
    dict(temperature=1.2, min_p=0.1),
    dict(temperature=1.0, top_k=6, top_p=0.9, min_p=0.02),
]


def _kw(s: dict, B: int) -> dict:
    kw = dict(s)
    if kw.get("temperature") == "per_row":
        kw["temperature"] = torch.tensor([0.0, 0.5, 1.0, 2.0] * (B // 4), dtype=torch.float32)
    return kw


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("s", SETTINGS, ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()))
def test_matches_the_reference_and_is_a_walk(ops, s: dict, dtype: torch.dtype) -> None:
    logits, tokens, parents = _setup(dtype=dtype)
    B, N, V = logits.shape
    kw = _kw(s, B)
    got = ops.verify_tree(logits, tokens, parents, seed=11, offset=5, **kw)
    check_structure(got, tokens, parents, V)
    want = R.verify_tree(logits, tokens, parents, seed=11, offset=5, **kw)
    for name, a, b in zip(got._fields, got, want):
        assert torch.equal(torch.as_tensor(a), b), name
    assert float(got.num_accepted.float().mean()) > 0.2, "the trees should be walked into"


def test_greedy_accepts_the_argmax_path_and_matches_verify_on_a_chain(ops) -> None:
    g = gen(3)
    B, G, V = 32, 5, 29
    logits = torch.randn(B, G + 1, V, generator=g)
    am = logits.argmax(-1)
    drafts = am[:, :G].clone()
    # rows break the chain at a random position
    cut = torch.randint(0, G + 1, (B,), generator=g)
    for b in range(B):
        if int(cut[b]) < G:
            drafts[b, int(cut[b])] = (drafts[b, int(cut[b])] + 1) % V
    tokens = torch.cat([torch.zeros(B, 1, dtype=torch.int64), drafts], 1)
    parents = torch.arange(-1, G).expand(B, G + 1).contiguous()
    tree = ops.verify_tree(logits, tokens, parents, temperature=0.0)
    chain = ops.verify(logits, drafts, temperature=0.0)
    assert torch.equal(tree.num_accepted, chain.num_accepted)
    assert torch.equal(tree.num_accepted, cut)
    assert torch.equal(tree.ids, chain.ids)
    k = tree.num_accepted
    for b in range(B):
        assert tree.path[b, : int(k[b])].tolist() == list(range(1, int(k[b]) + 1))


def test_only_rows_on_the_path_are_read_and_bad_rows_invalidate(ops) -> None:
    V = 8
    logits = torch.full((2, 4, V), -4.0)
    logits[:, 0, 3] = 5.0  # root -> token 3 (node 1)
    logits[:, 1, 6] = 5.0  # node 1 -> token 6, no such child: emitted
    tokens = torch.tensor([[0, 3, 4, 1]] * 2)
    parents = torch.tensor([[-1, 0, 0, 2]] * 2)
    logits[0, 2] = float("nan")  # node 2 is off the path: never read
    logits[0, 3] = float("inf")
    logits[1, 1, 2] = float("nan")  # on the path: row 1 invalid
    res = ops.verify_tree(logits, tokens, parents, temperature=0.0)
    assert res.valid.tolist() == [True, False]
    assert res.ids[0].tolist() == [3, 6, -1, -1] and res.path[0].tolist() == [1, -1, -1, -1]
    assert res.num_accepted.tolist() == [1, 0]
    assert res.ids[1].tolist() == [-1] * 4 and res.path[1].tolist() == [-1] * 4
    all_inf = torch.full((1, 2, V), -math.inf)
    r = ops.verify_tree(all_inf, torch.tensor([[0, 1]]), torch.tensor([[-1, 0]]), temperature=1.0)
    assert r.valid.tolist() == [False] and r.ids.tolist() == [[-1, -1]]


def test_leaf_gives_the_bonus_and_unused_nodes_are_ignored(ops) -> None:
    V = 6
    logits = torch.full((1, 5, V), -3.0)
    logits[0, 0, 2] = 9.0
    logits[0, 1, 4] = 9.0
    logits[0, 3, 5] = 9.0
    tokens = torch.tensor([[0, 2, 99, 4, -7]])  # nodes 2 and 4 unused: their tokens are ignored
    parents = torch.tensor([[-1, 0, -1, 1, -1]])
    res = ops.verify_tree(logits, tokens, parents, temperature=0.0)
    assert res.ids.tolist() == [[2, 4, 5, -1, -1]]  # 5: the bonus after leaf node 3
    assert res.path.tolist() == [[1, 3, -1, -1, -1]] and res.num_accepted.tolist() == [2]


def test_per_row_seeds_make_rows_independent_of_their_neighbours(ops) -> None:
    logits, tokens, parents = _setup(B=24, seed=5)
    seeds = torch.arange(100, 124, dtype=torch.int64)
    a = ops.verify_tree(logits, tokens, parents, temperature=1.0, seed=seeds, offset=2)
    perm = torch.randperm(24, generator=gen(1))
    b = ops.verify_tree(logits[perm], tokens[perm], parents[perm], temperature=1.0, seed=seeds[perm], offset=2)
    for x, y in zip(a, b):
        assert torch.equal(x[perm], y)
    c = ops.verify_tree(logits[:5], tokens[:5], parents[:5], temperature=1.0, seed=seeds[:5], offset=2)
    for x, y in zip(a, c):
        assert torch.equal(x[:5], y)
    d = ops.verify_tree(logits, tokens, parents, temperature=1.0, seed=seeds, offset=3)
    assert not torch.equal(a.ids, d.ids), "the offset must move the stream"


def test_vanishing_temperature_is_greedy(ops) -> None:
    logits, tokens, parents = _setup(B=16, seed=2)
    want = ops.verify_tree(logits, tokens, parents, temperature=0.0)
    for tau in (1e-45, 1e-40, 1e-39):
        for kw in ({}, dict(top_k=2), dict(top_k=5, top_p=0.9, min_p=0.5)):
            got = ops.verify_tree(logits, tokens, parents, temperature=tau, seed=4, **kw)
            for x, y in zip(got, want):
                assert torch.equal(x, y), (tau, kw)


def test_numpy_in_numpy_out_and_empty_batch(ops) -> None:
    logits, tokens, parents = _setup(B=4, seed=6)
    res = ops.verify_tree(logits.numpy(), tokens.numpy(), parents.numpy().astype(np.int32), seed=1)
    assert all(isinstance(x, np.ndarray) for x in res)
    want = ops.verify_tree(logits, tokens, parents, seed=1)
    assert all(np.array_equal(x, y.numpy()) for x, y in zip(res, want))
    empty = ops.verify_tree(torch.zeros(0, 3, 5), torch.zeros(0, 3, dtype=torch.int64),
                            torch.zeros(0, 3, dtype=torch.int64))
    assert empty.ids.shape == (0, 3) and empty.path.shape == (0, 3) and empty.valid.shape == (0,)


@pytest.mark.parametrize("parents, match", [
    ([[0, 0, 1]], "parents"),           # the root's parent must be -1
    ([[-1, 1, 1]], "parents"),          # a node's parent must come before it
    ([[-1, 0, 5]], "parents"),          # out of range
    ([[-1, 0, -2]], "parents"),         # below -1
])
def test_bad_parents_name_them(ops, parents, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ops.verify_tree(torch.zeros(1, 3, 5), torch.tensor([[0, 1, 2]]), torch.tensor(parents))


def test_bad_arguments_name_them(ops) -> None:
    z = torch.zeros(1, 3, 5)
    tk = torch.tensor([[0, 1, 2]])
    pa = torch.tensor([[-1, 0, 1]])
    with pytest.raises(ValueError, match="tokens"):
        ops.verify_tree(z, torch.tensor([[0, 1, 5]]), pa)  # a used node's token past V
    with pytest.raises(ValueError, match="tokens"):
        ops.verify_tree(z, torch.tensor([[0, 1]]), pa)
    with pytest.raises(ValueError, match="parents"):
        ops.verify_tree(z, tk, torch.tensor([[-1, 0]]))
    with pytest.raises((TypeError, ValueError), match="parents"):
        ops.verify_tree(z, tk, pa.float())
    with pytest.raises(ValueError, match="target_logits"):
        ops.verify_tree(torch.zeros(3, 5), tk, pa)
    with pytest.raises(ValueError, match="target_logits"):
        ops.verify_tree(torch.zeros(1, 0, 5), tk[:, :0], pa[:, :0])
    with pytest.raises(ValueError, match="temperature"):
        ops.verify_tree(z, tk, pa, temperature=-1.0)
    with pytest.raises(ValueError, match="top_p"):
        ops.verify_tree(z, tk, pa, top_p=0.0)
    with pytest.raises(ValueError, match="offset"):
        ops.verify_tree(z, tk, pa, offset=-1)
    # the unused node's token may be anything
    ops.verify_tree(z, torch.tensor([[0, 1, 10**6]]), torch.tensor([[-1, 0, -1]]))


@compiled_only("the raw custom op's schema")
def test_raw_custom_op_runs() -> None:
    logits, tokens, parents = _setup(B=4, seed=8)
    ids, num, path, valid = torch.ops.specdiff.verify_tree(
        logits, tokens, parents, None, 1.0, None, 3, 0, None, 0, None, 1.0, None, 0.0)
    want = R.verify_tree(logits, tokens, parents, seed=3)
    assert torch.equal(ids, want.ids) and torch.equal(path, want.path)


@pytest.mark.cuda
@pytest.mark.parametrize("s", SETTINGS, ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()))
def test_cuda_is_bit_identical_to_cpu(ops, s: dict) -> None:
    logits, tokens, parents = _setup(B=64, N=17, V=3001, seed=9)
    kw = _kw(s, 64)
    cpu = ops.verify_tree(logits, tokens, parents, seed=21, offset=7, **kw)
    kw_cuda = {k: (v.cuda() if isinstance(v, Tensor) else v) for k, v in kw.items()}
    gpu = ops.verify_tree(logits.cuda(), tokens.cuda(), parents.cuda(), seed=21, offset=7, **kw_cuda)
    for name, a, b in zip(cpu._fields, cpu, gpu):
        assert torch.equal(a, b.cpu()), name
    with pytest.raises(ValueError, match="parents"):
        ops.verify_tree(logits.cuda(), tokens.cuda(), torch.zeros_like(parents).cuda())


# ------------------------------------------------------------------------------ the law
# A fixed tree over V = 5: root -> {0, 1, 2}; 0 -> {3, 4}; 1 -> {0}; 3 -> {1}; 4 -> {}; one
# unused node.  Node i's row is the target's law after node i's path.
TREE_TOKENS = [0, 0, 1, 2, 3, 4, 0, 1, 3]
TREE_PARENTS = [-1, 0, 0, 0, 1, 1, 2, 4, -1]
V_LAW = 5
LAW_CONFIGS = [
    dict(temperature=1.0),
    dict(temperature=0.7),
    dict(temperature=1.0, top_k=3),
    dict(temperature=1.3, top_p=0.85),
]
N_POSITIVE = len(LAW_CONFIGS)
ALPHA = FAMILY_ALPHA / N_POSITIVE
ROWS = 30000


def _law_world(seed: int = 0) -> Tensor:
    g = gen(seed)
    return torch.randn(len(TREE_TOKENS), V_LAW, generator=g, dtype=torch.float64) * 1.2


def exact_law(rows: Tensor, s: dict) -> dict:
    """P(path, emitted x) by enumeration, in float64, for the filtered law of `s`."""
    kw = {k: v for k, v in s.items() if k != "temperature"}
    probs = []
    for i in range(rows.shape[0]):
        probs.append(_filtered(rows[i], s["temperature"], **kw))
    law: dict = {}

    def walk(node: int, path: tuple, pr: float) -> None:
        kids = {TREE_TOKENS[i]: i for i in range(1, len(TREE_TOKENS)) if TREE_PARENTS[i] == node}
        for x in range(V_LAW):
            px = float(probs[node][x])
            if px == 0.0:
                continue
            if x in kids:
                walk(kids[x], path + (x,), pr * px)
            else:
                law[path + (x,)] = law.get(path + (x,), 0.0) + pr * px
    walk(0, (), 1.0)
    return law


def _filtered(row: Tensor, tau: float, **filters: Any) -> Tensor:
    kept = R.filter_logits(row.reshape(1, 1, -1), temperature=tau, **filters).reshape(-1)
    t = float(torch.tensor(tau, dtype=torch.float32))
    return torch.softmax(kept / t, dim=-1)


def _counts(res: Any, law: dict) -> tuple[Tensor, Tensor]:
    keys = list(law)
    index = {k: j for j, k in enumerate(keys)}
    counts = torch.zeros(len(keys) + 1, dtype=torch.float64)  # last bin: impossible outcomes
    ids, num = torch.as_tensor(res.ids), torch.as_tensor(res.num_accepted)
    for row, k in zip(ids.tolist(), num.tolist()):
        counts[index.get(tuple(row[: k + 1]), len(keys))] += 1
    probs = torch.tensor([law[k] for k in keys] + [0.0], dtype=torch.float64)
    return counts, probs / probs.sum()


def _tree_batch(rows: Tensor, n: int) -> tuple[Tensor, Tensor, Tensor]:
    logits = rows.to(torch.float32).expand(n, *rows.shape).contiguous()
    tokens = torch.tensor(TREE_TOKENS).expand(n, -1).contiguous()
    parents = torch.tensor(TREE_PARENTS).expand(n, -1).contiguous()
    return logits, tokens, parents


def _p_value(res: Any, rows: Tensor, s: dict) -> float:
    counts, probs = _counts(res, exact_law(rows, s))
    return chi_square(counts, probs)[2]


@pytest.mark.parametrize("s", LAW_CONFIGS, ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()))
def test_emitted_sequences_follow_the_target_law(ops, s: dict) -> None:
    rows = _law_world(0)
    logits, tokens, parents = _tree_batch(rows, ROWS)
    seeds = torch.arange(ROWS, dtype=torch.int64) * 7919 + 13
    res = ops.verify_tree(logits, tokens, parents, seed=seeds, offset=1, **s)
    p = _p_value(res, rows.to(torch.float32).to(torch.float64), s)
    assert p > ALPHA, f"{s}: chi-square p-value {p:.3g} <= {ALPHA:.3g}"


def _retry_walk(logits: Tensor, s: dict, g: torch.Generator) -> Any:
    """Wrong on purpose: when the first draw matches no child, draw once more."""
    n = logits.shape[0]
    kw = {k: v for k, v in s.items() if k != "temperature"}
    probs = [_filtered(logits[0, i].to(torch.float64), s["temperature"], **kw) for i in range(logits.shape[1])]
    ids = torch.full((n, len(TREE_TOKENS)), -1, dtype=torch.int64)
    num = torch.zeros(n, dtype=torch.int64)
    for r in range(n):
        node, d = 0, 0
        while True:
            kids = {TREE_TOKENS[i]: i for i in range(1, len(TREE_TOKENS)) if TREE_PARENTS[i] == node}
            x = int(torch.multinomial(probs[node], 1, generator=g))
            if x not in kids and kids:
                x = int(torch.multinomial(probs[node], 1, generator=g))
            ids[r, d] = x
            if x not in kids:
                num[r] = d
                break
            node, d = kids[x], d + 1
    return R.TreeVerifyResult(ids, num, None, None)


@pytest.mark.parametrize("control", ["shifted_rows", "retry_walk"])
def test_negative_controls_are_rejected(ops, control: str) -> None:
    s = LAW_CONFIGS[0]
    rows = _law_world(0)
    if control == "shifted_rows":
        shifted = rows.clone()
        for i in range(1, len(TREE_PARENTS)):
            shifted[i] = rows[max(TREE_PARENTS[i], 0)]
        logits, tokens, parents = _tree_batch(shifted, ROWS)
        seeds = torch.arange(ROWS, dtype=torch.int64) * 7919 + 13
        res = ops.verify_tree(logits, tokens, parents, seed=seeds, offset=1, **s)
    else:
        logits, _, _ = _tree_batch(rows, 6000)
        res = _retry_walk(logits[:1].expand(6000, -1, -1), s, gen(4))
    p = _p_value(res, rows.to(torch.float32).to(torch.float64), s)
    assert p < ALPHA, f"{control}: the law test did not reject it (p = {p:.3g})"
