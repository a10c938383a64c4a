"""Measure the memory a training step needs, on CPU and on CUDA.

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
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["TensorMemoryTracker", "measure_step", "subprocess_peak_rss", "format_bytes"]


class TensorMemoryTracker(TorchDispatchMode):
    """Live and peak bytes of the CPU tensor storages created while the tracker is active.

    Example:
        >>> with TensorMemoryTracker() as mem:
        ...     y = model(x)
        ...     held = mem.current        # bytes kept alive by the forward pass
        ...     y.sum().backward()
        >>> mem.peak
    """

    def __init__(self, device_type: str = "cpu"):
        super().__init__()
        self.device_type = device_type
        self.current = 0
        self.peak = 0
        self._live: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {_key(t) for t in tree_flatten((args, kwargs))[0] if isinstance(t, Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, Tensor) and t.device.type == self.device_type:
                key = _key(t)
                if key not in inputs:  # views and in-place results reuse an existing storage
                    self._track(t.untyped_storage(), key)
        return out

    def _track(self, storage: torch.UntypedStorage, key: int) -> None:
        if key in self._live:
            return
        nbytes = storage.nbytes()
        if nbytes == 0:
            return
        self._live.add(key)
        self.current += nbytes
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._free, key, nbytes)

    def _free(self, key: int, nbytes: int) -> None:
        if key in self._live:
            self._live.discard(key)
            self.current -= nbytes

    def reset_peak(self) -> None:
        """Start a new peak from the bytes live now."""
        self.peak = self.current


def _key(t: Tensor) -> int:
    return t.untyped_storage()._cdata


def _default_loss(out: Any) -> Tensor:
    if isinstance(out, (tuple, list)):
        out = out[0]
    return out.float().square().mean()


def measure_step(
    model: nn.Module,
    example_input: Tensor,
    loss_fn: Callable[[Any], Tensor] | None = None,
    warmup: int = 1,
) -> dict[str, Any]:
    """Memory of one training step (forward + backward) of ``model`` on ``example_input``.

    Runs ``warmup`` steps first, then one measured step. The model is left as it was found:
    gradients and buffers (BatchNorm statistics) are restored afterwards; parameters are never
    changed (no optimizer step).

    Args:
        model: the network, in the mode (train / eval) it should be measured in.
        example_input: one batch; its ``requires_grad`` is respected.
        loss_fn: maps the output to a scalar; default: mean of squares of the first output.

    Returns:
        ``peak_bytes``: peak during the step minus what was held before it;
        ``held_bytes``: held between forward and backward (activations kept for backward plus
        the output); ``grad_bytes``: the parameter gradients, which the peak includes;
        ``method``: ``"cuda-allocator"`` or ``"cpu-tensor"``; ``device``.
    """
    loss_fn = loss_fn or _default_loss
    device = example_input.device
    grads = {p: p.grad for p in model.parameters()}
    buffers = copy.deepcopy({k: v for k, v in model.state_dict().items()
                             if k in dict(model.named_buffers())})

    def step() -> None:
        loss_fn(model(example_input)).backward()

    try:
        for _ in range(warmup):
            step()
            for p in model.parameters():
                p.grad = None
        if device.type == "cuda":
            report = _measure_cuda(model, example_input, loss_fn, device)
        else:
            report = _measure_cpu(model, example_input, loss_fn)
    finally:
        for p, g in grads.items():
            p.grad = g
        model.load_state_dict(buffers, strict=False)
    report["grad_bytes"] = sum(p.numel() * p.element_size()
                               for p in model.parameters() if p.requires_grad)
    report["device"] = _device_name(device)
    return report


def _measure_cpu(model, x, loss_fn) -> dict[str, Any]:
    with TensorMemoryTracker() as mem:
        out = model(x)
        held = mem.current
        loss_fn(out).backward()
        del out
    peak = mem.peak
    for p in model.parameters():
        p.grad = None
    return {"peak_bytes": peak, "held_bytes": held, "method": "cpu-tensor"}


def _measure_cuda(model, x, loss_fn, device) -> dict[str, Any]:
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    out = model(x)
    torch.cuda.synchronize(device)
    held = torch.cuda.memory_allocated(device) - base
    loss_fn(out).backward()
    del out
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    for p in model.parameters():
        p.grad = None
    return {"peak_bytes": peak, "held_bytes": held, "method": "cuda-allocator"}


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


_RSS_SCRIPT = r"""
import importlib, json, os, resource, sys
import torch
spec = json.loads(sys.argv[1])
module, _, name = spec["factory"].partition(":")
model, x = getattr(importlib.import_module(module), name)(**spec["kwargs"])
loss = lambda out: (out[0] if isinstance(out, (tuple, list)) else out).float().square().mean()

def status(key):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith(key + ":"))

linux = os.path.exists("/proc/self/clear_refs")
deltas = []
for _ in range(spec["steps"]):
    if linux:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak resident set (VmHWM) to the current one
        before = status("VmRSS")
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    loss(model(x)).backward()
    model.zero_grad(set_to_none=True)
    peak = status("VmHWM") if linux else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    deltas.append(1024 * (peak - before))
print(json.dumps({"step_deltas_bytes": deltas, "hwm_reset": linux}))
"""


def subprocess_peak_rss(
    factory: str, kwargs: dict | None = None, steps: int = 2, timeout: float = 600
) -> dict:
    """Process peak RSS of training steps, in a fresh Python process.

    ``factory`` is ``"package.module:function"``; the function receives ``kwargs`` and returns
    ``(model, example_input)``. On Linux the kernel's peak-RSS mark is reset before each step
    (``/proc/self/clear_refs``), so each figure is that step's own peak over the resident set
    before it; elsewhere ``ru_maxrss`` growth is used, which reads 0 when an earlier peak was
    higher. Returns ``peak_delta_bytes`` (the first step, one-off allocations included: later
    steps reuse memory the allocator kept, so their growth is small) and ``step_deltas_bytes``
    (every step). A coarse cross-check of :func:`measure_step` on CPU. The child process sees
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
    record["method"] = "process-peak-rss" + ("-reset" if record["hwm_reset"] else "")
    return record


def format_bytes(n: float) -> str:
    """``1536 -> '1.5 KiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"
