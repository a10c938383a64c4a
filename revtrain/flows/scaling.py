r"""NICE's diagonal scaling layer: :math:`y = x \odot e^{s}`, :math:`\log|\det J| = S\sum s`.

The last layer of NICE; it lets the otherwise volume-preserving additive flow change volume
and learn which dimensions matter.

Reference: Dinh et al., "NICE: Non-linear Independent Components Estimation", 2014, sec. 3.3.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..base import InvertibleModule

__all__ = ["DiagonalScaling"]


class DiagonalScaling(InvertibleModule):
    r"""Learned element-wise scaling :math:`y = x \odot e^{s}` of dimension 1.

    Args:
        num_features: size ``D`` of dimension 1; inputs ``(B, D)`` or ``(B, D, ...)`` (one
            scale per channel, shared over the remaining positions ``S``).
    """

    def __init__(self, num_features: int):
        super().__init__()
        if not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"DiagonalScaling: num_features must be a positive int, "
                             f"got {num_features!r}")
        self.num_features = num_features
        self.log_scale = nn.Parameter(torch.zeros(num_features))

    def _scale(self, x: Tensor, sign: float) -> Tensor:
        if x.dim() < 2 or x.shape[1] != self.num_features:
            raise ValueError(f"DiagonalScaling: expects {self.num_features} features in "
                             f"dimension 1, got shape {tuple(x.shape)}")
        return torch.exp(sign * self.log_scale).view(1, -1, *([1] * (x.dim() - 2)))

    def forward_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        y = x * self._scale(x, 1.0)
        return y, (x[0, 0].numel() * self.log_scale.sum()).expand(x.shape[0])

    def inverse(self, y: Tensor) -> Tensor:
        return y * self._scale(y, -1.0)

    def extra_repr(self) -> str:
        return f"{self.num_features}"
