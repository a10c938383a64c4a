"""Mixup / CutMix of training batches (``BatchMix``, ``Classifier(mixup_alpha=...)``)."""

from __future__ import annotations

import copy
from functools import partial

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from revtrain.lightning import BatchMix, Classifier, DigitsDataModule

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (tests/conftest.py)

SMALL = {"embed_dim": 16, "depth": 2}  # rev_vit_digits, small enough for a few fast steps
DEIT = {"mixup_alpha": 0.8, "cutmix_alpha": 1.0}


def _batch(n: int = 6, dtype=torch.float64):
    """Random images (every pixel differs from every other image's) and distinct labels."""
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, 8, 8, generator=g, dtype=dtype), torch.arange(n)


def _pair_weights(target: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The weight of each image's own label in its soft target, checking the rest of the row:
    the partner's (sample i - 1, torchvision's pairing) label holds 1 - that, others 0."""
    n = len(y)
    lam = target[torch.arange(n), y]
    partner = y.roll(1, 0)
    torch.testing.assert_close(target[torch.arange(n), partner], 1 - lam)
    rest = target.clone()
    rest[torch.arange(n), y] = 0
    rest[torch.arange(n), partner] = 0
    assert torch.equal(rest, torch.zeros_like(rest))
    return lam


def test_mixup_gives_convex_combinations_and_targets_that_sum_to_one():
    x, y = _batch()
    torch.manual_seed(0)
    xm, target = BatchMix(10, mixup_alpha=0.8)(x, y)
    assert target.shape == (6, 10) and target.is_floating_point()
    torch.testing.assert_close(target.sum(-1), torch.ones(6))
    lam = _pair_weights(target, y)
    assert torch.all(lam == lam[0]) and 0 < lam[0] < 1  # one lambda per batch, a real mixture
    lam = float(lam[0])
    torch.testing.assert_close(xm, lam * x + (1 - lam) * x.roll(1, 0), rtol=0, atol=1e-6)
    assert not torch.allclose(xm, x, atol=1e-3)  # mixed, not the input back


def test_cutmix_pastes_a_box_of_the_partner_image_weighted_by_its_area():
    x, y = _batch()
    boxes = 0
    for seed in range(8):
        torch.manual_seed(seed)
        xm, target = BatchMix(10, cutmix_alpha=1.0)(x, y)
        torch.testing.assert_close(target.sum(-1), torch.ones(6))
        lam = _pair_weights(target, y)
        changed = (xm != x).any(dim=0).any(dim=0)  # (H, W): pixels that come from elsewhere
        rows, cols = changed.any(1).nonzero().flatten(), changed.any(0).nonzero().flatten()
        if len(rows):
            boxes += 1
            box = (slice(None), slice(None), slice(rows.min(), rows.max() + 1),
                   slice(cols.min(), cols.max() + 1))
            assert changed[box[2:]].all()  # a filled rectangle
            assert torch.equal(xm[box], x.roll(1, 0)[box])  # pasted from image i - 1
        assert torch.equal(xm[..., ~changed], x[..., ~changed])  # the rest untouched
        torch.testing.assert_close(1 - lam, torch.full((6,), changed.float().mean().item()))
    assert boxes >= 4  # the check above ran on real boxes


def test_both_kinds_and_the_probabilities_are_drawn():
    x, y = _batch(dtype=torch.float32)
    torch.manual_seed(0)
    kinds = []
    mix = BatchMix(10, **DEIT, mix_prob=0.5, switch_prob=0.5)
    for _ in range(60):
        xm, target = mix(x, y)
        if not target.is_floating_point():
            assert torch.equal(xm, x) and torch.equal(target, y)
            kinds.append("none")
        else:
            kinds.append("mixup" if (xm != x).all() else "cutmix")
    counts = {k: kinds.count(k) for k in ("none", "mixup", "cutmix")}
    assert all(10 <= c <= 40 for c in (counts["none"], counts["mixup"] + counts["cutmix"])), counts
    assert counts["mixup"] >= 5 and counts["cutmix"] >= 5, counts
    only_cutmix = BatchMix(10, **DEIT, switch_prob=1.0)
    assert all((only_cutmix(x, y)[0] == x).any() for _ in range(10))
    assert not BatchMix(10, **DEIT, mix_prob=0.0).enabled and BatchMix(10, **DEIT).enabled


@pytest.mark.parametrize("kw, option", [
    ({"mixup_alpha": -0.1}, "--model.mixup_alpha must be >= 0"),
    ({"cutmix_alpha": -1.0}, "--model.cutmix_alpha must be >= 0"),
    ({"mixup_alpha": float("nan")}, "--model.mixup_alpha must be >= 0"),
    ({"mix_prob": 1.5}, "--model.mix_prob is a probability"),
    ({"switch_prob": -0.1}, "--model.switch_prob is a probability"),
    ({"mixup_alpha": 0.8, "num_classes": 1}, "mixing needs at least 2 classes"),
])
def test_bad_values_name_the_option(kw, option):
    kw = {"num_classes": 10, **kw}
    with pytest.raises(ValueError, match=option):
        Classifier("rev_vit_digits", in_channels=1, model_kwargs=SMALL, **kw)


def test_soft_target_loss_is_the_mixture_of_the_smoothed_label_losses():
    """Label smoothing composed with mixing: CE against the smoothed soft target equals
    lam * CE(y_i) + (1 - lam) * CE(y_{i-1}), each with smoothing (DeiT / timm's target)."""
    eps = 0.1
    module = Classifier("rev_vit_digits", num_classes=10, in_channels=1, label_smoothing=eps,
                        model_kwargs=SMALL, **DEIT).double()
    x, y = _batch(dtype=torch.float64)
    x = x[:, :1]  # one channel
    torch.manual_seed(3)
    xm, target = module.mix(x, y)
    lam = _pair_weights(target, y).double()
    logits = module(xm)
    loss = module._criterion(logits, target)
    ce = partial(F.cross_entropy, label_smoothing=eps, reduction="none")
    expected = (lam * ce(logits, y) + (1 - lam) * ce(logits, y.roll(1, 0))).mean()
    # to the float32 rounding of torchvision's targets (lam and 1 - lam sum to 1 within 1e-7)
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)
    twice = F.cross_entropy(logits, (1 - eps) * target.double() + eps / 10, label_smoothing=eps)
    assert abs(float((twice - expected).detach())) > 1e-4  # smoothing twice fails the check above
    by_hand = -(((1 - eps) * target.double() + eps / 10) * logits.log_softmax(-1)).sum(-1).mean()
    torch.testing.assert_close(loss, by_hand, rtol=1e-12, atol=0)
    unsmoothed = F.cross_entropy(logits, target.double())
    assert abs(float((loss - unsmoothed).detach())) > 1e-3  # smoothing is really in it


def test_mixed_batch_gradients_equal_the_stored_twin():
    torch.manual_seed(0)
    rev = Classifier("rev_vit_digits", num_classes=10, in_channels=1, label_smoothing=0.1,
                     model_kwargs=SMALL, **DEIT).double()
    twin = copy.deepcopy(rev)
    twin.net.set_memory("stored")
    assert rev.hparams.memory == "reversible" and twin.net.memory.value == "stored"
    x, y = _batch(dtype=torch.float64)
    torch.manual_seed(1)
    batch = rev.mix(x[:, :1], y)
    grads = []
    for m in (rev, twin):
        m.loss(batch).backward()
        grads.append([p.grad for p in m.parameters()])
    assert all(g is not None for g in grads[0])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def _fit(tmp_path, steps: int = 3, memory: str = "reversible", **kw):
    pl.seed_everything(0, verbose=False)
    module = Classifier("rev_vit_digits", num_classes=10, in_channels=1, memory=memory,
                        label_smoothing=0.1, model_kwargs=SMALL,
                        optimizer=partial(torch.optim.AdamW, lr=1e-3), **kw)
    start = copy.deepcopy(module.net.state_dict())
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False,
                         default_root_dir=str(tmp_path), max_steps=steps, limit_val_batches=1,
                         val_check_interval=steps, num_sanity_val_steps=0)
    trainer.fit(module, DigitsDataModule(batch_size=32))
    return module, trainer, start


@pytest.mark.parametrize("memory", ["reversible", "stored"])
def test_a_few_mixed_steps_train(tmp_path, memory):
    module, trainer, start = _fit(tmp_path, memory=memory, **DEIT)
    assert module.net.memory.value == memory and trainer.global_step == 3
    metrics = trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss_epoch"]) and 0 <= metrics["train/top1"] <= 1
    assert "val/top1" in metrics
    for name, p in module.net.named_parameters():
        assert not torch.equal(p, start[name]), name  # AdamW moved every parameter


def test_zero_alphas_train_exactly_as_no_mixing(tmp_path):
    """Mixing off draws no random number and changes no tensor: the same weights to the bit."""
    plain = _fit(tmp_path)[0]
    off = _fit(tmp_path, mixup_alpha=0.0, cutmix_alpha=0.0)[0]
    never = _fit(tmp_path, **DEIT, mix_prob=0.0)[0]
    mixed = _fit(tmp_path, **DEIT)[0]
    for other in (off, never):
        assert all(torch.equal(a, b) for a, b in zip(plain.parameters(), other.parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(plain.parameters(), mixed.parameters()))


def test_only_training_batches_are_mixed(tmp_path, monkeypatch):
    seen: list[tuple[bool, torch.Tensor, torch.Tensor]] = []
    original = Classifier._criterion

    def spy(self, logits, y):
        seen.append((self.training, self._last_x, y))
        return original(self, logits, y)

    def forward(self, x):
        self._last_x = x
        return self.net(x)

    monkeypatch.setattr(Classifier, "_criterion", spy)
    monkeypatch.setattr(Classifier, "forward", forward)
    module, trainer, _ = _fit(tmp_path, steps=2, **DEIT)
    dm = DigitsDataModule(batch_size=32)
    trainer.test(module, dm, verbose=False)
    dm.setup()
    val_x, val_y = next(iter(dm.val_dataloader()))
    test_x, test_y = next(iter(dm.test_dataloader()))
    train = [(x, y) for training, x, y in seen if training]
    evals = [(x, y) for training, x, y in seen if not training]
    assert len(train) == 2 and len(evals) == 1 + len(dm.test_dataloader())
    for _, y in train:
        assert y.shape == (32, 10) and torch.allclose(y.sum(-1), torch.ones(32))
    assert torch.equal(evals[0][0], val_x) and torch.equal(evals[0][1], val_y)
    assert torch.equal(evals[1][0], test_x) and torch.equal(evals[1][1], test_y)

