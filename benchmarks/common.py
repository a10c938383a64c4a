r"""Shared parts of the benchmarks: the conv coupling stack, its memcnn twin, timing, memory.

The benchmark stack is ``depth`` additive couplings on ``channels`` channels,

.. math::
    y_1 = x_1 + f(x_2), \qquad y_2 = x_2 + g(y_1)

with :math:`f, g` = conv3x3-BN-ReLU-conv3x3 on ``channels / 2`` channels. The same layers (same
weights, ``copy.deepcopy``) run as a :class:`revtrain.ReversibleSequential` in the three revtrain
memory modes and, wrapped in ``memcnn.InvertibleModuleWrapper(memcnn.AdditiveCoupling(...))``,
with memcnn.

memcnn frees (``storage().resize_(0)``) the input of every wrapper, the caller's input
included, so every benchmarked step runs on a fresh copy of the batch (:class:`FreshInput`, in
every mode, so that the copy costs all modes the same). Because the storages memcnn frees stay
referenced, the tensor-level tracker of :mod:`revtrain.memory` would still count them; memcnn
is therefore measured with :class:`ResizeAwareTracker`, which counts the bytes a storage holds
now. For every model that frees nothing this gives exactly :func:`revtrain.memory.measure_step`'s
figures (checked in ``tests/test_benchmarks.py``).
"""

from __future__ import annotations

import copy
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
import warnings
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import revtrain
from revtrain.memory import TensorMemoryTracker

__all__ = [
    "MODES",
    "REPO",
    "FreshInput",
    "ResizeAwareTracker",
    "coupling_stack",
    "environment",
    "measure_memory",
    "memcnn_twin",
    "rss_coupling_stack",
    "square_loss",
    "stack_models",
    "subnet",
    "subprocess_rss_step",
    "time_interleaved",
    "training_step",
    "write_json",
]

REPO = Path(__file__).resolve().parents[1]
MODES = ("stored", "checkpoint", "memcnn", "reversible")


def subnet(channels: int) -> nn.Sequential:
    """conv3x3-BN-ReLU-conv3x3 on ``channels`` channels, ``(B, C, H, W) -> (B, C, H, W)``."""
    return nn.Sequential(
        nn.Conv2d(channels, channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(channels),
        nn.ReLU(),
        nn.Conv2d(channels, channels, 3, padding=1, bias=False),
    )


def coupling_stack(depth: int, channels: int = 32, memory: str = "reversible",
                   seed: int = 0) -> revtrain.ReversibleSequential:
    """``depth`` additive couplings with :func:`subnet` as ``f`` and ``g``, seeded weights."""
    if channels % 2:
        raise ValueError(f"coupling_stack: channels must be even, got {channels}")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        layers = [revtrain.AdditiveCoupling(subnet(channels // 2), subnet(channels // 2))
                  for _ in range(depth)]
    return revtrain.ReversibleSequential(*layers, memory=memory)


class FreshInput(nn.Module):
    """Runs ``module`` on a copy of the input (memcnn frees the input it is given)."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x: Tensor) -> Tensor:
        return self.module(x.clone())


def memcnn_twin(stack: revtrain.ReversibleSequential) -> nn.Sequential:
    """The same couplings (copied weights) as memcnn ``InvertibleModuleWrapper`` blocks.

    memcnn's defaults: ``keep_input=False`` (inputs freed, rebuilt by ``inverse`` in backward),
    ``preserve_rng_state=False`` (the stack draws no random numbers).
    """
    import memcnn

    blocks = []
    for layer in stack:
        if not isinstance(layer, revtrain.AdditiveCoupling):
            raise TypeError(f"memcnn_twin: expects AdditiveCoupling layers, got {type(layer)}")
        coupling = memcnn.AdditiveCoupling(Fm=copy.deepcopy(layer.f), Gm=copy.deepcopy(layer.g))
        blocks.append(memcnn.InvertibleModuleWrapper(coupling, keep_input=False))
    return nn.Sequential(*blocks)


def stack_models(depth: int, channels: int, modes: Sequence[str] = MODES,
                 seed: int = 0) -> dict[str, nn.Module]:
    """One model per mode, all with the same weights, each behind :class:`FreshInput`."""
    base = coupling_stack(depth, channels, "stored", seed)
    models: dict[str, nn.Module] = {}
    for mode in modes:
        if mode == "memcnn":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # memcnn's torch.cuda.amp use
                models[mode] = FreshInput(memcnn_twin(base))
        else:
            twin = copy.deepcopy(base)
            # parse: a plain string assigned to `.memory` is not recognised by the engine
            twin.memory = revtrain.MemoryMode.parse(mode)
            models[mode] = FreshInput(twin)
    return models


def square_loss(out: Any) -> Tensor:
    """Mean of squares of the (first) output, in float32."""
    if isinstance(out, (tuple, list)):
        out = out[0]
    return out.float().square().mean()


# ----------------------------------------------------------------------------- timing


def spread(values: list[float], ndigits: int = 3) -> dict[str, float | None]:
    """Mean, sample standard deviation (n - 1; ``None`` for one value), min and max of
    ``values`` (one figure per seed), each rounded to ``ndigits``."""
    t = torch.tensor(values, dtype=torch.float64)
    return {"mean": round(float(t.mean()), ndigits),
            "std": round(float(t.std()), ndigits) if len(values) > 1 else None,
            "min": round(float(t.min()), ndigits), "max": round(float(t.max()), ndigits)}


def time_interleaved(
    steps: dict[str, Callable[[], None]],
    repeats: int,
    warmup: int = 2,
    device: torch.device | str = "cpu",
) -> dict[str, dict[str, Any]]:
    """Median wall time of each ``steps[name]()``, the names' repeats interleaved.

    Built on ``torch.utils.benchmark``: each sample is read with its clock
    (``torch.utils.benchmark.timer``, which synchronises an accelerator before reading the
    time) and the median is that of a ``torch.utils.benchmark.Measurement`` of the samples.
    ``Timer.timeit`` itself is not used because it runs untimed warm-up calls before every
    sample, which would break the interleaving and triple the cost. Every round runs each step
    once; the order rotates from round to round, so that no step always follows the same one
    (caches, allocator state, a neighbour's load spike hit all of them alike). ``warmup``
    untimed rounds come first. ``device`` is kept for callers; the clock synchronises whatever
    accelerator torch sees.

    Returns:
        ``{name: {"median_s", "min_s", "q1_s", "q3_s", "samples_s"}}`` (plain JSON types).
    """
    from torch.utils.benchmark import Measurement, TaskSpec, timer

    names = list(steps)
    for _ in range(warmup):
        for name in names:
            steps[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            start = timer()
            steps[name]()
            samples[name].append(timer() - start)
    out = {}
    threads = torch.get_num_threads()
    for name, values in samples.items():
        measurement = Measurement(1, values, TaskSpec(stmt=f"{name}()", setup="", label=name,
                                                      num_threads=threads))
        q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
        out[name] = {"median_s": measurement.median, "min_s": min(values),
                     "q1_s": q[0], "q3_s": q[2], "samples_s": values}
    return out


def training_step(model: nn.Module, x: Tensor,
                  loss_fn: Callable[[Any], Tensor] = square_loss) -> Callable[[], None]:
    """A closure running forward + backward of ``loss_fn(model(x))``; gradients dropped after."""
    params = [p for p in model.parameters() if p.requires_grad]

    def step() -> None:
        loss_fn(model(x)).backward()
        for p in params:
            p.grad = None

    return step


# ----------------------------------------------------------------------------- memory


class ResizeAwareTracker(TensorMemoryTracker):
    """:class:`~revtrain.memory.TensorMemoryTracker` that counts the bytes storages hold *now*.

    The base tracker adds a storage's size when it is created and subtracts it when the storage
    object dies. memcnn releases memory by ``storage().resize_(0)`` on storages that stay
    referenced, which the base tracker cannot see. This tracker keeps a weak reference to each
    storage and, after every operator, recounts ``current = sum(storage.nbytes())`` over the
    live ones (cost: O(live storages) per operator; fine for benchmarks).
    """

    def __init__(self, device_type: str = "cpu"):
        super().__init__(device_type)
        self._refs: dict[int, weakref.ref] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = super().__torch_dispatch__(func, types, args, kwargs)
        self.recount()
        return out

    def _track(self, t: Tensor, key: int, rng: bool = False) -> None:
        if key in self._live or t.device.type != self.device_type:
            return
        storage = t.untyped_storage()
        if storage.nbytes() == 0:
            return
        self._live[key] = 0
        self._refs[key] = weakref.ref(storage)
        if rng:
            self._rng.add(key)
        weakref.finalize(storage, self._free, key, 0, True)

    def _free(self, key: int, nbytes: int, counted: bool) -> None:
        self._live.pop(key, None)
        self._refs.pop(key, None)
        self._rng.discard(key)

    def recount(self) -> None:
        """Set ``current`` to the bytes held now by the tracked storages; update ``peak``."""
        total = rng = 0
        for key, ref in list(self._refs.items()):
            storage = ref()
            if storage is not None:
                total += storage.nbytes()
                if key in self._rng:
                    rng += storage.nbytes()
        self.current, self.rng_current = total, rng
        self.peak = max(self.peak, total)
        self.rng_peak = max(self.rng_peak, rng)


def measure_memory(model: nn.Module, x: Tensor, resize_aware: bool = False,
                   loss_fn: Callable[[Any], Tensor] = square_loss) -> dict[str, Any]:
    """Peak and held bytes of one training step after one warm-up step.

    ``resize_aware=False`` is :func:`revtrain.memory.measure_step` itself. ``True`` (CPU only)
    is the same procedure with :class:`ResizeAwareTracker`, for models that free memory by
    resizing storages (memcnn).
    """
    from revtrain.memory import measure_step

    if not resize_aware or x.device.type != "cpu":
        return measure_step(model, x, loss_fn=loss_fn, warmup=1)
    params = [p for p in model.parameters() if p.requires_grad]
    loss_fn(model(x)).backward()
    for p in params:
        p.grad = None
    with ResizeAwareTracker() as mem:
        out = model(x)
        mem.recount()
        held, rng = mem.current, mem.rng_current
        loss_fn(out).backward()
        del out
        mem.recount()
    for p in params:
        p.grad = None
    return {"peak_bytes": mem.peak, "held_bytes": held, "rng_state_bytes": rng,
            "method": "cpu-tensor-resize-aware",
            "grad_bytes": sum(p.numel() * p.element_size() for p in params),
            "device": device_name(x.device)}


def rss_coupling_stack(depth: int, channels: int, size: int, batch: int, memory: str,
                       seed: int = 0) -> tuple[nn.Module, Tensor]:
    """Factory for :func:`revtrain.memory.subprocess_peak_rss`: ``(model, batch)``."""
    models = stack_models(depth, channels, [memory], seed)
    x = torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(seed))
    return models[memory], x


def subprocess_rss_step(kwargs: dict[str, Any], timeout: float = 600) -> dict[str, Any]:
    """Peak resident-set growth of training steps of :func:`rss_coupling_stack`.

    :func:`revtrain.memory.subprocess_peak_rss` in a fresh process (``psutil``; on Linux the
    kernel's peak-RSS mark is reset before each step): ``cold_delta_bytes`` (first step:
    one-off allocations included) and ``warm_delta_bytes`` (second step: the allocator may
    reuse memory it kept).
    """
    from revtrain.memory import subprocess_peak_rss

    record = subprocess_peak_rss("benchmarks.common:rss_coupling_stack", kwargs, steps=2,
                                 timeout=timeout)
    cold, warm = record["step_deltas_bytes"]
    return {"cold_delta_bytes": cold, "warm_delta_bytes": warm, "method": record["method"]}


# ----------------------------------------------------------------------------- records


def device_name(device: torch.device | str) -> str:
    """A readable device name: the GPU's, or ``cpu (<arch>, <n> threads)``."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _git_commit() -> str | None:
    try:
        result = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                                capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() or None


def environment(device: torch.device | str = "cpu") -> dict[str, Any]:
    """Where and how a benchmark ran: device, versions, threads, load, command, commit."""
    try:
        import memcnn

        memcnn_version = getattr(memcnn, "__version__", "?")
    except ImportError:
        memcnn_version = None
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "device": device_name(device),
        "device_type": torch.device(device).type,
        "torch": torch.__version__,
        "memcnn": memcnn_version,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "load_average_at_start": list(load) if load else None,
        "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv]),
        "git_commit": _git_commit(),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def finish_figure(fig, ax, path: Path, xlabel: str, ylabel: str, title: str,
                  legend_size: int = 8) -> None:
    """Label ``ax``, add its legend, save ``fig`` to ``path`` (120 dpi) and close it."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=legend_size)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    import matplotlib.pyplot as plt

    plt.close(fig)


def write_json(path: Path, payload: Any) -> None:
    """Write ``payload`` as indented JSON, creating the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1) + "\n")
