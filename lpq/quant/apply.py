"""quantize_model: attach quantizers to a model following a recipe and its family's adapter."""
from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
from dataclasses import dataclass
from typing import Callable, Iterator

from torch import Tensor, nn

from lpq.models.adapters import Adapter, get_adapter
from lpq.quant.attention import (AttentionQuantizers, QuantWanAttnProcessor, register_transformers_attention)
from lpq.quant.experts import QuantExperts
from lpq.quant.linear import QuantLinear
from lpq.quant.quantizer import TensorQuantizer, update_delayed_scales
from lpq.quant.recipe import QuantRecipe, Scaling

QUANT_MODULES = (QuantLinear, QuantExperts, AttentionQuantizers)


@dataclass
class PlanEntry:
    """One module's fate: `action` is "quantize", "protected" or "excluded"."""

    network: str          # "" for a plain model, "transformer"/"transformer_2" in a Wan pipeline
    block: int | None     # block index, None outside the blocks
    name: str             # module name within the network
    kind: str             # "linear", "experts", "attention", or the class name for other modules
    action: str
    reason: str = ""


def _excluded(name: str, network: str, patterns: list[str] | tuple[str, ...]) -> str | None:
    full = f"{network}.{name}" if network else name
    return next((p for p in patterns if fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(full, p)), None)


def plan_quantization(model: object, recipe: QuantRecipe) -> tuple[Adapter, list[PlanEntry]]:
    """What quantize_model would do, module by module (used by `lpq inspect`)."""
    adapter = get_adapter(model, recipe.adapter)
    plan: list[PlanEntry] = []
    for net_name, net in adapter.networks(model):
        blocks = adapter.blocks(net)
        bad = [b for b in recipe.protected_blocks if b >= len(blocks)]
        if bad:
            raise ValueError(f"protected_blocks {bad} out of range: {type(net).__name__} has {len(blocks)} blocks")
        in_blocks: set[str] = set()
        for i, block in enumerate(blocks):
            prefix = adapter.block_prefix(i)
            in_blocks.update(f"{prefix}.{n}" if n else prefix for n, _ in block.named_modules())
            members = adapter.block_members(block)
            wanted = {"linear": recipe.weight or recipe.input or recipe.grad,
                      "experts": recipe.weight or recipe.input or recipe.grad, "attention": recipe.attention}
            for kind, names in members.items():
                if not wanted[kind]:
                    continue
                for rel in names:
                    name = f"{prefix}.{rel}"
                    if i in recipe.protected_blocks:
                        plan.append(PlanEntry(net_name, i, name, kind, "protected", "protected block"))
                    elif pattern := _excluded(name, net_name, recipe.exclude):
                        plan.append(PlanEntry(net_name, i, name, kind, "excluded", f"recipe exclude {pattern!r}"))
                    else:
                        plan.append(PlanEntry(net_name, i, name, kind, "quantize"))
        for name, module in net.named_modules():
            if not name or name in in_blocks or not isinstance(module, (nn.Linear, nn.Embedding)):
                continue
            pattern = _excluded(name, net_name, adapter.exclude) or _excluded(name, net_name, recipe.exclude)
            reason = f"default exclude {pattern!r}" if pattern else "outside the transformer blocks"
            plan.append(PlanEntry(net_name, None, name, type(module).__name__, "excluded", reason))
    names = [(net_name, name) for net_name, net in adapter.networks(model) for name, _ in net.named_modules() if name]
    for pattern in recipe.exclude:
        if not any(_excluded(name, net_name, [pattern]) for net_name, name in names):
            example = next((n for _, n in names if ".0." in n and n.count(".") >= 3), names[0][1] if names else "")
            raise ValueError(f"quant.exclude pattern {pattern!r} matches no module of the model (fnmatch on full "
                             f"module names such as {example!r}); fix or drop it")
    return adapter, plan


def quantize_model(model: object, recipe: QuantRecipe) -> object:
    """Attach quantizers (in place) and return the model: a transformers causal LM, a
    WanTransformer3DModel, or a Wan pipeline (its `transformer` and `transformer_2`)."""
    if not isinstance(recipe, QuantRecipe):
        raise TypeError(f"recipe must be a QuantRecipe, got {type(recipe).__name__}")
    adapter, plan = plan_quantization(model, recipe)
    networks = dict(adapter.networks(model))
    for net in networks.values():
        if getattr(net, "lpq_recipe", None) is not None or any(isinstance(m, QUANT_MODULES) for m in net.modules()):
            raise RuntimeError(f"{type(net).__name__} is already quantized; quantize a fresh copy of the model")
    for entry in plan:
        if entry.action != "quantize":
            continue
        net = networks[entry.network]
        module = net.get_submodule(entry.name)
        if entry.kind == "linear":
            if not isinstance(module, nn.Linear):
                raise TypeError(f"{entry.name} is a {type(module).__name__}, expected nn.Linear")
            _replace(net, entry.name, QuantLinear.from_linear(module, weight_spec=recipe.weight,
                                                              input_spec=recipe.input, grad_spec=recipe.grad))
        elif entry.kind == "experts":
            _replace(net, entry.name, QuantExperts(module, weight_spec=recipe.weight, input_spec=recipe.input,
                                                   grad_spec=recipe.grad))
        else:
            _attach_attention(net, module, adapter, recipe)
    for net in networks.values():
        net.lpq_recipe = recipe
        if any(isinstance(m, TensorQuantizer) and m.spec.scaling == Scaling.DELAYED for m in net.modules()):
            net.register_forward_pre_hook(lambda mod, args: update_delayed_scales(mod))
    return model


def protect_blocks(model: object, blocks: list[int]) -> None:
    """Keep blocks of a quantized model in high precision (indices per network, as in
    `QuantRecipe.protected_blocks`): their linears keep their parameters and input transforms but
    lose their quantizers, fused experts and attention run unquantized, and the blocks join the
    recipe's protected_blocks. The same model as quantize_model with those blocks protected."""
    for _, net in _networks(model):
        recipe: QuantRecipe = net.lpq_recipe
        all_blocks = get_adapter(net, recipe.adapter).blocks(net)
        bad = [b for b in blocks if not 0 <= b < len(all_blocks)]
        if bad:
            raise ValueError(f"protected blocks {bad} out of range: {type(net).__name__} has {len(all_blocks)} blocks")
        for i in blocks:
            block = all_blocks[i]
            for name, m in list(block.named_modules()):
                if isinstance(m, QuantLinear) and not m.is_plain():
                    plain = QuantLinear(m.weight, m.bias, weight_spec=None, input_spec=None).train(m.training)
                    plain.input_transform = m.input_transform
                    _replace(block, name, plain)
                elif isinstance(m, QuantExperts):
                    _replace(block, name, m._float_experts[0])
                elif isinstance(getattr(m, "lpq_attention", None), AttentionQuantizers):
                    del m.lpq_attention
        net.lpq_recipe = dataclasses.replace(recipe, protected_blocks=sorted(set(recipe.protected_blocks) | set(blocks)))


def set_quant_enabled_in(root: nn.Module, enabled: bool) -> None:
    """Quantization on/off for every quantized module under `root` (e.g. one transformer block)."""
    for m in root.modules():
        if isinstance(m, QUANT_MODULES):
            m.quant_enabled = enabled


def set_input_transform(net: nn.Module, name: str,
                        transform: nn.Module | Callable[[Tensor], Tensor] | None) -> QuantLinear:
    """Give the linear `name` of `net` an input transform (None removes it) and return it.

    A plain nn.Linear (in a protected block, or excluded) becomes a QuantLinear without quantizers
    sharing its parameters: it computes `F.linear(transform(x), weight, bias)` and keeps its
    state-dict keys. Call after `quantize_model` (which refuses already-quantized models).
    """
    module = net.get_submodule(name)
    if not isinstance(module, QuantLinear):
        if not isinstance(module, nn.Linear):
            raise TypeError(f"{name} is a {type(module).__name__}; input transforms go on linears")
        module = QuantLinear.from_linear(module, weight_spec=None, input_spec=None)
        _replace(net, name, module)
    module.input_transform = transform
    return module


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` in place of the module `name`. `new` holds the old module's parameters under the same
    names, so an accelerate hook of the old module (device placement, or the offload that loads its
    tensors for each forward) is handed over to it."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    hook = getattr(getattr(parent, child), "_hf_hook", None)
    setattr(parent, child, new)
    if hook is not None:
        from accelerate.hooks import add_hook_to_module

        add_hook_to_module(new, hook)


def _attach_attention(net: nn.Module, attn: nn.Module, adapter: Adapter, recipe: QuantRecipe) -> None:
    attn.lpq_attention = AttentionQuantizers(recipe.attention).train(attn.training)
    if adapter.kind == "wan":
        attn.set_processor(QuantWanAttnProcessor(attn.processor))
        return
    current = net.config._attn_implementation
    if not current.startswith("lpq_quant_"):
        net.set_attn_implementation(register_transformers_attention(current))


def _networks(model: object) -> list[tuple[str, nn.Module]]:
    if isinstance(model, nn.Module):
        return [("", model)]
    return [(n, m) for n in ("transformer", "transformer_2") if (m := getattr(model, n, None)) is not None]


def _quant_modules(model: object, blocks: list[int] | None) -> Iterator[nn.Module]:
    for _, net in _networks(model):
        if blocks is None:
            roots = [net]
        else:
            all_blocks = get_adapter(net, getattr(getattr(net, "lpq_recipe", None), "adapter", None)).blocks(net)
            roots = [all_blocks[i] for i in blocks]
        for root in roots:
            yield from (m for m in root.modules() if isinstance(m, QUANT_MODULES))


def set_quant_enabled(model: object, enabled: bool, blocks: list[int] | None = None) -> None:
    """Switch quantization on/off everywhere, or only in the given block indices (per transformer
    of a Wan pipeline). Disabled modules compute exactly the original model's function."""
    for m in _quant_modules(model, blocks):
        m.quant_enabled = enabled


@contextlib.contextmanager
def quant_enabled(model: object, enabled: bool, blocks: list[int] | None = None) -> Iterator[None]:
    """Context manager form of set_quant_enabled; restores each module's previous state."""
    modules = list(_quant_modules(model, blocks))
    before = [m.quant_enabled for m in modules]
    for m in modules:
        m.quant_enabled = enabled
    try:
        yield
    finally:
        for m, state in zip(modules, before):
            m.quant_enabled = state


def set_stats_tracking(model: object, on: bool = True) -> None:
    """Opt in (or out) of per-call statistics on every quantizer; costs a few reductions per call.

    Cached quantized weights are dropped so that the next forward records their statistics too."""
    for _, net in _networks(model):
        for m in net.modules():
            if isinstance(m, TensorQuantizer):
                m.track_stats = on
                if not on:
                    m.last_stats = None
            elif isinstance(m, (QuantLinear, QuantExperts)) and on:
                m.refresh()


def collect_stats(model: object) -> dict[str, dict[str, float | None]]:
    """Per quantizer (by module name): the last call's amax, scale, and fractions overflowed to Inf,
    flushed to zero and (HiF8) in the 1-mantissa-bit range. Only quantizers that tracked stats."""
    out = {}
    for net_name, net in _networks(model):
        for name, m in net.named_modules():
            if isinstance(m, TensorQuantizer) and m.last_stats is not None:
                out[f"{net_name}.{name}" if net_name else name] = dict(m.last_stats)
    return out
