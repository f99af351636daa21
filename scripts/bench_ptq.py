"""Benchmark of `lpq ptq` on the default recipe: end-to-end wall time, peak RSS, GPTQ time per block.

    .venv/bin/python scripts/bench_ptq.py [--config configs/w4a4_hif4.yaml] [--windows 40] [--out DIR]

Prints a small table and writes bench.json next to the run's report. Peak RSS is the process's
maximum resident set (ru_maxrss), which includes the unquantized copy loaded for the evaluation.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from lpq.config import load_config
from lpq.pipelines import ptq
from lpq.pipelines.ptq_config import PTQConfig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/w4a4_hif4.yaml")
    ap.add_argument("--windows", type=int, default=None, help="override evaluation.windows (0: no evaluation)")
    ap.add_argument("--out", default=None, help="run folder (default: a fresh temporary folder)")
    args = ap.parse_args()

    overrides = {}
    if args.windows is not None:
        overrides = {"evaluation": None} if args.windows == 0 else {"evaluation.windows": args.windows}
    cfg = load_config(args.config, PTQConfig, overrides)
    out = Path(args.out or tempfile.mkdtemp(prefix="lpq_bench_ptq_"))
    t0 = time.perf_counter()
    report = ptq.run(cfg, out)
    wall = time.perf_counter() - t0
    quantized = [b for b in report["blocks"] if not b["protected"]]
    gptq = [b["gptq_seconds"] for b in quantized]
    block_s = [b["seconds"] for b in quantized]
    result = {
        "config": args.config,
        "wall_s": wall,
        "peak_rss_mb": report["peak_rss_mb"],
        "timings": report["timings"],
        "gptq_s_per_block_mean": statistics.mean(gptq) if gptq else 0.0,
        "gptq_s_per_block_max": max(gptq) if gptq else 0.0,
        "block_s_mean": statistics.mean(block_s) if block_s else 0.0,
        "quantized": report["quantized"],
        "baseline": report["baseline"],
    }
    (out / "bench.json").write_text(json.dumps(result, indent=1))
    print(f"config                 {args.config}")
    print(f"wall time              {wall:.1f} s")
    print(f"peak RSS               {result['peak_rss_mb']:.0f} MB")
    print(f"GPTQ per block         {result['gptq_s_per_block_mean']:.2f} s mean, {result['gptq_s_per_block_max']:.2f} s max")
    print(f"block total (mean)     {result['block_s_mean']:.2f} s")
    for k, v in report["timings"].items():
        print(f"{k:<22} {v:.1f} s")
    print(ptq.summary(report))
    print(f"(run folder: {out})")


if __name__ == "__main__":
    main()
