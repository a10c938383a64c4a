"""The ``revtrain`` command: LightningCLI with revtrain's modules, data and callbacks.

Examples::

    revtrain fit --config configs/digits_revnet.yaml
    revtrain fit --config configs/digits_revnet.yaml --model.memory stored   # the stored twin
    revtrain fit --config configs/cifar10_revnet38.yaml --data.root ~/data --trainer.devices 4
    revtrain test --config configs/digits_revnet.yaml --ckpt_path runs/.../last.ckpt
    revtrain fit --config configs/cifar10_revnet38.yaml --print_config

``--model`` takes :class:`~revtrain.lightning.Classifier` or
:class:`~revtrain.lightning.FlowModule` (any LightningModule); ``--data`` any LightningDataModule
(:class:`~revtrain.lightning.DigitsDataModule` needs no download). A config file names both.
The RNG-state callback is always on (key ``rng_state``), so that a run resumed with
``--ckpt_path`` continues exactly. The ``report`` key (``--report.test_after_fit``,
``--report.memory_table``) adds a test run and a memory table at the end of ``fit``.
"""

from __future__ import annotations

from typing import Any

import torch
from pytorch_lightning import LightningDataModule, LightningModule
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI
from pytorch_lightning.utilities import rank_zero_only

from .lightning.callbacks import RNGStateCallback
from .lightning.report import RunReport, memory_table

__all__ = ["RevtrainCLI", "cli", "main"]


def _default_loggers() -> list[dict[str, Any]]:
    loggers = [{"class_path": "pytorch_lightning.loggers.CSVLogger",
                "init_args": {"save_dir": "runs", "name": "csv"}}]
    try:
        from lightning_fabric.loggers.tensorboard import (
            _TENSORBOARD_AVAILABLE,
            _TENSORBOARDX_AVAILABLE,
        )
    except ImportError:  # pragma: no cover - older Lightning
        return loggers
    if _TENSORBOARD_AVAILABLE or _TENSORBOARDX_AVAILABLE:
        loggers.append({"class_path": "pytorch_lightning.loggers.TensorBoardLogger",
                        "init_args": {"save_dir": "runs", "name": "tensorboard"}})
    return loggers


class RevtrainCLI(LightningCLI):
    """LightningCLI with revtrain's defaults, the forced RNG callback and the fit report."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(RNGStateCallback, "rng_state")
        parser.add_class_arguments(RunReport, "report")
        parser.add_argument(
            "--threads", type=int | None, default=None,
            help="torch intra-op CPU threads (torch.set_num_threads); 1 is fastest for small "
                 "models on a shared or small CPU. Default: torch's choice",
        )

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        threads = config.get("threads")
        if threads is not None:
            if threads < 1:
                raise ValueError(f"--threads must be at least 1, got {threads}")
            torch.set_num_threads(threads)

    def after_fit(self) -> None:
        report: RunReport = self.config_init[self.subcommand]["report"]
        if report.test_after_fit:
            if self.trainer.interrupted:
                return
            results = self.trainer.test(self.model, datamodule=self.datamodule, verbose=True)
            self._print_test_summary(results)
        if report.memory_table:
            self._print_memory_table(report)

    @rank_zero_only
    def _print_test_summary(self, results: list[dict[str, float]]) -> None:
        if not results:
            return
        loader = self.trainer.test_dataloaders
        n = len(loader.dataset) if hasattr(loader, "dataset") else None
        scores = ", ".join(f"{k} = {v:.4f}" for k, v in results[0].items() if k != "test/loss")
        where = f" ({n} images of the test split)" if n else " (test split)"
        print(f"\nTest after fit{where}: {scores}", flush=True)

    @rank_zero_only
    def _print_memory_table(self, report: RunReport) -> None:
        net = getattr(self.model, "net", None) or getattr(self.model, "flow", None)
        if net is None:
            print("memory table: the model has no .net or .flow to measure")
            return
        loss = "cross_entropy" if hasattr(self.model, "net") else "nll"
        text, _ = memory_table(net, self.datamodule, report.batch_size, loss=loss)
        print("\n" + text + "\n", flush=True)


def cli(args: list[str] | None = None, run: bool = True) -> RevtrainCLI:
    """Build (and with ``run=True`` run) the CLI on ``args`` (default: ``sys.argv[1:]``)."""
    return RevtrainCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        trainer_defaults={"logger": _default_loggers()},
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,  # the modules take optimizer / lr_scheduler themselves
        args=args,
        run=run,
    )


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``revtrain`` console script."""
    cli(args)


if __name__ == "__main__":
    main()
