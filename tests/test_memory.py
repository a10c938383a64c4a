"""The memory measurement itself: deterministic, counts what is kept, cross-checked by RSS."""

from __future__ import annotations

import copy

import pytest
import torch
from engine_helpers import stack
from torch import nn

import revtrain
from revtrain.memory import (
    TensorMemoryTracker,
    format_bytes,
    measure_step,
    model_state,
    parse_bytes,
    subprocess_peak_rss,
)

STATE_BYTES = torch.get_rng_state().numel()  # 5056 for the CPU Mersenne Twister


def test_tracker_counts_kept_and_freed_storages():
    with TensorMemoryTracker() as mem:
        a = torch.empty(1000)  # 4000 bytes
        b = a[10:20]  # a view: no new storage
        a.add_(1)  # in place: no new storage
        c = torch.empty(500)
        assert mem.current == 6000
        del a, b
        assert mem.current == 2000  # a's storage freed with its last view
        del c
    assert mem.current == 0 and mem.peak == 6000


def test_measure_step_is_deterministic_and_leaves_the_model_as_found():
    torch.manual_seed(0)
    model = stack(4, "additive", c=8, bn=True)
    x = torch.randn(4, 8, 6, 6)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    first, second = measure_step(model, x), measure_step(model, x)
    assert first == second
    assert first["method"] == "cpu-tensor" and first["held_bytes"] == x.numel() * 4
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in model.parameters())


def make_stack(depth: int, memory: str):
    torch.manual_seed(0)
    return stack(depth, "additive", c=32, memory=memory), torch.randn(8, 32, 32, 32)


@pytest.mark.slow
def test_rss_cross_check_agrees_on_the_ordering():
    rss = {m: subprocess_peak_rss("test_memory:make_stack", {"depth": 48, "memory": m}, steps=3)
           for m in ("reversible", "stored")}
    assert rss["stored"]["steady_delta_bytes"] > 2 * rss["reversible"]["steady_delta_bytes"], rss


def test_format_and_parse_bytes():
    assert format_bytes(512) == "512 B" and format_bytes(1536) == "1.5 KiB"
    assert format_bytes(3 * 1024**3) == "3.0 GiB"
    assert parse_bytes("8GiB") == 8 * 2**30 and parse_bytes("80GB") == 80 * 10**9
    assert parse_bytes(" 1.5 MiB ") == 3 * 2**19 and parse_bytes(4096) == 4096
    with pytest.raises(ValueError, match="8GiB"):
        parse_bytes("eight gigs")


# ----------------------------------------------------------------------------- RNG states


class KeepsRngState(nn.Module):
    """A layer that keeps a generator state for its backward, as a stack with dropout does.

    ``clone=True``: the state is an ordinary cloned tensor (engine v2); ``False``: the tensor
    ``torch.get_rng_state()`` returned, which no dispatcher mode sees (today's engine).
    """

    def __init__(self, clone: bool):
        super().__init__()
        self.clone = clone
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        state = torch.get_rng_state()
        state = state.clone() if self.clone else state
        return _Keep.apply(self.lin(x), state)


class _Keep(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, state):
        ctx.state = state  # held until backward, like an engine's RNG tape
        return x.clone()

    @staticmethod
    def backward(ctx, dy):
        return dy, None


@pytest.mark.parametrize("clone", [True, False], ids=["cloned-state", "raw-state"])
def test_rng_states_held_for_backward_are_counted(clone):
    x = torch.randn(2, 4)
    plain = measure_step(nn.Sequential(nn.Linear(4, 4)), x)
    keeps = measure_step(KeepsRngState(clone), x)
    assert keeps["held_bytes"] - plain["held_bytes"] == STATE_BYTES
    assert keeps["rng_state_bytes"] == STATE_BYTES and plain["rng_state_bytes"] == 0


def test_a_tracker_blind_to_rng_states_fails_the_count():
    """The deliberately broken case: without the wrapper, the raw state is not seen."""
    x = torch.randn(2, 4)
    model = KeepsRngState(clone=False)
    counts = {}
    for count in (True, False):
        with TensorMemoryTracker(count_rng_states=count) as mem:
            y = model(x)
            counts[count] = (mem.current, mem.rng_current)
            del y
    assert counts[True][0] - counts[False][0] == STATE_BYTES
    assert counts[False][1] == 0
    assert torch.get_rng_state is torch.random.get_rng_state  # the wrappers were removed


def test_dropout_stack_rng_states_are_in_what_it_holds():
    """A reversible stack with dropout holds generator states; they are counted and named."""
    torch.manual_seed(0)
    x = torch.randn(2, 8, 4, 4)
    with_dropout = stack(4, "additive", c=8, dropout=0.5)
    without = stack(4, "additive", c=8)
    held = measure_step(with_dropout, x)
    ref = measure_step(without, x)
    assert held["rng_state_bytes"] >= 4 * STATE_BYTES  # at least one state per layer
    assert held["rng_state_bytes"] % STATE_BYTES == 0
    assert held["held_bytes"] - ref["held_bytes"] == held["rng_state_bytes"]
    assert ref["rng_state_bytes"] == 0


# ----------------------------------------------------------------------------- no trace


def _uninitialised_glow():
    torch.manual_seed(0)
    return revtrain.models.create("glow", in_channels=1, image_size=8, levels=1, steps=2,
                                  hidden=8)


def _snapshot(model):
    return ({k: v.detach().clone() for k, v in model.state_dict().items()},
            {m: m.training for m in model.modules()})


def _unchanged(model, snapshot) -> bool:
    values, training = snapshot
    return (all(torch.equal(v, values[k]) for k, v in model.state_dict().items())
            and all(m.training == training[m] for m in model.modules()))


class _LogProb(nn.Module):
    def __init__(self, flow):
        super().__init__()
        self.flow = flow

    def forward(self, x):
        return -self.flow.log_prob(x).mean()


def test_measure_step_leaves_an_uninitialised_flow_uninitialised():
    model = _LogProb(_uninitialised_glow()).train()
    snapshot = _snapshot(model)
    actnorms = [m for m in model.modules() if type(m).__name__ == "ActNorm"]
    assert actnorms and not any(bool(a.initialized) for a in actnorms)
    grads = [torch.full_like(p, 7.0) for p in model.parameters()]
    for p, g in zip(model.parameters(), grads):
        p.grad = g
    x = torch.rand(4, 1, 8, 8)
    torch.manual_seed(123)
    report = measure_step(model, x, loss_fn=lambda loss: loss)
    after = torch.rand(3)
    torch.manual_seed(123)
    assert torch.equal(after, torch.rand(3)), "the caller's random stream moved"
    assert report["peak_bytes"] > 0
    assert _unchanged(model, snapshot)
    assert not any(bool(a.initialized) for a in actnorms)
    assert all(p.grad is g for p, g in zip(model.parameters(), grads))


def test_a_step_without_model_state_does_change_the_flow():
    """The check above can fail: one plain step initialises ActNorm and moves parameters."""
    model = _LogProb(_uninitialised_glow()).train()
    snapshot = _snapshot(model)
    model(torch.rand(4, 1, 8, 8)).backward()
    assert not _unchanged(model, snapshot)
    model = _LogProb(_uninitialised_glow()).train()
    snapshot = _snapshot(model)
    with model_state(model):
        model(torch.rand(4, 1, 8, 8)).backward()
    assert _unchanged(model, snapshot)


def test_measure_step_restores_batchnorm_and_eval_flags():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5))
    model[2].eval()  # a mixed state must come back as it was
    snapshot = _snapshot(model)
    twin = copy.deepcopy(model)
    measure_step(model, torch.randn(2, 3, 6, 6))
    assert _unchanged(model, snapshot)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                 twin.state_dict().values()))
