"""``Classifier``: a LightningModule for any classifier in the model registry."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from ._common import StepsBySplit, build_model, configure_optim, eval_mode, fully_shard_reversible
from .mixing import BatchMix

__all__ = ["Classifier"]


def _default_sgd(params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-4)


class Classifier(StepsBySplit, pl.LightningModule):
    r"""Train a registered classifier with cross-entropy.

    Minimises :math:`\mathcal{L} = -\frac{1}{B}\sum_i \log \mathrm{softmax}(f(x_i))_{y_i}`
    and reports top-1 / top-5 accuracy (torchmetrics) for train, validation and test.

    With mixup / CutMix (``mixup_alpha`` or ``cutmix_alpha`` above 0) each training batch is
    mixed in :meth:`training_step` (:class:`~revtrain.lightning.mixing.BatchMix`, torchvision's
    ``MixUp`` / ``CutMix``) and the loss is the cross-entropy against the soft target,
    :math:`-\frac{1}{B}\sum_i \sum_c \tilde y_{ic} \log \mathrm{softmax}(f(\tilde x_i))_c`,
    with the target smoothed by ``label_smoothing`` first. On a mixed batch ``train/top1`` and
    ``train/top5`` score the batch's dominant label (the argmax of the soft target, the label
    with weight at least 1/2), not clean images. Validation, test and prediction batches are
    never mixed.

    The network is :attr:`net`; :meth:`loss` is the scalar the module minimises (the memory
    table measures one backward of it for the network and for its stored twin).

    Args:
        model_name: a name from ``revtrain.models.list_models()`` (e.g. ``"revnet38"``).
        num_classes: number of labels. The ``revtrain`` command links it to the DataModule's
            ``num_classes``; in Python, it must match the DataModule.
        in_channels: image channels (linked to the DataModule's ``input_shape[0]`` likewise).
        memory: ``"reversible"``, ``"checkpoint"`` or ``"stored"`` for every reversible stack
            of the model; ``None``: the model's own default (``"reversible"``, or ``"stored"``
            for a model without a reversible part, such as the ResNet baselines). The mode that
            runs is saved in the hyper-parameters. ``--model.memory stored`` gives the
            stored-activation twin of a run.
        model_kwargs: further keyword arguments of the model constructor.
        optimizer: optimizer factory (``class_path`` / ``init_args`` in YAML); default SGD
            with lr 0.1, momentum 0.9, weight decay 1e-4.
        lr_scheduler: scheduler factory, or ``None`` for a constant learning rate.
        scheduler_interval: step the scheduler every ``"step"`` or every ``"epoch"``.
        label_smoothing: passed to :func:`torch.nn.functional.cross_entropy`.
        check_input: before training, run the model once on a zero batch of the
            DataModule's ``input_shape`` and fail with a clear message if it cannot take it.
        shard: FSDP2 sharding under Lightning's ``ModelParallelStrategy`` (``configure_model``
            applies ``fully_shard`` over the data-parallel mesh): ``"coupling"`` shards every
            layer of the reversible stacks, ``"stack"`` every stack, then the whole network
            (stem, transitions, head). Needs ``ModelParallelStrategy(data_parallel_size=<world
            size>, tensor_parallel_size=1)``; ``None`` (default) for every other strategy.
        mixup_alpha: mixup's Beta :math:`\alpha` for training batches; 0 (default) turns it
            off. DeiT / Rev-ViT: 0.8.
        cutmix_alpha: CutMix's Beta :math:`\alpha`; 0 (default) turns it off. DeiT / Rev-ViT: 1.0.
        mix_prob: probability that a training batch is mixed (DeiT: 1.0).
        switch_prob: with both on, probability of CutMix rather than mixup for a batch (DeiT:
            0.5).

    >>> module = Classifier("revnet_digits", num_classes=10, in_channels=1)
    >>> module.hparams.memory
    'reversible'
    >>> Classifier("resnet32").hparams.memory
    'stored'
    """

    def __init__(
        self,
        model_name: str = "revnet_digits",
        num_classes: int = 10,
        in_channels: int = 3,
        memory: Literal["reversible", "checkpoint", "stored"] | None = None,
        model_kwargs: dict[str, Any] | None = None,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        scheduler_interval: Literal["step", "epoch"] = "epoch",
        label_smoothing: float = 0.0,
        check_input: bool = True,
        shard: Literal["coupling", "stack"] | None = None,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        mix_prob: float = 1.0,
        switch_prob: float = 0.5,
    ):
        super().__init__()
        # checked before the model is built: a wrong value fails at once, naming the option
        self.mix = BatchMix(num_classes, mixup_alpha, cutmix_alpha, mix_prob, switch_prob,
                            name="--model.")
        # the factories stay out: a checkpoint must load with torch.load(weights_only=True)
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        kwargs = {"num_classes": num_classes, "in_channels": in_channels, **(model_kwargs or {})}
        self.net = build_model(model_name, memory, kwargs)
        self.hparams.memory = self.net.memory.value  # what runs, not what was asked
        self.optimizer_factory = optimizer
        self.scheduler_factory = lr_scheduler
        ks = {"top1": 1, "top5": 5} if num_classes > 5 else {"top1": 1}
        metrics = MetricCollection(
            {name: MulticlassAccuracy(num_classes, top_k=k, average="micro")
             for name, k in ks.items()}
        )
        self.train_metrics = metrics.clone(prefix="train/")
        self.val_metrics = metrics.clone(prefix="val/")
        self.test_metrics = metrics.clone(prefix="test/")

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)  # (B, num_classes)

    def _criterion(self, logits: Tensor, y: Tensor) -> Tensor:
        """Cross-entropy against labels ``(B,)`` or soft targets ``(B, num_classes)``."""
        if y.is_floating_point():
            y = y.to(logits.dtype)  # torchvision's mixed targets are float32
        return F.cross_entropy(logits, y, label_smoothing=self.hparams.label_smoothing)

    def loss(self, batch: Any, net: nn.Module | None = None) -> Tensor:
        """Cross-entropy of ``net`` (default :attr:`net`) on ``batch = (x, y)``; ``y`` holds
        labels or soft targets. The batch is taken as it is (not mixed)."""
        x, y = batch
        return self._criterion((net or self.net)(x), y)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        """One step on the batch mixed by :attr:`mix` (unchanged when mixing is off)."""
        return self._step(self.mix(*batch), "train")

    def _step(self, batch: Any, split: str) -> Tensor:
        x, y = batch
        logits = self(x)  # (B, num_classes)
        loss = self._criterion(logits, y)
        metrics = getattr(self, f"{split}_metrics")
        labels = y.argmax(dim=-1) if y.is_floating_point() else y  # a mixed batch: dominant label
        metrics.update(logits.detach(), labels)
        on_step = split == "train"
        self.log(f"{split}/loss", loss, on_step=on_step, on_epoch=True, prog_bar=True,
                 sync_dist=not on_step, batch_size=len(y))
        self.log_dict(metrics, on_step=False, on_epoch=True, prog_bar=split != "train",
                      batch_size=len(y))
        self.log_tested(split, len(y))
        return loss

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0
                     ) -> dict[str, Tensor]:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        probs = self(x).softmax(dim=-1)
        return {"probs": probs, "pred": probs.argmax(dim=-1)}

    def configure_optimizers(self) -> Any:
        return configure_optim(self.parameters(), self.optimizer_factory,
                               self.scheduler_factory, self.hparams.scheduler_interval,
                               _default_sgd)

    def configure_model(self) -> None:
        """Under ``ModelParallelStrategy``: shard :attr:`net` as ``shard`` says (see Args)."""
        mesh, per = self.device_mesh, self.hparams.shard
        if mesh is None:
            if per is not None:
                raise ValueError(f"shard={per!r} needs Trainer(strategy=ModelParallelStrategy("
                                 "data_parallel_size=..., tensor_parallel_size=1)); use "
                                 "shard=None with other strategies")
            return
        if per is None:
            raise ValueError("ModelParallelStrategy shards nothing by itself: set shard="
                             "'coupling' or 'stack' (--model.shard coupling)")
        if mesh["tensor_parallel"].size() != 1:
            raise ValueError("Classifier shards over the data-parallel dimension only: use "
                             "ModelParallelStrategy(data_parallel_size=<number of processes>, "
                             f"tensor_parallel_size=1), not a {tuple(mesh.shape)} mesh")
        fully_shard_reversible(self.net, mesh["data_parallel"], per)

    def setup(self, stage: str) -> None:
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer else None
        if self.hparams.check_input and datamodule is not None:
            self.check_data(datamodule)

    @torch.no_grad()
    def check_data(self, datamodule: Any) -> None:
        """Fail early when ``datamodule``'s images or labels do not fit the model.

        Checks channels and number of classes against the DataModule's ``input_shape`` and
        ``num_classes`` and runs the model once, in eval mode, on a zero batch of that shape.

        Raises:
            ValueError: naming the model, the DataModule and what to change.
        """
        shape = getattr(datamodule, "input_shape", None)
        classes = getattr(datamodule, "num_classes", None)
        name, data = self.hparams.model_name, type(datamodule).__name__
        if classes is not None and classes != self.hparams.num_classes:
            raise ValueError(f"{data} has {classes} classes but the model was built with "
                             f"num_classes={self.hparams.num_classes}; set --model.num_classes "
                             f"{classes}")
        if shape is None:
            return
        if shape[0] != self.hparams.in_channels:
            raise ValueError(f"{data} gives {shape[0]}-channel images but the model was built "
                             f"with in_channels={self.hparams.in_channels}; set "
                             f"--model.in_channels {shape[0]}")
        param = next(self.parameters(), None)
        x = torch.zeros(2, *shape, device=param.device if param is not None else "cpu")
        with eval_mode(self):
            try:
                out = self(x)
            except (RuntimeError, ValueError) as err:
                raise ValueError(f"model {name!r} cannot take the {tuple(shape)} images of "
                                 f"{data}: {err}. Choose a model (or model_kwargs) made for this "
                                 "image size, or change the data's image size") from err
        if out.shape[-1] != self.hparams.num_classes:
            raise ValueError(f"model {name!r} outputs {out.shape[-1]} scores per image, "
                             f"expected num_classes={self.hparams.num_classes}")
