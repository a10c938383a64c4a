"""The hybrid study's accuracy reference on the hybrid's own test images.

``benchmarks/hybrid.py`` compares the hybrid's test accuracy with "the digits RevNet" — the
quick start's ``revtrain fit --config configs/digits_revnet.yaml``, which trains on the
``DigitsDataModule`` split (1,293 training images) and tests on its 360 held-out digits
(99.17 %). The hybrid trains on the flows' split (1,500 images) and tests on the other 297,
so the two figures come from different test images. This script trains the same RevNet with
the same recipe (``revnet_digits``, SGD lr 0.1, momentum 0.9, Nesterov, weight decay 2e-4,
cosine over 30 epochs, batch 64, 1-pixel shifts, standardised inputs: the config's settings)
on the hybrid's 1,500 training images and tests it on its 297, once per seed, so that each
hybrid seed has a reference on the same images.

Usage::

    python benchmarks/hybrid_reference.py --seeds 0 1 2   # writes hybrid_reference.json
    python benchmarks/hybrid_reference.py --quick --out /tmp/ref.json
"""

from __future__ import annotations

import argparse
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from benchmarks.common import environment, write_json
from benchmarks.hybrid import LEVELS, load_digits_labelled
from revtrain.lightning import Classifier
from revtrain.lightning.data import _ShiftAugment

RESULTS = Path(__file__).resolve().parent / "results" / "hybrid_reference.json"
RECIPE = {"model": "revnet_digits", "epochs": 30, "batch": 64, "lr": 0.1, "momentum": 0.9,
          "nesterov": True, "weight_decay": 2e-4, "schedule": "cosine over the epochs",
          "augment": "1-pixel shifts", "inputs": "standardised with the training mean / std",
          "source": "configs/digits_revnet.yaml"}


def standardised(train_x: torch.Tensor, test_x: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Grey levels ``0..16`` as ``DigitsDataModule`` feeds them: ``v / 16``, then standardised
    with the training images' mean and std."""
    train, test = train_x.float() / (LEVELS - 1), test_x.float() / (LEVELS - 1)
    mean, std = train.mean(), train.std()
    return (train - mean) / std, (test - mean) / std


def train_reference(seed: int, epochs: int, data: tuple[torch.Tensor, ...],
                    memory: str = "reversible") -> dict[str, Any]:
    """Train the digits RevNet with the quick start's recipe on ``data``'s training images and
    return its accuracy (%) on ``data``'s test images."""
    train_x, train_y, test_x, test_y = data
    train, test = standardised(train_x, test_x)
    pl.seed_everything(seed, verbose=False)
    module = Classifier(RECIPE["model"], num_classes=10, in_channels=1, memory=memory,
                        optimizer=partial(torch.optim.SGD, lr=RECIPE["lr"],
                                          momentum=RECIPE["momentum"], nesterov=True,
                                          weight_decay=RECIPE["weight_decay"]),
                        lr_scheduler=partial(torch.optim.lr_scheduler.CosineAnnealingLR,
                                             T_max=epochs),
                        scheduler_interval="epoch")
    loader = DataLoader(_ShiftAugment(TensorDataset(train, train_y)), batch_size=RECIPE["batch"],
                        shuffle=True)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0)
    start = time.perf_counter()
    trainer.fit(module, loader)
    seconds = time.perf_counter() - start
    module.eval()
    with torch.no_grad():
        pred = module(test).argmax(-1)
    correct = int((pred == test_y).sum())
    return {"seed": seed, "memory": memory, "epochs": epochs, "train_images": len(train),
            "test_images": len(test), "correct": correct,
            "test_accuracy": round(100.0 * correct / len(test), 2),
            "train_seconds": round(seconds, 1)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=RECIPE["epochs"])
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 epoch, first seed")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    seeds = args.seeds[:1] if args.quick else args.seeds
    epochs = 1 if args.quick else args.epochs
    data = load_digits_labelled()
    started = time.perf_counter()
    rows = []
    for seed in seeds:
        row = train_reference(seed, epochs, data)
        rows.append(row)
        print(f"seed {seed}: {row['test_accuracy']:.2f} % ({row['correct']} / "
              f"{row['test_images']}), {row['train_seconds']:.0f} s", flush=True)
    accuracies = [r["test_accuracy"] for r in rows]
    summary = {"accuracy_per_seed": {str(r["seed"]): r["test_accuracy"] for r in rows},
               "accuracy_mean": round(sum(accuracies) / len(accuracies), 2),
               "accuracy_min": min(accuracies),
               "hybrid_target_per_seed": {str(r["seed"]): round(r["test_accuracy"] - 1.0, 2)
                                          for r in rows}}
    record = {"environment": environment(), "command": " ".join(["python",
              "benchmarks/hybrid_reference.py", *(argv if argv is not None else sys.argv[1:])]),
              "recipe": {**RECIPE, "epochs": epochs},
              "split": "benchmarks.hybrid.load_digits_labelled: the hybrid's 1500 training and "
                       "297 test images",
              "total_seconds": round(time.perf_counter() - started, 1),
              "summary": summary, "runs": rows}
    write_json(args.out, record)
    print(f"mean {summary['accuracy_mean']:.2f} %, min {summary['accuracy_min']:.2f} % -> "
          f"{args.out}")
    return record


if __name__ == "__main__":
    main()
