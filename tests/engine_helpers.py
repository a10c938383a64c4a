"""Small stacks and comparison helpers shared by the engine tests."""

from __future__ import annotations

import copy

import torch
from torch import nn

import revtrain

MODES = ("reversible", "checkpoint", "stored")


def conv_net(c_in: int, c_out: int, hidden: int = 8, dropout: float = 0.0, bn: bool = False):
    layers: list[nn.Module] = [nn.Conv2d(c_in, hidden, 3, padding=1)]
    if bn:
        layers.append(nn.BatchNorm2d(hidden))
    layers.append(nn.ReLU())
    if dropout:
        layers.append(nn.Dropout(dropout))
    last = nn.Conv2d(hidden, c_out, 3, padding=1)
    with torch.no_grad():
        last.weight.mul_(0.3)  # blocks start near the identity, as in trained couplings
    layers.append(last)
    return nn.Sequential(*layers)


def coupling(kind: str, c: int, dropout: float = 0.0, bn: bool = False, half: bool = False):
    """An additive or affine coupling on ``c`` channels with small conv sub-networks."""
    c1, c2 = c // 2, c - c // 2
    k = 2 if kind == "affine" else 1
    f = conv_net(c2, k * c1, dropout=dropout, bn=bn)
    g = None if half else conv_net(c1, k * c2, dropout=dropout, bn=bn)
    if kind == "affine":
        return revtrain.AffineCoupling(f, g)
    return revtrain.AdditiveCoupling(f, g)


def stack(depth: int, kind: str = "additive", c: int = 4, memory: str = "reversible", **kw):
    return revtrain.ReversibleSequential(
        *[coupling(kind, c, **kw) for _ in range(depth)], memory=memory
    )


def twin(model: nn.Module, memory: str) -> nn.Module:
    """A deep copy of ``model`` with every stack switched to ``memory``."""
    return revtrain.set_memory(copy.deepcopy(model), memory)


def run_step(model: nn.Module, x: torch.Tensor, seed: int = 0, with_log_det: bool = True):
    """Forward + backward of a fixed loss; returns output, input grad, parameter grads."""
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    torch.manual_seed(seed)
    if with_log_det:
        y, log_det = model.forward_and_log_det(x)
        loss = (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum()
        loss = loss + y.square().mean() + log_det.sum()
    else:
        y = model(x)
        loss = (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum()
    loss.backward()
    grads = [p.grad.clone() if p.grad is not None else None for p in model.parameters()]
    return y.detach(), x.grad, grads


def assert_steps_equal(a, b, rtol: float = 1e-10, atol: float = 1e-12):
    (ya, gxa, gpa), (yb, gxb, gpb) = a, b
    torch.testing.assert_close(ya, yb, rtol=rtol, atol=atol)
    torch.testing.assert_close(gxa, gxb, rtol=rtol, atol=atol)
    assert len(gpa) == len(gpb)
    for i, (ga, gb) in enumerate(zip(gpa, gpb)):
        assert ga is not None and gb is not None, f"parameter {i} received no gradient"
        torch.testing.assert_close(ga, gb, rtol=rtol, atol=atol, msg=lambda m, i=i: f"param {i}: {m}")
