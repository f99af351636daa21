"""One training run (the reference, or one QAT run) on accelerate: DDP/FSDP, resumable, NaN-guarded.

The runs of a comparison are identical except for quantization: same seed, data order, noise, model
initialisation and optimizer. All keep float32 master weights and optimizer state and compute under
bfloat16 autocast (`train.mixed_precision: bf16`); a quantized run additionally fake-quantizes (STE) the
roles its quantization recipe names, after `bf16_warmup_steps` unquantized steps.
"""
from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from lpq import cpu_numerics
from lpq.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from lpq.train.data import BatchPlan
from lpq.train.monitor import JsonlLog, summarize_stats
from lpq.train.nonfinite import NonFiniteError, diagnose
from lpq.train.objectives import build_objective, move_batch
from lpq.train.recipe import Distributed, LrSchedule, MixedPrecision, Optimizer, TrainConfig, TrainRecipe

if TYPE_CHECKING:
    from lpq.quant import QuantRecipe

StepCallback = Callable[[int, float], None]


@dataclass
class RunResult:
    label: str
    run_dir: Path
    quantized: bool
    losses: list[float]
    step_times: list[float]
    eval_loss: float
    eval_loss_initial: float | None = None      # before training (None for checkpoints older than this field)
    extra: dict = field(default_factory=dict)
    model: nn.Module | None = None              # the trained module, with keep_model (quantizers attached if quantized)
    tokenizer: object | None = None
    domain_nll: dict[str, list[float]] | None = None   # per-window NLL per domain (recipe.domain_eval)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of cfg.lr for 0-based optimizer step `step`: linear warm-up, then the schedule."""
    if step < cfg.lr_warmup_steps:
        return (step + 1) / cfg.lr_warmup_steps
    if cfg.lr_schedule is LrSchedule.CONSTANT:
        return 1.0
    progress = (step - cfg.lr_warmup_steps) / max(1, cfg.steps - cfg.lr_warmup_steps)
    if cfg.lr_schedule is LrSchedule.LINEAR:
        return 1.0 - (1.0 - cfg.min_lr_ratio) * progress
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def keep_freed_memory() -> bool:
    """On glibc, keep freed memory in the process for reuse instead of returning it to the system.

    PyTorch's CPU allocator takes every tensor from malloc, and glibc serves large blocks with fresh
    mmap'd pages and trims freed heap memory, so a training step's activations, gradients and quantized
    copies are faulted in and zeroed by the kernel anew on every step. Measured on SmolLM2-135M (one
    thread): about 90 000 page faults and 0.2-0.4 s of system time per step, and 10-20 % of the step
    time in both the reference and the QAT run. With mmap off and trimming off, freed blocks are
    reused. Process-wide and permanent (the process's resident memory stays at its peak); returns
    whether it applied (False off glibc)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = libc.mallopt if libc is not None else None
    except (OSError, AttributeError):
        return False
    if mallopt is None:
        return False
    m_trim_threshold, m_mmap_max = -1, -4     # glibc's malloc.h parameter numbers
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2 ** 31 - 1))


def process_state():
    """accelerate's process state; on a machine without CUDA it must be created with cpu=True, or the
    processes of `accelerate launch` each believe they are a lone rank 0 (no gloo group)."""
    from accelerate.state import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def emulated_bf16_warning(cfg: TrainConfig) -> str | None:
    """What to tell a CPU run in bf16 whose bfloat16 matmuls are emulated (~90x slower than float32 on
    the development machine, docs/ptq_results.md round 10); None where there is nothing to say."""
    if cfg.mixed_precision is not MixedPrecision.BF16 or torch.cuda.is_available() or cpu_numerics.native_bf16_matmul():
        return None
    return ("train.mixed_precision bf16 on a CPU whose bfloat16 matmuls are emulated (no AVX512-BF16/AMX, or the "
            "pinned AVX2 numerics): tens of times slower than float32; for CPU runs use mixed_precision: \"no\", "
            "or LPQ_CPU_NUMERICS=native on a CPU with AVX512-BF16")


def make_accelerator(cfg: TrainConfig):
    from accelerate import Accelerator

    kwargs = {}
    if cfg.distributed is Distributed.FSDP and process_state().num_processes > 1:
        if not torch.cuda.is_available():
            raise ValueError("train.distributed 'fsdp' needs GPUs (accelerate shards with FSDP only on "
                             "accelerators); use 'ddp' on CPU")
        from accelerate import FullyShardedDataParallelPlugin

        kwargs["fsdp_plugin"] = FullyShardedDataParallelPlugin(fsdp_version=2, reshard_after_forward=True,
                                                               state_dict_type="SHARDED_STATE_DICT")
    process_state()
    warning = emulated_bf16_warning(cfg)
    if warning:
        print(f"lpq train: warning: {warning}", file=sys.stderr)
    return Accelerator(mixed_precision=cfg.mixed_precision.value, cpu=not torch.cuda.is_available(), **kwargs)


def _optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer is Optimizer.SGD:
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.betas[0], weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)


def _enable_gradient_checkpointing(model: nn.Module) -> None:
    if hasattr(model, "gradient_checkpointing_enable"):        # transformers
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif hasattr(model, "enable_gradient_checkpointing"):    # diffusers
        model.enable_gradient_checkpointing()
    else:
        raise ValueError(f"{type(model).__name__} does not support gradient checkpointing")


@torch.no_grad()
def evaluate(model: nn.Module, objective, accelerator, batch_size: int) -> float:
    """Mean loss over the fixed held-out set (every rank evaluates all of it: identical results)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in objective.eval_batches(batch_size):
        batch = move_batch(batch, accelerator.device)
        n = len(next(iter(batch.values())))
        with accelerator.autocast():
            total += float(objective.loss(model, batch)) * n
        count += n
    model.train(was_training)
    return total / count


def _zero_pending_amax(model: nn.Module) -> None:
    """Before a diagnostic replay: stop the delayed-scaling hook from folding the failing step's amax in,
    so the replay quantizes with exactly the scales the failing forward used."""
    from lpq.quant import TensorQuantizer

    for m in model.modules():
        if isinstance(m, TensorQuantizer) and hasattr(m, "amax_pending"):
            m.amax_pending.zero_()
            m.rms_pending.zero_()


def _fail_nonfinite(what: str, step: int, raw: nn.Module, replay: Callable[[], object] | None, accelerator,
                    quant: QuantRecipe | None, run_dir: Path) -> None:
    from accelerate.utils import gather_object

    if quant is not None:
        _zero_pending_amax(raw)
    found = gather_object([f"rank {accelerator.process_index}: {diagnose(raw, replay)}"])
    hint = ""
    if quant is not None and "hif8" in quant.formats():
        hint = " (HiF8 overflows to Inf at |x| >= 40960 after scaling: check quant_stats.jsonl)"
    elif quant is not None:
        hint = " (check the quantizer traces in quant_stats.jsonl)"
    msg = f"{what} at step {step + 1}; first non-finite tensor: " + "; ".join(found) + hint
    if accelerator.is_main_process:
        (run_dir / "nonfinite.txt").write_text(msg + "\n")
    raise NonFiniteError(msg)


def train_run(recipe: TrainRecipe, run_dir: Path, *, quant: QuantRecipe | None, label: str, resume: bool = True,
              on_step: StepCallback | None = None, keep_model: bool = False) -> RunResult:
    """Train one model per the recipe into `run_dir`, quantized by `quant` (None: the unquantized
    reference); continues from its latest checkpoint when `resume`.

    keep_model: return the trained module (and tokenizer) in the result, e.g. to evaluate it; otherwise
    it is released with the run."""
    from accelerate.utils import set_seed
    from tqdm import tqdm

    from lpq.models.hub import load_model

    cfg = recipe.train
    quantized = quant is not None
    accelerator = make_accelerator(cfg)
    if accelerator.device.type == "cpu":
        keep_freed_memory()
    main = accelerator.is_main_process
    run_dir.mkdir(parents=True, exist_ok=True)
    set_seed(cfg.seed)
    loaded = load_model(recipe.model)
    if quantized and recipe.export is not None and loaded.kind != "causal_lm":
        # Fail before training, not after: the exporter writes whole Wan pipelines, and training drops
        # the text encoder and VAE.
        raise ValueError(f"export: after Wan training is not supported; export the trained transformer "
                         f"({label}/final) with `lpq export`")
    objective = build_objective(loaded, recipe)
    model = objective.module
    if cfg.gradient_checkpointing:
        _enable_gradient_checkpointing(model)
    if quantized:
        from lpq.quant import quantize_model

        quantize_model(objective.quant_target, quant)
    model.train()
    optimizer = _optimizer(model, cfg)
    # The scheduler is stepped once per optimizer step by this loop (accelerate's prepared scheduler
    # would step once per process), and checkpointed by save_checkpoint.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(lr_factor, cfg=cfg))
    model, optimizer = accelerator.prepare(model, optimizer)
    raw = accelerator.unwrap_model(model)

    state: dict = {"losses": [], "step_times": [], "quant_on": [], "eval_loss_initial": None}
    start = 0
    ckpt = latest_checkpoint(run_dir) if resume else None
    if ckpt is not None:
        state = load_checkpoint(accelerator, scheduler, ckpt)
        start = state.pop("step")
        if main:
            print(f"lpq train [{label}]: resumed from {ckpt} at step {start}")
    else:
        state["eval_loss_initial"] = evaluate(model, objective, accelerator, cfg.batch_size)
    metrics = JsonlLog(run_dir / "metrics.jsonl", start) if main else None
    qlog = JsonlLog(run_dir / "quant_stats.jsonl", start) if main and quantized else None

    plan = BatchPlan(objective.num_train, cfg.batch_size, cfg.grad_accum, accelerator.num_processes, cfg.seed)
    rank = accelerator.process_index
    bar = tqdm(total=cfg.steps, initial=start, desc=label, unit="step", disable=not main, dynamic_ncols=True)
    for step in range(start, cfg.steps):
        on = quantized and step >= cfg.bf16_warmup_steps
        track = on and cfg.stats_every > 0 and ((step + 1) % cfg.stats_every == 0 or step == cfg.bf16_warmup_steps)
        if quantized:
            from lpq.quant import set_quant_enabled, set_stats_tracking

            set_quant_enabled(raw, on)
            set_stats_tracking(raw, track)
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=accelerator.device)
        bad_batch = None
        for micro in range(cfg.grad_accum):
            batch = move_batch(objective.train_batch(plan.indices(step, micro, rank), step, micro, rank),
                               accelerator.device)
            sync = contextlib.nullcontext() if micro == cfg.grad_accum - 1 else accelerator.no_sync(model)
            with sync:
                with accelerator.autocast():
                    loss = objective.loss(model, batch)
                accelerator.backward(loss / cfg.grad_accum)
            loss = loss.detach().float()
            if bad_batch is None and not torch.isfinite(loss):
                bad_batch = batch
            loss_sum += loss
        step_loss = float(accelerator.reduce(loss_sum / cfg.grad_accum, "mean"))
        if not math.isfinite(step_loss):
            replay_batch = bad_batch if bad_batch is not None else batch

            def replay():
                with accelerator.autocast():
                    return objective.loss(raw, replay_batch)

            _fail_nonfinite(f"loss is {step_loss}", step, raw, replay, accelerator, quant, run_dir)
        grad_norm = None
        if cfg.max_grad_norm is not None:
            grad_norm = float(accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm))
            if not math.isfinite(grad_norm):
                _fail_nonfinite(f"gradient norm is {grad_norm}", step, raw, None, accelerator, quant, run_dir)
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        state["losses"].append(step_loss)
        state["step_times"].append(dt)
        state["quant_on"].append(on)
        if main:
            metrics.write({"step": step + 1, "loss": step_loss, "lr": lr, "grad_norm": grad_norm,
                           "step_time_s": dt, "quant_on": on})
            if track:
                from lpq.quant import collect_stats

                stats = collect_stats(raw)
                qlog.write({"step": step + 1, "summary": summarize_stats(stats), "quantizers": stats})
            bar.set_postfix(loss=f"{step_loss:.4f}", quant="on" if on else "off")
            bar.update()
        done = step + 1
        if (cfg.checkpoint_every and done % cfg.checkpoint_every == 0) or done == cfg.steps:
            if quantized:
                from lpq.quant import update_delayed_scales

                # Fold this step's pending amax into the history now: pending statistics are not part of
                # the state dict, and folding early gives the same scales as folding at the next forward.
                update_delayed_scales(raw)
            save_checkpoint(accelerator, scheduler, run_dir, done, state, cfg.keep_checkpoints)
        if on_step is not None:
            on_step(done, step_loss)
    bar.close()
    eval_loss = evaluate(model, objective, accelerator, cfg.batch_size)
    _save_final(accelerator, model, raw, loaded, run_dir)
    if quantized and recipe.export is not None and accelerator.is_main_process:
        _export(raw, loaded, recipe, quant, run_dir)
    result = RunResult(label, run_dir, quantized, state["losses"], state["step_times"], eval_loss,
                       state.get("eval_loss_initial"))
    if recipe.domain_eval is not None:
        result.domain_nll = _domain_eval(accelerator, model, loaded.tokenizer, objective, recipe, run_dir, cfg.steps)
    if keep_model:
        # Without accelerate's autocast wrapper the model computes as its saved weights do when loaded (float32).
        result.model = accelerator.unwrap_model(model, keep_fp32_wrapper=False).eval()
        result.tokenizer = loaded.tokenizer
    result.extra["quant_on"] = state["quant_on"]
    if accelerator.num_processes > 1:
        result.extra["ranks_identical"] = _check_ranks_identical(accelerator, raw, run_dir)
    accelerator.free_memory()
    return result


def _fingerprint(model: nn.Module) -> dict:
    """sha256 of every parameter and buffer (this rank's copy), and the per-tensor scales in full."""
    import hashlib

    from lpq.quant import TensorQuantizer

    h = hashlib.sha256()
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    scales = {n: m.scale.tolist() for n, m in model.named_modules()
              if isinstance(m, TensorQuantizer) and hasattr(m, "scale")}
    return {"sha256": h.hexdigest(), "scales": scales}


def _check_ranks_identical(accelerator, raw: nn.Module, run_dir: Path) -> bool:
    """Every rank must end with bit-identical weights and scales (DDP + amax all-reduce); the per-rank
    fingerprints are written to run_dir/rank<i>_fingerprint.json for inspection."""
    import json

    from accelerate.utils import gather_object

    if accelerator.distributed_type.value == "FSDP":
        return True   # parameters are sharded: ranks hold different pieces by design
    mine = _fingerprint(raw)
    (run_dir / f"rank{accelerator.process_index}_fingerprint.json").write_text(json.dumps(mine))
    every = gather_object([mine["sha256"]])
    return len(set(every)) == 1


def _domain_eval(accelerator, model: nn.Module, tokenizer, objective, recipe: TrainRecipe, run_dir: Path,
                 step: int) -> dict[str, list[float]] | None:
    """Per-window NLL of the trained model (float32, quantizers as trained) on every domain of
    `recipe.domain_eval` and on the training corpus's held-out blocks, on the main process; kept in
    run_dir/domain_nll.json and reused while the settings and the final step are unchanged."""
    import json

    from lpq.config import to_dict
    from lpq.train.domains import domain_windows, score_domains
    from lpq.train.recipe import HELD_OUT

    cfg = recipe.domain_eval
    result = None
    if accelerator.is_main_process:
        path = run_dir / "domain_nll.json"
        key = {"settings": to_dict(cfg), "step": step}
        cached = json.loads(path.read_text()) if path.is_file() else {}
        if {k: cached.get(k) for k in key} == key:
            result = cached["nll"]
        else:
            windows = domain_windows(cfg, tokenizer)
            if cfg.held_out:
                flat = objective.splits.eval.reshape(-1)
                n = flat.numel() // cfg.seq_len
                if n:
                    windows[HELD_OUT] = flat[: n * cfg.seq_len].view(n, cfg.seq_len)
            # Without accelerate's autocast wrapper: float32, as the saved weights compute.
            plain = accelerator.unwrap_model(model, keep_fp32_wrapper=False)
            result = score_domains(plain, windows, cfg.batch_size)
            path.write_text(json.dumps({**key, "nll": result}))
    accelerator.wait_for_everyone()
    return result


def _export(raw: nn.Module, loaded, recipe: TrainRecipe, quant: QuantRecipe, run_dir: Path) -> None:
    """The trained quantized model as a quantized checkpoint (lpq.export), by default in run_dir/export."""
    from lpq.export import export_model

    settings = recipe.export
    out = Path(settings.out) if settings.out else run_dir / "export"
    raw.eval()
    export_model(raw, quant, out, kind=settings.kind, force=settings.force, tokenizer=loaded.tokenizer,
                 max_shard_gb=settings.max_shard_gb)
    raw.train()


def _save_final(accelerator, model: nn.Module, raw: nn.Module, loaded, run_dir: Path) -> None:
    """The trained weights in the model's own format (transformers / diffusers folder) under run_dir/final."""
    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        out = run_dir / "final"
        raw.save_pretrained(out, state_dict=state_dict)
        if loaded.tokenizer is not None:
            loaded.tokenizer.save_pretrained(out)
    accelerator.wait_for_everyone()
