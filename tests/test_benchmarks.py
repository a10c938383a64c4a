"""Smoke tests of the benchmarks: the code paths of ``benchmarks/run.py`` and
``benchmarks/engine.py`` run on tiny sizes and produce well-formed records, and the memory
accounting they rely on is right (checked against a deliberately wrong one).
"""

from __future__ import annotations

import copy
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench(benchmarks_path):
    """The ``benchmarks`` modules, imported from the repository root."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread is faster on a shared machine
    try:
        yield {name: importlib.import_module(f"benchmarks.{name}")
               for name in ("common", "engine", "run", "tables", "whole_models")}
    finally:
        torch.set_num_threads(threads)


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


# ----------------------------------------------------------------------------- whole models


def test_memcnn_revnet110_port_needs_the_patch_and_the_patch_is_exact(bench):
    """memcnn's RevNet-110 as shipped fails under torch 2.x (its first wrapper frees the
    stem ReLU's output); with ``keep_input=True`` on that wrapper it trains, and its gradients
    equal those of the same port with every wrapper keeping its input."""
    import memcnn

    wm = bench["whole_models"]
    x, labels = torch.rand(2, 3, 8, 8), torch.arange(2)

    def grads(model):
        torch.nn.functional.cross_entropy(model(x), labels).backward()
        return [p.grad for p in model.parameters()]

    torch.manual_seed(0)
    shipped = wm.memcnn_port("revnet110", patch=False)
    with pytest.raises(RuntimeError, match="inplace"):
        grads(shipped)
    torch.manual_seed(0)
    patched = wm.memcnn_port("revnet110")
    reference = copy.deepcopy(patched)
    for module in reference.modules():
        if isinstance(module, memcnn.InvertibleModuleWrapper):
            module.keep_input = True
    for a, b in zip(grads(patched), grads(reference)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert sum(p.numel() for p in patched.parameters()) == 1_854_890  # memcnn's JOSS count


def test_physical_floor_is_output_plus_the_largest_unit(bench):
    import revtrain

    wm = bench["whole_models"]
    torch.manual_seed(0)
    net = revtrain.models.create("revnet_digits")
    x = torch.rand(4, 1, 8, 8)
    floor = wm.physical_floor(net, x)
    with torch.no_grad():
        out = revtrain.set_memory(copy.deepcopy(net), "stored").features(x)
    assert floor["floor_output_bytes"] == out.numel() * 4
    assert floor["floor_bytes"] == floor["floor_output_bytes"] + floor["floor_unit_bytes"]
    assert floor["floor_unit"] in {"stem", "stages.1.transition", "head"} or ".layers." in \
        floor["floor_unit"]
    # no model trains below its floor; the stored twin is well above it
    stored = wm.measure_entry(wm.ENTRIES["smoke"][0], 4, torch.device("cpu"), floor=floor)
    assert stored["floor_ratio"] > 1.5
    units = [name for name, _ in wm._floor_units(net)]
    assert "stages.0.blocks.layers.0" in units and "head" in units


def test_whole_model_records_in_bf16_and_a_failing_model_is_noted(bench, tmp_path, monkeypatch):
    """The CUDA profile's code path on CPU: fp32 and bf16 records, floors, a model that
    fails is noted and the others are kept, the JSON is written as the run goes."""
    run, wm = bench["run"], bench["whole_models"]
    tiny = dict(run.PROFILES["smoke"], models="test", model_precisions=["fp32", "bf16"])
    broken = wm.Entry(dict(wm.ENTRIES["smoke"][0], label="broken", name="no_such_model"))
    monkeypatch.setitem(wm.ENTRIES, "test", [wm.ENTRIES["smoke"][1], broken])
    monkeypatch.setitem(run.ENTRIES, "test", wm.ENTRIES["test"])
    monkeypatch.setitem(run.PROFILES, "test", tiny)
    out = tmp_path / "run_test_cpu.json"
    result = run.run_all("test", torch.device("cpu"), ["models"], out=out)
    models = [r for r in result["records"] if r["section"] == "models"]
    assert {(r["model"], r["precision"]) for r in models} == {("revnet_digits", "fp32"),
                                                             ("revnet_digits", "bf16")}
    assert all(r["floor_ratio"] > 0 and r["rng_state_bytes"] == 0 for r in models)
    assert any("no_such_model" in n for n in result["notes"])
    on_disk = json.loads(out.read_text())
    assert len(on_disk["records"]) == len(result["records"])
    lines = "\n".join(bench["tables"].run_tables(on_disk))
    assert "| revnet_digits | revtrain | reversible | bf16 |" in lines


def test_time_budget_skips_the_remaining_sections(bench, tmp_path):
    result = bench["run"].run_all("smoke", torch.device("cpu"), ["models", "drift"],
                                  out=tmp_path / "r.json", time_budget=0.0)
    assert result["records"] == []
    assert sum("time budget" in n for n in result["notes"]) == 2
    assert json.loads((tmp_path / "r.json").read_text())["notes"] == result["notes"]


def test_device_cuda_without_cuda_says_so(bench, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available")
    with pytest.raises(SystemExit):
        bench["run"].main(["--device", "cuda", "--out", str(tmp_path)])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_profile_writes_allocator_records_in_fp32_and_bf16(bench, tmp_path, monkeypatch):
    run = bench["run"]
    tiny = dict(run.PROFILES["smoke"], models="smoke", model_precisions=["fp32", "bf16"],
                rss=[])
    monkeypatch.setitem(run.PROFILES, "cuda", tiny)
    run.main(["--device", "cuda", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "run_cuda_cuda.json").read_text())
    models = [r for r in result["records"] if r["section"] == "models"]
    assert {r["precision"] for r in models} == {"fp32", "bf16"}
    assert all(r["method"] == "cuda-allocator" for r in models)
    stack = [r for r in result["records"] if r["section"] == "stack_depth"]
    assert stack and all(r["method"] == "cuda-allocator" for r in stack if r["mode"] != "memcnn")
    assert "## CUDA" in (tmp_path / "README.md").read_text()


def test_merge_reruns_one_section_and_keeps_the_others(bench, tmp_path):
    run = bench["run"]
    out = tmp_path / "run_smoke_cpu.json"
    first = run.run_all("smoke", torch.device("cpu"), ["drift"], out=out)
    drift = [r for r in first["records"] if r["section"] == "drift"]
    second = run.run_all("smoke", torch.device("cpu"), ["models"], out=out, merge=True)
    on_disk = json.loads(out.read_text())
    assert {r["section"] for r in on_disk["records"]} == {"drift", "models"}
    assert [r for r in on_disk["records"] if r["section"] == "drift"] == drift
    assert on_disk["merged"][0]["sections"] == ["drift"]
    assert len(second["records"]) == len(on_disk["records"])
    readme = "\n".join(bench["tables"].run_tables(on_disk))
    assert "were kept from an earlier run" in readme
