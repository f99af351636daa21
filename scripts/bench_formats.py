"""Speed of fake_quant per format, as a ratio to torch.clone of the same tensor measured in the same run.

Target: the C++ kernel within 3x of clone for every format (float32), the reference at most ~10x slower
than the kernel. Runs itself twice, with torch's THP_MEM_ALLOC_ENABLE off and on (it must be set before
torch is imported), because fresh 64 MB allocations cost tens of ms in page faults without it.

    .venv/bin/python scripts/bench_formats.py [--size 4096] [--threads 2] [--formats hif8,hif4]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time


def best_of(fn, reps: int) -> float:
    fn()  # warm-up: kernel build/load, allocator
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def run(size: int, threads: int, formats: list[str], ref_reps: int) -> None:
    import torch

    from lpq.formats import FORMATS, fake_quant

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    print(f"THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE', '0')}  "
          f"{size}x{size}, {threads} threads, best of 10 (reference: best of {ref_reps})")
    print(f"{'format':<14}{'dtype':<10}{'clone ms':>9}{'kernel ms':>11}{'kernel/clone':>14}"
          f"{'ref ms':>10}{'ref/kernel':>12}")
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(size, size).to(dtype)
        clone = best_of(lambda: x.clone(), 10)
        for name in formats or list(FORMATS):
            kern = best_of(lambda: fake_quant(x, name, backend="cpp"), 10)
            ref = best_of(lambda: fake_quant(x, name, backend="ref"), ref_reps)
            print(f"{name:<14}{str(dtype).replace('torch.', ''):<10}{clone * 1e3:9.1f}{kern * 1e3:11.1f}"
                  f"{kern / clone:14.2f}{ref * 1e3:10.0f}{ref / kern:12.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--formats", default="", help="comma-separated subset (default: all)")
    ap.add_argument("--ref-reps", type=int, default=3)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    formats = [f for f in a.formats.split(",") if f]
    if a.child:
        run(a.size, a.threads, formats, a.ref_reps)
        return
    for thp in ("0", "1"):
        env = dict(os.environ, THP_MEM_ALLOC_ENABLE=thp)
        subprocess.run([sys.executable, __file__, "--child", "--size", str(a.size), "--threads", str(a.threads),
                        "--formats", a.formats, "--ref-reps", str(a.ref_reps)], env=env, check=True)
        print()


if __name__ == "__main__":
    main()
