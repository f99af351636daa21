"""Time 400 MMLU questions (seed 0) on SmolLM2-135M, unquantized and W4A4 HiFloat4 (fake-quant).

    .venv/bin/python scripts/bench_eval.py [--limit 400] [--batch-size 8] [--data-dir DIR]

Reads MMLU from the data dir (default $LPQ_DATA_DIR or ../shared/data). Prints, for each model,
the wall time of the lm-eval run (batched log-likelihoods; one forward per question since the four
letter continuations share their context) and the accuracy.
"""
from __future__ import annotations

import argparse
import copy
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", type=int, default=400)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--data-dir", default=None)
    args = ap.parse_args()

    from lpq.eval.harness import prepare_task, run_task
    from lpq.eval.settings import EvalSettings
    from lpq.models.hub import ModelConfig, load_model
    from lpq.quant import QuantRecipe, quantize_model

    settings = EvalSettings(tasks=["mmlu"], limit=args.limit, seed=0, batch_size=args.batch_size,
                            data_dir=args.data_dir, kl=False)
    base = load_model(ModelConfig(id="smollm2-135m"))
    t = time.time()
    w4a4 = quantize_model(copy.deepcopy(base.model), QuantRecipe(format="hif4"))
    quant_s = time.time() - t
    prepared = prepare_task("mmlu", settings)
    print(f"MMLU: {prepared.n_items} questions (seed 0), batch {args.batch_size}, torch threads "
          f"{torch.get_num_threads()}; quantize_model took {quant_s:.1f} s")
    for name, model in (("smollm2-135m fp32", base.model), ("smollm2-135m W4A4 hif4", w4a4)):
        t = time.time()
        run = run_task(model, base.tokenizer, prepared, settings)
        dt = time.time() - t
        print(f"{name:24s} {dt:8.1f} s  ({dt / prepared.n_items:.3f} s/question)  acc {run.score:.4f}", flush=True)


if __name__ == "__main__":
    main()
