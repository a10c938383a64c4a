"""Sub-networks for coupling layers: an MLP for vectors, a small CNN (Glow) and a residual
CNN (RealNVP) for images, and RealNVP's learned scale of the log-scales.

The last layer of each is initialised to zero, so that every coupling starts as the identity
(Glow's "zero-initialised convolution"); this makes deep flows trainable from the start.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["MLP", "ConvNet", "ResNet", "ResidualBlock", "LearnedTanhScale"]


class MLP(nn.Sequential):
    """``in_features -> hidden (x depth, ReLU) -> out_features`` with a zero last layer.

    Args:
        in_features: size of the input (the conditioning half).
        out_features: size of the output (transform parameters of the other half).
        hidden: width of the hidden layers.
        depth: number of hidden layers (at least 1).
    """

    def __init__(self, in_features: int, out_features: int, hidden: int = 64, depth: int = 2):
        if depth < 1:
            raise ValueError(f"MLP: depth must be at least 1, got {depth}")
        layers: list[nn.Module] = []
        width = in_features
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        last = nn.Linear(width, out_features)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        super().__init__(*layers, last)


class ConvNet(nn.Module):
    """Glow's coupling network: conv 3x3 -> ReLU -> conv 1x1 -> ReLU -> zero conv 3x3.

    Maps ``(B, in_channels, H, W)`` to ``(B, out_channels, H, W)``.
    """

    def __init__(self, in_channels: int, out_channels: int, hidden: int = 64):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(hidden, hidden, 1),
            nn.ReLU(),
            nn.Conv2d(hidden, out_channels, 3, padding=1),
        )
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    @staticmethod
    def zero_conv(in_channels: int, out_channels: int) -> nn.Conv2d:
        """A single zero-initialised 3x3 convolution (Glow's split prior)."""
        conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        nn.init.zeros_(conv.weight)
        nn.init.zeros_(conv.bias)
        return conv

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)  # (B, out_channels, H, W)


class ResidualBlock(nn.Module):
    """``x + conv3x3(relu(conv3x3(relu(x))))`` at a constant width (pre-activation)."""

    def __init__(self, channels: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.net(x)  # (B, C, H, W)


class ResNet(nn.Module):
    """RealNVP's coupling network: conv 3x3 -> ``num_blocks`` residual blocks -> ReLU -> zero
    conv 1x1.

    Maps ``(B, in_channels, H, W)`` to ``(B, out_channels, H, W)`` through ``hidden`` feature
    maps (Dinh et al. 2016, sec. 4.1: 8 blocks of 64 features on CIFAR-10). Unlike the paper,
    no batch or weight normalisation inside the network (the flow's ActNorm layers normalise
    between couplings), and the last layer starts at zero.

    Args:
        in_channels: channels of the conditioning input.
        out_channels: transform parameters per position.
        hidden: feature maps of every block.
        num_blocks: residual blocks (at least 1).
    """

    def __init__(self, in_channels: int, out_channels: int, hidden: int = 64,
                 num_blocks: int = 8):
        super().__init__()
        if num_blocks < 1:
            raise ValueError(f"ResNet: num_blocks must be at least 1, got {num_blocks}")
        last = nn.Conv2d(hidden, out_channels, 1)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 3, padding=1),
            *[ResidualBlock(hidden) for _ in range(num_blocks)],
            nn.ReLU(),
            last,
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)  # (B, out_channels, H, W)


class LearnedTanhScale(nn.Module):
    r"""RealNVP's bounded log-scale :math:`s = a \odot \tanh(\tilde s)` with a learned
    :math:`a` per channel, around a coupling sub-network.

    ``net`` outputs :math:`(\tilde s, t)` concatenated along dimension 1 (as for
    :class:`revtrain.Affine`); this module returns :math:`(a \odot \tanh(\tilde s), t)`, to be
    used with ``Affine(clamp=None)``, which then applies :math:`e^{s}` as it is. :math:`|s| \le
    |a|`; :math:`a` starts at 1 (with a zero-initialised ``net`` the coupling starts as the
    identity and both :math:`a` and the network receive gradients).

    Args:
        net: the sub-network; output ``(B, 2 * channels, ...)``.
        channels: transformed channels (the size of :math:`a`).
    """

    def __init__(self, net: nn.Module, channels: int):
        super().__init__()
        self.net = net
        self.scale = nn.Parameter(torch.ones(channels))

    def forward(self, x: Tensor) -> Tensor:
        s, t = self.net(x).chunk(2, dim=1)  # (B, C, ...) each
        if s.shape[1] != self.scale.numel():
            raise ValueError(f"LearnedTanhScale: the network gives log-scales for {s.shape[1]} "
                             f"channels, the scale has {self.scale.numel()}; build it with "
                             f"channels={s.shape[1]}")
        a = self.scale.view(1, -1, *([1] * (s.dim() - 2)))  # (1, C, 1, ...)
        return torch.cat([a * torch.tanh(s), t], dim=1)
