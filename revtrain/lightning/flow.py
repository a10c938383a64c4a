"""``FlowModule``: maximum-likelihood training of a registered flow generator."""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from pytorch_lightning.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torchmetrics import MeanMetric

from ..flows.dequant import UniformDequantization, bits_per_dim
from ._common import build_model, configure_optim

__all__ = ["FlowModule"]


def _default_adam(params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=1e-3)


class FlowModule(pl.LightningModule):
    r"""Train a flow (``nice``, ``realnvp``, ``glow``) by maximum likelihood.

    A batch of images in :math:`[0, 1]` on a grid of ``num_bins`` values (the DataModule's
    ``normalize=False`` output, :math:`x = k / (K - 1)`) is turned back into integer levels
    :math:`k`, dequantized to :math:`y = (k + u) / K`, :math:`u \sim U[0, 1)^D`, and scored:

    .. math::
        \text{NLL} = -\log p(y) + D \log K \text{ nats},\qquad
        \text{bits/dim} = \frac{\text{NLL}}{D \ln 2},

    an upper bound on the discrete model's code length. The loss is the mean bits/dim. Both
    are torchmetrics :class:`~torchmetrics.MeanMetric` s per split (``{split}/nll``,
    ``{split}/bpd``). After validation, every ``sample_every_n_epochs`` epochs, a grid of
    ``num_samples`` samples at ``temperature`` is written with torchvision's
    ``make_grid`` / ``save_image`` to ``sample_dir`` (default: ``<log_dir>/samples``).

    Args:
        model_name: a flow in the registry: ``"nice"``, ``"realnvp"``, ``"glow"``.
        model_kwargs: its keyword arguments (``in_channels``, ``image_size``, ``levels`` ...).
        memory: memory mode of every reversible stack.
        num_bins: number of grey levels :math:`K` of the data (256 for 8-bit images, 17 for
            scikit-learn digits); default: the DataModule's ``num_bins``.
        temperature: temperature of the sample grids (Glow uses 0.7).
        num_samples: images per grid.
        sample_every_n_epochs: grid frequency (0: never).
        sample_dir: folder of the grids.
        optimizer: optimizer factory; default Adam, lr 1e-3.
        lr_scheduler: scheduler factory or ``None``.
        scheduler_interval: ``"step"`` or ``"epoch"``.
        check_input: score a batch of the DataModule's ``input_shape`` once before training
            and fail with a clear message if the flow cannot take it.
    """

    def __init__(
        self,
        model_name: str = "realnvp",
        model_kwargs: dict[str, Any] | None = None,
        memory: Literal["reversible", "checkpoint", "stored"] = "reversible",
        num_bins: int | None = None,
        temperature: float = 0.7,
        num_samples: int = 64,
        sample_every_n_epochs: int = 1,
        sample_dir: str | None = None,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        scheduler_interval: Literal["step", "epoch"] = "epoch",
        check_input: bool = True,
    ):
        super().__init__()
        # the factories stay out: a checkpoint must load with torch.load(weights_only=True)
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        kwargs = dict(model_kwargs or {})
        kwargs.setdefault("memory", memory)
        self.flow = build_model(model_name, memory, kwargs)
        if not hasattr(self.flow, "log_prob"):
            raise ValueError(f"model {model_name!r} has no log_prob(x); FlowModule trains flows "
                             "(nice, realnvp, glow). Use Classifier for classifiers")
        self.optimizer_factory = optimizer
        self.scheduler_factory = lr_scheduler
        self.num_bins = num_bins
        self.dequantize: UniformDequantization | None = (
            UniformDequantization(num_bins) if num_bins is not None else None)
        self._image_shape: tuple[int, ...] | None = None
        for split in ("train", "val", "test"):
            setattr(self, f"{split}_nll", MeanMetric())
            setattr(self, f"{split}_bpd", MeanMetric())

    def setup(self, stage: str) -> None:
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer else None
        if self.dequantize is None:
            num_bins = getattr(datamodule, "num_bins", 256)
            self.num_bins, self.dequantize = num_bins, UniformDequantization(num_bins)
        self._image_shape = getattr(datamodule, "input_shape", None)
        if self.hparams.check_input and datamodule is not None:
            self.check_data(datamodule)

    def _dequantizer(self) -> UniformDequantization:
        if self.dequantize is None:  # used outside a Trainer without `num_bins`
            self.num_bins, self.dequantize = 256, UniformDequantization(256)
        return self.dequantize

    def _is_vector_flow(self) -> bool:
        from ..models.flows import VectorFlow

        return isinstance(self.flow, VectorFlow)

    def forward(self, x: Tensor) -> Tensor:
        """Per-sample ``log p(y)`` (nats) of images ``x`` already in ``[0, 1]``."""
        return self.flow.log_prob(x.flatten(1) if self._is_vector_flow() else x)

    def nll_and_bpd(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Per-sample NLL (nats) and bits/dim of a batch ``x`` in ``[0, 1]`` (grid values)."""
        deq = self._dequantizer()
        k = torch.round(x * (deq.levels - 1)).clamp_(0, deq.levels - 1)  # integer levels
        y, log_q = deq(k)
        log_p = self.flow.log_prob(y.flatten(1) if self._is_vector_flow() else y)
        num_dims = x[0].numel()
        nll = -(log_p - log_q)
        return nll, bits_per_dim(log_p - log_q, num_dims)

    def _step(self, batch: Any, split: str) -> Tensor:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        nll, bpd = self.nll_and_bpd(x)
        loss = bpd.mean()
        nll_metric, bpd_metric = getattr(self, f"{split}_nll"), getattr(self, f"{split}_bpd")
        nll_metric(nll)
        bpd_metric(bpd)
        on_step = split == "train"
        if on_step:
            self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True,
                     batch_size=len(x))
        self.log(f"{split}/nll", nll_metric, on_step=False, on_epoch=True, batch_size=len(x))
        self.log(f"{split}/bpd", bpd_metric, on_step=False, on_epoch=True, prog_bar=True,
                 batch_size=len(x))
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._step(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self.nll_and_bpd(batch[0] if isinstance(batch, (tuple, list)) else batch)[1]

    def configure_optimizers(self) -> Any:
        return configure_optim(self, self.parameters(), self.optimizer_factory,
                               self.scheduler_factory, self.hparams.scheduler_interval,
                               _default_adam)

    @torch.no_grad()
    def sample(self, n: int | None = None, temperature: float | None = None) -> Tensor:
        """``n`` samples in ``[0, 1]`` at ``temperature`` (defaults from the arguments)."""
        n = n or self.hparams.num_samples
        t = self.hparams.temperature if temperature is None else temperature
        return self.flow.sample(n, temperature=t).clamp(0.0, 1.0)

    def save_samples(self, path: str | Path, n: int | None = None,
                     temperature: float | None = None) -> Path | None:
        """Write a grid of samples to ``path`` (PNG); ``None`` for non-image flows."""
        from torchvision.utils import make_grid, save_image

        was_training = self.training
        self.eval()
        try:
            x = self.sample(n, temperature)
        finally:
            self.train(was_training)
        if x.dim() == 2 and self._image_shape is not None:
            x = x.reshape(len(x), *self._image_shape)  # vector flow on images
        if x.dim() != 4:
            return None
        grid = make_grid(x.float().cpu(), nrow=max(1, int(math.sqrt(len(x)))), padding=1)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_image(grid, path)
        return path

    def on_validation_epoch_end(self) -> None:
        every = self.hparams.sample_every_n_epochs
        trainer = self.trainer
        if not every or trainer.sanity_checking or not trainer.is_global_zero:
            return
        if (trainer.current_epoch + 1) % every:
            return
        folder = Path(self.hparams.sample_dir or Path(trainer.log_dir or ".") / "samples")
        t = self.hparams.temperature
        self.save_samples(folder / f"epoch{trainer.current_epoch:04d}_t{t:g}.png")

    @torch.no_grad()
    def check_data(self, datamodule: Any) -> None:
        """Fail early when the flow cannot score the DataModule's images.

        Raises:
            ValueError: naming the flow, the DataModule and the shape.
        """
        shape = getattr(datamodule, "input_shape", None)
        if shape is None:
            return
        name, data = self.hparams.model_name, type(datamodule).__name__
        was_training = self.training
        self.eval()
        try:
            param = next(self.parameters())
            x = torch.full((2, *shape), 0.5, device=param.device)
            if getattr(self.flow, "num_dims", None) not in (None, x[0].numel()):
                raise ValueError(f"the flow has {self.flow.num_dims} dimensions, an image "
                                 f"{x[0].numel()}")
            self(x)
        except (RuntimeError, ValueError) as err:
            raise ValueError(f"flow {name!r} cannot take the {tuple(shape)} images of {data}: "
                             f"{err}. Set model_kwargs (in_channels, image_size, levels / dim) "
                             "to match the data") from err
        finally:
            self.train(was_training)
