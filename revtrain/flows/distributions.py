r"""Base distributions of a flow: :math:`\log p(z)` per sample and sampling at a temperature.

A flow maps data :math:`x` to a latent :math:`z = T(x)` with a fixed base density
:math:`p_Z`; the change of variables gives

.. math::
    \log p_X(x) = \log p_Z(T(x)) + \log \left|\det \frac{\partial T(x)}{\partial x}\right|.

:class:`ClassConditionalGaussian` is GIN's class-conditional prior :math:`p(z \mid y)` (Sorrenson
et al. 2020); without a label it is the Gaussian mixture :math:`\sum_y p(y)\, p(z \mid y)`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["StandardNormal", "StandardLogistic", "ClassConditionalGaussian", "make_prior",
           "check_labels", "expand_labels"]


class StandardNormal(nn.Module):
    r"""Standard normal :math:`\log p(z) = -\tfrac12 \sum_i z_i^2 - \tfrac{D}{2} \log 2\pi`."""

    def log_prob(self, z: Tensor) -> Tensor:
        """Log density summed over every non-batch dimension; shape ``(batch,)``."""
        z = z.flatten(1)
        return -0.5 * (z.square().sum(1) + z.shape[1] * math.log(2 * math.pi))

    def sample(self, shape: tuple[int, ...], temperature: float = 1.0,
               device: torch.device | str | None = None,
               dtype: torch.dtype | None = None) -> Tensor:
        """Draw ``shape`` samples from :math:`\\mathcal N(0, T^2)` (``T = temperature``)."""
        return temperature * torch.randn(shape, device=device, dtype=dtype)


class StandardLogistic(nn.Module):
    r"""Standard logistic :math:`\log p(z) = -\sum_i \left(\mathrm{softplus}(z_i)
    + \mathrm{softplus}(-z_i)\right)` (the NICE prior)."""

    def log_prob(self, z: Tensor) -> Tensor:
        """Log density summed over every non-batch dimension; shape ``(batch,)``."""
        z = z.flatten(1)
        return -(F.softplus(z) + F.softplus(-z)).sum(1)

    def sample(self, shape: tuple[int, ...], temperature: float = 1.0,
               device: torch.device | str | None = None,
               dtype: torch.dtype | None = None) -> Tensor:
        """Draw ``shape`` samples of ``temperature`` times a standard logistic variable."""
        u = torch.rand(shape, device=device, dtype=dtype).clamp(1e-6, 1 - 1e-6)
        return temperature * (torch.log(u) - torch.log1p(-u))


def _describe_labels(num_classes: int) -> str:
    return f"class labels of shape (B,) with values in 0..{num_classes - 1}"


def check_labels(labels, num_classes: int, owner: str, batch: int | None = None) -> Tensor:
    """``labels`` if they are integer class labels ``(B,)`` in ``0..num_classes-1``.

    With ``batch``, ``B`` must also equal it (one label per sample).

    Raises:
        TypeError: not a tensor.
        ValueError: floating point, not one-dimensional, out of range, or another batch size;
            the message names ``owner``, the expected shape and what was given.
    """
    what = _describe_labels(num_classes)
    if not isinstance(labels, Tensor):
        raise TypeError(f"{owner}: the condition must be a tensor of {what}, got "
                        f"{type(labels).__name__}")
    if labels.dim() != 1 or labels.is_floating_point() or labels.is_complex() \
            or labels.dtype == torch.bool:
        raise ValueError(f"{owner}: expects {what}, got a {labels.dtype} tensor of shape "
                         f"{tuple(labels.shape)}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"{owner}: labels must lie in 0..{num_classes - 1}, got values in "
                         f"{int(labels.min())}..{int(labels.max())}")
    if batch is not None and labels.shape[0] != batch:
        raise ValueError(f"{owner}: {labels.shape[0]} labels for a batch of {batch}; give one "
                         f"label per sample ({what})")
    return labels


def expand_labels(labels, n: int, num_classes: int, owner: str,
                  device: torch.device | str | None = None) -> Tensor:
    """``n`` labels from one (an ``int`` or a one-element tensor) or from ``n`` of them."""
    if isinstance(labels, int) and not isinstance(labels, bool):
        labels = torch.full((n,), labels, dtype=torch.long, device=device)
    elif isinstance(labels, Tensor) and labels.numel() == 1 and n != 1:
        labels = labels.reshape(1).expand(n)
    return check_labels(labels, num_classes, owner, batch=n)


class ClassConditionalGaussian(nn.Module):
    r"""A diagonal Gaussian per class: :math:`p(z \mid y) = \mathcal N(z; \mu_y,
    \operatorname{diag} \sigma_y^2)`, learned :math:`\mu_y` and :math:`\log \sigma_y`.

    GIN's prior (Sorrenson et al. 2020, "Disentanglement by nonlinear ICA with general
    incompressible-flow networks"): GIN's flow preserves volume (log-det 0), so the prior's
    :math:`\sigma_y` carry all of the scale, and the spectrum of learned standard deviations
    says which latent dimensions are informative.

    .. math::
        \log p(z \mid y) = -\tfrac12 \sum_i \left(\frac{z_i - \mu_{y,i}}{\sigma_{y,i}}\right)^2
            - \sum_i \log \sigma_{y,i} - \tfrac D2 \log 2\pi, \qquad
        \log p(z) = \operatorname{logsumexp}_y \left(\log p(z \mid y) + \log p(y)\right).

    ``log_prob(z, context=y)`` is the first, ``log_prob(z)`` (no label) the mixture, so this is a
    drop-in prior of an unconditional flow too (``model.prior = ClassConditionalGaussian(K, D)``
    for an unsupervised mixture). :meth:`standardize` / :meth:`unstandardize` map
    :math:`z \leftrightarrow \epsilon = (z - \mu_y) / \sigma_y` for a conditional flow whose
    latent is :math:`\epsilon \sim \mathcal N(0, I)`.

    Args:
        num_classes: ``K``.
        dim: ``D``, entries of one latent (latents ``(B, ...)`` are flattened).
        init_scale: standard deviation of the random initial means (``0``: all at the origin;
            the means of a class move only with its own samples, so they separate anyway).
            Log-stds start at 0.
        learn_weights: learn the class weights :math:`p(y)` (a softmax); default: fixed, uniform.
    """

    def __init__(self, num_classes: int, dim: int, init_scale: float = 1.0,
                 learn_weights: bool = False):
        super().__init__()
        if num_classes < 1 or dim < 1:
            raise ValueError(f"ClassConditionalGaussian: needs num_classes >= 1 and dim >= 1, got "
                             f"{num_classes}, {dim}")
        self.num_classes, self.dim = num_classes, dim
        self.means = nn.Parameter(init_scale * torch.randn(num_classes, dim))  # (K, D)
        self.log_stds = nn.Parameter(torch.zeros(num_classes, dim))  # (K, D)
        if learn_weights:
            self.weight_logits = nn.Parameter(torch.zeros(num_classes))
        else:
            self.register_buffer("weight_logits", torch.zeros(num_classes))

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, dim={self.dim}"

    @property
    def log_weights(self) -> Tensor:
        r""":math:`\log p(y)`, shape ``(K,)``."""
        return torch.log_softmax(self.weight_logits, dim=0)

    def _flat(self, z: Tensor, owner: str) -> Tensor:
        if z.dim() < 2 or z[0].numel() != self.dim:
            raise ValueError(f"{type(self).__name__}.{owner}: expects latents (B, {self.dim}) or "
                             f"of {self.dim} entries per sample, got shape {tuple(z.shape)}")
        return z.flatten(1)  # (B, D)

    def _params(self, labels, batch: int, owner: str) -> tuple[Tensor, Tensor]:
        labels = check_labels(labels, self.num_classes, f"{type(self).__name__}.{owner}", batch)
        labels = labels.to(self.means.device)
        return self.means[labels], self.log_stds[labels]  # (B, D) each

    def log_prob(self, z: Tensor, context: Tensor | None = None) -> Tensor:
        r""":math:`\log p(z \mid y)` with labels ``context`` ``(B,)``, or the mixture's
        :math:`\log p(z)` without; shape ``(B,)``."""
        z = self._flat(z, "log_prob")
        if context is None:
            return self.marginal_log_prob(z)
        mu, log_sigma = self._params(context, z.shape[0], "log_prob")
        eps = (z - mu) * torch.exp(-log_sigma)
        return -0.5 * (eps.square().sum(1) + self.dim * math.log(2 * math.pi)) - log_sigma.sum(1)

    def joint_log_probs(self, z: Tensor) -> Tensor:
        r""":math:`\log p(z \mid y) + \log p(y)` for every class, shape ``(B, K)``."""
        z = self._flat(z, "joint_log_probs")
        eps = (z.unsqueeze(1) - self.means) * torch.exp(-self.log_stds)  # (B, K, D)
        log_p = -0.5 * (eps.square().sum(2) + self.dim * math.log(2 * math.pi)) \
            - self.log_stds.sum(1)  # (B, K)
        return log_p + self.log_weights

    def marginal_log_prob(self, z: Tensor) -> Tensor:
        r""":math:`\log \sum_y p(y)\, p(z \mid y)`, shape ``(B,)``."""
        return torch.logsumexp(self.joint_log_probs(z), dim=1)

    def class_log_posterior(self, z: Tensor) -> Tensor:
        r""":math:`\log p(y \mid z)`, shape ``(B, K)`` (``argmax`` classifies)."""
        return torch.log_softmax(self.joint_log_probs(z), dim=1)

    def standardize(self, z: Tensor, context: Tensor) -> tuple[Tensor, Tensor]:
        r""":math:`\epsilon = (z - \mu_y) / \sigma_y` ``(B, D)`` and its log-det
        :math:`-\sum_i \log \sigma_{y,i}` ``(B,)``."""
        z = self._flat(z, "standardize")
        mu, log_sigma = self._params(context, z.shape[0], "standardize")
        return (z - mu) * torch.exp(-log_sigma), -log_sigma.sum(1)

    def unstandardize(self, eps: Tensor, context: Tensor) -> Tensor:
        r""":math:`z = \mu_y + \sigma_y \epsilon`, the inverse of :meth:`standardize`."""
        eps = self._flat(eps, "unstandardize")
        mu, log_sigma = self._params(context, eps.shape[0], "unstandardize")
        return mu + torch.exp(log_sigma) * eps

    @torch.no_grad()
    def sample(self, n: int | tuple[int, ...], temperature: float = 1.0,
               device: torch.device | str | None = None, dtype: torch.dtype | None = None, *,
               context: Tensor | int | None = None) -> Tensor:
        r"""``n`` latents ``(n, D)`` given labels ``context`` (one label or ``n``), or from the
        mixture (labels drawn from :math:`p(y)`) without.

        ``n`` may be a shape ``(n, D)`` (how unconditional flows call their prior). The latent
        is :math:`\mu_y + T \sigma_y \epsilon` at temperature ``T``; ``device`` / ``dtype``
        default to the parameters'.
        """
        if not isinstance(n, int):
            shape = tuple(n)
            if len(shape) < 1 or math.prod(shape[1:]) != self.dim:
                raise ValueError(f"{type(self).__name__}.sample: shape {shape} does not hold "
                                 f"latents of {self.dim} entries")
            n = shape[0]
        if context is None:
            labels = torch.multinomial(self.log_weights.exp(), n, replacement=True)
        else:
            labels = expand_labels(context, n, self.num_classes, f"{type(self).__name__}.sample",
                                   self.means.device)
        mu, log_sigma = self._params(labels, n, "sample")
        z = mu + temperature * torch.exp(log_sigma) * torch.randn_like(mu)  # (n, D)
        return z.to(device=device, dtype=dtype)


def make_prior(name: str) -> nn.Module:
    """``"normal"`` -> :class:`StandardNormal`, ``"logistic"`` -> :class:`StandardLogistic`."""
    priors = {"normal": StandardNormal, "logistic": StandardLogistic}
    if name not in priors:
        raise ValueError(f"prior={name!r} is not known; use one of {sorted(priors)}")
    return priors[name]()
