"""Callbacks: peak memory, reconstruction error, RNG state in checkpoints."""

from __future__ import annotations

import random
import resource
import sys
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import OnExceptionCheckpoint
from torch import Tensor

from ._common import reversible_stacks

__all__ = ["ExceptionCheckpoint", "PeakMemoryMonitor", "ReconstructionMonitor",
           "RNGStateCallback"]


class PeakMemoryMonitor(pl.Callback):
    """Log the peak memory of training steps, every ``every_n_steps`` steps.

    * CUDA: ``torch.cuda.max_memory_allocated`` over the step, minus what was allocated when
      the step began (``mem/step_peak_mib``), and the allocator's total peak
      (``mem/peak_allocated_mib``). The peak counters are reset before each logged step.
    * CPU: the process's peak resident set (``mem/peak_rss_mib``, from ``getrusage``: one
      system call, so it costs nothing). It only grows; it is a coarse whole-process figure.
      For a tensor-level count use :func:`revtrain.memory.measure_step`.

    Args:
        every_n_steps: log on steps whose index is a multiple of this.
    """

    def __init__(self, every_n_steps: int = 1):
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be at least 1, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self._base: int | None = None

    def _due(self, trainer: pl.Trainer) -> bool:
        return trainer.global_step % self.every_n_steps == 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._base = None
        if self._due(trainer) and pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)
            self._base = torch.cuda.memory_allocated(pl_module.device)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # global_step has advanced by one when the optimizer stepped
        if self._base is not None:
            peak = torch.cuda.max_memory_allocated(pl_module.device)
            pl_module.log("mem/step_peak_mib", (peak - self._base) / 2**20, on_step=True,
                          on_epoch=False)
            pl_module.log("mem/peak_allocated_mib", peak / 2**20, on_step=True, on_epoch=False)
        elif (trainer.global_step - 1) % self.every_n_steps == 0 and pl_module.device.type == "cpu":
            pl_module.log("mem/peak_rss_mib", peak_rss_bytes() / 2**20, on_step=True,
                          on_epoch=False)


def peak_rss_bytes() -> int:
    """Peak resident set size of this process in bytes (``ru_maxrss``)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB


class ReconstructionMonitor(pl.Callback):
    r"""Every ``every_n_steps`` training steps, log how exactly each reversible stack inverts.

    For every outermost :class:`~revtrain.ReversibleSequential` ``S`` of the model, with input
    ``x`` captured during a forward pass of the current batch (eval mode, no grad):
    :math:`e = \max |S^{-1}(S(x)) - x|`. Logs ``recon/max_abs_error`` (the largest over the
    stacks) and ``recon/stack{i}``. It is the reconstruction the engine relies on in backward;
    growth over training shows the drift.

    Args:
        every_n_steps: check on steps whose index is a multiple of this.
        max_samples: use at most this many samples of the batch.
        raise_above: raise :class:`~revtrain.ReconstructionError` when the error exceeds it
            (``None``: only log).
    """

    def __init__(self, every_n_steps: int = 100, max_samples: int = 16,
                 raise_above: float | None = None):
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be at least 1, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self.max_samples = max_samples
        self.raise_above = raise_above
        self.last: dict[str, float] = {}

    @torch.no_grad()
    def measure(self, pl_module: pl.LightningModule, x: Tensor) -> list[float]:
        """Max abs reconstruction error of each outermost stack of ``pl_module`` on ``x``."""
        stacks = reversible_stacks(pl_module)
        inputs: dict[int, tuple[Tensor, Tensor]] = {}

        def capture(i: int):
            def hook(module, args, out) -> None:  # returns None: the output is unchanged
                inputs.setdefault(i, (args[0], out))
            return hook

        hooks = [stack.register_forward_hook(capture(i)) for i, stack in enumerate(stacks)]
        was_training = pl_module.training
        pl_module.eval()
        try:
            pl_module(x[: self.max_samples])
            errors = []
            for i, stack in enumerate(stacks):
                if i not in inputs:  # the stack was not used for this input
                    continue
                x_in, y = inputs[i]
                y = y[0] if isinstance(y, (tuple, list)) else y
                errors.append((stack.inverse(y) - x_in).abs().max().item())
        finally:
            pl_module.train(was_training)
            for h in hooks:
                h.remove()
        return errors

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if (trainer.global_step - 1) % self.every_n_steps != 0:
            return
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        errors = self.measure(pl_module, x)
        if not errors:
            return
        self.last = {f"recon/stack{i}": e for i, e in enumerate(errors)}
        self.last["recon/max_abs_error"] = max(errors)
        pl_module.log_dict(self.last, on_step=True, on_epoch=False)
        if self.raise_above is not None and max(errors) > self.raise_above:
            from ..base import ReconstructionError

            worst = int(np.argmax(errors))
            raise ReconstructionError(
                f"ReconstructionMonitor: stack {worst} rebuilds its input with max error "
                f"{errors[worst]:.3g} > raise_above={self.raise_above} at step "
                f"{trainer.global_step}; lower the learning rate or use float64 / "
                "memory='checkpoint' for this stack"
            )


class RNGStateCallback(pl.Callback):
    """Save the RNG states in every checkpoint and restore them on resume.

    Lightning saves model, optimizer, schedulers and loops but no random state, so a resumed
    run draws different dropout masks and a different data order. This callback stores the
    states of Python's ``random``, NumPy's global generator, torch's CPU generator and every
    CUDA device's generator at the moment the checkpoint is written, and sets them back when
    training resumes from it: a resumed run then continues exactly as the uninterrupted one.
    (DataLoader workers derive their seeds from the torch CPU generator, so they follow.)
    """

    def state_dict(self) -> dict[str, Any]:
        # plain types and tensors only, so that torch.load(weights_only=True) reads it
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state = {
            "python": random.getstate(),
            "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
            "torch": torch.get_rng_state(),
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        random.setstate(state_dict["python"])
        kind, keys, pos, has_gauss, cached = state_dict["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
        torch.set_rng_state(state_dict["torch"])
        if "cuda" in state_dict and torch.cuda.is_available():
            states = state_dict["cuda"]
            if len(states) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(states)
            else:
                torch.cuda.set_rng_state(states[0])


class ExceptionCheckpoint(OnExceptionCheckpoint):
    """Lightning's :class:`~pytorch_lightning.callbacks.OnExceptionCheckpoint`, but only once
    training has taken a step.

    An exception inside training (or Ctrl-C) writes ``dirpath/filename.ckpt``; while this
    callback is configured, ``fit`` without ``ckpt_path`` resumes from the newest checkpoint
    (Lightning's behaviour), so the run continues where it failed. A failure before the first
    step (a bad configuration, a missing data directory) writes nothing, so that fixing the
    configuration starts a fresh run rather than "resuming" an untrained one.

    Args:
        dirpath: folder of the checkpoint.
        filename: its name without ``.ckpt``.
    """

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                     exception: BaseException) -> None:
        if trainer.global_step > 0:
            super().on_exception(trainer, pl_module, exception)
