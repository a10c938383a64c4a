"""Pieces of ``benchmarks/ik.py`` that its figures rest on: the posterior-mismatch estimator and the
FrEIA twin of revtrain's cINN (same function before training)."""

from __future__ import annotations

import importlib

import pytest
import torch


@pytest.fixture(scope="module")
def ik(benchmarks_path):
    return importlib.import_module("benchmarks.ik")


def test_unbiased_mmd_is_near_zero_for_one_distribution_and_not_for_two(ik):
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(500, 4, generator=gen), torch.randn(500, 4, generator=gen)
    same = ik.mmd2_unbiased(a.double(), b.double())
    shifted = ik.mmd2_unbiased(a.double(), (b + 0.5).double())
    assert abs(same) < 0.003 < 0.01 < shifted, (same, shifted)
    assert ik.mmd2_unbiased(a.double(), (0.5 * b).double()) > 0.01  # a narrower posterior is penalised


def test_freia_twin_computes_the_same_function(ik):
    pytest.importorskip("FrEIA")
    assert ik.check_twins(blocks=3, hidden=16) < 1e-5
    ours, theirs = ik.build_pair(3, 16)
    with torch.no_grad():
        theirs.inn.module_list[0].subnet2[-1].bias.add_(0.1)  # a deliberately different twin
    x, y = torch.randn(8, 4), torch.randn(8, 2)
    assert not torch.allclose(ours.log_prob(x, context=y), theirs.log_prob(x, context=y))
