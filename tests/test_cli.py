"""The ``revtrain`` command: configs and their composition, run folders (no silent resume),
short errors, the tools (``models``, ``benchmark``), start-up time, no misleading warnings.

Most tests call :func:`revtrain.cli.main` in-process (the console script's own code); the tests
marked ``real command`` run the installed ``revtrain`` executable in a subprocess."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch
import yaml

from revtrain.cli import cli, main, short_error
from revtrain.lightning._common import reversible_stacks

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
DIGITS = str(CONFIGS / "digits_revnet.yaml")
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
SHORT = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "3",
         "--trainer.limit_val_batches", "1", *QUIET]
REVTRAIN = shutil.which("revtrain", path=str(Path(sys.executable).parent)) or "revtrain"

# every paper experiment and the config files that compose it
EXPERIMENTS = {
    **{f"cifar10_{m}": ["cifar.yaml"] + ([f"models/{m}.yaml"] if m != "revnet38" else [])
       for m in ("revnet38", "revnet110", "revnet164", "resnet32", "resnet110", "resnet164")},
    **{f"cifar100_{m}": ["cifar.yaml", "cifar100.yaml", f"models/{m}.yaml"]
       for m in ("revnet38", "revnet110", "revnet164", "resnet32", "resnet110", "resnet164")},
    "cifar10_irevnet": ["cifar.yaml", "cifar_irevnet.yaml"],
    "imagenet_revnet104": ["imagenet.yaml"],
    "imagenet_resnet101": ["imagenet.yaml", "models/resnet101.yaml"],
    "imagenet_irevnet_b": ["imagenet.yaml", "imagenet_irevnet.yaml"],
    "imagenet_irevnet_a": ["imagenet.yaml", "imagenet_irevnet.yaml", "models/irevnet_a.yaml"],
    "digits_revnet_digits": ["digits_revnet.yaml"],
    "digits_irevnet_digits": ["digits_irevnet.yaml"],
    "digits_rev_vit_digits": ["digits_vit.yaml"],
    "cifar10_rev_vit_small": ["cifar.yaml", "cifar10_vit.yaml"],
    "imagenet_rev_vit_small": ["imagenet.yaml", "imagenet_vit.yaml"],
    "imagenet_rev_vit_base": ["imagenet.yaml", "imagenet_vit.yaml", "models/rev_vit_base.yaml"],
}


def _args(files: list[str]) -> list[str]:
    return [a for f in files for a in ("--config", str(CONFIGS / f))]


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    """Runs write runs/ under the working directory; keep that in tmp_path, one thread."""
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


# --- configs -----------------------------------------------------------------------------------

def _printed(files: list[str], *extra: str, capsys) -> dict:
    with pytest.raises(SystemExit) as exit_:
        cli(["fit", *_args(files), *extra, "--print_config"])
    assert exit_.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


@pytest.mark.parametrize("name", list(EXPERIMENTS))
def test_every_experiment_parses_and_says_what_runs(name, capsys):
    """Each paper experiment composes from the files of configs/; its printed config names a
    registered model and the memory mode that really runs (stored for a ResNet)."""
    from revtrain import models

    printed = _printed(EXPERIMENTS[name], capsys=capsys)
    model = printed["model"]["init_args"]
    assert model["model_name"] == name.split("_", 1)[1]
    info = models.model_info(model["model_name"])
    assert model["memory"] == ("reversible" if info.reversible else "stored")
    data = printed["data"]["class_path"]
    assert data == {"cifar10": "revtrain.lightning.CIFAR10DataModule",
                    "cifar100": "revtrain.lightning.CIFAR100DataModule",
                    "imagenet": "revtrain.lightning.ImageNetDataModule",
                    "digits": "revtrain.lightning.DigitsDataModule"}[name.split("_")[0]]


def _other_configs() -> list[str]:
    """Configs of the other families (flows, conditional flows, transformers): whole files."""
    present = {str(p.relative_to(CONFIGS)) for p in CONFIGS.rglob("*.yaml")}
    used = {f for files in EXPERIMENTS.values() for f in files}
    bases = {"models/revnet38.yaml", "models/revnet104.yaml", "models/irevnet_b.yaml"}
    return sorted(f for f in present - used - bases if "/" not in f)


FLOW_CONFIGS = ("digits_realnvp.yaml", "digits_glow.yaml", "cifar10_realnvp.yaml",
                "cifar10_glow.yaml")


@pytest.mark.parametrize("config", FLOW_CONFIGS)
def test_flow_configs_parse_write_into_run_folders_and_glow_uses_the_logit(config, capsys):
    """No fixed checkpoint folder (runs are versioned); Glow configs use the logit transform."""
    printed = _printed([config], capsys=capsys)
    for callback in printed["trainer"].get("callbacks") or []:
        assert (callback.get("init_args") or {}).get("dirpath") is None, callback
    model = printed["model"]["init_args"]
    if model["model_name"] in ("glow", "spline_glow"):
        assert model["model_kwargs"]["preprocess"] == "logit"


def test_every_config_file_is_used_and_configs_are_small():
    used = {f for files in EXPERIMENTS.values() for f in files}
    others = set(_other_configs())
    present = {str(p.relative_to(CONFIGS)) for p in CONFIGS.rglob("*.yaml")}
    assert present - others - used <= {"models/revnet38.yaml", "models/revnet104.yaml",
                                       "models/irevnet_b.yaml"}  # the bases' defaults
    assert used <= present
    lines = sum(len((CONFIGS / f).read_text().splitlines()) for f in present - others)
    assert lines < 450  # were 19 classifier files, 867 lines


@pytest.mark.parametrize("name", _other_configs())
def test_every_other_config_parses(name, capsys):
    printed = _printed([name], capsys=capsys)
    assert printed["model"]["class_path"].startswith("revtrain.")


def test_cifar_revnet_config_has_the_paper_hyperparameters(capsys):
    cfg = _printed(EXPERIMENTS["cifar100_revnet110"], capsys=capsys)
    opt = cfg["model"]["init_args"]["optimizer"]
    sched = cfg["model"]["init_args"]["lr_scheduler"]
    assert opt["class_path"] == "torch.optim.SGD"
    assert opt["init_args"]["lr"] == 0.1 and opt["init_args"]["momentum"] == 0.9
    assert opt["init_args"]["weight_decay"] == 2e-4
    assert sched["init_args"]["milestones"] == [40000, 60000]
    assert cfg["trainer"]["max_steps"] == 80000 and cfg["data"]["init_args"]["batch_size"] == 100
    irevnet = _printed(EXPERIMENTS["cifar10_irevnet"], capsys=capsys)
    assert irevnet["trainer"]["max_epochs"] == 200 and irevnet["trainer"]["max_steps"] == -1
    assert irevnet["model"]["init_args"]["lr_scheduler"]["init_args"]["gamma"] == 0.2


def test_vit_configs_have_the_papers_mixup_cutmix_and_smoothing(capsys):
    """Rev-ViT / DeiT (SlowFast's REV_VIT_S.yaml MIXUP section): mixup 0.8, CutMix 1.0 on every
    batch, switch 0.5, label smoothing 0.1; the digits recipe stays unmixed."""
    for name in ("imagenet_rev_vit_small", "imagenet_rev_vit_base", "cifar10_rev_vit_small"):
        model = _printed(EXPERIMENTS[name], capsys=capsys)["model"]["init_args"]
        assert {k: model[k] for k in ("mixup_alpha", "cutmix_alpha", "mix_prob", "switch_prob",
                                      "label_smoothing")} == {
            "mixup_alpha": 0.8, "cutmix_alpha": 1.0, "mix_prob": 1.0, "switch_prob": 0.5,
            "label_smoothing": 0.1}, name
    digits = _printed(EXPERIMENTS["digits_rev_vit_digits"], capsys=capsys)["model"]["init_args"]
    assert digits["mixup_alpha"] == 0.0 and digits["cutmix_alpha"] == 0.0


def test_imagenet_configs_run_on_one_device_as_they_are(capsys):
    """One CPU or GPU without overrides; 4 x 64 images per step as the papers' 4 GPUs."""
    for name in ("imagenet_revnet104", "imagenet_irevnet_a"):
        trainer = _printed(EXPERIMENTS[name], capsys=capsys)["trainer"]
        assert trainer["devices"] == 1 and trainer["accelerator"] == "auto"
        assert trainer["strategy"] == "auto" and trainer["accumulate_grad_batches"] == 4


def test_num_classes_and_channels_come_from_the_data():
    run = cli([*_args(EXPERIMENTS["cifar100_resnet32"]), "--trainer.accelerator", "cpu"],
              run=False)
    assert run.model.hparams.num_classes == 100 == run.model.net.num_classes
    assert run.model.hparams.in_channels == 3
    assert run.model.hparams.memory == "stored"
    run = cli(["--config", DIGITS], run=False)
    assert run.model.hparams.in_channels == 1 and run.model.hparams.num_classes == 10


def test_stored_twin_is_one_override():
    run = cli(["--config", DIGITS, "--model.memory", "stored"], run=False)  # no subcommand
    stacks = reversible_stacks(run.model.net)
    assert stacks and all(s.memory.value == "stored" for s in stacks)
    run = cli(["--config", DIGITS], run=False)
    assert all(s.memory.value == "reversible" for s in reversible_stacks(run.model.net))


SMALL_INPUT = [n for n in EXPERIMENTS if not n.startswith("imagenet_")]


@pytest.mark.parametrize("name", SMALL_INPUT)
def test_config_model_takes_its_data(name):
    """Build each CIFAR / digits experiment's model and DataModule (no files needed) and run
    the pre-training check: channels, classes and image size fit. (The ImageNet models,
    29M-181M parameters, are left to the model tests.)"""
    torch.set_num_threads(1)
    run = cli([*_args(EXPERIMENTS[name]), "--trainer.accelerator", "cpu"], run=False)
    run.model.check_data(run.datamodule)


# --- runs: fresh folders, explicit resume, where things went --------------------------------

def _held(table: str, row: str) -> float:
    line = next(x for x in table.splitlines() if x.startswith(f"| {row} |"))
    value, unit = line.split("|")[3].split()
    return float(value) * {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}[unit]


def _step(ckpt: Path) -> int:
    return torch.load(ckpt, weights_only=True)["global_step"]


def test_fit_writes_a_fresh_run_folder_and_never_resumes_by_itself(capsys, in_tmp):
    """The main job, shortened: fit, test, memory table, all in runs/<name>/version_0, printed
    at the end. A second fit starts fresh in version_1 (issue 13: it used to resume), the
    stored twin is one override, and --resume last continues the newest run."""
    main(["fit", "--config", DIGITS, *SHORT])
    out = capsys.readouterr().out
    run0 = in_tmp / "runs" / "digits_revnet_digits" / "version_0"
    assert "Test after fit (360 images): test/top1 = " in out
    assert _held(out, "as trained") < 0.5 * _held(out, "stored twin")
    for name in ("metrics.csv", "config.yaml", "checkpoints/last.ckpt", "memory.md",
                 "memory.json", "memory.png"):
        assert (run0 / name).exists(), name
    assert f"Run folder: {Path('runs/digits_revnet_digits/version_0')}" in out
    assert "memory:" in out and "checkpoints:" in out
    rows = __import__("json").loads((run0 / "memory.json").read_text())["rows"]
    assert [r["memory"] for r in rows] == ["reversible", "stored"]
    assert _step(run0 / "checkpoints" / "last.ckpt") == 3
    # the checkpoint loads with weights_only=True (RNG state and hparams are plain data)
    from revtrain.lightning import Classifier

    loaded = Classifier.load_from_checkpoint(run0 / "checkpoints" / "last.ckpt",
                                             weights_only=True)
    assert loaded.hparams.model_name == "revnet_digits" and loaded.hparams.memory == "reversible"

    # the stored twin: a new folder, trained from step 0 (it used to load the reversible run)
    main(["fit", "--config", DIGITS, "--model.memory", "stored", *SHORT])
    out = capsys.readouterr().out
    run1 = run0.with_name("version_1")
    assert _step(run1 / "checkpoints" / "last.ckpt") == 3
    assert _held(out, "as trained") == _held(out, "stored twin")
    assert yaml.safe_load((run1 / "config.yaml").read_text())["model"]["init_args"]["memory"] \
        == "stored"

    # --resume last: the newest checkpoint of this run name, continued in a new folder
    main(["fit", "--config", DIGITS, "--resume", "last", *SHORT,
          "--trainer.max_epochs", "2", "--report.memory_table", "false",
          "--report.test_after_fit", "false"])
    out = capsys.readouterr().out
    assert f"starting from {run1 / 'checkpoints' / 'last.ckpt'}".replace(str(in_tmp) + "/", "") \
        in out.replace(str(in_tmp) + "/", "")
    assert _step(run0.with_name("version_2") / "checkpoints" / "last.ckpt") == 6

    # validate / test take a checkpoint; without one they say the weights are random
    with pytest.warns(UserWarning, match="weights are the random ones"):
        main(["test", "--config", DIGITS, *QUIET, "--trainer.limit_test_batches", "1"])
    with __import__("warnings").catch_warnings():
        __import__("warnings").filterwarnings("error", message=".*random ones")
        main(["validate", "--config", DIGITS, "--ckpt_path",
              str(run0 / "checkpoints" / "last.ckpt"), *QUIET, "--trainer.limit_val_batches", "1"])
    assert "val/top1" in capsys.readouterr().out


def test_resume_errors_are_short_and_clear(capsys, in_tmp):
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", DIGITS, "--resume", "last", *SHORT])
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert "--resume last: no checkpoint under" in err and "start a fresh run" in err
    assert len(err.strip().splitlines()) <= 3
    with pytest.raises(SystemExit):
        main(["fit", "--config", DIGITS, "--resume", "last", "--ckpt_path", "x.ckpt"])
    assert "either --resume last or --ckpt_path" in capsys.readouterr().err


def test_predict_writes_the_predictions_into_its_run_folder(capsys, in_tmp):
    """`revtrain predict` writes what it predicts (probabilities, classes, sample indices) to
    predictions.pt in its own run folder and says where; a file already there is never
    overwritten (a short error instead)."""
    main(["fit", "--config", DIGITS, *SHORT, "--report.memory_table", "false",
          "--report.test_after_fit", "false"])
    ckpt = in_tmp / "runs" / "digits_revnet_digits" / "version_0" / "checkpoints" / "last.ckpt"
    capsys.readouterr()
    main(["predict", "--config", DIGITS, "--ckpt_path", str(ckpt), *QUIET])
    out = capsys.readouterr().out
    path = ckpt.parents[1].with_name("version_1") / "predictions.pt"
    assert f"predictions: {path.relative_to(in_tmp)}" in out
    saved = torch.load(path, weights_only=True)
    probs, pred, indices = saved["predictions"]["probs"], saved["predictions"]["pred"], \
        saved["indices"]
    assert probs.shape == (360, 10) and pred.shape == (360,)  # the held-out digits
    assert torch.allclose(probs.sum(1), torch.ones(360)) and torch.equal(probs.argmax(1), pred)
    assert torch.equal(indices, torch.arange(360))  # not shuffled: in data set order
    # what the checkpoint's model gives on the test split
    from revtrain.lightning import Classifier, DigitsDataModule

    model = Classifier.load_from_checkpoint(ckpt, weights_only=True).eval()
    data = DigitsDataModule()
    data.setup("predict")
    x = data.test_set.tensors[0]  # the 360 test digits, in order
    with torch.no_grad():
        assert torch.allclose(model(x).softmax(-1), probs, atol=1e-6)
    with pytest.raises(SystemExit) as exit_:
        main(["predict", "--config", DIGITS, "--ckpt_path", str(ckpt), *QUIET,
              "--predictions.dirpath", str(path.parent)])
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert "predictions.pt exists and is not overwritten" in err
    assert torch.equal(torch.load(path, weights_only=True)["predictions"]["probs"], probs)


# --- errors ----------------------------------------------------------------------------------

@pytest.mark.parametrize("extra, expected", [
    (["--model.model_name", "revnet_39"], "unknown model 'revnet_39'; did you mean 'revnet38'"),
    (["--model.memory", "cheap"], "--model.memory: 'cheap' is not one of reversible, "
                                  "checkpoint, stored"),
    (["--model.memory", "revresible"], "did you mean 'reversible'?"),
    (["--model.class_path", "revtrain.lightning.Clasifier"],
     "no class 'revtrain.lightning.Clasifier'; did you mean revtrain.lightning.Classifier?"),
    (["--model.model_kwargs", "{droput: 0.1}"], "did you mean 'dropout'?"),
    (["--model.mixup_alpha", "-0.5"], "--model.mixup_alpha must be >= 0"),
    (["--trainer.max_epochs", "-1", "--trainer.limit_train_batches", "1",
      "--model.model_name", "resnet32", "--model.memory", "reversible"],
     "ResNet has no reversible stack"),
])
def test_config_mistakes_give_one_short_message(extra, expected, capsys, in_tmp):
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", DIGITS, *extra, *QUIET])
    assert exit_.value.code not in (0, None)
    err = capsys.readouterr().err
    assert expected in err, err
    assert len(err.strip().splitlines()) <= 3, err  # was 60-80 lines
    assert "--traceback" in err
    assert not list(in_tmp.glob("runs/**/*.ckpt"))


def test_traceback_flag_shows_the_whole_error(capsys):
    with pytest.raises(ValueError, match="unknown model 'revnet_39'"):
        main(["fit", "--config", DIGITS, "--model.model_name", "revnet_39", "--traceback"])


def test_unknown_subcommand_and_missing_data():
    with pytest.raises(SystemExit) as exit_:
        main(["fitt"])
    assert exit_.value.code == 2
    with pytest.raises(FileNotFoundError, match="no CIFAR-10 data at .*download"):
        cli(["fit", "--config", str(CONFIGS / "cifar.yaml"), "--data.root", "missing",
             "--trainer.accelerator", "cpu", *QUIET])


def test_short_error_of_a_checkpoint_from_another_model():
    err = RuntimeError('Error(s) in loading state_dict for Classifier:\n\tMissing key(s) in '
                       'state_dict: "net.a", "net.b".\n\tsize mismatch for net.c: ...\n\tsize '
                       'mismatch for net.d: ...')
    text = short_error(err)
    assert "2 size mismatches, 2 missing keys" in text and "config.yaml" in text


def test_image_size_the_model_cannot_take_fails_before_training(in_tmp):
    with pytest.raises(ValueError, match=r"cannot take the \(1, 8, 8\) images"):
        cli(["fit", "--config", str(CONFIGS / "digits_realnvp.yaml"),
             "--model.model_kwargs", "{in_channels: 1, image_size: 16, levels: 2, hidden: 8}",
             *QUIET])
    assert not list(in_tmp.glob("runs/**/*.ckpt"))


# --- the tools -------------------------------------------------------------------------------

def test_models_subcommand_lists_the_registry(capsys):
    from revtrain import models

    main(["models"])
    out = capsys.readouterr().out
    assert all(name in out for name in models.list_models())
    main(["models", "resnet*", "--markdown"])
    table = capsys.readouterr().out.strip().splitlines()
    assert table[0].startswith("| name | family |") and len(table) == 2 + 4
    assert any(r.startswith("| resnet32 | revnet | classification | 3x32x32 | 0.46M | stored only |")
               for r in table)


@pytest.mark.slow
def test_docs_model_table_is_the_registry():
    """docs/models.md shows `revtrain models --markdown --count`; regenerate it when the
    registry changes (the registry is the one copy of the metadata)."""
    from revtrain.cli import models_table
    from revtrain.models import list_models, model_info

    table = models_table([model_info(n) for n in list_models()], markdown=True, count=True)
    assert table in (ROOT / "docs" / "models.md").read_text()


@pytest.mark.slow
def test_benchmark_subcommand_writes_into_a_run_folder(in_tmp, capsys):
    results = ROOT / "benchmarks" / "results"
    before = {p: p.stat().st_mtime for p in results.iterdir()}
    main(["benchmark", "--profile", "smoke", "--sections", "stack", "--device", "cpu"])
    folder = in_tmp / "runs" / "benchmark" / "version_0"
    assert (folder / "run_smoke_cpu.json").exists()
    assert "Benchmark folder: runs/benchmark/version_0" in capsys.readouterr().out
    assert {p: p.stat().st_mtime for p in results.iterdir()} == before  # committed results


# --- the real command: start-up time and a quiet run -----------------------------------------

def test_real_command_help_is_fast_and_imports_no_lightning():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    start = time.perf_counter()
    proc = subprocess.run([REVTRAIN, "--help"], capture_output=True, text=True, env=env,
                          timeout=120)
    seconds = time.perf_counter() - start
    assert proc.returncode == 0
    for sub in ("fit", "validate", "test", "predict", "models", "benchmark"):
        assert f"\n  {sub} " in proc.stdout
    print(f"revtrain --help: {seconds:.2f} s")
    probe = ("import sys, revtrain; before = set(sys.modules); from revtrain.cli import main; "
             "main(['--help']); new = set(sys.modules) - before; "
             "print(sorted(m for m in new if m.split('.')[0] in "
             "('pytorch_lightning', 'lightning_fabric', 'jsonargparse', 'torchvision', "
             "'torchmetrics')))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         env=env, timeout=120).stdout
    assert out.strip().splitlines()[-1] == "[]"


@pytest.mark.slow
def test_real_command_fit_is_quiet(tmp_path):
    """The shortened main job through the installed executable: exit 0, the run folder, and
    none of the misleading warnings of issue 13."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("PL_GLOBAL_SEED", None)
    proc = subprocess.run([REVTRAIN, "fit", "--config", DIGITS, *SHORT], capture_output=True,
                          text=True, cwd=tmp_path, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Run folder: runs/digits_revnet_digits/version_0" in proc.stdout
    for noise in ("ckpt_path=None", "save_last=True", "Tip:", "LeafSpec", "many workers",
                  "args parameter is intended", "worker processes in total"):
        assert noise not in proc.stderr + proc.stdout, noise
