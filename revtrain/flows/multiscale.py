r"""Multi-scale factoring-out with a learned conditional Gaussian prior (Glow's split).

At the end of a level the channels are split into ``z1`` (kept, ``c - c // 2`` channels, fed
to the next level) and ``z2`` (``c // 2`` channels, factored out). Glow models
:math:`z_2 \mid z_1 \sim \mathcal N(\mu(z_1), \sigma(z_1)^2)` with a zero-initialised
convolution. :class:`GaussianSplit` writes this prior as a bijection to a standard normal,

.. math::
    \epsilon = z_2 \odot e^{s(z_1)} + t(z_1), \qquad
    \log p(z_2 \mid z_1) = \log \mathcal N(\epsilon; 0, I) + \sum s(z_1),

i.e. :math:`\mu = -t e^{-s}`, :math:`\sigma = e^{-s}`. That is an affine half coupling, so it is
a :class:`revtrain.Coupling` (with a flipped :class:`~revtrain.flows.masks.ChannelMask`): its
output is ``cat(z1, eps)``, it runs inside a reversible stack with the fused backward, and the
model factors out ``eps`` and scores it with a standard normal. Sampling at temperature
:math:`T` draws :math:`\epsilon \sim \mathcal N(0, T^2 I)`, i.e. :math:`z_2 = \mu + T\sigma\,\xi`.

:class:`LearnedTopPrior` is Glow's learned prior of the last level (openai/glow ``--learntop``),
a diagonal Gaussian :math:`\mathcal N(\mu, \sigma^2)` with learned, zero-initialised
:math:`\mu` and :math:`\log\sigma`, written the same way as the bijection
:math:`\epsilon = (z - \mu) e^{-\log\sigma}` to a standard normal.

Reference: Kingma & Dhariwal, "Glow", 2018; Dinh et al., "Real NVP", 2016 (multi-scale).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..base import InvertibleModule
from ..coupling import Affine, Coupling
from .masks import ChannelMask
from .nets import MLP, ConvNet

__all__ = ["GaussianSplit", "LearnedTopPrior", "split_sizes"]


def split_sizes(channels: int) -> tuple[int, int]:
    """``(kept, factored)`` channel counts of a split: ``(c - c // 2, c // 2)``."""
    return channels - channels // 2, channels // 2


class GaussianSplit(Coupling):
    r"""Learned conditional Gaussian prior of the factored-out half, as a bijection.

    Maps ``(B, C, ...)`` to ``cat(z1, eps)`` of the same shape, with ``z1`` the first
    ``C - C // 2`` channels unchanged and ``eps`` as in the module docstring; log-det
    :math:`\sum s(z_1)`.

    Args:
        num_channels: ``C`` (at least 2).
        hidden: width of the prior network; ``0`` for Glow's single zero-initialised 3x3
            convolution (images) or linear layer (vectors).
        image: ``True`` for ``(B, C, H, W)`` inputs (convolutional prior), ``False`` for
            vectors.
        clamp: soft bound of :math:`|s|`.
    """

    def __init__(self, num_channels: int, hidden: int = 0, image: bool = True,
                 clamp: float | None = 4.0):
        if not isinstance(num_channels, int) or num_channels < 2:
            raise ValueError("GaussianSplit: needs at least 2 channels to split, "
                             f"got {num_channels!r}")
        kept, factored = split_sizes(num_channels)
        if image:
            if hidden:
                net = ConvNet(kept, 2 * factored, hidden)
            else:
                net = ConvNet.zero_conv(kept, 2 * factored)
        else:
            net = MLP(kept, 2 * factored, hidden or 64, depth=1)
        super().__init__(net, None, Affine(clamp), ChannelMask(flip=True))
        self.num_channels = num_channels

    def factor(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """``(z1, eps)`` of an output ``y``: the kept channels and the factored-out ones."""
        kept, factored = split_sizes(y.shape[1])
        return y[:, :kept], y[:, kept:]


class LearnedTopPrior(InvertibleModule):
    r"""A learned diagonal Gaussian prior :math:`\mathcal N(\mu, \sigma^2)` of the top latent,
    as the bijection :math:`\epsilon = (z - \mu) \odot e^{-\ell}` (:math:`\ell = \log\sigma`).

    .. math::
        \log p(z) = \log \mathcal N(\epsilon; 0, I) - \sum \ell

    so the log-det is :math:`-\sum \ell` and the model scores :math:`\epsilon` with a standard
    normal; sampling at temperature :math:`T` draws :math:`\epsilon \sim \mathcal N(0, T^2 I)`,
    i.e. :math:`z = \mu + T \sigma \xi` (openai/glow's ``sample2(eps * eps_std)``). One
    :math:`\mu` and one :math:`\ell` per entry of ``shape`` (openai/glow: a zero-initialised
    3x3 convolution of a zero input with edge padding, i.e. one value per channel plus
    position-dependent terms at the border; this parametrisation contains it). Both start at
    zero: the model starts with the standard normal prior.

    Args:
        shape: ``(C, H, W)`` (or ``(D,)``) of one sample of the top latent.
    """

    def __init__(self, shape: Sequence[int]):
        super().__init__()
        self.shape = tuple(int(n) for n in shape)
        if not self.shape or min(self.shape) < 1:
            raise ValueError(f"LearnedTopPrior: shape must be positive sizes, got {shape!r}")
        self.mean = nn.Parameter(torch.zeros(self.shape))
        self.log_std = nn.Parameter(torch.zeros(self.shape))

    def _check(self, x: Tensor) -> None:
        if tuple(x.shape[1:]) != self.shape:
            raise ValueError(f"LearnedTopPrior: expects samples of shape {self.shape}, got a "
                             f"batch of shape {tuple(x.shape)}")

    def forward_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        self._check(x)
        eps = (x - self.mean) * torch.exp(-self.log_std)  # (B, C, H, W)
        return eps, (-self.log_std.sum()).expand(x.shape[0])

    def inverse(self, y: Tensor) -> Tensor:
        self._check(y)
        return y * torch.exp(self.log_std) + self.mean

    def extra_repr(self) -> str:
        return f"shape={self.shape}"
