r"""RevNet classifiers (Gomez et al. 2017) and the ResNet baselines of the same paper.

A RevNet stage is a :class:`~revtrain.ReversibleSequential` of additive couplings

.. math::
    y_1 = x_1 + F(x_2), \qquad y_2 = x_2 + G(y_1)

whose residual functions :math:`F, G` act on half the channels (basic: BN-ReLU-conv3x3-BN-
ReLU-conv3x3; bottleneck: 1x1-3x3-1x1 with width / 4). The first unit of a stage that changes
the resolution or the number of channels cannot be inverted; as in the paper's code it is an
ordinary layer of the same shape, :math:`y_1 = S(x_1) + F(x_2)`, :math:`y_2 = S(x_2) + G(y_1)`,
with a stride-2 :math:`F` and a shortcut :math:`S` (average pooling + zero channels for basic
units, a 1x1 projection for bottleneck units), and its activations are stored.

``memory="stored"`` builds the stored-activation twin: the same modules and parameters
(identical ``state_dict`` keys) run with ordinary autograd. ``memory="checkpoint"`` uses
``torch.utils.checkpoint`` per block. ``model.memory = mode`` switches an existing model.

Reference:
    Gomez, Ren, Urtasun, Grosse, "The Reversible Residual Network: Backpropagation Without
    Storing Activations", NeurIPS 2017 (Table 1: architectures and parameter counts).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from revtrain import AdditiveCoupling, MemoryMode, ReversibleSequential
from revtrain.modes import MemoryModeMixin

from ._blocks import (
    ClassifierHead,
    ZeroPadShortcut,
    basic_residual,
    bottleneck_residual,
    check_input,
    conv_stem,
)
from ._registry import register_model

__all__ = [
    "RevNet",
    "ResNet",
    "RevTransition",
    "ResidualUnit",
    "revnet38",
    "revnet110",
    "revnet164",
    "revnet104",
    "revnet_digits",
    "resnet32",
    "resnet110",
    "resnet164",
    "resnet101",
]

_STEMS = ("cifar", "imagenet")


def _check_arch(owner: str, units: Sequence[int], channels: Sequence[int],
                strides: Sequence[int] | None, stem: str, in_channels: int, num_classes: int,
                dropout: float) -> list[int]:
    if len(units) == 0 or any(int(u) < 1 for u in units):
        raise ValueError(f"{owner}: units must be a non-empty list of positive ints, got {units}")
    if len(channels) != len(units) + 1:
        raise ValueError(f"{owner}: channels must list the stem width then one width per stage "
                         f"({len(units) + 1} values for {len(units)} stages), got {channels}")
    if strides is None:
        strides = [1] + [2] * (len(units) - 1)
    if len(strides) != len(units) or any(s not in (1, 2) for s in strides):
        raise ValueError(f"{owner}: strides must give 1 or 2 per stage ({len(units)} values), "
                         f"got {strides}")
    if stem not in _STEMS:
        raise ValueError(f"{owner}: stem must be one of {_STEMS}, got {stem!r}")
    if in_channels < 1 or num_classes < 1:
        raise ValueError(f"{owner}: in_channels and num_classes must be positive, got "
                         f"{in_channels} and {num_classes}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"{owner}: dropout must be in [0, 1), got {dropout}")
    return list(strides)


def _residual(bottleneck: bool):
    return bottleneck_residual if bottleneck else basic_residual


class RevTransition(nn.Module):
    r"""The non-invertible first unit of a RevNet stage (stored activations).

    .. math::
        y_1 = S_1(x_1) + F(x_2), \qquad y_2 = S_2(x_2) + G(y_1)

    ``(B, C_in, H, W) -> (B, C_out, H / s, W / s)``; :math:`F` maps ``C_in / 2`` to
    ``C_out / 2`` channels with stride ``s``; :math:`S` is average pooling plus zero channels
    (basic) or a strided 1x1 convolution (bottleneck).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, bottleneck: bool,
                 preactivate: bool = True, dropout: float = 0.0):
        super().__init__()
        half_in, half_out = in_channels // 2, out_channels // 2
        residual = _residual(bottleneck)
        self.f = residual(half_in, half_out, stride, preactivate, dropout)
        self.g = residual(half_out, half_out, 1, True, dropout)
        if bottleneck:
            self.shortcut1 = nn.Conv2d(half_in, half_out, 1, stride, bias=False)
            self.shortcut2 = nn.Conv2d(half_in, half_out, 1, stride, bias=False)
        else:
            self.shortcut1 = ZeroPadShortcut(half_in, half_out, stride)
            self.shortcut2 = ZeroPadShortcut(half_in, half_out, stride)

    def forward(self, x: Tensor) -> Tensor:
        x1, x2 = x.chunk(2, dim=1)  # (B, C_in/2, H, W) each
        y1 = self.shortcut1(x1) + self.f(x2)  # (B, C_out/2, H/s, W/s)
        y2 = self.shortcut2(x2) + self.g(y1)
        return torch.cat([y1, y2], dim=1)  # (B, C_out, H/s, W/s)


class _Stage(nn.Module):
    """An optional :class:`RevTransition` followed by a stack of reversible couplings."""

    def __init__(self, transition: nn.Module | None, blocks: nn.Module):
        super().__init__()
        self.transition = transition
        self.blocks = blocks

    def forward(self, x: Tensor) -> Tensor:
        if self.transition is not None:
            x = self.transition(x)
        return self.blocks(x)


class RevNet(MemoryModeMixin, nn.Module):
    """A RevNet classifier: stem, reversible stages, BN-ReLU-pool-linear head.

    Args:
        units: units per stage (each unit is one coupling with residual functions F and G;
            the first unit of a resolution- or width-changing stage is a
            :class:`RevTransition`).
        channels: stem width, then the width of each stage as in the paper's Table 1 (for
            bottleneck units the stage output is 4 times the listed width).
        bottleneck: bottleneck (1x1-3x3-1x1) residual functions instead of basic ones.
        stem: ``"cifar"`` (3x3 conv) or ``"imagenet"`` (7x7 stride-2 conv + max-pool).
        in_channels: channels of the input image.
        num_classes: outputs of the linear head.
        memory: ``"reversible"``, ``"checkpoint"`` or ``"stored"`` (the twin).
        dropout: dropout probability inside every residual function (replayed exactly in
            backward by the engine).
        strides: stride of each stage; default 1 for the first stage and 2 after.
        irreversible_memory: how the parts a stack cannot rebuild (the stem, the
            :class:`RevTransition` units and the head) keep what their backward needs:
            ``"stored"`` (default, as in the paper) or ``"checkpoint"``
            (``torch.utils.checkpoint``: each keeps only its input, which is the caller's
            image or the output the stack before it holds anyway, and runs its forward
            again in backward; BatchNorm statistics are still updated once). Applies while
            the stacks are not stored: the stored twin stores everything.

    Input ``(B, in_channels, H, W)`` with ``H`` and ``W`` multiples of the total
    downsampling (:attr:`input_multiple`); output ``(B, num_classes)``.
    """

    def __init__(
        self,
        units: Sequence[int],
        channels: Sequence[int],
        bottleneck: bool = False,
        stem: str = "cifar",
        in_channels: int = 3,
        num_classes: int = 10,
        memory: MemoryMode | str = "reversible",
        dropout: float = 0.0,
        strides: Sequence[int] | None = None,
        irreversible_memory: MemoryMode | str = "stored",
    ):
        super().__init__()
        strides = _check_arch("RevNet", units, channels, strides, stem, in_channels,
                              num_classes, dropout)
        memory = MemoryMode.parse(memory)  # a bad mode fails before a large model is built
        self.irreversible_memory = MemoryMode.parse(irreversible_memory)
        if self.irreversible_memory is MemoryMode.REVERSIBLE:
            raise ValueError("RevNet: irreversible_memory='reversible' is not possible; the stem, "
                             "transitions and head are not invertible. Use 'stored' or "
                             "'checkpoint'")
        expand = 4 if bottleneck else 1
        widths = [channels[0]] + [c * expand for c in channels[1:]]
        step = 8 if bottleneck else 2
        if any(w % 2 for w in widths) or any(w % step for w in widths[1:]):
            raise ValueError(f"RevNet: stage widths {widths} must be even (multiples of 8 for "
                             "bottleneck units), since couplings split the channels in halves")
        self.in_channels, self.num_classes = in_channels, num_classes
        self.input_multiple = (4 if stem == "imagenet" else 1) * 2 ** strides.count(2)
        self.stem = conv_stem(in_channels, channels[0], stem == "imagenet")
        residual = _residual(bottleneck)
        stages = []
        for i, (n, stride) in enumerate(zip(units, strides)):
            c_in, c_out = widths[i], widths[i + 1]
            transition = None
            if stride != 1 or c_in != c_out:
                transition = RevTransition(c_in, c_out, stride, bottleneck,
                                           preactivate=i > 0, dropout=dropout)
            h = c_out // 2
            couplings = [
                AdditiveCoupling(
                    f=residual(h, h, 1, preactivate=i > 0 or j > 0 or transition is not None,
                               dropout=dropout),
                    g=residual(h, h, 1, True, dropout),
                )
                for j in range(n - (transition is not None))
            ]
            blocks = (ReversibleSequential(*couplings, memory=memory) if couplings
                      else nn.Identity())
            stages.append(_Stage(transition, blocks))
        self.stages = nn.Sequential(*stages)
        self.head = ClassifierHead(widths[-1], num_classes)
        self.memory = memory

    def _irreversible(self, part: nn.Module, x: Tensor) -> Tensor:
        """Run a part no stack can rebuild, checkpointed if :attr:`irreversible_memory` says so."""
        if (self.irreversible_memory is MemoryMode.CHECKPOINT and torch.is_grad_enabled()
                and self.memory is not MemoryMode.STORED):
            from revtrain.sequential import checkpoint_module

            return checkpoint_module(part, x)
        return part(x)

    def features(self, x: Tensor) -> Tensor:
        """The last stage's output, ``(B, C, H / m, W / m)`` with ``m = input_multiple``."""
        check_input(x, type(self).__name__, self.in_channels, self.input_multiple)
        x = self._irreversible(self.stem, x)
        for stage in self.stages:
            if stage.transition is not None:
                x = self._irreversible(stage.transition, x)
            x = stage.blocks(x)
        return x

    def forward(self, x: Tensor) -> Tensor:
        return self._irreversible(self.head, self.features(x))  # (B, num_classes)


class ResidualUnit(nn.Module):
    """A pre-activation residual unit ``x -> S(x) + R(x)`` of the ResNet baselines."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, bottleneck: bool,
                 preactivate: bool = True, dropout: float = 0.0):
        super().__init__()
        self.residual = _residual(bottleneck)(in_channels, out_channels, stride, preactivate,
                                              dropout)
        if stride == 1 and in_channels == out_channels:
            self.shortcut = nn.Identity()
        elif bottleneck:
            self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)
        else:
            self.shortcut = ZeroPadShortcut(in_channels, out_channels, stride)

    def forward(self, x: Tensor) -> Tensor:
        return self.shortcut(x) + self.residual(x)


class ResNet(MemoryModeMixin, nn.Module):
    """A pre-activation ResNet baseline (stored activations only).

    Same arguments as :class:`RevNet`. ``memory`` must be ``"stored"``: a ResNet has no
    invertible stage to rebuild; use the RevNet of the same table row for memory savings.
    """

    reversible_alternative = "the RevNet of the same size: revnet38 for resnet32"

    def __init__(
        self,
        units: Sequence[int],
        channels: Sequence[int],
        bottleneck: bool = False,
        stem: str = "cifar",
        in_channels: int = 3,
        num_classes: int = 10,
        memory: MemoryMode | str = "stored",
        dropout: float = 0.0,
        strides: Sequence[int] | None = None,
    ):
        super().__init__()
        strides = _check_arch("ResNet", units, channels, strides, stem, in_channels,
                              num_classes, dropout)
        if MemoryMode.parse(memory) is not MemoryMode.STORED:  # before building anything
            raise self.no_reversible_part(memory)
        expand = 4 if bottleneck else 1
        widths = [channels[0]] + [c * expand for c in channels[1:]]
        self.in_channels, self.num_classes = in_channels, num_classes
        self.input_multiple = (4 if stem == "imagenet" else 1) * 2 ** strides.count(2)
        self.stem = conv_stem(in_channels, channels[0], stem == "imagenet")
        stages = []
        for i, (n, stride) in enumerate(zip(units, strides)):
            stage = [ResidualUnit(widths[i] if j == 0 else widths[i + 1], widths[i + 1],
                                  stride if j == 0 else 1, bottleneck,
                                  preactivate=i > 0 or j > 0, dropout=dropout)
                     for j in range(n)]
            stages.append(nn.Sequential(*stage))
        self.stages = nn.Sequential(*stages)
        self.head = ClassifierHead(widths[-1], num_classes)

    def features(self, x: Tensor) -> Tensor:
        """The last stage's output, ``(B, C, H / m, W / m)`` with ``m = input_multiple``."""
        check_input(x, type(self).__name__, self.in_channels, self.input_multiple)
        return self.stages(self.stem(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))  # (B, num_classes)


# --- registered models: RevNet paper, Table 1 ---------------------------------------------------
# Each entry point fixes the architecture of its table row and passes every other keyword
# (num_classes, in_channels, memory, dropout, strides, ...) on to the class; a keyword the
# caller gives wins over the row's value.

_CIFAR = (3, 32, 32)
_IMAGENET = (3, 224, 224)
_TABLE1 = "RevNet paper (Gomez et al. 2017), Table 1"


@register_model(input_size=_CIFAR, paper_params=0.46e6, paper=_TABLE1)
def revnet38(**kwargs) -> RevNet:
    """RevNet-38 (CIFAR): units 3-3-3, channels 32-32-64-112, basic."""
    return RevNet(**{"units": [3, 3, 3], "channels": [32, 32, 64, 112], **kwargs})


@register_model(input_size=_CIFAR, paper_params=1.73e6, paper=_TABLE1)
def revnet110(**kwargs) -> RevNet:
    """RevNet-110 (CIFAR): units 9-9-9, channels 32-32-64-128, basic."""
    return RevNet(**{"units": [9, 9, 9], "channels": [32, 32, 64, 128], **kwargs})


@register_model(input_size=_CIFAR, paper_params=1.75e6, paper=_TABLE1)
def revnet164(**kwargs) -> RevNet:
    """RevNet-164 (CIFAR): units 9-9-9, channels 32-32-64-128, bottleneck."""
    return RevNet(**{"units": [9, 9, 9], "channels": [32, 32, 64, 128], "bottleneck": True,
                     **kwargs})


@register_model(input_size=_IMAGENET, paper_params=45.2e6, paper=_TABLE1)
def revnet104(**kwargs) -> RevNet:
    """RevNet-104 (ImageNet): units 2-2-11-2, channels 128-128-256-512-832, bottleneck."""
    return RevNet(**{"units": [2, 2, 11, 2], "channels": [128, 128, 256, 512, 832],
                     "bottleneck": True, "stem": "imagenet", "num_classes": 1000, **kwargs})


@register_model(input_size=(1, 8, 8))
def revnet_digits(**kwargs) -> RevNet:
    """A small RevNet for scikit-learn's 8x8 grey digits: units 3-3, channels 16-16-32, basic."""
    return RevNet(**{"units": [3, 3], "channels": [16, 16, 32], "in_channels": 1, **kwargs})


@register_model(input_size=_CIFAR, paper_params=0.46e6, paper=_TABLE1, reversible=False)
def resnet32(**kwargs) -> ResNet:
    """ResNet-32 (CIFAR), RevNet-38's baseline: units 5-5-5, channels 16-16-32-64, basic."""
    return ResNet(**{"units": [5, 5, 5], "channels": [16, 16, 32, 64], **kwargs})


@register_model(input_size=_CIFAR, paper_params=1.73e6, paper=_TABLE1, reversible=False)
def resnet110(**kwargs) -> ResNet:
    """ResNet-110 (CIFAR), RevNet-110's baseline: units 18-18-18, channels 16-16-32-64."""
    return ResNet(**{"units": [18, 18, 18], "channels": [16, 16, 32, 64], **kwargs})


@register_model(input_size=_CIFAR, paper_params=1.70e6, paper=_TABLE1, reversible=False)
def resnet164(**kwargs) -> ResNet:
    """ResNet-164 (CIFAR), RevNet-164's baseline: units 18-18-18, channels 16-16-32-64,
    bottleneck."""
    return ResNet(**{"units": [18, 18, 18], "channels": [16, 16, 32, 64], "bottleneck": True,
                     **kwargs})


@register_model(input_size=_IMAGENET, paper_params=44.5e6, paper=_TABLE1, reversible=False)
def resnet101(**kwargs) -> ResNet:
    """ResNet-101 (ImageNet), RevNet-104's baseline: units 3-4-23-3, channels
    64-64-128-256-512, bottleneck."""
    return ResNet(**{"units": [3, 4, 23, 3], "channels": [64, 64, 128, 256, 512],
                     "bottleneck": True, "stem": "imagenet", "num_classes": 1000, **kwargs})
