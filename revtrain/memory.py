"""Measure the memory a training step needs, on CPU and on CUDA, and plan what fits.

* CUDA: the caching allocator's counters. ``torch.cuda.reset_peak_memory_stats`` before the
  step, ``max_memory_allocated`` after it, both relative to what was allocated before.
* CPU: a deterministic tensor-level count. :class:`TensorMemoryTracker` sees every tensor an
  operator creates (a ``TorchDispatchMode``) and follows each new storage until it is freed,
  so ``current`` is the number of bytes of live storages created inside the measurement and
  ``peak`` its maximum. Work buffers that operators allocate internally and free before
  returning are not tensors and are not counted. The same code gives the same bytes on every
  run; process peak RSS (:func:`subprocess_peak_rss`) is the coarse cross-check. A storage
  shrunk in place with ``storage().resize_(0)`` while a tensor still refers to it (memcnn frees
  its inputs that way) keeps being counted at its first size: ``benchmarks/common.py`` has a
  resize-aware tracker for measuring memcnn.
* Random-number-generator states. ``torch.get_rng_state()`` and ``torch.cuda.get_rng_state()``
  build their tensors outside the dispatcher, so no ``TorchDispatchMode`` sees them, yet a
  layer that drew random numbers keeps them until its backward (the reversible engine, and
  ``torch.utils.checkpoint`` with ``preserve_rng_state``). While a tracker is active it wraps
  these two functions (restored on exit) and counts the states they return, and every tensor
  made from one (a ``clone``), as live storages like any other; ``rng_current`` is their part.
  States are CPU tensors: on CUDA they are host memory, reported apart.
* :func:`plan` (in :mod:`revtrain.planner`) predicts the memory of a step at any batch size
  from two small measured batches, per module and per memory mode, before training.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

if TYPE_CHECKING:  # loaded on first use by __getattr__ below (the planner imports this module)
    from .planner import MemoryPlan, plan, plan_main

__all__ = [
    "TensorMemoryTracker",
    "measure_step",
    "model_state",
    "subprocess_peak_rss",
    "format_bytes",
    "parse_bytes",
    "plan",
    "plan_main",
    "MemoryPlan",
]


class TensorMemoryTracker(TorchDispatchMode):
    """Live and peak bytes of the tensor storages created while the tracker is active.

    Args:
        device_type: count storages on this device type (``"cpu"`` or ``"cuda"``).
        count_rng_states: count the generator states returned by ``torch.get_rng_state`` /
            ``torch.cuda.get_rng_state`` while active (see the module docstring); they are
            CPU tensors, so they enter ``current`` only when ``device_type == "cpu"`` and are
            always in ``rng_current``.
        record: keep ``timeline``, the live bytes after every operator, and ``marks``, the
            ``(event index, label)`` pairs of :meth:`mark` (used by :func:`plan`).

    Attributes:
        current, peak: live bytes now and their maximum.
        rng_current, rng_peak: the part of them (or, on CUDA, the host bytes) that are RNG
            states.

    Example:
        >>> import torch, revtrain
        >>> stack = revtrain.ReversibleSequential(
        ...     *[revtrain.AdditiveCoupling(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
        ...       for _ in range(4)])
        >>> x = torch.randn(32, 16, requires_grad=True)
        >>> with TensorMemoryTracker() as mem:
        ...     y = stack(x)
        ...     held = mem.current        # bytes kept alive by the forward pass: the output
        ...     y.sum().backward()
        >>> held == y.numel() * y.element_size()
        True
        >>> mem.peak > held
        True
    """

    def __init__(self, device_type: str = "cpu", count_rng_states: bool = True,
                 record: bool = False):
        super().__init__()
        self.device_type = device_type
        self.count_rng_states = count_rng_states
        self.current = 0
        self.peak = 0
        self.rng_current = 0
        self.rng_peak = 0
        self._live: dict[int, int] = {}  # storage key -> bytes
        self._rng: set[int] = set()
        self._label_of: dict[int, str] = {}
        self.label = ""
        self.timeline: list[int] | None = [] if record else None
        self.marks: list[tuple[int, str]] = []
        self._saved: list[tuple[Any, str, Any]] = []

    # ----------------------------------------------------------------- dispatcher

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {_key(t) for t in _tensors((args, kwargs))}
        from_rng = bool(self._rng) and not inputs.isdisjoint(self._rng)
        for t in _tensors(out):
            key = _key(t)
            if key not in inputs:  # views and in-place results reuse an existing storage
                self._track(t, key, rng=from_rng)
        if self.timeline is not None:
            self.timeline.append(self.current)
        return out

    def _track(self, t: Tensor, key: int, rng: bool = False) -> None:
        if key in self._live:
            return
        counted = t.device.type == self.device_type
        if not (counted or rng):
            return
        storage = t.untyped_storage()
        nbytes = storage.nbytes()
        if nbytes == 0:
            return
        self._live[key] = nbytes
        self._label_of[key] = self.label
        if rng:
            self._rng.add(key)
            self.rng_current += nbytes
            self.rng_peak = max(self.rng_peak, self.rng_current)
        if counted:
            self.current += nbytes
            self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._free, key, nbytes, counted)

    def _free(self, key: int, nbytes: int, counted: bool) -> None:
        if self._live.pop(key, None) is None:
            return
        self._label_of.pop(key, None)
        if key in self._rng:
            self._rng.discard(key)
            self.rng_current -= nbytes
        if counted:
            self.current -= nbytes

    # ----------------------------------------------------------------- RNG states

    def _wrap_rng(self, owner: Any, name: str) -> None:
        original = getattr(owner, name)

        def get_rng_state(*args, **kwargs):
            state = original(*args, **kwargs)
            if isinstance(state, Tensor):
                self._track(state, _key(state), rng=True)
            return state

        self._saved.append((owner, name, original))
        setattr(owner, name, get_rng_state)

    def __enter__(self):
        if self.count_rng_states:
            self._wrap_rng(torch, "get_rng_state")
            self._wrap_rng(torch.random, "get_rng_state")
            self._wrap_rng(torch.cuda, "get_rng_state")
            self._wrap_rng(torch.cuda.random, "get_rng_state")
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            for owner, name, original in reversed(self._saved):
                setattr(owner, name, original)
            self._saved.clear()

    # ----------------------------------------------------------------- helpers

    def reset_peak(self) -> None:
        """Start a new peak from the bytes live now."""
        self.peak = self.current
        self.rng_peak = self.rng_current

    def mark(self, label: str) -> None:
        """From now on, label new storages (and, with ``record``, the timeline) ``label``."""
        self.label = label
        if self.timeline is not None:
            self.marks.append((len(self.timeline), label))

    def live_by_label(self) -> dict[str, int]:
        """Bytes of the storages alive now, by the label that was current at their creation."""
        out: dict[str, int] = {}
        for key, nbytes in self._live.items():
            if key in self._rng and self.device_type != "cpu":
                continue
            label = self._label_of.get(key, "")
            out[label] = out.get(label, 0) + nbytes
        return out


def _tensors(obj: Any, found: list[Tensor] | None = None) -> list[Tensor]:
    """The tensors in nested tuples / lists / dicts (what operators take and return)."""
    found = [] if found is None else found
    if isinstance(obj, Tensor):
        found.append(obj)
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            _tensors(item, found)
    elif isinstance(obj, dict):
        for item in obj.values():
            _tensors(item, found)
    return found


def _key(t: Tensor) -> int:
    return t.untyped_storage()._cdata


def _default_loss(out: Any) -> Tensor:
    if isinstance(out, (tuple, list)):
        out = out[0]
    return out.float().square().mean()


@contextmanager
def model_state(model: nn.Module) -> Iterator[None]:
    """Restore ``model`` on exit exactly as it was on entry.

    Every parameter's and buffer's value (non-persistent buffers included, on the CPU while
    inside), every parameter's ``.grad`` (the same tensor objects), the ``training`` flag of
    every module, and the global random streams (CPU and every CUDA device), so that
    data-dependent initialisation (ActNorm), BatchNorm statistics, dropout draws and
    gradients leave no trace.
    """
    params = dict(model.named_parameters(remove_duplicate=True))
    buffers = dict(model.named_buffers(remove_duplicate=True))
    values = {("p", k): p.detach().to("cpu", copy=True) for k, p in params.items()}
    values.update({("b", k): b.detach().to("cpu", copy=True) for k, b in buffers.items()
                   if b is not None})
    grads = {k: p.grad for k, p in params.items()}
    training = {m: m.training for m in model.modules()}
    devices = sorted({t.device.index for t in [*params.values(), *buffers.values()]
                      if t is not None and t.is_cuda and t.device.index is not None})
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        with torch.no_grad():
            for (kind, k), v in values.items():
                (params[k] if kind == "p" else buffers[k]).copy_(v)
        for k, p in params.items():
            p.grad = grads[k]
        for m, flag in training.items():
            m.training = flag


def measure_step(
    model: nn.Module,
    example_input: Tensor,
    loss_fn: Callable[[Any], Tensor] | None = None,
    warmup: int = 1,
    autocast: torch.dtype | None = None,
) -> dict[str, Any]:
    """Memory of one training step (forward + backward) of ``model`` on ``example_input``.

    Runs ``warmup`` steps first, then one measured step, and leaves the model exactly as it
    found it (:func:`model_state`: parameters, buffers, gradients, train / eval flags and the
    random streams are restored; no optimizer step is taken).

    Args:
        model: the network, in the mode (train / eval) it should be measured in.
        example_input: one batch; its ``requires_grad`` is respected.
        loss_fn: maps the output to a scalar; default: mean of squares of the first output.
        warmup: untimed steps before the measured one (lazy initialisation, allocator caches).
        autocast: run forward and loss under ``torch.autocast`` with this dtype.

    Returns:
        ``peak_bytes``: peak during the step minus what was held before it;
        ``held_bytes``: held between forward and backward (activations kept for backward plus
        the output; RNG states included on CPU); ``rng_state_bytes``: the part of what was
        held that is generator states (host memory on CUDA, not in ``held_bytes`` there);
        ``grad_bytes``: the parameter gradients, which the peak includes;
        ``method``: ``"cuda-allocator"`` or ``"cpu-tensor"``; ``device``.
    """
    loss_fn = loss_fn or _default_loss
    device = example_input.device
    cast = (torch.autocast(device.type, dtype=autocast) if autocast is not None
            else nullcontext())
    with model_state(model):
        for _ in range(warmup):
            with cast:
                loss = loss_fn(model(example_input))
            loss.backward()
            del loss
            for p in model.parameters():
                p.grad = None
        if device.type == "cuda":
            report = _measure_cuda(model, example_input, loss_fn, cast, device)
        else:
            report = _measure_cpu(model, example_input, loss_fn, cast)
    report["grad_bytes"] = sum(p.numel() * p.element_size()
                               for p in model.parameters() if p.requires_grad)
    report["device"] = _device_name(device)
    return report


def _measure_cpu(model, x, loss_fn, cast) -> dict[str, Any]:
    with TensorMemoryTracker() as mem:
        with cast:
            out = model(x)
        held, rng = mem.current, mem.rng_current
        with cast:
            loss = loss_fn(out)
        loss.backward()
        del out, loss
    for p in model.parameters():
        p.grad = None
    return {"peak_bytes": mem.peak, "held_bytes": held, "rng_state_bytes": rng,
            "method": "cpu-tensor"}


def _measure_cuda(model, x, loss_fn, cast, device) -> dict[str, Any]:
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    with TensorMemoryTracker("cuda") as mem:  # for the RNG states it holds (host memory)
        with cast:
            out = model(x)
        torch.cuda.synchronize(device)
        held = torch.cuda.memory_allocated(device) - base
        rng = mem.rng_current
        with cast:
            loss = loss_fn(out)
        loss.backward()
        del out, loss
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    for p in model.parameters():
        p.grad = None
    return {"peak_bytes": peak, "held_bytes": held, "rng_state_bytes": rng,
            "method": "cuda-allocator"}


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


_RSS_SCRIPT = r"""
import importlib, json, os, sys, threading, time
import psutil
import torch
spec = json.loads(sys.argv[1])
module, _, name = spec["factory"].partition(":")
model, x = getattr(importlib.import_module(module), name)(**spec["kwargs"])
loss = lambda out: (out[0] if isinstance(out, (tuple, list)) else out).float().square().mean()
proc = psutil.Process()
# Linux keeps the peak resident set (VmHWM) and lets a process reset it to the current one;
# psutil has no peak on Linux, so it is read from /proc there. Elsewhere psutil is polled.
linux = os.path.exists("/proc/self/clear_refs")

def hwm():
    with open("/proc/self/status") as f:
        return next(1024 * int(l.split()[1]) for l in f if l.startswith("VmHWM:"))

try:  # glibc: give freed heap memory back first, so each step's peak is its own
    import ctypes
    trim = ctypes.CDLL("libc.so.6").malloc_trim
except (OSError, AttributeError):
    trim = None

deltas = []
for _ in range(spec["steps"]):
    if trim is not None:
        trim(0)
    before = proc.memory_info().rss
    if linux:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    else:
        peak, done = [before], threading.Event()
        def poll():
            while not done.is_set():
                peak[0] = max(peak[0], proc.memory_info().rss)
                time.sleep(0.0005)
        poller = threading.Thread(target=poll)
        poller.start()
    loss(model(x)).backward()
    model.zero_grad(set_to_none=True)
    if linux:
        deltas.append(hwm() - before)
    else:
        done.set()
        poller.join()
        deltas.append(max(peak[0], proc.memory_info().rss) - before)
print(json.dumps({"step_deltas_bytes": deltas, "hwm_reset": linux}))
"""


def subprocess_peak_rss(
    factory: str, kwargs: dict | None = None, steps: int = 2, timeout: float = 600
) -> dict:
    """Process peak RSS of training steps, in a fresh Python process.

    ``factory`` is ``"package.module:function"``; the function receives ``kwargs`` and returns
    ``(model, example_input)``. Each step's figure is its peak resident set over the resident
    set before it (``psutil``): on Linux the kernel's peak-RSS mark is reset before each step
    (``/proc/self/clear_refs``) and read after it (``VmHWM``, exact); elsewhere ``psutil``
    is polled every 0.5 ms during the step (may miss short peaks). With glibc, freed heap memory
    is returned to the system (``malloc_trim``) before each step, so that a later step's figure
    is its own peak and not hidden by memory the allocator kept. Returns ``peak_delta_bytes``
    (the first step, one-off allocations included), ``steady_delta_bytes`` (the largest later
    step: the figure to compare between memory modes), ``step_deltas_bytes`` (every step) and
    ``method``. A coarse cross-check of :func:`measure_step` on CPU. The child process sees
    the caller's ``sys.path``, so a factory importable here is importable there.
    """
    spec = json.dumps({"factory": factory, "kwargs": kwargs or {}, "steps": steps})
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    result = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, spec], capture_output=True,
                            text=True, timeout=timeout, check=False, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"subprocess_peak_rss({factory!r}) failed:\n{result.stderr[-2000:]}")
    record = json.loads(result.stdout.strip().splitlines()[-1])
    record["peak_delta_bytes"] = record["step_deltas_bytes"][0]
    record["steady_delta_bytes"] = max(record["step_deltas_bytes"][1:], default=record["peak_delta_bytes"])
    record["method"] = ("process-peak-rss-hwm-reset" if record["hwm_reset"]
                        else "process-rss-psutil-polled")
    return record


def format_bytes(n: float) -> str:
    """``1536 -> '1.5 KiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9,
          "t": 1e12, "tb": 1e12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str | int | float) -> int:
    """``"8GiB" -> 8589934592``, ``"80GB" -> 80e9``, ``1024 -> 1024``."""
    if isinstance(text, (int, float)):
        return int(text)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ValueError(f"cannot read {text!r} as a size; write e.g. 8GiB, 80GB, 512MiB or a "
                         "number of bytes")
    return int(float(match.group(1)) * _UNITS[unit])


def __getattr__(name: str) -> Any:
    # the planner (revtrain/planner.py) builds on this module; loaded on first use
    if name in ("plan", "plan_main", "MemoryPlan"):
        from . import planner

        return getattr(planner, name)
    raise AttributeError(f"module 'revtrain.memory' has no attribute {name!r}")
