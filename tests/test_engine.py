"""The reversible engine against the stored twin (TESTPLAN A-F)."""

from __future__ import annotations

import copy
import gc

import pytest
import torch
from engine_helpers import MODES, assert_steps_equal, conv_net, coupling, run_step, stack, twin
from torch import nn

import revtrain
from revtrain import ReconstructionError, ReversibleSequential

# ---------------------------------------------------------------- A. gradients


@pytest.mark.parametrize("kind", ["additive", "affine"])
@pytest.mark.parametrize("depth", [1, 4, 16])
@pytest.mark.parametrize("memory", ["reversible", "checkpoint"])
def test_fp64_equals_stored_twin(kind, depth, memory):
    torch.manual_seed(depth)
    model = stack(depth, kind, c=4).double()
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    stored = run_step(twin(model, "stored"), x)
    other = run_step(twin(model, memory), x)
    assert_steps_equal(other, stored, rtol=1e-10, atol=1e-10)


def test_fp64_equality_bound_catches_a_wrong_gradient():
    # The bound above can fail: a twin whose weights differ by 1e-6 is rejected.
    torch.manual_seed(0)
    model = stack(4, "affine").double()
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    other = twin(model, "stored")
    with torch.no_grad():
        next(other.parameters()).add_(1e-6)
    with pytest.raises(AssertionError):
        assert_steps_equal(run_step(model, x), run_step(other, x), rtol=1e-10, atol=1e-10)


def test_gradcheck_one_block():
    torch.manual_seed(0)
    for kind in ("additive", "affine"):
        block = ReversibleSequential(coupling(kind, 4)).double()
        x = torch.randn(2, 4, 3, 3, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda t, b=block: b.forward_and_log_det(t), (x,))


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_ten_training_steps_match(optimizer):
    torch.manual_seed(0)
    models = {m: None for m in MODES}
    base = stack(4, "affine", c=6)
    for m in MODES:
        models[m] = twin(base, m)
    data = torch.randn(10, 8, 6, 6, 6)
    losses = {m: [] for m in MODES}
    for m, model in models.items():
        opt = (torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9) if optimizer == "sgd"
               else torch.optim.Adam(model.parameters(), lr=1e-3))
        for x in data:
            opt.zero_grad()
            y, log_det = model.forward_and_log_det(x)
            loss = 0.5 * y.square().mean() - log_det.mean() / y[0].numel()
            loss.backward()
            opt.step()
            losses[m].append(loss.item())
    for m in ("reversible", "checkpoint"):
        torch.testing.assert_close(losses[m], losses["stored"], rtol=1e-4, atol=1e-5)
        for p, q in zip(models[m].parameters(), models["stored"].parameters()):
            torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


def test_autograd_grad_and_backward_inputs():
    torch.manual_seed(0)
    model = stack(3, "additive").double()
    stored = twin(model, "stored")
    x = torch.randn(2, 4, 4, 4, dtype=torch.float64, requires_grad=True)
    params, params_p = list(model.parameters()), list(stored.parameters())
    g = torch.autograd.grad(model(x).square().sum(), params)
    g_p = torch.autograd.grad(stored(x).square().sum(), params_p)
    for a, b in zip(g, g_p):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert all(p.grad is None for p in params)

    model(x).square().sum().backward(inputs=[x])
    dx = x.grad.clone()
    x.grad = None
    stored(x).square().sum().backward(inputs=[x])
    torch.testing.assert_close(dx, x.grad, rtol=1e-10, atol=1e-12)
    assert all(p.grad is None for p in params), "backward(inputs=[x]) must not touch params"


def test_loss_on_part_of_the_output_and_log_det_only():
    torch.manual_seed(0)
    model = stack(3, "affine").double()
    x = torch.randn(2, 4, 4, 4, dtype=torch.float64)
    for loss_fn in (lambda y, ld: y[:, :2].sum(), lambda y, ld: ld.sum()):
        grads = []
        for m in (model, twin(model, "stored")):
            m.zero_grad()
            xi = x.clone().requires_grad_(True)
            loss_fn(*m.forward_and_log_det(xi)).backward()
            grads.append([xi.grad] + [p.grad for p in m.parameters()])
        for a, b in zip(*grads):
            if b is None:
                assert a is None or a.abs().max() == 0
            else:
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_gradient_hooks_fire_once_per_backward():
    torch.manual_seed(0)
    model = stack(4, "additive")
    counts = {}
    for i, p in enumerate(model.parameters()):
        p.register_post_accumulate_grad_hook(lambda p, i=i: counts.__setitem__(i, counts.get(i, 0) + 1))
    model(torch.randn(2, 4, 4, 4, requires_grad=True)).sum().backward()
    assert counts == {i: 1 for i in range(len(list(model.parameters())))}


def test_shared_subnetwork():
    torch.manual_seed(0)
    f, g = conv_net(2, 2), conv_net(2, 2)
    model = ReversibleSequential(*[revtrain.AdditiveCoupling(f, g) for _ in range(3)]).double()
    x = torch.randn(2, 4, 4, 4, dtype=torch.float64)
    assert_steps_equal(run_step(model, x), run_step(twin(model, "stored"), x))
    counts = []
    for p in model.parameters():
        p.grad = None
        p.register_post_accumulate_grad_hook(lambda p: counts.append(1))
    model(x.requires_grad_()).sum().backward()
    assert len(counts) == len(list(model.parameters()))


class _Counted(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net, self.calls = net, 0

    def forward(self, x):
        self.calls += 1
        return self.net(x)


def test_fused_backward_evaluates_each_subnetwork_once_more():
    import memcnn

    torch.manual_seed(0)
    fs = [_Counted(conv_net(2, 2)) for _ in range(3)]
    gs = [_Counted(conv_net(2, 2)) for _ in range(3)]
    model = ReversibleSequential(*[revtrain.AdditiveCoupling(f, g) for f, g in zip(fs, gs)])
    y = model(torch.randn(2, 4, 4, 4, requires_grad=True))
    assert [m.calls for m in fs + gs] == [1] * 6
    y.sum().backward()
    assert [m.calls for m in fs + gs] == [2] * 6, "fused: one extra evaluation each"

    # memcnn's wrapper evaluates each sub-network twice more (inverse, then forward again)
    f, g = _Counted(conv_net(2, 2)), _Counted(conv_net(2, 2))
    wrapped = memcnn.InvertibleModuleWrapper(memcnn.AdditiveCoupling(f, g), keep_input=False)
    leaf = torch.randn(2, 4, 4, 4, requires_grad=True)
    wrapped(leaf * 1.0).sum().backward()  # memcnn frees its input: give it a temporary
    assert (f.calls, g.calls) == (3, 3)


def test_memcnn_modules_in_a_stack():
    import memcnn

    torch.manual_seed(0)
    layers = [memcnn.AdditiveCoupling(conv_net(2, 2), conv_net(2, 2)) for _ in range(3)]
    model = ReversibleSequential(*layers).double()
    x = torch.randn(2, 4, 4, 4, dtype=torch.float64)
    assert_steps_equal(run_step(model, x, with_log_det=False),
                       run_step(twin(model, "stored"), x, with_log_det=False))
    torch.testing.assert_close(model.inverse(model(x)), x)


# ---------------------------------------------------- B. reconstruction, numerics


@pytest.mark.parametrize("kind", ["additive", "affine"])
def test_round_trips(kind):
    torch.manual_seed(0)
    for dtype, tol in ((torch.float32, 1e-5), (torch.float64, 1e-10)):
        model = stack(6, kind, c=5).to(dtype).eval()
        x = torch.randn(3, 5, 4, 4, dtype=dtype)
        with torch.no_grad():
            assert (model.inverse(model(x)) - x).abs().max() < tol
            y = torch.randn(3, 5, 4, 4, dtype=dtype)
            assert (model(model.inverse(y)) - y).abs().max() < tol
            for layer in model:
                assert revtrain.is_invertible(layer, x, atol=tol)


@pytest.mark.parametrize("bf16", [False, True])
def test_reconstruction_error_bounded_in_depth(bf16):
    # the check compares every rebuilt input with its forward value and raises past 1e-4
    torch.manual_seed(0)
    for depth in (8, 32):
        model = stack(depth, "affine", c=8)
        model.check_reconstruction = 1e-4
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            model(torch.randn(2, 8, 6, 6, requires_grad=True)).square().mean().backward()
    # a transform whose inverse is off by 1e-3 must fail the same bound
    broken = stack(8, "affine", c=8)
    broken.check_reconstruction = 1e-4
    broken[3].transform = _SloppyAffine()
    y = broken(torch.randn(2, 8, 6, 6, requires_grad=True))
    with pytest.raises(ReconstructionError, match=r"layer 3 \(AffineCoupling\)"):
        y.square().mean().backward()


class _SloppyAffine(revtrain.Affine):
    def inverse(self, y, h, dim):
        return super().inverse(y, h, dim) + 1e-3


def test_gradient_cosine_at_init_fp32():
    torch.manual_seed(0)
    model = stack(32, "affine", c=8)
    x = torch.randn(4, 8, 6, 6)
    _, _, gr = run_step(model, x)
    _, _, gp = run_step(twin(model, "stored"), x)
    a, b = torch.cat([g.flatten() for g in gr]), torch.cat([g.flatten() for g in gp])
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.9999


class _Huge(nn.Module):
    """A sub-network whose outputs are extreme (scales pushed to the clamp)."""

    def __init__(self, c_in, c_out, value):
        super().__init__()
        self.lin = nn.Conv2d(c_in, c_out, 1)
        self.value = value

    def forward(self, x):
        return self.lin(x) * 0 + self.value + 0 * x.sum()


@pytest.mark.parametrize("value", [1e4, -1e4, 1e30])
def test_affine_extreme_outputs_stay_finite(value):
    layer = revtrain.AffineCoupling(_Huge(2, 4, value), _Huge(2, 4, value))
    x = torch.randn(2, 4, 3, 3, requires_grad=True)
    y, log_det = ReversibleSequential(layer).forward_and_log_det(x)
    assert torch.isfinite(y).all() and torch.isfinite(log_det).all()
    assert torch.isfinite(layer.inverse(y.detach())).all()
    (y.sum() + log_det.sum()).backward()
    assert torch.isfinite(x.grad).all()


def test_stressed_affine_check_fires_or_grads_finite():
    # scales near the negative clamp over many layers: information is squeezed out
    torch.manual_seed(0)
    layers = [revtrain.AffineCoupling(_Huge(2, 4, -10.0), _Huge(2, 4, -10.0)) for _ in range(12)]
    model = ReversibleSequential(*layers, check_reconstruction=1e-3)
    x = torch.randn(2, 4, 3, 3, requires_grad=True)
    try:
        y, log_det = model.forward_and_log_det(x)
        (y.sum() + log_det.sum()).backward()
    except ReconstructionError as error:
        assert "layer" in str(error)
    else:
        assert torch.isfinite(x.grad).all()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())


class _WrongInverse(revtrain.InvertibleModule):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(2.0))

    def forward_and_log_det(self, x):
        return x * self.w, torch.zeros(x.shape[0])

    def inverse(self, y):
        return y / self.w + 0.1  # wrong


def test_reconstruction_check_names_the_layer():
    model = ReversibleSequential(coupling("additive", 4), _WrongInverse(), check_reconstruction=True)
    y = model(torch.randn(2, 4, 3, 3, requires_grad=True))
    with pytest.raises(ReconstructionError, match=r"layer 1 \(_WrongInverse\)"):
        y.sum().backward()
    # off by default: no fingerprint is stored, the wrong gradient is not caught
    model.check_reconstruction = False
    model(torch.randn(2, 4, 3, 3, requires_grad=True)).sum().backward()


def test_weight_changed_between_forward_and_backward_raises():
    model = stack(3, "additive")
    y = model(torch.randn(2, 4, 3, 3, requires_grad=True))
    with torch.no_grad():
        model[1].f[0].weight.add_(0.5)
    with pytest.raises(ReconstructionError, match=r"layer 1 \(AdditiveCoupling\)"):
        y.sum().backward()


@pytest.mark.parametrize("where", ["input", "weight"])
def test_nan_is_detected(where):
    model = stack(3, "additive")
    x = torch.randn(2, 4, 3, 3, requires_grad=True)
    if where == "input":
        x = x.detach().clone()
        x[0, 0, 0, 0] = float("nan")
        x.requires_grad_()
    else:
        with torch.no_grad():
            model[2].g[0].bias[0] = float("nan")
    with pytest.raises(ReconstructionError, match="NaN or Inf"):
        model(x)


# ------------------------------------------------------------------ C. state


def test_dropout_replay_matches_stored_and_rng_stream():
    torch.manual_seed(0)
    model = stack(4, "additive", c=4, dropout=0.5).double()
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64)
    results, streams = [], []
    for m in (model, twin(model, "stored"), twin(model, "checkpoint")):
        results.append(run_step(m, x, seed=7))
        streams.append(torch.rand(5))  # the caller's RNG stream after the step
    assert_steps_equal(results[0], results[1])
    assert_steps_equal(results[2], results[1])
    torch.testing.assert_close(streams[0], streams[1], rtol=0, atol=0)
    # same seed, same losses; another seed, other masks
    again = run_step(model, x, seed=7)
    torch.testing.assert_close(again[0], results[0][0], rtol=0, atol=0)
    assert not torch.equal(run_step(model, x, seed=8)[0], results[0][0])


def test_disabling_rng_replay_with_dropout_warns():
    model = stack(2, "additive", dropout=0.5)
    model.preserve_rng_state = False
    with pytest.warns(RuntimeWarning, match="preserve_rng_state"):
        model(torch.randn(2, 4, 3, 3, requires_grad=True)).sum().backward()
    model.eval()  # no randomness: no warning
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(torch.randn(2, 4, 3, 3, requires_grad=True)).sum().backward()


def test_two_forwards_one_backward():
    torch.manual_seed(0)
    model = stack(3, "affine").double()
    stored = twin(model, "stored")
    a, b = torch.randn(2, 2, 4, 3, 3, dtype=torch.float64)
    (model(a) * model(b)).sum().backward()
    (stored(a) * stored(b)).sum().backward()
    for p, q in zip(model.parameters(), stored.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("memory", ["reversible", "checkpoint"])
def test_batchnorm_statistics_updated_once(memory):
    torch.manual_seed(0)
    model = stack(3, "additive", c=4, bn=True).double()
    other, stored = twin(model, memory), twin(model, "stored")
    x = torch.randn(4, 4, 5, 5, dtype=torch.float64)
    assert_steps_equal(run_step(other, x), run_step(stored, x))
    for (name, a), (_, b) in zip(other.named_buffers(), stored.named_buffers()):
        assert torch.equal(a, b), f"buffer {name} differs after one step"
    assert all(int(m.num_batches_tracked) == 1 for m in other.modules()
               if isinstance(m, nn.BatchNorm2d))


def test_eval_no_grad_keeps_nothing_changes_nothing():
    torch.manual_seed(0)
    model = stack(3, "additive", bn=True)
    run_step(model, torch.randn(4, 4, 3, 3))  # non-trivial running stats
    model.eval()
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    x = torch.randn(2, 4, 3, 3)
    expected = twin(model, "stored")(x)
    for ctx in (torch.no_grad, torch.inference_mode):
        with ctx():
            y = model(x)
        assert y.grad_fn is None
        torch.testing.assert_close(y, expected)
    for k, v in model.named_buffers():
        assert torch.equal(v, buffers[k])


# ----------------------------------------------------- D. memory and lifetime


def test_input_used_elsewhere_and_views():
    torch.manual_seed(0)
    model = stack(3, "additive").double()
    stored = twin(model, "stored")
    big = torch.randn(2, 8, 4, 4, dtype=torch.float64, requires_grad=True)
    outs = []
    for m in (model, stored):
        h = torch.relu(big)
        view = h[:, 2:6]  # a view of a bigger tensor, also used by a skip connection
        y = m(view) + view
        loss = y.square().sum() + h.sum()
        loss.backward()
        outs.append(big.grad.clone())
        big.grad = None
        assert torch.isfinite(h).all() and h.untyped_storage().nbytes() > 0
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-10, atol=1e-12)


def test_no_grad_forward_leaves_input_intact():
    model = stack(3, "affine")
    x = torch.randn(2, 4, 3, 3)
    copy_x, ptr = x.clone(), x.data_ptr()
    with torch.no_grad():
        model(x)
    model(x.requires_grad_()).sum().backward()
    assert torch.equal(x.detach(), copy_x) and x.data_ptr() == ptr


def _held(depth: int, memory: str) -> int:
    from revtrain.memory import measure_step

    torch.manual_seed(0)
    model = stack(depth, "additive", c=8, memory=memory)
    return measure_step(model, torch.randn(2, 8, 6, 6))["held_bytes"]


def _flat(small: int, large: int) -> bool:
    return abs(large - small) <= 0.05 * small


def test_memory_flat_in_depth_and_stored_is_not():
    rev = _held(8, "reversible"), _held(64, "reversible")
    stored = _held(8, "stored"), _held(64, "stored")
    assert _flat(*rev), f"reversible held {rev[0]} B at depth 8, {rev[1]} B at depth 64"
    assert not _flat(*stored), "the stored twin must fail the flatness check"
    assert stored[1] > 6 * stored[0]  # linear growth


def test_peak_memory_ordering():
    from revtrain.memory import measure_step

    torch.manual_seed(0)
    peaks = {}
    for memory in MODES:
        model = stack(16, "additive", c=8, memory=memory)
        peaks[memory] = measure_step(model, torch.randn(8, 8, 8, 8))["peak_bytes"]
    assert peaks["stored"] > peaks["checkpoint"] > peaks["reversible"], peaks


def test_no_leak_after_del():
    from revtrain.memory import TensorMemoryTracker

    model = stack(3, "affine", dropout=0.2)
    for backward in (False, True):
        with TensorMemoryTracker() as mem:
            x = torch.randn(2, 4, 3, 3, requires_grad=True)
            y = model(x)
            assert mem.current > 0
            if backward:
                y.sum().backward(retain_graph=True)
            del x, y
            model.zero_grad(set_to_none=True)
            gc.collect()
            assert mem.current == 0, "the graph, its saved state and the output are freed"


def test_second_backward_raises_clear_error_and_retain_graph_works():
    model = stack(2, "additive")
    y = model(torch.randn(2, 4, 3, 3, requires_grad=True))
    y.sum().backward(retain_graph=True)
    y.sum().backward()  # retained: works again
    with pytest.raises(RuntimeError, match="retain_graph=True"):
        y.sum().backward()


# ------------------------------------------------- E. precision, compile, layout


def test_cpu_bf16_autocast_matches_stored():
    torch.manual_seed(0)
    model = stack(4, "additive", c=8)
    x = torch.randn(4, 8, 6, 6)
    results = []
    for m in (model, twin(model, "stored")):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results.append(run_step(m, x, with_log_det=False))
    (y, gx, gp), (ys, gxs, gps) = results
    assert y.dtype == torch.float32  # the residual stream keeps the input dtype
    torch.testing.assert_close(y, ys, rtol=0, atol=0)
    torch.testing.assert_close(gx, gxs, rtol=1e-2, atol=1e-2)
    for a, b in zip(gp, gps):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.cuda
def test_cuda_fp16_grad_scaler_overflow_step():
    torch.manual_seed(0)
    model = stack(4, "additive", c=8).cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**40)  # first step overflows
    for _ in range(3):
        opt.zero_grad()
        with torch.autocast("cuda", dtype=torch.float16):
            loss = model(torch.randn(4, 8, 6, 6, device="cuda", requires_grad=True)).float().square().mean()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    assert scaler.get_scale() < 2.0**40
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_torch_compile_matches_eager():
    torch.manual_seed(0)
    body = stack(2, "additive", c=4)
    model = nn.Sequential(nn.Conv2d(4, 4, 1), body, nn.Flatten(), nn.Linear(4 * 9, 3))
    compiled = torch.compile(copy.deepcopy(model), backend="aot_eager")
    x = torch.randn(2, 4, 3, 3)
    outs = []
    for m in (model, compiled):
        y = m(x)
        y.square().sum().backward()
        outs.append((y.detach(), [p.grad for p in m.parameters()]))
    torch.testing.assert_close(outs[0][0], outs[1][0])
    for a, b in zip(outs[0][1], outs[1][1]):
        torch.testing.assert_close(a, b)


def test_channels_last_and_non_contiguous():
    torch.manual_seed(0)
    model = stack(3, "affine", c=6).double()
    x = torch.randn(2, 6, 5, 5, dtype=torch.float64)
    ref = run_step(model, x)
    assert_steps_equal(run_step(model, x.to(memory_format=torch.channels_last)), ref)
    wide = torch.randn(2, 6, 5, 10, dtype=torch.float64)
    wide[..., ::2] = x
    assert_steps_equal(run_step(model, wide[..., ::2]), ref)


# ------------------------------------------------------------------ F. bad input


@pytest.mark.parametrize("c", [3, 5, 7])
def test_odd_channel_counts(c):
    torch.manual_seed(0)
    for kind in ("additive", "affine"):
        model = stack(3, kind, c=c).double()
        x = torch.randn(2, c, 3, 3, dtype=torch.float64)
        assert_steps_equal(run_step(model, x), run_step(twin(model, "stored"), x))


def test_non_invertible_layers_are_refused_or_detected():
    with pytest.raises(TypeError, match="has no inverse"):
        ReversibleSequential(nn.Conv2d(4, 4, 3, padding=1))
    x = torch.randn(2, 4, 6, 6)
    assert not revtrain.is_invertible(nn.Conv2d(4, 4, 3, padding=1), x)
    assert not revtrain.is_invertible(_WrongInverse(), x)
    assert revtrain.is_invertible(coupling("affine", 4), x)


def test_squeeze_and_injective_pad():
    with pytest.raises(ValueError, match="multiples of 2"):
        revtrain.Squeeze()(torch.randn(1, 2, 5, 4))
    x = torch.randn(2, 3, 4, 6)
    sq = revtrain.Squeeze()
    assert sq(x).shape == (2, 12, 2, 3) and torch.equal(sq.inverse(sq(x)), x)
    pad = revtrain.InjectivePad(5)
    y = pad(x)
    assert y.shape == (2, 8, 4, 6) and torch.equal(y[:, 3:], torch.zeros(2, 5, 4, 6))
    assert torch.equal(pad.inverse(y), x) and revtrain.is_invertible(pad, x)


def test_input_without_grad():
    torch.manual_seed(0)
    model = stack(3, "affine").double()
    stored = twin(model, "stored")
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)  # data straight in
    model(x).square().sum().backward()
    stored(x).square().sum().backward()
    assert x.grad is None
    for p, q in zip(model.parameters(), stored.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12)


def test_in_place_change_of_output_is_detected():
    model = stack(2, "additive")
    y = model(torch.randn(2, 4, 3, 3, requires_grad=True))
    y.mul_(2)
    with pytest.raises(RuntimeError, match="changed in place"):
        y.sum().backward()


def test_bad_construction_and_shapes():
    with pytest.raises(ValueError, match=r"f maps .* it must map x2 \(2 ch\)"):
        revtrain.AdditiveCoupling(conv_net(2, 3))(torch.randn(1, 4, 3, 3))
    with pytest.raises(ValueError, match="split_dim=3 is out of range"):
        revtrain.AdditiveCoupling(nn.Identity(), split_dim=3)(torch.randn(2, 4, 3))
    with pytest.raises(ValueError, match="split the batch"):
        revtrain.AdditiveCoupling(nn.Identity(), split_dim=0)
    with pytest.raises(ValueError, match="is not a memory mode"):
        ReversibleSequential(memory="fast")
    model = ReversibleSequential(memory="stored")
    model.memory = "reversible"  # strings are parsed when set, too
    assert model.memory is revtrain.MemoryMode.REVERSIBLE
    with pytest.raises(ValueError, match="is not a memory mode"):
        model.memory = "fast"
    with pytest.raises(ValueError, match="scale and shift"):
        revtrain.AffineCoupling(conv_net(2, 2))(torch.randn(1, 4, 3, 3))


def test_after_a_failed_backward_the_next_step_is_correct():
    torch.manual_seed(0)
    model = stack(3, "additive", bn=True, dropout=0.2).double()
    x = torch.randn(3, 4, 4, 4, dtype=torch.float64)
    y = model(x.requires_grad_())
    with torch.no_grad():
        model[0].f[0].weight.add_(1e-3)  # makes this backward fail
    with pytest.raises(ReconstructionError):
        y.sum().backward()
    model.zero_grad()
    assert all(m.track_running_stats for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    assert_steps_equal(run_step(model, x), run_step(twin(model, "stored"), x))


def test_built_in_splits_and_transforms_satisfy_the_typed_protocols():
    from revtrain.flows import ChannelMask, CheckerboardMask

    for split in (revtrain.ChannelSplit(2), ChannelMask(), CheckerboardMask(1)):
        assert isinstance(split, revtrain.Split), split
    for transform in (revtrain.Additive(), revtrain.Affine(2.0), revtrain.SigmoidAffine(),
                      revtrain.VolumePreservingAffine(),
                      revtrain.RationalQuadratic()):
        assert isinstance(transform, revtrain.ElementwiseTransform), transform
    assert not isinstance(object(), revtrain.Split)  # the check can fail
    assert not isinstance(revtrain.ChannelSplit(1), revtrain.ElementwiseTransform)
