"""`lpq ptq`: W4A4 post-training quantization, block by block, resumable.

Flow: load the model (-> residual-stream rotation, `rotate_residual`) -> calibration inputs of block 0
(hooks) -> data-free rotation of every block -> sensitivity ranking and protected blocks
(`protect.auto`) -> for each block in order: smoothing, Hessians of its (quantized) inputs, GPTQ /
scale search / RTN, outputs for the next block, a checkpoint -> runtime modules -> end-to-end norm
distillation (`norm_distill`) -> evaluation vs the unquantized model -> report.md, report.json, the
resolved recipe.

The checkpoint after block i holds the quantized blocks <= i and the inputs of block i+1, so a
killed run restarts at block i+1 and ends with the same model as an uninterrupted one.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import resource
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import typer
from torch import nn
from tqdm import tqdm

from lpq.algorithms.norm_distill import NormDistillSettings, distill_norms
from lpq.algorithms.rotation import rotate_residual
from lpq.algorithms.rtn import rtn_quantize
from lpq.algorithms.sensitivity import choose_protected, plot_sensitivity
from lpq.config import ConfigError, dump_yaml, load_config, to_dict
from lpq.data.calibration import calibration_tokens, read_prompts
from lpq.export.atomic import save_atomic
from lpq.models.hub import LoadedModel, load_model
from lpq.models.offload import is_offloaded, materialized
from lpq.pipelines import linear_hooks as lh
from lpq.pipelines.calibration import BlockInputs, advance, capture, decoder_blocks, feed_causal_lm
from lpq.pipelines.ptq_blocks import prepare_block, process_block
from lpq.pipelines.ptq_config import PTQConfig, StepConfig
from lpq.quant.recipe import QuantRecipe

CHECKPOINT_VERSION = 1


def peak_rss_mb() -> float:
    """Peak resident set size of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def fingerprint(cfg: PTQConfig) -> str:
    """What must match for a checkpoint to be continued: model, quantization, data, algorithms."""
    d = to_dict(cfg)
    key = {k: d[k] for k in ("model", "quant", "calibration", "algorithms", "protect", "skip_linears")}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------- checkpoints

class Checkpoint:
    """out/checkpoint: meta.json (progress), block_NNNN.pt (finished blocks), inputs.pt (next inputs),
    norm_distill.pt (the distillation's progress)."""

    def __init__(self, root: Path, fp: str):
        self.root, self.fp = root, fp
        self.meta_path = root / "meta.json"
        self.distill_path = root / "norm_distill.pt"

    def load(self) -> dict | None:
        if not self.meta_path.is_file():
            return None
        meta = json.loads(self.meta_path.read_text())
        if meta.get("fingerprint") != self.fp or meta.get("version") != CHECKPOINT_VERSION:
            print(f"lpq ptq: checkpoint in {self.root} is for another recipe; starting over", file=sys.stderr)
            return None
        return meta

    def save_block(self, key: str, block: nn.Module, inputs: BlockInputs, meta: dict) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        states = {n: (s.rotation, s.enabled, s.input_scale) for n, m in block.named_modules()
                  if (s := lh.state(m)) is not None}
        save_atomic({"state_dict": block.state_dict(), "linear_states": states}, self.root / f"{key}.pt")
        save_atomic({"hidden": inputs.hidden, "args": inputs.args, "kwargs": inputs.kwargs},
                          self.root / "inputs.pt")
        self.save_meta(meta)

    def save_meta(self, meta: dict) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.meta_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({**meta, "fingerprint": self.fp, "version": CHECKPOINT_VERSION}, indent=1))
        tmp.replace(self.meta_path)

    def restore_block(self, key: str, block: nn.Module) -> None:
        saved = torch.load(self.root / f"{key}.pt", weights_only=False)
        block.load_state_dict(saved["state_dict"])
        modules = dict(block.named_modules())
        for name, (rotation, enabled, input_scale) in saved["linear_states"].items():
            st = lh.attach(modules[name])
            st.rotation, st.enabled, st.input_scale = rotation, enabled, input_scale

    def load_inputs(self) -> BlockInputs:
        d = torch.load(self.root / "inputs.pt", weights_only=False)
        return BlockInputs(d["hidden"], d["args"], d["kwargs"])


# ---------------------------------------------------------------- model parts

class Stage:
    """One stack of blocks to calibrate: an LLM's decoder, or one Wan expert."""

    def __init__(self, name: str, root: nn.Module, offset: int):
        self.name, self.root, self.offset = name, root, offset
        self.blocks = decoder_blocks(root)


def stages_of(loaded: LoadedModel) -> list[Stage]:
    if loaded.kind == "wan":
        pipe = loaded.model
        stages = [Stage("transformer", pipe.transformer, 0)]
        if getattr(pipe, "transformer_2", None) is not None:
            stages.append(Stage("transformer_2", pipe.transformer_2, len(stages[0].blocks)))
        return stages
    return [Stage("model", loaded.model, 0)]


def _block_store(out_dir: Path) -> Callable[[int], Path]:
    """Where an offloaded block's edited (rotated, then quantized) tensors are kept, by global index."""
    return lambda g: out_dir / "offload" / f"block_{g:04d}"


def capture_stage_inputs(loaded: LoadedModel, cfg: PTQConfig, tokens: torch.Tensor | None) -> list[BlockInputs]:
    """Block-0 inputs for every stage (LLM: token batches; Wan: latents over the denoising schedule)."""
    stages = stages_of(loaded)
    if loaded.kind != "wan":
        feed = feed_causal_lm(loaded.model, tokens, cfg.calibration.batch_size)
        return [capture(stages[0].blocks[0], feed, stop=True)]
    recs: list[BlockInputs] = [BlockInputs() for _ in stages]
    handles = []
    for st, rec in zip(stages, recs):
        def hook(module, args, kwargs, rec=rec):
            hidden = args[0] if args else kwargs["hidden_states"]
            rest = tuple(args[1:]) if args else ()
            kw = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            rec.hidden.append(hidden.detach().cpu())
            rec.args.append(tuple(a.detach().cpu() if torch.is_tensor(a) else a for a in rest))
            rec.kwargs.append({k: (v.detach().cpu() if torch.is_tensor(v) else
                                   tuple(t.detach().cpu() for t in v) if isinstance(v, tuple) else v)
                               for k, v in kw.items()})
        handles.append(st.blocks[0].register_forward_pre_hook(hook, with_kwargs=True))
    c = cfg.calibration
    try:
        with torch.no_grad():
            for prompt in read_prompts(c):
                loaded.model(prompt=prompt, height=c.height, width=c.width, num_frames=c.num_frames,
                             num_inference_steps=c.timesteps, output_type="latent",
                             generator=torch.Generator().manual_seed(0))
    finally:
        for h in handles:
            h.remove()
    for st, rec in zip(stages, recs):
        if not rec.hidden:
            raise RuntimeError(f"no calibration inputs reached {st.name}; check calibration.timesteps")
    return recs


# ---------------------------------------------------------------- sensitivity

def _llm_loss(model: nn.Module, hidden: list[torch.Tensor], tokens: torch.Tensor, batch: int) -> float:
    norm, head = model.model.norm, model.get_output_embeddings()
    total, count = 0.0, 0
    with torch.no_grad():
        for i, h in enumerate(hidden):
            t = tokens[i * batch:(i + 1) * batch]
            logits = head(norm(h))[:, :-1].float()
            total += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                             t[:, 1:].reshape(-1), reduction="sum"))
            count += t[:, 1:].numel()
    return total / count


def sensitivity(loaded: LoadedModel, cfg: PTQConfig, stage_inputs: list[BlockInputs],
                tokens: torch.Tensor | None) -> dict[int, float]:
    """Per global block index: loss increase when only that block is quantized (RTN, W4A4)."""
    scores: dict[int, float] = {}
    for stage, inputs0 in zip(stages_of(loaded), stage_inputs):
        n_batches = len(inputs0)
        if loaded.kind != "wan":
            per = cfg.calibration.batch_size
            n_batches = max(1, min(n_batches, -(-cfg.protect.sequences // per)))
        sub = BlockInputs(inputs0.hidden[:n_batches], inputs0.args[:n_batches], inputs0.kwargs[:n_batches])
        if loaded.kind != "wan":
            sub.hidden = [h[:, :cfg.protect.seq_len] for h in sub.hidden]
            sub.kwargs = [_truncate_kwargs(k, cfg.protect.seq_len) for k in sub.kwargs]
        all_inputs = [sub]
        for blk in stage.blocks:
            lh.set_enabled(blk, False)
        for blk in tqdm(stage.blocks, desc=f"sensitivity float pass ({stage.name})", unit="block"):
            all_inputs.append(advance(blk, all_inputs[-1]))
        sens_tokens = tokens[: n_batches * cfg.calibration.batch_size, :cfg.protect.seq_len] if tokens is not None else None

        def loss_of(final: BlockInputs) -> float:
            if loaded.kind == "wan":
                ref = all_inputs[-1].hidden
                num = sum(float(((a - b) ** 2).sum()) for a, b in zip(final.hidden, ref))
                return num / max(sum(float((b ** 2).sum()) for b in ref), 1e-30)
            return _llm_loss(stage.root, final.hidden, sens_tokens, cfg.calibration.batch_size)

        base = loss_of(all_inputs[-1])
        for i, blk in enumerate(tqdm(stage.blocks, desc=f"sensitivity ({stage.name})", unit="block")):
            # Offloaded: the RTN weights live only while this block is held; its stored weights stay float.
            with materialized(blk, None):
                lins = lh.linears(blk, tuple(cfg.skip_linears))
                saved = {n: l.weight.detach().clone() for n, l in lins.items()}
                with torch.no_grad():
                    for l in lins.values():
                        l.weight.copy_(rtn_quantize(l.weight.float(), cfg.weight_format).to(l.weight.dtype))
                lh.set_enabled(blk, True)
                cur = all_inputs[i]
                for blk2 in stage.blocks[i:]:
                    cur = advance(blk2, cur)
                scores[stage.offset + i] = loss_of(cur) - base
                lh.set_enabled(blk, False)
                with torch.no_grad():
                    for n, l in lins.items():
                        l.weight.copy_(saved[n])
    return scores


def _truncate_kwargs(kwargs: dict, seq_len: int) -> dict:
    """Cut sequence-length dims of the captured block kwargs (rotary tables, masks) to seq_len."""
    out = {}
    for k, v in kwargs.items():
        if k == "position_embeddings" and isinstance(v, tuple):
            out[k] = tuple(t[:, :seq_len] for t in v)
        elif k == "attention_mask" and torch.is_tensor(v) and v.dim() == 4:
            out[k] = v[..., :seq_len, :seq_len]
        elif k in ("position_ids", "cache_position") and torch.is_tensor(v):
            out[k] = v[..., :seq_len]
        else:
            out[k] = v
    return out


# ---------------------------------------------------------------- the run

def run(cfg: PTQConfig, out_dir: Path) -> dict:
    """Run the whole PTQ recipe into out_dir; returns the report dict."""
    t_start = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    dump_yaml(cfg, out_dir / "recipe.yaml")
    ckpt = Checkpoint(out_dir / "checkpoint", fingerprint(cfg))
    meta = ckpt.load()
    if meta is None:
        meta = {"next": 0, "stats": [], "protected": None, "sensitivity": None, "wall_s": 0.0}
        ckpt.distill_path.unlink(missing_ok=True)   # trained on another run's blocks
    resumed_from = meta["next"]
    prev_wall = meta["wall_s"]   # time spent by the runs this one continues
    if resumed_from:
        print(f"lpq ptq: resuming after {resumed_from} finished blocks", file=sys.stderr)

    loaded = load_model(cfg.model)
    rot = cfg.step("rotate_residual")
    if rot is not None:
        if loaded.kind == "wan":
            raise ValueError("rotate_residual supports causal LMs, not Wan")
        if is_offloaded(loaded.model):
            raise ValueError("rotate_residual rewrites every weight of the model at once, which offloaded weights "
                             "(model.device_map with cpu/disk offload) do not allow; drop it or load the model whole")
        # Data-free and seeded: a resumed run rebuilds the same rotated model, then loads its finished blocks.
        rotate_residual(loaded.model, rot.seed)
    if cfg.step("norm_distill") is not None:
        if loaded.kind == "wan":
            raise ValueError("norm_distill matches next-token distributions: it needs a causal LM, not Wan")
        if is_offloaded(loaded.model):
            raise ValueError("norm_distill trains through the whole model at once, which offloaded weights "
                             "(model.device_map with cpu/disk offload) do not allow; drop it or load the model whole")
    stages = stages_of(loaded)
    n_blocks = sum(len(s.blocks) for s in stages)
    store = _block_store(out_dir)
    for stage in stages:
        for i, blk in enumerate(stage.blocks):
            with materialized(blk, store(stage.offset + i)):
                prepare_block(blk, cfg)

    tokens = None
    if loaded.kind != "wan":
        tokens = calibration_tokens(cfg.calibration, loaded.tokenizer)

    timings: dict[str, float] = {}
    stage_inputs = None
    if meta["protected"] is None:
        protected = sorted(cfg.protect.blocks or [])
        if cfg.protect.auto:
            t0 = time.perf_counter()
            stage_inputs = capture_stage_inputs(loaded, cfg, tokens)
            scores = sensitivity(loaded, cfg, stage_inputs, tokens)
            protected = sorted(choose_protected(scores, cfg.protect.auto))
            meta["sensitivity"] = {str(k): v for k, v in scores.items()}
            timings["sensitivity_s"] = time.perf_counter() - t0
        bad = [b for b in protected if b >= n_blocks]
        if bad:
            raise ValueError(f"protected block(s) {bad} out of range: the model has {n_blocks} blocks")
        _local_protected(stages, set(protected))   # fail now, not after the last block, if the runtime cannot hold it
        meta["protected"] = protected
        meta["timings"] = timings
        ckpt.save_meta(meta)
    protected = set(meta["protected"])
    if meta["sensitivity"]:
        scores = {int(k): v for k, v in meta["sensitivity"].items()}
        plot_sensitivity(scores, sorted(protected), out_dir / "sensitivity.png")

    # Blocks finished before a restart: load them back.
    for stage in stages:
        for i, blk in enumerate(stage.blocks):
            if stage.offset + i < meta["next"]:
                with materialized(blk, store(stage.offset + i)):
                    ckpt.restore_block(f"block_{stage.offset + i:04d}", blk)
                lh.set_enabled(blk, stage.offset + i not in protected)

    t_blocks = time.perf_counter()
    with tqdm(total=n_blocks, initial=meta["next"], desc="ptq blocks", unit="block") as bar:
        for si, stage in enumerate(stages):
            end = stage.offset + len(stage.blocks)
            if meta["next"] >= end:
                continue
            if meta["next"] > stage.offset:
                inputs = ckpt.load_inputs()
            else:
                if stage_inputs is None:
                    stage_inputs = capture_stage_inputs(loaded, cfg, tokens)
                inputs = stage_inputs[si]
            for i in range(meta["next"] - stage.offset, len(stage.blocks)):
                g = stage.offset + i
                blk = stage.blocks[i]
                with materialized(blk, store(g)):
                    stats, inputs = process_block(blk, g, inputs, cfg, protected=g in protected)
                    meta["stats"].append(stats.__dict__)
                    meta["next"] = g + 1
                    meta["wall_s"] = prev_wall + time.perf_counter() - t_start
                    ckpt.save_block(f"block_{g:04d}", blk, inputs, meta)
                bar.set_postfix(block=g, err=f"{stats.rel_output_error or 0:.2e}", prot=stats.protected)
                bar.update(1)
            if stage_inputs is not None:
                stage_inputs[si] = BlockInputs()   # this stage's calibration inputs are no longer needed
    timings["blocks_s"] = time.perf_counter() - t_blocks

    report = {
        "format": cfg.weight_format,
        "model": cfg.model.id,
        "protected_blocks": sorted(protected),
        "resumed_from_block": resumed_from,
        "blocks": meta["stats"],
        "sensitivity": meta["sensitivity"],
        "algorithms": [to_dict(s) for s in cfg.algorithms],
        "timings": {**meta.get("timings", {}), **timings},
        "baseline": {},
        "quantized": {},
        "offloaded": any(is_offloaded(st.root) for st in stages),
    }
    t0 = time.perf_counter()
    recipe = to_runtime(loaded, cfg, stages, protected)
    report["timings"]["convert_s"] = time.perf_counter() - t0
    step = cfg.step("norm_distill")
    if step is not None:
        report["norm_distill"] = distill(loaded, cfg, step, ckpt.distill_path)
        report["timings"]["norm_distill_s"] = report["norm_distill"]["seconds"]
    if cfg.evaluation is not None and loaded.kind != "wan":
        report.update(evaluate(loaded, cfg, out_dir))
    if cfg.export is not None:
        t0 = time.perf_counter()
        report["export"] = export(loaded, cfg, recipe, out_dir)
        report["timings"]["export_s"] = time.perf_counter() - t0
    report["wall_s"] = prev_wall + time.perf_counter() - t_start
    report["peak_rss_mb"] = peak_rss_mb()
    write_report(report, out_dir)
    return report


# ---------------------------------------------------------------- runtime modules and export

def _local_protected(stages: list[Stage], protected: set[int]) -> list[int]:
    """The protected blocks as the runtime recipe numbers them: per network (Wan: per expert).

    A runtime recipe holds one list for every network, so the experts of a Wan pipeline must have
    the same local protected indices."""
    per_stage = [sorted(g - st.offset for g in protected if st.offset <= g < st.offset + len(st.blocks))
                 for st in stages]
    if any(p != per_stage[0] for p in per_stage[1:]):
        raise ValueError("the runtime recipe protects the same block indices in every network; the protected "
                         f"blocks per network differ: {dict((st.name, p) for st, p in zip(stages, per_stage))}. "
                         "List protect.blocks so that each expert protects the same local indices")
    return per_stage[0]


def to_runtime(loaded: LoadedModel, cfg: PTQConfig, stages: list[Stage], protected: set[int]) -> QuantRecipe:
    """Turn the simulated model into runtime modules, in place, and return their recipe.

    `quantize_model` makes the linears of unprotected blocks QuantLinear; each linear the pipeline
    rotated or smoothed gets the same online part as an `InputTransform` (protected blocks keep their
    rotation too), and each quantized weight is stored as it is (`set_quantized_weight`: GPTQ output
    is on the grid and must not be re-quantized). The model computes exactly what the simulation
    did; `export_model` can write it.
    """
    from lpq.quant import InputTransform, QuantLinear, quantize_model, set_input_transform
    from lpq.quant.experts import QuantExperts

    recipe = dataclasses.replace(cfg.quant, protected_blocks=_local_protected(stages, protected))
    transforms: dict[tuple[int, str], InputTransform] = {}
    for si, stage in enumerate(stages):
        prefix = decoder_prefix(stage.root)
        for i, blk in enumerate(stage.blocks):
            for name, mod in list(blk.named_modules()):
                st = lh.state(mod)
                if st is not None:
                    if st.rotation or st.input_scale is not None:
                        transforms[si, f"{prefix}.{i}.{name}"] = InputTransform(st.rotation, st.input_scale)
                    lh.detach(mod)
                elif isinstance(mod, QuantExperts):
                    # The runtime wraps fused experts itself (same parameters, same RTN W4A4).
                    parent, _, attr = name.rpartition(".")
                    setattr(blk.get_submodule(parent) if parent else blk, attr, mod._float_experts[0])
    quantize_model(loaded.model, recipe)
    for (si, name), transform in transforms.items():
        set_input_transform(stages[si].root, name, transform)
    for stage in stages:
        for mod in stage.root.modules():
            if isinstance(mod, QuantLinear) and mod.weight_quantizer is not None:
                mod.set_quantized_weight(mod.weight.detach().clone())
    return recipe


def decoder_prefix(root: nn.Module) -> str:
    """Module name of the block list inside `root` (`model.layers` for a causal LM, `blocks` for Wan)."""
    blocks = decoder_blocks(root)
    return next(n for n, m in root.named_modules() if m is blocks)


def export(loaded: LoadedModel, cfg: PTQConfig, recipe: QuantRecipe, out_dir: Path) -> dict:
    """The packed (or fake) checkpoint of the runtime model; returns where it went and its sizes."""
    from lpq.export import export_model

    ex = cfg.export
    # The default folder belongs to this run, so a rerun replaces it; an explicit `out` needs `force`.
    path = Path(ex.out) if ex.out else out_dir / "quantized"
    with contextlib.ExitStack() as held:
        # The writer reads whole state dicts: offloaded tensors are loaded into CPU memory for it.
        for stage in stages_of(loaded):
            held.enter_context(materialized(stage.root, None, device="cpu"))
        size = export_model(loaded.model, recipe, path, kind=ex.kind, force=ex.force or ex.out is None,
                            tokenizer=loaded.tokenizer, max_shard_gb=ex.max_shard_gb)
    return {"path": str(path), "kind": ex.kind, **dataclasses.asdict(size), "bits_per_param": size.bits_per_param}


def distill(loaded: LoadedModel, cfg: PTQConfig, step: StepConfig, resume_file: Path) -> dict:
    """norm_distill on the runtime model against a fresh float copy, on windows of the calibration text;
    continued from `resume_file` after an interruption."""
    tokens = calibration_tokens(dataclasses.replace(cfg.calibration, num_sequences=step.sequences,
                                                    seq_len=step.seq_len), loaded.tokenizer)
    teacher = load_model(cfg.model).model
    return distill_norms(loaded.model, teacher, tokens, NormDistillSettings(step.steps, step.lr, step.batch_size),
                         resume_file=resume_file, blocks=decoder_blocks(loaded.model))


def evaluate(loaded: LoadedModel, cfg: PTQConfig, out_dir: Path) -> dict:
    """WikiText-2 perplexity / KL / top-1 and paired MMLU, quantized vs a fresh unquantized copy."""
    from lpq.eval import EvalSettings, distribution_shift, run_paired

    ev = cfg.evaluation
    res: dict[str, Any] = {"baseline": {}, "quantized": {}}
    model_cfg = cfg.model
    if model_cfg.offload_dir:   # the baseline's offloaded weights must not overwrite the quantized model's
        model_cfg = dataclasses.replace(model_cfg, offload_dir=str(Path(model_cfg.offload_dir) / "baseline"))
    baseline = load_model(model_cfg).model
    if ev.wikitext2:
        text = Path(ev.wikitext2).read_text(encoding="utf-8")
        r = distribution_shift(baseline, loaded.model, loaded.tokenizer, text, ev.windows, ev.seq_len)
        res["baseline"]["wikitext2_ppl"] = r["baseline_ppl"]
        res["quantized"].update(wikitext2_ppl=r["candidate_ppl"], kl_div=r["kl_div"],
                                top1_agreement=r["top1_agreement"])
    if ev.mmlu:
        settings = EvalSettings(tasks=["mmlu"], limit=ev.mmlu_questions, seed=ev.seed, kl=False)
        r = run_paired(baseline, loaded.model, loaded.tokenizer, settings, out_dir / "eval",
                       model_name=cfg.model.id, recipe=to_dict(cfg))["tasks"]["mmlu"]
        res["baseline"]["mmlu_acc"] = r["baseline"]
        res["quantized"]["mmlu_acc"] = r["quantized"]
        res["mmlu_agreement"] = r["agreement"]
    return res


def write_report(report: dict, out_dir: Path) -> None:
    (out_dir / "report.json").write_text(json.dumps(report, indent=1))
    b, q = report["baseline"], report["quantized"]
    lines = [f"# lpq ptq report: {report['model']} in {report['format']}", "",
             f"* protected blocks: {report['protected_blocks']}",
             f"* wall time: {report['wall_s']:.1f} s; peak RSS: {report['peak_rss_mb']:.0f} MB",
             f"* algorithms: {', '.join(a['name'] for a in report['algorithms'])}"]
    if "norm_distill" in report:
        nd = report["norm_distill"]
        lines.append(f"* norm distillation: {nd['parameters']} norm parameters, {nd['steps']} steps, "
                     f"KL on the training batch {nd['first_loss']:.4f} -> {nd['last_loss']:.4f} nats/token")
    if "export" in report:
        ex = report["export"]
        lines.append(f"* export ({ex['kind']}): {ex['path']}, {ex['bits_per_param']:.2f} bits per quantized weight")
    lines.append("")
    if "wikitext2_ppl" in q:
        inc = 100 * (q["wikitext2_ppl"] / b["wikitext2_ppl"] - 1)
        lines += ["| metric | baseline | quantized |", "|---|---|---|",
                  f"| WikiText-2 perplexity | {b['wikitext2_ppl']:.3f} | {q['wikitext2_ppl']:.3f} ({inc:+.1f} %) |",
                  f"| KL(baseline ‖ quantized), nats/token | | {q['kl_div']:.4f} |",
                  f"| top-1 agreement | | {q['top1_agreement']:.4f} |"]
        if "mmlu_acc" in q:
            lines.append(f"| MMLU accuracy | {b['mmlu_acc']:.4f} | {q['mmlu_acc']:.4f} |")
        if "mmlu_agreement" in report:
            lines.append(f"| MMLU paired agreement | | {report['mmlu_agreement']:.4f} |")
        lines.append("")
    lines += ["## Blocks", "", "| block | protected | rel. output error | GPTQ s | total s |", "|---|---|---|---|---|"]
    for s in report["blocks"]:
        err = "" if s["rel_output_error"] is None else f"{s['rel_output_error']:.3e}"
        lines.append(f"| {s['index']} | {'yes' if s['protected'] else ''} | {err} | {s['gptq_seconds']:.1f} | "
                     f"{s['seconds']:.1f} |")
    (out_dir / "report.md").write_text("\n".join(lines) + "\n")


def summary(report: dict) -> str:
    b, q = report["baseline"], report["quantized"]
    s = (f"{report['model']} {report['format']}: protected {report['protected_blocks']}, "
         f"{report['wall_s']:.0f} s, peak RSS {report['peak_rss_mb']:.0f} MB")
    if "wikitext2_ppl" in q:
        s += (f"\nWikiText-2 ppl {b['wikitext2_ppl']:.3f} -> {q['wikitext2_ppl']:.3f} "
              f"({100 * (q['wikitext2_ppl'] / b['wikitext2_ppl'] - 1):+.1f} %), KL {q['kl_div']:.4f}, "
              f"top-1 {q['top1_agreement']:.4f}")
    return s


def register(app: typer.Typer) -> None:
    @app.command("ptq")
    def ptq_command(
        config: Path = typer.Option(..., "--config", help="PTQ recipe YAML (configs/w4a4_hif4.yaml)"),
        model: str | None = typer.Option(None, "--model", help="override model.id"),
        out: Path | None = typer.Option(None, "--out", help="output folder (default: the recipe's output_dir)"),
    ) -> None:
        """W4A4 post-training quantization with block-sequential calibration (resumable)."""
        overrides = {"model.id": model} if model else None
        try:
            cfg = load_config(config, PTQConfig, overrides)
        except ConfigError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2)
        report = run(cfg, out or Path(cfg.output_dir))
        typer.echo(summary(report))
