"""Atomic writes: a file through a sibling temporary file, a folder through lpq.outputs' staging."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator


def save_atomic(obj: object, path: Path) -> None:
    """torch.save to a sibling temporary file, then rename it over `path`: an interrupted write
    leaves the previous file."""
    import torch

    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


@contextlib.contextmanager
def staged_dir(out: str | Path, force: bool = False, *, fingerprint: str | None = None,
               command: str = "lpq export") -> Iterator[Path]:
    """Yield an empty staging folder next to `out`; on success it becomes `out`, on any exception
    (KeyboardInterrupt included) it is deleted, so `out` is either the previous folder or the
    complete new one, never a half-written one.

    lpq.outputs' rules apply: `out` must be new, empty, or an lpq output folder; one written by another
    recipe (any existing one when `fingerprint` is None) is replaced only with `force`; the folder is
    locked while it is written; the leftovers of a killed write are cleaned up first."""
    from lpq.outputs import staged_output

    with staged_output(out, fingerprint=fingerprint, force=force, command=command) as tmp:
        yield tmp
