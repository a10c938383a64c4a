"""Pieces shared by the Lightning modules: model building, memory mode, optimizers."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from ..modes import MemoryMode, set_memory
from ..sequential import ReversibleSequential

__all__ = ["build_model", "reversible_stacks", "set_memory", "stored_twin", "configure_optim"]


def reversible_stacks(model: nn.Module) -> list[ReversibleSequential]:
    """The outermost :class:`ReversibleSequential` modules of ``model`` (not nested ones)."""
    stacks: list[ReversibleSequential] = []

    def visit(module: nn.Module) -> None:
        for child in module.children():
            if isinstance(child, ReversibleSequential):
                stacks.append(child)
            else:
                visit(child)

    if isinstance(model, ReversibleSequential):
        return [model]
    visit(model)
    return stacks


def stored_twin(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with every stack in ``"stored"`` mode (the baseline twin)."""
    return set_memory(copy.deepcopy(model), MemoryMode.STORED)


def build_model(name: str, memory: str, kwargs: dict[str, Any]) -> nn.Module:
    """``revtrain.models.create(name, **kwargs)``, then set the memory mode of its stacks."""
    from .. import models

    MemoryMode.parse(memory)  # a clear error before building a large model
    try:
        model = models.create(name, **kwargs)
    except TypeError as err:
        raise TypeError(f"model {name!r} does not take the arguments {sorted(kwargs)}: {err}; "
                        "fix model_kwargs in the config") from err
    return set_memory(model, memory)


def configure_optim(
    module: nn.Module,
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
