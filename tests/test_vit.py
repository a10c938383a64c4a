"""Reversible transformers: the Rev-ViT block, ``ReversibleTransformer`` and the ``RevViT`` models.

Gradients (parameters, input, mask) equal the stored twin's in float64 with dropout and
drop-path active, hooks and ``autograd.grad`` behave as stored, memory is flat in depth (and a
stored model fails the same bound), inverses round-trip, bad input gets a message naming the
expected shapes. Tiny widths, one thread.
"""

from __future__ import annotations

import copy

import pytest
import torch

import revtrain
from revtrain import ReversibleTransformer, ReversibleTransformerBlock, models
from revtrain.memory import measure_step
from revtrain.testing import assert_invertible, assert_matches_stored_twin

pytestmark = pytest.mark.usefixtures("one_thread")

STOCHASTIC = {"dropout": 0.1, "attn_dropout": 0.2, "drop_path": 0.3}


def encoder(depth: int = 3, dim: int = 16, heads: int = 2, **kwargs) -> ReversibleTransformer:
    torch.manual_seed(0)
    return ReversibleTransformer(dim=dim, depth=depth, num_heads=heads, **kwargs)


def sequence(batch: int = 2, tokens: int = 5, dim: int = 16, dtype=torch.float64):
    return torch.randn(batch, tokens, dim, generator=torch.Generator().manual_seed(1), dtype=dtype)


def padding(batch: int = 2, tokens: int = 5):
    mask = torch.ones(batch, tokens, dtype=torch.bool)
    mask[-1, tokens // 2 + 1:] = False  # the last sample is padded
    return mask


# --- gradients equal the stored twin --------------------------------------------------------

@pytest.mark.parametrize("memory", ["reversible", "checkpoint"])
@pytest.mark.parametrize("fuse", ["mean", "concat", "linear"])
@pytest.mark.parametrize("depth", [1, 4])
def test_encoder_gradients_equal_stored_twin_with_dropout_and_drop_path(depth, fuse, memory):
    model = encoder(depth, fuse=fuse, memory=memory, **STOCHASTIC)
    assert model.memory is revtrain.MemoryMode(memory)
    assert_matches_stored_twin(model, sequence())
    mask = padding()
    assert_matches_stored_twin(model, sequence(), call=lambda m, x: m(x, mask=mask))


def test_dropout_is_active_and_its_replay_is_what_makes_gradients_exact():
    """The check can fail: without the engine's RNG replay the rebuilt dropout masks differ."""
    model = encoder(2, **STOCHASTIC).double().train()
    x = sequence()
    with torch.no_grad():  # dropout and drop-path really draw: two calls differ
        assert not torch.allclose(model(x), model(x))
    model.blocks.preserve_rng_state = False
    with pytest.warns(RuntimeWarning, match="preserve_rng_state=False"), \
            pytest.raises(AssertionError, match="differs from the stored twin"):
        assert_matches_stored_twin(model, x)


@pytest.mark.parametrize("shape", [(2, 5, 5), (2, 2, 5, 5)])
def test_gradient_of_an_additive_float_mask_equals_stored_twin(shape):
    model = encoder(3, **STOCHASTIC).double()
    mask = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    x = sequence()

    def run(m):
        c = mask.clone().requires_grad_(True)
        torch.manual_seed(7)
        out = m(x, mask=c)
        (out * torch.linspace(-1, 1, out.shape[-1], dtype=out.dtype)).square().sum().backward()
        return out.detach(), c.grad

    out, grad = run(copy.deepcopy(model))
    out_t, grad_t = run(copy.deepcopy(model).set_memory("stored"))
    torch.testing.assert_close(out, out_t, rtol=1e-10, atol=1e-12)
    assert grad.abs().max() > 0
    torch.testing.assert_close(grad, grad_t, rtol=1e-10, atol=1e-10 * grad_t.abs().max())


def test_padded_tokens_do_not_reach_the_real_ones():
    model = encoder(3).double().eval()
    x, mask = sequence(), padding()
    other = x.clone()
    other[~mask] = 100.0  # change only the padded tokens
    with torch.no_grad():
        a, b = model(x, mask=mask), model(other, mask=mask)
    torch.testing.assert_close(a[mask], b[mask], rtol=1e-12, atol=1e-12)
    assert not torch.allclose(a[~mask], b[~mask])


@pytest.mark.parametrize("pool, extra", [("mean", {}), ("cls", {}),
                                         ("cls", {"pos_embed": "sincos", "patch_kernel": 3})])
def test_rev_vit_digits_gradients_equal_stored_twin(pool, extra):
    torch.manual_seed(0)
    model = models.create("rev_vit_digits", pool=pool, embed_dim=16, depth=3, **STOCHASTIC,
                          **extra)
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    assert_matches_stored_twin(model, x)


def test_batch_of_one():
    assert_matches_stored_twin(encoder(2, **STOCHASTIC), sequence(batch=1))
    torch.manual_seed(0)
    model = models.create("rev_vit_digits", embed_dim=16, depth=2, **STOCHASTIC)
    assert_matches_stored_twin(model, torch.randn(1, 1, 8, 8))
    assert model(torch.randn(1, 1, 8, 8)).shape == (1, 10)


# --- the autograd surface -------------------------------------------------------------------

def test_hooks_fire_once_and_autograd_grad_gives_the_twins_gradients():
    model = encoder(3, **STOCHASTIC).double()
    twin = copy.deepcopy(model).set_memory("stored")
    x = sequence()
    weight = model.blocks[1].f.qkv.weight
    calls = []
    weight.register_hook(lambda g: calls.append(1))
    module_calls = []
    model.blocks[1].g.register_full_backward_hook(lambda *a: module_calls.append(1))

    def grad_of(m, **kw):
        torch.manual_seed(4)
        loss = m(x.clone().requires_grad_(True), **kw).square().sum()
        return torch.autograd.grad(loss, list(m.parameters()))

    got, want = grad_of(model), grad_of(twin)
    assert len(calls) == 1 and len(module_calls) == 1
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10 * b.abs().max())
    # backward(inputs=[x]): only the input's gradient, the twin's
    grads = []
    for m in (model, twin):
        inp = x.clone().requires_grad_(True)
        torch.manual_seed(4)
        m(inp).square().sum().backward(inputs=[inp])
        grads.append(inp.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-12)
    assert all(p.grad is None for p in model.parameters())


def test_state_dict_keys_and_eval_outputs_equal_the_stored_twin():
    torch.manual_seed(0)
    model = models.create("rev_vit_digits", embed_dim=16, depth=2, **STOCHASTIC)
    twin = models.create("rev_vit_digits", embed_dim=16, depth=2, memory="stored", **STOCHASTIC)
    assert model.state_dict().keys() == twin.state_dict().keys()
    twin.load_state_dict(model.state_dict())
    model.eval()
    twin.eval()
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(model(x), twin(x), rtol=0, atol=0)
    assert "memory=reversible" in repr(model) and "ReversibleTransformerBlock" in repr(model)


# --- memory flat in depth -------------------------------------------------------------------

def held_and_peak(model, x) -> tuple[int, int]:
    r = measure_step(model, x, warmup=0)
    return r["held_bytes"], r["peak_bytes"] - r["grad_bytes"]


@pytest.mark.parametrize("memory, flat", [("reversible", True), ("stored", False)])
def test_encoder_memory_flat_in_depth(memory, flat):
    """Depth 48 within 5 % of depth 12 (held and activation peak); the stored encoder fails."""
    x = torch.randn(2, 9, 16, requires_grad=True)
    (h12, p12), (h48, p48) = [held_and_peak(encoder(d, memory=memory), x) for d in (12, 48)]
    within = abs(h48 / h12 - 1) <= 0.05 and abs(p48 / p12 - 1) <= 0.05
    assert within is flat, (h12, h48, p12, p48)


@pytest.mark.parametrize("memory, flat", [("reversible", True), ("stored", False)])
def test_rev_vit_memory_flat_in_depth(memory, flat):
    x = torch.randn(2, 1, 8, 8)
    sizes = []
    for depth in (12, 48):
        torch.manual_seed(0)
        sizes.append(held_and_peak(models.create("rev_vit_digits", embed_dim=16, depth=depth,
                                                 memory=memory), x))
    (h12, p12), (h48, p48) = sizes
    within = abs(h48 / h12 - 1) <= 0.05 and abs(p48 / p12 - 1) <= 0.05
    assert within is flat, sizes


def test_reversible_holds_the_encoder_output_only():
    model = encoder(6, fuse="concat")
    x = torch.randn(2, 9, 16)
    held, _ = held_and_peak(model, x)
    assert held == 2 * 9 * 32 * 4  # (B, N, 2D) float32


# --- inverse --------------------------------------------------------------------------------

def test_block_and_stack_invert():
    torch.manual_seed(0)
    block = ReversibleTransformerBlock(8, 2, **STOCHASTIC).double()
    x = torch.randn(3, 6, 16, dtype=torch.float64)
    assert_invertible(block, x)
    stack = encoder(4, dim=8).blocks.double().eval()
    mask = padding(3, 6)
    with torch.no_grad():
        y = stack(x, context=mask)
        torch.testing.assert_close(stack.inverse(y, context=mask), x, rtol=0, atol=1e-10)
    assert revtrain.is_invertible(stack, x)


# --- bad input ------------------------------------------------------------------------------

def test_bad_input_names_the_expected_shapes():
    block = ReversibleTransformerBlock(8, 2)
    with pytest.raises(ValueError, match=r"\(B, N, 16\); got \(2, 5, 8\)"):
        block(torch.randn(2, 5, 8))
    with pytest.raises(ValueError, match=r"\(B, N, 16\); got \(2, 16\)"):
        block(torch.randn(2, 16))
    with pytest.raises(ValueError, match="no tokens; it needs N >= 1"):
        block(torch.randn(2, 0, 16))
    with pytest.raises(ValueError, match=r"mask of shape \(2, 4\) does not fit .* \(B, N\) = "
                                         r"\(2, 5\); expected a bool padding mask \(B, N\) = \(2, 5\)"):
        block(torch.randn(2, 5, 16), torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"mask of shape \(2, 3, 5, 5\) .*\(B, heads, N, N\) = "
                                         r"\(2, 2, 5, 5\)"):
        block(torch.randn(2, 5, 16), torch.zeros(2, 3, 5, 5))
    with pytest.raises(ValueError, match="must be bool or float, got torch.int64"):
        block(torch.randn(2, 5, 16), torch.ones(2, 5, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="num_heads=3 must divide the stream width dim=8"):
        ReversibleTransformerBlock(8, 3)
    stack = encoder(2)
    with pytest.raises(ValueError, match=r"sequence of shape \(B, N, 16\); got \(2, 5, 32\)"):
        stack(torch.randn(2, 5, 32))
    with pytest.raises(ValueError, match="batch size must equal the input's"):
        stack(torch.randn(2, 5, 16), mask=torch.ones(3, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="fuse must be one of"):
        ReversibleTransformer(16, 2, 2, fuse="sum")


def test_rev_vit_bad_images():
    with pytest.raises(ValueError, match="img_size=30 must be a positive multiple of patch_size=4"):
        models.create("rev_vit_digits", img_size=30, patch_size=4)
    model = models.create("rev_vit_digits", embed_dim=16, depth=1)
    with pytest.raises(ValueError, match=r"expects input of shape \(B, 1, H, W\)"):
        model(torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match=r"multiples of 2.*got \(2, 1, 9, 8\)"):
        model(torch.randn(2, 1, 9, 8))
    with pytest.raises(ValueError, match=r"expects images of shape \(B, 1, 8, 8\).*got "
                                         r"\(2, 1, 16, 16\). Build it with img_size=16"):
        model(torch.randn(2, 1, 16, 16))
    with pytest.raises(ValueError, match="pool must be one of"):
        models.create("rev_vit_digits", pool="max")
    with pytest.raises(ValueError, match="patch_kernel=1 must be at least patch_size=2"):
        models.create("rev_vit_digits", patch_kernel=1)
    with pytest.raises(ValueError, match="pos_embed='sincos' needs embed_dim divisible by 4"):
        models.create("rev_vit_digits", pos_embed="sincos", embed_dim=18, num_heads=2)


def test_sincos_positions_and_overlapping_patches():
    from revtrain.models.vit import sincos_2d

    table = sincos_2d(4, 16)  # (16 tokens, 16 features)
    assert table.shape == (16, 16) and torch.allclose(table[0, 4:8], torch.ones(4))  # cos(0)
    assert len({tuple(r.tolist()) for r in table}) == 16  # every position differs
    model = models.create("rev_vit_digits", pos_embed="sincos", pool="cls", patch_kernel=3)
    assert "pos_embed" not in model.state_dict() and model.pos_embed.shape == (1, 17, 64)
    assert torch.equal(model.pos_embed[0, 0], torch.zeros(64))  # the class token's
    assert model.tokens(torch.randn(2, 1, 8, 8)).shape == (2, 17, 64)


def test_entry_points_take_the_vit_arguments():
    with torch.device("meta"):
        model = models.create("rev_vit_small", img_size=32, patch_size=4, num_classes=10,
                              in_channels=1, drop_path=0.1)
    assert model.pos_embed.shape == (1, 64, 384) and model.head.out_features == 10
    assert model.patch_embed.in_channels == 1 and len(model.blocks) == 12
    assert model.blocks[-1].f.drop_path == pytest.approx(0.1) and model.blocks[0].f.drop_path == 0
    with torch.device("meta"):
        large = models.create("rev_vit_large")
    assert (large.embed_dim, len(large.blocks), large.blocks[0].num_heads) == (1024, 24, 16)
