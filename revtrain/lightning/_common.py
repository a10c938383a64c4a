"""Pieces shared by the Lightning modules: model building, stacks, optimizers."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .._utils import eval_mode
from ..modes import MemoryMode
from ..sequential import ReversibleSequential
from ..testing import stored_twin

__all__ = ["StepsBySplit", "build_model", "configure_optim", "eval_mode", "fully_shard_reversible",
           "reversible_stacks", "is_sharded", "stored_twin", "unsharded"]


def reversible_stacks(model: nn.Module) -> list[ReversibleSequential]:
    """The outermost :class:`ReversibleSequential` modules of ``model`` (not nested ones)."""
    if isinstance(model, ReversibleSequential):
        return [model]
    stacks: list[ReversibleSequential] = []
    for child in model.children():
        stacks += reversible_stacks(child)
    return stacks


def fully_shard_reversible(model: nn.Module, mesh: Any, per: str) -> nn.Module:
    """FSDP2 ``fully_shard`` on ``model`` over ``mesh``: first every layer (``per="coupling"``)
    or every outermost stack (``per="stack"``) of :func:`reversible_stacks`, then ``model``
    itself (the stem, transitions and head). Returns ``model``; a sharded one is left as it is."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    if per not in ("coupling", "stack"):
        raise ValueError(f"shard must be 'coupling', 'stack' or None, got {per!r}")
    if isinstance(model, FSDPModule):
        return model
    stacks = reversible_stacks(model)
    for unit in [layer for s in stacks for layer in s] if per == "coupling" else stacks:
        fully_shard(unit, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def is_sharded(module: nn.Module) -> bool:
    """Whether FSDP2 (``fully_shard``) or FSDP1 (``FullyShardedDataParallel``) shards ``module``
    or a module inside it."""
    try:
        from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
    except ImportError:  # torch.distributed not built
        return False
    return any(isinstance(m, (FSDPModule, FullyShardedDataParallel)) for m in module.modules())


@contextmanager
def unsharded(module: nn.Module) -> Iterator[nn.Module]:
    """Gather the FSDP2 parameters of ``module`` and of the sharded modules inside it for calls
    that are not its forward (``inverse``), resharding afterwards; a collective (every rank
    enters it). Does nothing for a module that FSDP2 does not shard."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch.distributed not built
        yield module
        return
    sharded = [m for m in module.modules() if isinstance(m, FSDPModule)]
    for m in sharded:
        m.unshard()
    try:
        yield module
    finally:
        for m in sharded:
            m.reshard()


def build_model(name: str, memory: MemoryMode | str | None, kwargs: dict[str, Any]) -> nn.Module:
    """``revtrain.models.create(name, memory=memory, **kwargs)``; ``memory=None`` keeps the
    model's own default (reversible, or stored for a model without a reversible part)."""
    from .. import models

    if memory is not None:
        if "memory" in kwargs and MemoryMode.parse(kwargs["memory"]) is not MemoryMode.parse(memory):
            raise ValueError(f"memory={memory!r} and model_kwargs memory={kwargs['memory']!r} "
                             "disagree; give the memory mode once, as memory")
        kwargs = {**kwargs, "memory": MemoryMode.parse(memory)}
    return models.create(name, **kwargs)


def configure_optim(
    params: Iterable[torch.nn.Parameter],
    optimizer: Callable | None,
    lr_scheduler: Callable | None,
    interval: str,
    default: Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer],
) -> Any:
    """What ``configure_optimizers`` returns, from the factories a config provides."""
    opt = optimizer(params) if optimizer is not None else default(params)
    if lr_scheduler is None:
        return opt
    if interval not in ("step", "epoch"):
        raise ValueError(f"scheduler_interval must be 'step' or 'epoch', got {interval!r}")
    sched = lr_scheduler(opt)
    config = {"scheduler": sched, "interval": interval}
    if isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
        config["monitor"] = "val/loss"
    return {"optimizer": opt, "lr_scheduler": config}


class StepsBySplit:
    """``training_step`` / ``validation_step`` / ``test_step`` as ``self._step(batch, split)``
    for a LightningModule, and the count of tested images (``test/images``)."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "test")

    def log_tested(self, split: str, n: int) -> None:
        """Count the images scored in test (with ``limit_test_batches``, over every rank)."""
        if split == "test":
            self.log("test/images", float(n), reduce_fx="sum", sync_dist=True, on_step=False,
                     on_epoch=True, batch_size=n)
