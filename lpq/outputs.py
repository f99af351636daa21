"""Output folders: where lpq may write, what it may replace, and one run per folder at a time.

Every folder lpq writes carries a marker file, `lpq_output.json`: the command, the recipe fingerprint
and, once a run has finished, the files it wrote. The rules, the same for every command:

* A folder without the marker is never written into or deleted. An empty folder is adopted.
* A marked folder from another recipe (another fingerprint or command) is replaced, or started over,
  only with `force`, unless its run stopped before writing anything but its recipe copy. The same
  recipe continues in place (ptq, train) or is rewritten (export, eval).
* Even with `force`, lpq never deletes or replaces the filesystem root, the home folder, the working
  folder or a folder above it, a folder without the marker, or a marked folder that holds files lpq
  did not write (a user's notes added later).
* One run per folder: `.NAME.lpq-lock` beside the folder is locked (flock) for the whole run and
  names the pid, host and command of its holder. The lock of a killed run is taken over, with a message.
* A killed staged write leaves `.NAME.lpq-tmp-*` (its staging folder) or `.NAME.lpq-old-*` (the old
  folder, moved aside for the final rename). The next run on NAME removes the first, and puts the
  second back if NAME is missing, with a message.

Two ways to write a folder:

* `claim_output`: in place, for a whole resumable run (ptq, train). Returns an `OutputFolder` that
  holds the lock until `release()`, the end of its `with` block, or the end of the process.
* `staged_output`: all at once (export, eval). The folder is built in a hidden sibling and renamed
  into place at the end, so the target is always either the old folder or the complete new one.

`check_output` applies the same rules without touching anything, to validate a recipe before any work.
Locks are re-entrant: a process (and its child processes, through LPQ_HELD_OUTPUTS) may claim a
folder it already holds, e.g. `lpq export` locks its folder before loading the model and the writer's
`staged_output` runs inside that lock.
"""
from __future__ import annotations

import atexit
import datetime
import errno
import hashlib
import json
import os
import re
import shutil
import socket
import sys
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:          # not POSIX: the lock falls back to the pid check alone
    fcntl = None  # type: ignore[assignment]

MARKER = "lpq_output.json"
MARKER_VERSION = 1
RECIPE_COPY = "recipe.yaml"     # the copy of its recipe that a run writes first
HELD_ENV = "LPQ_HELD_OUTPUTS"   # folders whose lock an ancestor lpq process holds (os.pathsep list)
# Names lpq uses beside (or, for nested outputs, inside) an output folder while it works.
_TRANSIENT = re.compile(r"\.(?P<name>.+)\.lpq-(?:lock|(?P<what>tmp|old)-[0-9a-f]{8})")


class OutputError(ValueError):
    """An output folder lpq may not use; the message is one line that names the folder and what to do."""


def _say(msg: str) -> None:
    print(f"lpq: {msg}", file=sys.stderr)


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def _target(path: str | os.PathLike) -> Path:
    if not str(path).strip():
        raise OutputError("the output folder is an empty string; give a folder")
    # abspath normalizes `.` and `..` without following links: `--out .` is the working folder itself.
    target = Path(os.path.abspath(Path(path).expanduser()))
    if target == Path(target.anchor):     # nothing can sit beside it (the lock, a staging folder)
        raise OutputError(f"{path} is the filesystem root; give a folder below it")
    blocker = next((p for p in target.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise OutputError(f"{path}: {blocker} is a file, not a folder; choose another output folder")
    return target


def refuse_input_folders(path: str | os.PathLike, reads: dict[str, str | os.PathLike | None]) -> None:
    """Refuse an output folder that is, holds or lies inside a folder the command reads (`reads`: the
    option or key that names it -> its path; ids that are no local folder are skipped): with --force the
    input would be deleted before it is read, and an output inside a model folder mixes files into it."""
    target = _target(path).resolve()
    for name, given in reads.items():
        if given is None or not str(given).strip() or not Path(given).expanduser().is_dir():
            continue
        source = Path(given).expanduser().resolve()
        how = ("is" if target == source else "is inside" if source in target.parents
               else "holds" if target in source.parents else None)
        if how is not None:
            raise OutputError(f"the output folder {path} {how} the folder it reads ({name} {given}); choose another "
                              f"output folder")


def _make_parent(target: Path, shown: str) -> None:
    """Create the folder `target` goes in; a failure (no permission, a read-only disk) in one line."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{shown}: cannot create the folder it goes in ({e.strerror}: {e.filename})") from None


def _protected(target: Path) -> str | None:
    """Why lpq must never delete or replace `target`, or None."""
    real = target.resolve()
    cwd = Path.cwd().resolve()
    if real == Path(real.anchor):
        return "the filesystem root"
    if real == Path.home().resolve():
        return "your home folder"
    if real == cwd:
        return "the working folder"
    if real in cwd.parents:
        return "a folder above the working folder"
    return None


def recipe_fingerprint(recipe: Any, ignore: Iterable[str] = ()) -> str:
    """A short hash of a recipe (a dataclass tree or plain data) without the dotted keys in `ignore`
    (the output location itself, `force`), for the marker's "same recipe" test."""
    from lpq.config import to_dict

    data = to_dict(recipe)
    for dotted in ignore:
        *parents, last = dotted.split(".")
        node = data
        for p in parents:
            node = node.get(p) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(last, None)
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ---------------------------------------------------------------- the marker and the folder's files

def read_marker(folder: str | os.PathLike) -> dict | None:
    """The marker of an lpq output folder; None when there is none."""
    f = Path(folder) / MARKER
    if not f.is_file():
        return None
    try:
        marker = json.loads(f.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise OutputError(f"{f}: the lpq marker is damaged ({e}); remove the folder yourself if it is lpq's") from None
    if not isinstance(marker, dict) or "lpq_output" not in marker:
        raise OutputError(f"{f}: not an lpq marker; remove the folder yourself if it is lpq's")
    return marker


def _write_marker(folder: Path, command: str, fingerprint: str | None, *, files: list[str] | None,
                  foreign: list[str], created: str | None) -> None:
    import lpq

    data = {"lpq_output": MARKER_VERSION, "command": command, "fingerprint": fingerprint,
            "lpq_version": lpq.__version__, "created": created or _now(), "updated": _now(),
            # files: what lpq wrote (null while a run is in progress); foreign: files lpq found there
            "files": files, "foreign": foreign}
    tmp = folder / f".{MARKER}.tmp"
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(folder / MARKER)


def _files(folder: Path) -> set[str]:
    """Every file under `folder` (relative, '/'-separated), without the marker and lpq's transient names;
    a link to a folder counts as one file (it is not followed)."""
    out = set()
    for root, dirs, files in os.walk(folder):
        rel = Path(root).relative_to(folder)
        links = [d for d in dirs if os.path.islink(os.path.join(root, d))]
        dirs[:] = [d for d in dirs if d not in links and not _TRANSIENT.fullmatch(d)]
        for name in files + links:
            if not _TRANSIENT.fullmatch(name) and not (rel == Path(".") and name in (MARKER, f".{MARKER}.tmp")):
                out.add((rel / name).as_posix())
    return out


def _user_files(folder: Path, marker: dict) -> list[str]:
    """Files in a marked folder that lpq did not write. While a run is in progress (or after it was
    killed) lpq's own files are not listed yet; then only the files found there at its start count."""
    present = _files(folder)
    listed = marker.get("files")
    if listed is not None:
        return sorted(present - set(listed))
    return sorted(present & set(marker.get("foreign") or []))


def _holds_no_results(folder: Path, marker: dict) -> bool:
    """A run that stopped before writing anything but its copy of the recipe (a data error found after
    the folder was claimed): nothing there to protect, so a corrected recipe may start over without force."""
    return _files(folder) <= {RECIPE_COPY} and not _user_files(folder, marker)


def _describe(marker: dict, fingerprint: str | None = None) -> str:
    when = f"`{marker.get('command', 'lpq')}`, {marker.get('updated', 'unknown time')}"
    # Without a fingerprint (e.g. export_model) nothing tells whether it was the same recipe.
    return f"an earlier lpq run ({when})" if fingerprint is None else f"another recipe ({when})"


# ---------------------------------------------------------------- the rules

def _plan(target: Path, shown: str, fingerprint: str | None, force: bool, command: str, staged: bool) -> str:
    """What writing `target` means: "new", "adopted" (empty), "continued" (same recipe, in place) or
    "replaced" (the old lpq folder goes); raises OutputError when the rules forbid it."""
    if target.is_symlink() and staged:
        raise OutputError(f"{shown} is a symbolic link; give the folder it points to, or a new folder")
    if target.exists() and not target.is_dir():
        raise OutputError(f"{shown} exists and is not a folder; choose another output folder")
    if not target.exists():
        return "new"
    marker = read_marker(target)
    if marker is None:
        if next(target.iterdir(), None) is not None:
            raise OutputError(f"{shown} is not empty and was not written by lpq (no {MARKER}); lpq never writes "
                              "into or deletes such a folder: choose a new or empty folder")
        if staged and (why := _protected(target)):
            raise OutputError(f"{shown} is {why}; lpq replaces an output folder as a whole, so give a new folder")
        return "adopted"
    same = fingerprint is not None and marker.get("fingerprint") == fingerprint and marker.get("command") == command
    if same and not staged:
        return "continued"
    if not same and not force and not _holds_no_results(target, marker):
        raise OutputError(f"{shown} holds the output of {_describe(marker, fingerprint)}; pass --force to replace it, "
                          "or choose another folder")
    if why := _protected(target):
        raise OutputError(f"{shown} is {why}; lpq never replaces or deletes it, even with --force")
    if user := _user_files(target, marker):
        more = f" and {len(user) - 3} more" if len(user) > 3 else ""
        raise OutputError(f"{shown} holds files lpq did not write ({', '.join(user[:3])}{more}); move them "
                          "out or choose another folder")
    return "replaced"


def check_output(path: str | os.PathLike, *, fingerprint: str | None = None, force: bool = False,
                 command: str = "lpq", staged: bool = False) -> str:
    """Whether `path` may be written, without touching anything: returns "new", "adopted", "continued"
    or "replaced", or raises OutputError with the one-line reason. `staged`: written all at once
    (staged_output) rather than in place (claim_output). A fingerprint of None never matches."""
    target = _target(path)
    _refuse_if_locked(target, str(path))
    return _plan(target, str(path), fingerprint, force, command, staged)


# ---------------------------------------------------------------- the lock

def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid from the holder."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _alive(holder: dict) -> bool:
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    start = holder.get("start")
    return start is None or _start_time(pid) in (None, start)


def _who(holder: dict) -> str:
    if not holder:
        return "details not written yet"
    return (f"pid {holder.get('pid')} on {holder.get('host')}, `{holder.get('command')}`, "
            f"since {holder.get('since')}")


def _read_lock(fd: int) -> dict:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = os.read(fd, 1 << 16)
    try:
        holder = json.loads(raw) if raw.strip() else {}
    except ValueError:
        return {"pid": None, "host": "?", "command": "?", "since": "?"}
    return holder if isinstance(holder, dict) else {}


@dataclass
class _Held:
    fd: int | None          # None: held by an ancestor process (LPQ_HELD_OUTPUTS)
    file: Path
    count: int = 1
    owner: Any = None       # the latest OutputFolder claimed on it: only it updates the marker


_HELD: dict[str, _Held] = {}


def _lock_file(target: Path) -> Path:
    return target.with_name(f".{target.name}.lpq-lock")


def _refuse_if_locked(target: Path, shown: str) -> None:
    """Refuse a folder another live run holds, without taking its lock: "in use" says more than what
    the folder holds so far."""
    key = str(target.resolve())
    if fcntl is None or key in _HELD or key in os.environ.get(HELD_ENV, "").split(os.pathsep):
        return
    try:
        fd = os.open(_lock_file(target), os.O_RDWR)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            raise OutputError(f"{shown} is in use by another lpq run ({_who(_read_lock(fd))}); wait for it to "
                              "finish or stop it") from None
    finally:
        os.close(fd)        # closing also drops a lock this probe took


def _acquire(target: Path, shown: str, command: str) -> str:
    """Lock `target` for this process; returns the key to release it with."""
    key = str(target.resolve())
    if key in _HELD:
        _HELD[key].count += 1
        return key
    if key in os.environ.get(HELD_ENV, "").split(os.pathsep):
        _HELD[key] = _Held(None, _lock_file(target))
        return key
    me = {"pid": os.getpid(), "host": socket.gethostname(), "start": _start_time(os.getpid()), "command": command,
          "since": _now()}
    file = _lock_file(target)
    for _ in range(20):
        fd = os.open(file, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                os.close(fd)
                raise OutputError(f"{file}: cannot lock it ({e.strerror})") from None
            holder = _read_lock(fd)
            os.close(fd)
            raise OutputError(f"{shown} is in use by another lpq run ({_who(holder)}); wait for it to finish "
                              "or stop it") from None
        try:
            current = os.stat(file).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            current = False
        if not current:      # its last holder deleted it between our open and flock: lock the new file
            os.close(fd)
            continue
        holder = _read_lock(fd)
        if holder:           # a holder that ended without releasing it (killed), or an unenforced flock
            if holder.get("host") == me["host"] and holder.get("pid") != me["pid"] and _alive(holder):
                os.close(fd)
                raise OutputError(f"{shown} is in use by another lpq run ({_who(holder)}); wait for it to finish "
                                  "or stop it")
            _say(f"{shown}: taking over the lock left by a run that is no longer running ({_who(holder)})")
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps(me).encode())
        os.fsync(fd)
        _HELD[key] = _Held(fd, file)
        held = [p for p in os.environ.get(HELD_ENV, "").split(os.pathsep) if p]
        os.environ[HELD_ENV] = os.pathsep.join(held + [key])
        return key
    raise OutputError(f"{file}: could not take the lock, it keeps being replaced")


def _release(key: str) -> None:
    held = _HELD.get(key)
    if held is None:
        return
    held.count -= 1
    if held.count > 0:
        return
    del _HELD[key]
    if held.fd is None:
        return
    os.environ[HELD_ENV] = os.pathsep.join(p for p in os.environ.get(HELD_ENV, "").split(os.pathsep)
                                           if p and p != key)
    # Delete while still locked, then unlock: a waiter that opened the old file sees it is gone.
    held.file.unlink(missing_ok=True)
    os.close(held.fd)


@contextmanager
def locked_output(path: str | os.PathLike, *, command: str = "lpq") -> Iterator[Path]:
    """Hold the lock of `path` for the block, e.g. from the start of a command whose writer uses
    staged_output later; the leftovers of a killed run are cleaned up first. Yields the absolute path."""
    target = _target(path)
    _make_parent(target, str(path))
    key = _acquire(target, str(path), command)
    try:
        _clean_leftovers(target, str(path))
        yield target
    finally:
        _release(key)


# ---------------------------------------------------------------- leftovers of killed runs

def _clean_leftovers(target: Path, shown: str) -> None:
    """Remove the staging folders of killed writes of `target`; put back an old folder a killed swap
    moved aside. Called with the lock held, so no live run owns them."""
    found = []
    for p in target.parent.iterdir() if target.parent.is_dir() else ():
        m = _TRANSIENT.fullmatch(p.name)
        if m and m["name"] == target.name and m["what"] and p.is_dir() and not p.is_symlink():
            found.append((m["what"] != "old", p))     # old folders first: one may be restored
    for _, p in sorted(found):
        if p.name.startswith(f".{target.name}.lpq-old-") and not os.path.lexists(target):
            p.rename(target)
            _say(f"{shown}: restored the previous folder from {p.name}, left by a run killed while replacing it")
        else:
            shutil.rmtree(p)
            _say(f"{shown}: removed {p.name}, left by an interrupted run")


# ---------------------------------------------------------------- in place: resumable runs

@dataclass
class OutputFolder:
    """A folder claimed for a whole run. `state`: "new", "adopted", "continued" (the same recipe's
    earlier run is there: resume it) or "replaced" (another recipe's run was deleted, with force);
    "worker" in a non-zero rank of a distributed launch, which leaves the folder to rank 0."""

    path: Path
    state: str
    fingerprint: str | None
    command: str
    _key: str | None = field(default=None, repr=False)
    _foreign: list[str] = field(default_factory=list, repr=False)
    _created: str | None = field(default=None, repr=False)

    def release(self) -> None:
        """Record the files the run wrote in the marker and unlock the folder (idempotent)."""
        if self._key is None:
            return
        key, self._key = self._key, None
        atexit.unregister(self.release)
        held = _HELD.get(key)
        try:
            # A later claim of the same folder in this process (another run of a command) owns the marker.
            if held is not None and held.owner is self and (self.path / MARKER).is_file():
                files = sorted(_files(self.path) - set(self._foreign))
                _write_marker(self.path, self.command, self.fingerprint, files=files, foreign=self._foreign,
                              created=self._created)
        finally:
            _release(key)

    def __enter__(self) -> OutputFolder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _is_worker() -> bool:
    """A non-zero rank of a distributed launch (accelerate, torchrun): rank 0 owns the output folders."""
    return "WORLD_SIZE" in os.environ and os.environ.get("RANK", "0") != "0"


def claim_output(path: str | os.PathLike, *, fingerprint: str | None, force: bool = False,
                 command: str = "lpq") -> OutputFolder:
    """Lock `path` and make it this run's folder, in place (see the module doc for the rules).

    A new or empty folder gets the marker; the same recipe's folder is continued as it is; another
    recipe's folder is emptied first (only with `force`). Held until `release()`, the end of a `with`
    block, or the end of the process."""
    target = _target(path)
    shown = str(path)
    if _is_worker():
        return OutputFolder(target, "worker", fingerprint, command)
    _refuse_if_locked(target, shown)
    _plan(target, shown, fingerprint, force, command, staged=False)     # refuse before creating anything
    _make_parent(target, shown)
    key = _acquire(target, shown, command)
    try:
        _clean_leftovers(target, shown)
        state = _plan(target, shown, fingerprint, force, command, staged=False)
        marker = read_marker(target) if target.is_dir() else None
        if state == "replaced":
            why = "--force" if force else "it holds no results"
            _say(f"{shown}: deleting the output of {_describe(marker or {}, fingerprint)} to start over ({why})")
            for p in list(target.iterdir()):
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
            marker = None
        target.mkdir(exist_ok=True)
        # Files a user put into the folder of an earlier run stay theirs: they are never listed as lpq's.
        foreign = _user_files(target, marker) if marker else []
        created = marker.get("created") if marker else None
        _write_marker(target, command, fingerprint, files=None, foreign=foreign, created=created)
    except BaseException:
        _release(key)
        raise
    folder = OutputFolder(target, state, fingerprint, command, key, foreign, created)
    _HELD[key].owner = folder
    atexit.register(folder.release)
    return folder


# ---------------------------------------------------------------- all at once: final writes

@contextmanager
def staged_output(path: str | os.PathLike, *, fingerprint: str | None = None, force: bool = False,
                  command: str = "lpq") -> Iterator[Path]:
    """Yield an empty staging folder beside `path`; when the block ends normally it becomes `path`
    (with the marker), replacing an old lpq folder only as the rules allow. On any exception
    (KeyboardInterrupt included) the staging folder is deleted and `path` is left as it was."""
    target = _target(path)
    shown = str(path)
    _refuse_if_locked(target, shown)
    _plan(target, shown, fingerprint, force, command, staged=True)
    _make_parent(target, shown)
    key = _acquire(target, shown, command)
    try:
        _clean_leftovers(target, shown)
        _plan(target, shown, fingerprint, force, command, staged=True)
        tag = uuid.uuid4().hex[:8]
        tmp = target.with_name(f".{target.name}.lpq-tmp-{tag}")
        tmp.mkdir()
        try:
            yield tmp
            _write_marker(tmp, command, fingerprint, files=sorted(_files(tmp)), foreign=[], created=None)
            _plan(target, shown, fingerprint, force, command, staged=True)  # nothing else changed it meanwhile
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        old = target.with_name(f".{target.name}.lpq-old-{tag}") if os.path.lexists(target) else None
        if old is not None:
            target.rename(old)
        try:
            tmp.rename(target)
        except BaseException:
            if old is not None:
                old.rename(target)
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if old is not None:
            shutil.rmtree(old)
    finally:
        _release(key)
