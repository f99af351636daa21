"""report.json, report.md and the one-paragraph summary of a `lpq ptq` run."""
from __future__ import annotations

import json
from pathlib import Path


def write_report(report: dict, out_dir: Path) -> None:
    (out_dir / "report.json").write_text(json.dumps(report, indent=1))
    b, q = report["baseline"], report["quantized"]
    lines = [f"# lpq ptq report: {report['model']} in {report['format']}", "",
             f"* protected blocks: {report['protected_blocks']}",
             f"* wall time: {report['wall_s']:.1f} s; peak RSS: {report['peak_rss_mb']:.0f} MB",
             f"* algorithms: {', '.join(a['name'] for a in report['algorithms'])}"]
    lines += [f"* {note}" for note in report.get("notes", [])]
    if "export" in report:
        ex = report["export"]
        lines.append(f"* export ({ex['kind']}): {ex['path']}, {ex['bits_per_param']:.2f} bits per quantized weight")
    lines.append("")
    if "wikitext2_ppl" in q:
        inc = 100 * (q["wikitext2_ppl"] / b["wikitext2_ppl"] - 1)
        lines += ["| metric | baseline | quantized |", "|---|---|---|",
                  f"| WikiText-2 perplexity | {b['wikitext2_ppl']:.3f} | {q['wikitext2_ppl']:.3f} ({inc:+.1f} %) |",
                  f"| KL(baseline ‖ quantized), nats/token | | {q['kl_div']:.4f} |",
                  f"| top-1 agreement | | {q['top1_agreement']:.4f} |"]
        if "mmlu_acc" in q:
            lines.append(f"| MMLU accuracy | {b['mmlu_acc']:.4f} | {q['mmlu_acc']:.4f} |")
        if "mmlu_agreement" in report:
            lines.append(f"| MMLU paired agreement | | {report['mmlu_agreement']:.4f} |")
        lines.append("")
    if report.get("domains"):
        lines += ["## Perplexity by domain", "", domain_table(report["domains"]), ""]
    lines += ["## Blocks", "", "| block | protected | rel. output error | weight quantization s | total s |",
              "|---|---|---|---|---|"]
    for s in report["blocks"]:
        err = "" if s.get("rel_output_error") is None else f"{s['rel_output_error']:.3e}"
        lines.append(f"| {s['index']} | {'yes' if s['protected'] else ''} | {err} | "
                     f"{s.get('quantize_seconds', 0.0):.1f} | {s['seconds']:.1f} |")
    (out_dir / "report.md").write_text("\n".join(lines) + "\n")


def domain_table(domains: dict[str, dict]) -> str:
    """Markdown table: per text domain, both perplexities and the increase with its 95 % CI."""
    rows = ["| text | windows | float ppl | quantized ppl | increase | 95 % CI |", "|---|---|---|---|---|---|"]
    for name, d in domains.items():
        rows.append(f"| {name} | {d['windows']} | {d['ppl_reference']:.3f} | {d['ppl']:.3f} | "
                    f"{d['ppl_increase_pct']:+.2f} % | {d['ci95_low']:+.2f} .. {d['ci95_high']:+.2f} % |")
    return "\n".join(rows)


def summary(report: dict) -> str:
    b, q = report["baseline"], report["quantized"]
    s = (f"{report['model']} {report['format']}: protected {report['protected_blocks']}, "
         f"{report['wall_s']:.0f} s, peak RSS {report['peak_rss_mb']:.0f} MB")
    if "wikitext2_ppl" in q:
        s += (f"\nWikiText-2 ppl {b['wikitext2_ppl']:.3f} -> {q['wikitext2_ppl']:.3f} "
              f"({100 * (q['wikitext2_ppl'] / b['wikitext2_ppl'] - 1):+.1f} %), KL {q['kl_div']:.4f}, "
              f"top-1 {q['top1_agreement']:.4f}")
    if report.get("domains"):
        s += "\n" + domain_table(report["domains"])
    return s
