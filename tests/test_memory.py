"""The memory measurement itself: deterministic, counts what is kept, cross-checked by RSS."""

from __future__ import annotations

import pytest
import torch
from engine_helpers import stack

from revtrain.memory import TensorMemoryTracker, format_bytes, measure_step, subprocess_peak_rss


def test_tracker_counts_kept_and_freed_storages():
    with TensorMemoryTracker() as mem:
        a = torch.empty(1000)  # 4000 bytes
        b = a[10:20]  # a view: no new storage
        a.add_(1)  # in place: no new storage
        c = torch.empty(500)
        assert mem.current == 6000
        del a, b
        assert mem.current == 2000  # a's storage freed with its last view
        del c
    assert mem.current == 0 and mem.peak == 6000


def test_measure_step_is_deterministic_and_leaves_the_model_as_found():
    torch.manual_seed(0)
    model = stack(4, "additive", c=8, bn=True)
    x = torch.randn(4, 8, 6, 6)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    first, second = measure_step(model, x), measure_step(model, x)
    assert first == second
    assert first["method"] == "cpu-tensor" and first["held_bytes"] == x.numel() * 4
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in model.parameters())


def make_stack(depth: int, memory: str):
    torch.manual_seed(0)
    return stack(depth, "additive", c=32, memory=memory), torch.randn(8, 32, 32, 32)


@pytest.mark.slow
def test_rss_cross_check_agrees_on_the_ordering():
    rss = {m: subprocess_peak_rss("test_memory:make_stack", {"depth": 24, "memory": m})
           for m in ("reversible", "stored")}
    assert rss["stored"]["peak_delta_bytes"] > 2 * rss["reversible"]["peak_delta_bytes"], rss


def test_format_bytes():
    assert format_bytes(512) == "512 B" and format_bytes(1536) == "1.5 KiB"
    assert format_bytes(3 * 1024**3) == "3.0 GiB"
