"""The loaders' boundary: hostile drafter folders (DFlash, the ar drafter), data shards with ids
outside the vocabulary, and bad make-data flags are refused with the file and field (or the
flag) named, by the one field checker (`specdiff_ext.drafter.config.check_field`); a folder of
the retired tokens-context drafter is refused as such. No model is loaded here: configs are
checked before any weight is read, and make-data's flags before the target loads."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import specdiff_ext
from specdiff_ext.drafter.ar import read_ar_config
from specdiff_ext.drafter.checkpoint import load_drafter, read_dflash_config
from specdiff_ext.drafter.config import FieldError, check_field
from specdiff_ext.drafter.dflash import DFlashConfig

WEIGHTS = Path(specdiff_ext.__file__).parent / "weights"
NAN, INF = float("nan"), float("inf")


def _copy(tmp_path: Path, name: str) -> Path:
    """The embedded folder `name` in tmp_path: config.json copied, the weights linked."""
    src, dst = WEIGHTS / name, tmp_path / name
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    (dst / "model.safetensors").symlink_to(src / "model.safetensors")
    return dst


def _edit(folder: Path, dotted: str, value) -> None:
    """Set (or, with value ..., delete) config.json's field `dotted` (a.b: a sub-dict's)."""
    p = folder / "config.json"
    cfg = json.loads(p.read_text())
    *outer, key = dotted.split(".")
    d = cfg
    for k in outer:
        d = d[k]
    if value is ...:
        del d[key]
    else:
        d[key] = value
    p.write_text(json.dumps(cfg))  # NaN / Infinity as Python's json writes and reads them


# ------------------------------------------------------------------------------ DFlash folders

DFLASH_HOSTILE = [
    ("rope_theta", NAN),
    ("rope_theta", INF),
    ("rope_theta", "10000"),
    ("rope_theta", 0),
    ("rms_norm_eps", -1),
    ("rms_norm_eps", NAN),
    ("rms_norm_eps", None),
    ("dflash_config.target_layer_ids", []),  # a DFlash drafter with no context
    ("dflash_config.target_layer_ids", ...),
    ("dflash_config.target_layer_ids", ["1", 14, 27]),
    ("dflash_config.target_layer_ids", [1.5, 14, 27]),
    ("dflash_config.target_layer_ids", [1, 14, 30]),
    ("dflash_config.target_layer_ids", 14),
    ("block_size", "4"),
    ("block_size", 4.0),
    ("block_size", 1),
    ("block_size", True),
    ("specdiff.target_hidden_size", -4),
    ("specdiff.target_hidden_size", 0),
    ("specdiff.target_hidden_size", "576"),
    ("specdiff.target_name", 5),
    ("specdiff.extra", []),
    ("specdiff", "x"),
    ("num_hidden_layers", "3"),
    ("num_hidden_layers", 3.7),
    ("num_hidden_layers", 3.0),
    ("num_hidden_layers", True),
    ("num_hidden_layers", 0),
    ("head_dim", 0),
    ("head_dim", 63),
    ("head_dim", "64"),
    ("dflash_config.mask_token_id", "3"),
    ("dflash_config.mask_token_id", -1),
    ("dflash_config.mask_token_id", 49152),
    ("dflash_config.mask_token_id", ...),
    ("dflash_config", None),
    ("num_key_value_heads", 0),
    ("num_key_value_heads", 2),  # 9 heads
    ("num_attention_heads", 9.0),
    ("num_target_layers", "30"),
    ("intermediate_size", -1536),
    ("vocab_size", 49152.0),
    ("hidden_size", False),
    ("attention_bias", "false"),
    ("layer_types", "full_attention"),
    ("rope_parameters", [10000.0]),
    ("rope_parameters.rope_type", "yarn"),
]


@pytest.mark.parametrize("field, value", DFLASH_HOSTILE,
                         ids=[f"{f}={v!r}" for f, v in DFLASH_HOSTILE])
def test_hostile_dflash_configs_are_refused_naming_file_and_field(tmp_path, field, value) -> None:
    folder = _copy(tmp_path, "smollm2-135m-dflash")
    _edit(folder, field, value)
    with pytest.raises(ValueError) as info:
        read_dflash_config(folder)
    msg = str(info.value)
    assert msg.startswith(str(folder / "config.json") + ": "), msg
    assert field in msg, msg
    assert len(msg.splitlines()) == 1
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):  # load_drafter, the same
        load_drafter(folder, torch.zeros(1, 1), torch.zeros(1, 1),
                     target_name="SmolLM2-135M-Instruct")


def test_rope_theta_from_rope_parameters_is_checked_too(tmp_path) -> None:
    folder = _copy(tmp_path, "smollm2-135m-dflash")
    _edit(folder, "rope_theta", ...)
    assert read_dflash_config(folder)[0].rope_theta == 10000.0
    _edit(folder, "rope_parameters.rope_theta", NAN)
    with pytest.raises(ValueError, match=r"config\.json: .*rope_parameters\.rope_theta"):
        read_dflash_config(folder)


def test_the_embedded_dflash_config_passes_and_still_meets_the_target_check(tmp_path) -> None:
    folder = _copy(tmp_path, "smollm2-135m-dflash")
    cfg, _ = read_dflash_config(folder)
    assert (cfg.n_layers, cfg.block_size, cfg.target_layer_ids, cfg.mask_token_id) == \
        (3, 4, [1, 14, 27], 16)
    assert math.isclose(cfg.rms_eps, 1e-5, rel_tol=1e-6) and cfg.target_hidden_size is None
    with pytest.raises(ValueError, match="target_embed must have shape"):  # got past the config
        load_drafter(folder, torch.zeros(1, 1), torch.zeros(1, 1),
                     target_name="SmolLM2-135M-Instruct")


def test_specdiff_generate_reports_a_hostile_drafter_in_one_line(tmp_path, monkeypatch,
                                                                 capsys) -> None:
    """`specdiff generate --drafter DIR`: one line on stderr, exit status 2 (the target is a
    stand-in: the config is refused before its weights are needed)."""
    import specdiff_ext.target as target_mod
    from specdiff_ext import cli

    stand_in = SimpleNamespace(name="SmolLM2-135M-Instruct", input_embeddings=torch.zeros(1, 1),
                               lm_head_weight=torch.zeros(1, 1), device=torch.device("cpu"),
                               dtype=torch.float32)
    monkeypatch.setattr(target_mod, "load_target", lambda *a, **k: stand_in)
    folder = _copy(tmp_path, "smollm2-135m-dflash")
    _edit(folder, "specdiff.target_hidden_size", -4)
    rc = cli.main(["generate", "--drafter", str(folder), "--device", "cpu", "hi"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert "specdiff.target_hidden_size" in err[0] and "config.json" in err[0]


# ------------------------------------------------------------------------------ other drafters

def _tokens_context_folder(folder: Path, context_mode: str = "tokens") -> Path:
    """A folder as the retired tokens-context drafter's trainer wrote it: config.json with
    ``format_version``, the ``drafter`` config, the ``target`` it was distilled from and
    ``extra``, beside model.safetensors."""
    import safetensors.torch as st

    folder.mkdir()
    drafter = {"vocab_size": 49152, "hidden_size": 576, "n_layers": 2, "n_heads": 9,
               "n_kv_heads": 3, "head_dim": 64, "intermediate_size": 1536,
               "rope_theta": 100000.0, "rms_eps": 1e-5, "reduced_vocab": 8192,
               "context_mode": context_mode, "target_feature_size": None,
               "features_with_tokens": False, "feature_layers": None,
               "block_conditioning": False, "learned_mask_embedding": True,
               "attention_bias": False, "init_std": 0.02,
               "target_name": "SmolLM2-135M-Instruct"}
    meta = {"format_version": 1, "drafter": drafter, "extra": {"step": 2000},
            "target": {"name": "SmolLM2-135M-Instruct", "vocab_size": 49152,
                       "hidden_size": 576}}
    (folder / "config.json").write_text(json.dumps(meta, indent=2))
    st.save_file({"mask_embedding": torch.zeros(576)}, str(folder / "model.safetensors"))
    return folder


@pytest.mark.parametrize("mode", ["tokens", "target_features"])
def test_a_retired_tokens_context_folder_is_refused_by_name(tmp_path, mode) -> None:
    folder = _tokens_context_folder(tmp_path / "old", mode)
    with pytest.raises(ValueError) as info:
        load_drafter(folder, torch.zeros(49152, 576), torch.zeros(49152, 576),
                     target_name="SmolLM2-135M-Instruct")
    msg = str(info.value)
    assert str(folder) in msg and "tokens-context drafters were retired" in msg, msg
    assert "specdiff train-dflash" in msg and len(msg.splitlines()) == 1, msg


def test_specdiff_generate_reports_a_retired_drafter_in_one_line(tmp_path, monkeypatch,
                                                                 capsys) -> None:
    """`specdiff generate --drafter OLD`: one line naming the folder and the retirement, exit
    status 2; another drafter kind (the ar drafter's folder) is named as not a DFlash folder."""
    import specdiff_ext.target as target_mod
    from specdiff_ext import cli

    stand_in = SimpleNamespace(name="SmolLM2-135M-Instruct", input_embeddings=torch.zeros(1, 1),
                               lm_head_weight=torch.zeros(1, 1), device=torch.device("cpu"),
                               dtype=torch.float32)
    monkeypatch.setattr(target_mod, "load_target", lambda *a, **k: stand_in)
    folder = _tokens_context_folder(tmp_path / "old")
    rc = cli.main(["generate", "--drafter", str(folder), "--device", "cpu", "hi"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert str(folder) in err[0] and "retired" in err[0] and "train-dflash" in err[0], err
    ar = _copy(tmp_path, "smollm2-135m-ar")
    rc = cli.main(["generate", "--drafter", str(ar), "--device", "cpu", "hi"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "not a DFlash drafter folder" in err[0], err


AR_HOSTILE = [
    ("num_hidden_layers", "2"),
    ("num_hidden_layers", 2.5),
    ("rms_norm_eps", -1),
    ("rope_parameters.rope_theta", NAN),
    ("head_dim", 0),
    ("vocab_size", 100),  # not the target's (the embedding is shared)
    ("hidden_size", "576"),
    ("model_type", 5),
    ("tie_word_embeddings", "true"),
    ("specdiff.target.vocab_size", "49152"),
    ("specdiff.target.name", None),
    ("specdiff.target", ...),
]


@pytest.mark.parametrize("field, value", AR_HOSTILE, ids=[f"{f}={v!r}" for f, v in AR_HOSTILE])
def test_hostile_ar_drafter_configs_are_refused(tmp_path, field, value) -> None:
    folder = _copy(tmp_path, "smollm2-135m-ar")
    _edit(folder, field, value)
    with pytest.raises(ValueError) as info:
        read_ar_config(folder)
    msg = str(info.value)
    assert msg.startswith(str(folder / "config.json") + ": ") and field in msg, msg


def test_the_embedded_ar_drafter_config_passes(tmp_path) -> None:
    raw, meta = read_ar_config(_copy(tmp_path, "smollm2-135m-ar"))
    assert raw["num_hidden_layers"] == 2 and meta["target"]["vocab_size"] == 49152


def test_the_config_dataclasses_check_every_field() -> None:
    tiny = dict(vocab_size=50, hidden_size=32, n_heads=4, n_kv_heads=2, head_dim=8,
                intermediate_size=64)
    for kw, field in (({"block_size": "4"}, "block_size"), ({"rope_theta": NAN}, "rope_theta"),
                      ({"rms_eps": -1.0}, "rms_eps"), ({"n_layers": 3.0}, "n_layers"),
                      ({"head_dim": 0}, "head_dim"), ({"mask_token_id": "3"}, "mask_token_id"),
                      ({"target_hidden_size": -4}, "target_hidden_size"),
                      ({"target_layer_ids": [True]}, "target_layer_ids"),
                      ({"attention_bias": 1}, "attention_bias")):
        with pytest.raises(FieldError, match=field):
            DFlashConfig(**{**tiny, "num_target_layers": 6, "mask_token_id": 3, **kw})


def test_check_field_kinds() -> None:
    assert check_field("x", 3, "int", lo=1) == 3
    assert check_field("x", 3, "real", above=0) == 3.0
    assert check_field("x", None, "int", optional=True) is None
    assert check_field("x", (1, 2), "ints", lo=0, hi=2) == [1, 2]
    for value, kind, category in ((True, "int", "type"), ("3", "int", "type"),
                                  (3.0, "int", "value"), (NAN, "real", "value"),
                                  (False, "real", "type"), (1, "bool", "type"),
                                  ([1, "2"], "ints", "type"), (3, "str", "type")):
        with pytest.raises(FieldError) as info:
            check_field("x", value, kind)
        assert info.value.category == category and info.value.field == "x"


# ------------------------------------------------------------------------------ data shards

def _dataset(tmp_path: Path, tokens, vocab=50, topk_ids=None) -> Path:
    import safetensors.torch as st

    d = tmp_path / "data"
    d.mkdir(exist_ok=True)
    t = {"tokens": torch.tensor(tokens, dtype=torch.int32),
         "lengths": torch.tensor([6, 4], dtype=torch.int32),
         "prompt_lens": torch.tensor([2, 1], dtype=torch.int32)}
    if topk_ids is not None:
        t["topk_ids"] = torch.tensor(topk_ids, dtype=torch.int32).reshape(7, 1)
        t["topk_logits"] = torch.zeros(7, 1, dtype=torch.float16)
    st.save_file(t, str(d / "t0_00000.safetensors"))
    (d / "manifest.json").write_text(json.dumps(
        {"vocab_size": vocab, "shards": [{"file": "t0_00000.safetensors", "temperature": 0.0}]}))
    return d


@pytest.mark.parametrize("bad", [99999, -3, 50])
def test_load_shards_refuses_ids_outside_the_vocabulary(tmp_path, bad) -> None:
    from specdiff_ext.training.data import load_shards

    ok = list(range(10))
    assert load_shards(_dataset(tmp_path, ok))[0].tokens.tolist() == ok
    d = _dataset(tmp_path, ok[:4] + [bad] + ok[5:])
    with pytest.raises(ValueError, match=r"t0_00000\.safetensors: tokens must be token ids in "
                                         r"\[0, 50\)"):
        load_shards(d)
    d = _dataset(tmp_path, ok, topk_ids=[1, 2, 3, bad, 4, 5, 6])
    with pytest.raises(ValueError, match=r"t0_00000\.safetensors: topk_ids must be token ids"):
        load_shards(d)


def test_load_shards_refuses_a_bad_manifest_vocabulary_and_topk_shape(tmp_path) -> None:
    import safetensors.torch as st

    from specdiff_ext.training.data import load_shards

    d = _dataset(tmp_path, list(range(10)), vocab="50")
    with pytest.raises(ValueError, match=r"manifest\.json: not a valid manifest .*vocab_size"):
        load_shards(d)
    d = _dataset(tmp_path, list(range(10)), topk_ids=[1] * 7)
    shard = d / "t0_00000.safetensors"
    t = st.load_file(str(shard))
    t["topk_logits"] = torch.zeros(6, 1, dtype=torch.float16)
    st.save_file(t, str(shard))
    with pytest.raises(ValueError, match=r"t0_00000\.safetensors: topk_ids and topk_logits"):
        load_shards(d)


# ------------------------------------------------------------------------------ make-data flags

MAKE_DATA_BAD = [
    (["--shard-size", "0"], "--shard-size"),
    (["--num-prompts", "-5"], "--num-prompts"),
    (["--num-prompts", "0"], "--num-prompts"),
    (["--heldout-fraction", "nan"], "--heldout-fraction"),
    (["--heldout-fraction", "-0.1"], "--heldout-fraction"),
    (["--heldout-fraction", "1"], "--heldout-fraction"),
    (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--max-new-tokens", "-1"], "--max-new-tokens"),
    (["--max-prompt-tokens", "0"], "--max-prompt-tokens"),
    (["--batch", "0"], "--batch"),
    (["--temperatures", "0,-1"], "--temperatures"),
    (["--temperatures", "nan"], "--temperatures"),
    (["--temperatures", "inf"], "--temperatures"),
    (["--temperatures", "0,x"], "--temperatures"),
    (["--temperatures", ","], "--temperatures"),
    (["--temperatures", "1,1.0"], "--temperatures"),
    (["--topk", "-1"], "--topk"),
    (["--seed", "-1"], "--seed"),
    (["--threads", "0"], "--threads"),
    (["--threads", "-2"], "--threads"),
    (["--device", "tpu"], "--device"),
    (["--device", "cuda:x"], "--device"),
    (["--target", "/no/such/model"], "--target"),
]


@pytest.fixture
def no_model(monkeypatch):
    """make-data must refuse its flags before any model loads."""
    import specdiff_ext.target as target_mod

    def refuse(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(target_mod, "load_target", refuse)


def _make_data(argv, capsys):
    from specdiff_ext.training.data import main

    with pytest.raises(SystemExit) as info:
        main(argv)
    return info.value.code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("args, flag", MAKE_DATA_BAD, ids=[" ".join(a) for a, _ in MAKE_DATA_BAD])
def test_make_data_refuses_bad_flags(tmp_path, capsys, no_model, args, flag) -> None:
    code, err = _make_data(["--out", str(tmp_path / "out")] + args, capsys)
    assert code == 2
    assert err[-1].startswith("python -m specdiff_ext.training.data: error: " + flag), err
    assert not (tmp_path / "out").exists()


def test_make_data_refuses_a_cuda_device_it_does_not_have(tmp_path, capsys, no_model) -> None:
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for dev in (["cuda", f"cuda:{n}"] if n == 0 else [f"cuda:{n}"]):
        code, err = _make_data(["--out", str(tmp_path / "out"), "--device", dev], capsys)
        assert code == 2 and "--device" in err[-1] and "CUDA" in err[-1], err


def test_make_data_refuses_an_out_that_is_a_file(tmp_path, capsys, no_model) -> None:
    (tmp_path / "f").write_text("")
    code, err = _make_data(["--out", str(tmp_path / "f")], capsys)
    assert code == 2 and "--out" in err[-1]


def test_specdiff_make_data_dispatches_the_same_check(tmp_path, capsys, no_model) -> None:
    from specdiff_ext import cli

    with pytest.raises(SystemExit) as info:
        cli.main(["make-data", "--out", str(tmp_path / "out"), "--shard-size", "0"])
    assert info.value.code == 2
    assert "--shard-size" in capsys.readouterr().err.strip().splitlines()[-1]


def test_make_data_names_the_command_it_runs_as(tmp_path, capsys, no_model) -> None:
    from specdiff_ext.training.data import main

    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "out"), "--batch", "0"], prog="specdiff make-data")
    assert capsys.readouterr().err.strip().splitlines()[-1] == \
        "specdiff make-data: error: --batch must be a positive int, got 0"


def test_generate_dataset_checks_its_parameters_too(tmp_path) -> None:
    from specdiff_ext.training.data import generate_dataset

    stand_in = SimpleNamespace(name="t", tokenizer=None, eos_token_id=0, vocab_size=50)
    for kw, field in (({"shard_size": 0}, "shard_size"), ({"heldout_fraction": NAN},
                                                          "heldout_fraction"),
                      ({"temperatures": (0.0, -1.0)}, "temperatures"),
                      ({"temperatures": ()}, "temperatures"), ({"batch_size": 2.0}, "batch_size")):
        with pytest.raises(ValueError, match=field):
            generate_dataset(stand_in, tmp_path / "out", prompts=["a"], **kw)
    assert not (tmp_path / "out").exists()
