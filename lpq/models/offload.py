"""Working on a model whose weights accelerate offloaded (`device_map` with CPU or disk offload).

accelerate dispatches an offloaded module by replacing its tensors with meta tensors and attaching
an `AlignDevicesHook` that loads them (from a CPU dict or from disk) for each forward and drops them
afterwards. Such a model runs, but its weights cannot be edited in place: a write to a meta tensor
is silently lost. `materialized(block, store)` gives the PTQ pipeline one block's real tensors on
the execution device; on exit it writes the block's (now quantized) tensors to `store` and points
the hooks there, so the block is offloaded again with its new values and at most one block is
ever held whole.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import torch
from torch import nn

from lpq.export.tensor_io import as_torch_dtype, read_at, read_headers


def _offload_hooks(root: nn.Module, exclude: Sequence[nn.Module] = ()) -> list[tuple[str, nn.Module, object]]:
    """(name, module, hook) of every module under `root` whose tensors accelerate offloads, leaving
    out the modules under `exclude`."""
    skip = _ids(exclude)
    found = []
    for name, mod in root.named_modules():
        hook = getattr(mod, "_hf_hook", None)
        if hook is None or id(mod) in skip:
            continue
        hooks = getattr(hook, "hooks", (hook,))       # a SequentialHook holds several
        for h in hooks:
            if getattr(h, "offload", False):
                found.append((name, mod, h))
    return found


def _ids(modules: Sequence[nn.Module]) -> set[int]:
    return {id(m) for e in modules for m in e.modules()}


def _tensors(mod: nn.Module, hook, skip: set[int]) -> list[str]:
    """The tensor names `hook` offloads, less those of modules in `skip`."""
    from accelerate.utils import named_module_tensors

    return [n for n, _ in named_module_tensors(mod, include_buffers=hook.offload_buffers,
                                               recurse=hook.place_submodules, remove_non_persistent=True)
            if id(mod.get_submodule(n.rpartition(".")[0])) not in skip]


def read_offloaded(weights_map: Mapping[str, torch.Tensor], key: str) -> torch.Tensor:
    """weights_map[key], read from disk with plain reads into a fresh CPU tensor where accelerate
    keeps it in a file (a safetensors shard of the checkpoint or its own .dat offload file).

    accelerate's loader maps the file and copies out of the map: both the mapped pages and the copy
    count as the process's memory until the map closes: twice the tensor while it is read. Read here,
    the tensor is held once; its bytes are the same."""
    from accelerate.utils import OffloadedWeightsLoader, PrefixedDataset

    loader, full = weights_map, key
    if isinstance(weights_map, PrefixedDataset):
        loader, full = weights_map.dataset, weights_map.prefix + key
    if not isinstance(loader, OffloadedWeightsLoader) or full in loader.state_dict or full not in loader.index:
        return weights_map[key]
    info = loader.index[full]
    shard = info.get("safetensors_file")
    if shard is not None:
        path = Path(shard)
        stored = read_headers(path.parent, {path.name: {}})[0][info.get("weight_name", full)]
        start, dtype, shape = stored.start, stored.dtype, stored.shape
    else:
        path = Path(loader.save_folder) / f"{full}.dat"
        start, dtype, shape = 0, as_torch_dtype(info["dtype"]), tuple(info["shape"]) or (1,)
    with open(path, "rb") as f:
        t = read_at(f, start, shape, dtype)
    if t is None:
        raise ValueError(f"{path}: ends before the offloaded tensor {full!r} does")
    if shard is not None and "dtype" in info:
        return t.to(as_torch_dtype(info["dtype"]))
    return t if info["shape"] else t[0]


def is_offloaded(root: nn.Module) -> bool:
    return bool(_offload_hooks(root))


def _tensor(mod: nn.Module, name: str) -> torch.Tensor:
    try:
        return mod.get_parameter(name)
    except AttributeError:
        return mod.get_buffer(name)


@contextmanager
def materialized(block: nn.Module, store: Path | None, device: torch.device | str | None = None,
                 exclude: Sequence[nn.Module] = ()) -> Iterator[None]:
    """Load `block`'s offloaded tensors for the duration of the context (on the hooks' execution
    device, or `device`); on exit write them to `store` (None: drop the changes) and offload again.

    Modules under `exclude` (e.g. the transformer blocks, when `block` is the whole network and
    only the rest is wanted) stay offloaded. A block without offloaded tensors is left alone.
    """
    from accelerate.utils import OffloadedWeightsLoader, PrefixedDataset, offload_state_dict, set_module_tensor_to_device

    hooks = _offload_hooks(block, exclude)
    if not hooks:
        yield
        return
    skip = _ids(exclude)
    for _, mod, hook in hooks:
        for t in _tensors(mod, hook, skip):
            value = read_offloaded(hook.weights_map, t)
            set_module_tensor_to_device(mod, t, device or hook.execution_device, value=value)
        hook.offload = False
    try:
        yield
    finally:
        if store is not None:
            state = {f"{name}.{t}": _tensor(mod, t).detach().cpu() for name, mod, hook in hooks
                     for t in _tensors(mod, hook, skip)}
            store.mkdir(parents=True, exist_ok=True)
            offload_state_dict(str(store), state)
            loader = OffloadedWeightsLoader(save_folder=str(store))
        for name, mod, hook in hooks:
            if store is not None:
                hook.weights_map = PrefixedDataset(loader, f"{name}.")
            for t in _tensors(mod, hook, skip):
                set_module_tensor_to_device(mod, t, "meta")
            hook.offload = True
