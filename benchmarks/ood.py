r"""Out-of-distribution inputs to a digits flow: raw likelihood versus the typicality test.

Reproduces, at toy scale, the finding of Nalisnick et al. 2019 ("Do deep generative models know
what they don't know?"): a flow trained on one image set can give *higher* likelihood to images
of another kind. And the remedy of Nalisnick et al. 2019 ("Detecting out-of-distribution inputs
to deep generative models using typicality"): flag a batch of M inputs whose mean NLL is far
from the training set's, :math:`|\overline{\mathrm{NLL}}_M - \widehat{H}|`, in either direction.

Model: ``realnvp(in_channels=1, image_size=8, levels=2, hidden=32)`` (or ``--model
spline_realnvp``, then ``bins=8``) trained with uniform dequantization on scikit-learn digits
(17 grey levels, ``benchmarks.flows.load_digits_split``: 1500 train / 297 test; of the 1500,
the first 1200 train and the last 300 are held out to estimate the mean training NLL).
Bits/dim per image: :math:`-(\log p(y) - 64 \ln 17) / (64 \ln 2)` averaged over 8
dequantization draws, as in ``benchmarks/flows.py``.

OOD sets (297 images each, integer levels 0..16): ``inverted`` (16 - x of the test digits),
``noise`` (uniform levels), ``constant`` (image i is level i mod 17 everywhere), ``flipped``
(test digits upside-down) and ``rot90`` (test digits rotated 90 degrees).

Scores, with the test digits as negatives and the OOD set as positives:

* raw likelihood: score = bits/dim of one image (higher = more OOD); AUROC < 0.5 means the OOD
  set gets *higher* likelihood than the test digits;
* typicality, batch size M: score = |mean bits/dim of M images - mean held-out training
  bits/dim|; M = 1 scores each image, M > 1 scores ``--batches`` random batches of M distinct
  images drawn from each set.

Writes ``benchmarks/results/ood.json`` and ``benchmarks/results/ood.png`` (histograms).

Run: ``python benchmarks/ood.py`` (about a minute on a 2-core CPU, one thread); ``--quick`` for
a smoke run (1 epoch).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import environment, finish_figure, spread  # noqa: E402
from benchmarks.flows import load_digits_split  # noqa: E402
from revtrain.flows import UniformDequantization, bits_per_dim  # noqa: E402
from revtrain.models import create  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
LEVELS = 17


# --------------------------------------------------------------------------- scores


def auroc(in_scores: torch.Tensor, out_scores: torch.Tensor) -> float:
    """AUROC of telling ``out_scores`` (positives) from ``in_scores``; higher = more OOD."""
    from sklearn.metrics import roc_auc_score

    scores = torch.cat([in_scores, out_scores]).double().numpy()
    labels = [0] * len(in_scores) + [1] * len(out_scores)
    return float(roc_auc_score(labels, scores))


def batch_means(values: torch.Tensor, m: int, batches: int, gen: torch.Generator) -> torch.Tensor:
    """Means of ``batches`` random batches of ``m`` distinct entries of ``values``
    (``m = 1``: the values themselves)."""
    if m == 1:
        return values.clone()
    if m > len(values):
        raise ValueError(f"batch size {m} exceeds the {len(values)} values")
    idx = torch.stack([torch.randperm(len(values), generator=gen)[:m] for _ in range(batches)])
    return values[idx].mean(1)


def typicality_scores(values: torch.Tensor, train_mean: float, m: int, batches: int,
                      gen: torch.Generator) -> torch.Tensor:
    """Typicality statistic of batches of ``m``: ``|mean NLL of the batch - train_mean|``."""
    return (batch_means(values, m, batches, gen) - train_mean).abs()


def ood_sets(test: torch.Tensor, seed: int = 0) -> dict[str, torch.Tensor]:
    """The OOD image sets (integer levels 0..16), each as many images as ``test``."""
    n = len(test)
    gen = torch.Generator().manual_seed(seed)
    return {
        "inverted": (LEVELS - 1) - test,
        "noise": torch.randint(0, LEVELS, test.shape, generator=gen),
        "constant": (torch.arange(n) % LEVELS).view(n, 1, 1, 1).expand_as(test).clone(),
        "flipped": test.flip(-2),
        "rot90": test.rot90(1, dims=(-2, -1)),
    }


# --------------------------------------------------------------------------- model


def per_image_bpd(model: torch.nn.Module, x: torch.Tensor, draws: int = 8) -> torch.Tensor:
    """Bits/dim of each image, averaged over ``draws`` uniform dequantizations."""
    model.eval()
    deq = UniformDequantization(LEVELS)
    with torch.no_grad():
        out = [bits_per_dim(model.log_prob(y) - log_q, x[0].numel())
               for y, log_q in (deq(x) for _ in range(draws))]
    return torch.stack(out).mean(0)


def train_flow(name: str, train: torch.Tensor, epochs: int, batch: int = 64, lr: float = 2e-3,
               seed: int = 0) -> tuple[torch.nn.Module, list[float]]:
    """Train a digits flow with uniform dequantization (Adam, cosine decay); per-epoch bits/dim."""
    torch.manual_seed(seed)
    config: dict[str, Any] = dict(levels=2, hidden=32)
    if name == "spline_realnvp":
        config["bins"] = 8
    model = create(name, in_channels=1, image_size=8, **config)
    deq = UniformDequantization(LEVELS)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * math.ceil(len(train) / batch))
    gen = torch.Generator().manual_seed(seed + 1)
    curve = []
    for _ in range(epochs):
        model.train()
        total = 0.0
        for idx in torch.randperm(len(train), generator=gen).split(batch):
            y, log_q = deq(train[idx])
            loss = bits_per_dim(model.log_prob(y) - log_q, 64).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 50.0)
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        curve.append(round(total / len(train), 4))
    return model, curve


# --------------------------------------------------------------------------- main


def plot(bpd: dict[str, torch.Tensor], train_mean: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    finite = torch.cat([v[torch.isfinite(v)] for v in bpd.values()])
    lo, hi = float(finite.min()), float(finite.quantile(0.995))
    bins = torch.linspace(lo, hi, 60).numpy()
    for name, values in bpd.items():
        ax.hist(values.clamp(lo, hi).numpy(), bins=bins, histtype="step", density=True,
                label=name, linewidth=2 if name == "test digits" else 1)
    ax.axvline(train_mean, color="k", linestyle="--", linewidth=1, label="held-out train mean")
    finish_figure(fig, ax, path, "bits/dim (uniform dequantization)", "density",
                  "digits flow: bits/dim per image")


def evaluate_seed(name: str, train: torch.Tensor, held_out: torch.Tensor, test: torch.Tensor,
                  epochs: int, seed: int, batch_sizes: list[int], batches: int) -> dict[str, Any]:
    """Train one flow (``seed``) and score the test digits and every OOD set with it.

    Seed 0 is the single run this script has always made (training seed 0, dequantization
    draws from seed 2, typicality batches from seed 3); seed ``s`` shifts all three by ``s``."""
    started = time.perf_counter()
    model, curve = train_flow(name, train, epochs, seed=seed)
    train_seconds = time.perf_counter() - started
    torch.manual_seed(2 + seed)
    held_bpd = per_image_bpd(model, held_out)
    train_mean = float(held_bpd.mean())
    bpd = {"test digits": per_image_bpd(model, test)}
    for set_name, x in ood_sets(test).items():
        bpd[set_name] = per_image_bpd(model, x)
    gen = torch.Generator().manual_seed(3 + seed)
    rows = []
    for set_name, values in bpd.items():
        if set_name == "test digits":
            continue
        row: dict[str, Any] = {
            "set": set_name, "images": len(values), "mean_bpd": float(values.mean()),
            "median_bpd": float(values.median()),
            "frac_below_test_median": float((values < bpd["test digits"].median()).double().mean()),
            "auroc_likelihood": auroc(bpd["test digits"], values),
        }
        for m in batch_sizes:
            row[f"auroc_typicality_M{m}"] = auroc(
                typicality_scores(bpd["test digits"], train_mean, m, batches, gen),
                typicality_scores(values, train_mean, m, batches, gen))
        rows.append(row)
        print(f"seed {seed} {set_name:9s} mean {row['mean_bpd']:8.3f} bits/dim  AUROC likelihood "
              f"{row['auroc_likelihood']:.3f}  "
              + "  ".join(f"typicality M={m} {row[f'auroc_typicality_M{m}']:.3f}"
                          for m in batch_sizes), flush=True)
    return {"seed": seed, "rows": rows, "bpd": bpd, "train_mean": train_mean, "curve": curve,
            "train_seconds": train_seconds}


def seed_summary(runs: list[dict[str, Any]], keys: list[str]) -> dict[str, Any]:
    """Mean, sample std (n - 1; None for one seed), min and max of each key, per OOD set."""
    out: dict[str, Any] = {}
    for i, row in enumerate(runs[0]["rows"]):
        out[row["set"]] = {}
        for key in keys:
            values = [r["rows"][i][key] for r in runs]
            out[row["set"]][key] = {"per_seed": [round(v, 4) for v in values],
                                    **spread(values, 4)}
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=["realnvp", "spline_realnvp"], default="realnvp")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 10],
                        help="typicality batch sizes M")
    parser.add_argument("--batches", type=int, default=200,
                        help="random batches per set for M > 1")
    parser.add_argument("--quick", action="store_true", help="1 epoch smoke run")
    parser.add_argument("--out", type=Path, default=RESULTS / "ood.json")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seeds", type=int, default=1,
                        help="train N flows (seeds 0 .. N-1) and report each AUROC's mean and "
                             "spread; the top-level figures and the plot are seed 0's")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error(f"--seeds must be at least 1, got {args.seeds}")
    torch.set_num_threads(args.threads)
    env = environment()
    started = time.perf_counter()
    epochs = 1 if args.quick else args.epochs

    train_all, test = load_digits_split()
    train, held_out = train_all[:1200], train_all[1200:]
    runs = []
    for seed in range(args.seeds):
        t0 = time.perf_counter()
        runs.append(evaluate_seed(args.model, train, held_out, test, epochs, seed,
                                  args.batch_sizes, args.batches))
        runs[-1]["train_seconds"] = round(runs[-1]["train_seconds"], 1)
        runs[-1]["seconds"] = round(time.perf_counter() - t0, 1)
        print(f"seed {seed}: {runs[-1]['seconds']} s", flush=True)
    first = runs[0]
    rows, bpd, train_mean, curve = first["rows"], first["bpd"], first["train_mean"], first["curve"]
    train_seconds = first["train_seconds"]
    env["total_seconds"] = round(time.perf_counter() - started, 1)
    report = {
        "environment": env,
        "config": {"model": args.model, "epochs": epochs, "train_images": len(train),
                   "held_out_images": len(held_out), "test_images": len(test),
                   "dequantization": "uniform, 8 draws per image", "levels": LEVELS,
                   "typicality_batch_sizes": args.batch_sizes,
                   "typicality_random_batches": args.batches,
                   "train_seconds": round(train_seconds, 1), "train_bpd_per_epoch": curve},
        "held_out_train_mean_bpd": train_mean,
        "test_mean_bpd": float(bpd["test digits"].mean()),
        "test_median_bpd": float(bpd["test digits"].median()),
        "ood": rows,
        "constant_bpd_by_level": [round(float(v), 3) for v in
                                  bpd["constant"][:LEVELS]],  # image i is level i mod 17
    }
    if args.seeds > 1:
        keys = ["mean_bpd", "auroc_likelihood"] + [f"auroc_typicality_M{m}" for m in args.batch_sizes]
        report["seeds"] = {
            "n": args.seeds,
            "test_mean_bpd": [round(float(r["bpd"]["test digits"].mean()), 4) for r in runs],
            "seconds": [r["seconds"] for r in runs],
            "ood": seed_summary(runs, keys),
            "statistics": "std is the sample standard deviation (n - 1) over seeds",
        }
        for set_name, cols in report["seeds"]["ood"].items():
            print(f"{set_name:9s} over {args.seeds} seeds: " + "  ".join(
                f"{k} {v['mean']:.3f} +- {v['std']:.3f}" for k, v in cols.items()), flush=True)
    print(f"test digits mean {report['test_mean_bpd']:.3f} bits/dim, held-out train mean "
          f"{train_mean:.3f}; {env['total_seconds']} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    plot(bpd, train_mean, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return report


if __name__ == "__main__":
    main()
