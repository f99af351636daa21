"""Finding the first tensor that went non-finite, so a NaN/Inf loss stops the run with a useful message.

Checked in order: parameters (an earlier update already broke the model), then the forward pass is
replayed with hooks on every module and the first module, in execution order, whose input or output holds
NaN/Inf is named; gradients are checked separately when only the gradient norm is non-finite. The hooks
exist only during the replay, so normal steps pay nothing.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn


class NonFiniteError(RuntimeError):
    """Training produced NaN/Inf; the message names the first non-finite tensor found."""


def _bad(t: object) -> str | None:
    """'nan' / 'inf' when any floating tensor in t (nested tuples/lists/dicts/ModelOutputs) is non-finite."""
    if isinstance(t, Tensor):
        if t.is_floating_point() and not torch.isfinite(t).all():
            return "nan" if torch.isnan(t).any() else "inf"
        return None
    if isinstance(t, dict):
        t = list(t.values())
    if isinstance(t, (list, tuple)):
        for item in t:
            kind = _bad(item)
            if kind:
                return kind
    return None


def first_nonfinite_parameter(model: nn.Module) -> str | None:
    for name, p in model.named_parameters():
        kind = _bad(p.detach())
        if kind:
            return f"parameter {name} {tuple(p.shape)} holds {kind}"
    return None


def first_nonfinite_grad(model: nn.Module) -> str | None:
    for name, p in model.named_parameters():
        if p.grad is not None:
            kind = _bad(p.grad)
            if kind:
                return f"gradient of {name} {tuple(p.shape)} holds {kind}"
    return None


def first_nonfinite_activation(model: nn.Module, forward: Callable[[], object]) -> str | None:
    """Replay `forward()` with hooks; name the first module whose input or output is non-finite."""
    found: list[str] = []

    def pre(name: str, module: nn.Module):
        def hook(_mod, args, kwargs):
            if not found:
                kind = _bad(list(args) + list(kwargs.values()))
                if kind:
                    parent = name.rsplit(".", 1)[0] if "." in name else "the model's caller"
                    found.append(f"input of {name} ({type(module).__name__}) holds {kind}: produced by "
                                 f"{parent} outside its submodules, before {name} ran")
        return hook

    def post(name: str, module: nn.Module):
        def hook(_mod, _args, _kwargs, output):
            if not found:
                kind = _bad(output)
                if kind:
                    found.append(f"output of {name} ({type(module).__name__}) holds {kind} "
                                 "(its inputs were finite)")
        return hook

    handles = []
    for name, module in model.named_modules():
        label = name or type(model).__name__
        handles.append(module.register_forward_pre_hook(pre(label, module), with_kwargs=True))
        handles.append(module.register_forward_hook(post(label, module), with_kwargs=True))
    try:
        with torch.no_grad():
            forward()
    finally:
        for h in handles:
            h.remove()
    return found[0] if found else None


def diagnose(model: nn.Module, forward: Callable[[], object] | None) -> str:
    """The first non-finite tensor: a parameter, else an activation of the replayed forward, else a gradient."""
    where = first_nonfinite_parameter(model)
    if where is None and forward is not None:
        where = first_nonfinite_activation(model, forward)
    if where is None:
        where = first_nonfinite_grad(model)
    return where or "no non-finite parameter, activation or gradient found in the replay (non-deterministic?)"
