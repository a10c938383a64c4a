"""Shared test options and fixtures.

* ``--device cpu|cuda|cuda:N`` (default ``cpu``): the device of the tests that take the
  ``device`` fixture, so that the GPU check is this same suite run with ``--device cuda``.
* ``--dtype float64|float32`` (default ``float64``): the dtype of the tests that take the
  ``dtype`` fixture (the gradient comparisons are exact to 1e-10 in float64).
* ``benchmarks_path``: the repository root on ``sys.path`` for a test module, so that it can
  import ``benchmarks.<name>`` (the benchmark scripts are not installed).
* ``one_thread``: one intra-op thread for the test (the models here are tiny, and on a shared
  2-core machine more threads only spin), restored afterwards.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("revtrain")
    group.addoption("--device", default="cpu",
                    help="device of the device-generic tests: cpu (default), cuda, cuda:1, ...")
    group.addoption("--dtype", default="float64", choices=["float64", "float32"],
                    help="dtype of the dtype-generic tests (default float64)")


def pytest_configure(config: pytest.Config) -> None:
    device = torch.device(config.getoption("--device"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError(f"--device {device}: this machine has no CUDA device")


@pytest.fixture(scope="module")
def benchmarks_path():
    """The repository root on ``sys.path`` while a test module runs (``import benchmarks.x``)."""
    sys.path.insert(0, str(ROOT))
    try:
        yield ROOT
    finally:
        sys.path.remove(str(ROOT))


@pytest.fixture
def device(pytestconfig: pytest.Config) -> torch.device:
    """The device given with ``--device``."""
    return torch.device(pytestconfig.getoption("--device"))


@pytest.fixture
def dtype(pytestconfig: pytest.Config) -> torch.dtype:
    """The dtype given with ``--dtype``."""
    return getattr(torch, pytestconfig.getoption("--dtype"))


@pytest.fixture
def one_thread():
    """Run the test with one intra-op thread; the previous count is restored."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
