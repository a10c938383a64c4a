"""Layers rebuilt by their inverse alone (ActNorm, 1x1 convolutions, any layer without
sub-networks that saves only its input and small parameter-derived tensors).

Such a layer is not run forward again in backward: the engine keeps the small tensors it saved
(``exp`` of a parameter, a weight matrix), at most 1/16 of the stack's input in all, and hands
the rebuilt input to the nodes that saved the input. Checked in float64 against the stored twin,
with the re-runs counted; layers that save a batch-sized intermediate, a batch of one, or a
budget too small are re-run as before, and the counts show it.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import revtrain
from revtrain import ReconstructionError, ReversibleSequential
from revtrain.flows import ActNorm, InvConv1x1
from revtrain.memory import measure_step
from revtrain.testing import assert_matches_stored_twin


class Exp(revtrain.InvertibleModule):
    """``y = exp(x)``: ``exp`` saves its result, a batch-sized tensor that dies after forward."""

    def forward_and_log_det(self, x):
        return x.exp(), x.flatten(1).sum(1)

    def inverse(self, y):
        return y.log()


def _count_reruns(model: nn.Module) -> dict[str, int]:
    """A forward hook on every layer of ``model`` counting its calls during a rebuild."""
    counts: dict[str, int] = {}

    def hook(module, args, out, name):
        if revtrain.is_rebuilding():
            counts[name] = counts.get(name, 0) + 1

    for i, layer in enumerate(model):
        name = f"{i}:{type(layer).__name__}"
        counts[name] = 0
        layer.register_forward_hook(lambda m, a, o, name=name: hook(m, a, o, name))
    return counts


def _stack(*layers, memory="reversible"):
    """The layers with perturbed parameters; ActNorms marked initialised (by those parameters,
    not by data)."""
    torch.manual_seed(0)
    model = ReversibleSequential(*layers, memory=memory).double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    for layer in model:
        if isinstance(layer, ActNorm):
            layer.initialized.fill_(True)
    return model


def _step(model, x):
    y, log_det = model.forward_and_log_det(x)
    (y.square().sum() + log_det.sum()).backward()


def _images(batch=4):
    return torch.randn(batch, 4, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("shape", [(4, 4, 8, 8), (256, 4)], ids=["images", "vectors"])
def test_actnorm_and_invconv_are_rebuilt_without_a_rerun_and_match_the_twin(shape):
    # on vectors the 1x1 convolution is a matrix product, which saves its input and W^T; on
    # images its einsum saves a reshaped input, so it is re-run there (and left out)
    images = len(shape) == 4
    layers = [ActNorm(4), ActNorm(4), ActNorm(4)] if images else \
        [ActNorm(4), InvConv1x1(4), ActNorm(4), InvConv1x1(4), ActNorm(4)]
    model = _stack(*layers)
    for batch in (shape[0], 1) if images else (shape[0],):  # (1, 4): too small, see below
        x = torch.randn(batch, *shape[1:], dtype=torch.float64,
                        generator=torch.Generator().manual_seed(1)).requires_grad_()
        assert_matches_stored_twin(model, x, loss_fn=lambda out: out.square().sum())
        counts = _count_reruns(model)
        _step(model, x)
        assert sum(counts.values()) == 0, (batch, counts)


def test_a_coupling_keeps_nothing():
    """A layer with sub-networks is re-run in backward anyway: nothing of it is kept."""
    from engine_helpers import stack

    x = torch.randn(2, 4, 6, 6)
    held = {kind: measure_step(stack(4, kind), x)["held_bytes"] for kind in ("additive", "affine")}
    output = x.numel() * x.element_size()
    for kind, value in held.items():
        assert value <= output * 1.01, (kind, value, output)


def test_a_layer_saving_a_batch_sized_intermediate_is_still_rerun():
    model = _stack(ActNorm(4), Exp(), ActNorm(4))
    x = (0.1 * _images()).requires_grad_()
    counts = _count_reruns(model)
    _step(model, x)
    assert counts == {"0:ActNorm": 0, "1:Exp": 1, "2:ActNorm": 0}, counts
    model_copy = _stack(ActNorm(4), Exp(), ActNorm(4))
    model_copy.load_state_dict(model.state_dict())
    assert_matches_stored_twin(model_copy, x.detach())


def test_an_input_too_small_for_the_budget_keeps_nothing_and_reruns():
    model = _stack(ActNorm(4), ActNorm(4))
    x = torch.randn(1, 4, 1, 1, dtype=torch.float64).requires_grad_()  # 32 bytes: a 2-byte budget
    counts = _count_reruns(model)
    _step(model, x)
    assert counts == {"0:ActNorm": 1, "1:ActNorm": 1}, counts
    assert_matches_stored_twin(model, x.detach())


def test_what_is_kept_stays_within_a_sixteenth_of_the_input():
    """Depth 64 holds at most 1/16 of the input more than depth 2 (the budget), and layers past
    the budget are re-run; a stack of the same layers in stored mode holds far more."""

    def held(depth, memory):
        model = _stack(*[ActNorm(4) for _ in range(depth)], memory=memory)
        x = _images(batch=2)
        return measure_step(model, x, loss_fn=lambda y: y.square().sum())["held_bytes"], model, x

    input_bytes = 2 * 4 * 8 * 8 * 8
    small, _, _ = held(2, "reversible")
    large, model, x = held(64, "reversible")
    assert large - small <= input_bytes / 16, (small, large)
    stored, _, _ = held(64, "stored")
    assert stored - small > 8 * input_bytes / 16, "the same bound fails for the stored twin"
    counts = _count_reruns(model)
    _step(model, x.requires_grad_())
    # 32-byte exp(log_scale) per layer, a 256-byte budget: layers 1-8 inverse-only, later re-run
    assert sum(v == 0 for v in counts.values()) >= 8 and sum(counts.values()) >= 32, counts


def test_an_in_place_change_of_a_parameter_is_still_refused():
    model = _stack(ActNorm(4), ActNorm(4))
    y, log_det = model.forward_and_log_det(_images().requires_grad_())
    with torch.no_grad():
        model[1].log_scale.add_(1.0)
    with pytest.raises(ReconstructionError, match="log_scale"):
        (y.sum() + log_det.sum()).backward()


@pytest.mark.parametrize("how", ["autograd.grad", "backward(inputs=)"])
def test_partial_gradients_equal_the_twin(how):
    made = [_stack(ActNorm(4), InvConv1x1(4), ActNorm(4), memory=m) for m in ("reversible", "stored")]
    made[1].load_state_dict(made[0].state_dict())
    grads = []
    for model in made:
        x = _images().requires_grad_()
        y, log_det = model.forward_and_log_det(x)
        loss = y.square().sum() + log_det.sum()
        if how == "autograd.grad":
            grads.append(torch.autograd.grad(loss, [x, model[2].bias]))
        else:
            loss.backward(inputs=[model[1].weight])
            grads.append((model[1].weight.grad,))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
