r"""Benchmarks of the reversible Vision Transformers (issue 11): memory, step time, digits.

1. ``memory``: one training step (forward, cross-entropy, backward; no optimizer) at batch 4 and
   224x224 of Rev-ViT-B, its own stored twin (the same model object, ``memory="stored"``: the
   same weights) and torchvision's ``vit_b_16``; the same for Rev-ViT-L and ``vit_l_16``. All in
   train mode, no dropout. Measured with :func:`revtrain.memory.measure_step` (the CPU
   tensor-level count of :class:`~revtrain.memory.TensorMemoryTracker`; on CUDA the allocator's
   peak), one measured step each, no warm-up step (the count does not depend on caches):
   ``held_bytes`` (kept between forward and backward), ``activation_peak_bytes`` (peak of the
   step over what was held before it, with the parameter gradients allocated before the step, so
   that backward accumulates into them: activations plus transient gradient buffers) and the
   ratios the issue sets targets for.
2. ``timing``: median wall time of a training step, reversible and stored twin interleaved
   (:func:`benchmarks.common.time_interleaved`), per size. Rev-ViT-B / -L at 224x224 take tens
   of seconds a step on two shared CPU cores, so ``--time-size`` (default 112: 49 tokens + 0,
   mean pooling) and ``--time-batch`` set a smaller step; the JSON says which.
3. ``digits``: ``rev_vit_digits`` and its stored twin, trained the same way from the same
   initial weights and seed (``configs/digits_vit.yaml``'s recipe: AdamW 5e-3, weight decay
   0.05, one-cycle warm-up + cosine, label smoothing 0.1, batch 64, 1-pixel shifts, 100 epochs) on
   :class:`~revtrain.lightning.DigitsDataModule`'s split; test accuracy, wall time, load average.
   ``--seeds N`` trains N such pairs (seeds 0 .. N-1) and adds per-model mean / std of the test
   accuracy and the mean reversible-minus-stored gap with its spread: single runs differ by
   about a point because float rounding makes the two trainings drift apart over 2,100 steps.

Writes ``benchmarks/results/vit_memory.json`` (1 and 2) and ``vit_digits.json`` (3).
Run: ``python benchmarks/vit.py`` (``--only memory|timing|digits``; ``--quick``: small sizes,
writes nothing).
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import environment, spread, time_interleaved, write_json  # noqa: E402

from revtrain.memory import measure_step  # noqa: E402
from revtrain.models import create  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PAIRS = {"base": "vit_b_16", "large": "vit_l_16"}
MiB = 2.0 ** 20


def _loss_for(num_classes: int, batch: int):
    labels = torch.arange(batch) % num_classes

    def loss(out):
        return F.cross_entropy(out, labels.to(out.device))

    return loss


def _torchvision(name: str, img: int) -> nn.Module:
    import torchvision

    return getattr(torchvision.models, name)(weights=None, image_size=img)


def _measure(model: nn.Module, x: torch.Tensor) -> dict[str, Any]:
    """One step with the parameter gradients allocated beforehand (as in a training loop after
    its first step): backward accumulates into them in place, so that the step's peak over what
    was held before it is the activations' and the transient gradient buffers', not the
    gradients' themselves (which, at the end of backward, would dominate a step's peak)."""
    model.train()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    start = time.perf_counter()
    r = measure_step(model, x, loss_fn=_loss_for(1000, len(x)), warmup=0)
    for p in model.parameters():
        p.grad = None
    r["activation_peak_bytes"] = r["peak_bytes"]  # gradients were allocated before the step
    r["params"] = sum(p.numel() for p in model.parameters())
    r["measured_step_wall_s"] = round(time.perf_counter() - start, 2)  # under the tracker
    for k in ("held_bytes", "activation_peak_bytes"):
        r[k.replace("_bytes", "_mib_per_sample")] = round(r[k] / MiB / len(x), 3)
    return r


def memory(batch: int, img: int, sizes: list[str]) -> dict[str, Any]:
    x = torch.randn(batch, 3, img, img, generator=torch.Generator().manual_seed(0))
    out: dict[str, Any] = {"batch": batch, "image_size": img, "sizes": {}}
    for size in sizes:
        torch.manual_seed(0)
        rev = create(f"rev_vit_{size}", img_size=img)
        rows = {"reversible": _measure(rev, x)}
        print(f"rev_vit_{size} reversible: {_row(rows['reversible'])}", flush=True)
        rev.memory = "stored"  # its own stored twin: the same weights
        rows["stored_twin"] = _measure(rev, x)
        print(f"rev_vit_{size} stored twin: {_row(rows['stored_twin'])}", flush=True)
        del rev
        gc.collect()
        name = PAIRS[size]
        torch.manual_seed(0)
        tv = _torchvision(name, img)
        rows[f"torchvision_{name}"] = _measure(tv, x)
        print(f"torchvision {name}: {_row(rows[f'torchvision_{name}'])}", flush=True)
        del tv
        gc.collect()
        rev_row = rows["reversible"]
        ratios = {}
        for other in ("stored_twin", f"torchvision_{name}"):
            ratios[f"activation_peak_{other}_over_reversible"] = round(
                rows[other]["activation_peak_bytes"] / rev_row["activation_peak_bytes"], 2)
            ratios[f"held_{other}_over_reversible"] = round(
                rows[other]["held_bytes"] / rev_row["held_bytes"], 1)
        out["sizes"][size] = {"rows": rows, "ratios": ratios}
        print(ratios, flush=True)
    return out


def _row(r: dict) -> str:
    return (f"held {r['held_bytes'] / MiB:.2f} MiB, activation peak "
            f"{r['activation_peak_bytes'] / MiB:.2f} MiB, grads {r['grad_bytes'] / MiB:.0f} MiB "
            f"({r['measured_step_wall_s']} s)")


def timing(batch: int, img: int, sizes: list[str], repeats: int) -> dict[str, Any]:
    x = torch.randn(batch, 3, img, img, generator=torch.Generator().manual_seed(0))
    loss = _loss_for(1000, batch)
    out: dict[str, Any] = {"batch": batch, "image_size": img, "repeats": repeats,
                           "warmup_rounds": 1, "sizes": {}}
    for size in sizes:
        torch.manual_seed(0)
        rev = create(f"rev_vit_{size}", img_size=img).train()
        twin = copy.deepcopy(rev).set_memory("stored")

        def step(model):
            params = list(model.parameters())

            def run():
                loss(model(x)).backward()
                for p in params:
                    p.grad = None

            return run

        times = time_interleaved({"reversible": step(rev), "stored": step(twin)}, repeats,
                                 warmup=1)
        ratio = times["reversible"]["median_s"] / times["stored"]["median_s"]
        out["sizes"][size] = {"reversible": times["reversible"], "stored": times["stored"],
                              "ratio_reversible_over_stored": round(ratio, 3)}
        print(f"rev_vit_{size} at {img}x{img}, batch {batch}: reversible "
              f"{times['reversible']['median_s']:.2f} s, stored {times['stored']['median_s']:.2f} s,"
              f" ratio {ratio:.2f}", flush=True)
        del rev, twin
        gc.collect()
    return out


# --------------------------------------------------------------------------- 3. digits

EPOCHS, LR, WEIGHT_DECAY, SMOOTHING, BATCH = 100, 5e-3, 0.05, 0.1, 64


def _train(model: nn.Module, data, epochs: int, seed: int) -> dict[str, Any]:
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    loader = data.train_dataloader()
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LR, total_steps=epochs * len(loader),
                                                pct_start=0.05, cycle_momentum=False)
    load_before = os.getloadavg()
    torch.manual_seed(seed)  # the same shifts, dropout and order for both models
    start = time.perf_counter()
    for _ in range(epochs):
        model.train()
        for x, y in loader:
            loss = F.cross_entropy(model(x), y, label_smoothing=SMOOTHING)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    seconds = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        right = sum(int((model(x).argmax(1) == y).sum()) for x, y in data.test_dataloader())
    return {"test_accuracy": right / len(data.test_set), "test_images": len(data.test_set),
            "train_seconds": round(seconds, 1), "final_train_loss": round(float(loss), 4),
            "load_average_before": [round(v, 2) for v in load_before],
            "load_average_after": [round(v, 2) for v in os.getloadavg()]}


def digits(epochs: int, seeds: int = 1) -> dict[str, Any]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as configs/digits_vit.yaml: tiny matrices, more threads only spin
    try:
        return _digits(epochs, seeds)
    finally:
        torch.set_num_threads(threads)


def _digits(epochs: int, seeds: int) -> dict[str, Any]:
    """Seed ``s`` (0, 1, ...): initial weights from ``torch.manual_seed(s)``, copied into the
    stored twin; both then train from ``torch.manual_seed(s + 1)`` (the same shifts and batch
    order). Seed 0 is the single run of earlier versions of this benchmark."""
    from revtrain.lightning import DigitsDataModule

    data = DigitsDataModule(batch_size=BATCH, augment=True)
    data.setup()
    out: dict[str, Any] = {
        "recipe": {"epochs": epochs, "optimizer": "AdamW", "lr": LR, "weight_decay": WEIGHT_DECAY,
                   "schedule": "OneCycleLR (5 % linear warm-up, cosine)",
                   "label_smoothing": SMOOTHING, "batch_size": BATCH, "augment": "1-pixel shifts",
                   "threads": torch.get_num_threads(), "config": "configs/digits_vit.yaml"},
        "split": {"train": len(data.train_set), "val": len(data.val_set),
                  "test": len(data.test_set)},
        "seeding": "seed s: initial weights torch.manual_seed(s), shared by the twin; training "
                   "torch.manual_seed(s + 1) for both",
        "runs": []}
    for seed in range(seeds):
        torch.manual_seed(seed)
        model = create("rev_vit_digits")
        twin = copy.deepcopy(model).set_memory("stored")
        out["params"] = sum(p.numel() for p in model.parameters())
        run: dict[str, Any] = {"seed": seed}
        for name, m in (("reversible", model), ("stored_twin", twin)):
            run[name] = _train(m, data, epochs, seed=seed + 1)
            print(f"seed {seed}, rev_vit_digits {name}: {run[name]}", flush=True)
        run["accuracy_gap_points"] = round(  # reversible minus stored twin
            100 * (run["reversible"]["test_accuracy"] - run["stored_twin"]["test_accuracy"]), 2)
        out["runs"].append(run)
    acc = {name: [100 * r[name]["test_accuracy"] for r in out["runs"]]
           for name in ("reversible", "stored_twin")}
    gaps = [r["accuracy_gap_points"] for r in out["runs"]]
    out["summary"] = {
        "seeds": seeds,
        "test_accuracy_points": {name: {"per_seed": [round(a, 2) for a in v], **spread(v)}
                                 for name, v in acc.items()},
        "gap_points_reversible_minus_stored": {"per_seed": gaps, **spread(gaps)},
        "train_seconds": {name: [r[name]["train_seconds"] for r in out["runs"]]
                          for name in ("reversible", "stored_twin")},
        "statistics": "std is the sample standard deviation (n - 1) over seeds",
    }
    print(out["summary"], flush=True)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=["memory", "timing", "digits"], action="append")
    parser.add_argument("--quick", action="store_true", help="small sizes, writes nothing")
    parser.add_argument("--sizes", nargs="+", default=["base", "large"], choices=list(PAIRS))
    parser.add_argument("--time-size", type=int, default=112)
    parser.add_argument("--time-batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--digits-out", type=Path, default=RESULTS / "vit_digits.json",
                        help="JSON of the digits part (default benchmarks/results/vit_digits.json)")
    parser.add_argument("--seeds", type=int, default=1,
                        help="digits: train the reversible model and its stored twin for seeds "
                             "0 .. N-1 (the same seed for both of a pair)")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error(f"--seeds must be at least 1, got {args.seeds}")
    if args.threads:
        torch.set_num_threads(args.threads)
    parts = args.only or ["memory", "timing", "digits"]
    img, time_img = (32, 32) if args.quick else (224, args.time_size)
    if {"memory", "timing"} & set(parts):
        report: dict[str, Any] = {"environment": environment()}
        if "memory" in parts:
            report["memory"] = {"environment": environment(), **memory(4, img, args.sizes)}
        if "timing" in parts:
            report["timing"] = {"environment": environment(),
                                **timing(args.time_batch, time_img, args.sizes, args.repeats)}
            report["timing"]["note"] = (
                f"step time measured at {time_img}x{time_img}, batch {args.time_batch} (memory at "
                f"{img}x{img}, batch 4): a 224x224 Rev-ViT-B / -L step takes tens of seconds on "
                "two shared CPU cores; forward + cross-entropy + backward, no optimizer")
        if not args.quick:
            path = RESULTS / "vit_memory.json"
            if path.exists() and not {"memory", "timing"} <= set(parts):  # keep the other part
                import json

                old = json.loads(path.read_text())
                report = {**old, **report}
            write_json(path, report)
    if "digits" in parts:
        report = {"environment": environment(),
                  "digits": digits(2 if args.quick else args.epochs, args.seeds)}
        if not args.quick:
            write_json(args.digits_out, report)


if __name__ == "__main__":
    main()
