"""Fidelity to the papers' configurations (issue 15): Glow's sigmoid scale and learned top prior
(openai/glow), RealNVP's residual coupling networks and learned tanh scale at the paper's size,
and Polyak averaging for evaluation. Round trips and log-dets against autograd's Jacobian for
the new layers and models are in ``tests/test_flows.py`` (``LAYERS`` / ``MODELS``)."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import yaml
from test_flows import _prepare, _slogdet_check
from torch.nn import functional as F

from revtrain import Affine, AffineCoupling, ChannelSplit, Coupling, SigmoidAffine
from revtrain.flows import ConvNet, LearnedTanhScale, LearnedTopPrior, StandardNormal
from revtrain.models import create

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(seed), dtype=torch.float64)


# ---------------------------------------------------------------------------- sigmoid scale


def test_sigmoid_affine_is_the_glow_code_formula():
    """openai/glow ``revnet2d_step`` (flow_coupling=1) and rosinality/glow-pytorch:
    ``z2 += shift; z2 *= sigmoid(h + 2)``, log-det ``sum log(scale)``; inverse ``z2 / scale - shift``.
    """
    x, h = _randn(4, 3, 5, 5), 3 * _randn(4, 6, 5, 5, seed=1)
    raw, t = h.chunk(2, dim=1)
    y, log_det = SigmoidAffine().forward(x, h, 1)
    scale = torch.sigmoid(raw + 2.0)
    torch.testing.assert_close(y, (x + t) * scale, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(log_det, torch.log(scale).flatten(1).sum(1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(SigmoidAffine().inverse(y, h, 1), y / scale - t, rtol=1e-12,
                               atol=1e-12)
    out = torch.empty_like(x)
    SigmoidAffine().inverse(y, h, 1, out=out)  # the buffer path of the reversible rebuild
    torch.testing.assert_close(out, x, rtol=0, atol=1e-12)
    # a zero sub-network output scales by sigmoid(2) = 0.881, as in Glow at initialisation
    y0, ld0 = SigmoidAffine().forward(x, torch.zeros_like(h), 1)
    torch.testing.assert_close(y0, x * torch.sigmoid(torch.tensor(2.0, dtype=x.dtype)))
    assert float(ld0[0]) == pytest.approx(75 * math.log(1 / (1 + math.exp(-2))), rel=1e-12)


def test_sigmoid_coupling_log_det_check_fails_for_a_wrong_offset():
    """The Jacobian check of the sigmoid coupling can fail: a log-det of log sigmoid(h) (the
    offset forgotten) is caught, the right one passes."""

    class WrongOffset(SigmoidAffine):
        def forward(self, x, h, dim):
            y, _ = super().forward(x, h, dim)
            return y, F.logsigmoid(h.chunk(2, dim=dim)[0]).flatten(1).sum(1)

    x = _randn(2, 4, 2, 2)
    good = _prepare(Coupling(ConvNet(2, 4, 6), None, SigmoidAffine(), ChannelSplit(1)), x)
    _slogdet_check(good.eval(), x)
    bad = _prepare(Coupling(ConvNet(2, 4, 6), None, WrongOffset(), ChannelSplit(1)), x)
    with pytest.raises(AssertionError):
        _slogdet_check(bad.eval(), x)


def test_sigmoid_scale_stays_finite_for_extreme_outputs():
    x, h = _randn(2, 3, 4), 1e4 * _randn(2, 6, 4, seed=2)
    y, log_det = SigmoidAffine().forward(x, h, 1)
    assert torch.isfinite(y).all() and torch.isfinite(log_det).all()
    assert (log_det <= 0).all()  # sigmoid < 1: every sigmoid coupling contracts


def test_scale_option_builds_the_transform_and_rejects_bad_names():
    kw = dict(in_channels=1, image_size=4, levels=1, steps=1, hidden=4)
    assert isinstance(create("glow", **kw).levels[0][3], AffineCoupling)  # unchanged default
    sig = create("glow", scale="sigmoid", **kw).levels[0][3]
    assert isinstance(sig.transform, SigmoidAffine)
    learned = create("realnvp", in_channels=1, image_size=4, levels=1, hidden=4,
                     scale="learned_tanh").levels[0][0]
    assert isinstance(learned.f, LearnedTanhScale) and learned.transform.clamp is None
    with pytest.raises(ValueError, match="unknown affine scale 'sigmoi'; use one of tanh"):
        create("glow", scale="sigmoi", **kw)
    with pytest.raises(ValueError, match="applies to the affine transform only"):
        create("glow", scale="sigmoid", transform="additive", **kw)
    with pytest.raises(ValueError, match="unknown coupling_net 'resnt'"):
        create("realnvp", coupling_net="resnt")
    with pytest.raises(ValueError, match="coupling_net='resnet' is for images"):
        create("realnvp", dim=4, coupling_net="resnet")


# ---------------------------------------------------------------------------- learned tanh


def test_learned_tanh_scale_bounds_the_log_scale_by_a():
    """|s| <= |a| per channel whatever the network outputs (RealNVP's s = a tanh(s~)); the same
    coupling without the tanh (a plain affine) exceeds the bound."""
    x = _randn(3, 4, 4, 4)  # x1, x2: 2 channels each
    net = ConvNet(2, 4, 6).double()
    with torch.no_grad():
        net.net[-1].bias.fill_(50.0)  # extreme raw log-scales
    bounded = Coupling(LearnedTanhScale(net, 2).double(), None, Affine(None), ChannelSplit(1))
    with torch.no_grad():
        bounded.f.scale.copy_(torch.tensor([0.3, 0.7]))
    with torch.no_grad():
        _, log_det = bounded.forward_and_log_det(x)
    bound = 16 * (0.3 + 0.7)  # 16 positions per transformed channel
    assert (log_det.abs() <= bound + 1e-9).all() and float(log_det[0]) == pytest.approx(bound)
    unbounded = Coupling(net, None, Affine(None), ChannelSplit(1))
    with torch.no_grad():
        assert (unbounded.forward_and_log_det(x)[1].abs() > bound).all()
    with pytest.raises(ValueError, match="log-scales for 2 channels, the scale has 3"):
        LearnedTanhScale(net, 3).double()(x[:, :2])


# ---------------------------------------------------------------------------- learned top prior


def test_learned_top_prior_is_a_diagonal_gaussian():
    """log p(z) through the bijection equals the Gaussian N(mu, sigma^2) log-density; zero
    parameters give the standard normal; sampling at temperature T is mu + T sigma xi."""
    top = LearnedTopPrior((2, 3, 3)).double()
    z = _randn(5, 2, 3, 3)
    eps, log_det = top.forward_and_log_det(z)
    torch.testing.assert_close(StandardNormal().log_prob(eps) + log_det,
                               StandardNormal().log_prob(z))
    with torch.no_grad():
        top.mean.copy_(_randn(2, 3, 3, seed=1))
        top.log_std.copy_(0.5 * _randn(2, 3, 3, seed=2))
    eps, log_det = top.forward_and_log_det(z)
    ref = torch.distributions.Normal(top.mean, top.log_std.exp()).log_prob(z).flatten(1).sum(1)
    torch.testing.assert_close(StandardNormal().log_prob(eps) + log_det, ref)
    xi = _randn(5, 2, 3, 3, seed=3)
    torch.testing.assert_close(top.inverse(0.7 * xi), top.mean + 0.7 * top.log_std.exp() * xi)
    with pytest.raises(ValueError, match=r"expects samples of shape \(2, 3, 3\)"):
        top(_randn(1, 2, 3, 4))


def test_learn_top_adds_only_the_top_prior_to_the_state_dict():
    """Default Glow keeps its state_dict keys (checked against the commit before these options:
    identical keys and shapes); learn_top adds exactly mean and log_std of the last level."""
    kw = dict(in_channels=1, image_size=8, levels=2, steps=2, hidden=4)
    base = create("glow", **kw).state_dict()
    assert create("glow", scale="tanh", learn_top=False, **kw).state_dict().keys() == base.keys()
    top = create("glow", learn_top=True, **kw)
    extra = set(top.state_dict()) - set(base)
    assert set(base) <= set(top.state_dict())
    assert extra == {"levels.1.layers.7.mean", "levels.1.layers.7.log_std"}
    assert top.state_dict()["levels.1.layers.7.mean"].shape == (8, 2, 2)  # the last level: 2 -> 8 ch
    assert top.levels[1].memory.value == "reversible"


def test_learned_top_prior_is_trained_and_used_by_sample():
    """The top prior's parameters receive gradients in reversible mode and move samples."""
    torch.manual_seed(0)
    model = create("glow", in_channels=1, image_size=4, levels=2, steps=1, hidden=4,
                   learn_top=True, scale="sigmoid")
    x = 0.1 + 0.8 * torch.rand(4, 1, 4, 4, generator=_gen(1))
    (-model.log_prob(x).mean()).backward()
    top = model.levels[-1][-1]
    assert top.mean.grad.abs().max() > 0 and top.log_std.grad.abs().max() > 0
    model.eval()
    torch.manual_seed(2)
    before = model.sample(3, temperature=0.0)
    with torch.no_grad():
        top.mean.add_(1.0)
    torch.manual_seed(2)
    assert not torch.allclose(model.sample(3, temperature=0.0), before)


# ---------------------------------------------------------------------------- RealNVP's size

REALNVP_PAPER = dict(in_channels=3, image_size=32, levels=2, hidden=64, coupling_net="resnet",
                     num_blocks=8, scale="learned_tanh")


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def test_realnvp_at_the_paper_size_has_about_5_9_million_parameters():
    """RealNVP on CIFAR-10 (Dinh et al. 2016, sec. 4.1: 2 scales, 8 residual blocks of 64
    features): about 5.9 M parameters. The previous config (3 levels of Glow's 3-layer nets,
    64 wide) is far off and fails the same check."""
    n = _params(create("realnvp", **REALNVP_PAPER))
    assert n == 5_949_347  # measured; the check below is the independent one
    assert abs(n - 5.9e6) / 5.9e6 < 0.10
    old = _params(create("realnvp", in_channels=3, image_size=32, levels=3, hidden=64))
    assert not abs(old - 5.9e6) / 5.9e6 < 0.10  # 296,880


def test_realnvp_paper_config_builds_that_model():
    model = yaml.safe_load((CONFIGS / "cifar10_realnvp.yaml").read_text())["model"]["init_args"]
    assert model["model_name"] == "realnvp"
    assert {k: model["model_kwargs"][k] for k in REALNVP_PAPER} == REALNVP_PAPER


# ---------------------------------------------------------------------------- Polyak averaging


class _Recorder(pl.Callback):
    """Weights after every optimizer step, and the weights validation runs with (placed after
    the averaging callback, it sees them swapped in)."""

    def __init__(self):
        self.steps: list[dict[str, torch.Tensor]] = []
        self.validated: list[dict[str, torch.Tensor]] = []

    @staticmethod
    def _params(module):
        return {n: p.detach().clone() for n, p in module.named_parameters()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps.append(self._params(pl_module))

    def on_validation_epoch_start(self, trainer, pl_module):
        self.validated.append(self._params(pl_module))


def _ema(steps: list[dict[str, torch.Tensor]], decay: float) -> dict[str, torch.Tensor]:
    """torch's EMA: the first update copies, then w <- decay w + (1 - decay) w_t."""
    avg = dict(steps[0])
    for w in steps[1:]:
        avg = {n: decay * avg[n] + (1 - decay) * w[n] for n in avg}
    return avg


def _fit_with_ema(decay: float, **module_kwargs):
    from pytorch_lightning.callbacks import EMAWeightAveraging
    from torch.utils.data import DataLoader, TensorDataset

    from revtrain.lightning import FlowModule

    pl.seed_everything(0, verbose=False)
    module = FlowModule("glow", dict(in_channels=1, image_size=4, levels=2, steps=2, hidden=4,
                                     learn_top=True, scale="sigmoid"), memory="reversible",
                        sample_every_n_epochs=0,
                        optimizer=lambda params: torch.optim.Adamax(params, lr=1e-2),
                        **module_kwargs)
    levels = module_kwargs.get("num_bins") or 256  # without num_bins: 256, from setup
    x = torch.randint(0, levels, (24, 1, 4, 4), generator=_gen(3)).float() / (levels - 1)
    loader = DataLoader(TensorDataset(x), batch_size=6)
    ema, recorder = EMAWeightAveraging(decay=decay, use_buffers=False), _Recorder()
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0,
                         limit_val_batches=1)
    trainer.callbacks[:0] = [ema, recorder]  # averaging first: the recorder sees its swap
    trainer.fit(module, loader, DataLoader(TensorDataset(x[:6]), batch_size=6))
    return module, ema, recorder


def test_polyak_averaging_evaluates_the_averaged_weights():
    """Lightning's EMAWeightAveraging on a reversible flow: validation runs with the EMA of the
    weights after each step (openai/glow's Polyak averaging), training resumes with the raw
    weights, and the fitted module ends with the average. The raw weights differ from it, so
    a run that evaluated them would fail the same check."""
    decay = 0.5
    module, ema, rec = _fit_with_ema(decay, num_bins=17)
    assert len(rec.steps) == 4 and len(rec.validated) == 1
    expected = _ema(rec.steps, decay)
    for name, value in rec.validated[0].items():
        torch.testing.assert_close(value, expected[name], rtol=1e-5, atol=1e-6, msg=name)
    final = dict(module.named_parameters())
    for name, value in expected.items():
        torch.testing.assert_close(final[name].detach(), value, rtol=1e-5, atol=1e-6, msg=name)
    raw = rec.steps[-1]
    assert max(float((raw[n] - expected[n]).abs().max()) for n in raw) > 1e-3
    # the averaged copy is a deepcopy of the module: same memory mode, same results
    averaged = ema._average_model.module
    assert averaged.net.memory.value == "reversible" == module.net.memory.value
    assert all(s.memory.value == "reversible" for s in averaged.net.levels)
    assert all(bool(b) for n, b in averaged.net.named_buffers() if n.endswith("initialized"))
    x = torch.rand(3, 1, 4, 4, generator=_gen(5)).double()
    a, m = averaged.net.double().eval(), module.net.double().eval()
    torch.testing.assert_close(a.log_prob(x), m.log_prob(x))


def test_polyak_averaging_covers_a_dequantizer_built_in_setup(monkeypatch):
    """With num_bins from the data (built in setup, after the callback copied the module), the
    variational dequantizer's parameters are averaged and swapped too, aligned by name. Without
    FlowModule's refresh of the callback the copy lacks them and the swap mixes up tensors."""
    from revtrain.lightning import FlowModule

    module, ema, rec = _fit_with_ema(0.5, dequantization="variational")
    names = [n for n, _ in ema._average_model.module.named_parameters()]
    assert names == [n for n, _ in module.named_parameters()]
    assert any(n.startswith("dequantize.") for n in names)
    expected = _ema(rec.steps, 0.5)
    for name, value in rec.validated[0].items():
        torch.testing.assert_close(value, expected[name], rtol=1e-5, atol=1e-6, msg=name)
    monkeypatch.setattr(FlowModule, "_refresh_weight_averages", lambda self, stage: None)
    with pytest.raises(RuntimeError, match="shape"):
        _fit_with_ema(0.5, dequantization="variational")


def test_a_flow_module_deepcopies_with_its_memory_mode():
    from revtrain.lightning import FlowModule

    module = FlowModule("realnvp", dict(in_channels=1, image_size=4, levels=2, hidden=4,
                                        coupling_net="resnet", num_blocks=1), memory="reversible")
    twin = copy.deepcopy(module)
    assert twin.net.memory.value == "reversible"
    assert all(p is not q for p, q in zip(twin.parameters(), module.parameters()))


# ---------------------------------------------------------------------------- the openai config


def test_openai_glow_config_follows_the_command():
    """configs/cifar10_glow_openai.yaml against openai/glow's CIFAR-10 command and train.py's
    defaults: Adamax lr 1e-3, beta1 0.9, beta2 and EMA decay 1 - 1/(steps per epoch), 10 warm-up
    epochs, learntop, affine coupling with the sigmoid scale, dense 1x1 convolution, x - 1/2."""
    cfg = yaml.safe_load((CONFIGS / "cifar10_glow_openai.yaml").read_text())
    model, data = cfg["model"]["init_args"], cfg["data"]["init_args"]
    steps_per_epoch = math.ceil(50_000 / data["batch_size"])  # openai get_its, one worker
    assert data["batch_size"] == 64 and model["num_bins"] == 2 ** 8
    assert model["model_name"] == "glow" and model["model_kwargs"] == dict(
        in_channels=3, image_size=32, levels=3, steps=32, hidden=512, lu=False, scale="sigmoid",
        learn_top=True, preprocess="center")
    opt = model["optimizer"]
    assert opt["class_path"] == "torch.optim.Adamax" and opt["init_args"]["lr"] == 1e-3
    beta1, beta2 = opt["init_args"]["betas"]
    assert beta1 == 0.9 and beta2 == pytest.approx(1 - 1 / steps_per_epoch, abs=1e-5)
    warmup = model["lr_scheduler"]["init_args"]
    assert warmup["total_iters"] == math.ceil(10 * 50_000 / 64) and warmup["end_factor"] == 1.0
    assert model["scheduler_interval"] == "step" and warmup["start_factor"] <= 1e-3
    (ema,) = [c for c in cfg["trainer"]["callbacks"] if "WeightAveraging" in c["class_path"]]
    assert ema["class_path"] == "pytorch_lightning.callbacks.EMAWeightAveraging"
    assert ema["init_args"]["decay"] == beta2 and ema["init_args"]["use_buffers"] is False
    assert "gradient_clip_val" not in cfg["trainer"]


@pytest.mark.slow
def test_openai_glow_config_trains_and_checkpoints_the_average(tmp_path, monkeypatch):
    """The config's callbacks, Adamax and warm-up run (a tiny Glow on digits, 3 steps); the
    checkpoint holds the averaged weights and the raw ones (weights_only loading)."""
    from revtrain.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["revtrain"])
    monkeypatch.setenv("PL_GLOBAL_SEED", "0")
    threads = torch.get_num_threads()
    try:
        main(["fit", "--config", str(CONFIGS / "cifar10_glow_openai.yaml"),
              "--model.init_args.model_kwargs", "{in_channels: 1, image_size: 8, levels: 2, "
              "steps: 1, hidden: 8, lu: false, scale: sigmoid, learn_top: true, "
              "preprocess: center}", "--model.init_args.num_bins", "17",
              "--data", "revtrain.lightning.DigitsDataModule", "--data.init_args.normalize",
              "false", "--data.init_args.num_workers", "0", "--trainer.max_steps", "3",
              "--trainer.limit_val_batches", "1", "--trainer.accelerator", "cpu",
              "--trainer.enable_progress_bar", "false"])
    finally:
        torch.set_num_threads(threads)
    (ckpt,) = tmp_path.glob("runs/**/last.ckpt")
    state = torch.load(ckpt, weights_only=True)
    assert {"current_model_state", "averaging_state"} <= set(state)
    assert state["state_dict"].keys() == state["current_model_state"].keys()
    assert any(k.endswith("log_std") for k in state["state_dict"])
