"""RevNet(irreversible_memory="checkpoint"): stem, transitions and head keep only their input."""

from __future__ import annotations

import copy

import pytest
import torch

import revtrain
from revtrain.memory import measure_step
from revtrain.models.revnet import RevNet


def _pair(dropout: float = 0.0):
    torch.manual_seed(0)
    stored = RevNet([2, 2], [8, 8, 16], in_channels=1, dropout=dropout).double()
    ckpt = copy.deepcopy(stored)
    ckpt.irreversible_memory = revtrain.MemoryMode.CHECKPOINT
    assert RevNet([2, 2], [8, 8, 16], in_channels=1,
                  irreversible_memory="checkpoint").irreversible_memory is ckpt.irreversible_memory
    return stored, ckpt


def _step(model, x, seed=1):
    torch.manual_seed(seed)
    torch.nn.functional.cross_entropy(model(x), torch.arange(x.shape[0]) % 10).backward()
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_same_gradients_and_batchnorm_statistics(dropout):
    stored, ckpt = _pair(dropout)
    x = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    for a, b in zip(_step(stored, x), _step(ckpt, x)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    for (name, a), b in zip(stored.named_buffers(), ckpt.buffers()):
        assert torch.equal(a, b), name  # updated once, as without checkpointing


def test_keeps_less_and_the_stored_twin_ignores_it():
    stored, ckpt = _pair()
    x = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    held = {name: measure_step(m, x)["held_bytes"] for name, m in
            (("stored", stored), ("checkpoint", ckpt))}
    assert held["checkpoint"] < 0.8 * held["stored"], held
    twins = [revtrain.set_memory(copy.deepcopy(m), "stored") for m in (stored, ckpt)]
    assert measure_step(twins[0], x)["held_bytes"] == measure_step(twins[1], x)["held_bytes"]


def test_reversible_is_refused():
    with pytest.raises(ValueError, match="'stored' or 'checkpoint'"):
        RevNet([2, 2], [8, 8, 16], irreversible_memory="reversible")
