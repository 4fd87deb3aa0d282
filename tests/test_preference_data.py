"""Preference pairs: TRL's three row forms load to one shape, bad rows name file/line/field, replies are
labelled alone, truncation is counted, and the shipped support pairs separate chosen from rejected."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tunegap.data.loaders import DataError
from tunegap.data.preference import (FAILURE_KINDS, PreferencePair, generate_support_preferences,
                                     load_preference_pairs, passes_support_checks, tokenize_preferences,
                                     write_support_preferences)
from tunegap.data.render import IGNORE_INDEX, tokenize_prompt
from tunegap.models import tiny_tokenizer


def _write(tmp_path: Path, rows: list, name: str = "p.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def _msg(role: str, content: str) -> dict:
    return {"role": role, "content": content}


@pytest.fixture(scope="module")
def tok():
    tokenizer = tiny_tokenizer()  # the `tiny` preset's tokenizer: byte-level, ChatML template
    assert tokenizer.chat_template
    return tokenizer


STANDARD = {"prompt": "Sync broke", "chosen": "Restart it.", "rejected": "No idea.", "system": "Be brief.", "id": 3}
CONVERSATIONAL = {"prompt": [_msg("system", "Be brief."), _msg("user", "Sync broke")],
                  "chosen": [_msg("assistant", "Restart it.")], "rejected": [_msg("assistant", "No idea.")], "id": 3}
NORMALISED = {"prompt": [_msg("system", "Be brief."), _msg("user", "Sync broke")],
              "chosen": [_msg("assistant", "Restart it.")], "rejected": [_msg("assistant", "No idea.")], "id": 3}


# --------------------------------------------------------------------------- loading

def test_standard_and_conversational_load_to_one_form(tmp_path):
    path = _write(tmp_path, [STANDARD, "", CONVERSATIONAL])
    assert load_preference_pairs(path) == [NORMALISED, NORMALISED]


def test_implicit_prompt_is_the_shared_prefix(tmp_path):
    shared = [_msg("system", "S"), _msg("user", "q1"), _msg("assistant", "a1"), _msg("user", "q2")]
    row = {"chosen": [*shared, _msg("assistant", "good")], "rejected": [*shared, _msg("assistant", "bad")],
           "meta": {"k": 1}}
    [record] = load_preference_pairs(_write(tmp_path, [row]))
    assert record == {"prompt": shared, "chosen": [_msg("assistant", "good")],
                      "rejected": [_msg("assistant", "bad")], "meta": {"k": 1}}


U, A = _msg("user", "q"), _msg("assistant", "a")


@pytest.mark.parametrize("row, field, problem", [
    ("{oops", "json", "malformed JSON"),
    ({"prompt": "q", "chosen": "a"}, "rejected", "missing field"),
    ({"prompt": "q", "rejected": "b"}, "chosen", "missing field"),
    ({"prompt": "q", "chosen": "a", "rejected": "a"}, "rejected", "identical"),
    ({"prompt": " ", "chosen": "a", "rejected": "b"}, "prompt", "empty string"),
    ({"prompt": "q", "chosen": 3, "rejected": "b"}, "chosen", "must be a string"),
    ({"prompt": "q", "chosen": "a", "rejected": "b", "system": ""}, "system", "empty string"),
    ({"chosen": "a", "rejected": "b"}, "prompt", "missing field"),
    ({"prompt": [U], "chosen": "a", "rejected": [A]}, "chosen", "must be an array of messages"),
    ({"prompt": [], "chosen": [A], "rejected": [_msg("assistant", "b")]}, "prompt", "empty array"),
    ({"prompt": [U, A], "chosen": [A], "rejected": [_msg("assistant", "b")]}, "prompt[1].role", "end with a user"),
    ({"prompt": [A, U], "chosen": [A], "rejected": [_msg("assistant", "b")]}, "prompt", "start with a user"),
    ({"prompt": [U, _msg("system", "s")], "chosen": [A], "rejected": [_msg("assistant", "b")]}, "prompt[1].role",
     "system message may only come first"),
    ({"prompt": [{"role": "user"}], "chosen": [A], "rejected": [_msg("assistant", "b")]}, "prompt[0].content",
     "missing field"),
    ({"prompt": [_msg("bot", "q")], "chosen": [A], "rejected": [_msg("assistant", "b")]}, "prompt[0].role",
     "unknown role"),
    ({"prompt": [U], "chosen": [_msg("user", "a")], "rejected": [A]}, "chosen[0].role", "must be 'assistant'"),
    ({"prompt": [U], "chosen": [A, A], "rejected": [_msg("assistant", "b")]}, "chosen", "one assistant message"),
    ({"prompt": [U], "chosen": [A], "rejected": [5]}, "rejected[0]", "must be an object"),
    ({"prompt": [U], "chosen": [A], "rejected": [A]}, "rejected", "identical"),
    ({"prompt": [U], "chosen": [A], "rejected": [_msg("assistant", "b")], "system": "s"}, "system",
     "first in 'prompt'"),
    ({"chosen": [U, A], "rejected": [U, A]}, "rejected", "identical"),
    ({"chosen": [U, A], "rejected": [_msg("user", "other"), A]}, "rejected[0]", "before the final reply"),
    ({"chosen": [A], "rejected": [_msg("assistant", "b")]}, "prompt", "share no leading messages"),
    ({"chosen": [U, A, _msg("user", "x")], "rejected": [U, A, _msg("user", "y")]}, "chosen[2].role",
     "final reply must be 'assistant'"),
    ({"chosen": [U, A, A], "rejected": [U, A, _msg("assistant", "b")]}, "chosen[1].role", "end with a user"),
])
def test_bad_row_names_file_line_and_field(tmp_path, row, field, problem):
    path = _write(tmp_path, [STANDARD, row, STANDARD])
    with pytest.raises(DataError) as info:
        load_preference_pairs(path)
    err = info.value
    assert (err.line, err.field) == (2, field) and problem in err.problem, str(err)
    assert str(err).startswith(f"{path}:2: {field}: ") and "\n" not in str(err)


@pytest.mark.parametrize("name", ["p.json", "p.csv", "p"])
def test_unsupported_extension_is_refused(tmp_path, name):
    path = _write(tmp_path, [STANDARD], name)
    with pytest.raises(DataError, match=r":0: file: unsupported file type"):
        load_preference_pairs(path)


def test_a_parquet_name_on_other_bytes_is_one_line_naming_the_file(tmp_path):
    path = _write(tmp_path, [STANDARD], "p.parquet")
    with pytest.raises(DataError, match=r"p.parquet:0: file: cannot read as parquet"):
        load_preference_pairs(path)


def test_parquet_pairs_load_like_jsonl_and_a_bad_row_is_named(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [STANDARD, {**STANDARD, "rejected": STANDARD["chosen"]}]
    pq.write_table(pa.Table.from_pylist(rows[:1]), tmp_path / "good.parquet")
    assert load_preference_pairs(tmp_path / "good.parquet") == load_preference_pairs(_write(tmp_path, rows[:1]))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "bad.parquet")
    with pytest.raises(DataError, match=r"bad.parquet: row 2: rejected: identical"):
        load_preference_pairs(tmp_path / "bad.parquet")


def test_file_errors_and_skip_mode(tmp_path):
    with pytest.raises(DataError, match=r":0: file: file not found"):
        load_preference_pairs(tmp_path / "nope.jsonl")
    path = _write(tmp_path, [STANDARD, {"prompt": "q"}, CONVERSATIONAL])
    records, rep = load_preference_pairs(path, on_error="skip", report=True)
    assert records == [NORMALISED, NORMALISED] and rep.n_skipped == 1 and ":2: chosen:" in rep.problems[0]


_message = st.fixed_dictionaries({}, optional={"role": st.sampled_from(["user", "assistant", "system", "bot", 1]),
                                              "content": st.sampled_from(["a", "b", "", 2])})
_value = st.none() | st.sampled_from(["a", "b", " "]) | st.lists(_message | st.integers(), max_size=4)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(row=st.fixed_dictionaries({}, optional={"prompt": _value, "chosen": _value, "rejected": _value,
                                               "system": _value}))
def test_any_row_loads_or_is_a_one_line_dataerror(tmp_path, row):
    path = _write(tmp_path, [row])
    try:
        [record] = load_preference_pairs(path)
    except DataError as err:
        assert err.line == 1 and str(err).startswith(f"{path}:1: ") and "\n" not in str(err)
        return
    assert record["prompt"][-1]["role"] == "user" and record["chosen"] != record["rejected"]
    assert [m["role"] for m in record["chosen"] + record["rejected"]] == ["assistant", "assistant"]


# --------------------------------------------------------------------------- tokenising

def _labelled(labels: list[int]) -> list[int]:
    return [t for t in labels if t != IGNORE_INDEX]


def test_pair_marks_only_the_final_reply(tok):
    prompt = [_msg("user", "q1"), _msg("assistant", "earlier reply"), _msg("user", "q2")]
    record = {"prompt": prompt, "chosen": [_msg("assistant", "Restart it.")],
              "rejected": [_msg("assistant", "No idea at all.")], "meta": {"failure": "off_style"}}
    [pair], stats = tokenize_preferences(tok, [record], max_len=512)
    assert isinstance(pair, PreferencePair) and pair.meta == {"failure": "off_style"}
    assert pair.prompt_ids == tokenize_prompt(tok, prompt)  # what generation conditions on
    assert tok.decode(_labelled(pair.chosen_labels)) == "Restart it.<|im_end|>"
    assert tok.decode(_labelled(pair.rejected_labels)) == "No idea at all.<|im_end|>"
    chosen = pair.chosen()
    assert chosen.input_ids == pair.prompt_ids + pair.chosen_ids and len(chosen.labels) == len(chosen)
    assert "earlier reply" not in tok.decode(_labelled(chosen.labels))
    assert (stats.n_pairs, stats.n_truncated, stats.n_dropped) == (1, 0, 0)
    assert stats.n_tokens == len(chosen) + len(pair.rejected())
    assert stats.n_reply_tokens == chosen.n_loss_tokens + pair.rejected().n_loss_tokens


def test_truncation_is_counted_never_silent(tok):
    short = {"prompt": [_msg("user", "q")], "chosen": [_msg("assistant", "ok")], "rejected": [_msg("assistant", "no")]}
    long = {"prompt": [_msg("user", "q")], "chosen": [_msg("assistant", "x" * 200)],
            "rejected": [_msg("assistant", "no")]}
    n_prompt = len(tokenize_prompt(tok, short["prompt"]))
    pairs, stats = tokenize_preferences(tok, [short, long], max_len=n_prompt + 20)
    assert (stats.n_pairs, stats.n_truncated, stats.n_dropped) == (2, 1, 0)
    assert len(pairs[1].chosen()) == n_prompt + 20 and pairs[1].rejected() == tokenize_preferences(
        tok, [long], 512)[0][0].rejected()
    _, stats = tokenize_preferences(tok, [short, long], max_len=n_prompt + 20, overflow="drop")
    assert (stats.n_pairs, stats.n_truncated, stats.n_dropped) == (1, 0, 1)
    pairs, stats = tokenize_preferences(tok, [short, long], max_len=n_prompt)  # no reply token fits
    assert pairs == [] and (stats.n_pairs, stats.n_dropped) == (0, 2)
    with pytest.raises(ValueError, match="overflow"):
        tokenize_preferences(tok, [short], 64, overflow="cut")


# --------------------------------------------------------------------------- the shipped support set

@pytest.fixture(scope="module")
def shipped():
    return generate_support_preferences(seed=0, n_train=400, n_eval=80)


def test_shipped_set_is_deterministic_and_seeded(shipped):
    assert generate_support_preferences(seed=0, n_train=400, n_eval=80) == shipped
    other = generate_support_preferences(seed=1, n_train=400, n_eval=80)
    assert other[0] != shipped[0] and other[1] != shipped[1]


def test_shipped_splits_have_disjoint_prompts(shipped):
    train, evals = shipped
    assert (len(train), len(evals)) == (400, 80)
    prompts = [{json.dumps(p["prompt"]) for p in split} for split in shipped]
    assert not prompts[0] & prompts[1]
    assert {p["meta"]["split"] for p in train} == {"train"} and {p["meta"]["split"] for p in evals} == {"eval"}


def test_chosen_passes_and_rejected_fails_the_support_checkers(shipped):
    for pair in shipped[0] + shipped[1]:
        meta = pair["meta"]
        assert passes_support_checks(meta, pair["chosen"][0]["content"]), meta["id"]
        assert not passes_support_checks(meta, pair["rejected"][0]["content"]), (meta["id"], meta["failure"])
        expected = ({"off_style", "wrong_product", "unwarranted_refusal"} if meta["in_scope"]
                    else {"off_style", "missed_refusal"})
        assert meta["failure"] in expected


def test_every_failure_kind_is_present(shipped):
    for split in shipped:
        assert set(Counter(p["meta"]["failure"] for p in split)) == set(FAILURE_KINDS)


def test_shipped_files_load_back_and_tokenise(tmp_path, tok, shipped):
    train_path, eval_path = write_support_preferences(tmp_path, seed=0, n_train=400, n_eval=80)
    assert load_preference_pairs(train_path) == shipped[0] and load_preference_pairs(eval_path) == shipped[1]
    pairs, stats = tokenize_preferences(tok, shipped[1], max_len=1024)
    assert (stats.n_pairs, stats.n_truncated, stats.n_dropped) == (80, 0, 0)
    assert [p.meta["failure"] for p in pairs] == [p["meta"]["failure"] for p in shipped[1]]
    for pair, record in zip(pairs, shipped[1]):
        assert tok.decode(_labelled(pair.chosen_labels)) == record["chosen"][0]["content"] + "<|im_end|>"
