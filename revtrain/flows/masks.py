r"""Masks for couplings: split objects for :class:`revtrain.Coupling` (RealNVP's two masks).

A split object has ``dim``, ``check(x, owner)``, ``split(x) -> (x1, x2)`` and
``merge(x1, x2)``; the coupling transforms ``x1`` with parameters computed from ``x2``.

* :class:`ChannelMask` splits the channels (dimension 1) in two; ``flip=True`` exchanges the
  roles of the halves, so that alternating masks transform every channel.
* :class:`CheckerboardMask` splits the positions of an image by the parity of ``h + w``
  (RealNVP's checkerboard) or the entries of a vector by the parity of their index. The halves
  are *packed*: for ``(B, C, H, W)`` each half is ``(B, C, H, W / 2)``, so the coupling's
  element-wise transform and its log-det cover exactly the transformed entries. A sub-network
  that needs the spatial layout is wrapped in :class:`CheckerboardNet`, which unpacks its
  input onto the full grid (zeros at the other half, plus a mask channel) and packs its output.

Reference: Dinh et al., "Density estimation using Real NVP", 2016.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["ChannelMask", "CheckerboardMask", "CheckerboardNet"]


class ChannelMask:
    """Split dimension 1 into ``x1`` (``c // 2`` channels, transformed) and ``x2`` (the rest).

    Args:
        flip: ``False``: ``x1`` is the first ``c // 2`` channels. ``True``: ``x1`` is the last
            ``c // 2`` channels and ``x2`` the first ``c - c // 2``.
    """

    dim = 1

    def __init__(self, flip: bool = False):
        self.flip = bool(flip)

    def check(self, x: Tensor, owner: str) -> None:
        if x.dim() < 2 or x.shape[1] < 2:
            raise ValueError(
                f"{owner}: a channel mask needs at least 2 channels in dimension 1, got an input "
                f"of shape {tuple(x.shape)}; use a CheckerboardMask or squeeze the input first"
            )

    def split(self, x: Tensor) -> tuple[Tensor, Tensor]:
        c = x.shape[1]
        if self.flip:
            x2, x1 = torch.split(x, [c - c // 2, c // 2], dim=1)
        else:
            x1, x2 = torch.split(x, [c // 2, c - c // 2], dim=1)
        return x1, x2

    def merge(self, x1: Tensor, x2: Tensor) -> Tensor:
        return torch.cat([x2, x1] if self.flip else [x1, x2], dim=1)

    def __repr__(self) -> str:
        return f"ChannelMask(flip={self.flip})"


class CheckerboardMask:
    r"""Split by parity: entries with :math:`(h + w + \text{parity}) \bmod 2 = 0` are ``x1``.

    For vectors ``(B, D)`` the parity of the index is used (``D >= 2``); for images
    ``(B, C, H, W)`` the parity of :math:`h + w` (``W`` even), and each half is packed to
    ``(B, C, H, W / 2)``.

    Args:
        parity: 0 or 1; alternate it between layers so that every entry is transformed.
    """

    dim = 1

    def __init__(self, parity: int = 0):
        if parity not in (0, 1):
            raise ValueError(f"CheckerboardMask: parity must be 0 or 1, got {parity!r}")
        self.parity = parity

    def check(self, x: Tensor, owner: str) -> None:
        if x.dim() == 2:
            if x.shape[1] < 2:
                raise ValueError(f"{owner}: a checkerboard mask needs at least 2 features, got "
                                 f"shape {tuple(x.shape)}")
        elif x.dim() == 4:
            if x.shape[3] % 2:
                raise ValueError(
                    f"{owner}: a checkerboard mask needs an even width, got an input of shape "
                    f"{tuple(x.shape)}; pad or crop the image to an even width"
                )
        else:
            raise ValueError(f"{owner}: a checkerboard mask expects (B, D) or (B, C, H, W), got "
                             f"shape {tuple(x.shape)}")

    def index(self, height: int, width: int, part: int, device: torch.device) -> Tensor:
        """Columns of half ``part`` (1 or 2) in each row: a ``(H, W / 2)`` long tensor."""
        rows = torch.arange(height, device=device).unsqueeze(1)  # (H, 1)
        cols = 2 * torch.arange(width // 2, device=device).unsqueeze(0)  # (1, W/2)
        offset = (rows + self.parity + (part - 1)) % 2
        return cols + offset  # (H, W/2)

    def _gather_index(self, x: Tensor, part: int, width: int) -> Tensor:
        b, c, h, _ = x.shape
        return self.index(h, width, part, x.device).expand(b, c, h, width // 2)

    def pack(self, x: Tensor, part: int) -> Tensor:
        """The entries of half ``part`` of a full ``x``."""
        if x.dim() == 2:
            start = self.parity if part == 1 else 1 - self.parity
            return x[:, start::2]
        return x.gather(3, self._gather_index(x, part, x.shape[3]))  # (B, C, H, W/2)

    def unpack(self, xp: Tensor, part: int, fill: float = 0.0) -> Tensor:
        """Half ``part`` placed on the full grid, ``fill`` at the other half (images only)."""
        b, c, h, w2 = xp.shape
        full = xp.new_full((b, c, h, 2 * w2), fill)
        return full.scatter(3, self._gather_index(xp, part, 2 * w2), xp)  # (B, C, H, W)

    def split(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.pack(x, 1), self.pack(x, 2)

    def views(self, x: Tensor) -> bool:
        """Whether :meth:`split` returns views of ``x`` (vectors: strided slices), so that a
        coupling may write both halves into one buffer and re-run only its transform."""
        return x.dim() == 2

    def merge(self, x1: Tensor, x2: Tensor) -> Tensor:
        if x1.dim() == 2:
            # interleave the even and the odd entries; stack / pad / slice save nothing for
            # backward and need no index tensor
            even, odd = (x1, x2) if self.parity == 0 else (x2, x1)  # (B, ceil(D/2)), (B, D//2)
            d = even.shape[1] + odd.shape[1]
            if odd.shape[1] != even.shape[1]:
                odd = torch.nn.functional.pad(odd, (0, 1))
            return torch.stack([even, odd], dim=2).flatten(1)[:, :d]  # (B, D)
        return self.unpack(x1, 1) + self.unpack(x2, 2)

    def __repr__(self) -> str:
        return f"CheckerboardMask(parity={self.parity})"


class CheckerboardNet(nn.Module):
    """Give a convolutional sub-network the spatial layout of a checkerboard half.

    Input: the packed conditioning half ``x2`` ``(B, C, H, W / 2)``. It is unpacked onto the
    full grid with zeros at the other half, a channel marking the known positions is appended,
    ``net`` maps ``(B, C + 1, H, W)`` to ``(B, K, H, W)``, and the output is packed at the
    positions of ``x1``: ``(B, K, H, W / 2)``.

    Args:
        net: the convolutional network (input channels ``C + 1``).
        mask: the :class:`CheckerboardMask` of the coupling this network serves.
    """

    def __init__(self, net: nn.Module, mask: CheckerboardMask):
        super().__init__()
        self.net = net
        self.mask = mask

    def forward(self, x2: Tensor) -> Tensor:
        full = self.mask.unpack(x2, 2)  # (B, C, H, W)
        known = self.mask.unpack(torch.ones_like(x2[:, :1]), 2)  # (B, 1, H, W)
        h = self.net(torch.cat([full, known], dim=1))  # (B, K, H, W)
        return self.mask.pack(h, 1)  # (B, K, H, W/2)
