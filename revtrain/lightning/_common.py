"""Pieces shared by the Lightning modules: model building, stacks, optimizers."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from .._utils import eval_mode
from ..modes import MemoryMode
from ..sequential import ReversibleSequential
from ..testing import stored_twin

__all__ = ["StepsBySplit", "build_model", "configure_optim", "eval_mode", "reversible_stacks",
           "stored_twin"]


def reversible_stacks(model: nn.Module) -> list[ReversibleSequential]:
    """The outermost :class:`ReversibleSequential` modules of ``model`` (not nested ones)."""
    if isinstance(model, ReversibleSequential):
        return [model]
    stacks: list[ReversibleSequential] = []
    for child in model.children():
        stacks += reversible_stacks(child)
    return stacks


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
