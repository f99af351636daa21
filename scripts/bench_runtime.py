"""Forward time of SmolLM2-135M in eval mode: W4A4 (weight and input) vs unquantized, same run.

    .venv/bin/python scripts/bench_runtime.py [--format hif4] [--batch 1] [--seq 256] [--reps 7] [--threads N]

Unquantized means the same quantized model with quantization disabled (exactly the original
function); the two are timed alternately so machine load affects both alike. Prints the median
forward times, their ratio (target <= 1.5x with the C++ kernels) and the process's peak resident
memory before quantizing and after the quantized runs.
"""
from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # Linux reports KiB


def median_forward_s(model, ids: torch.Tensor, reps: int) -> tuple[float, float]:
    """Median forward time with quantization off and on, alternating so machine load hits both alike."""
    from lpq.quant import set_quant_enabled

    times: dict[bool, list[float]] = {False: [], True: []}
    with torch.inference_mode():
        for enabled in (False, True):         # warm-up: kernels built/loaded, weight cache filled
            set_quant_enabled(model, enabled)
            model(input_ids=ids)
        for _ in range(reps):
            for enabled in (False, True):
                set_quant_enabled(model, enabled)
                t = time.perf_counter()
                model(input_ids=ids)
                times[enabled].append(time.perf_counter() - t)
    return statistics.median(times[False]), statistics.median(times[True])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--format", default="hif4")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None, help="torch/OpenMP threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)   # on a shared machine, 1 thread avoids OpenMP contention

    import lpq
    from lpq.models.hub import ModelConfig, load_model
    from lpq.quant import QuantRecipe

    model = load_model(ModelConfig(id="smollm2-135m")).model.eval()
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    print(f"torch threads: {torch.get_num_threads()}, input {args.batch} x {args.seq} tokens")
    with torch.inference_mode():
        model(input_ids=ids)
    rss_base = peak_rss_mb()
    lpq.quantize_model(model, QuantRecipe(format=args.format))
    base, quant = median_forward_s(model, ids, args.reps)
    rss_quant = peak_rss_mb()
    print(f"unquantized forward: {base * 1e3:8.1f} ms   peak RSS so far {rss_base:7.0f} MB")
    print(f"W4A4 {args.format:6s} forward: {quant * 1e3:8.1f} ms   peak RSS so far {rss_quant:7.0f} MB "
          f"(+ the cached quantized weights)")
    print(f"ratio quantized / unquantized: {quant / base:.2f}x (target <= 1.5x)")


if __name__ == "__main__":
    main()
