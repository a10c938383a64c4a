r"""Density benchmarks of the flow models, trained through the reversible engine.

1. 2-D densities with a known optimum (test NLL in nats, gap to the optimum):

   * ``8gaussians``: :math:`x = (4 c_k + 0.5\,\xi) / 1.414`, :math:`c_k` the 8 unit vectors at
     multiples of 45 degrees, :math:`\xi \sim \mathcal N(0, I)`; i.e. an equal mixture of 8
     Gaussians with centres at radius :math:`4 / 1.414` and standard deviation
     :math:`0.5 / 1.414`. Optimal NLL = its entropy, estimated here by Monte Carlo with the
     exact mixture density (about 2.84 nats; the components barely overlap, so it is close to
     :math:`\ln 8 + \ln(2\pi e \sigma^2)`).
   * ``checkerboard``: uniform on the 8 dark cells of a 4x4 checkerboard of 2x2 cells on
     :math:`[-4, 4]^2`: area 32, optimal NLL :math:`\ln 32 = 3.466` nats.

   Model: ``realnvp(dim=2)`` (affine couplings with alternating masks, ActNorm), fresh
   samples every step, Adam with cosine decay, a fixed number of steps; test NLL on fresh
   samples.

2. scikit-learn digits (8x8, 17 grey levels, no download): test bits/dim with uniform
   dequantization, :math:`\text{bpd} = -(\log p(y) - 64 \ln 17) / (64 \ln 2)` averaged over
   dequantization draws (an upper bound on the discrete model's bits/dim), for ``realnvp``
   and ``glow``, each trained with ``memory="reversible"`` and ``memory="stored"`` from the
   same seed; and ``realnvp`` with a variational dequantizer trained jointly.

Writes ``benchmarks/results/flows.json`` with the device, torch version, command and config.

Run: ``python benchmarks/flows.py`` (about 10 minutes on a 2-core CPU, one thread), ``--quick`` for a
smoke run, ``--only 2d`` / ``--only digits`` for one part.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from revtrain.flows import UniformDequantization, VariationalDequantization, bits_per_dim
from revtrain.models import create

RESULTS = Path(__file__).resolve().parent / "results" / "flows.json"


# --------------------------------------------------------------------------- 2-D densities


def _eight_centres() -> torch.Tensor:
    angles = torch.arange(8, dtype=torch.float64) * (math.pi / 4)
    return 4.0 * torch.stack([angles.cos(), angles.sin()], dim=1)  # (8, 2)


def sample_8gaussians(n: int, gen: torch.Generator) -> torch.Tensor:
    """``n`` points of the 8-Gaussian mixture (see the module docstring), float64."""
    centres = _eight_centres()[torch.randint(0, 8, (n,), generator=gen)]
    noise = torch.randn(n, 2, generator=gen, dtype=torch.float64)
    return (centres + 0.5 * noise) / 1.414


def log_density_8gaussians(x: torch.Tensor) -> torch.Tensor:
    """Exact log density of :func:`sample_8gaussians`."""
    sigma = 0.5 / 1.414
    mu = _eight_centres() / 1.414  # (8, 2)
    d2 = (x.unsqueeze(1) - mu.unsqueeze(0)).square().sum(-1)  # (n, 8)
    log_comp = -0.5 * d2 / sigma**2 - math.log(2 * math.pi * sigma**2)
    return torch.logsumexp(log_comp, dim=1) - math.log(8)


def sample_checkerboard(n: int, gen: torch.Generator) -> torch.Tensor:
    """``n`` points uniform on the dark cells of the 4x4 checkerboard on ``[-4, 4]^2``."""
    u = torch.rand(n, 2, generator=gen, dtype=torch.float64)
    x1 = 4 * u[:, 0] - 2  # [-2, 2)
    x2 = u[:, 1] - 2 * torch.randint(0, 2, (n,), generator=gen).double()  # [-2, 1)
    x2 = x2 + torch.floor(x1) % 2
    return 2 * torch.stack([x1, x2], dim=1)


def log_density_checkerboard(x: torch.Tensor) -> torch.Tensor:
    """Exact log density of :func:`sample_checkerboard`: ``-ln 32`` on the support."""
    cell = torch.floor(x / 2)  # indices in {-2, ..., 1}
    inside = (x.abs() <= 4).all(1) & ((cell[:, 0] + cell[:, 1]) % 2 == 0)
    return torch.where(inside, torch.tensor(-math.log(32.0), dtype=x.dtype),
                       torch.tensor(-math.inf, dtype=x.dtype))


DENSITIES = {
    "8gaussians": (sample_8gaussians, log_density_8gaussians),
    "checkerboard": (sample_checkerboard, log_density_checkerboard),
}


@functools.cache
def optimum(name: str, n: int = 1_000_000) -> dict[str, float]:
    """Entropy of a density: Monte Carlo mean of ``-log p`` with the exact density."""
    sampler, log_density = DENSITIES[name]
    x = sampler(n, torch.Generator().manual_seed(123))
    nll = -log_density(x)
    assert torch.isfinite(nll).all(), "a sample lies outside the support of the exact density"
    return {"mc_nats": float(nll.mean()), "mc_stderr": float(nll.std() / math.sqrt(n)),
            "closed_form_nats": (math.log(32.0) if name == "checkerboard" else
                                 math.log(8) + math.log(2 * math.pi * math.e * (0.5 / 1.414) ** 2))}


def fit_2d(model: torch.nn.Module, name: str, steps: int, batch: int, seed: int = 0,
           lr: float = 2e-3, max_seconds: float = 175.0,
           log_prob: Callable[[torch.Tensor], torch.Tensor] | None = None,
           per_point: bool = False) -> dict[str, Any]:
    """The training loop and test of every 2-D run, revtrain's and the peers'
    (``benchmarks/peers_flows.py``): Adam at ``lr`` with cosine decay over ``steps``, a fresh
    batch of ``batch`` float32 samples each step (generator seeded ``seed + 1``), stopping at
    ``steps`` or ``max_seconds``; test NLL on 100,000 fresh samples (seed ``seed + 999``)
    against the density's optimum. ``log_prob`` defaults to ``model.log_prob``. With
    ``per_point`` the result also holds ``"test_nll_per_point"``, the float64 tensor of the
    100,000 test NLLs (the same points for every model of a seed: paired comparisons)."""
    log_prob = log_prob or model.log_prob
    sampler, _ = DENSITIES[name]
    gen = torch.Generator().manual_seed(seed + 1)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    start, cpu_start = time.perf_counter(), time.process_time()
    model.train()
    done = 0
    while done < steps and time.perf_counter() - start < max_seconds:
        done += 1
        x = sampler(batch, gen).float()
        loss = -log_prob(x).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    train_s, cpu_s = time.perf_counter() - start, time.process_time() - cpu_start
    model.eval()
    test = sampler(100_000, torch.Generator().manual_seed(seed + 999)).float()
    with torch.no_grad():
        nll = torch.cat([-log_prob(chunk) for chunk in test.split(10_000)]).double()
    best = optimum(name)
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "steps_planned": steps, "steps_done": done, "batch": batch, "lr": lr,
        "schedule": "Adam, cosine decay over steps_planned", "max_seconds": max_seconds,
        "train_seconds": round(train_s, 1), "train_cpu_seconds": round(cpu_s, 1),
        "ms_per_step": round(1000 * train_s / done, 3) if done else None,
        "cpu_ms_per_step": round(1000 * cpu_s / done, 3) if done else None,
        "test_points": len(test), "test_nll_nats": float(nll.mean()),
        "test_nll_stderr": float(nll.std() / math.sqrt(len(nll))),
        "optimal_nll_nats": best["mc_nats"], "optimal_nll_stderr": best["mc_stderr"],
        "optimal_closed_form_nats": best["closed_form_nats"],
        "gap_nats": float(nll.mean()) - best["mc_nats"],
        **({"test_nll_per_point": nll} if per_point else {}),
    }


def train_2d(name: str, steps: int, batch: int, config: dict[str, Any], seed: int = 0,
             memory: str = "reversible", lr: float = 2e-3,
             max_seconds: float = 175.0, model_name: str = "realnvp") -> dict[str, Any]:
    """Train ``model_name(dim=2)`` (``realnvp``, ``nsf``, ...) for ``steps`` steps (or until
    ``max_seconds``) with :func:`fit_2d`, initialised after ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    model = create(model_name, dim=2, memory=memory, **config)
    return {"density": name, "model": model_name, "memory": memory, "config": config,
            **fit_2d(model, name, steps, batch, seed, lr, max_seconds)}


# --------------------------------------------------------------------------- digits


def load_digits_split(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn digits as integer images ``(N, 1, 8, 8)`` in ``0..16``; 1500 / 297 split."""
    from sklearn.datasets import load_digits

    data = torch.as_tensor(load_digits().images, dtype=torch.long).unsqueeze(1)
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    data = data[perm]
    return data[:1500], data[1500:]


def digits_bpd(model: torch.nn.Module, x: torch.Tensor, deq: torch.nn.Module,
               draws: int = 8) -> float:
    """Mean test bits/dim over ``draws`` dequantizations (an upper bound, for either ``deq``)."""
    model.eval()
    deq.eval()
    values = []
    with torch.no_grad():
        for _ in range(draws):
            y, log_q = deq(x)
            values.append(bits_per_dim(model.log_prob(y) - log_q, x[0].numel()))
    return float(torch.stack(values).mean())


def train_digits(name: str, memory: str, epochs: int, config: dict[str, Any], batch: int = 64,
                 lr: float = 2e-3, seed: int = 0, dequant: str = "uniform") -> dict[str, Any]:
    """Train on 1500 digits; test bits/dim on the other 297.

    ``dequant="variational"`` trains a :class:`VariationalDequantization` jointly with the
    model (same bound, tighter when ``q`` fits the model's density within each cell).
    """
    train, test = load_digits_split()
    torch.manual_seed(seed)
    model = create(name, in_channels=1, image_size=8, memory=memory, **config)
    if dequant == "variational":
        deq: torch.nn.Module = VariationalDequantization(17, (1, 8, 8), hidden=16)
    else:
        deq = UniformDequantization(17)
    params = [*model.parameters(), *deq.parameters()]
    opt = torch.optim.Adam(params, lr=lr)
    steps = epochs * math.ceil(len(train) / batch)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    gen = torch.Generator().manual_seed(seed + 1)
    curve = []
    start = time.perf_counter()
    for _epoch in range(epochs):
        model.train()
        deq.train()
        order = torch.randperm(len(train), generator=gen)
        total = 0.0
        for idx in order.split(batch):
            y, log_q = deq(train[idx])
            bpd = bits_per_dim(model.log_prob(y) - log_q, 64).mean()
            opt.zero_grad(set_to_none=True)
            bpd.backward()
            torch.nn.utils.clip_grad_norm_(params, 50.0)
            opt.step()
            sched.step()
            total += bpd.item() * len(idx)
        curve.append(round(total / len(train), 4))
    train_s = time.perf_counter() - start
    torch.manual_seed(seed + 2)
    return {
        "model": name, "memory": memory, "dequantization": dequant, "config": config,
        "dequantizer_params": sum(p.numel() for p in deq.parameters()),
        "epochs": epochs, "batch": batch,
        "lr": lr, "train_images": len(train), "test_images": len(test),
        "params": sum(p.numel() for p in model.parameters()),
        "train_seconds": round(train_s, 1), "train_bpd_per_epoch": curve,
        "test_bpd": digits_bpd(model, test, deq),
        "uniform_baseline_bpd": math.log2(17),
    }


# --------------------------------------------------------------------------- main


def environment() -> dict[str, Any]:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, cwd=Path(__file__).parent, check=False).stdout.strip()
    except OSError:
        commit = None
    return {
        "device": "cpu", "machine": "2-core CPU dev box" if os.cpu_count() == 2 else platform.node(),
        "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "python": platform.python_version(),
        "load_average_at_start": list(os.getloadavg()),
        "command": " ".join(shlex.quote(a) for a in ["python", *sys.argv]),
        "git_commit": commit, "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", choices=["2d", "digits", "2d-spline", "digits-spline"],
                        default=None,
                        help="one part; 2d-spline: the spline flow (nsf) on the 2-D densities; "
                        "digits-spline: spline_realnvp and glow with the logit on digits "
                        "(--memories for both)")
    parser.add_argument("--epochs", type=int, default=30, help="digits training epochs")
    parser.add_argument("--nsf", type=json.loads, default=None,
                        help="nsf keyword arguments of the 2d-spline runs, as JSON")
    parser.add_argument("--steps", type=int, default=6000, help="2-D training steps")
    parser.add_argument("--max-seconds", type=float, default=175.0,
                        help="time limit of one 2-D training run (steps_done says where it stopped)")
    parser.add_argument("--memories", nargs="+", default=["reversible"],
                        choices=["reversible", "stored"], help="memory modes of the 2-D runs")
    parser.add_argument("--quick", action="store_true", help="tiny smoke run, nothing written")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: on a shared 2-core box two OpenMP threads "
                        "that wait for each other were many times slower)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    cfg_2d = dict(num_layers=12, hidden=64, depth=2)
    steps_2d, batch_2d = (20, 64) if args.quick else (args.steps, 512)
    cfg_nsf = args.nsf or dict(num_layers=4, hidden=64, depth=2, bins=8, bound=4.0, lu=False,
                               actnorm=False)  # nsf's defaults
    cfg_digits = {
        "realnvp": dict(levels=2, hidden=32),
        "glow": dict(levels=2, steps=8, hidden=32),
    }
    epochs = 1 if args.quick else args.epochs
    cfg_digits_spline = {
        "spline_realnvp": dict(levels=2, hidden=32, bins=8),
        "glow": dict(levels=2, steps=8, hidden=32, preprocess="logit"),
    }
    report: dict[str, Any] = {"environment": environment(), "2d": [], "digits": []}
    if args.only in (None, "2d"):
        for name in DENSITIES:
            result = train_2d(name, steps_2d, batch_2d, cfg_2d)
            print(f"{name}: test NLL {result['test_nll_nats']:.4f} nats, optimum "
                  f"{result['optimal_nll_nats']:.4f}, gap {result['gap_nats']:.4f} "
                  f"({result['train_seconds']} s)", flush=True)
            report["2d"].append(result)
    if args.only == "2d-spline":
        for name in DENSITIES:
            for memory in args.memories:
                result = train_2d(name, steps_2d, batch_2d, cfg_nsf, memory=memory,
                                  max_seconds=args.max_seconds, model_name="nsf")
                print(f"{name} nsf {memory}: test NLL {result['test_nll_nats']:.4f} nats, optimum "
                      f"{result['optimal_nll_nats']:.4f}, gap {result['gap_nats']:.4f} "
                      f"({result['steps_done']} steps, {result['train_seconds']} s)", flush=True)
                report["2d"].append(result)
    if args.only == "digits-spline":
        for name, cfg in cfg_digits_spline.items():
            for memory in args.memories:
                result = train_digits(name, memory, epochs, cfg)
                print(f"digits {name} {memory}: test {result['test_bpd']:.4f} bits/dim "
                      f"({result['train_seconds']} s)", flush=True)
                report["digits"].append(result)
    if args.only in (None, "digits"):
        runs = [(name, cfg, memory, "uniform") for name, cfg in cfg_digits.items()
                for memory in ("reversible", "stored")]
        runs.append(("realnvp", cfg_digits["realnvp"], "reversible", "variational"))
        for name, cfg, memory, dequant in runs:
            result = train_digits(name, memory, epochs, cfg, dequant=dequant)
            print(f"digits {name} {memory} {dequant}: test {result['test_bpd']:.4f} bits/dim "
                  f"({result['train_seconds']} s)", flush=True)
            report["digits"].append(result)
    report["environment"]["total_seconds"] = round(time.perf_counter() - started, 1)
    if not args.quick:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
