"""The shipped "docstrings" task: real text nobody on this project wrote, present on every machine offline.

Each example is a function from the Python standard library with its docstring removed; the reply is the
docstring's first sentence, as the library's authors wrote it. Unlike the support task's templated replies,
these are varied human prose, so held-out loss stays well above zero and methods can be told apart.

Splits are by module file (a hash of its path), not by function: methods of one class and near-copies inside
a module land in the same split, so validation and test measure new code, not neighbours of training code.
About 80% train, 10% validation (for choosing hyper-parameters), 10% test (for reporting). The functions come
from this interpreter's standard library, so the task is fixed for a Python version (recorded in `describe()`).
"""

from __future__ import annotations

import ast
import collections
import functools
import hashlib
import random
import re
import sys
import sysconfig
import textwrap
from pathlib import Path

PROMPT = "Write the one-line docstring of this Python function.\n\n{code}"
MAX_CODE_CHARS = 700  # keeps a prompt near 250 SmolLM2 tokens: a 2-core CPU trains on it
MIN_SUMMARY_WORDS, MAX_SUMMARY_WORDS = 4, 30
SKIPPED_FOLDERS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "lib2to3", "__pycache__",
                   "turtledemo", "ensurepip", "pydoc_data"}


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.py") if not SKIPPED_FOLDERS & set(p.relative_to(root).parts[:-1])
                  and not p.name.startswith("test_"))


def _summary(docstring: str) -> str | None:
    """The docstring's first sentence (of its first paragraph), one line; None when it is not prose."""
    first = " ".join(docstring.strip().split("\n\n")[0].split())
    match = re.match(r"(.+?[.!?])(\s|$)", first)
    sentence = match.group(1) if match else first
    words = sentence.split()
    if not MIN_SUMMARY_WORDS <= len(words) <= MAX_SUMMARY_WORDS or not sentence[0].isalpha() or ">>>" in sentence:
        return None
    return sentence


def _without_docstring(source: str, node: ast.FunctionDef) -> str | None:
    lines = source.splitlines()
    doc = node.body[0]
    code = lines[node.lineno - 1 - len(node.decorator_list):doc.lineno - 1] + lines[doc.end_lineno:node.end_lineno]
    if len(node.body) < 2:
        return None  # a body that is only its docstring: nothing to summarise
    text = textwrap.dedent("\n".join(code)).strip("\n")
    return text if len(text) <= MAX_CODE_CHARS else None


def _split_of(relative: str) -> str:
    bucket = int(hashlib.sha1(relative.encode()).hexdigest(), 16) % 10
    return "test" if bucket == 9 else "validation" if bucket == 8 else "train"


def _module_examples(path: Path, relative: str) -> list[dict]:
    try:
        source = path.read_text(encoding="utf-8")
        tree = ast.parse(source)
    except (OSError, UnicodeDecodeError, SyntaxError, ValueError):
        return []  # an unreadable or version-specific file: the task is what parses here
    examples = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or node.name.startswith("test"):
            continue
        docstring = ast.get_docstring(node)
        summary = _summary(docstring) if docstring else None
        code = _without_docstring(source, node) if summary else None
        if code:
            examples.append({"messages": [{"role": "user", "content": PROMPT.format(code=code)},
                                          {"role": "assistant", "content": summary}],
                             "meta": {"task": "docstrings", "function": f"{relative}:{node.name}",
                                      "line": node.lineno, "reference": summary, "split": _split_of(relative)}})
    return examples


@functools.lru_cache(maxsize=2)
def _all_examples(root: str) -> tuple[dict, ...]:
    base = Path(root)
    seen, examples = set(), []
    for path in _files(base):
        relative = path.relative_to(base).as_posix()
        for example in _module_examples(path, relative):
            key = example["messages"][0]["content"]
            if key not in seen:  # the same function defined twice (platform variants) is one example
                seen.add(key)
                examples.append(example)
    return tuple(examples)


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def generate_docstrings(root: str | Path | None = None) -> dict[str, list[dict]]:
    """{"train", "validation", "test"} records (messages + meta), training examples shuffled with a fixed seed."""
    splits = {"train": [], "validation": [], "test": []}
    for example in _all_examples(str(root or stdlib_root())):
        splits[example["meta"]["split"]].append({**example, "meta": dict(example["meta"])})
    random.Random("tunegap-docstrings").shuffle(splits["train"])
    for name in ("validation", "test"):  # held-out order mixed too: the first N are not one module's functions
        random.Random(f"tunegap-docstrings-{name}").shuffle(splits[name])
    return splits


def describe(splits: dict[str, list[dict]]) -> dict:
    return {"source": f"Python {sys.version_info.major}.{sys.version_info.minor} standard library",
            **{name: len(records) for name, records in splits.items()}}


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD's F1 over lower-cased word tokens (Rajpurkar et al. 2016): overlap of the bags of words."""
    pred, ref = _words(prediction), _words(reference)
    if not pred or not ref:
        return float(pred == ref)
    common = sum((collections.Counter(pred) & collections.Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def first_line(text: str) -> str:
    return text.strip().split("\n")[0].strip()


def aggregate_scores(metas: list[dict], texts: list[str]) -> dict:
    """Token F1 of each generated first line against the authors' sentence, and the exact-match share."""
    f1 = [token_f1(first_line(t), m["reference"]) for m, t in zip(metas, texts)]
    exact = [_words(first_line(t)) == _words(m["reference"]) for m, t in zip(metas, texts)]
    n = max(len(f1), 1)
    return {"summary_f1": sum(f1) / n, "summary_exact": sum(exact) / n, "generated": len(f1)}
