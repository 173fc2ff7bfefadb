"""Low-level file I/O shared by every layer (standard library only): :func:`atomic_write` for
files that must never be seen half-written, :class:`AppendFile` for files that grow, and
:func:`truncate_file` to cut them back when a run resumes after a crash.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import stat
import tempfile
from pathlib import Path
from typing import IO, Any, Callable, Iterable, List, Optional, Sequence, Union

__all__ = ["PathLike", "atomic_write", "atomic_save_bytes", "atomic_write_text", "atomic_write_json",
           "AppendFile", "append_text", "append_tsv", "drop_tsv_rows", "truncate_file"]

PathLike = Union[str, "os.PathLike[str]"]


def _umask() -> int:
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: PathLike, write_fn: Callable[[IO[bytes]], None]) -> Path:
    """Writes ``path`` atomically and returns it as a Path: ``write_fn(f)`` fills a temporary
    binary file in the same folder, which is fsync'ed and ``os.replace``'d over ``path``.
    Missing parent folders are created and a killed writer's leftover temporary files removed.
    The file keeps the mode of the file it replaces (new: ``0o666 & ~umask``). If ``write_fn``
    raises, ``path`` is left as it was."""
    path = Path(path)
    directory = path.parent
    directory.mkdir(parents=True, exist_ok=True)
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        mode = 0o666 & ~_umask()
    # a process killed inside an earlier write of this file (SIGKILL skips the cleanup below)
    # leaves its temporary file behind; each file has one writer, so any such leftover is stale
    for stale in directory.glob(f".{glob.escape(path.name)}.*.tmp"):
        with contextlib.suppress(FileNotFoundError):
            stale.unlink()
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)
    return path


def atomic_save_bytes(path: PathLike, data: bytes) -> Path:
    """Atomically write ``data`` to ``path`` (see :func:`atomic_write`)."""
    data = bytes(data)
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Atomically write ``text`` to ``path`` (see :func:`atomic_write`)."""
    return atomic_save_bytes(path, text.encode(encoding))


def atomic_write_json(path: PathLike, obj: Any, *, indent: Optional[int] = 2,
                      sort_keys: bool = False) -> Path:
    """Atomically write ``obj`` as JSON (plus a final newline). ``obj`` is serialised
    before the file is touched, so a non-serialisable object leaves ``path`` unchanged."""
    return atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=sort_keys) + "\n")


def append_tsv(path: PathLike, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """Appends ``rows`` to the tab-separated run log ``path`` (each value written with ``str``),
    after the header line ``columns`` when the file is new. The file is rewritten atomically, so
    a crash never leaves half a row."""
    path = Path(path)
    old = path.read_text() if path.exists() else "\t".join(columns) + "\n"
    if old and not old.endswith("\n"):
        old += "\n"
    atomic_write_text(path, old + "".join("\t".join(str(value) for value in row) + "\n" for row in rows))


def drop_tsv_rows(path: PathLike, drop: Callable[[List[str]], bool]) -> None:
    """Removes the rows below the header of the run log ``path`` for which ``drop(fields)`` is
    true; nothing is written when the file is missing or no row is dropped."""
    path = Path(path)
    if not path.exists():
        return
    lines = path.read_text().splitlines()
    kept = lines[:1] + [line for line in lines[1:] if not drop(line.split("\t"))]
    if len(kept) != len(lines):
        atomic_write_text(path, "\n".join(kept) + "\n")


def truncate_file(path: PathLike, size: int) -> None:
    """Cuts ``path`` to its first ``size`` bytes (a no-op when it is already shorter or missing)."""
    path = Path(path)
    if size < 0:
        raise ValueError(f"size must be >= 0, got {size}")
    with contextlib.suppress(FileNotFoundError):
        if path.stat().st_size > size:
            with open(path, "r+b") as f:
                f.truncate(size)
                f.flush()
                os.fsync(f.fileno())


def append_text(path: PathLike, text: str, *, fsync: bool = True, encoding: str = "utf-8") -> None:
    """Appends ``text`` to ``path`` (created if missing); with ``fsync``, durable on return."""
    with open(path, "a", encoding=encoding) as f:
        f.write(text)
        f.flush()
        if fsync:
            os.fsync(f.fileno())


class AppendFile:
    """A binary file that only grows: ``append(data)`` writes and flushes; ``close()`` fsyncs.
    The file is opened (created) on the first append."""

    def __init__(self, path: PathLike):
        self.path = Path(path)
        self._f: Optional[IO[bytes]] = None

    def append(self, data: bytes) -> None:
        if self._f is None:
            self._f = open(self.path, "ab")
        self._f.write(data)
        self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            os.fsync(self._f.fileno())
            self._f.close()
            self._f = None
