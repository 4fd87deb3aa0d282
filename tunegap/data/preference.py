"""Preference pairs (prompt, chosen reply, rejected reply): loading, tokenising, and a shipped set.

Files follow TRL's preference-dataset conventions, so a data set made for TRL's DPO or reward
trainers loads unchanged:

* standard: ``{"prompt": str, "chosen": str, "rejected": str[, "system": str]}``;
* conversational: ``{"prompt": [messages], "chosen": [assistant message], "rejected": [...]}``;
* implicit prompt: ``{"chosen": [messages], "rejected": [messages]}``, the shared leading messages
  being the prompt (TRL's ``extract_prompt``). Strings with no prompt are refused, not split at a
  shared character prefix: that can cut inside a word and would be a guess.

Every form is normalised to the conversational one with an explicit prompt, so one tokeniser
serves them all and the shipped set is written in the same form it loads back as. Problems are
the SFT loaders' one-line `DataError` ("{path}:{line}: {field}: {problem}").

Tokenising renders prompt + reply with the model's chat template exactly as SFT does
(`render._sft_example`), then splits at the generation prompt: the prompt ids are what generation
conditions on, and the reply's labels mark its content and end-of-turn token only, so a DPO or
reward objective sums log-probs over the reply alone.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal

from .loaders import (TABLE_SUFFIXES, DataError, LoadReport, _check_message, _check_string, _LineProblem,
                      _load_records, _type_name)
from .render import IGNORE_INDEX, Example, _sft_example, check_fit, tokenize_prompt
from .support import (DEVICES, ISSUES, PRODUCTS, generate_support, reference_reply, score_reply,
                      write_splits)

__all__ = [
    "PREFERENCE_SUFFIXES", "FAILURE_KINDS", "PreferencePair", "PreferenceStats",
    "load_preference_pairs", "tokenize_preferences", "passes_support_checks",
    "generate_support_preferences", "write_support_preferences",
]

PREFERENCE_SUFFIXES = (".jsonl", *TABLE_SUFFIXES)
FAILURE_KINDS = ("off_style", "wrong_product", "missed_refusal", "unwarranted_refusal")
Messages = list[dict[str, str]]


# --------------------------------------------------------------------------- loading

def _check_messages(value: Any, name: str) -> Messages:
    """A non-empty array of messages in which a system message may only come first."""
    if isinstance(value, str):
        raise _LineProblem(name, "must be an array of messages here (conversational format), got string")
    if not isinstance(value, list):
        raise _LineProblem(name, f"must be an array of messages, got {_type_name(value)}")
    if not value:
        raise _LineProblem(name, "empty array")
    out = [_check_message(m, f"{name}[{i}]") for i, m in enumerate(value)]
    for i, m in enumerate(out[1:], start=1):
        if m["role"] == "system":
            raise _LineProblem(f"{name}[{i}].role", "a system message may only come first")
    return out


def _check_prompt(messages: Messages, name: str = "prompt") -> Messages:
    """A prompt opens with a user turn (after an optional system) and ends on one: the reply answers it."""
    turns = [i for i, m in enumerate(messages) if m["role"] != "system"]
    if not turns or messages[turns[0]]["role"] != "user":
        raise _LineProblem(name, "must start with a user message (after an optional system)")
    if messages[-1]["role"] != "user":
        raise _LineProblem(f"{name}[{len(messages) - 1}].role", "the prompt must end with a user message")
    return messages


def _check_reply(value: Any, name: str) -> Messages:
    """Exactly one assistant message: the single reply a preference is about."""
    messages = _check_messages(value, name)
    if len(messages) != 1:
        raise _LineProblem(name, f"expected one assistant message, got {len(messages)} messages")
    if messages[0]["role"] != "assistant":
        raise _LineProblem(f"{name}[0].role", f"must be 'assistant', got {messages[0]['role']!r}")
    return messages


def _require(obj: dict[str, Any], *keys: str) -> None:
    for key in keys:
        if key not in obj:
            raise _LineProblem(key, "missing field")


def _parse_standard(obj: dict[str, Any]) -> dict[str, Any]:
    """Strings: the prompt becomes a user turn (after "system", if given), each reply an assistant turn."""
    for key in ("chosen", "rejected"):
        if not isinstance(obj[key], str):
            raise _LineProblem(key, f"must be a string like 'prompt' (standard format), got {_type_name(obj[key])}")
    prompt = [{"role": "user", "content": _check_string(obj["prompt"], "prompt")}]
    if "system" in obj:
        prompt.insert(0, {"role": "system", "content": _check_string(obj["system"], "system")})
    replies = {k: [{"role": "assistant", "content": _check_string(obj[k], k)}] for k in ("chosen", "rejected")}
    extra = {k: v for k, v in obj.items() if k not in ("prompt", "chosen", "rejected", "system")}
    return {"prompt": prompt, **replies, **extra}


def _parse_conversational(obj: dict[str, Any]) -> dict[str, Any]:
    if "system" in obj:
        raise _LineProblem("system", "put the system message first in 'prompt' (conversational format)")
    prompt = _check_prompt(_check_messages(obj["prompt"], "prompt"))
    replies = {k: _check_reply(obj[k], k) for k in ("chosen", "rejected")}
    return {**obj, "prompt": prompt, **replies}


def _parse_implicit(obj: dict[str, Any]) -> dict[str, Any]:
    """TRL's implicit prompt: the messages chosen and rejected share, before one differing final reply."""
    if isinstance(obj["chosen"], str) or isinstance(obj["rejected"], str):
        raise _LineProblem("prompt", "missing field (an implicit prompt needs chosen/rejected as message arrays)")
    chosen, rejected = _check_messages(obj["chosen"], "chosen"), _check_messages(obj["rejected"], "rejected")
    cut = next((i for i, (c, r) in enumerate(zip(chosen, rejected)) if c != r), min(len(chosen), len(rejected)))
    if chosen == rejected:
        raise _LineProblem("rejected", "identical to 'chosen' (the pair teaches nothing)")
    if not (len(chosen) == len(rejected) == cut + 1):
        raise _LineProblem(f"rejected[{cut}]", "differs from 'chosen' before the final reply; an implicit prompt "
                                               "is every message but one final assistant reply")
    if cut == 0:
        raise _LineProblem("prompt", "missing field (chosen and rejected share no leading messages)")
    for name, messages in (("chosen", chosen), ("rejected", rejected)):
        if messages[cut]["role"] != "assistant":
            raise _LineProblem(f"{name}[{cut}].role",
                               f"the final reply must be 'assistant', got {messages[cut]['role']!r}")
    prompt = _check_prompt(chosen[:cut], "chosen")
    return {**obj, "prompt": prompt, "chosen": chosen[cut:], "rejected": rejected[cut:]}


def _parse_pair(obj: dict[str, Any]) -> dict[str, Any]:
    """Pick the format from the row itself, so every row is judged by the rules of the form it uses."""
    _require(obj, "chosen", "rejected")
    if "prompt" not in obj:
        return _parse_implicit(obj)
    record = _parse_standard(obj) if isinstance(obj["prompt"], str) else _parse_conversational(obj)
    if record["chosen"] == record["rejected"]:
        raise _LineProblem("rejected", "identical to 'chosen' (the pair teaches nothing)")
    return record


def load_preference_pairs(path: str | Path, on_error: Literal["raise", "skip"] = "raise", report: bool = False
                          ) -> list[dict[str, Any]] | tuple[list[dict[str, Any]], LoadReport]:
    """Load TRL-style preference pairs from JSONL, normalised to the conversational explicit-prompt form.

    Each record becomes ``{"prompt": [messages ending with user], "chosen": [assistant message],
    "rejected": [assistant message], **extra_keys}`` whichever of the three forms its line used.
    JSONL, parquet/arrow files and `datasets.save_to_disk` folders are read (a Hub data set of pairs loads as it is);
    a .json/.csv file is refused rather than guessed at. ``on_error``
    and ``report`` work as in `loaders.load_sft`.
    """
    path = Path(path)
    if path.is_file() and path.suffix.lower() not in PREFERENCE_SUFFIXES:
        raise DataError(path, 0, "file", f"unsupported file type {path.suffix or '(none)'!r}, expected .jsonl "
                                         "(one JSON object per line), .parquet or .arrow")
    return _load_records(path, _parse_pair, on_error, report, "empty data set (no preference pairs)")


# --------------------------------------------------------------------------- tokenising

@dataclass
class PreferencePair:
    """One tokenised pair; each side's sequence is ``prompt_ids + <side>_ids``.

    ``<side>_labels`` run parallel to ``<side>_ids``: the token id where the reply's log-prob counts
    (its content and end-of-turn token), -100 on template markup, as in `render.Example`.
    """

    prompt_ids: list[int]
    chosen_ids: list[int]
    chosen_labels: list[int]
    rejected_ids: list[int]
    rejected_labels: list[int]
    meta: dict[str, Any] = field(default_factory=dict)

    def _side(self, ids: list[int], labels: list[int]) -> Example:
        return Example(self.prompt_ids + ids, [IGNORE_INDEX] * len(self.prompt_ids) + labels)

    def chosen(self) -> Example:
        """The chosen side as one labelled sequence, ready for the SFT batching code."""
        return self._side(self.chosen_ids, self.chosen_labels)

    def rejected(self) -> Example:
        """The rejected side as one labelled sequence."""
        return self._side(self.rejected_ids, self.rejected_labels)


@dataclass
class PreferenceStats:
    """How much of the pair data reached the model, so truncation is never silent."""

    n_pairs: int = 0  # pairs returned
    n_truncated: int = 0  # returned with at least one side cut to max_len
    n_dropped: int = 0  # not returned: too long with overflow="drop", or a side kept no reply token
    n_tokens: int = 0  # tokens of both sequences (the prompt counts twice: a DPO step runs it twice)
    n_reply_tokens: int = 0  # labelled tokens of both sides


def _split_reply(tokenizer: Any, prompt: Messages, prompt_ids: list[int], reply: Messages
                 ) -> tuple[list[int], list[int]]:
    """Render prompt + reply like SFT, then keep what follows the prompt (earlier replies lose their labels)."""
    ex = _sft_example(tokenizer, [*prompt, *reply])
    if ex.input_ids[:len(prompt_ids)] != prompt_ids:
        raise ValueError("the tokenizer does not tokenise prompt + reply as the prompt's tokens followed by the "
                         "reply's; cannot split the pair at the generation prompt")
    return ex.input_ids[len(prompt_ids):], ex.labels[len(prompt_ids):]


def _fit(n_prompt: int, ids: list[int], labels: list[int], max_len: int) -> tuple[list[int], list[int], bool]:
    """Cut the reply's end to fit (the prompt is kept whole, as SFT keeps context first)."""
    room = max(0, max_len - n_prompt)
    return ids[:room], labels[:room], len(ids) > room


def _n_labels(labels: list[int]) -> int:
    return sum(1 for t in labels if t != IGNORE_INDEX)


def _tokenize_pair(tokenizer: Any, record: dict[str, Any]) -> PreferencePair:
    prompt = record["prompt"]
    prompt_ids = tokenize_prompt(tokenizer, prompt)
    chosen = _split_reply(tokenizer, prompt, prompt_ids, record["chosen"])
    rejected = _split_reply(tokenizer, prompt, prompt_ids, record["rejected"])
    return PreferencePair(prompt_ids, *chosen, *rejected, meta=dict(record.get("meta") or {}))


def tokenize_preferences(tokenizer: Any, records: Iterable[dict[str, Any]], max_len: int,
                         overflow: Literal["truncate", "drop"] = "truncate"
                         ) -> tuple[list[PreferencePair], PreferenceStats]:
    """Tokenise normalised pairs (`load_preference_pairs`' records) with the model's chat template.

    Each side must fit ``max_len`` tokens with the prompt. ``"truncate"`` cuts the reply's end;
    ``"drop"`` leaves an over-long pair out. A pair where either side keeps no reply token is
    dropped (it would compare nothing); every cut and drop is counted in the stats.
    """
    check_fit(overflow, max_len)
    pairs: list[PreferencePair] = []
    stats = PreferenceStats()
    for record in records:
        pair = _tokenize_pair(tokenizer, record)
        n = len(pair.prompt_ids)
        c_ids, c_labels, c_cut = _fit(n, pair.chosen_ids, pair.chosen_labels, max_len)
        r_ids, r_labels, r_cut = _fit(n, pair.rejected_ids, pair.rejected_labels, max_len)
        if (overflow == "drop" and (c_cut or r_cut)) or not (_n_labels(c_labels) and _n_labels(r_labels)):
            stats.n_dropped += 1
            continue
        pairs.append(PreferencePair(pair.prompt_ids, c_ids, c_labels, r_ids, r_labels, pair.meta))
        stats.n_pairs += 1
        stats.n_truncated += c_cut or r_cut
        stats.n_tokens += 2 * n + len(c_ids) + len(r_ids)
        stats.n_reply_tokens += _n_labels(c_labels) + _n_labels(r_labels)
    return pairs, stats


# --------------------------------------------------------------------------- the shipped set

def passes_support_checks(meta: dict[str, Any], text: str) -> bool:
    """The support task's own verdict on a reply: house style, right product, refusal exactly when out of scope."""
    scores = score_reply(meta, text)
    return bool(scores["style_ok"]) and scores["refused"] == (not meta["in_scope"])


def _off_style(rng: random.Random, meta: dict[str, Any], reply: str) -> str:
    """The right content with one house-style rule broken (greeting, sign-off, or numbered steps)."""
    lines = reply.split("\n")
    breaks = ["greeting", "no_sign_off", "casual_sign_off"] + (["prose_steps"] if meta["in_scope"] else [])
    kind = rng.choice(breaks)
    if kind == "greeting":
        return "\n".join(["Hello!", *lines[1:]])
    if kind == "no_sign_off":
        return "\n".join(lines[:-1])
    if kind == "casual_sign_off":
        return "\n".join([*lines[:-1], "Cheers,", "Lumora"])
    first, then = (line[3].lower() + line[4:].rstrip(".") for line in lines[2:4])  # "1. Reset..." -> "reset..."
    steps = f"First, {first}, then {then}."
    return "\n".join([*lines[:2], steps, *lines[4:]])


def _rejected_reply(rng: random.Random, kind: str, meta: dict[str, Any], chosen: str) -> str:
    """A reply that fails the support checkers in the way `kind` names."""
    if kind == "off_style":
        return _off_style(rng, meta, chosen)
    if kind == "wrong_product":
        return reference_reply({**meta, "product": rng.choice([p for p in PRODUCTS if p != meta["product"]])})
    if kind == "unwarranted_refusal":
        return reference_reply({**meta, "in_scope": False})
    # missed_refusal: a confident house-style fix for an out-of-scope ticket
    fake = {"name": meta["name"], "in_scope": True, "issue": rng.choice(sorted(ISSUES)),
            "product": meta["product"] or rng.choice(PRODUCTS), "device": rng.choice(DEVICES),
            "code": f"E{rng.randint(100, 999)}"}
    return reference_reply(fake)


def _to_pairs(records: list[dict[str, Any]], seed: int, split: str) -> list[dict[str, Any]]:
    rng = random.Random(f"tunegap-support-preferences-{split}:{seed}")
    pairs = []
    for rec in records:
        user, assistant = rec["messages"]
        meta = rec["meta"]
        kinds = ("off_style", "wrong_product", "unwarranted_refusal") if meta["in_scope"] else \
            ("off_style", "missed_refusal")
        kind = rng.choice(kinds)
        rejected = _rejected_reply(rng, kind, meta, assistant["content"])
        if passes_support_checks(meta, rejected) or not passes_support_checks(meta, assistant["content"]):
            raise AssertionError(f"support preference {meta['id']} ({kind}) does not separate chosen from rejected")
        pairs.append({"prompt": [user], "chosen": [assistant],
                      "rejected": [{"role": "assistant", "content": rejected}],
                      "meta": {**meta, "failure": kind}})
    return pairs


def generate_support_preferences(seed: int = 0, n_train: int = 1000, n_eval: int = 100
                                 ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Train and eval preference pairs on the support task, deterministic for `seed`.

    Prompts are `generate_support`'s tickets, so eval prompts come from held-out (name, issue) pairs
    and never occur in train. Chosen is the house-style reference reply; rejected is drawn from the
    failure kinds that apply to the ticket (in scope: off_style, wrong_product, unwarranted_refusal;
    out of scope: off_style, missed_refusal), recorded as ``meta["failure"]``. Records are in the
    normalised form `load_preference_pairs` returns.
    """
    train, evals = generate_support(n_train, n_eval, seed)
    return _to_pairs(train, seed, "train"), _to_pairs(evals, seed, "eval")


def write_support_preferences(folder: str | Path, seed: int = 0, n_train: int = 1000, n_eval: int = 100
                              ) -> tuple[Path, Path]:
    """Write train.jsonl and eval.jsonl (TRL conversational format) atomically; returns their paths."""
    return write_splits(folder, *generate_support_preferences(seed, n_train, n_eval))
