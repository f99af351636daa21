"""export_model: write a quantized model (or Wan pipeline) as a packed or fake-quantized checkpoint.

Folder layout and tensor names: docs/export.md. Everything is written into a staging folder that is
renamed into place at the end (lpq.export.atomic), so an interrupted export leaves nothing behind.
"""
from __future__ import annotations

import contextlib
import importlib
import json
import warnings
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import Tensor, nn

import lpq
from lpq.config import dump_yaml, to_dict
from lpq.export import layout as L
from lpq.export.atomic import staged_dir
from lpq.export.packing import QuantizedWeight, input_transforms, pack, quantized_weights
from lpq.export.resident import packed_resident
from lpq.export.settings import KINDS, RUNTIME_KINDS
from lpq.export.size import SizeReport, folder_bytes
from lpq.export.tensor_io import ShardWriter, check_finite, write_hf_index, write_json
from lpq.models.adapters import get_adapter
from lpq.models.offload import materialized
from lpq.quant.attention import AttentionQuantizers
from lpq.quant.quantizer import TensorQuantizer
from lpq.quant.recipe import QuantRecipe

DIFFUSERS_STEM = "diffusion_pytorch_model"


@dataclass
class _Sizes:
    quantized_tensors: int = 0
    quantized_params: int = 0
    quantized_bytes: int = 0
    other_params: int = 0
    other_bytes: int = 0
    dense_fallbacks: list[str] = field(default_factory=list)

    def add(self, other: _Sizes) -> None:
        for name in ("quantized_tensors", "quantized_params", "quantized_bytes", "other_params", "other_bytes"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.dense_fallbacks += other.dense_fallbacks


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


@contextlib.contextmanager
def _eval_mode(net: nn.Module) -> Iterator[None]:
    """Eval mode for the export (the forward weight is the cached one), the caller's modes after."""
    modes = [(m, m.training) for m in net.modules()]
    net.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def _recipe_of(networks: list[tuple[str, nn.Module]], recipe: QuantRecipe | None) -> QuantRecipe:
    """The recipe the networks were quantized with; `recipe`, when given, must be that one."""
    found = [getattr(net, "lpq_recipe", None) for _, net in networks]
    if any(r is None for r in found):
        raise ValueError("the model is not quantized: call lpq.quant.quantize_model(model, recipe) before exporting")
    stored = to_dict(found[0])
    if any(to_dict(r) != stored for r in found[1:]):
        raise ValueError("the networks of this pipeline were quantized with different recipes; export needs one")
    if recipe is not None and to_dict(recipe) != stored:
        raise ValueError("the recipe passed to export_model differs from the one the model was quantized with "
                         "(model.lpq_recipe); pass that one, or None")
    return found[0]


def _lpq_prefixes(net: nn.Module) -> tuple[str, ...]:
    """Module-name prefixes of lpq's own state (quantizer buffers), absent from the original model."""
    return tuple(f"{n}." for n, m in net.named_modules() if isinstance(m, (TensorQuantizer, AttentionQuantizers)))


class _Ties:
    """Tensors sharing storage, found as the export goes through the network: the first key is
    stored, later ones become aliases (index "tied"). An entry lives as long as its tensor: the
    tensors of an offloaded block are dropped once written, and their memory may be reused."""

    def __init__(self) -> None:
        self.seen: dict[tuple, tuple[str, weakref.ref]] = {}
        self.tied: dict[str, str] = {}

    def alias(self, key: str, t: Tensor) -> bool:
        """Whether `t` (a tensor the network holds, not a copy) is one already stored."""
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        hit = self.seen.get(ident)
        if t.numel() and hit is not None and hit[1]() is not None:
            self.tied[key] = hit[0]
            return True
        self.seen[ident] = (key, weakref.ref(t))
        return False


@dataclass
class _Segment:
    """A part of a network the export reads at once: one transformer block, or one module outside the
    blocks with its own tensors (embeddings, head, final norm: each alone, since an embedding table can
    be larger than a block)."""

    module: nn.Module
    keys: list[str]                      # the network's state-dict keys of this part
    prefix: str | None = None            # a block's key prefix (None: a module outside the blocks)
    exclude: list[nn.Module] = field(default_factory=list)   # submodules that belong to other parts
    weights: list[QuantizedWeight] = field(default_factory=list)

    def state(self) -> dict[str, Tensor]:
        """The part's state-dict entries as the network holds them now (not copies; an offloaded
        part loaded by `materialized`)."""
        if self.prefix is not None:
            return self.module.state_dict(prefix=self.prefix, keep_vars=True)
        return {k: getattr(self.module, k.rpartition(".")[2]) for k in self.keys}


def _segments(net: nn.Module, family: str | None) -> list[_Segment]:
    """The modules outside the transformer blocks that own tensors, one by one, then each block: an
    export holds one at a time (an offloaded one is loaded for it: lpq.models.offload.materialized)."""
    adapter = get_adapter(net, family)
    blocks = adapter.blocks(net)
    prefixes = [adapter.block_prefix(i) + "." for i in range(len(blocks))]
    in_block: list[list[str]] = [[] for _ in blocks]
    rest: dict[str, list[str]] = {}
    for key in net.state_dict(keep_vars=True):
        i = next((i for i, p in enumerate(prefixes) if key.startswith(p)), None)
        if i is None:
            rest.setdefault(key.rpartition(".")[0], []).append(key)
        else:
            in_block[i].append(key)
    segments = [_Segment(net.get_submodule(owner), keys, exclude=list(net.get_submodule(owner).children()))
                for owner, keys in rest.items()]
    segments += [_Segment(b, keys, prefix=p) for b, keys, p in zip(blocks, in_block, prefixes)]
    for qw in quantized_weights(net):
        owner = next((seg for seg in segments if qw.key in seg.keys), None)
        if owner is None:
            raise RuntimeError(f"{qw.key} is not in the state dict of {type(net).__name__}")
        owner.weights.append(qw)
    return segments


def _check_covered(net: nn.Module, written: set[str]) -> None:
    """Every state-dict key was written (or tied): the segments cover the network exactly."""
    absent = [k for k in net.state_dict(keep_vars=True) if k not in written]
    if absent:
        raise RuntimeError(f"{type(net).__name__}: {absent[0]} was not exported: the state dict of the part "
                           f"holding it differs from the network's")


def _is_diffusers(net: nn.Module) -> bool:
    return type(net).__module__.startswith("diffusers")


def _network_info(net: nn.Module) -> dict[str, Any]:
    """What load_quantized needs to rebuild the network from its config."""
    floats = [p.dtype for p in net.parameters() if p.is_floating_point()]
    dtype = max(set(floats), key=floats.count) if floats else torch.float32
    info = {"library": "diffusers" if _is_diffusers(net) else "transformers",
            "class": type(net).__name__, "dtype": _dtype_name(dtype)}
    persistent = set(net.state_dict())
    info["buffer_dtypes"] = {n: _dtype_name(b.dtype) for n, b in net.named_buffers()
                             if n not in persistent and b.is_floating_point()}
    config = getattr(net, "config", None)
    attn = getattr(config, "_attn_implementation", None)
    if isinstance(attn, str) and info["library"] == "transformers":
        info["attn_implementation"] = attn.removeprefix("lpq_quant_")
    return info


def _write_config(net: nn.Module, folder: Path, quantization_config: dict | None, dtype: str | None = None) -> None:
    """config.json (+ generation_config.json) of `net`; `dtype`: the weights' dtype, which stock
    transformers loads with (what save_pretrained records, without changing net.config)."""
    if _is_diffusers(net):
        net.save_config(folder)
    else:
        net.config.save_pretrained(folder)
        if getattr(net, "generation_config", None) is not None and net.can_generate():
            net.generation_config.save_pretrained(folder)
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.pop("quantization_config", None)
    if dtype is not None:
        config["dtype"] = dtype
    if quantization_config is not None:
        config["quantization_config"] = quantization_config
    write_json(path, config)


def _quantization_config(recipe: QuantRecipe) -> dict[str, Any]:
    return {"quant_method": L.QUANT_METHOD, "kind": "packed", **L.versions(),
            "weight_format": recipe.weight.format if recipe.weight else None,
            "input_format": recipe.input.format if recipe.input else None,
            "loader": "lpq.load_quantized(folder)", "recipe": to_dict(recipe)}


def _pack_weight(qw: QuantizedWeight, sizes: _Sizes) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """The index entry and the stored tensors of one quantized weight (its codes, or the dense value
    when no encoding reproduces it)."""
    with torch.no_grad():
        w_q = qw.forward_weight().detach().cpu()
    check_finite(qw.key, w_q)
    entry = {"format": qw.fmt, "axis": qw.axis % w_q.dim(), "shape": list(w_q.shape), "dtype": _dtype_name(w_q.dtype)}
    p = pack(qw, w_q)
    if p is None:
        warnings.warn(f"{qw.key}: no {qw.fmt} encoding reproduces this weight exactly; stored unpacked")
        parts = {qw.key: w_q}
        entry["storage"] = "dense"
        sizes.dense_fallbacks.append(qw.key)
    else:
        parts = {qw.key + L.CODES: p.codes, qw.key + L.SCALES: p.scales, qw.key + L.TENSOR_SCALE: p.tensor_scale,
                 qw.key + L.PRESCALE: qw.prescale()}
        parts = {k: v for k, v in parts.items() if v is not None}
        entry["storage"] = "packed"
    sizes.quantized_tensors += 1
    sizes.quantized_params += w_q.numel()
    sizes.quantized_bytes += sum(_nbytes(t) for t in parts.values())
    return entry, parts


def _still_offloaded(key: str, t: Tensor) -> None:
    if t.is_meta:
        raise RuntimeError(f"{key} is on the meta device (offloaded and not loaded): the export cannot read it")


def _write_packed_network(net: nn.Module, folder: Path, recipe: QuantRecipe, max_bytes: int) -> _Sizes:
    """One block at a time: its weights packed, its tensors appended to the shards, then dropped."""
    sizes = _Sizes()
    entries: dict[str, dict[str, Any]] = {}
    transforms = input_transforms(net)    # their scales are ordinary state-dict entries, stored dense below
    ties = _Ties()
    written: set[str] = set()
    with ShardWriter(folder, L.PACKED_STEM, {k: str(v) for k, v in L.versions().items()}, max_bytes) as out:
        for seg in _segments(net, recipe.adapter):
            with materialized(seg.module, None, device="cpu", exclude=seg.exclude):
                for qw in seg.weights:
                    entries[qw.key], parts = _pack_weight(qw, sizes)
                    for name, t in parts.items():
                        out.add(name, t)
                    written.add(qw.key)
                for key, t in seg.state().items():
                    if key in written:
                        continue
                    _still_offloaded(key, t)
                    written.add(key)
                    if ties.alias(key, t):
                        continue
                    out.add(key, t.detach())
                    sizes.other_params += t.numel()
                    sizes.other_bytes += _nbytes(t)
        weight_map, files = out.close()
    _check_covered(net, written)
    write_json(folder / L.INDEX, {**L.versions(), "network": _network_info(net), "files": files,
                                  "quantized": entries, "input_transforms": transforms, "tied": ties.tied,
                                  "weight_map": weight_map})
    _write_config(net, folder, _quantization_config(recipe))
    return sizes


def _write_fake_network(net: nn.Module, folder: Path, recipe: QuantRecipe, max_bytes: int) -> _Sizes:
    """Dequantized weights in the stock layout, one block at a time (transformers' key conversion,
    e.g. fused MoE experts to per-expert keys, is applied per block, as save_pretrained does for
    offloaded models)."""
    transforms = input_transforms(net)
    if transforms:
        raise ValueError(f"{next(iter(transforms))} has an input transform (Hadamard / SmoothQuant scale), which "
                         f"stock transformers/diffusers models cannot run, so a fake export would compute something "
                         f"else; use kind='packed'")
    sizes = _Sizes()
    diffusers = _is_diffusers(net)
    stem = DIFFUSERS_STEM if diffusers else "model"
    lpq_state = _lpq_prefixes(net)
    ties = _Ties()
    written: set[str] = set()
    stored_bytes = 0
    with ShardWriter(folder, stem, {"format": "pt"}, max_bytes) as out:
        for seg in _segments(net, recipe.adapter):
            with materialized(seg.module, None, device="cpu", exclude=seg.exclude):
                part: dict[str, Tensor] = {}
                for qw in seg.weights:
                    with torch.no_grad():
                        part[qw.key] = qw.forward_weight().detach()
                    sizes.quantized_tensors += 1
                    sizes.quantized_params += part[qw.key].numel()
                    sizes.quantized_bytes += _nbytes(part[qw.key])
                written.update(part)
                for key, t in seg.state().items():
                    if key in written:
                        continue
                    _still_offloaded(key, t)
                    written.add(key)
                    if key.startswith(lpq_state) or ties.alias(key, t):
                        continue
                    part[key] = t.detach()
                    sizes.other_params += t.numel()
                    sizes.other_bytes += _nbytes(t)
                if not diffusers:
                    from transformers.core_model_loading import revert_weight_conversion

                    part = revert_weight_conversion(net, part)
                for key, t in part.items():
                    out.add(key, t)
                    stored_bytes += _nbytes(t)
                del part
        weight_map, files = out.close()
    _check_covered(net, written)
    if len(files) > 1:
        write_hf_index(folder, stem, weight_map, stored_bytes)
    if diffusers:
        _write_config(net, folder, None)
    else:
        _write_config(net, folder, None, dtype=_network_info(net)["dtype"])
        if getattr(net, "_auto_class", None) is not None:    # remote code: its modeling files, as save_pretrained
            from transformers.dynamic_module_utils import custom_object_save

            custom_object_save(net, folder, config=net.config)
    return sizes


def _write_pipeline_rest(pipe: Any, root: Path, networks: set[str]) -> tuple[_Sizes, dict[str, str]]:
    """The Wan pipeline's other components (text encoder, VAE, tokenizer, scheduler) and model_index.json."""
    sizes = _Sizes()
    dtypes: dict[str, str] = {}
    for name, component in pipe.components.items():
        if name in networks or component is None:
            continue
        component.save_pretrained(root / name)
        if isinstance(component, nn.Module):
            ties = _Ties()
            state = {k: t for k, t in component.state_dict(keep_vars=True).items() if not ties.alias(k, t)}
            sizes.other_params += sum(t.numel() for t in state.values())
            sizes.other_bytes += sum(_nbytes(t) for t in state.values())
            dtypes[name] = _dtype_name(component.dtype)
    pipe.save_config(root)
    return sizes, dtypes


def _runtime_writer(kind: str) -> Any:
    """The module writing a kind in another runtime's layout (`write_network`, `README`)."""
    return importlib.import_module(RUNTIME_KINDS[kind])


def _readme(kind: str, model_kind: str, recipe: QuantRecipe, report: SizeReport) -> str:
    if kind in RUNTIME_KINDS:
        how = _runtime_writer(kind).README
    elif kind == "packed":
        how = ("Packed checkpoint: weights hold the real codes and scales (layout: lpq docs/export.md, "
               f"bit-order version {L.versions()['bit_order_version']}). Load it with lpq:\n\n"
               "```python\nimport lpq\nmodel = lpq.load_quantized(\"THIS_FOLDER\")\n```\n\n"
               "Weights are decoded by lpq's kernels and the activation/attention quantizers of the recipe "
               "are attached again, so outputs equal those of the quantized model that was exported, bit for bit.")
    else:
        loader = ("transformers.AutoModelForCausalLM.from_pretrained" if model_kind == "causal_lm"
                  else "diffusers.WanPipeline.from_pretrained")
        how = (f"Fake-quantized checkpoint: the quantized weights are stored dequantized, in the model's dtype and "
               f"layout. Load it with `{loader}(\"THIS_FOLDER\")`; lpq is not needed. Activations and attention "
               f"then run unquantized: only the weights carry the quantization error. For the full quantized "
               f"model (weights and activations), use a packed export and `lpq.load_quantized`.")
    fmts = ", ".join(sorted(recipe.formats()))
    return (f"# lpq {kind} export\n\n{how}\n\nFormats in the recipe: {fmts}; protected blocks: "
            f"{recipe.protected_blocks or 'none'}. The full recipe is in `{L.RECIPE_FILE}`; versions and sizes in "
            f"`{L.MANIFEST}`.\n\n## Size\n\n{report.text()}\n")


def export_model(model: Any, recipe: QuantRecipe | None, out_dir: str | Path, kind: str = "packed",
                 force: bool = False, tokenizer: Any = None, max_shard_gb: float = 5.0) -> SizeReport:
    """Write a model quantized by `lpq.quant.quantize_model` (a causal LM or a Wan pipeline) to `out_dir`.

    kind="packed": real codes and scales, reloaded bit-exactly by `lpq.load_quantized`;
    kind="fake": dequantized weights, loadable by stock transformers/diffusers;
    kind="compressed-tensors" / "gguf": a causal LM in vLLM's / llama.cpp's layout (RUNTIME_KINDS).
    `recipe`: None, or the recipe the model was quantized with (checked). An existing `out_dir` is
    replaced only with force=True. Returns the size report (also written to the folder's README)."""
    if kind not in KINDS:
        raise ValueError(f"export kind {kind!r} is not allowed; use one of {', '.join(KINDS)}")
    adapter = get_adapter(model, recipe.adapter if recipe is not None else None)
    networks = adapter.networks(model)
    for name, net in networks:
        if resident := packed_resident(net):
            raise ValueError(f"{name or 'the model'} was loaded with keep_packed=True (e.g. {next(iter(resident))} "
                             f"is held as codes): it cannot be exported again; load it with keep_packed=False")
    recipe = _recipe_of(networks, recipe)
    max_bytes = int(max_shard_gb * 1e9)
    total = _Sizes()
    with staged_dir(out_dir, force) as tmp:
        for name, net in networks:
            folder = tmp / name if name else tmp
            folder.mkdir(exist_ok=True)
            with _eval_mode(net):
                if kind == "packed":
                    total.add(_write_packed_network(net, folder, recipe, max_bytes))
                elif kind == "fake":
                    total.add(_write_fake_network(net, folder, recipe, max_bytes))
                else:
                    counts = _runtime_writer(kind).write_network(net, folder, recipe, max_bytes, tokenizer)
                    total.add(_Sizes(**counts))
        components: dict[str, str] = {}
        if adapter.kind == "wan":
            rest, components = _write_pipeline_rest(model, tmp, {n for n, _ in networks})
            total.add(rest)
        elif tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        weight_fmts = sorted({qw.fmt for _, net in networks for qw in quantized_weights(net)})
        report = SizeReport(kind, weight_fmts, total.quantized_tensors, total.quantized_params, total.quantized_bytes,
                            total.other_params, total.other_bytes, dense_fallbacks=total.dense_fallbacks)
        dump_yaml(recipe, tmp / L.RECIPE_FILE)
        report.folder_bytes = folder_bytes(tmp)
        write_json(tmp / L.MANIFEST, {**L.versions(), "lpq_version": lpq.__version__, "kind": kind,
                                      "model_kind": adapter.kind, "adapter": adapter.family,
                                      "networks": [n for n, _ in networks], "components": components,
                                      "recipe": to_dict(recipe), "size": report.to_dict()})
        (tmp / L.README).write_text(_readme(kind, adapter.kind, recipe, report))
    return report
