"""Conditional stacks: a context handed to every sub-network (issue 10, engine side).

Float64 against the stored twin: parameters, input and context gradients; a context of another
shape than the input; memory flat in depth with the context held once; one extra evaluation per
sub-network; bad input.
"""

from __future__ import annotations

import pytest
import torch
from engine_helpers import twin
from torch import nn

import revtrain
from revtrain import (
    AdditiveCoupling,
    AffineCoupling,
    ConditionalNet,
    ReconstructionError,
    ReversibleSequential,
)

D = torch.float64
MODES = ("reversible", "checkpoint")


def cond_net(c_in, c_out, k, hidden=8, dropout=0.0):
    """A conv sub-network that takes (x, context) with ``k`` context channels."""
    last = nn.Conv2d(hidden, c_out, 3, padding=1)
    with torch.no_grad():
        last.weight.mul_(0.3)
    layers = [nn.Conv2d(c_in + k, hidden, 3, padding=1), nn.ReLU()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    return ConditionalNet(nn.Sequential(*layers, last))


def cond_stack(depth, kind, c=4, k=3, memory="reversible", dropout=0.0):
    c1, c2 = c // 2, c - c // 2
    m = 2 if kind == "affine" else 1
    cls = AffineCoupling if kind == "affine" else AdditiveCoupling
    return ReversibleSequential(*[cls(cond_net(c2, m * c1, k, dropout=dropout),
                                      cond_net(c1, m * c2, k, dropout=dropout)) for _ in range(depth)],
                                memory=memory)


def step(model, x, context, seed=0):
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    context = context.detach().clone().requires_grad_()
    torch.manual_seed(seed)
    y, log_det = model.forward_and_log_det(x, context=context)
    loss = (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum() + log_det.sum()
    loss.backward()
    return [y.detach(), x.grad, context.grad, *(p.grad for p in model.parameters())]


def assert_all_close(a, b):
    assert len(a) == len(b)
    for i, (p, q) in enumerate(zip(a, b)):
        assert p is not None and q is not None, f"#{i} has no gradient"
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12, msg=lambda m, i=i: f"#{i}: {m}")


@pytest.mark.parametrize("context_shape", ["vector", "image", "other resolution"])
@pytest.mark.parametrize("kind", ["additive", "affine"])
@pytest.mark.parametrize("depth", [1, 4, 16])
@pytest.mark.parametrize("memory", MODES)
def test_context_gradients_equal_the_stored_twin(memory, depth, kind, context_shape):
    torch.manual_seed(depth)
    base = cond_stack(depth, kind, dropout=0.1 if depth == 4 else 0.0).double()
    x = torch.randn(2, 4, 6, 6, dtype=D)
    context = {"vector": torch.randn(2, 3, dtype=D), "image": torch.randn(2, 3, 6, 6, dtype=D),
               "other resolution": torch.randn(2, 3, 3, 3, dtype=D)}[context_shape]
    assert_all_close(step(twin(base, memory), x, context), step(twin(base, "stored"), x, context))


def test_inverse_with_context_round_trips():
    model = cond_stack(4, "affine").double()
    x, c = torch.randn(3, 4, 5, 5, dtype=D), torch.randn(3, 3, dtype=D)
    torch.testing.assert_close(model.inverse(model(x, context=c), context=c), x, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(model.inverse(model(x, context=c), context=-c), x)


def test_a_tuple_context_reaches_every_sub_network():
    def net(c_in, c_out):
        return ConditionalNet(nn.Conv2d(c_in + 3 + 1, c_out, 3, padding=1))

    base = ReversibleSequential(*[AdditiveCoupling(net(2, 2), net(2, 2)) for _ in range(3)]).double()
    x = torch.randn(2, 4, 4, 4, dtype=D, requires_grad=True)
    a = torch.randn(2, 3, dtype=D, requires_grad=True)
    b = torch.randn(2, 1, 4, 4, dtype=D, requires_grad=True)
    grads = {}
    for mode in ("stored", "reversible"):
        model = twin(base, mode)
        for t in (x, a, b):
            t.grad = None
        model(x, context=(a, b)).square().sum().backward()
        grads[mode] = [x.grad, a.grad, b.grad]
    assert_all_close(grads["reversible"], grads["stored"])


def test_memory_flat_in_depth_with_the_context_held_once():
    from revtrain.memory import TensorMemoryTracker

    torch.manual_seed(0)
    x = torch.randn(4, 4, 8, 8, requires_grad=True)
    context = torch.randn(4, 3, 8, 8, requires_grad=True)
    held = {}
    for memory in ("reversible", "stored"):
        for depth in (8, 64):
            model = cond_stack(depth, "affine", memory=memory)
            with TensorMemoryTracker() as mem:
                y = model(x, context=context)
                held[memory, depth] = mem.current
            del y
    output = x.numel() * x.element_size()
    assert held["reversible", 8] <= output * 1.05, held  # the context is the caller's: not counted
    assert held["reversible", 64] <= held["reversible", 8] * 1.05, held
    assert held["stored", 64] > held["stored", 8] * 1.05, "the same check fails for the stored twin"


def test_each_conditional_sub_network_runs_once_more():
    calls = []

    class Counted(ConditionalNet):
        def forward(self, x, context=None):
            calls.append(1)
            return super().forward(x, context)

    model = ReversibleSequential(*[AffineCoupling(Counted(nn.Conv2d(5, 4, 3, padding=1)),
                                                  Counted(nn.Conv2d(5, 4, 3, padding=1))) for _ in range(4)])
    y = model(torch.randn(2, 4, 4, 4, requires_grad=True), context=torch.randn(2, 3))
    assert len(calls) == 8
    y.square().sum().backward()
    assert len(calls) == 16


@pytest.mark.parametrize("memory", ("reversible",))
def test_context_changed_in_place_before_backward_raises(memory):
    model = cond_stack(3, "additive", memory=memory).double()
    context = torch.randn(2, 3, dtype=D)
    y = model(torch.randn(2, 4, 4, 4, dtype=D, requires_grad=True), context=context)
    context.add_(1.0)
    with pytest.raises(ReconstructionError, match="context was changed in place"):
        y.sum().backward()


def test_sub_network_without_context_while_one_is_passed_names_the_layer():
    model = ReversibleSequential(AdditiveCoupling(nn.Conv2d(2, 2, 3, padding=1)))
    with pytest.raises(TypeError, match=r"sub-network f \(Conv2d\) takes no context"):
        model(torch.randn(2, 4, 4, 4), context=torch.randn(2, 3))


def test_context_batch_size_must_match():
    model = cond_stack(2, "additive")
    with pytest.raises(ValueError, match="batch size"):
        model(torch.randn(2, 4, 4, 4), context=torch.randn(3, 3))
    with pytest.raises(ValueError, match="batch size"):
        revtrain.broadcast_context(torch.randn(3, 3), torch.randn(2, 4, 4, 4))


def test_layers_without_sub_networks_ignore_the_context():
    c = 4
    model = ReversibleSequential(cond_stack(1, "affine", c=c)[0], revtrain.SwapHalves(),
                                 cond_stack(1, "additive", c=c)[0]).double()
    x = torch.randn(2, c, 4, 4, dtype=D)
    context = torch.randn(2, 3, dtype=D)
    assert_all_close(step(twin(model, "reversible"), x, context), step(twin(model, "stored"), x, context))


def test_conditioning_network_trains_through_the_same_backward():
    torch.manual_seed(0)
    embed = nn.Embedding(10, 3).double()
    base = revtrain.ConditionedStack(cond_stack(4, "affine").double(), embed)
    x = torch.randn(5, 4, 4, 4, dtype=D)
    labels = torch.tensor([0, 3, 3, 9, 1])
    grads = {}
    for mode in ("stored", "reversible"):
        model = twin(base, mode)
        y, log_det = model.forward_and_log_det(x, labels)
        (y.square().sum() - log_det.sum()).backward()
        grads[mode] = [p.grad for p in model.parameters()]
    assert grads["reversible"][0] is not None and grads["reversible"][0].abs().sum() > 0
    assert_all_close(grads["reversible"], grads["stored"])
