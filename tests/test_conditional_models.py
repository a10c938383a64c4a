"""Conditional models (issue 10, model side): cinn, cond_realnvp, cond_glow, irim_toy.

Float64 against the stored twin at model level (parameters, input and condition), log-det
against autograd's Jacobian, round trips, sampling, memory flat in depth / iterations (with the
stored twin failing the same check), and the errors of a conditional model called badly.
"""

from __future__ import annotations

import copy

import pytest
import torch

import revtrain
from revtrain import models
from revtrain.memory import TensorMemoryTracker

D = torch.float64


def twin(model, memory):
    return revtrain.set_memory(copy.deepcopy(model), memory)


def grads(model, x, condition, seed=0):
    """Output, input / condition gradients and parameter gradients of a fixed loss."""
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    if condition.is_floating_point():
        condition = condition.detach().clone().requires_grad_()
    torch.manual_seed(seed)
    z, log_det = model.forward_and_log_det(x, condition)
    loss = (z * torch.linspace(-1, 1, z.numel(), dtype=z.dtype).view_as(z)).sum() + log_det.sum()
    loss.backward()
    extra = [condition.grad] if condition.is_floating_point() else []
    return [z.detach(), x.grad, *extra, *(p.grad for p in model.parameters())]


def assert_same(a, b):
    assert len(a) == len(b)
    for i, (p, q) in enumerate(zip(a, b)):
        assert p is not None and q is not None, f"#{i} has no gradient"
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12, msg=lambda m, i=i: f"#{i}: {m}")


def test_registered():
    assert {"cinn", "cinn_ik", "cond_realnvp", "cond_realnvp_digits", "cond_glow", "cond_glow_digits",
            "irim_toy"} <= set(models.list_models())


@pytest.mark.parametrize("memory", ["reversible", "checkpoint"])
@pytest.mark.parametrize("blocks", [1, 4, 16])
def test_cinn_gradients_of_parameters_input_and_condition_equal_the_stored_twin(blocks, memory):
    torch.manual_seed(blocks)
    base = models.create("cinn", num_blocks=blocks, hidden=16, cond_hidden=8, cond_features=4).double()
    for p in base.parameters():  # leave the identity start: zero last layers would hide mistakes
        p.data.add_(0.05 * torch.randn_like(p))
    x, y = torch.randn(3, 4, dtype=D), torch.randn(3, 2, dtype=D)
    got, want = grads(twin(base, memory), x, y), grads(twin(base, "stored"), x, y)
    assert got[2].abs().sum() > 0, "the observation gets a gradient"
    assert_same(got, want)


@pytest.mark.parametrize("name,kwargs", [
    ("cond_realnvp_digits", {"hidden": 8}),
    ("cond_glow_digits", {"steps": 1, "hidden": 8}),
    ("cond_glow_digits", {"steps": 4, "hidden": 8}),
])
def test_image_models_gradients_equal_the_stored_twin(name, kwargs):
    torch.manual_seed(0)
    base = models.create(name, **kwargs).double()
    for p in base.parameters():
        p.data.add_(0.02 * torch.randn_like(p))
    x = torch.rand(4, 1, 8, 8, dtype=D) * 0.9 + 0.05
    labels = torch.tensor([0, 3, 3, 9])
    assert_same(grads(twin(base, "reversible"), x, labels), grads(twin(base, "stored"), x, labels))


def test_cinn_log_det_is_the_jacobian_log_determinant():
    torch.manual_seed(0)
    model = models.create("cinn", num_blocks=3, hidden=16).double()
    for p in model.parameters():
        p.data.add_(0.1 * torch.randn_like(p))
    x, y = torch.randn(1, 4, dtype=D), torch.randn(1, 2, dtype=D)
    _, log_det = model.forward_and_log_det(x, y)
    jac = torch.autograd.functional.jacobian(lambda v: model(v.unsqueeze(0), y)[0], x[0])
    torch.testing.assert_close(log_det[0], torch.linalg.slogdet(jac)[1], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", ["cinn", "cond_realnvp_digits", "cond_glow_digits"])
def test_inverse_round_trip_and_the_condition_matters(name):
    torch.manual_seed(0)
    model = models.create(name, **({"num_blocks": 4} if name == "cinn" else {"hidden": 8})).double()
    for p in model.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    model.eval()
    if name == "cinn":
        x, c, other = torch.randn(5, 4, dtype=D), torch.randn(5, 2, dtype=D), torch.randn(5, 2, dtype=D)
    else:
        x, c, other = torch.rand(5, 1, 8, 8, dtype=D) * 0.9 + 0.05, torch.arange(5), torch.arange(5, 10)
    z, _ = model.forward_and_log_det(x, c)
    torch.testing.assert_close(model.inverse(z, c), x, rtol=1e-9, atol=1e-9)
    assert not torch.allclose(model.log_prob(x, context=c), model.log_prob(x, context=other))


def test_sample_takes_one_condition_or_one_per_sample():
    torch.manual_seed(0)
    flow = models.create("cond_glow_digits", hidden=8, steps=2)
    flow.eval()
    assert flow.sample(3, context=7).shape == (3, 1, 8, 8)
    assert flow.sample(3, context=torch.tensor(7)).shape == (3, 1, 8, 8)
    assert flow.sample(3, context=torch.tensor([1, 2, 3]), temperature=0.5).shape == (3, 1, 8, 8)
    with pytest.raises(ValueError, match=r"class labels of shape \(B,\)"):
        flow.sample(3, context=torch.tensor([1, 2]))
    cinn = models.create("cinn", num_blocks=2)
    assert cinn.sample(6, context=torch.tensor([1.5, 0.0])).shape == (6, 4)
    assert cinn.sample(2, context=torch.zeros(2, 2)).shape == (2, 4)
    with pytest.raises(ValueError, match=r"observations of shape \(B, 2\)"):
        cinn.sample(2, context=torch.zeros(3, 2))


def test_temperature_zero_samples_the_mode_of_each_class():
    torch.manual_seed(0)
    flow = models.create("cond_realnvp_digits", hidden=8)
    for p in flow.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    flow.eval()
    a, b = flow.sample(2, context=4, temperature=0.0), flow.sample(1, context=5, temperature=0.0)
    torch.testing.assert_close(a[0], a[1])
    assert not torch.allclose(a[0], b[0])


# --- bad input ----------------------------------------------------------------------------

@pytest.mark.parametrize("name,x", [("cinn", torch.randn(4, 4)),
                                    ("cond_realnvp_digits", torch.rand(4, 1, 8, 8)),
                                    ("cond_glow_digits", torch.rand(4, 1, 8, 8))])
def test_called_without_its_condition_names_the_model_and_the_shape(name, x):
    model = models.create(name)
    with pytest.raises(ValueError, match=r"(ConditionalVectorFlow|ConditionalMultiScaleFlow)\.forward: "
                                         r"this model is conditional; pass context= with .*\(B.*B = 4"):
        model.log_prob(x)
    with pytest.raises(ValueError, match="this model is conditional"):
        model(x)
    with pytest.raises(ValueError, match="this model is conditional"):
        model.sample(2)


def test_condition_of_another_batch_size_or_kind_is_refused():
    cinn = models.create("cinn")
    with pytest.raises(ValueError, match="condition has batch size 3 but the input 4"):
        cinn.log_prob(torch.randn(4, 4), context=torch.randn(3, 2))
    with pytest.raises(ValueError, match=r"observations of shape \(B, 2\).*shape \(4, 3\)"):
        cinn.log_prob(torch.randn(4, 4), context=torch.randn(4, 3))
    with pytest.raises(ValueError, match=r"expects vectors \(B, 4\)"):
        cinn.log_prob(torch.randn(4, 5), context=torch.randn(4, 2))
    flow = models.create("cond_realnvp_digits")
    x = torch.rand(4, 1, 8, 8)
    with pytest.raises(ValueError, match="labels must lie in 0..9, got values in 0..12"):
        flow.log_prob(x, context=torch.tensor([0, 1, 2, 12]))
    with pytest.raises(ValueError, match=r"class labels of shape \(B,\).*torch.float32"):
        flow.log_prob(x, context=torch.zeros(4))
    with pytest.raises(ValueError, match="batch size 2 but the input 4"):
        flow.log_prob(x, context=torch.tensor([1, 2]))
    with pytest.raises(TypeError, match="must be a tensor"):
        flow.log_prob(x, context=[1, 2, 3, 4])


# --- memory -------------------------------------------------------------------------------

def held_bytes(model, x, condition):
    with TensorMemoryTracker() as mem:
        out = model.log_prob(x, context=condition)
        held = mem.current
    del out
    return held


def test_cinn_memory_is_flat_in_depth_and_the_stored_twin_is_not():
    torch.manual_seed(0)
    x, y = torch.randn(256, 4), torch.randn(256, 2)
    held = {(m, d): held_bytes(models.create("cinn", num_blocks=d, hidden=32, memory=m), x, y)
            for m in ("reversible", "stored") for d in (4, 32)}
    assert held["reversible", 32] <= 1.05 * held["reversible", 4], held
    assert held["stored", 32] > 1.05 * held["stored", 4], "the same check fails for the stored twin"


def irim_held(iterations, memory):
    torch.manual_seed(0)
    model = models.create("irim_toy", iterations=iterations, hidden=16, memory=memory)
    y = torch.randn(32, 16, requires_grad=True)
    with TensorMemoryTracker() as mem:
        out = model(y)
        held = mem.current
        out.square().sum().backward()
    return held, mem.peak


def test_irim_memory_does_not_grow_with_the_number_of_iterations():
    rev = {t: irim_held(t, "reversible") for t in (4, 24)}
    stored = {t: irim_held(t, "stored") for t in (4, 24)}
    for i in (0, 1):  # held between forward and backward, and the peak of the step
        assert rev[24][i] <= 1.05 * rev[4][i], rev
        assert stored[24][i] > 1.05 * stored[4][i], "the same check fails for the stored version"


def test_irim_gradients_of_parameters_and_measurement_equal_the_stored_twin():
    torch.manual_seed(0)
    base = models.create("irim_toy", iterations=6, hidden=16).double()
    for p in base.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    y = torch.randn(3, 16, dtype=D)
    out = {}
    for memory in ("reversible", "stored"):
        model = twin(base, memory)
        yy = y.clone().requires_grad_()
        model(yy).sin().sum().backward()
        out[memory] = [yy.grad, *(p.grad for p in model.parameters())]
    assert_same(out["reversible"], out["stored"])


def test_irim_learns_to_refine():
    """A few Adam steps on sparse signals lower the reconstruction error below A^T y's."""
    torch.manual_seed(0)
    model = models.create("irim_toy", n=16, m=8, iterations=4, hidden=24)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(1)

    def batch(n=128):
        x = torch.randn(n, 16, generator=gen) * (torch.rand(n, 16, generator=gen) < 0.2)
        return x, model.measure(x) + 0.01 * torch.randn(n, 8, generator=gen)

    x_test, y_test = batch(512)
    with torch.no_grad():
        start = (model(y_test) - x_test).square().mean()
    for _ in range(80):
        x, y = batch()
        loss = (model(y) - x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        end = (model(y_test) - x_test).square().mean()
    assert end < 0.7 * start, (float(start), float(end))
