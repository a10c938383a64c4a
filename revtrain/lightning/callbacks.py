"""Callbacks: step peak memory, reconstruction error, sample grids, RNG state in checkpoints,
a checkpoint on failure, predictions written to a file."""

from __future__ import annotations

import math
import random
import resource
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import BasePredictionWriter
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from ..base import has_inverse
from ._common import eval_mode, reversible_stacks, unsharded

__all__ = ["ExceptionCheckpoint", "PeakMemoryMonitor", "PredictionWriter",
           "ReconstructionMonitor", "RNGStateCallback", "SampleGrid"]


class PeakMemoryMonitor(pl.Callback):
    """Log the peak memory of single training steps, every ``every_n_steps`` steps.

    What Lightning's :class:`~pytorch_lightning.callbacks.DeviceStatsMonitor` does not log
    (use it next to this one for the allocator's full statistics):

    * CUDA: the peak of the step itself, ``torch.cuda.max_memory_allocated`` over the step
      minus what was allocated when it began (``mem/step_peak_mib``): the activation memory
      that a memory mode changes. The peak counter is reset before each logged step.
    * CPU: the process's peak resident set (``mem/peak_rss_mib``, from ``getrusage``: one
      system call, so it costs nothing). It only grows; it is a coarse whole-process figure.
      For a tensor-level count use :func:`revtrain.memory.measure_step`.

    Args:
        every_n_steps: log on steps whose index is a multiple of this.
    """

    def __init__(self, every_n_steps: int = 1):
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be at least 1, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self._base: int | None = None

    def _due(self, trainer: pl.Trainer) -> bool:
        return trainer.global_step % self.every_n_steps == 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._base = None
        if self._due(trainer) and pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)
            self._base = torch.cuda.memory_allocated(pl_module.device)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # global_step has advanced by one when the optimizer stepped
        if self._base is not None:
            peak = torch.cuda.max_memory_allocated(pl_module.device)
            pl_module.log("mem/step_peak_mib", (peak - self._base) / 2**20, on_step=True,
                          on_epoch=False)
        elif (trainer.global_step - 1) % self.every_n_steps == 0 and pl_module.device.type == "cpu":
            pl_module.log("mem/peak_rss_mib", peak_rss_bytes() / 2**20, on_step=True,
                          on_epoch=False)


def peak_rss_bytes() -> int:
    """Peak resident set size of this process in bytes (``ru_maxrss``)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB


class ReconstructionMonitor(pl.Callback):
    r"""Every ``every_n_steps`` training steps, log how exactly the model inverts.

    On (at most ``max_samples`` of) the current batch, in eval mode and without grad:

    * for every outermost :class:`~revtrain.ReversibleSequential` ``S`` that the forward pass
      calls (classifiers), with its input ``x`` captured by a forward hook:
      :math:`e = \max |S^{-1}(S(x)) - x|`, logged as ``recon/stack{i}``;
    * when no stack is called that way (flows call ``forward_and_log_det``) and the module's
      network is invertible: the whole network, :math:`\max |f^{-1}(f(x)) - x|`, logged as
      ``recon/net``.

    ``recon/max_abs_error`` is the largest. It is the reconstruction the engine relies on in
    backward; growth over training shows the drift. A model with nothing invertible (e.g. a
    ResNet) is reported once and not checked.

    Args:
        every_n_steps: check on steps whose index is a multiple of this.
        max_samples: use at most this many samples of the batch.
        raise_above: raise :class:`~revtrain.ReconstructionError` when the error exceeds it
            (``None``: only log).
    """

    def __init__(self, every_n_steps: int = 100, max_samples: int = 16,
                 raise_above: float | None = None):
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be at least 1, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self.max_samples = max_samples
        self.raise_above = raise_above
        self.last: dict[str, float] = {}
        self._nothing_to_check = False

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        net = getattr(pl_module, "net", pl_module)
        self._nothing_to_check = not reversible_stacks(net) and not has_inverse(net)
        if self._nothing_to_check:
            rank_zero_info(f"ReconstructionMonitor: {type(net).__name__} has no reversible "
                           "stack and no inverse; nothing to check")

    @torch.no_grad()
    def measure(self, pl_module: pl.LightningModule, x: Tensor) -> dict[str, float]:
        """Max abs reconstruction error per stack (``"stack{i}"``) or of the whole network
        (``"net"``) on ``x``."""
        net = getattr(pl_module, "net", pl_module)
        x = x[: self.max_samples]
        stacks = reversible_stacks(net)
        inputs: dict[int, tuple[Tensor, Tensor]] = {}

        def capture(i: int):
            def hook(module, args, out) -> None:  # returns None: the output is unchanged
                inputs.setdefault(i, (args[0], out))
            return hook

        hooks = [stack.register_forward_hook(capture(i)) for i, stack in enumerate(stacks)]
        errors: dict[str, float] = {}
        try:
            with eval_mode(pl_module):
                pl_module(x)
                for i, stack in enumerate(stacks):
                    if i in inputs:  # a stack not used for this input is skipped
                        x_in, y = inputs[i]
                        with unsharded(stack):  # FSDP2 (ModelParallelStrategy)
                            errors[f"stack{i}"] = (stack.inverse(y) - x_in).abs().max().item()
                if not errors and has_inverse(net):
                    errors["net"] = (net.inverse(net(x)).reshape(x.shape) - x).abs().max().item()
        finally:
            for h in hooks:
                h.remove()
        return errors

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._nothing_to_check or (trainer.global_step - 1) % self.every_n_steps != 0:
            return
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        errors = self.measure(pl_module, x)
        if not errors:
            return
        self.last = {f"recon/{k}": e for k, e in errors.items()}
        self.last["recon/max_abs_error"] = max(errors.values())
        pl_module.log_dict(self.last, on_step=True, on_epoch=False)
        worst = max(errors, key=errors.get)
        if self.raise_above is not None and errors[worst] > self.raise_above:
            from ..base import ReconstructionError

            raise ReconstructionError(
                f"ReconstructionMonitor: {worst.replace('stack', 'stack ')} rebuilds its input "
                f"with max error {errors[worst]:.3g} > raise_above={self.raise_above} at step "
                f"{trainer.global_step}; lower the learning rate or use float64 / "
                "memory='checkpoint' for this stack"
            )


class SampleGrid(pl.Callback):
    """Write a grid of samples of a flow after validation, every ``every_n_epochs`` epochs.

    Calls ``pl_module.sample(num_samples, temperature)`` (:meth:`FlowModule.sample`), reshapes
    the samples of a vector flow to the DataModule's ``input_shape`` and writes
    ``epoch{E:04d}_t{T}.png`` with torchvision's ``make_grid`` / ``save_image`` to ``dirpath``
    (default: ``samples/`` in the run folder, the trainer's ``log_dir``). Rank zero only.

    Args:
        every_n_epochs: grid frequency in epochs.
        num_samples: images per grid.
        temperature: temperature of the latent (1: the model's density).
        dirpath: folder of the grids.
    """

    def __init__(self, every_n_epochs: int = 1, num_samples: int = 64, temperature: float = 0.7,
                 dirpath: str | None = None):
        if every_n_epochs < 1 or num_samples < 1:
            raise ValueError(f"SampleGrid: every_n_epochs and num_samples must be at least 1, "
                             f"got {every_n_epochs} and {num_samples}")
        self.every_n_epochs = every_n_epochs
        self.num_samples = num_samples
        self.temperature = temperature
        self.dirpath = dirpath
        self.last_path: Path | None = None

    def folder(self, trainer: pl.Trainer) -> Path:
        """Where the grids go."""
        return Path(self.dirpath or Path(trainer.log_dir or trainer.default_root_dir) / "samples")

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        if (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        path = self.folder(trainer) / f"epoch{trainer.current_epoch:04d}_t{self.temperature:g}.png"
        self.last_path = self.write(pl_module, path, getattr(trainer, "datamodule", None))

    def write(self, pl_module: pl.LightningModule, path: str | Path,
              datamodule: Any = None) -> Path | None:
        """Sample and write one grid to ``path``; ``None`` when the samples are not images."""
        from torchvision.utils import make_grid, save_image

        x = pl_module.sample(self.num_samples, self.temperature)
        shape = getattr(datamodule, "input_shape", None)
        if x.dim() == 2 and shape is not None and math.prod(shape) == x.shape[1]:
            x = x.reshape(len(x), *shape)  # a vector flow on images
        if x.dim() != 4:
            return None
        grid = make_grid(x.float().cpu(), nrow=max(1, int(math.sqrt(len(x)))), padding=1)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_image(grid, path)
        return path


class RNGStateCallback(pl.Callback):
    """Save the RNG states in every checkpoint and restore them on resume.

    Lightning saves model, optimizer, schedulers and loops but no random state, so a resumed
    run draws different dropout masks and a different data order. This callback stores the
    states of Python's ``random``, NumPy's global generator, torch's CPU generator and every
    CUDA device's generator at the moment the checkpoint is written, and sets them back when
    training resumes from it: a resumed run then continues exactly as the uninterrupted one.
    (DataLoader workers derive their seeds from the torch CPU generator, so they follow.)

    Several processes (a torch.distributed process group: DDP, FSDP): every rank's states are
    gathered into the checkpoint (``"ranks"``, one entry per rank; the top level holds rank
    0's, as a single-process checkpoint does) and each rank gets its own back on resume, so
    ranks seeded differently (``torch.manual_seed(seed + rank)``) resume exactly too. A
    checkpoint written while the run was failing (:class:`ExceptionCheckpoint`, SIGTERM)
    holds the writing rank's states only, because a failing rank cannot wait for the others;
    resuming it, or a checkpoint of another number of processes, restores those states on
    every rank and warns that the resume is not exact.
    """

    def __init__(self) -> None:
        self._trainer: pl.Trainer | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._trainer = trainer

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._trainer = None

    @staticmethod
    def _local_state() -> dict[str, Any]:
        # plain types and tensors only, so that torch.load(weights_only=True) reads it
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state = {
            "python": random.getstate(),
            "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
            "torch": torch.get_rng_state(),
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    @staticmethod
    def _world() -> tuple[int, int]:
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def state_dict(self) -> dict[str, Any]:
        state = self._local_state()
        _, world = self._world()
        trainer = self._trainer
        # every rank writes a checkpoint together, except while failing (INTERRUPTED: on_exception
        # may run on one rank only, and a collective there would wait for ever)
        if world > 1 and trainer is not None and \
                trainer.state.status == pl.trainer.states.TrainerStatus.RUNNING:
            ranks: list[Any] = [None] * world
            torch.distributed.all_gather_object(ranks, state)
            state = {**ranks[0], "ranks": ranks}
        return state

    @staticmethod
    def _restore(state: dict[str, Any]) -> None:
        random.setstate(state["python"])
        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            states = state["cuda"]
            if len(states) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(states)
            else:
                torch.cuda.set_rng_state(states[0])

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        rank, world = self._world()
        ranks = state_dict.get("ranks")
        if ranks is not None and len(ranks) == world:
            self._restore(ranks[rank])
            return
        if world > 1 or (ranks is not None and len(ranks) > 1):
            saved = len(ranks) if ranks is not None else "one"
            rank_zero_warn(
                f"RNGStateCallback: the checkpoint holds the random states of {saved} "
                f"process(es) and this run has {world}; every rank restores the first one, so "
                "the resume is not bit-exact unless the ranks' random streams were the same "
                "(resume with as many processes as wrote it, from a checkpoint written during "
                "training, not on failure)")
        self._restore(state_dict)


class ExceptionCheckpoint(pl.Callback):
    """Write a checkpoint when training fails (an exception, Ctrl-C, SIGTERM), once it has taken
    a step.

    The checkpoint is ``dirpath/filename.ckpt`` (default: the run's ``checkpoints/`` folder,
    where :class:`~pytorch_lightning.callbacks.ModelCheckpoint` writes). Nothing resumes from
    it unless asked: ``revtrain fit ... --resume last`` (or ``--ckpt_path`` with its path)
    continues the run. A failure before the first step (a bad configuration, a missing data
    directory) writes nothing.

    Unlike Lightning's ``OnExceptionCheckpoint``, whose mere presence makes every later ``fit``
    without ``ckpt_path`` load the newest checkpoint, this callback never changes what a run
    starts from.

    Args:
        dirpath: folder of the checkpoint (default: the run's checkpoint folder).
        filename: its name without ``.ckpt``.
    """

    def __init__(self, dirpath: str | None = None, filename: str = "on_exception"):
        self.dirpath = dirpath
        self.filename = filename

    def ckpt_path(self, trainer: pl.Trainer) -> Path:
        """Where the checkpoint is written."""
        folder = self.dirpath
        if folder is None:
            callback = trainer.checkpoint_callback
            folder = getattr(callback, "dirpath", None) or \
                Path(trainer.log_dir or trainer.default_root_dir) / "checkpoints"
        return Path(folder) / f"{self.filename}.ckpt"

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                     exception: BaseException) -> None:
        if trainer.global_step > 0:
            trainer.save_checkpoint(self.ckpt_path(trainer))


def _merge(outputs: list[Any]) -> Any:
    """Batch outputs joined along the batch: tensors concatenated, dicts key by key (lists of
    anything else kept as they are)."""
    if outputs and all(isinstance(o, Tensor) for o in outputs):
        return torch.cat([o.detach().cpu() for o in outputs])
    if outputs and all(isinstance(o, dict) for o in outputs) and \
            all(o.keys() == outputs[0].keys() for o in outputs):
        return {k: _merge([o[k] for o in outputs]) for k in outputs[0]}
    return outputs


class PredictionWriter(BasePredictionWriter):
    """Write what ``predict`` returns to ``dirpath/filename.pt`` at the end of prediction.

    The file holds ``{"predictions": ..., "indices": ...}``: the batch outputs joined along the
    batch (a classifier's ``{"probs": (N, classes), "pred": (N,)}``, a flow's bits/dim
    ``(N,)``; one entry per data loader when there are several) and the indices of the samples
    in the data set, in the same order (``None`` when the sampler does not tell them). With
    several processes each rank writes its own share, ``filename_rank<R>.pt``. Default folder:
    the run's (``trainer.log_dir``); ``revtrain predict`` writes there. An existing file is never
    overwritten: prediction stops before it starts and says so.

    Args:
        dirpath: folder of the file (default: the run folder).
        filename: its name without ``.pt``.
    """

    def __init__(self, dirpath: str | None = None, filename: str = "predictions"):
        super().__init__("epoch")
        self.dirpath = dirpath
        self.filename = filename
        self.last_path: Path | None = None

    def path(self, trainer: pl.Trainer) -> Path:
        folder = Path(self.dirpath or trainer.log_dir or trainer.default_root_dir)
        suffix = f"_rank{trainer.global_rank}" if trainer.world_size > 1 else ""
        return folder / f"{self.filename}{suffix}.pt"

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "predict" and self.path(trainer).exists():
            raise FileExistsError(
                f"PredictionWriter: {self.path(trainer)} exists and is not overwritten; give "
                "another folder or file name (--predictions.dirpath / --predictions.filename) "
                "or move the file away")

    def write_on_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           predictions: Any, batch_indices: Any) -> None:
        # Lightning: predictions per loader only with several loaders, indices always per
        # loader (loaders x batches x samples)
        several = len(trainer.num_predict_batches) > 1
        if not predictions or (several and not any(predictions)):
            rank_zero_warn("PredictionWriter: no batch was predicted, so nothing is written")
            return
        per_loader = predictions if several else [predictions]
        indices_per_loader = list(batch_indices or [])
        indices_per_loader += [[]] * (len(per_loader) - len(indices_per_loader))
        merged, indices = [], []
        for outputs, idx in zip(per_loader, indices_per_loader):
            merged.append(_merge(list(outputs)))
            flat = [i for batch in (idx or []) for i in (batch or [])]
            indices.append(torch.tensor(flat, dtype=torch.long)
                           if flat or not outputs else None)
        path = self.path(trainer)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"predictions": merged if several else merged[0],
                    "indices": indices if several else indices[0]}, path)
        self.last_path = path
