"""Contract tests of the classifier zoo: RevNet / ResNet (Gomez et al.) and i-RevNet.

Every registered classifier is covered: output shape, fp64 gradients equal to the stored
twin, state_dict round trip, repr, parameter count against the papers' tables,
reconstruction for the invertible ones, clear errors for bad input. The ImageNet-size models
are built on the ``meta`` device (no memory, no initialisation) for the count and a shape pass.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch

import revtrain
from revtrain import models
from revtrain.models.irevnet import IRevNet, IRevNetBlock
from revtrain.models.revnet import ResNet, RevNet

# tiny models at test size: one intra-op thread (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("one_thread")

# what the tests need to know about each classifier comes from the registry's metadata
INFOS = {n: models.model_info(n) for n in models.list_models(task="classification")}
BIG = [n for n, i in INFOS.items() if i.input_size[-1] > 64]  # ImageNet size: meta device
SMALL = [n for n in INFOS if n not in BIG]
REVERSIBLE_SMALL = [n for n in SMALL if INFOS[n].reversible]
INVERTIBLE = [n for n in INFOS if INFOS[n].family == "irevnet"]  # model.inverse(features)
PARAM_TOLERANCE = 0.02
TEST_SIZE = 8  # input height = width of the small models in the tests (a multiple of their
# total downsampling; the registered input size is what they were made for)


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def within(count: int, paper: float, tol: float = PARAM_TOLERANCE) -> bool:
    return abs(count / paper - 1) <= tol


def example(name: str, model, batch: int = 2, dtype=torch.float64, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    s = TEST_SIZE
    return torch.randn(batch, model.in_channels, s, s, generator=gen, dtype=dtype)


def grads_of(model, x, seed: int = 0):
    """Loss, input gradient and parameter gradients of one step (RNG seeded for dropout)."""
    x = x.clone().requires_grad_(True)
    torch.manual_seed(seed)
    out = model(x)
    weights = torch.linspace(-1, 1, out.shape[1], dtype=out.dtype, device=out.device)
    loss = (out * weights).square().sum()
    loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return loss.detach(), x.grad, grads


def assert_grads_equal(a, b, rtol=1e-8):
    (la, xa, ga), (lb, xb, gb) = a, b
    torch.testing.assert_close(la, lb, rtol=rtol, atol=0)
    scale = xb.abs().max()
    torch.testing.assert_close(xa, xb, rtol=rtol, atol=rtol * scale)
    assert ga.keys() == gb.keys()
    for k in ga:
        scale = gb[k].abs().max().clamp_min(1e-30)
        torch.testing.assert_close(ga[k], gb[k], rtol=rtol, atol=rtol * scale, msg=k)


# --- registry ------------------------------------------------------------------------------

def test_registry_metadata_of_every_classifier():
    assert {"revnet38", "resnet32", "irevnet", "revnet_digits"} <= set(INFOS)
    for name, info in INFOS.items():
        assert info.name == name and info.family in ("revnet", "irevnet", "vit"), name
        assert len(info.input_size) == 3 and info.description, name
        assert info.reversible == (not name.startswith("resnet")), name
    assert models.model_info("revnet38").paper_params == 0.46e6
    assert models.list_models(family="irevnet") == ["irevnet", "irevnet_a", "irevnet_b",
                                                     "irevnet_digits"]
    assert set(models.list_models(task="density")) >= {"nice", "realnvp", "glow"}


def test_entry_points_pass_keywords_through():
    model = models.create("revnet38", strides=[1, 2, 1], dropout=0.1, num_classes=3)
    assert model.input_multiple == 2  # one stride-2 stage instead of two
    assert model(torch.randn(1, 3, 6, 6)).shape == (1, 3)
    # a keyword the caller gives wins over the table row's value
    assert len(models.create("revnet38", units=[1, 1, 1]).stages[0].blocks) == 1
    assert models.create("irevnet_digits", blocks=[1, 1]).stack.__len__() == 2


def test_registry_errors_say_what_to_use():
    with pytest.raises(ValueError, match="unknown model 'revnet39'; did you mean 'revnet38'"):
        models.create("revnet39")
    with pytest.raises(TypeError, match="no argument 'num_clases' .did you mean 'num_classes'"):
        models.create("revnet38", num_clases=3)


def test_a_variant_entry_point_takes_its_base_models_arguments():
    # cond_realnvp_digits(**kwargs) fills in some of cond_realnvp's arguments (variant_of)
    assert "hidden" in models._registry.accepted_arguments("cond_realnvp_digits")
    assert len(models.create("cond_realnvp_digits", hidden=4, levels=1).levels) == 1
    with pytest.raises(TypeError, match="no argument 'hiden' .did you mean 'hidden'"):
        models.create("cond_realnvp_digits", hiden=4)


def test_register_model_as_plain_decorator_and_with_metadata():
    from revtrain.models import _registry

    try:
        @models.register_model
        def tiny_plain(**kwargs) -> torch.nn.Module:
            """A plain registration."""
            return torch.nn.Linear(2, 2)

        @models.register_model(input_size=(2,), paper_params=6, reversible=False)
        def tiny_meta(**kwargs) -> torch.nn.Module:
            """With metadata."""
            return torch.nn.Linear(2, 2)

        plain, meta = models.model_info("tiny_plain"), models.model_info("tiny_meta")
        assert plain.family == "test_models" and plain.input_size is None
        assert plain.description == "A plain registration."
        assert meta.input_size == (2,) and meta.paper_params == 6 and not meta.reversible
        assert isinstance(models.create("tiny_plain"), torch.nn.Linear)
        with pytest.raises(ValueError, match="registered twice"):
            models.register_model(tiny_plain)
        with pytest.raises(TypeError, match="unknown metadata"):
            models.register_model(input_shape=(2,))
    finally:
        _registry._MODELS.pop("tiny_plain", None)
        _registry._MODELS.pop("tiny_meta", None)


def test_one_memory_mode_api_for_every_family():
    """``memory=`` at construction, ``model.memory`` to read and set, for classifiers and flows;
    one error for a model with nothing reversible."""
    for name, kwargs in [("revnet_digits", {}), ("irevnet_digits", {}),
                         ("nice", {"dim": 4, "hidden": 4, "depth": 1}),
                         ("realnvp", {"in_channels": 1, "image_size": 4, "levels": 1,
                                      "hidden": 4})]:
        model = models.create(name, memory="checkpoint", **kwargs)
        stacks = [m for m in model.modules() if isinstance(m, revtrain.ReversibleSequential)]
        assert stacks and {s.memory for s in stacks} == {revtrain.MemoryMode.CHECKPOINT}, name
        assert model.memory is revtrain.MemoryMode.CHECKPOINT
        model.memory = "stored"
        assert {s.memory for s in stacks} == {revtrain.MemoryMode.STORED}, name
        assert model.set_memory("reversible") is model
        assert model.memory is revtrain.MemoryMode.REVERSIBLE
    resnet = models.create("resnet32")
    assert resnet.memory is revtrain.MemoryMode.STORED
    resnet.memory = "stored"  # accepted: it is what runs
    for bad in (lambda: models.create("resnet32", memory="reversible"),
                lambda: setattr(resnet, "memory", "checkpoint"),
                lambda: resnet.set_memory("reversible")):
        with pytest.raises(ValueError, match="ResNet has no reversible stack.*revnet38"):
            bad()


def test_unknown_memory_mode_is_rejected():
    with pytest.raises(ValueError, match="not a memory mode"):
        models.create("revnet38", memory="bogus")


def test_mixed_memory_modes_are_reported():
    model = models.create("revnet_digits")
    stacks = [m for m in model.modules() if isinstance(m, revtrain.ReversibleSequential)]
    assert len(stacks) == 2
    stacks[0].memory = revtrain.MemoryMode.STORED  # mixed by hand: reported, not guessed
    with pytest.raises(RuntimeError, match="mixed memory modes"):
        _ = model.memory


# --- contract over the small models -------------------------------------------------------

@pytest.mark.parametrize("name", SMALL)
def test_contract(name):
    torch.manual_seed(0)
    model = models.create(name, num_classes=7)
    x = example(name, model, dtype=torch.float32)
    # output shape
    assert model(x).shape == (2, 7)
    # repr names the building blocks and the memory mode
    text = repr(model)
    assert type(model).__name__ in text
    if name in REVERSIBLE_SMALL:
        assert "memory=reversible" in text and "ReversibleSequential" in text
    # state_dict round trip into a freshly built model, stored twin included
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    fresh = models.create(name, num_classes=7, memory="stored")
    assert fresh.state_dict().keys() == model.state_dict().keys()
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    model.eval()
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x), rtol=1e-5, atol=1e-6)
    assert fresh.memory is revtrain.MemoryMode.STORED


@pytest.mark.parametrize("memory", ["reversible", "checkpoint"])
@pytest.mark.parametrize("name", REVERSIBLE_SMALL)
def test_gradients_equal_stored_twin_fp64(name, memory, device):
    """On ``pytest --device cuda`` too (tests/conftest.py)."""
    torch.manual_seed(0)
    model = models.create(name, memory=memory).double().to(device)
    twin = copy.deepcopy(model).set_memory("stored")
    assert model.memory is revtrain.MemoryMode(memory)
    assert twin.memory is revtrain.MemoryMode.STORED
    x = example(name, model).to(device)
    assert_grads_equal(grads_of(model, x), grads_of(twin, x))
    # BatchNorm running statistics updated exactly once, as in the twin
    for (k, a), b in zip(model.named_buffers(), twin.buffers()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=k)


@pytest.mark.parametrize("name", ["revnet_digits", "irevnet_digits"])
@pytest.mark.parametrize("memory", ["reversible", "checkpoint"])
def test_dropout_gradients_equal_stored_twin(name, memory):
    torch.manual_seed(0)
    model = models.create(name, dropout=0.3, memory=memory).double()
    twin = copy.deepcopy(model).set_memory("stored")
    x = example(name, model)
    assert_grads_equal(grads_of(model, x, seed=5), grads_of(twin, x, seed=5))
    # a different dropout mask in the twin gives different gradients: the check can fail
    with pytest.raises(AssertionError):
        assert_grads_equal(grads_of(model, x, seed=5), grads_of(twin, x, seed=6))


def test_every_parameter_gets_a_gradient():
    for name in ["revnet_digits", "irevnet_digits"]:
        model = models.create(name).double()
        _, _, grads = grads_of(model, example(name, model))
        assert all(g.abs().sum() > 0 for g in grads.values()), name


# --- parameter counts ----------------------------------------------------------------------

@pytest.mark.parametrize("name", list(INFOS))
def test_parameter_count_matches_the_paper(name):
    with torch.device("meta"):
        model = models.create(name)
    count = n_params(model)
    paper = INFOS[name].paper_params
    if paper is None:
        assert count > 0
        return
    assert within(count, paper), f"{name}: {count:,} parameters, paper {paper:,.0f}"


def test_parameter_check_rejects_a_wrong_architecture():
    # RevNet-38 with RevNet-110's last stage width (128 instead of 112): 25% too many
    with torch.device("meta"):
        wrong = RevNet([3, 3, 3], [32, 32, 64, 128])
    assert not within(n_params(wrong), INFOS["revnet38"].paper_params)


def irevnet_param_formula(blocks, strides, channels, in_channels, init_ds, mult, classes):
    """Parameters of an i-RevNet counted by hand from the architecture description."""
    k = max(init_ds, 1)
    c = max(in_channels * k * k, 2 * channels[0]) if strides[0] == 1 else in_channels * k * k
    total, first = 0, True
    for n, stride, half in zip(blocks, strides, channels):
        for j in range(n):
            s = stride if j == 0 else 1
            c_in, width = c // 2, half // mult
            total += 0 if first else 2 * c_in  # BN-ReLU before the first conv
            total += 9 * c_in * width + 2 * width + 9 * width * width + 2 * width
            total += 9 * width * half
            c, first = 2 * half, False
            assert s in (1, 2)
    return total + 2 * c + c * classes + classes


@pytest.mark.parametrize("name, args", [
    ("irevnet", ([18, 18, 18], [1, 2, 2], [16, 64, 256], 3, 0, 4, 10)),
    ("irevnet_b", ([6, 16, 72, 6], [2, 2, 2, 2], [24, 96, 384, 1536], 3, 2, 4, 1000)),
    ("irevnet_a", ([6, 16, 72, 6], [1, 2, 2, 2], [28, 112, 448, 1792], 3, 4, 4, 1000)),
    ("irevnet_digits", ([2, 2], [1, 2], [8, 32], 1, 0, 2, 10)),
])
def test_irevnet_parameter_count_matches_its_description(name, args):
    with torch.device("meta"):
        model = models.create(name)
    assert n_params(model) == irevnet_param_formula(*args)


@pytest.mark.parametrize("name", BIG)
def test_big_models_output_shape_on_meta(name):
    with torch.device("meta"):
        model = models.create(name, num_classes=5)
        for m in model.modules():
            if isinstance(m, revtrain.ReversibleSequential):
                m.check_finite = False  # meta tensors have no values
        x = torch.empty(1, 3, 224, 224)
        with torch.no_grad():
            assert model(x).shape == (1, 5)


# --- reconstruction ------------------------------------------------------------------------

def reconstruction_error(model, x) -> float:
    model.eval()
    with torch.no_grad():
        return (model.inverse(model.features(x)) - x).abs().max().item()


@pytest.mark.parametrize("name", [n for n in SMALL if n in INVERTIBLE])
def test_irevnet_inverse_rebuilds_the_input(name):
    torch.manual_seed(0)
    model = models.create(name)
    x = example(name, model, dtype=torch.float32, batch=3)
    assert reconstruction_error(model, x) < 1e-4
    # broken case: a weight changed between forward and inverse must show up
    features = model.features(x)
    with torch.no_grad():
        model.stack[len(model.stack) // 2].f[-1].weight.add_(0.1)
        assert (model.inverse(features) - x).abs().max().item() > 1e-4


@pytest.mark.slow
def test_irevnet_b_inverse_rebuilds_the_input():
    torch.manual_seed(0)
    model = models.create("irevnet_b")
    assert model.bijective
    x = torch.randn(1, 3, 32, 32)
    assert reconstruction_error(model, x) < 1e-4


def test_irevnet_block_is_invertible_with_downsampling():
    block = IRevNetBlock(8, stride=2).double()
    x = torch.randn(2, 8, 6, 6, dtype=torch.float64)
    assert block(x).shape == (2, 32, 3, 3)
    assert revtrain.is_invertible(block, x)


def test_revnet_stacks_are_invertible():
    model = models.create("revnet_digits").double()
    x = torch.randn(2, 16, 8, 8, dtype=torch.float64)
    assert revtrain.is_invertible(model.stages[0].blocks, x)


# --- activation memory: flat in depth ------------------------------------------------------

def held_bytes(model, x) -> int:
    from revtrain.memory import measure_step

    return measure_step(model, x)["held_bytes"]


@pytest.mark.parametrize("memory, flat", [("reversible", True), ("stored", False)])
def test_irevnet_memory_flat_in_depth_across_downsampling(memory, flat):
    x = torch.randn(4, 1, 8, 8)
    held = [held_bytes(IRevNet([n, n], [1, 2], [8, 32], in_channels=1, mult=2,
                               memory=memory), x) for n in (1, 4)]
    # stored: every block keeps its activations, so 4x the blocks holds far more
    assert (held[1] == held[0]) if flat else (held[1] > 1.5 * held[0])


@pytest.mark.parametrize("memory, flat", [("reversible", True), ("stored", False)])
def test_revnet_memory_flat_in_units_per_stage(memory, flat):
    x = torch.randn(4, 1, 8, 8)
    held = [held_bytes(RevNet([n, n], [8, 8, 16], in_channels=1, memory=memory), x)
            for n in (2, 6)]
    assert (held[1] == held[0]) if flat else (held[1] > 1.5 * held[0])


# --- bad input -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", SMALL)
def test_bad_input_names_the_expected_shape(name):
    model = models.create(name)
    c, m = model.in_channels, model.input_multiple
    s = TEST_SIZE
    with pytest.raises(ValueError, match=rf"expects input of shape \(B, {c}, H, W\)"):
        model(torch.randn(2, c + 1, s, s))
    with pytest.raises(ValueError, match=rf"multiples of {m}.*got \(2, {c}, {s + 1}, {s}\)"):
        model(torch.randn(2, c, s + 1, s))


def test_irevnet_inverse_rejects_wrong_features():
    model = models.create("irevnet_digits")
    with pytest.raises(ValueError, match=r"features of shape \(B, 64, h, w\)"):
        model.inverse(torch.randn(2, 63, 4, 4))


def test_inconsistent_architectures_are_rejected():
    with pytest.raises(ValueError, match=r"stage 1 .*channels\[1\]=30"):
        IRevNet([1, 1], [1, 2], [8, 30], in_channels=1)
    with pytest.raises(ValueError, match="stage 0 .*receives 3 channels"):
        IRevNet([1], [2], [6], in_channels=3)
    with pytest.raises(ValueError, match="must be even"):
        IRevNetBlock(5)
    with pytest.raises(ValueError, match="channels must list the stem width"):
        RevNet([3, 3], [16, 32])
    with pytest.raises(ValueError, match="must be even"):
        RevNet([1, 1], [16, 16, 33])
    with pytest.raises(ValueError, match="strides"):
        ResNet([1, 1], [8, 8, 16], strides=[1, 3])


# --- the digits model learns -----------------------------------------------------------------

@pytest.mark.slow
def test_revnet_digits_reaches_97_percent():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, random_state=0,
                                                        stratify=y)
    torch.manual_seed(0)
    model = models.create("revnet_digits")
    epochs, batch = 16, 64
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=5e-3, total_steps=epochs * -(-len(x_train) // batch))
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(x_train))
        for i in range(0, len(perm), batch):
            idx = perm[i:i + batch]
            loss = torch.nn.functional.cross_entropy(model(x_train[idx]), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            schedule.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    print(f"revnet_digits test accuracy: {accuracy:.4f} on {len(y_test)} images")
    assert accuracy >= 0.97
