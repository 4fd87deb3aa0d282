"""Load user data (SFT conversations, preference pairs, raw corpora) and reject bad input early.

Every problem becomes a one-line `DataError` ("{path}:{line}: {field}: {problem}") so that a user
with a 100k-line file learns exactly which line to fix instead of reading a traceback from deep
inside training. File-level problems (missing file, empty data set) use line 0 and field "file".

API convention shared by all loaders:

* ``on_error="raise"`` (default): the first bad line raises `DataError`.
* ``on_error="skip"``: bad lines are left out and described in a `LoadReport`; an input with no
  good record left still raises (training on nothing is never what was meant).
* ``report=True``: return ``(records, LoadReport)`` instead of just ``records``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, TypeVar, overload

__all__ = [
    "DataError",
    "LoadReport",
    "SFT_FORMATS",
    "detect_sft_format",
    "is_table",
    "first_record",
    "load_sft",
    "load_preferences",
    "load_corpus",
    "ROLES",
    "CORPUS_SUFFIXES",
]

ROLES = ("system", "user", "assistant")
CORPUS_SUFFIXES = (".txt", ".md")
TABLE_SUFFIXES = (".parquet", ".arrow")
# The SFT layouts users bring: tunegap's own two, TRL's prompt/completion, Alpaca, ShareGPT ("auto" reads the first record)
SFT_FORMATS = ("auto", "messages", "prompt-response", "prompt-completion", "alpaca", "sharegpt")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "model": "assistant", "chatgpt": "assistant", "bing": "assistant", "bard": "assistant"}
DATA_EXTRA = "pip install 'tunegap[data]'"
OnError = Literal["raise", "skip"]
T = TypeVar("T")


def _one_line(text: str) -> str:
    """Keep messages to one line whatever a user put in a key or value."""
    return text.replace("\r", "\\r").replace("\n", "\\n")


class DataError(ValueError):
    """One bad input, described on one line: ``{path}:{line}: {field}: {problem}``.

    `line` is 1-based; 0 means the whole file (not found, empty, unsupported type).
    """

    def __init__(self, path: str | Path, line: int, field: str, problem: str, unit: str = "line") -> None:
        self.path = str(path)
        self.line = int(line)
        self.field = _one_line(field)
        self.problem = _one_line(problem)
        where = f"{self.path}:{self.line}" if unit == "line" else f"{self.path}: {unit} {self.line}"
        super().__init__(f"{where}: {self.field}: {self.problem}")


@dataclass
class LoadReport:
    """What a loader kept and what it skipped, so a 'skip' run is never silently lossy."""

    n_ok: int = 0
    n_skipped: int = 0
    problems: list[str] = field(default_factory=list)


def _short(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _require_fields(value: Any, where: str, keys: tuple[str, ...]) -> dict:
    """`value` as an object holding every one of `keys`, else the line's problem, naming the field."""
    if not isinstance(value, dict):
        raise _LineProblem(where, f"must be an object, got {_type_name(value)}")
    for key in keys:
        if key not in value:
            raise _LineProblem(f"{where}.{key}", "missing field")
    return value


def _check_message(msg: Any, where: str) -> dict[str, str]:
    """One {"role", "content"} message, reduced to those two keys (the SFT and the preference loaders')."""
    _require_fields(msg, where, ("role", "content"))
    role = _check_string(msg["role"], f"{where}.role")
    if role not in ROLES:
        raise _LineProblem(f"{where}.role", f"unknown role {_short(role)}, expected one of {', '.join(ROLES)}")
    return {"role": role, "content": _check_string(msg["content"], f"{where}.content")}


def _type_name(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null",
            int: "number", float: "number"}.get(type(value), type(value).__name__)


class _LineProblem(Exception):
    """Internal: a field-level problem on the line being parsed (the caller adds path and line)."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(field, problem)
        self.field = field
        self.problem = problem


def _check_on_error(on_error: str) -> None:
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', not {on_error!r}")


def _read_bytes(path: Path) -> bytes:
    if not path.exists():
        raise DataError(path, 0, "file", "file not found")
    if path.is_dir():
        raise DataError(path, 0, "file", "is a directory, expected a .jsonl file")
    if not path.is_file():  # a FIFO or a device: reading it would block or never end
        raise DataError(path, 0, "file", "not a regular file (a pipe, socket or device)")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise DataError(path, 0, "file", f"cannot read: {exc.strerror or exc}") from None


def _decode_line(raw: bytes, lineno: int) -> str:
    """Decode one line strictly, so invalid UTF-8 is reported at its own line number."""
    if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]  # a UTF-8 byte-order mark written by some editors
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _LineProblem("line", f"invalid UTF-8 at byte {exc.start}") from None


def _check_string(value: Any, name: str, *, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise _LineProblem(name, f"must be a string, got {_type_name(value)}")
    if not allow_empty and not value.strip():
        raise _LineProblem(name, "empty string")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise _LineProblem(name, "contains an invalid unicode escape (lone surrogate)") from None
    return value


def _parse_json_object(text: str) -> dict[str, Any]:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _LineProblem("json", f"malformed JSON: {exc.msg} at column {exc.colno}") from None
    except RecursionError:
        raise _LineProblem("json", "malformed JSON: nested too deeply") from None
    except ValueError as exc:  # e.g. integer strings over Python's digit limit
        raise _LineProblem("json", f"malformed JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise _LineProblem("json", f"expected a JSON object, got {_type_name(obj)}")
    return obj


def _finish(path: Path, records: list[T], rep: LoadReport, what: str, report: bool
            ) -> list[T] | tuple[list[T], LoadReport]:
    if not records:
        detail = f"{what}" if not rep.n_skipped else f"{what}; all {rep.n_skipped} skipped, first: {rep.problems[0]}"
        raise DataError(path, 0, "file", detail)
    rep.n_ok = len(records)
    return (records, rep) if report else records


def _load_jsonl(path: str | Path, parse: Callable[[dict[str, Any]], T], on_error: str, report: bool,
                what: str) -> list[T] | tuple[list[T], LoadReport]:
    """Shared JSONL walk: per-line decode, blank lines skipped, problems raised or collected."""
    _check_on_error(on_error)
    path = Path(path)
    data = _read_bytes(path)
    records: list[T] = []
    rep = LoadReport()
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        try:
            text = _decode_line(raw.rstrip(b"\r"), lineno)
            if not text.strip():
                continue
            records.append(parse(_parse_json_object(text)))
        except _LineProblem as problem:
            err = DataError(path, lineno, problem.field, problem.problem)
            if on_error == "raise":
                raise err from None
            rep.n_skipped += 1
            rep.problems.append(str(err))
    return _finish(path, records, rep, what, report)


# --------------------------------------------------------------------------- tables (parquet, arrow, save_to_disk)

def _table_files(folder: Path) -> list[Path]:
    """Parquet/arrow files below a folder (hidden entries ignored); in a Hub-style folder with splits, the train
    split's files. A README.md beside them is the data set's card, never data."""
    files = sorted((p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in TABLE_SUFFIXES
                    and not any(part.startswith(".") for part in p.relative_to(folder).parts)),
                   key=lambda p: p.relative_to(folder).as_posix())
    train = [p for p in files if any(part.startswith("train") for part in p.relative_to(folder).parts)]
    return train or files


def is_table(path: str | Path) -> bool:
    """A parquet/arrow file, a `datasets.save_to_disk` folder, or a folder holding parquet/arrow files."""
    path = Path(path)
    if path.is_file():
        return path.suffix.lower() in TABLE_SUFFIXES
    return path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file()
                              or bool(_table_files(path)))


def _import_table_readers(path: Path):
    try:
        import datasets
        import pyarrow
    except ImportError:
        raise DataError(path, 0, "file", f"parquet/arrow data needs the optional 'data' extra: {DATA_EXTRA}") from None
    return datasets, pyarrow


def _read_arrow(path: Path, pa, limit: int | None) -> list[dict[str, Any]]:
    """An .arrow file: the IPC stream format `datasets` writes, or the IPC file (Feather v2) format."""
    import pyarrow.ipc

    with pa.memory_map(str(path)) as source:
        try:
            reader = pyarrow.ipc.open_stream(source)
        except pa.ArrowInvalid:
            source.seek(0)
            reader = pyarrow.ipc.open_file(source)
            return (reader.read_all() if limit is None else reader.get_batch(0)).to_pylist()[:limit]
        return (reader.read_all() if limit is None else reader.read_next_batch()).to_pylist()[:limit]


def _read_parquet(path: Path, limit: int | None) -> list[dict[str, Any]]:
    import pyarrow.parquet

    if limit is None:
        return pyarrow.parquet.read_table(path).to_pylist()
    first = next(pyarrow.parquet.ParquetFile(path).iter_batches(batch_size=limit), None)
    return first.to_pylist() if first is not None else []


def _table_rows(path: Path, limit: int | None = None):
    """(file, rows) pairs, read by `datasets` (save_to_disk folders) or its pyarrow (parquet, arrow); `limit`
    reads only the first rows of each file (enough to tell a layout)."""
    datasets, pa = _import_table_readers(path)
    if path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file()):
        loaded = datasets.load_from_disk(str(path))  # memory-mapped: selecting rows reads only those
        if isinstance(loaded, datasets.DatasetDict):
            loaded = loaded["train"] if "train" in loaded else loaded[next(iter(loaded))]
        rows = loaded if limit is None else loaded.select(range(min(limit, len(loaded))))
        return [(path, rows.to_list())]
    out = []
    for file in [path] if path.is_file() else _table_files(path):
        try:
            rows = _read_parquet(file, limit) if file.suffix.lower() == ".parquet" else _read_arrow(file, pa, limit)
        except (pa.ArrowException, OSError) as err:
            raise DataError(file, 0, "file", f"cannot read as {file.suffix[1:]}: {str(err).splitlines()[0]}") from None
        out.append((file, rows))
    return out


def first_record(path: str | Path) -> dict[str, Any] | None:
    """The first record of a JSONL file or a table, to tell formats apart (None when it is not an object)."""
    path = Path(path)
    if is_table(path):
        for _, rows in _table_rows(path, limit=1):
            if rows:
                return rows[0]
        return None
    with open(path, "rb") as f:
        for raw in f:
            if raw.strip():
                try:
                    first = json.loads(raw)
                except (ValueError, RecursionError):  # deeply nested: the loader names the line
                    return None
                return first if isinstance(first, dict) else None
    return None


def _load_records(path: str | Path, parse: Callable[[dict[str, Any]], T], on_error: str, report: bool,
                  what: str) -> list[T] | tuple[list[T], LoadReport]:
    """JSONL line by line, or a table row by row: the same parser, and problems named by file and line or row."""
    _check_on_error(on_error)
    path = Path(path)
    if not path.exists() or not is_table(path):
        return _load_jsonl(path, parse, on_error, report, what)
    records: list[T] = []
    rep = LoadReport()
    for file, rows in _table_rows(path):
        for number, row in enumerate(rows, start=1):
            try:
                records.append(parse(row))
            except _LineProblem as problem:
                err = DataError(file, number, problem.field, problem.problem, unit="row")
                if on_error == "raise":
                    raise err from None
                rep.n_skipped += 1
                rep.problems.append(str(err))
    return _finish(path, records, rep, what, report)


# --------------------------------------------------------------------------- SFT

def _parse_messages(messages: Any) -> list[dict[str, str]]:
    if not isinstance(messages, list):
        raise _LineProblem("messages", f"must be an array, got {_type_name(messages)}")
    if not messages:
        raise _LineProblem("messages", "empty array")
    out: list[dict[str, str]] = []
    for i, msg in enumerate(messages):
        out.append(_check_message(msg, f"messages[{i}]"))
        if out[-1]["role"] == "system" and i != 0:
            raise _LineProblem(f"messages[{i}].role", "a system message may only come first")
    turns = [m["role"] for m in out if m["role"] != "system"]
    if not turns:
        raise _LineProblem("messages", "no user or assistant message")
    if turns[0] != "user":
        raise _LineProblem("messages", "the conversation must start with a user message (after an optional system)")
    if "assistant" not in turns:
        raise _LineProblem("messages", "no assistant message")
    if out[-1]["role"] != "assistant":
        raise _LineProblem(f"messages[{len(out) - 1}].role", "the last message must be from the assistant")
    return out


def _parse_sft(obj: dict[str, Any]) -> dict[str, Any]:
    pair_keys = {"prompt", "response", "system"}
    if "messages" in obj:
        clash = sorted(pair_keys & obj.keys())
        if clash:
            raise _LineProblem(clash[0], "give either 'messages' or 'prompt'/'response', not both")
        record = {k: v for k, v in obj.items() if k != "messages"}
        return {"messages": _parse_messages(obj["messages"]), **record}
    if "prompt" not in obj and "response" not in obj:
        raise _LineProblem("messages", "missing field (expected 'messages' or 'prompt' and 'response')")
    for key in ("prompt", "response"):
        if key not in obj:
            raise _LineProblem(key, "missing field")
    messages = []
    if "system" in obj:
        messages.append({"role": "system", "content": _check_string(obj["system"], "system")})
    messages.append({"role": "user", "content": _check_string(obj["prompt"], "prompt")})
    messages.append({"role": "assistant", "content": _check_string(obj["response"], "response")})
    extra = {k: v for k, v in obj.items() if k not in pair_keys}
    return {"messages": messages, **extra}


def _parse_completion(obj: dict[str, Any]) -> dict[str, Any]:
    """TRL's prompt-completion: strings, or conversational (a prompt's messages, the completion's messages)."""
    for key in ("prompt", "completion"):
        if key not in obj:
            raise _LineProblem(key, "missing field")
    extra = {k: v for k, v in obj.items() if k not in ("prompt", "completion", "system")}
    if isinstance(obj["prompt"], list) or isinstance(obj["completion"], list):
        for key in ("prompt", "completion"):
            if not isinstance(obj[key], list):
                raise _LineProblem(key, f"must be an array of messages like the other field, got {_type_name(obj[key])}")
        try:
            return {"messages": _parse_messages(obj["prompt"] + obj["completion"]), **extra}
        except _LineProblem as problem:  # name the field as the file spells it
            index = re.match(r"messages\[(\d+)\]", problem.field)
            if index and int(index.group(1)) >= len(obj["prompt"]):
                field = f"completion[{int(index.group(1)) - len(obj['prompt'])}]{problem.field[index.end():]}"
            else:
                field = problem.field.replace("messages", "prompt", 1)
            raise _LineProblem(field, problem.problem) from None
    messages = [{"role": "system", "content": _check_string(obj["system"], "system")}] if "system" in obj else []
    messages.append({"role": "user", "content": _check_string(obj["prompt"], "prompt")})
    messages.append({"role": "assistant", "content": _check_string(obj["completion"], "completion")})
    return {"messages": messages, **extra}


def _parse_alpaca(obj: dict[str, Any]) -> dict[str, Any]:
    """Alpaca: the instruction and its optional input make the user turn (input after a blank line), output the reply."""
    for key in ("instruction", "output"):
        if key not in obj:
            raise _LineProblem(key, "missing field")
    instruction = _check_string(obj["instruction"], "instruction")
    given = obj.get("input")
    given = "" if given is None else _check_string(given, "input", allow_empty=True)
    messages = [{"role": "system", "content": _check_string(obj["system"], "system")}] if obj.get("system") else []
    messages.append({"role": "user", "content": f"{instruction}\n\n{given}" if given.strip() else instruction})
    messages.append({"role": "assistant", "content": _check_string(obj["output"], "output")})
    extra = {k: v for k, v in obj.items() if k not in ("instruction", "input", "output", "system")}
    return {"messages": messages, **extra}


def _parse_sharegpt(obj: dict[str, Any]) -> dict[str, Any]:
    """ShareGPT: `conversations` of {from, value}; human/gpt (and the usual synonyms) become user/assistant."""
    if "conversations" not in obj:
        raise _LineProblem("conversations", "missing field")
    turns = obj["conversations"]
    if not isinstance(turns, list):
        raise _LineProblem("conversations", f"must be an array, got {_type_name(turns)}")
    messages = []
    for i, turn in enumerate(turns):
        where = f"conversations[{i}]"
        _require_fields(turn, where, ("from", "value"))
        speaker = _check_string(turn["from"], f"{where}.from")
        if speaker.lower() not in SHAREGPT_ROLES:
            raise _LineProblem(f"{where}.from", f"unknown speaker {_short(speaker)}, expected one of "
                                                f"{', '.join(SHAREGPT_ROLES)}")
        messages.append({"role": SHAREGPT_ROLES[speaker.lower()], "content": turn["value"]})
    try:
        parsed = _parse_messages(messages)
    except _LineProblem as problem:  # name the field as the file spells it
        field = problem.field.replace("messages", "conversations", 1)
        raise _LineProblem(field.replace(".role", ".from").replace(".content", ".value"), problem.problem) from None
    return {"messages": parsed, **{k: v for k, v in obj.items() if k != "conversations"}}


SFT_PARSERS = {"messages": _parse_sft, "prompt-response": _parse_sft, "prompt-completion": _parse_completion,
               "alpaca": _parse_alpaca, "sharegpt": _parse_sharegpt}


def detect_sft_format(record: Any) -> str:
    """The SFT layout a record is in, from its fields (tunegap's prompt/response when nothing else matches)."""
    if not isinstance(record, dict):
        return "prompt-response"  # its loader then reports the line
    for key, name in (("messages", "messages"), ("conversations", "sharegpt"), ("instruction", "alpaca"),
                      ("completion", "prompt-completion")):
        if key in record:
            return name
    return "prompt-response"


def _sft_parser(format: str, path: Path) -> Callable[[dict[str, Any]], dict[str, Any]]:
    if format not in SFT_FORMATS:
        raise DataError(path, 0, "format", f"unknown format {format!r}, choose from {', '.join(SFT_FORMATS)}")
    if format == "auto":
        first = first_record(path) if path.exists() and (path.is_file() or is_table(path)) else None
        format = detect_sft_format(first)
    return SFT_PARSERS[format]


@overload
def load_sft(path: str | Path, on_error: OnError = ..., report: Literal[False] = ...) -> list[dict[str, Any]]: ...
@overload
def load_sft(path: str | Path, on_error: OnError = ..., *, report: Literal[True]
             ) -> tuple[list[dict[str, Any]], LoadReport]: ...
@overload
def load_sft(path: str | Path, on_error: OnError, report: Literal[True]
             ) -> tuple[list[dict[str, Any]], LoadReport]: ...


def load_sft(path, on_error="raise", report=False, format="auto"):
    """Load SFT conversations from JSONL or a table (parquet, arrow, a `datasets.save_to_disk` folder),
    normalised to ``{"messages": [...], **extra_keys}``.

    Each record is ``{"prompt", "response"[, "system"]}`` (becomes system/user/assistant messages),
    ``{"messages": [{"role", "content"}, ...]}``, TRL's ``{"prompt", "completion"}``, Alpaca's
    ``{"instruction", "input", "output"}`` or ShareGPT's ``{"conversations": [{"from", "value"}, ...]}``;
    `format` names one, or "auto" reads it from the first record. Other top-level keys (e.g. "meta")
    are kept untouched; messages are reduced to role and content. A conversation must start with
    user (after an optional system), contain an assistant message and end with one, since only
    assistant turns carry loss. Returns ``records`` or, with ``report=True``, ``(records, LoadReport)``.
    """
    return _load_records(path, _sft_parser(format, Path(path)), on_error, report, "empty data set (no conversations)")


# --------------------------------------------------------------------------- preferences

def _parse_preference(obj: dict[str, Any]) -> dict[str, Any]:
    for key in ("prompt", "chosen", "rejected"):
        if key not in obj:
            raise _LineProblem(key, "missing field")
        _check_string(obj[key], key)
    if "system" in obj:
        _check_string(obj["system"], "system")
    if obj["chosen"] == obj["rejected"]:
        raise _LineProblem("rejected", "identical to 'chosen' (the pair teaches nothing)")
    return dict(obj)


@overload
def load_preferences(path: str | Path, on_error: OnError = ..., report: Literal[False] = ...
                     ) -> list[dict[str, Any]]: ...
@overload
def load_preferences(path: str | Path, on_error: OnError = ..., *, report: Literal[True]
                     ) -> tuple[list[dict[str, Any]], LoadReport]: ...
@overload
def load_preferences(path: str | Path, on_error: OnError, report: Literal[True]
                     ) -> tuple[list[dict[str, Any]], LoadReport]: ...


def load_preferences(path, on_error="raise", report=False):
    """Load preference pairs ``{"prompt", "chosen", "rejected"[, "system"]}`` from JSONL.

    All three texts must be non-empty strings and chosen must differ from rejected. Extra keys
    are kept. Returns ``records`` or, with ``report=True``, ``(records, LoadReport)``.
    """
    return _load_records(path, _parse_preference, on_error, report, "empty data set (no preference pairs)")


# --------------------------------------------------------------------------- corpus

def _corpus_files(folder: Path) -> list[Path]:
    files = []
    for p in folder.rglob("*"):
        rel = p.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts):
            continue  # .git, editor swap files and the like are never documents
        if p.is_file() and p.suffix.lower() in CORPUS_SUFFIXES:
            files.append(p)
    return sorted(files, key=lambda p: p.relative_to(folder).as_posix())


def _read_document(path: Path) -> str:
    data = _read_bytes(path)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DataError(path, line, "text", f"invalid UTF-8 at byte {exc.start}") from None
    if not text.strip():
        raise DataError(path, 0, "text", "empty document")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # pragma: no cover - a strict decode cannot produce surrogates
        raise DataError(path, 0, "text", "contains a lone surrogate") from None
    return text


def _parse_corpus_line(obj: dict[str, Any]) -> str:
    if "text" not in obj:
        raise _LineProblem("text", "missing field")
    return _check_string(obj["text"], "text")


@overload
def load_corpus(path: str | Path, on_error: OnError = ..., report: Literal[False] = ...) -> list[str]: ...
@overload
def load_corpus(path: str | Path, on_error: OnError = ..., *, report: Literal[True]
                ) -> tuple[list[str], LoadReport]: ...
@overload
def load_corpus(path: str | Path, on_error: OnError, report: Literal[True]) -> tuple[list[str], LoadReport]: ...


def load_corpus(path, on_error="raise", report=False):
    """Load raw documents for continued pre-training.

    ``path`` may be a .txt/.md file (one document), a folder (every .txt/.md below it, sorted by
    relative path, hidden entries ignored, one document per file) or a .jsonl file with a
    non-empty string "text" per line. Empty documents count as bad input. Returns ``documents``
    or, with ``report=True``, ``(documents, LoadReport)``.
    """
    _check_on_error(on_error)
    path = Path(path)
    if not path.exists():
        raise DataError(path, 0, "file", "file not found")
    if (path.is_file() and path.suffix.lower() == ".jsonl") or is_table(path):
        return _load_records(path, _parse_corpus_line, on_error, report, "empty corpus (no documents)")
    if path.is_file():
        if path.suffix.lower() not in CORPUS_SUFFIXES:
            raise DataError(path, 0, "file", f"unsupported file type {path.suffix or '(none)'!r}, "
                                             "expected .txt, .md, .jsonl or a folder")
        files = [path]
    else:
        files = _corpus_files(path)
        if not files:
            raise DataError(path, 0, "file", "empty corpus (no .txt or .md files in the folder)")
    docs: list[str] = []
    rep = LoadReport()
    for file in files:
        try:
            docs.append(_read_document(file))
        except DataError as err:
            if on_error == "raise":
                raise
            rep.n_skipped += 1
            rep.problems.append(str(err))
    return _finish(path, docs, rep, "empty corpus (no documents)", report)
