r"""Benchmarks of the conditional models (issue 10): gradients, class-conditional digits, i-RIM toy.

1. ``gradients``: float64 gradients of the parameters, of the input and of the condition of
   ``cinn`` (1, 4, 16 blocks), ``cond_realnvp_digits`` and ``cond_glow_digits`` (1, 4, 16 steps per
   level) in reversible and checkpoint mode against the stored twin: largest relative difference.
2. ``digits``: on scikit-learn's 8x8 digits (1500 train / 297 test, 17 levels, uniform
   dequantization), the class-conditional ``cond_realnvp_digits`` against two unconditional
   models trained in the same run with the same loop: its *label-blind twin* (the same network,
   every label replaced by 0: same size to the parameter) and the registry's unconditional
   ``realnvp`` of the same widths. Test bits/dim (mean over 8 dequantization draws). Then the
   digits RevNet of the main job is trained with ``configs/digits_revnet.yaml`` (through the
   ``revtrain`` command's code, as ``revtrain fit`` does) and classifies 100 samples per class of
   the conditional model (and, as the check that must fail, of the label-blind twin) at
   temperatures 0.7 and 1.0; a grid with one row per class is saved.
3. ``irim``: the i-RIM-style refinement ``irim_toy``: memory of one training step (held between
   forward and backward, and peak) at 4, 16, 64 iterations, reversible and stored; and a short
   training on sparse signals (reconstruction error against the back-projection and the
   minimum-norm least-squares solution).

Writes ``benchmarks/results/conditional.json`` (and ``conditional_digits_samples.png``).
Run: ``python benchmarks/conditional.py`` (``--only gradients|digits|irim``; ``--quick``: a smoke
run that writes nothing).
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import environment, write_json  # noqa: E402

import revtrain  # noqa: E402
from revtrain.flows import UniformDequantization, bits_per_dim  # noqa: E402
from revtrain.memory import TensorMemoryTracker  # noqa: E402
from revtrain.models import create  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "conditional.json"
GRID = ROOT / "benchmarks" / "results" / "conditional_digits_samples.png"
D = torch.float64


# --------------------------------------------------------------------------- 1. gradients


def _grads(model: nn.Module, x: Tensor, condition: Tensor) -> list[Tensor]:
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    cond = condition.detach().clone().requires_grad_() if condition.is_floating_point() else condition
    z, log_det = model.forward_and_log_det(x, cond)
    loss = (z * torch.linspace(-1, 1, z.numel(), dtype=z.dtype).view_as(z)).sum() + log_det.sum()
    loss.backward()
    return [x.grad, *([cond.grad] if cond.is_floating_point() else []), *(p.grad for p in model.parameters())]


def _rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def gradients(quick: bool) -> list[dict[str, Any]]:
    sizes = [1, 4] if quick else [1, 4, 16]
    cases = [("cinn", {"num_blocks": k, "hidden": 32}) for k in sizes]
    cases += [("cond_realnvp_digits", {"hidden": 16})]
    cases += [("cond_glow_digits", {"steps": k, "hidden": 16}) for k in sizes]
    rows = []
    for name, kwargs in cases:
        torch.manual_seed(0)
        base = create(name, **kwargs).double()
        with torch.no_grad():
            for p in base.parameters():  # away from the identity start
                p.add_(0.05 * torch.randn_like(p))
        if name == "cinn":
            x, cond = torch.randn(8, 4, dtype=D), torch.randn(8, 2, dtype=D)
        else:
            x, cond = torch.rand(8, 1, 8, 8, dtype=D) * 0.9 + 0.05, torch.arange(8)
        want = _grads(revtrain.set_memory(copy.deepcopy(base), "stored"), x, cond)
        for memory in ("reversible", "checkpoint"):
            got = _grads(revtrain.set_memory(copy.deepcopy(base), memory), x, cond)
            input_rel = _rel(got[0], want[0])
            cond_rel = _rel(got[1], want[1]) if name == "cinn" else None
            params = got[2:] if name == "cinn" else got[1:]
            params_want = want[2:] if name == "cinn" else want[1:]
            param_rel = max(_rel(a, b) for a, b in zip(params, params_want))
            worst = max(v for v in (input_rel, cond_rel, param_rel) if v is not None)
            rows.append({"model": name, **kwargs, "memory": memory, "input_rel": input_rel,
                         "condition_rel": cond_rel, "parameters_rel": param_rel,
                         "within_1e-10": worst <= 1e-10})
            print(f"gradients {name} {kwargs} {memory}: input {input_rel:.1e}, condition "
                  f"{'-' if cond_rel is None else f'{cond_rel:.1e}'}, parameters {param_rel:.1e}", flush=True)
    return rows


# --------------------------------------------------------------------------- 2. digits


def digits_split(seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Integer images ``(N, 1, 8, 8)`` in ``0..16`` and labels; 1500 train / 297 test."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.as_tensor(digits.images, dtype=torch.long).unsqueeze(1)
    labels = torch.as_tensor(digits.target, dtype=torch.long)
    perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    images, labels = images[perm], labels[perm]
    return images[:1500], labels[:1500], images[1500:], labels[1500:]


class _Blind(nn.Module):
    """The same conditional network with every label replaced by 0: an unconditional model."""

    def __init__(self, flow: nn.Module):
        super().__init__()
        self.flow = flow

    def log_prob(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        return self.flow.log_prob(x, context=torch.zeros(len(x), dtype=torch.long))


def train_flow(model: nn.Module, conditional: bool, images: Tensor, labels: Tensor, epochs: int,
               batch: int = 64, lr: float = 2e-3, seed: int = 0) -> dict[str, Any]:
    deq = UniformDequantization(17)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * math.ceil(len(images) / batch)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    gen = torch.Generator().manual_seed(seed + 1)
    curve, start = [], time.perf_counter()
    for _ in range(epochs):
        model.train()
        total = 0.0
        for idx in torch.randperm(len(images), generator=gen).split(batch):
            y, log_q = deq(images[idx])
            log_p = model.log_prob(y, context=labels[idx]) if conditional else model.log_prob(y)
            loss = bits_per_dim(log_p - log_q, 64).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 50.0)
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        curve.append(round(total / len(images), 4))
    return {"train_seconds": round(time.perf_counter() - start, 1), "train_bpd_per_epoch": curve,
            "params": sum(p.numel() for p in model.parameters())}


@torch.no_grad()
def test_bpd(model: nn.Module, conditional: bool, images: Tensor, labels: Tensor, draws: int = 8) -> float:
    model.eval()
    deq = UniformDequantization(17)
    values = []
    for _ in range(draws):
        y, log_q = deq(images)
        log_p = model.log_prob(y, context=labels) if conditional else model.log_prob(y)
        values.append(bits_per_dim(log_p - log_q, 64).mean())
    return float(torch.stack(values).mean())


def train_classifier(epochs: int | None) -> tuple[nn.Module, Tensor, Tensor, dict[str, Any]]:
    """The main job's digits RevNet, trained by the ``revtrain`` command's code from its config."""
    from revtrain.cli import cli
    from revtrain.lightning import DigitsDataModule

    threads, cwd = torch.get_num_threads(), os.getcwd()
    with tempfile.TemporaryDirectory() as tmp:
        args = ["fit", "--config", str(ROOT / "configs" / "digits_revnet.yaml"),
                "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
                "--report.memory_table", "false", "--report.test_after_fit", "true"]
        if epochs is not None:
            args += ["--trainer.max_epochs", str(epochs)]
        start = time.perf_counter()
        os.chdir(tmp)  # the run's logs and checkpoints go to runs/ under the working directory
        try:
            run = cli(args)
        finally:
            os.chdir(cwd)
            torch.set_num_threads(threads)
        seconds = time.perf_counter() - start
        metrics = {k: float(v) for k, v in run.trainer.callback_metrics.items() if k.startswith("test")}
    raw = DigitsDataModule(normalize=False)  # the same split, unnormalised: its training statistics
    raw.setup()
    x_train = raw.train_set.tensors[0]
    net = run.model.net.eval()
    return net, x_train.mean(), x_train.std(), {"seconds": round(seconds, 1), **metrics}


@torch.no_grad()
def classify(net: nn.Module, mean: Tensor, std: Tensor, samples: Tensor) -> Tensor:
    """Labels of flow samples ``y`` in ``[0, 1]``: back to the 17 grey levels, normalised as in training."""
    levels = torch.floor(samples * 17).clamp(0, 16)
    logits = net((levels / 16 - mean) / std)
    logits = logits[0] if isinstance(logits, (tuple, list)) else logits
    return logits.argmax(1)


def digits(quick: bool) -> dict[str, Any]:
    epochs = 1 if quick else 30
    x_train, y_train, x_test, y_test = digits_split()
    out: dict[str, Any] = {"epochs": epochs, "train_images": len(x_train), "test_images": len(x_test),
                           "uniform_baseline_bpd": math.log2(17)}
    torch.manual_seed(0)
    cond = create("cond_realnvp_digits")
    torch.manual_seed(0)
    blind_flow = create("cond_realnvp_digits")
    blind = _Blind(blind_flow)
    torch.manual_seed(0)
    plain = create("realnvp", in_channels=1, image_size=8, levels=2, hidden=32, split_prior=True)
    runs = [("conditional cond_realnvp_digits", cond, True),
            ("label-blind twin (same network, labels all 0)", blind, True),
            ("unconditional realnvp (same widths)", plain, False)]
    rows = []
    for name, model, conditional in runs:
        torch.manual_seed(0)
        rec = {"model": name, **train_flow(model, conditional, x_train, y_train, epochs)}
        torch.manual_seed(2)
        rec["test_bpd"] = test_bpd(model, conditional, x_test, y_test)
        print(f"digits {name}: test {rec['test_bpd']:.4f} bits/dim, {rec['params']} parameters, "
              f"{rec['train_seconds']} s", flush=True)
        rows.append(rec)
    out["flows"] = rows
    out["gain_vs_label_blind_bpd"] = rows[1]["test_bpd"] - rows[0]["test_bpd"]
    out["gain_vs_unconditional_realnvp_bpd"] = rows[2]["test_bpd"] - rows[0]["test_bpd"]
    out["label_information_bound_bpd"] = math.log2(10) / 64

    net, mean, std, clf = train_classifier(2 if quick else None)
    out["classifier"] = {"config": "configs/digits_revnet.yaml", **clf}
    print(f"classifier: {clf}", flush=True)
    per = 10 if quick else 100
    labels = torch.arange(10).repeat_interleave(per)
    out["samples_per_class"] = per
    out["accuracy"] = {}
    for name, flow in (("conditional", cond), ("label-blind twin", blind_flow)):
        flow.eval()
        for t in (0.7, 1.0):
            torch.manual_seed(3)
            samples = flow.sample(len(labels), context=labels, temperature=t).clamp(0, 1)
            hit = (classify(net, mean, std, samples) == labels).float()
            out["accuracy"][f"{name} T={t}"] = {
                "overall": float(hit.mean()),
                "per_class": [round(float(h), 3) for h in hit.view(10, per).mean(1)],
            }
            print(f"samples of the {name} model at T={t}: classified as their label "
                  f"{100 * float(hit.mean()):.1f} %", flush=True)
    if not quick:
        from torchvision.utils import make_grid, save_image

        torch.manual_seed(4)
        grid_labels = torch.arange(10).repeat_interleave(10)
        samples = cond.sample(len(grid_labels), context=grid_labels, temperature=0.7).clamp(0, 1)
        save_image(make_grid(samples, nrow=10, padding=1), GRID)
        out["grid"] = str(GRID.relative_to(ROOT))

    memory = {}
    deq_x, _ = UniformDequantization(17)(x_train[:64])
    for mode in ("reversible", "stored"):
        model = revtrain.set_memory(copy.deepcopy(cond), mode).train()
        with TensorMemoryTracker() as mem:
            loss = -model.log_prob(deq_x, context=y_train[:64]).mean()
            held = mem.current
            loss.backward()
        memory[mode] = {"held_bytes": held, "peak_bytes": mem.peak}
    out["memory_batch64"] = memory
    return out


# --------------------------------------------------------------------------- 3. i-RIM toy


def irim_memory(iterations: list[int], batch: int = 64) -> list[dict[str, Any]]:
    rows = []
    for t in iterations:
        for mode in ("reversible", "stored"):
            torch.manual_seed(0)
            model = create("irim_toy", iterations=t, memory=mode)
            y = torch.randn(batch, 16, requires_grad=True)
            x = torch.randn(batch, 32)
            with TensorMemoryTracker() as mem:
                out = model(y)
                held = mem.current
                (out - x).square().mean().backward()
            rows.append({"iterations": t, "memory": mode, "held_bytes": held, "peak_bytes": mem.peak,
                         "params": sum(p.numel() for p in model.parameters())})
            print(f"irim {mode:10s} {t:3d} iterations: held {held / 1024:8.1f} KiB, peak "
                  f"{mem.peak / 1024:8.1f} KiB", flush=True)
    return rows


def irim_training(steps: int) -> dict[str, Any]:
    torch.manual_seed(0)
    model = create("irim_toy", iterations=8)
    gen = torch.Generator().manual_seed(1)

    def batch(n: int) -> tuple[Tensor, Tensor]:
        x = torch.randn(n, 32, generator=gen) * (torch.rand(n, 32, generator=gen) < 0.15)
        return x, model.measure(x) + 0.01 * torch.randn(n, 16, generator=gen)

    x_test, y_test = batch(2000)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    start = time.perf_counter()
    for _ in range(steps):
        x, y = batch(128)
        loss = (model(y) - x).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    with torch.no_grad():
        a = model.operator
        mse = {"back_projection A^T y": float((y_test @ a - x_test).square().mean()),
               "least squares pinv(A) y": float((y_test @ torch.linalg.pinv(a).T - x_test).square().mean()),
               "irim_toy (8 iterations)": float((model(y_test) - x_test).square().mean()),
               "zero": float(x_test.square().mean())}
    print(f"irim training: test MSE {mse}", flush=True)
    return {"steps": steps, "seconds": round(time.perf_counter() - start, 1), "test_mse": mse,
            "signal": "32 entries, each N(0, 1) with probability 0.15 else 0; y = A x + 0.01 noise, A 16x32"}


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", choices=["gradients", "digits", "irim"], default=None)
    parser.add_argument("--quick", action="store_true", help="tiny smoke run, nothing written")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    report: dict[str, Any] = {}
    if args.out.exists() and args.only:  # keep the other parts of an earlier full run
        import json

        report = json.loads(args.out.read_text())
    report["environment"] = environment()
    if args.only in (None, "gradients"):
        report["gradients"] = gradients(args.quick)
    if args.only in (None, "digits"):
        report["digits"] = digits(args.quick)
    if args.only in (None, "irim"):
        report["irim"] = {"memory": irim_memory([4, 16] if args.quick else [4, 16, 64]),
                          "training": irim_training(20 if args.quick else 1500)}
    report["environment"]["total_seconds"] = round(time.perf_counter() - started, 1)
    if not args.quick:
        write_json(args.out, report)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
