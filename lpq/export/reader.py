"""load_quantized: rebuild a model (or Wan pipeline) from a packed export, bit-exactly.

Each network is built from its config as a skeleton whose parameters are on the meta device (no
memory, no initialization; buffers the constructors compute, such as rotary tables, are made as
usual), quantized with the stored recipe (which attaches the activation and attention quantizers)
and given its input transforms. The files are then read one tensor at a time: each stored tensor
takes the place of its meta placeholder in place (`torch.utils.swap_tensors`, so tied weights and
every other holder of the parameter see it), and each quantized weight is decoded from its codes as
soon as its parts are read and set as a pre-quantized weight (never quantized again). Peak memory is
the loaded model plus one tensor being decoded. With `keep_packed`, each quantized weight stays as
its codes and is decoded only while its module runs (`lpq.export.resident`): the loaded model is
then about the export's size.
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
from lpq.export.resident import PackedWeight, keep_packed as make_packed_resident, packed_resident
from lpq.export.settings import RUNTIME_KINDS, runtime_export_refusal
from lpq.export.tensor_io import StoredTensor, as_torch_dtype, check_files, iter_file, load_json, read_headers
from lpq.formats import Packed
from lpq.memory import release_freed_memory
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


def _fill(target: Tensor, value: Tensor) -> None:
    """Make `target` (a meta placeholder, or a tensor the model made) hold `value`, in place: the
    same Python object, so tied modules and other holders of it see the value too."""
    if isinstance(target, nn.Parameter):
        value = nn.Parameter(value, requires_grad=target.requires_grad)
    torch.utils.swap_tensors(target, value)


def _build(folder: Path, info: dict[str, Any]) -> nn.Module:
    """The network of `config.json` with its parameters on the meta device.

    Buffers stay real: the constructors compute the tables that are not in the state dict (rotary
    inv_freq, Wan's rope frequencies) exactly as a normal construction does. (transformers'
    from_pretrained instead builds everything on meta and recomputes such buffers in each model's
    `_init_weights`, which remote-code models and diffusers do not all implement.)"""
    from accelerate import init_empty_weights
    from transformers.initialization import no_init_weights

    # no_init_weights: the constructors' initializations would only cost time on placeholders.
    with no_init_weights(), init_empty_weights(include_buffers=False):
        if info["library"] == "diffusers":
            import diffusers

            cls = getattr(diffusers, info["class"], None)
            if cls is None:
                raise L.CheckpointError(f"{folder}: diffusers has no model class {info['class']!r}")
            net = cls.from_config(cls.load_config(folder))
        else:
            from transformers import AutoConfig, AutoModelForCausalLM

            config = AutoConfig.from_pretrained(folder, local_files_only=True)
            kwargs = {"attn_implementation": info["attn_implementation"]} if "attn_implementation" in info else {}
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


def _check_weight(qw: QuantizedWeight, key: str, entry: dict[str, Any]) -> None:
    param = qw.parameter()
    if entry["format"] != qw.fmt or list(param.shape) != list(entry["shape"]):
        raise L.CheckpointError(f"{key}: stored as {entry['format']} {entry['shape']}, but the recipe gives "
                                f"{qw.fmt} {list(param.shape)}; the checkpoint does not match its recipe")


def _set_weight(qw: QuantizedWeight, key: str, entry: dict[str, Any], tensors: dict[str, Tensor],
                device: torch.device | None, keep_packed: bool) -> None:
    """Decode one quantized weight from its parts and make it the module's pre-quantized weight;
    with `keep_packed`, keep its parts instead (decoded once here all the same, so that damaged codes
    are found at load, not in some later forward)."""
    dtype = as_torch_dtype(entry["dtype"])
    if entry["storage"] == "dense":
        w = tensors[key]
    else:
        try:
            w = unpack(_packed_of(key, entry, tensors), tensors.get(key + L.PRESCALE), dtype)
        except (ValueError, TypeError, RuntimeError) as e:
            raise L.CheckpointError(f"{key}: cannot decode its {entry['format']} codes ({e}); the checkpoint "
                                    f"is damaged") from None
        if keep_packed:
            del w
            if device is not None:
                tensors = {k: t.to(device) for k, t in tensors.items()}
            make_packed_resident(qw.module, qw.attr,
                                 PackedWeight(_packed_of(key, entry, tensors), tensors.get(key + L.PRESCALE), dtype))
            qw.set(qw.parameter())          # marks the placeholder pre-quantized
            return
    w = w.to(dtype)
    _fill(qw.parameter(), w if device is None else w.to(device))
    qw.set(qw.parameter())          # marks it pre-quantized (the copy is onto itself)


def _attach_transforms(net: nn.Module, entries: dict[str, dict[str, Any]], headers: dict[str, StoredTensor]) -> None:
    """The input transforms of the index, before the tensors are read: a scale is a placeholder of
    its stored dtype and shape until its tensor comes."""
    for name, entry in entries.items():
        key = entry["input_scale"]
        if key is not None and key not in headers:
            raise L.CheckpointError(f"{name}: its input transform's scale {key!r} is missing; the checkpoint is "
                                    f"damaged")
        try:
            scale = None
            if key is not None:
                scale = torch.empty(headers[key].shape, dtype=headers[key].dtype, device="meta")
            set_input_transform(net, name, InputTransform(entry["hadamard_block"], scale))
        except (TypeError, ValueError) as e:
            raise L.CheckpointError(f"{name}: cannot attach its input transform ({e}); the checkpoint does not "
                                    f"match the model built from its config") from None


def _open(folder: Path) -> tuple[dict[str, Any], dict[str, StoredTensor]]:
    """A packed network's index and the tensors its files hold (from the headers), after checking
    versions and file sizes; no tensor data is read."""
    index = load_json(folder / L.INDEX, "not an lpq packed network folder (no index)",
                      ("network", "files", "quantized", "tied", "weight_map"))
    L.check_versions(index, folder / L.INDEX)
    config = load_json(folder / "config.json", "the model config is missing")
    L.check_versions(config.get("quantization_config") or {}, folder / "config.json")
    check_files(folder, index["files"])
    headers, metadata = read_headers(folder, index["files"])
    stamped = {k: int(v) if v.isdigit() else v for k, v in metadata.items() if k in L.versions()}
    L.check_versions(stamped, folder / next(iter(index["files"])))
    missing = sorted(set(index["weight_map"]) - set(headers))
    if missing:
        raise L.CheckpointError(f"{folder}: tensors listed in the index are missing from the files "
                                f"(e.g. {missing[0]}); the checkpoint is damaged")
    return index, headers


def _load_network(folder: Path, recipe: QuantRecipe, device: str | torch.device | None, verify: bool,
                  keep_packed: bool) -> nn.Module:
    index, headers = _open(folder)
    device = torch.device(device) if device is not None else None
    net = _build(folder, index["network"])
    quantize_model(net, recipe)
    # Buffers not in the state dict (rotary tables) keep the dtypes they had at export.
    for name, buffer_dtype in index["network"].get("buffer_dtypes", {}).items():
        buffer = _tensor_at(net, name)
        buffer.data = buffer.data.to(as_torch_dtype(buffer_dtype))
    _attach_transforms(net, index.get("input_transforms", {}), headers)     # export version 1 has none
    weights = {qw.key: qw for qw in quantized_weights(net)}
    entries: dict[str, dict[str, Any]] = index["quantized"]
    if set(weights) != set(entries):
        extra = sorted(set(weights) ^ set(entries))
        raise L.CheckpointError(f"{folder}: the stored quantized weights and those of the recipe differ "
                                f"(e.g. {extra[0]}); the checkpoint does not match its recipe")
    for key, entry in entries.items():
        _check_weight(weights[key], key, entry)
    part_of = {p: key for key, e in entries.items() for p in _parts(key, e) if p in headers}
    dense = [k for k in headers if k not in part_of]
    for key in dense:
        target, shape = _tensor_at(net, key), headers[key].shape
        if tuple(target.shape) != shape:
            raise L.CheckpointError(f"{key}: stored shape {tuple(shape)}, the model built from the config has "
                                    f"{tuple(target.shape)}")
    tied: dict[str, str] = index["tied"]
    keys = set(net.state_dict(keep_vars=True))
    unexpected, absent = sorted(set(dense) - keys), sorted(keys - set(dense) - set(entries) - set(tied))
    if unexpected or absent:
        raise L.CheckpointError(f"{folder}: the stored tensors do not fit the model built from its config "
                                f"(unexpected: {unexpected[:3]}, missing: {absent[:3]})")
    # Stream: each tensor replaces its placeholder; a quantized weight is decoded once all its parts are in.
    pending: dict[str, dict[str, Tensor]] = {}
    remaining = {key: sum(p in headers for p in _parts(key, e)) for key, e in entries.items()}
    with torch.no_grad():
        for fname, info in index["files"].items():
            for name, t in iter_file(folder, fname, info, headers, verify):
                key = part_of.get(name)
                if key is None:
                    _fill(_tensor_at(net, name), t if device is None else t.to(device))
                    continue
                pending.setdefault(key, {})[name] = t
                if len(pending[key]) == remaining[key]:
                    _set_weight(weights[key], key, entries[key], pending.pop(key), device, keep_packed)
                    release_freed_memory()      # the decode's freed heap, else kept by glibc (GBs at 8B)
        for alias, kept in tied.items():
            a, k = _tensor_at(net, alias), _tensor_at(net, kept)
            if a.is_meta:
                _fill(a, k.detach())         # shares k's storage, as at export
            elif a.data_ptr() != k.data_ptr():
                a.copy_(k)
    if pending:
        raise L.CheckpointError(f"{folder}: {next(iter(pending))} lacks some of its packed parts; the checkpoint "
                                f"is damaged")
    resident = packed_resident(net)
    unfilled = [n for n, t in [*net.named_parameters(remove_duplicate=False), *net.named_buffers(remove_duplicate=False)]
                if t.is_meta and n not in resident]
    if unfilled:
        raise L.CheckpointError(f"{folder}: {unfilled[0]} is in neither the stored tensors nor the tied ones; "
                                f"the checkpoint is damaged")
    if device is not None:           # the buffers the constructors made (weights are already there)
        if resident:                 # Module.to would try to copy the meta placeholders
            for m in net.modules():
                m._buffers.update({k: b.to(device) for k, b in m._buffers.items() if b is not None})
        else:
            net.to(device)
    return net.eval()


def load_quantized(path: str | Path, device: str | torch.device | None = None, verify: bool = True,
                   keep_packed: bool = False) -> Any:
    """The model (transformers causal LM) or Wan pipeline of a packed export at `path`.

    Outputs equal those of the quantized model that was exported, bit for bit. `device`: where to
    build it (quantized weights are marked pre-quantized, so a later dtype-preserving `.to()` keeps
    them too). `verify`: check
    each file's SHA-256 (sizes are always checked). `keep_packed`: hold each quantized weight as its
    codes and decode it only while its module runs (memory about the export's size, a decode per
    weight per forward; inference only, see lpq.export.resident). Raises CheckpointError for a
    damaged export or one written with format/bit-order/export versions this lpq does not read."""
    root = Path(path)
    manifest = load_json(root / L.MANIFEST, "not an lpq export (no manifest); is this the right folder?",
                         ("kind", "model_kind", "networks", "components", "recipe"))
    if manifest.get("kind") == "fake":
        raise L.CheckpointError(f"{root} is a fake-quantized export: load it with transformers/diffusers "
                                f"from_pretrained (lpq.load_quantized reads packed exports)")
    if manifest.get("kind") in RUNTIME_KINDS:
        raise L.CheckpointError(runtime_export_refusal(root, manifest["kind"]))
    L.check_versions(manifest, root / L.MANIFEST)
    try:
        recipe = from_dict(manifest["recipe"], QuantRecipe)
    except ConfigError as e:
        raise L.CheckpointError(f"{root / L.MANIFEST}: its recipe cannot be used: {e}") from None
    if manifest["model_kind"] != "wan":
        return _load_network(root, recipe, device, verify, keep_packed)
    networks = {name: _load_network(root / name, recipe, device, verify, keep_packed) for name in manifest["networks"]}
    pipe = _assemble_pipeline(root, networks, manifest["components"])
    if device is None:
        return pipe
    if not keep_packed:
        return pipe.to(device)
    for name, component in pipe.components.items():    # the networks are on `device` already
        if name not in networks and isinstance(component, nn.Module):
            component.to(device)
    return pipe


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
