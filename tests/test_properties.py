"""Property tests: any channel count, depth and split dimension gives the stored twin's gradients."""

from __future__ import annotations

import pytest
import torch
from engine_helpers import assert_steps_equal, run_step, twin
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import revtrain


class _Fit(nn.Module):
    """A shape-agnostic sub-network: 1x1 conv + tanh, then resized along ``dim`` to ``size``."""

    def __init__(self, channels: int, dim: int, size: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 1)
        self.dim, self.size = dim, size

    def forward(self, x):
        h = torch.tanh(self.conv(x))
        while h.shape[self.dim] < self.size:
            h = torch.cat([h, 0.5 * h], dim=self.dim)
        return h.narrow(self.dim, 0, self.size)


def _model(shape, split_dim, depth, kind):
    n = shape[split_dim]
    n1, n2 = n // 2, n - n // 2
    k = 2 if kind == "affine" else 1
    channels_in = lambda half: shape[1] if split_dim != 1 else half  # noqa: E731
    layers = []
    for _ in range(depth):
        f = _Fit(channels_in(n2), split_dim, k * n1)
        g = _Fit(channels_in(n1), split_dim, k * n2)
        if split_dim == 1:  # the conv maps channels: give it the right output count
            f.conv = nn.Conv2d(n2, n2, 1)
            g.conv = nn.Conv2d(n1, n1, 1)
        cls = revtrain.AffineCoupling if kind == "affine" else revtrain.AdditiveCoupling
        layers.append(cls(f, g, split_dim=split_dim))
    return revtrain.ReversibleSequential(*layers).double()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    channels=st.integers(2, 9),
    height=st.integers(2, 5),
    width=st.integers(2, 5),
    split_dim=st.sampled_from([1, 2, 3, -1]),
    depth=st.integers(1, 5),
    kind=st.sampled_from(["additive", "affine"]),
    memory=st.sampled_from(["reversible", "checkpoint"]),
)
def test_any_shape_matches_stored_twin(channels, height, width, split_dim, depth, kind, memory):
    shape = (2, channels, height, width)
    torch.manual_seed(channels * 100 + depth)
    model = _model(shape, split_dim % 4, depth, kind)
    for layer in model:
        layer.splitter.dim = split_dim
    x = torch.randn(shape, dtype=torch.float64)
    assert_steps_equal(run_step(twin(model, memory), x), run_step(twin(model, "stored"), x))
    with torch.no_grad():
        torch.testing.assert_close(model.inverse(model(x)), x, rtol=0, atol=1e-10)


@pytest.mark.parametrize("features", [2, 3, 7])
def test_vectors_with_mlps(features):
    torch.manual_seed(features)
    n1, n2 = features // 2, features - features // 2
    mlp = lambda i, o: nn.Sequential(nn.Linear(i, 16), nn.Tanh(), nn.Linear(16, o))  # noqa: E731
    model = revtrain.ReversibleSequential(
        *[revtrain.AffineCoupling(mlp(n2, 2 * n1), mlp(n1, 2 * n2)) for _ in range(4)]
    ).double()
    x = torch.randn(5, features, dtype=torch.float64)
    assert_steps_equal(run_step(model, x), run_step(twin(model, "stored"), x))
