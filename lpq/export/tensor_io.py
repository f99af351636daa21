"""safetensors shards with sizes and SHA-256 checksums, and reading them back with clear errors."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from lpq.export.layout import CheckpointError


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 23):
            h.update(chunk)
    return h.hexdigest()


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def _shards(tensors: dict[str, Tensor], max_bytes: int) -> list[list[str]]:
    """Tensor names cut into consecutive groups of at most max_bytes (a bigger tensor goes alone)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, t in tensors.items():
        if shards[-1] and size + _nbytes(t) > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += _nbytes(t)
    return shards


def write_shards(folder: Path, stem: str, tensors: dict[str, Tensor], metadata: dict[str, str],
                 max_bytes: int) -> tuple[dict[str, str], dict[str, dict]]:
    """Write `tensors` as <stem>.safetensors, or <stem>-0000i-of-0000n.safetensors when they exceed
    max_bytes. Returns (tensor name -> file, file -> {"bytes", "sha256"})."""
    groups = _shards(tensors, max_bytes)
    weight_map: dict[str, str] = {}
    files: dict[str, dict] = {}
    for i, names in enumerate(groups):
        fname = f"{stem}.safetensors" if len(groups) == 1 else f"{stem}-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        path = folder / fname
        save_file({n: tensors[n].detach().cpu().contiguous() for n in names}, str(path), metadata=metadata)
        files[fname] = {"bytes": path.stat().st_size, "sha256": sha256(path)}
        weight_map.update({n: fname for n in names})
    return weight_map, files


def write_hf_index(folder: Path, stem: str, weight_map: dict[str, str], total_size: int) -> None:
    """The `<stem>.safetensors.index.json` that transformers and diffusers read for sharded weights."""
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _damaged(path: Path, why: str) -> CheckpointError:
    return CheckpointError(f"{path}: the checkpoint is damaged ({why}); export the model again or restore the file")


def read_shards(folder: Path, files: dict[str, dict], verify: bool = True) -> tuple[dict[str, Tensor], dict[str, str]]:
    """All tensors of the listed files, checking each file's size (always) and SHA-256 (`verify`).
    Returns (tensors, the safetensors metadata of the first file)."""
    tensors: dict[str, Tensor] = {}
    metadata: dict[str, str] = {}
    for fname, info in files.items():
        path = folder / fname
        if not path.is_file():
            raise CheckpointError(f"{path}: missing; the checkpoint is incomplete")
        size = path.stat().st_size
        if size != info["bytes"]:
            raise _damaged(path, f"{size} bytes, the index says {info['bytes']}: truncated or overwritten")
        if verify and sha256(path) != info["sha256"]:
            raise _damaged(path, "SHA-256 differs from the index")
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = metadata or dict(f.metadata() or {})
                for name in f.keys():
                    tensors[name] = f.get_tensor(name)
        except (SafetensorError, OSError, ValueError) as e:
            raise _damaged(path, f"safetensors cannot read it: {e}") from None
    return tensors, metadata


def load_json(path: Path, what: str, required: tuple[str, ...] = ()) -> dict:
    """A JSON object from `path`; `what` says what its absence means, `required` lists its keys."""
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; {what}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: the checkpoint is damaged (not valid JSON: {e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: the checkpoint is damaged (expected a JSON object)")
    absent = [k for k in required if k not in data]
    if absent:
        raise CheckpointError(f"{path}: the checkpoint is damaged (no {absent[0]!r})")
    return data


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def as_torch_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise CheckpointError(f"unknown dtype {name!r} in the checkpoint")
    return dtype
