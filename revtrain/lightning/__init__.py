"""Lightning parts of revtrain: modules, DataModules and callbacks used by the ``revtrain`` CLI.

>>> from revtrain.lightning import Classifier, DigitsDataModule
>>> import pytorch_lightning as pl
>>> pl.Trainer(max_epochs=1).fit(Classifier("revnet_digits", in_channels=1), DigitsDataModule())
"""

from .callbacks import (
    ExceptionCheckpoint,
    PeakMemoryMonitor,
    ReconstructionMonitor,
    RNGStateCallback,
)
from .classifier import Classifier
from .data import CIFAR10DataModule, CIFAR100DataModule, DigitsDataModule, ImageNetDataModule
from .flow import FlowModule
from .report import RunReport, memory_table

__all__ = [
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "Classifier",
    "DigitsDataModule",
    "ExceptionCheckpoint",
    "FlowModule",
    "ImageNetDataModule",
    "PeakMemoryMonitor",
    "RNGStateCallback",
    "ReconstructionMonitor",
    "RunReport",
    "memory_table",
]
