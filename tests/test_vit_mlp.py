"""The transformer MLP's recomputing backward inside a reversible stack.

Inside a reversible stack :class:`revtrain.transformer.TransformerMLP` saves the LayerNorm's input
and the hidden pre-activation only, and recomputes the LayerNorm and the GELU in its own
backward. These tests check that this is exact (fp64 against autograd and the stored twin, over
the autograd surface; under autocast, bit for bit the ordinary modules' gradients), that it is
used only where it hides nothing (hooks, dropout, weights other than float32 under autocast and
other modes fall back to ordinary modules), and that it lowers the backward peak by at least one
hidden-sized tensor (half a bf16 one under autocast), a bound that a variant which also saves the
GELU output fails.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from revtrain import ReversibleTransformer, models
from revtrain import transformer as T
from revtrain.memory import measure_step
from revtrain.testing import assert_matches_stored_twin

pytestmark = pytest.mark.usefixtures("one_thread")


def encoder(depth: int = 2, dim: int = 16, heads: int = 2, **kwargs) -> ReversibleTransformer:
    torch.manual_seed(0)
    return ReversibleTransformer(dim=dim, depth=depth, num_heads=heads, **kwargs)


def sequence(batch: int = 2, tokens: int = 5, dim: int = 16, dtype=torch.float64):
    return torch.randn(batch, tokens, dim, generator=torch.Generator().manual_seed(1), dtype=dtype)


@pytest.fixture
def calls(monkeypatch):
    """Counts the calls of the recomputing path (forward and rebuild)."""
    count = {"n": 0}
    apply = T._GeluLinear.apply

    def counted(*args):
        count["n"] += 1
        return apply(*args)

    monkeypatch.setattr(T._GeluLinear, "apply", counted)
    return count


def grads(model, x, call=lambda m, x: m(x)):
    model.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    call(model, x).pow(2).sum().backward()
    return [x.grad] + [p.grad for p in model.parameters()]


def twin_of(model):
    twin = copy.deepcopy(model)
    twin.memory = "stored"
    return twin


def assert_all_close(a, b, rtol=1e-10):
    assert len(a) == len(b)
    for u, v in zip(a, b):
        assert (u is None) == (v is None)
        if u is not None:
            torch.testing.assert_close(u, v, rtol=rtol, atol=1e-12)


# --- the two functions, against autograd ----------------------------------------------------

@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("rows", [1, 3, 64])
def test_gelu_linear_gradcheck_in_blocks_of_rows(approximate, rows):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 5, 7, dtype=torch.float64, generator=g, requires_grad=True)  # 10 rows
    w = torch.randn(3, 7, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda h, w, b: T._GeluLinear.apply(h, w, b, approximate, rows, None), (h, w, b))


def test_norm_linear_gradcheck():
    g = torch.Generator().manual_seed(0)
    args = [torch.randn(*s, dtype=torch.float64, generator=g, requires_grad=True)
            for s in [(2, 5, 6), (6,), (6,), (9, 6), (9,)]]
    assert torch.autograd.gradcheck(lambda *a: T._NormLinear.apply(*a, 1e-6, None), args)


def test_functions_compute_only_the_gradients_asked_for():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(4, 7, dtype=torch.float64, generator=g)
    w = torch.randn(3, 7, dtype=torch.float64, generator=g, requires_grad=True)
    (gw,) = torch.autograd.grad(T._GeluLinear.apply(h, w, None, "none", 2, None).sum(), w)
    torch.testing.assert_close(gw, torch.ones(4, 3, dtype=torch.float64).t() @ F.gelu(h))


# --- in a reversible stack: used, exact -----------------------------------------------------

@pytest.mark.parametrize("batch", [0, 1, 3])
def test_reversible_encoder_uses_it_and_matches_the_stored_twin(calls, batch):
    model = encoder(3).double()
    x = sequence(batch)
    reversible = grads(model, x)
    assert calls["n"] == (6 if batch else calls["n"])  # 3 blocks: forward and rebuild
    calls["n"] = 0
    stored = grads(twin_of(model), x)
    assert calls["n"] == 0  # the twin is ordinary autograd
    assert_all_close(reversible, stored)


def test_checkpoint_mode_runs_ordinary_modules(calls):
    model = encoder(2, memory="checkpoint").double()
    assert_matches_stored_twin(model, sequence())
    assert calls["n"] == 0


def test_rev_vit_digits_in_eval_and_train_mode(calls):
    torch.manual_seed(0)
    model = models.create("rev_vit_digits", embed_dim=16, depth=2).double()
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    for train in (True, False):
        model.train(train)
        calls["n"] = 0
        assert_all_close(grads(model, x), grads(twin_of(model), x))
        assert calls["n"] == 4


def test_partial_gradients_autograd_grad_and_inputs(calls):
    model = encoder(2).double()
    twin = twin_of(model)
    x = sequence().requires_grad_()
    # autograd.grad of the input only, then of one inner weight only
    for m in (model, twin):
        m.zero_grad(set_to_none=True)
    gx = [torch.autograd.grad(m(x).pow(2).sum(), x)[0] for m in (model, twin)]
    torch.testing.assert_close(gx[0], gx[1], rtol=1e-10, atol=1e-12)
    fc1 = [m.blocks[0].g.fc1.weight for m in (model, twin)]
    for m, w in zip((model, twin), fc1):
        m(x).pow(2).sum().backward(inputs=[w])
    torch.testing.assert_close(fc1[0].grad, fc1[1].grad, rtol=1e-10, atol=1e-12)
    assert x.grad is None and model.blocks[0].g.fc2.weight.grad is None
    assert calls["n"] > 0


def test_functional_call_gradients_go_to_the_supplied_tensors(calls):
    model = encoder(2).double()
    twin = twin_of(model)
    x = sequence()
    out = []
    for m in (model, twin):
        params = {k: v.detach().clone().requires_grad_() for k, v in m.named_parameters()}
        y = torch.func.functional_call(m, params, (x,))
        out.append(torch.autograd.grad(y.pow(2).sum(), list(params.values())))
        assert all(p.grad is None for p in m.parameters())
    assert_all_close(list(out[0]), list(out[1]))
    assert calls["n"] > 0


def test_parameter_hooks_see_the_twins_gradients(calls):
    model = encoder(2).double()
    twin = twin_of(model)
    seen = []
    for m in (model, twin):
        got = []
        m.blocks[1].g.fc2.weight.register_hook(lambda g, got=got: got.append(g.clone()))
        m.blocks[0].g.norm.bias.register_hook(lambda g, got=got: got.append(g.clone()))
        m(sequence()).pow(2).sum().backward()
        seen.append(got)
    assert len(seen[0]) == 2
    assert_all_close(seen[0], seen[1])


# --- falls back where it would hide something -----------------------------------------------

def test_module_hooks_on_the_inner_modules_fall_back_and_fire(calls):
    model = encoder(2).double()
    twin = twin_of(model)
    fired = []
    for m in (model, twin):
        got = {"fwd": 0, "bwd": []}
        m.blocks[0].g.fc2.register_forward_hook(lambda *a, got=got: got.__setitem__("fwd", got["fwd"] + 1))
        m.blocks[0].g.act.register_full_backward_hook(
            lambda mod, gi, go, got=got: got["bwd"].append(gi[0].clone()))
        grads(m, sequence())
        fired.append(got)
    # forward hooks inside a sub-network fire again in the rebuild, as for any module there
    assert (fired[0]["fwd"], fired[1]["fwd"]) == (2, 1)
    assert len(fired[0]["bwd"]) == 1
    assert_all_close(fired[0]["bwd"], fired[1]["bwd"])
    assert calls["n"] == 2  # block 1 still recomputes: only the hooked block falls back


def test_global_module_hooks_fall_back(calls):
    model = encoder(1).double()
    handle = torch.nn.modules.module.register_module_forward_hook(lambda *a: None)
    try:
        assert_matches_stored_twin(model, sequence())
    finally:
        handle.remove()
    assert calls["n"] == 0


def test_hidden_dropout_in_training_falls_back_and_stays_exact(calls):
    model = encoder(2, dropout=0.2).double().train()
    assert_matches_stored_twin(model, sequence())
    assert calls["n"] == 0
    model.eval()  # dropout inactive: the recomputing path again
    assert_matches_stored_twin(model, sequence())
    assert calls["n"] > 0


def test_autocast_uses_it_with_the_ordinary_modules_gradients(calls, monkeypatch):
    """Under bf16 autocast the recomputing path runs (forward and rebuild) and repeats
    autocast's casts in its backward: every gradient equals, bit for bit, the same reversible
    model's with ordinary modules, and the stored twin's to the rebuild's rounding. Weights that
    are not float32 fall back to ordinary modules."""
    model = encoder(2, dim=32)
    x = sequence(dtype=torch.float32, dim=32)

    def under_autocast(m, x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return m(x).float()

    recomputed = grads(model, x, under_autocast)
    assert calls["n"] == 4  # two blocks, forward and rebuild
    with monkeypatch.context() as m:
        m.setattr(T.TransformerMLP, "_recomputes", lambda self, x: False)
        ordinary = grads(model, x, under_autocast)
    assert all(torch.equal(a, b) for a, b in zip(recomputed, ordinary))
    stored = grads(twin_of(model), x, under_autocast)
    for a, b in zip(recomputed, stored):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    calls["n"] = 0
    grads(model.bfloat16(), x.bfloat16(), under_autocast)
    assert calls["n"] == 0


# --- memory ---------------------------------------------------------------------------------

class _SavesGeluOutput(torch.autograd.Function):
    """A deliberately worse variant: also saves ``gelu(h)``, as ordinary autograd does."""

    @staticmethod
    def forward(ctx, h, weight, bias, approximate, rows, cast):
        a = F.gelu(h, approximate=approximate)
        ctx.approximate, ctx.cast = approximate, cast
        ctx.save_for_backward(h, weight, a)
        return F.linear(a, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        h, weight, a = ctx.saved_tensors
        k = h.shape[-1]
        g2 = grad.reshape(-1, grad.shape[-1])
        grad_w = g2.t().mm(a.reshape(-1, k)).to(weight.dtype)
        grad_a = grad.matmul(weight if ctx.cast is None else weight.to(ctx.cast))
        grad_h = torch.ops.aten.gelu_backward(grad_a, h, approximate=ctx.approximate)
        return grad_h, grad_w, g2.sum(0).to(weight.dtype), None, None, None


def activation_peak(model, x, autocast=None) -> int:
    """The step's peak with the parameter gradients allocated beforehand (as after a first
    training step; benchmarks/vit.py measures so): activations and transient buffers."""
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    try:
        return measure_step(model, x, warmup=0, autocast=autocast)["peak_bytes"]
    finally:
        model.zero_grad(set_to_none=True)


def test_backward_peak_drops_by_a_hidden_tensor_and_a_worse_variant_fails(monkeypatch):
    dim, tokens, batch = 64, 16, 4
    hidden_bytes = batch * tokens * 4 * dim * 4  # one (B, N, 4D) float32 tensor
    x = torch.randn(batch, tokens, dim, requires_grad=True)
    model = encoder(4, dim=dim)
    monkeypatch.setattr(T, "_BLOCK_ELEMENTS", 8 * 4 * dim)  # GELU recomputed 8 rows at a time
    recomputing = activation_peak(model, x)
    with monkeypatch.context() as m:
        m.setattr(T.TransformerMLP, "_recomputes", lambda self, x: False)
        ordinary = activation_peak(model, x)
    with monkeypatch.context() as m:
        m.setattr(T, "_GeluLinear", _SavesGeluOutput)
        worse = activation_peak(model, x)
    bound = ordinary - 0.9 * hidden_bytes
    assert recomputing <= bound, (recomputing, ordinary, hidden_bytes)
    assert worse > bound, (worse, ordinary, hidden_bytes)


def test_under_autocast_the_backward_peak_drops_and_a_worse_variant_fails(monkeypatch):
    """bf16 autocast, activations large against the weights (64 tokens, batch 16): the peak
    drops by at least half a bf16 hidden tensor (measured: 0.62); the variant that also saves
    the GELU output does not. (With tiny activations the weights' bf16 copies, made in its
    backward instead of kept from the rebuild, weigh more: 16 tokens, batch 4 end about two
    bf16 hidden tensors, 70 KiB, above the ordinary modules.)"""
    dim, tokens, batch = 64, 64, 16
    hidden_bytes = batch * tokens * 4 * dim * 2  # one (B, N, 4D) bf16 tensor
    x = torch.randn(batch, tokens, dim, requires_grad=True)
    model = encoder(4, dim=dim)
    monkeypatch.setattr(T, "_BLOCK_ELEMENTS", 8 * 4 * dim)
    recomputing = activation_peak(model, x, torch.bfloat16)
    with monkeypatch.context() as m:
        m.setattr(T.TransformerMLP, "_recomputes", lambda self, x: False)
        ordinary = activation_peak(model, x, torch.bfloat16)
    with monkeypatch.context() as m:
        m.setattr(T, "_GeluLinear", _SavesGeluOutput)
        worse = activation_peak(model, x, torch.bfloat16)
    bound = ordinary - 0.5 * hidden_bytes
    assert recomputing <= bound, (recomputing, ordinary, hidden_bytes)
    assert worse > bound, (worse, ordinary, hidden_bytes)
