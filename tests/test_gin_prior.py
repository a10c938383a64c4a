"""GIN's class-conditional Gaussian prior (issue 15): ``ClassConditionalGaussian``, ``cond_gin``.

Float64 against hand-written Gaussians and torch.distributions, log-det against autograd's
Jacobian, gradients of the reversible and checkpoint models equal to the stored twin, sampling
per class near that class's mean (and a wrong class's mean failing the same bound), clear
errors for bad labels, and a toy fit in which training moves the means onto the classes.
"""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch

from revtrain import models
from revtrain.flows import ClassConditionalGaussian
from revtrain.testing import assert_matches_stored_twin

pytestmark = pytest.mark.usefixtures("one_thread")

D = torch.float64


def known_prior(num_classes=3, dim=4) -> ClassConditionalGaussian:
    prior = ClassConditionalGaussian(num_classes, dim).double()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        prior.means.copy_(3 * torch.randn(num_classes, dim, generator=gen, dtype=D))
        prior.log_stds.copy_(0.5 * torch.randn(num_classes, dim, generator=gen, dtype=D))
    return prior


def hand_gaussian(z, mu, log_sigma):
    """log N(z; mu, diag exp(2 log_sigma)), one entry at a time."""
    out = torch.zeros(z.shape[0], dtype=D)
    for i in range(z.shape[1]):
        s = math.e ** log_sigma[:, i]
        out += -0.5 * ((z[:, i] - mu[:, i]) / s) ** 2 - torch.log(s) - 0.5 * math.log(2 * math.pi)
    return out


def perturbed(name="cond_gin", scale=0.1, **kwargs):
    torch.manual_seed(0)
    model = models.create(name, **kwargs).double()
    for p in model.parameters():  # leave the identity start: zero last layers would hide mistakes
        p.data.add_(scale * torch.randn_like(p))
    return model


# ---------------------------------------------------------------------------- the distribution


def test_log_prob_is_the_hand_written_gaussian_and_the_mixture():
    prior = known_prior()
    z = torch.randn(6, 4, dtype=D)
    y = torch.tensor([0, 1, 2, 2, 1, 0])
    want = hand_gaussian(z, prior.means[y].detach(), prior.log_stds[y].detach())
    torch.testing.assert_close(prior.log_prob(z, context=y), want, rtol=1e-12, atol=1e-12)
    normal = torch.distributions.Normal(prior.means[y], prior.log_stds[y].exp())
    torch.testing.assert_close(prior.log_prob(z, context=y), normal.log_prob(z).sum(1),
                               rtol=1e-12, atol=1e-12)
    # the mixture with uniform weights: log (1/K) sum_y p(z | y), summed by hand
    per_class = torch.stack([hand_gaussian(z, prior.means[k].detach().expand(6, 4),
                                           prior.log_stds[k].detach().expand(6, 4))
                             for k in range(3)], dim=1)  # (6, 3)
    mixture = torch.log(per_class.exp().sum(1) / 3)
    torch.testing.assert_close(prior.log_prob(z), mixture, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(prior.marginal_log_prob(z), mixture, rtol=1e-12, atol=1e-12)
    posterior = per_class.exp() / per_class.exp().sum(1, keepdim=True)
    torch.testing.assert_close(prior.class_log_posterior(z).exp(), posterior, rtol=1e-10,
                               atol=1e-12)


def test_learned_class_weights_enter_the_mixture():
    prior = known_prior()
    prior.weight_logits = torch.nn.Parameter(torch.tensor([0.0, 1.0, -2.0], dtype=D))
    z = torch.randn(5, 4, dtype=D)
    log_w = torch.log_softmax(prior.weight_logits.detach(), 0)
    joint = torch.stack([prior.log_prob(z, context=torch.full((5,), k)) for k in range(3)], 1)
    torch.testing.assert_close(prior.log_prob(z), torch.logsumexp(joint + log_w, 1), rtol=1e-12,
                               atol=1e-12)


def test_standardize_is_inverted_and_its_log_det_is_the_jacobians():
    prior = known_prior()
    z = torch.randn(3, 4, dtype=D)
    y = torch.tensor([2, 0, 1])
    eps, log_det = prior.standardize(z, y)
    torch.testing.assert_close(prior.unstandardize(eps, y), z, rtol=0, atol=1e-12)
    for b in range(3):
        jac = torch.autograd.functional.jacobian(
            lambda v, b=b: prior.standardize(v.unsqueeze(0), y[b:b + 1])[0][0], z[b])
        torch.testing.assert_close(log_det[b], torch.linalg.slogdet(jac)[1], rtol=1e-12,
                                   atol=1e-12)


def test_samples_of_each_class_land_on_its_mean_and_not_on_another():
    torch.manual_seed(0)
    prior = known_prior()
    n = 4000
    for k in range(3):
        z = prior.sample(n, context=k)
        mu, sigma = prior.means[k].detach(), prior.log_stds[k].detach().exp()
        bound = 5 * sigma / math.sqrt(n)  # 5 standard errors of the mean, per entry
        assert ((z.mean(0) - mu).abs() < bound).all(), (k, z.mean(0), mu)
        torch.testing.assert_close(z.std(0), sigma, rtol=0.08, atol=0)
        # the same bound fails for another class's samples: it can tell classes apart
        other = prior.sample(n, context=(k + 1) % 3)
        assert not ((other.mean(0) - mu).abs() < bound).all()
    t0 = prior.sample(2, context=torch.tensor([1, 2]), temperature=0.0)
    torch.testing.assert_close(t0, prior.means[[1, 2]].detach(), rtol=0, atol=0)


def test_unlabelled_samples_follow_the_class_weights():
    torch.manual_seed(0)
    prior = ClassConditionalGaussian(3, 2).double()
    with torch.no_grad():
        prior.means.copy_(torch.tensor([[-50.0, 0], [0, 50], [50, 0]], dtype=D))
        prior.weight_logits.copy_(torch.log(torch.tensor([0.2, 0.3, 0.5], dtype=D)))
    z = prior.sample((6000, 2))  # how an unconditional flow calls its prior
    freq = torch.bincount(prior.class_log_posterior(z).argmax(1), minlength=3).double() / 6000
    torch.testing.assert_close(freq, torch.tensor([0.2, 0.3, 0.5], dtype=D), rtol=0, atol=0.025)


@pytest.mark.parametrize("labels,error,match", [
    (None, None, None),  # no label: the mixture, not an error
    ([0, 1, 2], TypeError, "must be a tensor of class labels of shape \\(B,\\)"),
    (torch.tensor([0.0, 1.0, 2.0]), ValueError, "expects class labels of shape \\(B,\\) with values"
     " in 0..2, got a torch.float32 tensor of shape \\(3,\\)"),
    (torch.tensor([[0], [1], [2]]), ValueError, "got a torch.int64 tensor of shape \\(3, 1\\)"),
    (torch.tensor([True, False, True]), ValueError, "got a torch.bool tensor"),
    (torch.tensor([0, 3, 1]), ValueError, "labels must lie in 0..2, got values in 0..3"),
    (torch.tensor([-1, 0, 1]), ValueError, "labels must lie in 0..2, got values in -1..1"),
    (torch.tensor([0, 1]), ValueError, "2 labels for a batch of 3; give one label per sample"),
])
def test_bad_labels_give_a_clear_error(labels, error, match):
    prior = known_prior()
    z = torch.randn(3, 4, dtype=D)
    if error is None:
        assert prior.log_prob(z, context=labels).shape == (3,)
        return
    with pytest.raises(error, match=f"ClassConditionalGaussian.log_prob: .*{match}"):
        prior.log_prob(z, context=labels)


def test_bad_latents_and_sample_shapes_give_a_clear_error():
    prior = known_prior()
    with pytest.raises(ValueError, match=r"expects latents \(B, 4\) .* got shape \(3, 5\)"):
        prior.log_prob(torch.randn(3, 5, dtype=D), context=torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="3 labels for a batch of 2"):
        prior.sample(2, context=torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"shape \(2, 3\) does not hold latents of 4 entries"):
        prior.sample((2, 3))
    with pytest.raises(ValueError, match="needs num_classes >= 1 and dim >= 1"):
        ClassConditionalGaussian(0, 2)


# ---------------------------------------------------------------------------- the model


def test_registered_with_a_digits_variant():
    assert {"cond_gin", "cond_gin_digits"} <= set(models.list_models(task="conditional density"))
    digits = models.create("cond_gin_digits", num_layers=2)
    assert digits.num_dims == 64 and digits.mixture.num_classes == 10
    x = torch.rand(3, 1, 8, 8)  # images are flattened
    assert digits.log_prob(x, context=torch.tensor([0, 5, 9])).shape == (3,)


def test_model_log_prob_is_the_gaussian_of_the_volume_preserving_latent():
    model = perturbed(num_classes=3, dim=4, num_layers=4, hidden=8)
    x = torch.randn(5, 4, dtype=D)
    y = torch.tensor([0, 2, 1, 1, 0])
    z, log_det = model.embed(x)
    assert (log_det == 0).all()  # GIN: volume preserving
    for b in range(2):  # ... and so is the Jacobian of the bijection
        jac = torch.autograd.functional.jacobian(lambda v: model.embed(v.unsqueeze(0))[0][0], x[b])
        assert abs(float(torch.linalg.slogdet(jac)[1])) < 1e-10
    mu, log_sigma = model.mixture.means[y].detach(), model.mixture.log_stds[y].detach()
    want = hand_gaussian(z.detach(), mu, log_sigma)
    torch.testing.assert_close(model.log_prob(x, context=y), want, rtol=1e-12, atol=1e-12)
    # the ConditionalFlow contract: standard normal of the standardised latent + its log-det
    eps, ld = model.forward_and_log_det(x, y)
    normal = -0.5 * (eps.square().sum(1) + 4 * math.log(2 * math.pi))
    torch.testing.assert_close(normal + ld, want, rtol=1e-12, atol=1e-12)
    jac = torch.autograd.functional.jacobian(
        lambda v: model.forward_and_log_det(v.unsqueeze(0), y[:1])[0][0], x[0])
    torch.testing.assert_close(ld[0], torch.linalg.slogdet(jac)[1], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(model.inverse(eps, y), x, rtol=0, atol=1e-10)
    joint = torch.stack([model.log_prob(x, context=torch.full((5,), k)) for k in range(3)], 1)
    torch.testing.assert_close(model.marginal_log_prob(x), torch.logsumexp(joint, 1) - math.log(3),
                               rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(model.class_log_posterior(x),
                               torch.log_softmax(joint, 1), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("memory", ["reversible", "checkpoint"])
@pytest.mark.parametrize("call", ["log_prob", "marginal_log_prob"])
def test_gradients_equal_the_stored_twin(memory, call):
    model = perturbed(num_classes=3, dim=4, num_layers=6, hidden=8, memory=memory)
    assert model.memory.value == memory
    x = torch.randn(7, 4, dtype=D)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0])
    run = ((lambda m, v: m.log_prob(v, context=y)) if call == "log_prob" else
           (lambda m, v: m.marginal_log_prob(v)))
    assert_matches_stored_twin(model, x, call=run)
    model.zero_grad(set_to_none=True)
    run(model, x).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum()]
    assert not missing, f"no gradient reaches {missing}"


def test_model_samples_of_each_class_land_on_its_mean():
    model = perturbed(num_classes=3, dim=2, num_layers=4, hidden=8)
    with torch.no_grad():
        model.mixture.means.copy_(torch.tensor([[-4.0, 0.0], [0.0, 4.0], [4.0, 0.0]], dtype=D))
        model.mixture.log_stds.fill_(math.log(0.3))
    torch.manual_seed(1)
    n = 2000
    for k in range(3):
        x = model.sample(n, context=k)
        z = model.embed(x)[0]  # the samples are the inverse of draws from class k's Gaussian
        mu = model.mixture.means[k].detach()
        assert ((z.mean(0) - mu).abs() < 5 * 0.3 / math.sqrt(n)).all(), (k, z.mean(0))
        assert (model.class_log_posterior(x).argmax(1) == k).float().mean() > 0.99
        centre = model.flow.inverse(mu.unsqueeze(0))
        assert ((x - centre).norm(dim=1) < 1.5).float().mean() > 0.95
    cold = model.sample(2, context=torch.tensor([2, 0]), temperature=0.0)
    torch.testing.assert_close(model.embed(cold)[0], model.mixture.means[[2, 0]].detach(),
                               rtol=0, atol=1e-10)


def test_model_bad_labels_give_a_clear_error():
    model = models.create("cond_gin", num_classes=4, num_layers=2, hidden=8)
    x = torch.randn(3, 2)
    cases = [
        (None, ValueError, r"MixturePriorFlow.log_prob: this model is conditional; pass context= "
         r"with class labels of shape \(B,\) with values in 0..3, one per sample \(here B = 3\)"),
        (torch.tensor([0, 1]), ValueError, "the condition has batch size 2 but the input 3"),
        (torch.tensor([[0, 1, 2]]), ValueError, r"got a torch.int64 tensor of shape \(1, 3\)"),
        (torch.rand(3), ValueError, "got a torch.float32 tensor"),
        (torch.tensor([0, 4, 1]), ValueError, "labels must lie in 0..3, got values in 0..4"),
        ((0, 1, 2), TypeError, "must be a tensor of class labels"),
    ]
    for labels, error, match in cases:
        with pytest.raises(error, match=match):
            model.log_prob(x, context=labels)
    with pytest.raises(ValueError, match="MixturePriorFlow.sample: this model is conditional"):
        model.sample(2)
    with pytest.raises(ValueError, match=r"expects vectors \(B, 2\)"):
        model.log_prob(torch.randn(3, 3), context=torch.tensor([0, 1, 2]))


def test_state_dict_round_trip_and_memory_switch():
    model = perturbed(num_classes=3, dim=4, num_layers=2, hidden=8)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    other = models.create("cond_gin", num_classes=3, dim=4, num_layers=2, hidden=8,
                          memory="stored").double()
    other.load_state_dict(torch.load(io.BytesIO(buf.getvalue())))
    x, y = torch.randn(4, 4, dtype=D), torch.tensor([0, 1, 2, 0])
    torch.testing.assert_close(other.log_prob(x, context=y), model.log_prob(x, context=y))
    assert "ClassConditionalGaussian(num_classes=3, dim=4)" in repr(model)
    twin = copy.deepcopy(model).set_memory("stored")
    assert twin.memory.value == "stored" and model.memory.value == "reversible"


def test_an_unconditional_flow_takes_it_as_a_mixture_prior():
    """``gin`` (models/flows.py) with the mixture as its prior: log p(x) is the mixture's."""
    torch.manual_seed(0)
    flow = models.create("gin", dim=2, num_layers=2, hidden=8)
    flow.prior = ClassConditionalGaussian(4, 2)
    x = torch.randn(5, 2)
    z, _ = flow.forward_and_log_det(x)
    torch.testing.assert_close(flow.log_prob(x), flow.prior.marginal_log_prob(z))
    assert flow.sample(6).shape == (6, 2)


# ---------------------------------------------------------------------------- toy training


def labelled_mixture(n, gen, centres, std=0.3):
    y = torch.randint(0, len(centres), (n,), generator=gen)
    return centres[y] + std * torch.randn(n, 2, generator=gen), y


@pytest.mark.parametrize("memory", ["reversible", "stored"])
def test_training_moves_the_means_onto_the_classes(memory):
    """2-D data from a labelled 4-component mixture: after 300 Adam steps each class mean sits
    on that class's latents, its standard deviations match theirs, the NLL reaches the entropy,
    and classification by the prior (poor at the random initial means) is near perfect."""
    centres = torch.tensor([[-2.0, -2.0], [-2.0, 2.0], [2.0, -2.0], [2.0, 2.0]])
    torch.manual_seed(0)
    model = models.create("cond_gin", num_classes=4, num_layers=2, hidden=16, memory=memory)
    gen = torch.Generator().manual_seed(1)
    test_x, test_y = labelled_mixture(2000, torch.Generator().manual_seed(2), centres)

    def accuracy():
        with torch.no_grad():
            return float((model.class_log_posterior(test_x).argmax(1) == test_y).float().mean())

    def nll():
        with torch.no_grad():
            return -float(model.log_prob(test_x, context=test_y).mean())

    before, nll_before = accuracy(), nll()
    start_means = model.mixture.means.detach().clone()
    opt = torch.optim.Adam(model.parameters(), lr=5e-2)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 300)
    for _ in range(300):
        x, y = labelled_mixture(256, gen, centres)
        loss = -model.log_prob(x, context=y).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    with torch.no_grad():
        z = model.embed(test_x)[0]
        mu = model.mixture.means
        sigma = model.mixture.log_stds.exp()
        for k in range(4):
            zk = z[test_y == k]
            # the mean moved onto class k's latents: within a fifth of that class's spread
            assert ((zk.mean(0) - mu[k]).abs() < 0.2 * zk.std(0)).all(), (k, zk.mean(0), mu[k])
            torch.testing.assert_close(sigma[k], zk.std(0), rtol=0.15, atol=0)
            # the same bound fails for the initial (random) means
            assert not ((zk.mean(0) - start_means[k]).abs() < 0.2 * zk.std(0)).all()
    entropy = math.log(2 * math.pi * math.e * 0.3 ** 2)  # of one class's Gaussian in 2-D
    assert nll() < entropy + 0.1 < nll_before, (nll(), entropy, nll_before)
    assert accuracy() > 0.99 > 0.6 > before
