"""PNG plots of the benchmark records: memory against depth, step-time ratio, per mode.

One pair of figures per result file ``run_<profile>_<device>.json`` (CPU and CUDA figures are
never drawn on the same axes):

* ``<profile>_<device>_memory_vs_depth.png``: activation peak (peak of the step minus the
  parameter gradients) and bytes held between forward and backward, against stack depth;
* ``<profile>_<device>_time_ratio.png``: step time over the stored mode's, against depth.

Usage: ``python benchmarks/plots.py [results folder]``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import MODES, REPO

__all__ = ["make_plots"]

_STYLE = {"stored": ("tab:red", "o"), "checkpoint": ("tab:orange", "s"),
          "memcnn": ("tab:blue", "^"), "reversible": ("tab:green", "D")}
_MIB = 2**20


def _series(records: list[dict], key: str, mode: str) -> tuple[list[int], list[float]]:
    points = sorted((r["depth"], r[key]) for r in records
                    if r["section"] == "stack_depth" and r["mode"] == mode
                    and r.get(key) is not None)
    return [d for d, _ in points], [v for _, v in points]


def make_plots(folder: Path) -> list[Path]:
    """Draw the figures of every ``run_*.json`` in ``folder``; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for path in sorted(Path(folder).glob("run_*.json")):
        result = json.loads(path.read_text())
        records = result["records"]
        if not any(r["section"] == "stack_depth" for r in records):
            continue
        stem = path.stem.removeprefix("run_")
        env = result["environment"]
        title = f"{env['device']}, torch {env['torch']} ({result['profile']})"
        config = result["config"]
        shape = f"{config['channels']} ch, {config['size']}x{config['size']}, batch {config['batch']}"

        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        for ax, key, label in ((axes[0], "activation_peak_bytes", "activation peak (MiB)"),
                               (axes[1], "held_bytes", "held between forward and backward (MiB)")):
            for mode in MODES:
                depths, values = _series(records, key, mode)
                color, marker = _STYLE[mode]
                ax.plot(depths, [v / _MIB for v in values], marker=marker, color=color, label=mode)
            ax.set_xlabel("stack depth (couplings)")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
        axes[0].legend()
        fig.suptitle(f"Coupling stack memory per training step ({shape})\n{title}", fontsize=10)
        fig.tight_layout()
        out = Path(folder) / f"{stem}_memory_vs_depth.png"
        fig.savefig(out, dpi=110)
        plt.close(fig)
        written.append(out)

        fig, ax = plt.subplots(figsize=(6, 4.2))
        for mode in MODES:
            depths, ratios = _series(records, "step_ratio_to_stored", mode)
            color, marker = _STYLE[mode]
            ax.plot(depths, ratios, marker=marker, color=color, label=mode)
        ax.axhline(1.25, color="gray", linestyle="--", linewidth=1, label="target 1.25")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("stack depth (couplings)")
        ax.set_ylabel("step time / stored step time")
        ax.grid(alpha=0.3)
        ax.legend()
        ax.set_title(f"Training-step time ratio ({shape})\n{title}", fontsize=9)
        fig.tight_layout()
        out = Path(folder) / f"{stem}_time_ratio.png"
        fig.savefig(out, dpi=110)
        plt.close(fig)
        written.append(out)
    return written


if __name__ == "__main__":
    for written_path in make_plots(Path(sys.argv[1]) if len(sys.argv) > 1
                                   else REPO / "benchmarks" / "results"):
        print(written_path)
