"""What a training run writes besides checkpoints: metrics, quantizer traces and plots.

* `metrics.jsonl`: one line per step (loss, lr, grad norm, step time, quantization on/off);
* `quant_stats.jsonl`: every `stats_every` steps, per quantizer: amax, scale, the fractions that
  overflowed to Inf, flushed to zero or sat in HiF8's 1-mantissa-bit range (|x| >= 2^8 after scaling),
  and for delayed scaling `amax_vs_history` (this step's amax over the history amax its scale came
  from). These fail silently in the loss (amax saturation, precision loss, a lagging scale), so they
  are logged; the quantization pass gathers them itself (lpq.formats.api.fake_quant_stats);
* PNGs: the loss curves of the runs on one plot, the worst-case quantizer fractions over time per run,
  and the stability of several runs side by side.
"""
from __future__ import annotations

import json
import math
from pathlib import Path


class JsonlLog:
    """Append-only JSON lines keyed by `step`; on resume, rows after the checkpoint's step are dropped."""

    def __init__(self, path: Path, resume_step: int):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        rows = read_jsonl(path) if path.is_file() else []
        # Drop what a killed run logged after its last checkpoint: the resumed run logs those steps again.
        kept = [r for r in rows if r["step"] <= resume_step]
        path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def write(self, row: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def summarize_stats(stats: dict[str, dict]) -> dict:
    """Worst quantizer per fraction, over one collection of `collect_stats`."""
    out = {}
    for key in ("overflow", "flushed", "coarse"):
        vals = {n: s[key] for n, s in stats.items() if s.get(key) is not None}
        if vals:
            worst = max(vals, key=vals.get)
            out[f"max_{key}"] = vals[worst]
            out[f"max_{key}_at"] = worst
    return out


def plot_loss_curves(curves: dict[str, list[float]], path: Path, *, quant_start: int | None = None,
                     title: str = "") -> None:
    """Loss per step of each run on one plot (plus a light moving average when the curve is long)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for label, losses in curves.items():
        steps = range(1, len(losses) + 1)
        line, = ax.plot(steps, losses, lw=0.8, alpha=0.45 if len(losses) > 50 else 1.0, label=label)
        if len(losses) > 50:
            ax.plot(steps, _moving_average(losses, max(5, len(losses) // 30)), lw=1.8, color=line.get_color(),
                    label=f"{label} (moving average)")
    if quant_start:
        ax.axvline(quant_start + 0.5, color="gray", ls="--", lw=1, label="quantization on (end of warm-up)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_quant_stats(rows: list[dict], path: Path) -> None:
    """Worst overflow / flush / 1-mantissa-bit fractions over the run (rows of quant_stats.jsonl)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    for key, label in (("max_overflow", "overflow to Inf"), ("max_flushed", "flushed to zero"),
                       ("max_coarse", "in the 1-mantissa-bit range")):
        pts = [(r["step"], r["summary"][key]) for r in rows if key in r["summary"]]
        if pts:
            ax.plot(*zip(*pts), marker=".", label=f"worst quantizer: {label}")
    ax.set_yscale("symlog", linthresh=1e-6)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("fraction of values")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_stability(traces: dict[str, list[dict]], path: Path) -> None:
    """Per quantized run (traces: `lpq.train.compare.stability(...)["over_time"]`): worst overflow and
    flush fractions over all quantizers, and the largest amax / history-amax ratio, over the run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    panels = (("max_overflow", "worst overflow to Inf", "symlog"), ("max_flushed", "worst flush to zero", "symlog"),
              ("max_amax_vs_history", "largest amax / history amax (delayed)", "linear"))
    for ax, (key, title, scale) in zip(axes, panels):
        for label, points in traces.items():
            pts = [(p["step"], p[key]) for p in points if p.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), marker=".", label=label)
        if key == "max_amax_vs_history":
            ax.axhline(1.0, color="gray", ls="--", lw=1)
        if scale == "symlog":
            ax.set_yscale("symlog", linthresh=1e-6)
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _moving_average(xs: list[float], k: int) -> list[float]:
    out, acc = [], 0.0
    for i, x in enumerate(xs):
        acc += x
        if i >= k:
            acc -= xs[i - k]
        out.append(acc / min(i + 1, k))
    return out


def median(xs: list[float]) -> float:
    ys = sorted(xs)
    if not ys:
        return math.nan
    mid = len(ys) // 2
    return ys[mid] if len(ys) % 2 else (ys[mid - 1] + ys[mid]) / 2
