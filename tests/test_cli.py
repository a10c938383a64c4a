"""The ``revtrain`` command (LightningCLI): configs, overrides, the fit report, bad configs."""

from __future__ import annotations

import re
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch
import yaml

from revtrain.cli import cli
from revtrain.lightning._common import reversible_stacks

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
DIGITS = str(Path(__file__).resolve().parents[1] / "configs" / "digits_revnet.yaml")
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    """Runs write runs/ under the working directory; keep that in tmp_path. One thread: the
    models here are tiny."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["revtrain"])  # not pytest's arguments
    # seed_everything (the configs' seed) exports PL_GLOBAL_SEED; do not leak it to other tests
    monkeypatch.setenv("PL_GLOBAL_SEED", "0")
    monkeypatch.delenv("PL_GLOBAL_SEED")
    threads = torch.get_num_threads()
    yield tmp_path
    torch.set_num_threads(threads)


def test_console_script_is_declared():
    (ep,) = [e for e in entry_points(group="console_scripts") if e.name == "revtrain"]
    assert ep.value == "revtrain.cli:main"


def test_paper_configs_exist():
    names = {p.stem for p in CONFIGS}
    for k in (10, 100):
        for m in ("revnet38", "revnet110", "revnet164", "resnet32", "resnet110", "resnet164"):
            assert f"cifar{k}_{m}" in names
    assert {"imagenet_revnet104", "imagenet_resnet101", "imagenet_irevnet_a",
            "imagenet_irevnet_b", "cifar10_irevnet", "cifar10_realnvp", "cifar10_glow",
            "digits_revnet"} <= names


@pytest.mark.parametrize("config", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_config_parses_and_prints(config, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli(["fit", "--config", str(config), "--print_config"])
    assert exit_.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    model = printed["model"]["init_args"]
    from revtrain import models

    assert model["model_name"] in models.list_models()
    assert model["memory"] == "reversible"
    assert printed["data"]["class_path"].startswith("revtrain.lightning.")


def test_cifar_revnet_config_has_the_paper_hyperparameters(capsys):
    with pytest.raises(SystemExit):
        cli(["fit", "--config", str(Path(DIGITS).with_name("cifar10_revnet110.yaml")),
             "--print_config"])
    cfg = yaml.safe_load(capsys.readouterr().out)
    opt = cfg["model"]["init_args"]["optimizer"]
    sched = cfg["model"]["init_args"]["lr_scheduler"]
    assert opt["class_path"] == "torch.optim.SGD"
    assert opt["init_args"]["lr"] == 0.1 and opt["init_args"]["momentum"] == 0.9
    assert opt["init_args"]["weight_decay"] == 2e-4
    assert sched["init_args"]["milestones"] == [40000, 60000]
    assert cfg["trainer"]["max_steps"] == 80000 and cfg["data"]["init_args"]["batch_size"] == 100


def test_stored_twin_is_one_override():
    run = cli(["--config", DIGITS, "--model.memory", "stored"], run=False)  # no subcommand
    stacks = reversible_stacks(run.model.net)
    assert stacks and all(s.memory.value == "stored" for s in stacks)
    run = cli(["--config", DIGITS], run=False)
    assert all(s.memory.value == "reversible" for s in reversible_stacks(run.model.net))


def _held(table: str, row: str) -> float:
    line = next(x for x in table.splitlines() if x.startswith(f"| {row} |"))
    value, unit = line.split("|")[3].split()
    return float(value) * {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}[unit]


def test_fit_tests_and_prints_the_memory_table(capsys, in_tmp):
    """The main job, shortened: fit, test on the test split, memory table. The reversible
    network holds less between forward and backward than its stored twin on the same batch;
    run as the stored twin, the table shows no saving (the comparison can fail)."""
    short = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "3",
             "--trainer.limit_val_batches", "1", *QUIET]
    cli(["fit", "--config", DIGITS, *short])
    out = capsys.readouterr().out
    assert "test/top1" in out
    assert _held(out, "as trained") < 0.5 * _held(out, "stored twin")
    ckpt = next(in_tmp.glob("runs/csv/version_0/checkpoints/last.ckpt"))
    assert (in_tmp / "runs/csv/version_0/metrics.csv").exists()
    # the checkpoint loads with weights_only=True (RNG state and hparams are plain data)
    from revtrain.lightning import Classifier

    loaded = Classifier.load_from_checkpoint(ckpt, weights_only=True)
    assert loaded.hparams.model_name == "revnet_digits"
    assert "RNGStateCallback" in torch.load(ckpt, weights_only=True)["callbacks"]

    cli(["fit", "--config", DIGITS, "--model.memory", "stored", *short])
    out = capsys.readouterr().out
    assert _held(out, "as trained") == _held(out, "stored twin")

    # the other subcommands take the same config and a checkpoint
    cli(["validate", "--config", DIGITS, "--ckpt_path", str(ckpt), *QUIET,
         "--trainer.limit_val_batches", "1"])
    assert re.search(r"val/top1", capsys.readouterr().out)


def test_unknown_model_fails_before_training(in_tmp):
    with pytest.raises(ValueError, match="unknown model 'revnet_39'"):
        cli(["fit", "--config", DIGITS, "--model.model_name", "revnet_39"])
    assert not (in_tmp / "runs").exists()


def test_missing_data_directory_fails_before_training(in_tmp):
    with pytest.raises(FileNotFoundError, match="no CIFAR-10 data at .*download"):
        cli(["fit", "--config", str(Path(DIGITS).with_name("cifar10_revnet38.yaml")),
             "--data.root", str(in_tmp / "missing"), "--trainer.accelerator", "cpu", *QUIET])
    assert not list(in_tmp.glob("runs/**/*.ckpt"))


def test_image_size_the_model_cannot_take_fails_before_training(in_tmp):
    with pytest.raises(ValueError, match=r"cannot take the \(1, 8, 8\) images"):
        cli(["fit", "--config", str(Path(DIGITS).with_name("digits_realnvp.yaml")),
             "--model.model_kwargs", "{in_channels: 1, image_size: 16, levels: 2, hidden: 8}",
             *QUIET])
    assert not list(in_tmp.glob("runs/**/*.ckpt"))


def test_bad_memory_mode_is_rejected_by_the_parser(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli(["fit", "--config", DIGITS, "--model.memory", "cheap"])
    assert exit_.value.code != 0
    assert "cheap" in capsys.readouterr().err


SMALL_INPUT_CONFIGS = [p for p in CONFIGS if not p.stem.startswith("imagenet_")]


@pytest.mark.parametrize("config", SMALL_INPUT_CONFIGS, ids=[p.stem for p in SMALL_INPUT_CONFIGS])
def test_config_model_takes_its_data(config):
    """Build each CIFAR / digits config's model and DataModule (no files needed) and run the
    pre-training check: channels, classes and image size fit. (The ImageNet models, 29M-181M
    parameters, are left to the model tests.)"""
    torch.set_num_threads(1)
    run = cli(["--config", str(config), "--trainer.accelerator", "cpu"], run=False)
    run.model.check_data(run.datamodule)
