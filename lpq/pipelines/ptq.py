"""`lpq ptq`: post-training quantization, block by block, resumable.

The pipeline walks the model and calls the recipe's steps (lpq/algorithms/step.py); it knows no
algorithm and no kind of model by name (the model kind, lpq/models/kinds.py, supplies calibration,
ranking and evaluation):

load the model -> steps' on_model_start -> runtime modules (`quantize_model`, quantization off)
-> steps' on_prepare_block on every block -> block sensitivity ranking and protected blocks
(`protect.auto`) -> for each block in order, on the outputs of the quantized blocks before it:
on_block_start, quantize_group per group of linears sharing an input, quantization on,
on_block_end, outputs for the next block, a checkpoint -> on_model_end -> evaluation vs the float
model -> export -> report.md, report.json, the resolved recipe.

The checkpoint after block i holds the quantized blocks <= i (state dicts plus the runtime
modules' structure) and the inputs of block i+1, so a killed run restarts at block i+1 and ends
with the same model as an uninterrupted one.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import pickle
import resource
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import torch
import typer
from torch import nn
from tqdm import tqdm

from lpq import cpu_numerics
from lpq.algorithms.context import BlockContext, RunContext, Stage
from lpq.algorithms.sensitivity import choose_protected, plot_sensitivity, rank_blocks
from lpq.algorithms.step import Phase, Step
from lpq.config import ConfigError, dump_yaml, load_config, to_dict, yaml_text
from lpq.data.block_inputs import BlockInputs, advance
from lpq.export.atomic import save_atomic
from lpq.models.adapters import Adapter, get_adapter
from lpq.models.hub import load_model
from lpq.models.offload import materialized
from lpq.outputs import RECIPE_COPY
from lpq.pipelines.ptq_config import PTQConfig
from lpq.pipelines.ptq_report import summary, write_report
from lpq.quant import quantize_model, set_quant_enabled
from lpq.quant.apply import protect_blocks, set_quant_enabled_in
from lpq.quant.experts import QuantExperts
from lpq.quant.linear import QuantLinear
from lpq.schema import KeyedError

CHECKPOINT_VERSION = 2
ERROR_BATCHES = 1        # calibration batches on which each block's relative output error is measured


def peak_rss_mb() -> float:
    """Peak resident set size of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def fingerprint(cfg: PTQConfig) -> str:
    """What must match for the finished blocks of a checkpoint to be continued: model, quantization,
    data, protection and the steps up to the weight quantizer. Refine steps (run after the last
    block) are not part of it: changing one reruns only that step (each keeps its own progress)."""
    d = to_dict(cfg)
    key = {k: d[k] for k in ("model", "quant", "calibration", "protect", "skip_linears")}
    key["algorithms"] = [to_dict(s) for s in cfg.algorithms if s.build().phase <= Phase.QUANTIZE]
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------- checkpoints

# What torch.load and the saved dicts raise for a truncated, corrupt or foreign checkpoint file.
_UNREADABLE = (OSError, RuntimeError, KeyError, ValueError, EOFError, pickle.UnpicklingError)


class Checkpoint:
    """out/checkpoint: meta.json (progress), block_NNNN.pt (finished blocks: state dict, runtime
    structure, the steps' state), inputs.pt (next inputs), and the steps' own progress files."""

    def __init__(self, root: Path, fp: str):
        self.root, self.fp = root, fp
        self.meta_path = root / "meta.json"

    def _damaged(self, path: Path, e: Exception) -> ValueError:
        return ValueError(f"{path} is damaged ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}); "
                          f"delete {self.root} to start the run over")

    def load(self) -> dict | None:
        if not self.meta_path.is_file():
            return None
        try:
            meta = json.loads(self.meta_path.read_text())
        except (OSError, ValueError) as e:
            raise self._damaged(self.meta_path, e) from None
        if not isinstance(meta, dict):
            raise self._damaged(self.meta_path, ValueError("not a JSON object"))
        if meta.get("fingerprint") != self.fp or meta.get("version") != CHECKPOINT_VERSION:
            print(f"lpq ptq: checkpoint in {self.root} is for another recipe; starting over", file=sys.stderr)
            return None
        return meta

    def clear(self) -> None:
        """Start over: a checkpoint of another recipe (blocks, steps' progress) must not be continued."""
        if self.root.is_dir():
            shutil.rmtree(self.root)

    def save_block(self, key: str, block: nn.Module, inputs: BlockInputs, meta: dict, steps: list[Step]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        save_atomic({"state_dict": block.state_dict(), "structure": structure(block),
                     "steps": {s.name: s.state_dict() for s in steps}}, self.root / f"{key}.pt")
        save_atomic({"hidden": inputs.hidden, "args": inputs.args, "kwargs": inputs.kwargs}, self.root / "inputs.pt")
        self.save_meta(meta)

    def save_meta(self, meta: dict) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.meta_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({**meta, "fingerprint": self.fp, "version": CHECKPOINT_VERSION}, indent=1))
        tmp.replace(self.meta_path)

    def restore_block(self, key: str, block: nn.Module) -> dict:
        """Load a finished block in place; returns the steps' saved state."""
        path = self.root / f"{key}.pt"
        try:
            saved = torch.load(path, weights_only=False)
            restore_structure(block, saved["structure"])
            block.load_state_dict(saved["state_dict"])
            return saved["steps"]
        except _UNREADABLE as e:
            raise self._damaged(path, e) from None

    def load_inputs(self) -> BlockInputs:
        path = self.root / "inputs.pt"
        try:
            d = torch.load(path, weights_only=False)
            return BlockInputs(d["hidden"], d["args"], d["kwargs"])
        except _UNREADABLE as e:
            raise self._damaged(path, e) from None


def structure(block: nn.Module) -> dict[str, dict]:
    """What a block's state dict does not say about its runtime modules (input transforms, on-grid weights)."""
    return {n: m.structure() for n, m in block.named_modules() if isinstance(m, (QuantLinear, QuantExperts))}


def restore_structure(block: nn.Module, saved: dict[str, dict]) -> None:
    modules = dict(block.named_modules())
    for name, st in saved.items():
        modules[name].restore_structure(st)


# ---------------------------------------------------------------- model parts

def stages_of(adapter: Adapter, model: object) -> list[Stage]:
    """The model's networks as stages, with global block offsets (a Wan2.2 pipeline has two)."""
    stages, offset = [], 0
    for name, net in adapter.networks(model):
        blocks = adapter.blocks(net)
        stages.append(Stage(name, net, offset, blocks))
        offset += len(blocks)
    return stages


def _block_store(out_dir: Path) -> Callable[[int], Path]:
    """Where an offloaded block's edited (rotated, then quantized) tensors are kept, by global index."""
    return lambda g: out_dir / "offload" / f"block_{g:04d}"


def _blocks(stages: list[Stage]):
    for stage in stages:
        for i, blk in enumerate(stage.blocks):
            yield stage.offset + i, stage, blk


def _local_protected(stages: list[Stage], protected: set[int]) -> list[int]:
    """The protected blocks as the runtime recipe numbers them: per network.

    A runtime recipe holds one list for every network, so the networks of a pipeline (Wan2.2's two
    experts) must protect the same local indices."""
    per_stage = [sorted(g - st.offset for g in protected if st.offset <= g < st.offset + len(st.blocks))
                 for st in stages]
    if any(p != per_stage[0] for p in per_stage[1:]):
        raise ValueError("the runtime recipe protects the same block indices in every network; the protected "
                         f"blocks per network differ: {dict((st.name, p) for st, p in zip(stages, per_stage))}. "
                         "List protect.blocks so that each network protects the same local indices")
    return per_stage[0]


def _check_protected(stages: list[Stage], protected: list[int]) -> None:
    n_blocks = sum(len(s.blocks) for s in stages)
    bad = [b for b in protected if b >= n_blocks]
    if bad:
        raise ValueError(f"protected block(s) {bad} out of range: the model has {n_blocks} blocks")
    _local_protected(stages, set(protected))


# ---------------------------------------------------------------- one block

def process_block(run: RunContext, block: BlockContext, steps: list[Step]) -> BlockInputs:
    """Quantize one block in place (unless protected) and return its outputs, the next block's inputs.

    The block's inputs come from the already-quantized blocks before it (sequential calibration);
    within the block, each group's quantizer sees the groups before it already quantized."""
    t0 = time.perf_counter()
    block.set_quant_enabled(False)
    if block.protected:
        nxt = advance(block.module, block.inputs)
    else:
        for step in steps:
            step.on_block_start(run, block)
        ref = block.outputs(ERROR_BATCHES)
        quantizer = next(s for s in steps if s.phase == Phase.QUANTIZE)
        tq = time.perf_counter()
        for group in block.groups():
            quantizer.quantize_group(run, block, group)
        block.stats["quantize_seconds"] = time.perf_counter() - tq
        block.set_quant_enabled(True)
        for step in steps:
            step.on_block_end(run, block)
        nxt = advance(block.module, block.inputs)
        num = sum(float(((o - r) ** 2).sum()) for o, r in zip(nxt.hidden, ref))
        den = sum(float((r ** 2).sum()) for r in ref)
        block.stats["rel_output_error"] = num / max(den, 1e-30)
    block.stats["seconds"] = time.perf_counter() - t0
    return nxt


# ---------------------------------------------------------------- the run

@contextlib.contextmanager
def _interrupts_kept() -> Iterator[Callable[[], None]]:
    """Python prints and drops an exception raised inside a finalizer (__del__, a weakref callback),
    and a Ctrl-C landing there (tensors and hooks are freed when a block finishes) was lost. The
    SIGINT handler also records the interrupt; the returned check re-raises it at the next
    checkpoint, so a Ctrl-C is never ignored."""
    hit = []

    def handler(signum: int, frame: object) -> None:
        hit.append(signum)
        raise KeyboardInterrupt

    def check() -> None:
        if hit:
            raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():
        yield check
        return
    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield check
    finally:
        signal.signal(signal.SIGINT, previous)


def run(cfg: PTQConfig, out_dir: Path, recipe_id: str | None = None) -> dict:
    """Run the whole PTQ recipe into out_dir; returns the report dict (`recipe_id`: the recipe's
    fingerprint, recorded in it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads or os.cpu_count() or 1)
    try:
        with _interrupts_kept() as check_interrupt:
            return _run(cfg, out_dir, recipe_id, check_interrupt)
    finally:
        torch.set_num_threads(threads)


def _run(cfg: PTQConfig, out_dir: Path, recipe_id: str | None, check_interrupt: Callable[[], None]) -> dict:
    t_start = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    dump_yaml(cfg, out_dir / RECIPE_COPY)
    ckpt = Checkpoint(out_dir / "checkpoint", fingerprint(cfg))
    meta = ckpt.load()
    if meta is None:
        ckpt.clear()
        meta = {"next": 0, "stats": [], "protected": None, "sensitivity": None, "wall_s": 0.0}
    resumed_from = meta["next"]
    prev_wall = meta["wall_s"]   # time spent by the runs this one continues
    if resumed_from:
        print(f"lpq ptq: resuming after {resumed_from} finished blocks", file=sys.stderr)

    loaded = load_model(cfg.model)
    recipe = cfg.runtime_recipe()
    adapter = get_adapter(loaded.model, recipe.adapter)
    stages = stages_of(adapter, loaded.model)
    ctx = RunContext(cfg, loaded, adapter, stages, out_dir, ckpt.root)
    steps = cfg.steps()
    for step in steps:
        step.check(ctx)
    if cfg.evaluation is not None:
        ctx.kind.check_evaluation(loaded, cfg.evaluation)
    if cfg.protect.blocks:
        _check_protected(stages, cfg.protect.blocks)   # fail now, not after the ranking or the last block

    for step in steps:
        step.on_model_start(ctx)
    quantize_model(loaded.model, recipe)
    set_quant_enabled(loaded.model, False)
    store = _block_store(out_dir)
    for g, stage, blk in _blocks(stages):
        with materialized(blk, store(g)):
            for step in steps:
                step.on_prepare_block(ctx, BlockContext(g, stage, blk, None))
    ctx.calibration_data = ctx.kind.calibration_data(loaded, cfg.calibration)

    timings: dict[str, float] = {}
    stage_inputs = None
    if meta["protected"] is None:
        protected = sorted(cfg.protect.blocks or [])
        if cfg.protect.auto:
            t0 = time.perf_counter()
            stage_inputs = _capture(ctx)
            scores = rank_blocks(ctx, stage_inputs)
            protected = sorted(choose_protected(scores, cfg.protect.auto))
            meta["sensitivity"] = {str(k): v for k, v in scores.items()}
            timings["sensitivity_s"] = time.perf_counter() - t0
        _check_protected(stages, protected)
        meta["protected"] = protected
        meta["timings"] = timings
        ckpt.save_meta(meta)
    protected = set(meta["protected"])
    protect_blocks(loaded.model, _local_protected(stages, protected))
    if meta["sensitivity"]:
        scores = {int(k): v for k, v in meta["sensitivity"].items()}
        plot_sensitivity(scores, sorted(protected), out_dir / "sensitivity.png")

    # Blocks finished before a restart: load them back (and the steps' state as it was then).
    step_state = {}
    for g, stage, blk in _blocks(stages):
        if g < meta["next"]:
            with materialized(blk, store(g)):
                step_state = ckpt.restore_block(f"block_{g:04d}", blk)
            if g not in protected:
                set_quant_enabled_in(blk, True)
    for step in steps:
        if step.name in step_state:
            step.load_state_dict(step_state[step.name])

    t_blocks = time.perf_counter()
    with tqdm(total=sum(len(s.blocks) for s in stages), initial=meta["next"], desc="ptq blocks", unit="block") as bar:
        for si, stage in enumerate(stages):
            end = stage.offset + len(stage.blocks)
            if meta["next"] >= end:
                continue
            if meta["next"] > stage.offset:
                inputs = ckpt.load_inputs()
            else:
                if stage_inputs is None:
                    stage_inputs = _capture(ctx)
                inputs = stage_inputs[si]
            for g in range(meta["next"], end):
                blk = stage.blocks[g - stage.offset]
                block = BlockContext(g, stage, blk, inputs, protected=g in protected,
                                     stats={"index": g, "protected": g in protected})
                with materialized(blk, store(g)):
                    inputs = process_block(ctx, block, steps)
                    meta["stats"].append(block.stats)
                    meta["next"] = g + 1
                    meta["wall_s"] = prev_wall + time.perf_counter() - t_start
                    ckpt.save_block(f"block_{g:04d}", blk, inputs, meta, steps)
                check_interrupt()
                bar.set_postfix(block=g, err=f"{block.stats.get('rel_output_error') or 0:.2e}", prot=block.protected)
                bar.update(1)
            if stage_inputs is not None:
                stage_inputs[si] = BlockInputs()   # this stage's calibration inputs are no longer needed
    timings["blocks_s"] = time.perf_counter() - t_blocks
    set_quant_enabled(loaded.model, True)

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
        "offloaded": ctx.offloaded,
        "notes": [],
        "recipe_fingerprint": recipe_id,
        "cpu_numerics": {**cpu_numerics.profile(), "threads": torch.get_num_threads(),
                         "torch_cpu_capability": torch.backends.cpu.get_cpu_capability()},
        "calibration": _calibration_summary(cfg),
    }
    for step in steps:
        check_interrupt()
        t0 = time.perf_counter()
        entries = step.on_model_end(ctx)
        if entries is not None:
            report.update(entries)
            report["timings"][f"{step.name}_s"] = time.perf_counter() - t0
            line = step.report_line(entries)
            if line:
                report["notes"].append(line)
    if cfg.evaluation is not None:
        report.update(ctx.kind.evaluate(loaded, ctx.float_model(), cfg.evaluation, out_dir))
    if cfg.export is not None:
        t0 = time.perf_counter()
        report["export"] = export(ctx, out_dir)
        report["timings"]["export_s"] = time.perf_counter() - t0
    report["wall_s"] = prev_wall + time.perf_counter() - t_start
    report["peak_rss_mb"] = peak_rss_mb()
    write_report(report, out_dir)
    return report


def _calibration_summary(cfg: PTQConfig) -> dict:
    """What the run calibrated on (with a domain mix: the windows per domain)."""
    c = cfg.calibration
    out = {"sequences": c.num_sequences, "seq_len": c.seq_len}
    if c.domains is not None:
        from lpq.data.calibration import domain_shares

        out["domains"] = domain_shares(c.domains, c.num_sequences)
    return out


def _capture(ctx: RunContext) -> list[BlockInputs]:
    """Block-0 inputs of every stage over the calibration data."""
    return ctx.kind.capture(ctx.loaded, [st.blocks[0] for st in ctx.stages], ctx.calibration_data,
                            ctx.cfg.calibration)


# ---------------------------------------------------------------- export

def export(ctx: RunContext, out_dir: Path) -> dict:
    """The packed (or fake) checkpoint of the quantized model; returns where it went and its sizes."""
    from lpq.export import export_model
    from lpq.export.settings import RUNTIME_KINDS

    ex = ctx.cfg.export
    # The default folder belongs to this run, so a rerun replaces it; an explicit `out` needs `force`.
    path = Path(ex.out) if ex.out else out_dir / "quantized"
    with contextlib.ExitStack() as held:
        # Packed and fake exports load offloaded parts one at a time themselves; the writers for other
        # runtimes read whole state dicts, so offloaded tensors are loaded into CPU memory for them.
        for stage in (ctx.stages if ex.kind in RUNTIME_KINDS else ()):
            held.enter_context(materialized(stage.net, None, device="cpu"))
        size = export_model(ctx.loaded.model, None, path, kind=ex.kind, force=ex.force or ex.out is None,
                            tokenizer=ctx.loaded.tokenizer, max_shard_gb=ex.max_shard_gb)
    return {"path": str(path), "kind": ex.kind, **dataclasses.asdict(size), "bits_per_param": size.bits_per_param}


def validate_inputs(cfg: PTQConfig) -> None:
    """Everything that can be checked before a model is loaded: the model resolves, the protected
    blocks exist (global indices over every network, from the config alone), the data files exist
    and hold text. Raises ValueError / FileNotFoundError with one line naming the key or file (KeyedError
    for a value of one key, which the command may have set from an option)."""
    from lpq.data.calibration import read_prompts, read_text
    from lpq.models.hub import check_context, model_kind, peek_blocks
    from lpq.models.kinds import KINDS

    blocks = peek_blocks(cfg.model)
    kind = KINDS[model_kind(cfg.model)]
    for step in cfg.steps():
        step.check_kind(kind)
    total = sum(blocks.values())
    if cfg.protect.blocks:
        bad = [b for b in cfg.protect.blocks if b >= total]
        if bad:
            raise KeyedError("protect.blocks", f"block {bad[0]} is out of range: {cfg.model.id} has {total} blocks "
                             f"(0-{total - 1})")
    if cfg.protect.auto is not None and cfg.protect.auto > total:
        raise KeyedError("protect.auto", f"{cfg.protect.auto} blocks asked for, {cfg.model.id} has {total}")
    lengths = {"calibration.seq_len": cfg.calibration.seq_len, "protect.seq_len": cfg.protect.seq_len}
    if cfg.evaluation is not None:
        if cfg.evaluation.windows:          # WikiText-2 windows are scored at this length
            lengths["evaluation.seq_len"] = cfg.evaluation.seq_len
        if cfg.evaluation.domain_eval is not None:
            lengths["evaluation.domain_eval.seq_len"] = cfg.evaluation.domain_eval.seq_len
    for i, spec in enumerate(cfg.algorithms):
        if isinstance(getattr(spec.settings, "seq_len", None), int):
            lengths[f"algorithms[{i}].seq_len"] = spec.settings.seq_len
    check_context(cfg.model, lengths)
    cal = cfg.calibration
    if cal.text_file is not None or cal.jsonl is not None:
        read_text(cal)          # parsed now, so a bad line is named before any folder or model
    if cal.prompts is not None:
        read_prompts(cal)
    if cal.domains is not None or (cfg.evaluation is not None and cfg.evaluation.domain_eval is not None):
        from lpq.data.domains import data_dir

        if not data_dir().is_dir():
            raise FileNotFoundError(f"the built-in text domains read {data_dir()}, which does not exist; set "
                                    f"$LPQ_DATA_DIR to the shared data folder")
    if cfg.evaluation is not None and cfg.evaluation.windows and not Path(cfg.evaluation.wikitext2).is_file():
        raise FileNotFoundError(f"evaluation.wikitext2: {cfg.evaluation.wikitext2} not found")


# Recipe key -> the command option that sets it (an error about the key names the option).
KEY_OPTIONS = {"model.id": "--model", "protect.auto": "--protect", "protect.blocks": "--protect",
               "evaluation.mmlu": "--mmlu"}


def _resolve_recipe(config: Path | None, scheme: str | None, overrides: dict) -> PTQConfig:
    from lpq.pipelines.recipes import SCHEMES, shipped_recipe

    if config is not None and scheme is not None:
        raise ConfigError(f"--config {config} and --scheme {scheme}: give one recipe, not both")
    if config is None and scheme is None:
        raise ConfigError("give a recipe: --config FILE, or --scheme " + "|".join(SCHEMES) + " for a shipped default")
    if scheme is not None:
        if scheme not in SCHEMES:
            raise ConfigError(f"--scheme {scheme!r}: use one of {', '.join(SCHEMES)}")
        config = shipped_recipe(SCHEMES[scheme])
    return load_config(config, PTQConfig, overrides, {k: KEY_OPTIONS[k] for k in overrides})


def _protect_override(text: str) -> dict:
    """--protect auto:K | 3,11 | none -> recipe overrides of the protect section."""
    if text.startswith("auto:") and text[5:].isdigit():
        return {"protect.auto": int(text[5:]), "protect.blocks": None}
    if text == "none":
        return {"protect.auto": None, "protect.blocks": []}
    parts = [t.strip() for t in text.split(",")]
    if all(t.isdigit() for t in parts):
        return {"protect.auto": None, "protect.blocks": [int(t) for t in parts]}
    raise ConfigError(f"--protect {text!r}: use auto:K (the K most sensitive blocks), a comma list of block "
                      f"indices, or none")


def register(app: typer.Typer) -> None:
    @app.command("ptq")
    def ptq_command(
        config: Path | None = typer.Option(None, "--config", help="PTQ recipe YAML (e.g. configs/w4a4_hif4.yaml)"),
        scheme: str | None = typer.Option(None, "--scheme", help="hif4, mxfp4 or nvfp4: the shipped default "
                                          "recipe of that format, instead of --config"),
        model: str | None = typer.Option(None, "--model", help="override model.id"),
        protect: str | None = typer.Option(None, "--protect", help="auto:K, a comma list of blocks, or none"),
        out: Path | None = typer.Option(None, "--out", help="output folder (default: the recipe's output_dir)"),
        mmlu: bool = typer.Option(False, "--mmlu", help="also score the paired MMLU subset (slow; chance level "
                                  "on small models)"),
        force: bool = typer.Option(False, "--force", help="replace the output of another recipe in the folder"),
    ) -> None:
        """W4A4 post-training quantization with block-sequential calibration (resumable)."""
        from lpq.outputs import OutputError, claim_output, recipe_fingerprint, refuse_input_folders

        try:
            overrides = {"model.id": model} if model is not None else {}
            if protect is not None:
                overrides.update(_protect_override(protect))
            if mmlu:
                overrides["evaluation.mmlu"] = True
            cfg = _resolve_recipe(config, scheme, overrides)
            try:
                validate_inputs(cfg)
            except KeyedError as e:
                raise ValueError(f"{KEY_OPTIONS[e.key] if e.key in overrides else e.key}: {e}") from None
            out_dir = out or Path(cfg.output_dir)
            refuse_input_folders(out_dir, {"model.id": cfg.model.id})
            folder = claim_output(out_dir, fingerprint=fingerprint(cfg), force=force, command="ptq")
            if scheme is not None or overrides:    # after the checks: a refused command prints one line
                typer.echo(f"lpq ptq: resolved recipe (saved as recipe.yaml in the output folder):\n"
                           f"{yaml_text(cfg)}", err=True)
        except (ConfigError, OutputError, ValueError, FileNotFoundError) as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None
        with folder:
            # The recipe format's version is not part of what a run computes (lpq.schema).
            full = recipe_fingerprint(cfg, ignore=("output_dir", "version"))
            prior = _finished_recipe(out_dir)
            if folder.state == "continued" and prior not in (None, full) and not force:
                typer.echo(f"error: {out_dir} holds a finished run of another recipe (the same blocks); pass --force "
                           f"to rerun what differs (its finished blocks are reused), or choose another folder", err=True)
                raise typer.Exit(2)
            try:
                report = run(cfg, out_dir, recipe_id=full)
            except (ValueError, FileNotFoundError, FloatingPointError) as e:
                # What the recipe or the model cannot do, found once the model is loaded: one line
                # (LPQ_DEBUG=1 shows the traceback). The checkpoint keeps every finished block.
                if os.environ.get("LPQ_DEBUG"):
                    raise
                typer.echo(f"error: {e}", err=True)
                raise typer.Exit(2) from None
        typer.echo(summary(report))


def _finished_recipe(out_dir: Path) -> str | None:
    """The fingerprint of the recipe whose report is in `out_dir` (None: no finished run)."""
    try:
        return json.loads((out_dir / "report.json").read_text()).get("recipe_fingerprint")
    except (OSError, ValueError):
        return None

