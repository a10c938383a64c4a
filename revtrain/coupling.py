r"""Coupling layers, written once: split, element-wise transform, merge, log-det.

A coupling splits its input into two parts :math:`(x_1, x_2)` and transforms each part
element-wise with parameters computed from the other part only:

.. math::
    y_1 = T(x_1; f(x_2)), \qquad y_2 = T(x_2; g(y_1))

so that the inverse needs only the sub-networks' forward passes:
:math:`x_2 = T^{-1}(y_2; g(y_1))`, :math:`x_1 = T^{-1}(y_1; f(x_2))`.
With ``g=None`` the second half passes through unchanged (:math:`y_2 = x_2`, the NICE /
RealNVP half coupling).

The element-wise transform :math:`T` is additive (:class:`Additive`, NICE, RevNet), affine
with a soft-clamped log-scale (:class:`Affine`, RealNVP, Glow), volume-preserving affine
(:class:`VolumePreservingAffine`, GIN) or a rational-quadratic spline
(:class:`revtrain.splines.RationalQuadratic`, neural spline flows).

References:
    Dinh et al., "NICE: Non-linear Independent Components Estimation", 2014.
    Dinh et al., "Density estimation using Real NVP", 2016.
    Gomez et al., "The Reversible Residual Network", 2017.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Generator
from functools import cache
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .base import InvertibleModule, takes_two_arguments, zero_log_det

__all__ = [
    "ElementwiseTransform",
    "Split",
    "Additive",
    "Affine",
    "SigmoidAffine",
    "VolumePreservingAffine",
    "ChannelSplit",
    "Coupling",
    "AdditiveCoupling",
    "AffineCoupling",
]


@runtime_checkable
class Split(Protocol):
    """How a :class:`Coupling` splits its input into two parts and merges them back.

    Implemented by :class:`ChannelSplit` and by the masks of :mod:`revtrain.flows`
    (``ChannelMask``, ``CheckerboardMask``). ``views``: ``split`` returns views of its input (an
    inverse may then write both parts into one buffer)."""

    def check(self, x: Tensor, owner: str) -> None: ...

    def split(self, x: Tensor) -> tuple[Tensor, Tensor]: ...

    def merge(self, x1: Tensor, x2: Tensor) -> Tensor: ...


@runtime_checkable
class ElementwiseTransform(Protocol):
    """The element-wise transform :math:`T` of a :class:`Coupling`.

    ``num_params`` values of the sub-network per transformed element (stacked along the split
    dimension); ``forward(x, h, dim) -> (y, log_det or None)`` with a log-det of shape
    ``(batch,)``; ``inverse(y, h, dim, out=None) -> x`` (``out``: a tensor to write ``x`` into,
    optional). Implemented by :class:`Additive`, :class:`Affine`, :class:`VolumePreservingAffine`
    and :class:`~revtrain.splines.RationalQuadratic`."""

    num_params: int

    def forward(self, x: Tensor, h: Tensor, dim: int) -> tuple[Tensor, Tensor | None]: ...

    def inverse(self, y: Tensor, h: Tensor, dim: int) -> Tensor: ...


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

    #: ``split`` returns views, so an inverse may write both halves into one buffer
    views = True

    def __repr__(self) -> str:
        return f"ChannelSplit(dim={self.dim})"


class _Transform:
    """Element-wise transforms: ``num_params`` values of the sub-network per transformed element
    (stacked along the split dimension), ``forward(x, h, dim) -> (y, log_det or None)`` with a
    log-det of shape ``(batch,)``, and ``inverse(y, h, dim) -> x``. When ``inverse`` also takes
    ``out=`` (a tensor to write ``x`` into, without grad), couplings rebuild both halves into one
    buffer, with no merge copy."""

    num_params = 1

    @property
    def factor(self) -> int:
        """Deprecated name of :attr:`num_params`."""
        warnings.warn("transform.factor is deprecated; use transform.num_params", DeprecationWarning,
                      stacklevel=2)
        return self.num_params


class Additive(_Transform):
    r"""Additive transform :math:`y = x + h`, log-det 0 (NICE, RevNet)."""

    num_params = 1  # the sub-network outputs one value per transformed element

    def forward(self, x: Tensor, h: Tensor, dim: int) -> tuple[Tensor, Tensor | None]:
        return x + h, None

    def inverse(self, y: Tensor, h: Tensor, dim: int, out: Tensor | None = None) -> Tensor:
        return torch.sub(y, h.to(y.dtype), out=out) if out is not None else y - h

    def __repr__(self) -> str:
        return "Additive()"


class Affine(_Transform):
    r"""Affine transform :math:`y = x \odot e^{s} + t` with a soft-clamped log-scale.

    The sub-network outputs :math:`(\tilde s, t)` concatenated along the split dimension and
    :math:`s = c \tanh(\tilde s / c)` keeps :math:`|s| < c` (``clamp``), so that forward, inverse
    and log-det stay finite for any sub-network output. ``clamp=None`` disables the clamp.
    The log-det is :math:`\sum s` over all non-batch dimensions.
    """

    num_params = 2
    param_names = "scale and shift"

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

    def inverse(self, y: Tensor, h: Tensor, dim: int, out: Tensor | None = None) -> Tensor:
        s, t = self._scale_shift(h, dim, y.dtype)
        if out is not None:
            return torch.mul(y - t, torch.exp(-s), out=out)
        return (y - t) * torch.exp(-s)

    def __repr__(self) -> str:
        return f"Affine(clamp={self.clamp})"


class SigmoidAffine(Affine):
    r"""The affine transform of the Glow code: :math:`y = (x + t) \odot \sigma(\tilde s + 2)`.

    The sub-network outputs :math:`(\tilde s, t)` as for :class:`Affine`; the scale is
    :math:`\sigma(\tilde s + 2) \in (0, 1)` (0.88 for a zero output) and the shift is added
    *before* scaling, as in openai/glow (``flow_coupling=1``) and rosinality/glow-pytorch. The
    log-scale :math:`s = \log\sigma(\tilde s + 2)` is computed with ``logsigmoid`` (exact for
    any :math:`\tilde s`), and the log-det is :math:`\sum s`. Inverse:
    :math:`x = y \odot e^{-s} - t`.

    The scale is bounded above (every coupling contracts), not below: a very negative
    :math:`\tilde s` makes :math:`e^{-s}` large in the inverse, as in the papers' code.

    Reference: Kingma & Dhariwal, "Glow", 2018, code ``model.py`` (``revnet2d_step``).
    """

    def __init__(self, offset: float = 2.0):
        super().__init__(None)
        self.offset = float(offset)

    def _scale_shift(self, h: Tensor, dim: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        raw, t = h.to(dtype).chunk(2, dim=dim)
        return F.logsigmoid(raw + self.offset), t

    def forward(self, x: Tensor, h: Tensor, dim: int) -> tuple[Tensor, Tensor]:
        s, t = self._scale_shift(h, dim, x.dtype)
        return (x + t) * torch.exp(s), s.flatten(1).sum(1)

    def inverse(self, y: Tensor, h: Tensor, dim: int, out: Tensor | None = None) -> Tensor:
        s, t = self._scale_shift(h, dim, y.dtype)
        if out is not None:
            return torch.sub(y * torch.exp(-s), t, out=out)
        return y * torch.exp(-s) - t

    def __repr__(self) -> str:
        return f"SigmoidAffine(offset={self.offset})"


class VolumePreservingAffine(Affine):
    r"""GIN's volume-preserving affine transform: :math:`y = x \odot e^{s} + t`, :math:`\sum s = 0`.

    As :class:`Affine` (soft-clamped log-scale), then the mean of the log-scales over all the
    transformed entries of each sample is subtracted, so that they sum to zero: every coupling
    preserves volume and its log-det is exactly 0 (returned as ``None``, like
    :class:`Additive`), while single entries are still scaled. A flow of such couplings has a
    constant Jacobian determinant; GIN trains it with a Gaussian-mixture prior (Sorrenson et
    al.), which any ``prior`` of the flow models can stand in for.

    Reference: Sorrenson, Rother & Köthe, "Disentanglement by Nonlinear ICA with General
    Incompressible-flow Networks (GIN)", ICLR 2020.
    """

    def _scale_shift(self, h: Tensor, dim: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        s, t = super()._scale_shift(h, dim, dtype)
        dims = tuple(range(1, s.dim()))
        return s - s.mean(dim=dims, keepdim=True), t

    def forward(self, x: Tensor, h: Tensor, dim: int) -> tuple[Tensor, None]:
        s, t = self._scale_shift(h, dim, x.dtype)
        return x * torch.exp(s) + t, None

    def __repr__(self) -> str:
        return f"VolumePreservingAffine(clamp={self.clamp})"


class Coupling(InvertibleModule):
    r"""A two-part coupling :math:`y_1 = T(x_1; f(x_2))`, :math:`y_2 = T(x_2; g(y_1))`.

    Args:
        f: sub-network from :math:`x_2` to the parameters of :math:`T` on :math:`x_1`
            (the shape of :math:`x_1`, with the split dimension multiplied by
            ``transform.num_params``).
        g: sub-network from :math:`y_1` to the parameters of :math:`T` on :math:`x_2`, or
            ``None`` for a half coupling (:math:`y_2 = x_2`). ``g`` may be ``f`` itself (tied
            weights) when both halves have the same shape.
        transform: the element-wise transform, :class:`Additive`, :class:`Affine`,
            :class:`VolumePreservingAffine` or :class:`~revtrain.splines.RationalQuadratic` (any object
            with ``num_params``, ``forward(x, h, dim) -> (y, log_det or None)`` and
            ``inverse(y, h, dim)``).
        split: how to split and merge; default :class:`ChannelSplit` along dimension 1.

    With a ``context`` (``layer(x, context)``), the sub-networks are called as ``f(x2, context)``
    and ``g(y1, context)``. In a reversible stack the coupling is rebuilt in backward with one
    evaluation of ``g`` and one of ``f`` (Gomez et al. 2017, Algorithm 1): its :meth:`inverse`
    calls them through :meth:`~revtrain.InvertibleModule.subnet`.
    """

    def __init__(
        self,
        f: nn.Module,
        g: nn.Module | None = None,
        transform: ElementwiseTransform | None = None,
        split: Split | None = None,
    ):
        super().__init__()
        if not isinstance(f, nn.Module):
            raise TypeError(f"{type(self).__name__}: f must be an nn.Module, got {type(f)}")
        if g is not None and not isinstance(g, nn.Module):
            raise TypeError(f"{type(self).__name__}: g must be an nn.Module or None, got {type(g)}")
        self.f = f
        self.g = g
        self.transform = transform if transform is not None else Additive()
        self.split = split if split is not None else ChannelSplit(1)

    @property
    def split_dim(self) -> int:
        return self.split.dim

    @property
    def splitter(self):
        """Deprecated name of :attr:`split`."""
        warnings.warn("Coupling.splitter is deprecated; use Coupling.split", DeprecationWarning,
                      stacklevel=2)
        return self.split

    def _params(self, name: str, net: nn.Module, inp: Tensor, target: Tensor, context) -> Tensor:
        if context is not None and not takes_two_arguments(type(net)):
            raise TypeError(
                f"{type(self).__name__}: a context was passed, but sub-network {name} "
                f"({type(net).__name__}) takes no context; give it a forward(x, context), e.g. "
                "revtrain.ConditionalNet(net, ...), or call the layer without a context")
        h = self.subnet(name, net, inp) if context is None else self.subnet(name, net, inp, context)
        dim = self.split.dim % target.dim()
        expected = list(target.shape)
        k = self.transform.num_params
        expected[dim] *= k
        if not isinstance(h, Tensor) or list(h.shape) != expected:
            got = tuple(h.shape) if isinstance(h, Tensor) else type(h).__name__
            per = f" ({getattr(self.transform, 'param_names', f'{k} values per element')})" if k > 1 else ""
            raise ValueError(
                f"{type(self).__name__}: {name} maps {tuple(inp.shape)} to {got}; it "
                f"must map {'x2' if name == 'f' else 'y1'} ({inp.shape[dim]} ch) to "
                f"{tuple(expected)}{per}, the shape of {'x1' if name == 'f' else 'x2'} "
                f"({target.shape[dim]} ch) with dimension {dim} times {k}"
            )
        return h

    def forward_and_log_det(self, x: Tensor, context=None) -> tuple[Tensor, Tensor]:
        self.split.check(x, type(self).__name__)
        dim = self.split.dim
        x1, x2 = self.split.split(x)
        y1, ld1 = self.transform.forward(x1, self._params("f", self.f, x2, x1, context), dim)
        if self.g is None:
            y2, ld2 = x2, None
        else:
            y2, ld2 = self.transform.forward(x2, self._params("g", self.g, y1, x2, context), dim)
        log_det = zero_log_det(x)
        for ld in (ld1, ld2):
            if ld is not None:
                log_det = log_det + ld
        return self.split.merge(y1, y2), log_det

    def inverse(self, y: Tensor, context=None) -> Tensor:
        steps = self.inverse_steps(y, context)
        while True:
            try:
                next(steps)
            except StopIteration as done:
                return done.value

    def inverse_steps(self, y: Tensor, context=None, *, overwrite: bool = False
                      ) -> Generator[str, bool | None, Tensor]:
        """:meth:`inverse` one sub-network at a time: a generator that yields the name of each
        sub-network (``"g"``, then ``"f"``) once it has been evaluated, and returns ``x``.

        The reversible engine drives it lazily in backward, so that a sub-network is evaluated
        only when autograd first needs what it saved (``f``'s saved tensors are not alive during
        ``g``'s backward). A subclass that overrides :meth:`inverse` is rebuilt with its own
        :meth:`inverse` in one go instead.

        ``overwrite=True`` (the engine, for a ``y`` that it rebuilt itself and that nobody else
        holds; :class:`Additive` only): ``x`` is written into ``y``'s memory, ``x_2`` over
        ``y_2`` at once and ``x_1`` over ``y_1`` if the engine sends ``True`` at the ``"g"``
        step (what ``g`` saved has been used), else into a new buffer.
        """
        self.split.check(y, type(self).__name__)
        dim = self.split.dim
        y1, y2 = self.split.split(y)
        if self.rebuilds_into_buffer(y):
            return (yield from self._inverse_into_buffer(y, y1, y2, context, overwrite))
        if self.g is None:
            x2 = y2
        else:
            x2 = self.transform.inverse(y2, self._params("g", self.g, y1, y2, context), dim)
            yield "g"
        x1 = self.transform.inverse(y1, self._params("f", self.f, x2, y1, context), dim)
        yield "f"
        return self.split.merge(x1, x2)

    def rebuilds_into_buffer(self, y: Tensor) -> bool:
        """Whether :meth:`inverse` of ``y`` writes both halves into one new tensor (without grad,
        a split into views, a transform whose ``inverse`` takes ``out=``)."""
        return (not torch.is_grad_enabled() and _split_views(self.split, y)
                and _inverse_takes_out(type(self.transform)))

    def replay_elementwise(self, x: Tensor, outputs: dict[str, Tensor]) -> bool:
        """Re-run the element-wise transforms of a forward pass, given the sub-networks' outputs.

        Used by the engine to regenerate what the transforms saved for backward, without the
        merge of the outputs. Returns ``False`` (and does nothing) when the split saves tensors
        of its own, so that the whole forward must be re-run.
        """
        if not _split_views(self.split, x):
            return False
        dim = self.split.dim
        x1, x2 = self.split.split(x)
        self.transform.forward(x1, outputs.pop("f"), dim)
        if self.g is not None:
            self.transform.forward(x2, outputs.pop("g"), dim)
        return True

    def _inverse_into_buffer(self, y, y1, y2, context, overwrite: bool = False
                             ) -> Generator[str, bool | None, Tensor]:
        # both halves written into one tensor: no merge copy, no second copy of x2 (the rebuild
        # in backward keeps x2 for f's backward and x for the layer before). Writes go through
        # .data where a view of the same memory may already be saved (its version must not change)
        dim = self.split.dim
        x = y if overwrite else torch.empty_like(y)
        x2 = self.split.split(x.data)[1]  # with overwrite: over y2, which nothing saved
        if self.g is None:
            if not overwrite:
                x2.copy_(y2)
        else:
            self.transform.inverse(y2, self._params("g", self.g, y1, y2, context), dim, out=x2)
            used = yield "g"
            if overwrite and not used:  # what g saved of y1 is still to be used: not over it
                x = torch.empty_like(y)
                self.split.split(x)[1].copy_(x2)
        h = self._params("f", self.f, self.split.split(x)[1], y1, context)
        self.transform.inverse(y1, h, dim, out=self.split.split(x.data)[0])
        yield "f"
        return x

    def extra_repr(self) -> str:
        return f"transform={self.transform!r}, split={self.split!r}"


def _split_views(split, x: Tensor) -> bool:
    """Whether ``split.split(x)`` returns views of ``x``: a split's ``views`` attribute, a bool
    or a function of the input (a checkerboard mask: for vectors only)."""
    views = getattr(split, "views", False)
    return bool(views(x)) if callable(views) else bool(views)


@cache
def _inverse_takes_out(cls: type) -> bool:
    try:
        return "out" in inspect.signature(cls.inverse).parameters
    except (TypeError, ValueError, AttributeError):
        return False


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
