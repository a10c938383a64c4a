"""The ``revtrain`` command: LightningCLI with revtrain's modules, data and callbacks, and tools.

Examples::

    revtrain fit --config configs/digits_revnet.yaml
    revtrain fit --config configs/digits_revnet.yaml --model.memory stored   # the stored twin
    revtrain fit --config configs/cifar.yaml --config configs/models/revnet38.yaml --data.root ~/data
    revtrain fit --config configs/digits_revnet.yaml --resume last           # continue a run
    revtrain test --config configs/digits_revnet.yaml --ckpt_path runs/.../last.ckpt
    revtrain models                                                          # the registry
    revtrain benchmark                                                       # the quick profile

Every ``fit`` / ``validate`` / ``test`` / ``predict`` writes into a fresh run folder
``<run.root>/<run.name>/version_<N>/`` (default name ``<data>_<model>``, e.g.
``digits_revnet_digits``): ``metrics.csv``, ``config.yaml``, ``tensorboard/`` (with the
``tensorboard`` extra), ``checkpoints/``, ``samples/`` (flows) and the memory table
(``memory.md`` / ``.json`` / ``.png``). A run never starts from an earlier run's checkpoint
unless asked: ``--ckpt_path PATH``, or ``--resume last`` for the newest checkpoint of runs of
the same name. ``fit`` ends by printing where everything went.

``--model`` takes :class:`~revtrain.lightning.Classifier` or
:class:`~revtrain.lightning.FlowModule` (any LightningModule); ``--data`` any LightningDataModule
(:class:`~revtrain.lightning.DigitsDataModule` needs no download). ``num_classes`` and
``in_channels`` of a Classifier are linked to the DataModule's ``num_classes`` and
``input_shape``. The RNG-state callback is always on (key ``rng_state``), so that a resumed
run continues exactly. The ``report`` key (``--report.test_after_fit``,
``--report.memory_table``) adds a test run and a memory table at the end of ``fit``.

Errors print one short message; ``--traceback`` (or ``REVTRAIN_TRACEBACK=1``) shows the full
traceback. This module imports nothing heavy at import time, so ``revtrain --help`` stays fast.
"""

from __future__ import annotations

import difflib
import os
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["RunFolder", "cli", "main"]

TRAINING_SUBCOMMANDS = {
    "fit": "train a model (and, with the report options, test it and print its memory table)",
    "validate": "run one validation epoch",
    "test": "run one test epoch",
    "predict": "run prediction",
}

HELP = """\
usage: revtrain [-h] [--version] <subcommand> [options] [--traceback]

Train invertible networks without storing their activations (LightningCLI).

subcommands:
{subcommands}

  revtrain <subcommand> --help     the options of a subcommand
  revtrain fit --config configs/digits_revnet.yaml --print_config

Each run writes into a fresh folder runs/<name>/version_<N>/; resume only with --ckpt_path PATH
or --resume last. Errors are one short message; --traceback shows the whole traceback.
"""


class RunFolder:
    """Where a run writes: ``<root>/<name>/version_<N>/``, a new ``N`` for every run.

    Args:
        root: the folder of all runs.
        name: the run's name; default ``<data>_<model>`` (e.g. ``digits_revnet_digits``).
    """

    def __init__(self, root: str = "runs", name: str | None = None):
        self.root = root
        self.name = name


# --- the LightningCLI -------------------------------------------------------------------------

def _cli_class():
    """RevtrainCLI, defined on first use (Lightning is imported only then)."""
    from pytorch_lightning.cli import LightningArgumentParser, LightningCLI

    from .lightning.callbacks import PredictionWriter, RNGStateCallback
    from .lightning.report import RunReport

    class RevtrainCLI(LightningCLI):
        """LightningCLI with revtrain's run folders, links, the RNG callback and the fit report."""

        def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
            parser.add_lightning_class_args(RNGStateCallback, "rng_state")
            parser.add_lightning_class_args(PredictionWriter, "predictions")
            parser.add_class_arguments(RunReport, "report")
            parser.add_class_arguments(RunFolder, "run")
            parser.add_argument(
                "--resume", type=str | None, default=None,
                help="'last': start from the newest checkpoint (last.ckpt or on_exception.ckpt) "
                     "of earlier runs of this name; fit continues that run, the others "
                     "evaluate its weights. Default: a fresh start",
            )
            parser.add_argument(
                "--threads", type=int | None, default=None,
                help="torch intra-op CPU threads (torch.set_num_threads); 1 is fastest for small "
                     "models on a shared or small CPU. Default: torch's choice",
            )
            # one place for the number of classes and channels: the data
            parser.link_arguments("data.num_classes", "model.init_args.num_classes",
                                  apply_on="instantiate")
            parser.link_arguments("data.input_shape", "model.init_args.in_channels",
                                  compute_fn=_channels, apply_on="instantiate")

        def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
            super().parse_arguments(parser, args)
            subcommand = self.config.get("subcommand")
            if subcommand:  # before LightningCLI reads the checkpoint's hyper-parameters
                self.run_dir = _prepare_run(self.config[subcommand], subcommand)

        def before_instantiate_classes(self) -> None:
            config = self.config[self.subcommand] if self.subcommand else self.config
            threads = config.get("threads")
            if threads is not None:
                import torch

                if threads < 1:
                    raise ValueError(f"--threads must be at least 1, got {threads}")
                torch.set_num_threads(threads)

        def _run_subcommand(self, subcommand: str) -> None:
            import warnings

            from pytorch_lightning.utilities.warnings import PossibleUserWarning

            with warnings.catch_warnings():
                if getattr(self.datamodule, "in_memory", False):
                    # right for data in memory (digits): workers would only add overhead
                    warnings.filterwarnings("ignore", message=r"The '\w+' does not have many "
                                            r"workers", category=PossibleUserWarning)
                super()._run_subcommand(subcommand)

        def _warn_if_untrained(self) -> None:
            if self.config[self.subcommand].get("ckpt_path") is None:
                from pytorch_lightning.utilities import rank_zero_warn

                rank_zero_warn(f"revtrain {self.subcommand}: no --ckpt_path (or --resume last): "
                               "the model's weights are the random ones it was built with")

        before_validate = before_test = before_predict = _warn_if_untrained

        def after_fit(self) -> None:
            report = self.config_init[self.subcommand]["report"]
            if report.test_after_fit and not self.trainer.interrupted:
                results = self.trainer.test(self.model, datamodule=self.datamodule, verbose=True)
                self._print_test_summary(results)
            memory_files = self._memory_table(report) if report.memory_table else []
            self._print_where(memory_files)

        after_validate = after_test = after_predict = lambda self: self._print_where([])

        def _print_test_summary(self, results: list[dict[str, float]]) -> None:
            if not results or not self.trainer.is_global_zero:
                return
            scores = dict(results[0])
            n = scores.pop("test/images", None)
            scores.pop("test/loss", None)
            text = ", ".join(f"{k} = {v:.4f}" for k, v in scores.items())
            where = f" ({int(n)} images)" if n is not None else ""
            print(f"\nTest after fit{where}: {text}", flush=True)

        def _memory_table(self, report: RunReport) -> list[Path]:
            folder = self._folder()  # on every rank: trainer.log_dir is a broadcast
            if not self.trainer.is_global_zero:
                return []
            from .lightning._common import is_sharded
            from .lightning.report import memory_table, write_memory_table

            if is_sharded(self.model):  # the table copies the network into one process
                print("\nMemory table skipped: the network is sharded (FSDP); "
                      "`revtrain memory --config ...` plans it in one process", flush=True)
                return []

            text, rows = memory_table(self.model, self.datamodule, report.batch_size)
            print("\n" + text + "\n", flush=True)
            meta = {"model": getattr(self.model.hparams, "model_name", type(self.model).__name__),
                    "data": type(self.datamodule).__name__}
            return write_memory_table(text, rows, folder, meta)

        def _folder(self) -> Path:
            return Path(self.trainer.log_dir or self.trainer.default_root_dir)

        def _print_where(self, memory_files: list[Path]) -> None:
            folder = self._folder()  # on every rank: trainer.log_dir is a broadcast
            if not self.trainer.is_global_zero:
                return
            print(_where(self.trainer, folder, memory_files), flush=True)

    return RevtrainCLI


def _channels(input_shape: Any) -> int:
    return int(input_shape[0])


def _default_loggers() -> list[dict[str, Any]]:
    """CSV (always) and TensorBoard (when installed); the run folder's name and version are
    filled in per run."""
    from importlib.util import find_spec

    loggers = [{"class_path": "pytorch_lightning.loggers.CSVLogger",
                "init_args": {"save_dir": "runs", "name": None}}]
    if find_spec("tensorboard") or find_spec("tensorboardX"):
        loggers.append({"class_path": "pytorch_lightning.loggers.TensorBoardLogger",
                        "init_args": {"save_dir": "runs", "name": None,
                                      "sub_dir": "tensorboard"}})
    return loggers


def _short_class(path: str | None) -> str:
    name = (path or "").rsplit(".", 1)[-1]
    return re.sub(r"DataModule$", "", name).lower() or "run"


def _run_name(config: Any) -> str:
    run = config.get("run")
    if run is not None and run.get("name"):
        return str(run.name)
    model = config.get("model")
    data = config.get("data")
    model_name = None
    if model is not None and model.get("init_args") is not None:
        model_name = model.init_args.get("model_name")
    model_part = model_name or _short_class(model.get("class_path") if model is not None else None)
    data_part = _short_class(data.get("class_path")) if data is not None else None
    return "_".join(p for p in (data_part, model_part) if p)


def _rank_zero() -> bool:
    return all(os.environ.get(k, "0") == "0" for k in ("RANK", "LOCAL_RANK", "NODE_RANK"))


def _versions(folder: Path) -> list[tuple[int, Path]]:
    found = []
    for p in folder.glob("version_*"):
        if p.is_dir() and p.name[len("version_"):].isdigit():
            found.append((int(p.name[len("version_"):]), p))
    return sorted(found)


def latest_checkpoint(folder: Path) -> Path | None:
    """The newest ``last*.ckpt`` / ``on_exception.ckpt`` in the runs under ``folder``."""
    candidates = [p for _, v in _versions(folder) for pattern in ("last*.ckpt", "on_exception.ckpt")
                  for p in (v / "checkpoints").glob(pattern)]
    return max(candidates, key=lambda p: p.stat().st_mtime) if candidates else None


def _prepare_run(config: Any, subcommand: str) -> Path | None:
    """Choose the run folder, point the default loggers at it and resolve ``--resume``."""
    run = config.get("run")
    root = Path(run.root if run is not None else "runs")
    name = _run_name(config)
    resume = config.get("resume")
    if resume is not None:
        if resume != "last":
            raise ValueError(f"--resume takes 'last', got {resume!r}; for a given checkpoint use "
                             "--ckpt_path PATH")
        if config.get("ckpt_path"):
            raise ValueError("give either --resume last or --ckpt_path, not both")
        found = latest_checkpoint(root / name)
        if found is None:
            raise FileNotFoundError(
                f"--resume last: no checkpoint under {root / name}/version_*/checkpoints/; "
                "start a fresh run without --resume (or point --run.name at the run)")
        config.ckpt_path = str(found)
        print(f"revtrain {subcommand}: starting from {found}", flush=True)
    trainer = config.get("trainer")
    loggers = trainer.get("logger") if trainer is not None else None
    if not isinstance(loggers, list) or not _rank_zero():
        return None
    ours = [lg for lg in loggers if lg.get("class_path", "").endswith(("CSVLogger",
                                                                       "TensorBoardLogger"))]
    if not ours:
        return None
    taken = _versions(root / name)
    folder = root / name / f"version_{taken[-1][0] + 1 if taken else 0}"
    for logger in ours:
        args = logger.init_args
        if args.get("save_dir") in (None, "runs"):
            args.save_dir = str(root)
        if args.get("name") is None:
            args.name = name
        if args.get("version") is None:
            args.version = folder.name
    trainer.default_root_dir = str(folder)
    return folder


def _where(trainer: Any, folder: Path, memory_files: list[Path]) -> str:
    """The closing lines: where this run's files went."""
    lines = [f"\nRun folder: {folder}"]
    logs = [str(Path(lg.log_dir)) for lg in trainer.loggers if getattr(lg, "log_dir", None)]
    if logs:
        lines.append(f"  logs:        {', '.join(dict.fromkeys(logs))}")
    callback = trainer.checkpoint_callback
    if callback is not None and getattr(callback, "dirpath", None):
        saved = [p for p in (getattr(callback, "last_model_path", ""),
                             getattr(callback, "best_model_path", "")) if p]
        lines.append(f"  checkpoints: {callback.dirpath}"
                     + (f" (last: {Path(saved[0]).name})" if saved else ""))
    samples = [c for c in trainer.callbacks if type(c).__name__ == "SampleGrid"]
    for c in samples:
        if c.last_path is not None:
            lines.append(f"  samples:     {c.folder(trainer)}")
    for c in trainer.callbacks:
        if type(c).__name__ == "PredictionWriter" and c.last_path is not None:
            lines.append(f"  predictions: {c.last_path}")
    if memory_files:
        lines.append(f"  memory:      {', '.join(str(p) for p in memory_files)}")
    return "\n".join(lines)


def cli(args: list[str] | None = None, run: bool = True):
    """Build (and with ``run=True`` run) the CLI on ``args`` (default: ``sys.argv[1:]``).

    Errors are raised as they are (no short messages: that is :func:`main`'s job).
    """
    from pytorch_lightning import LightningDataModule, LightningModule

    with _quiet_lightning():
        return _cli_class()(
            LightningModule,
            LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            trainer_defaults={"logger": _default_loggers()},
            save_config_kwargs={"overwrite": True},
            auto_configure_optimizers=False,  # the modules take optimizer / lr_scheduler themselves
            parser_kwargs={"exit_on_error": False,
                           **{s: {"exit_on_error": False} for s in TRAINING_SUBCOMMANDS}},
            args=args,
            run=run,
        )


# --- noise that cannot be fixed at its cause -------------------------------------------------

class _DropTips:
    """A logging filter for Lightning's upsell tips (``"💡 Tip: ..."``), nothing else."""

    def filter(self, record) -> bool:
        return not str(record.msg).startswith("💡 Tip")


@contextmanager
def _quiet_lightning() -> Iterator[None]:
    """For the duration of a ``revtrain`` run only, drop what cannot be fixed in revtrain:
    Lightning's advertising and a deprecation warning Lightning triggers inside torch."""
    import logging
    import warnings

    tips = _DropTips()
    loggers = [logging.getLogger(n) for n in ("pytorch_lightning.utilities.rank_zero",
                                              "lightning_fabric.utilities.rank_zero")]
    for lg in loggers:
        lg.addFilter(tips)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)",
                                    module=r"pytorch_lightning\.utilities\._pytree")
            yield
    finally:
        for lg in loggers:
            lg.removeFilter(tips)


# --- short errors ----------------------------------------------------------------------------

def _literal_choices(message: str) -> list[str]:
    found = re.search(r"Literal\[([^\]]*)\]", message)
    return re.findall(r"'([^']*)'", found.group(1)) if found else []


_HEADERS = ("Parser key", "Does not validate", "Subtypes:", "Errors:", "Given value")


def _innermost(message: str) -> str:
    """The most specific error in a (nested) jsonargparse message: the first bullet of its
    ``Errors:`` list that is not the ``None`` alternative, followed inwards."""
    lines = message.splitlines()
    for i, line in enumerate(lines):
        text = line.strip()
        if text.startswith("- ") and "Expected a <class 'NoneType'>" not in text:
            text = text[2:]
            if text.endswith(":") and i + 1 < len(lines):  # "Problem with given class_path ..."
                return _innermost("\n".join(lines[i + 1:]))
            return text
    rest = [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith(_HEADERS)]
    return rest[0] if rest else (lines[0].strip() if lines else "")


def short_error(err: BaseException) -> str:
    """One or two lines saying what was wrong and what to do, for the errors users meet."""
    message = str(err).strip()
    keys = [k for k in re.findall(r'(?:Parser key|Key) "([^"]+)"', message) if k != "init_args"]
    unrecognized = re.search(r"[Uu]nrecognized arguments: (.+)", message)
    if unrecognized:
        return f"unknown option(s) {unrecognized.group(1).strip()}; `revtrain <subcommand> --help` " \
               "lists the options"
    missing = re.search(r"given class_path '([\w.]+)':\s*\n\s*(?:module '[\w.]+' has no attribute|"
                        r"No module named)", message)
    if missing:
        return f"no class {missing.group(1)!r}{_did_you_mean_class(missing.group(1))}"
    if message.startswith("Error(s) in loading state_dict"):
        n_size = message.count("size mismatch")
        part = message.split("Missing key(s)")[-1].split("Unexpected")[0] \
            if "Missing key(s)" in message else ""
        n_missing = len(re.findall(r'"[^"]+"', part))
        return (f"the checkpoint does not fit this model ({n_size} size mismatches, "
                f"{n_missing} missing keys): it was written by another "
                "model or configuration. Use that run's config.yaml, or start fresh without "
                "--ckpt_path / --resume")
    inner = _innermost(message)
    choices = _literal_choices(inner)
    given = re.findall(r"Given value: (.+)", message)
    if choices and given:
        value = given[-1].strip()
        nested = re.search(r"val='([^']*)'", value)
        value = nested.group(1) if nested else value
        close = difflib.get_close_matches(value, choices, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return f"--{'.'.join(keys) or 'value'}: {value!r} is not one of {', '.join(choices)}{hint}"
    if keys and inner.startswith("Expected"):
        got = f", got {given[-1].strip()}" if given else ""
        inner = f"--{'.'.join(keys)}: {inner.replace('<class ', '').replace('>', '')}{got}"
    return inner if len(inner) < 600 else inner[:600] + " ..."


def _did_you_mean_class(path: str) -> str:
    module, _, name = path.rpartition(".")
    if not module.startswith("revtrain"):
        return ""
    import importlib

    try:
        known = getattr(importlib.import_module(module), "__all__", [])
    except ImportError:
        known = []
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    return f"; did you mean {module}.{close[0]}?" if close else ""


# --- the other subcommands -------------------------------------------------------------------

def models_command(argv: list[str]) -> None:
    """``revtrain models [PATTERN] [--family F] [--markdown]``: the registered models."""
    import argparse

    parser = argparse.ArgumentParser(prog="revtrain models",
                                     description="List the registered models (revtrain.models).")
    parser.add_argument("pattern", nargs="?", default="*", help="shell-style name pattern")
    parser.add_argument("--family", default=None, help="revnet, irevnet, flows, ...")
    parser.add_argument("--markdown", action="store_true", help="a Markdown table (docs)")
    parser.add_argument("--count", action="store_true",
                        help="also build each model with its defaults (on the meta device where "
                             "it can: no memory, no initialisation) and count its parameters")
    args = parser.parse_args(argv)
    from .models import list_models, model_info

    infos = [model_info(n) for n in list_models(args.pattern, family=args.family)]
    print(models_table(infos, markdown=args.markdown, count=args.count))


def _count(name: str) -> str:
    import torch

    from .models import create

    try:
        with torch.device("meta"):
            model = create(name)
    except RuntimeError:  # a constructor that reads values (e.g. an LU decomposition)
        model = create(name)
    return f"{sum(p.numel() for p in model.parameters()):,}"


def models_table(infos: list, markdown: bool = False, count: bool = False) -> str:
    """The registry as a table: name, family, task, input size, paper parameters (and with
    ``count`` our count), memory modes, description."""
    head = ["name", "family", "task", "input", "params (paper)", *(["params (ours)"] * count),
            "memory modes", "description"]
    rows = []
    for i in infos:
        size = "x".join(map(str, i.input_size)) if i.input_size else "any"
        params = f"{i.paper_params / 1e6:.2f}M" if i.paper_params else "-"
        ours = [_count(i.name)] if count else []
        modes = "reversible, checkpoint, stored" if i.reversible else "stored only"
        rows.append([i.name, i.family, i.task, size, params, *ours, modes, i.description])
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths[:-1]) + "  {}"
    return "\n".join(fmt.format(*r) for r in [head, *rows])


def _benchmarks_module():
    """``benchmarks.run`` from the source checkout this revtrain comes from."""
    import importlib

    try:
        return importlib.import_module("benchmarks.run")
    except ImportError:
        pass
    root = Path(__file__).resolve().parents[1]
    if not (root / "benchmarks" / "run.py").is_file():
        raise FileNotFoundError(
            "revtrain benchmark runs benchmarks/run.py of a source checkout, and this install has "
            f"none next to {root}; clone the repository and pip install -e it")
    sys.path.insert(0, str(root))
    return importlib.import_module("benchmarks.run")


def benchmark_command(argv: list[str]) -> None:
    """``revtrain benchmark``: the benchmarks' quick profile, written into a fresh run folder."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="revtrain benchmark",
        description="Memory and step time of revtrain against stored, checkpoint and memcnn "
                    "(benchmarks/run.py), written into runs/benchmark/version_<N>/ unless --out "
                    "is given. Other options go to benchmarks/run.py (--device, --sections, "
                    "--threads).")
    parser.add_argument("--profile", choices=["quick", "smoke", "full"], default="quick",
                        help="quick: < 5 min on 2 CPU cores (default); smoke: seconds; full: hours")
    parser.add_argument("--root", default="runs", help="the folder of all runs")
    parser.add_argument("--out", default=None, help="write here instead of a new run folder")
    args, rest = parser.parse_known_args(argv)
    bench = _benchmarks_module()
    if args.out is None:
        taken = _versions(Path(args.root) / "benchmark")
        out = Path(args.root) / "benchmark" / f"version_{taken[-1][0] + 1 if taken else 0}"
    else:
        out = Path(args.out)
    profile = [] if args.profile == "full" else [f"--{args.profile}"]
    written = bench.main([*profile, "--out", str(out), *rest])
    print(f"\nBenchmark folder: {out} ({len(written)} files)")


def memory_command(argv: list[str]) -> None:
    """``revtrain memory --config CONFIG [--batch-size N --budget 16GiB ...]``: the planner."""
    from .memory import plan_main

    code = plan_main(argv)
    if code:
        raise SystemExit(code)


TOOLS: dict[str, tuple[Callable[[list[str]], None], str]] = {
    "models": (models_command, "list the registered models (name, family, input size, paper "
                               "parameters)"),
    "benchmark": (benchmark_command, "memory and step time against the stored twin, "
                                     "checkpoint and memcnn (the quick profile) into a run folder"),
    "memory": (memory_command, "plan memory before training: bytes held and peak per module and "
                               "memory mode, the largest batch that fits a budget"),
}


def _help() -> str:
    entries = {**TRAINING_SUBCOMMANDS, **{k: v[1] for k, v in TOOLS.items()}}
    width = max(map(len, entries)) + 2
    return HELP.format(subcommands="\n".join(f"  {k:<{width}}{v}" for k, v in entries.items()))


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("revtrain")
    except PackageNotFoundError:  # pragma: no cover - a source tree without install
        return "unknown"


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``revtrain`` console script."""
    from_argv = args is None
    argv = list(sys.argv[1:] if from_argv else args)
    traceback = "--traceback" in argv or os.environ.get("REVTRAIN_TRACEBACK", "") not in ("", "0")
    argv = [a for a in argv if a != "--traceback"]
    if not argv or argv[0] in ("-h", "--help"):
        print(_help(), file=sys.stdout if argv else sys.stderr, end="")
        if not argv:
            raise SystemExit(2)
        return
    if argv[0] == "--version":
        print(f"revtrain {_version()}")
        return
    subcommand = argv[0]
    if subcommand not in TOOLS and subcommand not in TRAINING_SUBCOMMANDS and \
            not subcommand.startswith("-"):
        known = [*TRAINING_SUBCOMMANDS, *TOOLS]
        close = difflib.get_close_matches(subcommand, known, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        print(f"revtrain: unknown subcommand {subcommand!r}{hint} (revtrain --help lists them)",
              file=sys.stderr)
        raise SystemExit(2)
    try:
        if subcommand in TOOLS:
            TOOLS[subcommand][0](argv[1:])
        else:
            if from_argv:
                sys.argv[1:] = argv  # without --traceback; LightningCLI reads sys.argv
            cli(None if from_argv else argv)
    except SystemExit:
        raise
    except KeyboardInterrupt:
        print(f"revtrain {subcommand}: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except Exception as err:
        if traceback:
            raise
        print(f"revtrain {subcommand}: error: {short_error(err)}\n"
              f"  ({type(err).__name__}; add --traceback for the full traceback)", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
