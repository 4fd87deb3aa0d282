"""Atomic file writes: a reader, or a run resumed after SIGKILL, sees the old file or the new one, never half.

The recipe is the POSIX one: write a temporary file in the same folder, fsync it, rename it over the target,
then fsync the folder so the rename itself survives a crash.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import stat
import tempfile
from pathlib import Path


class DamagedFileError(ValueError):
    """A file tunegap wrote (or reads as input) that is not what it should be; one line naming the file."""


class SymlinkError(OSError):
    """A path tunegap would write is a symbolic link: writing through it could land anywhere."""


def refuse_symlink(path: str | Path) -> Path:
    """`path`, unless it is a symbolic link (followed, a write would land outside the folder the user gave)."""
    path = Path(path)
    if path.is_symlink():
        raise SymlinkError(f"{path}: is a symbolic link; refusing to write through it")
    return path


def require_regular(path: str | Path, what: str = "file") -> Path:
    """`path` if it is a regular file or a folder; a FIFO, socket or device would block or never end."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except OSError:
        return path  # missing: the caller says so in its own words
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise DamagedFileError(f"{path}: not a regular {what} or folder (a pipe, socket or device); refusing to read it")
    return path


def read_json(path: str | Path, *, kind: type = dict, what: str = "JSON file"):
    """Parse a JSON file of type `kind`; anything else (missing, truncated, too deeply nested, another type)
    is one `DamagedFileError` line naming the file."""
    path = require_regular(path)
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DamagedFileError(f"{path}: missing ({what})") from None
    except RecursionError:
        raise DamagedFileError(f"{path}: not a valid {what}: nested too deeply") from None
    except (OSError, UnicodeDecodeError, ValueError) as err:
        detail = err.strerror if isinstance(err, OSError) and err.strerror else str(err).splitlines()[0]
        raise DamagedFileError(f"{path}: not a valid {what}: {detail}") from None
    if not isinstance(value, kind):
        raise DamagedFileError(f"{path}: not a valid {what}: expected a JSON {_json_type(kind)}, "
                               f"got {_json_type(type(value))}")
    return value


def _json_type(kind: type) -> str:
    return {dict: "object", list: "array", str: "string", int: "number", float: "number", bool: "boolean",
            type(None): "null"}.get(kind, kind.__name__)


def fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = refuse_symlink(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_jsonable) + "\n")


@contextlib.contextmanager
def atomic_dir(path: str | Path):
    """Yield a hidden staging folder beside `path`; on success it replaces `path` whole.

    The old folder is renamed aside first and deleted last, so a kill leaves the old folder or the new
    one (and hidden leftovers, which the next call removes), never a mix of their files.
    """
    path = refuse_symlink(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for leftover in path.parent.glob(f".{path.name}.*"):
        shutil.rmtree(leftover, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield staging
        for f in staging.rglob("*"):
            if f.is_file():
                with open(f, "rb") as handle:
                    os.fsync(handle.fileno())
        aside = path.parent / f".{path.name}.old"
        if path.exists():
            os.replace(path, aside)
        os.replace(staging, path)
        fsync_dir(path.parent)
        shutil.rmtree(aside, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def append_line(path: str | Path, line: str) -> None:
    """Append one line and fsync: metrics.jsonl grows, and a torn last line is skipped by `read_jsonl`.
    O_NOFOLLOW: a planted link in place of the log is refused by the kernel, with no race."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
    except OSError as err:
        if Path(path).is_symlink():
            raise SymlinkError(f"{path}: is a symbolic link; refusing to write through it") from None
        raise err
    with os.fdopen(fd, "a", encoding="utf-8") as f:
        f.write(line.rstrip("\n") + "\n")
        f.flush()
        os.fsync(f.fileno())


def write_figure(fig, path: str | Path, **options) -> Path:
    """A matplotlib figure saved atomically (and never through a symbolic link, which savefig would follow)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format=Path(path).suffix.lstrip(".") or "png", **options)
    atomic_write_bytes(path, buffer.getvalue())
    return Path(path)


def read_jsonl(path: str | Path) -> list[dict]:
    """Read a log this project wrote; a line torn by a kill mid-write is dropped, not fatal. Every row tunegap
    writes is an object, so a row that is not one (`5`, `null`, nested past the parser's depth) is damage and
    dropped the same way: each reader may then rely on `row.get`."""
    rows = []
    p = Path(path)
    if not p.is_file():
        return rows
    for line in p.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _jsonable(obj):
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
