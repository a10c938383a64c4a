r"""Peers side by side: revtrain's spline flow beside zuko's and nflows' neural spline flows.

The 2-D densities of ``benchmarks/flows.py`` (``8gaussians``, ``checkerboard``), with its
samplers, optimum (Monte Carlo entropy of the exact density), training loop and test set
(:func:`benchmarks.flows.fit_2d`: Adam 2e-3 with cosine decay over the steps, a fresh batch of
512 samples every step, 6000 steps, test NLL on 100,000 fresh samples). Every model is
initialised after ``torch.manual_seed(0)`` and sees the same batches.

* revtrain ``nsf`` (its defaults: 4 rational-quadratic spline half couplings with alternating
  masks, MLPs 2 x 64, 8 bins on ``[-4, 4]``, identity tails), ``memory="reversible"`` and
  ``"stored"``;
* zuko's ``zuko.flows.NSF`` (Durkan et al. 2019 as zuko ships it: 4 masked autoregressive
  rational-quadratic spline transforms, alternating order, 8 bins on zuko's fixed ``[-5, 5]``;
  in 2-D each transform maps ``x_1`` by a spline with free parameters and ``x_2`` by one
  conditioned on ``x_1``), its MaskedMLP's width chosen to match revtrain's parameter count;
* nflows' ``PiecewiseRationalQuadraticCouplingTransform`` (its coupling NSF: 4 couplings with
  alternating masks, linear tails at ``tail_bound=4``, 8 bins), each with the same MLP
  sub-network as revtrain's (``revtrain.flows.MLP``, zero last layer), width matched too;
  nflows divides the raw bin widths and heights by ``sqrt(width)``, as it does for its own nets.

``--bins``, ``--bound``, ``--num-layers`` and ``--hidden`` change revtrain's configuration and
give the peers the same structural choice where they have it: the number of bins and of
transforms for all (then the peers' widths are matched again), nflows' ``tail_bound`` too
(zuko's domain stays ``[-5, 5]``: it has no such argument).

Every model is tested on the same 100,000 points, so the comparison is paired: for revtrain
reversible against each other model, the mean of the per-point NLL difference (revtrain minus
the other; negative: revtrain is better) and its standard error, ``std(d) / sqrt(n)``, far
smaller than either model's own ``test_nll_stderr`` because the points' spread is shared
(:func:`paired_difference`; the ``"paired"`` list of the JSON).

A peer whose parameter count is more than 20 % away from revtrain's ``nsf`` is refused. Step
time is the training loop's wall time per step (sampling included, the same for every model)
and its process CPU time per step, one thread; the load average before and after each run is
recorded because the dev box is shared.

Writes ``benchmarks/results/peers_flows.json`` (device, torch / zuko / nflows versions,
command, config, load average). Run: ``OMP_NUM_THREADS=1 python benchmarks/peers_flows.py``
(6000 steps); ``--quick`` for 300 steps, nothing written unless ``--out`` is given.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.flows import DENSITIES, environment, fit_2d  # noqa: E402
from revtrain.flows import MLP  # noqa: E402
from revtrain.models import create  # noqa: E402

__all__ = ["NSF_CONFIG", "PARAM_TOLERANCE", "build", "check_params", "main", "matched_width",
           "num_params", "paired_difference"]

RESULTS = Path(__file__).resolve().parent / "results" / "peers_flows.json"
#: revtrain ``nsf``'s defaults, the configuration of ``benchmarks/flows.py --only 2d-spline``
NSF_CONFIG = dict(num_layers=4, hidden=64, depth=2, bins=8, bound=4.0, lu=False, actnorm=False)
PARAM_TOLERANCE = 0.20
LIBRARIES = ("revtrain", "zuko", "nflows")

Model = tuple[nn.Module, Callable[[Tensor], Tensor]]


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def zuko_nsf(hidden: int, layers: int, depth: int, bins: int) -> Model:
    """``zuko.flows.NSF`` on 2-D data; ``log_prob`` builds the distribution as zuko's docs do."""
    import zuko

    flow = zuko.flows.NSF(2, transforms=layers, bins=bins, hidden_features=(hidden,) * depth)
    return flow, lambda x: flow().log_prob(x)


class _NflowsNet(nn.Module):
    """``net(x)`` called as nflows calls a coupling network, ``net(x, context)``.

    ``hidden_features`` is what nflows reads off its own nets (``ResidualNet``) to divide the
    raw bin widths and heights by ``sqrt(hidden_features)``, as it does for them.
    """

    def __init__(self, net: nn.Module, hidden_features: int):
        super().__init__()
        self.net = net
        self.hidden_features = hidden_features

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        return self.net(x)


def nflows_nsf(hidden: int, layers: int, depth: int, bins: int, bound: float) -> Model:
    """nflows' coupling NSF: rational-quadratic spline couplings, alternating masks, linear tails."""
    from nflows.distributions.normal import StandardNormal
    from nflows.flows.base import Flow
    from nflows.transforms.base import CompositeTransform
    from nflows.transforms.coupling import PiecewiseRationalQuadraticCouplingTransform

    transforms = [
        PiecewiseRationalQuadraticCouplingTransform(
            mask=torch.tensor([1 if j % 2 == i % 2 else 0 for j in range(2)]),
            transform_net_create_fn=lambda n_in, n_out: _NflowsNet(
                MLP(n_in, n_out, hidden, depth), hidden),
            num_bins=bins, tails="linear", tail_bound=bound)
        for i in range(layers)
    ]
    flow = Flow(CompositeTransform(transforms), StandardNormal([2]))
    return flow, flow.log_prob


def build(library: str, hidden: int, config: dict[str, Any] = NSF_CONFIG,
          memory: str = "reversible") -> Model:
    """The model of ``library`` with MLPs of width ``hidden`` (the other sizes from ``config``)."""
    layers, depth, bins = config["num_layers"], config["depth"], config["bins"]
    if library == "revtrain":
        model = create("nsf", dim=2, memory=memory, **{**config, "hidden": hidden})
        return model, model.log_prob
    if library == "zuko":
        return zuko_nsf(hidden, layers, depth, bins)
    if library == "nflows":
        return nflows_nsf(hidden, layers, depth, bins, config["bound"])
    raise ValueError(f"unknown library {library!r}; use one of {', '.join(LIBRARIES)}")


def matched_width(library: str, target: int, config: dict[str, Any] = NSF_CONFIG,
                  low: int = 1, high: int = 1024) -> int:
    """The MLP width in ``low..high`` of ``library``'s model whose parameter count is closest to
    ``target`` (the count grows with the width: a bisection)."""
    def count(h: int) -> int:
        return num_params(build(library, h, config)[0])

    lo, hi = low, high  # the first width with count >= target lies in lo..hi
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if count(mid) < target else (lo, mid)
    candidates = [h for h in (lo - 1, lo) if low <= h <= high]
    return min(candidates, key=lambda h: abs(count(h) / target - 1))


def check_params(library: str, count: int, target: int,
                 tolerance: float = PARAM_TOLERANCE) -> None:
    """``ValueError`` when ``count`` is more than ``tolerance`` away from ``target``."""
    if abs(count / target - 1) > tolerance:
        raise ValueError(f"{library}: {count:,} parameters, {count / target - 1:+.1%} from "
                         f"revtrain nsf's {target:,}; a side-by-side needs them within "
                         f"{tolerance:.0%} (choose another width)")


def paired_difference(nll_a: Tensor, nll_b: Tensor) -> dict[str, float]:
    """Paired comparison of two models' NLLs on the same test points.

    ``d_i = nll_a[i] - nll_b[i]``; returns its mean (``mean_diff_nats``: negative when ``a`` is
    better), the standard error of that mean ``std(d) / sqrt(n)`` (``stderr_nats``, sample std),
    ``z = mean / stderr`` and ``n``.
    """
    if nll_a.shape != nll_b.shape or nll_a.dim() != 1 or len(nll_a) < 2:
        raise ValueError(f"paired_difference: needs two 1-D NLL tensors over the same test points "
                         f"(n >= 2), got shapes {tuple(nll_a.shape)} and {tuple(nll_b.shape)}")
    d = nll_a.double() - nll_b.double()
    mean, se = float(d.mean()), float(d.std() / math.sqrt(len(d)))
    return {"mean_diff_nats": mean, "stderr_nats": se, "z": mean / se if se > 0 else math.inf,
            "test_points": len(d)}


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in ("zuko", "nflows"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def run(tasks: list[str], steps: int, batch: int, max_seconds: float, seed: int = 0,
        config: dict[str, Any] = NSF_CONFIG, stored: bool = True,
        ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Train every model on every task with :func:`benchmarks.flows.fit_2d`: one row each, and
    the paired differences of revtrain reversible against every other model of the task."""
    target = num_params(build("revtrain", config["hidden"], config)[0])
    widths = {"revtrain": config["hidden"], "zuko": matched_width("zuko", target, config),
              "nflows": matched_width("nflows", target, config)}
    runs = [("revtrain", "reversible"), ("revtrain", "stored"), ("zuko", "stored"),
            ("nflows", "stored")]
    if not stored:
        runs.remove(("revtrain", "stored"))
    rows, pairs = [], []
    for task in tasks:
        nlls = {}
        for library, memory in runs:
            torch.manual_seed(seed)
            model, log_prob = build(library, widths[library], config, memory)
            count = num_params(model)
            check_params(library, count, target)
            load_before = os.getloadavg()[0]
            result = fit_2d(model, task, steps, batch, seed, max_seconds=max_seconds,
                            log_prob=log_prob, per_point=True)
            nlls[library, memory] = result.pop("test_nll_per_point")
            row = {"density": task, "library": library, "memory": memory,
                   "hidden": widths[library], "params_vs_revtrain": round(count / target - 1, 4),
                   **result, "load_before": round(load_before, 2),
                   "load_after": round(os.getloadavg()[0], 2)}
            print(f"{task:12s} {library:8s} {memory:10s} {count:6,d} params: test NLL "
                  f"{row['test_nll_nats']:.4f}, gap {row['gap_nats']:.4f}, "
                  f"{row['ms_per_step']:.2f} ms/step ({row['cpu_ms_per_step']:.2f} CPU), "
                  f"{row['steps_done']} steps, load {row['load_before']}-{row['load_after']}",
                  flush=True)
            rows.append(row)
        reference = nlls["revtrain", "reversible"]
        for (library, memory), nll in list(nlls.items())[1:]:
            pair = {"density": task, "a": "revtrain reversible", "b": f"{library} {memory}",
                    **paired_difference(reference, nll)}
            print(f"{task:12s} revtrain reversible - {library} {memory}: "
                  f"{pair['mean_diff_nats']:+.5f} ± {pair['stderr_nats']:.5f} nats (paired SE, "
                  f"z {pair['z']:+.1f})", flush=True)
            pairs.append(pair)
    return rows, pairs


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="300 steps (unless --steps), nothing written unless --out")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default 6000)")
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--tasks", nargs="+", default=list(DENSITIES), choices=list(DENSITIES))
    parser.add_argument("--max-seconds", type=float, default=900.0,
                        help="time limit of one training run (steps_done says where it stopped)")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"JSON to write (default {RESULTS.relative_to(RESULTS.parents[2])} "
                        "unless --quick)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--bins", type=int, default=NSF_CONFIG["bins"],
                        help="spline bins of every model (default %(default)s)")
    parser.add_argument("--bound", type=float, default=NSF_CONFIG["bound"],
                        help="revtrain's spline interval [-B, B] and nflows' tail_bound "
                        "(default %(default)s; zuko's is fixed at 5)")
    parser.add_argument("--num-layers", type=int, default=NSF_CONFIG["num_layers"],
                        help="spline transforms of every model (default %(default)s)")
    parser.add_argument("--hidden", type=int, default=NSF_CONFIG["hidden"],
                        help="revtrain's MLP width; the peers' are matched to its parameter "
                        "count (default %(default)s)")
    parser.add_argument("--no-stored", action="store_true",
                        help="skip revtrain stored (it repeats reversible's NLL to ~5e-4)")
    parser.add_argument("--seed", type=int, default=0,
                        help="initial weights (torch.manual_seed), batches (seed + 1) and test "
                             "points (seed + 999); the same for every model of a run")
    args = parser.parse_args(argv)
    config = {**NSF_CONFIG, "bins": args.bins, "bound": args.bound,
              "num_layers": args.num_layers, "hidden": args.hidden}
    torch.set_num_threads(args.threads)
    steps = args.steps or (300 if args.quick else 6000)
    started = time.perf_counter()
    report: dict[str, Any] = {
        "environment": {**environment(), **versions(),
                        "omp_num_threads": os.environ.get("OMP_NUM_THREADS")},
        "config": {"revtrain_nsf": config, "steps": steps, "batch": args.batch,
                   "lr": 2e-3, "schedule": "Adam, cosine decay over the steps",
                   "param_tolerance": PARAM_TOLERANCE, "seed": args.seed, "tasks": args.tasks,
                   "max_seconds": args.max_seconds},
    }
    report["runs"], report["paired"] = run(args.tasks, steps, args.batch, args.max_seconds,
                                           seed=args.seed, config=config,
                                           stored=not args.no_stored)
    report["environment"]["total_seconds"] = round(time.perf_counter() - started, 1)
    report["environment"]["load_average_at_end"] = list(os.getloadavg())
    out = args.out if args.out is not None or args.quick else RESULTS
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
