"""Lightning parts of revtrain: modules, DataModules and callbacks used by the ``revtrain`` CLI.

>>> import pytorch_lightning as pl
>>> from revtrain.lightning import Classifier, DigitsDataModule
>>> trainer = pl.Trainer(max_steps=2, logger=False, enable_checkpointing=False,
...                      enable_progress_bar=False, enable_model_summary=False)
>>> trainer.fit(Classifier("revnet_digits", in_channels=1), DigitsDataModule())
>>> trainer.global_step
2
"""

from .callbacks import (
    ExceptionCheckpoint,
    PeakMemoryMonitor,
    PredictionWriter,
    ReconstructionMonitor,
    RNGStateCallback,
    SampleGrid,
)
from .classifier import Classifier
from .conditional import (
    ConditionalFlowModule,
    ConditionalMemoryReport,
    InverseKinematics,
    InverseKinematicsDataModule,
)
from .data import CIFAR10DataModule, CIFAR100DataModule, DigitsDataModule, ImageNetDataModule
from .flow import FlowModule
from .mixing import BatchMix
from .report import RunReport, memory_table, write_memory_table

__all__ = [
    "BatchMix",
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "Classifier",
    "ConditionalFlowModule",
    "ConditionalMemoryReport",
    "DigitsDataModule",
    "ExceptionCheckpoint",
    "FlowModule",
    "ImageNetDataModule",
    "InverseKinematics",
    "InverseKinematicsDataModule",
    "PeakMemoryMonitor",
    "PredictionWriter",
    "RNGStateCallback",
    "ReconstructionMonitor",
    "RunReport",
    "SampleGrid",
    "memory_table",
    "write_memory_table",
]
