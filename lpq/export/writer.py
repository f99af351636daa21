"""export_model: write a quantized model (or Wan pipeline) as a packed or fake-quantized checkpoint.

Folder layout and tensor names: docs/export.md. Everything is written into a staging folder that is
renamed into place at the end (lpq.export.atomic), so an interrupted export leaves nothing behind.
"""
from __future__ import annotations

import contextlib
import json
import warnings
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
from lpq.export.settings import KINDS
from lpq.export.size import SizeReport, folder_bytes
from lpq.export.tensor_io import write_hf_index, write_json, write_shards
from lpq.models.adapters import get_adapter
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


def _dense_state(net: nn.Module, skip: set[str], drop_lpq: bool) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The state dict minus `skip`, each shared tensor once; returns (tensors, {alias key: kept key})."""
    lpq_state = _lpq_prefixes(net) if drop_lpq else ()
    tensors: dict[str, Tensor] = {}
    tied: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for key, t in net.state_dict().items():
        if key in skip or key.startswith(lpq_state):
            continue
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if t.numel() and ident in seen:
            tied[key] = seen[ident]
            continue
        seen[ident] = key
        tensors[key] = t.detach().cpu()
    return tensors, tied


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


def _write_config(net: nn.Module, folder: Path, quantization_config: dict | None) -> None:
    if _is_diffusers(net):
        net.save_config(folder)
    else:
        net.config.save_pretrained(folder)
        if getattr(net, "generation_config", None) is not None and net.can_generate():
            net.generation_config.save_pretrained(folder)
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.pop("quantization_config", None)
    if quantization_config is not None:
        config["quantization_config"] = quantization_config
    write_json(path, config)


def _quantization_config(recipe: QuantRecipe) -> dict[str, Any]:
    return {"quant_method": L.QUANT_METHOD, "kind": "packed", **L.versions(),
            "weight_format": recipe.weight.format if recipe.weight else None,
            "input_format": recipe.input.format if recipe.input else None,
            "loader": "lpq.load_quantized(folder)", "recipe": to_dict(recipe)}


def _forward_weights(net: nn.Module) -> list[tuple[QuantizedWeight, Tensor]]:
    with torch.no_grad():
        return [(qw, qw.forward_weight().detach().cpu()) for qw in quantized_weights(net)]


def _write_packed_network(net: nn.Module, folder: Path, recipe: QuantRecipe, max_bytes: int) -> _Sizes:
    sizes = _Sizes()
    tensors: dict[str, Tensor] = {}
    entries: dict[str, dict[str, Any]] = {}
    transforms = input_transforms(net)    # their scales are ordinary state-dict entries, stored dense below
    weights = _forward_weights(net)
    for qw, w_q in weights:
        entry = {"format": qw.fmt, "axis": qw.axis % w_q.dim(), "shape": list(w_q.shape),
                 "dtype": _dtype_name(w_q.dtype)}
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
        tensors.update(parts)
        entries[qw.key] = entry
        sizes.quantized_tensors += 1
        sizes.quantized_params += w_q.numel()
        sizes.quantized_bytes += sum(_nbytes(t) for t in parts.values())
    dense, tied = _dense_state(net, skip={qw.key for qw, _ in weights}, drop_lpq=False)
    tensors.update(dense)
    sizes.other_params = sum(t.numel() for t in dense.values())
    sizes.other_bytes = sum(_nbytes(t) for t in dense.values())
    metadata = {k: str(v) for k, v in L.versions().items()}
    weight_map, files = write_shards(folder, L.PACKED_STEM, tensors, metadata, max_bytes)
    write_json(folder / L.INDEX, {**L.versions(), "network": _network_info(net), "files": files,
                                  "quantized": entries, "input_transforms": transforms, "tied": tied,
                                  "weight_map": weight_map})
    _write_config(net, folder, _quantization_config(recipe))
    return sizes


def _write_fake_network(net: nn.Module, folder: Path, max_bytes: int) -> _Sizes:
    transforms = input_transforms(net)
    if transforms:
        raise ValueError(f"{next(iter(transforms))} has an input transform (Hadamard / SmoothQuant scale), which "
                         f"stock transformers/diffusers models cannot run, so a fake export would compute something "
                         f"else; use kind='packed'")
    sizes = _Sizes()
    weights = _forward_weights(net)
    dense, _ = _dense_state(net, skip=set(), drop_lpq=True)
    for qw, w_q in weights:
        dense[qw.key] = w_q
        sizes.quantized_tensors += 1
        sizes.quantized_params += w_q.numel()
        sizes.quantized_bytes += _nbytes(w_q)
    quantized = {qw.key for qw, _ in weights}
    sizes.other_params = sum(t.numel() for k, t in dense.items() if k not in quantized)
    sizes.other_bytes = sum(_nbytes(t) for k, t in dense.items() if k not in quantized)
    if not _is_diffusers(net):
        # transformers: its save_pretrained drops tied copies and writes the checkpoint's own key
        # layout (e.g. per-expert MoE keys) that from_pretrained expects.
        net.save_pretrained(folder, state_dict=dense, max_shard_size=max_bytes)
        _write_config(net, folder, None)
    else:
        weight_map, files = write_shards(folder, DIFFUSERS_STEM, dense, {"format": "pt"}, max_bytes)
        if len(files) > 1:
            write_hf_index(folder, DIFFUSERS_STEM, weight_map, sum(_nbytes(t) for t in dense.values()))
        _write_config(net, folder, None)
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
            state, _ = _dense_state(component, skip=set(), drop_lpq=True)
            sizes.other_params += sum(t.numel() for t in state.values())
            sizes.other_bytes += sum(_nbytes(t) for t in state.values())
            dtypes[name] = _dtype_name(component.dtype)
    pipe.save_config(root)
    return sizes, dtypes


def _readme(kind: str, model_kind: str, recipe: QuantRecipe, report: SizeReport) -> str:
    if kind == "packed":
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
    kind="fake": dequantized weights, loadable by stock transformers/diffusers.
    `recipe`: None, or the recipe the model was quantized with (checked). An existing `out_dir` is
    replaced only with force=True. Returns the size report (also written to the folder's README)."""
    if kind not in KINDS:
        raise ValueError(f"export kind {kind!r} is not allowed; use one of {', '.join(KINDS)}")
    adapter = get_adapter(model, recipe.adapter if recipe is not None else None)
    networks = adapter.networks(model)
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
                else:
                    total.add(_write_fake_network(net, folder, max_bytes))
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
