r"""Discrete data as continuous: dequantization, logit preprocessing, bits per dimension.

Images with :math:`K` grey levels per entry, :math:`x \in \{0, \dots, K-1\}^D`, are mapped to
:math:`y = (x + u) / K \in [0, 1]^D` with noise :math:`u \in [0, 1)^D` drawn from
:math:`q(u \mid x)`. For a continuous density :math:`p` on :math:`[0,1]^D` the discrete model
:math:`P(x) = \int_{\text{cell}(x)} p(y)\,dy` satisfies (Jensen)

.. math::
    \log P(x) \ge \mathbb E_{q}\left[\log p(y) - \log q(y \mid x)\right],
    \qquad \log q(y \mid x) = \log q(u \mid x) + D \log K,

so uniform noise (:math:`q(u \mid x) = 1`) costs nothing but the :math:`D \log K` volume term, and
a learned (variational) :math:`q` tightens the bound (Ho et al., Flow++, 2019). Both
dequantizers here return ``(y, log_q)`` with ``log_q`` :math:`= \log q(y \mid x)`, so that

.. math::
    \text{bits/dim} = -\frac{\log p(y) - \log q(y \mid x)}{D \ln 2}.

:class:`LogitTransform` is RealNVP's preprocessing
:math:`z = \mathrm{logit}(\alpha + (1 - 2\alpha) y)` with its log-det, so that ``log_prob`` of a
model that starts with it is a density of :math:`y` on :math:`[0,1]^D`.

References:
    Theis et al., "A note on the evaluation of generative models", 2016.
    Dinh et al., "Density estimation using Real NVP", 2016, sec. 4.1.
    Ho et al., "Flow++", 2019, sec. 3.1.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..base import InvertibleModule, zero_log_det
from .nets import MLP, ConvNet

__all__ = [
    "UniformDequantization",
    "VariationalDequantization",
    "LogitTransform",
    "CenterShift",
    "bits_per_dim",
    "check_levels",
]


def check_levels(x: Tensor, levels: int, owner: str) -> None:
    """Raise ``ValueError`` unless ``x`` holds integers in ``[0, levels - 1]``."""
    if x.dim() < 2:
        raise ValueError(f"{owner}: expects a batch (B, ...), got shape {tuple(x.shape)}")
    if x.numel() == 0:
        return
    lo, hi = float(x.min()), float(x.max())
    if lo < 0 or hi > levels - 1:
        raise ValueError(
            f"{owner}: data must be integers in [0, {levels - 1}] ({levels} levels), got values "
            f"in [{lo:g}, {hi:g}]; pass the raw integer levels (e.g. 0..255 for 8-bit images), "
            "not data already scaled to [0, 1], or set levels to match the data"
        )
    if x.is_floating_point() and not bool((x == torch.round(x)).all()):
        raise ValueError(f"{owner}: data must be integer levels; got non-integer values "
                         "(already dequantized or normalised?)")


class UniformDequantization(nn.Module):
    r""":math:`y = (x + u) / K`, :math:`u \sim U[0, 1)^D`; ``log_q`` :math:`= D \log K`.

    Args:
        levels: number of levels :math:`K` (``2 ** n_bits``, or 17 for scikit-learn digits).
    """

    def __init__(self, levels: int):
        super().__init__()
        if not isinstance(levels, int) or levels < 2:
            raise ValueError(f"UniformDequantization: levels must be an int >= 2, got {levels!r}")
        self.levels = levels

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(y, log_q)`` for integer data ``x``; ``y`` in float32 unless ``x`` is floating."""
        check_levels(x, self.levels, type(self).__name__)
        x = x if x.is_floating_point() else x.float()
        y = (x + torch.rand_like(x)) / self.levels
        num_dims = x[0].numel()
        return y, x.new_full((x.shape[0],), num_dims * math.log(self.levels))

    def extra_repr(self) -> str:
        return f"levels={self.levels}"


class VariationalDequantization(nn.Module):
    r"""Learned noise :math:`u = \sigma(\epsilon \odot e^{s(x)} + t(x))`,
    :math:`\epsilon \sim \mathcal N(0, I)`.

    A conditional diagonal Gaussian pushed through a sigmoid, with :math:`(s, t)` from a
    network of the centred data :math:`x / K - \tfrac12`:

    .. math::
        \log q(u \mid x) = \log \mathcal N(\epsilon) - \sum s - \sum \log \sigma'(a),
        \qquad a = \epsilon \odot e^{s} + t.

    A minimal variational dequantizer (Flow++ uses a conditional flow); it is trained jointly
    with the model by maximising the bound of the module docstring.

    Args:
        levels: number of levels :math:`K`.
        shape: shape of one sample, ``(C, H, W)`` or ``(D,)``.
        hidden: width of the network.
    """

    def __init__(self, levels: int, shape: tuple[int, ...], hidden: int = 32):
        super().__init__()
        if not isinstance(levels, int) or levels < 2:
            raise ValueError("VariationalDequantization: levels must be an int >= 2, "
                             f"got {levels!r}")
        self.levels = levels
        self.shape = tuple(shape)
        if len(self.shape) == 3:
            self.net = ConvNet(self.shape[0], 2 * self.shape[0], hidden)
        elif len(self.shape) == 1:
            self.net = MLP(self.shape[0], 2 * self.shape[0], hidden, depth=2)
        else:
            raise ValueError(f"VariationalDequantization: shape must be (C, H, W) or (D,), "
                             f"got {shape!r}")

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(y, log_q)`` for integer data ``x``; differentiable in the network's parameters."""
        check_levels(x, self.levels, type(self).__name__)
        if tuple(x.shape[1:]) != self.shape:
            raise ValueError(f"VariationalDequantization: expects samples of shape {self.shape}, "
                             f"got a batch of shape {tuple(x.shape)}")
        x = x if x.is_floating_point() else x.float()
        s, t = self.net(x / self.levels - 0.5).chunk(2, dim=1)
        s = 2.0 * torch.tanh(s / 2.0)
        eps = torch.randn_like(x)
        a = eps * torch.exp(s) + t
        u = torch.sigmoid(a)
        log_sigmoid_grad = -F.softplus(-a) - F.softplus(a)
        log_q_u = (-0.5 * eps.square() - 0.5 * math.log(2 * math.pi) - s - log_sigmoid_grad)
        num_dims = x[0].numel()
        log_q = log_q_u.flatten(1).sum(1) + num_dims * math.log(self.levels)
        return (x + u) / self.levels, log_q

    def extra_repr(self) -> str:
        return f"levels={self.levels}, shape={self.shape}"


class LogitTransform(InvertibleModule):
    r""":math:`z = \mathrm{logit}(p)`, :math:`p = \alpha + (1 - 2\alpha) y`, :math:`y \in [0, 1]`.

    .. math::
        \log|\det J| = \sum_i \left[\log(1 - 2\alpha) - \log p_i - \log(1 - p_i)\right]

    The inverse :math:`y = (\sigma(z) - \alpha) / (1 - 2\alpha)` maps :math:`\mathbb R` onto
    :math:`(-\alpha / (1 - 2\alpha), 1 + \alpha / (1 - 2\alpha))`, wider than the data range;
    it is clamped to :math:`[0, 1]`, so that samples of a model starting with this transform
    are valid data and ``log_prob(sample())`` works. The clamp only moves latents beyond
    :math:`\pm\mathrm{logit}(1 - \alpha)` (whose image the forward never produces for data in
    :math:`[0, 1]`); for any :math:`z` the forward produces, the inverse is exact.

    Args:
        alpha: margin that keeps :math:`p` away from 0 and 1 (RealNVP: 0.05).
    """

    def __init__(self, alpha: float = 0.05):
        super().__init__()
        if not 0 < alpha < 0.5:
            raise ValueError(f"LogitTransform: alpha must be in (0, 0.5), got {alpha}")
        self.alpha = alpha

    def forward_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        lo, hi = (float(x.detach().min()), float(x.detach().max())) if x.numel() else (0, 0)
        if lo < 0 or hi > 1:
            raise ValueError(
                f"LogitTransform: expects data in [0, 1], got values in [{lo:g}, {hi:g}]; "
                "dequantize integer data first, e.g. "
                "UniformDequantization(levels)(x)"
            )
        p = self.alpha + (1 - 2 * self.alpha) * x
        log_p, log_1mp = torch.log(p), torch.log1p(-p)
        log_det = (math.log(1 - 2 * self.alpha) - log_p - log_1mp).flatten(1).sum(1)
        return log_p - log_1mp, log_det

    def inverse(self, y: Tensor) -> Tensor:
        # clamped into the data range: samples land where forward (and log_prob) accepts them
        return ((torch.sigmoid(y) - self.alpha) / (1 - 2 * self.alpha)).clamp(0.0, 1.0)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}"


class CenterShift(InvertibleModule):
    r"""Glow's preprocessing :math:`z = y - \tfrac12` (log-det 0)."""

    def forward_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return x - 0.5, zero_log_det(x)

    def inverse(self, y: Tensor) -> Tensor:
        return y + 0.5


def bits_per_dim(log_likelihood: Tensor, num_dims: int) -> Tensor:
    r"""Bits per dimension :math:`-\log P(x) / (D \ln 2)` of a per-sample log-likelihood (nats)."""
    return -log_likelihood / (num_dims * math.log(2))
