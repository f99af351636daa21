"""Drive the real `lpq` CLI and check that the user's files are untouched."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

# No test may wait on the hub: built-ins, local folders and errors must never need it.
OFFLINE = {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}

RECIPE = "model:\n  id: tiny-llama\nquant:\n  format: mxfp4\nexport:\n  kind: packed\n"


def lpq(*args, env: dict | None = None):
    """`lpq ARGS` in this process; returns (exit code, output with stderr)."""
    from lpq.cli import app

    result = CliRunner().invoke(app, [str(a) for a in args], env={**OFFLINE, **(env or {})})
    return result.exit_code, result.output


def lpq_process(*args, env: dict | None = None, cwd: Path | None = None, timeout: float = 120):
    """`python -m lpq.cli ARGS` as its own process (for locks held by other processes and for
    environment variables read at import); returns (exit code, stdout + stderr)."""
    from lpq.outputs import HELD_ENV

    full = {k: v for k, v in os.environ.items() if k != HELD_ENV}
    full.update(OFFLINE)
    full.update(env or {})
    full = {k: v for k, v in full.items() if v is not None}
    r = subprocess.run([sys.executable, "-m", "lpq.cli", *map(str, args)], capture_output=True, text=True,
                       env=full, cwd=cwd, timeout=timeout)
    return r.returncode, r.stdout + r.stderr


def error_line(output: str) -> str:
    """The one `error: ...` line of a failed command (there must be exactly one, and no traceback)."""
    assert "Traceback" not in output, output
    lines = [line for line in output.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, output
    return lines[0]


def snapshot(folder: Path) -> dict[str, str]:
    """Relative path -> SHA-256 of every file under `folder` (symlinks by target name)."""
    out = {}
    for p in sorted(Path(folder).rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if p.is_symlink():
            out[rel] = "link:" + os.readlink(p)
        elif p.is_file():
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            out[rel] = "dir"
    return out


def user_folder(path: Path) -> Path:
    """A folder of the user's own files (not an lpq output)."""
    path.mkdir(parents=True)
    (path / "notes.txt").write_text("my notes\n")
    (path / "sub").mkdir()
    (path / "sub" / "data.bin").write_bytes(bytes(range(256)))
    return path
