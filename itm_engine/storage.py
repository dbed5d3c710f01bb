"""Crash-safe bookkeeping of output folders, shared by `itm-eval` and `itm-train`.

- `output_file`: the files of an output given as a path without suffix (`--out runs/sb-7.5` ->
  `runs/sb-7.5.json`, `.md`, ...).
- `atomic_write_text`: a metadata file is replaced whole or not at all (a temporary file in the
  same folder, flushed and fsynced, then renamed over the target), so a crash or a full disk
  never leaves it empty or torn.
- `read_json` / `read_jsonl`: parse errors name the file (`CorruptFile`, a ValueError).
- `folder_lock`: one writer per output folder (`flock` on `FOLDER/.lock`; the kernel drops the
  lock when its process dies, so `kill -9` and `--resume` still work).
- `report_failure`: how a command ends on a refusal, bad input or a full disk (ENOSPC / EDQUOT):
  a message and an exit code instead of a traceback.
- `fingerprint` / `fingerprint_changes`: sizes and modification times of the files a run read,
  to refuse resuming scores made from different data (stat only: cheap for 100k images), and
  `recording_reads` to learn which files under a folder a piece of code opened.
"""
from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import sys
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

LOCK_FILE = ".lock"
DISK_FULL = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded"}


class CorruptFile(ValueError):
    """A metadata file that does not parse (torn by a crash, emptied by a full disk); the message names it."""


class FolderLocked(RuntimeError):
    """Another process holds the output folder's lock; the message names the folder."""


OUTPUT_SUFFIXES = (".json", ".md", ".png")


def output_file(stem: str | os.PathLike, suffix: str) -> Path:
    """The file of suffix `suffix` (".json") of an output given as a path without suffix: `suffix`
    appended to the name, which may hold dots (`runs/sb-7.5` -> `runs/sb-7.5.json`, where
    `Path.with_suffix` would cut the name at its last dot). A name already ending in one of
    `OUTPUT_SUFFIXES` (`runs/report.json`) has that suffix replaced, so it names the same outputs."""
    stem = Path(stem)
    if stem.suffix in OUTPUT_SUFFIXES:
        stem = stem.with_suffix("")
    return stem.with_name(stem.name + suffix)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Replace `path` by `text` atomically: a reader (or a run after a crash) sees the old file or
    the new one, never a mix. The temporary file is removed when the write fails."""
    path = Path(path)
    handle = tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", suffix=".tmp",
                                         delete=False, encoding="utf-8")
    try:
        with handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(handle.name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(handle.name)
        raise
    _fsync_folder(path.parent)  # the rename itself survives a power cut


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems do not fsync folders; the rename has happened either way
        pass
    finally:
        os.close(fd)


def read_json(path: str | os.PathLike, hint: str = "delete it or the folder to start over") -> Any:
    """The JSON value stored in `path`. FileNotFoundError when it is missing; CorruptFile naming
    the file (and `hint`, what to do about it) when it is empty or does not parse."""
    path = Path(path)
    data = path.read_bytes()
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        reason = "empty file" if not data.strip() else str(err)
        raise CorruptFile(f"{path} is not valid JSON ({reason}): {hint}") from None


def read_jsonl(path: str | os.PathLike) -> list[Any]:
    """The rows of a JSON-lines file, skipping lines that do not parse (a row torn by a crash)."""
    rows = []
    for line in Path(path).read_bytes().splitlines():
        try:
            rows.append(json.loads(line))
        except (UnicodeDecodeError, json.JSONDecodeError):
            continue
    return rows


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, command: str, enabled: bool = True) -> Iterator[None]:
    """Hold an exclusive lock on output folder `folder` (created if needed) for the `with` block.

    Non-blocking: FolderLocked when another process holds it. The lock file records the holder's
    pid and `command` for that message. `enabled` False (the non-main processes of one
    distributed run, which share the main process's lock) makes this a no-op. On a filesystem
    without `flock` support the block runs unlocked, with a warning."""
    if not enabled:
        yield
        return
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
            raise FolderLocked(f"{folder} is in use by another process ({holder or 'unknown'}): wait for it to "
                               "finish, stop it, or choose another output folder") from None
        except OSError as err:
            if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP):
                raise
            warnings.warn(f"cannot lock {folder} ({err.strerror}): make sure no other process writes to it",
                          stacklevel=3)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{command}, pid {os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the last descriptor releases the lock


def disk_full_message(err: BaseException, folder: str | os.PathLike) -> str | None:
    """For an error caused (directly or through its chain) by a full disk or quota (ENOSPC,
    EDQUOT): what the command should say, naming `folder`; else None."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in DISK_FULL:
            where = f" ({err.filename})" if err.filename else ""
            return (f"{DISK_FULL[err.errno]} while writing to {folder}{where}: free some space, then run the same "
                    "command with --resume to continue where it stopped")
        err = err.__cause__ or err.__context__
    return None


def report_failure(command: str, err: Exception, folder: str | os.PathLike) -> int | None:
    """How a resumable command ends on `err` without a traceback: prints "COMMAND: error: ..." and
    returns the exit code, 1 for a full disk (`disk_full_message`, naming output folder `folder`),
    2 for a refusal or bad input (ValueError, including CorruptFile; a missing file; an existing
    run; a locked folder); None for any other error, which the command re-raises."""
    message = disk_full_message(err, folder)
    code = 1
    if message is None and isinstance(err, (ValueError, FileNotFoundError, FileExistsError, FolderLocked)):
        message, code = str(err), 2
    if message is None:
        return None
    print(f"{command}: error: {message}", file=sys.stderr)
    return code


# -- fingerprints ----------------------------------------------------------------------------


def fingerprint(files: Iterable[str | os.PathLike], folder: str | os.PathLike | None = None) -> dict:
    """{name: [size, mtime_ns]} of `files` (one stat each, no reading), named relative to
    `folder` when inside it, else by their absolute path. A missing file is left out (a
    comparison then reports it as removed)."""
    base = Path(folder).absolute() if folder is not None else None
    record = {}
    for file in files:
        path = Path(file).absolute()
        try:
            stat = path.stat()
        except FileNotFoundError:
            continue
        name = path.relative_to(base).as_posix() if base is not None and path.is_relative_to(base) else str(path)
        record[name] = [stat.st_size, stat.st_mtime_ns]
    return record


def fingerprint_changes(stored: Mapping[str, Mapping[str, list]], current: Mapping[str, Mapping[str, list]]) -> list:
    """What differs between two {source: fingerprint} records, one line per file, sorted:
    "examples.json changed (size 123 -> 456)", "model: unet/x.safetensors removed", ..."""
    changes = []
    for source in sorted(stored.keys() | current.keys()):
        before, after = stored.get(source, {}), current.get(source, {})
        prefix = "" if source == "data" else f"{source}: "
        for name in sorted(before.keys() | after.keys()):
            old, new = before.get(name), after.get(name)
            if old is None:
                changes.append(f"{prefix}{name} added")
            elif new is None:
                changes.append(f"{prefix}{name} removed")
            elif list(old) != list(new):
                what = (f"size {old[0]} -> {new[0]}" if old[0] != new[0]
                        else f"modified {_when(old[1])} -> {_when(new[1])}")
                changes.append(f"{prefix}{name} changed ({what})")
    return changes


def _when(mtime_ns: int) -> str:
    return datetime.datetime.fromtimestamp(mtime_ns / 1e9).isoformat(sep=" ", timespec="milliseconds")


# -- which files a piece of code reads -------------------------------------------------------

_recorders: list[tuple[tuple[Path, ...], set[str]]] = []
_recorders_lock = threading.RLock()  # re-entrant: an audited call inside the hook must not deadlock
_hook_installed = False


def _opened(event: str, args: tuple) -> None:
    """Audit hook: note files opened for reading under a watched folder while recording."""
    if event != "open" or not _recorders or not isinstance(args[0], (str, bytes, os.PathLike)):
        return
    mode, flags = args[1], args[2]
    writing = any(c in mode for c in "wax+") if isinstance(mode, str) else (flags or 0) & (os.O_WRONLY | os.O_RDWR)
    if writing:
        return
    try:
        path = Path(os.path.abspath(os.fsdecode(args[0])))
    except (TypeError, ValueError):  # a hook must never make an open fail
        return
    with _recorders_lock:
        for watched, found in _recorders:
            if any(path.is_relative_to(w) for w in watched):
                found.add(str(path))


@contextlib.contextmanager
def recording_reads(*watched: str | os.PathLike) -> Iterator[set[str]]:
    """Collect, into the set yielded, the files (absolute paths) under the `watched` folders (or
    equal to a watched file) that this process opens for reading inside the `with` block.

    Uses a Python audit hook ("open" events: `open`, `io.open`, `os.open`, so also Path.read_text,
    zipfile, csv, PIL), installed once and idle outside a recording."""
    global _hook_installed
    if not _hook_installed:
        sys.addaudithook(_opened)
        _hook_installed = True
    entry = (tuple(Path(os.path.abspath(w)) for w in watched), set())
    with _recorders_lock:
        _recorders.append(entry)
    try:
        yield entry[1]
    finally:
        with _recorders_lock:
            _recorders[:] = [e for e in _recorders if e is not entry]
