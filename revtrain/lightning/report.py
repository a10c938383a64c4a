"""What ``revtrain fit`` does after training: test, and the memory table of the model."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._common import reversible_stacks, stored_twin

__all__ = ["RunReport", "memory_table"]


class RunReport:
    """Options of the report printed at the end of ``revtrain fit``.

    Args:
        test_after_fit: run ``trainer.test`` on the DataModule's test split with the final
            weights, in the same command.
        memory_table: measure one training step of the trained network and of its stored
            twin on the same training batch with :func:`revtrain.memory.measure_step`, and
            print both.
        batch_size: batch size of that measurement (default: the training batch size).
    """

    def __init__(self, test_after_fit: bool = False, memory_table: bool = False,
                 batch_size: int | None = None):
        self.test_after_fit = test_after_fit
        self.memory_table = memory_table
        self.batch_size = batch_size


def _first_batch(datamodule: Any, batch_size: int | None) -> tuple[Tensor, Tensor | None]:
    batch = next(iter(datamodule.train_dataloader()))
    x, y = (batch[0], batch[1]) if isinstance(batch, (tuple, list)) else (batch, None)
    if batch_size is not None:
        x = x[:batch_size]
        y = None if y is None else y[:batch_size]
    return x, y


class _LogProb(nn.Module):
    """``forward(x) = flow.log_prob(x)``, so that a flow's NLL step can be measured."""

    def __init__(self, flow: nn.Module):
        super().__init__()
        self.flow = flow

    def forward(self, x: Tensor) -> Tensor:
        return self.flow.log_prob(x.flatten(1) if _is_vector_flow(self.flow) else x)


def _is_vector_flow(flow: nn.Module) -> bool:
    from ..models.flows import VectorFlow

    return isinstance(flow, VectorFlow)


def memory_table(net: nn.Module, datamodule: Any, batch_size: int | None = None,
                 loss: str = "cross_entropy") -> tuple[str, list[dict[str, Any]]]:
    """Measure ``net`` and its stored twin on one training batch; return (Markdown, rows).

    Both are measured in training mode with :func:`revtrain.memory.measure_step` on the same
    batch (``loss``: ``"cross_entropy"`` for classifiers, ``"nll"`` for flows, where the batch
    in ``[0, 1]`` is scored as it is): ``peak`` is the peak during forward + backward minus
    what was held before (it includes the parameter gradients), ``held`` what is kept between
    forward and backward.
    """
    from ..memory import format_bytes, measure_step

    x, y = _first_batch(datamodule, batch_size)
    device = next(net.parameters()).device
    x = x.to(device)

    wrap = _LogProb if loss == "nll" else (lambda m: m)
    if loss == "cross_entropy" and y is not None:
        y = y.to(device)

        def loss_fn(out: Any) -> Tensor:
            out = out[0] if isinstance(out, (tuple, list)) else out
            return F.cross_entropy(out, y)
    elif loss == "nll":
        def loss_fn(log_p: Tensor) -> Tensor:
            return -log_p.mean()
    else:
        loss_fn = None

    rows = []
    was_training = net.training
    try:
        for mode, model in (("as trained", net), ("stored twin", stored_twin(net))):
            model.train()
            memory = {s.memory.value for s in reversible_stacks(model)} or {"(no stacks)"}
            report = measure_step(wrap(model), x, loss_fn=loss_fn)
            rows.append({"model": mode, "memory": "/".join(sorted(memory)), **report})
    finally:
        net.train(was_training)
    ref = rows[1]["held_bytes"] or 1
    lines = [
        f"Memory of one training step, batch {tuple(x.shape)}, {rows[0]['method']} on "
        f"{rows[0]['device']}, torch {torch.__version__}:",
        "",
        "| model | memory mode | held fwd->bwd | peak of step (with grads) | peak - grads "
        "| held vs stored |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['model']} | {r['memory']} | {format_bytes(r['held_bytes'])} | "
                     f"{format_bytes(r['peak_bytes'])} | "
                     f"{format_bytes(r['peak_bytes'] - r['grad_bytes'])} | "
                     f"{r['held_bytes'] / ref:.2f}x |")
    return "\n".join(lines), rows
