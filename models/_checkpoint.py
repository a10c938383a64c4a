"""``torch.utils.checkpoint`` of a non-invertible part, with BatchNorm updated once.

Used by the classifiers for the parts a reversible stack cannot rebuild (a RevNet's stem,
stride-2 transitions and head): in checkpoint mode such a part keeps only its input, which is
usually what the stack before it holds anyway, and runs its forward again in backward.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from functools import partial

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

__all__ = ["checkpoint_module"]


@contextmanager
def _batchnorm_unchanged(module: nn.Module) -> Iterator[None]:
    # the recomputation must save what the forward saved, so BatchNorm keeps using (and
    # passing) its running statistics with momentum 0, and the batch counter is put back
    changed = [(m, m.momentum, m.num_batches_tracked.clone()) for m in module.modules()
               if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training
               and m.track_running_stats and m.num_batches_tracked is not None]
    for m, _, _ in changed:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum, count in changed:
            m.momentum = momentum
            with torch.no_grad():
                m.num_batches_tracked.copy_(count)


def _contexts(module: nn.Module):
    return nullcontext(), _batchnorm_unchanged(module)


def checkpoint_module(module: nn.Module, x: Tensor) -> Tensor:
    """``module(x)`` keeping only ``x`` for backward (non-reentrant checkpoint).

    Random numbers (dropout) are replayed; BatchNorm running statistics and
    ``num_batches_tracked`` are updated once per step, as without checkpointing.
    """
    return checkpoint(module, x, use_reentrant=False, preserve_rng_state=True,
                      context_fn=partial(_contexts, module))
