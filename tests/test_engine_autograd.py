"""Engine v2: a reversible stack is indistinguishable from its stored twin (TESTPLAN H, issue 9).

Every test runs the same layers twice (``copy.deepcopy``): "P" with ordinary autograd
(``memory="stored"``) and "R" through the reversible engine (and, where it applies, the
checkpoint mode), in float64, and compares what autograd exposes.
"""

from __future__ import annotations

import copy
import gc
import warnings

import pytest
import torch
from engine_helpers import assert_steps_equal, conv_net, coupling, run_step, stack, twin
from torch import nn
from torch.func import functional_call
from torch.nn.utils import parametrizations, spectral_norm

import revtrain
from revtrain import AdditiveCoupling, AffineCoupling, ReconstructionError, ReversibleSequential
from revtrain.engine import ReversibleCall

D = torch.float64
MODES = ("reversible", "checkpoint")


def close(a, b, msg=""):
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=lambda m: f"{msg}: {m}")


def all_close(xs, ys, msg=""):
    assert len(xs) == len(ys)
    for i, (a, b) in enumerate(zip(xs, ys)):
        assert (a is None) == (b is None), f"{msg} #{i}: one gradient is None"
        if a is not None:
            close(a, b, f"{msg} #{i}")


def x_of(*shape, seed=0):
    return torch.randn(*shape, dtype=D, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ 1. hooks


@pytest.mark.parametrize("memory", MODES)
def test_parameter_hooks_fire_once_and_can_change_the_gradient(memory):
    torch.manual_seed(0)
    base = stack(3, "affine", c=4).double()
    results = {}
    for mode in ("stored", memory):
        model = twin(base, mode)
        calls = []

        def halve(grad, calls=calls):
            calls.append(1)
            return grad * 0.5

        for p in model.parameters():
            p.register_hook(halve)
        results[mode] = (run_step(model, x_of(2, 4, 5, 5)), len(calls))
    n = len(list(base.parameters()))
    assert results["stored"][1] == results[memory][1] == n, "each hook once per backward"
    assert_steps_equal(results[memory][0], results["stored"][0])


@pytest.mark.parametrize("with_log_det", [False, True])
@pytest.mark.parametrize("memory", MODES)
def test_module_backward_hooks_fire_once_with_the_stored_arguments(memory, with_log_det):
    torch.manual_seed(0)
    base = stack(3, "affine", c=4).double()
    seen = {}
    for mode in ("stored", memory):
        model = twin(base, mode)
        log = seen[mode] = []
        for i, layer in enumerate(model):
            layer.register_full_backward_pre_hook(lambda m, go, i=i, log=log: log.append(("pre", i)))
            layer.register_full_backward_hook(
                lambda m, gi, go, i=i, log=log: log.append(
                    (i, [t.clone() for t in gi if t is not None], [t.clone() for t in go if t is not None])))
        run_step(model, x_of(2, 4, 5, 5), with_log_det=with_log_det)
    assert [e[0] for e in seen[memory]] == [e[0] for e in seen["stored"]] == ["pre", 2, "pre", 1, "pre", 0]
    for a, b in zip(seen[memory], seen["stored"]):
        if a[0] != "pre":
            all_close(a[1] + a[2], b[1] + b[2], f"hook of layer {a[0]}")


# ------------------------------------------------------------------ 2. tensors from outside


class _ReadsOutside(nn.Module):
    """A sub-network that adds a tensor it reads from a module attribute (not a parameter)."""

    def __init__(self, c_in, c_out, source):
        super().__init__()
        self.net = conv_net(c_in, c_out)
        self.source = source  # a plain attribute: the tensor lives outside the stack

    def forward(self, x):
        return self.net(x) * self.source.scale + self.source.shift


class _Source:
    """Holds tensors owned by the caller; deep copies of a model share it."""

    def __deepcopy__(self, memo):
        return self


@pytest.mark.parametrize("memory", MODES)
def test_tensors_read_from_outside_the_stack_get_the_stored_gradient(memory):
    torch.manual_seed(0)
    source = _Source()
    base = ReversibleSequential(*[AdditiveCoupling(_ReadsOutside(2, 2, source), _ReadsOutside(2, 2, source))
                                  for _ in range(3)]).double()
    grads = {}
    for mode in ("stored", memory):
        source.scale = torch.tensor(1.5, dtype=D, requires_grad=True)
        source.shift = x_of(1, 2, 1, 1, seed=3).requires_grad_()
        model = twin(base, mode)
        x = x_of(2, 4, 4, 4).requires_grad_()
        model(x).square().sum().backward()
        grads[mode] = [source.scale.grad, source.shift.grad, x.grad, *(p.grad for p in model.parameters())]
    assert grads[memory][0] is not None and grads[memory][0].abs() > 0
    all_close(grads[memory], grads["stored"], "outside tensors")


def test_saved_outside_tensor_changed_in_place_before_backward_raises():
    # ``scale`` is saved by the multiplication (the stored twin raises too); a tensor that no
    # operation saves is not checked: pass it as ``context``. (torch.utils.checkpoint, behind
    # memory="checkpoint", does not check either.)
    memory = "reversible"
    source = _Source()
    source.scale = torch.tensor(1.5, dtype=D, requires_grad=True)
    source.shift = x_of(1, 2, 1, 1).requires_grad_()
    model = ReversibleSequential(*[AdditiveCoupling(_ReadsOutside(2, 2, source), _ReadsOutside(2, 2, source))
                                   for _ in range(2)], memory=memory).double()
    y = model(x_of(2, 4, 4, 4).requires_grad_())
    with torch.no_grad():
        source.scale.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.square().sum().backward()


# ------------------------------------------------------------------ 3. functional_call


@pytest.mark.parametrize("memory", MODES)
def test_functional_call_gradients_reach_the_passed_tensors(memory):
    torch.manual_seed(0)
    base = stack(3, "affine", c=4, bn=True).double()
    results = {}
    for mode in ("stored", memory):
        model = twin(base, mode)
        params = {k: (v.detach() * 1.01).requires_grad_() for k, v in model.named_parameters()}
        x = x_of(3, 4, 5, 5).requires_grad_()
        functional_call(model, params, (x,)).square().sum().backward()
        assert all(p.grad is None for p in model.parameters()), "the module's own weights get nothing"
        results[mode] = [x.grad, *(params[k].grad for k in sorted(params))]
    assert all(g is not None for g in results[memory])
    all_close(results[memory], results["stored"], "functional_call")


# ------------------------------------------------------------------ 4. forward hooks


@pytest.mark.parametrize("memory", MODES)
def test_loss_on_an_activation_captured_by_a_forward_hook(memory):
    torch.manual_seed(0)
    base = stack(3, "affine", c=4).double()
    results, counts = {}, {}
    for mode in ("stored", memory):
        model = twin(base, mode)
        captured, calls = [], []

        def hook(module, inputs, output, captured=captured, calls=calls):
            calls.append(revtrain.is_rebuilding())
            if not revtrain.is_rebuilding():
                captured.append(output)

        model[1].f[1].register_forward_hook(hook)
        x = x_of(2, 4, 5, 5).requires_grad_()
        out = model(x)
        (out.sum() + captured[0].square().sum()).backward()
        results[mode] = [x.grad, *(p.grad for p in model.parameters())]
        counts[mode] = calls
    all_close(results[memory], results["stored"], "hooked activation")
    assert counts["stored"] == [False]
    assert counts[memory] == [False, True], "the hook runs again in the rebuild, told by is_rebuilding()"


def test_is_rebuilding_is_false_outside_a_rebuild():
    assert revtrain.is_rebuilding() is False


# ------------------------------------------------------------------ 6. nesting with dropout


class _Nested(nn.Module):
    """A sub-network holding a coupling and a reversible stack, all with dropout."""

    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.drop = nn.Dropout(0.3)
        h = c // 2
        self.coupling = AdditiveCoupling(conv_net(h, h, dropout=0.3), conv_net(c - h, c - h, dropout=0.3))
        self.stack = ReversibleSequential(coupling("affine", c, dropout=0.3),
                                          coupling("additive", c, dropout=0.3))

    def forward(self, x):
        return self.stack(self.coupling(self.drop(self.conv(x))))


def _compare_modes(base, x, with_log_det=True, modes=MODES, seed=0):
    stored = run_step(twin(base, "stored"), x, seed=seed, with_log_det=with_log_det)
    after = torch.rand(4)
    for mode in modes:
        other = run_step(twin(base, mode), x, seed=seed, with_log_det=with_log_det)
        assert_steps_equal(other, stored)
        torch.testing.assert_close(torch.rand(4), after, msg="the caller's random stream after a step")
        torch.manual_seed(seed + 1)  # run_step reseeds; keep the next draw comparable
    return stored


def test_couplings_and_stacks_inside_sub_networks_with_dropout():
    torch.manual_seed(0)
    base = ReversibleSequential(*[AdditiveCoupling(_Nested(2), _Nested(2)) for _ in range(3)]).double()
    _compare_modes(base, x_of(2, 4, 5, 5))


def test_stacks_as_layers_with_dropout():
    torch.manual_seed(0)
    base = ReversibleSequential(
        coupling("affine", 4, dropout=0.3),
        ReversibleSequential(coupling("affine", 4, dropout=0.3),
                             ReversibleSequential(coupling("additive", 4, dropout=0.3))),
        coupling("additive", 4, dropout=0.3),
    ).double()
    _compare_modes(base, x_of(2, 4, 5, 5))


def test_memcnn_couplings_with_dropout_are_exact():
    memcnn = pytest.importorskip("memcnn")
    torch.manual_seed(0)
    base = ReversibleSequential(
        memcnn.AdditiveCoupling(conv_net(2, 2, dropout=0.3), conv_net(2, 2, dropout=0.3)),
        coupling("affine", 4, dropout=0.3),
        memcnn.AffineCoupling(conv_net(2, 2, dropout=0.3), adapter=memcnn.AffineAdapterNaive),
    ).double()
    _compare_modes(base, x_of(2, 4, 5, 5), with_log_det=False)


class _NoisyGlue(AdditiveCoupling):
    """Draws random numbers outside its sub-networks: the engine keeps its input instead."""

    def forward_and_log_det(self, x, context=None):
        y, log_det = super().forward_and_log_det(x, context)
        return y + 0.0 * torch.rand_like(y), log_det


def test_random_numbers_outside_sub_networks_are_replayed():
    torch.manual_seed(0)
    base = ReversibleSequential(coupling("affine", 4, dropout=0.3), _NoisyGlue(conv_net(2, 2, dropout=0.3)),
                                coupling("additive", 4, dropout=0.3)).double()
    _compare_modes(base, x_of(2, 4, 5, 5))


def test_no_rng_replay_with_dropout_warns():
    model = stack(2, "additive", dropout=0.5)
    model.preserve_rng_state = False
    with pytest.warns(RuntimeWarning, match="preserve_rng_state=False"):
        model(torch.randn(2, 4, 3, 3, requires_grad=True))


# ------------------------------------------------------------------ 7. double backward


def test_double_backward_raises_a_clear_error_and_checkpoint_supports_it():
    torch.manual_seed(0)
    base = stack(2, "affine", c=4).double()
    x = x_of(2, 4, 3, 3).requires_grad_()
    with pytest.raises(RuntimeError, match="double backward"):
        (g,) = torch.autograd.grad(twin(base, "reversible")(x).square().sum(), x, create_graph=True)
        g.square().sum().backward()
    penalties = {}
    for mode in ("stored", "checkpoint"):
        model = twin(base, mode)
        (g,) = torch.autograd.grad(model(x).square().sum(), x, create_graph=True)
        g.square().sum().backward()
        penalties[mode] = [p.grad for p in model.parameters()]
    all_close(penalties["checkpoint"], penalties["stored"], "gradient penalty")


# ------------------------------------------------------------------ 8. in-place changes


@pytest.mark.parametrize("trainable", [True, False])
@pytest.mark.parametrize("memory", MODES)
def test_parameter_changed_in_place_raises_naming_the_layer(memory, trainable):
    model = stack(3, "affine", c=4, memory=memory).double()
    for p in model[1].parameters():
        p.requires_grad_(trainable)
    y = model(x_of(2, 4, 5, 5).requires_grad_())
    with torch.no_grad():
        model[1].f[0].weight.add_(0.01)
    with pytest.raises(ReconstructionError, match=r"layer 1 \(AffineCoupling\).*'f.0.weight'"):
        y.sum().backward()


def test_buffer_changed_in_place_raises_naming_the_layer():
    model = stack(3, "affine", c=4, bn=True).double().eval()
    y = model(x_of(2, 4, 5, 5).requires_grad_())
    with torch.no_grad():
        model[2].g[1].running_var.mul_(2.0)
    with pytest.raises(ReconstructionError, match=r"layer 2 .*'g.1.running_var'"):
        y.sum().backward()


def test_output_changed_in_place_raises():
    model = stack(2, "additive").double()
    y = model(x_of(2, 4, 3, 3).requires_grad_())
    y.mul_(2)
    with pytest.raises(RuntimeError, match="changed in place"):
        y.sum().backward()


# ------------------------------------------------------------------ 9. module state


def _state_twins(net_factory, x, steps=2):
    torch.manual_seed(0)
    base = ReversibleSequential(*[AdditiveCoupling(net_factory(), net_factory()) for _ in range(3)]).double()
    reference = twin(base, "stored")
    expected = [run_step(reference, x, seed=i) for i in range(steps)]
    buffers = dict(reference.named_buffers())
    assert buffers, "the test needs modules with state"
    for mode in MODES:
        model = twin(base, mode)
        for i in range(steps):
            assert_steps_equal(run_step(model, x, seed=i), expected[i])
        for name, value in model.named_buffers():
            close(value, buffers[name], f"{mode} {name}")


@pytest.mark.parametrize("kind", ["hook", "parametrization"])
def test_spectral_norm_power_iteration_runs_once(kind):
    wrap = spectral_norm if kind == "hook" else parametrizations.spectral_norm

    def net():
        return nn.Sequential(wrap(nn.Conv2d(2, 6, 3, padding=1)), nn.ReLU(), nn.Dropout(0.2),
                             wrap(nn.Conv2d(6, 2, 3, padding=1)))

    _state_twins(net, x_of(3, 4, 5, 5))


def test_instance_norm_and_batch_norm_statistics_updated_once():
    def net():
        return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1),
                             nn.InstanceNorm2d(4, affine=True, track_running_stats=True), nn.ReLU(),
                             nn.Conv2d(4, 2, 3, padding=1), nn.BatchNorm2d(2, momentum=None))

    _state_twins(net, x_of(3, 4, 5, 5))


# ------------------------------------------------------------------ 10. repeated recomputation


@pytest.mark.parametrize("memory", MODES)
def test_retain_graph_and_jacobian(memory):
    torch.manual_seed(0)
    base = stack(2, "affine", c=4, bn=True).double()
    model, reference = twin(base, memory), twin(base, "stored")
    x = x_of(2, 4, 3, 3).requires_grad_()
    loss = model(x).square().sum()
    loss.backward(retain_graph=True)
    first = x.grad.clone()
    loss.backward()
    close(x.grad, 2 * first, "second backward through a retained graph")
    small = x_of(1, 4, 2, 2)
    close(torch.autograd.functional.jacobian(model, small),
          torch.autograd.functional.jacobian(reference, small), "jacobian")


# ------------------------------------------------------------------ 11. no hidden costs


def test_nothing_but_handles_is_saved_through_the_callers_hooks():
    # a caller's saved-tensor hooks (e.g. save_on_cpu) see no tensor from inside the stack
    model = stack(4, "affine", c=4).double()
    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
        y = model(x_of(2, 4, 3, 3).requires_grad_())
    assert packed == []
    y.sum().backward()


def _live_calls():
    gc.collect()
    return sum(isinstance(o, ReversibleCall) for o in gc.get_objects())


def test_per_call_state_is_released_after_backward_even_when_the_loss_is_kept():
    model = stack(3, "affine", c=4, dropout=0.2, bn=True).double()
    before = _live_calls()
    kept = []
    for _ in range(3):
        loss = model(x_of(2, 4, 3, 3).requires_grad_()).square().sum()
        loss.backward()
        kept.append(loss)  # logging keeps the loss (and its graph) alive
    assert _live_calls() == before
    loss = model(x_of(2, 4, 3, 3).requires_grad_()).square().sum()
    assert _live_calls() == before + 1, "a call without backward is alive until its graph goes"
    del loss
    assert _live_calls() == before


def test_finiteness_check_does_not_abort_no_grad_or_inference_mode():
    model = stack(2, "additive").double()
    x = x_of(3, 4, 3, 3)
    x[0, 0, 0, 0] = float("nan")
    with torch.no_grad():
        assert torch.isnan(model(x)).any()
    with torch.inference_mode():
        assert torch.isnan(model(x)).any()
    with pytest.raises(ReconstructionError, match="NaN or Inf"):
        model(x.requires_grad_())


@pytest.mark.parametrize("memory", ("reversible", "checkpoint", "stored"))
def test_batch_of_zero_with_every_check_on(memory):
    model = ReversibleSequential(*[coupling("affine", 4, dropout=0.2, bn=False) for _ in range(3)],
                                 memory=memory, check_reconstruction=True).double()
    x = torch.randn(0, 4, 5, 5, dtype=D, requires_grad=True)
    y, log_det = model.forward_and_log_det(x)
    (y.sum() + log_det.sum()).backward()
    assert x.grad.shape == x.shape and log_det.shape == (0,)


def test_batch_of_one_matches_stored():
    torch.manual_seed(0)
    _compare_modes(stack(3, "affine", c=4, dropout=0.1).double(), x_of(1, 4, 5, 5))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.cuda
def test_cuda_forward_and_backward_without_a_host_sync_per_stack():
    model = ReversibleSequential(*[coupling("additive", 8) for _ in range(4)]).cuda()
    x = torch.randn(4, 8, 8, 8, device="cuda", requires_grad=True)
    model(x).sum().backward()  # warm-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y = model(x)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    y.sum().backward()


# ------------------------------------------------------------------ 12. bad input


def test_memcnn_wrapper_is_refused_with_advice():
    memcnn = pytest.importorskip("memcnn")
    wrapper = memcnn.InvertibleModuleWrapper(memcnn.AdditiveCoupling(conv_net(2, 2)))
    with pytest.raises(TypeError, match=r"pass the coupling it wraps.*wrapper._fn"):
        ReversibleSequential(wrapper)


class _TupleLayer(AdditiveCoupling):
    def forward_and_log_det(self, x, context=None):
        y, log_det = super().forward_and_log_det(x)
        return (y, y), log_det


@pytest.mark.parametrize("memory", ("reversible", "checkpoint", "stored"))
def test_a_layer_returning_a_tuple_is_refused_naming_it(memory):
    model = ReversibleSequential(coupling("additive", 4), _TupleLayer(conv_net(2, 2)), memory=memory)
    with pytest.raises(TypeError, match=r"layer 1 \(_TupleLayer\)"):
        model(torch.randn(2, 4, 3, 3, requires_grad=True))


def test_is_invertible_on_bad_input():
    layer = coupling("additive", 4)
    with pytest.raises(TypeError, match="must be a tensor"):
        revtrain.is_invertible(layer, [1, 2, 3])
    assert revtrain.is_invertible(_TupleLayer(conv_net(2, 2)), torch.randn(2, 4, 3, 3)) is False
    assert revtrain.is_invertible(nn.Linear(4, 4), torch.randn(2, 4)) is False
    assert revtrain.is_invertible(layer.double(), x_of(2, 4, 3, 3)) is True


@pytest.mark.parametrize("memory", MODES)
def test_tied_sub_networks_share_weights_correctly(memory):
    torch.manual_seed(0)
    layers = []
    for _ in range(3):
        net = conv_net(2, 2, dropout=0.2)
        layers.append(AdditiveCoupling(net, net))  # f is g: one set of weights
    base = ReversibleSequential(*layers).double()
    assert len(list(base.parameters())) == 3 * len(list(net.parameters()))
    _compare_modes(base, x_of(2, 4, 5, 5), modes=(memory,))


def test_torch_func_grad_and_vmap_run_a_plain_forward():
    torch.manual_seed(0)
    model = stack(2, "affine", c=4).double()
    reference = twin(model, "stored")
    x = x_of(3, 4, 3, 3)

    def loss(params, m, t):
        return functional_call(m, params, (t,)).square().sum()

    got = torch.func.grad(loss)(dict(model.named_parameters()), model, x)
    want = torch.func.grad(loss)(dict(reference.named_parameters()), reference, x)
    for k in want:
        close(got[k], want[k], k)
    batched = torch.func.vmap(lambda t: model(t.unsqueeze(0)).squeeze(0))(x)
    close(batched, reference(x), "vmap")


@pytest.mark.parametrize("memory", ("reversible", "checkpoint"))
def test_disabled_saved_tensor_hooks_run_a_plain_forward(memory):
    # the stored twin works there; the engine's hooks (and checkpoint's) would raise the caller's
    # message. Forward under the disabling context, backward after it, as a caller would.
    torch.manual_seed(0)
    model = stack(2, "affine", c=4, memory=memory).double()
    reference = twin(model, "stored")
    grads = {}
    for name, m in (("got", model), ("want", reference)):
        x = x_of(3, 4, 3, 3).requires_grad_()
        with torch.autograd.graph.disable_saved_tensors_hooks("no saved-tensor hooks here"):
            y = m(x)
        y.square().sum().backward()
        grads[name] = [x.grad, *(p.grad for p in m.parameters())]
    all_close(grads["got"], grads["want"], "hooks disabled")


def test_context_tensors_with_a_wrong_batch_size_are_refused():
    model = stack(2, "additive")
    with pytest.raises(ValueError, match="batch size"):
        model(torch.randn(2, 4, 3, 3), context=torch.randn(3, 5))


# ------------------------------------------------------------------ guarantees kept


def test_each_sub_network_runs_once_more_in_backward_including_nested_and_affine():
    counts = {}

    class Counted(nn.Module):
        def __init__(self, net, name):
            super().__init__()
            self.net, self.name = net, name
            counts[name] = 0

        def forward(self, x):
            counts[self.name] += 1
            return self.net(x)

    torch.manual_seed(0)
    model = ReversibleSequential(
        AffineCoupling(Counted(conv_net(2, 4), "f0"), Counted(conv_net(2, 4), "g0")),
        ReversibleSequential(AdditiveCoupling(Counted(conv_net(2, 2), "f1"), Counted(conv_net(2, 2), "g1"))),
        AdditiveCoupling(Counted(conv_net(2, 2), "f2"), Counted(conv_net(2, 2), "g2")),
    )
    x = torch.randn(2, 4, 4, 4)  # not kept by the test: layer 0 is rebuilt by inversion too
    y = model(x.requires_grad_())
    del x
    assert set(counts.values()) == {1}
    y.square().sum().backward()
    assert set(counts.values()) == {2}, counts


def test_held_memory_is_the_output_flat_in_depth_and_backward_peak_flat():
    from revtrain.memory import measure_step

    torch.manual_seed(0)
    x = torch.randn(8, 8, 8, 8)
    output_bytes = x.numel() * x.element_size()
    reports = {}
    for depth in (8, 64):
        for memory in ("reversible", "stored"):
            reports[depth, memory] = measure_step(stack(depth, "affine", c=8, memory=memory, bn=True), x)
    for depth in (8, 64):
        held = reports[depth, "reversible"]["held_bytes"]
        assert held <= 1.05 * output_bytes + 4096, (depth, held, output_bytes)

    def peak(r):
        return r["peak_bytes"] - r["grad_bytes"]

    ratio = peak(reports[64, "reversible"]) / peak(reports[8, "reversible"])
    assert ratio < 1.05, f"reversible backward peak grows with depth: {ratio:.3f}"
    stored_ratio = peak(reports[64, "stored"]) / peak(reports[8, "stored"])
    assert stored_ratio > 1.05, "the same check fails for the stored twin"


def test_rng_states_are_counted_as_held_memory():
    from revtrain.memory import TensorMemoryTracker

    x = torch.randn(2, 4, 3, 3, requires_grad=True)
    held = {}
    for dropout in (0.0, 0.3):
        model = stack(16, "additive", dropout=dropout)
        with TensorMemoryTracker() as mem:
            y = model(x)
            held[dropout] = mem.current
        del y
    cpu_state = torch.get_rng_state().numel()
    # each coupling keeps the generator state of f and of g: about 2 x 5 KB, and they are counted
    assert held[0.3] - held[0.0] >= 16 * 2 * cpu_state * 0.9, held


def test_caller_tensors_are_not_modified_or_freed():
    model = stack(3, "affine", c=4, bn=True).double()
    big = x_of(2, 8, 5, 5).requires_grad_()
    x = big[:, 2:6]  # a view of a bigger tensor the caller owns
    before = big.detach().clone()
    y = model(x)
    y.square().sum().backward()
    close(big.detach(), before, "caller's tensor")
    assert big.grad is not None and big.grad[:, :2].abs().sum() == 0


def test_deepcopy_of_a_stack_after_a_step_still_works():
    model = stack(2, "additive").double()
    model(x_of(2, 4, 3, 3).requires_grad_()).sum().backward()
    clone = copy.deepcopy(model)
    clone(x_of(2, 4, 3, 3).requires_grad_()).sum().backward()


def test_no_warnings_in_an_ordinary_step():
    model = stack(3, "affine", c=4, bn=True, dropout=0.1).double()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(x_of(2, 4, 3, 3).requires_grad_()).square().sum().backward()


@pytest.mark.parametrize("memory", MODES)
def test_train_eval_and_requires_grad_switched_before_backward(memory):
    # the gradients of the forward pass that ran, as with stored activations
    torch.manual_seed(0)
    base = stack(3, "affine", c=4, bn=True, dropout=0.3).double()
    results = {}
    for mode in ("stored", memory):
        model = twin(base, mode)
        x = x_of(3, 4, 5, 5).requires_grad_()
        torch.manual_seed(1)
        y = model(x)
        model.eval()
        for p in model[1].parameters():
            p.requires_grad_(False)
        y.square().sum().backward()
        assert not model.training and not any(p.requires_grad for p in model[1].parameters())
        results[mode] = [x.grad, *(p.grad for p in model.parameters())]
    all_close(results[memory], results["stored"], "after train()/eval() and requires_grad changes")


def test_loss_on_an_intermediate_layer_output():
    torch.manual_seed(0)
    base = stack(4, "affine", c=4).double()
    results = {}
    for mode in ("stored", "reversible"):
        model = twin(base, mode)
        outputs = []
        model[1].register_forward_hook(
            lambda m, i, o, outputs=outputs: None if revtrain.is_rebuilding() else outputs.append(o))
        x = x_of(2, 4, 3, 3).requires_grad_()
        y = model(x)
        (y.sum() + outputs[0].square().sum()).backward()
        results[mode] = [x.grad, *(p.grad for p in model.parameters())]
    all_close(results["reversible"], results["stored"], "loss on a layer's output")


def test_checkpoint_module_recomputes_repeatedly_with_statistics_updated_once():
    from revtrain.sequential import checkpoint_module

    torch.manual_seed(0)
    part = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Dropout(0.2)).double()
    reference = copy.deepcopy(part)
    x = x_of(2, 3, 5, 5).requires_grad_()
    torch.manual_seed(1)
    out = checkpoint_module(part, x).square().sum()
    torch.manual_seed(1)
    expected = reference(x).square().sum()
    (want,) = torch.autograd.grad(expected, x)
    out.backward(retain_graph=True)
    first = x.grad.clone()
    out.backward()
    close(first, want, "first backward")
    close(x.grad, 2 * want, "second backward through the retained graph")
    for name, value in part.named_buffers():
        close(value, dict(reference.named_buffers())[name], name)
