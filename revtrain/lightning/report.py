"""What ``revtrain fit`` does after training: test, and the memory table of the model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ._common import stored_twin

__all__ = ["RunReport", "memory_table", "write_memory_table"]


class RunReport:
    """Options of the report printed at the end of ``revtrain fit``.

    Args:
        test_after_fit: run ``trainer.test`` on the DataModule's test split with the final
            weights, in the same command.
        memory_table: measure one training step of the trained network and of its stored
            twin on the same training batch with :func:`revtrain.memory.measure_step`, print
            both and write them to the run folder (``memory.md``, ``memory.json``,
            ``memory.png``).
        batch_size: batch size of that measurement (default: the training batch size).
    """

    def __init__(self, test_after_fit: bool = False, memory_table: bool = False,
                 batch_size: int | None = None):
        self.test_after_fit = test_after_fit
        self.memory_table = memory_table
        self.batch_size = batch_size


class _LossProbe(nn.Module):
    """``forward(x)`` = the module's training loss of ``net`` on ``(x, y)``: one step to measure."""

    def __init__(self, module: nn.Module, net: nn.Module, y: Tensor | None):
        super().__init__()
        self.net = net
        self._module = [module]  # a plain list: the module's own parameters are not measured
        self.y = y

    def forward(self, x: Tensor) -> Tensor:
        return self._module[0].loss(x if self.y is None else (x, self.y), self.net)


def _first_batch(datamodule: Any, batch_size: int | None) -> tuple[Tensor, Tensor | None]:
    batch = next(iter(datamodule.train_dataloader()))
    x, y = (batch[0], batch[1]) if isinstance(batch, (tuple, list)) else (batch, None)
    if batch_size is not None:
        x = x[:batch_size]
        y = None if y is None else y[:batch_size]
    return x, y


def memory_table(module: nn.Module, datamodule: Any, batch_size: int | None = None,
                 ) -> tuple[str, list[dict[str, Any]]]:
    """Measure ``module.net`` and its stored twin on one training batch; return (Markdown, rows).

    ``module`` is a LightningModule with a network ``net`` and a ``loss(batch, net)`` hook
    (:class:`~revtrain.lightning.Classifier`, :class:`~revtrain.lightning.FlowModule`). One
    training step of that loss is measured with :func:`revtrain.memory.measure_step` for the
    network as trained and for its stored twin, in training mode, on the same batch: ``peak``
    is the peak during forward + backward minus what was held before (it includes the
    parameter gradients), ``held`` what is kept between forward and backward.

    Raises:
        TypeError: when ``module`` has no ``net`` or no ``loss(batch, net)``.
    """
    from ..memory import format_bytes, measure_step

    net = getattr(module, "net", None)
    if not isinstance(net, nn.Module) or not callable(getattr(module, "loss", None)):
        raise TypeError(f"memory table: {type(module).__name__} needs a network attribute `net` "
                        "and a `loss(batch, net)` method, as Classifier and FlowModule have")
    x, y = _first_batch(datamodule, batch_size)
    device = next(net.parameters()).device
    x, y = x.to(device), None if y is None else y.to(device)
    rows = []
    was_training = net.training
    try:
        for label, model in (("as trained", net), ("stored twin", stored_twin(net))):
            model.train()
            mode = getattr(model, "memory", None)
            report = measure_step(_LossProbe(module, model, y), x, loss_fn=lambda loss: loss)
            rows.append({"model": label, "memory": mode.value if mode is not None else "?",
                         **report})
    finally:
        net.train(was_training)
    ref = rows[1]["held_bytes"] or 1
    for r in rows:
        r["held_vs_stored"] = r["held_bytes"] / ref
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
                     f"{r['held_vs_stored']:.2f}x |")
    return "\n".join(lines), rows


def write_memory_table(text: str, rows: list[dict[str, Any]], folder: str | Path,
                       meta: dict[str, Any] | None = None) -> list[Path]:
    """Write the table to ``folder``: ``memory.md``, ``memory.json`` (rows and ``meta``) and,
    when matplotlib is installed, ``memory.png`` (held and peak per row, in MiB)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = [folder / "memory.md", folder / "memory.json"]
    written[0].write_text(text + "\n")
    payload = {"torch": torch.__version__, **(meta or {}), "rows": rows}
    written[1].write_text(json.dumps(payload, indent=1) + "\n")
    try:
        from matplotlib.figure import Figure  # no pyplot: no global backend state
    except ImportError:  # optional: pip install matplotlib (in the dev extra)
        return written
    labels = [f"{r['model']}\n({r['memory']})" for r in rows]
    series = {"held fwd->bwd": [r["held_bytes"] / 2**20 for r in rows],
              "peak - grads": [(r["peak_bytes"] - r["grad_bytes"]) / 2**20 for r in rows]}
    fig = Figure(figsize=(5, 3.2))
    ax = fig.subplots()
    width = 0.38
    for i, (name, values) in enumerate(series.items()):
        ax.bar([j + (i - 0.5) * width for j in range(len(rows))], values, width, label=name)
    ax.set_xticks(range(len(rows)), labels)
    ax.set_ylabel("MiB")
    ax.set_title("activation memory of one training step", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(folder / "memory.png", dpi=120)
    return [*written, folder / "memory.png"]
