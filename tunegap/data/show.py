"""`tunegap data show FILE`: one record as the model sees it, its chat template applied, and which tokens carry loss.

The rendering is the trainer's own (`render.tokenize_sft`), not a re-implementation, so what is shown is what trains.
"""

from __future__ import annotations

import argparse
import sys

from ..losses import IGNORE_INDEX
from ..models import DEFAULT_MODEL, load_model
from .loaders import SFT_FORMATS, DataError, detect_sft_format, first_record, load_sft
from .render import tokenize_sft
from .support import generate_support

# Plain-text marks around loss-bearing spans, so the view survives a pipe or a log file; colour only on a terminal
MARKS = {False: ("[[", "]]"), True: ("\033[1;32m", "\033[0m")}


def spans(tokenizer, ids: list[int], labels: list[int]) -> list[tuple[str, bool]]:
    """(text, carries loss) runs: consecutive tokens of one kind decoded together, so multi-byte characters that
    a byte-level BPE splits across tokens still decode whole."""
    runs: list[tuple[list[int], bool]] = []
    for token, label in zip(ids, labels):
        trains = label != IGNORE_INDEX
        if runs and runs[-1][1] == trains:
            runs[-1][0].append(token)
        else:
            runs.append(([token], trains))
    return [(tokenizer.decode(chunk, skip_special_tokens=False), trains) for chunk, trains in runs]


def show(path: str, *, row: int = 1, model: str = DEFAULT_MODEL, seq_len: int = 128, format: str = "auto",
         colour: bool = False) -> str:
    """The view as text: the record rendered with loss marks, then the counts (measured on this tokenizer)."""
    records = generate_support()[0] if path == "support" else load_sft(path, format=format)
    if not 1 <= row <= len(records):
        raise DataError(path, 0, "row", f"--row {row} is outside 1..{len(records)}")
    tokenizer = load_model(model)[1]
    example = tokenize_sft(tokenizer, [records[row - 1]], 10 ** 9)[0][0]  # whole, then mark what --seq-len cuts
    kept, cut = example.input_ids[:seq_len], example.input_ids[seq_len:]
    start, end = MARKS[colour]
    text = "".join(f"{start}{t}{end}" if trains else t
                   for t, trains in spans(tokenizer, kept, example.labels[:seq_len]))
    layout = "support (shipped)" if path == "support" else (
        format if format != "auto" else f"{detect_sft_format(first_record(path))} (detected)")
    n_loss = sum(1 for label in example.labels[:seq_len] if label != IGNORE_INDEX)
    lines = [f"{path} record {row} of {len(records)}, layout {layout}, rendered with {model}'s chat template; "
             f"{start}marked{end} tokens carry loss:", "", text, "",
             f"{len(kept)} tokens, {n_loss} carry loss (measured with this tokenizer; --seq-len {seq_len})"]
    if cut:
        lost = sum(1 for label in example.labels[seq_len:] if label != IGNORE_INDEX)
        lines.append(f"cut by --seq-len {seq_len}: {len(cut)} more tokens, {lost} of them loss-bearing "
                     "(training truncates them, or drops the record with --drop-long)")
    return "\n".join(lines)


def cmd_show(args) -> int:
    print(show(args.file, row=args.row, model=args.model, seq_len=args.seq_len, format=args.format,
               colour=sys.stdout.isatty()))
    return 0


def add_parser(data_sub: argparse._SubParsersAction) -> None:
    """`tunegap data show FILE`, on the `data` command's subparsers (tunegap.cli makes them)."""
    p = data_sub.add_parser("show", help="a record rendered with the model's chat template, loss-bearing tokens marked",
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("file", help="SFT JSONL, parquet/arrow, a save_to_disk or Hub-style folder, or 'support'")
    p.add_argument("--row", type=int, default=1, help="which record (1-based)")
    p.add_argument("--model", default=DEFAULT_MODEL, help="whose tokenizer and chat template")
    p.add_argument("--seq-len", type=int, default=128, help="tokens a training example keeps")
    p.add_argument("--format", default="auto", choices=SFT_FORMATS, help="the file's layout")
    p.set_defaults(func=cmd_show)
