"""``ReversibleSequential``: the unit of memory saving."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .base import InvertibleModule, ReconstructionError, has_inverse
from .engine import (
    CHECKPOINT,
    INLINE,
    Recorder,
    ReversibleCall,
    current_recorder,
    flatten_context,
    layer_forward,
    layer_inverse,
    recording,
)
from .modes import MemoryMode
from .state import ModuleState, cuda_devices_of, rebuilding

__all__ = ["ReversibleSequential", "checkpoint_module"]


class ReversibleSequential(InvertibleModule):
    """A stack of invertible layers that can train without storing their activations.

    Args:
        *layers: invertible modules: revtrain layers (:class:`~revtrain.AdditiveCoupling`,
            :class:`~revtrain.AffineCoupling`, flow layers, other stacks) or any module with
            ``forward`` and ``inverse`` (memcnn's couplings).
        memory: ``"reversible"`` (default), ``"checkpoint"`` or ``"stored"``; same parameters
            and results in every mode, different memory.
        preserve_rng_state: replay the random numbers of layers that draw any (dropout), so
            that the rebuilt activations and gradients match the forward pass.
        check_reconstruction: opt-in check. ``True`` (default tolerance: 1e-8 in float64,
            1e-3 otherwise) or a float tolerance: each rebuilt input is compared with a sample
            taken in forward, and forward outputs must be finite; a mismatch raises
            :class:`~revtrain.ReconstructionError` naming the layer. Off by default: costs nothing.
        check_finite: in reversible mode, raise :class:`~revtrain.ReconstructionError` when the
            stack's output contains NaN or Inf (a non-finite output cannot be inverted). On CPU
            the check runs in forward; on CUDA it runs at the end of backward, so that it costs
            no host synchronisation per stack. Never in ``no_grad`` / ``inference_mode``.

    Call it as ``stack(x)`` or ``stack(x, context=c)``: ``c`` (a tensor or a tuple of tensors)
    is handed to every sub-network of every coupling as a second argument, ``f(x2, c)``; layers
    without sub-networks ignore it. Its gradient is exact and it is held once per call.

    In reversible mode a call keeps only its output and its context (plus, for layers that drew
    random numbers, their generator states). The autograd graph is the ordinary one, so hooks,
    ``torch.func.functional_call``, DDP and FSDP behave as in stored mode. Under
    ``torch.no_grad``, when nothing needs a gradient, under ``torch.func`` transforms, tracing,
    export and ``disable_saved_tensors_hooks``, every mode is a plain forward. The caller's
    tensors are never freed or modified.
    """

    _log_det_through_call = True  # forward() honours the engine's request for (y, log_det)

    def __init__(
        self,
        *layers: nn.Module,
        memory: MemoryMode | str = MemoryMode.REVERSIBLE,
        preserve_rng_state: bool = True,
        check_reconstruction: bool | float = False,
        check_finite: bool = True,
    ):
        super().__init__()
        if len(layers) == 1 and isinstance(layers[0], Iterable) and not isinstance(layers[0], nn.Module):
            layers = tuple(layers[0])
        for i, layer in enumerate(layers):
            _check_layer(i, layer)
        self.layers = nn.ModuleList(layers)
        self.memory = memory
        self.preserve_rng_state = bool(preserve_rng_state)
        self.check_finite = bool(check_finite)
        self.check_reconstruction = check_reconstruction

    @property
    def memory(self) -> MemoryMode:
        """The memory mode; may be set to a :class:`MemoryMode` or its string value."""
        return self._memory

    @memory.setter
    def memory(self, value: MemoryMode | str) -> None:
        self._memory = MemoryMode.parse(value)

    @property
    def check_reconstruction(self) -> float | None:
        """The reconstruction tolerance, or ``None`` when the check is off."""
        return self._check_tolerance

    @check_reconstruction.setter
    def check_reconstruction(self, value: bool | float | None) -> None:
        if value is None or value is False:
            self._check_tolerance = None
        elif value is True:
            self._check_tolerance = -1.0  # resolved per dtype at call time
        elif isinstance(value, (int, float)) and value > 0:
            self._check_tolerance = float(value)
        else:
            raise ValueError(
                f"check_reconstruction must be True, False or a positive tolerance, got {value!r}"
            )

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, index: int) -> nn.Module:
        return self.layers[index]

    def __iter__(self) -> Iterator[nn.Module]:
        return iter(self.layers)

    def _tolerance(self, x: Tensor) -> float | None:
        tol = self._check_tolerance
        if tol is not None and tol < 0:
            return 1e-8 if x.dtype == torch.float64 else 1e-3
        return tol

    def forward(self, x: Tensor, context=None):
        from .base import _local

        if getattr(_local, "log_det_for", None) is self:
            return self._run(x, context, want_log_det=True)
        return self._run(x, context, want_log_det=False)[0]

    def forward_and_log_det(self, x: Tensor, context=None) -> tuple[Tensor, Tensor]:
        return self._run(x, context, want_log_det=True)

    def inverse(self, y: Tensor, context=None) -> Tensor:
        _check_call(y, context)
        for layer in reversed(self.layers):
            y = layer_inverse(layer, y, context)
        return y

    def _run(self, x: Tensor, context, want_log_det: bool) -> tuple[Tensor, Tensor | None]:
        _check_call(x, context)
        recorder = current_recorder()
        if recorder is not None and recorder.mode == INLINE and recorder.owner is self:
            # a layer of an outer reversible stack: its layers become the outer stack's layers
            if x is not recorder.provided["input"] and not _same_memory(x, recorder.provided["input"]):
                raise RuntimeError(
                    "ReversibleSequential: a forward pre-hook replaced the input of a nested stack; "
                    "a reversible stack cannot invert through it. Change the input outside the "
                    "stack, or use memory='stored' or 'checkpoint'")
            y, log_det = recorder.call.run_layers(self.layers, x, want_log_det)
        elif _plain_only(x, context):
            y, log_det = self._stored(x, context, want_log_det)
        elif torch.compiler.is_compiling():
            y, log_det = _eager_run()(self, x, context, want_log_det)
        else:
            y, log_det = self._run_mode(x, context, want_log_det)
        if want_log_det and log_det is None:
            log_det = x.new_zeros(x.shape[0])
        return y, log_det

    def _run_mode(self, x: Tensor, context, want_log_det: bool) -> tuple[Tensor, Tensor | None]:
        grad_needed = torch.is_grad_enabled() and (
            x.requires_grad or any(t.requires_grad for t in flatten_context(context))
            or any(p.requires_grad for p in self.parameters())
        )
        if not grad_needed or self.memory is MemoryMode.STORED:
            return self._stored(x, context, want_log_det)
        if self.memory is MemoryMode.CHECKPOINT:
            return self._checkpointed(x, context, want_log_det)
        call = ReversibleCall(context, self.preserve_rng_state, self._tolerance(x),
                              cuda_devices_of([x, *flatten_context(context)]))
        y, log_det = call.run(self.layers, x, want_log_det)
        if self.check_finite:
            finite = torch.isfinite(y.detach()).all()  # detached: nothing saved for backward
            if y.is_cuda:
                call.finite = finite  # checked at the end of backward: no sync per stack
            elif not finite:
                where = "its input already was" if not bool(torch.isfinite(x).all()) else "check the weights"
                raise ReconstructionError(
                    f"ReversibleSequential: the output contains NaN or Inf ({where}); a non-finite "
                    "activation cannot be rebuilt in backward. Pass check_finite=False to allow it.")
        return y, log_det

    def _stored(self, x: Tensor, context, want_log_det: bool) -> tuple[Tensor, Tensor | None]:
        log_det = None
        for i, layer in enumerate(self.layers):
            x, ld = layer_forward(layer, x, context, want_log_det)
            _check_output(i, layer, x)
            if ld is not None:
                log_det = ld if log_det is None else log_det + ld
        return x, log_det

    def _checkpointed(self, x: Tensor, context, want_log_det: bool) -> tuple[Tensor, Tensor | None]:
        log_det = None
        for i, layer in enumerate(self.layers):
            replay = _CheckpointReplay(layer, f"ReversibleSequential: layer {i} ({type(layer).__name__})")
            x, ld = checkpoint(
                layer_forward, layer, x, context, want_log_det,
                use_reentrant=False, preserve_rng_state=self.preserve_rng_state,
                context_fn=replay.contexts,
            )
            _check_output(i, layer, x)
            if ld is not None:
                log_det = ld if log_det is None else log_det + ld
        return x, log_det

    def extra_repr(self) -> str:
        return f"memory={self.memory.value}"


def _check_output(i: int, layer: nn.Module, y) -> None:
    if not isinstance(y, Tensor):
        raise TypeError(f"ReversibleSequential: layer {i} ({type(layer).__name__}) returned a "
                        f"{type(y).__name__}, not a tensor; a layer of a reversible stack maps one "
                        "tensor to one tensor")


def _same_memory(a: Tensor, b: Tensor) -> bool:
    return (a.shape == b.shape and a.dtype == b.dtype and a.stride() == b.stride()
            and a.data_ptr() == b.data_ptr())


def _check_layer(i: int, layer) -> None:
    if not isinstance(layer, nn.Module):
        raise TypeError(f"ReversibleSequential: layer {i} is a {type(layer).__name__}, not an nn.Module")
    cls = type(layer)
    if cls.__name__ == "InvertibleModuleWrapper" and cls.__module__.startswith("memcnn"):
        raise TypeError(
            f"ReversibleSequential: layer {i} is memcnn's InvertibleModuleWrapper, which runs its "
            "own reversible autograd function (and frees its input); pass the coupling it wraps "
            "instead: ReversibleSequential(wrapper._fn, ...)")
    if not has_inverse(layer):
        raise TypeError(
            f"ReversibleSequential: layer {i} ({cls.__name__}) has no inverse(); only invertible "
            "layers can be rebuilt from their output. Wrap the layer in a coupling (e.g. "
            "AdditiveCoupling(f=layer, ...)) or put it outside the stack")


def _check_call(x, context) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"ReversibleSequential expects a tensor, got {type(x).__name__}")
    for c in flatten_context(context):
        if c.dim() == 0 or x.dim() == 0 or c.shape[0] != x.shape[0]:
            raise ValueError(
                f"ReversibleSequential: the context's batch size must equal the input's: got "
                f"context {tuple(c.shape)} for input {tuple(x.shape)}; give the context one row "
                "per sample (expand or repeat it)")


def _plain_only(x: Tensor, context) -> bool:
    """Tracing, export, ``torch.func`` transforms and code under
    ``torch.autograd.graph.disable_saved_tensors_hooks`` see a plain forward (saved-tensor hooks
    and data-dependent checks do not compose with them)."""
    if torch.jit.is_tracing() or torch.compiler.is_exporting():
        return True
    hooks_enabled = getattr(torch._C._autograd, "_saved_tensors_hooks_is_enabled", None)
    if hooks_enabled is not None and not hooks_enabled():
        return True
    functorch = getattr(torch._C, "_functorch", None)
    return functorch is not None and functorch.peek_interpreter_stack() is not None


_EAGER = None


def _eager_run():
    """``_run_mode`` behind a graph break, created on first use so that importing revtrain does
    not import ``torch._dynamo``."""
    global _EAGER
    if _EAGER is None:
        _EAGER = torch.compiler.disable(ReversibleSequential._run_mode)
    return _EAGER


class _Reentrant:
    """A context manager that may be entered again and again (``torch.utils.checkpoint``
    recomputes once per backward, and more under ``retain_graph`` or ``jacobian``)."""

    def __init__(self, factory):
        self.factory = factory
        self.active = []

    def __enter__(self):
        manager = self.factory()
        self.active.append(manager)
        return manager.__enter__()

    def __exit__(self, *exc):
        return self.active.pop().__exit__(*exc)


class _CheckpointReplay:
    """The engine's module-state rule for one ``torch.utils.checkpoint`` call of a layer: the
    recomputation uses the forward's parameter and buffer tensors and leaves every buffer as it
    found it (BatchNorm statistics are updated once per step, spectral-norm vectors advance once)."""

    def __init__(self, layer: nn.Module, where: str):
        self.layer, self.where = layer, where
        self.state = ModuleState()

    def contexts(self):
        return _Reentrant(self._forward), _Reentrant(self._recompute)

    @contextmanager
    def _forward(self):
        self.state.begin(self.layer)
        with recording(Recorder(CHECKPOINT, self.layer, None, None, state=self.state)):
            yield
        self.state.finish()

    @contextmanager
    def _recompute(self):
        self.state.check(self.where)
        with rebuilding(), self.state.replay():
            yield


def checkpoint_module(module: nn.Module, *args) -> Tensor:
    """``module(*args)`` keeping only its inputs for backward (non-reentrant checkpoint).

    For the non-invertible parts of a model (a RevNet's stem and transitions): the forward runs
    again in backward with the forward's random numbers, parameter tensors, train / eval modes and
    buffer values, and leaves every buffer as it found it (BatchNorm statistics are updated once
    per step). Recomputing more than once (``retain_graph``, ``jacobian``) works.
    """
    replay = _CheckpointReplay(module, type(module).__name__)
    return checkpoint(module, *args, use_reentrant=False, preserve_rng_state=True,
                      context_fn=replay.contexts)
