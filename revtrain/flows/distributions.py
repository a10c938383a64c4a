r"""Base distributions of a flow: :math:`\log p(z)` per sample and sampling at a temperature.

A flow maps data :math:`x` to a latent :math:`z = T(x)` with a fixed base density
:math:`p_Z`; the change of variables gives

.. math::
    \log p_X(x) = \log p_Z(T(x)) + \log \left|\det \frac{\partial T(x)}{\partial x}\right|.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["StandardNormal", "StandardLogistic", "make_prior"]


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


def make_prior(name: str) -> nn.Module:
    """``"normal"`` -> :class:`StandardNormal`, ``"logistic"`` -> :class:`StandardLogistic`."""
    priors = {"normal": StandardNormal, "logistic": StandardLogistic}
    if name not in priors:
        raise ValueError(f"prior={name!r} is not known; use one of {sorted(priors)}")
    return priors[name]()
