"""The target_features context mode end to end: the multi-block training forward against the
cached drafter, the shift convention (position t reads the target's states at t - 1) in the
trainer's batches and in the decode loop, and greedy exactness of the decoder in this mode."""

from __future__ import annotations

import pytest
import torch

from specdiff_ext.decoding import ARDecoder, SpecDiffDecoder
from specdiff_ext.drafter import DiffusionDrafter, DrafterConfig
from specdiff_ext.training.losses import make_blocks, multi_block_hidden
from specdiff_ext.training.data import TokenData
from specdiff_ext.training.features import compute_features, load_features, shifted_window_features

pytest.importorskip("transformers")

from test_decoding import tiny_target  # noqa: E402

LAYERS = [1, -1]


def _tf_drafter(target, seed: int = 3, std: float = 0.2, cond: bool = True) -> DiffusionDrafter:
    torch.manual_seed(seed)
    cfg = DrafterConfig.from_hf_config(
        target.model.config, target.name, n_layers=2, context_mode="target_features",
        features_with_tokens=True, feature_layers=LAYERS, block_conditioning=cond,
        target_feature_size=len(LAYERS) * target.hidden_size, init_std=std)
    return DiffusionDrafter(cfg, target.input_embeddings, target.lm_head_weight).eval()


@pytest.mark.parametrize("cond", [False, True], ids=["attention-only", "block-conditioning"])
def test_multi_block_forward_matches_cached_drafter_with_features(cond: bool) -> None:
    tgt = tiny_target()
    d = _tf_drafter(tgt, cond=cond)
    g = torch.Generator().manual_seed(1)
    seqs = torch.randint(0, 50, (2, 20), generator=g)
    feats = torch.randn(2, 20, d.config.feature_size, generator=g)
    lengths, lo = torch.tensor([20, 13]), torch.tensor([2, 4])
    b = make_blocks(seqs, lengths, lo, 4, 5, d.config.mask_id, gen=g, eps=0.3)
    with torch.no_grad():
        hid = multi_block_hidden(d, b.context, b.anchors, b.noised, feats)
        logits = torch.nn.functional.linear(hid, d.head_weight())
        for r in range(2):
            for k in range(5):
                a = int(b.anchors[r, k])
                ref = d(seqs[r:r + 1, :a + 1], b.noised[r:r + 1, k], feats[r:r + 1, :a + 1])[0]
                torch.testing.assert_close(logits[r, k], ref, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="needs the context features"):
        multi_block_hidden(d, b.context, b.anchors, b.noised)


def test_feature_file_and_shifted_windows(tmp_path) -> None:
    tgt = tiny_target()
    g = torch.Generator().manual_seed(0)
    lens = [7, 12, 5]
    toks = torch.randint(0, 60, (sum(lens),), generator=g)
    offsets = torch.tensor([0, 7, 19, 24])
    data = TokenData(toks, offsets, torch.tensor([2, 3, 1]))
    f = compute_features(tgt, data, LAYERS, tmp_path / "f.safetensors", batch_tokens=16,
                         progress=False, dtype=torch.float32)
    torch.testing.assert_close(load_features(tmp_path / "f.safetensors", LAYERS), f)
    with pytest.raises(ValueError, match="holds features of layers"):
        load_features(tmp_path / "f.safetensors", [0])
    # row 1 alone through the target: the stored features are its hidden states
    out = tgt.forward(toks[7:19][None], hidden_layers=LAYERS)
    torch.testing.assert_close(f[7:19], torch.cat(out.hidden, -1)[0], atol=1e-5, rtol=1e-5)
    w = shifted_window_features(f, data, [1, 1, 2], [0, 4, 0], 9)
    assert (w[0, 0] == 0).all()  # a sequence's first token has no predecessor
    torch.testing.assert_close(w[0, 1:9], f[7:15])
    torch.testing.assert_close(w[1, :8], f[7 + 3: 7 + 11])  # window from position 4
    torch.testing.assert_close(w[2, 1:5], f[19:23])
    assert (w[2, 5:] == 0).all()  # past the row's end


@pytest.mark.parametrize("cond", [False, True], ids=["attention-only", "block-conditioning"])
def test_decoder_feeds_shifted_target_states_and_is_exact(cond: bool) -> None:
    tgt = tiny_target()
    d = _tf_drafter(tgt, cond=cond)
    prompt = torch.tensor([[5, 17, 3, 42, 8, 11]])
    want = ARDecoder(tgt).generate(prompt, 30).ids
    for mode, steps in (("left_to_right", 1), ("random", 3), ("confidence", 2)):
        dec = SpecDiffDecoder(tgt, d, gamma=4, steps=steps, commit=mode, tree_budget=0)
        got = dec.generate(prompt, 30)
        assert got.ids == want, mode
    # the drafter's cache equals an uncached encoding of the whole text with shifted features
    full = torch.cat([prompt, torch.tensor([got.ids])], 1)[:, :-1]  # all but the unread last
    n = full.shape[1]
    hid = torch.cat(tgt.forward(full, hidden_layers=LAYERS).hidden, -1)  # (1, n, H_f)
    feats = torch.zeros_like(hid)
    feats[:, 1:] = hid[:, :-1]
    ref = d.new_cache(1).append_context(full, feats)
    cache = dec.drafter.cache
    assert int(cache.lengths[0]) == n
    for i in range(len(d.layers)):
        torch.testing.assert_close(cache.keys[i][:, :, :n], ref.keys[i][:, :, :n],
                                   atol=1e-4, rtol=1e-4)
    if cond:
        torch.testing.assert_close(cache.cond[:, :n], ref.cond[:, :n], atol=1e-4, rtol=1e-4)
        # the block reads the newest position's conditioning: cropping changes the logits
        blk = torch.full((1, 3), d.config.mask_id)
        a = d.block_logits(cache, blk)
        cache.crop(n - 1)
        assert not torch.allclose(a, d.block_logits(cache, blk))
    sampled = SpecDiffDecoder(tgt, d, gamma=3, steps=2, commit="random").generate(
        prompt, 20, temperature=1.0, seed=5)
    assert len(sampled.ids) == 20


def test_decoder_refuses_a_features_drafter_it_cannot_feed() -> None:
    tgt = tiny_target()
    cfg = DrafterConfig.from_hf_config(tgt.model.config, tgt.name, n_layers=1,
                                       context_mode="target_features", features_with_tokens=True)
    d = DiffusionDrafter(cfg, tgt.input_embeddings, tgt.lm_head_weight)
    with pytest.raises(ValueError, match="feature_layers"):
        SpecDiffDecoder(tgt, d)
