"""End-to-end distillation of a quantized LM's normalization weights against its float model.

After the weights are on the grid, the only cheap free parameters left are the per-channel norm
weights (and biases): they scale what every input quantizer sees, like a learned smoothing, but
cannot be folded away. They are trained on calibration text to minimize the mean per-token
KL(teacher || student) of the next-token distributions, the quantity the evaluation reports,
with straight-through gradients across the input quantizers. Block-wise objectives were measured
to mislead here: a few attention-sink positions carry most of a block output's energy.
"""
from __future__ import annotations

import contextlib
import functools
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lpq.algorithms.step import Phase, Step, register
from lpq.eval.shift import kl_rows, log_softmax_slices
from lpq.export.atomic import save_atomic
from lpq.schema import Choice


class Precision(Choice):
    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"


@dataclass
class NormDistillSettings:
    steps: int = 60
    lr: float = 1e-3          # Adam, cosine decay to 0 over `steps`
    sequences: int = 64       # windows of calibration text to train on
    seq_len: int = 512        # tokens per window
    batch_size: int = 2       # sequences per step; the data is cycled in order
    # Compute precision of both models' forward passes (bfloat16: autocast; the quantizers still
    # compute in float32, and the norms and the optimizer state stay float32).
    precision: Precision = Precision.FLOAT32
    # Also learn a per-channel online input scale (InputTransform.input_scale, x / s before the
    # Hadamard) for every quantized linear whose input no norm produces (o_proj, down_proj): the same
    # freedom the norm weights give the others.
    input_scales: bool = False
    # Also tune the rounding of every quantized linear weight, trained on the same KL: AutoRound's
    # signed-gradient update (lpq.algorithms.norm_distill.WeightRounding), `rounding_lr` units per step
    # (unit: the finest step of the weight's element grid) under the cosine schedule, so a weight
    # moves at most rounding_lr * steps / 2 units.
    rounding: bool = False
    rounding_lr: float = 0.02

    def __post_init__(self) -> None:
        self.precision = Precision.parse(self.precision, "norm_distill precision")
        if min(self.steps, self.sequences, self.seq_len, self.batch_size) < 1:
            raise ValueError(f"norm_distill needs steps >= 1, sequences >= 1, seq_len >= 1 and batch_size >= 1; "
                             f"got {self.steps}, {self.sequences}, {self.seq_len}, {self.batch_size}")
        if not self.lr > 0:
            raise ValueError(f"norm_distill lr must be > 0, got {self.lr}")
        if not self.rounding_lr > 0:
            raise ValueError(f"norm_distill rounding_lr must be > 0, got {self.rounding_lr}")


def norm_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Weights and biases of the model's normalization layers (class names ending in `Norm`)."""
    params = []
    for mod in model.modules():
        if type(mod).__name__.endswith("Norm"):
            params += [p for p in (getattr(mod, "weight", None), getattr(mod, "bias", None))
                       if isinstance(p, nn.Parameter)]
    return params


class _TokenKL(torch.autograd.Function):
    """sum over positions of KL(softmax(t) || softmax(s)), a few rows at a time in forward and
    backward (lpq.eval.shift.KL_ROWS; the whole (positions x vocabulary) float32 intermediates would
    be held otherwise); d/ds = softmax(s) - softmax(t) per row (each softmax(t) row sums to 1)."""

    @staticmethod
    def forward(ctx, teacher: Tensor, student: Tensor) -> Tensor:
        ctx.save_for_backward(teacher, student)
        total = torch.zeros((), dtype=torch.float32, device=student.device)
        for _, lt, ls in log_softmax_slices(teacher, student):
            total += kl_rows(lt, ls).sum()
        return total

    @staticmethod
    def backward(ctx, grad: Tensor):
        teacher, student = ctx.saved_tensors
        out = torch.empty_like(student)
        for sl, lt, ls in log_softmax_slices(teacher, student):
            out[sl] = (ls.exp() - lt.exp()) * grad
        return None, out


def token_kl(teacher_logits: Tensor, student_logits: Tensor) -> Tensor:
    """Mean over positions of KL(teacher || student), in nats; gradients reach the student only."""
    if teacher_logits.requires_grad:
        raise ValueError("token_kl: the teacher's logits must not require gradients (compute them under no_grad)")
    rows = teacher_logits.reshape(-1, teacher_logits.shape[-1])
    return _TokenKL.apply(rows, student_logits.reshape(-1, student_logits.shape[-1])) / rows.shape[0]


def learnable_input_scales(model: nn.Module, adapter) -> list[Tensor]:
    """The online input scales (ones where none exists yet) of the quantized linears whose input
    no norm produces, by the adapter's folds; created in place on their InputTransforms."""
    from lpq.quant.linear import QuantLinear
    from lpq.quant.transforms import InputTransform

    scales = []
    for block in adapter.blocks(model):
        modules = dict(block.named_modules())
        norm_fed = {c for consumers, producer in adapter.folds
                    if type(modules.get(producer)).__name__.endswith("Norm") for c in consumers}
        for name in adapter.linears:
            lin = modules.get(name)
            if not isinstance(lin, QuantLinear) or lin.is_plain() or name in norm_fed:
                continue
            t = lin.input_transform
            if t is None or t.input_scale is None:
                ones = torch.ones(lin.in_features, dtype=lin.weight.dtype, device=lin.weight.device)
                lin.input_transform = InputTransform(t.hadamard_block if t else None, ones)
            scales.append(lin.input_transform.input_scale)
    return scales


class WeightRounding:
    """Signed-gradient tuning of the rounding of quantized linear weights (AutoRound's update; here
    trained end to end on the KL, as block-output objectives mislead on this kind of model).

    Each weight of the `linears` becomes a latent value, rounded in training forwards onto the grid
    of its block metadata as the quantizer left it (GPTQ's searched scales; fixed: a moving block
    maximum would otherwise switch whole blocks to another scale), with a straight-through gradient.
    `step` moves it by lr * unit * sign(grad), unit = the finest step of its element grid (HiF4: the
    grid spacing 2^d * S / 4; MXFP4: 0.5 x 2^X), so a weight crosses a rounding boundary only where
    the sign of its gradient persists. `finish` puts each weight back on the grid (set_quantized_weight), restores
    the quantizers and returns the share of weights whose quantized value changed.
    """

    def __init__(self, linears: list[nn.Module]):
        if not linears:
            raise ValueError("norm_distill rounding: the model has no quantized linear weights to tune")
        self.linears = linears
        self.quantizers = [lin.weight_quantizer for lin in linears]
        with torch.no_grad():
            self._start = [lin.quantized_weight().detach().clone() for lin in linears]
            self.fixed = [_OnFixedGrid(q.spec.format, w) for q, w in zip(self.quantizers, self._start)]
            # Start each latent weight at a seeded uniform offset within its rounding interval: it still
            # rounds to the quantizer's value, but the distances to the rounding boundaries are spread
            # as a float weight's are. From the grid point itself, every weight whose gradient keeps its
            # sign would reach the boundary at the same step, and a mass flip breaks the model.
            gen = torch.Generator().manual_seed(0)
            for lin, w, fixed in zip(linears, self._start, self.fixed):
                offset = (torch.rand(w.shape, generator=gen) - 0.5) * 0.98
                lin.weight.copy_(w + offset.to(w.device) * fixed.unit().to(w.device))

    def weights(self) -> list[nn.Parameter]:
        return [lin.weight for lin in self.linears]

    def train(self, mode: bool) -> None:
        """Training mode: forwards round the latent weights onto the fixed grids, straight through."""
        for lin, quantizer, fixed in zip(self.linears, self.quantizers, self.fixed):
            lin.weight_quantizer = fixed if mode else quantizer
            lin.train(mode)

    @torch.no_grad()
    def step(self, lr: float) -> None:
        for lin, fixed in zip(self.linears, self.fixed):
            w = lin.weight
            if w.grad is None:
                continue
            w.sub_(fixed.unit() * w.grad.sign(), alpha=lr)
            w.grad = None

    @torch.no_grad()
    def finish(self) -> float:
        changed = total = 0
        for lin, fixed, start in zip(self.linears, self.fixed, self._start):
            q = fixed.round(lin.weight)
            lin.set_quantized_weight(q)
            changed += int((q != start).sum())
            total += q.numel()
        self.train(False)
        self._start = []
        return changed / total


class _OnFixedGrid(nn.Module):
    """Rounds a weight onto the grid of the block metadata that represents `on_grid` exactly, with
    the identity as gradient."""

    def __init__(self, fmt: str, on_grid: Tensor):
        super().__init__()
        from lpq.formats.grid import block_grid, pad

        self.grid = block_grid(fmt)
        self.cols = on_grid.shape[1]
        padded = pad(on_grid.float(), self.grid.block)
        self.meta = self.grid.exact_meta(padded)
        if self.meta is None:
            raise ValueError(f"norm_distill rounding: a {fmt} weight is not on the format's grid")

    def unit(self) -> Tensor:
        """Per element, the finest step of its grid (float32, the weight's shape)."""
        return self.grid.finest_step(self.grid.element_scales(self.meta))[:, :self.cols].float()

    def round(self, w: Tensor) -> Tensor:
        from lpq.formats.grid import pad

        with torch.no_grad():
            padded = pad(w.detach().float(), self.grid.block)
            return self.grid.round(padded, self.grid.element_scales(self.meta))[:, :self.cols].to(w.dtype)

    def forward(self, w: Tensor) -> Tensor:
        from lpq.formats.api import StraightThrough

        return StraightThrough.apply(w, self.round(w))


def rounding_linears(model: nn.Module, adapter) -> list[nn.Module]:
    """The quantized linears of the model's blocks whose weight is on a format grid."""
    from lpq.quant.linear import QuantLinear

    return [lin for block in adapter.blocks(model) for lin in block.modules()
            if isinstance(lin, QuantLinear) and lin.weight_quantizer is not None and lin.quant_enabled]


@contextlib.contextmanager
def _only_trainable(model: nn.Module, params: list[Tensor]):
    """Gradients for `params` (parameters, or buffers such as input scales) only, eval-mode numerics
    (no dropout); flags and mode restored after."""
    ids = {id(p) for p in params}
    tensors = list(model.parameters()) + [p for p in params if not isinstance(p, nn.Parameter)]
    flags = [(p, p.requires_grad) for p in tensors]
    was_training = model.training
    for p, _ in flags:
        p.requires_grad_(id(p) in ids)
    model.eval()
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
            p.grad = None
        model.train(was_training)


@contextlib.contextmanager
def _recomputed(blocks: nn.ModuleList | None):
    """Activation checkpointing per block: the backward pass recomputes each block's forward, so only
    the block inputs are held instead of every activation of the model (the same gradients: the
    forward is deterministic)."""
    if blocks is None:
        yield
        return
    own = [block.__dict__.get("forward") for block in blocks]   # an instance forward (a hook's) stays
    for block in blocks:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
    try:
        yield
    finally:
        for block, fwd in zip(blocks, own):
            if fwd is None:
                del block.forward
            else:
                block.forward = fwd


def _first_nonfinite(model: nn.Module, params: list[nn.Parameter]) -> str | None:
    ids = {id(p) for p in params}
    named = [*model.named_parameters(), *model.named_buffers()]
    return next((f"{name} is not finite" for name, p in named if id(p) in ids and not bool(torch.isfinite(p).all())),
                None)


def distill_norms(student: nn.Module, teacher: nn.Module, tokens: Tensor, settings: NormDistillSettings,
                  resume_file: Path | None = None, save_every: int = 10,
                  blocks: nn.ModuleList | None = None, extra: list[Tensor] | None = None,
                  rounding: WeightRounding | None = None) -> dict:
    """Train the student's norm parameters (and the `extra` tensors, e.g. learnable input scales) in
    place, and with `rounding` the rounding of its quantized weights; every other parameter stays as
    it is.

    With `resume_file`, the norms, optimizer and losses are saved there every `save_every` steps, and a
    call that finds the file continues from its step: the result is the same as an uninterrupted run.
    With `blocks` (the student's transformer blocks), each block's activations are recomputed in the
    backward pass instead of held. Returns the loss of the first and the last steps and the time taken."""
    from tqdm.auto import tqdm

    params = norm_parameters(student)
    if not params:
        raise ValueError(f"{type(student).__name__} has no normalization layers to distill")
    params += extra or []
    t0 = time.perf_counter()
    opt = torch.optim.Adam(params, lr=settings.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / settings.steps)))
    losses: list[float] = []
    start, spent = 0, 0.0
    if resume_file is not None and resume_file.is_file():
        state = torch.load(resume_file)
        with torch.no_grad():
            for p, saved in zip(params, state["tensors"], strict=True):
                p.copy_(saved)
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        losses, start, spent = state["losses"], state["step"], state["seconds"]
        if rounding is not None:
            with torch.no_grad():
                for w, saved in zip(rounding.weights(), state["weights"], strict=True):
                    w.copy_(saved)
    device = next(student.parameters()).device
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=settings.precision is Precision.BFLOAT16)
    n = tokens.shape[0]
    bar = tqdm(range(start, settings.steps), initial=start, total=settings.steps, desc="norm distillation",
               unit="step")
    weights = rounding.weights() if rounding is not None else []
    with _only_trainable(student, params + weights), _recomputed(blocks):
        if rounding is not None:
            rounding.train(True)
        for step in bar:
            idx = [(step * settings.batch_size + i) % n for i in range(settings.batch_size)]
            batch = tokens[idx].to(device)
            with autocast:
                with torch.no_grad():
                    target = teacher(input_ids=batch.to(next(teacher.parameters()).device)).logits
                loss = token_kl(target.to(device), student(input_ids=batch).logits)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"norm distillation: the loss is {float(loss)} at step {step + 1} "
                                         f"({_first_nonfinite(student, params) or 'the norms are finite'}); "
                                         f"nothing was saved from this step")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if rounding is not None:
                rounding.step(settings.rounding_lr * sched.get_last_lr()[0] / settings.lr)
            sched.step()
            losses.append(float(loss.detach()))
            bar.set_postfix(kl=f"{losses[-1]:.4f}")
            if resume_file is not None and ((step + 1) % save_every == 0 or step + 1 == settings.steps):
                save_atomic({"step": step + 1, "tensors": [p.detach().clone() for p in params],
                             "weights": [w.detach().clone() for w in weights],
                             "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                             "losses": losses, "seconds": spent + time.perf_counter() - t0}, resume_file)
    result = {"steps": settings.steps, "first_loss": losses[0], "last_loss": losses[-1],
              "parameters": sum(p.numel() for p in params), "seconds": spent + time.perf_counter() - t0}
    if rounding is not None:
        result["rounding_changed"] = rounding.finish()
    return result


@register
class NormDistill(Step):
    """After the last block: the norms of the quantized model trained to match the float model."""

    name = "norm_distill"
    Settings = NormDistillSettings
    phase = Phase.REFINE

    def check(self, run) -> None:
        if not run.kind.next_token_logits:
            raise ValueError(f"norm_distill matches next-token distributions: it needs a causal LM, not a "
                             f"{run.kind.name} model")
        run.require_whole_model("norm_distill trains through the whole model at once")
        if self.settings.rounding:
            from lpq.formats.grid import block_grid

            block_grid(run.weight_format)   # the rounding moves weights on fixed block metadata
        if run.cfg.model.dtype == "float16":
            raise ValueError("norm_distill trains the norm weights in the model's dtype, and float16 overflows "
                             "(the KL becomes NaN): load the model in float32 or bfloat16 (model.dtype), or drop "
                             "norm_distill")

    def on_model_end(self, run) -> dict:
        s = self.settings
        tokens = run.text_windows(s.sequences, s.seq_len)
        teacher = run.float_model()
        model = run.loaded.model
        extra = learnable_input_scales(model, run.adapter) if s.input_scales else []
        rounding = WeightRounding(rounding_linears(model, run.adapter)) if s.rounding else None
        result = distill_norms(model, teacher, tokens, s, resume_file=run.resume_file(self),
                               blocks=run.adapter.blocks(model), extra=extra, rounding=rounding)
        return {"norm_distill": result}

    def report_line(self, entries: dict) -> str:
        nd = entries["norm_distill"]
        line = (f"norm distillation: {nd['parameters']} norm parameters, {nd['steps']} steps, "
                f"KL on the training batch {nd['first_loss']:.4f} -> {nd['last_loss']:.4f} nats/token")
        if "rounding_changed" in nd:
            line += f"; rounding tuned, {100 * nd['rounding_changed']:.2f} % of the quantized weights changed"
        return line
