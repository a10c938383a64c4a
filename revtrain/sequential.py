"""``ReversibleSequential``: the unit of memory saving."""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import nullcontext
from functools import partial

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .base import InvertibleModule, ReconstructionError, has_inverse
from .engine import ReversibleFunction, StackRun, layer_forward
from .modes import MemoryMode
from .state import batchnorm_modules, batchnorm_without_update

__all__ = ["ReversibleSequential"]


class ReversibleSequential(InvertibleModule):
    """A stack of invertible layers that can train without storing their activations.

    Args:
        *layers: invertible modules: revtrain layers (:class:`~revtrain.AdditiveCoupling`,
            :class:`~revtrain.AffineCoupling`, flow layers) or any module with ``forward`` and
            ``inverse`` (memcnn's couplings).
        memory: ``"reversible"`` (default), ``"checkpoint"`` or ``"stored"``; same parameters
            and results in every mode, different memory.
        preserve_rng_state: replay the random numbers of layers that draw any (dropout), so
            that the rebuilt activations and gradients match the forward pass.
        check_reconstruction: opt-in check. ``True`` (default tolerance: 1e-8 in float64,
            1e-3 otherwise) or a float tolerance: each rebuilt input is compared with a sample
            taken in forward, and forward outputs must be finite; a mismatch raises
            :class:`~revtrain.ReconstructionError` naming the layer. Off by default: costs nothing.
        check_finite: raise when the stack's output contains NaN or Inf (one reduction per
            call); a non-finite output cannot be inverted.

    In reversible mode a call keeps only its output (plus, for layers that drew random numbers,
    their RNG state). Under ``torch.no_grad`` or when nothing needs a gradient, every mode is a
    plain forward that keeps nothing. The caller's input is never freed or modified.
    """

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
            if not isinstance(layer, nn.Module):
                raise TypeError(f"ReversibleSequential: layer {i} is a {type(layer).__name__}, "
                                "not an nn.Module")
            if not has_inverse(layer):
                raise TypeError(
                    f"ReversibleSequential: layer {i} ({type(layer).__name__}) has no inverse(); "
                    "only invertible layers can be rebuilt from their output. Wrap the layer "
                    "in a coupling (e.g. AdditiveCoupling(f=layer, ...)) or put it outside the stack"
                )
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

    def __iter__(self):
        return iter(self.layers)

    def _tolerance(self, x: Tensor) -> float | None:
        tol = self._check_tolerance
        if tol is not None and tol < 0:
            return 1e-8 if x.dtype == torch.float64 else 1e-3
        return tol

    def forward(self, x: Tensor) -> Tensor:
        return self._run(x, want_log_det=False)[0]

    def forward_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        y, log_det = self._run(x, want_log_det=True)
        return y, log_det

    def inverse(self, y: Tensor) -> Tensor:
        for layer in reversed(self.layers):
            y = layer.inverse(y)
        return y

    @torch.compiler.disable
    def _run(self, x: Tensor, want_log_det: bool) -> tuple[Tensor, Tensor | None]:
        if not isinstance(x, Tensor):
            raise TypeError(f"ReversibleSequential expects a tensor, got {type(x).__name__}")
        grad_needed = torch.is_grad_enabled() and (
            x.requires_grad or any(p.requires_grad for p in self.parameters())
        )
        if self.memory is MemoryMode.REVERSIBLE and grad_needed:
            run = StackRun(self.layers, self.preserve_rng_state, self._tolerance(x))
            out = ReversibleFunction.apply(run, want_log_det, x, *run.params)
            y, log_det = out if want_log_det else (out, None)
        elif self.memory is MemoryMode.CHECKPOINT and grad_needed:
            y, log_det = self._checkpointed(x, want_log_det)
        else:
            y, log_det = self._stored(x, want_log_det)
        if self.check_finite and not bool(torch.isfinite(y).all()):
            where = "its input already was" if not bool(torch.isfinite(x).all()) else "check the weights"
            raise ReconstructionError(
                f"ReversibleSequential: the output contains NaN or Inf ({where}); "
                "a non-finite activation cannot be rebuilt in backward. Pass "
                "check_finite=False to allow it."
            )
        if want_log_det and log_det is None:
            log_det = x.new_zeros(x.shape[0])
        return y, log_det

    def _stored(self, x: Tensor, want_log_det: bool) -> tuple[Tensor, Tensor | None]:
        log_det = None
        for layer in self.layers:
            x, ld = layer_forward(layer, x, want_log_det)
            if ld is not None:
                log_det = ld if log_det is None else log_det + ld
        return x, log_det

    def _checkpointed(self, x: Tensor, want_log_det: bool) -> tuple[Tensor, Tensor | None]:
        log_det = None
        for layer in self.layers:
            # the recomputation uses batch statistics but must not update running statistics
            contexts = partial(_checkpoint_contexts, batchnorm_modules(layer))
            x, ld = checkpoint(
                layer_forward, layer, x, want_log_det,
                use_reentrant=False, preserve_rng_state=self.preserve_rng_state,
                context_fn=contexts,
            )
            if ld is not None:
                log_det = ld if log_det is None else log_det + ld
        return x, log_det

    def extra_repr(self) -> str:
        return f"memory={self.memory.value}"


def _checkpoint_contexts(modules):
    return nullcontext(), batchnorm_without_update(modules)
