"""Markdown tables generated from the benchmark JSON files, with the targets checked.

Reads ``engine*.json`` and every ``run_<profile>_<device>.json`` in the results folder and
writes ``README.md`` there. Each table says which device, torch version, command and
measurement method its figures come from; CPU and CUDA results get separate tables.

Usage: ``python benchmarks/tables.py [results folder]``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from benchmarks.common import MODES, REPO

__all__ = ["write_tables", "engine_table", "run_tables", "linear_fit", "model_ratios"]

_MIB = 2**20
# (baseline label, baseline mode, reversible label, target, memcnn's published ratio)
MODEL_TARGETS = [("resnet110", "stored", "revnet110", 12.0, 9.5),
                 ("resnet164", "stored", "revnet164", 8.0, 5.7),
                 ("resnet110", "stored", "revnet110+ckpt", 12.0, 9.5),
                 ("resnet164", "stored", "revnet164+ckpt", 8.0, 5.7),
                 ("resnet110", "stored", "memcnn-revnet110", None, 9.5),
                 ("resnet164", "stored", "memcnn-revnet164", None, 5.7),
                 ("memcnn-resnet110", "stored", "memcnn-revnet110", None, 9.5),
                 ("memcnn-resnet164", "stored", "memcnn-revnet164", None, 5.7)]
_PEAK = ("activation peak = peak of one training step after a warm-up, minus what was held "
         "before it, minus the parameter gradients")


def _mib(n: float | None) -> str:
    return "—" if n is None else f"{n / _MIB:.2f}"


def _ms(s: float | None) -> str:
    return "—" if s is None else f"{s * 1e3:.1f}"


def _env_line(env: dict[str, Any]) -> str:
    load = env.get("load_average_at_start")
    load_s = f", load average at start {load[0]:.1f}" if load else ""
    return (f"Device: {env['device']}; torch {env['torch']}; {env['threads']} threads"
            f"{load_s}; command `{env['command']}`; commit {env.get('git_commit')}; "
            f"{env['date_utc']}.")


def linear_fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Slope and coefficient of determination R^2 of the least-squares line through the points."""
    x, y = np.asarray(xs, float), np.asarray(ys, float)
    slope, intercept = np.polyfit(x, y, 1)
    residual = float(((y - (slope * x + intercept)) ** 2).sum())
    total = float(((y - y.mean()) ** 2).sum())
    return float(slope), 1.0 - residual / total if total > 0 else 1.0


def engine_table(record: dict[str, Any]) -> list[str]:
    """The training-step table of ``benchmarks/engine.py``."""
    c = record["config"]
    t = record["targets"]
    lines = [
        f"### Engine: training-step time (benchmarks/engine.py, "
        f"{record['environment']['threads']} threads)",
        "",
        f"Conv coupling stack, depth {c['depth']}, {c['channels']} channels, "
        f"{c['size']}x{c['size']}, batch {c['batch']} (additive couplings, f and g = "
        f"{c['subnet']}); forward + backward of a mean-square loss; median of {c['repeats']} "
        f"interleaved rounds after {c['warmup']} warm-up rounds.",
        _env_line(record["environment"]),
        "",
        "| mode | step (ms) | IQR (ms) | / stored | peak (MiB) | held (MiB) | grad diff vs stored |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for m in MODES:
        tm = record["timing"][m]
        mem = record.get("memory", {}).get(m, {})
        lines.append(
            f"| {m} | {_ms(tm['median_s'])} | {_ms(tm['q1_s'])}–{_ms(tm['q3_s'])} | "
            f"{record['ratio_to_stored'][m]:.3f} | {_mib(mem.get('peak_bytes'))} | "
            f"{_mib(mem.get('held_bytes'))} | "
            f"{record['gradient_max_rel_diff_vs_stored'][m]:.1e} |")
    ratio = record["ratio_to_stored"]["reversible"]
    speedup = record["reversible_speedup_over_memcnn"]
    lines += [
        "",
        f"- reversible / stored = **{ratio:.3f}** (target ≤ {t['reversible_over_stored_max']}: "
        f"{'met' if t['reversible_over_stored_met'] else 'MISSED'})",
        f"- reversible is **{speedup:.3f}x** faster than memcnn (target ≥ "
        f"{t['speedup_over_memcnn_min']}x: {'met' if t['speedup_over_memcnn_met'] else 'MISSED'})",
    ]
    if "ideal" in record:
        ideal = record["ideal"]
        lines += [
            f"- sub-network evaluations per step: {record['subnet_calls_per_step']}",
            f"- a no-grad forward of the stack takes {_ms(ideal['forward_no_grad_s'])} ms; a stored "
            f"step plus one (the fused algorithm's extra evaluation) predicts a ratio of "
            f"{ideal['reversible_over_stored']:.3f}, plus two (memcnn's) "
            f"{ideal['memcnn_over_stored']:.3f}; measured / predicted: reversible "
            f"{ideal['reversible_over_ideal']:.3f}, memcnn {ideal['memcnn_over_ideal']:.3f}",
        ]
    return lines + [""]


def model_ratios(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Activation-memory ratios baseline / reversible for the model pairs that were measured.

    One row per pair and precision: the targets' pairs first, then each model against its own
    stored twin. ``activation_peak_ratio`` and ``held_ratio`` divide the baseline's figure by
    the reversible one's, both measured the same way in the same run.
    """
    models = [r for r in records if r["section"] == "models"]
    out = []
    for precision in sorted({r.get("precision", "fp32") for r in models}):
        by = {(r["model"], r["mode"]): r for r in models
              if r.get("precision", "fp32") == precision}
        pairs = list(MODEL_TARGETS)
        for label in sorted({m for m, _ in by}):
            if (label, "stored") in by and (label, "reversible") in by:
                pairs.append((label, "stored", label, None, None))
        for base, mode, rev, target, published in pairs:
            b, r = by.get((base, mode)), by.get((rev, "reversible"))
            if b is None or r is None:
                continue
            ratio = b["activation_peak_bytes"] / r["activation_peak_bytes"]
            out.append({"baseline": f"{base} ({mode})", "reversible": f"{rev} (reversible)",
                        "precision": precision, "activation_peak_ratio": ratio,
                        "held_ratio": b["held_bytes"] / r["held_bytes"],
                        "time_ratio": (r["step_s"] / b["step_s"]
                                       if r.get("step_s") and b.get("step_s") else None),
                        "target": target, "published_memcnn": published,
                        "met": None if target is None else ratio >= target,
                        "method": r.get("method")})
    return out


def _model_tables(records: list[dict[str, Any]], config: dict[str, Any]) -> list[str]:
    models = [r for r in records if r["section"] == "models"]
    if not models:
        return []
    methods = ", ".join(sorted({r["method"] for r in models}))
    lines = [f"### Whole models (batch {config['model_batch']}, synthetic inputs)", ""]
    if any("rng_state_bytes" not in r for r in models):
        lines += ["These records predate the counting of RNG states (`rng_state_bytes` "
                  "missing): held and peak figures of models that draw random numbers "
                  "(i-RevNet's dropout) or checkpoint layers are too low; rerun "
                  "`python benchmarks/run.py --sections models --merge`.", ""]
    lines += [f"Classifiers: cross-entropy; flows: negative log-likelihood. Act. peak: {_PEAK}; "
             "held = kept between forward and backward (RNG states included on CPU, shown "
             f"apart); measured with {methods}. `+ckpt` = RevNet with "
             "`irreversible_memory=\"checkpoint\"` (stem, stride-2 transitions and head "
             "checkpointed). `memcnn-*` = memcnn's own ports (`memcnn.models.resnet.ResNet`, "
             "its experiments.json settings; RevNet-110's first wrapper patched with "
             "`keep_input=True` to train under torch 2.x). Floor = output of the invertible "
             "part + the largest unit's working set (its stored step in isolation); "
             "`/ floor` = act. peak / floor. Step time: median of interleaved repeats "
             "(fp32 only).", "",
             "| model | impl | mode | precision | params | act. peak (MiB) | held (MiB) | "
             "RNG states held (KiB) | floor (MiB) | act. peak / floor | step (s) |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in models:
        step = "—" if r.get("step_s") is None else f"{r['step_s']:.2f}"
        rng = r.get("rng_state_bytes")
        floor = r.get("floor_bytes")
        rng_s = "—" if rng is None else f"{rng / 1024:.1f}"
        ratio = "—" if floor is None else f"{r['floor_ratio']:.2f}"
        lines.append(
            f"| {r['model']} | {r.get('impl', 'revtrain')} | {r['mode']} | "
            f"{r.get('precision', 'fp32')} | {r['params'] / 1e6:.2f}M | "
            f"{_mib(r['activation_peak_bytes'])} | {_mib(r['held_bytes'])} | "
            f"{rng_s} | {_mib(floor)} | {ratio} | {step} |")
    lines += ["", "Ratios, baseline / reversible, both measured the same way in the same run "
              f"({methods}): **act. peak ratio** = baseline act. peak / reversible act. peak; "
              "**held ratio** = baseline held / reversible held; time ratio = reversible step "
              "/ baseline step. memcnn's published figure is its GPU activation-memory ratio.",
              "",
              "| baseline | reversible | precision | act. peak ratio | held ratio | time ratio | "
              "target (act. peak ratio) | memcnn published |",
              "|---|---|---|---:|---:|---:|---:|---:|"]
    for q in model_ratios(records):
        target = "—" if q["target"] is None else (
            f"≥ {q['target']:g} ({'met' if q['met'] else 'MISSED'})")
        pub = "—" if q["published_memcnn"] is None else f"{q['published_memcnn']:g}"
        time_ratio = "—" if q["time_ratio"] is None else f"{q['time_ratio']:.2f}"
        lines.append(f"| {q['baseline']} | {q['reversible']} | {q['precision']} | "
                     f"{q['activation_peak_ratio']:.2f} | {q['held_ratio']:.2f} | "
                     f"{time_ratio} | {target} | {pub} |")
    lines.append("")
    return lines


def run_tables(result: dict[str, Any]) -> list[str]:
    """All tables of one ``run_<profile>_<device>.json``."""
    env, records, config = result["environment"], result["records"], result["config"]
    device = env["device_type"].upper()
    lines = [f"## {device} — profile `{result['profile']}`", "", _env_line(env), ""]
    for earlier in result.get("merged", []):
        lines += [f"Sections {', '.join(earlier['sections'])} were kept from an earlier run "
                  f"(`--merge`): {_env_line(earlier['environment'])}", ""]
    if result.get("durations_s"):
        parts = ", ".join(f"{k} {v:.0f} s" for k, v in result["durations_s"].items())
        lines += [f"Section durations: {parts}.", ""]
    method = sorted({r["method"] for r in records if r["section"].startswith("stack")})
    stack = [r for r in records if r["section"] == "stack_depth"]
    if stack:
        lines += [
            f"### Coupling stack over depth ({config['channels']} ch, {config['size']}x"
            f"{config['size']}, batch {config['batch']})",
            "",
            "Activation peak = peak of one training step (after a warm-up) minus what was held "
            "before it, minus the parameter gradients; held = bytes kept between forward and "
            f"backward. Memory method: {', '.join(method)} (memcnn frees storages by resizing "
            "them, so it is counted with the resize-aware tracker). Time: median of "
            f"{config['repeats']} interleaved repeats, `/ stored` = step time over the stored "
            "mode's at the same depth.",
            "",
            "| depth | " + " | ".join(f"{m} act. peak / held (MiB)" for m in MODES)
            + " | " + " | ".join(f"{m} ms (/ stored)" for m in MODES) + " |",
            "|---:|" + "---:|" * (2 * len(MODES)),
        ]
        for depth in sorted({r["depth"] for r in stack}):
            row = {r["mode"]: r for r in stack if r["depth"] == depth}
            mem = " | ".join(f"{_mib(row[m]['activation_peak_bytes'])} / "
                             f"{_mib(row[m]['held_bytes'])}" for m in MODES)
            tim = " | ".join(
                "—" if row[m].get("step_s") is None else
                f"{_ms(row[m]['step_s'])} ({row[m]['step_ratio_to_stored']:.2f})" for m in MODES)
            lines.append(f"| {depth} | {mem} | {tim} |")
        lines += ["", "Growth with depth (activation peak):", ""]
        depths = sorted({r["depth"] for r in stack})
        lo, hi = depths[0], depths[-1]
        for m in MODES:
            pts = sorted((r["depth"], r["activation_peak_bytes"]) for r in stack if r["mode"] == m)
            first, last = pts[0][1], pts[-1][1]
            slope, r2 = linear_fit([d for d, _ in pts], [v for _, v in pts])
            verdict = ""
            if m == "reversible":
                verdict = (f" — target: depth {hi} within 5% of depth {lo}: "
                           f"{'met' if last <= 1.05 * first else 'MISSED'}")
            lines.append(f"- {m}: depth {hi} / depth {lo} = {last / first:.3f}x; linear fit "
                         f"{slope / 1024:.1f} KiB per layer, R² = {r2:.4f}{verdict}")
        lines.append("")
    batch = [r for r in records if r["section"] == "stack_batch"]
    if batch:
        lines += [f"### Coupling stack over batch size (depth {config['batch_depth']})", "",
                  "| batch | " + " | ".join(f"{m} act. peak (MiB)" for m in MODES) + " | "
                  + " | ".join(f"{m} ms (/ stored)" for m in MODES) + " |",
                  "|---:|" + "---:|" * (2 * len(MODES))]
        for b in sorted({r["batch"] for r in batch}):
            row = {r["mode"]: r for r in batch if r["batch"] == b}
            mem = " | ".join(_mib(row[m]["activation_peak_bytes"]) for m in MODES)
            tim = " | ".join(f"{_ms(row[m]['step_s'])} ({row[m]['step_ratio_to_stored']:.2f})"
                             for m in MODES)
            lines.append(f"| {b} | {mem} | {tim} |")
        lines.append("")
    rss = [r for r in records if r["section"] == "rss"]
    if rss:
        tensor = {(r["depth"], r["mode"]): r for r in stack}
        lines += ["### Cross-check: process RSS in a fresh subprocess", "",
                  "Growth of the resident set during one step, the kernel's peak-RSS mark reset "
                  "before the step (`/proc/self/clear_refs`): cold = first step of the process "
                  "(one-off allocations included), warm = second step (the allocator may reuse "
                  "memory it kept). `subprocess_peak_rss` = revtrain.memory's `ru_maxrss` "
                  "growth, which cannot rise above a peak inherited from a large parent "
                  "process (reads 0 then).", "",
                  "| depth | mode | RSS cold (MiB) | RSS warm (MiB) | subprocess_peak_rss (MiB) "
                  "| tensor-level peak (MiB) |", "|---:|---|---:|---:|---:|---:|"]
        for r in rss:
            t = tensor.get((r["depth"], r["mode"]))
            lines.append(f"| {r['depth']} | {r['mode']} | {_mib(r['rss_cold_delta_bytes'])} | "
                         f"{_mib(r['rss_warm_delta_bytes'])} | "
                         f"{_mib(r['subprocess_peak_rss_delta_bytes'])} | "
                         f"{_mib(t['peak_bytes']) if t else '—'} |")
        lines.append("")
        for mode in MODES:
            pts = sorted((r["depth"], r["rss_cold_delta_bytes"]) for r in rss if r["mode"] == mode)
            lo, hi = (pts[0], pts[-1]) if len(pts) > 1 else (None, None)
            if lo is None or (lo[0], mode) not in tensor or (hi[0], mode) not in tensor:
                continue
            growth = tensor[(hi[0], mode)]["peak_bytes"] - tensor[(lo[0], mode)]["peak_bytes"]
            lines.append(f"- {mode}: from depth {lo[0]} to {hi[0]} the cold RSS growth rises by "
                         f"{_mib(hi[1] - lo[1])} MiB, the tensor-level peak by {_mib(growth)} MiB")
        lines.append("")
    lines += _model_tables(records, config)
    drift = [r for r in records if r["section"] == "drift"]
    if drift:
        lines += ["### Reconstruction and gradient drift (reversible vs stored twin)", "",
                  "Reconstruction: max |inverse(forward(x)) - x| / max |x| under the precision. "
                  "Gradient error: ‖g_rev − g_stored‖ / ‖g_stored‖ over the input and all "
                  "parameter gradients, same weights, same precision; for scale, the stored "
                  "twin's own error against float64.", "",
                  "| depth | precision | reconstruction (rel.) | grad rel. error | grad cosine | "
                  "stored vs fp64 |", "|---:|---|---:|---:|---:|---:|"]
        for r in drift:
            lines.append(f"| {r['depth']} | {r['precision']} | {r['reconstruction_rel']:.2e} | "
                         f"{r['grad_rel_err_vs_stored']:.2e} | {r['grad_cosine_vs_stored']:.6f} | "
                         f"{r['stored_grad_rel_err_vs_fp64']:.2e} |")
        lines.append("")
    if result.get("notes"):
        lines += ["Notes:", ""] + [f"- {n}" for n in result["notes"]] + [""]
    stem = f"{result['profile']}_{env['device_type']}"
    for png in (f"{stem}_memory_vs_depth.png", f"{stem}_time_ratio.png"):
        lines.append(f"![{png}]({png})")
    lines.append("")
    return lines


def write_tables(folder: Path) -> Path:
    """Write ``README.md`` in ``folder`` from the JSON results there; returns its path."""
    folder = Path(folder)
    lines = ["# revtrain benchmark results", "",
             "Generated by `benchmarks/tables.py` from the JSON files in this folder "
             "(`python benchmarks/run.py [--quick]`, `python benchmarks/engine.py`). "
             "Every figure was measured on the device named next to it; CPU and CUDA results "
             "are kept in separate tables.", ""]
    for engine in sorted(folder.glob("engine*.json")):
        lines += engine_table(json.loads(engine.read_text()))
    for path in sorted(folder.glob("run_*.json")):
        lines += run_tables(json.loads(path.read_text()))
    out = folder / "README.md"
    out.write_text("\n".join(lines))
    return out


if __name__ == "__main__":
    print(write_tables(Path(sys.argv[1]) if len(sys.argv) > 1
                       else REPO / "benchmarks" / "results"))
