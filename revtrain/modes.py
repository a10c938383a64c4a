"""Memory modes: how a reversible stack keeps what its backward needs."""

from __future__ import annotations

from enum import Enum

from torch import nn

__all__ = ["MemoryMode", "MemoryModeMixin", "set_memory"]


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
    if isinstance(model, MemoryModeMixin):  # the model's own rule (and its error)
        model.memory = mode
        return model
    for module in model.modules():
        if isinstance(module, ReversibleSequential):
            module.memory = mode
    return model


class MemoryModeMixin:
    """``model.memory``: read and set the memory mode of every reversible stack of a model.

    Mixed into every model of ``revtrain.models`` (classifiers and flows alike) and usable for
    one's own: ``class Net(MemoryModeMixin, nn.Module)``. The model takes ``memory=`` once, at
    construction, and assigns it to ``self.memory`` after building its stacks.

    * Reading gives the mode all stacks share (``STORED`` for a model without any; a
      ``RuntimeError`` when they were set to different modes by hand).
    * Assigning a :class:`MemoryMode` or its string sets every stack; on a model with no
      reversible stack only ``"stored"`` is accepted, any other mode raises the one
      ``ValueError`` :meth:`no_reversible_part` builds.
    * :meth:`set_memory` assigns and returns the model, for chaining:
      ``copy.deepcopy(model).set_memory("stored")`` is its stored-activation twin.

    Override :meth:`memory_stacks` to leave stacks out (default: every
    :class:`~revtrain.ReversibleSequential` inside the model).

    >>> from revtrain import models
    >>> model = models.create("revnet_digits")
    >>> model.memory = "checkpoint"
    >>> model.memory
    <MemoryMode.CHECKPOINT: 'checkpoint'>
    >>> models.create("resnet32", memory="reversible")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: ResNet has no reversible stack, so memory='reversible' cannot apply: ...
    """

    #: shown in the error of a model without a reversible part; e.g. "revnet38 for resnet32"
    reversible_alternative: str = "e.g. the RevNet of the same size"

    def memory_stacks(self) -> list:
        """The stacks :attr:`memory` reads and sets."""
        from .sequential import ReversibleSequential

        return [m for m in self.modules() if isinstance(m, ReversibleSequential)]

    @property
    def memory(self) -> MemoryMode:
        """The memory mode of the model's reversible stacks; assign to switch all of them."""
        modes = {s.memory for s in self.memory_stacks()}
        if len(modes) > 1:
            raise RuntimeError(f"the stacks of {type(self).__name__} have mixed memory modes "
                               f"{sorted(m.value for m in modes)}; set model.memory = mode")
        return modes.pop() if modes else MemoryMode.STORED

    @memory.setter
    def memory(self, value: MemoryMode | str) -> None:
        mode = MemoryMode.parse(value)
        stacks = self.memory_stacks()
        if not stacks and mode is not MemoryMode.STORED:
            raise self.no_reversible_part(mode)
        for stack in stacks:
            stack.memory = mode

    def set_memory(self, mode: MemoryMode | str):
        """``self.memory = mode``; returns the model."""
        self.memory = mode
        return self

    def no_reversible_part(self, mode: MemoryMode | str) -> ValueError:
        """The error for ``memory=mode`` on a model that has no reversible stack."""
        mode = MemoryMode.parse(mode)
        return ValueError(
            f"{type(self).__name__} has no reversible stack, so memory={mode.value!r} cannot "
            f"apply: it always stores its activations. Use memory='stored', or a reversible "
            f"model ({self.reversible_alternative})"
        )
