"""Checks for one's own invertible blocks and reversible models, as revtrain's tests use them.

* :func:`stored_twin`: the same model, same parameters, with ordinary autograd.
* :func:`assert_matches_stored_twin`: outputs, input gradient and every parameter gradient of a
  model equal those of its stored twin, in float64.
* :func:`assert_invertible`: ``inverse(forward(x)) == x`` (and ``forward(inverse(y)) == y``).

>>> import torch
>>> from torch import nn
>>> import revtrain
>>> from revtrain.testing import assert_invertible, assert_matches_stored_twin
>>> torch.manual_seed(0)  # doctest: +ELLIPSIS
<torch._C.Generator object at ...>
>>> block = revtrain.AdditiveCoupling(f=nn.Linear(2, 2), g=nn.Linear(2, 2))
>>> stack = revtrain.ReversibleSequential(block, revtrain.AdditiveCoupling(nn.Linear(2, 2)))
>>> assert_invertible(stack.double(), torch.randn(3, 4, dtype=torch.float64))
>>> assert_matches_stored_twin(stack, torch.randn(3, 4))
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

from ._utils import eval_mode
from .modes import MemoryMode, set_memory

__all__ = ["assert_invertible", "assert_matches_stored_twin", "stored_twin"]


def stored_twin(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with every reversible stack in ``"stored"`` mode.

    Same parameters and buffers (copied), ordinary autograd: the baseline a reversible model
    must match. ``model`` itself is not changed.
    """
    return set_memory(copy.deepcopy(model), MemoryMode.STORED)


def _tensors(out: Any) -> list[Tensor]:
    return [t for t in tree_flatten(out)[0] if isinstance(t, Tensor)]


def _projection_loss(outputs: list[Tensor]) -> Tensor:
    # a fixed random projection of every output: every output entry gets its own weight, so
    # that a wrong gradient cannot cancel out as it can with sum() or mean()
    gen = torch.Generator().manual_seed(1234)
    loss = outputs[0].new_zeros(())
    for out in outputs:
        if out.is_floating_point():
            w = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out)
            loss = loss + (w * out).sum()
    return loss


def _run(model: nn.Module, x: Tensor, call: Callable, loss_fn: Callable | None, seed: int,
         ) -> tuple[list[Tensor], Tensor | None, dict[str, Tensor | None]]:
    x = x.detach().clone().requires_grad_(x.is_floating_point())
    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
        torch.manual_seed(seed)  # the same dropout masks in both runs, caller's RNG untouched
        out = call(model, x)
        outputs = _tensors(out)
        loss = loss_fn(out) if loss_fn is not None else _projection_loss(outputs)
        loss.backward()
    grads = {n: None if p.grad is None else p.grad.detach().clone()
             for n, p in model.named_parameters() if p.requires_grad}
    return [o.detach() for o in outputs], x.grad, grads


def _close(actual: Tensor, expected: Tensor, rtol: float, atol: float | None, what: str) -> None:
    if atol is None:  # relative to the tensor's scale, so that entries near 0 do not fail
        atol = rtol * float(expected.abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol,
                               msg=lambda m: f"{what} differs from the stored twin's: {m}")


def assert_matches_stored_twin(
    model: nn.Module,
    x: Tensor,
    *,
    call: Callable[[nn.Module, Tensor], Any] | None = None,
    loss_fn: Callable[[Any], Tensor] | None = None,
    dtype: torch.dtype | None = torch.float64,
    rtol: float = 1e-10,
    atol: float | None = None,
    seed: int = 0,
) -> None:
    """Assert that ``model`` computes what its stored twin computes, gradients included.

    A copy of ``model`` (in its memory mode) and its :func:`stored_twin` are converted to
    ``dtype`` (float64 by default; ``None`` keeps the dtype), run on ``x`` under the same RNG
    seed (dropout draws the same masks) and back-propagate the same loss. Compared: every
    output tensor, the gradient of ``x``, every parameter's gradient (a parameter that
    receives a gradient in one and not in the other fails), and the buffers after the step
    (BatchNorm statistics updated once). ``model``, ``x`` and the caller's RNG are not changed.

    Args:
        model: the model or layer, in train or eval mode as it should be compared.
        x: one input batch.
        call: how to run it, ``call(model, x) -> output(s)``; default ``model(x)``. For a flow
            e.g. ``lambda m, x: m.log_prob(x)``.
        loss_fn: output(s) -> scalar; default: a fixed random projection of every output.
        dtype: dtype of the comparison.
        rtol: relative tolerance (1e-10 in float64).
        atol: absolute tolerance; default ``rtol`` times each reference tensor's max.
        seed: seed of the random numbers drawn in both runs.

    Raises:
        AssertionError: naming what differs (output, input gradient or the parameter).
    """
    mine = copy.deepcopy(model)
    twin = stored_twin(model)
    if dtype is not None:
        mine, twin = mine.to(dtype), twin.to(dtype)
        x = x.to(dtype) if x.is_floating_point() else x
    call = call or (lambda m, inp: m(inp))
    out, dx, grads = _run(mine, x, call, loss_fn, seed)
    out_t, dx_t, grads_t = _run(twin, x, call, loss_fn, seed)
    assert len(out) == len(out_t), f"{len(out)} outputs, the stored twin gives {len(out_t)}"
    for i, (a, b) in enumerate(zip(out, out_t)):
        _close(a, b, rtol, atol, f"output {i}")
    if dx_t is not None or dx is not None:
        assert dx is not None and dx_t is not None, "the input gradient is missing on one side"
        _close(dx, dx_t, rtol, atol, "the input gradient")
    for name, g_t in grads_t.items():
        g = grads[name]
        assert (g is None) == (g_t is None), (
            f"parameter {name!r} receives a gradient in {'the stored twin' if g is None else 'the model'}"
            " only")
        if g is not None:
            _close(g, g_t, rtol, atol, f"the gradient of {name!r}")
    buffers_t = dict(twin.named_buffers())
    for name, b in mine.named_buffers():
        if b.is_floating_point():
            _close(b, buffers_t[name], rtol, atol, f"buffer {name!r} after the step")
        else:
            assert torch.equal(b, buffers_t[name]), f"buffer {name!r} differs after the step"


def assert_invertible(layer: nn.Module, x: Tensor, atol: float | None = None,
                      rtol: float = 0.0) -> None:
    """Assert that ``layer.inverse`` undoes ``layer`` around ``x``, in both directions.

    In eval mode and without grad: ``inverse(forward(x))`` must equal ``x`` and, unless the
    layer is injective (``bijective = False``), ``forward(inverse(y'))`` must equal ``y'`` for
    ``y'`` a point next to ``forward(x)``. Default ``atol``: 1e-10 in float64, 1e-5 otherwise.
    The layer's training mode and ``x`` are left as they were.

    Raises:
        AssertionError: with the largest error of each direction that fails.
    """
    if not callable(getattr(layer, "inverse", None)):
        raise AssertionError(f"{type(layer).__name__} has no inverse()")
    if atol is None:
        atol = 1e-10 if x.dtype == torch.float64 else 1e-5

    def first(out: Any) -> Tensor:
        return out[0] if isinstance(out, (tuple, list)) else out

    failures = []
    with torch.no_grad(), eval_mode(layer):
        y = first(layer(x.clone()))
        pairs = [("inverse(forward(x)) - x", layer.inverse(y.clone()), x)]
        if getattr(layer, "bijective", True):
            gen = torch.Generator(device=y.device).manual_seed(0)
            noise = torch.randn(y.shape, generator=gen, device=y.device, dtype=y.dtype)
            y_other = y + 0.01 * noise * y.abs().mean().clamp_min(1.0)
            pairs.append(("forward(inverse(y)) - y", first(layer(layer.inverse(y_other.clone()))),
                          y_other))
        for what, got, want in pairs:
            if got.shape != want.shape:
                failures.append(f"{what.split(' - ')[0]} has shape {tuple(got.shape)}, expected "
                                f"{tuple(want.shape)}")
                continue
            err = (got - want).abs()
            if not bool((err <= atol + rtol * want.abs()).all()):
                failures.append(f"max |{what}| = {float(err.max()):.3g} > atol {atol:g}")
    if failures:
        raise AssertionError(f"{type(layer).__name__} is not invertible around this input: "
                             + "; ".join(failures))
