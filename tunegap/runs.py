"""The runs folder: one sub-folder per run, and a SQLite index that `tunegap runs` lists.

SQLite in WAL mode with a busy timeout lets several runs finish into the same folder at once;
every query is parameterised.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from pathlib import Path

INDEX = "index.sqlite"

_COLUMNS = ("name", "status", "method", "model", "tokens", "steps", "params_trainable", "params_total",
            "flops_total", "wall_time_s", "eval_loss", "ledger_path", "updated_at")


# Settings that never change what a run computes: where it is written, how it is shown, how many threads
# run it, whether a pickle may be read, whether layers are compiled (a resumed run may switch any of them).
RESULT_NEUTRAL = ("resume", "progress", "name", "runs_dir", "threads", "allow_pickle", "compile", "log")


class RunPathError(ValueError):
    pass


def run_identity(config: dict) -> str:
    """The one identity of a run's settings: equal for runs that compute the same thing. Resume refuses a
    checkpoint of another identity; `trainer.run_or_reuse` reuses a finished run of the same one."""
    stable = {k: v for k, v in sorted(config.items()) if k not in RESULT_NEUTRAL}
    return hashlib.sha256(json.dumps(stable, sort_keys=True).encode()).hexdigest()[:16]


def changed_settings(old: dict, new: dict) -> list[str]:
    """The settings that make `new` another run than `old` (for the message that refuses a resume)."""
    return sorted(k for k in new if k in old and old[k] != new[k] and k not in RESULT_NEUTRAL)


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
    con = sqlite3.connect(runs_dir / INDEX, timeout=30.0)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA busy_timeout=30000")
    con.execute(f"CREATE TABLE IF NOT EXISTS runs ({', '.join(c + (' PRIMARY KEY' if c == 'name' else '') for c in _COLUMNS)})")
    return con


def index_run(runs_dir: str | Path, ledger: dict, ledger_path: Path) -> None:
    costs = ledger["costs"]
    row = {
        "name": ledger["run"], "status": ledger["status"], "method": ledger["method"]["name"],
        "model": ledger["config"]["model"], "tokens": costs["tokens"]["value"],
        "steps": costs["optimizer_steps"]["value"], "params_trainable": costs["params_trainable"]["value"],
        "params_total": costs["params_total"]["value"], "flops_total": costs["flops_total"]["value"],
        "wall_time_s": costs["wall_time_s"]["value"], "eval_loss": ledger.get("metrics", {}).get("eval_loss"),
        "ledger_path": str(ledger_path), "updated_at": time.time(),
    }
    for attempt in range(10):
        try:
            con = _connect(Path(runs_dir))
            try:
                with con:  # one transaction, committed or rolled back; `with` does not close it
                    con.execute(f"INSERT OR REPLACE INTO runs ({', '.join(_COLUMNS)}) "
                                f"VALUES ({', '.join('?' * len(_COLUMNS))})", [row[c] for c in _COLUMNS])
            finally:
                con.close()
            return
        except sqlite3.OperationalError:
            if attempt == 9:
                raise
            time.sleep(0.05 * (attempt + 1))


def list_runs(runs_dir: str | Path) -> list[dict]:
    path = Path(runs_dir) / INDEX
    if not path.is_file():
        return []
    for attempt in range(10):  # the same retries as writers: another process may be creating the index
        try:
            con = _connect(Path(runs_dir))
            try:
                cur = con.execute(f"SELECT {', '.join(_COLUMNS)} FROM runs ORDER BY updated_at")
                return [dict(zip(_COLUMNS, r)) for r in cur.fetchall()]
            finally:
                con.close()
        except sqlite3.OperationalError:
            if attempt == 9:
                raise
            time.sleep(0.05 * (attempt + 1))
    return []


def load_ledger(run: str | Path, runs_dir: str | Path = "runs") -> dict:
    """A run by folder path or by name in `runs_dir`."""
    folder = Path(run)
    if not (folder / "ledger.json").is_file():
        folder = run_folder(runs_dir, str(run))
    path = folder / "ledger.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no ledger (is this a tunegap run folder?)")
    return json.loads(path.read_text())


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
    body = [[r["name"], r["status"], r["method"], Path(str(r["model"])).name, human(r["tokens"]), str(r["steps"]),
             human(r["params_trainable"]), human(r["flops_total"]), f"{r['wall_time_s']:.1f} s" if r["wall_time_s"] else "-",
             f"{r['eval_loss']:.4f}" if r["eval_loss"] is not None else "-"] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(header, *body)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*header), *(fmt.format(*row) for row in body)])
