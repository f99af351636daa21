"""`lpq train`: the reference run and the quantized (QAT) runs from the same seed, then the comparison.

Runs and their folders under train.output_dir (labels follow the recipe, see `plan_runs`):

* the reference: `bf16/` (float32 master weights, bfloat16 autocast), or `fp32/` without mixed precision;
* one quantized run named after the recipe's formats (`hif8/`, `hif4/`, `hif8+mxfp4/`), or with
  `train.compare: [current, delayed]` one per scaling mode (`hif8_current/`, `hif8_delayed/`).

Each holds checkpoints, metrics, quantizer traces and the final weights. Besides them: `loss_curves.png`
(every run on one plot), `stability.png` (overflow / flush rates and amax-history lag over time),
`<run>/quant_stats.png`, the resolved `recipe.yaml` and `train_report.json`; with an `eval:` section
also `eval/` (`lpq eval` of the quantized run against the reference; `eval/<run>/` per compared run).
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from lpq.config import dump_yaml
from lpq.outputs import RECIPE_COPY
from lpq.quant.recipe import QKRotation, QuantizerSpec, QuantRecipe, Scaling
from lpq.train.loop import RunResult, StepCallback, process_state, train_run
from lpq.train.monitor import median, plot_loss_curves, plot_quant_stats, plot_stability, read_jsonl
from lpq.train.recipe import MixedPrecision, TrainRecipe

REPORT = "train_report.json"
# How formats are written for people (labels and folder names use the registry names).
FORMAT_TITLES = {"hif8": "HiF8", "hif4": "HiF4"}
LOSS_BAR_PCT = 0.5          # the challenge's QAT bar: at most 0.5 % higher eval loss than the reference


@dataclass
class RunPlan:
    """One run of `lpq train`: its label (folder and report keys), title, and quantization (None: reference)."""

    label: str
    title: str
    quant: QuantRecipe | None = None
    mode: str | None = None            # the train.compare scaling mode it applies, if any


def format_label(quant: QuantRecipe) -> str:
    """The recipe's formats as one name: `hif8`, `hif4`, or `hif8+mxfp4` for a mix."""
    return "+".join(sorted(quant.formats()))


def format_title(quant: QuantRecipe) -> str:
    return "+".join(FORMAT_TITLES.get(f, f.upper()) for f in sorted(quant.formats()))


def reference_label(recipe: TrainRecipe) -> str:
    return "bf16" if recipe.train.mixed_precision is MixedPrecision.BF16 else "fp32"


def quant_for_mode(quant: QuantRecipe, mode: str) -> QuantRecipe:
    """`quant` with per-tensor scaling mode `mode` on every role that scales per tensor (current or
    delayed): weights, linear inputs, gradients and attention, as TransformerEngine's recipes do.
    Everything else (formats, targets, centres, histories, margins) stays as the recipe says."""
    def switch(spec: QuantizerSpec | None) -> QuantizerSpec | None:
        if spec is None or spec.scaling == Scaling.NONE:
            return spec
        return dataclasses.replace(spec, scaling=Scaling(mode))

    attention = quant.attention
    if attention is not None:
        attention = dataclasses.replace(attention, **{r: switch(getattr(attention, r)) for r in ("q", "k", "v", "p")})
    return dataclasses.replace(quant, weight=switch(quant.weight), input=switch(quant.input), grad=switch(quant.grad),
                               attention=attention)


def plan_runs(recipe: TrainRecipe) -> list[RunPlan]:
    """The runs the recipe asks for, reference first."""
    cfg = recipe.train
    ref = reference_label(recipe)
    plans = []
    if recipe.quant is None or cfg.reference_run:
        plans.append(RunPlan(ref, "BF16 reference" if ref == "bf16" else "FP32 reference"))
    if recipe.quant is None:
        return plans
    label, title = format_label(recipe.quant), format_title(recipe.quant)
    if not cfg.compare:
        plans.append(RunPlan(label, f"{title} QAT ({_activation_scaling(recipe.quant)} scaling)", recipe.quant))
    for mode in cfg.compare:
        plans.append(RunPlan(f"{label}_{mode}", f"{title} QAT, {mode} scaling", quant_for_mode(recipe.quant, mode), mode))
    return plans


def scaling_by_role(quant: QuantRecipe) -> dict[str, str]:
    """e.g. {"input": "hif8 delayed(history=64, max, target=window, ...)", "weight": "hif8 current(...)"}."""
    specs = {"weight": quant.weight, "input": quant.input, "grad": quant.grad}
    if quant.attention is not None:
        specs.update({f"attention.{r}": getattr(quant.attention, r) for r in ("q", "k", "v", "p")})
    out = {}
    for role, s in specs.items():
        if s is None:
            continue
        if s.target.value == "window":
            detail = f"target=window, center={s.window_center:g}, margin={s.margin}"
        else:
            tgt = "format max" if s.amax_target is None else f"{s.amax_target:g}"
            detail = f"target=amax({tgt}), margin={s.margin}"
        if s.scaling.value == "delayed":
            detail = f"history={s.history_len}, {s.reduction.value}, " + detail
        out[role] = f"{s.format} {s.scaling.value}" + (f"({detail})" if s.scaling.value != "none" else "")
    if quant.attention is not None and quant.attention.qk_rotation != QKRotation.NONE:
        for role in ("attention.q", "attention.k"):
            if role in out:
                out[role] += f", rows rotated ({quant.attention.qk_rotation})"
    return out


def _activation_scaling(quant: QuantRecipe) -> str:
    """The scaling rule of the activations (input role, else the first role set): the report's `scaling`."""
    for spec in (quant.input, quant.weight, quant.grad):
        if spec is not None:
            return spec.scaling.value
    return quant.attention.q.scaling.value if quant.attention and quant.attention.q else "none"


def step_time_ratio(quant: RunResult, ref: RunResult, first_step: int) -> tuple[float, float, float]:
    """Median step time of both runs over the same quantized steps; the first two quantized steps are
    skipped (one-time costs: kernel build, first amax statistics)."""
    lo = min(first_step + 2, len(quant.step_times) - 1)
    tq, tr = median(quant.step_times[lo:]), median(ref.step_times[lo:])
    return tq, tr, tq / tr


def select_runs(recipe: TrainRecipe, only: str | None = None) -> list[RunPlan]:
    """The runs to train (`only`: the label of one run to train alone), after the checks that need no
    model: the label exists, every data file the runs and their evaluation read is there. Raises
    ValueError / FileNotFoundError naming the key or file; the CLI calls it before claiming the folder."""
    plans = plan_runs(recipe)
    if only is not None:
        if only not in [p.label for p in plans]:
            raise ValueError(f"--only {only}: the recipe has no such run (runs: {', '.join(p.label for p in plans)})")
        plans = [p for p in plans if p.label == only]
    if recipe.eval is not None:
        from lpq.eval.settings import check_paths

        check_paths(recipe.eval)
    if recipe.domain_eval is not None:
        from lpq.train.domains import check_domain_files

        check_domain_files(recipe.domain_eval)
    if recipe.data.mix is not None:
        from lpq.train.data import check_mix_files

        check_mix_files(recipe.data)
    return plans


def run_training(recipe: TrainRecipe, *, resume: bool = True, only: str | None = None,
                 on_step: StepCallback | None = None) -> dict:
    """Train the runs the recipe asks for (`only`: the label of one run to train alone) and report."""
    cfg = recipe.train
    out = cfg.output_dir
    plans = select_runs(recipe, only)
    state = process_state()
    main = state.is_main_process
    if main:
        out.mkdir(parents=True, exist_ok=True)
        dump_yaml(recipe, out / RECIPE_COPY)
    has_ref = bool(plans) and plans[0].quant is None
    evaluating = recipe.eval is not None and has_ref and len(plans) > 1
    if evaluating and state.num_processes > 1 and cfg.distributed.value == "fsdp":
        raise ValueError("eval: after FSDP training is not supported (each rank holds a shard of the model); "
                         "drop the eval section and run `lpq eval --model <out>/<run>/final` on the saved models")
    runs = {p.label: train_run(recipe, out / p.label, quant=p.quant, label=p.label, resume=resume, on_step=on_step,
                               keep_model=evaluating and main) for p in plans}
    report = build_report(recipe, plans, runs, state.num_processes)
    if main:
        if evaluating:
            ref = runs[plans[0].label]
            quantized = plans[1:]
            for p in quantized:
                where = out / "eval" if len(quantized) == 1 else out / "eval" / p.label
                summary = paired_eval(recipe, ref, runs[p.label], where, p.title)
                report["runs"][p.label]["eval"] = summary
                if len(quantized) == 1:
                    report["eval"] = summary
        _plots(recipe, plans, runs, out)
        (out / REPORT).write_text(json.dumps(_finite(report), indent=1))
    return _finite(report)


def paired_eval(recipe: TrainRecipe, ref: RunResult, cand: RunResult, out: Path, title: str) -> dict:
    """`lpq eval` (lpq.eval) of a quantized-trained model, quantizers on, against the reference-trained one.

    Returns the figures the training report repeats; the whole evaluation is in `out`."""
    from lpq.config import to_dict
    from lpq.models.hub import load_model

    settings = recipe.eval
    if ref.tokenizer is not None:
        from lpq.eval.paired import run_paired

        res = run_paired(ref.model, cand.model, ref.tokenizer, settings, out, model_name=recipe.model.id,
                         recipe=to_dict(recipe))
    else:
        from lpq.eval.video import run_paired_video

        # Training dropped the text encoder and VAE: generate with fresh pipelines around the trained transformers.
        pipes = []
        for run in (ref, cand):
            pipe = load_model(recipe.model).model
            pipe.transformer = run.model
            pipes.append(pipe)
        res = run_paired_video(*pipes, settings, out, model_name=recipe.model.id, recipe=to_dict(recipe))
    summary: dict = {"dir": str(out), "baseline": f"{ref.label}-trained",
                     "candidate": f"{cand.label}-trained ({title}, quantizers on)",
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


_BLOCK = re.compile(r"(?:^|\.)(?:layers|blocks|h)\.(\d+)\.")


def block_of(name: str) -> int | None:
    """The transformer block index in a quantizer's module name, or None outside the blocks."""
    m = _BLOCK.search(name)
    return int(m.group(1)) if m else None


def stability(rows: list[dict]) -> dict:
    """Stability figures of one quantized run from its quant_stats.jsonl rows.

    Per stats step (`over_time`): the worst and mean overflow and flush fractions over all quantizers,
    and the largest amax-history lag (this step's amax / the history amax its delayed scale came from;
    > 1 means the tensor outgrew the history). Overall: the worst of each, the share of delayed
    quantizer calls whose amax exceeded their history, and the flush rate of the softmax P per block
    (last stats step, and worst over the run)."""
    over_time = []
    worst = {"overflow": 0.0, "flushed": 0.0, "amax_vs_history": None}
    lagging, delayed_calls = 0, 0
    p_last: dict[int, float] = {}
    p_worst: dict[int, float] = {}
    for row in rows:
        qs = row["quantizers"]
        point: dict = {"step": row["step"]}
        for key in ("overflow", "flushed"):
            vals = [s[key] for s in qs.values() if s.get(key) is not None]
            point[f"max_{key}"] = max(vals, default=0.0)
            point[f"mean_{key}"] = sum(vals) / len(vals) if vals else 0.0
            worst[key] = max(worst[key], point[f"max_{key}"])
        lags = [s["amax_vs_history"] for s in qs.values() if s.get("amax_vs_history") is not None]
        point["max_amax_vs_history"] = max(lags, default=None)
        if lags:
            worst["amax_vs_history"] = max(worst["amax_vs_history"] or 0.0, point["max_amax_vs_history"])
        lagging += sum(v > 1 for v in lags)
        delayed_calls += len(lags)
        p_last = {}
        for name, s in qs.items():
            if name.endswith("p_quantizer") and (b := block_of(name)) is not None:
                p_last[b] = max(p_last.get(b, 0.0), s["flushed"])
                p_worst[b] = max(p_worst.get(b, 0.0), s["flushed"])
        over_time.append(point)
    return {"max_overflow": worst["overflow"], "max_flushed": worst["flushed"],
            "max_amax_vs_history": worst["amax_vs_history"],
            "share_amax_above_history": lagging / delayed_calls if delayed_calls else None,
            "p_flushed_by_block_last": {str(b): p_last[b] for b in sorted(p_last)},
            "p_flushed_by_block_worst": {str(b): p_worst[b] for b in sorted(p_worst)},
            "over_time": over_time}


def build_report(recipe: TrainRecipe, plans: list[RunPlan], runs: dict[str, RunResult], world_size: int) -> dict:
    """train_report.json: every run under `runs`, plus (one quantized run) the flat keys of earlier reports."""
    cfg = recipe.train
    report: dict = {"model": recipe.model.id, "steps": cfg.steps, "world_size": world_size, "seed": cfg.seed,
                    "batch_size_global": cfg.batch_size * cfg.grad_accum * world_size,
                    "precision": f"float32 master weights, {cfg.mixed_precision.value} autocast compute"
                                 if cfg.mixed_precision is MixedPrecision.BF16 else "float32"}
    if recipe.quant is not None:
        report.update(bf16_warmup_steps=cfg.bf16_warmup_steps, protected_blocks=recipe.quant.protected_blocks)
    ref = plans[0] if plans and plans[0].quant is None and plans[0].label in runs else None
    report["reference"] = ref.label if ref else None
    report["runs"] = {}
    for p in plans:
        run = runs[p.label]
        entry: dict = {"title": p.title, "quantized": p.quant is not None, "eval_loss": run.eval_loss,
                       "eval_loss_before_training": run.eval_loss_initial, "final_train_loss": run.losses[-1],
                       "step_time_s": median(run.step_times[min(cfg.bf16_warmup_steps + 2, len(run.step_times) - 1):])}
        if p.quant is not None:
            entry.update(format=format_label(p.quant), scaling=_activation_scaling(p.quant),
                         scaling_by_role=scaling_by_role(p.quant))
            if ref is not None:
                r = runs[ref.label]
                entry["rel_diff_pct"] = 100.0 * (run.eval_loss - r.eval_loss) / r.eval_loss
                # The bar is one-sided: the quantized run may not lose more than 0.5 % (a lower loss is no loss).
                entry["within_0.5pct"] = entry["rel_diff_pct"] < LOSS_BAR_PCT
                _, tr, ratio = step_time_ratio(run, r, cfg.bf16_warmup_steps)
                entry.update(step_time_ratio=ratio, step_time_reference_s=tr)
                entry["first_step_losses_differ"] = next(
                    (i + 1 for i, (a, b) in enumerate(zip(r.losses, run.losses)) if a != b), None)
                if run.domain_nll is not None and r.domain_nll is not None:
                    d = recipe.domain_eval
                    from lpq.train.domains import compare_domains

                    entry["domains"] = compare_domains(r.domain_nll, run.domain_nll, d.seq_len, d.bootstrap, cfg.seed)
            stats_path = run.run_dir / "quant_stats.jsonl"
            rows = read_jsonl(stats_path) if stats_path.is_file() else []
            if rows:
                entry["stability"] = stability(rows)
                entry["quant_stats_last"] = {"step": rows[-1]["step"], **rows[-1]["summary"]}
        if "ranks_identical" in run.extra:
            entry["ranks_identical"] = run.extra["ranks_identical"]
        report["runs"][p.label] = entry
    _legacy_keys(report, plans, runs)
    return report


def _legacy_keys(report: dict, plans: list[RunPlan], runs: dict[str, RunResult]) -> None:
    """The flat keys of the one-quantized-run report (kept so earlier consumers keep working):
    eval_loss_<label>, final_train_loss_<label>, eval_loss_<label>_before_training for every run, and
    with exactly one quantized run its scaling, rel_diff_pct, within_0.5pct, step times and traces."""
    for p in plans:
        run = runs[p.label]
        report[f"eval_loss_{p.label}"] = run.eval_loss
        report[f"final_train_loss_{p.label}"] = run.losses[-1]
        report[f"eval_loss_{p.label}_before_training"] = run.eval_loss_initial
        if "ranks_identical" in run.extra:
            report[f"ranks_identical_{p.label}"] = run.extra["ranks_identical"]
    quantized = [p for p in plans if p.quant is not None]
    if len(quantized) != 1:
        return
    p = quantized[0]
    entry = report["runs"][p.label]
    report.update(scaling=entry["scaling"], scaling_by_role=entry["scaling_by_role"])
    for key in ("rel_diff_pct", "within_0.5pct", "step_time_ratio", "first_step_losses_differ"):
        if key in entry:
            report[key] = entry[key]
    if "step_time_ratio" in entry:
        report[f"step_time_{p.label}_s"] = entry["step_time_s"]
        report[f"step_time_{report['reference']}_s"] = entry["step_time_reference_s"]
    if "quant_stats_last" in entry:
        report["quant_stats_last"] = entry["quant_stats_last"]
        report["quant_stats_worst_overflow"] = entry["stability"]["max_overflow"]


def _finite(obj):
    """JSON-safe: non-finite floats become null, recursively."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def _plots(recipe: TrainRecipe, plans: list[RunPlan], runs: dict[str, RunResult], out: Path) -> None:
    quantized = [p for p in plans if p.quant is not None]
    plot_loss_curves({p.title: runs[p.label].losses for p in plans}, out / "loss_curves.png",
                     quant_start=recipe.train.bf16_warmup_steps if quantized else None,
                     title=f"{recipe.model.id}: seed {recipe.train.seed}, lr {recipe.train.lr:g}")
    traces = {}
    for p in quantized:
        path = runs[p.label].run_dir / "quant_stats.jsonl"
        if path.is_file() and path.stat().st_size:
            rows = read_jsonl(path)
            plot_quant_stats(rows, runs[p.label].run_dir / "quant_stats.png")
            traces[p.title] = stability(rows)["over_time"]
    if traces:
        plot_stability(traces, out / "stability.png")


def describe(report: dict) -> str:
    """Human summary of a report, for the CLI."""
    lines = [f"steps {report['steps']} on {report['world_size']} process(es), {report['precision']}"]
    ref = report.get("reference")
    for label, run in report["runs"].items():
        lines.append(f"eval loss {run['title']}: {run['eval_loss']:.5f}")
        if run.get("rel_diff_pct") is not None:
            lines.append(f"  relative difference ({label} - {ref}) / {ref}: {run['rel_diff_pct']:+.3f} % "
                         f"({'meets' if run['within_0.5pct'] else 'FAILS'} the < {LOSS_BAR_PCT} % loss bar)")
            lines.append(f"  step time {label} / {ref}: {run['step_time_ratio']:.2f}x "
                         f"({run['step_time_s']:.3f} s vs {run['step_time_reference_s']:.3f} s)")
        for name, d in run.get("domains", {}).items():
            lines.append(f"  perplexity on {name}: {d['ppl_reference']:.3f} -> {d['ppl']:.3f} "
                         f"({d['ppl_increase_pct']:+.2f} %, 95 % CI {d['ci95_low']:+.2f} .. {d['ci95_high']:+.2f})")
        st = run.get("stability")
        if st:
            lag = st["max_amax_vs_history"]
            lines.append(f"  worst overflow {st['max_overflow']:.2e}, worst flush {st['max_flushed']:.2e}"
                         + (f", largest amax / history amax {lag:.2f}" if lag is not None else ""))
        for name, t in run.get("eval", {}).get("tasks", {}).items():
            rel = "" if t.get("rel_loss_pct") is None else f" ({t['rel_loss_pct']:+.2f} % relative loss)"
            lines.append(f"  lpq eval {name}: {ref}-trained {t['baseline']:.4f}, {label}-trained {t['quantized']:.4f}{rel}")
        shift = run.get("eval", {}).get("distribution_shift")
        if shift:
            lines.append(f"  lpq eval distribution shift: perplexity {shift['baseline_ppl']:.3f} -> "
                         f"{shift['candidate_ppl']:.3f}, KL {shift['kl_div']:.4f}, top-1 agreement "
                         f"{shift['top1_agreement']:.4f}")
    return "\n".join(lines)
