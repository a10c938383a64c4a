r"""What fits before training: the memory of a step at any batch size, per module and mode.

:func:`plan` measures two small batches (``probe_batches``, default 2 and 3; a batch of 1
changes the memory layout of some operators, and BatchNorm refuses it at 1x1) of one training
step of a deep copy of the model in each memory mode, with the tensor-level count of
:class:`~revtrain.memory.TensorMemoryTracker` recording the live bytes after every operator,
and extrapolates **event by event**: for a network without batch-dependent control flow the
step runs the same operators in the same order at every batch size, and each live-bytes value
is affine in the batch size :math:`B` (every tensor is either per-sample or
batch-independent: parameters, gradients, BatchNorm statistics), so

.. math::
    m_t(B) = a_t + b_t B, \qquad \mathrm{peak}(B) = \max_t\, (a_t + b_t B)

with :math:`a_t, b_t` solved from the two probes. The maximum is taken over the predicted
curve, so a peak that moves from the end of backward (parameter gradients dominate at small
batches) to the start of backward (activations dominate at large ones) is still found, which
scaling the measured peak alone would miss. If the two probes do not run the same number of
operators, the whole-step figures are scaled instead (``fit = "whole-step"``). On CUDA the
allocator's own overhead (block rounding, library workspaces) is measured at both probes and
scaled the same way. Nothing runs at the planned batch size.

Each row of the table is a top-level module, with every module that contains a
:class:`~revtrain.ReversibleSequential` split into its children, so each stack gets its own
row: bytes it holds between forward and backward (created in its forward, alive when backward
starts) and the step's live bytes at their highest while its forward or its backward runs.
The end-to-end figure adds parameters and buffers, the optimizer's state (Adam: two copies of
the trainable parameters) and the input batch to the step's peak (which includes the
gradients); the largest batch that fits ``budget`` is solved on that figure.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .memory import TensorMemoryTracker, _device_name, format_bytes, parse_bytes
from .modes import MemoryMode, set_memory

__all__ = ["MemoryPlan", "plan", "plan_main", "default_step", "plan_units", "OPTIMIZER_COPIES"]

#: copies of the trainable parameters an optimizer keeps as state
OPTIMIZER_COPIES = {"none": 0, "sgd": 0, "sgd-momentum": 1, "rmsprop": 1, "adagrad": 1,
                    "adam": 2, "adamw": 2}
_REST = "(rest: loss and code between modules)"


def default_step(model: nn.Module, x: Tensor) -> Tensor:
    """The training loss :func:`plan` uses unless told otherwise.

    Flows (a ``log_prob`` method): mean negative log-likelihood, conditional ones (an
    ``example_context`` method) given that context. Classifiers (output
    ``(B, K)``): cross-entropy against labels ``arange(B) % K``. Anything else: mean of squares
    of the (first) output.
    """
    if callable(getattr(model, "example_context", None)):  # conditional flows
        return -model.log_prob(x, context=model.example_context(x.shape[0])).mean()
    if callable(getattr(model, "log_prob", None)):
        return -model.log_prob(x).mean()
    out = model(x)
    if isinstance(out, (tuple, list)):
        out = out[0]
    if out.dim() == 2 and out.is_floating_point():
        labels = torch.arange(out.shape[0], device=out.device) % out.shape[1]
        return F.cross_entropy(out, labels)
    return out.float().square().mean()


def _has_stack(module: nn.Module) -> bool:
    from .sequential import ReversibleSequential

    return any(isinstance(m, ReversibleSequential) for m in module.modules())


def plan_units(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The rows of a plan: top-level modules, split where they contain a reversible stack."""
    from .sequential import ReversibleSequential

    def expand(prefix: str, module: nn.Module) -> list[tuple[str, nn.Module]]:
        out = []
        for name, child in module.named_children():
            full = f"{prefix}{name}"
            if not isinstance(child, ReversibleSequential) and _has_stack(child):
                out += expand(full + ".", child)
            else:
                out.append((full, child))
        return out

    return expand("", model) or [("(model)", model)]


# --------------------------------------------------------------------------- one probe


@dataclass
class _Probe:
    batch: int
    timeline: list[int]
    marks: list[tuple[int, str]]
    held: int
    peak: int
    rng: int
    unit_held: dict[str, int]
    allocator_peak: int | None = None
    allocator_held: int | None = None


class _Labels:
    """Wraps the units' ``forward`` / ``forward_and_log_det`` on the planner's copy so that
    the tracker knows which unit runs: ``name:fwd`` during its forward, ``name:bwd`` from the
    moment the gradient of its output is ready (a hook on that output)."""

    def __init__(self, units: list[tuple[str, nn.Module]]):
        self.tracker: TensorMemoryTracker | None = None
        self.stack: list[str] = []
        for name, unit in units:
            for method in ("forward", "forward_and_log_det"):
                if callable(getattr(unit, method, None)):
                    setattr(unit, method, self._wrap(name, getattr(unit, method)))

    def _mark(self, label: str) -> None:
        if self.tracker is not None:
            self.tracker.mark(label)

    def _wrap(self, name: str, fn: Callable) -> Callable:
        def wrapped(*args, **kwargs):
            if self.tracker is None:
                return fn(*args, **kwargs)
            self.stack.append(name)
            self._mark(f"{name}:fwd")
            try:
                out = fn(*args, **kwargs)
            finally:
                self.stack.pop()
                self._mark(f"{self.stack[-1]}:fwd" if self.stack else f"{_REST}:fwd")
            for t in (out if isinstance(out, (tuple, list)) else [out]):
                if isinstance(t, Tensor) and t.requires_grad:
                    t.register_hook(self._backward_hook(name))
            return out

        return wrapped

    def _backward_hook(self, name: str) -> Callable:
        def hook(grad: Tensor) -> None:
            self._mark(f"{name}:bwd")

        return hook


def _probe(model: nn.Module, labels: _Labels, step: Callable, x: Tensor,
           autocast: torch.dtype | None) -> _Probe:
    from contextlib import nullcontext

    cast = (torch.autocast(x.device.type, dtype=autocast) if autocast is not None
            else nullcontext())
    params = [p for p in model.parameters() if p.requires_grad]
    with cast:  # warm-up: lazy and data-dependent initialisation, allocator caches
        loss = step(model, x)
    loss.backward()
    del loss
    for p in params:
        p.grad = None
    allocator = None
    if x.device.type == "cuda":
        allocator = _allocator_step(model, step, x, cast, params)
    tracker = TensorMemoryTracker(x.device.type, record=True)
    labels.tracker = tracker
    try:
        with tracker:
            tracker.mark(f"{_REST}:fwd")
            with cast:
                loss = step(model, x)
            held, rng = tracker.current, tracker.rng_current
            unit_held = tracker.live_by_label()
            tracker.mark(f"{_REST}:bwd")
            loss.backward()
            del loss
    finally:
        labels.tracker = None
    for p in params:
        p.grad = None
    held_by_unit: dict[str, int] = {}
    for label, nbytes in unit_held.items():
        unit = label.rsplit(":", 1)[0] if label else _REST
        held_by_unit[unit] = held_by_unit.get(unit, 0) + nbytes
    return _Probe(x.shape[0], tracker.timeline or [0], tracker.marks, held, tracker.peak, rng,
                  held_by_unit, *(allocator or (None, None)))


def _allocator_step(model, step, x, cast, params) -> tuple[int, int]:
    device = x.device
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    with cast:
        loss = step(model, x)
    torch.cuda.synchronize(device)
    held = torch.cuda.memory_allocated(device) - base
    loss.backward()
    del loss
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    for p in params:
        p.grad = None
    return peak, held


# --------------------------------------------------------------------------- the fit


def _affine(b1: int, v1: float, b2: int, v2: float) -> tuple[float, float]:
    slope = (v2 - v1) / (b2 - b1)
    return v1 - slope * b1, slope


@dataclass
class _ModeFit:
    """Two probes of one mode and what follows from them."""

    mode: str
    probes: tuple[_Probe, _Probe]
    fit: str = "whole-step"
    _a: Tensor | None = None
    _b: Tensor | None = None
    _windows: dict[str, list[tuple[int, int]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        p, q = self.probes
        same = (len(p.timeline) == len(q.timeline)
                and [m for m in p.marks] == [m for m in q.marks])
        if same:
            self.fit = "per-event"
            v1 = torch.tensor(p.timeline, dtype=torch.float64)
            v2 = torch.tensor(q.timeline, dtype=torch.float64)
            self._b = (v2 - v1) / (q.batch - p.batch)
            self._a = v1 - self._b * p.batch
            ends = [i for i, _ in p.marks[1:]] + [len(p.timeline)]
            for (start, label), end in zip(p.marks, ends):
                if end > start:
                    self._windows.setdefault(label, []).append((start, end))

    def _line(self, get: Callable[[_Probe], float], batch: int) -> float:
        p, q = self.probes
        a, b = _affine(p.batch, get(p), q.batch, get(q))
        return max(a + b * batch, 0.0)

    def peak(self, batch: int) -> float:
        if self.fit == "per-event":
            return float((self._a + self._b * batch).max())
        return self._line(lambda r: r.peak, batch)

    def window_peak(self, label: str, batch: int) -> float | None:
        spans = self._windows.get(label)
        if self.fit != "per-event" or not spans:
            return None
        line = self._a + self._b * batch
        return float(max(line[s:e].max() for s, e in spans))

    def held(self, batch: int) -> float:
        return self._line(lambda r: r.held, batch)

    def rng(self, batch: int) -> float:
        return self._line(lambda r: r.rng, batch)

    def unit_held(self, unit: str, batch: int) -> float:
        return self._line(lambda r: r.unit_held.get(unit, 0), batch)

    def allocator_overhead(self, batch: int) -> float:
        """Allocator peak minus tensor-level peak (CUDA), scaled between the probes."""
        p, q = self.probes
        if p.allocator_peak is None or q.allocator_peak is None:
            return 0.0
        a, b = _affine(p.batch, p.allocator_peak - p.peak, q.batch, q.allocator_peak - q.peak)
        return a + b * batch


# --------------------------------------------------------------------------- the plan


@dataclass
class MemoryPlan:
    """The result of :func:`plan`: ``print(plan)`` for the table, :meth:`to_dict` for JSON.

    :meth:`predict` gives the figures of one mode at any batch size (from the same probes).
    """

    model: str
    input_shape: tuple[int, ...]
    batch_size: int
    modes: list[str]
    units: list[str]
    device: str
    method: str
    probe_batches: tuple[int, int]
    param_bytes: int
    buffer_bytes: int
    grad_bytes: int
    optimizer: str
    optimizer_bytes: int
    input_bytes_per_sample: int
    budget: int | None
    _fits: dict[str, _ModeFit] = field(repr=False, default_factory=dict)

    @property
    def static_bytes(self) -> int:
        """Held through training whatever the batch: parameters, buffers, optimizer state."""
        return self.param_bytes + self.buffer_bytes + self.optimizer_bytes

    def predict(self, mode: str, batch_size: int | None = None) -> dict[str, Any]:
        """Predicted figures of ``mode`` at ``batch_size`` (default: the planned one)."""
        mode = MemoryMode.parse(mode).value
        if mode not in self._fits:
            raise ValueError(f"MemoryPlan: mode {mode!r} was not planned; planned: {self.modes}")
        fit, b = self._fits[mode], batch_size or self.batch_size
        peak = round(fit.peak(b) + fit.allocator_overhead(b))
        units = {}
        for name in self.units + [_REST]:
            units[name] = {"held_bytes": round(fit.unit_held(name, b)),
                           "forward_peak_bytes": _round(fit.window_peak(f"{name}:fwd", b)),
                           "backward_peak_bytes": _round(fit.window_peak(f"{name}:bwd", b))}
        end_to_end = self.static_bytes + self.input_bytes_per_sample * b + peak
        return {"batch_size": b, "held_bytes": round(fit.held(b)), "peak_bytes": peak,
                "activation_peak_bytes": peak - self.grad_bytes,
                "rng_state_bytes": round(fit.rng(b)), "end_to_end_bytes": end_to_end,
                "fit": fit.fit, "units": units}

    def largest_batch(self, mode: str, budget: int | str | None = None) -> int | None:
        """The largest batch whose end-to-end bytes fit ``budget`` (0 if not even 1 does)."""
        budget = self.budget if budget is None else parse_bytes(budget)
        if budget is None:
            return None

        def fits(b: int) -> bool:
            return self.predict(mode, b)["end_to_end_bytes"] <= budget

        if not fits(1):
            return 0
        hi = 2
        while fits(hi) and hi < 2**40:
            hi *= 2
        lo = hi // 2
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
        return lo

    def to_dict(self) -> dict[str, Any]:
        """Everything as plain JSON types."""
        stored = self.predict("stored") if "stored" in self.modes else None
        out = {k: getattr(self, k) for k in (
            "model", "batch_size", "modes", "units", "device", "method", "param_bytes",
            "buffer_bytes", "grad_bytes", "optimizer", "optimizer_bytes",
            "input_bytes_per_sample", "budget")}
        out["input_shape"] = list(self.input_shape)
        out["probe_batches"] = list(self.probe_batches)
        out["rest_row"] = _REST
        out["predictions"] = {}
        for mode in self.modes:
            p = self.predict(mode)
            p["largest_batch"] = self.largest_batch(mode)
            if stored is not None:
                p["end_to_end_saving_bytes"] = stored["end_to_end_bytes"] - p["end_to_end_bytes"]
                p["end_to_end_ratio_vs_stored"] = stored["end_to_end_bytes"] / p["end_to_end_bytes"]
                p["activation_peak_ratio_vs_stored"] = (stored["activation_peak_bytes"]
                                                        / max(p["activation_peak_bytes"], 1))
            out["predictions"][mode] = p
        return out

    def table(self) -> str:
        """A readable table (plain text, fixed width)."""
        d = self.to_dict()
        preds = d["predictions"]
        shape = "x".join(map(str, self.input_shape))
        lines = [
            f"Memory plan: {self.model}, input {shape}, batch {self.batch_size}, on {self.device}",
            f"  predicted from measured batches {self.probe_batches[0]} and "
            f"{self.probe_batches[1]} ({self.method}; fit: "
            f"{', '.join(sorted({p['fit'] for p in preds.values()}))}); "
            "held = kept from forward to backward, peak = live bytes at their highest",
            "",
        ]
        cols = [f"{m} held" for m in self.modes] + [f"{m} peak" for m in self.modes]
        copies = OPTIMIZER_COPIES.get(self.optimizer, "?")
        opt_label = f"optimizer state ({self.optimizer}, {copies} copies)"
        width = min(max(len(n) for n in [*self.units, _REST, opt_label]), 60)
        head = f"{'':<{width}} " + " ".join(f"{c:>18}" for c in cols)
        lines += [head, "-" * len(head)]
        for name in self.units + [_REST]:
            cells = [format_bytes(preds[m]["units"][name]["held_bytes"]) for m in self.modes]
            for m in self.modes:
                u = preds[m]["units"][name]
                peaks = [v for v in (u["forward_peak_bytes"], u["backward_peak_bytes"]) if v]
                cells.append(format_bytes(max(peaks)) if peaks else "-")
            lines.append(f"{name[:width]:<{width}} " + " ".join(f"{c:>18}" for c in cells))
        lines.append("-" * len(head))

        def row(label: str, held: list[str], peak: list[str]) -> None:
            lines.append(f"{label:<{width}} " + " ".join(f"{c:>18}" for c in held + peak))

        blank = [""] * len(self.modes)
        row("step (activations + gradients)",
            [format_bytes(preds[m]["held_bytes"]) for m in self.modes],
            [format_bytes(preds[m]["peak_bytes"]) for m in self.modes])
        if any(preds[m]["rng_state_bytes"] for m in self.modes):
            row("  of which RNG states (held)",
                [format_bytes(preds[m]["rng_state_bytes"]) for m in self.modes], blank)
        row("  of which parameter gradients", blank, [format_bytes(self.grad_bytes)] * len(self.modes))
        row("parameters + buffers", blank, [format_bytes(self.param_bytes + self.buffer_bytes)]
            * len(self.modes))
        row(opt_label, blank,
            [format_bytes(self.optimizer_bytes)] * len(self.modes))
        row("input batch", blank,
            [format_bytes(self.input_bytes_per_sample * self.batch_size)] * len(self.modes))
        row("end to end", blank, [format_bytes(preds[m]["end_to_end_bytes"]) for m in self.modes])
        if "stored" in preds:
            row("  saving vs stored (end to end)", blank,
                [f"{format_bytes(preds[m]['end_to_end_saving_bytes'])} "
                 f"({preds[m]['end_to_end_ratio_vs_stored']:.2f}x)" for m in self.modes])
            row("  activation peak vs stored", blank,
                [f"{preds[m]['activation_peak_ratio_vs_stored']:.2f}x less" for m in self.modes])
        if self.budget is not None:
            row(f"largest batch in {format_bytes(self.budget)}", blank,
                [str(preds[m]["largest_batch"]) for m in self.modes])
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _round(v: float | None) -> int | None:
    return None if v is None else round(v)


def _optimizer_copies(optimizer: str | int) -> tuple[str, int]:
    if isinstance(optimizer, int):
        return f"{optimizer} copies", optimizer
    key = optimizer.lower()
    if key not in OPTIMIZER_COPIES:
        raise ValueError(f"plan: unknown optimizer {optimizer!r}; use one of "
                         f"{sorted(OPTIMIZER_COPIES)} or the number of parameter copies it keeps")
    return key, OPTIMIZER_COPIES[key]


def plan(
    model: nn.Module,
    input_shape: Sequence[int],
    batch_size: int,
    *,
    budget: int | str | None = None,
    optimizer: str | int = "adam",
    modes: Sequence[str] | None = None,
    step: Callable[[nn.Module, Tensor], Tensor] | None = None,
    probe_batches: tuple[int, int] = (2, 3),
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    autocast: torch.dtype | None = None,
) -> MemoryPlan:
    """Predict the memory of a training step of ``model`` at ``batch_size``, in each mode.

    Args:
        model: the network; left untouched (every measurement runs on a deep copy, in
            training mode).
        input_shape: one sample's shape, without the batch dimension, e.g. ``(3, 32, 32)``.
        batch_size: the batch to plan for (nothing runs at this size).
        budget: device memory available, bytes or a string such as ``"16GiB"``; gives the
            largest batch that fits, end to end.
        optimizer: ``"adam"`` (2 copies of the trainable parameters), ``"sgd-momentum"`` (1),
            ``"sgd"`` (0), ... or a number of copies.
        modes: memory modes to plan (default: all three if the model has a reversible stack,
            else ``["stored"]``); each runs on a copy switched with :func:`revtrain.set_memory`.
        step: ``step(model, x) -> loss``; default :func:`default_step`.
        probe_batches: the two small batch sizes measured.
        device: where to measure (default: where the model's parameters are).
        dtype: dtype of the synthetic input batch (values uniform in ``[0, 1)``).
        autocast: plan a step under ``torch.autocast`` with this dtype.

    Returns:
        A :class:`MemoryPlan`; ``print(plan)`` shows the table.
    """
    if batch_size < 1:
        raise ValueError(f"plan: batch_size must be at least 1, got {batch_size}")
    b1, b2 = (int(b) for b in probe_batches)
    if not 1 <= b1 < b2:
        raise ValueError(f"plan: probe_batches must be two increasing sizes >= 1, got "
                         f"{probe_batches}")
    input_shape = tuple(int(s) for s in input_shape)
    ref = next(iter(model.parameters()), None)
    device = torch.device(device) if device is not None else (
        ref.device if ref is not None else torch.device("cpu"))
    if modes is None:
        modes = ["reversible", "checkpoint", "stored"] if _has_stack(model) else ["stored"]
    modes = [MemoryMode.parse(m).value for m in modes]
    if not _has_stack(model) and modes != ["stored"]:
        raise ValueError(f"plan: {type(model).__name__} has no reversible stack, so only "
                         "modes=['stored'] can be planned")
    step = step or default_step
    opt_name, copies = _optimizer_copies(optimizer)
    params = list({id(p): p for p in model.parameters()}.values())
    trainable = [p for p in params if p.requires_grad]
    grad_bytes = sum(p.numel() * p.element_size() for p in trainable)
    units = [name for name, _ in plan_units(model)]
    gen = torch.Generator().manual_seed(0)
    fits = {}
    for mode in modes:
        twin = set_memory(copy.deepcopy(model), mode).to(device).train()
        for p in twin.parameters():
            p.grad = None
        labels = _Labels(plan_units(twin))
        probes = []
        for b in (b1, b2):
            x = torch.rand(b, *input_shape, generator=gen, dtype=dtype).to(device)
            with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda"
                                       else []):
                torch.manual_seed(0)
                probes.append(_probe(twin, labels, step, x, autocast))
        fits[mode] = _ModeFit(mode, (probes[0], probes[1]))
        del twin, labels
    elem = torch.empty((), dtype=dtype).element_size()
    return MemoryPlan(
        model=type(model).__name__, input_shape=input_shape, batch_size=int(batch_size),
        modes=list(modes), units=units, device=_device_name(device),
        method=("cuda-allocator (tensor-level timeline + allocator overhead)"
                if device.type == "cuda" else "cpu-tensor"),
        probe_batches=(b1, b2), param_bytes=sum(p.numel() * p.element_size() for p in params),
        buffer_bytes=sum(b.numel() * b.element_size() for b in model.buffers()),
        grad_bytes=grad_bytes, optimizer=opt_name, optimizer_bytes=copies * grad_bytes,
        input_bytes_per_sample=math.prod(input_shape) * elem,
        budget=None if budget is None else parse_bytes(budget), _fits=fits)


# --------------------------------------------------------------------------- command line


def _deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _import(path: str) -> Any:
    from importlib import import_module

    module, _, name = path.rpartition(".")
    try:
        return getattr(import_module(module), name)
    except (ImportError, AttributeError, ValueError) as error:
        raise SystemExit(f"revtrain memory: cannot import {path!r} named in the config "
                         f"({error})") from None


def _network_of(module: nn.Module) -> nn.Module:
    """The network inside a LightningModule (its ``net`` / ``flow`` / ``model``)."""
    for name in ("net", "flow", "model"):
        if isinstance(getattr(module, name, None), nn.Module):
            return getattr(module, name)
    with_params = [m for m in module.children() if any(True for _ in m.parameters())]
    return with_params[0] if len(with_params) == 1 else module


def _from_config(config: dict, shape: tuple[int, ...] | None = None,
                 ) -> tuple[nn.Module, tuple[int, ...], int | None, str]:
    """``(network, input_shape, batch_size, optimizer)`` from a LightningCLI config
    (``shape``, if given, overrides the data section's)."""
    model_cfg, data_cfg = config.get("model"), config.get("data")
    if not isinstance(model_cfg, dict) or "class_path" not in model_cfg:
        raise SystemExit("revtrain memory: the config has no `model: {class_path: ..., "
                         "init_args: ...}` section")
    init = dict(model_cfg.get("init_args") or {})
    optimizer = init.pop("optimizer", None)
    init.pop("lr_scheduler", None)
    override, batch, shape, num_classes = shape, None, None, None
    if isinstance(data_cfg, dict) and "class_path" in data_cfg:
        data_cls = _import(data_cfg["class_path"])
        data_init = dict(data_cfg.get("init_args") or {})
        batch = data_init.get("batch_size")
        shape = getattr(data_cls, "input_shape", None)
        num_classes = getattr(data_cls, "num_classes", None)
        try:  # the instance knows its shape (image_size) and classes
            data = data_cls(**data_init)
            shape, num_classes = data.input_shape, getattr(data, "num_classes", num_classes)
        except Exception:  # a data module that needs its files: keep the class attributes
            pass
    model_cls = _import(model_cfg["class_path"])
    # the links of the revtrain command: num_classes and in_channels come from the data
    accepted = inspect.signature(model_cls).parameters
    if isinstance(num_classes, int) and "num_classes" in accepted:
        init.setdefault("num_classes", num_classes)
    if (override or shape) and "in_channels" in accepted:
        init.setdefault("in_channels", int((override or shape)[0]))
    module = model_cls(**init)
    network = _network_of(module)
    shape = override or shape
    if shape is None:
        raise SystemExit("revtrain memory: cannot tell the input shape from the config's data "
                         "section; pass --input-shape C,H,W")
    if not override and hasattr(network, "num_dims") and not hasattr(network, "input_shape"):
        shape = (int(network.num_dims),)  # a flow on vectors sees flattened images
    opt = "none"
    if isinstance(optimizer, dict):
        name = str(optimizer.get("class_path", "")).rsplit(".", 1)[-1].lower()
        momentum = float((optimizer.get("init_args") or {}).get("momentum", 0) or 0)
        opt = "sgd-momentum" if name == "sgd" and momentum else name
        if opt not in OPTIMIZER_COPIES:
            opt = "adam"  # unknown optimizers: assume Adam-like state, said in the table
    return network, tuple(shape), batch, opt


def plan_main(argv: list[str] | None = None) -> int:
    """``revtrain memory --config CONFIG [...]``: print the plan of a LightningCLI config.

    Reads the ``model`` and ``data`` sections (several ``--config`` files are merged in order,
    as LightningCLI does), builds the network, and prints :func:`plan`'s table; ``--json``
    also writes the machine-readable plan. Returns the exit status.
    """
    parser = argparse.ArgumentParser(prog="revtrain memory", description=plan_main.__doc__
                                     .split("\n")[0])
    parser.add_argument("--config", action="append", required=True,
                        help="LightningCLI YAML (repeatable; later files override earlier)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="batch to plan for (default: data.init_args.batch_size)")
    parser.add_argument("--budget", default=None, help="device memory, e.g. 16GiB or 80GB")
    parser.add_argument("--optimizer", default=None,
                        help=f"optimizer state to count ({', '.join(OPTIMIZER_COPIES)}); "
                             "default: from the config")
    parser.add_argument("--modes", default=None, help="comma-separated memory modes")
    parser.add_argument("--device", default="cpu", help="measure on this device (cpu, cuda)")
    parser.add_argument("--input-shape", default=None, help="C,H,W override, e.g. 3,32,32")
    parser.add_argument("--json", type=Path, default=None, help="also write the plan here")
    args = parser.parse_args(argv)
    import yaml

    config: dict = {}
    for path in args.config:
        try:
            loaded = yaml.safe_load(Path(path).read_text()) or {}
        except OSError as error:
            raise SystemExit(f"revtrain memory: cannot read {path}: {error.strerror}") from None
        config = _deep_merge(config, loaded)
    override = tuple(int(s) for s in args.input_shape.split(",")) if args.input_shape else None
    network, shape, batch, opt = _from_config(config, override)
    batch = args.batch_size or batch
    if not batch:
        raise SystemExit("revtrain memory: no batch size in the config; pass --batch-size N")
    modes = args.modes.split(",") if args.modes else None
    result = plan(network, shape, batch, budget=args.budget, optimizer=args.optimizer or opt,
                  modes=modes, device=args.device)
    print(result.table())
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result.to_dict(), indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(plan_main())
