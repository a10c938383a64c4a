"""Memory, step time and reconstruction drift: revtrain against stored, checkpoint and memcnn.

Sections (each writes records ``{section, model, depth, batch, mode, device, torch, peak_bytes,
held_bytes, step_s, method, ...}``):

* ``stack_depth`` / ``stack_batch``: the conv coupling stack of :mod:`benchmarks.common` swept
  over depth and batch size in the four modes (stored, checkpoint, memcnn, reversible). Memory
  of one training step after a warm-up (CPU: the deterministic tensor-level count of
  :func:`revtrain.memory.measure_step`; CUDA: the allocator's peak); time: median of
  interleaved repeats.
* ``rss``: process peak RSS of one step in a fresh subprocess, for a few stack points, as a
  cross-check of the tensor-level count (CPU only).
* ``models``: ResNet-110 / RevNet-110, ResNet-164 / RevNet-164, i-RevNet, Glow from
  ``revtrain.models``, stored against reversible; a model not registered is skipped with a note.
* ``drift``: reconstruction error of ``inverse(forward(x))`` and the gradient error of the
  reversible stack against its stored twin, over depth and precision (fp32; bf16 autocast;
  fp16 autocast on CUDA).

Usage::

    python benchmarks/run.py --quick     # < 5 min on 2 CPU cores
    python benchmarks/run.py             # full sizes
    python benchmarks/run.py --smoke --out /tmp/bench   # tiny, for the tests

Each device gets its own file ``run_<profile>_<device>.json`` under ``--out``
(``benchmarks/results`` by default); CPU and CUDA records are never mixed in one ratio. The
Markdown tables (``README.md``) and the PNG plots are regenerated from all result files there.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
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
from revtrain import MemoryMode

__all__ = ["PROFILES", "MODEL_SPECS", "main", "run_all"]

# sizes of each profile: stack (channels, size, batch), sweeps, repeats, model batch
PROFILES: dict[str, dict[str, Any]] = {
    "smoke": {"channels": 8, "size": 8, "batch": 2, "depths": [2, 4, 8], "time_depths": [2, 8],
              "batch_depth": 4, "batches": [1, 2], "repeats": 1, "warmup": 1,
              "rss": [], "models": "smoke", "model_batch": 2, "model_repeats": 1,
              "drift_depths": [2, 4], "drift_size": 8, "drift_batch": 2},
    "quick": {"channels": 32, "size": 16, "batch": 4, "depths": [8, 16, 32, 64, 128],
              "time_depths": [8, 32, 128], "batch_depth": 16, "batches": [2, 8, 32],
              "repeats": 3, "warmup": 1, "rss": [(8, "stored"), (128, "stored"),
                                                 (8, "reversible"), (128, "reversible")],
              "models": "quick", "model_batch": 8, "model_repeats": 2,
              "drift_depths": [8, 32, 128], "drift_size": 16, "drift_batch": 4},
    "full": {"channels": 32, "size": 32, "batch": 16, "depths": [8, 16, 32, 64, 128],
             "time_depths": [8, 16, 32, 64, 128], "batch_depth": 32, "batches": [4, 8, 16, 32, 64],
             "repeats": 7, "warmup": 2,
             "rss": [(8, m) for m in MODES] + [(128, m) for m in MODES],
             "models": "full", "model_batch": 32, "model_repeats": 5,
             "drift_depths": [8, 32, 128], "drift_size": 32, "drift_batch": 8},
}

# whole models: (label, registry name, memory mode, kwargs, input shape without batch, loss)
_CIFAR = (3, 32, 32)
_GLOW_SMALL = {"steps": 8, "hidden": 128, "levels": 3}
_GLOW_TINY = {"in_channels": 1, "image_size": 8, "levels": 1, "steps": 2, "hidden": 8}
MODEL_SPECS: dict[str, list[tuple[str, str, str, dict, tuple[int, ...], str]]] = {
    "smoke": [
        ("revnet_digits", "revnet_digits", "stored", {}, (1, 8, 8), "ce"),
        ("revnet_digits", "revnet_digits", "reversible", {}, (1, 8, 8), "ce"),
        ("glow-tiny", "glow", "stored", _GLOW_TINY, (1, 8, 8), "nll"),
        ("glow-tiny", "glow", "reversible", _GLOW_TINY, (1, 8, 8), "nll"),
    ],
    "quick": [
        ("resnet110", "resnet110", "stored", {}, _CIFAR, "ce"),
        ("revnet110", "revnet110", "stored", {}, _CIFAR, "ce"),
        ("revnet110", "revnet110", "reversible", {}, _CIFAR, "ce"),
        ("resnet164", "resnet164", "stored", {}, _CIFAR, "ce"),
        ("revnet164", "revnet164", "stored", {}, _CIFAR, "ce"),
        ("revnet164", "revnet164", "reversible", {}, _CIFAR, "ce"),
        ("irevnet", "irevnet", "stored", {}, _CIFAR, "ce"),
        ("irevnet", "irevnet", "reversible", {}, _CIFAR, "ce"),
        ("glow-K8-h128", "glow", "stored", _GLOW_SMALL, _CIFAR, "nll"),
        ("glow-K8-h128", "glow", "reversible", _GLOW_SMALL, _CIFAR, "nll"),
    ],
}
MODEL_SPECS["full"] = MODEL_SPECS["quick"] + [
    ("revnet110", "revnet110", "checkpoint", {}, _CIFAR, "ce"),
    ("revnet164", "revnet164", "checkpoint", {}, _CIFAR, "ce"),
    ("glow-K32-h512", "glow", "stored", {}, _CIFAR, "nll"),
    ("glow-K32-h512", "glow", "reversible", {}, _CIFAR, "nll"),
]


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
                             step_s=None))
    return records


# ----------------------------------------------------------------------------- whole models


class _Loss(nn.Module):
    """A model plus its training loss: ``forward(x)`` returns the scalar loss."""

    def __init__(self, model: nn.Module, kind: str, batch: int):
        super().__init__()
        self.model = model
        self.kind = kind
        self.register_buffer("labels", torch.arange(batch) % 10, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        if self.kind == "nll":
            return -self.model.log_prob(x).mean()
        return nn.functional.cross_entropy(self.model(x), self.labels)


def model_records(env: dict[str, Any], p: dict[str, Any], device: torch.device,
                  notes: list[str]) -> list[dict[str, Any]]:
    """Memory and step time of the whole models; skips (with a note) what is not registered."""
    import revtrain.models as zoo

    available = set(zoo.list_models())
    specs = MODEL_SPECS[p["models"]]
    built: dict[tuple[str, str], tuple[nn.Module, Tensor, dict]] = {}
    for label, name, mode, kwargs, shape, loss in specs:
        if name not in available:
            notes.append(f"models: {name} is not registered in revtrain.models yet; skipped")
            continue
        try:
            with torch.random.fork_rng():
                torch.manual_seed(0)
                model = zoo.create(name, memory=mode, **kwargs)
        except Exception as error:  # a model under construction elsewhere must not stop the run
            notes.append(f"models: create({name!r}, memory={mode!r}) failed: {error!r}; skipped")
            continue
        gen = torch.Generator().manual_seed(0)
        x = torch.rand(p["model_batch"], *shape, generator=gen)
        if loss == "ce":
            x = x * 2 - 1
        wrapped = _Loss(model, loss, p["model_batch"]).to(device).train()
        params = sum(q.numel() for q in model.parameters())
        built[(label, mode)] = (wrapped, x.to(device), {"registry_name": name, "kwargs": kwargs,
                                                        "params": params, "loss": loss,
                                                        "input_shape": list(shape)})
    records = []
    for (label, mode), (wrapped, x, info) in built.items():
        try:
            mem = measure_memory(wrapped, x, loss_fn=lambda out: out)
        except Exception as error:
            notes.append(f"models: measuring {label} ({mode}) failed: {error!r}; skipped")
            continue
        records.append(_base(env, "models", model=label, depth=None, batch=p["model_batch"],
                             mode=mode, **_memory_fields(mem), **info))
    # time each family's variants interleaved
    families: dict[str, dict[str, Any]] = {}
    for (label, mode), entry in built.items():
        family = label.replace("resnet", "revnet")
        families.setdefault(family, {})[f"{label}|{mode}"] = entry
    for entries in families.values():
        steps = {key: training_step(w, x, loss_fn=lambda out: out)
                 for key, (w, x, _) in entries.items()}
        try:
            timing = time_interleaved(steps, p["model_repeats"], 1, device)
        except Exception as error:
            notes.append(f"models: timing {sorted(entries)} failed: {error!r}")
            continue
        for rec in records:
            key = f"{rec['model']}|{rec['mode']}"
            if key in timing:
                rec["step_s"] = timing[key]["median_s"]
                rec["repeats"] = p["model_repeats"]
    for rec in records:
        rec.setdefault("step_s", None)
    return records


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


def run_all(profile: str, device: torch.device, sections: list[str]) -> dict[str, Any]:
    """Run the ``sections`` of ``profile`` on ``device``; returns ``{environment, records, ...}``."""
    p = PROFILES[profile]
    env = environment(device)
    notes: list[str] = []
    records: list[dict[str, Any]] = []
    durations: dict[str, float] = {}

    def timed(name: str, fn) -> None:
        start = time.perf_counter()
        records.extend(fn())
        durations[name] = time.perf_counter() - start
        print(f"[{profile}/{device.type}] {name}: {durations[name]:.1f} s", flush=True)

    if "stack" in sections:
        timed("stack_depth", lambda: [r for d in p["depths"] for r in stack_records(
            env, p, device, d, p["batch"], "stack_depth", d in p["time_depths"])])
        timed("stack_batch", lambda: [r for b in p["batches"] for r in stack_records(
            env, p, device, p["batch_depth"], b, "stack_batch", True)])
    if "rss" in sections and device.type == "cpu" and p["rss"]:
        timed("rss", lambda: rss_records(env, p))
    if "models" in sections:
        timed("models", lambda: model_records(env, p, device, notes))
    if "drift" in sections:
        timed("drift", lambda: drift_records(env, p, device))
    env["load_average_at_end"] = list(os.getloadavg())
    return {"profile": profile, "config": {k: v for k, v in p.items()}, "environment": env,
            "durations_s": durations, "notes": notes, "records": records}


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="small sizes, < 5 min on 2 CPU cores")
    size.add_argument("--smoke", action="store_true", help="tiny sizes, seconds (for tests)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="auto: CPU, and CUDA too when available (separate files)")
    parser.add_argument("--sections", default="stack,rss,models,drift",
                        help="comma-separated subset of stack,rss,models,drift")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: 1 for --quick and --smoke, whose small "
                             "tensors gain little from more and, on a shared machine, lose a lot "
                             "to OpenMP threads spinning against other processes; what torch "
                             "chooses for the full profile)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args(argv)
    profile = "smoke" if args.smoke else "quick" if args.quick else "full"
    threads = args.threads or (1 if profile in ("quick", "smoke") else None)
    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    devices = [torch.device("cpu")] if args.device in ("auto", "cpu") else []
    if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()):
        devices.append(torch.device("cuda"))
    # the RSS subprocess imports benchmarks.common: make the repository importable there
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    written = []
    start = time.perf_counter()
    for device in devices:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*TypedStorage is deprecated.*")
            warnings.filterwarnings("ignore", category=FutureWarning, module="memcnn")
            result = run_all(profile, device, sections)
        path = args.out / f"run_{profile}_{device.type}.json"
        write_json(path, result)
        written.append(path)
        print(f"wrote {path}")
        for note in result["notes"]:
            print("note:", note)
    from benchmarks.plots import make_plots
    from benchmarks.tables import write_tables

    written += make_plots(args.out)
    written.append(write_tables(args.out))
    print(f"total {time.perf_counter() - start:.1f} s; wrote {', '.join(map(str, written))}")
    torch.set_num_threads(previous_threads)
    return written


if __name__ == "__main__":
    main()
