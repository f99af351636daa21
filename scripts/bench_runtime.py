"""Forward time of SmolLM2-135M in eval mode: W4A4 (weight and input) vs unquantized, same run.

    .venv/bin/python scripts/bench_runtime.py [--format hif4] [--batch 4] [--seq 256] [--reps 5]

Prints the median forward times, their ratio (target <= 1.5x with the C++ kernels) and the
process's peak resident memory after each phase.
"""
from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # Linux reports KiB


def median_forward_s(model, ids: torch.Tensor, reps: int) -> float:
    times = []
    with torch.inference_mode():
        model(input_ids=ids)                  # warm-up: kernels built/loaded, weight cache filled
        for _ in range(reps):
            t = time.perf_counter()
            model(input_ids=ids)
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--format", default="hif4")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()

    import lpq
    from lpq.models.hub import ModelConfig, load_model
    from lpq.quant import QuantRecipe

    model = load_model(ModelConfig(id="smollm2-135m")).model.eval()
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    print(f"torch threads: {torch.get_num_threads()}, input {args.batch} x {args.seq} tokens")
    base = median_forward_s(model, ids, args.reps)
    rss_base = peak_rss_mb()
    lpq.quantize_model(model, QuantRecipe(format=args.format))
    quant = median_forward_s(model, ids, args.reps)
    rss_quant = peak_rss_mb()
    print(f"unquantized forward: {base * 1e3:8.1f} ms   peak RSS {rss_base:7.0f} MB")
    print(f"W4A4 {args.format:6s} forward: {quant * 1e3:8.1f} ms   peak RSS {rss_quant:7.0f} MB")
    print(f"ratio quantized / unquantized: {quant / base:.2f}x (target <= 1.5x)")


if __name__ == "__main__":
    main()
