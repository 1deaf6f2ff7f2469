"""Bad input never crashes or returns garbage: every op checks every argument first and raises
ValueError or TypeError whose message names the argument."""

from __future__ import annotations

import math
from typing import Any, Callable

import pytest
import torch

from sd_testutil import compiled_only
from specdiff_ext import reference

B, G, V, VD = 3, 2, 7, 5


def _verify_args() -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    return dict(
        target_logits=torch.randn(B, G + 1, V, generator=g),
        draft_ids=torch.randint(0, V, (B, G), generator=g),
        draft_logits=torch.randn(B, G, V, generator=g),
        draft_point_mass=torch.zeros(B, G, dtype=torch.bool),
        temperature=1.0,
        draft_temperature=1.0,
        seed=0,
        offset=0,
    )


def _rejection_args() -> dict[str, Any]:
    a = _verify_args()
    a["target_lse"] = torch.zeros(B, G + 1)
    a["draft_lse"] = torch.zeros(B, G)
    return a


def _gather_args() -> dict[str, Any]:
    return dict(logits=torch.randn(B, G, V), ids=torch.zeros(B, G, dtype=torch.long),
                temperature=1.0)


def _denoise_args() -> dict[str, Any]:
    return dict(logits=torch.randn(B, G, VD), tokens=torch.zeros(B, G, dtype=torch.long),
                commit_step=torch.full((B, G), -1, dtype=torch.int32), step=0, num_steps=3,
                mode="random", temperature=1.0, seed=0, offset=0)


def _call(ops: Any, op: str, args: dict[str, Any]) -> Any:
    a = dict(args)
    if op in ("verify", "rejection_sample"):
        fn = getattr(ops, op)
        return fn(a.pop("target_logits"), a.pop("draft_ids"), a.pop("draft_logits"), **a)
    if op == "gather_logprobs":
        return ops.gather_logprobs(a.pop("logits"), a.pop("ids"), **a)
    if op == "denoise_step":
        return ops.denoise_step(a.pop("logits"), a.pop("tokens"), a.pop("commit_step"), **a)
    raise ValueError(op)


BASE: dict[str, Callable[[], dict[str, Any]]] = {
    "verify": _verify_args,
    "rejection_sample": _rejection_args,
    "gather_logprobs": _gather_args,
    "denoise_step": _denoise_args,
}

_f = torch.float32
# (op, argument, bad value (or a function of the valid arguments), what the message must name)
CASES: list[tuple[str, str, Any, str]] = []
for _op in ("verify", "rejection_sample"):
    CASES += [
        (_op, "target_logits", torch.zeros(B, G + 1, V, dtype=torch.int32), "target_logits"),
        (_op, "target_logits", torch.zeros(B, G + 1, V, dtype=torch.float64), "target_logits"),
        (_op, "target_logits", torch.zeros(B, V), "target_logits"),
        (_op, "target_logits", torch.zeros(B, 0, V), "target_logits"),
        (_op, "target_logits", [[[0.0] * V] * (G + 1)] * B, "target_logits"),
        (_op, "draft_ids", torch.zeros(B, G), "draft_ids"),
        (_op, "draft_ids", torch.zeros(B, G + 1, dtype=torch.long), "draft_ids"),
        (_op, "draft_ids", torch.zeros(B + 1, G, dtype=torch.long), "draft_ids"),
        (_op, "draft_ids", torch.zeros(B * G, dtype=torch.long), "draft_ids"),
        (_op, "draft_ids", torch.full((B, G), V, dtype=torch.long), "draft_ids"),
        (_op, "draft_ids", torch.full((B, G), -1, dtype=torch.int32), "draft_ids"),
        (_op, "draft_logits", torch.zeros(B, G, V, dtype=torch.int64), "draft_logits"),
        (_op, "draft_logits", torch.zeros(B, G), "draft_logits"),
        (_op, "draft_logits", torch.zeros(B, G + 1, V), "draft_logits"),
        (_op, "draft_logits", torch.zeros(B + 1, G, V), "draft_logits"),
        (_op, "draft_logits", torch.zeros(B, G, VD), "draft_logits|vocab_map"),
        (_op, "draft_point_mass", torch.zeros(B, G), "draft_point_mass"),
        (_op, "draft_point_mass", torch.zeros(B, G + 1, dtype=torch.bool), "draft_point_mass"),
        (_op, "temperature", -1.0, "temperature"),
        (_op, "temperature", math.nan, "temperature"),
        (_op, "temperature", math.inf, "temperature"),
        (_op, "temperature", "hot", "temperature"),
        (_op, "temperature", torch.ones(B + 1), "temperature"),
        (_op, "temperature", torch.ones(B, 1), "temperature"),
        (_op, "temperature", torch.tensor([1.0, -0.5, 1.0]), "temperature"),
        (_op, "temperature", torch.ones(B, dtype=torch.int64), "temperature"),
        (_op, "draft_temperature", -0.5, "draft_temperature"),
        (_op, "draft_temperature", torch.ones(B - 1), "draft_temperature"),
        (_op, "seed", torch.zeros(B), "seed"),
        (_op, "seed", torch.zeros(B + 1, dtype=torch.long), "seed"),
        (_op, "seed", 1.5, "seed"),
        (_op, "seed", "s", "seed"),
        (_op, "offset", -1, "offset"),
        (_op, "offset", 1 << 56, "offset"),
        (_op, "offset", 1.5, "offset"),
        (_op, "vocab_map", torch.arange(VD + 1), "vocab_map|draft_logits"),
        (_op, "vocab_map", torch.arange(VD, dtype=_f), "vocab_map"),
        (_op, "vocab_map", torch.arange(VD).reshape(1, VD), "vocab_map"),
        (_op, "vocab_map", torch.tensor([0, 1, 2, 3, V]), "vocab_map"),
        (_op, "vocab_map", torch.tensor([0, 1, 2, 3, -1]), "vocab_map"),
        (_op, "vocab_map", torch.tensor([0, 1, 2, 2, 3]), "vocab_map"),
    ]
CASES += [
    ("rejection_sample", "target_lse", torch.zeros(B, G), "target_lse"),
    ("rejection_sample", "target_lse", torch.zeros(B, G + 1, dtype=torch.int32), "target_lse"),
    ("rejection_sample", "target_lse", None, "target_lse"),
    ("rejection_sample", "draft_lse", None, "draft_lse"),
    ("rejection_sample", "draft_lse", torch.zeros(B, G + 1), "draft_lse"),
    ("rejection_sample", "draft_lse", torch.zeros(B, G, dtype=torch.int64), "draft_lse"),
    ("gather_logprobs", "logits", torch.zeros(B, G, V, dtype=torch.int32), "logits"),
    ("gather_logprobs", "logits", torch.zeros(B, G, V, dtype=torch.float64), "logits"),
    ("gather_logprobs", "logits", torch.zeros(B, V), "logits"),
    ("gather_logprobs", "ids", torch.zeros(B, G), "ids"),
    ("gather_logprobs", "ids", torch.zeros(B, G + 1, dtype=torch.long), "ids"),
    ("gather_logprobs", "ids", torch.zeros(B, dtype=torch.long), "ids"),
    ("gather_logprobs", "ids", torch.full((B, G), V, dtype=torch.int32), "ids"),
    ("gather_logprobs", "ids", torch.full((B, G), -1, dtype=torch.long), "ids"),
    ("gather_logprobs", "temperature", -0.1, "temperature"),
    ("gather_logprobs", "temperature", torch.ones(B + 2), "temperature"),
    ("gather_logprobs", "temperature", torch.tensor([1.0, math.nan, 1.0]), "temperature"),
    ("denoise_step", "logits", torch.zeros(B, G, VD, dtype=torch.int64), "logits"),
    ("denoise_step", "logits", torch.zeros(B, G, VD, dtype=torch.float64), "logits"),
    ("denoise_step", "logits", torch.zeros(B, VD), "logits"),
    ("denoise_step", "tokens", torch.zeros(B, G), "tokens"),
    ("denoise_step", "tokens", torch.zeros(B, G + 1, dtype=torch.long), "tokens"),
    ("denoise_step", "commit_step", torch.zeros(B, G), "commit_step"),
    ("denoise_step", "commit_step", torch.zeros(B + 1, G, dtype=torch.int32), "commit_step"),
    ("denoise_step", "commit_step", torch.zeros(B * G, dtype=torch.int32), "commit_step"),
    ("denoise_step", "step", -1, "step"),
    ("denoise_step", "step", 3, "step"),
    ("denoise_step", "step", 1.5, "step"),
    ("denoise_step", "num_steps", 0, "num_steps|step"),
    ("denoise_step", "mode", "bogus", "mode"),
    ("denoise_step", "mode", 5, "mode"),
    ("denoise_step", "mode", None, "mode"),
    ("denoise_step", "temperature", -2.0, "temperature"),
    ("denoise_step", "temperature", torch.ones(B + 1), "temperature"),
    ("denoise_step", "seed", torch.zeros(B, dtype=torch.int32), "seed"),
    ("denoise_step", "offset", -5, "offset"),
    ("denoise_step", "vocab_map", torch.arange(VD + 1), "vocab_map"),
    ("denoise_step", "vocab_map", torch.arange(VD, dtype=_f), "vocab_map"),
    ("denoise_step", "vocab_map", torch.tensor([0, 1, -2, 3, 4]), "vocab_map"),
]


def _case_id(case: tuple[str, str, Any, str]) -> str:
    op, arg, bad, _ = case
    if isinstance(bad, torch.Tensor):
        desc = f"{str(bad.dtype).replace('torch.', '')}{tuple(bad.shape)}"
    else:
        desc = type(bad).__name__ if not isinstance(bad, (int, float)) else repr(bad)
    return f"{op}-{arg}-{desc}"


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_bad_argument_is_named(ops, case) -> None:
    op, arg, bad, name = case
    if isinstance(bad, torch.Tensor) and bad.dtype == torch.float64 and ops is reference:
        pytest.skip("compiled ops only: the reference takes float64 logits (its float64 mode)")
    args = BASE[op]()
    if arg == "vocab_map" and op != "denoise_step":
        args["draft_logits"] = torch.randn(B, G, VD)
        if op == "rejection_sample":
            args["draft_lse"] = torch.zeros(B, G)
    args[arg] = bad
    with pytest.raises((ValueError, TypeError), match=name):
        _call(ops, op, args)


@pytest.mark.parametrize("op", list(BASE))
def test_valid_base_arguments_pass(ops, op) -> None:
    """The unmodified arguments of the cases above are accepted (so each case tests one thing)."""
    _call(ops, op, BASE[op]())
    if op != "denoise_step":
        a = BASE[op]() if op != "gather_logprobs" else None
        if a is not None:
            a["draft_logits"] = torch.randn(B, G, VD)
            a["vocab_map"] = torch.tensor([6, 0, 3, 2, 4])
            _call(ops, op, a)


@pytest.mark.parametrize("bad", [torch.zeros(5), torch.zeros(2, 3, 4), torch.zeros(2, 3),
                                 torch.zeros(2, 3, dtype=torch.bool)], ids=str)
def test_point_mass_mask_bad_commit_step(ops, bad) -> None:
    with pytest.raises((ValueError, TypeError), match="commit_step"):
        ops.point_mass_mask(bad)


@pytest.mark.cuda
@pytest.mark.parametrize("op", list(BASE))
def test_device_mix_is_named(ops, op) -> None:
    args = BASE[op]()
    first = next(iter(args))  # the logits
    for other, value in args.items():
        if other == first or not isinstance(value, torch.Tensor):
            continue
        a = BASE[op]()
        a[first] = a[first].cuda()
        with pytest.raises((ValueError, TypeError), match=f"{first}|{other}"):
            _call(ops, op, a)
        torch.cuda.synchronize()
    a = BASE[op]()
    a[first] = a[first].cuda()
    a["temperature"] = torch.ones(B)  # per-row tensor left on the CPU
    with pytest.raises((ValueError, TypeError), match=f"{first}|temperature"):
        _call(ops, op, a)


@pytest.mark.cuda
def test_cuda_out_of_range_ids_are_named(ops) -> None:
    a = _verify_args()
    a = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in a.items()}
    a["draft_ids"] = torch.full((B, G), V, dtype=torch.long, device="cuda")
    with pytest.raises(ValueError, match="draft_ids"):
        _call(ops, "verify", a)
    g = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in _gather_args().items()}
    g["ids"] = torch.full((B, G), -3, dtype=torch.long, device="cuda")
    with pytest.raises(ValueError, match="ids"):
        _call(ops, "gather_logprobs", g)


def test_source_tree_without_compiled_core_says_what_to_do(tmp_path) -> None:
    """Importing a source tree that has no _C beside it (Python run from the repository root
    after a non-editable install) fails with a message that says what to do, not with a
    'partially initialized module' error."""
    import shutil
    import subprocess
    import sys

    import specdiff_ext

    pkg = tmp_path / "specdiff_ext"
    pkg.mkdir()
    shutil.copy(specdiff_ext.__file__, pkg / "__init__.py")
    # -S: no site-packages, so neither the installed package nor an editable finder answers
    r = subprocess.run([sys.executable, "-S", "-c", "import specdiff_ext"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert "compiled core (_C)" in r.stderr and "pip install -e ." in r.stderr


@compiled_only("the raw torch.ops.specdiff schema and its bindings")
def test_raw_verify_op_takes_no_derived_index_table() -> None:
    """The raw custom op derives the inverse of vocab_map itself (no caller-supplied index
    table): a map with repeated ids runs (one entry kept), out-of-range ids are named errors,
    and nothing reads outside the draft rows."""
    import specdiff_ext.ops  # noqa: F401  (registers torch.ops.specdiff)

    schema = str(torch.ops.specdiff.verify.default._schema)
    assert "vocab_inv" not in schema and "vocab_map" in schema
    g = torch.Generator().manual_seed(0)
    B, G, V, Vd = 2, 3, 50, 10
    tl = torch.randn(B, G + 1, V, generator=g)
    dl = torch.randn(B, G, Vd, generator=g)
    vmap = torch.arange(Vd, dtype=torch.int64) * 5
    vmap[3] = vmap[2]  # a repeat
    ids = vmap[torch.randint(0, Vd, (B, G), generator=g)]
    out, num, valid = torch.ops.specdiff.verify(
        tl, ids, dl, None, vmap, None, 1.0, None, 1.0, None, 7, 0, None, None)
    assert valid.all() and ((out >= -1) & (out < V)).all()
    for bad in (V, -1, 10**8):
        hostile = vmap.clone()
        hostile[0] = bad
        with pytest.raises(ValueError, match="vocab_map holds"):
            torch.ops.specdiff.verify(tl, ids, dl, None, hostile, None, 1.0, None, 1.0, None, 7,
                                      0, None, None)


@compiled_only("the ops' numpy / DLPack intake (byte order, object arrays, negative strides)")
def test_frontend_scalars_byte_order_strides_and_output_kind() -> None:
    """Scalars the docstrings promise (0-d tensors, numpy scalars, float64 numpy temperatures),
    named errors for byte order and object arrays, negative strides read correctly, and the
    logits (not a numpy seed) decide the output framework."""
    import numpy as np

    from specdiff_ext import ops

    x = torch.randn(2, 3, 10, generator=torch.Generator().manual_seed(0))
    d = torch.randint(0, 10, (2, 2), generator=torch.Generator().manual_seed(1))
    want = ops.verify(x, d, temperature=0.7, seed=3)
    for tau in (torch.tensor(0.7), np.float32(0.7), np.float64(0.7), np.array([0.7, 0.7]),
                torch.tensor([0.7, 0.7], dtype=torch.float64)):
        got = ops.verify(x, d, temperature=tau, seed=3)
        assert torch.equal(got.ids, want.ids), type(tau)
    got = ops.verify(x, d, temperature=0.7, seed=np.int64(3))
    assert isinstance(got.ids, torch.Tensor) and torch.equal(got.ids, want.ids)
    assert torch.equal(ops.verify(x, d, temperature=0.7, seed=torch.tensor(3)).ids, want.ids)
    xn = x.numpy()
    with pytest.raises(TypeError, match="target_logits must be in the machine's byte order"):
        ops.verify(xn.astype(xn.dtype.newbyteorder(">")), d.numpy())
    with pytest.raises(TypeError, match="draft_ids must be a numeric array"):
        ops.verify(xn, d.numpy().astype(object))
    rev = np.ascontiguousarray(xn[:, :, ::-1])[:, :, ::-1]  # negative last stride, same values
    assert np.array_equal(ops.gather_logprobs(rev, d.numpy()[:, :1].repeat(3, 1)).lse,
                          ops.gather_logprobs(xn, d.numpy()[:, :1].repeat(3, 1)).lse)


def test_vocab_map_changed_in_place_is_seen(ops) -> None:
    import numpy as np

    V = 6
    tl = torch.full((1, 2, V), -5.0)
    tl[0, :, 4] = 5.0
    dl = torch.zeros(1, 1, 2)
    dl[0, 0, 0] = 9.0
    vm_np = np.array([1, 2], dtype=np.int64)
    vm = torch.from_numpy(vm_np)  # shares memory: numpy writes do not bump torch's version
    x = torch.tensor([[1]])  # the target gives it probability ~5e-5
    r1 = ops.verify(tl, x, dl, vocab_map=vm, seed=0)
    assert int(r1.num_accepted[0]) == 0  # q(1) ~ 1: rejected (probability 1 - 5e-5)
    vm_np[:] = [4, 2]  # drafter column 0 now scores target id 4; id 1 is outside the map
    r2 = ops.verify(tl, x, dl, vocab_map=vm, seed=0)
    assert int(r2.num_accepted[0]) == 1  # q(1) = 0 now: always accepted (a stale map rejects)


# ------------------------------------------------------------------ checkpoint and data files
def _tiny_dflash(tmp_path):
    from specdiff_ext.drafter.checkpoint import save_dflash
    from specdiff_ext.drafter.dflash import DFlashConfig, DFlashDrafter

    cfg = DFlashConfig(vocab_size=50, hidden_size=32, n_heads=4, n_kv_heads=2, head_dim=8,
                       intermediate_size=64, num_target_layers=6, mask_token_id=3, target_name="tiny")
    emb, head = torch.randn(50, 32), torch.randn(50, 32)
    folder = tmp_path / "d"
    save_dflash(DFlashDrafter(cfg, emb, head), folder)
    return folder, emb, head


@pytest.mark.parametrize("damage, match", [
    (lambda f: (f / "model.safetensors").write_bytes(b"garbage"), "model.safetensors: not a readable safetensors"),
    (lambda f: (f / "model.safetensors").unlink(), "model.safetensors: no such file"),
    (lambda f: (f / "config.json").write_text("{not json"), "config.json: not readable JSON"),
    (lambda f: (f / "config.json").write_text("[1, 2]"), "config.json: expected a JSON object"),
    (lambda f: _edit(f, num_hidden_layers="three"), "config.json: a DFlash config field has the wrong type: num_hidden_layers"),
    (lambda f: _edit(f, num_hidden_layers=[3]), "config.json: a DFlash config field has the wrong type"),
    (lambda f: _edit(f, num_hidden_layers=10**9), "num_hidden_layers = 1000000000 is outside"),
    (lambda f: _edit(f, intermediate_size=10**9), "intermediate_size = 1000000000 is outside"),
    (lambda f: _edit(f, intermediate_size=96), "weights do not fit the config"),
    (lambda f: _edit(f, vocab_size=None), "wrong type"),
    (lambda f: _edit(f, dflash_config={"mask_token_id": 3, "target_layer_ids": [0, 99]}), "target_layer_ids must lie in"),
])
def test_bad_drafter_folders_are_named_errors(tmp_path, damage, match) -> None:
    from specdiff_ext.drafter.checkpoint import load_drafter

    folder, emb, head = _tiny_dflash(tmp_path)
    damage(folder)
    with pytest.raises(ValueError, match=match):
        load_drafter(folder, emb, head, target_name="tiny")


def _edit(folder, **kw):
    import json

    p = folder / "config.json"
    c = json.loads(p.read_text())
    c.update(kw)
    p.write_text(json.dumps(c))


def test_bad_data_folders_are_named_errors(tmp_path) -> None:
    import json

    import safetensors.torch as st

    from specdiff_ext.training.data import load_shards

    d = tmp_path / "data"
    d.mkdir()
    st.save_file({"tokens": torch.arange(10, dtype=torch.int32), "lengths": torch.tensor([6, 4], dtype=torch.int32),
                  "prompt_lens": torch.tensor([2, 1], dtype=torch.int32)}, str(d / "s0.safetensors"))
    good = {"shards": [{"file": "s0.safetensors", "temperature": 0.0}]}
    (d / "manifest.json").write_text(json.dumps(good))
    data, _ = load_shards(d)
    assert data.tokens.numel() == 10
    outside = tmp_path / "elsewhere.safetensors"
    outside.write_bytes((d / "s0.safetensors").read_bytes())
    for shards, match in (([{"file": "../elsewhere.safetensors", "temperature": 0.0}], "outside the dataset folder"),
                          ([{"file": str(outside), "temperature": 0.0}], "outside the dataset folder"),
                          ([{"temperature": 0.0}], "shard 0 has no valid file"),
                          ("nope", "not a valid manifest")):
        (d / "manifest.json").write_text(json.dumps({"shards": shards}))
        with pytest.raises(ValueError, match=match):
            load_shards(d)
    st.save_file({"tokens": torch.arange(10, dtype=torch.int32), "lengths": torch.tensor([12, -2], dtype=torch.int32),
                  "prompt_lens": torch.tensor([2, 1], dtype=torch.int32)}, str(d / "s0.safetensors"))
    (d / "manifest.json").write_text(json.dumps(good))
    with pytest.raises(ValueError, match="must be non-negative"):
        load_shards(d)
    (d / "manifest.json").unlink()
    with pytest.raises(ValueError, match="manifest.json: no such file"):
        load_shards(d)
