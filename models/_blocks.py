"""Building blocks shared by the classifier families: residual functions, stems, heads.

The residual functions follow the pre-activation ResNet (He et al. 2016b): each convolution
is preceded by BatchNorm and ReLU. RevNet uses them as the coupling functions :math:`F, G`
on half the channels; the ResNet baselines use them on all channels.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "basic_residual",
    "bottleneck_residual",
    "ZeroPadShortcut",
    "conv_stem",
    "ClassifierHead",
    "check_input",
]


def _preact(channels: int) -> list[nn.Module]:
    return [nn.BatchNorm2d(channels), nn.ReLU()]


def basic_residual(
    in_channels: int,
    out_channels: int,
    stride: int = 1,
    preactivate: bool = True,
    dropout: float = 0.0,
) -> nn.Sequential:
    """BN-ReLU-conv3x3(stride)-BN-ReLU-[dropout]-conv3x3, the basic residual function.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        stride: stride of the first convolution (downsampling by ``stride``).
        preactivate: start with BN-ReLU; ``False`` right after a stem that already ends
            with BN-ReLU (the first unit of a network).
        dropout: dropout probability between the two convolutions (0 disables it).
    """
    layers = _preact(in_channels) if preactivate else []
    layers += [nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)]
    layers += _preact(out_channels)
    if dropout > 0:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False))
    return nn.Sequential(*layers)


def bottleneck_residual(
    in_channels: int,
    out_channels: int,
    stride: int = 1,
    preactivate: bool = True,
    dropout: float = 0.0,
) -> nn.Sequential:
    """BN-ReLU-conv1x1-BN-ReLU-conv3x3(stride)-BN-ReLU-[dropout]-conv1x1, width ``out / 4``.

    The stride sits on the 3x3 convolution (as in torchvision); the RevNet code puts it on
    the first 1x1 convolution. The parameter count is the same.
    """
    if out_channels % 4:
        raise ValueError(f"bottleneck_residual: out_channels={out_channels} must be a multiple "
                         "of 4 (the bottleneck width is out_channels / 4)")
    width = out_channels // 4
    layers = _preact(in_channels) if preactivate else []
    layers += [nn.Conv2d(in_channels, width, 1, bias=False), *_preact(width)]
    layers += [nn.Conv2d(width, width, 3, stride, 1, bias=False), *_preact(width)]
    if dropout > 0:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Conv2d(width, out_channels, 1, bias=False))
    return nn.Sequential(*layers)


class ZeroPadShortcut(nn.Module):
    """Parameter-free shortcut: average-pool by ``stride``, then zero-pad the channels.

    ``(B, C_in, H, W) -> (B, C_out, H / s, W / s)`` with ``(C_out - C_in) / 2`` zero channels
    on each side (ResNet "option A", used by the CIFAR ResNets and RevNets).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        if out_channels < in_channels or (out_channels - in_channels) % 2:
            raise ValueError(f"ZeroPadShortcut: cannot pad {in_channels} channels to "
                             f"{out_channels}; the difference must be even and >= 0")
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride

    def forward(self, x: Tensor) -> Tensor:
        if self.stride > 1:
            x = F.avg_pool2d(x, self.stride)  # (B, C_in, H/s, W/s)
        pad = (self.out_channels - self.in_channels) // 2
        if pad:
            x = F.pad(x, (0, 0, 0, 0, pad, pad))  # (B, C_out, H/s, W/s)
        return x

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, stride={self.stride}"


def conv_stem(in_channels: int, out_channels: int, imagenet: bool) -> nn.Sequential:
    """conv-BN-ReLU stem: 3x3 stride 1 (CIFAR) or 7x7 stride 2 + 3x3 max-pool (ImageNet)."""
    if imagenet:
        return nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 7, 2, 3, bias=False),
            *_preact(out_channels),
            nn.MaxPool2d(3, 2, 1),
        )
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, 1, 1, bias=False),
                         *_preact(out_channels))


class ClassifierHead(nn.Module):
    """BN-ReLU, global average pooling, linear: ``(B, C, H, W) -> (B, num_classes)``."""

    def __init__(self, channels: int, num_classes: int):
        super().__init__()
        self.norm = nn.BatchNorm2d(channels)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.norm(x))
        return self.fc(x.mean(dim=(2, 3)))  # (B, num_classes)


def check_input(x: Tensor, owner: str, channels: int, multiple: int) -> None:
    """Raise a ``ValueError`` naming the expected shape unless ``x`` is ``(B, channels, H, W)``
    with ``H`` and ``W`` multiples of ``multiple``."""
    expected = f"(B, {channels}, H, W) with H and W multiples of {multiple}"
    if x.dim() != 4 or x.shape[1] != channels:
        raise ValueError(f"{owner} expects input of shape {expected}; got {tuple(x.shape)}"
                         + (f" ({x.shape[1]} channels)" if x.dim() == 4 else ""))
    if x.shape[2] % multiple or x.shape[3] % multiple:
        raise ValueError(
            f"{owner} expects input of shape {expected}, because it downsamples by "
            f"{multiple}; got {tuple(x.shape)}. Pad or crop the image to such a size"
        )
