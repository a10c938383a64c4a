"""Step time of a stack of small couplings: the reversible engine's overhead per layer.

The 2-D flow of the density benchmarks, ``realnvp(dim=2, num_layers=12, hidden=64, depth=2)``
(12 affine couplings with MLP sub-networks, an ActNorm after each) and its spline twin
``nsf(dim=2, num_layers=12, hidden=64, depth=2)``: one training step (``-log_prob(x).mean()``,
forward and backward, no optimizer) on a batch of 512, one torch thread, in the reversible and
the stored mode, same weights. Rounds of ``--steps`` steps alternate between the modes; the
figure is the fastest round of each mode (the least disturbed by other jobs on a shared
machine), as milliseconds per step of wall time and of this thread's CPU time.

Usage::

    python benchmarks/small_layers.py --label after       # appends to small_layers.json
    python benchmarks/small_layers.py --smoke --out /tmp/small.json

Records are appended to ``benchmarks/results/small_layers.json`` under ``--label`` (so that a
run before a change and one after it sit side by side), each with the machine's load average,
the command and the commit.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks.common import environment, write_json
from revtrain.models import create

RESULTS = Path(__file__).resolve().parent / "results" / "small_layers.json"
TARGET = 1.3


def time_modes(name: str, rounds: int, steps: int, batch: int = 512) -> dict[str, Any]:
    """Fastest round of each mode, ms per step (wall and thread CPU), and the ratios."""
    models = {}
    for memory in ("stored", "reversible"):
        torch.manual_seed(0)
        models[memory] = create(name, dim=2, num_layers=12, hidden=64, depth=2, memory=memory)
    x = torch.randn(batch, 2, generator=torch.Generator().manual_seed(0))

    def step(model):
        loss = -model.log_prob(x).mean()
        loss.backward()

    for model in models.values():
        for _ in range(3):
            step(model)
    times: dict[str, dict[str, list[float]]] = {m: {"wall": [], "cpu": []} for m in models}
    for r in range(rounds):
        order = list(models) if r % 2 == 0 else list(reversed(models))
        for memory in order:
            model = models[memory]
            cpu, wall = time.thread_time(), time.perf_counter()
            for _ in range(steps):
                step(model)
            times[memory]["wall"].append((time.perf_counter() - wall) / steps * 1e3)
            times[memory]["cpu"].append((time.thread_time() - cpu) / steps * 1e3)
    best = {m: {k: round(min(v), 3) for k, v in t.items()} for m, t in times.items()}
    return {
        "model": name, "config": dict(dim=2, num_layers=12, hidden=64, depth=2), "batch": batch,
        "rounds": rounds, "steps_per_round": steps,
        "ms_per_step": best,
        "ratio_wall": round(best["reversible"]["wall"] / best["stored"]["wall"], 3),
        "ratio_cpu": round(best["reversible"]["cpu"] / best["stored"]["cpu"], 3),
        "target_ratio": TARGET,
        "all_rounds_ms": {m: {k: [round(v, 2) for v in vs] for k, vs in t.items()}
                          for m, t in times.items()},
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--label", default="run", help="name of this record (e.g. before / after)")
    parser.add_argument("--models", nargs="+", default=["realnvp", "nsf"])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--smoke", action="store_true", help="2 rounds of 2 steps")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rounds, steps = (2, 2) if args.smoke else (args.rounds, args.steps)
    record = {"label": args.label, "environment": environment(),
              "results": [time_modes(n, rounds, steps) for n in args.models]}
    record["environment"]["load_average_at_end"] = list(__import__("os").getloadavg())
    for r in record["results"]:
        print(f"{args.label} {r['model']}: stored {r['ms_per_step']['stored']['wall']:.2f} ms, "
              f"reversible {r['ms_per_step']['reversible']['wall']:.2f} ms, ratio "
              f"{r['ratio_wall']:.3f} wall / {r['ratio_cpu']:.3f} CPU (target <= {TARGET})")
    previous = json.loads(args.out.read_text())["records"] if args.out.exists() else []
    write_json(args.out, {"benchmark": "small_layers", "records": [*previous, record]})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
