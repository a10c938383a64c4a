"""``revtrain.testing`` (each check also shown to fail on a broken model) and the small layers
it is used on: ``Squeeze`` (``pixel_unshuffle``) and ``ChannelPermute``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import revtrain
from revtrain import models
from revtrain.base import InvertibleModule, zero_log_det
from revtrain.testing import assert_invertible, assert_matches_stored_twin, stored_twin

pytestmark = pytest.mark.usefixtures("one_thread")


class _Scale(InvertibleModule):
    """``y = x * exp(w)``; with ``broken`` the inverse is off by 0.1."""

    def __init__(self, channels: int, broken: bool = False):
        super().__init__()
        self.w = nn.Parameter(0.1 * torch.randn(channels))
        self.broken = broken

    def forward_and_log_det(self, x):
        return x * self.w.exp(), zero_log_det(x) + self.w.sum()

    def inverse(self, y):
        return y * (-self.w).exp() + (0.1 if self.broken else 0.0)


def _stack(broken: bool = False, memory: str = "reversible") -> revtrain.ReversibleSequential:
    torch.manual_seed(0)
    return revtrain.ReversibleSequential(
        revtrain.AdditiveCoupling(nn.Sequential(nn.Linear(3, 3), nn.Tanh())),
        _Scale(6, broken),
        revtrain.AffineCoupling(nn.Linear(3, 6)),
        memory=memory)


def test_stored_twin_is_an_independent_copy():
    model = models.create("revnet_digits")
    twin = stored_twin(model)
    assert model.memory.value == "reversible" and twin.memory.value == "stored"
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(p, q) and p.data_ptr() != q.data_ptr(), name


@pytest.mark.parametrize("memory", ["reversible", "checkpoint"])
def test_assert_matches_stored_twin_passes_and_fails(memory, device, dtype):
    x = torch.randn(5, 6, device=device)
    assert_matches_stored_twin(_stack(memory=memory).to(device), x, dtype=dtype)
    # the check can fail: a layer whose inverse is wrong rebuilds a wrong input in backward
    if memory == "reversible":
        with pytest.raises(AssertionError, match="differs from the stored twin"):
            assert_matches_stored_twin(_stack(broken=True).to(device), x, dtype=dtype)


def test_assert_matches_stored_twin_on_models_with_dropout_and_on_a_flow():
    model = models.create("irevnet_digits", dropout=0.2)
    assert_matches_stored_twin(model, torch.randn(2, 1, 8, 8))  # same masks on both sides
    assert model.memory.value == "reversible" and model.training  # the caller's model is kept
    flow = models.create("realnvp", in_channels=1, image_size=4, levels=2, hidden=4)
    x = torch.rand(3, 1, 4, 4)
    assert_matches_stored_twin(flow, x, call=lambda m, inp: m.log_prob(inp))
    # deliberately different computations in the model and its twin are caught, and named
    with pytest.raises(AssertionError, match="output 0 differs from the stored twin"):
        assert_matches_stored_twin(model, torch.randn(2, 1, 8, 8),
                                   call=lambda m, inp: m(inp) + (m.memory.value == "reversible"))


def test_assert_invertible_passes_and_fails():
    assert_invertible(_stack().double(), torch.randn(4, 6, dtype=torch.float64))
    layer = _Scale(6, broken=True).train()
    with pytest.raises(AssertionError, match=r"inverse\(forward\(x\)\) - x\| = 0\.1"):
        assert_invertible(layer, torch.randn(4, 6))
    assert layer.training
    with pytest.raises(AssertionError, match="has no inverse"):
        assert_invertible(nn.Linear(2, 2), torch.randn(1, 2))


# --- Squeeze: pixel_unshuffle, bit for bit -------------------------------------------------

def _reference_squeeze(x: torch.Tensor, k: int) -> torch.Tensor:
    """The hand-written space-to-depth Squeeze used before (reshape and permute)."""
    b, c, h, w = x.shape
    y = x.reshape(b, c, h // k, k, w // k, k).permute(0, 1, 3, 5, 2, 4)
    return y.reshape(b, c * k * k, h // k, w // k)


@pytest.mark.parametrize("k", [2, 4])
def test_squeeze_is_pixel_unshuffle_bit_for_bit(k):
    x = torch.randn(2, 3, 8, 16)
    sq = revtrain.Squeeze(k)
    assert torch.equal(sq(x), _reference_squeeze(x, k))
    assert torch.equal(sq(x), F.pixel_unshuffle(x, k))
    assert torch.equal(sq.inverse(sq(x)), x)
    assert_invertible(sq, x)


def test_squeeze_errors_and_deprecated_name():
    with pytest.raises(ValueError, match="multiples of 2"):
        revtrain.Squeeze()(torch.randn(1, 2, 5, 4))
    with pytest.raises(ValueError, match="channels must be a multiple of 4"):
        revtrain.Squeeze().inverse(torch.randn(1, 3, 2, 2))
    with pytest.warns(FutureWarning, match="block_size"):
        sq = revtrain.Squeeze(factor=4)
    assert sq.block_size == 4 and "block_size=4" in repr(sq)


# --- ChannelPermute ---------------------------------------------------------------------------

def test_channel_permute_inverts_trains_and_is_saved():
    torch.manual_seed(0)
    perm = revtrain.ChannelPermute(torch.randperm(6))
    x = torch.randn(3, 6, 2, 2, dtype=torch.float64)
    assert_invertible(perm, x)
    y, log_det = perm.forward_and_log_det(x)
    assert torch.equal(y.sort(dim=1).values, x.sort(dim=1).values) and not log_det.any()
    # Glow's "shuffle" between couplings: trains through the engine as the stored twin does
    stack = revtrain.ReversibleSequential(
        revtrain.AffineCoupling(nn.Conv2d(3, 6, 1)), perm, revtrain.AffineCoupling(nn.Conv2d(3, 6, 1)))
    assert_matches_stored_twin(stack, x.float())
    reverse = revtrain.ChannelPermute(torch.arange(6).flip(0))
    reverse.load_state_dict(perm.state_dict())  # the permutation is a buffer: saved and loaded
    assert torch.equal(reverse(x), perm(x))
    with pytest.raises(ValueError, match="not a permutation"):
        revtrain.ChannelPermute([0, 0, 1])
    with pytest.raises(ValueError, match="expects 6 channels"):
        perm(torch.randn(1, 5))
