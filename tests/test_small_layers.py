"""benchmarks/small_layers.py: the step-time record and its rebuild-arithmetic floor."""

from __future__ import annotations

import importlib
import json

import pytest
import torch

from revtrain.flows import ActNorm
from revtrain.models import create


@pytest.fixture(scope="module")
def small_layers(benchmarks_path):
    return importlib.import_module("benchmarks.small_layers")


def _model(name="realnvp"):
    torch.manual_seed(0)
    return create(name, dim=2, num_layers=3, hidden=8, depth=1, memory="stored").double()


def test_rebuild_arithmetic_rebuilds_the_input_of_the_whole_stack(small_layers):
    for name in ("realnvp", "nsf"):
        x = torch.randn(16, 2, dtype=torch.float64)
        rebuilt = small_layers.rebuild_arithmetic(_model(name), x)()
        assert torch.allclose(rebuilt, x, atol=1e-10), name


def test_rebuild_arithmetic_of_a_layer_with_a_wrong_inverse_does_not_rebuild(small_layers, monkeypatch):
    monkeypatch.setattr(ActNorm, "inverse", lambda self, y: y)  # not the inverse
    model = _model()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, ActNorm):
                m.log_scale.fill_(0.5)
    x = torch.randn(16, 2, dtype=torch.float64)
    assert (small_layers.rebuild_arithmetic(model, x)() - x).abs().max() > 1e-2


def test_smoke_record_has_the_floor_beside_the_ratio(small_layers, tmp_path):
    out = tmp_path / "small.json"
    small_layers.main(["--smoke", "--models", "realnvp", "--label", "t", "--out", str(out)])
    small_layers.main(["--smoke", "--models", "realnvp", "--label", "u", "--out", str(out)])
    records = json.loads(out.read_text())["records"]
    assert [r["label"] for r in records] == ["t", "u"]  # appended, not overwritten
    result = records[-1]["results"][0]
    assert set(result["ms_per_step"]) == {"stored", "reversible", "rebuild_arithmetic",
                                          "stored_under_hooks"}
    assert result["floor_ratio_cpu"] > 1 and result["ratio_cpu"] > 1
    assert result["floor_with_hooks_ratio_cpu"] > result["hooks_ratio_cpu"] > 0
    assert result["rebuild_arithmetic_max_error"] < 1e-4
