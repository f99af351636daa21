"""Per-block PTQ work: rotation, smoothing, Hessian capture, weight quantization of one block."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from fnmatch import fnmatch

import torch
from torch import Tensor, nn

from lpq.algorithms import grid
from lpq.algorithms.gptq import GPTQSettings, Hessian, gptq_quantize
from lpq.algorithms.hadamard import rotate_weight
from lpq.algorithms.rtn import rtn_quantize
from lpq.algorithms.smoothquant import (fold_into_linear_outputs, fold_into_norm, scale_linear_inputs,
                                        smooth_scales)
from lpq.pipelines import linear_hooks as lh
from lpq.pipelines.calibration import BlockInputs, advance, iterate, run_block
from lpq.pipelines.ptq_config import PTQConfig

# Llama-family producers a smoothing scale folds into: consumer linears -> producer (norm or linear).
_FOLDS = [(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "input_layernorm"),
          (("mlp.gate_proj", "mlp.up_proj"), "post_attention_layernorm"),
          (("mlp.down_proj",), "mlp.up_proj")]


@dataclass
class BlockStats:
    index: int
    protected: bool
    seconds: float = 0.0
    gptq_seconds: float = 0.0
    rel_output_error: float | None = None        # ||out_q - out_f||^2 / ||out_f||^2 on a few batches
    layer_loss: dict[str, float] = field(default_factory=dict)


def _wrap_fused_experts(block: nn.Module, cfg: PTQConfig) -> None:
    """Fused MoE experts (3-D weights, not nn.Linear) get the runtime's QuantExperts: RTN W4A4."""
    from lpq.quant.experts import QuantExperts

    for name, mod in list(block.named_modules()):
        if hasattr(mod, "gate_up_proj") and hasattr(mod, "down_proj") and not isinstance(mod, QuantExperts) \
                and isinstance(getattr(mod, "gate_up_proj"), nn.Parameter):
            parent_name, _, attr = name.rpartition(".")
            parent = block.get_submodule(parent_name) if parent_name else block
            q = QuantExperts(mod, weight_spec=cfg.quant.weight, input_spec=cfg.quant.input)
            q.quant_enabled = False
            setattr(parent, attr, q)


def prepare_block(block: nn.Module, cfg: PTQConfig) -> dict[str, nn.Linear]:
    """Attach simulation state to the block's linears and apply data-free rotation (once per run)."""
    _wrap_fused_experts(block, cfg)
    lins = lh.linears(block, tuple(cfg.skip_linears))
    had = cfg.step("hadamard")
    rot = (had.block or grid.BLOCK[cfg.act_format]) if had else None
    for name, lin in lins.items():
        st = lh.attach(lin)
        st.act_format = cfg.act_format
        if rot and st.rotation is None and (had.linears is None or any(fnmatch(name, p) for p in had.linears)):
            with torch.no_grad():
                lin.weight.copy_(rotate_weight(lin.weight.float(), rot).to(lin.weight.dtype))
            st.rotation = rot
    return lins


_GROUPS_CACHE: dict[tuple, list[list[str]]] = {}


def _shared_input_groups(block: nn.Module, lins: dict[str, nn.Linear], inputs: BlockInputs) -> list[list[str]]:
    """Linears fed by the same tensor (q/k/v, gate/up), found by watching one forward.

    Blocks of one model share their structure, so the answer is kept per (block class, linear names).
    """
    key = (type(block).__qualname__, tuple(lins))
    if key not in _GROUPS_CACHE:
        _GROUPS_CACHE[key] = _watch_groups(block, lins, inputs)
    return _GROUPS_CACHE[key]


def _watch_groups(block: nn.Module, lins: dict[str, nn.Linear], inputs: BlockInputs) -> list[list[str]]:
    seen: dict[int, list[str]] = {}
    alive = []   # hold the inputs so a freed tensor's address cannot be reused within the forward
    handles = []
    for name, lin in lins.items():
        def pre(module, args, name=name):
            alive.append(args[0])
            seen.setdefault(id(args[0]), []).append(name)
        handles.append(lin.register_forward_pre_hook(pre, prepend=True))
    try:
        next(iterate(block, BlockInputs(inputs.hidden[:1], inputs.args[:1], inputs.kwargs[:1])))
    finally:
        for h in handles:
            h.remove()
    groups = list(seen.values())
    # Linears the watched batch did not reach (unrouted experts) are quantized last, one by one.
    groups += [[n] for n in lins if not any(n in g for g in groups)]
    return groups


def _input_absmax(block: nn.Module, lins: dict[str, nn.Linear], inputs: BlockInputs) -> dict[str, Tensor]:
    amax: dict[str, Tensor] = {}
    handles = []
    for name, lin in lins.items():
        def pre(module, args, name=name):
            a = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(0).float()
            amax[name] = a if name not in amax else torch.maximum(amax[name], a)
        handles.append(lin.register_forward_pre_hook(pre, prepend=True))
    try:
        for _ in iterate(block, inputs):
            pass
    finally:
        for h in handles:
            h.remove()
    return amax


def smooth_block(block: nn.Module, lins: dict[str, nn.Linear], inputs: BlockInputs, alpha: float) -> None:
    """SmoothQuant on a block: fold into the Llama-family producers, else divide the input online."""
    groups = _shared_input_groups(block, lins, inputs)
    amax = _input_absmax(block, lins, inputs)
    modules = dict(block.named_modules())
    for group in groups:
        # Rotated weights: smoothing acts on the unrotated input, so un-rotate the weight to score it.
        ws = [lins[n].weight.float() for n in group]
        rot = lh.state(lins[group[0]]).rotation
        if any(lh.state(lins[n]).rotation != rot for n in group):
            raise ValueError(f"linears {group} share one input but not one rotation: list all of them, or none, "
                             "in hadamard.linears")
        if rot:
            ws = [rotate_weight(w, rot) for w in ws]   # H is its own inverse
        s = smooth_scales(amax[group[0]], ws, alpha)
        fold = next((prod for cons, prod in _FOLDS if set(group) == set(cons) and prod in modules), None)
        if rot:
            # W H <- (W diag(s)) H: scale the unrotated weight, rotate back.
            for n, w in zip(group, ws):
                with torch.no_grad():
                    lins[n].weight.copy_(rotate_weight(w * s, rot).to(lins[n].weight.dtype))
        else:
            scale_linear_inputs([lins[n] for n in group], s)
        if fold is None:
            for n in group:
                lh.state(lins[n]).input_scale = s
        elif isinstance(modules[fold], nn.Linear):
            fold_into_linear_outputs(modules[fold], s)   # output rows: commutes with an input rotation
        else:
            fold_into_norm(modules[fold], s)


class _Reached(Exception):
    """Raised by the Hessian hook: the rest of the block's forward is not needed."""


def capture_hessian(block: nn.Module, lin: nn.Linear, inputs: BlockInputs) -> Tensor | None:
    """Mean input Gram matrix of `lin`, of its input as quantized at inference.

    The block runs with its current weights (earlier linears already quantized) and input
    quantization on, and stops once `lin` has seen its input.
    """
    hess = Hessian(lin.in_features)

    def pre(module, args):
        hess.add(args[0].detach())   # registered after the simulation hook: the transformed input
        raise _Reached

    handle = lin.register_forward_pre_hook(pre)
    lh.set_enabled(block, True)
    try:
        for i in range(len(inputs)):
            try:
                run_block(block, inputs, i)
            except _Reached:
                pass
    finally:
        handle.remove()
    return hess.mean() if hess.count else None   # None: no calibration input reached it (unrouted expert)


def quantize_group(lins: dict[str, nn.Linear], group: list[str], hessian: Tensor | None, cfg: PTQConfig,
                   stats: BlockStats) -> None:
    """Replace the weights of linears sharing one input by their quantized values (recipe's weight step)."""
    fmt = cfg.weight_format
    gptq = cfg.step("gptq")
    ws = [lins[n].weight for n in group]
    W = torch.cat([w.detach().float() for w in ws])
    t0 = time.perf_counter()
    if hessian is None:
        Q = rtn_quantize(W, fmt)
    elif gptq is not None:
        settings = GPTQSettings(damp=gptq.damp, act_order=gptq.act_order, scale_search=gptq.scale_search,
                                lazy_batch=gptq.lazy_batch)
        Q, loss = gptq_quantize(W, hessian, fmt, settings)
        stats.layer_loss["+".join(group)] = loss
        stats.gptq_seconds += time.perf_counter() - t0
    elif cfg.step("scale_search") is not None:
        Q = rtn_quantize(W, fmt, scale_search=True, importance=hessian.diagonal())
    with torch.no_grad():
        for w, q in zip(ws, Q.split([w.shape[0] for w in ws])):
            w.copy_(q.to(w.dtype))


def needs_hessian(cfg: PTQConfig) -> bool:
    return cfg.step("gptq") is not None or cfg.step("scale_search") is not None


def process_block(block: nn.Module, index: int, inputs: BlockInputs, cfg: PTQConfig, protected: bool,
                  error_batches: int = 1) -> tuple[BlockStats, BlockInputs]:
    """Quantize one block in place (unless protected) and return its outputs, the next block's inputs.

    The block's inputs come from the already-quantized blocks before it (sequential calibration).
    """
    t0 = time.perf_counter()
    stats = BlockStats(index, protected)
    lins = prepare_block(block, cfg)
    lh.set_enabled(block, False)
    if protected or not lins:
        nxt = advance(block, inputs)
        stats.seconds = time.perf_counter() - t0
        return stats, nxt
    sq = cfg.step("smoothquant")
    if sq is not None:
        smooth_block(block, lins, inputs, sq.alpha)
    few = BlockInputs(inputs.hidden[:error_batches], inputs.args[:error_batches], inputs.kwargs[:error_batches])
    ref = list(iterate(block, few))
    # Groups in forward order; each one's Hessian sees the inputs produced by the already-quantized
    # groups before it (sequential within the block, as across blocks).
    for group in _shared_input_groups(block, lins, inputs):
        hessian = capture_hessian(block, lins[group[0]], inputs) if needs_hessian(cfg) else None
        quantize_group(lins, group, hessian, cfg, stats)
    lh.set_enabled(block, True)
    nxt = advance(block, inputs)
    num = sum(float(((o - r) ** 2).sum()) for o, r in zip(nxt.hidden, ref))
    den = sum(float((r ** 2).sum()) for r in ref)
    stats.rel_output_error = num / max(den, 1e-30)
    stats.seconds = time.perf_counter() - t0
    return stats, nxt
