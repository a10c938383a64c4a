"""Memory modes: how a reversible stack keeps what its backward needs."""

from __future__ import annotations

from enum import Enum

from torch import nn

__all__ = ["MemoryMode", "set_memory"]


class MemoryMode(str, Enum):
    """How a stack keeps what backward needs.

    * ``REVERSIBLE``: only the stack's output; every intermediate is rebuilt in backward.
    * ``CHECKPOINT``: each layer's input (``torch.utils.checkpoint`` per layer).
    * ``STORED``: everything autograd saves (ordinary PyTorch; the baseline twin).
    """

    REVERSIBLE = "reversible"
    CHECKPOINT = "checkpoint"
    STORED = "stored"

    @classmethod
    def parse(cls, value: MemoryMode | str) -> MemoryMode:
        try:
            return cls(value)
        except ValueError:
            choices = ", ".join(repr(m.value) for m in cls)
            raise ValueError(f"memory={value!r} is not a memory mode; use one of {choices}") from None


def set_memory(model: nn.Module, memory: MemoryMode | str) -> nn.Module:
    """Switch every :class:`~revtrain.ReversibleSequential` inside ``model`` to ``memory``.

    Returns ``model``. Parameters are untouched: ``set_memory(copy.deepcopy(model), "stored")``
    is the model's stored-activation twin.
    """
    from .sequential import ReversibleSequential

    mode = MemoryMode.parse(memory)
    for module in model.modules():
        if isinstance(module, ReversibleSequential):
            module.memory = mode
    return model
