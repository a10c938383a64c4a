"""Step time of a stack of small couplings: the reversible engine's overhead per layer.

The 2-D flow of the density benchmarks, ``realnvp(dim=2, num_layers=12, hidden=64, depth=2)``
(12 affine couplings with MLP sub-networks, an ActNorm after each) and its spline twin
``nsf(dim=2, num_layers=12, hidden=64, depth=2)``: one training step (``-log_prob(x).mean()``,
forward and backward, no optimizer) on a batch of 512, one torch thread, in the reversible and
the stored mode, same weights. Rounds of ``--steps`` steps alternate between the modes; the
figure is the fastest round of each mode (the least disturbed by other jobs on a shared
machine), as milliseconds per step of wall time and of this thread's CPU time.

A third row, timed in the same rounds, is the *rebuild arithmetic* alone: what any rebuild of
these layers must compute, called directly on the layers without the engine — every layer
inverted from its output (without grad), each coupling's sub-networks evaluated once with grad
(their saved tensors are what backward needs) and its element-wise transform run again with
grad (to save what the transform's backward needs). ``floor_ratio`` = (stored step + that) /
stored step is what a reversible step would cost with no engine bookkeeping at all: the part
of the ratio that cutting per-layer or per-tensor overhead cannot remove. A fourth row is the
stored step under identity ``saved_tensors_hooks`` (PyTorch's cost of hooking every saved
tensor, which the engine's design needs); ``floor_with_hooks_ratio`` adds the arithmetic to it.

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
from revtrain import Coupling, ReversibleSequential
from revtrain.coupling import Additive
from revtrain.engine import layer_forward, layer_inverse
from revtrain.models import create

RESULTS = Path(__file__).resolve().parent / "results" / "small_layers.json"
TARGET = 1.3


def _leaves(module):
    for layer in module:
        if isinstance(layer, ReversibleSequential):
            yield from _leaves(layer)
        else:
            yield layer


def rebuild_arithmetic(model, x: torch.Tensor):
    """A function doing the arithmetic of one rebuild of ``model``'s stack for input ``x``,
    without the engine (see the module docstring); it returns the rebuilt input."""
    stack = next(m for m in model.modules() if isinstance(m, ReversibleSequential))
    layers = list(_leaves(stack))
    outputs, h = [], x
    with torch.no_grad():
        for layer in layers:
            h, _ = layer_forward(layer, h, None, False)
            outputs.append(h)

    def with_grad(net, inp):
        return net(inp.detach().requires_grad_())

    def coupling_inverse(layer, y):
        dim, transform = layer.split.dim, layer.transform
        replay = not isinstance(transform, Additive)  # an additive transform saves nothing
        with torch.no_grad():
            y1, y2 = layer.split.split(y)
        if layer.g is not None:
            hg = with_grad(layer.g, y1)
            with torch.no_grad():
                x2 = transform.inverse(y2, hg.detach(), dim)
        else:
            hg, x2 = None, y2
        hf = with_grad(layer.f, x2)
        with torch.no_grad():
            x1 = transform.inverse(y1, hf.detach(), dim)
            x_rebuilt = layer.split.merge(x1, x2)
        if replay:
            transform.forward(x1.requires_grad_(), hf.detach().requires_grad_(), dim)
            if hg is not None:
                transform.forward(x2.requires_grad_(), hg.detach().requires_grad_(), dim)
        return x_rebuilt

    def run() -> torch.Tensor:
        y = outputs[-1]
        for layer in reversed(layers):
            if isinstance(layer, Coupling):
                y = coupling_inverse(layer, y)
            else:
                with torch.no_grad():
                    y = layer_inverse(layer, y, None)
        return y

    return run


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
    arithmetic = rebuild_arithmetic(models["stored"], x)
    with torch.no_grad():
        rebuilt_error = float((arithmetic() - x).abs().max())  # it does invert the stack

    def stored_under_hooks():  # the stored step under identity saved-tensor hooks
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
            loss = -models["stored"].log_prob(x).mean()
        loss.backward()

    work = {**{m: (lambda model=model: step(model)) for m, model in models.items()},
            "rebuild_arithmetic": arithmetic, "stored_under_hooks": stored_under_hooks}
    times: dict[str, dict[str, list[float]]] = {m: {"wall": [], "cpu": []} for m in work}
    for r in range(rounds):
        order = list(work) if r % 2 == 0 else list(reversed(work))
        for what in order:
            run = work[what]
            cpu, wall = time.thread_time(), time.perf_counter()
            for _ in range(steps):
                run()
            times[what]["wall"].append((time.perf_counter() - wall) / steps * 1e3)
            times[what]["cpu"].append((time.thread_time() - cpu) / steps * 1e3)
    best = {m: {k: round(min(v), 3) for k, v in t.items()} for m, t in times.items()}

    def over_stored(*rows: str) -> dict[str, float]:  # the rows' sum / the stored step, per clock
        return {k: round(sum(best[r][k] for r in rows) / best["stored"][k], 3) for k in ("wall", "cpu")}

    ratio = over_stored("reversible")
    floor = over_stored("stored", "rebuild_arithmetic")
    hooked_floor = over_stored("stored_under_hooks", "rebuild_arithmetic")
    return {
        "model": name, "config": dict(dim=2, num_layers=12, hidden=64, depth=2), "batch": batch,
        "rounds": rounds, "steps_per_round": steps,
        "ms_per_step": best,
        "ratio_wall": ratio["wall"], "ratio_cpu": ratio["cpu"],
        "floor_ratio_wall": floor["wall"], "floor_ratio_cpu": floor["cpu"],
        "hooks_ratio_cpu": over_stored("stored_under_hooks")["cpu"],
        "floor_with_hooks_ratio_wall": hooked_floor["wall"],
        "floor_with_hooks_ratio_cpu": hooked_floor["cpu"],
        "rebuild_arithmetic_max_error": rebuilt_error,
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
              f"{r['ratio_wall']:.3f} wall / {r['ratio_cpu']:.3f} CPU (target <= {TARGET}); "
              f"rebuild arithmetic alone {r['ms_per_step']['rebuild_arithmetic']['wall']:.2f} ms, "
              f"floor {r['floor_ratio_wall']:.3f} wall / {r['floor_ratio_cpu']:.3f} CPU; identity "
              f"saved-tensor hooks {r['hooks_ratio_cpu']:.3f}x the stored step, floor with them "
              f"{r['floor_with_hooks_ratio_cpu']:.3f} CPU")
    previous = json.loads(args.out.read_text())["records"] if args.out.exists() else []
    write_json(args.out, {"benchmark": "small_layers", "records": [*previous, record]})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
