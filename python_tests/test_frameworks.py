"""Framework front doors: torch.compile tracing, numpy, CuPy and JAX through DLPack."""

import numpy as np
import pytest
import torch

from sd_testutil import compiled_only
from specdiff_ext import ops

# torch.compile of the custom ops, their registration, numpy / CuPy / JAX intake through DLPack
# and check_values' device syncs: all about the compiled ops' front doors.
pytestmark = compiled_only("the compiled ops' front doors (custom ops, DLPack, device syncs)")


def _case(device="cpu", B=3, G=4, V=257):
    g = torch.Generator().manual_seed(11)
    tl = torch.randn(B, G + 1, V, generator=g)
    dl = torch.randn(B, G, V, generator=g)
    ids = torch.randint(0, V, (B, G), generator=g)
    return tl.to(device), dl.to(device), ids.to(device)


def test_torch_compile_traces_verify_and_gather():
    tl, dl, ids = _case()

    def f(tl, ids, dl):
        r = ops.verify(tl, ids, dl, temperature=0.7, seed=5)
        g = ops.gather_logprobs(tl[:, :-1], ids)
        return r.ids, r.num_accepted, g.lse

    eager = f(tl, ids, dl)
    compiled = torch.compile(f, fullgraph=True, backend="eager")(tl, ids, dl)
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_custom_ops_are_registered():
    for name in ("verify", "gather_logprobs", "denoise_step"):
        assert hasattr(torch.ops.specdiff, name)


def test_numpy_in_numpy_out_matches_torch():
    tl, dl, ids = _case()
    rt = ops.verify(tl, ids, dl, temperature=0.9, seed=3)
    rn = ops.verify(tl.numpy(), ids.numpy(), dl.numpy(), temperature=0.9, seed=3)
    assert isinstance(rn.ids, np.ndarray) and isinstance(rn.num_accepted, np.ndarray)
    np.testing.assert_array_equal(rn.ids, rt.ids.numpy())


@pytest.mark.cuda
def test_cupy_roundtrip():
    cp = pytest.importorskip("cupy")
    tl, dl, ids = _case("cuda")
    rt = ops.verify(tl, ids, dl, temperature=0.9, seed=3)
    rc = ops.verify(cp.from_dlpack(tl), cp.from_dlpack(ids), cp.from_dlpack(dl), temperature=0.9, seed=3)
    assert isinstance(rc.ids, cp.ndarray)
    np.testing.assert_array_equal(cp.asnumpy(rc.ids), rt.ids.cpu().numpy())


@pytest.mark.cuda
def test_jax_roundtrip():
    jax = pytest.importorskip("jax")
    jnp = pytest.importorskip("jax.numpy")
    if not any(d.platform == "gpu" for d in jax.devices()):
        pytest.skip("JAX sees no GPU")
    tl, dl, ids = _case("cuda")
    rt = ops.verify(tl, ids, dl, temperature=0.0)
    rj = ops.verify(jnp.asarray(tl.cpu().numpy()), jnp.asarray(ids.cpu().numpy()), temperature=0.0)
    assert isinstance(rj.ids, jax.Array)
    np.testing.assert_array_equal(np.asarray(rj.ids), ops.verify(tl, ids, temperature=0.0).ids.cpu().numpy())
    del rt


def test_cli_lists_commands_and_rejects_unknown(capsys):
    from specdiff_ext import cli

    assert cli.main([]) == 0
    assert "train-drafter" in capsys.readouterr().out
    assert cli.main(["no-such-command"]) == 2
    assert "unknown command" in capsys.readouterr().err


def test_unchecked_verify_matches_verify_and_still_checks_cpu_input():
    tl, dl, ids = _case()
    a = ops.verify(tl, ids, dl, temperature=0.8, seed=9)
    b = ops.verify(tl, ids, dl, temperature=0.8, seed=9, check_values=False)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    with pytest.raises(ValueError, match="draft_ids"):
        ops.verify(tl, ids + 1000, dl, check_values=False)
    assert not hasattr(ops, "verify_unchecked")  # check_values=False is the one way


def test_numpy_zero_size_inputs_return_empty_results() -> None:
    """numpy gives empty arrays arbitrary strides (0): they are accepted, not called
    non-contiguous, and every op returns empty results of the right shapes."""
    np_ = pytest.importorskip("numpy")
    from specdiff_ext import ops

    f32, i64 = np_.float32, np_.int64
    r = ops.verify(np_.zeros((0, 5, 10), f32), np_.zeros((0, 4), i64),
                   np_.zeros((0, 4, 10), f32), temperature=1.0)
    assert r.ids.shape == (0, 5) and r.num_accepted.shape == (0,) and r.valid.shape == (0,)
    g = ops.gather_logprobs(np_.zeros((2, 0, 10), f32), np_.zeros((2, 0), i64))
    assert g.lse.shape == (2, 0) and g.logprobs.shape == (2, 0)
    g = ops.gather_logprobs(np_.zeros((0, 3, 10), f32), np_.zeros((0, 3), i64))
    assert g.lse.shape == (0, 3)
    d = ops.denoise_step(np_.zeros((2, 0, 10), f32), np_.zeros((2, 0), i64),
                         np_.zeros((2, 0), np_.int32), step=0, num_steps=1, mode="random",
                         temperature=1.0)
    assert d.tokens.shape == (2, 0) and d.valid.shape == (2,) and bool(d.valid.all())
    rs = ops.rejection_sample(np_.zeros((0, 5, 10), f32), np_.zeros((0, 4), i64),
                              temperature=0.0, target_lse=np_.zeros((0, 5), f32))
    assert rs.ids.shape == (0, 5)


def test_check_values_switch_skips_only_gpu_checks():
    from specdiff_ext import ops

    g = torch.Generator().manual_seed(3)
    tl, dl = torch.randn(2, 4, 30, generator=g), torch.randn(2, 3, 30, generator=g)
    ids = torch.randint(0, 30, (2, 3), generator=g)
    a = ops.verify(tl, ids, dl, temperature=0.8, seed=9, check_values=False)
    b = ops.verify(tl, ids, dl, temperature=0.8, seed=9)
    assert torch.equal(a.ids, b.ids) and torch.equal(a.num_accepted, b.num_accepted)
    with pytest.raises(ValueError, match="draft_ids holds"):  # CPU values are checked anyway
        ops.verify(tl, ids + 1000, dl, check_values=False)
    cs = torch.full((2, 3), -1, dtype=torch.int32)
    r1 = ops.denoise_step(dl, ids, cs, step=0, num_steps=1, seed=2, check_values=False)
    r2 = ops.denoise_step(dl, ids, cs, step=0, num_steps=1, seed=2)
    assert torch.equal(r1.tokens, r2.tokens)
