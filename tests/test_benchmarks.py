"""Smoke tests of the benchmarks: the code paths of ``benchmarks/run.py`` and
``benchmarks/engine.py`` run on tiny sizes and produce well-formed records, and the memory
accounting they rely on is right (checked against a deliberately wrong one).
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    """The ``benchmarks`` modules, imported from the repository root."""
    sys.path.insert(0, str(ROOT))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread is faster on a shared machine
    try:
        yield {name: importlib.import_module(f"benchmarks.{name}")
               for name in ("common", "engine", "run", "tables")}
    finally:
        torch.set_num_threads(threads)
        sys.path.remove(str(ROOT))


def test_resize_aware_tracker_equals_measure_step_when_nothing_is_resized(bench):
    from revtrain.memory import measure_step

    common = bench["common"]
    x = torch.randn(2, 8, 8, 8)
    for mode in ("stored", "checkpoint", "reversible"):
        model = common.stack_models(3, 8, [mode])[mode]
        ref = measure_step(model, x, loss_fn=common.square_loss)
        ours = common.measure_memory(model, x, resize_aware=True)
        assert (ours["peak_bytes"], ours["held_bytes"]) == (ref["peak_bytes"], ref["held_bytes"])


def test_memcnn_is_counted_with_what_its_storages_hold(bench):
    """memcnn frees inputs by resizing storages: the held bytes must not grow with depth.

    The plain tracker (which cannot see resizes) is the broken case: it shows growth.
    """
    common = bench["common"]
    held, held_plain = {}, {}
    for depth in (2, 6):
        model = common.stack_models(depth, 8, ["memcnn"])["memcnn"]
        x = torch.randn(2, 8, 8, 8)
        held[depth] = common.measure_memory(model, x, resize_aware=True)["held_bytes"]
        held_plain[depth] = common.measure_memory(model, x, resize_aware=False)["held_bytes"]
    assert held[6] == held[2]
    assert held_plain[6] > held_plain[2]  # the resize-blind count grows: it would be wrong


def test_modes_are_really_different_and_compute_the_same_gradients(bench):
    common, engine = bench["common"], bench["engine"]
    models = common.stack_models(4, 8, common.MODES)
    x = torch.randn(2, 8, 8, 8)
    diffs = engine.gradient_agreement(models, x)
    assert set(diffs) == set(common.MODES)
    assert max(diffs.values()) < 1e-4
    held = {m: common.measure_memory(models[m], x, resize_aware=(m == "memcnn"))["held_bytes"]
            for m in common.MODES}
    assert held["stored"] > held["checkpoint"] > held["reversible"]
    # a mode switched with a plain string is silently the stored mode: common parses it
    assert held["reversible"] == held["memcnn"]


def test_time_interleaved_rotates_and_reports_medians(bench):
    order = []
    steps = {name: (lambda n=name: order.append(n)) for name in "abc"}
    timing = bench["common"].time_interleaved(steps, repeats=3, warmup=0)
    assert order == list("abc" "bca" "cab")
    for t in timing.values():
        assert len(t["samples_s"]) == 3 and t["min_s"] <= t["median_s"]


def test_linear_fit_tells_flat_from_linear(bench):
    fit = bench["tables"].linear_fit
    slope, r2 = fit([8, 16, 32], [80, 160, 320])
    assert slope == pytest.approx(10) and r2 == pytest.approx(1)
    assert fit([8, 16, 32], [5, 5, 5])[0] == pytest.approx(0, abs=1e-9)


def test_model_ratio_flags_a_missed_target(bench):
    def rec(model, mode, act):
        return {"section": "models", "model": model, "mode": mode,
                "activation_peak_bytes": act, "held_bytes": act, "step_s": None}

    ratios = bench["tables"].model_ratios([rec("resnet110", "stored", 1300),
                                           rec("revnet110", "reversible", 100)])
    assert ratios[0]["met"] is True and ratios[0]["activation_peak_ratio"] == pytest.approx(13)
    ratios = bench["tables"].model_ratios([rec("resnet110", "stored", 1000),
                                           rec("revnet110", "reversible", 100)])
    assert ratios[0]["met"] is False


def test_run_smoke_writes_records_tables_and_plots(bench, tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", "")  # main() prepends the repository for its subprocesses
    bench["run"].main(["--smoke", "--device", "cpu", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "run_smoke_cpu.json").read_text())
    records = result["records"]
    keys = {"section", "model", "depth", "batch", "mode", "device", "torch", "peak_bytes",
            "held_bytes", "step_s", "method"}
    for r in records:
        if r["section"] in ("stack_depth", "stack_batch", "models"):
            assert keys <= set(r), set(r) ^ keys
    stack = [r for r in records if r["section"] == "stack_depth"]
    assert {r["mode"] for r in stack} == {"stored", "checkpoint", "memcnn", "reversible"}
    by = {(r["depth"], r["mode"]): r["activation_peak_bytes"] for r in stack}
    assert by[(8, "reversible")] <= 1.05 * by[(2, "reversible")]
    assert by[(8, "stored")] > 2 * by[(2, "stored")]  # stored grows
    assert any(r["step_s"] for r in stack)
    assert {r["section"] for r in records} >= {"stack_depth", "stack_batch", "models", "drift"}
    drift = [r for r in records if r["section"] == "drift"]
    assert {r["precision"] for r in drift} >= {"fp32", "bf16"}
    assert all(r["reconstruction_rel"] < 1e-3 for r in drift if r["precision"] == "fp32")
    readme = (tmp_path / "README.md").read_text()
    assert "Coupling stack over depth" in readme and "| reversible |" in readme
    for png in ("smoke_cpu_memory_vs_depth.png", "smoke_cpu_time_ratio.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"


def test_scripts_run_from_the_command_line(tmp_path):
    """``python benchmarks/tables.py DIR`` works as a script (the others share its preamble)."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "tables.py"), str(tmp_path)],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "README.md").read_text().startswith("# revtrain benchmark results")


def test_engine_smoke_writes_ratios(bench, tmp_path):
    out = tmp_path / "engine.json"
    bench["engine"].main(["--smoke", "--out", str(out)])
    record = json.loads(out.read_text())
    assert set(record["seconds"]) == {"stored", "checkpoint", "memcnn", "reversible"}
    assert record["ratio_to_stored"]["stored"] == 1.0
    assert record["reversible_speedup_over_memcnn"] == pytest.approx(
        record["seconds"]["memcnn"] / record["seconds"]["reversible"])
    assert max(record["gradient_max_rel_diff_vs_stored"].values()) < 1e-4
    assert record["environment"]["torch"] == torch.__version__
    calls = record["subnet_calls_per_step"]  # fused: one extra evaluation, memcnn: two
    assert calls["reversible"] == 2 * calls["stored"] and calls["memcnn"] == 3 * calls["stored"]
    assert record["memory"]["reversible"]["held_bytes"] < record["memory"]["stored"]["held_bytes"]
