"""load_quantized: rebuild a model (or Wan pipeline) from a packed export, bit-exactly.

Each network is built from its config (no hub access), quantized with the stored recipe (which
attaches the activation and attention quantizers), given its input transforms, loaded with the
high-precision tensors and quantizer state, and given its quantized weights decoded from the stored
codes (as pre-quantized weights: never quantized again).
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lpq.config import ConfigError, from_dict
from lpq.export import layout as L
from lpq.export.packing import QuantizedWeight, quantized_weights, unpack
from lpq.export.tensor_io import as_torch_dtype, load_json, read_shards
from lpq.formats import Packed
from lpq.quant import InputTransform, quantize_model, set_input_transform
from lpq.quant.recipe import QuantRecipe


def _tensor_at(net: nn.Module, key: str) -> Tensor:
    module_name, _, attr = key.rpartition(".")
    try:
        module = net.get_submodule(module_name) if module_name else net
    except AttributeError:
        module = None
    t = getattr(module, attr, None)
    if not isinstance(t, Tensor):
        raise L.CheckpointError(f"the checkpoint has {key!r}, which the model built from its config lacks")
    return t


def _build(folder: Path, info: dict[str, Any]) -> nn.Module:
    if info["library"] == "diffusers":
        import diffusers

        cls = getattr(diffusers, info["class"], None)
        if cls is None:
            raise L.CheckpointError(f"{folder}: diffusers has no model class {info['class']!r}")
        net = cls.from_config(cls.load_config(folder))
    else:
        from transformers import AutoConfig, AutoModelForCausalLM
        from transformers.initialization import no_init_weights

        config = AutoConfig.from_pretrained(folder, local_files_only=True)
        kwargs = {"attn_implementation": info["attn_implementation"]} if "attn_implementation" in info else {}
        # Every stored tensor is loaded afterwards: random initialization would only cost time.
        with no_init_weights():
            net = AutoModelForCausalLM.from_config(config, dtype=as_torch_dtype(info["dtype"]), **kwargs)
        net.tie_weights()
    return net.eval()


def _packed_of(key: str, entry: dict[str, Any], tensors: dict[str, Tensor]) -> Packed:
    try:
        return Packed(entry["format"], tuple(entry["shape"]), int(entry["axis"]), tensors[key + L.CODES],
                      tensors.get(key + L.SCALES), tensors.get(key + L.TENSOR_SCALE))
    except KeyError as e:
        raise L.CheckpointError(f"{key}: {e} missing from the packed tensors; the checkpoint is damaged") from None


def _parts(key: str, entry: dict[str, Any]) -> list[str]:
    if entry["storage"] == "dense":
        return [key]
    return [key + s for s in (L.CODES, L.SCALES, L.TENSOR_SCALE, L.PRESCALE)]


def _set_weight(qw: QuantizedWeight, key: str, entry: dict[str, Any], tensors: dict[str, Tensor]) -> None:
    dtype = as_torch_dtype(entry["dtype"])
    param = qw.parameter()
    if entry["format"] != qw.fmt or list(param.shape) != list(entry["shape"]):
        raise L.CheckpointError(f"{key}: stored as {entry['format']} {entry['shape']}, but the recipe gives "
                                f"{qw.fmt} {list(param.shape)}; the checkpoint does not match its recipe")
    if entry["storage"] == "dense":
        w = tensors[key]
    else:
        try:
            w = unpack(_packed_of(key, entry, tensors), tensors.get(key + L.PRESCALE), dtype)
        except (ValueError, TypeError, RuntimeError) as e:
            raise L.CheckpointError(f"{key}: cannot decode its {entry['format']} codes ({e}); the checkpoint "
                                    f"is damaged") from None
    if param.dtype != dtype:
        param.data = param.data.to(dtype)
    qw.set(w.to(param.device))


def _attach_transforms(net: nn.Module, entries: dict[str, dict[str, Any]], tensors: dict[str, Tensor]) -> None:
    """The input transforms of the index, before the state dict is loaded (their scales are in it)."""
    for name, entry in entries.items():
        key = entry["input_scale"]
        if key is not None and key not in tensors:
            raise L.CheckpointError(f"{name}: its input transform's scale {key!r} is missing; the checkpoint is "
                                    f"damaged")
        try:
            weight = _tensor_at(net, f"{name}.weight")
            transform = InputTransform(entry["hadamard_block"], tensors[key] if key is not None else None)
            set_input_transform(net, name, transform.to(weight.device))
        except (TypeError, ValueError) as e:
            raise L.CheckpointError(f"{name}: cannot attach its input transform ({e}); the checkpoint does not "
                                    f"match the model built from its config") from None


def _read(folder: Path, verify: bool) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """A packed network's index and tensors, after checking versions, sizes and checksums."""
    index = load_json(folder / L.INDEX, "not an lpq packed network folder (no index)",
                      ("network", "files", "quantized", "tied", "weight_map"))
    L.check_versions(index, folder / L.INDEX)
    config = load_json(folder / "config.json", "the model config is missing")
    L.check_versions(config.get("quantization_config") or {}, folder / "config.json")
    tensors, metadata = read_shards(folder, index["files"], verify)
    stamped = {k: int(v) if v.isdigit() else v for k, v in metadata.items() if k in L.versions()}
    L.check_versions(stamped, folder / next(iter(index["files"])))
    missing = sorted(set(index["weight_map"]) - set(tensors))
    if missing:
        raise L.CheckpointError(f"{folder}: tensors listed in the index are missing from the files "
                                f"(e.g. {missing[0]}); the checkpoint is damaged")
    return index, tensors


def _load_network(folder: Path, recipe: QuantRecipe, device: str | torch.device | None, verify: bool) -> nn.Module:
    index, tensors = _read(folder, verify)
    net = _build(folder, index["network"])
    if device is not None:
        net.to(device)
    quantize_model(net, recipe)
    # Buffers not in the state dict (rotary tables) keep the dtypes they had at export.
    for name, buffer_dtype in index["network"].get("buffer_dtypes", {}).items():
        buffer = _tensor_at(net, name)
        buffer.data = buffer.data.to(as_torch_dtype(buffer_dtype))
    _attach_transforms(net, index.get("input_transforms", {}), tensors)     # export version 1 has none
    weights = {qw.key: qw for qw in quantized_weights(net)}
    entries: dict[str, dict[str, Any]] = index["quantized"]
    if set(weights) != set(entries):
        extra = sorted(set(weights) ^ set(entries))
        raise L.CheckpointError(f"{folder}: the stored quantized weights and those of the recipe differ "
                                f"(e.g. {extra[0]}); the checkpoint does not match its recipe")
    packed_parts = {p for key, e in entries.items() for p in _parts(key, e)}
    dense = {k: v for k, v in tensors.items() if k not in packed_parts}
    for key, t in dense.items():
        target = _tensor_at(net, key)
        if target.shape != t.shape:
            raise L.CheckpointError(f"{key}: stored shape {tuple(t.shape)}, the model built from the config has "
                                    f"{tuple(target.shape)}")
        if target.dtype != t.dtype:
            target.data = target.data.to(t.dtype)
    result = net.load_state_dict(dense, strict=False)
    tied: dict[str, str] = index["tied"]
    absent = sorted(set(result.missing_keys) - set(entries) - set(tied))
    if result.unexpected_keys or absent:
        raise L.CheckpointError(f"{folder}: the stored tensors do not fit the model built from its config "
                                f"(unexpected: {result.unexpected_keys[:3]}, missing: {absent[:3]})")
    with torch.no_grad():
        for alias, kept in tied.items():
            a, k = _tensor_at(net, alias), _tensor_at(net, kept)
            if a.data_ptr() != k.data_ptr():
                a.copy_(k)
        for key, entry in entries.items():
            _set_weight(weights[key], key, entry, tensors)
    return net.eval()


def load_quantized(path: str | Path, device: str | torch.device | None = None, verify: bool = True) -> Any:
    """The model (transformers causal LM) or Wan pipeline of a packed export at `path`.

    Outputs equal those of the quantized model that was exported, bit for bit. `device`: where to
    build it (quantized weights are marked pre-quantized, so a later dtype-preserving `.to()` keeps
    them too). `verify`: check
    each file's SHA-256 (sizes are always checked). Raises CheckpointError for a damaged export or
    one written with format/bit-order/export versions this lpq does not read."""
    root = Path(path)
    manifest = load_json(root / L.MANIFEST, "not an lpq export (no manifest); is this the right folder?",
                         ("kind", "model_kind", "networks", "components", "recipe"))
    if manifest.get("kind") == "fake":
        raise L.CheckpointError(f"{root} is a fake-quantized export: load it with transformers/diffusers "
                                f"from_pretrained (lpq.load_quantized reads packed exports)")
    L.check_versions(manifest, root / L.MANIFEST)
    try:
        recipe = from_dict(manifest["recipe"], QuantRecipe)
    except ConfigError as e:
        raise L.CheckpointError(f"{root / L.MANIFEST}: its recipe cannot be used: {e}") from None
    if manifest["model_kind"] != "wan":
        return _load_network(root, recipe, device, verify)
    networks = {name: _load_network(root / name, recipe, device, verify) for name in manifest["networks"]}
    pipe = _assemble_pipeline(root, networks, manifest["components"])
    return pipe.to(device) if device is not None else pipe


def _assemble_pipeline(root: Path, networks: dict[str, nn.Module], dtypes: dict[str, str]) -> Any:
    """The diffusers pipeline of model_index.json with the given networks and the other components
    loaded from their folders (DiffusionPipeline.from_pretrained would reload optional components
    such as Wan2.2's transformer_2 from disk even when passed in)."""
    import diffusers

    index = load_json(root / "model_index.json", "the pipeline index is missing")
    cls = getattr(diffusers, index.get("_class_name", ""), None)
    if cls is None:
        raise L.CheckpointError(f"{root / 'model_index.json'}: unknown pipeline class {index.get('_class_name')!r}")
    kwargs: dict[str, Any] = {}
    for name, value in index.items():
        if name.startswith("_"):
            continue
        if name in networks:
            kwargs[name] = networks[name]
        elif isinstance(value, list) and len(value) == 2 and all(v is None or isinstance(v, str) for v in value):
            library, class_name = value
            if library is None:
                kwargs[name] = None
                continue
            component_cls = getattr(importlib.import_module(library), class_name)
            extra = {}
            if name in dtypes:
                extra = {"dtype" if library == "transformers" else "torch_dtype": as_torch_dtype(dtypes[name])}
            kwargs[name] = component_cls.from_pretrained(root / name, local_files_only=True, **extra)
        else:
            kwargs[name] = value
    return cls(**kwargs)
