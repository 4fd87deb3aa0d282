"""`tunegap data audit FILE`: what is in an SFT or preference JSONL before any training pays for it.

Counts, through tunegap's own loaders and the model's own tokenizer and chat template: examples and tokens,
lengths against the context (--seq-len), exact duplicates, near duplicates (MinHash LSH from `datasketch`, a
maintained library; Broder 1997's estimate of Jaccard similarity over word 3-gram shingles), overlap with an eval
set (contamination: exact and near), and rows with empty or broken turns. A row that is not JSON at all stops the
audit with one line naming file, row and field (exit 2): nothing below it could be trusted. A row that is JSON
but breaks the SFT or preference schema (an empty turn, a missing reply, a wrong role) is counted and listed.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import time
import zlib
from pathlib import Path

from ..io import atomic_write_bytes
from ..models import DEFAULT_MODEL, TINY_PRESETS, ModelError, default_model_folder, tiny_tokenizer
from .loaders import DataError, load_sft
from .preference import load_preference_pairs

NEAR_THRESHOLD = 0.8  # estimated Jaccard similarity of word 3-gram sets at which two rows count as near duplicates
NUM_PERM = 128  # MinHash permutations: standard error of a Jaccard estimate J is sqrt(J(1-J)/128), 0.03 at 0.9
CANDIDATE_THRESHOLD = 0.5  # LSH bands tuned this low so a pair at 0.8+ is almost never missed; then confirmed
SHINGLE = 3
_WORDS = re.compile(r"\w+")
MALFORMED_FIELDS = ("json", "line")  # the loaders' fields for a row that is not a JSON object at all


def data_kind(path: Path) -> str:
    """'preference' when the first JSON row has 'chosen', else 'sft' (each loader then judges every row)."""
    with open(path, "rb") as f:
        for raw in f:
            if raw.strip():
                try:
                    first = json.loads(raw)
                except ValueError:
                    return "sft"  # the loader names the row and what is wrong with it
                return "preference" if isinstance(first, dict) and "chosen" in first else "sft"
    return "sft"


def load_rows(path: str | Path) -> tuple[str, list[dict], list[str]]:
    """(kind, records, schema problems) through tunegap's loaders; a non-JSON row raises DataError (exit 2)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, 0, "file", "no such file")
    kind = data_kind(path)
    loader = load_preference_pairs if kind == "preference" else load_sft
    records, report = loader(path, on_error="skip", report=True)
    for problem in report.problems:
        parts = _split_problem(problem)
        if parts[2] in MALFORMED_FIELDS:
            raise DataError(*parts)
    return kind, records, report.problems


_PROBLEM = re.compile(r"(?P<path>.*?):(?P<line>\d+): (?P<field>.*?): (?P<problem>.*)")


def _split_problem(problem: str) -> tuple[str, int, str, str]:
    """A loader's one-line problem "path:line: field: problem" back into DataError's arguments."""
    m = _PROBLEM.fullmatch(problem)
    return (m["path"], int(m["line"]), m["field"], m["problem"]) if m else ("?", 0, "?", problem)


def conversations(kind: str, record: dict) -> list[list[dict]]:
    """The conversations a record trains on: one for SFT, prompt + chosen and prompt + rejected for a pair."""
    if kind == "sft":
        return [record["messages"]]
    return [record["prompt"] + record["chosen"], record["prompt"] + record["rejected"]]


def row_text(messages: list[dict]) -> str:
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


def shingles(text: str) -> set[bytes]:
    words = _WORDS.findall(text.lower())
    if len(words) < SHINGLE:
        return {" ".join(words).encode()}
    return {" ".join(words[i:i + SHINGLE]).encode() for i in range(len(words) - SHINGLE + 1)}


def minhashes(texts: list[str]):
    """One MinHash per text. The shingle hash is zlib's CRC-32, a C function: datasketch's default (SHA-1 in
    Python) was most of the audit's time on 100k rows, and the permutations MinHash applies on top are what
    make the estimate; CRC-32 only has to spread distinct shingles over 32 bits, reproducibly."""
    from datasketch import MinHash

    return MinHash.bulk([shingles(t) for t in texts], num_perm=NUM_PERM, hashfunc=zlib.crc32)


def token_lengths(tokenizer, convs: list[list[dict]]) -> list[int]:
    """Tokens each conversation takes once rendered by the model's chat template (as training renders it)."""
    if getattr(tokenizer, "chat_template", None):
        texts = [tokenizer.apply_chat_template(c, tokenize=False) for c in convs]
    else:
        texts = [row_text(c) for c in convs]
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def _percentile(sorted_values: list[int], share: float) -> int:
    return sorted_values[min(len(sorted_values) - 1, int(share * len(sorted_values)))] if sorted_values else 0


def _digest(text: str) -> str:
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def audit(path: str | Path, tokenizer, *, seq_len: int, eval_path: str | Path | None = None) -> dict:
    """Every count the audit prints, as one JSON-able dict (`--json` prints exactly this)."""
    from datasketch import MinHashLSH

    started = time.perf_counter()
    kind, records, problems = load_rows(path)
    texts = ["\n\n".join(row_text(c) for c in conversations(kind, r)) for r in records]
    lengths = token_lengths(tokenizer, [c for r in records for c in conversations(kind, r)])
    per_row = 2 if kind == "preference" else 1
    row_tokens = [max(lengths[i * per_row:(i + 1) * per_row]) for i in range(len(records))]

    digests = [_digest(t) for t in texts]
    first_of: dict[str, int] = {}
    exact = [i for i, d in enumerate(digests) if first_of.setdefault(d, i) != i]
    exact_set = set(exact)
    hashes = minhashes(texts)
    lsh = MinHashLSH(threshold=CANDIDATE_THRESHOLD, num_perm=NUM_PERM)
    near = []
    for i, h in enumerate(hashes):
        if i in exact_set:
            continue
        if _near(h, lsh, hashes):
            near.append(i)
        lsh.insert(i, h)

    ordered = sorted(row_tokens)
    result = {
        "file": str(path), "kind": kind, "tokenizer": getattr(tokenizer, "name_or_path", "") or "tiny",
        "examples": len(records), "conversations": len(lengths),
        "tokens": {"total": sum(lengths), "unit": "tokens (chat template applied)", "how": "measured",
                   "mean": sum(row_tokens) / max(len(row_tokens), 1), "p50": _percentile(ordered, 0.5),
                   "p90": _percentile(ordered, 0.9), "p99": _percentile(ordered, 0.99), "max": ordered[-1]},
        "context": {"seq_len": seq_len, "over": sum(t > seq_len for t in row_tokens),
                    "share_over": sum(t > seq_len for t in row_tokens) / len(row_tokens)},
        "exact_duplicates": {"rows": len(exact), "first_rows": [i + 1 for i in exact[:10]]},
        "near_duplicates": {"rows": len(near), "threshold": NEAR_THRESHOLD, "num_perm": NUM_PERM,
                            "shingle_words": SHINGLE, "first_rows": [i + 1 for i in near[:10]],
                            "how": "estimate (MinHash LSH, datasketch)"},
        "broken_rows": {"rows": len(problems), "first": problems[:10]},
        "row_tokens": row_tokens,
    }
    if eval_path:
        result["contamination"] = contamination(eval_path, texts, digests, lsh, hashes)
    result["seconds"] = {"value": time.perf_counter() - started, "unit": "s", "how": "measured"}
    return result


def _near(h, lsh, hashes) -> bool:
    """Any indexed row whose estimated Jaccard similarity with `h` reaches NEAR_THRESHOLD (LSH proposes, the
    MinHash estimate confirms)."""
    return any(h.jaccard(hashes[j]) >= NEAR_THRESHOLD for j in lsh.query(h))


def contamination(eval_path: str | Path, texts: list[str], digests: list[str], lsh, hashes) -> dict:
    """Eval rows that appear in the training file verbatim, or nearly (same MinHash LSH as the duplicates)."""
    kind, records, _ = load_rows(eval_path)
    eval_texts = ["\n\n".join(row_text(c) for c in conversations(kind, r)) for r in records]
    train_digests = set(digests)
    exact = [i for i, t in enumerate(eval_texts) if _digest(t) in train_digests]
    prompts = {_digest(_prompt_text(t)) for t in texts}
    same_prompt = [i for i, t in enumerate(eval_texts) if _digest(_prompt_text(t)) in prompts]
    exact_set = set(exact)
    near = [i for i, h in enumerate(minhashes(eval_texts)) if i not in exact_set and _near(h, lsh, hashes)]
    n = len(records)
    return {"file": str(eval_path), "eval_rows": n, "exact": len(exact), "same_prompt": len(same_prompt),
            "near": len(near), "share_contaminated": (len(exact) + len(near)) / n,
            "first_rows": [i + 1 for i in sorted(set(exact) | set(near))[:10]],
            "how": "exact: measured (hash of the whole row); near: estimate (MinHash LSH)"}


def _prompt_text(text: str) -> str:
    """A row's text up to its first assistant turn: the question an eval asks."""
    return text.split("\nassistant: ", 1)[0]


def format_table(result: dict) -> str:
    t, c = result["tokens"], result["context"]
    rows = [("examples", f"{result['examples']:,} ({result['kind']}; {result['conversations']:,} conversations)"),
            ("tokens", f"{t['total']:,} (measured, chat template applied); per example mean {t['mean']:.0f}, "
                       f"p50 {t['p50']}, p90 {t['p90']}, p99 {t['p99']}, max {t['max']}"),
            (f"over --seq-len {c['seq_len']}", f"{c['over']:,} examples ({100 * c['share_over']:.1f}%; truncated "
                                               "or dropped at training)"),
            ("exact duplicates", f"{result['exact_duplicates']['rows']:,} rows (measured)"),
            ("near duplicates", f"{result['near_duplicates']['rows']:,} rows (estimate: MinHash Jaccard >= "
                                f"{NEAR_THRESHOLD} on word {SHINGLE}-grams)"),
            ("empty or broken turns", f"{result['broken_rows']['rows']:,} rows (left out of training)")]
    if "contamination" in result:
        k = result["contamination"]
        rows.append(("eval overlap", f"{k['exact']:,} exact + {k['near']:,} near of {k['eval_rows']:,} eval rows "
                                     f"({100 * k['share_contaminated']:.1f}%); {k['same_prompt']:,} share a prompt"))
    width = max(len(name) for name, _ in rows)
    lines = [f"tunegap data audit: {result['file']}"] + [f"  {name:<{width}}  {value}" for name, value in rows]
    lines += [f"    {p}" for p in result["broken_rows"]["first"][:5]]
    lines.append(f"  ({result['seconds']['value']:.1f} s, measured)")
    return "\n".join(lines)


def length_chart(result: dict, path: str | Path) -> Path:
    """Histogram of tokens per example with the context limit marked; written atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.hist(result["row_tokens"], bins=50, color="#4c72b0")
    ax.axvline(result["context"]["seq_len"], color="#c44e52", linestyle="--",
               label=f"--seq-len {result['context']['seq_len']}")
    ax.set_xlabel("tokens per example (measured, chat template applied)")
    ax.set_ylabel("examples")
    ax.set_title(f"{Path(result['file']).name}: {result['examples']:,} examples", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    atomic_write_bytes(path, buffer.getvalue())
    return Path(path)


def load_tokenizer(name: str):
    """The tokenizer alone (the audit needs no weights): a tiny preset's, or a folder's / the default model's."""
    from transformers import AutoTokenizer

    if name in TINY_PRESETS:
        return tiny_tokenizer()
    folder = default_model_folder() if name == DEFAULT_MODEL else Path(name)
    if not (folder / "config.json").is_file() and not (folder / "tokenizer.json").is_file():
        raise ModelError(f"{name}: not a known model nor a folder with a tokenizer")
    return AutoTokenizer.from_pretrained(folder)


def cmd_audit(args) -> int:
    result = audit(args.file, load_tokenizer(args.model), seq_len=args.seq_len, eval_path=args.eval or None)
    if args.chart:
        length_chart(result, args.chart)
    if args.json:
        print(json.dumps({k: v for k, v in result.items() if k != "row_tokens"}, indent=2))
    else:
        print(format_table(result) + (f"\n  length chart: {args.chart}" if args.chart else ""))
    return 0


def add_parser(data_sub) -> None:
    """`tunegap data audit FILE`, on the `data` command's subparsers (tunegap.cli makes them)."""
    p = data_sub.add_parser("audit", help="examples, tokens vs context, duplicates, near duplicates, eval overlap, "
                                     "broken turns of an SFT or preference JSONL")
    p.add_argument("file", help="SFT ({messages} or {prompt, response}) or preference ({prompt, chosen, "
                                "rejected}) JSONL")
    p.add_argument("--eval", default="", help="an eval JSONL to check for overlap with FILE (contamination)")
    p.add_argument("--model", default=DEFAULT_MODEL, help="whose tokenizer and chat template count the tokens")
    p.add_argument("--seq-len", type=int, default=2048, help="the context the data will be trained at")
    p.add_argument("--json", action="store_true", help="print every count as JSON instead of the table")
    p.add_argument("--chart", default="", help="write a length histogram PNG here")
    p.set_defaults(func=cmd_audit)


__all__ = ["audit", "contamination", "format_table", "length_chart", "load_rows", "add_parser"]
