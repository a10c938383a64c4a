"""Cheap invertible layers with a closed-form inverse and no sub-network.

Shared by the i-RevNet classifiers and the flows: space-to-depth (squeeze / psi), injective
zero channel padding, and a fixed channel permutation (including the half swap).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import InvertibleModule, zero_log_det

__all__ = ["Squeeze", "InjectivePad", "ChannelPermute", "SwapHalves"]


class Squeeze(InvertibleModule):
    r"""Invertible space-to-depth: ``(B, C, H, W) -> (B, C k^2, H / k, W / k)``.

    The i-RevNet "psi" / Glow "squeeze" operator; a permutation of elements, log-det 0.
    Output channel ``c * k * k + i * k + j`` holds pixel ``(k h + i, k w + j)`` of channel ``c``:
    :func:`torch.nn.functional.pixel_unshuffle`, and ``inverse`` is ``pixel_shuffle``.

    Args:
        block_size: the block size ``k`` (2 by default); ``H`` and ``W`` must be multiples of it.
        factor: deprecated name of ``block_size``.

    >>> Squeeze(2)(torch.arange(16.0).reshape(1, 1, 4, 4))[0, :, 0, 0]
    tensor([0., 1., 4., 5.])
    """

    def __init__(self, block_size: int = 2, factor: int | None = None):
        super().__init__()
        if factor is not None:
            warnings.warn("Squeeze(factor=...) is now Squeeze(block_size=...)", FutureWarning,
                          stacklevel=2)
            block_size = factor
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"Squeeze: block_size must be a positive int, got {block_size!r}")
        self.block_size = block_size

    @property
    def factor(self) -> int:
        """Deprecated name of :attr:`block_size`."""
        warnings.warn("Squeeze.factor is now Squeeze.block_size", FutureWarning, stacklevel=2)
        return self.block_size

    def _check(self, x: Tensor) -> None:
        if x.dim() != 4:
            raise ValueError(f"Squeeze expects (B, C, H, W), got shape {tuple(x.shape)}")
        k = self.block_size
        if x.shape[2] % k or x.shape[3] % k:
            raise ValueError(
                f"Squeeze: height and width must be multiples of {k}, got {x.shape[2]}x"
                f"{x.shape[3]}; pad or crop the input to an even size (e.g. 32x32)"
            )

    def forward_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        self._check(x)
        return F.pixel_unshuffle(x, self.block_size), zero_log_det(x)  # (B, C k^2, H/k, W/k)

    def inverse(self, y: Tensor) -> Tensor:
        k = self.block_size
        if y.dim() != 4 or y.shape[1] % (k * k):
            raise ValueError(f"Squeeze.inverse: expects (B, C {k * k}, h, w), got shape "
                             f"{tuple(y.shape)}: the channels must be a multiple of {k * k}")
        return F.pixel_shuffle(y, k)  # (B, C, h k, w k)

    def extra_repr(self) -> str:
        return f"block_size={self.block_size}"


class InjectivePad(InvertibleModule):
    """Append ``pad`` zero channels: ``(B, C, ...) -> (B, C + pad, ...)`` (i-RevNet (a)).

    Injective, not bijective: ``inverse`` drops the padded channels, a left inverse only.
    """

    bijective = False

    def __init__(self, pad: int):
        super().__init__()
        if not isinstance(pad, int) or pad < 0:
            raise ValueError(f"InjectivePad: pad must be a non-negative int, got {pad!r}")
        self.pad = pad

    def forward(self, x: Tensor) -> Tensor:
        if self.pad == 0:
            return x
        zeros = x.new_zeros((x.shape[0], self.pad, *x.shape[2:]))
        return torch.cat([x, zeros], dim=1)

    def forward_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError("InjectivePad is not bijective: it has no log-det")

    def inverse(self, y: Tensor) -> Tensor:
        if y.shape[1] <= self.pad:
            raise ValueError(f"InjectivePad.inverse: {y.shape[1]} channels, expected more than "
                             f"the {self.pad} padded ones")
        return y[:, : y.shape[1] - self.pad]

    def extra_repr(self) -> str:
        return f"pad={self.pad}"


class ChannelPermute(InvertibleModule):
    """A fixed permutation of the channels (dimension 1), log-det 0.

    Glow's "reverse" and "shuffle" alternatives to the invertible 1x1 convolution (Kingma &
    Dhariwal 2018, sec. 3.2) are ``ChannelPermute(torch.arange(C).flip(0))`` and
    ``ChannelPermute(torch.randperm(C))``. The permutation is a buffer: it is saved with the
    model.

    Args:
        permutation: output channel ``i`` is input channel ``permutation[i]``.

    >>> ChannelPermute([2, 0, 1])(torch.tensor([[10.0, 11.0, 12.0]]))
    tensor([[12., 10., 11.]])
    """

    def __init__(self, permutation: Tensor | list[int]):
        super().__init__()
        perm = torch.as_tensor(permutation, dtype=torch.long)
        if perm.dim() != 1 or not torch.equal(perm.sort().values, torch.arange(len(perm))):
            raise ValueError(f"ChannelPermute: {permutation!r} is not a permutation of 0..n-1")
        self.register_buffer("permutation", perm)
        self.register_buffer("inverse_permutation", perm.argsort())

    def _check(self, x: Tensor) -> None:
        if x.dim() < 2 or x.shape[1] != len(self.permutation):
            raise ValueError(f"ChannelPermute: expects {len(self.permutation)} channels in "
                             f"dimension 1, got shape {tuple(x.shape)}")

    def forward_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        self._check(x)
        return x.index_select(1, self.permutation), zero_log_det(x)

    def inverse(self, y: Tensor) -> Tensor:
        self._check(y)
        return y.index_select(1, self.inverse_permutation)

    def extra_repr(self) -> str:
        return f"channels={len(self.permutation)}"


class SwapHalves(InvertibleModule):
    """``(x1, x2) -> (x2, x1)`` along dimension 1, halves ``c // 2`` and ``c - c // 2``."""

    def forward_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        c = x.shape[1]
        x1, x2 = torch.split(x, [c // 2, c - c // 2], dim=1)
        return torch.cat([x2, x1], dim=1), zero_log_det(x)

    def inverse(self, y: Tensor) -> Tensor:
        c = y.shape[1]
        y2, y1 = torch.split(y, [c - c // 2, c // 2], dim=1)
        return torch.cat([y1, y2], dim=1)
