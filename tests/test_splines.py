"""Rational-quadratic spline and GIN couplings: exact inverse, log-det against the Jacobian,
gradients through the reversible engine equal to the stored twin (fp64), clear errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import revtrain
from revtrain import Coupling, RationalQuadratic, ReversibleSequential, VolumePreservingAffine
from revtrain.flows import MLP, ActNorm, ChannelMask, CheckerboardMask, CheckerboardNet, ConvNet
from revtrain.testing import assert_invertible, assert_matches_stored_twin

D = torch.float64


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _perturb(module: nn.Module, scale: float = 0.3, seed: int = 1) -> nn.Module:
    """Move every parameter off its zero initialisation (an identity spline tests nothing)."""
    module = module.double()
    with torch.no_grad():
        gen = _gen(seed)
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return module


def _vec_coupling(d: int, parity: int, transform) -> Coupling:
    mask = CheckerboardMask(parity)
    n1 = len(range(parity, d, 2))
    return Coupling(MLP(d - n1, transform.num_params * n1, 16, 2), None, transform, split=mask)


def _spline_stack(d: int = 4, layers: int = 4, **kwargs) -> ReversibleSequential:
    blocks: list[nn.Module] = []
    for i in range(layers):
        blocks += [_vec_coupling(d, i % 2, RationalQuadratic(**kwargs)), ActNorm(d)]
    return ReversibleSequential(*blocks)


def _wide(b: int, d: int, scale: float = 3.0, seed: int = 0) -> torch.Tensor:
    """Inputs with entries inside and well outside the default bound 3."""
    return scale * torch.randn(b, d, generator=_gen(seed), dtype=D)


def _jacobian_log_det(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``slogdet`` of each sample's Jacobian, from ``torch.autograd.functional.jacobian``."""
    out = []
    for xb in x:
        def f(v):
            return module(v.unsqueeze(0)).reshape(-1)
        jac = torch.autograd.functional.jacobian(f, xb).reshape(xb.numel(), xb.numel())
        sign, logabs = torch.linalg.slogdet(jac)
        assert sign > 0
        out.append(logabs)
    return torch.stack(out)


# ---------------------------------------------------------------------------- the transform


def test_spline_round_trip_inside_and_outside_the_bound():
    t = RationalQuadratic(bins=6, bound=2.5)
    x = 4.0 * torch.randn(200, 5, generator=_gen(), dtype=D)
    x[0, :] = torch.tensor([-2.5, 2.5, 0.0, -10.0, 10.0], dtype=D)  # the bound itself, far tails
    h = torch.randn(200, 5 * t.num_params, generator=_gen(1), dtype=D)
    assert (x.abs() > 2.5).any() and (x.abs() < 2.5).any()
    y, log_det = t.forward(x, h, 1)
    assert log_det.shape == (200,)
    x_back = t.inverse(y, h, 1)
    assert (x_back - x).abs().max() < 1e-10
    # the other direction, from points of the range forward did not produce
    y_other = 4.0 * torch.randn(200, 5, generator=_gen(2), dtype=D)
    assert (t.forward(t.inverse(y_other, h, 1), h, 1)[0] - y_other).abs().max() < 1e-10
    # identity outside the bound, a real change inside
    outside = x.abs() > 2.5
    assert torch.equal(y[outside], x[outside])
    assert (y[~outside] - x[~outside]).abs().max() > 0.1


def test_spline_inverse_writes_into_out():
    t = RationalQuadratic()
    x = _wide(7, 3)
    h = torch.randn(7, 3 * t.num_params, generator=_gen(1), dtype=D)
    y, _ = t.forward(x, h, 1)
    out = torch.empty(7, 6, dtype=D)[:, :3]  # a view, as couplings pass it
    t.inverse(y, h, 1, out=out)
    assert (out - x).abs().max() < 1e-10


def test_spline_with_zero_parameters_is_the_identity():
    t = RationalQuadratic(bins=4, bound=1.0)
    x = _wide(9, 4, scale=1.5)
    y, log_det = t.forward(x, torch.zeros(9, 4 * t.num_params, dtype=D), 1)
    assert (y - x).abs().max() < 1e-14 and log_det.abs().max() < 1e-13


def test_spline_parameters_are_blocks_along_the_split_dimension():
    """For images the parameters of channel c are h[:, k * C + c]: blocks like Affine's (s, t)."""
    t = RationalQuadratic(bins=3)
    x = torch.randn(2, 2, 3, 3, generator=_gen(), dtype=D)
    h = torch.randn(2, 2 * t.num_params, 3, 3, generator=_gen(1), dtype=D)
    y, log_det = t.forward(x, h, 1)
    for c in range(2):
        yc, ldc = t.forward(x[:, c:c + 1], h[:, c::2], 1)
        torch.testing.assert_close(y[:, c:c + 1], yc, rtol=0, atol=1e-15)
    assert log_det.shape == (2,)


def test_spline_extreme_parameters_stay_finite_and_invertible():
    """With extreme parameters the spline is nearly flat in places (slope ~1e-6): the inverse
    then amplifies the rounding of y by 1 / slope, as any inverse must; the error of x times
    the slope (the backward error, in y) stays at rounding level."""
    t = RationalQuadratic(bins=8)
    x = _wide(50, 4).requires_grad_(True)
    h = 60.0 * torch.randn(50, 4 * t.num_params, generator=_gen(3), dtype=D)
    y, log_det = t.forward(x, h, 1)
    assert torch.isfinite(y).all() and torch.isfinite(log_det).all()
    (slope,) = torch.autograd.grad(y.sum(), x)
    error = (t.inverse(y.detach(), h, 1) - x.detach()).abs()
    assert torch.isfinite(error).all()
    assert (error * slope).max() < 1e-13


@pytest.mark.parametrize("kwargs, message", [
    (dict(bins=1), "bins must be an int >= 2"),
    (dict(bins=2.5), "bins must be an int >= 2"),
    (dict(bound=0.0), "bound must be a positive"),
    (dict(bound=float("inf")), "bound must be a positive"),
    (dict(bins=10, min_width=0.2), "min_width=0.2 must be in"),
    (dict(min_height=0.0), "min_height=0.0 must be in"),
    (dict(min_derivative=0.0), "min_derivative must be in"),
    (dict(min_derivative=1.5), "min_derivative must be in"),
])
def test_spline_bad_arguments_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RationalQuadratic(**kwargs)


def test_spline_subnetwork_of_the_wrong_size_is_a_clear_error():
    t = RationalQuadratic(bins=4)  # 11 values per element
    layer = Coupling(MLP(2, 2 * 2, 8, 1), None, t, split=CheckerboardMask(0))
    with pytest.raises(ValueError, match=r"widths, heights and derivatives.*times 11"):
        layer(torch.randn(3, 4))


# ---------------------------------------------------------------------------- couplings


SPLINE_LAYERS = {
    "vector": (lambda: _vec_coupling(5, 0, RationalQuadratic(bins=5, bound=2.0)),
               lambda: _wide(4, 5, 2.0)),
    "vector-two-sided": (lambda: Coupling(MLP(2, 2 * RationalQuadratic(bins=3).num_params, 8, 1),
                                          MLP(2, 2 * RationalQuadratic(bins=3).num_params, 8, 1),
                                          RationalQuadratic(bins=3, bound=1.5)),
                         lambda: _wide(4, 4, 2.0)),
    "image-channels": (lambda: Coupling(ConvNet(2, 2 * RationalQuadratic(bins=4).num_params, 6),
                                        None, RationalQuadratic(bins=4, bound=1.0),
                                        split=ChannelMask(flip=True)),
                       lambda: 1.5 * torch.randn(2, 4, 2, 2, generator=_gen(), dtype=D)),
    "image-checkerboard": (lambda: Coupling(
        CheckerboardNet(ConvNet(2, RationalQuadratic(bins=3).num_params, 6), CheckerboardMask(1)),
        None, RationalQuadratic(bins=3, bound=1.0), split=CheckerboardMask(1)),
        lambda: 1.5 * torch.randn(2, 1, 2, 4, generator=_gen(), dtype=D)),
    "gin-vector": (lambda: _vec_coupling(5, 1, VolumePreservingAffine(2.0)), lambda: _wide(4, 5, 1.0)),
    "gin-two-sided": (lambda: Coupling(MLP(2, 4, 8, 1), MLP(2, 4, 8, 1), VolumePreservingAffine()),
                      lambda: _wide(4, 4, 1.0)),
    "gin-image": (lambda: Coupling(ConvNet(2, 4, 6), None, VolumePreservingAffine(),
                                   split=ChannelMask()),
                  lambda: torch.randn(2, 4, 2, 2, generator=_gen(), dtype=D)),
}


def _layer(name: str) -> tuple[nn.Module, torch.Tensor]:
    make, inp = SPLINE_LAYERS[name]
    torch.manual_seed(0)
    return _perturb(make()), inp()


@pytest.mark.parametrize("name", sorted(SPLINE_LAYERS))
def test_coupling_round_trip(name):
    layer, x = _layer(name)
    assert_invertible(layer, x, atol=1e-10)
    with torch.no_grad():
        assert (layer.inverse(layer(x)) - x).abs().max() < 1e-10


@pytest.mark.parametrize("name", sorted(SPLINE_LAYERS))
def test_coupling_log_det_is_slogdet_of_the_jacobian(name):
    layer, x = _layer(name)
    _, log_det = layer.forward_and_log_det(x)
    torch.testing.assert_close(log_det, _jacobian_log_det(layer, x), rtol=1e-10, atol=1e-10)
    if name.startswith("gin"):
        assert torch.equal(log_det, torch.zeros_like(log_det))  # exactly 0, not ~1e-16
    else:
        assert log_det.abs().min() > 1e-3  # a spline that changes volume


def test_log_det_check_detects_a_wrong_spline_log_det():
    """The Jacobian check above can fail: a spline whose log-det misses a factor fails it."""

    class Broken(RationalQuadratic):
        def forward(self, x, h, dim):
            y, log_det = super().forward(x, h, dim)
            return y, 0.99 * log_det

    torch.manual_seed(0)
    layer = _perturb(_vec_coupling(4, 0, Broken(bins=4)))
    x = _wide(3, 4, 1.0)
    _, log_det = layer.forward_and_log_det(x)
    assert not torch.allclose(log_det, _jacobian_log_det(layer, x), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("name", sorted(SPLINE_LAYERS))
def test_coupling_gradients_equal_stored_twin(name):
    layer, x = _layer(name)
    stack = ReversibleSequential(layer, copy_layer(layer))
    assert_matches_stored_twin(stack, x, call=lambda m, v: m.forward_and_log_det(v), rtol=1e-10)


def copy_layer(layer: nn.Module) -> nn.Module:
    import copy

    return _perturb(copy.deepcopy(layer), seed=7)


@pytest.mark.parametrize("memory", ["reversible", "checkpoint"])
def test_spline_stack_nll_gradients_equal_stored_twin(memory):
    torch.manual_seed(0)
    stack = _perturb(_spline_stack(4, 6, bins=5, bound=2.0), 0.3).train()
    x = _wide(8, 4, 2.0)
    with torch.no_grad():
        stack(x)  # ActNorm initialised
    stack.memory = memory

    def nll(m, v):
        z, log_det = m.forward_and_log_det(v)
        return -(-0.5 * z.square().sum(1) + log_det)

    assert_matches_stored_twin(stack, x, call=nll, loss_fn=lambda out: out.mean(), rtol=1e-10)


def test_spline_stack_fails_the_twin_check_when_broken():
    """The twin check can fail: a stack whose backward rebuild uses another spline fails."""
    torch.manual_seed(0)
    stack = _perturb(_spline_stack(4, 2, bins=4, bound=2.0), 0.3)
    x = _wide(5, 4, 2.0)

    class Drifting(RationalQuadratic):
        def inverse(self, y, h, dim, out=None):  # a wrong inverse: the rebuilt input drifts
            return super().inverse(y, h, dim, out=None).add_(1e-3) if out is None else \
                out.copy_(super().inverse(y, h, dim) + 1e-3)

    assert_matches_stored_twin(stack, x, call=lambda m, v: m.forward_and_log_det(v))
    stack[2].transform = Drifting(bins=4, bound=2.0)  # the last coupling: rebuilt by inverse
    with pytest.raises(AssertionError, match="differs from the stored twin"):
        assert_matches_stored_twin(stack, x, call=lambda m, v: m.forward_and_log_det(v))


def test_spline_coupling_rebuilds_with_one_evaluation_of_each_subnetwork():
    """The fused backward: f runs once in forward and once in backward, the spline's own
    element-wise operations are re-run from the recorded output (no second f)."""
    calls = []

    class Counting(MLP):
        def forward(self, x):
            calls.append(1)
            return super().forward(x)

    torch.manual_seed(0)
    t = RationalQuadratic(bins=4)
    layers = [Coupling(Counting(2, 2 * t.num_params, 8, 1), None, RationalQuadratic(bins=4),
                       split=CheckerboardMask(i % 2)) for i in range(3)]
    stack = _perturb(ReversibleSequential(*layers))
    x = _wide(4, 4, 2.0).requires_grad_(True)
    z, log_det = stack.forward_and_log_det(x)
    assert len(calls) == 3
    (z.square().sum() - log_det.sum()).backward()
    assert len(calls) == 6
    assert all(p.grad is not None for p in stack.parameters())


def test_spline_memory_held_is_the_output_only():
    """Between forward and backward a reversible spline stack holds its output (and log-det),
    whatever its depth; the stored twin holds every layer's activations."""
    from revtrain.memory import measure_step

    def held(layers: int, memory: str) -> int:
        torch.manual_seed(0)
        stack = _spline_stack(6, layers, bins=8).float()
        stack.memory = memory
        x = torch.randn(64, 6)
        with torch.no_grad():
            stack(x)
        r = measure_step(stack, x, loss_fn=lambda out: out.square().sum())
        return r["held_bytes"]

    rev = held(2, "reversible"), held(8, "reversible")
    stored = held(2, "stored"), held(8, "stored")
    kept = 64 * 6 * 4 // 16  # the engine's budget for small parameter-sized saved tensors
    assert rev[1] <= 1.05 * rev[0] + kept, rev
    assert stored[1] > 2 * stored[0] + kept


# ---------------------------------------------------------------------------- GIN


def test_gin_scales_sum_to_zero_per_sample_and_change_single_entries():
    torch.manual_seed(0)
    layer = _perturb(_vec_coupling(6, 0, VolumePreservingAffine(2.0)), 1.0)
    x = _wide(5, 6, 1.0)
    x1, x2 = layer.split.split(x)
    s, _ = layer.transform._scale_shift(layer.f(x2), 1, x.dtype)
    assert s.sum(1).abs().max() < 1e-14
    assert s.abs().max() > 0.1  # not the additive coupling in disguise
    y, log_det = layer.forward_and_log_det(x)
    assert torch.equal(log_det, torch.zeros(5, dtype=D))
    assert (y - x).abs().max() > 0.1


def test_gin_stack_log_det_is_zero_through_the_engine():
    torch.manual_seed(0)
    stack = _perturb(ReversibleSequential(
        *[_vec_coupling(4, i % 2, VolumePreservingAffine()) for i in range(4)]))
    x = _wide(3, 4, 1.0)
    z, log_det = stack.forward_and_log_det(x)
    assert torch.equal(log_det, torch.zeros(3, dtype=D))
    torch.testing.assert_close(_jacobian_log_det(stack, x), torch.zeros(3, dtype=D),
                               rtol=0, atol=1e-12)
    assert_matches_stored_twin(stack, x, rtol=1e-10)


def test_exports():
    assert revtrain.RationalQuadratic is RationalQuadratic
    assert "RationalQuadratic" in revtrain.__all__ and "VolumePreservingAffine" in revtrain.__all__
    assert repr(RationalQuadratic(bins=4, bound=2)).startswith("RationalQuadratic(bins=4, bound=2")
