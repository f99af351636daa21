"""results.json, report.md, a PNG of the per-task relative losses with their CIs, and a console table."""
from __future__ import annotations

import json
from pathlib import Path


def _fmt(v, spec: str = ".4f") -> str:
    return "-" if v is None else format(v, spec)


def task_table(results: dict) -> str:
    """A fixed-width table of the per-task comparison (printed at the end of a run)."""
    header = ["task", "metric", "n", "baseline", "quantized", "rel loss %", "95% CI", "agreement"]
    rows = []
    for name, t in results["tasks"].items():
        ci = "-" if t["ci95_low"] is None else f"[{t['ci95_low']:+.2f}, {t['ci95_high']:+.2f}]"
        rows.append([name, t["metric"], str(t["n"]), _fmt(t["baseline"]), _fmt(t["quantized"]),
                     _fmt(t["rel_loss_pct"], "+.2f"), ci, _fmt(t["agreement"], ".3f")])
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def summary_lines(results: dict) -> list[str]:
    lines = [f"mean |relative accuracy loss| (over {', '.join(results.get('mean_abs_pct_loss_tasks', [])) or 'no task'}):"
             f" {_fmt(results.get('mean_abs_pct_loss'), '.3f')} %"]
    shift = results.get("distribution_shift")
    if shift:
        lines.append(f"distribution shift ({shift['windows']} x {shift['seq_len']} tokens): "
                     f"KL(baseline||quantized) = {shift['kl_div']:.5f} nats/token, "
                     f"top-1 agreement = {shift['top1_agreement']:.4f}, "
                     f"perplexity {shift['baseline_ppl']:.3f} -> {shift['candidate_ppl']:.3f}")
    video = results.get("video")
    if video:
        lines.append(f"video ({video['n']} videos): PSNR {video['psnr_db']:.2f} dB, SSIM {video['ssim']:.4f}, "
                     f"latent MSE {video['latent_mse']:.3e} vs the baseline")
    return lines


def plot_deltas(results: dict, path: Path) -> None:
    """Horizontal bars: relative loss % per task with its paired-bootstrap 95 % CI."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n, t in results["tasks"].items() if t["rel_loss_pct"] is not None]
    fig, ax = plt.subplots(figsize=(6.5, 0.6 * max(len(names), 1) + 1.4))
    for y, name in enumerate(names):
        t = results["tasks"][name]
        err = None
        if t["ci95_low"] is not None:
            err = [[t["rel_loss_pct"] - t["ci95_low"]], [t["ci95_high"] - t["rel_loss_pct"]]]
        ax.barh(y, t["rel_loss_pct"], xerr=err, capsize=4, color="tab:red" if t["rel_loss_pct"] > 0 else "tab:green")
    ax.axvline(0, color="black", lw=0.8)
    ax.set_yticks(range(len(names)), [f"{n} ({results['tasks'][n]['metric']})" for n in names])
    ax.invert_yaxis()
    ax.set_xlabel("relative loss, % of baseline (positive = worse)")
    ax.set_title(f"{results.get('model', '')}: quantized vs baseline (paired bootstrap 95 % CI)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(results: dict, out: Path) -> None:
    """Write results.json, report.md and deltas.png into `out`, and print the table."""
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    plot_deltas(results, out / "deltas.png")
    table = task_table(results)
    md = [f"# lpq eval: {results.get('model', '')}", "",
          f"Chat template: {results.get('chat_template')}; thinking: {results.get('enable_thinking')}. "
          "Scores are paired: both models ran on the same items; the CI is a paired bootstrap of the "
          "relative loss (percent of the baseline; positive = the quantized model is worse). Agreement is "
          "the fraction of items where both models gave the same answer.", "",
          "```", table, "```", ""]
    md += [f"- {line}" for line in summary_lines(results)]
    md += ["", "![per-task deltas](deltas.png)", "",
           "Per-item records: `items/<task>.{baseline,quantized}.jsonl`. Full numbers and settings: `results.json`."]
    (out / "report.md").write_text("\n".join(md) + "\n")
    print("\n" + table)
    for line in summary_lines(results):
        print(line)
    print(f"report: {out / 'report.md'}")
