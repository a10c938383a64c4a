"""Activation memory of the CIFAR classifiers: reversible vs the stored-activation twin.

For each model, one training step (forward + backward, loss = mean of squared logits) on one
random batch is measured with :func:`revtrain.memory.measure_step` in every memory mode the
model supports. The stored twin is the same model (same parameters) with every reversible
stack switched to ``memory="stored"``. Prints a Markdown table and writes
``benchmarks/results/models_memory.json`` (device, torch version, configuration, rows).

Usage::

    python benchmarks/models_memory.py                      # CPU, batch 8, 32x32
    python benchmarks/models_memory.py --device cuda --batch 64
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from pathlib import Path

import torch

from revtrain import models
from revtrain.memory import format_bytes, measure_step

# parameter counts of the papers' tables (RevNet: Gomez et al. 2017, Table 1)
PAPER_PARAMS = {
    "revnet38": 0.46e6, "revnet110": 1.73e6, "revnet164": 1.75e6,
    "resnet32": 0.46e6, "resnet110": 1.73e6, "resnet164": 1.70e6, "irevnet": None,
}
DEFAULT_MODELS = ["revnet38", "revnet110", "revnet164", "irevnet",
                  "resnet32", "resnet110", "resnet164"]


def measure(name: str, modes: list[str], batch: int, size: int, device: str) -> dict:
    torch.manual_seed(0)
    model = models.create(name).to(device)
    x = torch.randn(batch, model.in_channels, size, size, device=device)
    row = {"model": name, "params": sum(p.numel() for p in model.parameters()),
           "paper_params": PAPER_PARAMS.get(name)}
    own = model.memory.value
    for mode in modes:
        if name.startswith("resnet") and mode != "stored":
            continue  # a ResNet has no invertible layers: stored only
        twin = model if mode == own else copy.deepcopy(model).set_memory(mode)
        start = time.perf_counter()
        report = measure_step(twin, x)
        row[mode] = {"peak_bytes": report["peak_bytes"], "held_bytes": report["held_bytes"],
                     "method": report["method"], "seconds": time.perf_counter() - start}
        row["device"] = report["device"]
        row["grad_bytes"] = report["grad_bytes"]
    return row


def table(rows: list[dict], modes: list[str]) -> str:
    head = "| model | params (ours) | params (paper) | param grads |"
    rule = "|---|---:|---:|---:|"
    for mode in modes:
        head += f" {mode}: held | {mode}: peak |"
        rule += "---:|---:|"
    lines = [head, rule]
    for r in rows:
        paper = f"{r['paper_params'] / 1e6:.2f}M" if r["paper_params"] else "-"
        line = (f"| {r['model']} | {r['params'] / 1e6:.3f}M | {paper} | "
                f"{format_bytes(r['grad_bytes'])} |")
        for mode in modes:
            m = r.get(mode)
            line += (f" {format_bytes(m['held_bytes'])} | {format_bytes(m['peak_bytes'])} |"
                     if m else " - | - |")
        lines.append(line)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS)
    parser.add_argument("--modes", nargs="+", default=["reversible", "stored"],
                        choices=["reversible", "checkpoint", "stored"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" /
                                             "models_memory.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = [measure(n, args.modes, args.batch, args.size, args.device) for n in args.models]
    print(table(rows, args.modes))
    record = {
        "benchmark": "models_memory",
        "config": {"batch": args.batch, "size": args.size, "dtype": "float32",
                   "loss": "mean of squared logits", "modes": args.modes,
                   "threads": args.threads},
        "device": rows[0].get("device") if rows else args.device,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
