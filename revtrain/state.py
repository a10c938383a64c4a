"""State that a recomputation in backward must see as the forward pass saw it.

When the engine evaluates a layer again during backward (to rebuild what the forward pass
would have saved), the evaluation must draw the same random numbers, run under the same
autocast state, use the same parameter and buffer tensors and leave every buffer as it found
it. This module holds those pieces:

* :class:`RngState`: the state of the CPU generator and of every CUDA device in use at one point
  of a forward pass, replayed inside :func:`torch.random.fork_rng` (the global generator is never
  re-seeded and the caller's random stream is left where the forward pass left it).
* :class:`AutocastState`: the autocast state of CPU and CUDA at forward, re-entered.
* :class:`ModuleState`: the tensors bound to every parameter and buffer name of a layer at
  forward, their versions, and the buffers that forward changed. In a rebuild the forward's
  tensors are bound again (``torch.func.functional_call``), changed tensors raise
  :class:`~revtrain.ReconstructionError`, buffers the forward changed are set back to the values
  it started from, and after the rebuild every buffer is restored to its current value. One rule
  for every buffer: BatchNorm and InstanceNorm running statistics, spectral-norm vectors, ActNorm
  flags alike.
* :func:`is_rebuilding`: whether the current thread is inside such a recomputation, for forward
  hooks that must not act twice.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager, nullcontext

import torch
from torch import Tensor, nn

from .base import ReconstructionError
from .base import _local as local

__all__ = ["RngState", "AutocastState", "ModuleState", "is_rebuilding", "rebuilding", "local",
           "cuda_devices_of"]

# ``local``: per-thread engine state shared with revtrain.base: ``recorder`` (what the engine is
# doing for which layer), ``rebuilding`` (depth of recomputations), ``log_det_for`` (the layer
# asked for its log-det)


def is_rebuilding() -> bool:
    """``True`` while revtrain re-evaluates a layer in backward to rebuild its activations.

    Forward hooks and forward pre-hooks of the layers in a reversible stack run again during
    that re-evaluation (as with ``torch.utils.checkpoint``); a hook that records activations or
    counts calls can skip its work when this returns ``True``.

    Example:
        >>> import revtrain
        >>> revtrain.is_rebuilding()
        False
    """
    return getattr(local, "rebuilding", 0) > 0


@contextmanager
def rebuilding() -> Iterator[None]:
    """Mark the body as a recomputation (see :func:`is_rebuilding`)."""
    local.rebuilding = getattr(local, "rebuilding", 0) + 1
    try:
        yield
    finally:
        local.rebuilding -= 1


def cuda_devices_of(tensors: Sequence[Tensor | None]) -> tuple[int, ...]:
    """Indices of the CUDA devices that ``tensors`` live on."""
    return tuple(sorted({t.device.index for t in tensors
                         if t is not None and t.is_cuda and t.device.index is not None}))


class RngState:
    """The states of the CPU generator and of the CUDA generators of ``devices`` at one point.

    Taking a state copies it (5 KB for the CPU generator, 16 bytes per CUDA device). States that
    are kept for backward are cloned through the dispatcher, so that
    :class:`revtrain.memory.TensorMemoryTracker` counts them like any other tensor.
    """

    __slots__ = ("cpu", "cuda", "devices")

    def __init__(self, cpu: Tensor | None, cuda: tuple[Tensor | None, ...], devices: tuple[int, ...]):
        self.cpu, self.cuda, self.devices = cpu, cuda, devices

    @classmethod
    def take(cls, devices: tuple[int, ...]) -> RngState:
        return cls(torch.get_rng_state(), tuple(torch.cuda.get_rng_state(d) for d in devices), devices)

    def same_as(self, other: RngState) -> bool:
        """Whether no random number was drawn between ``self`` and ``other``."""
        return torch.equal(self.cpu, other.cpu) and all(
            torch.equal(a, b) for a, b in zip(self.cuda, other.cuda))

    def kept(self, since: RngState) -> RngState:
        """A copy of the generators that moved between ``since`` and ``self``, for backward."""
        cpu = self.cpu.clone() if not torch.equal(self.cpu, since.cpu) else None
        cuda = tuple(a.clone() if not torch.equal(a, b) else None for a, b in zip(self.cuda, since.cuda))
        return RngState(cpu, cuda, self.devices)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() for t in (self.cpu, *self.cuda) if t is not None)

    @contextmanager
    def replay(self) -> Iterator[None]:
        """Run the body with these generator states; restore the current ones afterwards."""
        devices = [d for d, s in zip(self.devices, self.cuda) if s is not None]
        with torch.random.fork_rng(devices=devices, enabled=True):
            if self.cpu is not None:
                torch.set_rng_state(self.cpu)
            for d, s in zip(self.devices, self.cuda):
                if s is not None:
                    torch.cuda.set_rng_state(s, d)
            yield


class AutocastState:
    """The autocast state of CPU and CUDA at forward, re-entered for the recomputation."""

    __slots__ = ("states",)

    def __init__(self) -> None:
        device_types = ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)
        self.states = [(dt, torch.is_autocast_enabled(dt), torch.get_autocast_dtype(dt))
                       for dt in device_types]

    def replay(self):
        """A context that re-enters the forward's autocast state (a no-op when it is the
        current state, as in backward after a forward without autocast)."""
        if all(torch.is_autocast_enabled(dt) == enabled and torch.get_autocast_dtype(dt) == dtype
               for dt, enabled, dtype in self.states):
            return nullcontext()
        return self._entered()

    @contextmanager
    def _entered(self) -> Iterator[None]:
        with ExitStack() as stack:
            for device_type, enabled, dtype in self.states:
                stack.enter_context(torch.autocast(device_type, dtype=dtype, enabled=enabled))
            yield


def _is_norm_statistic(module: nn.Module, name: str) -> bool:
    # PyTorch's batch / instance norms write their running statistics in training mode but
    # never read them there: no copy is needed to replay such a forward.
    return isinstance(module, nn.modules.batchnorm._NormBase) and name in (
        "running_mean", "running_var", "num_batches_tracked")


class _Slot:
    """One parameter or buffer name of one module, and the tensor bound to it at forward."""

    __slots__ = ("module", "name", "is_buffer", "tensor", "version", "start", "write_only", "owner",
                 "requires_grad")

    def __init__(self, module, name, is_buffer, tensor, owner):
        self.module, self.name, self.is_buffer, self.tensor = module, name, is_buffer, tensor
        self.owner = owner  # qualified name inside the layer, for messages
        self.version = tensor._version
        self.requires_grad = tensor.requires_grad
        self.start: Tensor | None = None  # the value a buffer had before forward changed it
        self.write_only = is_buffer and module.training and _is_norm_statistic(module, name)

    @property
    def table(self) -> dict:
        return self.module._buffers if self.is_buffer else self.module._parameters


class ModuleState:
    """Parameters and buffers of one layer as one forward call used them.

    Call :meth:`begin` before the layer's forward and :meth:`finish` after it; then, in backward,
    :meth:`check` and the context manager :meth:`replay` around the recomputation.
    """

    __slots__ = ("slots", "modes")

    def __init__(self) -> None:
        self.slots: list[_Slot] = []
        self.modes: list[tuple[nn.Module, bool]] = []  # train / eval of every module at forward

    def begin(self, layer: nn.Module) -> None:
        slots, modes = [], []
        for prefix, module in layer.named_modules(remove_duplicate=True):
            modes.append((module, module.training))
            for is_buffer, table in ((False, module._parameters), (True, module._buffers)):
                for name, tensor in table.items():
                    if tensor is None:
                        continue
                    slot = _Slot(module, name, is_buffer, tensor, f"{prefix}.{name}" if prefix else name)
                    if is_buffer and not slot.write_only:
                        slot.start = tensor.detach().clone()
                    slots.append(slot)
        self.slots, self.modes = slots, modes

    def refresh(self) -> None:
        """Take the tensors bound now (inside the layer's forward, after its pre-forward hooks:
        FSDP binds the unsharded parameters there)."""
        for slot in self.slots:
            tensor = slot.table.get(slot.name)
            if tensor is not None and tensor is not slot.tensor:
                slot.tensor, slot.version = tensor, tensor._version
                slot.requires_grad = tensor.requires_grad

    def finish(self) -> None:
        """After forward: keep the start values of the buffers that forward changed only."""
        for slot in self.slots:
            tensor = slot.tensor
            if slot.start is not None and tensor._version == slot.version:
                slot.start = None  # unchanged: the current value is the one forward saw
            slot.version = tensor._version

    @property
    def largest_parameter(self) -> int:
        """Elements of the layer's largest parameter (0 without parameters)."""
        return max((s.tensor.numel() for s in self.slots if not s.is_buffer), default=0)

    @property
    def nbytes(self) -> int:
        """Bytes of buffer values kept for the replay."""
        return sum(s.start.numel() * s.start.element_size() for s in self.slots if s.start is not None)

    def check(self, where: str) -> None:
        """Raise :class:`ReconstructionError` if a tensor forward used was changed in place since."""
        for slot in self.slots:
            if slot.start is not None or slot.write_only:
                continue  # restored for the replay / never read by the forward
            if slot.tensor._version != slot.version:
                kind = "buffer" if slot.is_buffer else "parameter"
                raise ReconstructionError(
                    f"{where}: {kind} {slot.owner!r} was changed in place between forward and "
                    "backward (an optimizer step or a weight update before backward?), so the "
                    "activations of this layer cannot be rebuilt. Call backward first."
                )

    @contextmanager
    def replay(self) -> Iterator[None]:
        """Bind the forward's tensors with the forward's ``requires_grad`` and train / eval modes,
        set changed buffers to their start values; restore everything afterwards."""
        rebound, stash, flags, modes = [], [], [], []
        try:
            for module, training in self.modes:
                if module.training != training:
                    modes.append((module, module.training))
                    module.training = training
            for slot in self.slots:
                table = slot.table
                current = table.get(slot.name)
                if current is not slot.tensor:
                    table[slot.name] = slot.tensor
                    rebound.append((table, slot.name, current))
                tensor = slot.tensor
                if tensor.requires_grad != slot.requires_grad and tensor.is_leaf:
                    flags.append((tensor, tensor.requires_grad))
                    tensor.requires_grad_(slot.requires_grad)
                if slot.is_buffer:
                    stash.append((slot.tensor, slot.tensor.detach().clone()))
                    if slot.start is not None:
                        slot.tensor.data.copy_(slot.start)
            yield
        finally:
            for tensor, value in stash:
                tensor.data.copy_(value)
            for tensor, flag in flags:
                tensor.requires_grad_(flag)
            for table, name, current in reversed(rebound):
                table[name] = current
            for module, training in modes:
                module.training = training
