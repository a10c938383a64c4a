"""The contract every invertible layer follows, and a checker for it."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["InvertibleModule", "ReconstructionError", "is_invertible", "has_inverse"]


class ReconstructionError(RuntimeError):
    """An input rebuilt during backward differs from the input seen in forward.

    Raised by the opt-in reconstruction check of :class:`revtrain.ReversibleSequential`
    and when a layer's parameters were changed in place between forward and backward.
    The message names the layer.
    """


class InvertibleModule(nn.Module):
    r"""Base class of an invertible layer :math:`y = T(x)`.

    Contract:

    * ``forward(x) -> y`` is the direction used for training; ``inverse(y) -> x`` undoes it,
      so that ``inverse(forward(x)) == x`` up to floating point.
    * ``forward_and_log_det(x) -> (y, log_det)`` also returns
      :math:`\log |\det \partial y / \partial x|` per sample, a tensor of shape ``(batch,)``
      (zeros for volume-preserving layers). The inverse's log-det is ``-log_det``.
    * The batch dimension is dimension 0; layers never mix samples, except for the
      statistics of normalisation layers in training mode.
    * Implementers provide ``forward_and_log_det`` and ``inverse``; ``forward`` is derived.
      A layer that can rebuild its input and back-propagate with a single evaluation of its
      sub-networks may also provide ``fused_backward`` (see :mod:`revtrain.engine`).
    * Injective layers (zero padding) provide an ``inverse`` that is a left inverse only;
      they set ``bijective = False`` and have no log-det.
    """

    bijective: bool = True

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_and_log_det(x)[0]

    def forward_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError(
            f"{type(self).__name__} must implement forward_and_log_det(x) -> (y, log_det)"
        )

    def inverse(self, y: Tensor) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement inverse(y) -> x")


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
    layers (``bijective = False``) only the first direction is checked. Training mode and the
    caller's tensors are left as they were.

    Returns:
        ``True`` when both round trips agree within tolerance, ``False`` otherwise,
        including when the module has no ``inverse`` or the shapes do not match.
    """
    if atol is None:
        atol = 1e-10 if example_input.dtype == torch.float64 else 1e-5
    if not has_inverse(module):
        return False
    was_training = module.training
    module.eval()
    try:
        x = example_input.detach().clone()
        y = module(x)
        x_rec = module.inverse(y.clone())
        if x_rec.shape != x.shape or not torch.allclose(x_rec, x, atol=atol, rtol=rtol):
            return False
        if not getattr(module, "bijective", True):
            return True
        gen = torch.Generator(device=y.device).manual_seed(0)
        noise = torch.randn(y.shape, generator=gen, device=y.device, dtype=y.dtype)
        y_other = y + 0.01 * noise * y.abs().mean().clamp_min(1.0)  # another point of the range
        y_rec = module(module.inverse(y_other.clone()))
        return y_rec.shape == y.shape and torch.allclose(y_rec, y_other, atol=atol, rtol=rtol)
    except (RuntimeError, ValueError, NotImplementedError):
        return False
    finally:
        module.train(was_training)
