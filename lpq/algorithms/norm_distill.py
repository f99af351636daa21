"""End-to-end distillation of a quantized LM's normalization weights against its float model.

After the weights are on the grid, the only cheap free parameters left are the per-channel norm
weights (and biases): they scale what every input quantizer sees, like a learned smoothing, but
cannot be folded away. They are trained on calibration text to minimize the mean per-token
KL(target || student) of the next-token distributions, with straight-through gradients across the
input quantizers; the target is the teacher's distribution, optionally mixed with the text's own next
token (`label_weight`). That mix lowers perplexity everywhere, but it is fine-tuning, not recovery:
the float model given the same freedom and target gains more (docs/ptq_results.md round 14).
Block-wise objectives were measured to mislead here: a few attention-sink positions carry most of a
block output's energy.
"""
from __future__ import annotations

import contextlib
import functools
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lpq import cpu_numerics
from lpq.algorithms.step import Phase, Step, register
from lpq.eval import shift
from lpq.export.atomic import save_atomic
from lpq.memory import release_freed_memory
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
    # Also learn an output bias on every quantized linear whose model class can carry one (the adapter's
    # `bias_flags`: Llama's q/k/v/o and MLP, Qwen3's q/k/v/o), zero at the start: the mean shift that
    # rounding leaves in each output channel. The flags are set in the model's config, so the export
    # loads in any reader of that model class; linears that cannot carry a bias keep none.
    biases: bool = False
    # Share of the text's own next token in each position's target distribution; the teacher's
    # distribution has the rest (0: pure distillation; the last position of a window, which has no
    # next token, keeps the teacher's alone). Off in the shipped recipes: it moves the model away
    # from the float model (higher KL) towards the calibration text, which the float model would
    # gain from as well; for adapting to your own domain's text.
    label_weight: float = 0.0

    def __post_init__(self) -> None:
        self.precision = Precision.parse(self.precision, "norm_distill precision")
        if not 0 <= self.label_weight < 1:
            raise ValueError(f"norm_distill label_weight must be in [0, 1) (the teacher's distribution needs a "
                             f"share), got {self.label_weight}")
        if min(self.steps, self.sequences, self.seq_len, self.batch_size) < 1:
            raise ValueError(f"norm_distill needs steps >= 1, sequences >= 1, seq_len >= 1 and batch_size >= 1; "
                             f"got {self.steps}, {self.sequences}, {self.seq_len}, {self.batch_size}")
        if not self.lr > 0:
            raise ValueError(f"norm_distill lr must be > 0, got {self.lr}")


def norm_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Weights and biases of the model's normalization layers (class names ending in `Norm`)."""
    params = []
    for mod in model.modules():
        if type(mod).__name__.endswith("Norm"):
            params += [p for p in (getattr(mod, "weight", None), getattr(mod, "bias", None))
                       if isinstance(p, nn.Parameter)]
    return params


class _HeadKL(torch.autograd.Function):
    """sum over positions of KL(q || softmax(head_s(h_s))), q = softmax(head_t(h_t)) mixed with the
    one-hot next token by `label_weight` where there is one (next token >= 0), the logits formed
    lpq.eval.shift.KL_ROWS positions at a time (the one setting for the evaluation's KL too). The
    loss is a scalar, so its gradient with respect to h_s, (softmax(s) - q) W_s per row, is
    made in the same pass: no (positions x vocabulary) tensor outlives its slice, in forward or
    backward (whole, a 2 x 512-token batch's logits, their copy and their gradient are 0.2 GB each at
    SmolLM2's vocabulary, 0.6 GB at Qwen3's)."""

    @staticmethod
    def forward(ctx, h_t: Tensor, h_s: Tensor, w_t: Tensor, b_t: Tensor | None, w_s: Tensor,
                b_s: Tensor | None, next_tokens: Tensor | None, label_weight: float) -> Tensor:
        total = torch.zeros((), dtype=torch.float32, device=h_s.device)
        grad = torch.empty_like(h_s)
        for i in range(0, h_s.shape[0], shift.KL_ROWS):
            sl = slice(i, i + shift.KL_ROWS)
            lt = F.linear(h_t[sl], w_t, b_t).float().log_softmax(-1).to(h_s.device)
            ls = F.linear(h_s[sl], w_s, b_s).float().log_softmax(-1)
            target = lt.exp()
            if label_weight:
                rows = (next_tokens[sl] >= 0).nonzero().squeeze(1)
                target[rows] *= 1 - label_weight
                target[rows, next_tokens[sl][rows]] += label_weight
                total += (torch.xlogy(target, target) - target * ls).sum()
            else:
                total += shift.kl_rows(lt, ls).sum()
            grad[sl] = (ls.exp() - target).to(w_s.dtype) @ w_s
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, g: Tensor):
        (grad,) = ctx.saved_tensors
        return None, grad * g, None, None, None, None, None, None


def head_kl(teacher_hidden: Tensor, student_hidden: Tensor, teacher_head: nn.Linear, student_head: nn.Linear,
            next_tokens: Tensor | None = None, label_weight: float = 0.0) -> Tensor:
    """Mean over positions of KL(teacher || student) of the next-token distributions that the output
    heads make of the final hidden states, in nats; gradients reach the student's hidden states only.
    With `next_tokens` (the token each position predicts, -1 where none, shaped as the hidden states'
    positions) and `label_weight` w, the teacher's side is (1 - w) teacher + w one-hot(next token)."""
    if label_weight and next_tokens is None:
        raise ValueError("head_kl: a label_weight needs the next tokens")
    if teacher_hidden.requires_grad:
        raise ValueError("head_kl: the teacher's hidden states must not require gradients (compute them under no_grad)")
    if student_head.weight.requires_grad:
        raise ValueError("head_kl trains what comes before the output head, not the head itself")
    h_t = teacher_hidden.reshape(-1, teacher_hidden.shape[-1]).to(teacher_head.weight.device)
    h_s = student_hidden.reshape(-1, student_hidden.shape[-1])
    labels = next_tokens.reshape(-1).to(h_s.device) if label_weight else None
    total = _HeadKL.apply(h_t, h_s, teacher_head.weight, teacher_head.bias, student_head.weight, student_head.bias,
                          labels, label_weight)
    return total / h_s.shape[0]


def final_hidden(model: nn.Module, input_ids: Tensor) -> Tensor:
    """The hidden states a causal LM's output head reads (its base model's last, after the final norm)."""
    return model.base_model(input_ids=input_ids).last_hidden_state


def linear_head(model: nn.Module) -> nn.Linear:
    """The model's output head, refused in one line unless it is a linear layer (head_kl needs its weight)."""
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        raise ValueError(f"norm_distill needs a linear output head; {type(model).__name__} has {type(head).__name__}")
    return head


def next_token_labels(batch: Tensor) -> Tensor:
    """The token each position of a (batch, positions) window predicts; -1 at the last, which has none."""
    return torch.cat([batch[:, 1:], torch.full_like(batch[:, :1], -1)], dim=1)


def _autocast(settings: NormDistillSettings, device: torch.device) -> torch.autocast:
    """The forward passes' precision (`settings.precision`), the same for the teacher and the student."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=settings.precision is Precision.BFLOAT16)


def batch_indices(step: int, settings: NormDistillSettings, n: int) -> list[int]:
    """The windows step `step` trains on: `batch_size` consecutive ones, the `n` windows cycled in order."""
    return [(step * settings.batch_size + i) % n for i in range(settings.batch_size)]


@dataclass
class TeacherTargets:
    """The float model's side of the distillation, made before it starts: the final hidden states for
    each distinct batch the steps read, and the output head that turns them into logits. The rest of
    the float model is then not needed while the student trains (SmolLM2: 0.4 GB of weights released,
    docs/ptq_results.md), and a batch the data cycle repeats is not run through it twice."""

    hidden: dict[tuple[int, ...], Tensor]
    head: nn.Linear


@torch.no_grad()
def teacher_targets(teacher: nn.Module, tokens: Tensor, settings: NormDistillSettings,
                    first_step: int = 0) -> TeacherTargets:
    """The teacher's hidden states for every batch of steps `first_step` .. `settings.steps` - 1 (a
    resumed run needs none for the steps it has done), computed as the steps would (same batches, same
    autocast), so the distillation's result does not depend on when."""
    head = linear_head(teacher)
    device = next(teacher.parameters()).device
    hidden: dict[tuple[int, ...], Tensor] = {}
    with _autocast(settings, device):
        for step in range(first_step, settings.steps):
            idx = tuple(batch_indices(step, settings, tokens.shape[0]))
            if idx not in hidden:
                hidden[idx] = final_hidden(teacher, tokens[list(idx)].to(device))
    return TeacherTargets(hidden, head)


def steps_done(resume_file: Path | None) -> int:
    """How many steps the distillation's resume file holds as done (0 without one)."""
    if resume_file is None or not resume_file.is_file():
        return 0
    return int(torch.load(resume_file)["step"])


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


def learnable_biases(model: nn.Module, adapter) -> list[nn.Parameter]:
    """The output biases of the quantized linears that the model class can carry (adapter.bias_flags),
    created as zeros where none exists yet. A flag that is off in the model's config is turned on and
    every linear it covers gets a zero bias, in protected blocks too, so that the model class built
    from the config has exactly the parameters the checkpoint holds."""
    from lpq.quant.linear import QuantLinear

    config = getattr(model, "config", None)
    carried = {name for _, names in adapter.bias_flags for name in names}
    turn_on = [(flag, names) for flag, names in adapter.bias_flags
               if config is not None and not getattr(config, flag, False)]
    biases = []
    for block in adapter.blocks(model):
        modules = dict(block.named_modules())
        for name in (name for _, names in turn_on for name in names):
            lin = modules.get(name)
            if lin is not None and lin.bias is None:
                lin.bias = nn.Parameter(torch.zeros(lin.out_features, dtype=lin.weight.dtype, device=lin.weight.device))
        for name in adapter.linears:
            lin = modules.get(name)
            if isinstance(lin, QuantLinear) and not lin.is_plain() and name in carried and lin.bias is not None:
                biases.append(lin.bias)
    for flag, _ in turn_on:
        setattr(config, flag, True)
    return biases


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


class _TrimInBackward(torch.autograd.Function):
    """The identity; its backward, which runs when the gradient reaches a block's output, that is after
    the block behind it finished its backward, returns freed memory to the OS first."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        release_freed_memory()
        return grad


def _checkpointed_block(forward, *args, **kwargs):
    out = checkpoint(forward, *args, use_reentrant=False, **kwargs)
    # A block's temporaries are freed when it returns, but glibc keeps their pages: over one forward
    # and backward pass of SmolLM2 that is ~1 GB of RSS held for nothing (docs/ptq_results.md), so it
    # is returned after each block, in both passes.
    release_freed_memory()
    if isinstance(out, Tensor):
        return _TrimInBackward.apply(out)
    if isinstance(out, tuple) and out and isinstance(out[0], Tensor):   # (hidden states, ...) of older layers
        return (_TrimInBackward.apply(out[0]), *out[1:])
    return out


@contextlib.contextmanager
def _recomputed(blocks: nn.ModuleList | None):
    """Activation checkpointing per block: the backward pass recomputes each block's forward, so only
    the block inputs are held instead of every activation of the model (the same gradients: the
    forward is deterministic). After each block, in both passes, freed memory goes back to the OS."""
    if blocks is None:
        yield
        return
    own = [block.__dict__.get("forward") for block in blocks]   # an instance forward (a hook's) stays
    for block in blocks:
        block.forward = functools.partial(_checkpointed_block, block.forward)
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


def distill_norms(student: nn.Module, targets: TeacherTargets | None, tokens: Tensor, settings: NormDistillSettings,
                  resume_file: Path | None = None, save_every: int = 10,
                  blocks: nn.ModuleList | None = None, extra: list[Tensor] | None = None) -> dict:
    """Train the student's norm parameters (and the `extra` tensors, e.g. learnable input scales) in
    place; every other parameter stays as it is.

    With `resume_file`, the norms, optimizer and losses are saved there every `save_every` steps, and a
    call that finds the file continues from its step: the result is the same as an uninterrupted run
    (`targets` need to cover the steps left only; None when the file holds every step).
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
    device = next(student.parameters()).device
    autocast = _autocast(settings, device)
    n = tokens.shape[0]
    bar = tqdm(range(start, settings.steps), initial=start, total=settings.steps, desc="norm distillation",
               unit="step")
    with _only_trainable(student, params), _recomputed(blocks):
        for step in bar:
            idx = batch_indices(step, settings, n)
            target = targets.hidden.get(tuple(idx)) if targets is not None else None
            if target is None:
                raise ValueError(f"norm distillation: no teacher target for step {step + 1}'s batch {idx}; make the "
                                 f"targets with teacher_targets() from the same tokens and settings")
            batch = tokens[idx].to(device)
            with autocast:
                loss = head_kl(target, final_hidden(student, batch), targets.head, student.get_output_embeddings(),
                               next_token_labels(batch), settings.label_weight)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"norm distillation: the loss is {float(loss)} at step {step + 1} "
                                         f"({_first_nonfinite(student, params) or 'the norms are finite'}); "
                                         f"nothing was saved from this step")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            release_freed_memory()
            bar.set_postfix(kl=f"{losses[-1]:.4f}")
            if resume_file is not None and ((step + 1) % save_every == 0 or step + 1 == settings.steps):
                save_atomic({"step": step + 1, "tensors": [p.detach().clone() for p in params],
                             "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                             "losses": losses, "seconds": spent + time.perf_counter() - t0}, resume_file)
    return {"steps": settings.steps, "first_loss": losses[0], "last_loss": losses[-1],
            "parameters": sum(p.numel() for p in params), "seconds": spent + time.perf_counter() - t0}


@register
class NormDistill(Step):
    """After the last block: the norms of the quantized model trained to match the float model."""

    name = "norm_distill"
    Settings = NormDistillSettings
    phase = Phase.REFINE

    def online_parts(self) -> tuple[str, ...]:
        return ("scale",) if self.settings.input_scales else ()

    def check_kind(self, kind) -> None:
        if not kind.next_token_logits:
            raise ValueError(f"norm_distill matches next-token distributions: it needs a causal LM, not a "
                             f"{kind.name} model")

    def check(self, run) -> None:
        self.check_kind(run.kind)
        run.require_whole_model("norm_distill trains through the whole model at once")
        linear_head(run.loaded.model)
        if self.settings.biases and not run.adapter.bias_flags:
            raise ValueError(f"norm_distill.biases: lpq knows no config flag that gives {run.adapter.family} "
                             f"linears a bias (the adapter's bias_flags), so the export could not hold them; "
                             f"set biases: false")
        bf16 = {"norm_distill.precision": self.settings.precision is Precision.BFLOAT16,
                "model.dtype": run.cfg.model.dtype == "bfloat16"}
        on_cpu = next(run.loaded.model.parameters()).device.type == "cpu"
        if on_cpu and any(bf16.values()) and not cpu_numerics.native_bf16_matmul():
            key = next(k for k, v in bf16.items() if v)
            raise ValueError(f"norm_distill would compute in bfloat16 ({key}), but bfloat16 matmuls are emulated on "
                             f"this CPU ({cpu_numerics.profile()['LPQ_CPU_NUMERICS']} numerics; tens of times "
                             f"slower than float32): use float32, or LPQ_CPU_NUMERICS=native on a CPU with "
                             f"AVX512-BF16 or AMX")
        if run.cfg.model.dtype == "float16":
            raise ValueError("norm_distill trains the norm weights in the model's dtype, and float16 overflows "
                             "(the KL becomes NaN): load the model in float32 or bfloat16 (model.dtype), or drop "
                             "norm_distill")
        try:      # its windows are cut after the last block: text too short must fail before the first
            run.text_windows(self.settings.sequences, self.settings.seq_len)
        except ValueError as e:
            raise ValueError(f"norm_distill (sequences {self.settings.sequences}, seq_len "
                             f"{self.settings.seq_len}): {e}") from None

    def on_model_end(self, run) -> dict:
        s = self.settings
        tokens = run.text_windows(s.sequences, s.seq_len)
        resume_file = run.resume_file(self)
        done = steps_done(resume_file)
        targets = None
        if done < s.steps:   # a finished distillation (a rerun) needs no float model
            targets = teacher_targets(run.float_model(), tokens, s, first_step=done)
            run.release_float_model()   # reloaded from its files when the evaluation needs it
        model = run.loaded.model
        extra = learnable_input_scales(model, run.adapter) if s.input_scales else []
        extra += learnable_biases(model, run.adapter) if s.biases else []
        result = distill_norms(model, targets, tokens, s, resume_file=resume_file,
                               blocks=run.adapter.blocks(model), extra=extra)
        return {"norm_distill": result}

    def report_line(self, entries: dict) -> str:
        nd = entries["norm_distill"]
        target = (f" (target: teacher mixed with the next token at {self.settings.label_weight:g})"
                  if self.settings.label_weight else "")
        return (f"norm distillation: {nd['parameters']} norm parameters, {nd['steps']} steps, "
                f"KL on the training batch{target} {nd['first_loss']:.4f} -> {nd['last_loss']:.4f} nats/token")
