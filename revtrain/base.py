"""The contract every invertible layer follows, and a checker for it."""

from __future__ import annotations

import inspect
import threading
from functools import cache

import torch
from torch import Tensor, nn

from ._utils import eval_mode

__all__ = ["InvertibleModule", "ReconstructionError", "is_invertible", "has_inverse",
           "call_subnet", "accepts_context", "takes_two_arguments"]


class ReconstructionError(RuntimeError):
    """A layer's activations cannot be rebuilt faithfully in backward.

    Raised by :class:`revtrain.ReversibleSequential` when a rebuilt input differs from the input
    seen in forward (the opt-in reconstruction check), when a parameter, buffer, context or the
    stack's output was changed in place between forward and backward, when a layer saved other
    tensors in the rebuild than in forward, and when a stack's output is not finite. The message
    names the layer.
    """


# the engine's per-thread state (see revtrain.state): base only reads it
_local = threading.local()


class InvertibleModule(nn.Module):
    r"""Base class of an invertible layer :math:`y = T(x)`.

    Contract:

    * ``forward_and_log_det(x, context=None) -> (y, log_det)`` is the direction used for
      training; ``log_det`` is :math:`\log |\det \partial y / \partial x|` per sample, a tensor of
      shape ``(batch,)`` (zeros for volume-preserving layers). ``forward(x)`` returns ``y``.
    * ``inverse(y, context=None) -> x`` undoes it: ``inverse(forward(x)) == x`` up to floating
      point. The inverse's log-det is ``-log_det``.
    * The batch dimension is dimension 0; layers never mix samples, except for the statistics of
      normalisation layers in training mode.
    * ``context`` (optional, a tensor or a tuple of tensors) is handed to the layer's
      sub-networks; a layer without sub-networks may leave it out of its signatures.
    * Injective layers (zero padding) provide an ``inverse`` that is a left inverse only;
      they set ``bijective = False`` and have no log-det.

    Note to implementers: provide ``forward_and_log_det`` and ``inverse``. If the layer has
    sub-networks (learned functions that need not be invertible), call each of them through
    :meth:`subnet` with a name, in ``forward_and_log_det`` and in ``inverse`` alike. Then a
    reversible stack rebuilds the layer in backward with ONE evaluation of each sub-network:
    ``inverse`` runs under the engine, each sub-network evaluation is recorded once, and the
    element-wise operations around them are re-run with the recorded results. Without
    :meth:`subnet`, the engine runs ``inverse`` and then ``forward_and_log_det`` again (two
    evaluations). Random numbers (dropout) are replayed per sub-network, so draw them only inside
    sub-networks; a layer that draws random numbers elsewhere keeps its input for backward.
    """

    bijective: bool = True

    def forward(self, x: Tensor, context=None):
        out = self.forward_and_log_det(x) if context is None else self.forward_and_log_det(x, context)
        result = out if getattr(_local, "log_det_for", None) is self else out[0]
        recorder = getattr(_local, "recorder", None)
        if recorder is not None and recorder.owner is self:
            recorder.note_call(self, x, result)
        return result

    def forward_and_log_det(self, x: Tensor, context=None) -> tuple[Tensor, Tensor]:
        raise NotImplementedError(
            f"{type(self).__name__} must implement forward_and_log_det(x) -> (y, log_det)"
        )

    def inverse(self, y: Tensor, context=None) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement inverse(y) -> x")

    def subnet(self, name: str, net: nn.Module, *args):
        """Evaluate the sub-network ``net`` (named ``name``, e.g. ``"f"``) on ``args``.

        Outside a reversible stack this is ``net(*args)``. Inside one it lets the engine record
        the evaluation in forward and replay it in backward with the forward's random numbers.
        """
        return call_subnet(self, name, net, *args)


def call_subnet(owner: nn.Module, name: str, net: nn.Module, *args):
    """``net(*args)``, seen by the reversible engine when it runs or rebuilds ``owner``."""
    recorder = getattr(_local, "recorder", None)
    if recorder is None or recorder.owner is not owner:
        return net(*args)
    return recorder.subnet(name, net, args)


@cache
def _takes_context(function) -> bool:
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "context" or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


@cache
def takes_two_arguments(cls: type) -> bool:
    """Whether ``cls.forward`` can be called as ``forward(x, context)``."""
    try:
        parameters = list(inspect.signature(cls.forward).parameters.values())[1:]
    except (TypeError, ValueError, AttributeError):
        return True
    positional = [p for p in parameters if p.kind in (inspect.Parameter.POSITIONAL_ONLY,
                                                      inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 2 or any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in parameters)


def accepts_context(layer: nn.Module, method: str = "forward") -> bool:
    """Whether ``layer``'s ``forward`` (its ``forward_and_log_det`` for revtrain layers) or
    ``inverse`` takes a ``context`` argument."""
    cls = type(layer)
    if method == "forward" and isinstance(layer, InvertibleModule) and \
            cls.forward is InvertibleModule.forward:
        method = "forward_and_log_det"
    function = getattr(cls, method, None)
    return function is not None and _takes_context(function)


def has_inverse(module: nn.Module) -> bool:
    """Whether ``module`` offers an ``inverse`` method (revtrain or memcnn style)."""
    if isinstance(module, InvertibleModule):
        return type(module).inverse is not InvertibleModule.inverse
    return callable(getattr(module, "inverse", None))


def zero_log_det(x: Tensor) -> Tensor:
    """A zero log-det of shape ``(batch,)`` for ``x``."""
    return x.new_zeros(x.shape[0])


@torch.no_grad()
def is_invertible(
    module: nn.Module, example_input: Tensor, atol: float | None = None, rtol: float = 0.0
) -> bool:
    """Check that ``module`` is invertible around ``example_input``, both directions.

    Runs ``inverse(forward(x))`` and ``forward(inverse(y'))`` in eval mode, where ``y'`` is
    ``forward(x)`` moved by a small fixed perturbation, and compares with ``x`` and ``y'``.
    Default ``atol`` is ``1e-10`` for float64 inputs and ``1e-5`` otherwise. For injective
    layers (``bijective = False``) only the first direction is checked. Training mode, the random
    stream and the caller's tensors are left as they were.

    Returns:
        ``True`` when both round trips agree within tolerance, ``False`` otherwise, including
        when the module has no ``inverse``, returns something other than one tensor, or raises.

    Raises:
        TypeError: ``example_input`` is not a tensor.

    Example:
        >>> import torch, revtrain
        >>> layer = revtrain.AdditiveCoupling(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
        >>> revtrain.is_invertible(layer, torch.randn(3, 4))
        True
        >>> revtrain.is_invertible(torch.nn.Linear(4, 4), torch.randn(3, 4))
        False
    """
    if not isinstance(example_input, Tensor):
        raise TypeError(f"is_invertible: example_input must be a tensor, got "
                        f"{type(example_input).__name__}")
    if atol is None:
        atol = 1e-10 if example_input.dtype == torch.float64 else 1e-5
    if not has_inverse(module):
        return False
    try:
        with eval_mode(module), torch.random.fork_rng(devices=[]):
            x = example_input.detach().clone()
            y = module(x)
            if not isinstance(y, Tensor):
                return False
            x_rec = module.inverse(y.clone())
            if not isinstance(x_rec, Tensor) or x_rec.shape != x.shape:
                return False
            if not torch.allclose(x_rec, x, atol=atol, rtol=rtol):
                return False
            if not getattr(module, "bijective", True):
                return True
            gen = torch.Generator(device=y.device).manual_seed(0)
            noise = torch.randn(y.shape, generator=gen, device=y.device, dtype=y.dtype)
            y_other = y + 0.01 * noise * y.abs().mean().clamp_min(1.0)  # another point of the range
            x_other = module.inverse(y_other.clone())
            if not isinstance(x_other, Tensor):
                return False
            y_rec = module(x_other)
            return (isinstance(y_rec, Tensor) and y_rec.shape == y.shape
                    and torch.allclose(y_rec, y_other, atol=atol, rtol=rtol))
    except (RuntimeError, ValueError, TypeError, NotImplementedError, AttributeError, IndexError):
        return False
