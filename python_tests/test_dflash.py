"""The DFlash drafter: the published layout (config and weight names) checked against an
independent forward written here from the published equations, the training forward against
the cached decode path, greedy exactness of the decoder with it, the acceptance-relevant
position convention of its cache, and the trainer (loss falls, resume)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from specdiff_ext.decoding import ARDecoder, SpecDiffDecoder
from specdiff_ext.drafter import load_drafter
from specdiff_ext.drafter.checkpoint import read_dflash_config, save_dflash
from specdiff_ext.drafter.dflash import DFlashConfig, DFlashDrafter, build_target_layer_ids

pytest.importorskip("transformers")

from test_decoding import tiny_target  # noqa: E402


def _drafter(target, layers: int = 2, std: float = 0.3, seed: int = 2, bs: int = 5) -> DFlashDrafter:
    torch.manual_seed(seed)
    cfg = DFlashConfig.from_hf_config(target.model.config, target.name, n_layers=layers,
                                      target_layer_ids=[0, 1][:layers], mask_token_id=7,
                                      block_size=bs, init_std=std)
    d = DFlashDrafter(cfg, target.input_embeddings, target.lm_head_weight)
    with torch.no_grad():  # non-trivial norm gains, so a misplaced norm shows
        for name, p in d.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.5 * torch.rand_like(p))
    return d.eval()


# ------------------------------------------------------------------------------ published forward

def _rms(x, w, eps):
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def _published_forward(sd: dict, hf: dict, target_hidden, noise_embedding, position_ids):
    """DFlashDraftModel.forward as published (Qwen3 layers; context K/V from fc + hidden_norm
    of the concatenated target states; q on the block only, k/v on [context, block]; k-norm
    before RoPE; no mask), from a state dict and a config.json dict alone."""
    eps, hs = hf["rms_norm_eps"], hf["head_dim"]
    nh, nkv = hf["num_attention_heads"], hf["num_key_value_heads"]
    theta = hf["rope_theta"]
    ctx = _rms(target_hidden @ sd["fc.weight"].T, sd["hidden_norm.weight"], eps)
    inv = 1.0 / theta ** (torch.arange(0, hs, 2, dtype=torch.float32) / hs)
    ang = position_ids[0].float()[:, None] * inv[None]
    emb = torch.cat([ang, ang], -1)
    cos, sin = emb.cos()[None, None], emb.sin()[None, None]  # (1, 1, S+n, hs)
    x = noise_embedding
    B, n, _ = x.shape
    S = ctx.shape[1]
    for i in range(hf["num_hidden_layers"]):
        p = lambda k: sd[f"layers.{i}.{k}"]  # noqa: E731
        res = x
        h = _rms(x, p("input_layernorm.weight"), eps)
        q = _rms((h @ p("self_attn.q_proj.weight").T).view(B, n, nh, hs),
                 p("self_attn.q_norm.weight"), eps).transpose(1, 2)
        k = torch.cat([ctx @ p("self_attn.k_proj.weight").T, h @ p("self_attn.k_proj.weight").T], 1)
        v = torch.cat([ctx @ p("self_attn.v_proj.weight").T, h @ p("self_attn.v_proj.weight").T], 1)
        k = _rms(k.view(B, S + n, nkv, hs), p("self_attn.k_norm.weight"), eps).transpose(1, 2)
        v = v.view(B, S + n, nkv, hs).transpose(1, 2)
        q = q * cos[..., -n:, :] + _rotate_half(q) * sin[..., -n:, :]
        k = k * cos + _rotate_half(k) * sin
        k, v = k.repeat_interleave(nh // nkv, 1), v.repeat_interleave(nh // nkv, 1)
        att = torch.softmax((q @ k.transpose(-1, -2)) / math.sqrt(hs), -1)
        o = (att @ v).transpose(1, 2).reshape(B, n, nh * hs) @ p("self_attn.o_proj.weight").T
        x = res + o
        h = _rms(x, p("post_attention_layernorm.weight"), eps)
        x = x + (F.silu(h @ p("mlp.gate_proj.weight").T) * (h @ p("mlp.up_proj.weight").T)) \
            @ p("mlp.down_proj.weight").T
    return _rms(x, sd["norm.weight"], eps)


def test_export_layout_matches_the_published_equations(tmp_path: Path) -> None:
    import safetensors.torch as st

    tgt = tiny_target()
    d = _drafter(tgt)
    save_dflash(d, tmp_path, extra={"note": "test"})
    hf = json.loads((tmp_path / "config.json").read_text())
    assert hf["architectures"] == ["DFlashDraftModel"] and hf["model_type"] == "qwen3"
    assert hf["dflash_config"] == {"mask_token_id": 7, "target_layer_ids": [0, 1]}
    assert hf["block_size"] == 5 and hf["num_target_layers"] == 2 and hf["num_hidden_layers"] == 2
    sd = st.load_file(str(tmp_path / "model.safetensors"))
    want = {"fc.weight", "hidden_norm.weight", "norm.weight"} | {
        f"layers.{i}.{k}.weight" for i in range(2) for k in (
            "input_layernorm", "post_attention_layernorm", "self_attn.q_proj", "self_attn.k_proj",
            "self_attn.v_proj", "self_attn.o_proj", "self_attn.q_norm", "self_attn.k_norm",
            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    assert set(sd) == want
    loaded = load_drafter(tmp_path, tgt.input_embeddings, tgt.lm_head_weight, target_name=tgt.name)
    assert isinstance(loaded, DFlashDrafter)
    # the published forward: context of S states, block [last, MASK x 4] at positions S..S+4
    g = torch.Generator().manual_seed(0)
    S, G = 9, 4
    th = torch.randn(1, S, loaded.config.feature_size, generator=g)
    last = torch.tensor([[11]])
    block = torch.cat([last, torch.full((1, G), 7)], 1)
    noise = F.embedding(block, tgt.input_embeddings.weight.detach())
    with torch.no_grad():
        ref_h = _published_forward(sd, hf, th, noise, torch.arange(S + G + 1)[None])
        ref = ref_h[:, 1:] @ tgt.lm_head_weight.detach().T
        cache = loaded.new_cache(1).append_context(th[:, :4]).append_context(th[:, 4:], last=last)
        got = loaded.block_logits(cache, torch.full((1, G), 7))
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=2e-5)
    # negative control: the same forward without the context's hidden_norm disagrees
    bad = dict(sd)
    bad["hidden_norm.weight"] = torch.ones_like(sd["hidden_norm.weight"])
    with torch.no_grad():
        off = _published_forward(bad, hf, th, noise, torch.arange(S + G + 1)[None])
    assert not torch.allclose(off[:, 1:] @ tgt.lm_head_weight.detach().T, got, atol=1e-3)


def test_training_forward_matches_cached_blocks() -> None:
    from specdiff_ext.training.dflash import sample_batch
    from specdiff_ext.training.data import TokenData

    tgt = tiny_target()
    d = _drafter(tgt)
    g = torch.Generator().manual_seed(4)
    toks = torch.randint(0, 61, (40,), generator=g)
    data = TokenData(toks, torch.tensor([0, 22, 40]), torch.tensor([5, 9]))
    b = sample_batch(data, 2, 6, 5, 64, 7, 0.5, g)  # some blocks partly revealed
    B, L = b["seqs"].shape
    feats = torch.randn(B, L, d.config.feature_size, generator=g)
    with torch.no_grad():
        h = d.forward_blocks(feats, b["anchors"], b["block"])
        logits = h[:, :, 1:] @ tgt.lm_head_weight.detach().T
        checked = 0
        for r in range(B):
            for k in range(b["anchors"].shape[1]):
                a = int(b["anchors"][r, k])
                if a < 0:
                    continue
                cache = d.new_cache(1).append_context(feats[r:r + 1, :a],
                                                      last=b["seqs"][r:r + 1, a:a + 1])
                ref = d.block_logits(cache, b["block"][r:r + 1, k, 1:])[0]
                torch.testing.assert_close(logits[r, k], ref, atol=1e-4, rtol=1e-4)
                checked += 1
    assert checked >= 8
    # labels are the next tokens after the anchor; revealed positions carry none
    lab, blk = b["labels"], b["block"]
    for r in range(B):
        for k in range(b["anchors"].shape[1]):
            a = int(b["anchors"][r, k])
            if a < 0:
                assert (lab[r, k] == -1).all()
                continue
            assert a >= int(data.prompt_lens[r]) - 1
            for j in range(4):
                if lab[r, k, j] >= 0:
                    assert lab[r, k, j] == b["seqs"][r, a + 1 + j] and blk[r, k, j + 1] == 7


def test_decoder_is_exact_and_caches_the_target_states_at_each_position() -> None:
    tgt = tiny_target()
    d = _drafter(tgt, std=0.5)
    prompt = torch.tensor([[5, 17, 3, 42, 8, 11]])
    want = ARDecoder(tgt).generate(prompt, 30).ids
    for mode, steps in (("left_to_right", 1), ("random", 3), ("confidence", 2)):
        dec = SpecDiffDecoder(tgt, d, gamma=4, steps=steps, commit=mode, tree_budget=0)
        got = dec.generate(prompt, 30)
        assert got.ids == want, mode
    # the context holds the target's states at every position before the block's last token
    # (the final round, which ends the run, advances nothing); a tree round advances it by the
    # states of its accepted path (gathered from the tree forward)
    tree = SpecDiffDecoder(tgt, d, gamma=4, tree_budget=7, tree_ngram=False)
    assert tree.generate(prompt, 30).ids == want
    for dec in (dec, tree):
        full = torch.cat([prompt, torch.tensor([want])], 1)
        cache = dec.drafter.cache
        n = cache.length
        assert full.shape[1] - 1 - 5 <= n < full.shape[1] - 1 and int(cache.last) == int(full[0, n])
        hid = torch.cat(tgt.forward(full[:, :n], hidden_layers=d.config.feature_layers).hidden, -1)
        ref = d.new_cache(1).append_context(hid, last=full[:, n:n + 1])
        for i in range(d.config.n_layers):
            torch.testing.assert_close(cache.keys[i][:, :, :n], ref.keys[i][:, :, :n],
                                       atol=1e-4, rtol=1e-4)
    sampled = SpecDiffDecoder(tgt, d, gamma=3, steps=2, commit="random").generate(
        prompt, 20, temperature=1.0, seed=5)
    assert len(sampled.ids) == 20


def test_config_and_loading_errors(tmp_path: Path) -> None:
    assert build_target_layer_ids(36, 5) == [1, 9, 17, 25, 33]  # Qwen3-8B's published ids
    assert build_target_layer_ids(30, 1) == [15]
    with pytest.raises(ValueError, match="mask_token_id"):
        DFlashConfig(vocab_size=10, mask_token_id=10)
    with pytest.raises(ValueError, match="target_layer_ids"):
        DFlashConfig(num_target_layers=4, target_layer_ids=[4])
    with pytest.raises(ValueError, match="block_size"):
        DFlashConfig(block_size=1)
    tgt = tiny_target()
    d = _drafter(tgt)
    save_dflash(d, tmp_path)
    with pytest.raises(ValueError, match="target name"):
        load_drafter(tmp_path, tgt.input_embeddings, tgt.lm_head_weight, target_name="other")
    other = tiny_target(vocab=40)
    with pytest.raises(ValueError, match="target_embed must have shape"):
        load_drafter(tmp_path, other.input_embeddings, other.lm_head_weight, target_name=tgt.name)
    hf = json.loads((tmp_path / "config.json").read_text())
    del hf["dflash_config"]["mask_token_id"]
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ValueError, match="mask_token_id"):
        read_dflash_config(tmp_path)
    cache = d.new_cache(1)
    with pytest.raises(ValueError, match="features must have shape"):
        cache.append_context(torch.zeros(1, 3, 5))
    with pytest.raises(ValueError, match="no last token"):
        d.block_logits(cache.append_context(torch.zeros(1, 2, d.config.feature_size)),
                       torch.full((1, 3), 7))


# ------------------------------------------------------------------------------ trainer

@pytest.fixture(scope="module")
def chat_target(tmp_path_factory: pytest.TempPathFactory):
    """A tiny random Llama with a real (word-level) tokenizer and chat template."""
    import transformers
    from test_target import _tiny_tokenizer

    from specdiff_ext.target import load_target

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=60, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=4, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=256,
                                      tie_word_embeddings=False)
    folder = tmp_path_factory.mktemp("tiny-llama-dflash")
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    _tiny_tokenizer().save_pretrained(folder)
    return load_target(folder, dtype=torch.float32)


def _word_data(target, tmp_path: Path, seed: int, n: int, num_prompts: int,
               max_new_tokens: int) -> Path:
    """A make-data folder of the target's greedy continuations of `n` random word prompts."""
    from specdiff_ext.training.data import generate_dataset

    g = torch.Generator().manual_seed(seed)
    prompts = [" ".join(f"w{int(i)}" for i in torch.randint(0, 50, (int(k),), generator=g))
               for k in torch.randint(2, 9, (n,), generator=g)]
    data_dir = tmp_path / "data"
    generate_dataset(target, data_dir, prompts=prompts, num_prompts=num_prompts,
                     max_new_tokens=max_new_tokens, temperatures=(0.0,), shard_size=num_prompts,
                     batch_size=8, heldout_fraction=0.2, progress=False)
    return data_dir


def test_train_dflash_learns_and_resumes(chat_target, tmp_path: Path) -> None:
    from specdiff_ext.training.dflash import build_parser, train

    data_dir = _word_data(chat_target, tmp_path, seed=3, n=40, num_prompts=24, max_new_tokens=16)
    common = ["--data", str(data_dir), "--batch", "4", "--anchors", "8", "--block-size", "4",
              "--layers", "2", "--warmup", "2", "--lr", "3e-3", "--eval-prompts", "2",
              "--eval-rounds", "2", "--save-every", "5", "--max-len", "64"]
    quiet = lambda *a: None  # noqa: E731
    a = train(build_parser().parse_args(common + ["--out", str(tmp_path / "a"), "--steps", "80",
                                                  "--eval-every", "80"]),
              target=chat_target, log=quiet)
    hist = a["history"]
    first, last = [sum(h["loss"] for h in part) / 2 for part in (hist[:2], hist[-2:])]
    # greedy continuations are learnable: the loss falls (slowly: the random target's head
    # gives small logits) and first-position accuracy climbs far above the most common token's
    assert last < 0.97 * first
    assert hist[-1]["acc_ema"] > 0.25 and hist[-1]["acc_ema"] > 2 * hist[0]["acc_ema"]
    assert "accepted_per_round" in hist[-1] and (tmp_path / "a" / "best" / "config.json").is_file()
    # the eval's hit rates by block position k = 1..3, from the same runs: a round accepts its
    # first draft exactly when the drafter's position-1 argmax is the target's token
    ev = hist[-1]
    assert len(ev["top1_by_position"]) == len(ev["top4_by_position"]) == 3
    assert all(t4 >= t1 for t1, t4 in zip(ev["top1_by_position"], ev["top4_by_position"]))
    hit1 = round(ev["top1_by_position"][0] * ev["counted_by_position"][0])
    assert hit1 == ev["rounds"] - ev["accepted_histogram"][0]
    b = tmp_path / "b"
    train(build_parser().parse_args(common + ["--out", str(b), "--steps", "5", "--eval-every",
                                              "0"]), target=chat_target, log=quiet)
    msgs: list = []
    r = train(build_parser().parse_args(common + ["--out", str(b), "--steps", "10", "--resume",
                                                  "--eval-every", "0"]),
              target=chat_target, log=msgs.append)
    assert any("resumed" in m and "step 5" in m for m in msgs) and r["step"] == 10
    # counted across the resume: 10 steps of labels, not 5 counted afresh
    assert r["history"][-1]["labels"] > 1.5 * r["history"][0]["labels"] > 0
    loaded = load_drafter(b, chat_target.input_embeddings, chat_target.lm_head_weight,
                          target_name=chat_target.name)
    for k, v in loaded.state_dict().items():
        torch.testing.assert_close(v, r["drafter"].state_dict()[k])
    # a crafted trainer state is refused without running code (weights_only load)
    import pickle

    class Boom:
        def __reduce__(self):
            return (print, ("pwned",))

    (b / "trainer_state.pt").write_bytes(pickle.dumps(Boom(), protocol=2))
    with pytest.raises(Exception, match="[Ww]eights only|Unsupported"):
        train(build_parser().parse_args(common + ["--out", str(b), "--steps", "12", "--resume",
                                                  "--eval-every", "0"]),
              target=chat_target, log=quiet)


# ------------------------------------------------------------------------------ feature cache

def _long_data(seed: int = 5):
    """Sequences of 30..70 tokens (prompts of 4..20): with --max-len 24 most windows start
    past the sequence's first token."""
    from specdiff_ext.training.data import TokenData

    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(30, 71, (6,), generator=g)
    offsets = torch.zeros(7, dtype=torch.int64)
    offsets[1:] = lens.cumsum(0)
    return TokenData(torch.randint(0, 61, (int(offsets[-1]),), generator=g), offsets,
                     torch.randint(4, 21, (6,), generator=g))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_feature_cache_equals_fresh_features(dtype, tmp_path: Path) -> None:
    from specdiff_ext.target import TargetModel
    from specdiff_ext.training.dflash import block_loss, position_weights, sample_batch
    from specdiff_ext.training.features import (FeatureCache, feature_bytes, target_features,
                                                window_features)

    t32 = tiny_target()
    tgt = t32 if dtype == torch.float32 else TargetModel(t32.model.to(dtype), t32.tokenizer,
                                                        t32.name)
    d = _drafter(t32, bs=4).float()  # feature layers [0, 1]
    layers, data = d.config.feature_layers, _long_data()
    width = len(layers) * tgt.hidden_size
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    mem = FeatureCache(data, layers, width, tgt.dtype)
    disk = FeatureCache(data, layers, width, tgt.dtype, tmp_path / "fc", target_name=tgt.name)
    assert mem.nbytes == disk.nbytes == feature_bytes(data, width, tgt.dtype)
    g = torch.Generator().manual_seed(1)
    pos_w = position_weights(3, 4.0)
    late = 0
    for _ in range(4):
        b = sample_batch(data, 3, 8, 4, 24, 7, 0.2, g)
        idx, starts, L = b["idx"].tolist(), b["starts"].tolist(), b["seqs"].shape[1]
        late += sum(s > 0 for s in starts)
        fresh = window_features(tgt, data, idx, starts, L, layers)
        assert fresh.dtype == dtype and fresh.shape == (3, L, width)
        # a position's states are those of the whole sequence up to it, whatever the window
        for r, (i, s) in enumerate(zip(idx, starts)):
            o0, o1 = int(data.offsets[i]), int(data.offsets[i + 1])
            whole = target_features(tgt, data.tokens[None, o0:o1], torch.ones(1, o1 - o0,
                                                                              dtype=torch.long),
                                    layers)[0]
            n = int(b["attn"][r].sum())
            torch.testing.assert_close(fresh[r, :n].float(), whole[s:s + n].float(), **tol)
        with torch.no_grad():
            ref, _ = block_loss(d, fresh.float(), b, pos_w)
            for cache in (mem, disk):
                got = window_features(tgt, data, idx, starts, L, layers, cache)
                assert got.dtype == dtype and got.shape == fresh.shape
                torch.testing.assert_close(got.float(), fresh.float(), **tol)
                loss, _ = block_loss(d, got.float(), b, pos_w)
                torch.testing.assert_close(loss, ref, **tol)
    assert late >= 4  # the windows past a sequence's start were exercised
    assert mem.computed == disk.computed == int(mem.filled.sum()) and mem.hits > 0
    # a second run on the folder reuses every stored sequence, with the same states
    disk.flush()
    again = FeatureCache(data, layers, width, tgt.dtype, tmp_path / "fc", target_name=tgt.name)
    assert again.path == disk.path and torch.equal(again.filled, disk.filled)
    i = int(torch.nonzero(again.filled)[0])
    o0, o1 = int(data.offsets[i]), int(data.offsets[i + 1])
    assert again.fill(tgt, [i]) == 0 and again.computed == 0
    assert torch.equal(again.feats[o0:o1].float(), mem.feats[o0:o1].float())
    # other settings get their own key; a meta file of other settings is refused
    other = FeatureCache(data, layers[:1], width // 2, tgt.dtype, tmp_path / "fc",
                         target_name=tgt.name)
    assert other.path != disk.path and not bool(other.filled.any())
    (disk.path / "meta.json").write_text(json.dumps({"layers": [9]}))
    with pytest.raises(ValueError, match="other settings"):
        FeatureCache(data, layers, width, tgt.dtype, tmp_path / "fc", target_name=tgt.name)


def test_feature_cache_soft_labels(tmp_path: Path) -> None:
    """The cached soft labels are the target's top-k next-token log-probabilities over the
    whole vocabulary at every position, the same with and without a cache (memory, disk)."""
    from specdiff_ext.training.dflash import sample_batch
    from specdiff_ext.training.features import FeatureCache, target_states, window_targets

    tgt = tiny_target()
    d = _drafter(tgt, bs=4).float()
    layers, data, k = d.config.feature_layers, _long_data(), 6
    width = len(layers) * tgt.hidden_size
    mem = FeatureCache(data, layers, width, tgt.dtype, soft_topk=k)
    disk = FeatureCache(data, layers, width, tgt.dtype, tmp_path / "fc", target_name=tgt.name,
                        soft_topk=k)
    plain = FeatureCache(data, layers, width, tgt.dtype, tmp_path / "fc", target_name=tgt.name)
    assert plain.path != disk.path  # soft labels are part of the key
    i = 2
    o0, o1 = int(data.offsets[i]), int(data.offsets[i + 1])
    seq = data.tokens[None, o0:o1]
    feats, ids, logp = target_states(tgt, seq, torch.ones_like(seq), layers, k, chunk=5)
    with torch.no_grad():
        full = tgt.model(input_ids=seq).logits.float().log_softmax(-1)[0]
    want_v, want_i = full.topk(k, -1)
    torch.testing.assert_close(logp[0], want_v, atol=1e-5, rtol=1e-5)
    assert torch.equal(ids[0].long(), want_i) and ids.dtype == torch.int32
    g = torch.Generator().manual_seed(3)
    for _ in range(3):
        b = sample_batch(data, 3, 8, 4, 24, 7, 0.0, g)
        idx, starts, L = b["idx"].tolist(), b["starts"].tolist(), b["seqs"].shape[1]
        f0, i0, l0 = window_targets(tgt, data, idx, starts, L, layers, None, k)
        assert i0.shape == (3, L, k) and l0.shape == (3, L, k)
        for cache in (mem, disk):
            f1, i1, l1 = window_targets(tgt, data, idx, starts, L, layers, cache, k)
            torch.testing.assert_close(f1, f0, atol=1e-5, rtol=1e-5)
            assert torch.equal(i1, i0)
            torch.testing.assert_close(l1, l0, atol=1e-5, rtol=1e-5)
        for r in range(3):  # -1 / -inf past a row's end
            n = int(b["attn"][r].sum())
            assert bool((i0[r, n:] == -1).all()) and bool((i0[r, :n] >= 0).all())
    with pytest.raises(ValueError, match="soft_topk"):
        window_targets(tgt, data, idx, starts, L, layers, plain, k)
    with pytest.raises(ValueError, match="soft_topk"):
        FeatureCache(data, layers, width, tgt.dtype, soft_topk=-1)


def test_soft_targets_align_with_labels_and_draft_vocab() -> None:
    """Block position k of anchor a takes the distribution stored at window position a + k - 1,
    kept to the draft vocabulary and renormalised; with none of it there, the hard label."""
    from specdiff_ext.training.dflash import soft_targets

    V, L, k = 10, 8, 2
    soft_ids = torch.full((1, L, k), -1, dtype=torch.int64)
    soft_logp = torch.full((1, L, k), float("-inf"))
    for t in range(L):  # position t: tokens t+1 and t+2 (mod V) with probability 0.6 / 0.3
        soft_ids[0, t] = torch.tensor([(t + 1) % V, (t + 2) % V])
        soft_logp[0, t] = torch.tensor([0.6, 0.3]).log()
    anchors = torch.tensor([[2, -1]])
    labels = torch.tensor([[[3, 4, 5], [-1, -1, -1]]])
    cols, probs = soft_targets(labels, anchors, soft_ids, soft_logp, None, V, 0.5)
    assert cols.shape == probs.shape == (1, 2, 3, 3)
    torch.testing.assert_close(probs.sum(-1), torch.ones(1, 2, 3))
    for j in range(3):  # window position 2 + j: ids 3 + j, 4 + j
        assert cols[0, 0, j].tolist() == [3 + j, 3 + j, 4 + j]
        torch.testing.assert_close(probs[0, 0, j], torch.tensor([0.5, 0.5 * 2 / 3, 0.5 / 3]))
    # a draft vocabulary of the even ids: only one of each pair stays, renormalised to 1
    vm = torch.tensor([0, 2, 4, 6, 8])
    cols, probs = soft_targets(torch.tensor([[[1, 2, -1]]]), torch.tensor([[2]]), soft_ids,
                               soft_logp, vm, V, 0.25)
    assert cols[0, 0, 0].tolist() == [1, 0, 2] and probs[0, 0, 0].tolist() == [0.75, 0.0, 0.25]
    assert cols[0, 0, 1].tolist() == [2, 2, 0] and probs[0, 0, 1].tolist() == [0.75, 0.25, 0.0]
    # nothing of the top-k inside the vocabulary: the hard label alone
    vm = torch.tensor([0])
    cols, probs = soft_targets(torch.tensor([[[0, 0, 0]]]), torch.tensor([[2]]), soft_ids,
                               soft_logp, vm, V, 0.5)
    assert probs[0, 0, :, 0].tolist() == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_head_loss_soft_targets_match_autograd(dtype) -> None:
    from specdiff_ext.training.dflash import _HeadCrossEntropy

    g = torch.Generator().manual_seed(4)
    N, H, V, J = 29, 16, 200, 5
    h0 = torch.randn(N, H, generator=g)
    head = (torch.randn(V, H, generator=g) * 0.5).to(dtype)
    cols = torch.randint(0, V, (N, J), generator=g)
    cols[:, 2] = cols[:, 0]  # an id twice in a row: its weights add up
    probs = torch.rand(N, J, generator=g)
    probs[:, -1] = 0.0  # an unused entry
    probs /= probs.sum(-1, keepdim=True)
    w = torch.rand(N, generator=g)
    need = torch.ones(N, dtype=torch.bool)
    t = torch.zeros(N, V).scatter_add_(1, cols, probs)
    ref_h = h0.clone().requires_grad_(True)
    lg = (ref_h.to(dtype) @ head.T).float()
    ref = (-(t * lg.log_softmax(-1)).sum(-1) * w).sum()
    ref.backward(torch.tensor(0.9))
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    for keep_bytes in (0, 1 << 30):
        x = h0.clone().requires_grad_(True)
        loss, hit = _HeadCrossEntropy.apply(x, head, cols, w, need, 8, keep_bytes, probs)
        loss.backward(torch.tensor(0.9))
        torch.testing.assert_close(loss, ref.detach(), atol=1e-4, rtol=1e-5)
        assert torch.equal(hit, lg.argmax(-1) == cols[:, 0])
        torch.testing.assert_close(x.grad, ref_h.grad, **tol)
    # a one-hot soft target is the hard loss
    one = torch.zeros(N, J)
    one[:, 0] = 1.0
    a, _ = _HeadCrossEntropy.apply(h0, head, cols, w, need, 8, 0, one)
    b, _ = _HeadCrossEntropy.apply(h0, head, cols[:, 0], w, need, 8, 0)
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="probs"):
        _HeadCrossEntropy.apply(h0, head, cols, w, need, 8, 0)


def test_train_dflash_feature_cache_modes_agree(chat_target, tmp_path: Path) -> None:
    from specdiff_ext.training.data import generate_dataset
    from specdiff_ext.training.dflash import build_parser, train

    g = torch.Generator().manual_seed(8)
    prompts = [" ".join(f"w{int(i)}" for i in torch.randint(0, 50, (int(n),), generator=g))
               for n in torch.randint(8, 20, (16,), generator=g)]
    data_dir = tmp_path / "data"
    generate_dataset(chat_target, data_dir, prompts=prompts, num_prompts=12, max_new_tokens=12,
                     temperatures=(0.0,), shard_size=12, batch_size=6, heldout_fraction=0.0,
                     progress=False)
    # --max-len 20: windows start past 0 too
    common = ["--data", str(data_dir), "--batch", "3", "--anchors", "6", "--block-size", "4",
              "--layers", "1", "--warmup", "1", "--lr", "3e-3", "--eval-every", "0",
              "--save-every", "3", "--max-len", "20"]
    runs, logs = {}, {}
    for mode in ("none", "memory", str(tmp_path / "fc")):
        logs[mode] = []
        runs[mode] = train(build_parser().parse_args(
            common + ["--out", str(tmp_path / f"o{len(runs)}"), "--steps", "6",
                      "--feature-cache", mode]), target=chat_target, log=logs[mode].append)
    losses = {m: [h["loss"] for h in r["history"]] for m, r in runs.items()}
    for m in losses:  # the same batches, the same features: the same training
        assert losses[m] == pytest.approx(losses["none"], rel=1e-4, abs=1e-5), m
    assert any("feature cache: none" in x for x in logs["none"])
    assert any("feature cache: memory" in x for x in logs["memory"])
    auto: list = []
    train(build_parser().parse_args(common + ["--out", str(tmp_path / "auto"), "--steps", "1",
                                              "--feature-cache-gb", "1e-9"]),
          target=chat_target, log=auto.append)
    assert any("feature cache: none (auto" in x for x in auto)
    # a resumed run on the folder finds the sequences the first run stored
    disk = str(tmp_path / "fc")
    msgs: list = []
    r = train(build_parser().parse_args(common + ["--out", str(tmp_path / "o2"), "--steps", "9",
                                                  "--resume", "--feature-cache", disk]),
              target=chat_target, log=msgs.append)
    assert r["step"] == 9
    stored = [x for x in msgs if x.startswith("feature cache:")][0]
    assert " 0 stored already" not in stored and "stored already" in stored
    # the KL term: the same training with and without a cache, and not the hard-label one
    kl = {}
    for mode in ("none", "memory"):
        logs = []
        kl[mode] = train(build_parser().parse_args(
            common + ["--out", str(tmp_path / f"kl_{mode}"), "--steps", "6", "--feature-cache",
                      mode, "--kl-weight", "0.5", "--kl-topk", "8"]),
            target=chat_target, log=logs.append)
        assert any("KL term: weight 0.5 on the target's top-8" in x for x in logs)
    kl_losses = {m: [h["loss"] for h in r["history"]] for m, r in kl.items()}
    assert kl_losses["memory"] == pytest.approx(kl_losses["none"], rel=1e-4, abs=1e-5)
    assert kl_losses["none"] != pytest.approx(losses["none"], rel=1e-3)
    for bad, msg in ((["--kl-weight", "1.5"], "--kl-weight"),
                     (["--kl-weight", "0.5", "--kl-topk", "0"], "--kl-topk")):
        with pytest.raises(ValueError, match=msg):
            train(build_parser().parse_args(common + ["--out", str(tmp_path / "bad"), "--steps",
                                                      "1"] + bad), target=chat_target)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_head_loss_matches_autograd_in_both_backward_modes(dtype) -> None:
    from specdiff_ext.training.dflash import _HeadCrossEntropy

    g = torch.Generator().manual_seed(2)
    N, H, V = 37, 16, 300
    h0 = torch.randn(N, H, generator=g)
    head = (torch.randn(V, H, generator=g) * 0.5).to(dtype)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[:5] = (h0[:5].to(dtype) @ head.T).float().argmax(-1)  # some rows hit
    w = torch.rand(N, generator=g)
    need = torch.rand(N, generator=g) < 0.7
    need[:4] = True
    ref_h = h0.clone().requires_grad_(True)
    lg = (ref_h.to(dtype) @ head.T).float()
    ref = (F.cross_entropy(lg, labels, reduction="none") * w).sum()
    ref.backward(torch.tensor(1.7))
    want_hit = (lg.argmax(-1) == labels) & need
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    for keep_bytes in (0, 1 << 30):  # recompute in the backward / keep the gradient rows
        x = h0.clone().requires_grad_(True)
        loss, hit = _HeadCrossEntropy.apply(x, head, labels, w, need, 8, keep_bytes)
        loss.backward(torch.tensor(1.7))
        torch.testing.assert_close(loss, ref.detach(), atol=1e-4, rtol=1e-5)
        assert torch.equal(hit, want_hit) and int(hit.sum()) >= 3
        torch.testing.assert_close(x.grad, ref_h.grad, **tol)


# ------------------------------------------------------------------------------ draft vocabulary

def test_draft_vocabulary_scores_a_subset_and_keeps_the_decoder_exact(tmp_path: Path) -> None:
    """A draft vocabulary (`vocab_map`): the logits are the full head's columns at those ids; it
    round-trips through the folder (beside the published weights, which stay the published
    layout); greedy decoding stays the target's own, also when the target's tokens lie outside
    the subset; export (draft_vocab=False) drops it."""
    import safetensors.torch as st

    from specdiff_ext.drafter.checkpoint import DRAFT_VOCAB_NAME
    from specdiff_ext.drafter.dflash import frequent_vocab

    tgt = tiny_target()
    d = _drafter(tgt, std=0.5)
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(1, 6, d.config.feature_size, generator=g)
    cache = d.new_cache(1).append_context(feats, last=torch.tensor([[4]]))
    block = torch.full((1, 4), 7)
    with torch.no_grad():
        full = d.block_logits(cache, block)
        vm = torch.tensor([3, 8, 9, 21, 30, 44, 50, 60])
        d.set_draft_vocab(vm)
        assert d.config.draft_vocab_size == 8 and d.config.drafter_vocab_size == 8
        torch.testing.assert_close(d.block_logits(cache, block), full[..., vm])
    save_dflash(d, tmp_path / "k")
    assert set(st.load_file(str(tmp_path / "k" / "model.safetensors"))) == set(d.state_dict())
    assert "vocab_map" not in d.state_dict()
    hf = json.loads((tmp_path / "k" / "config.json").read_text())
    assert hf["specdiff"]["draft_vocab_size"] == 8
    back = load_drafter(tmp_path / "k", tgt.input_embeddings, tgt.lm_head_weight,
                        target_name=tgt.name)
    assert torch.equal(back.vocab_map, vm) and back.config.draft_vocab_size == 8
    prompt = torch.tensor([[5, 17, 3, 42, 8, 11]])
    want = ARDecoder(tgt).generate(prompt, 24).ids
    assert any(t not in vm.tolist() for t in want)  # some target tokens cannot be drafted
    for budget in (0, 6):
        assert SpecDiffDecoder(tgt, back, gamma=4, tree_budget=budget,
                               tree_ngram=False).generate(prompt, 24).ids == want
    save_dflash(back, tmp_path / "k", draft_vocab=False)  # rewritten in place: the map goes
    assert not (tmp_path / "k" / DRAFT_VOCAB_NAME).exists()
    assert load_drafter(tmp_path / "k", tgt.input_embeddings, tgt.lm_head_weight,
                        target_name=tgt.name).vocab_map is None
    # bad maps and folders: clear errors naming what is wrong
    for bad, msg in ((torch.tensor([1, 1]), "repeat"), (torch.tensor([0, 61]), r"\[0, V\)"),
                     (torch.tensor([[1, 2]]), "shape"), (torch.tensor([0.5]), "integer")):
        with pytest.raises(ValueError, match=msg):
            d.set_draft_vocab(bad)
    save_dflash(d, tmp_path / "m")
    (tmp_path / "m" / DRAFT_VOCAB_NAME).unlink()
    with pytest.raises(ValueError, match="draft_vocab.safetensors: no such file"):
        load_drafter(tmp_path / "m", tgt.input_embeddings, tgt.lm_head_weight,
                     target_name=tgt.name)
    with pytest.raises(ValueError, match="draft_vocab_size"):
        DFlashDrafter(DFlashConfig(vocab_size=50, hidden_size=32, n_heads=4, n_kv_heads=2,
                                   head_dim=8, intermediate_size=64, num_target_layers=6,
                                   mask_token_id=3, draft_vocab_size=5),
                      torch.randn(50, 32), torch.randn(50, 32))
    assert frequent_vocab(torch.tensor([0, 3, 3, 1]), 2).tolist() == [1, 2]


def test_train_dflash_with_a_draft_vocabulary(chat_target, tmp_path: Path) -> None:
    """--draft-vocab K: the K most frequent generated training tokens; the loss only over them
    (labels outside carry none); the checkpoint keeps the map; resuming keeps it, and asking a
    resumed run for another size is refused."""
    from specdiff_ext.training.data import generated_token_counts, load_shards
    from specdiff_ext.training.dflash import build_parser, draft_labels, train

    assert draft_labels(torch.tensor([[5, -1, 2, 9]]), torch.tensor([2, 9]), 10).tolist() == \
        [[-1, -1, 0, 1]]
    data_dir = _word_data(chat_target, tmp_path, seed=4, n=30, num_prompts=16, max_new_tokens=12)
    data = load_shards(data_dir, [0.0])[0]
    counts = generated_token_counts(data, 60)
    # the counts are of generated tokens only: prompt tokens are not labels
    gen = [int(t) for i in range(len(data)) for t in
           data.tokens[int(data.offsets[i]) + int(data.prompt_lens[i]):int(data.offsets[i + 1])]]
    assert counts.tolist() == torch.bincount(torch.tensor(gen), minlength=60).tolist()
    common = ["--data", str(data_dir), "--batch", "2", "--anchors", "4", "--block-size", "3",
              "--layers", "1", "--warmup", "1", "--eval-every", "0", "--save-every", "3",
              "--max-len", "48", "--draft-vocab", "6"]
    quiet = lambda *a: None  # noqa: E731
    out = tmp_path / "run"
    r = train(build_parser().parse_args(common + ["--out", str(out), "--steps", "3"]),
              target=chat_target, log=quiet)
    vm = r["drafter"].vocab_map
    assert vm is not None and vm.numel() == 6
    assert set(vm.tolist()) == set(counts.topk(6).indices.tolist()) or \
        sorted(counts[vm].tolist()) == sorted(counts.topk(6).values.tolist())
    loaded = load_drafter(out, chat_target.input_embeddings, chat_target.lm_head_weight,
                          target_name=chat_target.name)
    assert torch.equal(loaded.vocab_map.cpu(), vm.cpu())
    msgs: list = []
    r2 = train(build_parser().parse_args(common + ["--out", str(out), "--steps", "5",
                                                   "--resume"]), target=chat_target,
               log=msgs.append)
    assert r2["step"] == 5 and torch.equal(r2["drafter"].vocab_map.cpu(), vm.cpu())
    with pytest.raises(ValueError, match="--draft-vocab 8"):
        train(build_parser().parse_args(common[:-1] + ["8", "--out", str(out), "--steps", "6",
                                                       "--resume"]), target=chat_target,
              log=quiet)


def test_int8_drafting_packs_beside_the_float_weights_and_stays_exact() -> None:
    """`pack_int8`: the same state dict, logits close to the float ones, the float logits back
    bit for bit after `unpack_int8`; greedy decoding with an int8 drafter is the target's own
    (chain, several steps, tree); bad modes name draft_int8."""
    from specdiff_ext.drafter.int8 import int8_available, pack_int8, unpack_int8
    from specdiff_ext.pretrained import set_draft_int8

    if not int8_available():
        pytest.skip("this torch build has no int8 CPU engine")
    tgt = tiny_target()
    d = _drafter(tgt, std=0.5)
    d.set_draft_vocab(torch.arange(0, 61, 2))
    g = torch.Generator().manual_seed(3)
    cache_feats = torch.randn(1, 9, d.config.feature_size, generator=g)
    cache = d.new_cache(1).append_context(cache_feats, last=torch.tensor([[4]]))
    block = torch.full((1, 4), 7)
    sd = {k: v.clone() for k, v in d.state_dict().items()}
    with torch.no_grad():
        ref = d.block_logits(cache, block)
        pack_int8(d)
        assert d.int8 and type(d.fc) is torch.nn.Linear  # the features' projection stays float
        assert type(d.layers[0].self_attn.q_proj).__name__ == "Int8Linear"
        got = d.block_logits(cache, block)
        assert got.shape == ref.shape and torch.isfinite(got).all()
        err = (got - ref).abs().max() / ref.abs().max()
        assert 0 < err < 0.1, err  # int8 rounding (7-bit activations): visible, small
        # each row of a batch is computed as it would be alone (activation scales per row)
        batched = d.batch_block_logits([cache, cache], [4, 2])
        assert torch.equal(batched[0], got)
        assert torch.equal(batched[1], d.block_logits(cache, block[:, :2]))
        two = d.new_cache(2).append_context(torch.cat([cache_feats, cache_feats.flip(1)]),
                                            last=torch.tensor([[4], [9]]))
        one = d.new_cache(1).append_context(cache_feats.flip(1), last=torch.tensor([[9]]))
        assert torch.equal(d.block_logits(two, block.expand(2, -1))[1:], d.block_logits(one, block))
        assert sd.keys() == d.state_dict().keys()
        assert all(torch.equal(sd[k], v) for k, v in d.state_dict().items())
        prompt = torch.tensor([[5, 17, 3, 42, 8, 11]])
        want = ARDecoder(tgt).generate(prompt, 24).ids
        for kw in (dict(tree_budget=0), dict(tree_budget=0, steps=2, commit="random"),
                   dict(tree_budget=6, tree_ngram=False)):
            assert SpecDiffDecoder(tgt, d, gamma=4, **kw).generate(prompt, 24).ids == want, kw
    with torch.inference_mode():  # (the evals decode under it): a head cached in it repacks
        d.set_target_weights(tgt.input_embeddings, tgt.lm_head_weight)
        assert torch.equal(d.block_logits(cache, block), got)
    with torch.no_grad():
        unpack_int8(d)
        assert not d.int8 and torch.equal(d.block_logits(cache, block), ref)
    assert set_draft_int8(d, "on") and d.int8
    assert not set_draft_int8(d, False) and not d.int8
    with pytest.raises(ValueError, match="draft_int8"):
        set_draft_int8(d, "sometimes")


def test_train_dflash_shape_flags_against_a_loaded_drafter() -> None:
    """With --init-from, --block-size retrains at that block; --layers / --target-layer-ids that
    contradict the loaded weights are refused by name, as is a new block on --resume."""
    import argparse

    from specdiff_ext.training.dflash import _adopt_shape, build_parser

    cfg = _drafter(tiny_target()).config  # 2 layers, target layers [0, 1], block 5
    base = ["--data", "d", "--out", "o"]
    for extra, block in (([], 5), (["--block-size", "8"], 8), (["--layers", "2"], 5),
                         (["--target-layer-ids", "0,1"], 5)):
        c = DFlashConfig.from_dict(cfg.to_dict())
        _adopt_shape(c, build_parser().parse_args(base + extra), "src", resume=False)
        assert c.block_size == block, extra
    for extra, resume, msg in ((["--layers", "3"], False, "--layers 3"),
                               (["--target-layer-ids", "0,2"], False, "--target-layer-ids"),
                               (["--block-size", "8"], True, "--block-size 8"),
                               (["--block-size", "1"], False, "--block-size")):
        with pytest.raises(ValueError, match=msg):
            _adopt_shape(DFlashConfig.from_dict(cfg.to_dict()),
                         build_parser().parse_args(base + extra), "src", resume=resume)
    assert isinstance(build_parser().parse_args(base), argparse.Namespace)


def test_prefer_int8_times_both_ways_and_leaves_the_drafter_as_it_answers() -> None:
    """`calibrate.prefer_int8` (the "auto" mode): packed exactly when it answers True; a margin
    no timing can meet (0) always answers float, one every timing meets (1e9) always int8."""
    from specdiff_ext.calibrate import prefer_int8
    from specdiff_ext.drafter.int8 import int8_available
    from specdiff_ext.pretrained import set_draft_int8

    if not int8_available():
        pytest.skip("this torch build has no int8 CPU engine")
    d = _drafter(tiny_target())
    assert prefer_int8(d, context=8, reps=1, margin=0.0) is False and not d.int8
    assert prefer_int8(d, context=8, reps=1, margin=1e9) is True and d.int8
    assert set_draft_int8(d, "auto") == d.int8
