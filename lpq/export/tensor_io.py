"""safetensors shards written and read one tensor at a time, with sizes and SHA-256 checksums and clear errors."""
from __future__ import annotations

import hashlib
import json
import math
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

import torch
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


# safetensors dtype names (https://github.com/huggingface/safetensors, format description)
_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}
_COPY_CHUNK = 1 << 23


class ShardWriter:
    """safetensors shards written as tensors come, holding one tensor at a time, never a state dict.

    A shard holds consecutive tensors up to `max_bytes` (a bigger tensor goes alone, as before);
    it is closed when the next tensor would not fit. Tensor bytes go to a scratch file on arrival;
    closing a shard writes its file (header, then the data grouped by element size, largest first,
    as safetensors' own writer orders it so that every tensor is aligned) and its SHA-256 in the
    same pass. `close()` gives the files their final names, `<stem>.safetensors` or
    `<stem>-0000i-of-0000n.safetensors`, once n is known, and returns (tensor -> file, file ->
    {"bytes", "sha256"}). Little-endian machines only (safetensors stores little-endian)."""

    def __init__(self, folder: Path, stem: str, metadata: dict[str, str], max_bytes: int):
        if sys.byteorder != "little":
            raise RuntimeError("safetensors files are little-endian; this machine is big-endian")
        self.folder, self.stem, self.metadata, self.max_bytes = Path(folder), stem, dict(metadata), max_bytes
        self._scratch_path = self.folder / f".{stem}.scratch"
        self._scratch = open(self._scratch_path, "w+b")
        self._pending: list[tuple[str, str, list[int], int, int]] = []   # name, dtype, shape, scratch offset, bytes
        self._pending_bytes = 0
        self._done: list[tuple[Path, list[str], dict]] = []               # numbered file, its tensors, info
        self._names: set[str] = set()

    def add(self, name: str, t: Tensor) -> None:
        """Append one tensor (copied to the CPU if needed); its bytes are on disk when this returns."""
        if name in self._names:
            raise ValueError(f"tensor {name!r} written twice")
        check_finite(name, t)
        if t.dtype not in _ST_DTYPES:
            raise TypeError(f"{name}: dtype {t.dtype} cannot be stored in safetensors; allowed: "
                            f"{', '.join(str(d).removeprefix('torch.') for d in _ST_DTYPES)}")
        nbytes = _nbytes(t)
        if self._pending and self._pending_bytes + nbytes > self.max_bytes:
            self._flush()
        self._names.add(name)
        offset = self._scratch.tell()
        data = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        self._scratch.write(memoryview(data.numpy()))
        self._pending.append((name, _ST_DTYPES[t.dtype], list(t.shape), offset, nbytes))
        self._pending_bytes += nbytes

    def _flush(self) -> None:
        """Write the pending tensors as the next shard file, then empty the scratch file."""
        # Largest element size first (stable within a size): each tensor starts aligned to its element.
        order = sorted(self._pending, key=lambda p: -_ST_ITEMSIZE[p[1]])
        header: dict[str, object] = {"__metadata__": self.metadata} if self.metadata else {}
        start = 0
        for name, dtype, shape, _, nbytes in order:
            header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [start, start + nbytes]}
            start += nbytes
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)          # the data then starts 8-byte aligned (space padding is allowed)
        path = self.folder / f".{self.stem}-{len(self._done) + 1:05d}.safetensors"
        h = hashlib.sha256()
        self._scratch.flush()
        with open(path, "wb") as out:
            for piece in (struct.pack("<Q", len(text)), text):
                out.write(piece)
                h.update(piece)
            for _, _, _, offset, nbytes in order:
                self._scratch.seek(offset)
                left = nbytes
                while left:
                    chunk = self._scratch.read(min(left, _COPY_CHUNK))
                    out.write(chunk)
                    h.update(chunk)
                    left -= len(chunk)
        self._done.append((path, [p[0] for p in self._pending], {"bytes": path.stat().st_size, "sha256": h.hexdigest()}))
        self._scratch.seek(0)
        self._scratch.truncate()
        self._pending, self._pending_bytes = [], 0

    def close(self) -> tuple[dict[str, str], dict[str, dict]]:
        """Write the last shard, name the files and return (tensor name -> file, file -> {"bytes", "sha256"})."""
        if self._pending or not self._done:        # no tensor at all still gives one (empty) file
            self._flush()
        self._discard_scratch()
        n = len(self._done)
        weight_map: dict[str, str] = {}
        files: dict[str, dict] = {}
        for i, (path, names, info) in enumerate(self._done):
            fname = f"{self.stem}.safetensors" if n == 1 else f"{self.stem}-{i + 1:05d}-of-{n:05d}.safetensors"
            path.rename(self.folder / fname)
            files[fname] = info
            weight_map.update({name: fname for name in names})
        self._done = []
        return weight_map, files

    def _discard_scratch(self) -> None:
        if not self._scratch.closed:
            self._scratch.close()
        self._scratch_path.unlink(missing_ok=True)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        """On an error, remove what this writer left (the scratch file and unnamed shards)."""
        if exc[0] is not None:
            self._discard_scratch()
            for path, _, _ in self._done:
                path.unlink(missing_ok=True)


_ST_ITEMSIZE = {name: torch.empty((), dtype=dtype).element_size() for dtype, name in _ST_DTYPES.items()}
_TORCH_DTYPES = {name: dtype for dtype, name in _ST_DTYPES.items()}


_CHECKED_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Values checked at once: the mask of a whole 151,936 x 4,096 embedding would add 0.6 GB to an export
# that otherwise holds that one tensor.
_CHECK_CHUNK = 1 << 24


def check_finite(name: str, t: Tensor) -> None:
    """Refuse a floating-point tensor holding NaN or Inf: an export must not hand a broken model to a
    runtime (a NaN norm weight makes every logit NaN). Codes, integer and 8-bit float scale tensors
    (their codes come from the checked weights) are not checked. Checked a slice at a time."""
    if t.dtype not in _CHECKED_FLOATS or not t.numel():
        return
    parts = t.detach().reshape(-1).split(_CHECK_CHUNK)
    if not all(bool(torch.isfinite(part).all()) for part in parts):
        bad = sum(int((~torch.isfinite(part)).sum()) for part in parts)
        raise ValueError(f"{name}: {bad} of {t.numel()} values are NaN or Inf; lpq does not export a model that "
                         f"computes non-finite values (check the run that produced it)")


def write_shards(folder: Path, stem: str, tensors: dict[str, Tensor], metadata: dict[str, str],
                 max_bytes: int) -> tuple[dict[str, str], dict[str, dict]]:
    """Write an in-memory dict of tensors with a ShardWriter; same result as adding them one by one."""
    with ShardWriter(folder, stem, metadata, max_bytes) as w:
        for name, t in tensors.items():
            w.add(name, t)
        return w.close()


def write_hf_index(folder: Path, stem: str, weight_map: dict[str, str], total_size: int) -> None:
    """The `<stem>.safetensors.index.json` that transformers and diffusers read for sharded weights."""
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _damaged(path: Path, why: str) -> CheckpointError:
    return CheckpointError(f"{path}: the checkpoint is damaged ({why}); export the model again or restore the file")


def check_files(folder: Path, files: dict[str, dict]) -> None:
    """Every listed file is there with the size the index gives (cheap: no data is read)."""
    for fname, info in files.items():
        path = folder / fname
        if not path.is_file():
            raise CheckpointError(f"{path}: missing; the checkpoint is incomplete")
        size = path.stat().st_size
        if size != info["bytes"]:
            raise _damaged(path, f"{size} bytes, the index says {info['bytes']}: truncated or overwritten")


@dataclass(frozen=True)
class StoredTensor:
    """Where a tensor lies in a safetensors file (from its header)."""

    file: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int                 # byte offset in the file
    nbytes: int


_MAX_HEADER = 1 << 28


def _read_header(path: Path, fname: str) -> tuple[dict[str, StoredTensor], dict[str, str]]:
    """Parse a safetensors header and check it describes exactly the file's data (contiguous tensors
    of known dtypes whose sizes match their shapes)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if not 0 < n <= min(size - 8, _MAX_HEADER):
            raise _damaged(path, "safetensors cannot read it: the header length does not fit the file")
        raw = f.read(n)
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        metadata = header.pop("__metadata__", None) or {}
        found: dict[str, StoredTensor] = {}
        for name, e in header.items():
            dtype = _TORCH_DTYPES.get(e["dtype"])
            if dtype is None:
                raise ValueError(f"{name}: unknown dtype {e['dtype']!r}")
            begin, end = (int(v) for v in e["data_offsets"])
            shape = tuple(int(d) for d in e["shape"])
            if end - begin != math.prod(shape) * _ST_ITEMSIZE[e["dtype"]]:
                raise ValueError(f"{name}: {end - begin} bytes for shape {list(shape)}")
            found[name] = StoredTensor(fname, dtype, shape, 8 + n + begin, end - begin)
    except (ValueError, KeyError, TypeError) as e:
        raise _damaged(path, f"safetensors cannot read it: {e}") from None
    covered = 8 + n
    for t in sorted(found.values(), key=lambda t: t.start):
        if t.start != covered:
            raise _damaged(path, "safetensors cannot read it: the tensors' byte ranges overlap or leave gaps")
        covered += t.nbytes
    if covered != size:
        raise _damaged(path, f"safetensors cannot read it: the tensors end at byte {covered} of {size}")
    return found, {str(k): str(v) for k, v in metadata.items()}


def read_headers(folder: Path, files: dict[str, dict]) -> tuple[dict[str, StoredTensor], dict[str, str]]:
    """The tensors of the listed files from their headers only (no data is read): ({name: StoredTensor},
    the safetensors metadata of the first file)."""
    found: dict[str, StoredTensor] = {}
    metadata: dict[str, str] = {}
    for i, fname in enumerate(files):
        tensors, meta = _read_header(folder / fname, fname)
        found.update(tensors)
        metadata = meta if i == 0 else metadata
    return found, metadata


def iter_file(folder: Path, fname: str, info: dict, tensors: dict[str, StoredTensor],
              verify: bool = True) -> Iterator[tuple[str, Tensor]]:
    """The tensors of one listed file in file order, after checking the file's SHA-256 (`verify`).

    Each is read with plain reads into a tensor allocated as the model's own would be, not taken
    from a memory map: mapped pages count as the process's memory until the file is closed, and a
    view of a map starts at any byte offset (unaligned data takes other SIMD paths in some CPU
    kernels, whose float results then differ in the last bits)."""
    path = folder / fname
    if verify and sha256(path) != info["sha256"]:
        raise _damaged(path, "SHA-256 differs from the index")
    mine = sorted(((n, t) for n, t in tensors.items() if t.file == fname), key=lambda nt: nt[1].start)
    with open(path, "rb") as f:
        for name, st in mine:
            t = read_at(f, st.start, st.shape, st.dtype)
            if t is None:
                raise _damaged(path, f"{name} ends past the end of the file")
            yield name, t


def read_at(f: BinaryIO, start: int, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor | None:
    """A fresh tensor filled with plain reads from byte `start` of the open file (no memory map), or
    None when the file ends first."""
    t = torch.empty(shape, dtype=dtype)
    f.seek(start)
    if f.readinto(memoryview(t.reshape(-1).view(torch.uint8).numpy())) != _nbytes(t):
        return None
    return t


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
