"""The runs folder: one sub-folder per run, and a SQLite index that `tunegap runs` lists.

SQLite in WAL mode with a busy timeout lets several runs finish into the same folder at once;
every query is parameterised. The index is a cache of the run folders' ledgers: a damaged one is moved
aside and rebuilt from them (`tunegap runs --rebuild` does it on demand), and runs it does not hold yet
(running, interrupted, failed) are listed from their folders.
"""

from __future__ import annotations

import os
import re
import sqlite3
import sys
import time
from pathlib import Path

from .io import DamagedFileError, read_json, refuse_symlink

INDEX = "index.sqlite"
SIDECARS = ("", "-wal", "-shm", "-journal")  # SQLite writes these beside the index: none may be a link
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # the one rule for --name and every default name

_COLUMNS = ("name", "status", "method", "model", "tokens", "steps", "params_trainable", "params_total",
            "flops_total", "wall_time_s", "eval_loss", "ledger_path", "updated_at")


# Settings that never change what a run computes: where it is written, how it is shown, how many threads
# run it, whether a pickle may be read, whether layers are compiled (a resumed run may switch any of them).
class RunPathError(ValueError):
    pass


class RunIndexError(RuntimeError):
    """The runs index could not be written (a full disk, say); the run itself is whole and `tunegap runs
    --rebuild` adds it later."""


def valid_run_name(name: str) -> bool:
    return bool(RUN_NAME.fullmatch(name))


def default_run_name(*parts: str) -> str:
    """A run name built from `parts` (method, a model folder's name, a time stamp) that passes the --name rule:
    a folder called `<img src=x>` or holding a newline must not become a run folder of that name."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", "-".join(parts))
    name = re.sub(r"^[^A-Za-z0-9]+", "", name)[:128].rstrip("-") or "run"
    assert valid_run_name(name), name
    return name


def run_folder(runs_dir: str | Path, name: str) -> Path:
    """The folder of run `name`, refusing any name that would land outside `runs_dir` (.., /, symlinks)."""
    if "\x00" in str(runs_dir) or "\x00" in name:
        raise RunPathError(f"run name {name!r}: contains a NUL character")
    root = Path(runs_dir).resolve()
    if not name or name in (".", "..") or "/" in name or "\\" in name or name.startswith("."):
        raise RunPathError(f"run name {name!r}: must be a plain folder name inside {root}")
    folder = root / name
    if folder.is_symlink():
        raise RunPathError(f"{folder}: is a symbolic link; refusing to write through it")
    if folder.resolve().parent != root:
        raise RunPathError(f"run name {name!r}: resolves outside {root}")
    # A planted link inside the run (checkpoints -> /elsewhere, metrics.jsonl -> ~/.bashrc) would make
    # tunegap write, append or delete outside the runs folder: refuse the run instead.
    for child in (*_children(folder), *_children(folder / "checkpoints")):
        if child.is_symlink():
            raise RunPathError(f"{child}: is a symbolic link; a run folder must hold only real files")
    return folder


def _children(folder: Path) -> list[Path]:
    return list(folder.iterdir()) if folder.is_dir() and not folder.is_symlink() else []


def _connect(runs_dir: Path) -> sqlite3.Connection:
    runs_dir.mkdir(parents=True, exist_ok=True)
    for suffix in SIDECARS:  # sqlite3 follows links: a planted one would put a database at its target
        refuse_symlink(runs_dir / f"{INDEX}{suffix}")
    con = sqlite3.connect(runs_dir / INDEX, timeout=30.0)
    try:
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("PRAGMA busy_timeout=30000")
        con.execute(f"CREATE TABLE IF NOT EXISTS runs ({', '.join(c + (' PRIMARY KEY' if c == 'name' else '') for c in _COLUMNS)})")
    except BaseException:
        con.close()
        raise
    return con


def _busy(err: sqlite3.Error) -> bool:
    """Another process holds the database: worth a retry (a full disk or a damaged file is not)."""
    return isinstance(err, sqlite3.OperationalError) and ("locked" in str(err) or "busy" in str(err))


def _with_index(runs_dir: Path, work):
    """`work(connection)` with the writers' retries; a file that is not a database is moved aside and the
    index rebuilt from the run folders first (it is a cache of their ledgers)."""
    for attempt in range(10):
        try:
            con = _connect(runs_dir)
            try:
                with con:  # one transaction, committed or rolled back; `with` does not close it
                    return work(con)
            finally:
                con.close()
        except sqlite3.Error as err:
            if _busy(err) and attempt < 9:
                time.sleep(0.05 * (attempt + 1))
                continue
            if isinstance(err, sqlite3.OperationalError) or attempt > 0:
                raise RunIndexError(f"{runs_dir / INDEX}: {str(err).splitlines()[0]}; the run folders are whole, "
                                    "`tunegap runs --rebuild` restores the index") from None
            _set_aside(runs_dir, err)
    raise RunIndexError(f"{runs_dir / INDEX}: still busy after 10 tries")


def _set_aside(runs_dir: Path, err: Exception) -> None:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for suffix in SIDECARS:
        path = runs_dir / f"{INDEX}{suffix}"
        if path.exists():
            os.replace(path, runs_dir / f".{INDEX}{suffix}.damaged-{stamp}")
    print(f"tunegap: {runs_dir / INDEX}: damaged ({str(err).splitlines()[0]}); moved aside as "
          f".{INDEX}.damaged-{stamp} and rebuilt from the run folders", file=sys.stderr, flush=True)
    rebuild_index(runs_dir)


def _row(ledger: dict, ledger_path: Path) -> dict:
    costs = ledger["costs"]
    return {
        "name": ledger["run"], "status": ledger["status"], "method": ledger["method"]["name"],
        "model": ledger["config"]["model"], "tokens": costs["tokens"]["value"],
        "steps": costs["optimizer_steps"]["value"], "params_trainable": costs["params_trainable"]["value"],
        "params_total": costs["params_total"]["value"], "flops_total": costs["flops_total"]["value"],
        "wall_time_s": costs["wall_time_s"]["value"], "eval_loss": ledger.get("metrics", {}).get("eval_loss"),
        "ledger_path": str(ledger_path), "updated_at": time.time(),
    }


def _insert(con: sqlite3.Connection, row: dict) -> None:
    con.execute(f"INSERT OR REPLACE INTO runs ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})",
                [row[c] for c in _COLUMNS])


def index_run(runs_dir: str | Path, ledger: dict, ledger_path: Path) -> None:
    row = _row(ledger, ledger_path)
    _with_index(Path(runs_dir), lambda con: _insert(con, row))


def rebuild_index(runs_dir: str | Path) -> int:
    """Re-create the index from every run folder's ledger (finished or failed runs: the ones it holds);
    returns how many rows it now has. A folder whose ledger is unreadable is left out, with a line saying so."""
    runs_dir = Path(runs_dir)
    rows = []
    for folder, ledger in _run_folders(runs_dir):
        if ledger is not None and ledger.get("status") != "running":
            try:
                rows.append(_row(ledger, folder / "ledger.json"))
            except (KeyError, TypeError, AttributeError):
                print(f"tunegap: {folder / 'ledger.json'}: not a tunegap ledger; left out of the index",
                      file=sys.stderr, flush=True)

    def replace_all(con):
        con.execute("DELETE FROM runs")
        for row in rows:
            _insert(con, row)
        return len(rows)

    return _with_index(runs_dir, replace_all)


def _run_folders(runs_dir: Path):
    """(folder, ledger or None) for each run folder in `runs_dir`: a real folder with a valid name and a
    config.json. Links and odd names are skipped, never followed."""
    if not runs_dir.is_dir():
        return
    for folder in sorted(runs_dir.iterdir()):
        if folder.is_symlink() or not folder.is_dir() or not valid_run_name(folder.name) \
                or not (folder / "config.json").is_file():
            continue
        try:
            ledger = read_json(folder / "ledger.json", what="run ledger") if (folder / "ledger.json").exists() \
                else None
        except DamagedFileError as err:
            print(f"tunegap: {err}", file=sys.stderr, flush=True)
            ledger = None
        yield folder, ledger


def list_runs(runs_dir: str | Path) -> list[dict]:
    """Every run: the index's rows (finished and failed runs), then the folders it does not hold yet, with
    their status read from the folder: running (its lock is held), interrupted (killed or stopped) or the
    ledger's own."""
    runs_dir = Path(runs_dir)
    rows = []
    if (runs_dir / INDEX).exists() or (runs_dir / INDEX).is_symlink():
        rows = _with_index(runs_dir, lambda con: [dict(zip(_COLUMNS, r)) for r in con.execute(
            f"SELECT {', '.join(_COLUMNS)} FROM runs ORDER BY updated_at").fetchall()])
    indexed = {r["name"] for r in rows}
    for folder, ledger in _run_folders(runs_dir):
        if folder.name in indexed:
            continue
        rows.append(_folder_row(folder, ledger))
    return rows


def _folder_row(folder: Path, ledger: dict | None) -> dict:
    """A run the index does not hold: what its ledger (written at each checkpoint) or config says."""
    row = dict.fromkeys(_COLUMNS)
    row.update(name=folder.name, ledger_path=str(folder / "ledger.json"))
    try:
        config = read_json(folder / "config.json", what="run config")
        row.update(method=config.get("method"), model=config.get("model"))
    except DamagedFileError:
        pass
    status = (ledger or {}).get("status", "running")
    if ledger is not None:
        try:
            row.update({k: v for k, v in _row(ledger, folder / "ledger.json").items() if k not in ("name", "status")})
        except (KeyError, TypeError, AttributeError):
            status = "damaged ledger"
    row["status"] = "running" if is_locked(folder) else ("interrupted" if status == "running" else status)
    return row


def is_locked(folder: Path) -> bool:
    """Whether a trainer holds the run's lock now (flock, released by the kernel when its holder dies).
    A shared, non-blocking probe: it never waits, and holds the lock only for the instant it asks."""
    try:
        import fcntl
    except ImportError:
        return False
    lock = folder / ".lock"
    if not lock.is_file() or lock.is_symlink():
        return False
    with open(lock, "rb") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
    return False


def load_ledger(run: str | Path, runs_dir: str | Path = "runs") -> dict:
    """A run by folder path or by name in `runs_dir`."""
    folder = Path(run)
    if not (folder / "ledger.json").is_file():
        folder = run_folder(runs_dir, str(run))
    path = folder / "ledger.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no ledger (is this a tunegap run folder?)")
    return read_json(path, what="run ledger")


def printable(value) -> str:
    """One table cell: control characters (a newline in a name would break the table) shown escaped."""
    text = "-" if value is None else str(value)
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def format_runs_table(rows: list[dict]) -> str:
    def human(v, unit=""):
        if v is None:
            return "-"
        for scale, p in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
            if abs(v) >= scale:
                return f"{v / scale:.3g}{p}{unit}"
        return f"{v:.3g}{unit}" if isinstance(v, float) else f"{v}{unit}"

    header = ["run", "status", "method", "model", "tokens", "steps", "trainable", "FLOPs(formula)",
              "wall(measured)", "eval loss"]
    def number(v, text) -> str:
        return text(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else "-"

    body = [[printable(r["name"]), printable(r["status"]), printable(r["method"]),
             printable(Path(str(r["model"])).name if r["model"] else "-"), number(r["tokens"], human),
             number(r["steps"], str), number(r["params_trainable"], human), number(r["flops_total"], human),
             number(r["wall_time_s"], lambda v: f"{v:.1f} s"), number(r["eval_loss"], lambda v: f"{v:.4f}")]
            for r in rows]
    widths = [max(len(x) for x in col) for col in zip(header, *body)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*header), *(fmt.format(*row) for row in body)])
