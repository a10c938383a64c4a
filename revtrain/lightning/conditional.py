r"""Lightning parts for conditional flows: the module, the inverse-kinematics data, a memory report.

* :class:`ConditionalFlowModule` trains a conditional flow of ``revtrain.models`` (``cinn``,
  ``cond_realnvp``, ``cond_glow`` ...) by maximum likelihood on batches ``(x, condition)``:
  class labels for images (any image DataModule of :mod:`revtrain.lightning.data` with
  ``normalize=False``), observations for vectors (:class:`InverseKinematicsDataModule`).
* :class:`InverseKinematics` is the arm of Kruse et al. 2021 (prior, forward process, ground-truth
  posterior by rejection sampling); :class:`InverseKinematicsDataModule` serves pairs ``(x, y)``.
* :class:`ConditionalMemoryReport` prints, at the end of ``fit``, the memory of one training step
  of the trained flow and of its stored twin, conditions included.

Example::

    revtrain fit --config configs/digits_cond_realnvp.yaml
    revtrain fit --config configs/ik_cinn.yaml
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from pytorch_lightning.cli import LRSchedulerCallable, OptimizerCallable
from pytorch_lightning.utilities import rank_zero_only
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics import MeanMetric

from ..flows.dequant import UniformDequantization, bits_per_dim
from ._common import build_model, configure_optim, reversible_stacks, stored_twin

__all__ = ["ConditionalFlowModule", "InverseKinematics", "InverseKinematicsDataModule",
           "ConditionalMemoryReport", "posterior_samples"]


def _default_adam(params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=1e-3)


def _split_batch(batch: Any) -> tuple[Tensor, Tensor]:
    if not (isinstance(batch, (tuple, list)) and len(batch) >= 2):
        raise ValueError("ConditionalFlowModule: batches must be (x, condition) pairs (images and labels, "
                         f"or vectors and observations), got {type(batch).__name__}")
    return batch[0], batch[1]


class ConditionalFlowModule(pl.LightningModule):
    r"""Train a conditional flow by maximum likelihood on ``(x, condition)`` batches.

    * Images (``x`` of shape ``(B, C, H, W)`` in ``[0, 1]`` on a grid of ``num_bins`` levels,
      conditions = labels): dequantized as in :class:`~revtrain.lightning.FlowModule`; the loss is
      the mean bits/dim :math:`-(\log p(y \mid c) - \log q(y \mid x)) / (D \ln 2)`. Every
      ``sample_every_n_epochs`` epochs and at the end of ``fit`` a grid with **one row per class**
      (``samples_per_class`` samples of label ``k`` in row ``k``, torchvision's ``make_grid``) is
      written to ``sample_dir`` (default ``<log_dir>/samples``).
    * Vectors (``x`` ``(B, D)``, conditions = observations ``(B, M)``): the loss is the mean NLL
      :math:`-\log p(x \mid y)` in nats.

    Logged per split: ``{split}/nll`` (nats) and, for images, ``{split}/bpd``.

    Args:
        model_name: a conditional flow of the registry (``cinn``, ``cinn_ik``, ``cond_realnvp``,
            ``cond_realnvp_digits``, ``cond_glow``, ``cond_glow_digits``).
        model_kwargs: its keyword arguments.
        memory: memory mode of every reversible stack.
        num_bins: grey levels of image data (default: the DataModule's ``num_bins``).
        temperature: temperature of the sample grids.
        samples_per_class: columns of the grid.
        sample_every_n_epochs: grid frequency (0: only at the end of ``fit``).
        sample_dir: folder of the grids.
        optimizer, lr_scheduler, scheduler_interval: as in the other modules.
    """

    def __init__(
        self,
        model_name: str = "cond_realnvp_digits",
        model_kwargs: dict[str, Any] | None = None,
        memory: Literal["reversible", "checkpoint", "stored"] = "reversible",
        num_bins: int | None = None,
        temperature: float = 0.7,
        samples_per_class: int = 10,
        sample_every_n_epochs: int = 0,
        sample_dir: str | None = None,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        scheduler_interval: Literal["step", "epoch"] = "epoch",
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        kwargs = dict(model_kwargs or {})
        kwargs.setdefault("memory", memory)
        self.flow = build_model(model_name, memory, kwargs)
        if not (hasattr(self.flow, "log_prob") and hasattr(self.flow, "conditioner")):
            raise ValueError(f"model {model_name!r} is not a conditional flow (log_prob(x, context=...)); "
                             "ConditionalFlowModule trains cinn, cond_realnvp, cond_glow. Use FlowModule "
                             "for unconditional flows")
        self.optimizer_factory = optimizer
        self.scheduler_factory = lr_scheduler
        self.num_bins = num_bins
        self.dequantize = UniformDequantization(num_bins) if num_bins is not None else None
        self.last_grid: Path | None = None
        for split in ("train", "val", "test"):
            setattr(self, f"{split}_nll", MeanMetric())
            setattr(self, f"{split}_bpd", MeanMetric())

    @property
    def is_image_flow(self) -> bool:
        return hasattr(self.flow, "input_shape") and len(self.flow.input_shape) == 3

    @property
    def num_classes(self) -> int | None:
        return getattr(self.flow.conditioner, "num_classes", None)

    def setup(self, stage: str) -> None:
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer else None
        if self.is_image_flow and self.dequantize is None:
            num_bins = getattr(datamodule, "num_bins", 256)
            self.num_bins, self.dequantize = num_bins, UniformDequantization(num_bins)
        if datamodule is not None:
            self.check_data(datamodule)

    @torch.no_grad()
    def check_data(self, datamodule: Any) -> None:
        """Fail before training when the flow cannot take the DataModule's samples or conditions.

        Raises:
            ValueError: naming the model, the DataModule and the shapes or class counts.
        """
        name, data = self.hparams.model_name, type(datamodule).__name__
        shape = getattr(datamodule, "input_shape", None)
        expected = getattr(self.flow, "input_shape", None) or (self.flow.num_dims,)
        if shape is not None and tuple(shape) != tuple(expected):
            raise ValueError(f"model {name!r} takes samples of shape {tuple(expected)} but {data} gives "
                             f"{tuple(shape)}; set model_kwargs to match the data")
        classes = getattr(datamodule, "num_classes", None)
        if self.num_classes is not None and classes is not None and classes != self.num_classes:
            raise ValueError(f"model {name!r} is conditioned on {self.num_classes} classes but {data} has "
                             f"{classes}; set model_kwargs.num_classes to {classes}")
        condition = getattr(datamodule, "condition_shape", None)
        cond_dim = getattr(self.flow.conditioner, "cond_dim", None)
        if condition is not None and cond_dim is not None and tuple(condition) != (cond_dim,):
            raise ValueError(f"model {name!r} takes observations of shape ({cond_dim},) but {data} gives "
                             f"{tuple(condition)}; set model_kwargs.cond_dim to match the data")

    def forward(self, x: Tensor, condition: Tensor) -> Tensor:
        """Per-sample ``log p(x | condition)`` (nats); images already in ``[0, 1]``."""
        return self.flow.log_prob(x, context=condition)

    def nll(self, x: Tensor, condition: Tensor) -> tuple[Tensor, Tensor | None]:
        """Per-sample NLL (nats) and, for images, bits/dim (dequantized, an upper bound)."""
        if not self.is_image_flow:
            return -self.flow.log_prob(x, context=condition), None
        if self.dequantize is None:  # used outside a Trainer without num_bins
            self.num_bins, self.dequantize = 256, UniformDequantization(256)
        levels = self.dequantize.levels
        k = torch.round(x * (levels - 1)).clamp_(0, levels - 1)  # integer levels
        y, log_q = self.dequantize(k)
        log_p = self.flow.log_prob(y, context=condition)
        return -(log_p - log_q), bits_per_dim(log_p - log_q, x[0].numel())

    def _step(self, batch: Any, split: str) -> Tensor:
        x, condition = _split_batch(batch)
        nll, bpd = self.nll(x, condition)
        loss = nll.mean() if bpd is None else bpd.mean()
        getattr(self, f"{split}_nll")(nll)
        n = len(x)
        if split == "train":
            self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True, batch_size=n)
        self.log(f"{split}/nll", getattr(self, f"{split}_nll"), on_step=False, on_epoch=True,
                 prog_bar=bpd is None, batch_size=n)
        if bpd is not None:
            getattr(self, f"{split}_bpd")(bpd)
            self.log(f"{split}/bpd", getattr(self, f"{split}_bpd"), on_step=False, on_epoch=True,
                     prog_bar=True, batch_size=n)
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._step(batch, "test")

    def configure_optimizers(self) -> Any:
        return configure_optim(self.parameters(), self.optimizer_factory, self.scheduler_factory,
                               self.hparams.scheduler_interval, _default_adam)

    @torch.no_grad()
    def sample(self, n: int, condition, temperature: float | None = None) -> Tensor:
        """``n`` samples given one condition or ``n`` of them (images clamped to ``[0, 1]``)."""
        t = self.hparams.temperature if temperature is None else temperature
        was_training = self.training
        self.eval()
        try:
            x = self.flow.sample(n, context=condition, temperature=t)
        finally:
            self.train(was_training)
        return x.clamp(0.0, 1.0) if self.is_image_flow else x

    def class_grid(self, samples_per_class: int | None = None, temperature: float | None = None) -> Tensor:
        """A grid image ``(3, H', W')`` with row ``k`` holding samples of class ``k``."""
        from torchvision.utils import make_grid

        if self.num_classes is None or not self.is_image_flow:
            raise ValueError("ConditionalFlowModule.class_grid: needs a class-conditional image flow")
        per = samples_per_class or self.hparams.samples_per_class
        device = next(self.parameters()).device
        labels = torch.arange(self.num_classes, device=device).repeat_interleave(per)  # row-major
        x = self.sample(len(labels), labels, temperature)
        return make_grid(x.float().cpu(), nrow=per, padding=1)

    def save_class_grid(self, path: str | Path, samples_per_class: int | None = None,
                        temperature: float | None = None) -> Path | None:
        """Write :meth:`class_grid` to ``path`` (PNG); ``None`` for flows that are not image flows."""
        from torchvision.utils import save_image

        if self.num_classes is None or not self.is_image_flow:
            return None
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_image(self.class_grid(samples_per_class, temperature), path)
        self.last_grid = path
        return path

    def _grid_folder(self) -> Path:
        trainer = self.trainer
        return Path(self.hparams.sample_dir or Path(trainer.log_dir or ".") / "samples")

    def on_validation_epoch_end(self) -> None:
        every = self.hparams.sample_every_n_epochs
        trainer = self.trainer
        if not every or trainer.sanity_checking or not trainer.is_global_zero:
            return
        if (trainer.current_epoch + 1) % every == 0:
            t = self.hparams.temperature
            self.save_class_grid(self._grid_folder() / f"epoch{trainer.current_epoch:04d}_t{t:g}.png")

    def on_fit_end(self) -> None:
        if self.trainer.is_global_zero:
            path = self.save_class_grid(self._grid_folder() / f"final_t{self.hparams.temperature:g}.png")
            if path is not None:
                print(f"\nSamples, one row per class (0..{self.num_classes - 1}): {path}", flush=True)


# --------------------------------------------------------------------------- inverse kinematics


class InverseKinematics:
    r"""The planar arm of Kruse et al. 2021: 4-D configuration :math:`x`, 2-D end point :math:`y`.

    :math:`x_1` is the height of the arm's base on a vertical rail, :math:`x_2, x_3, x_4` the
    joint angles; segments of lengths ``lengths = (0.5, 0.5, 1.0)``; prior
    :math:`x \sim \mathcal N(0, \mathrm{diag}(\sigma^2))`, :math:`\sigma = (1/4, 1/2, 1/2, 1/2)`.

    .. math::
        y = \Bigl(\sum_i l_i \cos \theta_i,\; x_1 + \sum_i l_i \sin \theta_i\Bigr),
        \qquad \theta_1 = x_2,\ \theta_2 = x_2 + x_3,\ \theta_3 = x_2 + x_3 + x_4.

    The ground-truth posterior :math:`p(x \mid y^*)` for the observation model
    :math:`y \mid x \sim \mathcal N(f(x), \epsilon^2 I)` is sampled exactly by rejection from
    the prior: accept :math:`x` with probability
    :math:`\exp(-\lVert f(x) - y^*\rVert^2 / 2\epsilon^2)`.
    """

    def __init__(self, lengths: tuple[float, ...] = (0.5, 0.5, 1.0),
                 sigmas: tuple[float, ...] = (0.25, 0.5, 0.5, 0.5)):
        if len(sigmas) != len(lengths) + 1:
            raise ValueError("InverseKinematics: needs one prior sigma for the rail and one per segment")
        self.lengths = tuple(float(v) for v in lengths)
        self.sigmas = tuple(float(v) for v in sigmas)
        self.dim_x, self.dim_y = len(self.sigmas), 2

    def sample_prior(self, n: int, generator: torch.Generator | None = None,
                     dtype: torch.dtype = torch.float32) -> Tensor:
        """``n`` configurations from the prior, ``(n, 4)``."""
        sigma = torch.tensor(self.sigmas, dtype=dtype)
        return torch.randn(n, self.dim_x, generator=generator, dtype=dtype) * sigma

    def forward(self, x: Tensor) -> Tensor:
        """End points ``(n, 2)`` (horizontal, vertical) of configurations ``(n, 4)``."""
        if x.dim() != 2 or x.shape[1] != self.dim_x:
            raise ValueError(f"InverseKinematics.forward: expects configurations (n, {self.dim_x}), got "
                             f"shape {tuple(x.shape)}")
        angles = x[:, 1:].cumsum(dim=1)  # (n, 3)
        lengths = torch.tensor(self.lengths, dtype=x.dtype, device=x.device)
        horizontal = (lengths * torch.cos(angles)).sum(1)
        vertical = x[:, 0] + (lengths * torch.sin(angles)).sum(1)
        return torch.stack([horizontal, vertical], dim=1)

    def posterior(self, y_star: Tensor, n: int, epsilon: float = 0.01,
                  generator: torch.Generator | None = None, chunk: int = 1_000_000,
                  max_proposals: int = 200_000_000, marginal: bool = True) -> Tensor:
        r"""``n`` ground-truth samples of :math:`p(x \mid y^*)` by rejection from the prior.

        ``marginal=False``: propose :math:`x` from the prior, accept with probability
        :math:`\exp(-\lVert f(x) - y^*\rVert^2 / 2\epsilon^2)`. ``marginal=True`` (default, the
        same posterior, many times fewer proposals): the rail height enters the end point
        additively, so it is integrated out exactly. Propose the angles from the prior, accept with
        probability :math:`\exp(-(y^*_1 - h)^2 / 2\epsilon^2)\,\exp(-(y^*_2 - v)^2 / 2(\sigma_1^2 +
        \epsilon^2))` (:math:`h, v` the horizontal and vertical reach of the segments), then draw the
        height from its Gaussian conditional :math:`\mathcal N(s^2 (y^*_2 - v) / \epsilon^2, s^2)`,
        :math:`s^{-2} = \sigma_1^{-2} + \epsilon^{-2}`.

        Returns fewer than ``n`` rows only when ``max_proposals`` is exhausted.
        """
        y_star = torch.as_tensor(y_star, dtype=torch.float64).reshape(1, self.dim_y)
        accepted, total, proposals = [], 0, 0
        s1 = self.sigmas[0]
        while total < n and proposals < max_proposals:
            x = self.sample_prior(chunk, generator, dtype=torch.float64)
            u = torch.rand(chunk, generator=generator, dtype=torch.float64)
            if marginal:
                reach = self.forward(torch.cat([torch.zeros_like(x[:, :1]), x[:, 1:]], dim=1))
                dh, dv = y_star[0, 0] - reach[:, 0], y_star[0, 1] - reach[:, 1]
                log_a = -dh.square() / (2 * epsilon**2) - dv.square() / (2 * (s1**2 + epsilon**2))
                keep = u < torch.exp(log_a)
                var = 1.0 / (1.0 / s1**2 + 1.0 / epsilon**2)
                noise = torch.randn(int(keep.sum()), generator=generator, dtype=torch.float64)
                x = x[keep]
                x[:, 0] = var * dv[keep] / epsilon**2 + var**0.5 * noise
            else:
                d2 = (self.forward(x) - y_star).square().sum(1)
                x = x[u < torch.exp(-d2 / (2 * epsilon**2))]
            accepted.append(x)
            total += len(x)
            proposals += chunk
        return torch.cat(accepted)[:n]


class InverseKinematicsDataModule(pl.LightningDataModule):
    """Pairs ``(x, y)`` of the inverse-kinematics arm: ``x`` from the prior, ``y = f(x)`` (float32).

    Deterministic: each split is drawn from its own generator seeded from ``seed``.

    Args:
        num_train, num_val, num_test: split sizes.
        batch_size: training batch size (evaluation uses ``eval_batch_size``).
        seed: seed of the data.
    """

    input_shape = (4,)
    condition_shape = (2,)

    def __init__(self, num_train: int = 100_000, num_val: int = 5_000, num_test: int = 5_000,
                 batch_size: int = 500, eval_batch_size: int = 5_000, seed: int = 0):
        super().__init__()
        for name, value in (("num_train", num_train), ("num_val", num_val), ("num_test", num_test),
                            ("batch_size", batch_size)):
            if value < 1:
                raise ValueError(f"InverseKinematicsDataModule: {name} must be positive, got {value}")
        self.sizes = {"train": num_train, "val": num_val, "test": num_test}
        self.batch_size, self.eval_batch_size, self.seed = batch_size, eval_batch_size, seed
        self.arm = InverseKinematics()
        self.sets: dict[str, TensorDataset] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.sets:
            return
        for i, (split, n) in enumerate(self.sizes.items()):
            gen = torch.Generator().manual_seed(self.seed * 1000 + i)
            x = self.arm.sample_prior(n, gen)
            self.sets[split] = TensorDataset(x, self.arm.forward(x))

    def _loader(self, split: str, train: bool) -> DataLoader:
        if not self.sets:
            raise RuntimeError("InverseKinematicsDataModule: call setup() before asking for a loader")
        return DataLoader(self.sets[split], batch_size=self.batch_size if train else self.eval_batch_size,
                          shuffle=train, drop_last=train and self.sizes[split] > self.batch_size)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False)


# --------------------------------------------------------------------------- memory report


class _ConditionedNLL(nn.Module):
    """``forward(x) = -log p(x | condition)`` with the condition fixed, for ``measure_step``."""

    def __init__(self, flow: nn.Module, condition: Tensor):
        super().__init__()
        self.flow, self.condition = flow, condition

    def forward(self, x: Tensor) -> Tensor:
        return -self.flow.log_prob(x, context=self.condition).mean()


class ConditionalMemoryReport(pl.Callback):
    """At the end of ``fit``, measure one training step of the flow and of its stored twin.

    Both on the same training batch (with its conditions), with
    :func:`revtrain.memory.measure_step`; prints a Markdown table and keeps the rows in
    ``self.rows``.

    Args:
        batch_size: batch of the measurement (default: the training batch).
    """

    def __init__(self, batch_size: int | None = None):
        self.batch_size = batch_size
        self.rows: list[dict[str, Any]] = []

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero or not isinstance(pl_module, ConditionalFlowModule):
            return
        self.report(pl_module, next(iter(trainer.datamodule.train_dataloader())))

    @rank_zero_only
    def report(self, module: ConditionalFlowModule, batch: Any) -> str:
        from ..memory import format_bytes, measure_step

        x, condition = _split_batch(batch)
        if self.batch_size is not None:
            x, condition = x[: self.batch_size], condition[: self.batch_size]
        device = next(module.parameters()).device
        x, condition = x.to(device), condition.to(device)
        if module.is_image_flow:  # score dequantized data, as in training
            levels = module.dequantize.levels if module.dequantize is not None else 256
            x = (torch.round(x * (levels - 1)) + 0.5) / levels
        flow = module.flow
        was_training = flow.training
        self.rows = []
        try:
            for name, model in (("as trained", flow), ("stored twin", stored_twin(flow))):
                model.train()
                modes = "/".join(sorted({s.memory.value for s in reversible_stacks(model)}))
                rec = measure_step(_ConditionedNLL(model, condition), x, loss_fn=lambda loss: loss)
                self.rows.append({"model": name, "memory": modes, **rec})
        finally:
            flow.train(was_training)
        ref = self.rows[1]["held_bytes"] or 1
        lines = [f"Memory of one training step of the conditional flow, batch {tuple(x.shape)} with its "
                 f"conditions, {self.rows[0]['method']} on {self.rows[0]['device']}:", "",
                 "| model | memory mode | held fwd->bwd | peak of step (with grads) | held vs stored |",
                 "|---|---|---:|---:|---:|"]
        for r in self.rows:
            lines.append(f"| {r['model']} | {r['memory']} | {format_bytes(r['held_bytes'])} | "
                         f"{format_bytes(r['peak_bytes'])} | {r['held_bytes'] / ref:.2f}x |")
        text = "\n".join(lines)
        print("\n" + text + "\n", flush=True)
        return text


def posterior_samples(module_or_flow: nn.Module, y_star: Tensor, n: int, temperature: float = 1.0) -> Tensor:
    """``n`` samples of ``x`` for each observation in ``y_star`` ``(M, 2)``: ``(M, n, D)``."""
    flow = getattr(module_or_flow, "flow", module_or_flow)
    y = y_star.repeat_interleave(n, dim=0)
    x = flow.sample(len(y), context=y, temperature=temperature)
    return x.reshape(len(y_star), n, -1)

