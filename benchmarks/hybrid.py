r"""Hybrid model: one digits flow for classification and density together.

Reproduces, at toy scale, Nalisnick et al. 2019 ("Hybrid models with deep and invertible
features"): a flow :math:`z = f(x)` whose latent feeds a linear classifier
:math:`p(y \mid z) = \mathrm{softmax}(Wz + b)`, trained on the joint objective

.. math::

    \max \; \log p(y \mid z) + \lambda \, \frac{\log p(x)}{D}

per image, with :math:`\log p(x)` the dequantized log-likelihood in **nats per dimension**
(:math:`D = 64`), so :math:`\lambda = 1` weighs one nat/dim of density like one nat of
classification loss; multiply :math:`\lambda` by :math:`1/D` for the paper's unscaled
:math:`\log p(x)`. :math:`\lambda = 0` is a pure classifier on invertible features. The pure
flow reference trains on :math:`\log p(x)` alone and fits the head on the *detached* latent (a
linear probe that cannot change the flow).

Model (defaults): ``glow(in_channels=1, image_size=8, levels=2, steps=8, hidden=64,
preprocess="logit")`` in ``memory="reversible"`` (plus one hybrid in ``memory="stored"`` as a
control), head ``nn.Linear(64, 10)`` on the flat latent of ``forward_and_log_det`` (every
factored-out part and the last level's output; ``--latent top``: the last level's only).
``--model realnvp`` with ``--hidden``, ``--levels``, ``--coupling-net``, ``--num-blocks``
for RealNVP backbones. Data: scikit-learn digits, the 1500 / 297 split of
``benchmarks.flows.load_digits_split`` (labels in the same permutation), uniform
dequantization with 17 levels; test bits/dim per image as in ``benchmarks/ood.py`` (8 draws);
test accuracy on the cell midpoints :math:`(x + 1/2) / 17`. AdamW (decoupled weight decay
``--weight-decay``, 0.1 by default; lr 2e-3, cosine decay), batch 64, gradient-norm clip 50, 30
epochs, one thread. The pure flow is trained with the hybrids' weight decay and without it
(``--pure-weight-decay both``, the default); the lower test bits/dim is the reference.
``--label-smoothing`` smooths the CE term; ``--lam-end`` moves :math:`\lambda` linearly from
each ``--lam`` to that value over training; ``--ce-warmup F`` ramps the CE weight from 0 to 1
over the first fraction F of training (density first). ``--augment shift``: the digits
RevNet's 1-pixel shifts on every training batch (both terms; the pure flow is then trained
with and without them and the lower test bits/dim is the reference); ``--augment shift-ce``:
shifted copies for the classification term only; ``--augment shift-ce-both``: the
classification term on the images and a shifted copy of each (its mean over both), the
likelihood term on the images only. ``--head-dropout P``: dropout on the latent
the head reads, in training. ``--head-weight-decay W`` and ``--head-lr-mult M``: the head's own
AdamW parameter group (weight decay W instead of ``--weight-decay``, learning rate M times
``--lr``). ``--eval-draws K``: every evaluation also reports ``accuracy_draws``, the accuracy of
the mean softmax probabilities over K dequantization draws (a different evaluation rule; the
midpoint accuracy stays the rows' figure). ``--ema D [D ...]``: exponential moving averages of the weights
(flow and head, :class:`torch.optim.swa_utils.AveragedModel`), for hybrids and pure flows
alike, each evaluated with the raw weights on the same dequantization draws; the first decay
(0: the raw weights) gives the figures the targets are checked on. Targets: test accuracy
within 1 point of the digits RevNet (99.17 %) and test bits/dim within 0.1 of the pure flow,
in the same run (``meets_targets`` per row). ``--seeds S [S ...]`` trains the whole plan once
per seed (initialisation, batch order, dequantization noise; the data split is fixed), each
seed's hybrids against the lowest bits/dim of that seed's pure flows over their raw and
primary-EMA weights; ``summary`` gives mean / std / range per run over the seeds.
``--validate`` is for choosing hyperparameters: it trains on 1200 of the 1500 training images
and evaluates on the other 300 (:func:`validation_indices`, the same split for every seed),
never touching the test images.

Writes ``benchmarks/results/hybrid.json``. Run: ``python benchmarks/hybrid.py`` (about 7
minutes on a 2-core CPU, one thread); ``--quick`` for a smoke run (1 epoch, two runs);
``--lam 0 1`` to choose the lambdas. The recipe chosen on the validation split
(``results/hybrid_sweep3.json``), on three seeds: ``python benchmarks/hybrid.py --seeds 0 1 2
--epochs 45 --lam 2 --ema 0.99 0 --no-stored --out benchmarks/results/hybrid_seeds.json``
(about 18 minutes; it meets the bits/dim target on every seed, not the accuracy one).
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
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import environment, spread  # noqa: E402
from benchmarks.flows import load_digits_split  # noqa: E402
from benchmarks.ood import LEVELS, per_image_bpd  # noqa: E402
from revtrain.flows import UniformDequantization  # noqa: E402
from revtrain.models import create  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
REVNET_DIGITS_ACC = 99.17  # configs/digits_revnet.yaml, test top-1 (%)
LATENTS = ("all", "top")
AUGMENTS = ("none", "shift", "shift-ce", "shift-ce-both")
VALIDATION_HELD_OUT = 300  # training images held out by --validate
VALIDATION_SEED = 1234  # their permutation: the same for every --seeds value
DEFAULT_FLOW: dict[str, Any] = {"model": "glow", "hidden": 64, "levels": 2, "steps": 8,
                                "coupling_net": "conv", "num_blocks": 2}


def load_digits_labelled(seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(train_x, train_y, test_x, test_y)``: the images of :func:`load_digits_split` with
    their labels, in the same permutation."""
    from sklearn.datasets import load_digits

    train_x, test_x = load_digits_split(seed)
    data = load_digits()
    perm = torch.randperm(len(data.images), generator=torch.Generator().manual_seed(seed))
    images = torch.as_tensor(data.images, dtype=torch.long).unsqueeze(1)[perm]
    labels = torch.as_tensor(data.target, dtype=torch.long)[perm]
    assert torch.equal(images[:len(train_x)], train_x), "split changed in benchmarks.flows"
    return train_x, labels[:len(train_x)], test_x, labels[len(train_x):]


def validation_indices(n: int, held_out: int = VALIDATION_HELD_OUT) -> tuple[Tensor, Tensor]:
    """``(fit, validation)``: disjoint index tensors covering ``range(n)``, ``held_out`` of them
    in the validation part, from a fixed permutation (:data:`VALIDATION_SEED`, the same for every
    training seed)."""
    if not 0 < held_out < n:
        raise ValueError(f"validation_indices: held_out must be in 1..{n - 1}, got {held_out}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(VALIDATION_SEED))
    return perm[held_out:].sort().values, perm[:held_out].sort().values


def split_validation(data: tuple[Tensor, ...], held_out: int = VALIDATION_HELD_OUT
                     ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(fit_x, fit_y, val_x, val_y)``: :func:`load_digits_labelled`'s training images split
    by :func:`validation_indices` (the test images are not used)."""
    train_x, train_y = data[0], data[1]
    fit, val = validation_indices(len(train_x), held_out)
    return train_x[fit], train_y[fit], train_x[val], train_y[val]


def joint_loss(flow: nn.Module, head: nn.Module, y: Tensor, log_q: Tensor, labels: Tensor,
               lam: float | None, y_cls: Tensor | None = None, label_smoothing: float = 0.0,
               ce_weight: float = 1.0, ce_on_both: bool = False
               ) -> tuple[Tensor, dict[str, float]]:
    r"""Hybrid loss of a dequantized batch ``y`` (with ``log_q`` of the dequantizer).

    ``lam`` a number: :math:`\mathrm{CE}(\mathrm{head}(z), y) + \lambda\,\mathrm{NLL}/D`
    (NLL in nats, minus ``log_q``), both averaged over the batch. ``lam=None``: the pure flow,
    :math:`\mathrm{NLL}/D + \mathrm{CE}(\mathrm{head}(z.\mathrm{detach}()), y)` (the head is
    a probe; no classifier gradient reaches the flow). ``y_cls``: another view of the same
    images (e.g. shifted) for the classification term only; it goes through the flow in the
    same call as ``y`` (a batch of 2B); ``ce_on_both``: the classification term on both views
    (the mean over the 2B latents, labels repeated), the likelihood still on ``y`` only; then
    ``correct`` counts the ``y_cls`` view's. ``label_smoothing``: that of
    :func:`torch.nn.functional.cross_entropy`, :math:`(1 - \epsilon)` on the label and
    :math:`\epsilon / 10` on every class. ``ce_weight`` multiplies the hybrid's CE term (a
    schedule's current weight; the pure flow's probe ignores it). Returns the loss and its
    parts (``ce``, the smoothed CE, ``bpd``, ``correct``).
    """
    n = len(y)
    z, log_det = flow.forward_and_log_det(y if y_cls is None else torch.cat([y, y_cls]))
    z_cls = z if y_cls is None or ce_on_both else z[n:]  # (B or 2B, D) flat latents
    labels_cls = labels.repeat(2) if y_cls is not None and ce_on_both else labels
    z, log_det = z[:n], log_det[:n]
    num_dims = z.shape[1]
    nll = -(flow.prior.log_prob(z) + log_det - log_q) / num_dims  # nats/dim, (B,)
    logits = head(z_cls.detach() if lam is None else z_cls)
    ce = F.cross_entropy(logits, labels_cls, label_smoothing=label_smoothing)
    loss = nll.mean() + ce if lam is None else ce_weight * ce + lam * nll.mean()
    parts = {"ce": ce.item(), "bpd": nll.mean().item() / math.log(2),
             "correct": int((logits[-n:].argmax(1) == labels).sum())}
    return loss, parts


def schedule(progress: float, lam: float, lam_end: float | None = None,
             ce_warmup: float = 0.0) -> tuple[float, float]:
    r"""``(lam, ce_weight)`` at ``progress`` :math:`t \in [0, 1)` of training (steps done /
    steps in all). :math:`\lambda` goes linearly from ``lam`` to ``lam_end`` (constant when
    ``lam_end`` is None); the CE weight rises linearly from 0 to 1 over the first ``ce_warmup``
    fraction of training (density first), then stays at 1."""
    lam_t = lam if lam_end is None else lam + (lam_end - lam) * progress
    ce_weight = 1.0 if ce_warmup <= 0 else min(1.0, progress / ce_warmup)
    return lam_t, ce_weight


def shift_augment(x: Tensor, gen: torch.Generator) -> Tensor:
    """Shift each image of ``x`` (B, C, H, W) by -1, 0 or +1 pixel in each direction, filling
    the vacated row / column with the image's minimum: the digits RevNet's augmentation
    (``revtrain.lightning.data._ShiftAugment``), batched."""
    shifts = torch.randint(-1, 2, (len(x), 2), generator=gen)
    out = x.clone()
    low = x.amin(dim=(1, 2, 3), keepdim=True)  # (B, 1, 1, 1)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            sel = ((shifts[:, 0] == dy) & (shifts[:, 1] == dx)).nonzero().squeeze(1)
            if not len(sel) or not (dy or dx):
                continue
            h = torch.roll(x[sel], shifts=(dy, dx), dims=(2, 3))  # (b, C, H, W)
            if dy:
                h[:, :, 0 if dy > 0 else -1, :] = low[sel, :, 0]
            if dx:
                h[:, :, :, 0 if dx > 0 else -1] = low[sel, :, 0]
            out[sel] = h
    return out


@torch.no_grad()
def accuracy(flow: nn.Module, head: nn.Module, x: Tensor, labels: Tensor) -> float:
    """Top-1 accuracy (%) on the dequantization cell midpoints ``(x + 1/2) / LEVELS``."""
    flow.eval()
    z, _ = flow.forward_and_log_det((x.float() + 0.5) / LEVELS)
    return 100.0 * float((head(z).argmax(1) == labels).double().mean())


@torch.no_grad()
def draws_accuracy(flow: nn.Module, head: nn.Module, x: Tensor, labels: Tensor, draws: int,
                   gen: torch.Generator) -> float:
    r"""Top-1 accuracy (%) of the mean softmax probabilities over ``draws`` uniform
    dequantizations :math:`(x + u) / K`, :math:`u \sim U[0, 1)^D` from ``gen`` (an evaluation
    rule of its own, beside :func:`accuracy`'s cell midpoints)."""
    if draws < 1:
        raise ValueError(f"draws_accuracy: draws must be >= 1, got {draws}")
    flow.eval()
    x = x.float()
    probs = []
    for _ in range(draws):
        z, _ = flow.forward_and_log_det((x + torch.rand(x.shape, generator=gen)) / LEVELS)
        probs.append(torch.softmax(head(z), 1))  # (B, num_classes)
    mean = torch.stack(probs).mean(0)
    return 100.0 * float((mean.argmax(1) == labels).double().mean())


def make_optimizer(flow: nn.Module, head: nn.Module, lr: float, weight_decay: float,
                   head_weight_decay: float | None = None, head_lr_mult: float = 1.0
                   ) -> torch.optim.AdamW:
    """AdamW with two parameter groups: the flow's (``lr``, ``weight_decay``) and the head's
    (``head_lr_mult * lr``, ``head_weight_decay``, which defaults to ``weight_decay``)."""
    head_wd = weight_decay if head_weight_decay is None else head_weight_decay
    return torch.optim.AdamW(
        [{"params": list(flow.parameters())},
         {"params": list(head.parameters()), "lr": lr * head_lr_mult,
          "weight_decay": head_wd}], lr=lr, weight_decay=weight_decay)


class LatentHead(nn.Module):
    """Linear classifier on the flat latent ``z`` (B, D) of a flow: on all of it
    (``latent="all"``, every factored-out part and the last level's output concatenated) or on
    the last ``top_dims`` entries only (``latent="top"``, the last level's output).
    ``dropout``: dropout on the entries it reads, in training mode only."""

    def __init__(self, num_dims: int, num_classes: int = 10, latent: str = "all",
                 top_dims: int | None = None, dropout: float = 0.0):
        super().__init__()
        if latent not in LATENTS:
            raise ValueError(f"LatentHead: latent must be one of {', '.join(LATENTS)}, "
                             f"got {latent!r}")
        self.start = num_dims - top_dims if latent == "top" and top_dims else 0
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(num_dims - self.start, num_classes)

    def forward(self, z: Tensor) -> Tensor:
        return self.linear(self.dropout(z[:, self.start:]))  # (B, num_classes)


def make_flow(model: str, hidden: int, levels: int, steps: int, coupling_net: str,
              num_blocks: int, memory: str) -> nn.Module:
    """The digits flow: ``realnvp`` (logit preprocessing, ``hidden`` / ``coupling_net`` /
    ``num_blocks``) or ``glow`` (``steps`` steps per level, logit preprocessing)."""
    if model == "realnvp":
        return create("realnvp", in_channels=1, image_size=8, levels=levels, hidden=hidden,
                      coupling_net=coupling_net, num_blocks=num_blocks, memory=memory)
    if model == "glow":
        return create("glow", in_channels=1, image_size=8, levels=levels, steps=steps,
                      hidden=hidden, preprocess="logit", memory=memory)
    raise ValueError(f"unknown model {model!r}; use realnvp or glow")


def top_dims(flow: nn.Module) -> int:
    """Entries of the last level's output at the end of the flat latent."""
    c, h, w = flow.output_shapes[-1]
    return c * h * w


def ema_label(decay: float) -> str:
    """The key of an evaluation: ``raw`` (decay 0, the trained weights) or ``ema <decay>``."""
    return "raw" if not decay else f"ema {decay:g}"


class WeightAverages:
    """Exponential moving averages of a module's parameters, one per decay, each a
    :class:`torch.optim.swa_utils.AveragedModel` with :func:`get_ema_multi_avg_fn` (decays of 0
    are skipped: the raw weights need none). The copies are made at the first :meth:`update`,
    after an optimiser step, so that data-dependent initialisations (ActNorm) have run; buffers
    are not averaged but copied from the module by :meth:`modules` before an evaluation."""

    def __init__(self, decays: tuple[float, ...] | list[float]):
        for d in decays:
            if not 0.0 <= d < 1.0:
                raise ValueError(f"WeightAverages: decays must be in [0, 1), got {d}")
        self.decays = [d for d in dict.fromkeys(decays) if d]
        self.averages: dict[float, AveragedModel] = {}

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        if not self.averages:
            self.averages = {d: AveragedModel(module, multi_avg_fn=get_ema_multi_avg_fn(d),
                                              use_buffers=False) for d in self.decays}
        for avg in self.averages.values():
            avg.update_parameters(module)

    @torch.no_grad()
    def modules(self, module: nn.Module) -> dict[str, nn.Module]:
        """``{label: module}``: the raw ``module`` and each average (buffers synced from it)."""
        out = {"raw": module}
        for d, avg in self.averages.items():
            for mine, theirs in zip(avg.module.buffers(), module.buffers()):
                mine.copy_(theirs)
            out[ema_label(d)] = avg.module
        return out


def train_hybrid(lam: float | None, memory: str, epochs: int, data: tuple[Tensor, ...],
                 batch: int = 64, lr: float = 2e-3, seed: int = 0, augment: str = "none",
                 latent: str = "all", weight_decay: float = 0.0, label_smoothing: float = 0.0,
                 lam_end: float | None = None, ce_warmup: float = 0.0,
                 flow_config: dict[str, Any] | None = None, ema: tuple[float, ...] = (0.0,),
                 head_dropout: float = 0.0, head_weight_decay: float | None = None,
                 head_lr_mult: float = 1.0, eval_draws: int = 0) -> dict[str, Any]:
    """Train flow and head jointly (``lam=None``: pure flow + probe); test accuracy and bpd.

    ``augment="shift"`` shifts every training batch by up to one pixel (:func:`shift_augment`)
    before dequantization, for both terms of the loss; ``weight_decay`` is AdamW's (decoupled);
    ``label_smoothing`` that of the CE term; ``lam_end`` and ``ce_warmup`` (a fraction of
    training) the hybrid's :func:`schedule`, per step (ignored by the pure flow). ``seed``
    seeds the initialisation, the batch order and the dequantization noise (not the split).
    ``ema``: decays of exponential moving averages of the flow's and head's weights, updated
    after every step (:class:`WeightAverages`); every one is evaluated, with the raw weights,
    in ``evaluations`` (the same dequantization draws for each), and the first (0: the raw
    weights) gives ``test_accuracy`` / ``test_bpd``. ``head_dropout``: dropout on the latent
    the head reads, in training (the pure flow's probe too; it cannot reach that flow).
    ``head_weight_decay`` (default: ``weight_decay``) and ``head_lr_mult`` (the head's learning
    rate over ``lr``): the head's AdamW parameter group (:func:`make_optimizer`; the pure
    flow's probe too). ``eval_draws`` K > 0: every evaluation also gets ``accuracy_draws``,
    the accuracy of the mean softmax over K dequantization draws (:func:`draws_accuracy`, the
    same draws for every evaluation), beside the midpoint ``accuracy``.
    ``data[2:]`` is what is evaluated: the test images, or the validation ones.
    """
    train_x, train_y, test_x, test_y = data
    config = {**DEFAULT_FLOW, **(flow_config or {})}
    torch.manual_seed(seed)
    flow = make_flow(memory=memory, **config)
    head = LatentHead(flow.num_dims, 10, latent, top_dims(flow), head_dropout)
    model = nn.ModuleDict({"flow": flow, "head": head})
    params = [*flow.parameters(), *head.parameters()]
    opt = make_optimizer(flow, head, lr, weight_decay, head_weight_decay, head_lr_mult)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(
        opt, epochs * math.ceil(len(train_x) / batch))
    averages = WeightAverages(ema)
    deq = UniformDequantization(LEVELS)
    gen = torch.Generator().manual_seed(seed + 1)
    aug_gen = torch.Generator().manual_seed(seed + 3)
    curve = []
    step, total_steps = 0, epochs * math.ceil(len(train_x) / batch)
    start = time.perf_counter()
    for _ in range(epochs):
        model.train()
        bpd_sum, ce_sum, correct = 0.0, 0.0, 0
        for idx in torch.randperm(len(train_x), generator=gen).split(batch):
            x, y_cls = train_x[idx], None
            if augment == "shift":
                x = shift_augment(x, aug_gen)
            y, log_q = deq(x)
            if augment in ("shift-ce", "shift-ce-both"):
                y_cls, _ = deq(shift_augment(x, aug_gen))
            lam_t, ce_weight = (None, 1.0) if lam is None else schedule(
                step / total_steps, lam, lam_end, ce_warmup)
            loss, parts = joint_loss(flow, head, y, log_q, train_y[idx], lam_t, y_cls,
                                     label_smoothing, ce_weight,
                                     ce_on_both=augment == "shift-ce-both")
            step += 1
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 50.0)
            opt.step()
            sched.step()
            averages.update(model)
            bpd_sum += parts["bpd"] * len(idx)
            ce_sum += parts["ce"] * len(idx)
            correct += parts["correct"]
        n = len(train_x)
        curve.append({"bpd": round(bpd_sum / n, 4), "ce": round(ce_sum / n, 4),
                      "acc": round(100.0 * correct / n, 2)})
    train_s = time.perf_counter() - start
    evaluations = {}
    for label, m in averages.modules(model).items():
        torch.manual_seed(seed + 2)  # the same dequantization draws for every evaluation
        evaluations[label] = {
            "accuracy": round(accuracy(m["flow"], m["head"], test_x, test_y), 2),
            "bpd": round(float(per_image_bpd(m["flow"], test_x).mean()), 4)}
        if eval_draws:
            draws_gen = torch.Generator().manual_seed(seed + 4)
            evaluations[label]["accuracy_draws"] = round(draws_accuracy(
                m["flow"], m["head"], test_x, test_y, eval_draws, draws_gen), 2)
    primary = evaluations[ema_label(ema[0]) if ema else "raw"]
    return {
        "objective": "pure flow (head: detached probe)" if lam is None else "hybrid",
        "lam": lam, "memory": memory, "seed": seed, "augment": augment, "latent": latent,
        "epochs": epochs, "batch": batch, "lr": lr, "weight_decay": weight_decay,
        "label_smoothing": label_smoothing, "lam_end": None if lam is None else lam_end,
        "ce_warmup": 0.0 if lam is None else ce_warmup, "head_dropout": head_dropout,
        "head_weight_decay": weight_decay if head_weight_decay is None else head_weight_decay,
        "head_lr_mult": head_lr_mult, "eval_draws": eval_draws,
        "ema": ema_label(ema[0]) if ema else "raw",
        "params": sum(p.numel() for p in params),
        "head_params": sum(p.numel() for p in head.parameters()),
        "train_images": len(train_x), "eval_images": len(test_x),
        "train_seconds": round(train_s, 1),
        "test_accuracy": primary["accuracy"],
        "test_bpd": primary["bpd"],
        "evaluations": evaluations,
        "train_per_epoch": curve,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--lam", type=float, nargs="+", default=[0.0, 1.0, 2.0, 3.0, 10.0],
                        help="lambdas of the reversible hybrids (nats/dim scaling)")
    parser.add_argument("--stored-lam", type=float, default=2.0,
                        help="lambda of the memory='stored' control run")
    parser.add_argument("--model", choices=["realnvp", "glow"], default=DEFAULT_FLOW["model"])
    parser.add_argument("--hidden", type=int, default=DEFAULT_FLOW["hidden"])
    parser.add_argument("--levels", type=int, default=DEFAULT_FLOW["levels"])
    parser.add_argument("--steps", type=int, default=DEFAULT_FLOW["steps"],
                        help="glow: steps per level")
    parser.add_argument("--coupling-net", choices=["conv", "resnet"],
                        default=DEFAULT_FLOW["coupling_net"], help="realnvp's coupling networks")
    parser.add_argument("--num-blocks", type=int, default=DEFAULT_FLOW["num_blocks"],
                        help="realnvp resnet: residual blocks")
    parser.add_argument("--augment", choices=list(AUGMENTS), default="none",
                        help="shift: the digits RevNet's 1-pixel shifts on every training "
                             "batch; shift-ce: shifted copies for the classification term "
                             "only, the likelihood term on the images as they are; "
                             "shift-ce-both: the classification term on the images and a "
                             "shifted copy, the likelihood term on the images")
    parser.add_argument("--pure-augment", choices=["same", "both"], default="both",
                        help="pure flow reference: with the hybrids' augmentation only, or "
                             "with and without it (the reference is the lower test bits/dim)")
    parser.add_argument("--pure-weight-decay", choices=["same", "both"], default="both",
                        help="pure flow reference: with the hybrids' weight decay only, or "
                             "with it and without (the reference is the lower test bits/dim)")
    parser.add_argument("--latent", choices=list(LATENTS), default="all",
                        help="what the linear head reads: the whole latent or the last level's")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--weight-decay", type=float, default=0.1,
                        help="AdamW's decoupled weight decay, every parameter")
    parser.add_argument("--label-smoothing", type=float, default=0.0,
                        help="label smoothing of the CE term (also the pure flow's probe)")
    parser.add_argument("--lam-end", type=float, default=None,
                        help="hybrids: lambda goes linearly from each --lam to this value")
    parser.add_argument("--ce-warmup", type=float, default=0.0,
                        help="hybrids: the CE weight rises from 0 to 1 over this fraction "
                             "of training (density first)")
    parser.add_argument("--ema", type=float, nargs="+", default=[0.0],
                        help="decays of exponential moving averages of the weights (flow and "
                             "head, hybrids and pure flows alike), evaluated with the raw "
                             "weights; the first (0: the raw weights) gives the rows' "
                             "test_accuracy / test_bpd / meets_targets")
    parser.add_argument("--head-dropout", type=float, default=0.0,
                        help="dropout on the latent the linear head reads, in training")
    parser.add_argument("--head-weight-decay", type=float, default=None,
                        help="AdamW weight decay of the head's parameters (its own parameter "
                             "group; default: --weight-decay), the pure flow's probe too")
    parser.add_argument("--head-lr-mult", type=float, default=1.0,
                        help="the head's learning rate as a multiple of --lr (cosine alike)")
    parser.add_argument("--eval-draws", type=int, default=0,
                        help="K > 0: also report accuracy_draws per evaluation, the accuracy "
                             "of the mean softmax over K dequantization draws (a different "
                             "evaluation rule from the midpoint accuracy, which stays)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="training seeds (initialisation, batch order, dequantization); "
                             "every run of the plan once per seed, each seed's hybrids "
                             "against that seed's pure flows")
    parser.add_argument("--validate", action="store_true",
                        help="hyperparameter selection: train on 1200 of the 1500 training "
                             "images and evaluate on the other 300 (a fixed split, the same "
                             "for every seed); the test images are not used")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 1 epoch, the pure flow and the first lambda only")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the planned runs (lam, memory, augment, weight decay)")
    parser.add_argument("--no-stored", action="store_true", help="skip the stored control run")
    parser.add_argument("--out", type=Path, default=RESULTS / "hybrid.json")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if args.dry_run:
        runs = plan(args)
        for run in runs:
            print(run)
        return {"runs": runs}
    torch.set_num_threads(args.threads)
    env = environment()
    started = time.perf_counter()
    epochs = 1 if args.quick else args.epochs
    data = load_digits_labelled()
    if args.validate:
        data = split_validation(data)
    eval_set = (f"validation ({len(data[2])} of the 1500 training images, fixed split; "
                f"trained on the other {len(data[0])})" if args.validate
                else f"test ({len(data[2])} images; trained on all {len(data[0])})")
    flow_config = {"model": args.model, "hidden": args.hidden, "levels": args.levels,
                   "steps": args.steps, "coupling_net": args.coupling_net,
                   "num_blocks": args.num_blocks}
    primary = ema_label(args.ema[0])
    rows = []
    for seed in args.seeds:
        for lam, memory, augment, w in plan(args):
            row = train_hybrid(lam, memory, epochs, data, lr=args.lr, seed=seed,
                               augment=augment, latent=args.latent, weight_decay=w,
                               label_smoothing=args.label_smoothing, lam_end=args.lam_end,
                               ce_warmup=args.ce_warmup, flow_config=flow_config,
                               ema=tuple(args.ema), head_dropout=args.head_dropout,
                               head_weight_decay=args.head_weight_decay,
                               head_lr_mult=args.head_lr_mult, eval_draws=args.eval_draws)
            rows.append(row)
            name = "pure flow" if lam is None else f"lambda={lam:g}"
            evals = "  ".join(f"{k} {v['accuracy']:.2f} % {v['bpd']:.4f}" + (
                f" (draws {v['accuracy_draws']:.2f} %)" if "accuracy_draws" in v else "")
                for k, v in row["evaluations"].items())
            print(f"seed {seed} {name:12s} {memory:10s} aug {augment:5s} wd {w:g}  {evals}  "
                  f"{row['train_seconds']:6.1f} s", flush=True)
    references = add_targets(rows, primary)
    env["total_seconds"] = round(time.perf_counter() - started, 1)
    train_x, _, test_x, _ = data
    flow = make_flow(memory="reversible", **flow_config)
    report = {
        "environment": env,
        "config": {"model": describe(flow_config),
                   "head": "nn.Linear on the " + ("whole flat latent" if args.latent == "all"
                                                  else "last level's latent"),
                   "objective": "CE + lam * NLL in nats/dim (D = 64), batch means",
                   "augment": args.augment, "lr": args.lr, "weight_decay": args.weight_decay,
                   "label_smoothing": args.label_smoothing, "lam_end": args.lam_end,
                   "ce_warmup": args.ce_warmup, "head_dropout": args.head_dropout,
                   "head_weight_decay": (args.weight_decay if args.head_weight_decay is None
                                         else args.head_weight_decay),
                   "head_lr_mult": args.head_lr_mult, "eval_draws": args.eval_draws,
                   "epochs": epochs, "seeds": args.seeds,
                   "ema": {"decays": args.ema, "primary": primary,
                           "how": "torch.optim.swa_utils.AveragedModel with "
                                  "get_ema_multi_avg_fn, flow and head, updated after every "
                                  "step from the first; buffers copied"},
                   "optimizer": "AdamW, cosine decay, batch 64, grad-norm clip 50",
                   "evaluated_on": eval_set,
                   "train_images": len(train_x), "eval_images": len(test_x),
                   "flow_params": sum(p.numel() for p in flow.parameters()),
                   "dequantization": f"uniform, {LEVELS} levels; bpd over 8 draws",
                   "test_accuracy_input": "cell midpoints (x + 0.5) / 17",
                   "pure_flow_reference_bpd": references,
                   "reference_rule": "per seed, the lowest bits/dim of that seed's pure flows "
                                     "over their raw and primary-EMA weights",
                   "targets": {"accuracy_within_points_of_revnet": 1.0,
                               "revnet_digits_test_accuracy": REVNET_DIGITS_ACC,
                               "bpd_within_of_pure_flow": 0.1}},
        "summary": summarize(rows),
        "runs": rows,
    }
    for s in report["summary"]:
        print(f"lambda={s['lam']} {s['memory']}: acc {s['accuracy']}  "
              f"bpd - pure {s['bpd_minus_pure_flow']}  meets per seed {s['meets_targets']}")
    print(f"{env['total_seconds']} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")
    return report


def add_targets(rows: list[dict[str, Any]], primary: str) -> dict[str, float]:
    """Add ``bpd_minus_pure_flow``, ``acc_minus_revnet`` and ``meets_targets`` to every row
    (from its primary evaluation), and per evaluation in ``targets_by_evaluation`` (with
    ``acc_draws_minus_revnet`` / ``meets_targets_draws`` where ``--eval-draws`` gave an
    ``accuracy_draws``). The
    reference of a seed is the lowest bits/dim of that seed's pure flows over their raw and
    ``primary`` evaluations (so an average cannot make the reference easier); per evaluation
    ``e``, the lowest over raw and ``e``. Returns ``{seed: reference}``."""
    references: dict[str, float] = {}
    for seed in dict.fromkeys(row["seed"] for row in rows):
        pure = [r for r in rows if r["seed"] == seed and r["lam"] is None]
        for row in (r for r in rows if r["seed"] == seed):
            by_eval = {}
            for label, ev in row["evaluations"].items():
                ref = min(p["evaluations"][k]["bpd"] for p in pure
                          for k in dict.fromkeys(("raw", label)))
                d_bpd = round(ev["bpd"] - ref, 4)
                d_acc = round(ev["accuracy"] - REVNET_DIGITS_ACC, 2)
                by_eval[label] = {"bpd_minus_pure_flow": d_bpd, "acc_minus_revnet": d_acc,
                                  "meets_targets": (row["lam"] is not None and d_acc >= -1.0
                                                    and d_bpd <= 0.1)}
                if "accuracy_draws" in ev:  # the other evaluation rule, its own verdict
                    d_draws = round(ev["accuracy_draws"] - REVNET_DIGITS_ACC, 2)
                    by_eval[label]["acc_draws_minus_revnet"] = d_draws
                    by_eval[label]["meets_targets_draws"] = (
                        row["lam"] is not None and d_draws >= -1.0 and d_bpd <= 0.1)
                if label == primary:
                    references[str(seed)] = ref
            row.update(by_eval[primary])
            row["targets_by_evaluation"] = by_eval
    return references


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per run of the plan (objective, lambda, memory, augment, weight decay) across seeds: the
    :func:`~benchmarks.common.spread` of accuracy, bits/dim and bits/dim minus the pure flow,
    and ``meets_targets`` per seed (``all_seeds_meet_targets``); with ``--eval-draws``, the
    spread of the primary evaluation's ``accuracy_draws`` too."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        key = (row["objective"], row["lam"], row["memory"], row["augment"], row["weight_decay"])
        groups.setdefault(key, []).append(row)
    out = []
    for (objective, lam, memory, augment, w), group in groups.items():
        drawn = [r for r in group if "accuracy_draws" in r["evaluations"][r["ema"]]]
        extra = {"accuracy_draws": spread([r["evaluations"][r["ema"]]["accuracy_draws"]
                                           for r in drawn], 2),
                 "meets_targets_draws": [r["targets_by_evaluation"][r["ema"]]
                                         ["meets_targets_draws"] for r in drawn]
                 } if drawn else {}
        out.append({"objective": objective, "lam": lam, "memory": memory, "augment": augment,
                    "weight_decay": w, "seeds": [r["seed"] for r in group],
                    "accuracy": spread([r["test_accuracy"] for r in group], 2),
                    "bpd": spread([r["test_bpd"] for r in group], 4),
                    "bpd_minus_pure_flow": spread([r["bpd_minus_pure_flow"] for r in group], 4),
                    "meets_targets": [r["meets_targets"] for r in group],
                    "all_seeds_meet_targets": lam is not None and all(
                        r["meets_targets"] for r in group), **extra})
    return out


def plan(args: argparse.Namespace) -> list[tuple[float | None, str, str, float]]:
    """The runs of :func:`main`, ``(lam, memory, augment, weight_decay)``: the pure flow with
    the hybrids' augmentation and weight decay, and (unless ``--quick``, or ``same`` for
    ``--pure-augment`` / ``--pure-weight-decay``) without them, then the reversible hybrids and
    the stored control. The pure flow reference is the lowest test bits/dim of those pure flows,
    so a setting that hurts the pure flow cannot make the reference easier to meet."""
    wd = args.weight_decay
    pure_augments = [args.augment] + (["none"] if args.augment != "none"
                                      and args.pure_augment == "both" else [])
    pure_wds = [wd] + ([0.0] if wd and args.pure_weight_decay == "both" else [])
    runs: list[tuple[float | None, str, str, float]] = [
        (None, "reversible", augment, w) for augment in pure_augments for w in pure_wds]
    runs = runs[:1] if args.quick else runs
    runs += [(lam, "reversible", args.augment, wd)
             for lam in (args.lam[:1] if args.quick else args.lam)]
    if not (args.quick or args.no_stored):
        runs.append((args.stored_lam, "stored", args.augment, wd))
    return runs


def describe(config: dict[str, Any]) -> str:
    """The ``create`` call of a flow configuration, as text."""
    if config["model"] == "glow":
        return (f"glow(in_channels=1, image_size=8, levels={config['levels']}, "
                f"steps={config['steps']}, hidden={config['hidden']}, preprocess='logit')")
    extra = (f", coupling_net='resnet', num_blocks={config['num_blocks']}"
             if config["coupling_net"] == "resnet" else "")
    return (f"realnvp(in_channels=1, image_size=8, levels={config['levels']}, "
            f"hidden={config['hidden']}{extra})")


if __name__ == "__main__":
    main()
