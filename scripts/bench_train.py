"""Training step time of HiF8 QAT vs the unquantized reference on SmolLM2-135M, and current vs
delayed scaling.

All modes run in one process on the same batches, interleaved step by step (reference, HiF8 delayed,
HiF8 current, reference, ...), so a machine whose load changes during the benchmark slows every mode
alike. The reference and HiF8-delayed share one model (quantization switched off / on); HiF8-current
is a second copy.
Every step is a full AdamW step computing as the recipe's `train.mixed_precision` says (bfloat16 autocast
or float32), as in `lpq train`; `--precision` overrides it. On a CPU without native bfloat16 matmuls
(no AVX512-BF16 / AMX) autocast's bfloat16 matmuls are emulated and several times slower than float32
ones, which inflates the reference step and flatters the ratio: compare with `--precision fp32` there.
Besides wall time, each step's process CPU time (all threads) is recorded: on a machine shared with
other jobs, waiting for a core inflates wall time by whatever the others do, CPU time much less.

    .venv/bin/python scripts/bench_train.py --steps 8 --out runs/bench_train.json
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import statistics
import time
from pathlib import Path

import torch

from lpq.models.hub import load_model
from lpq.quant import quantize_model, set_quant_enabled
from lpq.train.compare import quant_for_mode
from lpq.train.data import text_splits
from lpq.train.loop import keep_freed_memory
from lpq.train.recipe import load_recipe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/smollm2_hif8.yaml", help="recipe whose model/quant/data are used")
    ap.add_argument("--steps", type=int, default=8, help="timed steps per mode")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per mode first (kernel build, caches)")
    ap.add_argument("--batch-size", type=int, default=None, help="default: the recipe's train.batch_size")
    ap.add_argument("--seq-len", type=int, default=None, help="default: the recipe's data.seq_len")
    ap.add_argument("--precision", choices=["bf16", "fp32"], default=None,
                    help="compute: bfloat16 autocast or float32 (default: the recipe's train.mixed_precision)")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    args = ap.parse_args()

    keep_freed_memory()     # as lpq train does on CPU (both modes alike)
    recipe = load_recipe(args.config)
    if recipe.quant is None:
        raise SystemExit(f"{args.config} has no quant section")
    batch_size = args.batch_size or recipe.train.batch_size
    precision = args.precision or ("bf16" if recipe.train.mixed_precision.value == "bf16" else "fp32")
    data_cfg = dataclasses.replace(recipe.data, seq_len=args.seq_len or recipe.data.seq_len)
    loaded = load_model(recipe.model)
    blocks = text_splits(data_cfg, loaded.tokenizer).train
    torch.manual_seed(0)

    base = loaded.model.train()
    current_model = copy.deepcopy(base)
    quantize_model(base, quant_for_mode(recipe.quant, "delayed"))
    quantize_model(current_model, quant_for_mode(recipe.quant, "current"))
    models = {"reference": base, "hif8_delayed": base, "hif8_current": current_model}
    optims = {id(m): torch.optim.AdamW(m.parameters(), lr=recipe.train.lr) for m in (base, current_model)}
    times: dict[str, list[float]] = {k: [] for k in models}
    cpu_times: dict[str, list[float]] = {k: [] for k in models}

    def step(mode: str, i: int) -> tuple[float, float]:
        model = models[mode]
        set_quant_enabled(model, mode != "reference")
        start = (i * batch_size) % (len(blocks) - batch_size)
        ids = blocks[start:start + batch_size]
        t0, c0 = time.perf_counter(), time.process_time()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        optims[id(model)].step()
        optims[id(model)].zero_grad(set_to_none=True)
        return time.perf_counter() - t0, time.process_time() - c0

    from tqdm import tqdm

    total = (args.warmup + args.steps) * len(models)
    with tqdm(total=total, desc="bench_train", unit="step") as bar:
        for i in range(args.warmup + args.steps):
            for mode in models:
                dt, dc = step(mode, i)
                if i >= args.warmup:
                    times[mode].append(dt)
                    cpu_times[mode].append(dc)
                bar.update()

    med = {k: statistics.median(v) for k, v in times.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu_times.items()}
    result = {
        "model": recipe.model.id, "batch_size": batch_size, "seq_len": data_cfg.seq_len, "precision": precision,
        "threads": torch.get_num_threads(), "timed_steps_per_mode": args.steps,
        "median_step_s": med, "all_step_s": times,
        "ratio_hif8_delayed_vs_reference": med["hif8_delayed"] / med["reference"],
        "ratio_hif8_current_vs_reference": med["hif8_current"] / med["reference"],
        "ratio_delayed_vs_current": med["hif8_delayed"] / med["hif8_current"],
        "median_step_cpu_s": med_cpu, "all_step_cpu_s": cpu_times,
        "cpu_ratio_hif8_delayed_vs_reference": med_cpu["hif8_delayed"] / med_cpu["reference"],
        "cpu_ratio_hif8_current_vs_reference": med_cpu["hif8_current"] / med_cpu["reference"],
        "cpu_ratio_delayed_vs_current": med_cpu["hif8_delayed"] / med_cpu["hif8_current"],
    }
    print(f"compute: {precision}, {torch.get_num_threads()} thread(s)")
    for k in med:
        print(f"{k:14s} median {med[k]:.3f} s/step wall, {med_cpu[k]:.3f} s/step CPU")
    ref = f"{precision.upper()} reference"
    print(f"HiF8 delayed / {ref}: {result['ratio_hif8_delayed_vs_reference']:.2f}x wall, "
          f"{result['cpu_ratio_hif8_delayed_vs_reference']:.2f}x CPU (target <= 1.15x)")
    print(f"HiF8 current / {ref}: {result['ratio_hif8_current_vs_reference']:.2f}x wall, "
          f"{result['cpu_ratio_hif8_current_vs_reference']:.2f}x CPU")
    print(f"delayed / current:   {result['ratio_delayed_vs_current']:.2f}x wall, "
          f"{result['cpu_ratio_delayed_vs_current']:.2f}x CPU")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
