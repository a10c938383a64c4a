"""State replayed when a layer is evaluated again in backward: RNG, autocast, BatchNorm.

The engine evaluates each sub-network a second time during backward. For the gradient to be
the one of the forward pass, that evaluation must see the same random numbers (dropout masks),
the same autocast state, and batch statistics without updating BatchNorm running statistics a
second time.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager, nullcontext

import torch
from torch import Tensor, nn

__all__ = [
    "RngTape",
    "rng_point",
    "AutocastState",
    "frozen_batchnorm",
    "batchnorm_without_update",
    "batchnorm_modules",
    "cuda_devices_of",
]

_local = threading.local()


def cuda_devices_of(tensors: Sequence[Tensor]) -> list[int]:
    """Indices of the CUDA devices that ``tensors`` live on."""
    return sorted({t.device.index for t in tensors if t.is_cuda and t.device.index is not None})


class RngTape:
    """RNG states at named points of one layer's forward, for replay in backward.

    The state of the CPU generator and of every CUDA device in use is taken at the start of
    the layer ("start") and wherever the layer calls :func:`rng_point`. When the layer consumed
    no random numbers, every state is dropped, so deterministic layers keep nothing.
    The global RNG is never re-seeded: replay happens inside :func:`torch.random.fork_rng`.
    """

    __slots__ = ("devices", "states", "_previous")

    def __init__(self, devices: list[int]):
        self.devices = devices
        self.states: dict[str, tuple[Tensor, list[Tensor]]] | None = {}

    def _take(self) -> tuple[Tensor, list[Tensor]]:
        return torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in self.devices]

    @contextmanager
    def recording(self) -> Iterator[RngTape]:
        """Record during the layer's forward; keep the states only if RNG was consumed."""
        start = self._take()
        self.states = {"start": start}
        self._previous = getattr(_local, "tape", None)
        _local.tape = self
        try:
            yield self
        finally:
            _local.tape = self._previous
            self._previous = None
        end = self._take()
        consumed = not torch.equal(start[0], end[0]) or any(
            not torch.equal(a, b) for a, b in zip(start[1], end[1])
        )
        if not consumed:
            self.states = None

    @property
    def consumed(self) -> bool:
        """Whether the recorded layer drew random numbers."""
        return self.states is not None

    def mark(self, name: str) -> None:
        if self.states is not None:
            self.states[name] = self._take()

    def replay(self, name: str = "start"):
        """Context manager that runs its body with the RNG state recorded at ``name``."""
        if self.states is None:
            return nullcontext()
        return self._replay(self.states.get(name, self.states["start"]))

    @contextmanager
    def _replay(self, state: tuple[Tensor, list[Tensor]]) -> Iterator[None]:
        with torch.random.fork_rng(devices=self.devices, enabled=True):
            torch.set_rng_state(state[0])
            for device, cuda_state in zip(self.devices, state[1]):
                torch.cuda.set_rng_state(cuda_state, device)
            yield


def rng_point(name: str) -> None:
    """Mark a point of a layer's forward whose RNG state backward may need to replay.

    A no-op unless the reversible engine is recording the layer. A layer that evaluates its
    sub-networks in a different order in backward than in forward (a coupling evaluates ``g``
    before ``f``) marks each sub-network with a name and replays it with ``tape.replay(name)``.
    """
    tape = getattr(_local, "tape", None)
    if tape is not None:
        tape.mark(name)


class AutocastState:
    """The autocast state of CPU and CUDA at forward, re-entered for the recomputation."""

    __slots__ = ("states",)

    def __init__(self) -> None:
        device_types = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
        self.states = [
            (dt, torch.is_autocast_enabled(dt), torch.get_autocast_dtype(dt)) for dt in device_types
        ]

    @contextmanager
    def replay(self) -> Iterator[None]:
        with ExitStack() as stack:
            for device_type, enabled, dtype in self.states:
                stack.enter_context(torch.autocast(device_type, dtype=dtype, enabled=enabled))
            yield


def batchnorm_modules(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm modules inside ``module`` (SyncBatchNorm included)."""
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@contextmanager
def frozen_batchnorm(modules: Sequence[nn.modules.batchnorm._BatchNorm]) -> Iterator[None]:
    """Batch statistics as in training, but running statistics left untouched.

    With ``track_running_stats`` off in training mode, PyTorch's BatchNorm normalises with the
    batch statistics (exactly as in the forward pass) and neither updates ``running_mean`` /
    ``running_var`` nor counts ``num_batches_tracked``. The flag is restored on exit, also when
    the body raises.
    """
    changed = [m for m in modules if m.training and m.track_running_stats]
    for m in changed:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in changed:
            m.track_running_stats = True



@contextmanager
def batchnorm_without_update(modules: Sequence[nn.modules.batchnorm._BatchNorm]) -> Iterator[None]:
    """Like :func:`frozen_batchnorm`, for recomputations that must save the same tensors.

    ``torch.utils.checkpoint`` checks that the recomputation saves as many tensors as the
    forward did, so BatchNorm must keep passing its running statistics: the momentum is set to
    0 (running statistics unchanged) and ``num_batches_tracked`` is restored on exit.
    """
    changed = [(m, m.momentum, m.num_batches_tracked.clone())
               for m in modules if m.training and m.track_running_stats]
    for m, _, _ in changed:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum, count in changed:
            m.momentum = momentum
            with torch.no_grad():
                m.num_batches_tracked.copy_(count)
