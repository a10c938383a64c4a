r"""Rational-quadratic spline transform (neural spline flows), an element-wise coupling transform.

Inside :math:`[-B, B]` each entry is mapped by a monotone rational-quadratic spline with
:math:`K` bins whose widths, heights and interior knot derivatives come from the sub-network;
outside it the map is the identity (linear tails of slope 1, so that the spline is
:math:`C^1` at :math:`\pm B`). In bin :math:`k`, with knots :math:`(x_k, y_k)`, width
:math:`w_k`, height :math:`h_k`, slope :math:`s_k = h_k / w_k`, knot derivatives
:math:`d_k, d_{k+1}` and :math:`\xi = (x - x_k) / w_k \in [0, 1]`:

.. math::
    y = y_k + \frac{h_k\,[s_k \xi^2 + d_k \xi (1 - \xi)]}
                   {s_k + (d_{k+1} + d_k - 2 s_k)\,\xi (1 - \xi)},
    \qquad
    \frac{dy}{dx} = \frac{s_k^2\,[d_{k+1} \xi^2 + 2 s_k \xi (1 - \xi) + d_k (1 - \xi)^2]}
                         {[s_k + (d_{k+1} + d_k - 2 s_k)\,\xi (1 - \xi)]^2}.

The inverse solves the quadratic :math:`a \xi^2 + b \xi + c = 0` in closed form with the
numerically stable root :math:`\xi = 2c / (-b - \sqrt{b^2 - 4ac})`, so a float64 round trip is
exact to rounding. Use it as the ``transform`` of :class:`revtrain.Coupling`; it trains
through the reversible engine like :class:`~revtrain.Affine` (one extra evaluation of each
sub-network in backward, the element-wise spline re-run for what it saved).

>>> import torch
>>> import revtrain
>>> from revtrain.flows import MLP, CheckerboardMask
>>> spline = revtrain.RationalQuadratic(bins=8, bound=3.0)      # 23 values per element
>>> layer = revtrain.Coupling(MLP(2, 2 * spline.num_params), None, spline,
...                           split=CheckerboardMask(0))         # (B, 4): 2 entries transformed
>>> x = torch.randn(5, 4, dtype=torch.float64)
>>> y, log_det = layer.double().forward_and_log_det(x)
>>> bool((layer.inverse(y) - x).abs().max() < 1e-12), tuple(log_det.shape)
(True, (5,))

Reference: Durkan, Bekasov, Murray & Papamakarios, "Neural Spline Flows", NeurIPS 2019.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.nn import functional as F

from .coupling import _Transform

__all__ = ["RationalQuadratic"]


class RationalQuadratic(_Transform):
    r"""Monotone rational-quadratic spline on :math:`[-B, B]`, identity outside (Durkan et al.).

    The sub-network outputs ``3 * bins - 1`` values per transformed element, stacked along the
    split dimension in blocks (like :class:`~revtrain.Affine`'s ``(s, t)``): ``bins`` raw
    widths, ``bins`` raw heights and ``bins - 1`` raw interior derivatives. Widths and heights
    are a softmax scaled to ``2 B`` with a floor of ``min_width`` / ``min_height`` (fractions
    of ``2 B``); derivatives are ``min_derivative + softplus(raw + c)`` with ``c`` chosen so
    that a raw value of 0 gives derivative 1. A zero-initialised sub-network therefore starts
    the coupling as the identity. The boundary derivatives are 1 (linear tails).

    Args:
        bins: number of bins :math:`K` (at least 2).
        bound: :math:`B`; entries with :math:`|x| > B` pass through unchanged.
        min_width: smallest bin width as a fraction of :math:`2B`; ``bins * min_width < 1``.
        min_height: smallest bin height as a fraction of :math:`2B`; ``bins * min_height < 1``.
        min_derivative: smallest knot derivative, in ``(0, 1)``.
    """

    param_names = "widths, heights and derivatives"

    def __init__(self, bins: int = 8, bound: float = 3.0, min_width: float = 1e-3,
                 min_height: float = 1e-3, min_derivative: float = 1e-3):
        if not isinstance(bins, int) or isinstance(bins, bool) or bins < 2:
            raise ValueError(f"RationalQuadratic: bins must be an int >= 2, got {bins!r}")
        if not (isinstance(bound, (int, float)) and math.isfinite(bound) and bound > 0):
            raise ValueError(f"RationalQuadratic: bound must be a positive finite number, got "
                             f"{bound!r}")
        for name, value in (("min_width", min_width), ("min_height", min_height)):
            if not 0 < value < 1 / bins:
                raise ValueError(
                    f"RationalQuadratic: {name}={value!r} must be in (0, 1 / bins) = (0, "
                    f"{1 / bins:.4g}) so that {bins} bins fit in [-bound, bound]; use fewer bins or "
                    f"a smaller {name}")
        if not 0 < min_derivative < 1:
            raise ValueError(f"RationalQuadratic: min_derivative must be in (0, 1), got "
                             f"{min_derivative!r}")
        self.bins = bins
        self.bound = float(bound)
        self.min_width = float(min_width)
        self.min_height = float(min_height)
        self.min_derivative = float(min_derivative)
        # softplus(raw + shift) + min_derivative == 1 for raw == 0
        self._shift = math.log(math.expm1(1 - self.min_derivative))

    @property
    def num_params(self) -> int:
        return 3 * self.bins - 1

    # ----------------------------------------------------------------- the spline's knots

    def _knots(self, h: Tensor, dim: int, dtype: torch.dtype):
        """Knots ``(xk, yk)`` and derivatives ``dk``, each ``(..., K + 1)``, from raw ``h``."""
        k = self.bins
        # (B, P * n, ...) -> (B, n, ..., P): the parameters of each element on the last axis;
        # in the residual stream's dtype, so that forward and inverse agree under autocast
        h = h.to(dtype)
        h = h.unflatten(dim, (self.num_params, h.shape[dim] // self.num_params)).movedim(dim, -1)
        raw_w, raw_h, raw_d = h[..., :k], h[..., k:2 * k], h[..., 2 * k:]
        xk = self._cumulative(raw_w, self.min_width)
        yk = self._cumulative(raw_h, self.min_height)
        inner = self.min_derivative + F.softplus(raw_d + self._shift)
        one = inner.new_ones(()).expand(*inner.shape[:-1], 1)
        dk = torch.cat([one, inner, one], dim=-1)
        return xk, yk, dk

    def _cumulative(self, raw: Tensor, floor: float) -> Tensor:
        """Knot positions in ``[-B, B]``: ``-B``, the cumulative bin sizes, exactly ``B``."""
        sizes = floor + (1 - floor * self.bins) * torch.softmax(raw, dim=-1)
        inner = torch.cumsum(sizes[..., :-1], dim=-1) * (2 * self.bound) - self.bound
        edge = inner.new_ones(()).expand(*inner.shape[:-1], 1) * self.bound
        return torch.cat([-edge, inner, edge], dim=-1)  # (..., K + 1)

    @staticmethod
    def _bin(knots: Tensor, v: Tensor) -> Tensor:
        """Index of the bin of each entry of ``v`` (in ``0 .. K - 1``), shape ``(..., 1)``."""
        return torch.searchsorted(knots[..., 1:-1].contiguous(), v.unsqueeze(-1).contiguous(),
                                  right=True)

    def _gather(self, xk, yk, dk, idx):
        x0 = xk.gather(-1, idx)
        w = xk.gather(-1, idx + 1) - x0
        y0 = yk.gather(-1, idx)
        hk = yk.gather(-1, idx + 1) - y0
        d0 = dk.gather(-1, idx)
        d1 = dk.gather(-1, idx + 1)
        return x0, w, y0, hk, d0, d1

    # ----------------------------------------------------------------- the transform

    def forward(self, x: Tensor, h: Tensor, dim: int) -> tuple[Tensor, Tensor]:
        xk, yk, dk = self._knots(h, dim, x.dtype)
        inside = (x >= -self.bound) & (x <= self.bound)
        xc = x.clamp(-self.bound, self.bound)  # the spline is evaluated everywhere, used inside
        x0, w, y0, hk, d0, d1 = self._gather(xk, yk, dk, self._bin(xk, xc))
        x0, w, y0, hk, d0, d1 = (t.squeeze(-1) for t in (x0, w, y0, hk, d0, d1))
        s = hk / w
        xi = (xc - x0) / w
        t = xi * (1 - xi)
        denom = s + (d1 + d0 - 2 * s) * t
        y_in = y0 + hk * (s * xi.square() + d0 * t) / denom
        grad = s.square() * (d1 * xi.square() + 2 * s * t + d0 * (1 - xi).square()) / denom.square()
        y = torch.where(inside, y_in, x)
        log_grad = torch.where(inside, torch.log(grad), torch.zeros_like(grad))
        return y, log_grad.flatten(1).sum(1)

    def inverse(self, y: Tensor, h: Tensor, dim: int, out: Tensor | None = None) -> Tensor:
        xk, yk, dk = self._knots(h, dim, y.dtype)
        inside = (y >= -self.bound) & (y <= self.bound)
        yc = y.clamp(-self.bound, self.bound)
        x0, w, y0, hk, d0, d1 = self._gather(xk, yk, dk, self._bin(yk, yc))
        x0, w, y0, hk, d0, d1 = (t.squeeze(-1) for t in (x0, w, y0, hk, d0, d1))
        s = hk / w
        dy = yc - y0
        e = d1 + d0 - 2 * s
        a = hk * (s - d0) + dy * e
        b = hk * d0 - dy * e
        c = -s * dy
        disc = (b.square() - 4 * a * c).clamp_min(0)  # >= 0 in exact arithmetic (monotone)
        xi = (2 * c) / (-b - disc.sqrt())
        x_in = x0 + xi * w
        if out is not None:
            return torch.where(inside, x_in, y, out=out)
        return torch.where(inside, x_in, y)

    def __repr__(self) -> str:
        return (f"RationalQuadratic(bins={self.bins}, bound={self.bound:g}, "
                f"min_width={self.min_width:g}, min_height={self.min_height:g}, "
                f"min_derivative={self.min_derivative:g})")
