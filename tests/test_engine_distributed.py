"""DDP and FSDP2 on 2 gloo CPU processes: the reversible engine gives the stored twin's results.

Each test spawns two processes once and checks several configurations inside them.
"""

from __future__ import annotations

import faulthandler
import os
import socket
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")]

TESTS = str(Path(__file__).resolve().parent)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, worker, done):
    """One rank: set up gloo, run `worker(rank, world)`, then mark this rank's checks done,
    meet the other rank and close. A Python traceback is printed if the process aborts."""
    faulthandler.enable(all_threads=True)
    sys.path.insert(0, TESTS)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        worker(rank, world)
        Path(done, f"rank{rank}").touch()
        dist.barrier()  # both ranks done before the process group goes
    finally:
        dist.destroy_process_group()


def _close(a, b, what):
    assert torch.allclose(a, b, rtol=1e-9, atol=1e-11), f"{what}: max diff {(a - b).abs().max():.3g}"


def _ddp_worker(rank, world):
    from engine_helpers import stack, twin
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(0)
    base = stack(4, "affine", c=4).double()
    data = torch.randn(5, 2 * world, 4, 5, 5, dtype=torch.float64)
    # the single-process reference on the full batch
    reference = twin(base, "stored")
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.05)
    ref_grads = []
    for x in data:
        ref_opt.zero_grad()
        reference(x).square().mean().backward()
        ref_grads.append([p.grad.clone() for p in reference.parameters()])
        ref_opt.step()
    for static_graph in (False, True):
        for find_unused in (False, True):
            model = DDP(twin(base, "reversible"), static_graph=static_graph,
                        find_unused_parameters=find_unused)
            opt = torch.optim.SGD(model.parameters(), lr=0.05)
            calls = []
            for p in model.parameters():
                p.register_hook(lambda g, calls=calls: calls.append(1) or g)
            for step, x in enumerate(data):
                opt.zero_grad()
                local = x[rank * 2:(rank + 1) * 2]
                model(local).square().mean().backward()
                for p, g in zip(model.parameters(), ref_grads[step]):
                    _close(p.grad, g, f"static={static_graph} unused={find_unused} step {step}")
                opt.step()
            assert len(calls) == len(list(base.parameters())) * len(data), "each hook once per step"
    # a parameter that no step uses: without find_unused_parameters DDP raises its own
    # error, exactly as for the stored twin
    for memory in ("stored", "reversible"):
        model = twin(base, memory)
        model.unused = torch.nn.Linear(2, 2).double()
        ddp = DDP(model, find_unused_parameters=False)
        ddp(data[0][:2]).sum().backward()
        with pytest.raises(RuntimeError, match="Expected to have finished reduction"):
            ddp(data[1][:2]).sum().backward()


def _fsdp_steps(model, reference, data, rank, world, what, after_forward=lambda: None):
    """SGD steps of an FSDP2 model on this rank's half of each batch and of a stored reference
    on the same half, the reference's gradients averaged over the ranks: equal gradients."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    for step, batch in enumerate(data):
        x = batch[rank * 2:(rank + 1) * 2]
        torch.manual_seed(10 * step + rank)
        loss = model(x).square().mean()
        after_forward()
        loss.backward()
        torch.manual_seed(10 * step + rank)
        reference(x).square().mean().backward()
        for p in reference.parameters():
            dist.all_reduce(p.grad)
            p.grad /= world
        for (name, p), q in zip(model.named_parameters(), reference.parameters()):
            _close(p.grad.full_tensor(), q.grad, f"{what} step {step} {name}")
        opt.step(), opt.zero_grad(), ref_opt.step(), ref_opt.zero_grad()


def _fsdp_worker(rank, world):
    from engine_helpers import coupling, twin
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    import revtrain

    for memory in ("reversible", "checkpoint"):
        torch.manual_seed(0)
        base = revtrain.ReversibleSequential(
            *[coupling("affine", 4, bn=True, dropout=0.2) for _ in range(3)]).double()
        reference = twin(base, "stored")  # on each rank: the same local batch, stored
        model = twin(base, memory)
        for layer in model:
            fully_shard(layer)
        fully_shard(model)
        data = torch.randn(2, 2 * world, 4, 5, 5, dtype=torch.float64)

        def resharded(model=model):
            assert isinstance(model[1].f[0].weight, DTensor), \
                "parameters resharded between forward and backward"

        _fsdp_steps(model, reference, data, rank, world, memory, after_forward=resharded)
        for (name, b), c in zip(model.named_buffers(), reference.buffers()):
            _close(b.double(), c.double(), f"{memory} buffer {name}")


def _fsdp_transformer_worker(rank, world):
    """FSDP2 over a reversible transformer: each block one unit. Without dropout the blocks' MLPs
    take their recomputing path (counted), whose inputs are FSDP's unsharded parameters."""
    import copy

    from torch.distributed.fsdp import fully_shard

    import revtrain
    from revtrain import transformer

    calls = []
    apply = transformer._GeluLinear.apply
    transformer._GeluLinear.apply = lambda *a: calls.append(1) or apply(*a)
    try:
        torch.manual_seed(0)
        base = revtrain.ReversibleTransformer(dim=8, depth=3, num_heads=2, drop_path=0.2).double()
        reference = copy.deepcopy(base).set_memory("stored")
        model = copy.deepcopy(base)
        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
        data = torch.randn(2, 2 * world, 5, 8, dtype=torch.float64)
        _fsdp_steps(model, reference, data, rank, world, "transformer")
        assert len(calls) == 2 * 3 * len(data), "the MLPs' recomputing path, forward and rebuild"
    finally:
        transformer._GeluLinear.apply = apply


def _spawn(worker, done, world=2):
    """Both ranks must finish every check (a Python error in either fails the test). gloo has been
    seen to abort a process (SIGABRT, "terminate called without an active exception") twice in
    more than 50 runs, under load, after both ranks had passed all their checks; that is reported
    as a warning, not as a failure of the engine. Any other exit, or an abort before both ranks
    finished, fails."""
    def finished():
        return all(Path(done, f"rank{r}").exists() for r in range(world))

    try:
        mp.spawn(_entry, args=(world, _free_port(), worker, str(done)), nprocs=world, join=True)
    except mp.ProcessExitedException as error:
        if not finished() or error.signal_name != "SIGABRT":
            raise
        warnings.warn(f"gloo aborted a process while closing, after all checks passed: {error}",
                      stacklevel=2)
    assert finished(), "every rank ran its checks"


def test_ddp_two_processes_equal_a_single_process_on_the_full_batch(tmp_path):
    _spawn(_ddp_worker, tmp_path)


def test_fsdp2_per_coupling_and_on_the_stack_with_batchnorm_and_dropout(tmp_path):
    _spawn(_fsdp_worker, tmp_path)


def test_fsdp2_per_transformer_block_with_drop_path(tmp_path):
    _spawn(_fsdp_transformer_worker, tmp_path)


def _failing_worker(rank, world):
    assert rank == 0, "a check that fails on rank 1"


def test_a_failing_check_on_one_rank_fails_the_test(tmp_path):
    # whichever rank reports first (rank 1's assertion, or rank 0's barrier losing its peer),
    # the test fails with the error, and rank 1 never marked its checks done
    with pytest.raises(mp.ProcessRaisedException):
        _spawn(_failing_worker, tmp_path)
    assert not Path(tmp_path, "rank1").exists()


def _aborting_worker(rank, world):
    import atexit

    if rank == 1:  # aborts at interpreter exit, after its checks and the process group's close
        atexit.register(os.abort)


def test_an_abort_after_both_ranks_finished_warns(tmp_path):
    with pytest.warns(UserWarning, match="gloo aborted a process while closing"):
        _spawn(_aborting_worker, tmp_path)


def _aborting_early_worker(rank, world):
    if rank == 1:  # aborts before its checks are marked done
        os.abort()


def test_an_abort_before_the_checks_finished_fails(tmp_path):
    with pytest.raises(mp.ProcessExitedException, match="SIGABRT"):
        _spawn(_aborting_early_worker, tmp_path)
