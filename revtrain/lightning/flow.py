"""``FlowModule``: maximum-likelihood training of a registered flow generator."""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from pytorch_lightning.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torchmetrics import MeanMetric

from ..flows.dequant import UniformDequantization, VariationalDequantization, bits_per_dim
from ._common import StepsBySplit, build_model, configure_optim, eval_mode

__all__ = ["FlowModule"]


def _default_adam(params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=1e-3)


class FlowModule(StepsBySplit, pl.LightningModule):
    r"""Train a flow (``nice``, ``realnvp``, ``glow``) by maximum likelihood.

    A batch of images in :math:`[0, 1]` on a grid of ``num_bins`` values (the DataModule's
    ``normalize=False`` output, :math:`x = k / (K - 1)`) is turned back into integer levels
    :math:`k`, dequantized to :math:`y = (k + u) / K` with noise :math:`u \in [0, 1)^D` and
    scored:

    .. math::
        \text{NLL} = -\log p(y) + \log q(y \mid k) \text{ nats},\qquad
        \text{bits/dim} = \frac{\text{NLL}}{D \ln 2},

    an upper bound on the discrete model's code length (uniform noise:
    :math:`\log q = D \log K`). The loss is the mean bits/dim. Both are torchmetrics
    :class:`~torchmetrics.MeanMetric` s per split (``{split}/nll``, ``{split}/bpd``). Data off
    that grid (standardised images, another number of levels) is refused with an error.

    The network is :attr:`net`; :meth:`loss` is the scalar the module minimises. Sample grids
    are written by the :class:`~revtrain.lightning.SampleGrid` callback; unless the trainer has
    one, the module adds one from ``num_samples``, ``temperature``, ``sample_every_n_epochs``
    and ``sample_dir`` (Lightning's ``configure_callbacks``).

    Args:
        model_name: a flow in the registry: ``"nice"``, ``"realnvp"``, ``"glow"``.
        model_kwargs: its keyword arguments (``in_channels``, ``image_size``, ``levels`` ...).
        memory: memory mode of every reversible stack (``None``: the model's default,
            reversible). The mode that runs is saved in the hyper-parameters.
        num_bins: number of grey levels :math:`K` of the data (256 for 8-bit images, 17 for
            scikit-learn digits); default: the DataModule's ``num_bins``. Saved in the
            hyper-parameters, so a checkpoint scores with the levels it was trained on.
        dequantization: ``"uniform"`` noise, or ``"variational"``: a learned noise
            distribution (:class:`~revtrain.flows.VariationalDequantization`, trained jointly,
            which tightens the bound).
        dequantization_hidden: width of the variational dequantizer's network.
        temperature: temperature of :meth:`sample` and of the sample grids (Glow uses 0.7).
        num_samples: images per grid.
        sample_every_n_epochs: grid frequency (0: no grids).
        sample_dir: folder of the grids (default: ``samples/`` in the run folder).
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
        memory: Literal["reversible", "checkpoint", "stored"] | None = None,
        num_bins: int | None = None,
        dequantization: Literal["uniform", "variational"] = "uniform",
        dequantization_hidden: int = 32,
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
        if dequantization not in ("uniform", "variational"):
            raise ValueError(f"dequantization must be 'uniform' or 'variational', got "
                             f"{dequantization!r}")
        self.net = build_model(model_name, memory, dict(model_kwargs or {}))
        if not hasattr(self.net, "log_prob"):
            raise ValueError(f"model {model_name!r} has no log_prob(x); FlowModule trains flows "
                             "(nice, realnvp, glow). Use Classifier for classifiers")
        self.hparams.memory = self.net.memory.value  # what runs, not what was asked
        self.optimizer_factory = optimizer
        self.scheduler_factory = lr_scheduler
        self.dequantize: nn.Module | None = None
        if num_bins is not None:
            self._build_dequantizer(num_bins)
        for split in ("train", "val", "test"):
            setattr(self, f"{split}_nll", MeanMetric())
            setattr(self, f"{split}_bpd", MeanMetric())

    @property
    def flow(self) -> nn.Module:
        """Deprecated name of :attr:`net`."""
        warnings.warn("FlowModule.flow is now FlowModule.net", FutureWarning, stacklevel=2)
        return self.net

    @property
    def num_bins(self) -> int | None:
        """The number of grey levels :math:`K` the module scores with (``None`` until known)."""
        return self.hparams.num_bins

    def _sample_shape(self) -> tuple[int, ...]:
        return tuple(getattr(self.net, "input_shape", (self.net.num_dims,)))

    def _build_dequantizer(self, num_bins: int) -> None:
        self.hparams.num_bins = num_bins  # in the checkpoint: load_from_checkpoint keeps it
        if self.hparams.dequantization == "variational":
            self.dequantize = VariationalDequantization(num_bins, self._sample_shape(),
                                                        self.hparams.dequantization_hidden)
        else:
            self.dequantize = UniformDequantization(num_bins)

    def setup(self, stage: str) -> None:
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer else None
        data_bins = getattr(datamodule, "num_bins", None)
        if self.dequantize is None:
            self._build_dequantizer(data_bins or 256)
            self._refresh_weight_averages(stage)
        elif data_bins is not None and data_bins != self.num_bins:
            raise ValueError(
                f"the flow scores data with {self.num_bins} grey levels (num_bins) but "
                f"{type(datamodule).__name__} has {data_bins}; use data with {self.num_bins} "
                f"levels, or train a model with --model.num_bins {data_bins}"
            )
        if self.hparams.check_input and datamodule is not None:
            self.check_data(datamodule)

    def _refresh_weight_averages(self, stage: str) -> None:
        """Lightning sets up the callbacks before the module: a
        :class:`~pytorch_lightning.callbacks.WeightAveraging` (Polyak / EMA averaging) copied
        the module before the dequantizer built in :meth:`setup` existed. When that dequantizer
        has parameters or buffers, set the callback up again (nothing is averaged yet), so
        that its copy holds the same tensors in the same order as the module it swaps with."""
        from pytorch_lightning.callbacks import WeightAveraging

        trainer = self._trainer
        if trainer is None or not any(True for _ in self.dequantize.state_dict()):
            return
        for callback in trainer.callbacks:
            if isinstance(callback, WeightAveraging):
                callback.setup(trainer, self, stage)

    def configure_callbacks(self) -> list[pl.Callback]:
        from .callbacks import SampleGrid

        trainer = self._trainer
        if not self.hparams.sample_every_n_epochs or (
                trainer is not None and any(isinstance(c, SampleGrid) for c in trainer.callbacks)):
            return []
        return [SampleGrid(self.hparams.sample_every_n_epochs, self.hparams.num_samples,
                           self.hparams.temperature, self.hparams.sample_dir)]

    def forward(self, x: Tensor) -> Tensor:
        """Per-sample ``log p(x)`` (nats) of values ``x`` already in ``[0, 1]``."""
        return self.net.log_prob(x)

    def levels(self, x: Tensor) -> Tensor:
        """The integer levels :math:`k` of a batch ``x`` on the grid ``k / (K - 1)``.

        Raises:
            ValueError: when ``x`` is outside ``[0, 1]`` or off the grid of ``num_bins`` levels.
        """
        if self.dequantize is None:  # used outside a Trainer without `num_bins`
            self._build_dequantizer(256)
        top = self.num_bins - 1
        if x.numel():
            lo, hi = (float(v) for v in torch.aminmax(x.detach()))
            if lo < 0 or hi > 1:
                raise ValueError(
                    f"FlowModule: the data lies in [{lo:.3g}, {hi:.3g}], outside [0, 1]: a flow "
                    "scores the raw grey levels, not standardised images. Turn normalisation "
                    "off (--data.normalize false)"
                )
        k = torch.round(x * top)
        if x.numel() and float((k - x * top).abs().max()) > 1e-3:
            raise ValueError(
                f"FlowModule: the data is not on a grid of {self.num_bins} grey levels "
                f"(x = k / {top}); set --model.num_bins to the data's number of levels, and "
                "--data.normalize false"
            )
        return k

    def nll_and_bpd(self, x: Tensor, net: nn.Module | None = None) -> tuple[Tensor, Tensor]:
        """Per-sample NLL (nats) and bits/dim of a batch ``x`` in ``[0, 1]`` (grid values)."""
        k = self.levels(x)
        if isinstance(self.dequantize, VariationalDequantization):
            k = k.reshape(len(k), *self._sample_shape())
        y, log_q = self.dequantize(k)
        log_p = (net or self.net).log_prob(y.reshape(x.shape))
        return -(log_p - log_q), bits_per_dim(log_p - log_q, x[0].numel())

    def loss(self, batch: Any, net: nn.Module | None = None) -> Tensor:
        """Mean bits/dim of ``net`` (default :attr:`net`) on ``batch``."""
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self.nll_and_bpd(x, net)[1].mean()

    def _step(self, batch: Any, split: str) -> Tensor:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        nll, bpd = self.nll_and_bpd(x)
        loss = bpd.mean()
        nll_metric, bpd_metric = getattr(self, f"{split}_nll"), getattr(self, f"{split}_bpd")
        nll_metric(nll)
        bpd_metric(bpd)
        if split == "train":
            self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True,
                     batch_size=len(x))
        self.log(f"{split}/nll", nll_metric, on_step=False, on_epoch=True, batch_size=len(x))
        self.log(f"{split}/bpd", bpd_metric, on_step=False, on_epoch=True, prog_bar=True,
                 batch_size=len(x))
        self.log_tested(split, len(x))
        return loss

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        return self.nll_and_bpd(batch[0] if isinstance(batch, (tuple, list)) else batch)[1]

    def configure_optimizers(self) -> Any:
        return configure_optim(self.parameters(), self.optimizer_factory,
                               self.scheduler_factory, self.hparams.scheduler_interval,
                               _default_adam)

    @torch.no_grad()
    def sample(self, n: int | None = None, temperature: float | None = None) -> Tensor:
        """``n`` samples in ``[0, 1]`` at ``temperature`` (defaults from the arguments), in eval
        mode; shape ``(n, *input_shape)`` for image flows, ``(n, D)`` for vector flows."""
        n = n or self.hparams.num_samples
        t = self.hparams.temperature if temperature is None else temperature
        with eval_mode(self):
            return self.net.sample(n, temperature=t).clamp(0.0, 1.0)

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
        param = next(self.parameters())
        x = torch.full((2, *shape), 0.5, device=param.device)
        with eval_mode(self):
            try:
                self(x)
            except (RuntimeError, ValueError) as err:
                raise ValueError(f"flow {name!r} cannot take the {tuple(shape)} images of "
                                 f"{data}: {err}. Set model_kwargs (in_channels, image_size, "
                                 "levels / dim) to match the data") from err
