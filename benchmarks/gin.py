r"""GIN on scikit-learn's digits (Sorrenson, Rother, Köthe 2020): the learned spectrum and its figure.

GIN keeps the bijection :math:`z = T(x)` label-free and volume-preserving and puts the label in
the prior, :math:`p(z \mid y) = \mathcal N(\mu_y, \operatorname{diag} \sigma_y^2)`. On EMNIST
the paper finds that, trained on the class-conditional likelihood, the learned
:math:`\sigma` sort into a few large and many tiny ones (22 of 784 dimensions carry
information), that varying one large latent dimension around a class mean gives an
interpretable change of the image, and that the model classifies by :math:`p(y \mid x)`.

This script trains ``cond_gin_digits`` (``memory="reversible"``) and its stored twin (the
same initial weights, the same batches and dequantization noise), and as a control of how far
float32 rounding alone carries a training run, the stored twin with its weights moved by a
relative 1e-7, on the 1500-image digits
training split of ``benchmarks/conditional.py`` (17 grey levels, uniform dequantization; its
``train_flow`` loop: Adam, cosine schedule, batch 64) and reports, on the 297 test images:

* bits/dim of :math:`\log p(x \mid y)` (label given) and of the marginal :math:`\log p(x)`,
  each a mean over 8 dequantization draws;
* the accuracy of :math:`\arg\max_y p(y \mid x)` at the cell centres :math:`(x + 1/2) / 17`;
* the learned standard deviations :math:`\sigma_{y,i}`, averaged over the classes per
  dimension and sorted, and how many dimensions hold 90 / 99 % of
  :math:`\sum_i \overline{\sigma_i^2}` (:func:`dims_for_fraction`); beside them the same counts
  for per-class PCA of the training images (a linear volume-preserving map, the reference a
  GIN should at least match) and the dequantization noise floor :math:`1 / (17 \sqrt{12})`.

Figures (``<out stem>_top.png``, ``_low.png``, ``_spectrum.png``): for a few classes, the latent
dimensions of largest (``_top``) and smallest (``_low``) class-averaged :math:`\sigma`, each
varied over :math:`-2 .. +2\,\sigma_{y,i}` with all other dimensions at the class mean, decoded
by the inverse (one row per dimension, one block per class); and the sorted spectrum.

Run: ``python benchmarks/gin.py`` (``--seeds 3`` for spreads; ``--quick``: a smoke run of
seconds, which writes to ``--out`` like the full run).
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import environment, finish_figure, spread, write_json  # noqa: E402
from conditional import digits_split, test_bpd, train_flow  # noqa: E402

import revtrain  # noqa: E402
from revtrain.models import create  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "gin_digits.json"
LEVELS = 17
NOISE_FLOOR = 1.0 / (LEVELS * math.sqrt(12.0))  # std of the uniform dequantization noise
FRACTIONS = (0.9, 0.99)
EPOCHS, LR = 100, 5e-3
FIGURE_CLASSES = (0, 2, 3, 4, 7)
PERTURBATION = 1e-7
SIGMAS = (-2.0, -1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0)


# --------------------------------------------------------------------------- the spectrum


def dims_for_fraction(stds: Tensor, fraction: float) -> int:
    """Fewest dimensions whose variances ``stds ** 2`` hold ``fraction`` of their sum.

    ``stds`` ``(D,)`` or ``(K, D)`` (then the variances are averaged over the ``K`` rows first).
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"dims_for_fraction: fraction must be in (0, 1], got {fraction}")
    var = stds.double().square()
    var = var.mean(0) if var.dim() == 2 else var
    var = var.sort(descending=True).values
    share = var.cumsum(0) / var.sum()
    # the first k whose share reaches the fraction (a small tolerance for the rounding of the sum)
    return int((share < fraction - 1e-12).sum()) + 1


def spectrum(stds: Tensor) -> dict[str, Any]:
    """Summary of learned standard deviations ``(K, D)``: class-averaged, sorted, the counts."""
    stds = stds.detach().double()
    mean = stds.mean(0).sort(descending=True).values
    return {
        "sorted_class_mean_std": [round(float(s), 5) for s in mean],
        "dims_for_variance_fraction": {str(f): dims_for_fraction(stds, f) for f in FRACTIONS},
        # each class's own spectrum (its large dimensions need not be the other classes')
        "sorted_per_class_then_mean_std": [round(float(s), 5) for s in
                                           stds.sort(1, descending=True).values.mean(0)],
        "dims_for_variance_fraction_per_class": {str(f): [dims_for_fraction(row, f) for row in stds]
                                                 for f in FRACTIONS},
        "largest_over_smallest": round(float(mean[0] / mean[-1]), 2),
        "dims_below_2x_noise_floor": int((mean < 2 * NOISE_FLOOR).sum()),
        "noise_floor": round(NOISE_FLOOR, 5),
    }


def pca_reference(images: Tensor, labels: Tensor, classes: int = 10) -> dict[str, Any]:
    """Per-class PCA of the dequantized training images: the within-class standard deviations
    ``(K, D)`` of the best linear volume-preserving map (a rotation per class), noise added."""
    y = (images.double().flatten(1) + 0.5) / LEVELS
    stds = []
    for k in range(classes):
        cov = torch.cov(y[labels == k].T) + NOISE_FLOOR ** 2 * torch.eye(y.shape[1], dtype=y.dtype)
        stds.append(torch.linalg.eigvalsh(cov).flip(0).clamp_min(0).sqrt())
    return spectrum(torch.stack(stds))


# --------------------------------------------------------------------------- the model


def centres(images: Tensor) -> Tensor:
    """Cell centres ``(x + 1/2) / 17`` of integer images: a deterministic dequantization."""
    return (images.double() + 0.5).to(torch.get_default_dtype()) / LEVELS


class _Marginal(nn.Module):
    """The label-free density ``log p(x)`` of a GIN as a model's ``log_prob``."""

    def __init__(self, flow: nn.Module):
        super().__init__()
        self.flow = flow

    def log_prob(self, x: Tensor) -> Tensor:
        return self.flow.marginal_log_prob(x)


def marginal_bpd(model, images: Tensor, draws: int = 8) -> float:
    """Test bits/dim of the label-free density ``log p(x)``, mean over ``draws`` noise draws
    (``test_bpd``'s loop)."""
    return test_bpd(_Marginal(model), False, images, None, draws)


@torch.no_grad()
def accuracy(model, images: Tensor, labels: Tensor) -> float:
    """Accuracy of ``argmax_y log p(y | x)`` at the cell centres."""
    model.eval()
    return float((model.class_log_posterior(centres(images)).argmax(1) == labels).float().mean())


@torch.no_grad()
def traverse(model, label: int, dim: int, sigmas=SIGMAS) -> Tensor:
    """Images ``(len(sigmas), 1, 8, 8)``: latent dimension ``dim`` of class ``label`` set to
    ``mu + s * sigma`` for each ``s``, every other dimension at the class mean, decoded."""
    model.eval()
    eps = torch.zeros(len(sigmas), model.num_dims)
    eps[:, dim] = torch.as_tensor(sigmas, dtype=eps.dtype)
    labels = torch.full((len(sigmas),), label, dtype=torch.long)
    return model.inverse(eps, context=labels).view(len(sigmas), 1, 8, 8)


@torch.no_grad()
def mean_roundtrip_error(model) -> float:
    """Largest ``|T(T^{-1}(mu_y)) - mu_y|`` over the classes: the class means decoded and encoded."""
    model.eval()
    mu = model.mixture.means
    k = mu.shape[0]
    decoded = model.inverse(torch.zeros_like(mu), context=torch.arange(k))
    z, _ = model.embed(decoded)
    return float((z - mu).abs().max())


@torch.no_grad()
def traversal_change(model, dims: list[int], classes=FIGURE_CLASSES) -> list[float]:
    """Per dimension: the mean absolute pixel difference (in ``[0, 1]`` units) between its
    ``-2 sigma`` and ``+2 sigma`` decodes, averaged over ``classes``."""
    out = []
    for d in dims:
        diffs = [float((img[-1] - img[0]).abs().mean()) for img in
                 (traverse(model, k, d, (-2.0, 2.0)) for k in classes)]
        out.append(round(sum(diffs) / len(diffs), 5))
    return out


def order(model) -> list[int]:
    """Latent dimensions by class-averaged learned std, largest first."""
    return model.mixture.log_stds.detach().exp().mean(0).argsort(descending=True).tolist()


def save_traversals(model, dims: list[int], path: Path, classes=FIGURE_CLASSES) -> None:
    """One block per class (side by side), one row per dimension, one column per sigma."""
    from torchvision.utils import make_grid, save_image

    blocks = []
    for k in classes:
        rows = torch.cat([traverse(model, k, d) for d in dims]).clamp(0, 1)
        rows = torch.nn.functional.interpolate(rows, scale_factor=4, mode="nearest")
        blocks.append(make_grid(rows, nrow=len(SIGMAS), padding=1, pad_value=0.5))
    save_image(make_grid(torch.stack(blocks), nrow=len(blocks), padding=6, pad_value=1.0), path)


def save_spectrum(runs: list[dict], pca: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for run in runs:
        s = run["reversible"]["spectrum"]["sorted_class_mean_std"]
        ax.semilogy(range(1, len(s) + 1), s, marker=".", lw=1, label=f"GIN, seed {run['seed']}")
    s = pca["sorted_class_mean_std"]
    ax.semilogy(range(1, len(s) + 1), s, "k--", lw=1, label="per-class PCA of the training images")
    ax.axhline(NOISE_FLOOR, color="grey", lw=0.8, ls=":", label="dequantization noise std")
    finish_figure(fig, ax, path, "latent dimension (sorted)", "learned std, mean over classes",
                  "cond_gin_digits: learned per-class standard deviations", legend_size=7)


# --------------------------------------------------------------------------- the run


def evaluate(model, x_test: Tensor, y_test: Tensor, seed: int) -> dict[str, Any]:
    torch.manual_seed(seed + 2)
    cond = test_bpd(model, True, x_test, y_test)
    torch.manual_seed(seed + 2)  # the same noise draws for the marginal
    marg = marginal_bpd(model, x_test)
    stds = model.mixture.log_stds.detach().exp()
    return {"test_bpd_conditional": round(cond, 4), "test_bpd_marginal": round(marg, 4),
            "test_accuracy_posterior": round(accuracy(model, x_test, y_test), 4),
            "spectrum": spectrum(stds), "mean_roundtrip_max_abs": mean_roundtrip_error(model)}


def run_seed(seed: int, epochs: int, lr: float, data, kwargs: dict) -> tuple[dict, Any]:
    x_train, y_train, x_test, y_test = data
    torch.manual_seed(seed)
    model = create("cond_gin_digits", memory="reversible", **kwargs)  # in the default dtype
    twin = revtrain.set_memory(copy.deepcopy(model), "stored")
    # the control: the stored twin with every weight moved by a relative 1e-7 (float32 rounding
    # size, what one step's reversible reconstruction changes): how far rounding alone carries
    perturbed = copy.deepcopy(twin)
    gen = torch.Generator().manual_seed(1000 + seed)
    with torch.no_grad():
        for p in perturbed.parameters():
            p.mul_(1 + PERTURBATION * torch.randn(p.shape, generator=gen))
    out: dict[str, Any] = {"seed": seed}
    for name, m in (("reversible", model), ("stored_twin", twin), ("stored_perturbed", perturbed)):
        torch.manual_seed(seed + 1)  # the same dequantization noise for both
        rec = train_flow(m, True, x_train, y_train, epochs, lr=lr, seed=seed)
        rec["final_train_bpd"] = rec["train_bpd_per_epoch"][-1]
        rec.update(evaluate(m, x_test, y_test, seed))
        out[name] = rec
        print(f"seed {seed} {name}: test {rec['test_bpd_conditional']} bits/dim | y, "
              f"{rec['test_bpd_marginal']} marginal, accuracy {rec['test_accuracy_posterior']}, "
              f"dims for 90/99 %: {rec['spectrum']['dims_for_variance_fraction']}, "
              f"{rec['train_seconds']} s", flush=True)
    out["bpd_gap_reversible_minus_stored"] = round(
        out["reversible"]["test_bpd_conditional"] - out["stored_twin"]["test_bpd_conditional"], 6)
    out["bpd_gap_perturbed_minus_stored"] = round(
        out["stored_perturbed"]["test_bpd_conditional"] - out["stored_twin"]["test_bpd_conditional"], 6)
    return out, model


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--lr", type=float, default=LR)
    parser.add_argument("--seeds", type=int, default=1,
                        help="seeds 0 .. N-1, each a reversible / stored pair")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 epochs, a small model")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--double", action="store_true",
                        help="float64 weights and data: the reversible and stored runs must then "
                             "stay together far longer than in float32")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error(f"--seeds must be at least 1, got {args.seeds}")
    previous = torch.get_default_dtype()
    try:
        return _run(args)
    finally:
        torch.set_default_dtype(previous)  # --double sets it for the run only


def _run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    epochs = 2 if args.quick else args.epochs
    kwargs = {"hidden": 16, "num_layers": 2} if args.quick else {}
    data = digits_split()
    dtype = torch.float64 if args.double else torch.float32
    if args.double:  # weights, images (integers, exact in float64) and every new tensor
        torch.set_default_dtype(torch.float64)
        data = (data[0].double(), data[1], data[2].double(), data[3])
    report: dict[str, Any] = {
        "environment": environment(),
        "recipe": {"model": "cond_gin_digits", "model_kwargs": kwargs, "epochs": epochs, "lr": args.lr,
                   "optimizer": "Adam, cosine schedule, batch 64, grad-norm clip 50 "
                                "(benchmarks/conditional.py train_flow)",
                   "loss": "bits/dim of log p(x | y), uniform dequantization, 17 levels",
                   "split": {"train": len(data[0]), "test": len(data[2])}, "quick": args.quick,
                   "dtype": str(dtype),
                   "seeding": "seed s: weights torch.manual_seed(s), copied into the stored twin; "
                              "training noise manual_seed(s + 1); test noise manual_seed(s + 2); "
                              "stored_perturbed: the twin's weights times 1 + 1e-7 N(0, 1)"},
        "runs": [],
    }
    first = None
    for seed in range(args.seeds):
        run, model = run_seed(seed, epochs, args.lr, data, kwargs)
        report["runs"].append(run)
        first = first or model
    model = first
    report["pca_reference"] = pca_reference(data[0], data[1])
    dims = order(model)
    top, low = dims[:6], dims[-3:]
    stem = args.out.with_suffix("")
    figures = {"top": Path(f"{stem}_top.png"), "low": Path(f"{stem}_low.png"),
               "spectrum": Path(f"{stem}_spectrum.png")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_traversals(model, top, figures["top"])
    save_traversals(model, low, figures["low"])
    save_spectrum(report["runs"], report["pca_reference"], figures["spectrum"])
    mean_std = model.mixture.log_stds.detach().exp().mean(0)
    report["figure"] = {
        "seed": 0, "classes": list(FIGURE_CLASSES), "sigmas": list(SIGMAS),
        "top_dims": top, "top_dims_std": [round(float(mean_std[d]), 5) for d in top],
        "low_dims": low, "low_dims_std": [round(float(mean_std[d]), 5) for d in low],
        "pixel_change_top": traversal_change(model, top),
        "pixel_change_low": traversal_change(model, low),
        "pixel_change": "mean |decode(+2 sigma) - decode(-2 sigma)| per pixel ([0, 1] units), "
                        "mean over the figure's classes",
        "files": {k: str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p)
                  for k, p in figures.items()},
    }

    def summary(key: str) -> dict[str, Any]:
        return {name: {"per_seed": [r[name][key] for r in report["runs"]],
                       **spread([r[name][key] for r in report["runs"]], 4)}
                for name in ("reversible", "stored_twin", "stored_perturbed")}

    report["summary"] = {
        "seeds": args.seeds,
        "test_bpd_conditional": summary("test_bpd_conditional"),
        "test_bpd_marginal": summary("test_bpd_marginal"),
        "test_accuracy_posterior": summary("test_accuracy_posterior"),
        "gap_bpd_reversible_minus_stored": [r["bpd_gap_reversible_minus_stored"] for r in report["runs"]],
        "gap_bpd_perturbed_minus_stored": [r["bpd_gap_perturbed_minus_stored"] for r in report["runs"]],
        "dims_for_variance_fraction": {
            str(f): [r["reversible"]["spectrum"]["dims_for_variance_fraction"][str(f)]
                     for r in report["runs"]] for f in FRACTIONS},
        "largest_over_smallest_std": [r["reversible"]["spectrum"]["largest_over_smallest"]
                                      for r in report["runs"]],
        "statistics": "std is the sample standard deviation (n - 1) over seeds",
    }
    report["environment"]["total_seconds"] = round(time.perf_counter() - started, 1)
    write_json(args.out, report)
    print(f"wrote {args.out} and {', '.join(str(p) for p in figures.values())}")
    return report


if __name__ == "__main__":
    main()
