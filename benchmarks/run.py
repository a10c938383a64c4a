"""Memory, step time and reconstruction drift: revtrain against stored, checkpoint and memcnn.

Sections (each writes records ``{section, model, depth, batch, mode, device, torch, peak_bytes,
held_bytes, step_s, method, ...}``):

* ``stack_depth`` / ``stack_batch``: the conv coupling stack of :mod:`benchmarks.common` swept
  over depth and batch size in the four modes (stored, checkpoint, memcnn, reversible). Memory
  of one training step after a warm-up (CPU: the deterministic tensor-level count of
  :func:`revtrain.memory.measure_step`; CUDA: the allocator's peak); time: median of
  interleaved repeats (``torch.utils.benchmark``).
* ``rss``: process peak RSS of one step in a fresh subprocess (``psutil``), for a few stack
  points, as a cross-check of the tensor-level count (CPU only).
* ``models``: whole models of :mod:`benchmarks.whole_models` — ResNet-110 / RevNet-110,
  ResNet-164 / RevNet-164 (stored twin, reversible, reversible with the stem, transitions and
  head checkpointed), memcnn's own ports of the four, i-RevNet, Glow — each with its physical
  floor; fp32, and on CUDA also bf16 autocast. A model that fails is noted and skipped.
* ``drift``: reconstruction error of ``inverse(forward(x))`` and the gradient error of the
  reversible stack against its stored twin, over depth and precision (fp32; bf16 autocast;
  fp16 autocast on CUDA).

Usage::

    python benchmarks/run.py --quick                 # < 10 min on 2 CPU cores
    python benchmarks/run.py                         # full sizes, CPU
    python benchmarks/run.py --device cuda           # the CUDA table, ~3-5 min on one GPU
    python benchmarks/run.py --smoke --out /tmp/b    # tiny, for the tests

Each device gets its own file ``run_<profile>_<device>.json`` under ``--out``
(``benchmarks/results`` by default), rewritten after every section and every model, so a run
that is stopped keeps what it measured; CPU and CUDA records are never mixed in one ratio. The
Markdown tables (``README.md``) and the PNG plots are regenerated from all result files there.
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch import Tensor, nn

from benchmarks.common import (
    MODES,
    REPO,
    coupling_stack,
    environment,
    measure_memory,
    square_loss,
    stack_models,
    subprocess_rss_step,
    time_interleaved,
    training_step,
    write_json,
)
from benchmarks.whole_models import ENTRIES, build_entry, measure_entry, physical_floor
from revtrain import MemoryMode

__all__ = ["PROFILES", "main", "run_all"]

# sizes of each profile: stack (channels, size, batch), sweeps, repeats, model batch
PROFILES: dict[str, dict[str, Any]] = {
    "smoke": {"channels": 8, "size": 8, "batch": 2, "depths": [2, 4, 8], "time_depths": [2, 8],
              "batch_depth": 4, "batches": [1, 2], "repeats": 1, "warmup": 1,
              "rss": [], "models": "smoke", "model_batch": 2, "model_repeats": 1,
              "model_precisions": ["fp32"], "floors": True,
              "drift_depths": [2, 4], "drift_size": 8, "drift_batch": 2},
    "quick": {"channels": 32, "size": 16, "batch": 4, "depths": [8, 16, 32, 64, 128],
              "time_depths": [8, 32, 128], "batch_depth": 16, "batches": [2, 8, 32],
              "repeats": 3, "warmup": 1, "rss": [(8, "stored"), (128, "stored"),
                                                 (8, "reversible"), (128, "reversible")],
              "models": "quick", "model_batch": 8, "model_repeats": 2,
              "model_precisions": ["fp32"], "floors": True,
              "drift_depths": [8, 32, 128], "drift_size": 16, "drift_batch": 4},
    "full": {"channels": 32, "size": 32, "batch": 16, "depths": [8, 16, 32, 64, 128],
             "time_depths": [8, 16, 32, 64, 128], "batch_depth": 32, "batches": [4, 8, 16, 32, 64],
             "repeats": 7, "warmup": 2,
             "rss": [(8, m) for m in MODES] + [(128, m) for m in MODES],
             "models": "full", "model_batch": 32, "model_repeats": 5,
             "model_precisions": ["fp32"], "floors": True,
             "drift_depths": [8, 32, 128], "drift_size": 32, "drift_batch": 8},
    # one GPU, a few minutes: allocator peaks at a training batch, fp32 and bf16 autocast
    "cuda": {"channels": 32, "size": 32, "batch": 16, "depths": [8, 32, 128],
             "time_depths": [8, 32, 128], "batch_depth": 32, "batches": [16, 64],
             "repeats": 5, "warmup": 2, "rss": [], "models": "cuda", "model_batch": 128,
             "model_repeats": 5, "model_precisions": ["fp32", "bf16"], "floors": True,
             "drift_depths": [8, 32, 128], "drift_size": 32, "drift_batch": 8},
}

def _base(env: dict[str, Any], section: str, **fields: Any) -> dict[str, Any]:
    return {"section": section, "device": env["device"], "device_type": env["device_type"],
            "torch": env["torch"], "threads": env["threads"], **fields}


def _memory_fields(mem: dict[str, Any]) -> dict[str, Any]:
    return {"peak_bytes": mem["peak_bytes"], "held_bytes": mem["held_bytes"],
            "grad_bytes": mem["grad_bytes"],
            "activation_peak_bytes": mem["peak_bytes"] - mem["grad_bytes"],
            "method": mem["method"]}


# ----------------------------------------------------------------------------- coupling stack


def stack_records(env: dict[str, Any], p: dict[str, Any], device: torch.device, depth: int,
                  batch: int, section: str, timed: bool) -> list[dict[str, Any]]:
    """Memory (and, if ``timed``, step time) of the stack at one (depth, batch), every mode."""
    models = {m: model.to(device)
              for m, model in stack_models(depth, p["channels"], MODES).items()}
    gen = torch.Generator().manual_seed(depth)
    x = torch.randn(batch, p["channels"], p["size"], p["size"], generator=gen).to(device)
    memory = {m: measure_memory(models[m], x, resize_aware=(m == "memcnn")) for m in MODES}
    timing = None
    if timed:
        timing = time_interleaved({m: training_step(models[m], x) for m in MODES},
                                  p["repeats"], p["warmup"], device)
    records = []
    for m in MODES:
        rec = _base(env, section, model=f"coupling-stack-c{p['channels']}-{p['size']}px",
                    depth=depth, batch=batch, mode=m, **_memory_fields(memory[m]))
        if timing is not None:
            rec["step_s"] = timing[m]["median_s"]
            rec["step_s_iqr"] = [timing[m]["q1_s"], timing[m]["q3_s"]]
            rec["repeats"] = p["repeats"]
            rec["step_ratio_to_stored"] = timing[m]["median_s"] / timing["stored"]["median_s"]
        else:
            rec["step_s"] = None
        records.append(rec)
    return records


def rss_records(env: dict[str, Any], p: dict[str, Any]) -> list[dict[str, Any]]:
    """Process RSS growth of one step in a fresh subprocess (CPU), next to the tensor count.

    Two measurements: :func:`benchmarks.common.subprocess_rss_step` (peak-RSS mark reset
    before the step) and :func:`revtrain.memory.subprocess_peak_rss` (``ru_maxrss`` growth).
    """
    from revtrain.memory import subprocess_peak_rss

    records = []
    for depth, mode in p["rss"]:
        kwargs = {"depth": depth, "channels": p["channels"], "size": p["size"],
                  "batch": p["batch"], "memory": mode}
        ours = subprocess_rss_step(kwargs)
        lib = subprocess_peak_rss("benchmarks.common:rss_coupling_stack", kwargs)
        records.append(_base(env, "rss", model=f"coupling-stack-c{p['channels']}-{p['size']}px",
                             depth=depth, batch=p["batch"], mode=mode,
                             rss_cold_delta_bytes=ours["cold_delta_bytes"],
                             rss_warm_delta_bytes=ours["warm_delta_bytes"],
                             method=ours["method"],
                             subprocess_peak_rss_delta_bytes=lib["peak_delta_bytes"],
                             subprocess_peak_rss_steady_delta_bytes=lib["steady_delta_bytes"],
                             step_s=None))
    return records


# ----------------------------------------------------------------------------- whole models


def _floor_key(entry: dict) -> tuple:
    kwargs = {k: v for k, v in entry["kwargs"].items() if k != "irreversible_memory"}
    return entry["name"], tuple(sorted(kwargs.items())), entry["shape"]


def model_records(env: dict[str, Any], p: dict[str, Any], device: torch.device,
                  notes: list[str], on_record=None) -> list[dict[str, Any]]:
    """Memory (and step time) of the whole models; a model that fails is noted and skipped.

    ``on_record(records)`` is called after every record (the driver rewrites the JSON).
    """
    import revtrain.models as zoo

    available = set(zoo.list_models())
    entries = []
    for e in ENTRIES[p["models"]]:
        if e["impl"] == "revtrain" and e["name"] not in available:
            notes.append(f"models: {e['name']} is not registered in revtrain.models; skipped")
        else:
            entries.append(e)
    batch = p["model_batch"]
    records: list[dict[str, Any]] = []
    floors: dict[tuple, dict[str, Any]] = {}
    start = time.perf_counter()
    for precision in p["model_precisions"]:
        cast = None if precision == "fp32" else {"bf16": torch.bfloat16,
                                                 "fp16": torch.float16}[precision]
        for e in entries:
            label = f"{e['label']} ({e['mode']}, {precision})"
            key = (*_floor_key(e), precision)
            try:
                if p.get("floors") and key not in floors:
                    floor_entry = dict(e, impl="revtrain", mode="stored")
                    _, x, net = build_entry(floor_entry, batch, device)
                    floors[key] = physical_floor(net.to(device), x, cast)
                    del net, x
                rec = measure_entry(e, batch, device, precision, floors.get(key))
            except Exception as error:  # one model failing must not stop the run
                notes.append(f"models: {label} failed: {type(error).__name__}: "
                             f"{str(error)[:300]}")
                print(f"  {label}: FAILED ({type(error).__name__}: {str(error)[:200]})",
                      flush=True)
                traceback.print_exc(limit=3)
                _free(device)
                continue
            records.append(_base(env, "models", depth=None, **rec))
            print(f"  {label}: act. peak {rec['activation_peak_bytes'] / 2**20:.1f} MiB, held "
                  f"{rec['held_bytes'] / 2**20:.1f} MiB"
                  + (f", floor x{rec['floor_ratio']:.2f}" if "floor_ratio" in rec else "")
                  + f" [{time.perf_counter() - start:.0f} s]", flush=True)
            if on_record:
                on_record(records)
    _time_models(records, entries, p, device, notes)
    for rec in records:
        rec.setdefault("step_s", None)
    return records


def _time_models(records, entries, p, device, notes) -> None:
    """Step time of each family's variants, interleaved (fp32 only)."""
    families: dict[str, list] = {}
    for e in entries:
        families.setdefault(e["family"], []).append(e)
    for family, members in families.items():
        steps, built = {}, []
        try:
            for e in members:
                wrapped, x, _ = build_entry(e, p["model_batch"], device)
                built.append(wrapped)
                steps[f"{e['label']}|{e['mode']}"] = training_step(wrapped, x,
                                                                   loss_fn=lambda out: out)
            timing = time_interleaved(steps, p["model_repeats"], 1, device)
        except Exception as error:
            notes.append(f"models: timing {family} failed: {type(error).__name__}: "
                         f"{str(error)[:300]}")
            _free(device)
            continue
        finally:
            del built
        for rec in records:
            k = f"{rec['model']}|{rec['mode']}"
            if k in timing and rec["precision"] == "fp32":
                rec["step_s"] = timing[k]["median_s"]
                rec["repeats"] = p["model_repeats"]
        _free(device)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- drift


def _grads(model: nn.Module, x: Tensor, precision: str) -> tuple[Tensor, Tensor]:
    """Output and flat (input grad, parameter grads) of the square loss under ``precision``."""
    x = x.detach().clone().requires_grad_(True)
    with _autocast(x.device, precision):
        out = model(x)
    square_loss(out).backward()
    flat = torch.cat([x.grad.flatten().double()]
                     + [q.grad.flatten().double() for q in model.parameters()])
    for q in model.parameters():
        q.grad = None
    return out.detach(), flat


def _autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return torch.autocast(device.type, enabled=False)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return torch.autocast(device.type, dtype=dtype)


def drift_records(env: dict[str, Any], p: dict[str, Any],
                  device: torch.device) -> list[dict[str, Any]]:
    """Reconstruction and gradient error of the reversible stack against its stored twin."""
    precisions = ["fp32", "bf16"] + (["fp16"] if device.type == "cuda" else [])
    records = []
    for depth in p["drift_depths"]:
        stored = coupling_stack(depth, p["channels"], "stored", seed=depth).to(device)
        reversible = copy.deepcopy(stored)
        reversible.memory = MemoryMode.REVERSIBLE
        gen = torch.Generator().manual_seed(depth)
        x = torch.randn(p["drift_batch"], p["channels"], p["drift_size"], p["drift_size"],
                        generator=gen).to(device)
        ref64 = copy.deepcopy(stored).double()
        _, g64 = _grads(ref64, x.double(), "fp32")
        for precision in precisions:
            out_s, g_s = _grads(stored, x, precision)
            _, g_r = _grads(reversible, x, precision)
            with torch.no_grad(), _autocast(device, precision):
                probe = copy.deepcopy(reversible)  # inverse() in train mode moves BN statistics
                x_rec = probe.inverse(probe(x))
            err = (x_rec.float() - x).abs().max().item()
            records.append(_base(
                env, "drift", model=f"coupling-stack-c{p['channels']}-{p['drift_size']}px",
                depth=depth, batch=p["drift_batch"], mode="reversible", precision=precision,
                reconstruction_max_abs=err,
                reconstruction_rel=err / x.abs().max().item(),
                grad_rel_err_vs_stored=((g_r - g_s).norm() / g_s.norm()).item(),
                grad_max_rel_err_vs_stored=((g_r - g_s).abs().max() / g_s.abs().max()).item(),
                grad_cosine_vs_stored=torch.nn.functional.cosine_similarity(
                    g_r, g_s, dim=0).item(),
                stored_grad_rel_err_vs_fp64=((g_s - g64).norm() / g64.norm()).item(),
                output_dtype=str(out_s.dtype).replace("torch.", ""),
                method="inverse(forward(x)) under the precision; gradients of input and all "
                       "parameters, reversible vs stored twin with the same weights",
                step_s=None,
            ))
    return records


# ----------------------------------------------------------------------------- driver


_SECTIONS = {"stack": ("stack_depth", "stack_batch"), "rss": ("rss",), "models": ("models",),
             "drift": ("drift",)}


def _kept(out: Path | None, sections: list[str]) -> dict[str, Any] | None:
    """What ``--merge`` keeps of an earlier result: the records of the sections not rerun."""
    if out is None or not Path(out).exists():
        return None
    import json

    old = json.loads(Path(out).read_text())
    rerun = {name for s in sections for name in _SECTIONS.get(s, (s,))}
    kept = [r for r in old["records"] if r["section"] not in rerun]
    if not kept:
        return None
    return {"records": kept, "environment": old["environment"],
            "sections": sorted({r["section"] for r in kept}),
            "notes": [n for n in old.get("notes", []) if n.split(":")[0] not in rerun],
            "durations_s": {k: v for k, v in old.get("durations_s", {}).items()
                            if k not in rerun}}


def run_all(profile: str, device: torch.device, sections: list[str],
            out: Path | None = None, time_budget: float | None = None,
            merge: bool = False) -> dict[str, Any]:
    """Run the ``sections`` of ``profile`` on ``device``; returns ``{environment, records, ...}``.

    With ``out``, the result is written there after every section and every model record;
    with ``merge``, the records an earlier result in ``out`` has for the other sections are
    kept (with that run's environment under ``merged``). A section that raises is noted and
    the run goes on; once ``time_budget`` seconds have passed, the sections left are skipped
    (noted).
    """
    p = PROFILES[profile]
    env = environment(device)
    notes: list[str] = []
    records: list[dict[str, Any]] = []
    durations: dict[str, float] = {}
    kept = _kept(out, sections) if merge else None
    result = {"profile": profile, "config": {k: v for k, v in p.items()}, "environment": env,
              "durations_s": durations, "notes": notes, "records": records}
    if kept:
        result["merged"] = [{"sections": kept["sections"], "environment": kept["environment"]}]
    begin = time.perf_counter()

    def save(extra: list[dict[str, Any]] | None = None) -> None:
        if out is not None:
            payload = dict(result, records=records + (extra or []))
            if kept:
                payload["records"] = kept["records"] + payload["records"]
                payload["notes"] = kept["notes"] + notes
                payload["durations_s"] = {**kept["durations_s"], **durations}
            write_json(out, payload)

    def timed(name: str, fn) -> None:
        if time_budget is not None and time.perf_counter() - begin > time_budget:
            notes.append(f"{name}: skipped, the time budget of {time_budget:.0f} s was spent")
            print(f"[{profile}/{device.type}] {name}: skipped (time budget)", flush=True)
            return
        print(f"[{profile}/{device.type}] {name} ...", flush=True)
        start = time.perf_counter()
        try:
            records.extend(fn())
        except Exception as error:  # keep what the other sections measure
            notes.append(f"{name}: failed: {type(error).__name__}: {str(error)[:300]}")
            traceback.print_exc(limit=5)
            _free(device)
        durations[name] = time.perf_counter() - start
        print(f"[{profile}/{device.type}] {name}: {durations[name]:.1f} s "
              f"(total {time.perf_counter() - begin:.0f} s)", flush=True)
        save()

    if "models" in sections:  # first: on a lent GPU the headline figures matter most
        timed("models", lambda: model_records(env, p, device, notes, on_record=save))
    if "stack" in sections:
        timed("stack_depth", lambda: [r for d in p["depths"] for r in stack_records(
            env, p, device, d, p["batch"], "stack_depth", d in p["time_depths"])])
        timed("stack_batch", lambda: [r for b in p["batches"] for r in stack_records(
            env, p, device, p["batch_depth"], b, "stack_batch", True)])
    if "rss" in sections and device.type == "cpu" and p["rss"]:
        timed("rss", lambda: rss_records(env, p))
    if "drift" in sections:
        timed("drift", lambda: drift_records(env, p, device))
    env["load_average_at_end"] = list(os.getloadavg())
    save()
    if kept:  # what was written: the kept records too
        result["records"] = kept["records"] + records
        result["notes"] = kept["notes"] + notes
    return result


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="small sizes, < 10 min on 2 CPU cores")
    size.add_argument("--smoke", action="store_true", help="tiny sizes, seconds (for tests)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="auto: CPU, and CUDA too when available (separate files); cuda "
                             "alone runs the 'cuda' profile unless --quick or --smoke is given")
    parser.add_argument("--sections", default="stack,rss,models,drift",
                        help="comma-separated subset of stack,rss,models,drift")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: 1 for --quick and --smoke, whose small "
                             "tensors gain little from more and, on a shared machine, lose a lot "
                             "to OpenMP threads spinning against other processes; what torch "
                             "chooses for the full profile)")
    parser.add_argument("--time-budget", type=float, default=None,
                        help="seconds per device after which the remaining sections are "
                             "skipped (default: 300 for the cuda profile, none otherwise)")
    parser.add_argument("--merge", action="store_true",
                        help="keep the records an existing result file has for the sections "
                             "not run now (e.g. --sections models --merge)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args(argv)
    cpu_profile = "smoke" if args.smoke else "quick" if args.quick else "full"
    threads = args.threads or (1 if cpu_profile in ("quick", "smoke") else None)
    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    devices = [torch.device("cpu")] if args.device in ("auto", "cpu") else []
    if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            parser.error("--device cuda: torch sees no CUDA device here "
                         f"(torch {torch.__version__}, CUDA build {torch.version.cuda})")
        devices.append(torch.device("cuda"))
    # the RSS subprocess imports benchmarks.common: make the repository importable there
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    written = []
    start = time.perf_counter()
    for device in devices:
        profile = cpu_profile
        if device.type == "cuda" and not (args.quick or args.smoke):
            profile = "cuda"
        budget = args.time_budget or (300.0 if profile == "cuda" else None)
        path = args.out / f"run_{profile}_{device.type}.json"
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*TypedStorage is deprecated.*")
            warnings.filterwarnings("ignore", category=FutureWarning, module="memcnn")
            result = run_all(profile, device, sections, out=path, time_budget=budget,
                             merge=args.merge)
        written.append(path)
        print(f"wrote {path}")
        for note in result["notes"]:
            print("note:", note)
    try:
        from benchmarks.plots import make_plots

        written += make_plots(args.out)
    except Exception as error:  # plots are a convenience: the JSON and tables matter
        print(f"plots failed: {type(error).__name__}: {error}")
    from benchmarks.tables import write_tables

    written.append(write_tables(args.out))
    print(f"total {time.perf_counter() - start:.1f} s; wrote {', '.join(map(str, written))}")
    torch.set_num_threads(previous_threads)
    return written


if __name__ == "__main__":
    main()
