"""From `--data` to tokenised examples: the shipped support task, a user's SFT JSONL, or a text corpus."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from .loaders import CORPUS_SUFFIXES, DataError, first_record, is_table, load_corpus, load_sft
from .render import Example, tokenize_corpus, tokenize_sft
from .tasks import shipped

SUPPORT = "support"


@dataclass
class Prepared:
    kind: str  # "sft" or "corpus"
    train: list[Example]
    eval: list[Example]
    eval_records: list[dict]  # untokenised held-out conversations, for generation and task metrics
    stats: dict = field(default_factory=dict)
    validation: list[Example] = field(default_factory=list)  # for choosing hyper-parameters (`--val-examples`)


def data_kind(path: str) -> str:
    """'sft' or 'corpus', from the extension or, for JSONL and tables (parquet, arrow, a Hub-style folder of
    them, a `datasets.save_to_disk` folder), from the first record's fields."""
    if shipped(path):
        return "sft"
    p = Path(path)
    if not p.exists():
        raise DataError(path, 0, "file", "no such file or folder (or 'support' or 'docstrings', the shipped tasks)")
    if not (p.is_dir() or p.is_file()):  # a FIFO would block the first read forever, a device never end
        raise DataError(path, 0, "file", "not a regular file or folder (a pipe, socket or device)")
    if is_table(p):  # before the folder rule: a Hub data set's README.md is its card, not a corpus
        first = first_record(p)
    elif p.is_dir() or p.suffix.lower() in CORPUS_SUFFIXES:
        return "corpus"
    else:
        first = first_record(p)  # None: let the SFT loader report the exact line and problem
    if isinstance(first, dict) and "text" in first and not {"messages", "prompt", "conversations",
                                                             "instruction"} & first.keys():
        return "corpus"
    return "sft"


def prepare(config, tokenizer) -> Prepared:
    """Tokenise training and held-out data as the run's config says; counts of what was cut are kept."""
    kind = data_kind(config.data)
    overflow = "drop" if config.drop_long else "truncate"
    if kind == "corpus":
        texts = load_corpus(config.data)
        blocks, stats = tokenize_corpus(tokenizer, texts, config.seq_len, return_stats=True)
        held = max(1, len(blocks) // 20)  # last 5% of blocks: held-out loss for pretraining
        if len(blocks) < 2:
            raise DataError(config.data, 0, "text", f"corpus yields {len(blocks)} block(s) of {config.seq_len} "
                            "tokens; need at least 2 (one to train, one to hold out)")
        train, held_out = blocks[:-held], blocks[-held:]
        return Prepared("corpus", _first(train, config.train_examples), held_out[:config.eval_examples], [],
                        {"train": asdict(stats), "source": config.data})

    task, validation_records = shipped(config.data), []
    if task:
        splits = task.splits()
        train_records, eval_records, validation_records = splits["train"], splits["test"], splits["validation"]
        if config.eval_data:
            eval_records = load_sft(config.eval_data, format=config.format)
    else:
        train_records = load_sft(config.data, format=config.format)
        eval_records = load_sft(config.eval_data, format=config.format) if config.eval_data else []
    train_records = _first(train_records, config.train_examples)
    train, train_stats = _tokenize_checked(tokenizer, train_records, config.data, config.seq_len, overflow)
    if not train:
        raise DataError(config.data, 0, "file", f"no training example left after fitting them to --seq-len "
                        f"{config.seq_len} ({train_stats.n_dropped} dropped: no reply token within the limit)")
    held_out, eval_stats = _tokenize_checked(tokenizer, eval_records[:config.eval_examples],
                                             config.eval_data or config.data, config.seq_len, overflow)
    validation = []
    if config.val_examples:
        if not validation_records:
            raise DataError(config.data, 0, "data", "--val-examples needs a validation split: the shipped tasks "
                            "('support', 'docstrings') have one")
        validation, _ = _tokenize_checked(tokenizer, validation_records[:config.val_examples], config.data,
                                          config.seq_len, overflow)
    return Prepared("sft", train, held_out, eval_records,
                    {"train": asdict(train_stats), "eval": asdict(eval_stats), "source": config.data}, validation)


def _tokenize_checked(tokenizer, records: list[dict], source: str, seq_len: int, overflow: str):
    """`tokenize_sft`, but a conversation the model's chat template cannot render (a template that rejects a
    system role, or rewrites replies so they cannot be located) is a DataError at its file line."""
    try:
        return tokenize_sft(tokenizer, records, seq_len, overflow=overflow)
    except Exception:  # noqa: BLE001 - jinja2 TemplateError, ValueError from the span search, ...
        pass
    for index, record in enumerate(records):  # the failure path only: find the record and its line
        try:
            tokenize_sft(tokenizer, [record], seq_len, overflow=overflow)
        except Exception as err:  # noqa: BLE001
            detail = " ".join(str(err).split())[:200] or type(err).__name__
            table = not shipped(source) and is_table(source)  # a table's records are rows; JSONL skips blank lines
            raise DataError(source, index + 1 if table else _record_line(source, index), "messages",
                            f"the model's chat template cannot render this conversation: {detail}",
                            unit="row" if table else "line") from None
    return tokenize_sft(tokenizer, records, seq_len, overflow=overflow)


def _record_line(source: str, index: int) -> int:
    """1-based line of the index-th record in a JSONL file (loaders skip blank lines); 0 if unknown."""
    try:
        with open(source, "rb") as f:
            seen = -1
            for number, raw in enumerate(f, start=1):
                if raw.strip():
                    seen += 1
                    if seen == index:
                        return number
    except OSError:
        pass
    return 0


def _first(items: list, n: int) -> list:
    return items[:n] if n else items
