r"""Posterior estimation with a known answer: the inverse-kinematics arm (Kruse et al. 2021).

A 4-D arm configuration :math:`x` (rail height, three joint angles; Gaussian prior with
:math:`\sigma = (1/4, 1/2, 1/2, 1/2)`) is inferred from its 2-D end point :math:`y = f(x)`
(:class:`revtrain.lightning.conditional.InverseKinematics`). Two cINNs of the same architecture
are trained by maximum likelihood on the same pairs, batches, optimizer and number of steps:

* revtrain's ``cinn_ik`` (reversible stack: no stored activations);
* FrEIA's ``SequenceINN`` of ``GLOWCouplingBlock`` + ``PermuteRandom`` with the same
  sub-networks, the same soft clamp :math:`s = c \tanh(\tilde s / c)` (FrEIA's
  ``clamp_activation``), the same permutations, the same conditioning network, and the same
  initial weights (copied; the two log-likelihoods are checked equal before training).

Metrics of the paper, on ``--test`` observations :math:`y^* = f(x^*)`, :math:`x^*` from the prior:

* posterior mismatch ``err_post``: the unbiased squared MMD between ``--samples`` model samples
  and as many ground-truth samples of :math:`p(x \mid y^*)`, with a sum of inverse multiquadric
  kernels :math:`k(a, b) = \sum_h 1 / (1 + \lVert a - b\rVert^2 / h^2)`,
  :math:`h \in \{0.05, 0.2, 0.9\}`, in the units of :math:`x`; mean (and median) over :math:`y^*`.
  Ground truth: exact rejection sampling from the prior for the observation model
  :math:`y \mid x \sim \mathcal N(f(x), \epsilon^2 I)`, :math:`\epsilon` = ``--epsilon``.
* re-simulation error ``err_resim``: :math:`\mathbb E \lVert f(\hat x) - y^*\rVert^2` over the model
  samples :math:`\hat x`, mean over :math:`y^*` (the ground truth's own is :math:`2\epsilon^2`).

The paper's protocol is not fully published (kernel, ABC threshold, test set): its figures are
listed next to ours for orientation, measured differently. Memory of one training step of both
at depths (coupling blocks) 8, 32, 128: :func:`revtrain.memory.measure_step` (tensor-level count
on CPU, allocator on CUDA).

Writes ``benchmarks/results/conditional_ik.json``. FrEIA is a benchmark-only extra
(``pip install FrEIA``). Run: ``python benchmarks/ik.py`` (a few minutes on 2 cores), ``--quick``
for a smoke run that writes nothing.
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

from common import environment, write_json  # noqa: E402

from revtrain.flows import MLP  # noqa: E402
from revtrain.lightning.conditional import InverseKinematics  # noqa: E402
from revtrain.memory import measure_step  # noqa: E402
from revtrain.models import create  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "conditional_ik.json"

# The paper's own figures (Kruse et al. 2021, Table 1) are not copied here: they could not be
# checked against the paper from this machine, and its protocol differs (see PAPER_NOTE).
PAPER: dict = {}
PAPER_NOTE = ("Kruse et al. 2021, Table 1, not quoted: its figures could not be checked here, and its "
              "protocol (training set, kernel, ABC threshold, test set) differs from this one")


# --------------------------------------------------------------------------- models


class FrEIACINN(nn.Module):
    """FrEIA's cINN built as a twin of a revtrain ``cinn``: same blocks, permutations, weights."""

    def __init__(self, ours: nn.Module):
        super().__init__()
        import FrEIA.framework as Ff
        import FrEIA.modules as Fm

        self.conditioner = copy.deepcopy(ours.conditioner)
        k = ours.conditioner.features
        layers = list(ours.flow)
        hidden = layers[0].f.net[0].out_features
        depth = sum(isinstance(m, nn.Linear) for m in layers[0].f.net) - 1
        clamp = layers[0].transform.clamp

        def subnet(c_in: int, c_out: int) -> nn.Module:
            return MLP(c_in, c_out, hidden, depth)

        self.inn = Ff.SequenceINN(ours.num_dims)
        for layer in layers:
            if hasattr(layer, "permutation"):
                self.inn.append(Fm.PermuteRandom, seed=0)
                block = self.inn.module_list[-1]
                perm = layer.permutation.cpu()
                block.perm.data.copy_(perm)
                block.perm_inv.data.copy_(perm.argsort())
            else:
                self.inn.append(Fm.GLOWCouplingBlock, cond=0, cond_shape=(k,),
                                subnet_constructor=subnet, clamp=clamp,
                                clamp_activation=lambda u, c=clamp: torch.tanh(u / c))
                block = self.inn.module_list[-1]
                # FrEIA's first coupling (x1 from x2) is subnet2, ours f; the second is subnet1, ours g
                block.subnet2.load_state_dict(layer.f.net.state_dict())
                block.subnet1.load_state_dict(layer.g.net.state_dict())
        self.num_dims = ours.num_dims

    def log_prob(self, x: Tensor, context: Tensor) -> Tensor:
        z, log_jac = self.inn(x, c=[self.conditioner(context)])
        return -0.5 * (z.square().sum(1) + self.num_dims * math.log(2 * math.pi)) + log_jac

    @torch.no_grad()
    def sample(self, n: int, context: Tensor, temperature: float = 1.0) -> Tensor:
        z = temperature * torch.randn(n, self.num_dims, dtype=context.dtype, device=context.device)
        x, _ = self.inn(z, c=[self.conditioner(context)], rev=True, jac=False)
        return x


def build_pair(blocks: int, hidden: int, seed: int = 0) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(seed)
    ours = create("cinn_ik", num_blocks=blocks, hidden=hidden)
    return ours, FrEIACINN(ours)


def check_twins(blocks: int, hidden: int) -> float:
    """Largest difference of the two log-likelihoods with random weights (both directions)."""
    ours, _ = build_pair(blocks, hidden)
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(0.1 * torch.randn_like(p))
    theirs = FrEIACINN(ours)
    arm, gen = InverseKinematics(), torch.Generator().manual_seed(5)
    x = arm.sample_prior(256, gen)
    y = arm.forward(x)
    with torch.no_grad():
        diff = (ours.log_prob(x, context=y) - theirs.log_prob(x, context=y)).abs().max()
        z = torch.randn(256, 4, generator=gen)
        x_ours = ours.inverse(z, context=y)
        x_theirs, _ = theirs.inn(z, c=[theirs.conditioner(y)], rev=True, jac=False)
    return float(max(diff, (x_ours - x_theirs).abs().max()))


# --------------------------------------------------------------------------- training


def train(model: nn.Module, x: Tensor, y: Tensor, steps: int, batch: int, lr: float,
          seed: int) -> dict[str, Any]:
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=1e-5)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    gen = torch.Generator().manual_seed(seed)
    epochs = math.ceil(steps * batch / len(x))
    order = torch.cat([torch.randperm(len(x), generator=gen) for _ in range(epochs)])
    curve, running = [], 0.0
    model.train()
    start = time.perf_counter()
    for step in range(steps):
        idx = order[step * batch:(step + 1) * batch]
        loss = -model.log_prob(x[idx], context=y[idx]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        opt.step()
        sched.step()
        running += float(loss.detach())
        if (step + 1) % max(1, steps // 20) == 0:
            curve.append(round(running / max(1, steps // 20), 4))
            running = 0.0
    seconds = time.perf_counter() - start
    return {"train_seconds": round(seconds, 1), "ms_per_step": round(1000 * seconds / steps, 2),
            "train_nll_curve": curve}


# --------------------------------------------------------------------------- metrics


def mmd2_unbiased(a: Tensor, b: Tensor, widths: tuple[float, ...] = (0.05, 0.2, 0.9)) -> float:
    """Unbiased squared MMD of samples ``a`` (n, d) and ``b`` (m, d), multi-scale IMQ kernel."""
    def k(p: Tensor, q: Tensor) -> Tensor:
        d2 = torch.cdist(p, q).square()
        return sum(1.0 / (1.0 + d2 / h**2) for h in widths)

    n, m = len(a), len(b)
    kaa, kbb, kab = k(a, a), k(b, b), k(a, b)
    saa = (kaa.sum() - kaa.diagonal().sum()) / (n * (n - 1))
    sbb = (kbb.sum() - kbb.diagonal().sum()) / (m * (m - 1))
    return float(saa + sbb - 2 * kab.mean())


def ground_truth(arm: InverseKinematics, y_star: Tensor, n: int, epsilon: float,
                 seed: int) -> list[Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [arm.posterior(y, n, epsilon=epsilon, generator=gen, chunk=1_000_000,
                          max_proposals=400_000_000).float() for y in y_star]


def evaluate(model: nn.Module, arm: InverseKinematics, y_star: Tensor, truth: list[Tensor],
             samples: int, seed: int, x_test: Tensor, y_test: Tensor) -> dict[str, Any]:
    model.eval()
    torch.manual_seed(seed)
    post, resim = [], []
    start = time.perf_counter()
    with torch.no_grad():
        drawn = [model.sample(samples, context=y.float().expand(samples, -1)) for y in y_star]
    sample_seconds = time.perf_counter() - start
    with torch.no_grad():
        for y, x_hat, x_true in zip(y_star, drawn, truth):
            post.append(mmd2_unbiased(x_hat.double(), x_true.double()))
            resim.append(float((arm.forward(x_hat.double()) - y.double()).square().sum(1).mean()))
        nll = float(-model.log_prob(x_test, context=y_test).mean())
    post_t, resim_t = torch.tensor(post), torch.tensor(resim)
    return {
        "err_post": float(post_t.mean()), "err_post_median": float(post_t.median()),
        "err_resim": float(resim_t.mean()), "err_resim_median": float(resim_t.median()),
        "test_nll_nats": nll, "sampling_seconds": round(sample_seconds, 2),
    }


# --------------------------------------------------------------------------- memory


class _NLL(nn.Module):
    def __init__(self, model: nn.Module, y: Tensor):
        super().__init__()
        self.model, self.y = model, y

    def forward(self, x: Tensor) -> Tensor:
        return -self.model.log_prob(x, context=self.y).mean()


def memory(depths: list[int], hidden: int, batch: int) -> list[dict[str, Any]]:
    arm, gen = InverseKinematics(), torch.Generator().manual_seed(3)
    x = arm.sample_prior(batch, gen)
    y = arm.forward(x)
    rows = []
    for depth in depths:
        ours, theirs = build_pair(depth, hidden)
        stored = create("cinn_ik", num_blocks=depth, hidden=hidden, memory="stored")
        stored.load_state_dict(ours.state_dict())
        for name, model in (("revtrain reversible", ours), ("revtrain stored twin", stored),
                            ("FrEIA", theirs)):
            rec = measure_step(_NLL(model, y), x, loss_fn=lambda loss: loss)
            rows.append({"model": name, "blocks": depth, "hidden": hidden, "batch": batch,
                         "params": sum(p.numel() for p in model.parameters() if p.requires_grad), **rec})
            print(f"memory {name:22s} blocks {depth:4d}: held {rec['held_bytes'] / 2**20:8.2f} MiB, "
                  f"peak {rec['peak_bytes'] / 2**20:8.2f} MiB", flush=True)
    return rows


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke run, nothing written")
    parser.add_argument("--train", type=int, default=200_000, help="training pairs")
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--blocks", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--test", type=int, default=100, help="test observations y*")
    parser.add_argument("--samples", type=int, default=1000, help="samples per y*, model and truth")
    parser.add_argument("--epsilon", type=float, default=0.01, help="width of the ground truth likelihood")
    parser.add_argument("--memory-batch", type=int, default=500)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.quick:
        args.train, args.steps, args.test, args.samples, args.memory_batch = 2000, 20, 3, 100, 50
    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    arm = InverseKinematics()
    gen = torch.Generator().manual_seed(0)
    x_train = arm.sample_prior(args.train, gen)
    y_train = arm.forward(x_train)
    x_test = arm.sample_prior(5000, gen)
    y_test = arm.forward(x_test)
    y_star = arm.forward(arm.sample_prior(args.test, gen)).double()

    twin_error = check_twins(args.blocks, args.hidden)
    print(f"revtrain and FrEIA twins agree to {twin_error:.2e} (log-likelihood and inverse)", flush=True)
    start = time.perf_counter()
    truth = ground_truth(arm, y_star, args.samples, args.epsilon, seed=7)
    truth_seconds = time.perf_counter() - start
    print(f"ground truth: {len(truth)} x {args.samples} samples in {truth_seconds:.0f} s "
          f"(fewest accepted: {min(len(t) for t in truth)})", flush=True)
    truth_resim = [float((arm.forward(t.double()) - y).square().sum(1).mean()) for t, y in zip(truth, y_star)]

    results = []
    ours, theirs = build_pair(args.blocks, args.hidden)
    for name, model in (("revtrain cinn_ik (reversible)", ours), ("FrEIA cINN (stored)", theirs)):
        record = {"model": name, "params": sum(p.numel() for p in model.parameters() if p.requires_grad)}
        record.update(train(model, x_train, y_train, args.steps, args.batch, args.lr, seed=1))
        record.update(evaluate(model, arm, y_star, truth, args.samples, 11, x_test, y_test))
        print(f"{name}: err_post {record['err_post']:.4f} (median {record['err_post_median']:.4f}), "
              f"err_resim {record['err_resim']:.5f}, test NLL {record['test_nll_nats']:.3f} nats, "
              f"{record['ms_per_step']} ms/step", flush=True)
        results.append(record)

    depths = [2, 4] if args.quick else [8, 32, 128]
    report = {
        "environment": environment(),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "protocol": {
            "training": f"{args.train} pairs (x from the prior, y = f(x)), {args.steps} Adam steps of "
                        f"{args.batch}, lr {args.lr} cosine, weight decay 1e-5, grad-norm clip 10; the same "
                        "batches for both models",
            "architecture": f"{args.blocks} x (affine coupling of both halves, MLP sub-networks "
                            f"{args.hidden} wide, 2 hidden layers, zero last layer; random permutation); "
                            "conditioning network 2 -> 64 -> 16",
            "ground_truth": f"rejection sampling from the prior, y | x ~ N(f(x), {args.epsilon}^2 I), "
                            f"{args.samples} samples for each of {args.test} y* = f(x*), x* from the prior",
            "err_post": "unbiased MMD^2, sum of IMQ kernels h in (0.05, 0.2, 0.9), raw x units",
            "err_resim": "mean squared distance of f(x_hat) to y*",
        },
        "twin_max_difference_before_training": twin_error,
        "ground_truth_seconds": round(truth_seconds, 1),
        "ground_truth_err_resim": sum(truth_resim) / len(truth_resim),
        "results": results,
        "paper": PAPER, "paper_note": PAPER_NOTE,
        "memory": memory(depths, args.hidden, args.memory_batch),
    }
    report["environment"]["total_seconds"] = round(time.perf_counter() - started, 1)
    if not args.quick:
        write_json(args.out, report)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
