"""Sub-networks for coupling layers: an MLP for vectors and a small CNN for images.

The last layer of each is initialised to zero, so that every coupling starts as the identity
(Glow's "zero-initialised convolution"); this makes deep flows trainable from the start.
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["MLP", "ConvNet"]


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
