"""``benchmarks/hybrid.py``: the joint loss on a tiny flow (gradient routes, lambda = 0,
reversible = stored), the labelled split, a ``--quick`` smoke run."""

from __future__ import annotations

import importlib
import json
import math

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from revtrain.flows import UniformDequantization
from revtrain.models import create


@pytest.fixture(scope="module")
def hybrid(benchmarks_path):
    pytest.importorskip("sklearn")
    return importlib.import_module("benchmarks.hybrid")


def _tiny(memory: str = "reversible", seed: int = 0):
    torch.manual_seed(seed)
    flow = create("realnvp", in_channels=1, image_size=8, levels=2, hidden=4, memory=memory)
    return flow, nn.Linear(flow.num_dims, 10)


def _batch(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 17, (6, 1, 8, 8), generator=gen)
    torch.manual_seed(seed)
    y, log_q = UniformDequantization(17)(x)
    return y, log_q, torch.arange(6) % 10


def _grey_digits(n_train: int):
    """Random 17-level 8x8 images with labels: ``n_train`` to train on, 8 to evaluate."""
    gen = torch.Generator().manual_seed(0)
    return (torch.randint(0, 17, (n_train, 1, 8, 8), generator=gen), torch.arange(n_train) % 10,
            torch.randint(0, 17, (8, 1, 8, 8), generator=gen), torch.arange(8) % 10)


def _grads(hybrid, flow, head, lam):
    y, log_q, labels = _batch()
    flow.zero_grad(set_to_none=True)
    head.zero_grad(set_to_none=True)
    loss, parts = hybrid.joint_loss(flow, head, y, log_q, labels, lam)
    loss.backward()
    return ([p.grad.clone() for p in flow.parameters()],
            [p.grad.clone() for p in head.parameters()], loss.item(), parts)


def test_gradients_reach_flow_and_head(hybrid):
    flow, head = _tiny()
    g_flow, g_head, loss, parts = _grads(hybrid, flow, head, 1.0)
    assert torch.isfinite(torch.tensor(loss))
    assert any(g.abs().sum() > 0 for g in g_flow)
    assert all(g.abs().sum() > 0 for g in g_head)
    assert 0 <= parts["correct"] <= 6 and parts["bpd"] > 0


def test_lambda_zero_is_the_classifier_alone(hybrid):
    flow, head = _tiny()
    g0_flow, g0_head, loss0, parts = _grads(hybrid, flow, head, 0.0)
    assert loss0 == pytest.approx(parts["ce"], rel=1e-6)  # no likelihood term in the loss
    # the flow's gradient at lambda = 0 is exactly the classifier's, computed by hand
    y, _, labels = _batch()
    flow.zero_grad(set_to_none=True)
    z, _ = flow.forward_and_log_det(y)
    torch.nn.functional.cross_entropy(head(z), labels).backward()
    for a, p in zip(g0_flow, flow.parameters()):
        torch.testing.assert_close(a, p.grad)
    # lambda > 0 adds a likelihood gradient to the flow only: the head's gradient is unchanged
    g1_flow, g1_head, _, _ = _grads(hybrid, flow, head, 1.0)
    assert any(not torch.allclose(a, b) for a, b in zip(g0_flow, g1_flow))
    for a, b in zip(g0_head, g1_head):
        torch.testing.assert_close(a, b)


def test_pure_flow_probe_sends_no_classifier_gradient_into_flow(hybrid):
    flow, head = _tiny()
    g_flow, g_head, _, _ = _grads(hybrid, flow, head, None)
    y, log_q, _ = _batch()
    flow.zero_grad(set_to_none=True)
    (-(flow.log_prob(y) - log_q) / 64).mean().backward()
    for a, p in zip(g_flow, flow.parameters()):
        torch.testing.assert_close(a, p.grad)
    assert all(g.abs().sum() > 0 for g in g_head)


def test_reversible_matches_stored(hybrid):
    rev, head = _tiny("reversible")
    sto, head_s = _tiny("stored")
    sto.load_state_dict(rev.state_dict())
    head_s.load_state_dict(head.state_dict())
    g_rev, h_rev, loss_rev, _ = _grads(hybrid, rev, head, 0.5)
    g_sto, h_sto, loss_sto, _ = _grads(hybrid, sto, head_s, 0.5)
    assert loss_rev == pytest.approx(loss_sto, rel=1e-5)
    for a, b in zip(g_rev + h_rev, g_sto + h_sto):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_labelled_split_matches_flows_split(hybrid):
    train_x, train_y, test_x, test_y = hybrid.load_digits_labelled()
    assert train_x.shape == (1500, 1, 8, 8) and test_x.shape == (297, 1, 8, 8)
    assert train_y.shape == (1500,) and test_y.shape == (297,)
    assert set(train_y.tolist()) == set(range(10))


def test_quick_smoke_run(hybrid, tmp_path):
    out = tmp_path / "hybrid.json"
    report = hybrid.main(["--quick", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["runs"][0]["lam"] is None and saved["runs"][1]["lam"] == 0.0
    for row in report["runs"]:
        assert 0.0 <= row["test_accuracy"] <= 100.0 and row["test_bpd"] > 0
        assert row["memory"] == "reversible" and row["epochs"] == 1
    assert "torch" in saved["environment"] and "load_average_at_start" in saved["environment"]


def test_shift_augment_gives_the_revnet_shifts(hybrid):
    from revtrain.lightning.data import _ShiftAugment

    gen = torch.Generator().manual_seed(0)
    x = torch.randint(1, 17, (60, 1, 8, 8), generator=gen)
    x[:, :, 3, 3] = 0  # a minimum that is not on the border
    out = hybrid.shift_augment(x, torch.Generator().manual_seed(1))
    assert out.shape == x.shape and out.dtype == x.dtype
    torch.manual_seed(0)
    unshifted = 0
    for i in range(len(x)):
        # the nine shifts of image i as the digits RevNet's dataset makes them
        data = _ShiftAugment(TensorDataset(x[i:i + 1], torch.zeros(1)))
        shifts = {tuple(data[0][0].flatten().tolist()) for _ in range(80)}
        assert len(shifts) == 9
        assert tuple(out[i].flatten().tolist()) in shifts, f"image {i}: not a RevNet shift"
        unshifted += torch.equal(out[i], x[i])
    assert 0 < unshifted < len(x) / 4  # about 1 in 9 left as it is
    # a shift that keeps the wrapped-around row and column is not one of them
    assert tuple(torch.roll(x[-1], (1, 1), (1, 2)).flatten().tolist()) not in shifts


def test_classifier_view_changes_the_ce_only(hybrid):
    flow, head = _tiny()
    y, log_q, labels = _batch()
    y_cls = y.flip(-1)  # another view of the images
    with torch.no_grad():
        flow.forward_and_log_det(y)  # ActNorm's data-dependent initialisation
        _, same = hybrid.joint_loss(flow, head, y, log_q, labels, 1.0)
        _, both = hybrid.joint_loss(flow, head, y, log_q, labels, 1.0, y_cls)
        _, cls_only = hybrid.joint_loss(flow, head, y_cls, log_q, labels, 1.0)
    assert both["bpd"] == pytest.approx(same["bpd"], rel=1e-5)  # likelihood on y
    assert both["ce"] == pytest.approx(cls_only["ce"], rel=1e-5)  # classifier on y_cls
    assert both["ce"] != pytest.approx(same["ce"], rel=1e-3)


def test_ce_on_both_views_is_the_mean_of_the_two_ces(hybrid, monkeypatch):
    flow, head = _tiny()
    y, log_q, labels = _batch()
    y_cls = y.flip(-1)
    with torch.no_grad():
        flow.forward_and_log_det(y)  # ActNorm's data-dependent initialisation
        _, same = hybrid.joint_loss(flow, head, y, log_q, labels, 1.0)
        _, cls_only = hybrid.joint_loss(flow, head, y, log_q, labels, 1.0, y_cls)
        loss, both = hybrid.joint_loss(flow, head, y, log_q, labels, 1.0, y_cls,
                                       ce_on_both=True)
    assert both["bpd"] == pytest.approx(same["bpd"], rel=1e-5)  # likelihood on y only
    assert both["ce"] == pytest.approx((same["ce"] + cls_only["ce"]) / 2, rel=1e-5)
    assert both["ce"] != pytest.approx(cls_only["ce"], rel=1e-3)
    assert loss.item() == pytest.approx(both["ce"] + same["bpd"] * math.log(2), rel=1e-5)
    assert both["correct"] == cls_only["correct"]  # counted on the y_cls view
    # and training takes it: the option reaches joint_loss through train_hybrid
    seen = []
    real = hybrid.joint_loss

    def spy(*args, **kwargs):
        seen.append(kwargs.get("ce_on_both"))
        return real(*args, **kwargs)

    data = (torch.randint(0, 17, (8, 1, 8, 8)), torch.arange(8) % 10,
            torch.randint(0, 17, (4, 1, 8, 8)), torch.arange(4) % 10)
    config = {"model": "realnvp", "hidden": 4, "levels": 2}
    monkeypatch.setattr(hybrid, "joint_loss", spy)
    hybrid.train_hybrid(1.0, "reversible", 1, data, batch=8, augment="shift-ce-both",
                        flow_config=config)
    hybrid.train_hybrid(1.0, "reversible", 1, data, batch=8, augment="shift-ce",
                        flow_config=config)
    assert seen == [True, False]


def test_top_latent_head_reads_the_last_level_only(hybrid):
    flow, _ = _tiny()
    top = hybrid.top_dims(flow)
    assert 0 < top < flow.num_dims
    head = hybrid.LatentHead(flow.num_dims, 10, "top", top)
    assert head.linear.in_features == top
    z = torch.randn(3, flow.num_dims, requires_grad=True)
    head(z).sum().backward()
    assert z.grad[:, :-top].abs().sum() == 0 and z.grad[:, -top:].abs().sum() > 0
    with pytest.raises(ValueError, match="latent must be one of"):
        hybrid.LatentHead(flow.num_dims, 10, "middle", top)


def test_label_smoothing_is_the_smoothed_cross_entropy(hybrid):
    flow, head = _tiny()
    y, log_q, labels = _batch()
    with torch.no_grad():
        flow.forward_and_log_det(y)  # ActNorm's data-dependent initialisation
        z, _ = flow.forward_and_log_det(y)
        log_p = torch.log_softmax(head(z), 1)  # (B, 10)
        _, plain = hybrid.joint_loss(flow, head, y, log_q, labels, 1.0)
        _, smooth = hybrid.joint_loss(flow, head, y, log_q, labels, 1.0, label_smoothing=0.2)
    nll = -log_p.gather(1, labels[:, None]).mean()
    by_hand = 0.8 * nll - 0.2 * log_p.mean(1).mean()  # 0.2 spread over the 10 classes
    assert plain["ce"] == pytest.approx(float(nll), rel=1e-5)
    assert smooth["ce"] == pytest.approx(float(by_hand), rel=1e-5)
    assert smooth["ce"] != pytest.approx(plain["ce"], rel=1e-3)


def test_ce_weight_zero_leaves_the_likelihood_alone(hybrid):
    flow, head = _tiny()
    y, log_q, labels = _batch()
    loss, parts = hybrid.joint_loss(flow, head, y, log_q, labels, 2.0, ce_weight=0.0)
    loss.backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in head.parameters())
    g = [p.grad.clone() for p in flow.parameters()]
    flow.zero_grad(set_to_none=True)
    (2.0 * (-(flow.log_prob(y) - log_q) / 64).mean()).backward()
    for a, p in zip(g, flow.parameters()):
        torch.testing.assert_close(a, p.grad)
    half, _ = hybrid.joint_loss(flow, head, y, log_q, labels, 2.0, ce_weight=0.5)
    assert half.item() == pytest.approx(loss.item() + 0.5 * parts["ce"], rel=1e-5)


def test_schedule(hybrid):
    assert hybrid.schedule(0.7, 2.0) == (2.0, 1.0)  # the default: constant, CE from the start
    assert hybrid.schedule(0.0, 3.0, 1.0) == (3.0, 1.0)
    assert hybrid.schedule(0.5, 3.0, 1.0) == (2.0, 1.0)
    assert hybrid.schedule(0.0, 2.0, ce_warmup=0.4) == (2.0, 0.0)
    assert hybrid.schedule(0.2, 2.0, ce_warmup=0.4) == pytest.approx((2.0, 0.5))
    assert hybrid.schedule(0.9, 2.0, ce_warmup=0.4) == (2.0, 1.0)


def test_training_follows_the_schedule_per_step(hybrid, monkeypatch):
    seen = []
    joint_loss = hybrid.joint_loss

    def spy(flow, head, y, log_q, labels, lam, y_cls=None, label_smoothing=0.0,
            ce_weight=1.0, **kwargs):
        seen.append((lam, ce_weight, label_smoothing))
        return joint_loss(flow, head, y, log_q, labels, lam, y_cls, label_smoothing, ce_weight,
                          **kwargs)

    monkeypatch.setattr(hybrid, "joint_loss", spy)
    data = _grey_digits(32)
    config = {"model": "realnvp", "hidden": 4}
    row = hybrid.train_hybrid(3.0, "reversible", 2, data, batch=8, lam_end=1.0, ce_warmup=0.5,
                              label_smoothing=0.1, flow_config=config)
    assert len(seen) == 8  # 2 epochs of 4 steps, progress k / 8
    assert [s[0] for s in seen] == pytest.approx([3.0 - 2.0 * k / 8 for k in range(8)])
    assert [s[1] for s in seen] == pytest.approx([min(1.0, k / 4) for k in range(8)])
    assert all(s[2] == 0.1 for s in seen)
    assert row["lam_end"] == 1.0 and row["ce_warmup"] == 0.5 and row["label_smoothing"] == 0.1
    seen.clear()  # the pure flow ignores the schedule
    hybrid.train_hybrid(None, "reversible", 1, data, batch=8, lam_end=1.0, ce_warmup=0.5,
                        flow_config=config)
    assert seen == [(None, 1.0, 0.0)] * 4


def test_pure_flow_reference_is_trained_with_and_without_weight_decay(hybrid):
    runs = hybrid.main(["--dry-run", "--lam", "1", "2", "--weight-decay", "0.1"])["runs"]
    assert runs == [(None, "reversible", "none", 0.1), (None, "reversible", "none", 0.0),
                    (1.0, "reversible", "none", 0.1), (2.0, "reversible", "none", 0.1),
                    (2.0, "stored", "none", 0.1)]
    both = hybrid.main(["--dry-run", "--lam", "1", "--augment", "shift", "--no-stored"])["runs"]
    assert [r for r in both if r[0] is None] == [
        (None, "reversible", a, w) for a in ("shift", "none") for w in (0.1, 0.0)]
    same = hybrid.main(["--dry-run", "--lam", "1", "--pure-weight-decay", "same"])["runs"]
    assert [r for r in same if r[0] is None] == [(None, "reversible", "none", 0.1)]
    assert hybrid.main(["--dry-run", "--weight-decay", "0", "--quick"])["runs"] == [
        (None, "reversible", "none", 0.0), (0.0, "reversible", "none", 0.0)]


def test_validation_split_is_disjoint_and_seed_independent(hybrid):
    fit, val = hybrid.validation_indices(1500)
    assert len(val) == 300 and len(fit) == 1200
    assert set(fit.tolist()).isdisjoint(val.tolist())
    assert set(fit.tolist()) | set(val.tolist()) == set(range(1500))
    again_fit, again_val = hybrid.validation_indices(1500)  # fixed: the same for every seed
    assert torch.equal(fit, again_fit) and torch.equal(val, again_val)
    data = hybrid.load_digits_labelled()
    fit_x, fit_y, val_x, val_y = hybrid.split_validation(data)
    assert fit_x.shape == (1200, 1, 8, 8) and val_x.shape == (300, 1, 8, 8)
    torch.testing.assert_close(val_x, data[0][val])  # held out of the training images
    torch.testing.assert_close(fit_y, data[1][fit])
    assert set(val_y.tolist()) == set(range(10))
    with pytest.raises(ValueError, match="held_out"):
        hybrid.validation_indices(10, 10)


def _train_steps(hybrid, averages, steps=3):
    flow, head = _tiny()
    model = nn.ModuleDict({"flow": flow, "head": head})
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    snapshots = []
    for k in range(steps):
        y, log_q, labels = _batch(k)
        loss, _ = hybrid.joint_loss(flow, head, y, log_q, labels, 1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        averages.update(model)
        snapshots.append([p.detach().clone() for p in model.parameters()])
    return model, snapshots


def test_weight_averages_are_an_ema_that_differs_from_the_raw_weights(hybrid):
    averages = hybrid.WeightAverages([0.0, 0.9])
    assert averages.decays == [0.9]  # 0 is the raw weights: nothing to average
    model, snaps = _train_steps(hybrid, averages)
    mods = averages.modules(model)
    assert list(mods) == ["raw", "ema 0.9"] and mods["raw"] is model
    ema = mods["ema 0.9"]
    # the first update copies the weights, then ema <- 0.9 ema + 0.1 p after every step
    expected = snaps[0]
    for snap in snaps[1:]:
        expected = [0.9 * e + 0.1 * p for e, p in zip(expected, snap)]
    for e, p in zip(expected, ema.parameters()):
        torch.testing.assert_close(p, e)
    assert any(not torch.allclose(p, r) for p, r in zip(ema.parameters(), model.parameters()))
    # buffers (ActNorm's initialised flag among them) come from the trained module
    for mine, theirs in zip(ema.buffers(), model.buffers()):
        assert torch.equal(mine, theirs)
    with pytest.raises(ValueError, match="decays"):
        hybrid.WeightAverages([1.0])


def test_training_evaluates_raw_and_averaged_weights(hybrid):
    data = _grey_digits(32)
    config = {"model": "realnvp", "hidden": 4}
    row = hybrid.train_hybrid(2.0, "reversible", 2, data, batch=8, flow_config=config,
                              ema=(0.5, 0.0), head_dropout=0.2)
    assert list(row["evaluations"]) == ["raw", "ema 0.5"] and row["ema"] == "ema 0.5"
    assert row["test_bpd"] == row["evaluations"]["ema 0.5"]["bpd"]
    assert row["test_bpd"] != row["evaluations"]["raw"]["bpd"]
    assert row["head_dropout"] == 0.2 and row["eval_images"] == 8
    raw = hybrid.train_hybrid(2.0, "reversible", 2, data, batch=8, flow_config=config,
                              head_dropout=0.2)
    assert list(raw["evaluations"]) == ["raw"]  # the default: raw weights only, same training
    assert raw["evaluations"]["raw"] == row["evaluations"]["raw"]


def test_head_dropout_acts_in_training_only(hybrid):
    head = hybrid.LatentHead(64, 10, dropout=0.5)
    z = torch.randn(16, 64)
    torch.manual_seed(0)
    assert not torch.allclose(head(z), head.linear(z))
    head.eval()
    torch.testing.assert_close(head(z), head.linear(z))


def test_targets_per_seed_against_that_seeds_pure_flows(hybrid):
    def row(seed, lam, raw, ema, acc=99.0):
        return {"seed": seed, "lam": lam, "evaluations": {
            "raw": {"bpd": raw, "accuracy": acc}, "ema 0.9": {"bpd": ema, "accuracy": acc}}}

    rows = [row(0, None, 2.00, 2.05), row(0, None, 2.10, 2.03), row(0, 2.0, 2.2, 2.09),
            row(1, None, 2.50, 2.40), row(1, 2.0, 2.45, 2.45, acc=98.0)]
    refs = hybrid.add_targets(rows, "ema 0.9")
    assert refs == {"0": 2.00, "1": 2.40}  # lowest of raw and EMA over the seed's pure flows
    assert rows[2]["bpd_minus_pure_flow"] == pytest.approx(0.09) and rows[2]["meets_targets"]
    assert rows[2]["targets_by_evaluation"]["raw"]["bpd_minus_pure_flow"] == pytest.approx(0.2)
    assert not rows[4]["meets_targets"]  # 98.0 % is more than a point below the RevNet
    assert not rows[0]["meets_targets"]  # pure flows never meet them


def test_seeds_and_validate_give_per_seed_rows_and_a_summary(hybrid, tmp_path):
    out = tmp_path / "hybrid.json"
    report = hybrid.main(["--quick", "--seeds", "0", "1", "--validate", "--ema", "0.9", "0",
                          "--out", str(out)])
    saved = json.loads(out.read_text())
    assert [(r["seed"], r["lam"]) for r in saved["runs"]] == [(0, None), (0, 0.0),
                                                              (1, None), (1, 0.0)]
    assert all(r["train_images"] == 1200 and r["eval_images"] == 300 for r in report["runs"])
    assert saved["config"]["evaluated_on"].startswith("validation")
    assert set(saved["config"]["pure_flow_reference_bpd"]) == {"0", "1"}
    hybrid_summary = [s for s in saved["summary"] if s["lam"] == 0.0][0]
    assert hybrid_summary["seeds"] == [0, 1] and len(hybrid_summary["meets_targets"]) == 2
    accs = [r["test_accuracy"] for r in saved["runs"] if r["lam"] == 0.0]
    assert hybrid_summary["accuracy"]["min"] == min(accs)
    assert hybrid_summary["accuracy"]["mean"] == pytest.approx(sum(accs) / 2, abs=0.01)
    assert saved["runs"][0]["test_bpd"] != saved["runs"][2]["test_bpd"]  # seeds differ


def test_head_parameter_group_has_its_own_decay_and_learning_rate(hybrid):
    flow, head = _tiny()
    default = hybrid.make_optimizer(flow, head, 0.1, 0.5)
    assert [(g["lr"], g["weight_decay"]) for g in default.param_groups] == [(0.1, 0.5),
                                                                              (0.1, 0.5)]
    opt = hybrid.make_optimizer(flow, head, 0.1, 0.5, head_weight_decay=0.0, head_lr_mult=3.0)
    assert [v for g in opt.param_groups for v in (g["lr"], g["weight_decay"])] == pytest.approx(
        [0.1, 0.5, 0.3, 0.0])
    # zero gradients: AdamW's decoupled decay alone, 1 - lr * wd on the flow, none on the head
    before = [p.detach().clone() for p in [*flow.parameters(), *head.parameters()]]
    for p in [*flow.parameters(), *head.parameters()]:
        p.grad = torch.zeros_like(p)
    opt.step()
    n_flow = len(list(flow.parameters()))
    for b, p in zip(before[:n_flow], flow.parameters()):
        torch.testing.assert_close(p.detach(), b * (1 - 0.1 * 0.5))
    for b, p in zip(before[n_flow:], head.parameters()):
        torch.testing.assert_close(p.detach(), b)
    # unit gradients, no decay: Adam's first step is lr per entry, 3 lr on the head
    flow, head = _tiny()
    opt = hybrid.make_optimizer(flow, head, 0.1, 0.0, head_lr_mult=3.0)
    before = [p.detach().clone() for p in [*flow.parameters(), *head.parameters()]]
    for p in [*flow.parameters(), *head.parameters()]:
        p.grad = torch.ones_like(p)
    opt.step()
    steps = [(b - p.detach()).abs().max().item() for b, p in
             zip(before, [*flow.parameters(), *head.parameters()])]
    assert steps[:n_flow] == pytest.approx([0.1] * n_flow, rel=1e-4)
    assert steps[n_flow:] == pytest.approx([0.3] * (len(steps) - n_flow), rel=1e-4)


def test_training_takes_the_head_options(hybrid, monkeypatch):
    seen = []
    real = hybrid.make_optimizer

    def spy(*args, **kwargs):
        opt = real(*args, **kwargs)
        seen.append([(g["lr"], g["weight_decay"]) for g in opt.param_groups])
        return opt

    monkeypatch.setattr(hybrid, "make_optimizer", spy)
    data = _grey_digits(16)
    config = {"model": "realnvp", "hidden": 4}
    plain = hybrid.train_hybrid(2.0, "reversible", 1, data, batch=8, lr=0.01, weight_decay=0.1,
                                flow_config=config)
    row = hybrid.train_hybrid(2.0, "reversible", 1, data, batch=8, lr=0.01, weight_decay=0.1,
                              flow_config=config, head_weight_decay=0.0, head_lr_mult=10.0)
    assert seen == [[(0.01, 0.1), (0.01, 0.1)], [(0.01, 0.1), (0.1, 0.0)]]  # 10 * 0.01
    assert plain["head_weight_decay"] == 0.1 and plain["head_lr_mult"] == 1.0
    assert row["head_weight_decay"] == 0.0 and row["head_lr_mult"] == 10.0
    assert row["train_per_epoch"] != plain["train_per_epoch"]  # the head's steps changed


class _Flat(nn.Module):
    """A stand-in flow: the flat input as its latent."""

    def forward_and_log_det(self, y):
        return y.flatten(1), y.new_zeros(len(y))


class _Edges(nn.Module):
    """Class 1 for a first pixel of 0 dequantized away from its cell midpoint, class 0 at it."""

    def forward(self, z):
        u = z[:, 0] * 17  # the draw of a 0 pixel
        return torch.stack([torch.zeros_like(u), 1000 * ((u - 0.5) ** 2 - 0.01)], 1)


def test_draws_accuracy_is_that_of_the_mean_softmax_over_the_draws(hybrid):
    x = torch.zeros(8, 1, 8, 8, dtype=torch.long)
    labels = torch.ones(8, dtype=torch.long)
    flow, head = _Flat(), _Edges()
    assert hybrid.accuracy(flow, head, x, labels) == 0.0  # the midpoint says class 0
    got = hybrid.draws_accuracy(flow, head, x, labels, 16, torch.Generator().manual_seed(5))
    gen = torch.Generator().manual_seed(5)
    probs = torch.stack([torch.softmax(head(flow.forward_and_log_det(
        (x.float() + torch.rand(x.shape, generator=gen)) / 17)[0]), 1) for _ in range(16)])
    by_hand = 100.0 * float((probs.mean(0).argmax(1) == labels).double().mean())
    assert got == pytest.approx(by_hand) and got > 50.0  # most draws are off the midpoint
    with pytest.raises(ValueError, match="draws"):
        hybrid.draws_accuracy(flow, head, x, labels, 0, gen)


def test_eval_draws_adds_accuracy_draws_to_every_evaluation(hybrid):
    data = _grey_digits(16)
    config = {"model": "realnvp", "hidden": 4}
    rows = [hybrid.train_hybrid(lam, "reversible", 1, data, batch=8, flow_config=config,
                                ema=(0.5, 0.0), eval_draws=4) for lam in (None, 2.0)]
    plain = hybrid.train_hybrid(2.0, "reversible", 1, data, batch=8, flow_config=config,
                                ema=(0.5, 0.0))
    for label, ev in rows[1]["evaluations"].items():
        assert 0.0 <= ev["accuracy_draws"] <= 100.0 and rows[1]["eval_draws"] == 4
        assert {k: v for k, v in ev.items() if k != "accuracy_draws"} == plain[
            "evaluations"][label]  # the midpoint figures and the training are unchanged
    assert all("accuracy_draws" not in ev for ev in plain["evaluations"].values())
    hybrid.add_targets(rows, "ema 0.5")
    by_eval = rows[1]["targets_by_evaluation"]["ema 0.5"]
    assert by_eval["acc_draws_minus_revnet"] == pytest.approx(
        rows[1]["evaluations"]["ema 0.5"]["accuracy_draws"] - 99.17, abs=0.01)
    assert "meets_targets_draws" in by_eval
    summary = hybrid.summarize(rows)[1]
    assert summary["accuracy_draws"]["mean"] == rows[1]["evaluations"]["ema 0.5"]["accuracy_draws"]
