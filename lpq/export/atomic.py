"""Write a folder all at once: build it under a hidden sibling, rename it into place at the end."""
from __future__ import annotations

import contextlib
import shutil
import uuid
from pathlib import Path
from typing import Iterator


def _check_target(out: Path, force: bool) -> None:
    if not (out.exists() or out.is_symlink()):
        return
    if not out.is_dir() or out.is_symlink():
        raise FileExistsError(f"{out} exists and is not a folder; remove it or choose another --out")
    if not force:
        raise FileExistsError(f"{out} already exists; pass --force (force=True) to replace it")


def save_atomic(obj: object, path: Path) -> None:
    """torch.save to a sibling temporary file, then rename it over `path`: an interrupted write
    leaves the previous file."""
    import torch

    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


@contextlib.contextmanager
def staged_dir(out: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield an empty staging folder next to `out`; on success it becomes `out` (replacing an old
    one only with `force`), on any exception (KeyboardInterrupt included) it is deleted, so `out`
    is either the previous folder or the complete new one, never a half-written one."""
    out = Path(out).absolute()
    _check_target(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    tmp = out.with_name(f".{out.name}.lpq-tmp-{tag}")
    tmp.mkdir()
    try:
        yield tmp
        _check_target(out, force)    # another process may have created it meanwhile
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = out.with_name(f".{out.name}.lpq-old-{tag}") if out.exists() else None
    if old is not None:
        out.rename(old)
    try:
        tmp.rename(out)
    except BaseException:
        if old is not None:
            old.rename(out)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
