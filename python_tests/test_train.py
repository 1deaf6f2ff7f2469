"""Distillation data and the ar-spec drafter's trainer (specdiff_ext.training.data / train) on
tiny models: the ShareGPT reader on a truncated file, the held-out split, the learning-rate
schedule, resumable generation with a tiny random Llama target, and ``specdiff train-drafter``
(the ar drafter only): checkpoint, resume, and a resumed run equal to an uninterrupted one.
The DFlash trainer's tests are in test_dflash.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from specdiff_ext.drafter.ar import is_ar_checkpoint, load_ar_drafter
from specdiff_ext.training import data as data_mod
from specdiff_ext.training.data import generate_dataset, load_shards, read_sharegpt
from specdiff_ext.training.train import build_parser, lr_at, train

VOCAB, HIDDEN, LAYERS = 61, 32, 3


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one thread is fastest, and immune to oversubscription on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ------------------------------------------------------------------------------ reader

def test_sharegpt_reader_stops_at_truncated_record(tmp_path: Path) -> None:
    recs = [
        {"id": "a", "conversations": [{"from": "human", "value": " first "},
                                       {"from": "gpt", "value": "x"}]},
        {"id": "b", "conversations": [{"from": "gpt", "value": "no human first"},
                                       {"from": "human", "value": "second"}]},
        {"id": "c", "conversations": []},
        {"id": "d", "conversations": [{"from": "human", "value": "third, with \"quotes\" ]"}]},
        {"id": "e", "conversations": [{"from": "human", "value": "never read"}]},
    ]
    text = "[\n" + ",\n".join(json.dumps(r, indent=2) for r in recs) + "\n]"
    cut = text.index('"never read"') + 5  # inside the last record
    path = tmp_path / "sg.json"
    path.write_text(text[:cut])
    assert list(read_sharegpt(path)) == ["first", "second", 'third, with "quotes" ]']
    assert list(read_sharegpt(path, limit=2)) == ["first", "second"]
    path.write_text(text)  # complete file: every record
    assert list(read_sharegpt(path))[-1] == "never read"


def test_heldout_split_is_stable() -> None:
    prompts = [f"prompt {i}" for i in range(400)]
    train1, held1 = data_mod.split_prompts(prompts, 0.1)
    train2, held2 = data_mod.split_prompts(list(reversed(prompts)), 0.1)
    assert set(held1) == set(held2) and 15 < len(held1) < 70
    assert not set(train1) & set(held1)


# ------------------------------------------------------------------------------ schedule

def test_lr_schedule() -> None:
    assert lr_at(0, 1.0, 10, 100, 0.1) == pytest.approx(0.1)
    assert lr_at(9, 1.0, 10, 100, 0.1) == pytest.approx(1.0)
    assert lr_at(100, 1.0, 10, 100, 0.1) == pytest.approx(0.1)
    assert 0.1 < lr_at(55, 1.0, 10, 100, 0.1) < 1.0


# ------------------------------------------------------------------------------ tiny target

@pytest.fixture(scope="module")
def tiny_target(tmp_path_factory: pytest.TempPathFactory):
    transformers = pytest.importorskip("transformers")
    from test_target import _tiny_tokenizer

    from specdiff_ext.target import load_target

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64,
                                      num_hidden_layers=LAYERS, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=256,
                                      tie_word_embeddings=True)  # the ar drafter shares the head
    folder = tmp_path_factory.mktemp("tiny-llama-train")
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    _tiny_tokenizer().save_pretrained(folder)
    return load_target(folder)


def _prompts(n: int) -> list[str]:
    g = torch.Generator().manual_seed(3)
    return [" ".join(f"w{int(i)}" for i in torch.randint(0, 50, (int(l),), generator=g))
            for l in torch.randint(2, 9, (n,), generator=g)]


def test_generation_resumable(tiny_target, tmp_path: Path) -> None:
    kw = dict(prompts=_prompts(40), num_prompts=24, max_new_tokens=6, temperatures=(0.0, 1.0),
              shard_size=8, batch_size=4, heldout_fraction=0.2, topk=3, progress=False)
    out = tmp_path / "data"
    m1 = generate_dataset(tiny_target, out, max_shards=2, **kw)
    assert len(m1["shards"]) == 2 and not m1["complete"]
    first = {s["file"]: (out / s["file"]).stat().st_mtime_ns for s in m1["shards"]}
    m2 = generate_dataset(tiny_target, out, **kw)
    assert m2["complete"] and len(m2["shards"]) == 6
    for f, t in first.items():  # finished shards were skipped, not rewritten
        assert (out / f).stat().st_mtime_ns == t
    assert m2["split"]["num_heldout"] > 0 and (out / "heldout.jsonl").is_file()
    assert m2["settings"]["target"] == tiny_target.name
    data, _ = load_shards(out)
    assert len(data) == 2 * m2["split"]["num_train"]
    gl = data.lengths - data.prompt_lens
    assert ((gl >= 1) & (gl <= 6)).all()
    assert data.topk_ids.shape == (int(gl.sum()), 3)
    greedy, _ = load_shards(out, temperatures=[0.0])
    # greedy continuations: the token is the target's argmax (top-1 of the stored logits)
    gen_pos = torch.cat([torch.arange(int(greedy.offsets[i]) + int(greedy.prompt_lens[i]),
                                      int(greedy.offsets[i + 1])) for i in range(len(greedy))])
    assert torch.equal(greedy.tokens[gen_pos], greedy.topk_ids[:, 0])
    with pytest.raises(ValueError, match="other settings"):
        generate_dataset(tiny_target, out, **{**kw, "max_new_tokens": 7})


def test_generation_skip_prompts_continues_a_dataset(tiny_target, tmp_path: Path) -> None:
    """skip_prompts=N generates for the training prompts after the first N: a second dataset
    beside one of num_prompts=N, with no prompt in both, its prompt_index counting on from N,
    and folders written without it resuming as before."""
    kw = dict(prompts=_prompts(60), max_new_tokens=3, temperatures=(0.0,), shard_size=8,
              batch_size=8, heldout_fraction=0.2, progress=False)
    first = generate_dataset(tiny_target, tmp_path / "a", num_prompts=16, **kw)
    second = generate_dataset(tiny_target, tmp_path / "b", num_prompts=16, skip_prompts=16, **kw)
    both = generate_dataset(tiny_target, tmp_path / "c", num_prompts=32, **kw)
    assert "skip_prompts" not in first["settings"] and second["settings"]["skip_prompts"] == 16
    a, _ = load_shards(tmp_path / "a")
    b, _ = load_shards(tmp_path / "b")
    c, _ = load_shards(tmp_path / "c")

    def prompts(d):
        return [tuple(d.tokens[int(d.offsets[i]):int(d.offsets[i]) + int(d.prompt_lens[i])].tolist())
                for i in range(len(d))]

    assert len(b) == 16 and not set(prompts(a)) & set(prompts(b))
    assert prompts(a) + prompts(b) == prompts(c)  # the two halves of one 32-prompt dataset
    import safetensors.torch as st
    idx = st.load_file(str(tmp_path / "b" / second["shards"][0]["file"]))["prompt_index"]
    assert idx.tolist() == list(range(16, 24))
    with pytest.raises(ValueError, match="other settings"):  # a resume keeps its skip
        generate_dataset(tiny_target, tmp_path / "b", num_prompts=16, skip_prompts=8, **kw)
    with pytest.raises(ValueError, match="skip_prompts"):
        generate_dataset(tiny_target, tmp_path / "d", num_prompts=16, skip_prompts=-1, **kw)


def test_train_drafter_trains_the_ar_drafter(tiny_target, tmp_path: Path, capsys) -> None:
    """``specdiff train-drafter`` without --ar (the flag is still accepted) trains the ar-spec
    drafter: an ar checkpoint that loads and resumes, a note pointing at train-dflash, and a
    --help that says what it trains."""
    data_dir = tmp_path / "data"
    generate_dataset(tiny_target, data_dir, prompts=_prompts(40), num_prompts=16,
                     max_new_tokens=12, temperatures=(0.0,), shard_size=16, batch_size=8,
                     heldout_fraction=0.2, topk=4, progress=False)
    common = ["--data", str(data_dir), "--batch", "4", "--gamma", "3", "--warmup", "2",
              "--lr", "3e-3", "--eval-every", "3", "--eval-prompts", "2", "--eval-rounds", "2",
              "--no-progress", "--layers", "2", "--init-from-target", "spread"]
    msgs: list = []
    first = train(build_parser().parse_args(common + ["--out", str(tmp_path / "a"),
                                                      "--steps", "3"]),
                  target=tiny_target, log=msgs.append)
    assert first["step"] == 3 and "eval_accepted_per_round" in first["last"]
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in first["history"])
    assert any("train-dflash" in m for m in msgs) and any("ar drafter" in m for m in msgs)
    assert is_ar_checkpoint(tmp_path / "a")
    msgs = []
    resumed = train(build_parser().parse_args(common + ["--out", str(tmp_path / "a"), "--ar",
                                                        "--steps", "5", "--resume"]),
                    target=tiny_target, log=msgs.append)
    assert any("resumed" in m and "step 3" in m for m in msgs)
    assert not any("train-dflash" in m for m in msgs)  # --ar: no note
    assert resumed["step"] == 5 and len(resumed["history"]) == 5
    loaded = load_ar_drafter(tmp_path / "a", tiny_target)
    trained = dict(resumed["drafter"].named_parameters())
    for n, p in loaded.model.named_parameters():
        torch.testing.assert_close(p, trained[n].detach())
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "ar-spec" in help_text and "specdiff train-dflash" in help_text


def test_resume_reproduces_uninterrupted_run(tiny_target, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    generate_dataset(tiny_target, data_dir, prompts=_prompts(30), num_prompts=12,
                     max_new_tokens=10, temperatures=(1.0,), shard_size=12, batch_size=6,
                     heldout_fraction=0.2, progress=False)
    common = ["--data", str(data_dir), "--ar", "--batch", "3", "--gamma", "4", "--layers", "1",
              "--warmup", "2", "--steps", "6", "--eval-every", "0", "--no-progress"]
    a = train(build_parser().parse_args(common + ["--out", str(tmp_path / "a")]),
              target=tiny_target, log=lambda *a: None)
    # interrupted: stop after step 3 (a checkpoint every 3 steps), then resume
    out_b = tmp_path / "b"
    args_b = build_parser().parse_args(common + ["--out", str(out_b), "--save-every", "3"])
    args_b.steps = 6
    import specdiff_ext.training.train as tr

    real_save = tr._save
    calls = []

    def save_then_stop(out, drafter, opt, step, *rest):
        real_save(out, drafter, opt, step, *rest)
        calls.append(step)
        if step == 3:
            raise KeyboardInterrupt

    tr._save = save_then_stop
    try:
        with pytest.raises(KeyboardInterrupt):
            train(args_b, target=tiny_target, log=lambda *a: None)
    finally:
        tr._save = real_save
    state = torch.load(out_b / "trainer_state.pt", weights_only=False)
    assert state["step"] == 3 and state["optimizer"]["state"]
    b = train(build_parser().parse_args(common + ["--out", str(out_b), "--resume"]),
              target=tiny_target, log=lambda *a: None)
    assert b["step"] == 6
    for k, v in a["drafter"].state_dict().items():
        torch.testing.assert_close(b["drafter"].state_dict()[k], v, atol=1e-6, rtol=1e-5)
    # the optimizer moments after resuming match the uninterrupted run's
    sa, sb = a["optimizer"].state_dict()["state"], b["optimizer"].state_dict()["state"]
    for i in sa:
        torch.testing.assert_close(sb[i]["exp_avg"], sa[i]["exp_avg"], atol=1e-6, rtol=1e-5)
