r"""i-RevNet classifiers (Jacobsen et al. 2018): invertible up to the final projection.

The input is injected into the representation space by an optional space-to-depth
(:class:`~revtrain.Squeeze`, the paper's :math:`\tilde S`) and optional zero channels
(:class:`~revtrain.InjectivePad`, the injective variant). Everything after that is ONE
:class:`~revtrain.ReversibleSequential` of i-RevNet blocks

.. math::
    (x_1, x_2) \mapsto \big(S(x_2),\; S(x_1) + F(x_2)\big)

where :math:`S` is the identity or, in a downsampling block, the invertible space-to-depth
:math:`\psi` applied to each half, and :math:`F` is a stride-:math:`s` bottleneck
(BN-ReLU-conv3x3-BN-ReLU-conv3x3-dropout-BN-ReLU-conv3x3, width ``C_out / mult``) that reads
:math:`x_2` at full resolution. The inverse is
:math:`x_2 = S^{-1}(y_2)`, :math:`x_1 = S^{-1}(y_1 - F(x_2))`. Because downsampling is
invertible too, activation memory does not grow with depth anywhere in the network, and
:meth:`IRevNet.inverse` rebuilds the input image from the final representation.

The classifier head (BN-ReLU, global average pooling, linear) is the only non-invertible part.

One deliberate difference from the authors' code: with injective padding they append the zero
channels after the image, so the first block's :math:`x_2` is all zeros and its :math:`F`
computes a constant. Here the padded input's halves are swapped (zeros in :math:`x_1`, the
image in :math:`x_2`), so the first block's :math:`F` reads the image. Same parameters.

Channel convention (as in the authors' code): ``channels[i]`` is the number of channels of
*each half* in stage ``i``; a stride-2 stage has ``4x`` the half-channels of the previous one.

Reference:
    Jacobsen, Smeulders, Oyallon, "i-RevNet: Deep Invertible Networks", ICLR 2018;
    configurations from the authors' repository (jhjacobsen/pytorch-i-revnet, README).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from revtrain import (
    InjectivePad,
    InvertibleModule,
    MemoryMode,
    ReversibleSequential,
    Squeeze,
    SwapHalves,
)
from revtrain.base import zero_log_det
from revtrain.modes import MemoryModeMixin

from ._blocks import ClassifierHead, check_input
from ._registry import register_model

__all__ = ["IRevNetBlock", "IRevNet", "irevnet", "irevnet_a", "irevnet_b", "irevnet_digits"]


def _bottleneck(in_channels: int, out_channels: int, stride: int, preactivate: bool,
                mult: int, dropout: float, affine_bn: bool) -> nn.Sequential:
    width = out_channels // mult
    if width < 1:
        raise ValueError(f"IRevNetBlock: bottleneck width {out_channels} // mult={mult} is 0; "
                         "use a smaller mult or more channels")
    layers: list[nn.Module] = []
    if preactivate:
        layers += [nn.BatchNorm2d(in_channels, affine=affine_bn), nn.ReLU()]
    layers += [nn.Conv2d(in_channels, width, 3, stride, 1, bias=False),
               nn.BatchNorm2d(width, affine=affine_bn), nn.ReLU(),
               nn.Conv2d(width, width, 3, 1, 1, bias=False)]
    if dropout > 0:
        layers.append(nn.Dropout(dropout))
    layers += [nn.BatchNorm2d(width, affine=affine_bn), nn.ReLU(),
               nn.Conv2d(width, out_channels, 3, 1, 1, bias=False)]
    return nn.Sequential(*layers)


class IRevNetBlock(InvertibleModule):
    r"""The i-RevNet block :math:`(x_1, x_2) \mapsto (S(x_2), S(x_1) + F(x_2))`.

    Args:
        channels: channels of the input, ``C`` (two halves of ``C / 2``; must be even).
        stride: 1, or 2 for a downsampling block (:math:`S` = space-to-depth per half).
        preactivate: start :math:`F` with BN-ReLU (``False`` for the network's first block).
        mult: bottleneck divisor, :math:`F`'s hidden width is ``C_out / (2 mult)``.
        dropout: dropout inside :math:`F` (replayed exactly in backward).
        affine_bn: learnable BatchNorm scale and shift.

    Shapes: ``(B, C, H, W) -> (B, C s^2, H / s, W / s)``, volume preserving (log-det 0).
    In a reversible stack the block is rebuilt in backward with ONE evaluation of :math:`F`
    (it is called through :meth:`~revtrain.InvertibleModule.subnet`).
    """

    def __init__(self, channels: int, stride: int = 1, preactivate: bool = True, mult: int = 4,
                 dropout: float = 0.0, affine_bn: bool = True):
        super().__init__()
        if channels % 2 or channels < 2:
            raise ValueError(f"IRevNetBlock: channels={channels} must be even (two halves)")
        if stride not in (1, 2):
            raise ValueError(f"IRevNetBlock: stride must be 1 or 2, got {stride}")
        self.channels, self.stride = channels, stride
        half = channels // 2
        self.f = _bottleneck(half, half * stride**2, stride, preactivate, mult, dropout,
                             affine_bn)
        self.psi = Squeeze(2) if stride == 2 else None

    def _s(self, x: Tensor) -> Tensor:
        return x if self.psi is None else self.psi(x)

    def _s_inv(self, y: Tensor) -> Tensor:
        return y if self.psi is None else self.psi.inverse(y)

    def forward_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        check_input(x, type(self).__name__, self.channels, self.stride)
        x1, x2 = x.chunk(2, dim=1)  # (B, C/2, H, W) each
        y1 = self._s(x1) + self.subnet("f", self.f, x2)  # (B, C s^2 / 2, H/s, W/s)
        y2 = self._s(x2)
        return torch.cat([y2, y1], dim=1), zero_log_det(x)

    def inverse(self, y: Tensor) -> Tensor:
        y2, y1 = y.chunk(2, dim=1)
        x2 = self._s_inv(y2)  # (B, C/2, H, W)
        x1 = self._s_inv(y1 - self.subnet("f", self.f, x2))
        return torch.cat([x1, x2], dim=1)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, stride={self.stride}"


class IRevNet(MemoryModeMixin, nn.Module):
    """An i-RevNet classifier: injection, one reversible stack, linear head.

    Args:
        blocks: blocks per stage.
        strides: stride (1 or 2) of the first block of each stage.
        channels: channels of each half in each stage (the authors' ``nChannels``).
        in_channels: channels of the input image.
        num_classes: outputs of the linear head.
        init_ds: block size of an initial space-to-depth (0: none; 2 in the ImageNet models).
        mult: bottleneck divisor of the residual functions.
        dropout: dropout inside every residual function.
        affine_bn: learnable BatchNorm affine parameters inside the residual functions.
        memory: ``"reversible"``, ``"checkpoint"`` or ``"stored"`` (the twin).

    When the first stage (stride 1) has more channels than the injected input, zeros are
    appended (injective i-RevNet); otherwise the network is bijective up to the head.
    Input ``(B, in_channels, H, W)`` with ``H, W`` multiples of :attr:`input_multiple`.
    """

    def __init__(
        self,
        blocks: Sequence[int],
        strides: Sequence[int],
        channels: Sequence[int],
        in_channels: int = 3,
        num_classes: int = 10,
        init_ds: int = 0,
        mult: int = 4,
        dropout: float = 0.0,
        affine_bn: bool = True,
        memory: MemoryMode | str = "reversible",
    ):
        super().__init__()
        if not (len(blocks) == len(strides) == len(channels) > 0):
            raise ValueError(f"IRevNet: blocks, strides and channels need one value per stage, "
                             f"got {list(blocks)}, {list(strides)}, {list(channels)}")
        if any(b < 1 for b in blocks) or any(s not in (1, 2) for s in strides):
            raise ValueError(f"IRevNet: blocks must be positive and strides 1 or 2, got "
                             f"{list(blocks)} and {list(strides)}")
        if init_ds not in (0, 1, 2, 4, 8):
            raise ValueError(f"IRevNet: init_ds must be 0 (none) or a block size 2, 4, 8; "
                             f"got {init_ds}")
        if not 0.0 <= dropout < 1.0 or num_classes < 1 or in_channels < 1:
            raise ValueError("IRevNet: need 0 <= dropout < 1 and positive num_classes, "
                             "in_channels")
        memory = MemoryMode.parse(memory)
        self.in_channels, self.num_classes, self.init_ds = in_channels, num_classes, init_ds
        k = max(init_ds, 1)
        self.input_multiple = k * 2 ** list(strides).count(2)
        self.squeeze = Squeeze(k) if k > 1 else None
        c = in_channels * k * k  # channels after the initial space-to-depth
        pad = 2 * channels[0] - c if strides[0] == 1 else 0
        if pad < 0:
            raise ValueError(f"IRevNet: the first stage has 2 x {channels[0]} channels, fewer "
                             f"than the {c} of the injected input; use channels[0] >= {c / 2}")
        self.pad = InjectivePad(pad) if pad > 0 else None
        # zeros go to x1, the image to x2, so that the first block's F reads the image
        self.swap = SwapHalves() if pad > 0 else None
        c += pad
        layers = []
        for i, (n, stride, half) in enumerate(zip(blocks, strides, channels)):
            expected = c // 2 * stride**2
            if c % 2 or half != expected:
                raise ValueError(
                    f"IRevNet: stage {i} ({'stride 2' if stride == 2 else 'stride 1'}) receives "
                    f"{c} channels, so each half has {expected} channels after it; got "
                    f"channels[{i}]={half}. Only the first stage may pad (injective); a stride-2 "
                    "stage has 4x the half-channels of the stage before"
                )
            for j in range(n):
                layers.append(IRevNetBlock(c, stride if j == 0 else 1,
                                           preactivate=bool(layers), mult=mult,
                                           dropout=dropout, affine_bn=affine_bn))
                c = 2 * half
        self.stack = ReversibleSequential(*layers, memory=memory)
        self.feature_channels = c
        self.head = ClassifierHead(c, num_classes)
        self.memory = memory

    @property
    def bijective(self) -> bool:
        """Whether the network is bijective up to the head (no injective padding)."""
        return self.pad is None

    def inject(self, x: Tensor) -> Tensor:
        """Input to the stack's input: space-to-depth, then zero channels (if any)."""
        check_input(x, type(self).__name__, self.in_channels, self.input_multiple)
        if self.squeeze is not None:
            x = self.squeeze(x)
        if self.pad is not None:
            x = self.swap(self.pad(x))  # (B, 2 channels[0], H/k, W/k): zeros, then the image
        return x

    def features(self, x: Tensor) -> Tensor:
        """The final invertible representation ``(B, feature_channels, H / m, W / m)``."""
        return self.stack(self.inject(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))  # (B, num_classes)

    def inverse(self, features: Tensor) -> Tensor:
        """The input image rebuilt from :meth:`features` (exact up to rounding)."""
        if features.dim() != 4 or features.shape[1] != self.feature_channels:
            raise ValueError(f"IRevNet.inverse expects features of shape (B, "
                             f"{self.feature_channels}, h, w); got {tuple(features.shape)}")
        x = self.stack.inverse(features)
        if self.pad is not None:
            x = self.pad.inverse(self.swap.inverse(x))
        if self.squeeze is not None:
            x = self.squeeze.inverse(x)
        return x


# --- registered models -------------------------------------------------------------------------
# Each entry point fixes its configuration and passes every other keyword (num_classes,
# in_channels, memory, dropout, mult, ...) on to IRevNet; a keyword the caller gives wins.

_AUTHORS = "i-RevNet (Jacobsen et al. 2018), authors' repository"


@register_model(input_size=(3, 32, 32), paper=_AUTHORS)
def irevnet(**kwargs) -> IRevNet:
    """i-RevNet for CIFAR (authors' CIFAR command): blocks 18-18-18, strides 1-2-2, channels
    16-64-256, no initial downsampling, injective padding 3 -> 32 channels, dropout 0.1."""
    return IRevNet(**{"blocks": [18, 18, 18], "strides": [1, 2, 2], "channels": [16, 64, 256],
                      "dropout": 0.1, **kwargs})


@register_model(input_size=(3, 224, 224), paper_params=125e6, paper=_AUTHORS)
def irevnet_b(**kwargs) -> IRevNet:
    """Bijective i-RevNet (b) for ImageNet (authors' command): blocks 6-16-72-6, strides
    2-2-2-2, channels 24-96-384-1536, initial space-to-depth 2."""
    return IRevNet(**{"blocks": [6, 16, 72, 6], "strides": [2, 2, 2, 2],
                      "channels": [24, 96, 384, 1536], "init_ds": 2, "num_classes": 1000,
                      **kwargs})


@register_model(input_size=(3, 224, 224), paper="i-RevNet (Jacobsen et al. 2018): our stand-in")
def irevnet_a(**kwargs) -> IRevNet:
    """Injective i-RevNet for ImageNet, our stand-in for the paper's (a).

    The authors' code and README give only (b)'s configuration. This one keeps (b)'s depth
    (blocks 6-16-72-6) and 7x7 final resolution, with an initial space-to-depth 4 (48 channels
    at 56x56), zero padding to 56 channels, strides 1-2-2-2 and channels 28-112-448-1792:
    169.7M parameters, 6% below the 181M the paper reports for (a).
    """
    return IRevNet(**{"blocks": [6, 16, 72, 6], "strides": [1, 2, 2, 2],
                      "channels": [28, 112, 448, 1792], "init_ds": 4, "num_classes": 1000,
                      **kwargs})


@register_model(input_size=(1, 8, 8))
def irevnet_digits(**kwargs) -> IRevNet:
    """A small i-RevNet for 8x8 grey digits: blocks 2-2, strides 1-2, channels 8-32,
    injective padding 1 -> 16 channels."""
    return IRevNet(**{"blocks": [2, 2], "strides": [1, 2], "channels": [8, 32],
                      "in_channels": 1, "mult": 2, **kwargs})
