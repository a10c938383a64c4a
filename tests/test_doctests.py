"""The ``>>>`` examples in the docstrings run as doctests (they are documentation that can rot).

Every module of ``revtrain`` and ``revtrain.models`` is collected; a module whose examples are
known to fail today is listed in ``PENDING`` with the reason (strict xfail: once it passes, it
must leave the list).
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest
import torch

import revtrain

MODULES = sorted(
    {m.name for m in pkgutil.walk_packages(revtrain.__path__, "revtrain.")} | {"revtrain"}
    | {"revtrain.models"} | {f"revtrain.models.{m.name}" for m in pkgutil.iter_modules(
        importlib.import_module("revtrain.models").__path__)}
)

# examples that are not runnable as written (in files owned by the engine's maintainers)
PENDING: dict[str, str] = {}


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("name", [
    pytest.param(n, marks=pytest.mark.xfail(strict=True, reason=PENDING[n])) if n in PENDING
    else n for n in MODULES])
def test_docstring_examples(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # an example that trains writes its logs here
    module = importlib.import_module(name)
    state = torch.random.get_rng_state()
    try:
        flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
        result = doctest.testmod(module, optionflags=flags, report=True, verbose=False)
    finally:
        torch.random.set_rng_state(state)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in {name} fail"
