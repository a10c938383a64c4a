"""Conditional flows in Lightning (issue 10): the module, the class grid, the inverse-kinematics arm,
the memory report and the configs through the ``revtrain`` command."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from revtrain.cli import cli
from revtrain.lightning import DigitsDataModule
from revtrain.lightning.conditional import (
    ConditionalFlowModule,
    ConditionalMemoryReport,
    InverseKinematics,
    InverseKinematicsDataModule,
    posterior_samples,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
QUIET = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False,
             enable_model_summary=False, accelerator="cpu", devices=1)


def test_class_conditional_fit_writes_a_grid_with_one_row_per_class(tmp_path, monkeypatch):
    torch.manual_seed(0)
    module = ConditionalFlowModule("cond_realnvp_digits", {"hidden": 8}, samples_per_class=3,
                                   sample_dir=str(tmp_path / "samples"))
    asked = []
    sample = module.flow.sample
    monkeypatch.setattr(module.flow, "sample",
                        lambda n, context=None, temperature=1.0: asked.append(context.clone())
                        or sample(n, context=context, temperature=temperature))
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=1, **QUIET)
    trainer.fit(module, DigitsDataModule(batch_size=32, normalize=False))
    assert module.num_bins == 17  # from the DataModule
    assert trainer.callback_metrics["val/bpd"] > 0
    path = tmp_path / "samples" / "final_t0.7.png"
    assert module.last_grid == path and path.exists()
    from torchvision.io import read_image

    grid = read_image(str(path))
    assert tuple(grid.shape[1:]) == (10 * 9 + 1, 3 * 9 + 1)  # 10 rows of 8x8 images, 3 columns
    torch.testing.assert_close(asked[-1], torch.arange(10).repeat_interleave(3))  # row k: label k


def test_module_refuses_an_unconditional_flow_and_a_batch_without_condition():
    with pytest.raises(ValueError, match="not a conditional flow"):
        ConditionalFlowModule("realnvp", {"in_channels": 1, "image_size": 8, "levels": 1})
    module = ConditionalFlowModule("cinn", {"num_blocks": 1})
    with pytest.raises(ValueError, match=r"batches must be \(x, condition\) pairs"):
        module.training_step(torch.randn(4, 4), 0)


def test_data_that_does_not_fit_the_model_is_refused_before_training():
    with pytest.raises(ValueError, match="conditioned on 10 classes but DigitsDataModule has 5"):
        module = ConditionalFlowModule("cond_realnvp_digits", {"hidden": 8})
        data = DigitsDataModule(normalize=False)
        data.num_classes = 5
        module.check_data(data)
    with pytest.raises(ValueError, match=r"takes samples of shape \(4,\) but InverseKinematicsDataModule "
                                         r"gives \(3,\)"):
        data = InverseKinematicsDataModule(num_train=10, num_val=10, num_test=10)
        data.input_shape = (3,)
        ConditionalFlowModule("cinn_ik", {"num_blocks": 1}).check_data(data)
    with pytest.raises(ValueError, match=r"observations of shape \(3,\) but"):
        ConditionalFlowModule("cinn_ik", {"num_blocks": 1, "cond_dim": 3}).check_data(
            InverseKinematicsDataModule(num_train=10, num_val=10, num_test=10))


def test_arm_forward_process_and_rejection_posterior():
    arm = InverseKinematics()
    x = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.5, math.pi / 2, 0.0, 0.0], [0.0, 0.0, math.pi / 2, 0.0]],
                     dtype=torch.float64)
    torch.testing.assert_close(arm.forward(x), torch.tensor([[2.0, 0.0], [0.0, 2.5], [0.5, 1.5]],
                                                            dtype=torch.float64), atol=1e-12, rtol=0)
    gen = torch.Generator().manual_seed(0)
    prior = arm.sample_prior(50_000, gen)
    torch.testing.assert_close(prior.std(0), torch.tensor(arm.sigmas), rtol=0.03, atol=0)
    y_star, eps = torch.tensor([1.5, 0.3]), 0.05
    post = arm.posterior(y_star, 200, epsilon=eps, generator=gen, chunk=100_000)
    assert len(post) == 200
    err = (arm.forward(post) - y_star.double()).square().sum(1)
    assert err.mean() < 1.5 * 2 * eps**2  # E ||f(x) - y*||^2 <= 2 eps^2 for the exact posterior
    assert post.std(0).min() > 0.05  # a spread of arms, not one solution
    plain = arm.posterior(y_star, 400, epsilon=eps, generator=gen, chunk=100_000, marginal=False)
    post = arm.posterior(y_star, 400, epsilon=eps, generator=gen, chunk=100_000)
    torch.testing.assert_close(post.mean(0), plain.mean(0), atol=0.2, rtol=0)  # the same posterior
    torch.testing.assert_close(post[:, 0].std(), plain[:, 0].std(), atol=0.05, rtol=0)
    assert len(arm.posterior(y_star, 10, epsilon=1e-4, generator=gen, chunk=1000, max_proposals=2000)) < 10
    with pytest.raises(ValueError, match=r"configurations \(n, 4\)"):
        arm.forward(torch.zeros(3, 3))


def test_ik_training_lowers_the_nll_and_the_memory_report_compares_with_the_stored_twin(capsys):
    torch.manual_seed(0)
    data = InverseKinematicsDataModule(num_train=2000, num_val=500, num_test=500, batch_size=100)
    module = ConditionalFlowModule("cinn_ik", {"num_blocks": 4, "hidden": 32})
    report = ConditionalMemoryReport(batch_size=100)
    trainer = pl.Trainer(max_epochs=2, callbacks=[report], **QUIET)
    data.setup()
    before = trainer.validate(module, data, verbose=False)[0]["val/nll"]
    trainer.fit(module, data)
    after = trainer.validate(module, data, verbose=False)[0]["val/nll"]
    assert after < before - 0.5, (before, after)
    assert "stored twin" in capsys.readouterr().out
    rows = {r["model"]: r for r in report.rows}
    assert rows["as trained"]["memory"] == "reversible"
    assert rows["as trained"]["held_bytes"] < 0.5 * rows["stored twin"]["held_bytes"]
    x = posterior_samples(module, torch.tensor([[1.5, 0.0], [1.0, 0.5]]), 7)
    assert x.shape == (2, 7, 4)


@pytest.mark.parametrize("config", ["digits_cond_realnvp.yaml", "ik_cinn.yaml"])
def test_configs_run_through_the_revtrain_command(config, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["revtrain"])
    threads = torch.get_num_threads()
    small = (["--data.init_args.num_train", "600", "--data.init_args.num_val", "200",
              "--data.init_args.num_test", "200", "--model.init_args.model_kwargs",
              '{"num_blocks": 2, "hidden": 16}'] if config.startswith("ik") else
             ["--model.init_args.model_kwargs", '{"hidden": 8}'])
    try:
        cli(["fit", "--config", str(CONFIGS / config), "--trainer.max_epochs", "1",
             "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
             "--trainer.limit_test_batches", "1", "--trainer.enable_progress_bar", "false",
             "--trainer.enable_model_summary", "false", *small])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "Test after fit" in out and "stored twin" in out
    if config.startswith("digits"):
        assert "one row per class" in out
        assert list(tmp_path.glob("runs/*/version_0/samples/final_t0.7.png"))
