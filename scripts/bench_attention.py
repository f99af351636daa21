"""Peak memory and time of one quantized attention forward + backward, tiled vs materialized.

HiF8 Q/K/V/P with delayed scaling, training mode, float32, head dim 128, batch 1, 1 head by default
(on a CPU; Wan2.1-1.3B has 12: `--heads 12`; the tiled path's extra memory is per head). Wan2.1-1.3B
at 81 frames x 480 x 832 attends over 21 x 30 x 52 = 32,760 tokens.

Each configuration runs in its own subprocess, so its peak RSS (ru_maxrss) is its own; "extra" is
that peak minus the RSS just before the attention call (inputs, imports and the warm-up already
resident), so it counts everything the call adds: its output, the gradients of Q, K and V, the
saved tensors and every intermediate. The quantizers' delayed scales are set first by a warm-up
step on the first 1,024 tokens, so the measured call is a steady-state training step (stored
scale, pending statistics recorded).

    python scripts/bench_attention.py                     # the default sweep (minutes, 1 thread)
    python scripts/bench_attention.py --tiled 4096 --materialized 4096 --threads 2
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

TILED = [2048, 4096, 8192, 16384, 32760]
MATERIALIZED = [2048, 4096, 8192, 16384]     # 32,760 needs ~4.3 GB per score-sized tensor in float32


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _one(impl: str, tokens: int, threads: int, block_q: int, block_k: int, device: str, heads: int) -> dict:
    import torch

    from lpq.quant import AttentionRecipe, QuantizerSpec
    from lpq.quant.attention import AttentionQuantizers, quantized_attention
    from lpq.quant.quantizer import update_delayed_scales

    torch.set_num_threads(threads)
    spec = dict(format="hif8", scaling="delayed")
    aq = AttentionQuantizers(AttentionRecipe(q=QuantizerSpec(**spec), k=QuantizerSpec(**spec),
                                             v=QuantizerSpec(**spec, axis=-2), p=QuantizerSpec(**spec)))
    aq.impl, aq.block_q, aq.block_k = impl, block_q, block_k
    aq.to(device).train()
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(1, heads, tokens, 128, generator=g, device=device).requires_grad_() for _ in range(3))
    warm = min(tokens, 1024)
    quantized_attention(aq, q[..., :warm, :], k[..., :warm, :], v[..., :warm, :], None, 128 ** -0.5,
                        False).sum().backward()
    update_delayed_scales(aq)
    q.grad = k.grad = v.grad = None
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = _rss_mb()
    t0 = time.perf_counter()
    out = quantized_attention(aq, q, k, v, None, 128 ** -0.5, False)
    t1 = time.perf_counter()
    out.backward(torch.ones_like(out))
    if cuda:
        torch.cuda.synchronize()
    t2 = time.perf_counter()
    if cuda:
        extra = (torch.cuda.max_memory_allocated() - before) / 2**20
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        extra = peak - before
    return {"impl": impl, "tokens": tokens, "forward_s": t1 - t0, "fwd_bwd_s": t2 - t0,
            "peak_mb": peak, "extra_mb": extra, "block_q": block_q, "block_k": block_k, "device": device,
            "heads": heads}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiled", type=int, nargs="*", default=TILED, help="token counts for the tiled path")
    ap.add_argument("--materialized", type=int, nargs="*", default=MATERIALIZED,
                    help="token counts for the materialized path")
    ap.add_argument("--fused", type=int, nargs="*", default=[],
                    help="token counts for the fused Triton kernels (CUDA; CPU only under TRITON_INTERPRET=1)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--block-q", type=int, default=512)
    ap.add_argument("--block-k", type=int, default=1024)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (peak from torch.cuda's allocator there)")
    ap.add_argument("--heads", type=int, default=1, help="attention heads in the call (Wan2.1-1.3B: 12)")
    ap.add_argument("--one", nargs=2, metavar=("IMPL", "TOKENS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(_one(args.one[0], int(args.one[1]), args.threads, args.block_q, args.block_k,
                              args.device, args.heads)))
        return
    runs = ([("materialized", n) for n in args.materialized] + [("tiled", n) for n in args.tiled]
            + [("fused", n) for n in args.fused])
    rows = []
    for impl, n in runs:
        cmd = [sys.executable, __file__, "--one", impl, str(n), "--threads", str(args.threads),
               "--block-q", str(args.block_q), "--block-k", str(args.block_k), "--device", args.device,
               "--heads", str(args.heads)]
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
        res = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if res.returncode != 0:
            tail = (res.stderr.strip().splitlines() or ["(no output)"])[-1]
            print(f"{impl:>12} {n:>6} tokens: failed (exit {res.returncode}: {tail})", flush=True)
            continue
        row = json.loads(res.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"{impl:>12} {n:>6} tokens: fwd+bwd {row['fwd_bwd_s']:8.2f} s (fwd {row['forward_s']:7.2f} s), "
              f"extra memory {row['extra_mb']:9.1f} MB, peak {row['peak_mb']:9.1f} MB", flush=True)
    by = {(r["impl"], r["tokens"]): r for r in rows}
    for impl in ("tiled", "fused"):
        both = sorted(n for (i, n) in by if i == impl and ("materialized", n) in by)
        if both:
            print(f"\n{impl} / materialized at the same length (same run, same machine):")
            for n in both:
                t, m = by[(impl, n)], by[("materialized", n)]
                print(f"  {n:>6} tokens: time {t['fwd_bwd_s'] / m['fwd_bwd_s']:.2f}x, "
                      f"extra memory {t['extra_mb']:.0f} MB vs {m['extra_mb']:.0f} MB")
    print(f"\ntile {args.block_q} x {args.block_k}, {args.heads} head(s), head dim 128, float32, {args.threads} thread(s), "
          f"device {args.device}")


if __name__ == "__main__":
    main()
