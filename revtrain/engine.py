"""The reversible engine: ordinary autograd, without the saved activations.

A call of a reversible stack runs every layer normally, with grad, so the autograd graph is
exactly the one of the stored twin: parameter and tensor hooks, module backward hooks,
tensors read from outside the stack, ``torch.func.functional_call``, DDP and FSDP see ordinary
autograd. Only what the graph *saves* changes. While the stack runs, a
``torch.autograd.graph.saved_tensors_hooks`` pack hook replaces every saved tensor by a handle
(its layer, a frame name and a position) and keeps only a weak reference to it; the stack keeps
its output, its context and, for layers that draw random numbers, their generator states.

In backward, the first unpack of a handle of layer ``i`` rebuilds that layer:

* its input is rebuilt from its output (the stack output for the last layer, the rebuilt input
  of layer ``i + 1`` otherwise) with ``inverse``. A layer that calls its sub-networks through
  :meth:`~revtrain.InvertibleModule.subnet` (every :class:`~revtrain.Coupling`) has each
  sub-network evaluated there once, with grad, under a capture hook that collects what that
  evaluation saves (frame ``"f"``, ``"g"``, ...); the element-wise operations around them are
  re-run with the recorded sub-network outputs to regenerate the rest (frame ``""``), and are
  skipped when they saved nothing (additive couplings). One extra evaluation per sub-network.
* any other invertible layer (ActNorm, 1x1 convolution, memcnn couplings) is inverted. If all it
  saved is its input, tensors still alive and small tensors the forward kept (no larger than the
  layer's largest parameter, 1/16 of the stack's input in all: ``exp(log_scale)``, ``W^T``), the
  inverse alone rebuilds it; otherwise it is run forward again under the capture hook.
* a layer whose input is still alive (the stack's input held by the caller), or whose input the
  stack kept (a layer that draws random numbers outside sub-networks), is simply run forward again
  from it.

Each unpack then hands the original graph node the rebuilt tensor at the same frame and position,
so the graph's own backward formulas compute every vector-Jacobian product. Saved tensors that are
still alive at backward (parameters, the caller's tensors, activations someone else keeps) are
returned as they are, with PyTorch's in-place version check. Everything rebuilt for a backward pass
is released when the pass ends.

Replayed for each rebuild: random numbers (per sub-network, inside ``torch.random.fork_rng``),
the autocast state, the tensors bound to every parameter and buffer name, and buffer values
(:class:`revtrain.state.ModuleState`). Checked: number, shapes and dtypes of the saved tensors,
in-place changes of anything the rebuild reads.
"""

from __future__ import annotations

import inspect
import warnings
import weakref
from collections.abc import Sequence
from contextlib import contextmanager, nullcontext
from functools import cache

import torch
from torch import Tensor, nn

from .base import InvertibleModule, ReconstructionError, _local, accepts_context
from .coupling import Additive, Coupling
from .state import AutocastState, ModuleState, RngState, cuda_devices_of, rebuilding

__all__ = ["ReversibleCall", "call_layer", "layer_forward", "layer_inverse", "Fingerprint", "flatten_context",
           "current_recorder", "recording", "Recorder", "INLINE", "CHECKPOINT"]

_GONE = object()  # a rebuilt tensor already handed to its node


def flatten_context(context) -> tuple[Tensor, ...]:
    """The tensors of a context (a tensor, a tuple / list of tensors, or ``None``)."""
    if context is None:
        return ()
    if isinstance(context, Tensor):
        return (context,)
    if isinstance(context, (tuple, list)):
        return tuple(t for t in context if isinstance(t, Tensor))
    raise TypeError(f"context must be a tensor or a tuple of tensors, got {type(context).__name__}")


def _describe(index: int, layer: nn.Module) -> str:
    return f"ReversibleSequential: layer {index} ({type(layer).__name__})"


def call_layer(layer: nn.Module, x: Tensor, context, want_log_det: bool):
    """Call one layer as a module (so that its hooks run): ``y``, or ``(y, log_det)`` when
    ``want_log_det`` and the layer is a revtrain layer. ``context`` is passed to layers whose
    signature takes it."""
    args = (x, context) if context is not None and accepts_context(layer) else (x,)
    if not (want_log_det and isinstance(layer, InvertibleModule)):
        return layer(*args)
    if getattr(type(layer), "_log_det_through_call", False) or \
            type(layer).forward is InvertibleModule.forward:
        previous = getattr(_local, "log_det_for", None)
        _local.log_det_for = layer
        try:
            out = layer(*args)
        finally:
            _local.log_det_for = previous
    else:  # a subclass with its own forward: ask for the log-det directly
        out = layer.forward_and_log_det(*args)
    if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[0], Tensor)):
        raise TypeError(f"{type(layer).__name__}.forward_and_log_det must return (y, log_det), "
                        f"got {type(out).__name__}")
    return out


def layer_forward(layer: nn.Module, x: Tensor, context, want_log_det: bool
                  ) -> tuple[Tensor, Tensor | None]:
    """``(y, log_det)`` of one layer (see :func:`call_layer`); ``log_det`` is ``None`` when it is
    not wanted or the layer has none (non-revtrain layers)."""
    out = call_layer(layer, x, context, want_log_det)
    if want_log_det and isinstance(layer, InvertibleModule):
        return out
    return out, None


def layer_inverse(layer: nn.Module, y: Tensor, context) -> Tensor:
    """``layer.inverse(y)``, with ``context`` for layers whose ``inverse`` takes it."""
    if context is not None and accepts_context(layer, "inverse"):
        return layer.inverse(y, context)
    return layer.inverse(y)


class Fingerprint:
    """A cheap sample of a layer input, to check its reconstruction in backward."""

    samples = 64

    def __init__(self, x: Tensor):
        flat = x.detach().reshape(-1)
        n = min(self.samples, flat.numel())
        self.index = torch.linspace(0, max(flat.numel() - 1, 0), n, device=x.device).long()
        self.values = flat[self.index].clone()
        self.shape = x.shape

    def mismatch(self, x: Tensor, tol: float) -> float | None:
        """The largest deviation if it exceeds ``tol`` (relative to the values), else ``None``."""
        if x.shape != self.shape:
            return float("inf")
        if self.values.numel() == 0:
            return None
        rebuilt = x.detach().reshape(-1)[self.index]
        error = (rebuilt - self.values).abs().max()
        scale = 1.0 + self.values.abs().max()
        if not torch.isfinite(error) or error > tol * scale:
            return float(error)
        return None


def _dead():
    return None


class _Saved:
    """What the forward pass knew of one saved tensor: a weak reference, its version, its type,
    whether it is the layer's input, and (for a small, parameter-sized tensor such as ``exp`` of a
    parameter, while the budget lasts) the tensor itself."""

    __slots__ = ("ref", "version", "shape", "dtype", "is_input", "kept")

    def __init__(self, t: Tensor, is_input: bool = False, kept: Tensor | None = None):
        self.ref = weakref.ref(t)
        self.version = t._version
        self.shape = t.shape
        self.dtype = t.dtype
        self.is_input = is_input
        self.kept = kept


class _Kept:
    """A tensor saved outside any layer (the stack's own operations): kept as it is."""

    __slots__ = ("tensor", "version")

    def __init__(self, t: Tensor):
        self.tensor = t.detach()
        self.version = t._version


class _Subnet:
    """One sub-network evaluation of a layer's forward."""

    __slots__ = ("flags", "out_flag", "start", "end", "rng")

    def __init__(self, flags, start: RngState | None):
        self.flags = flags  # requires_grad of each tensor argument, as in forward
        self.out_flag = False
        self.start = start
        self.end: RngState | None = None
        self.rng: RngState | None = None  # kept generator states, when it drew random numbers


class _Leaf:
    """One layer of one stack call: what its rebuild needs."""

    __slots__ = ("layer", "index", "frames", "subnets", "input_ref", "input_version", "input_flag",
                 "held_input", "rng", "module_state", "fingerprint", "want_log_det", "captured",
                 "rebuilt", "passed_input", "result", "output_ref", "pending", "owns_rebuilt",
                 "keep_limit")

    def __init__(self, layer: nn.Module, index: int, x: Tensor, want_log_det: bool):
        self.layer, self.index, self.want_log_det = layer, index, want_log_det
        self.frames: dict[str, list[_Saved]] = {"": []}
        self.subnets: dict[str, _Subnet] = {}
        self.input_ref = weakref.ref(x)
        self.input_version = x._version
        self.input_flag = x.requires_grad
        self.held_input: Tensor | None = None
        self.rng: RngState | None = None  # generator states at the start, when it drew numbers
        self.module_state = ModuleState()
        self.fingerprint: Fingerprint | None = None
        self.captured: dict[str, list] | None = None
        self.output_ref = _dead
        self.rebuilt: Tensor | None = None
        self.passed_input: Tensor | None = x
        self.result = None
        # a rebuild in progress, one sub-network at a time: (inverse_steps generator, recorder,
        # {frame: positions already handed out as alive tensors})
        self.pending: tuple | None = None
        # ``rebuilt`` is a buffer the engine made and nobody else holds (a staged coupling's)
        self.owns_rebuilt = False
        # saved tensors of at most this many elements are kept while the call's budget lasts (set
        # by the forward: the layer's largest parameter)
        self.keep_limit = 0


# recorder modes
RECORD, RECOMPUTE, INVERT, GLUE, INLINE, CHECKPOINT = (
    "record", "recompute", "invert", "glue", "inline", "checkpoint")


class _Recorder:
    """What the engine is doing in this thread for one layer (``owner``).

    :func:`revtrain.base.call_subnet`, :meth:`InvertibleModule.forward` and the saved-tensor
    hooks consult it: it names the frame that saved tensors belong to and decides how a
    sub-network call is served (evaluated and recorded, evaluated with capture and replayed
    random numbers, or answered with a recorded output).
    """

    __slots__ = ("mode", "owner", "call", "leaf", "frames", "frame", "frame_name", "provided", "state")

    def __init__(self, mode: str, owner: nn.Module, call: ReversibleCall | None, leaf: _Leaf | None,
                 frames: dict | None = None, state: ModuleState | None = None):
        self.mode, self.owner, self.call, self.leaf = mode, owner, call, leaf
        self.state = state if state is not None else (leaf.module_state if leaf is not None else None)
        self.frames = frames if frames is not None else (leaf.frames if mode == RECORD else {})
        self.frame_name = ""
        self.frame = self.frames.setdefault("", [])
        self.provided: dict[str, Tensor] = {}

    def _where(self) -> str:
        return _describe(self.leaf.index, self.owner)

    def note_call(self, module: nn.Module, x: Tensor, result) -> None:
        """Called by ``InvertibleModule.forward`` of the owner with its input and its result."""
        if self.mode == CHECKPOINT:
            self.state.refresh()
        elif self.mode == RECORD:
            self.state.refresh()
            if not _aliases(x, self.leaf.passed_input):
                raise RuntimeError(
                    f"{self._where()}: a forward pre-hook replaced the layer's input; a reversible "
                    "stack cannot invert through it. Change the input outside the stack, or use "
                    "memory='stored' or 'checkpoint'")
            self.leaf.result = result

    def subnet(self, name: str, net: nn.Module, args: tuple):
        mode = self.mode
        if mode == RECORD:
            return self._record(name, net, args)
        if mode == RECOMPUTE:
            return self._in_frame(name, net, args)
        if mode == INVERT:
            return self._evaluate(name, net, args)
        if mode == GLUE:
            if name not in self.provided:
                raise ReconstructionError(f"{self._where()}: forward evaluates sub-network {name!r}, "
                                          "which inverse did not")
            return self.provided.pop(name)
        return net(*args)

    def _in_frame(self, name, net, args):
        previous, previous_name = self.frame, self.frame_name
        self.frame, self.frame_name = self.frames.setdefault(name, []), name
        try:
            return net(*args)
        finally:
            self.frame, self.frame_name = previous, previous_name

    def _record(self, name, net, args):
        leaf = self.leaf
        if name in leaf.subnets:
            raise RuntimeError(f"{self._where()}: sub-network name {name!r} is used twice in one "
                               "forward; give each sub-network evaluation its own name")
        devices = self.call.devices
        record = _Subnet(tuple(a.requires_grad if isinstance(a, Tensor) else None for a in args),
                         RngState.take(devices) if self.call.preserve_rng_state else None)
        leaf.subnets[name] = record
        out = self._in_frame(name, net, args)
        if record.start is not None:
            record.end = RngState.take(devices)
        record.out_flag = isinstance(out, Tensor) and out.requires_grad
        return out

    def _evaluate(self, name, net, args):
        record = self.leaf.subnets.get(name)
        if record is None:
            raise ReconstructionError(f"{self._where()}: inverse evaluates sub-network {name!r}, "
                                      "which forward did not")
        if name in self.provided:
            raise ReconstructionError(f"{self._where()}: inverse evaluates sub-network {name!r} twice")
        if len(args) != len(record.flags):
            raise ReconstructionError(f"{self._where()}: sub-network {name!r} takes {len(record.flags)} "
                                      f"arguments in forward but {len(args)} in inverse")
        args = tuple(a.detach().requires_grad_(flag) if isinstance(a, Tensor) and flag is not None else a
                     for a, flag in zip(args, record.flags))
        with torch.enable_grad(), (record.rng.replay() if record.rng is not None else nullcontext()):
            out = self._in_frame(name, net, args)
        if not isinstance(out, Tensor):
            raise TypeError(f"{self._where()}: sub-network {name!r} must return a tensor")
        # kept for the re-run of the element-wise operations; not needed (and not kept) when those
        # saved nothing in forward (additive couplings)
        self.provided[name] = out.detach().requires_grad_(record.out_flag) if self.leaf.frames[""] else None
        return out.detach()


def _aliases(a, b) -> bool:
    """Whether ``a`` and ``b`` are the same tensors, or views of the same memory with the same
    geometry (module backward hooks hand a layer such views of its input and output)."""
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(_aliases(p, q) for p, q in zip(a, b))
    if a is b:
        return True
    if not (isinstance(a, Tensor) and isinstance(b, Tensor)):
        return False
    return (a.shape == b.shape and a.dtype == b.dtype and a.stride() == b.stride()
            and a.data_ptr() == b.data_ptr())


@contextmanager
def recording(recorder: _Recorder | None):
    previous = getattr(_local, "recorder", None)
    _local.recorder = recorder
    try:
        yield recorder
    finally:
        _local.recorder = previous


Recorder = _Recorder


def current_recorder() -> _Recorder | None:
    return getattr(_local, "recorder", None)


def _never_unpacked(_):  # the rebuild's own graph is thrown away
    raise RuntimeError("revtrain: a graph built during a rebuild was back-propagated")


class ReversibleCall:
    """One call of a reversible stack: runs its layers and rebuilds them in backward.

    Args:
        context: the stack's context (kept, checked for in-place changes).
        preserve_rng_state: record and replay random numbers.
        tolerance: reconstruction-check tolerance, or ``None``.
        devices: CUDA devices whose random generators to record.
    """

    def __init__(self, context, preserve_rng_state: bool, tolerance: float | None,
                 devices: tuple[int, ...]):
        self.context = context
        self.context_tensors = flatten_context(context)
        self.context_versions = tuple(t._version for t in self.context_tensors)
        self.preserve_rng_state = preserve_rng_state
        self.tolerance = tolerance
        self.devices = devices
        self.autocast = AutocastState()
        self.leaves: list[_Leaf] = []
        self.output: Tensor | None = None
        self.output_version = 0
        self.finite: Tensor | None = None  # deferred finiteness flag (CUDA)
        self._cleanup_queued = False
        # generator states at the end of the previous layer, when nothing has run since: the
        # start states of the next layer (one state taken per layer instead of two)
        self._rng_after: RngState | None = None
        self.keep_budget = 0  # bytes of small saved tensors still to be kept (see ``_pack``)
        self._kept: dict[int, Tensor] = {}  # during forward: id -> the tensors kept so far

    # ------------------------------------------------------------------ forward

    def run(self, layers: Sequence[nn.Module], x: Tensor, want_log_det: bool
            ) -> tuple[Tensor, Tensor | None]:
        self.keep_budget = x.numel() * x.element_size() // 16
        self._kept = {}
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
                y, log_det = self.run_layers(layers, x, want_log_det)
        finally:
            self._rng_after = None  # not kept for backward
            self._kept = {}  # the records hold what is kept
        self.output = y.detach()
        self.output_version = y._version
        return y, log_det

    def run_layers(self, layers: Sequence[nn.Module], x: Tensor, want_log_det: bool):
        """Run ``layers`` in order; nested stacks are run inline as further layers."""
        from .sequential import ReversibleSequential

        log_det = None
        for layer in layers:
            if isinstance(layer, ReversibleSequential):
                inline = _Recorder(INLINE, layer, self, None)
                inline.provided = {"input": x}
                first = len(self.leaves)
                self._rng_after = None  # the nested stack's hooks may draw random numbers
                with recording(inline):
                    y, ld = layer_forward(layer, x, self.context, want_log_det)
                self._rng_after = None
                last = self.leaves[-1] if len(self.leaves) > first else None
                if last is not None and not _aliases(y, last.output_ref()):
                    raise RuntimeError(
                        f"{_describe(last.index, last.layer)}: a forward hook on the nested stack "
                        f"{type(layer).__name__} replaced its output; a reversible stack cannot "
                        "invert through it. Change the output outside the stack, or use "
                        "memory='stored' or 'checkpoint'")
            else:
                y, ld = self._run_leaf(layer, x, want_log_det)
            if ld is not None:
                log_det = ld if log_det is None else log_det + ld
            x = y
        return x, log_det

    def _run_leaf(self, layer: nn.Module, x: Tensor, want_log_det: bool):
        leaf = _Leaf(layer, len(self.leaves), x, want_log_det)
        self.leaves.append(leaf)
        where = _describe(leaf.index, layer)
        if self.tolerance is not None:
            leaf.fingerprint = Fingerprint(x)
        leaf.module_state.begin(layer)
        if self.keep_budget > 0:
            leaf.keep_limit = leaf.module_state.largest_parameter
        start = self._rng_after if self._rng_after is not None else RngState.take(self.devices)
        self._rng_after = None
        with recording(_Recorder(RECORD, layer, self, leaf)):
            out = call_layer(layer, x, self.context, want_log_det)
        leaf.passed_input = None
        if leaf.result is not None and not _aliases(leaf.result, out):
            raise RuntimeError(f"{where}: a forward hook replaced the layer's output; a reversible "
                               "stack cannot invert through it. Change the output outside the "
                               "stack, or use memory='stored' or 'checkpoint'")
        leaf.result = None
        y, log_det = out if want_log_det and isinstance(layer, InvertibleModule) else (out, None)
        if not isinstance(y, Tensor):
            raise TypeError(f"{where} returned a {type(y).__name__}, not a tensor; a layer of a "
                            "reversible stack maps one tensor to one tensor")
        leaf.output_ref = weakref.ref(y)
        if leaf.subnets and leaf.keep_limit:  # rebuilt by its inverse and a re-run anyway
            for records in leaf.frames.values():
                for record in records:
                    t, record.kept = record.kept, None
                    if t is not None and self._kept.pop(id(t), None) is not None:
                        self.keep_budget += t.numel() * t.element_size()
        leaf.module_state.finish()
        end = RngState.take(self.devices)
        self._rng_after = end
        if not start.same_as(end):
            if self.preserve_rng_state:
                self._keep_rng(leaf, x, start, end)
            else:
                warn_unreplayed(where)
        for record in leaf.subnets.values():  # only the kept copies outlive the forward
            record.start = record.end = None
        if self.tolerance is not None and not torch.isfinite(y).all():
            raise ReconstructionError(f"{where} produced NaN or Inf in forward; a non-finite output "
                                      "cannot be inverted (check the input and the weights)")
        return y, log_det

    def _keep_rng(self, leaf: _Leaf, x: Tensor, start: RngState, end: RngState) -> None:
        """Keep the generator states a replay of ``leaf`` needs (it drew random numbers)."""
        subnets = list(leaf.subnets.values())
        points = [start]
        for s in subnets:
            points += [s.start, s.end]
        points.append(end)
        glue_drew = any(not a.same_as(b) for a, b in zip(points[::2], points[1::2]))
        leaf.rng = start.kept(since=end)
        for s in subnets:
            if not s.start.same_as(s.end):
                s.rng = leaf.rng if s.start.same_as(start) else s.start.kept(since=s.end)
            s.start = s.end = None
        if glue_drew or not subnets:
            # random numbers outside sub-networks cannot be replayed by the inverse: keep the
            # input and run the layer forward again from it in backward
            leaf.held_input = x

    # ------------------------------------------------------------------ saved tensor hooks

    def _pack(self, t: Tensor):
        recorder = getattr(_local, "recorder", None)
        if recorder is None or recorder.call is not self or recorder.mode != RECORD:
            return _Kept(t)
        frame = recorder.frame
        leaf = recorder.leaf
        x = leaf.passed_input
        if t is x or (recorder.frame_name == "" and _aliases(t, x)):
            frame.append(_Saved(t, is_input=True))
        elif t.numel() <= leaf.keep_limit and not (t.requires_grad and t.is_leaf) and self._keep(t):
            # parameter-sized (e.g. ActNorm's exp(log_scale)): kept, as ordinary autograd keeps
            # it, so that a layer saving only such tensors and its input needs no re-run
            frame.append(_Saved(t, kept=t))
        else:
            frame.append(_Saved(t))
        return (leaf.index, recorder.frame_name, len(frame) - 1)

    def _keep(self, t: Tensor) -> bool:
        """Whether ``t`` fits in what is left of the budget for kept tensors (1/16 of the
        stack's input in all; a tensor saved twice counts once)."""
        if id(t) in self._kept:
            return True
        base = t._base
        size = 0 if base is not None and base.grad_fn is None else t.numel() * t.element_size()  # a
        # view of a parameter (W^T) costs no memory
        if size > self.keep_budget:
            return False
        self.keep_budget -= size
        self._kept[id(t)] = t
        return True

    def _unpack(self, packed):
        if packed.__class__ is _Kept:
            if packed.tensor._version != packed.version:
                raise _modified_error("a tensor saved by the stack")
            return packed.tensor
        index, key, pos = packed
        leaf = self.leaves[index]
        saved = leaf.frames[key][pos]
        if torch.is_grad_enabled() and torch._C._current_graph_task_id() != -1:
            raise RuntimeError(
                "ReversibleSequential: double backward (create_graph=True) through a reversible "
                "stack is not supported; use memory='checkpoint' or memory='stored' for "
                "higher-order gradients")
        t = saved.ref()
        if t is not None:
            if t._version != saved.version:
                raise _modified_error(f"a tensor saved by {_describe(index, leaf.layer)}")
            if leaf.captured is not None:
                if key in leaf.captured:
                    leaf.captured[key][pos] = _GONE
                elif leaf.pending is not None:  # not evaluated yet: dropped when it is
                    leaf.pending[2].setdefault(key, set()).add(pos)
            return t
        captured = leaf.captured
        if captured is None or (captured[key][pos] is _GONE if key in captured
                                else leaf.pending is None):
            self._rebuild(index)
            captured = leaf.captured
        if key not in captured:  # a staged rebuild: evaluate the sub-networks up to this one
            self._advance(leaf, key)
        t = captured[key][pos]
        captured[key][pos] = _GONE
        return t

    def _capture(self, t: Tensor):
        _local.recorder.frame.append((t, t._version))
        return None

    # ------------------------------------------------------------------ backward

    def _forward_input(self, leaf: _Leaf) -> Tensor | None:
        if leaf.held_input is not None:
            return leaf.held_input
        x = leaf.input_ref()
        if x is not None and x._version == leaf.input_version:
            return x
        return None

    def _rebuild(self, index: int) -> None:
        """Rebuild leaf ``index``, first rebuilding the later leaves its output depends on."""
        n = len(self.leaves)
        chain = [index]
        k = index
        while self._forward_input(self.leaves[k]) is None and k + 1 < n:
            nxt = self.leaves[k + 1]
            if nxt.rebuilt is not None or nxt.pending is not None or \
                    self._forward_input(nxt) is not None:
                break
            k += 1
            chain.append(k)
        for k in reversed(chain):
            self._rebuild_leaf(self.leaves[k])
        self._queue_cleanup()

    def _output_of(self, leaf: _Leaf) -> tuple[Tensor, bool]:
        """The output of ``leaf`` for its rebuild, and whether the engine owns it (a buffer it
        rebuilt that nobody else holds, which the rebuild may overwrite)."""
        index = leaf.index
        if index == len(self.leaves) - 1:
            if self.output._version != self.output_version:
                raise RuntimeError(
                    "ReversibleSequential: the stack's output was changed in place before backward, "
                    "so the activations cannot be rebuilt from it; clone it before modifying it "
                    "(out = stack(x).clone())")
            if self.finite is not None and not bool(self.finite):
                raise ReconstructionError(
                    "ReversibleSequential: the output contains NaN or Inf; a non-finite activation "
                    "cannot be rebuilt in backward (check the input and the weights)")
            return self.output, False
        nxt = self.leaves[index + 1]
        x = self._forward_input(nxt)
        if x is None:
            if nxt.pending is not None:  # finish its staged rebuild: its input is needed now
                self._advance(nxt, None)
            x, nxt.rebuilt = nxt.rebuilt, None
            return x, nxt.owns_rebuilt
        return x, False

    def _rebuild_leaf(self, leaf: _Leaf) -> None:
        where = _describe(leaf.index, leaf.layer)
        leaf.module_state.check(where)
        for t, version in zip(self.context_tensors, self.context_versions):
            if t._version != version:
                raise ReconstructionError(
                    f"{where}: the context was changed in place between forward and backward; "
                    "pass a copy (context.clone()) if you need to modify it")
        x = self._forward_input(leaf)
        owned = False
        if x is None:
            y, owned = self._output_of(leaf)
        else:  # rebuilt from its input: the output rebuilt for it is not needed any more
            y = None
            if leaf.index + 1 < len(self.leaves):
                self.leaves[leaf.index + 1].rebuilt = None
        leaf.pending, leaf.owns_rebuilt = None, False
        if x is None and self._inverse_only(leaf):
            # everything it saved is its input, kept or alive: the inverse alone rebuilds it
            with rebuilding(), self.autocast.replay(), leaf.module_state.replay(), torch.no_grad(), \
                    recording(_Recorder(INVERT, leaf.layer, self, leaf)):
                x = layer_inverse(leaf.layer, y.detach(), self.context)
            if not isinstance(x, Tensor):
                raise TypeError(f"{where}: inverse must return a tensor")
            leaf.captured = {key: [x if record.is_input else _GONE for record in records]
                             for key, records in leaf.frames.items()}
            leaf.rebuilt = x
            self._check_fingerprint(leaf, x, where)
            return
        if x is None and _staged(leaf):
            # one sub-network at a time, each when autograd first unpacks what it saved
            layer = leaf.layer
            recorder = _Recorder(INVERT, layer, self, leaf)
            y = y.detach()
            with torch.no_grad():
                into_buffer = layer.rebuilds_into_buffer(y)
            kwargs = {}
            if owned and into_buffer and isinstance(layer.transform, Additive) and \
                    _takes_overwrite(type(layer)):
                kwargs["overwrite"] = True  # x into y's memory: one activation less
            leaf.pending = (layer.inverse_steps(y, self.context, **kwargs), recorder, {})
            leaf.captured, leaf.rebuilt, leaf.owns_rebuilt = {}, None, into_buffer
            return
        with rebuilding(), self.autocast.replay(), leaf.module_state.replay(), torch.no_grad():
            if x is not None:
                frames, rebuilt = self._recompute(leaf, x), None
            else:
                frames, rebuilt = self._invert(leaf, y)
        leaf.captured = self._validated(leaf, frames, where)
        leaf.rebuilt = rebuilt
        if rebuilt is not None:
            self._check_fingerprint(leaf, rebuilt, where)

    @staticmethod
    def _inverse_only(leaf: _Leaf) -> bool:
        """Whether ``leaf`` (a layer without sub-networks whose input is gone) saved only its
        input and tensors that are still alive, so that its inverse rebuilds everything."""
        if leaf.subnets or leaf.held_input is not None:
            return False
        return all(record.is_input or record.ref() is not None
                   for records in leaf.frames.values() for record in records)

    def _advance(self, leaf: _Leaf, until: str | None) -> None:
        """Drive a staged rebuild of ``leaf`` until sub-network ``until`` has been evaluated (to
        the end with ``None``, or when ``until`` is not one of its sub-networks)."""
        steps, recorder, _ = leaf.pending
        where = _describe(leaf.index, leaf.layer)
        x = None
        with rebuilding(), self.autocast.replay(), leaf.module_state.replay(), torch.no_grad(), \
                self._hooks(), recording(recorder):
            try:
                while until is None or until not in leaf.captured:
                    # sent: whether everything captured so far has been used (a coupling
                    # rebuilding in place may then overwrite what it saved)
                    name = steps.send(all(t is _GONE for frame in leaf.captured.values()
                                          for t in frame) if leaf.captured else None)
                    leaf.captured.update(self._validated(leaf, recorder.frames, where, [name]))
                    recorder.frames.pop(name, None)  # held by ``captured`` only, until unpacked
                    for pos in leaf.pending[2].pop(name, ()):  # alive, handed out already
                        leaf.captured[name][pos] = _GONE
            except StopIteration as done:
                x = done.value
                if x is None:
                    raise TypeError(f"{where}: inverse_steps must return a tensor") from None
        if x is None:
            return
        leaf.pending = None
        if recorder.provided.keys() != leaf.subnets.keys():
            raise ReconstructionError(
                f"{where}: forward evaluated the sub-networks {sorted(leaf.subnets)} but inverse "
                f"{sorted(recorder.provided)}")
        rest = [k for k in leaf.frames if k not in leaf.captured]
        leaf.captured.update(self._validated(leaf, recorder.frames, where, rest))
        self._check_extra_frames(leaf, recorder.frames, where)
        leaf.rebuilt = x
        self._check_fingerprint(leaf, x, where)

    def _check_fingerprint(self, leaf: _Leaf, rebuilt: Tensor, where: str) -> None:
        if leaf.fingerprint is not None:
            error = leaf.fingerprint.mismatch(rebuilt, self.tolerance)
            if error is not None:
                raise ReconstructionError(
                    f"{where}: the input was rebuilt with error {error:.3g} (tolerance "
                    f"{self.tolerance:g}); the layer is not invertible as used (wrong inverse, "
                    "weights changed, or too little precision: use float64 or fewer layers per "
                    "stack)")

    def _hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self._capture, _never_unpacked)

    def _recompute(self, leaf: _Leaf, x: Tensor) -> dict:
        recorder = _Recorder(RECOMPUTE, leaf.layer, self, leaf)
        x = x.detach().requires_grad_(leaf.input_flag)
        replay = leaf.rng.replay() if leaf.rng is not None else nullcontext()
        with self._hooks(), replay, torch.enable_grad(), recording(recorder):
            layer_forward(leaf.layer, x, self.context, leaf.want_log_det)
        return recorder.frames

    def _invert(self, leaf: _Leaf, y: Tensor) -> tuple[dict, Tensor]:
        recorder = _Recorder(INVERT, leaf.layer, self, leaf)
        with self._hooks(), recording(recorder):
            x = layer_inverse(leaf.layer, y.detach(), self.context)
        if not isinstance(x, Tensor):
            raise TypeError(f"{_describe(leaf.index, leaf.layer)}: inverse must return a tensor")
        if not leaf.subnets or recorder.provided.keys() != leaf.subnets.keys():
            # no sub-network protocol: run the layer forward again from its rebuilt input
            return self._recompute(leaf, x), x
        if leaf.frames[""]:
            glue = _Recorder(GLUE, leaf.layer, self, leaf, frames=recorder.frames)
            glue.provided = recorder.provided
            x_in = x.detach().requires_grad_(leaf.input_flag)
            replay = getattr(leaf.layer, "replay_elementwise", None)
            with self._hooks(), torch.enable_grad(), recording(glue):
                if replay is None or _has_forward_hooks(leaf.layer) or not replay(x_in, glue.provided):
                    layer_forward(leaf.layer, x_in, self.context, leaf.want_log_det)
        return recorder.frames, x

    def _validated(self, leaf: _Leaf, frames: dict, where: str,
                   keys: Sequence[str] | None = None) -> dict[str, list]:
        captured = {}
        for key in leaf.frames if keys is None else keys:
            records = leaf.frames.get(key)
            if records is None:
                raise ReconstructionError(f"{where}: sub-network {key!r} saved tensors when "
                                          "rebuilt but was not evaluated in forward")
            got = frames.get(key, [])
            label = f"sub-network {key!r}" if key else "its own operations"
            if len(got) != len(records):
                raise ReconstructionError(
                    f"{where}: {label} saved {len(records)} tensors for backward in forward but "
                    f"{len(got)} when rebuilt; the layer's forward must depend only on its input, "
                    "context and parameters (data-dependent control flow?)")
            tensors = []
            for (t, version), record in zip(got, records):
                if t.shape != record.shape or t.dtype != record.dtype:
                    raise ReconstructionError(
                        f"{where}: {label} saved a {tuple(record.shape)} {record.dtype} tensor in "
                        f"forward but a {tuple(t.shape)} {t.dtype} one when rebuilt (data-dependent "
                        "control flow?)")
                if t._version != version:
                    raise _modified_error(f"a tensor saved by {where}")
                tensors.append(t)
            captured[key] = tensors
        if keys is None:
            self._check_extra_frames(leaf, frames, where)
        return captured

    @staticmethod
    def _check_extra_frames(leaf: _Leaf, frames: dict, where: str) -> None:
        extra = [k for k, v in frames.items() if v and k not in leaf.frames]
        if extra:
            raise ReconstructionError(f"{where}: sub-network {extra[0]!r} saved tensors when rebuilt "
                                      "but was not evaluated in forward")

    def _queue_cleanup(self) -> None:
        if self._cleanup_queued:
            return
        try:
            torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)
        except RuntimeError:  # unpacked outside a backward pass
            return
        self._cleanup_queued = True

    def _end_of_backward(self) -> None:
        self._cleanup_queued = False
        for leaf in self.leaves:
            leaf.captured = None
            leaf.rebuilt = None
            leaf.pending = None

    # ------------------------------------------------------------------ accounting

    @property
    def held_state_bytes(self) -> int:
        """Bytes of random-generator states and buffer values this call keeps for backward."""
        total = 0
        for leaf in self.leaves:
            states = {id(s): s for s in [leaf.rng, *(r.rng for r in leaf.subnets.values())] if s}
            total += sum(s.nbytes for s in states.values()) + leaf.module_state.nbytes
        return total


@cache
def _takes_overwrite(cls: type) -> bool:
    try:
        return "overwrite" in inspect.signature(cls.inverse_steps).parameters
    except (TypeError, ValueError):
        return False


def _staged(leaf: _Leaf) -> bool:
    """Whether ``leaf`` can be rebuilt one sub-network at a time: a coupling with the default
    :meth:`~revtrain.Coupling.inverse` (so :meth:`~revtrain.Coupling.inverse_steps` is what it
    does) whose element-wise operations saved nothing (no re-run of them needs every output)."""
    layer = leaf.layer
    return (isinstance(layer, Coupling) and type(layer).inverse is Coupling.inverse
            and bool(leaf.subnets) and not leaf.frames[""])


def _has_forward_hooks(module: nn.Module) -> bool:
    from torch.nn.modules import module as torch_module

    return bool(module._forward_hooks or module._forward_pre_hooks
                or torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks)


def _modified_error(what: str) -> RuntimeError:
    return RuntimeError(
        f"one of the variables needed for gradient computation has been modified by an inplace "
        f"operation: {what} was changed in place after it was saved for backward (revtrain "
        "checks the versions PyTorch does not check for hooked saved tensors)")


def warn_unreplayed(where: str) -> None:
    warnings.warn(f"{where} drew random numbers (dropout?) but preserve_rng_state=False, so "
                  "backward will use other random numbers and the gradients will be wrong; keep "
                  "preserve_rng_state=True", RuntimeWarning, stacklevel=5)


def devices_of(x: Tensor, context) -> tuple[int, ...]:
    return cuda_devices_of([x, *flatten_context(context)])

