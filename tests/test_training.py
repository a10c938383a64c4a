"""Lightning modules and callbacks: training, early errors, monitors, resume parity (TESTPLAN
39), exception checkpoint (40) and DDP gradients (37/38)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import warnings
from functools import partial

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

from revtrain import ReconstructionError
from revtrain.lightning import (
    Classifier,
    DigitsDataModule,
    ExceptionCheckpoint,
    FlowModule,
    ImageNetDataModule,
    PeakMemoryMonitor,
    PredictionWriter,
    ReconstructionMonitor,
    RNGStateCallback,
    SampleGrid,
)
from revtrain.lightning._common import reversible_stacks

SGD = partial(torch.optim.SGD, lr=0.05, momentum=0.9)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (tests/conftest.py)


def _trainer(tmp_path, **kw) -> pl.Trainer:
    args = dict(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                enable_model_summary=False, enable_checkpointing=False,
                default_root_dir=str(tmp_path), limit_val_batches=0, num_sanity_val_steps=0)
    args.update(kw)
    return pl.Trainer(**args)


def _classifier(**kw) -> Classifier:
    kw = {"model_name": "revnet_digits", "num_classes": 10, "in_channels": 1,
          "optimizer": SGD, **kw}
    return Classifier(**kw)


# --- classifier ------------------------------------------------------------------------------


def test_classifier_trains_and_logs_top1_top5(tmp_path):
    torch.manual_seed(0)
    module = _classifier()
    dm = DigitsDataModule(batch_size=64)
    trainer = _trainer(tmp_path, max_epochs=3, limit_train_batches=8, limit_val_batches=2,
                       limit_test_batches=2)
    trainer.fit(module, dm)
    assert trainer.callback_metrics["train/loss_epoch"] < 1.5  # log(10) = 2.3 at the start
    result = trainer.test(module, dm, verbose=False)[0]
    assert set(result) >= {"test/top1", "test/top5", "test/loss"}
    assert result["test/top5"] >= result["test/top1"]
    assert result["test/top1"] > 0.5  # chance is 0.1
    preds = trainer.predict(module, dm.predict_dataloader())
    assert preds[0]["probs"].shape[-1] == 10
    assert torch.allclose(preds[0]["probs"].sum(-1), torch.ones(len(preds[0]["pred"])))


def test_memory_mode_reaches_every_stack():
    module = _classifier(memory="stored")
    stacks = reversible_stacks(module.net)
    assert stacks and all(s.memory.value == "stored" for s in stacks)
    assert module.hparams.memory == "stored"


def test_memory_on_a_model_with_nothing_reversible_is_refused_and_saved_as_what_runs():
    """The bug of issue 14: Classifier("resnet32", memory="reversible") trained stored while its
    hyper-parameters said reversible. Now one rule: refused, and the default is what runs."""
    with pytest.raises(ValueError, match="ResNet has no reversible stack.*memory='stored'"):
        Classifier("resnet32", memory="reversible")
    with pytest.raises(ValueError, match="ResNet has no reversible stack"):
        Classifier("resnet32", memory="checkpoint")
    assert Classifier("resnet32").hparams.memory == "stored"
    assert Classifier("resnet32", memory="stored").net.memory.value == "stored"
    module = Classifier("revnet_digits", in_channels=1)
    assert module.hparams.memory == "reversible" == module.net.memory.value
    assert Classifier("revnet_digits", in_channels=1, memory="checkpoint").net.memory.value \
        == "checkpoint"


def test_classifier_rejects_data_it_cannot_take(tmp_path):
    dm = DigitsDataModule()
    with pytest.raises(ValueError, match="num_classes"):
        _classifier(num_classes=7).check_data(dm)
    with pytest.raises(ValueError, match="in_channels 1"):
        _classifier(in_channels=3).check_data(dm)
    # an i-RevNet with a stride-2 stage cannot take odd image sizes: caught before training
    from PIL import Image

    for split in ("train", "val"):
        for c in ("a", "b"):
            (tmp_path / split / c).mkdir(parents=True)
            Image.new("RGB", (9, 9)).save(tmp_path / split / c / "0.JPEG")
    odd = ImageNetDataModule(root=str(tmp_path), image_size=7, num_classes=2, batch_size=2,
                             num_workers=0)
    module = Classifier("irevnet_digits", num_classes=2, in_channels=3, optimizer=SGD)
    trainer = _trainer(tmp_path, max_steps=1)
    with pytest.raises(ValueError, match=r"cannot take the \(3, 7, 7\) images"):
        trainer.fit(module, odd)
    assert trainer.global_step == 0


def test_unknown_model_name_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown model 'revnet_nope'; did you mean"):
        Classifier("revnet_nope")
    with pytest.raises(TypeError, match="did you mean 'dropout'"):
        Classifier("revnet_digits", model_kwargs={"droput": 0.1})


def test_test_split_counts_the_images_it_scored(tmp_path):
    module = _classifier()
    dm = DigitsDataModule(eval_batch_size=100)
    trainer = _trainer(tmp_path, limit_test_batches=2)
    assert trainer.test(module, dm, verbose=False)[0]["test/images"] == 200
    trainer = _trainer(tmp_path)
    assert trainer.test(module, dm, verbose=False)[0]["test/images"] == 360  # all of it


# --- callbacks -------------------------------------------------------------------------------


def test_monitors_log_memory_and_small_reconstruction_error(tmp_path):
    torch.manual_seed(0)
    module = _classifier()
    recon = ReconstructionMonitor(every_n_steps=2)
    trainer = _trainer(tmp_path, max_steps=3, callbacks=[PeakMemoryMonitor(1), recon])
    trainer.fit(module, DigitsDataModule(batch_size=32))
    metrics = trainer.callback_metrics
    assert metrics["mem/peak_rss_mib"] > 10  # a Python process with torch is larger than 10 MiB
    assert "mem/peak_allocated_mib" not in metrics  # Lightning's DeviceStatsMonitor has that
    assert 0 <= metrics["recon/max_abs_error"] < 1e-3
    assert len(reversible_stacks(module)) == sum(k.startswith("recon/stack") for k in recon.last)


def _flow(**kw) -> FlowModule:
    kw = {"model_kwargs": {"in_channels": 1, "image_size": 8, "levels": 2, "hidden": 8},
          "optimizer": partial(torch.optim.Adam, lr=1e-3), "sample_every_n_epochs": 0, **kw}
    return FlowModule("realnvp", **kw)


def test_reconstruction_monitor_works_on_flows(tmp_path, monkeypatch):
    """Flows call forward_and_log_det, so no stack hook fires: the monitor checks the whole
    flow instead, and a broken inverse is caught."""
    torch.manual_seed(0)
    module = _flow()
    monitor = ReconstructionMonitor(every_n_steps=1, raise_above=1e-3)
    trainer = _trainer(tmp_path, max_steps=2, callbacks=[monitor])
    trainer.fit(module, DigitsDataModule(batch_size=16, normalize=False))
    assert set(monitor.last) == {"recon/net", "recon/max_abs_error"}
    assert 0 <= trainer.callback_metrics["recon/max_abs_error"] < 1e-3
    level = module.net.levels[0]
    honest = level.inverse
    monkeypatch.setattr(level, "inverse", lambda y: honest(y) + 0.5)  # deliberately wrong
    with pytest.raises(ReconstructionError, match="net rebuilds its input"):
        _trainer(tmp_path, max_steps=1, callbacks=[monitor]).fit(
            module, DigitsDataModule(batch_size=16, normalize=False))


def test_reconstruction_monitor_on_a_model_with_nothing_invertible(tmp_path):
    module = Classifier("resnet32", in_channels=1, optimizer=SGD, model_kwargs={"units": [1, 1, 1]})
    monitor = ReconstructionMonitor(every_n_steps=1)
    _trainer(tmp_path, max_steps=1, callbacks=[monitor]).fit(module, DigitsDataModule())
    assert monitor.last == {}


def test_reconstruction_monitor_catches_a_broken_inverse(tmp_path, monkeypatch):
    torch.manual_seed(0)
    module = _classifier()
    stack = reversible_stacks(module)[0]
    x = torch.randn(8, 1, 8, 8)
    monitor = ReconstructionMonitor(every_n_steps=1, raise_above=1e-3)
    assert max(monitor.measure(module, x).values()) < 1e-3
    layer = stack[0]
    honest = layer.inverse
    monkeypatch.setattr(layer, "inverse", lambda y: honest(y) + 0.5)  # deliberately wrong
    assert max(monitor.measure(module, x).values()) >= 0.5
    trainer = _trainer(tmp_path, max_steps=2, callbacks=[monitor])
    with pytest.raises(ReconstructionError, match="stack 0"):
        trainer.fit(module, DigitsDataModule(batch_size=16))


def _state(module: pl.LightningModule, trainer: pl.Trainer) -> dict[str, torch.Tensor]:
    state = {f"model.{k}": v.clone() for k, v in module.state_dict().items()}
    opt = trainer.optimizers[0].state_dict()["state"]
    for i, s in opt.items():
        state[f"opt.{i}"] = s["momentum_buffer"].clone()
    return state


def _fit_resume(tmp_path, name, rng_callback: bool, ckpt_path=None):
    torch.manual_seed(0 if ckpt_path is None else 123)  # the resumed run starts elsewhere
    module = _classifier(model_kwargs={"dropout": 0.3})
    callbacks = [ModelCheckpoint(dirpath=str(tmp_path / name), filename="{epoch}",
                                 every_n_epochs=1, save_top_k=-1)]
    if rng_callback:
        callbacks.append(RNGStateCallback())
    trainer = _trainer(tmp_path, max_epochs=3, limit_train_batches=2, callbacks=callbacks,
                       enable_checkpointing=True)
    trainer.fit(module, DigitsDataModule(batch_size=32, augment=True), ckpt_path=ckpt_path)
    return _state(module, trainer), trainer


def test_resume_parity_with_dropout_needs_the_rng_callback(tmp_path):
    """TESTPLAN 39: checkpoint every epoch of 2 steps; resuming after the first epoch ends in
    the same weights, BatchNorm buffers and optimizer state, bit for bit, with the RNG
    callback (dropout masks, shuffling and augmentation draw the same numbers); without it
    the resumed run differs."""
    full, _ = _fit_resume(tmp_path, "a", rng_callback=True)
    ckpt = tmp_path / "a" / "epoch=0.ckpt"
    assert ckpt.exists()
    resumed, trainer = _fit_resume(tmp_path, "b", rng_callback=True, ckpt_path=str(ckpt))
    assert trainer.global_step == 6
    assert full.keys() == resumed.keys()
    assert all(torch.equal(full[k], resumed[k]) for k in full), \
        [k for k in full if not torch.equal(full[k], resumed[k])][:5]
    # the same resume without the callback: different random numbers, different end state
    unseeded, _ = _fit_resume(tmp_path, "c", rng_callback=False, ckpt_path=str(ckpt))
    assert not all(torch.equal(full[k], unseeded[k]) for k in full)


def test_rng_callback_of_several_ranks_in_one_process_restores_rank0_and_warns():
    """A checkpoint of 2 ranks resumed by one process: rank 0's states come back (the
    distributed case is tests/test_lightning_distributed.py), with a warning that the resume
    is not exact; a single-process checkpoint restores silently."""
    callback = RNGStateCallback()
    torch.manual_seed(1)
    rank0 = callback.state_dict()
    expected = torch.rand(3)
    torch.manual_seed(2)
    rank1 = callback.state_dict()
    assert "ranks" not in rank0  # one process: nothing gathered
    torch.manual_seed(3)
    with pytest.warns(UserWarning, match="not bit-exact"):
        callback.load_state_dict({**rank0, "ranks": [rank0, rank1]})
    assert torch.equal(torch.rand(3), expected)
    torch.manual_seed(3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        callback.load_state_dict(rank0)
    assert torch.equal(torch.rand(3), expected)


def test_prediction_writer_joins_batches_per_loader_and_never_overwrites(tmp_path):
    """Two predict loaders, batches of 5 over 12 and 7 samples: one dict per loader with the
    batches joined in order and the sample indices; a flow's tensor outputs join too; a second
    prediction into the same file is refused before it runs."""
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    module = _classifier().eval()
    x = torch.randn(12, 1, 8, 8)
    loaders = [DataLoader(TensorDataset(x), batch_size=5), DataLoader(TensorDataset(x[:7]),
                                                                      batch_size=5)]
    writer = PredictionWriter(dirpath=str(tmp_path / "p"))
    _trainer(tmp_path, callbacks=[writer]).predict(module, loaders)
    assert writer.last_path == tmp_path / "p" / "predictions.pt"
    saved = torch.load(writer.last_path, weights_only=True)
    with torch.no_grad():
        expected = module(x).softmax(-1)
    assert [p["probs"].shape for p in saved["predictions"]] == [(12, 10), (7, 10)]
    assert torch.allclose(saved["predictions"][0]["probs"], expected, atol=1e-6)
    assert torch.allclose(saved["predictions"][1]["probs"], expected[:7], atol=1e-6)
    assert [i.tolist() for i in saved["indices"]] == [list(range(12)), list(range(7))]
    with pytest.raises(FileExistsError, match="is not overwritten"):
        _trainer(tmp_path, callbacks=[PredictionWriter(dirpath=str(tmp_path / "p"))]).predict(
            module, loaders)
    assert torch.equal(torch.load(writer.last_path, weights_only=True)["predictions"][0]["probs"],
                       saved["predictions"][0]["probs"])

    # return_predictions=False: Lightning keeps the outputs for an epoch writer all the same
    kept = PredictionWriter(dirpath=str(tmp_path / "kept"))
    _trainer(tmp_path, callbacks=[kept]).predict(module, loaders[0], return_predictions=False)
    assert torch.equal(torch.load(kept.last_path, weights_only=True)["predictions"]["probs"],
                       saved["predictions"][0]["probs"])

    flow = FlowModule("nice", model_kwargs={"dim": 64, "num_layers": 2, "hidden": 8, "depth": 1},
                      num_bins=17)
    writer = PredictionWriter(dirpath=str(tmp_path / "f"))
    grey = DataLoader(TensorDataset(torch.randint(0, 17, (12, 1, 8, 8)) / 16), batch_size=5)
    _trainer(tmp_path, callbacks=[writer]).predict(flow, grey)
    bpd = torch.load(writer.last_path, weights_only=True)["predictions"]
    assert bpd.shape == (12,) and torch.isfinite(bpd).all()


class _Failing(Classifier):
    fail_at: int | None = 3

    def training_step(self, batch, batch_idx):
        if self.fail_at is not None and self.global_step == self.fail_at:
            raise RuntimeError("simulated failure inside training_step")
        return super().training_step(batch, batch_idx)


class _SigtermAt(pl.Callback):
    """Send this process SIGTERM after step ``step`` (as a cluster scheduler would)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


@pytest.mark.parametrize("failure", ["exception", "sigterm"])
def test_exception_leaves_a_checkpoint_and_resume_finishes(tmp_path, failure):
    """TESTPLAN 40: an exception inside training_step, or SIGTERM (Lightning turns it into
    SIGTERMException at the next loop check), leaves a checkpoint; resuming from it finishes."""
    from pytorch_lightning.utilities.exceptions import SIGTERMException

    torch.manual_seed(0)
    kw = {"model_name": "revnet_digits", "num_classes": 10, "in_channels": 1, "optimizer": SGD}
    dm = DigitsDataModule(batch_size=32)
    module = _Failing(**kw)
    callbacks = [ExceptionCheckpoint(str(tmp_path / "ckpt"))]
    if failure == "sigterm":
        module.fail_at = None
        callbacks.append(_SigtermAt(3))
    trainer = _trainer(tmp_path, max_steps=6, enable_checkpointing=True, callbacks=callbacks)
    expected = (RuntimeError, "simulated failure") if failure == "exception" else \
        (SIGTERMException, "")
    with pytest.raises(expected[0], match=expected[1]):
        trainer.fit(module, dm)
    ckpt = tmp_path / "ckpt" / "on_exception.ckpt"
    assert ckpt.exists()
    assert torch.load(ckpt, weights_only=False)["global_step"] == 3
    module = _Failing(**kw)
    module.fail_at = None
    trainer = _trainer(tmp_path, max_steps=6)
    trainer.fit(module, dm, ckpt_path=str(ckpt))
    assert trainer.global_step == 6


def test_exception_checkpoint_never_makes_a_later_run_resume(tmp_path):
    """Lightning's OnExceptionCheckpoint makes every fit without ckpt_path load the newest
    checkpoint (issue 13: silent resume). With ExceptionCheckpoint, a fresh fit starts at step
    0 although an on-exception checkpoint lies in the folder, and Lightning says nothing."""
    from pytorch_lightning.callbacks import OnExceptionCheckpoint

    assert not isinstance(ExceptionCheckpoint(), OnExceptionCheckpoint)
    torch.manual_seed(0)
    dm = DigitsDataModule(batch_size=32)
    callback = ExceptionCheckpoint(str(tmp_path / "ckpt"))
    module = _Failing(model_name="revnet_digits", in_channels=1, optimizer=SGD)
    with pytest.raises(RuntimeError, match="simulated"):
        _trainer(tmp_path, max_steps=6, callbacks=[callback]).fit(module, dm)
    assert (tmp_path / "ckpt" / "on_exception.ckpt").exists()
    module.fail_at = None
    trainer = _trainer(tmp_path, max_steps=2, callbacks=[callback])
    with warnings.catch_warnings():
        # no "`.fit(ckpt_path=None)` was called without a model", no "save_last" hint
        warnings.filterwarnings("error", message=r".*(ckpt_path|save_last)")
        trainer.fit(module, dm)
    assert trainer.global_step == 2  # started from 0, not from the failed run's step 3
    # without a dirpath it writes next to ModelCheckpoint's files
    trainer = _trainer(tmp_path, enable_checkpointing=True,
                       callbacks=[ModelCheckpoint(dirpath=str(tmp_path / "mc"))])
    assert ExceptionCheckpoint().ckpt_path(trainer) == tmp_path / "mc" / "on_exception.ckpt"


# --- flows -----------------------------------------------------------------------------------


def test_flow_module_trains_reports_bpd_and_writes_a_sample_grid(tmp_path):
    from PIL import Image

    torch.manual_seed(0)
    module = _flow(num_samples=16, sample_dir=str(tmp_path / "samples"), sample_every_n_epochs=1)
    dm = DigitsDataModule(batch_size=32, normalize=False)
    trainer = _trainer(tmp_path, max_epochs=1, limit_train_batches=3, limit_val_batches=2)
    trainer.fit(module, dm)
    assert module.num_bins == 17  # taken from the DataModule
    m = trainer.callback_metrics
    # bits/dim and NLL are the same quantity in different units: nll = bpd * D * ln 2
    assert torch.isclose(m["val/nll"], m["val/bpd"] * 64 * torch.log(torch.tensor(2.0)),
                         rtol=1e-4)
    assert 0 < m["val/bpd"] < 20
    grid = tmp_path / "samples" / "epoch0000_t0.7.png"  # the module's default SampleGrid
    with Image.open(grid) as img:
        assert img.size == (4 * 9 + 1, 4 * 9 + 1)  # 4x4 images of 8 px with 1 px padding


def test_sample_grid_is_a_callback(tmp_path):
    """A SampleGrid in the trainer replaces the module's default one; its folder defaults to
    samples/ in the run folder."""
    torch.manual_seed(0)
    module = _flow(sample_every_n_epochs=1, sample_dir=str(tmp_path / "unused"))
    grid = SampleGrid(every_n_epochs=1, num_samples=4, temperature=1.0)
    trainer = _trainer(tmp_path, max_epochs=1, limit_train_batches=1, limit_val_batches=1,
                       callbacks=[grid])
    trainer.fit(module, DigitsDataModule(batch_size=16, normalize=False))
    assert [type(c) for c in trainer.callbacks].count(SampleGrid) == 1
    assert grid.last_path == tmp_path / "samples" / "epoch0000_t1.png" and grid.last_path.exists()
    assert not (tmp_path / "unused").exists()


def test_flow_refuses_standardised_data(tmp_path):
    """Issue 13: standardised digits were rounded and clamped into a meaningless bits/dim."""
    module = _flow()
    with pytest.raises(ValueError, match=r"outside \[0, 1\].*--data.normalize false"):
        _trainer(tmp_path, max_steps=1).fit(module, DigitsDataModule(normalize=True))
    with pytest.raises(ValueError, match="not on a grid of 256 grey levels"):
        FlowModule("realnvp", num_bins=256, model_kwargs=module.hparams.model_kwargs).levels(
            torch.full((2, 1, 8, 8), 1 / 16))
    other = DigitsDataModule(normalize=False)
    other.num_bins = 256  # a model trained on 17 levels cannot score data of 256
    with pytest.raises(ValueError, match="scores data with 17 grey levels .* has 256"):
        _trainer(tmp_path, max_steps=1).fit(_flow(num_bins=17), other)


def test_flow_checkpoint_keeps_the_number_of_grey_levels(tmp_path):
    """Issue 13: load_from_checkpoint scored digits (17 levels) with 256, doubling bits/dim."""
    torch.manual_seed(0)
    module = _flow()
    dm = DigitsDataModule(batch_size=32, normalize=False, eval_batch_size=64)
    trainer = _trainer(tmp_path, max_steps=2, enable_checkpointing=True,
                       callbacks=[ModelCheckpoint(dirpath=str(tmp_path / "c"), save_last=True)])
    trainer.fit(module, dm)
    torch.manual_seed(1)
    before = _trainer(tmp_path, limit_test_batches=1).test(module, dm, verbose=False)[0]
    loaded = FlowModule.load_from_checkpoint(tmp_path / "c" / "last.ckpt", weights_only=True)
    assert loaded.num_bins == 17
    torch.manual_seed(1)  # the same dequantization noise
    after = _trainer(tmp_path, limit_test_batches=1).test(loaded, dm, verbose=False)[0]
    assert after["test/bpd"] == pytest.approx(before["test/bpd"], rel=1e-5)


def test_variational_dequantization_is_a_config_option(tmp_path):
    from revtrain.flows import VariationalDequantization

    torch.manual_seed(0)
    module = _flow(dequantization="variational", dequantization_hidden=4)
    dm = DigitsDataModule(batch_size=16, normalize=False)
    trainer = _trainer(tmp_path, max_steps=2, enable_checkpointing=True,
                       callbacks=[ModelCheckpoint(dirpath=str(tmp_path / "c"), save_last=True)])
    trainer.fit(module, dm)
    assert isinstance(module.dequantize, VariationalDequantization)
    optimized = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert all(id(p) in optimized for p in module.dequantize.parameters())  # trained jointly
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    loaded = FlowModule.load_from_checkpoint(tmp_path / "c" / "last.ckpt", weights_only=True)
    for (k, a), b in zip(module.dequantize.state_dict().items(),
                         loaded.dequantize.state_dict().values()):
        assert torch.equal(a, b), k
    with pytest.raises(ValueError, match="'uniform' or 'variational'"):
        _flow(dequantization="learned")


def test_flow_rejects_images_of_the_wrong_size():
    module = FlowModule("realnvp", model_kwargs={"in_channels": 1, "image_size": 16,
                                                 "levels": 2, "hidden": 8})
    with pytest.raises(ValueError, match=r"cannot take the \(1, 8, 8\) images"):
        module.check_data(DigitsDataModule())


def test_flow_module_refuses_a_classifier():
    with pytest.raises(ValueError, match="no log_prob"):
        FlowModule("revnet_digits", model_kwargs={"num_classes": 10, "in_channels": 1})


# --- DDP: TESTPLAN 37 / 38 -------------------------------------------------------------------

_DDP_SCRIPT = textwrap.dedent("""
    import sys
    from functools import partial

    import pytorch_lightning as pl
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from pytorch_lightning.strategies import DDPStrategy

    from revtrain.lightning import Classifier


    class GradRecorder(pl.Callback):
        def __init__(self):
            self.grads = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.grads.append({"batch": [t.clone() for t in batch]})

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            # after backward: DDP has all-reduced (averaged) the gradients
            self.grads[-1].update({n: p.grad.detach().clone()
                                   for n, p in pl_module.named_parameters()})


    if __name__ == "__main__":
        out = sys.argv[1]
        torch.manual_seed(0)
        module = Classifier("revnet_digits", num_classes=10, in_channels=1,
                            optimizer=partial(torch.optim.SGD, lr=0.05))
        gen = torch.Generator().manual_seed(1)
        x, y = torch.randn(16, 1, 8, 8, generator=gen), torch.randint(0, 10, (16,), generator=gen)
        loader = DataLoader(TensorDataset(x, y), batch_size=4, shuffle=False)
        recorder = GradRecorder()
        strategy = {"ddp": "ddp", "unused": "ddp_find_unused_parameters_true",
                    "static": DDPStrategy(static_graph=True)}[sys.argv[2]]
        trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=3,
                             logger=False, enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, callbacks=[recorder])
        trainer.fit(module, loader)
        torch.save(recorder.grads, f"{out}/grads_rank{trainer.global_rank}.pt")
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["ddp", "unused", "static"])
def test_ddp_two_cpu_ranks_hold_identical_gradients_equal_to_one_process(tmp_path, variant):
    """TESTPLAN 38 (and the gradient half of 37): Trainer(accelerator="cpu", devices=2,
    strategy="ddp") over gloo on a reversible RevNet, 3 steps. Each rank draws its own 4
    samples (DistributedSampler) and records them; BatchNorm uses each rank's own batch statistics, so the
    single-process reference is the mean of the gradients of the two shards, followed by the
    same SGD step. Variants: plain ``"ddp"``, ``find_unused_parameters=True`` and
    ``static_graph=True`` (TESTPLAN 37's switches)."""
    script = tmp_path / "ddp_run.py"
    script.write_text(_DDP_SCRIPT)
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
               OMP_NUM_THREADS="1")
    env.pop("LOCAL_RANK", None)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path), variant], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"grads_rank{r}.pt") for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 3
    shards = [[ranks[r][step].pop("batch") for r in (0, 1)] for step in range(3)]
    for step in range(3):
        assert not torch.equal(shards[step][0][0], shards[step][1][0])  # different samples
        for name, g in ranks[0][step].items():
            assert torch.equal(g, ranks[1][step][name]), (step, name)

    # single process: the same initial weights, shards and SGD steps
    torch.manual_seed(0)
    module = Classifier("revnet_digits", num_classes=10, in_channels=1, check_input=False)
    module.train()
    params = dict(module.named_parameters())
    worst_single_shard = 0.0
    for step in range(3):
        shard_grads = []
        for x, y in shards[step]:  # the 4 samples each rank drew (DistributedSampler)
            module.zero_grad()
            torch.nn.functional.cross_entropy(module(x), y).backward()
            shard_grads.append({n: p.grad.clone() for n, p in params.items()})
        for name, g_ddp in ranks[0][step].items():
            expected = (shard_grads[0][name] + shard_grads[1][name]) / 2
            assert torch.allclose(g_ddp, expected, rtol=1e-4, atol=1e-6), (step, name)
            worst_single_shard = max(worst_single_shard,
                                     float((shard_grads[0][name] - g_ddp).abs().max()))
        with torch.no_grad():
            for name, p in params.items():
                p -= 0.05 * (shard_grads[0][name] + shard_grads[1][name]) / 2
    # the comparison can fail: one rank's local (not all-reduced) gradient is far off
    assert worst_single_shard > 1e-3


def test_vector_flow_on_images_flattens_and_grids(tmp_path):
    """NICE is a flow on vectors: the module flattens the 8x8 digits and reshapes samples."""
    torch.manual_seed(0)
    module = FlowModule("nice", model_kwargs={"dim": 64, "num_layers": 4, "hidden": 16,
                                              "depth": 1},
                        num_samples=4, sample_dir=str(tmp_path / "s"),
                        optimizer=partial(torch.optim.Adam, lr=1e-3))
    assert module(torch.rand(3, 1, 8, 8)).shape == (3,)  # the flow flattens its own input
    assert module.sample(2).shape == (2, 64)
    trainer = _trainer(tmp_path, max_epochs=1, limit_train_batches=2, limit_val_batches=1)
    trainer.fit(module, DigitsDataModule(batch_size=16, normalize=False))
    assert torch.isfinite(trainer.callback_metrics["val/bpd"])
    assert (tmp_path / "s" / "epoch0000_t0.7.png").exists()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_peak_memory_and_memory_table(tmp_path):
    from revtrain.lightning import memory_table

    torch.manual_seed(0)
    module = _classifier()
    trainer = _trainer(tmp_path, accelerator="gpu", max_steps=2,
                       callbacks=[PeakMemoryMonitor(1)])
    dm = DigitsDataModule(batch_size=64)
    trainer.fit(module, dm)
    assert trainer.callback_metrics["mem/step_peak_mib"] > 0
    text, rows = memory_table(module.cuda(), dm)
    assert rows[0]["method"] == "cuda-allocator"
    assert rows[0]["held_bytes"] < rows[1]["held_bytes"]
