"""Flow layers: ActNorm, invertible 1x1 convolutions, masks, multi-scale split, dequantization.

Every layer is a :class:`revtrain.InvertibleModule` with ``forward_and_log_det`` and
``inverse``, so it runs inside :class:`revtrain.ReversibleSequential`, whose reversible mode
back-propagates the log-det with the output and keeps no activations. Couplings are
:class:`revtrain.AdditiveCoupling`, :class:`revtrain.AffineCoupling` and
:class:`revtrain.Coupling` with the masks of :mod:`revtrain.flows.masks`.
The models (``nice``, ``realnvp``, ``glow``) live in ``revtrain.models``.
"""

from .actnorm import ActNorm
from .dequant import (
    CenterShift,
    LogitTransform,
    UniformDequantization,
    VariationalDequantization,
    bits_per_dim,
)
from .distributions import (
    ClassConditionalGaussian,
    StandardLogistic,
    StandardNormal,
    check_labels,
    expand_labels,
    make_prior,
)
from .invconv import InvConv1x1, InvConv1x1LU
from .masks import ChannelMask, CheckerboardMask, CheckerboardNet
from .multiscale import GaussianSplit, LearnedTopPrior, split_sizes
from .nets import MLP, ConvNet, LearnedTanhScale, ResNet
from .scaling import DiagonalScaling

__all__ = [
    "ActNorm",
    "CenterShift",
    "ChannelMask",
    "CheckerboardMask",
    "CheckerboardNet",
    "ClassConditionalGaussian",
    "ConvNet",
    "DiagonalScaling",
    "GaussianSplit",
    "InvConv1x1",
    "InvConv1x1LU",
    "LearnedTanhScale",
    "LearnedTopPrior",
    "LogitTransform",
    "MLP",
    "ResNet",
    "StandardLogistic",
    "StandardNormal",
    "UniformDequantization",
    "VariationalDequantization",
    "bits_per_dim",
    "check_labels",
    "expand_labels",
    "make_prior",
    "split_sizes",
]
