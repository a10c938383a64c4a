r"""Coupling layers, written once: split, element-wise transform, merge, log-det.

A coupling splits its input into two parts :math:`(x_1, x_2)` and transforms each part
element-wise with parameters computed from the other part only:

.. math::
    y_1 = T(x_1; f(x_2)), \qquad y_2 = T(x_2; g(y_1))

so that the inverse needs only the sub-networks' forward passes:
:math:`x_2 = T^{-1}(y_2; g(y_1))`, :math:`x_1 = T^{-1}(y_1; f(x_2))`.
With ``g=None`` the second half passes through unchanged (:math:`y_2 = x_2`, the NICE /
RealNVP half coupling).

The element-wise transform :math:`T` is additive (:class:`Additive`, NICE, RevNet) or affine
with a soft-clamped log-scale (:class:`Affine`, RealNVP, Glow).

References:
    Dinh et al., "NICE: Non-linear Independent Components Estimation", 2014.
    Dinh et al., "Density estimation using Real NVP", 2016.
    Gomez et al., "The Reversible Residual Network", 2017.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .base import InvertibleModule, zero_log_det
from .state import RngTape, rng_point

__all__ = [
    "Additive",
    "Affine",
    "ChannelSplit",
    "Coupling",
    "AdditiveCoupling",
    "AffineCoupling",
]


class ChannelSplit:
    """Split along ``dim`` into ``c // 2`` and ``c - c // 2`` (odd sizes allowed)."""

    def __init__(self, dim: int = 1):
        if not isinstance(dim, int) or isinstance(dim, bool):
            raise TypeError(f"split_dim must be an int, got {dim!r}")
        if dim == 0:
            raise ValueError("split_dim=0 would split the batch; use a feature dimension (>= 1)")
        self.dim = dim

    def check(self, x: Tensor, owner: str) -> None:
        if not -x.dim() <= self.dim < x.dim() or self.dim in (0, -x.dim()):
            raise ValueError(
                f"{owner}: split_dim={self.dim} is out of range for an input of shape "
                f"{tuple(x.shape)}; pass a feature dimension between 1 and {x.dim() - 1}"
            )
        if x.shape[self.dim] < 2:
            raise ValueError(
                f"{owner}: dimension {self.dim} of the input {tuple(x.shape)} has size "
                f"{x.shape[self.dim]}; a coupling needs at least 2 to split"
            )

    def split(self, x: Tensor) -> tuple[Tensor, Tensor]:
        c = x.shape[self.dim]
        x1, x2 = torch.split(x, [c // 2, c - c // 2], dim=self.dim)
        return x1, x2

    def merge(self, x1: Tensor, x2: Tensor) -> Tensor:
        return torch.cat([x1, x2], dim=self.dim)

    def __repr__(self) -> str:
        return f"ChannelSplit(dim={self.dim})"


class Additive:
    r"""Additive transform :math:`y = x + h`, log-det 0 (NICE, RevNet)."""

    factor = 1  # the sub-network outputs one value per transformed element

    def forward(self, x: Tensor, h: Tensor, dim: int) -> tuple[Tensor, Tensor | None]:
        return x + h, None

    def inverse(self, y: Tensor, h: Tensor, dim: int) -> Tensor:
        return y - h

    def __repr__(self) -> str:
        return "Additive()"


class Affine:
    r"""Affine transform :math:`y = x \odot e^{s} + t` with a soft-clamped log-scale.

    The sub-network outputs :math:`(\tilde s, t)` concatenated along the split dimension and
    :math:`s = c \tanh(\tilde s / c)` keeps :math:`|s| < c` (``clamp``), so that forward, inverse
    and log-det stay finite for any sub-network output. ``clamp=None`` disables the clamp.
    The log-det is :math:`\sum s` over all non-batch dimensions.
    """

    factor = 2

    def __init__(self, clamp: float | None = 2.0):
        if clamp is not None and not clamp > 0:
            raise ValueError(f"Affine: clamp must be positive or None, got {clamp}")
        self.clamp = clamp

    def _scale_shift(self, h: Tensor, dim: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        # in the residual stream's dtype: exp(s) and exp(-s) must be exact inverses even when the
        # sub-network ran in bf16 / fp16 under autocast
        s, t = h.to(dtype).chunk(2, dim=dim)
        if self.clamp is not None:
            s = self.clamp * torch.tanh(s / self.clamp)
        return s, t

    def forward(self, x: Tensor, h: Tensor, dim: int) -> tuple[Tensor, Tensor]:
        s, t = self._scale_shift(h, dim, x.dtype)
        return x * torch.exp(s) + t, s.flatten(1).sum(1)

    def inverse(self, y: Tensor, h: Tensor, dim: int) -> Tensor:
        s, t = self._scale_shift(h, dim, y.dtype)
        return (y - t) * torch.exp(-s)

    def __repr__(self) -> str:
        return f"Affine(clamp={self.clamp})"


class Coupling(InvertibleModule):
    r"""A two-part coupling :math:`y_1 = T(x_1; f(x_2))`, :math:`y_2 = T(x_2; g(y_1))`.

    Args:
        f: sub-network from :math:`x_2` to the parameters of :math:`T` on :math:`x_1`
            (the shape of :math:`x_1`, with the split dimension multiplied by
            ``transform.factor``).
        g: sub-network from :math:`y_1` to the parameters of :math:`T` on :math:`x_2`, or
            ``None`` for a half coupling (:math:`y_2 = x_2`).
        transform: the element-wise transform, :class:`Additive` or :class:`Affine`.
        split: how to split and merge; default :class:`ChannelSplit` along dimension 1.

    In backward, :meth:`fused_backward` rebuilds the input and back-propagates with one
    evaluation of ``g`` and one of ``f`` (Gomez et al. 2017, Algorithm 1).
    """

    def __init__(
        self,
        f: nn.Module,
        g: nn.Module | None = None,
        transform: Additive | Affine | None = None,
        split: ChannelSplit | None = None,
    ):
        super().__init__()
        if not isinstance(f, nn.Module):
            raise TypeError(f"{type(self).__name__}: f must be an nn.Module, got {type(f)}")
        if g is not None and not isinstance(g, nn.Module):
            raise TypeError(f"{type(self).__name__}: g must be an nn.Module or None, got {type(g)}")
        if g is f:
            raise ValueError(
                f"{type(self).__name__}: f and g are the same module; f maps x2 to x1's shape "
                "and g maps y1 to x2's shape, so pass two modules (copy.deepcopy(f))"
            )
        self.f = f
        self.g = g
        self.transform = transform if transform is not None else Additive()
        self.splitter = split if split is not None else ChannelSplit(1)

    @property
    def split_dim(self) -> int:
        return self.splitter.dim

    def _params(self, net: nn.Module, name: str, inp: Tensor, target: Tensor) -> Tensor:
        h = net(inp)
        dim = self.splitter.dim % target.dim()
        expected = list(target.shape)
        expected[dim] *= self.transform.factor
        if list(h.shape) != expected:
            per = " (scale and shift)" if self.transform.factor == 2 else ""
            raise ValueError(
                f"{type(self).__name__}: {name} maps {tuple(inp.shape)} to {tuple(h.shape)}; it "
                f"must map {'x2' if name == 'f' else 'y1'} ({inp.shape[dim]} ch) to "
                f"{tuple(expected)}{per}, the shape of {'x1' if name == 'f' else 'x2'} "
                f"({target.shape[dim]} ch) with dimension {dim} times {self.transform.factor}"
            )
        return h

    def forward_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        owner = type(self).__name__
        self.splitter.check(x, owner)
        dim = self.splitter.dim
        x1, x2 = self.splitter.split(x)
        rng_point("f")
        y1, ld1 = self.transform.forward(x1, self._params(self.f, "f", x2, x1), dim)
        if self.g is None:
            y2, ld2 = x2, None
        else:
            rng_point("g")
            y2, ld2 = self.transform.forward(x2, self._params(self.g, "g", y1, x2), dim)
        log_det = zero_log_det(x)
        for ld in (ld1, ld2):
            if ld is not None:
                log_det = log_det + ld
        return self.splitter.merge(y1, y2), log_det

    def inverse(self, y: Tensor) -> Tensor:
        self.splitter.check(y, type(self).__name__)
        dim = self.splitter.dim
        y1, y2 = self.splitter.split(y)
        x2 = y2 if self.g is None else self.transform.inverse(y2, self._params(self.g, "g", y1, y2), dim)
        x1 = self.transform.inverse(y1, self._params(self.f, "f", x2, y1), dim)
        return self.splitter.merge(x1, x2)

    def fused_backward(
        self,
        y: Tensor,
        dy: Tensor,
        dlog_det: Tensor | None,
        params: Sequence[Tensor],
        rng: RngTape,
    ) -> tuple[Tensor, Tensor, list[Tensor | None]]:
        """Rebuild ``x`` from ``y`` and back-propagate ``(dy, dlog_det)`` through the layer.

        Each sub-network is evaluated once, with grad; that evaluation yields both the rebuilt
        half and the vector-Jacobian product. Returns ``(x, dx, grads of params)``.
        """
        if isinstance(self.transform, Additive) and type(self.splitter) is ChannelSplit:
            return self._additive_backward(y, dy, params, rng)
        y1, y2 = self.splitter.split(y.detach())
        dy1, dy2 = self.splitter.split(dy)
        grads: list[Tensor | None] = [None] * len(params)
        if self.g is None:
            x2, dx2 = y2, dy2
        else:
            # 1. g(y1) once: rebuild x2, push dy2 (and dlog_det) into dy1 and g's parameters.
            x2, dx2, dy1_g = self._half_backward("g", y1, y2, dy2, dlog_det, params, grads, rng)
            dy1 = dy1 + dy1_g
        # 2. f(x2) once: rebuild x1, push dy1 (and dlog_det) into dx2 and f's parameters.
        x1, dx1, dx2_f = self._half_backward("f", x2, y1, dy1, dlog_det, params, grads, rng)
        return self.splitter.merge(x1, x2), self.splitter.merge(dx1, dx2 + dx2_f), grads

    def _additive_backward(self, y, dy, params, rng):
        """The additive case, written straight into the halves of preallocated ``x`` and ``dx``.

        ``x2 = y2 - g(y1)``, ``dx1 = dy1 + g'(y1)^T dy2``, ``x1 = y1 - f(x2)``,
        ``dx2 = dy2 + f'(x2)^T dx1``: no merge copies, no re-evaluation of the sum.
        """
        split = self.splitter.split
        y = y.detach()
        (y1, y2), (dy1, dy2) = split(y), split(dy)
        x, dx = torch.empty_like(y), torch.empty_like(dy)
        (x1, x2), (dx1, dx2) = split(x), split(dx)
        grads: list[Tensor | None] = [None] * len(params)
        if self.g is None:
            x2.copy_(y2)
            dx1.copy_(dy1)
        else:
            y1_ = y1.detach().requires_grad_(True)
            with torch.enable_grad(), rng.replay("g"):
                h = self._params(self.g, "g", y1_, y2)
            torch.sub(y2, h.detach(), out=x2)
            (dy1_g,) = _vjp(h, dy2.to(h.dtype), None, None, [y1_], params, grads)
            torch.add(dy1, dy1_g, out=dx1)
        x2_ = x2.detach().requires_grad_(True)
        with torch.enable_grad(), rng.replay("f"):
            h = self._params(self.f, "f", x2_, y1)
        # back-propagate before writing x1: x2_ shares x's storage and version counter
        (dx2_f,) = _vjp(h, dx1.to(h.dtype), None, None, [x2_], params, grads)
        torch.sub(y1, h.detach(), out=x1)
        torch.add(dy2, dx2_f, out=dx2)
        return x, dx, grads

    def _half_backward(self, name, cond, y_half, dy_half, dlog_det, params, grads, rng):
        """One sub-network evaluated once: rebuild the half it transformed and back-propagate.

        ``cond`` is the sub-network's input (``x2`` for ``f``, ``y1`` for ``g``), ``y_half`` the
        half it transformed. Returns ``(x_half, d x_half, d cond)``; parameter gradients are
        added to ``grads``.
        """
        dim = self.splitter.dim
        cond_ = cond.detach().requires_grad_(True)
        with torch.enable_grad(), rng.replay(name):
            h = self._params(self.f if name == "f" else self.g, name, cond_, y_half)
        with torch.no_grad():
            x_half = self.transform.inverse(y_half, h.detach(), dim)
        x_half_ = x_half.requires_grad_(True)
        with torch.enable_grad():
            y_re, log_det = self.transform.forward(x_half_, h, dim)
        dx_half, dcond = _vjp(y_re, dy_half, log_det, dlog_det, [x_half_, cond_], params, grads)
        return x_half_.detach(), dx_half, dcond

    def extra_repr(self) -> str:
        return f"transform={self.transform!r}, split={self.splitter!r}"


def _vjp(
    y: Tensor,
    dy: Tensor,
    log_det: Tensor | None,
    dlog_det: Tensor | None,
    inputs: list[Tensor],
    params: Sequence[Tensor],
    grads: list[Tensor | None],
) -> list[Tensor]:
    """Vector-Jacobian product of ``(y, log_det)``; accumulates parameter grads in ``grads``.

    Returns the gradients of ``inputs`` (zeros where an input was not used).
    """
    if not y.requires_grad:  # a sub-network that ignores its input and has no parameters
        return [torch.zeros_like(x) for x in inputs]
    outputs, grad_outputs = [y], [dy]
    if log_det is not None and dlog_det is not None and log_det.requires_grad:
        outputs.append(log_det)
        grad_outputs.append(dlog_det)
    found = torch.autograd.grad(
        outputs, [*inputs, *params], grad_outputs, allow_unused=True, materialize_grads=False
    )
    n = len(inputs)
    for i, grad in enumerate(found[n:]):
        if grad is not None:
            grads[i] = grad if grads[i] is None else grads[i] + grad
    return [torch.zeros_like(x) if d is None else d for x, d in zip(inputs, found[:n])]


class AdditiveCoupling(Coupling):
    r"""Additive coupling :math:`y_1 = x_1 + f(x_2)`, :math:`y_2 = x_2 + g(y_1)`.

    Volume preserving (log-det 0). ``f`` maps :math:`x_2` (``c - c // 2`` channels) to the shape
    of :math:`x_1` (``c // 2`` channels); ``g`` maps :math:`y_1` back to the shape of
    :math:`x_2`. With ``g=None`` only :math:`x_1` is transformed (NICE). memcnn's
    ``AdditiveCoupling(Fm, Gm=None)`` instead copies ``Fm``; pass ``g=copy.deepcopy(f)`` for that.

    Args:
        f: sub-network for the first half.
        g: sub-network for the second half, or ``None``.
        split_dim: the dimension split in two (1, channels, by default).
    """

    def __init__(self, f: nn.Module, g: nn.Module | None = None, split_dim: int = 1):
        super().__init__(f, g, Additive(), ChannelSplit(split_dim))


class AffineCoupling(Coupling):
    r"""Affine coupling :math:`y_1 = x_1 \odot e^{s_1} + t_1` with :math:`(s_1, t_1) = f(x_2)`.

    With ``g``, also :math:`y_2 = x_2 \odot e^{s_2} + t_2`, :math:`(s_2, t_2) = g(y_1)`.
    Sub-networks output the raw log-scale and the shift concatenated along ``split_dim``
    (twice the channels of the half they transform). The log-scale is soft-clamped,
    :math:`s = c \tanh(\tilde s / c)`, so that forward, inverse and log-det stay finite.

    Args:
        f: sub-network for the first half.
        g: sub-network for the second half, or ``None`` (RealNVP / Glow half coupling).
        split_dim: the dimension split in two.
        clamp: bound ``c`` on the absolute log-scale, or ``None``.
    """

    def __init__(
        self,
        f: nn.Module,
        g: nn.Module | None = None,
        split_dim: int = 1,
        clamp: float | None = 2.0,
    ):
        super().__init__(f, g, Affine(clamp), ChannelSplit(split_dim))
