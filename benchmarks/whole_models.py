"""Whole models: revtrain's RevNet / ResNet / i-RevNet / Glow, memcnn's own ports, the floor.

Every entry is one model in one configuration; :func:`measure_entry` measures one training
step of it (after a warm-up) on synthetic tensors, with the same procedure for all:

* CPU: the tensor-level count of :func:`revtrain.memory.measure_step` (memcnn, which frees
  storages by resizing them, with :class:`benchmarks.common.ResizeAwareTracker`);
* CUDA: the caching allocator's peak (``max_memory_allocated`` minus what was allocated
  before the step);

``activation_peak_bytes`` = peak of the step minus the parameter gradients. Precision
``bf16`` runs forward and loss under ``torch.autocast(dtype=torch.bfloat16)``.

**memcnn's ports** are ``memcnn.models.resnet.ResNet`` with the settings of memcnn's own
``config/experiments.json`` (``resnet110``, ``resnet164``, ``revnet110``, ``revnet164``).
Under torch 2.x memcnn's RevNet-110 does not train as shipped: its first
``InvertibleModuleWrapper`` (``keep_input=False``) frees its input, which is the output of
the stem's ReLU, and ReLU's backward needs that output ("modified by an inplace operation").
The benchmark patches it, in benchmark code only: that one wrapper gets ``keep_input=True``
(:func:`memcnn_port`), which keeps a tensor the ReLU keeps anyway; its gradients then equal
those of the same port with every wrapper keeping its input (checked in
``tests/test_benchmarks.py``). RevNet-164's first unit is a non-reversible bottleneck, so it
needs no patch.

**The physical floor** of a model (:func:`physical_floor`) is what any training step of it
must hold at once: the output of its invertible part (the feature map its head reads, or a
flow's latent), plus the working set of its largest unit (coupling, transition, residual unit,
stem, head, flow layer), i.e. the activation peak of that unit's own stored forward + backward
in isolation (its output, what it saves, the incoming and outgoing gradients; its input is
counted in the unit before). ``floor_ratio`` = measured activation peak / floor.
"""

from __future__ import annotations

import copy
import gc
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import revtrain
from benchmarks.common import device_name, measure_memory
from revtrain.memory import measure_step

__all__ = ["ENTRIES", "Entry", "memcnn_port", "physical_floor", "measure_entry", "build_entry"]

_CIFAR = (3, 32, 32)
_GLOW_QUICK = {"steps": 8, "hidden": 128, "levels": 3}
_GLOW_TINY = {"in_channels": 1, "image_size": 8, "levels": 1, "steps": 2, "hidden": 8}
_CKPT = {"irreversible_memory": "checkpoint"}


class Entry(dict):
    """``label, family, impl, name, mode, kwargs, shape, loss`` of one model configuration."""


def _e(label: str, family: str, impl: str, name: str, mode: str, shape=_CIFAR, loss="ce",
       **kwargs) -> Entry:
    return Entry(label=label, family=family, impl=impl, name=name, mode=mode, kwargs=kwargs,
                 shape=tuple(shape), loss=loss)


def _revnet_family(depth: int, impl_memcnn: bool) -> list[Entry]:
    fam = f"revnet{depth}"
    res = {110: "resnet110", 164: "resnet164"}[depth]
    out = [
        _e(res, fam, "revtrain", res, "stored"),
        _e(f"revnet{depth}", fam, "revtrain", f"revnet{depth}", "stored"),
        _e(f"revnet{depth}", fam, "revtrain", f"revnet{depth}", "reversible"),
        _e(f"revnet{depth}+ckpt", fam, "revtrain", f"revnet{depth}", "reversible", **_CKPT),
    ]
    if impl_memcnn:
        out += [_e(f"memcnn-{res}", fam, "memcnn", res, "stored"),
                _e(f"memcnn-revnet{depth}", fam, "memcnn", f"revnet{depth}", "reversible")]
    return out


#: the entries of each profile
ENTRIES: dict[str, list[Entry]] = {
    "smoke": [
        _e("revnet_digits", "revnet_digits", "revtrain", "revnet_digits", "stored", (1, 8, 8)),
        _e("revnet_digits", "revnet_digits", "revtrain", "revnet_digits", "reversible",
           (1, 8, 8)),
        _e("revnet_digits+ckpt", "revnet_digits", "revtrain", "revnet_digits", "reversible",
           (1, 8, 8), **_CKPT),
        _e("glow-tiny", "glow-tiny", "revtrain", "glow", "stored", (1, 8, 8), "nll",
           **_GLOW_TINY),
        _e("glow-tiny", "glow-tiny", "revtrain", "glow", "reversible", (1, 8, 8), "nll",
           **_GLOW_TINY),
    ],
    "quick": [
        *_revnet_family(110, True), *_revnet_family(164, True),
        _e("irevnet", "irevnet", "revtrain", "irevnet", "stored"),
        _e("irevnet", "irevnet", "revtrain", "irevnet", "reversible"),
        _e("glow-K8-h128", "glow-K8-h128", "revtrain", "glow", "stored", loss="nll",
           **_GLOW_QUICK),
        _e("glow-K8-h128", "glow-K8-h128", "revtrain", "glow", "reversible", loss="nll",
           **_GLOW_QUICK),
    ],
}
ENTRIES["full"] = ENTRIES["quick"] + [
    _e("glow-K32-h512", "glow-K32-h512", "revtrain", "glow", "stored", loss="nll"),
    _e("glow-K32-h512", "glow-K32-h512", "revtrain", "glow", "reversible", loss="nll"),
]
ENTRIES["cuda"] = ENTRIES["full"]


# ----------------------------------------------------------------------------- memcnn ports

# memcnn's config/experiments.json: (block, layers, channels_per_layer)
_MEMCNN = {
    "resnet110": ("BasicBlock", [18, 18, 18], [16, 16, 32, 64]),
    "resnet164": ("Bottleneck", [18, 18, 18], [16, 16, 32, 64]),
    "revnet110": ("RevBasicBlock", [9, 9, 9], [32, 32, 64, 128]),
    "revnet164": ("RevBottleneck", [9, 9, 9], [32, 32, 64, 128]),
}


def memcnn_port(name: str, num_classes: int = 10, patch: bool = True) -> nn.Module:
    """memcnn's own ``ResNet`` configured as in its ``experiments.json``.

    ``patch=True`` sets ``keep_input=True`` on a first wrapper that would free the stem
    ReLU's output (RevNet-110), the one change that lets it train under torch 2.x.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # memcnn's torch.cuda.amp decorators
        import memcnn.models.resnet as mr
    block, layers, channels = _MEMCNN[name]
    model = mr.ResNet(getattr(mr, block), layers, num_classes=num_classes,
                      channels_per_layer=channels, strides=[1, 1, 2, 2], init_max_pool=False,
                      init_kernel_size=3, batch_norm_fix=False)
    first = model.layer1[0]
    if patch and hasattr(first, "revblock"):
        first.revblock.keep_input = True
    return model


# ----------------------------------------------------------------------------- building


def build_entry(entry: Entry, batch: int, device: torch.device, seed: int = 0
                ) -> tuple[nn.Module, Tensor, nn.Module]:
    """``(loss module, input batch, network)`` of ``entry``; the loss module returns the loss."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        if entry["impl"] == "memcnn":
            net = memcnn_port(entry["name"])
        else:
            kwargs = dict(entry["kwargs"])
            irreversible = kwargs.pop("irreversible_memory", None)
            net = revtrain.models.create(entry["name"], memory=entry["mode"], **kwargs)
            if irreversible is not None:
                # RevNet(irreversible_memory=...) is the constructor argument; set on the built
                # model here so that entry points without **kwargs pass-through work too
                net.irreversible_memory = revtrain.MemoryMode.parse(irreversible)
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, *entry["shape"], generator=gen)
    if entry["loss"] == "ce":
        x = x * 2 - 1
    return LossOf(net, entry["loss"], batch).to(device).train(), x.to(device), net


class LossOf(nn.Module):
    """A network plus its training loss: ``forward(x)`` returns the scalar loss."""

    def __init__(self, model: nn.Module, kind: str, batch: int):
        super().__init__()
        self.model = model
        self.kind = kind
        self.register_buffer("labels", torch.arange(batch) % 10, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        if self.kind == "nll":
            return -self.model.log_prob(x).mean()
        return F.cross_entropy(self.model(x), self.labels)


# ----------------------------------------------------------------------------- the floor


def _floor_units(module: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module]]:
    """The model's units: layers of reversible stacks, residual units, stems, heads."""
    from revtrain.planner import _has_stack

    out = []
    for name, child in module.named_children():
        full = f"{prefix}{name}"
        container = isinstance(child, (nn.Sequential, nn.ModuleList))
        grand = list(child.children())
        if isinstance(child, revtrain.ReversibleSequential) or _has_stack(child) or (
                container and any(list(g.children()) for g in grand)):
            out += _floor_units(child, full + ".")
        else:
            out.append((full, child))
    return out


class _UnitStep(nn.Module):
    """``sum(unit(x) * dy)`` (plus the log-det for flow layers): the unit's own step."""

    def __init__(self, unit: nn.Module, dy: Tensor, log_det: bool):
        super().__init__()
        self.unit, self.log_det = unit, log_det
        self.register_buffer("dy", dy, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        if self.log_det:
            y, ld = self.unit.forward_and_log_det(x)
            return (y * self.dy).sum() + ld.sum()
        return (self.unit(x) * self.dy).sum()


def _invertible_output(net: nn.Module, x: Tensor) -> Tensor:
    if hasattr(net, "features"):
        return net.features(x)
    if hasattr(net, "forward_and_log_det"):
        return net.forward_and_log_det(x)[0]
    return net(x)


def physical_floor(net: nn.Module, x: Tensor, autocast: torch.dtype | None = None
                   ) -> dict[str, Any]:
    """Output of the invertible part + the largest unit's working set (see the module doc)."""
    from contextlib import nullcontext

    cast = torch.autocast(x.device.type, dtype=autocast) if autocast else nullcontext()
    net = revtrain.set_memory(copy.deepcopy(net), "stored").train()
    units = _floor_units(net)
    inputs: dict[str, Tensor] = {}
    calls: dict[str, bool] = {}

    def recorder(name: str, fn: Callable, log_det: bool) -> Callable:
        def wrapped(inp, *args, **kwargs):
            if isinstance(inp, Tensor) and name not in inputs:
                inputs[name], calls[name] = inp.detach().clone(), log_det
            return fn(inp, *args, **kwargs)

        return wrapped

    for name, unit in units:
        if callable(getattr(unit, "forward_and_log_det", None)):
            unit.forward_and_log_det = recorder(name, unit.forward_and_log_det, True)
        unit.forward = recorder(name, unit.forward, False)
    with torch.no_grad(), cast:
        out = _invertible_output(net, x)
        if hasattr(net, "head"):
            net.head(out)
    output_bytes = out.numel() * out.element_size()
    work: dict[tuple, int] = {}
    largest, largest_name = 0, None
    for name, unit in units:
        if name not in inputs:
            continue
        xu = inputs[name]
        first = name == next(n for n, _ in units if n in inputs)
        trainable = any(q.requires_grad for q in unit.parameters())
        if first and not trainable:
            continue  # data preprocessing: nothing to back-propagate
        xu = xu.requires_grad_(xu.is_floating_point() and not first)
        key = (type(unit).__name__, tuple(xu.shape), tuple(
            tuple(p.shape) for p in unit.parameters()), calls[name])
        if key not in work:
            with torch.no_grad(), cast:
                y = unit.forward_and_log_det(xu)[0] if calls[name] else unit(xu)
            if not isinstance(y, Tensor) or not y.is_floating_point():
                continue
            dy = torch.randn_like(y)
            step = _UnitStep(unit, dy, calls[name])
            r = measure_step(step, xu, loss_fn=lambda loss: loss, autocast=autocast)
            work[key] = r["peak_bytes"] - r["grad_bytes"]
        if work[key] > largest:
            largest, largest_name = work[key], name
    return {"floor_bytes": output_bytes + largest, "floor_output_bytes": output_bytes,
            "floor_unit_bytes": largest, "floor_unit": largest_name,
            "floor_method": "output of the invertible part + largest unit's stored step in "
                            "isolation (activation peak), "
                            + ("allocator peak" if x.is_cuda else "tensor-level count")}


# ----------------------------------------------------------------------------- measuring


def measure_entry(entry: Entry, batch: int, device: torch.device, precision: str = "fp32",
                  floor: dict[str, Any] | None = None) -> dict[str, Any]:
    """One record: memory of a training step of ``entry`` (and its floor ratio)."""
    start = time.perf_counter()
    wrapped, x, net = build_entry(entry, batch, device)
    cast = None if precision == "fp32" else {"bf16": torch.bfloat16,
                                             "fp16": torch.float16}[precision]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        if entry["impl"] == "memcnn" and device.type == "cpu":
            mem = _memcnn_cpu(wrapped, x, cast)
        else:
            mem = measure_step(wrapped, x, loss_fn=lambda loss: loss, autocast=cast)
    params = sum(p.numel() for p in net.parameters())
    rec = {"model": entry["label"], "family": entry["family"], "impl": entry["impl"],
           "registry_name": entry["name"], "mode": entry["mode"],
           "kwargs": {k: v for k, v in entry["kwargs"].items()}, "precision": precision,
           "batch": batch, "input_shape": list(entry["shape"]), "loss": entry["loss"],
           "params": params, "peak_bytes": mem["peak_bytes"], "held_bytes": mem["held_bytes"],
           "grad_bytes": mem["grad_bytes"],
           "activation_peak_bytes": mem["peak_bytes"] - mem["grad_bytes"],
           "rng_state_bytes": mem.get("rng_state_bytes"), "method": mem["method"],
           "device": device_name(device), "measure_s": time.perf_counter() - start}
    if floor:
        rec.update(floor)
        rec["floor_ratio"] = rec["activation_peak_bytes"] / floor["floor_bytes"]
    del wrapped, x, net
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rec


def _memcnn_cpu(wrapped: nn.Module, x: Tensor, cast) -> dict[str, Any]:
    """memcnn on CPU: the resize-aware count (it frees by ``resize_(0)``), model restored."""
    from revtrain.memory import model_state

    with model_state(wrapped):
        if cast is None:
            return measure_memory(wrapped, x, resize_aware=True, loss_fn=lambda loss: loss)
        with torch.autocast("cpu", dtype=cast):
            return measure_memory(wrapped, x, resize_aware=True, loss_fn=lambda loss: loss)
