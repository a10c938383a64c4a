r"""Invertible 1x1 convolution (Glow): a learned linear map of the channels at every position.

.. math::
    y_{:, h, w} = W x_{:, h, w}, \qquad \log|\det J| = H W \log |\det W|

:class:`InvConv1x1` stores :math:`W` and pays :math:`O(C^3)` for ``slogdet`` and the inverse.
:class:`InvConv1x1LU` stores the LU decomposition
:math:`W = P L (U + \mathrm{diag}(\sigma \odot e^{\ell}))` with a fixed permutation
:math:`P`, unit lower-triangular :math:`L`, strictly upper-triangular :math:`U` and fixed signs
:math:`\sigma`, so that :math:`\log|\det W| = \sum_c \ell_c` costs :math:`O(C)`.

Both accept images ``(B, C, H, W)`` and vectors ``(B, C)`` (a learned invertible linear map).

Reference: Kingma & Dhariwal, "Glow: Generative Flow with Invertible 1x1 Convolutions", 2018.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..base import InvertibleModule

__all__ = ["InvConv1x1", "InvConv1x1LU"]


def _random_rotation(c: int) -> Tensor:
    q, _ = torch.linalg.qr(torch.randn(c, c, dtype=torch.float64))
    return q.float()


def _apply(weight: Tensor, x: Tensor) -> Tensor:
    """``W`` applied to dimension 1 of ``x`` (``(B, C)`` or ``(B, C, ...)``)."""
    if x.dim() == 2:
        return x @ weight.t()  # (B, C)
    return torch.einsum("oc,bc...->bo...", weight, x)  # (B, C, H, W)


class _Conv1x1Base(InvertibleModule):
    def __init__(self, num_channels: int):
        super().__init__()
        if not isinstance(num_channels, int) or num_channels < 1:
            raise ValueError(f"{type(self).__name__}: num_channels must be a positive int, "
                             f"got {num_channels!r}")
        self.num_channels = num_channels

    def _check(self, x: Tensor) -> None:
        if x.dim() < 2 or x.shape[1] != self.num_channels:
            raise ValueError(f"{type(self).__name__}: expects {self.num_channels} channels in "
                             f"dimension 1, got an input of shape {tuple(x.shape)}")

    def weight_and_log_abs_det(self) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def inverse_weight(self) -> Tensor:
        raise NotImplementedError

    def forward_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        self._check(x)
        weight, log_abs_det = self.weight_and_log_abs_det()
        positions = x[0, 0].numel()
        return _apply(weight, x), (positions * log_abs_det).expand(x.shape[0])

    def inverse(self, y: Tensor) -> Tensor:
        self._check(y)
        return _apply(self.inverse_weight(), y)

    def extra_repr(self) -> str:
        return f"{self.num_channels}"


class InvConv1x1(_Conv1x1Base):
    r"""Invertible 1x1 convolution with a dense weight, initialised to a random rotation.

    :math:`\log|\det W|` by ``torch.linalg.slogdet``, :math:`O(C^3)`.

    Args:
        num_channels: ``C``.
    """

    def __init__(self, num_channels: int):
        super().__init__(num_channels)
        self.weight = nn.Parameter(_random_rotation(num_channels))

    def weight_and_log_abs_det(self) -> tuple[Tensor, Tensor]:
        return self.weight, torch.linalg.slogdet(self.weight)[1]

    def inverse_weight(self) -> Tensor:
        return torch.linalg.inv(self.weight)


class InvConv1x1LU(_Conv1x1Base):
    r"""Invertible 1x1 convolution in LU form; log-det in :math:`O(C)`.

    :math:`W = P L (U + \mathrm{diag}(\sigma \odot e^{\ell}))`, initialised from the LU
    decomposition of a random rotation. Learned: the strictly lower part of ``L``
    (``lower``), the strictly upper part of ``U`` (``upper``) and :math:`\ell`
    (``log_scale``); fixed buffers: ``permutation`` (:math:`P`) and ``sign`` (:math:`\sigma`).

    Args:
        num_channels: ``C``.
    """

    def __init__(self, num_channels: int):
        super().__init__(num_channels)
        p, lower, upper = torch.linalg.lu(_random_rotation(num_channels))
        diag = torch.diagonal(upper)
        self.register_buffer("permutation", p)
        self.register_buffer("sign", torch.sign(diag))
        self.register_buffer("lower_mask", torch.tril(torch.ones(num_channels, num_channels), -1))
        self.register_buffer("eye", torch.eye(num_channels))
        self.lower = nn.Parameter(lower * self.lower_mask)
        self.upper = nn.Parameter(torch.triu(upper, 1))
        self.log_scale = nn.Parameter(torch.log(diag.abs()))

    def _factors(self) -> tuple[Tensor, Tensor]:
        lower = self.lower * self.lower_mask + self.eye
        upper = self.upper * self.lower_mask.t() + torch.diag(self.sign * torch.exp(self.log_scale))
        return lower, upper

    def weight_and_log_abs_det(self) -> tuple[Tensor, Tensor]:
        lower, upper = self._factors()
        return self.permutation @ lower @ upper, self.log_scale.sum()

    def inverse_weight(self) -> Tensor:
        lower, upper = self._factors()
        # W^{-1} = U^{-1} L^{-1} P^T by two triangular solves
        lower_inv_pt = torch.linalg.solve_triangular(lower, self.permutation.t(), upper=False,
                                                     unitriangular=True)
        return torch.linalg.solve_triangular(upper, lower_inv_pt, upper=True)
