"""Speed of the block Hadamard (lpq/csrc/fwht.cpp, the online rotation of every rotated linear input and its
gradient), as a ratio to torch.clone of the same tensor measured in the same run, and of the plain-PyTorch
reference to the kernel. Shapes: one 512-token window of SmolLM2's linear inputs (576 and 1536 wide, block
64, as HiF4's recipe rotates them), MXFP4's block 32, and a 4096-wide block.

    .venv/bin/python scripts/bench_hadamard.py [--threads 2]
"""
from __future__ import annotations

import argparse

from bench_formats import best_of     # scripts/ is on the path of a script run from it

SHAPES = [((512, 576), 64), ((512, 1536), 64), ((4096, 1536), 32), ((256, 4096), 4096)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=20)
    a = ap.parse_args()
    import torch

    from lpq.algorithms.hadamard import block_sizes, fwht_ref
    from lpq.formats._build import load_kernel

    ext = load_kernel("fwht")
    if ext is None:
        raise SystemExit("the fwht kernel did not build; nothing to measure")
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    print(f"{a.threads} threads, best of {a.reps}")
    print(f"{'shape':<14}{'block':>6}{'clone ms':>10}{'kernel ms':>11}{'kernel/clone':>14}{'ref ms':>9}{'ref/kernel':>12}")
    for (rows, n), block in SHAPES:
        x = torch.randn(rows, n)
        sizes = block_sizes(n, block)
        clone = best_of(lambda: x.clone(), a.reps)
        kern = best_of(lambda: ext.fwht(x, sizes), a.reps)
        ref = best_of(lambda: fwht_ref(x, sizes), max(3, a.reps // 4))
        assert torch.equal(ext.fwht(x, sizes), fwht_ref(x, sizes)), "kernel and reference differ"
        print(f"{f'{rows}x{n}':<14}{block:>6}{clone * 1e3:10.3f}{kern * 1e3:11.3f}{kern / clone:14.1f}"
              f"{ref * 1e3:9.2f}{ref / kern:12.1f}")


if __name__ == "__main__":
    main()
