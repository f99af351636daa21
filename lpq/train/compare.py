"""`lpq train`: the BF16 reference run and the HiF8 QAT run with the same seed, then the comparison.

Writes, under train.output_dir: `bf16/` and `hif8/` (checkpoints, metrics, final weights),
`loss_curves.png`, `hif8/quant_stats.png`, the resolved `recipe.yaml` and `train_report.json`; with an
`eval:` section also `eval/` (`lpq eval`'s results.json and report.md: HiF8-trained vs BF16-trained).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from lpq.config import dump_yaml
from lpq.train.loop import RunResult, StepCallback, process_state, train_run
from lpq.train.monitor import median, plot_loss_curves, plot_quant_stats, read_jsonl
from lpq.train.recipe import TrainRecipe

REPORT = "train_report.json"


def scaling_by_role(recipe: TrainRecipe) -> dict[str, str]:
    """e.g. {"input": "delayed(history=64, max, margin=0, target=window)", "weight": "current(...)"}."""
    q = recipe.quant
    specs = {"weight": q.weight, "input": q.input, "grad": q.grad}
    if q.attention is not None:
        specs.update({f"attention.{r}": getattr(q.attention, r) for r in ("q", "k", "v", "p")})
    out = {}
    for role, s in specs.items():
        if s is None:
            continue
        detail = f"target={s.target.value}, margin={s.margin}"
        if s.scaling.value == "delayed":
            detail = f"history={s.history_len}, {s.reduction.value}, " + detail
        out[role] = f"{s.format} {s.scaling.value}" + (f"({detail})" if s.scaling.value != "none" else "")
    return out


def _activation_scaling(recipe: TrainRecipe) -> str:
    """The scaling rule of the activations (input role, else the first role set): the report's `scaling`."""
    q = recipe.quant
    for spec in (q.input, q.weight, q.grad):
        if spec is not None:
            return spec.scaling.value
    return q.attention.q.scaling.value if q.attention and q.attention.q else "none"


def step_time_ratio(quant: RunResult, ref: RunResult, first_step: int) -> tuple[float, float, float]:
    """Median step time of both runs over the same quantized steps; the first two quantized steps are
    skipped (one-time costs: kernel build, first amax statistics)."""
    lo = min(first_step + 2, len(quant.step_times) - 1)
    tq, tr = median(quant.step_times[lo:]), median(ref.step_times[lo:])
    return tq, tr, tq / tr


def run_training(recipe: TrainRecipe, *, resume: bool = True, only: str | None = None,
                 on_step: StepCallback | None = None) -> dict:
    """Train the runs the recipe asks for (`only`: "bf16" or "hif8" to train just one) and report."""
    cfg = recipe.train
    out = cfg.output_dir
    state = process_state()
    main = state.is_main_process
    if main:
        out.mkdir(parents=True, exist_ok=True)
        dump_yaml(recipe, out / "recipe.yaml")
    labels = []
    if recipe.quant is None or (cfg.reference_run and only != "hif8"):
        labels.append("bf16")
    if recipe.quant is not None and only != "bf16":
        labels.append("hif8")
    if only is not None and only not in labels:
        raise ValueError(f"--only {only}: the recipe has no such run (runs: {', '.join(labels) or 'none'})")
    evaluating = recipe.eval is not None and labels == ["bf16", "hif8"]
    if evaluating and state.num_processes > 1 and cfg.distributed.value == "fsdp":
        raise ValueError("eval: after FSDP training is not supported (each rank holds a shard of the model); "
                         "drop the eval section and run `lpq eval --model <out>/bf16/final` on the saved models")
    runs = {label: train_run(recipe, out / label, quantized=label == "hif8", label=label, resume=resume,
                             on_step=on_step, keep_model=evaluating and main) for label in labels}
    report = build_report(recipe, runs, state.num_processes)
    if main:
        if evaluating:
            report["eval"] = paired_eval(recipe, runs["bf16"], runs["hif8"], out / "eval")
        _plots(recipe, runs, out)
        (out / REPORT).write_text(json.dumps(report, indent=1))
    return report


def paired_eval(recipe: TrainRecipe, bf16: RunResult, hif8: RunResult, out: Path) -> dict:
    """`lpq eval` (lpq.eval) of the HiF8-trained model, quantizers on, against the BF16-trained one.

    Returns the figures the training report repeats; the whole evaluation is in `out`."""
    from lpq.config import to_dict
    from lpq.models.hub import load_model

    settings = recipe.eval
    if bf16.tokenizer is not None:
        from lpq.eval.paired import run_paired

        res = run_paired(bf16.model, hif8.model, bf16.tokenizer, settings, out, model_name=recipe.model.id,
                         recipe=to_dict(recipe))
    else:
        from lpq.eval.video import run_paired_video

        # Training dropped the text encoder and VAE: generate with fresh pipelines around the trained transformers.
        pipes = []
        for run in (bf16, hif8):
            pipe = load_model(recipe.model).model
            pipe.transformer = run.model
            pipes.append(pipe)
        res = run_paired_video(*pipes, settings, out, model_name=recipe.model.id, recipe=to_dict(recipe))
    summary: dict = {"dir": str(out), "baseline": "bf16-trained", "candidate": "hif8-trained (HiF8 on)",
                     "tasks": {name: {k: t.get(k) for k in ("metric", "baseline", "quantized", "rel_loss_pct",
                                                            "ci95_low", "ci95_high", "agreement", "n") if k in t}
                               for name, t in res["tasks"].items()}}
    if "distribution_shift" in res:
        d = res["distribution_shift"]
        summary["distribution_shift"] = {k: d[k] for k in ("kl_div", "top1_agreement", "baseline_ppl",
                                                           "candidate_ppl", "windows", "seq_len")}
    if "video" in res:
        summary["video"] = {k: res["video"][k] for k in ("psnr_db", "ssim", "latent_mse")}
    return summary


def build_report(recipe: TrainRecipe, runs: dict[str, RunResult], world_size: int) -> dict:
    cfg = recipe.train
    report: dict = {"model": recipe.model.id, "steps": cfg.steps, "world_size": world_size, "seed": cfg.seed,
                    "batch_size_global": cfg.batch_size * cfg.grad_accum * world_size,
                    "precision": f"float32 master weights, {cfg.mixed_precision.value} autocast compute"
                                 if cfg.mixed_precision.value == "bf16" else "float32"}
    if recipe.quant is not None:
        report.update(scaling=_activation_scaling(recipe), scaling_by_role=scaling_by_role(recipe),
                      bf16_warmup_steps=cfg.bf16_warmup_steps, protected_blocks=recipe.quant.protected_blocks)
    for label, run in runs.items():
        report[f"eval_loss_{label}"] = run.eval_loss
        report[f"final_train_loss_{label}"] = run.losses[-1]
        report[f"eval_loss_{label}_before_training"] = run.eval_loss_initial
        if "ranks_identical" in run.extra:
            report[f"ranks_identical_{label}"] = run.extra["ranks_identical"]
    if "bf16" in runs and "hif8" in runs:
        ref, q = runs["bf16"], runs["hif8"]
        report["rel_diff_pct"] = 100.0 * (q.eval_loss - ref.eval_loss) / ref.eval_loss
        # The challenge bar is one-sided: HiF8 may not lose more than 0.5 % (a lower loss is no loss).
        report["within_0.5pct"] = report["rel_diff_pct"] < 0.5
        tq, tr, ratio = step_time_ratio(q, ref, cfg.bf16_warmup_steps)
        report.update(step_time_hif8_s=tq, step_time_bf16_s=tr, step_time_ratio=ratio)
        diverge = next((i + 1 for i, (a, b) in enumerate(zip(ref.losses, q.losses)) if a != b), None)
        report["first_step_losses_differ"] = diverge
    if "hif8" in runs:
        stats_path = runs["hif8"].run_dir / "quant_stats.jsonl"
        rows = read_jsonl(stats_path) if stats_path.is_file() else []
        if rows:
            report["quant_stats_last"] = {"step": rows[-1]["step"], **rows[-1]["summary"]}
            report["quant_stats_worst_overflow"] = max(r["summary"].get("max_overflow", 0.0) for r in rows)
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in report.items()}


def _plots(recipe: TrainRecipe, runs: dict[str, RunResult], out: Path) -> None:
    labels = {"bf16": "BF16 reference", "hif8": "HiF8 QAT"}
    curves = {labels[k]: r.losses for k, r in runs.items()}
    plot_loss_curves(curves, out / "loss_curves.png",
                     quant_start=recipe.train.bf16_warmup_steps if "hif8" in runs else None,
                     title=f"{recipe.model.id}: seed {recipe.train.seed}, lr {recipe.train.lr:g}")
    if "hif8" in runs:
        path = runs["hif8"].run_dir / "quant_stats.jsonl"
        if path.is_file() and path.stat().st_size:
            plot_quant_stats(read_jsonl(path), runs["hif8"].run_dir / "quant_stats.png")


def describe(report: dict) -> str:
    """Human summary of a report, for the CLI."""
    lines = [f"steps {report['steps']} on {report['world_size']} process(es), {report['precision']}"]
    if "eval_loss_bf16" in report:
        lines.append(f"eval loss BF16 reference: {report['eval_loss_bf16']:.5f}")
    if "eval_loss_hif8" in report:
        lines.append(f"eval loss HiF8 QAT ({report['scaling']} scaling): {report['eval_loss_hif8']:.5f}")
    if "rel_diff_pct" in report:
        lines.append(f"relative difference (HiF8 - BF16) / BF16: {report['rel_diff_pct']:+.3f} % "
                     f"({'meets' if report['within_0.5pct'] else 'FAILS'} the < 0.5 % loss bar)")
        lines.append(f"step time HiF8 / BF16: {report['step_time_ratio']:.2f}x "
                     f"({report['step_time_hif8_s']:.3f} s vs {report['step_time_bf16_s']:.3f} s)")
    for name, t in report.get("eval", {}).get("tasks", {}).items():
        rel = "" if t.get("rel_loss_pct") is None else f" ({t['rel_loss_pct']:+.2f} % relative loss)"
        lines.append(f"lpq eval {name}: BF16-trained {t['baseline']:.4f}, HiF8-trained {t['quantized']:.4f}{rel}")
    shift = report.get("eval", {}).get("distribution_shift")
    if shift:
        lines.append(f"lpq eval distribution shift: perplexity {shift['baseline_ppl']:.3f} -> {shift['candidate_ppl']:.3f}, "
                     f"KL {shift['kl_div']:.4f}, top-1 agreement {shift['top1_agreement']:.4f}")
    return "\n".join(lines)

