"""Flow layers and models: round trips, log-det against autograd, gradients of the NLL
through the reversible engine against the stored twin, ActNorm initialisation, memory flat in
depth, clear errors on bad input. TESTPLAN cases 8, 11, 12, 22, 30, 32 for the flows."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn

import revtrain
from revtrain import Additive, Affine, ChannelSplit, Coupling, ReversibleSequential, SigmoidAffine
from revtrain.flows import (
    MLP,
    ActNorm,
    CenterShift,
    ChannelMask,
    CheckerboardMask,
    CheckerboardNet,
    ConvNet,
    DiagonalScaling,
    GaussianSplit,
    InvConv1x1,
    InvConv1x1LU,
    LearnedTanhScale,
    LearnedTopPrior,
    LogitTransform,
    ResNet,
    StandardLogistic,
    StandardNormal,
    UniformDequantization,
    VariationalDequantization,
    bits_per_dim,
)
from revtrain.models import create, list_models
from revtrain.models.flows import glow_level

B = 3


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _img(c: int, h: int, w: int | None = None, seed: int = 0) -> torch.Tensor:
    return torch.randn(B, c, h, w or h, generator=_gen(seed), dtype=torch.float64)


def _unit(c: int, h: int, seed: int = 0) -> torch.Tensor:
    """Images in (0.1, 0.9): inside the logit's domain with margin."""
    return 0.1 + 0.8 * torch.rand(B, c, h, h, generator=_gen(seed), dtype=torch.float64)


def _vec(d: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(B, d, generator=_gen(seed), dtype=torch.float64)


def _cb_coupling(c: int, parity: int, affine: bool) -> Coupling:
    mask = CheckerboardMask(parity)
    k = 2 if affine else 1
    net = CheckerboardNet(ConvNet(c + 1, k * c, hidden=6), mask)
    return Coupling(net, None, Affine(2.0) if affine else Additive(), split=mask)


def _vec_cb_coupling(d: int, parity: int, affine: bool) -> Coupling:
    mask = CheckerboardMask(parity)
    n1 = len(range(parity, d, 2))
    k = 2 if affine else 1
    return Coupling(MLP(d - n1, k * n1, 8, 1), None, Affine(2.0) if affine else Additive(),
                    split=mask)


def _ch_coupling(c: int, flip: bool, transform=None) -> Coupling:
    return Coupling(ConvNet(c - c // 2, 2 * (c // 2), 6), None, transform or Affine(2.0),
                    split=ChannelMask(flip))


def _cb_sigmoid(c: int, parity: int) -> Coupling:
    mask = CheckerboardMask(parity)
    return Coupling(CheckerboardNet(ConvNet(c + 1, 2 * c, 6), mask), None, SigmoidAffine(), mask)


def _cb_learned_tanh(c: int, parity: int) -> Coupling:
    """RealNVP's coupling: residual network, s = a tanh(s~) with a learned a per channel."""
    mask = CheckerboardMask(parity)
    net = LearnedTanhScale(CheckerboardNet(ResNet(c + 1, 2 * c, 6, num_blocks=2), mask), c)
    return Coupling(net, None, Affine(None), mask)


# name -> (module factory, input factory); all in float64
LAYERS = {
    "actnorm-vec": (lambda: ActNorm(4), lambda: _vec(4)),
    "actnorm-img": (lambda: ActNorm(3), lambda: _img(3, 4)),
    "invconv-img": (lambda: InvConv1x1(3), lambda: _img(3, 2)),
    "invconv-vec": (lambda: InvConv1x1(4), lambda: _vec(4)),
    "invconv-lu-img": (lambda: InvConv1x1LU(3), lambda: _img(3, 2)),
    "invconv-lu-vec": (lambda: InvConv1x1LU(5), lambda: _vec(5)),
    "scaling": (lambda: DiagonalScaling(4), lambda: _vec(4)),
    "scaling-img": (lambda: DiagonalScaling(2), lambda: _img(2, 2)),
    "checkerboard-affine-0": (lambda: _cb_coupling(2, 0, True), lambda: _img(2, 4)),
    "checkerboard-affine-1": (lambda: _cb_coupling(1, 1, True), lambda: _img(1, 4, 2)),
    "checkerboard-additive": (lambda: _cb_coupling(2, 1, False), lambda: _img(2, 2, 4)),
    "checkerboard-vec-odd": (lambda: _vec_cb_coupling(5, 0, True), lambda: _vec(5)),
    "checkerboard-vec-1": (lambda: _vec_cb_coupling(4, 1, False), lambda: _vec(4)),
    "channel-mask": (lambda: _ch_coupling(4, False), lambda: _img(4, 3)),
    "channel-mask-flip-odd": (lambda: _ch_coupling(5, True), lambda: _img(5, 2)),
    "gaussian-split": (lambda: GaussianSplit(4), lambda: _img(4, 3)),
    "gaussian-split-hidden": (lambda: GaussianSplit(3, hidden=5), lambda: _img(3, 2)),
    "gaussian-split-vec": (lambda: GaussianSplit(5, image=False), lambda: _vec(5)),
    "channel-mask-sigmoid": (lambda: _ch_coupling(4, False, SigmoidAffine()), lambda: _img(4, 3)),
    "channel-split-sigmoid": (lambda: Coupling(ConvNet(2, 4, 6), None, SigmoidAffine(),
                                               ChannelSplit(1)), lambda: _img(4, 2)),
    "checkerboard-sigmoid": (lambda: _cb_sigmoid(2, 1), lambda: _img(2, 4)),
    "checkerboard-vec-sigmoid": (lambda: Coupling(MLP(2, 6, 8, 1), None, SigmoidAffine(),
                                                  CheckerboardMask(0)), lambda: _vec(5)),
    "checkerboard-learned-tanh": (lambda: _cb_learned_tanh(2, 0), lambda: _img(2, 4)),
    "learned-top": (lambda: LearnedTopPrior((2, 3, 3)), lambda: _img(2, 3)),
    "learned-top-vec": (lambda: LearnedTopPrior((4,)), lambda: _vec(4)),
    "logit": (lambda: LogitTransform(0.05), lambda: _unit(2, 2)),
    "center": (lambda: CenterShift(), lambda: _unit(1, 3)),
}

# name -> (create kwargs, input factory)
MODELS = {
    "nice": (dict(name="nice", dim=6, hidden=8, depth=2, num_layers=4), lambda: _vec(6)),
    "nice-normal": (dict(name="nice", dim=3, hidden=8, depth=1, prior="normal"), lambda: _vec(3)),
    "realnvp-vec": (dict(name="realnvp", dim=5, hidden=8, num_layers=4), lambda: _vec(5)),
    "realnvp-img": (dict(name="realnvp", in_channels=1, image_size=4, levels=2, hidden=4),
                    lambda: _unit(1, 4)),
    "realnvp-img-prior": (dict(name="realnvp", in_channels=2, image_size=4, levels=2, hidden=4,
                               split_prior=True, actnorm=False), lambda: _unit(2, 4)),
    "glow": (dict(name="glow", in_channels=1, image_size=4, levels=2, steps=2, hidden=4),
             lambda: _unit(1, 4)),
    "glow-plain-conv": (dict(name="glow", in_channels=2, image_size=4, levels=2, steps=1,
                             hidden=4, lu=False, split_prior=False), lambda: _unit(2, 4)),
    "glow-logit": (dict(name="glow", in_channels=1, image_size=4, levels=2, steps=1, hidden=4,
                        preprocess="logit"), lambda: _unit(1, 4)),
    "glow-openai": (dict(name="glow", in_channels=1, image_size=4, levels=2, steps=2, hidden=4,
                         lu=False, scale="sigmoid", learn_top=True), lambda: _unit(1, 4)),
    "realnvp-paper": (dict(name="realnvp", in_channels=1, image_size=4, levels=2, hidden=4,
                           coupling_net="resnet", num_blocks=2, scale="learned_tanh"),
                      lambda: _unit(1, 4)),
    "realnvp-vec-learned-tanh": (dict(name="realnvp", dim=5, hidden=8, num_layers=3,
                                      scale="learned_tanh"), lambda: _vec(5)),
    "nsf": (dict(name="nsf", dim=3, hidden=8, num_layers=3, bins=4), lambda: _vec(3)),
    "gin": (dict(name="gin", dim=4, hidden=8, num_layers=3), lambda: _vec(4)),
    "spline-realnvp-img": (dict(name="spline_realnvp", in_channels=1, image_size=4, levels=2,
                                hidden=4, bins=3), lambda: _unit(1, 4)),
    "spline-realnvp-vec": (dict(name="spline_realnvp", dim=3, hidden=8, num_layers=2, bins=3),
                           lambda: _vec(3)),
    "spline-glow": (dict(name="spline_glow", in_channels=1, image_size=4, levels=2, steps=2,
                         hidden=4, bins=3), lambda: _unit(1, 4)),
}


def _prepare(module: nn.Module, x: torch.Tensor, seed: int = 1) -> nn.Module:
    """float64, ActNorm initialised on ``x``, every parameter moved off its (often zero) init."""
    module = module.double().train()
    with torch.no_grad():
        module(x)
        gen = _gen(seed)
        for p in module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return module


def _layer(name: str) -> tuple[nn.Module, torch.Tensor]:
    make, inp = LAYERS[name]
    torch.manual_seed(0)
    x = inp()
    return _prepare(make(), x), x


def _model(name: str) -> tuple[nn.Module, torch.Tensor]:
    kwargs, inp = MODELS[name]
    kwargs = dict(kwargs)
    torch.manual_seed(0)
    x = inp()
    return _prepare(create(kwargs.pop("name"), **kwargs), x), x


def _slogdet_check(module: nn.Module, x: torch.Tensor) -> None:
    """``log_det`` equals ``slogdet`` of the Jacobian, built with one batched backward.

    Each sample is repeated ``D`` times; back-propagating the identity gives row ``i`` of its
    Jacobian in copy ``i`` (the module must act on samples independently: eval mode).
    """
    _, log_det = module.forward_and_log_det(x)
    assert log_det.shape == (x.shape[0],)
    b, d = x.shape[0], x[0].numel()
    xs = x.repeat_interleave(d, dim=0).requires_grad_(True)  # (B * D, ...)
    y = module.forward_and_log_det(xs)[0].reshape(b, d, -1)  # (B, D copies, D outputs)
    assert y.shape[2] == d
    eye = torch.eye(d, dtype=x.dtype).expand(b, d, d)
    (jac,) = torch.autograd.grad(y, xs, eye)
    jac = jac.reshape(b, d, d)  # jac[b, i, j] = d y_i / d x_j
    sign, logabs = torch.linalg.slogdet(jac)
    assert (sign != 0).all()
    torch.testing.assert_close(log_det, logabs, rtol=1e-9, atol=1e-9)
    # the batched Jacobian is the one autograd.functional builds (for the first sample)
    if d <= 16:
        def f(xb):
            return module.forward_and_log_det(xb.unsqueeze(0))[0].reshape(-1)
        ref = torch.autograd.functional.jacobian(f, x[0]).reshape(d, d)
        torch.testing.assert_close(jac[0], ref, rtol=1e-10, atol=1e-12)


def _round_trip(module: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        y = module(x)
        torch.testing.assert_close(module.inverse(y), x, rtol=0, atol=1e-10)
        # the other direction, from a point of the range that forward did not produce
        y_other = y + 0.01 * torch.randn(y.shape, generator=_gen(5), dtype=y.dtype)
        torch.testing.assert_close(module(module.inverse(y_other)), y_other, rtol=0, atol=1e-10)


def _nll_grads(module: nn.Module, x: torch.Tensor, prior: nn.Module | None = None):
    x = x.clone().requires_grad_(True)
    prior = prior or StandardNormal()
    y, log_det = module.forward_and_log_det(x)
    nll = -(prior.log_prob(y) + log_det)
    # unequal weights per sample, so that a gradient summed over the wrong axis shows
    (nll * torch.arange(1, x.shape[0] + 1, dtype=x.dtype)).mean().backward()
    return x.grad, {n: p.grad for n, p in module.named_parameters()}


# ---------------------------------------------------------------------------- layers


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_layer_round_trip(name):
    layer, x = _layer(name)
    layer.eval()
    _round_trip(layer, x)
    assert isinstance(layer, revtrain.InvertibleModule)
    assert revtrain.is_invertible(layer, x)


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_layer_log_det_matches_jacobian(name):
    layer, x = _layer(name)
    _slogdet_check(layer.eval(), x)


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_layer_nll_gradients_equal_stored_twin(name):
    layer, x = _layer(name)
    rev = ReversibleSequential(layer, memory="reversible")
    stored = copy.deepcopy(rev)
    stored.memory = "stored"
    gx_r, g_r = _nll_grads(rev, x)
    gx_s, g_s = _nll_grads(stored, x)
    torch.testing.assert_close(gx_r, gx_s, rtol=1e-10, atol=1e-12)
    assert g_r.keys() == g_s.keys()
    for n in g_s:
        assert g_r[n] is not None and g_s[n] is not None, n
        assert g_s[n].abs().max() > 0, f"{n} receives no gradient"
        torch.testing.assert_close(g_r[n], g_s[n], rtol=1e-10, atol=1e-12, msg=n)


def test_log_det_check_detects_a_wrong_log_det():
    """The Jacobian check can fail: a layer that drops a factor of its log-det is caught."""

    class HalfLogDet(DiagonalScaling):
        def forward_and_log_det(self, x):
            y, log_det = super().forward_and_log_det(x)
            return y, 0.5 * log_det

    layer = _prepare(HalfLogDet(4), _vec(4))
    with pytest.raises(AssertionError):
        _slogdet_check(layer, _vec(4))


def test_lu_and_plain_conv_agree():
    """The LU form is the same map as the dense weight it stands for; log-det is sum(log s)."""
    lu = _prepare(InvConv1x1LU(4), _img(4, 2))
    weight, log_abs_det = lu.weight_and_log_abs_det()
    plain = InvConv1x1(4).double()
    with torch.no_grad():
        plain.weight.copy_(weight)
    x = _img(4, 3)
    y1, ld1 = lu.forward_and_log_det(x)
    y2, ld2 = plain.forward_and_log_det(x)
    torch.testing.assert_close(y1, y2)
    torch.testing.assert_close(ld1, ld2)
    torch.testing.assert_close(log_abs_det, torch.linalg.slogdet(weight)[1])


def test_checkerboard_mask_is_a_checkerboard():
    """Half 1 of parity 0 holds exactly the positions with even h + w, packed row by row."""
    mask = CheckerboardMask(0)
    h, w = 4, 6
    grid = torch.arange(h * w, dtype=torch.float64).reshape(1, 1, h, w)
    x1, x2 = mask.split(grid)
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    even = ((rows + cols) % 2 == 0).reshape(1, 1, h, w)
    assert torch.equal(x1.sort(-1).values.flatten(), grid[even].flatten())
    assert torch.equal(x2.flatten().sort().values, grid[~even].flatten().sort().values)
    assert torch.equal(mask.merge(x1, x2), grid)
    vec = torch.arange(5.0).unsqueeze(0)
    v1, v2 = CheckerboardMask(1).split(vec)
    assert v1.tolist() == [[1.0, 3.0]] and v2.tolist() == [[0.0, 2.0, 4.0]]
    assert torch.equal(CheckerboardMask(1).merge(v1, v2), vec)


def test_checkerboard_net_sees_only_the_conditioning_half():
    """Changing x1 leaves f(x2) alone: the sub-network input carries no x1 values."""
    torch.manual_seed(0)
    layer = _cb_coupling(2, 0, True).double()
    nn.init.normal_(layer.f.net.net[-1].weight)
    x = _img(2, 4)
    x1, x2 = layer.splitter.split(x)
    h = layer.f(x2)
    x_changed = layer.splitter.merge(x1 + 1.0, x2)
    torch.testing.assert_close(layer.f(layer.splitter.split(x_changed)[1]), h)


def test_extreme_subnetwork_outputs_stay_finite():
    """Soft clamp: forward, inverse and log-det finite for huge sub-network outputs (case 11)."""
    layer = _layer("checkerboard-affine-0")[0]
    with torch.no_grad():
        layer.f.net.net[-1].bias.fill_(1e4)
    x = _img(2, 4)
    y, log_det = layer.forward_and_log_det(x)
    assert torch.isfinite(y).all() and torch.isfinite(log_det).all()
    assert torch.isfinite(layer.inverse(y)).all()


# ---------------------------------------------------------------------------- models


def test_registry_lists_flow_models():
    assert {"nice", "realnvp", "glow", "nsf", "gin", "spline_realnvp", "spline_glow"} <= set(
        list_models(task="density"))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_model_round_trip(name):
    model, x = _model(name)
    model.eval()
    _round_trip(model, x)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_model_log_det_matches_jacobian(name):
    model, x = _model(name)
    _slogdet_check(model.eval(), x[:2])


@pytest.mark.parametrize("mode", ["reversible", "checkpoint"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_model_nll_gradients_equal_stored_twin(name, mode):
    model, x = _model(name)
    model.memory = mode
    stored = copy.deepcopy(model)
    stored.memory = "stored"
    assert model.memory.value == mode and stored.memory.value == "stored"
    x = x.clone().requires_grad_(True)
    xs = x.detach().clone().requires_grad_(True)
    lp_r, lp_s = model.log_prob(x), stored.log_prob(xs)
    torch.testing.assert_close(lp_r, lp_s, rtol=1e-12, atol=1e-12)
    (-lp_r.mean()).backward()
    (-lp_s.mean()).backward()
    torch.testing.assert_close(x.grad, xs.grad, rtol=1e-10, atol=1e-12)
    for (n, p), q in zip(model.named_parameters(), stored.parameters()):
        assert p.grad is not None and q.grad is not None, n
        assert q.grad.abs().max() > 0, f"{n} receives no gradient"
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-12, msg=n)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_model_sample_shapes_and_finite(name):
    model, x = _model(name)
    model.eval()
    for temperature in (0.0, 0.7, 1.0):
        s = model.sample(5, temperature=temperature)
        assert s.shape == (5, *x.shape[1:])
        assert torch.isfinite(s).all()
        assert torch.isfinite(model.log_prob(s.clamp(0.0, 1.0) if x.dim() == 4 else s)).all()
    # temperature 0 gives the image of z = 0: every sample is the same point
    s0 = model.sample(2, temperature=0.0)
    torch.testing.assert_close(s0[0], s0[1])


@pytest.mark.parametrize("name", sorted(MODELS))
def test_model_log_prob_of_its_samples_works(name):
    """Samples are valid data: images in [0, 1] (the logit's inverse clamps into the data range),
    and ``log_prob`` of a sample is finite, for every flow model, trained or not."""
    model, x = _model(name)
    model.eval()
    for temperature in (0.7, 1.0, 2.0):
        s = model.sample(64, temperature=temperature)
        if isinstance(model.preprocess if hasattr(model, "preprocess") else None, LogitTransform):
            assert s.min() >= 0 and s.max() <= 1
        assert torch.isfinite(model.log_prob(s)).all()


def test_untrained_digits_realnvp_samples_have_a_log_prob():
    """The case of issue 15: an untrained digits RealNVP's samples fell outside [0, 1] (37.5 %)
    and ``log_prob`` raised; with the unclamped inverse the same check fails."""
    torch.manual_seed(0)
    model = create("realnvp", in_channels=1, image_size=8, levels=2, hidden=32).eval()
    torch.manual_seed(1)
    s = model.sample(64)
    assert torch.isfinite(model.log_prob(s)).all()
    assert ((s == 0) | (s == 1)).any()  # the clamp did act: this is not a vacuous check

    class Unclamped(LogitTransform):
        def inverse(self, y):
            return (torch.sigmoid(y) - self.alpha) / (1 - 2 * self.alpha)

    model.preprocess = Unclamped(model.preprocess.alpha)
    torch.manual_seed(1)
    with pytest.raises(ValueError, match="expects data in"):
        model.log_prob(model.sample(64))


def test_glow_preprocess_and_transform_options():
    logit = create("glow", in_channels=1, image_size=4, levels=1, steps=1, hidden=4,
                   preprocess="logit")
    assert isinstance(logit.preprocess, LogitTransform)
    assert isinstance(create("glow", in_channels=1, image_size=4, levels=1, steps=1,
                             hidden=4).preprocess, CenterShift)
    spline = create("spline_glow", in_channels=1, image_size=4, levels=1, steps=1, hidden=4)
    assert isinstance(spline.preprocess, LogitTransform)
    assert "RationalQuadratic(bins=8" in repr(spline)
    with pytest.raises(ValueError, match="unknown coupling transform 'splin'; use one of"):
        create("realnvp", dim=2, transform="splin")
    with pytest.raises(ValueError, match="preprocess must be 'logit' or 'center'"):
        create("glow", preprocess="none")


@pytest.mark.parametrize("name", ["glow", "realnvp-img", "nice"])
def test_model_state_dict_round_trip(name):
    model, x = _model(name)
    kwargs = dict(MODELS[name][0])
    fresh = create(kwargs.pop("name"), **kwargs).double()
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    fresh.load_state_dict(torch.load(buffer))
    fresh.train()  # training mode: a re-initialising ActNorm would change the result
    torch.testing.assert_close(fresh.log_prob(x), model.log_prob(x))


def test_model_log_prob_is_a_density():
    """A 2-D flow's density integrates to 1 over a grid that holds its mass."""
    model, _ = _model("realnvp-vec")
    model = create("realnvp", dim=2, hidden=8, num_layers=4).double()
    _prepare(model, _vec(2) * 0.5)
    model.eval()
    side = torch.linspace(-12, 12, 801, dtype=torch.float64)
    grid = torch.cartesian_prod(side, side)
    with torch.no_grad():
        mass = model.log_prob(grid).exp().sum() * (side[1] - side[0]) ** 2
    assert abs(float(mass) - 1.0) < 1e-3


def test_glow_shapes_and_latent_size():
    model = create("glow", in_channels=3, image_size=8, levels=3, steps=1, hidden=4)
    assert model.output_shapes == [(12, 4, 4), (24, 2, 2), (48, 1, 1)]
    assert model.factored == [6, 12, 0]
    assert model.num_dims == 3 * 8 * 8
    z = model(torch.rand(2, 3, 8, 8))
    assert z.shape == (2, 192)


# ---------------------------------------------------------------------------- ActNorm


def test_actnorm_initialises_on_the_first_training_batch_only():
    torch.manual_seed(0)
    layer = ActNorm(3).double()
    assert not bool(layer.initialized)
    x = 3.0 + 2.0 * _img(3, 5)
    layer.eval()
    layer(x)  # eval mode: no initialisation
    assert not bool(layer.initialized)
    layer.train()
    y = layer(x)
    assert bool(layer.initialized)
    torch.testing.assert_close(y.mean((0, 2, 3)), torch.zeros(3, dtype=y.dtype), atol=1e-6, rtol=0)
    torch.testing.assert_close(y.std((0, 2, 3), unbiased=False), torch.ones(3, dtype=y.dtype),
                               atol=1e-5, rtol=0)
    before = copy.deepcopy(layer.state_dict())
    layer(_img(3, 5, seed=7) * 5.0)  # another batch: no re-initialisation
    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k]), k


def _actnorm_stack(memory: str = "reversible") -> ReversibleSequential:
    torch.manual_seed(0)
    return ReversibleSequential(ActNorm(2), _ch_coupling(2, False), ActNorm(2),
                                _ch_coupling(2, True), memory=memory).double()


@pytest.mark.parametrize("mode", ["reversible", "checkpoint"])
def test_actnorm_initialises_once_through_a_reversible_stack(mode):
    """Init happens in forward (inside the engine); backward's recomputation sees it."""
    rev = _actnorm_stack(mode)
    stored = copy.deepcopy(rev)
    stored.memory = "stored"
    x = 1.0 + 3.0 * _img(2, 4)
    gx_r, g_r = _nll_grads(rev, x)
    after_forward = {k: v.clone() for k, v in rev.state_dict().items()}
    gx_s, g_s = _nll_grads(stored, x)
    for k, v in stored.state_dict().items():
        torch.testing.assert_close(after_forward[k], v, rtol=1e-12, atol=1e-12, msg=k)
    assert bool(rev[0].initialized) and bool(rev[2].initialized)
    torch.testing.assert_close(gx_r, gx_s, rtol=1e-10, atol=1e-12)
    for n in g_s:
        torch.testing.assert_close(g_r[n], g_s[n], rtol=1e-10, atol=1e-12, msg=n)
    # the first ActNorm's output of that batch is normalised: it ran its init on x
    y0 = rev[0](x)
    torch.testing.assert_close(y0.mean((0, 2, 3)), torch.zeros(2, dtype=x.dtype), atol=1e-6,
                               rtol=0)
    # a second step does not initialise again
    _nll_grads(rev, x * 7.0 - 2.0)
    for k, v in rev.state_dict().items():
        assert torch.equal(v, after_forward[k]), k


def test_actnorm_survives_state_dict_reload():
    layer = ActNorm(3).double().train()
    layer(2.0 + _img(3, 4))
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    resumed = ActNorm(3).double().train()
    resumed.load_state_dict(torch.load(buffer))
    assert bool(resumed.initialized)
    other = 5.0 * _img(3, 4, seed=3) - 1.0
    resumed(other)  # the first batch after resuming must not initialise
    torch.testing.assert_close(resumed.log_scale, layer.log_scale, rtol=0, atol=0)
    torch.testing.assert_close(resumed.bias, layer.bias, rtol=0, atol=0)
    # the same first batch on a module that was not reloaded does initialise (test can fail)
    fresh = ActNorm(3).double().train()
    fresh.load_state_dict({k: v for k, v in layer.state_dict().items() if k != "initialized"}
                          | {"initialized": torch.tensor(False)})
    fresh(other)
    assert not torch.equal(fresh.log_scale, layer.log_scale)


def test_actnorm_loads_a_checkpoint_without_the_buffer():
    layer = ActNorm(2).train()
    layer(_img(2, 3).float())
    old = {k: v for k, v in layer.state_dict().items() if k != "initialized"}
    resumed = ActNorm(2)
    resumed.load_state_dict(old)
    assert bool(resumed.initialized)


# ---------------------------------------------------------------------------- memory


class _LevelNLL(nn.Module):
    def __init__(self, level: ReversibleSequential):
        super().__init__()
        self.level = level

    def forward(self, x):
        return self.level.forward_and_log_det(x)


def _nll(out):
    y, log_det = out
    return -(StandardNormal().log_prob(y) + log_det).mean()


def _held(steps: int, memory: str) -> int:
    from revtrain.memory import measure_step

    torch.manual_seed(0)
    level = glow_level(2, steps, hidden=8, squeeze=True, split=True, memory=memory)
    x = torch.rand(2, 2, 8, 8)
    with torch.no_grad():
        level.train()(x)  # ActNorm init before measuring
    return measure_step(_LevelNLL(level), x, loss_fn=_nll, warmup=0)["held_bytes"]


def test_glow_level_memory_flat_in_depth():
    """K = 32 steps hold within 5% of K = 4 in reversible mode; the stored twin does not."""
    rev4, rev32 = _held(4, "reversible"), _held(32, "reversible")
    assert rev4 > 0
    assert rev32 <= 1.05 * rev4, (rev4, rev32)
    stored4, stored32 = _held(4, "stored"), _held(32, "stored")
    assert stored32 > 1.05 * stored4, (stored4, stored32)  # the same check fails for stored
    assert stored4 > rev4


# ---------------------------------------------------------------------------- bad input


def test_odd_size_before_squeeze_is_a_clear_error():
    level = glow_level(1, 1, hidden=4)
    with pytest.raises(ValueError, match="multiples of 2"):
        level(torch.rand(2, 1, 5, 4))
    with pytest.raises(ValueError, match="divisible by 2\\*\\*levels"):
        create("glow", in_channels=1, image_size=12, levels=3, steps=1, hidden=4)
    with pytest.raises(ValueError, match="divisible by 2\\*\\*levels"):
        create("realnvp", in_channels=1, image_size=6, levels=2, hidden=4)
    model = create("glow", in_channels=1, image_size=8, levels=2, steps=1, hidden=4)
    with pytest.raises(ValueError, match="expects images"):
        model.log_prob(torch.rand(2, 1, 7, 8))


def test_masks_that_cannot_split_are_clear_errors():
    with pytest.raises(ValueError, match="at least 2 channels"):
        _ch_coupling(2, False)(torch.randn(2, 1, 4, 4).double())
    layer = _cb_coupling(1, 0, True)
    with pytest.raises(ValueError, match="even width"):
        layer(torch.randn(2, 1, 4, 3))
    with pytest.raises(ValueError, match="at least 2 features"):
        _vec_cb_coupling(2, 0, True)(torch.randn(2, 1))
    with pytest.raises(ValueError, match="at least 2 channels"):
        GaussianSplit(1)
    with pytest.raises(ValueError, match="parity"):
        CheckerboardMask(2)
    with pytest.raises(ValueError, match="expects 4 channels"):
        ActNorm(4)(torch.randn(2, 3))
    with pytest.raises(ValueError, match="expects 3 channels"):
        InvConv1x1LU(3)(torch.randn(2, 4, 2, 2))


@pytest.mark.parametrize("deq", [UniformDequantization(17),
                                 VariationalDequantization(17, (1, 4, 4), hidden=4)])
def test_dequantization_rejects_out_of_range_data(deq):
    good = torch.randint(0, 17, (2, 1, 4, 4))
    deq(good)
    for bad, match in [(good + 17, "integers in \\[0, 16\\]"),
                       (good - 1, "integers in \\[0, 16\\]"),
                       (good.float() / 16, "integer levels"),
                       (good.float() + 0.5, "integer levels")]:
        if bad.max() <= 16 and bad.min() >= 0 and (bad == bad.round()).all():
            continue
        with pytest.raises(ValueError, match=match):
            deq(bad)


def test_logit_rejects_data_outside_unit_interval():
    with pytest.raises(ValueError, match="expects data in \\[0, 1\\]"):
        LogitTransform()(torch.full((2, 1, 2, 2), 255.0))
    model = create("realnvp", in_channels=1, image_size=4, levels=1, hidden=4)
    with pytest.raises(ValueError, match="dequantize"):
        model.log_prob(torch.randint(0, 17, (2, 1, 4, 4)).float())


# ---------------------------------------------------------------------------- dequantization


@pytest.mark.parametrize("variational", [False, True])
def test_dequantization_stays_in_the_cell_of_x(variational):
    torch.manual_seed(0)
    levels = 17
    x = torch.randint(0, levels, (64, 1, 4, 4))
    deq = (VariationalDequantization(levels, (1, 4, 4), hidden=4) if variational
           else UniformDequantization(levels))
    y, log_q = deq(x)
    assert torch.equal(torch.floor(y * levels).long(), x)
    assert log_q.shape == (64,)
    if not variational:
        torch.testing.assert_close(log_q, torch.full((64,), 16 * math.log(levels)))


def test_variational_dequantization_log_density_matches_change_of_variables():
    """log q(u|x) is N(eps) divided by |du/deps|, entry by entry (checked with autograd)."""
    torch.manual_seed(0)
    deq = VariationalDequantization(5, (3,), hidden=4).double()
    nn.init.normal_(deq.net[-1].weight)
    x = torch.tensor([[0.0, 2.0, 4.0]], dtype=torch.float64)
    s, t = deq.net(x / 5 - 0.5).chunk(2, dim=1)
    s = 2.0 * torch.tanh(s / 2.0)
    gen_state = torch.get_rng_state()
    y, log_q = deq(x)
    torch.set_rng_state(gen_state)
    eps = torch.randn_like(x).requires_grad_(True)
    u = torch.sigmoid(eps * torch.exp(s.detach()) + t.detach())
    du = torch.autograd.grad(u.sum(), eps)[0]  # diagonal Jacobian
    expected = (StandardNormal().log_prob(eps.detach()) - du.log().sum(1) + 3 * math.log(5))
    torch.testing.assert_close(y, (x + u.detach()) / 5)
    torch.testing.assert_close(log_q, expected)


def test_bits_per_dim_of_the_uniform_density_is_log2_levels():
    """p(y) = 1 on [0, 1]^D with uniform dequantization: exactly log2(K) bits per dimension."""
    x = torch.randint(0, 17, (4, 1, 8, 8))
    y, log_q = UniformDequantization(17)(x)
    bpd = bits_per_dim(torch.zeros(4) - log_q, 64)
    torch.testing.assert_close(bpd, torch.full((4,), math.log2(17)))


def test_logistic_prior_is_normalised():
    z = torch.linspace(-40, 40, 200001, dtype=torch.float64).unsqueeze(1)
    mass = StandardLogistic().log_prob(z).exp().sum() * (z[1, 0] - z[0, 0])
    assert abs(float(mass) - 1.0) < 1e-6
    s = StandardLogistic().sample((20000, 1))
    assert abs(float(s.var()) - math.pi ** 2 / 3) < 0.2


# ---------------------------------------------------------------------------- DDP


def _ddp_actnorm_worker(rank: int, world: int, init_file: str, x: torch.Tensor, out: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        torch.manual_seed(0)  # same initial weights on every rank
        model = DistributedDataParallel(_LevelNLL(_actnorm_stack()))
        shard = x.chunk(world)[rank]
        for step in range(2):
            _nll(model(shard * (step + 1.0))).backward()  # the second batch is another one
            if step == 0:
                first = {k: v.clone() for k, v in model.module.level.state_dict().items()}
        torch.save({"first": first, "final": model.module.level.state_dict()}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_actnorm_initialises_identically_under_ddp(tmp_path):
    """Two gloo ranks, each with half of the batch: ActNorm initialises once, from the
    statistics of the whole batch, identically on both ranks."""
    import torch.multiprocessing as mp

    world = 2
    x = 1.0 + 3.0 * _img(2, 4, seed=11).repeat(2, 1, 1, 1)
    x[B:] = 2.0 * x[B:] - 1.0  # the two shards differ in mean and scale
    out = str(tmp_path / "state")
    mp.spawn(_ddp_actnorm_worker, args=(world, str(tmp_path / "init"), x, out), nprocs=world)
    states = [torch.load(f"{out}.{r}") for r in range(world)]
    reference = _actnorm_stack()
    reference.train()(x)  # single process, full batch
    for k in ("layers.0.log_scale", "layers.0.bias"):
        for state in states:
            torch.testing.assert_close(state["first"][k], reference.state_dict()[k],
                                       rtol=1e-10, atol=1e-12, msg=k)
            # the second step (another batch) did not initialise again
            torch.testing.assert_close(state["final"][k], state["first"][k], rtol=0, atol=0)
    assert bool(states[0]["final"]["layers.0.initialized"])


# ---------------------------------------------------------------------------- CUDA


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["glow", "realnvp-img", "nice", "glow-openai", "realnvp-paper"])
def test_model_on_cuda_matches_stored_twin(name):
    model, x = _model(name)
    model, x = model.cuda(), x.cuda()
    stored = copy.deepcopy(model)
    stored.memory = "stored"
    (-model.log_prob(x).mean()).backward()
    (-stored.log_prob(x).mean()).backward()
    for (n, p), q in zip(model.named_parameters(), stored.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-12, msg=n)
    s = model.eval().sample(4, temperature=0.7)
    assert s.is_cuda and torch.isfinite(s).all()
