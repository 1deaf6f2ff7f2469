"""Shared pytest configuration: markers, devices and the implementation under test.

The ops under test are `specdiff_ext.ops`. Setting ``SPECDIFF_TEST_IMPL=reference`` points the
op-under-test (the `ops` fixture, `sd_testutil.impl()`) at `specdiff_ext.reference` instead,
the ops' twin by name and signature: every op test then runs against the executable spec
(the comparisons with the reference hold trivially there; the structural checks, the laws and
the comparisons with transformers do not). Tests about the compiled kernels themselves are
marked `sd_testutil.compiled_only(reason)` and skipped there with their reason.
"""

from __future__ import annotations

import pytest
import torch

import sd_testutil


def pytest_configure(config: pytest.Config) -> None:
    # Also registered in pyproject.toml; repeated here so the suite runs from any rootdir.
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped without one)")
    config.addinivalue_line("markers", "slow: takes more than a few seconds")


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("cuda") is not None and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")


_DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


@pytest.fixture(params=_DEVICES)
def device(request: pytest.FixtureRequest) -> str:
    """Every device the ops run on: cpu, and cuda when a GPU is present."""
    return request.param


@pytest.fixture(scope="session")
def ops():
    """The module under test (`specdiff_ext.ops`, see the module docstring)."""
    return sd_testutil.impl()


@pytest.fixture(scope="session")
def ref():
    """The pure-torch reference, `specdiff_ext.reference`."""
    from specdiff_ext import reference

    return reference
