"""The reversible engine: run a stack of invertible layers keeping only its output.

:class:`ReversibleFunction` is one ``torch.autograd.Function`` per stack call. Its forward
runs every layer without building a graph and saves only the final output. Its backward walks
the layers from last to first; each layer rebuilds its input from its output and
back-propagates once:

* a layer with ``fused_backward`` (every :class:`~revtrain.Coupling`) evaluates each of its
  sub-networks exactly once more, with grad, and that evaluation gives both the rebuilt input
  and the gradients (Gomez et al. 2017, Algorithm 1);
* any other invertible layer (ActNorm, 1x1 conv, squeeze, memcnn modules) runs ``inverse``
  without grad and its forward again with grad.

The parameters of the stack are inputs of the autograd function, so their gradients leave
backward through ordinary autograd: ``torch.autograd.grad``, ``backward(inputs=...)``, gradient
hooks (once per backward, as DDP needs) and shared weights behave as with stored activations.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from .base import InvertibleModule, ReconstructionError
from .state import AutocastState, RngTape, batchnorm_modules, cuda_devices_of, frozen_batchnorm

__all__ = ["ReversibleFunction", "StackRun", "layer_forward", "layer_backward", "Fingerprint"]


def layer_forward(layer: nn.Module, x: Tensor, want_log_det: bool) -> tuple[Tensor, Tensor | None]:
    """``(y, log_det)`` of a layer; ``log_det`` is ``None`` when not wanted or not defined."""
    if want_log_det and isinstance(layer, InvertibleModule):
        return layer.forward_and_log_det(x)
    return layer(x), None


def layer_backward(
    layer: nn.Module,
    y: Tensor,
    dy: Tensor,
    dlog_det: Tensor | None,
    params: Sequence[Tensor],
    rng: RngTape,
) -> tuple[Tensor, Tensor, list[Tensor | None]]:
    """Rebuild a layer's input from its output and back-propagate through the layer once.

    Returns ``(x, dx, grads)`` with ``grads`` aligned with ``params`` (``None`` where unused).
    """
    fused = getattr(layer, "fused_backward", None)
    if fused is not None:
        return fused(y, dy, dlog_det, params, rng)
    with torch.no_grad(), rng.replay():
        x = layer.inverse(y)
    x = x.detach().requires_grad_(True)
    with torch.enable_grad(), rng.replay():
        y_re, log_det = layer_forward(layer, x, dlog_det is not None)
    outputs, grad_outputs = [y_re], [dy]
    if log_det is not None and log_det.requires_grad:
        outputs.append(log_det)
        grad_outputs.append(dlog_det)
    if not y_re.requires_grad:
        return x.detach(), torch.zeros_like(x), [None] * len(params)
    found = torch.autograd.grad(outputs, [x, *params], grad_outputs, allow_unused=True)
    dx = found[0] if found[0] is not None else torch.zeros_like(x)
    return x.detach(), dx, list(found[1:])


class Fingerprint:
    """A cheap sample of a layer input, to check its reconstruction in backward."""

    samples = 64

    def __init__(self, x: Tensor):
        flat = x.detach().reshape(-1)
        self.index = torch.linspace(0, flat.numel() - 1, min(self.samples, flat.numel()),
                                    device=x.device).long()
        self.values = flat[self.index].clone()
        self.shape = x.shape

    def mismatch(self, x: Tensor, tol: float) -> float | None:
        """The largest deviation if it exceeds ``tol`` (relative to the values), else ``None``."""
        if x.shape != self.shape:
            return float("inf")
        rebuilt = x.detach().reshape(-1)[self.index]
        error = (rebuilt - self.values).abs().max()
        scale = 1.0 + self.values.abs().max()
        if not torch.isfinite(error) or error > tol * scale:
            return float(error)
        return None


def _name(index: int, layer: nn.Module) -> str:
    return f"layer {index} ({type(layer).__name__})"


class StackRun:
    """What one call of a stack needs in backward: layers, their parameters, options."""

    __slots__ = ("layers", "layer_params", "layer_batchnorms", "params", "preserve_rng_state",
                 "check_tolerance")

    def __init__(self, layers: Sequence[nn.Module], preserve_rng_state: bool,
                 check_tolerance: float | None):
        self.layers = list(layers)
        self.layer_params = [[p for p in layer.parameters() if p.requires_grad]
                             for layer in self.layers]
        self.layer_batchnorms = [batchnorm_modules(layer) for layer in self.layers]
        seen: dict[int, Tensor] = {}
        for ps in self.layer_params:
            for p in ps:
                seen.setdefault(id(p), p)
        self.params = list(seen.values())  # each shared parameter once
        self.preserve_rng_state = preserve_rng_state
        self.check_tolerance = check_tolerance

    def owner_of(self, param: Tensor) -> str:
        for i, ps in enumerate(self.layer_params):
            if any(p is param for p in ps):
                return _name(i, self.layers[i])
        return "the stack"


class ReversibleFunction(torch.autograd.Function):
    """Forward keeps only the stack's output; backward rebuilds every intermediate.

    Inputs: ``(run, want_log_det, x, *run.params)`` with ``run`` a :class:`StackRun`.
    Outputs: ``y``, or ``(y, log_det)`` when ``want_log_det``.
    """

    @staticmethod
    def forward(ctx, run: StackRun, want_log_det: bool, x: Tensor, *params: Tensor):
        devices = cuda_devices_of([x, *params])
        tol = run.check_tolerance
        tapes, prints = [], []
        log_det = None
        y = x
        for i, layer in enumerate(run.layers):
            if tol is not None:
                prints.append(Fingerprint(y))
            tape = RngTape(devices)
            with tape.recording():
                y, ld = layer_forward(layer, y, want_log_det)
            if tape.consumed and not run.preserve_rng_state:
                warnings.warn(
                    f"ReversibleSequential: {_name(i, layer)} drew random numbers (dropout?) "
                    "but preserve_rng_state=False, so backward will use other random numbers "
                    "and the gradients will be wrong; keep preserve_rng_state=True",
                    RuntimeWarning,
                    stacklevel=4,
                )
                tape.states = None
            tapes.append(tape)
            if ld is not None:
                log_det = ld if log_det is None else log_det + ld
            if tol is not None and not torch.isfinite(y).all():
                raise ReconstructionError(
                    f"ReversibleSequential: {_name(i, layer)} produced NaN or Inf in forward; "
                    "a non-finite output cannot be inverted (check the input and the weights)"
                )
        if y is x:  # an empty or identity stack: autograd needs a new tensor
            y = x.clone()
        ctx.run = run
        ctx.tapes = tapes
        ctx.prints = prints
        ctx.autocast = AutocastState()
        ctx.versions = [p._version for p in params]
        ctx.save_for_backward(y)
        if want_log_det:
            if log_det is None:
                log_det = x.new_zeros(x.shape[0])
            return y, log_det
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: Tensor | None, dlog_det: Tensor | None = None):
        run: StackRun = ctx.run
        try:
            (y,) = ctx.saved_tensors
        except RuntimeError as error:
            raise RuntimeError(
                "ReversibleSequential: cannot run backward. Either the stack's output was "
                "changed in place before backward (clone it before modifying it, e.g. "
                "`out = stack(x).clone()`), or backward already ran through this graph "
                f"(pass retain_graph=True to the first backward). PyTorch said: {error}"
            ) from error
        needs = ctx.needs_input_grad[3:]
        for p, version in zip(run.params, ctx.versions):
            if p._version != version:
                raise ReconstructionError(
                    f"ReversibleSequential: a parameter of {run.owner_of(p)} was changed in "
                    "place between forward and backward (an optimizer step or weight update "
                    "before backward?); its input cannot be rebuilt. Run backward first."
                )
        index_of = {id(p): k for k, p in enumerate(run.params)}
        grads: list[Tensor | None] = [None] * len(run.params)
        y = y.detach()
        if dy is None:
            dy = torch.zeros_like(y)
        tol = run.check_tolerance
        with ctx.autocast.replay():
            for i in range(len(run.layers) - 1, -1, -1):
                layer = run.layers[i]
                wanted = [p for p in run.layer_params[i] if needs[index_of[id(p)]]]
                with frozen_batchnorm(run.layer_batchnorms[i]):
                    x, dx, found = layer_backward(layer, y, dy, dlog_det, wanted, ctx.tapes[i])
                for p, grad in zip(wanted, found):
                    if grad is not None:
                        k = index_of[id(p)]
                        grads[k] = grad if grads[k] is None else grads[k] + grad
                if tol is not None:
                    error = ctx.prints[i].mismatch(x, tol)
                    if error is not None:
                        raise ReconstructionError(
                            f"ReversibleSequential: the input of {_name(i, layer)} was rebuilt "
                            f"with error {error:.3g} (tolerance {tol:g}); the layer is not "
                            "invertible as used (wrong inverse, weights changed, or too little "
                            "precision: use float64 or fewer layers per stack)"
                        )
                y, dy = x, dx
        dx_in = dy if ctx.needs_input_grad[2] else None
        return (None, None, dx_in, *grads)
