"""revtrain: train invertible networks without storing their activations.

A stack of invertible layers (:class:`ReversibleSequential`) keeps only its output in forward
and rebuilds every intermediate in backward, with one extra evaluation of each sub-network.
"""

from .base import InvertibleModule, ReconstructionError, is_invertible
from .conditioning import ConditionalNet, ConditionedStack, broadcast_context
from .coupling import Additive, AdditiveCoupling, Affine, AffineCoupling, ChannelSplit, Coupling
from .layers import ChannelPermute, InjectivePad, Squeeze, SwapHalves
from .modes import MemoryMode, set_memory
from .sequential import ReversibleSequential
from .state import is_rebuilding

__version__ = "0.1.0"

__all__ = [
    "Additive",
    "AdditiveCoupling",
    "Affine",
    "AffineCoupling",
    "ChannelPermute",
    "ChannelSplit",
    "ConditionalNet",
    "ConditionedStack",
    "Coupling",
    "InjectivePad",
    "InvertibleModule",
    "MemoryMode",
    "ReconstructionError",
    "ReversibleSequential",
    "Squeeze",
    "SwapHalves",
    "broadcast_context",
    "is_invertible",
    "is_rebuilding",
    "set_memory",
    "models",
]


def __getattr__(name: str):
    # `revtrain.models` is imported on first use, so `import revtrain` stays light.
    if name == "models":
        import importlib

        return importlib.import_module(".models", __name__)
    raise AttributeError(f"module 'revtrain' has no attribute {name!r}")
