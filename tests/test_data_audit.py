"""`tunegap data audit`: counts checked against a file with planted duplicates, near duplicates, broken turns and
eval overlap, and token counts checked against the byte-level tiny tokenizer's known answer."""

from __future__ import annotations

import json
import random

import pytest

from tunegap.cli import main
from tunegap.data.audit import audit, load_tokenizer

WORDS = ("ticket refund portal password invoice printer router laptop screen battery cable warranty order parcel "
         "courier account billing upgrade license backup restore update driver monitor keyboard").split()


def _sentence(rng, n):
    return " ".join(rng.choice(WORDS) for _ in range(n))


def _row(prompt, response):
    return json.dumps({"prompt": prompt, "response": response})


@pytest.fixture
def planted(tmp_path):
    """40 distinct rows; +3 exact copies, +2 near copies (one word of 60 changed), +1 row with an empty reply;
    an eval file of 2 rows copied from training, 1 near copy and 5 new rows."""
    rng = random.Random(0)
    rows = [(_sentence(rng, 8), _sentence(rng, 60)) for _ in range(40)]
    lines = [_row(p, r) for p, r in rows]
    lines += [lines[3], lines[7], lines[7]]
    for i in (11, 12):
        p, r = rows[i]
        words = r.split()
        words[30] = "zebra"
        lines.append(_row(p, " ".join(words)))
    lines.insert(20, json.dumps({"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": " "}]}))
    train = tmp_path / "train.jsonl"
    train.write_text("\n".join(lines) + "\n")
    p, r = rows[30]
    near_eval = _row(p, r.replace(r.split()[10], "zebra", 1))
    evals = [_row(*rows[0]), _row(*rows[1]), near_eval] + [_row(_sentence(rng, 8), _sentence(rng, 60)) for _ in range(5)]
    eval_file = tmp_path / "eval.jsonl"
    eval_file.write_text("\n".join(evals) + "\n")
    return train, eval_file, rows


def test_audit_counts_what_was_planted(planted):
    train, eval_file, rows = planted
    result = audit(train, load_tokenizer("tiny"), seq_len=400, eval_path=eval_file)
    assert result["examples"] == 45 and result["kind"] == "sft"
    assert result["exact_duplicates"]["rows"] == 3
    assert result["near_duplicates"]["rows"] == 2
    assert result["broken_rows"]["rows"] == 1 and ":21: messages[1].content: empty string" in result["broken_rows"]["first"][0]
    k = result["contamination"]
    assert (k["eval_rows"], k["exact"], k["near"], k["same_prompt"]) == (8, 2, 1, 3)
    assert k["share_contaminated"] == pytest.approx(3 / 8)


def test_token_counts_are_the_byte_level_tokenizers_known_answer(planted):
    """The tiny tokenizer is byte-level with ChatML specials: a {prompt, response} row renders as
    <|im_start|>user\\n{p}<|im_end|>\\n<|im_start|>assistant\\n{r}<|im_end|>\\n, i.e. 4 special tokens + bytes."""
    train, _, rows = planted
    result = audit(train, load_tokenizer("tiny"), seq_len=400)
    p, r = rows[0]
    expected = 4 + len(f"user\n{p}\nassistant\n{r}\n".encode())
    assert result["row_tokens"][0] == expected
    assert result["tokens"]["max"] < 1000 < 2 * result["tokens"]["p50"]  # 8 + 60 words of 3-8 letters
    assert audit(train, load_tokenizer("tiny"), seq_len=1000)["context"]["over"] == 0
    assert audit(train, load_tokenizer("tiny"), seq_len=expected - 1)["context"]["over"] >= 1


def test_preference_pairs_count_both_replies(tmp_path):
    path = tmp_path / "prefs.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": f"question {i} about the router", "chosen": "short answer",
                                          "rejected": "a much longer rejected answer " * (i + 1)}) for i in range(6)))
    result = audit(path, load_tokenizer("tiny"), seq_len=100)
    assert result["kind"] == "preference" and result["examples"] == 6 and result["conversations"] == 12
    assert result["row_tokens"] == sorted(result["row_tokens"])  # the longer (rejected) reply sets each row's length


def test_cli_table_json_chart_and_one_line_errors(planted, tmp_path, capsys):
    train, eval_file, _ = planted
    chart = tmp_path / "lengths.png"
    assert main(["data", "audit", str(train), "--model", "tiny", "--json", "--eval", str(eval_file),
                 "--chart", str(chart), "--seq-len", "300"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["exact_duplicates"]["rows"] == 3 and printed["context"]["seq_len"] == 300
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["data", "audit", str(train), "--model", "tiny"]) == 0
    assert "near duplicates" in capsys.readouterr().out
    bad = tmp_path / "bad.jsonl"
    bad.write_text(train.read_text().splitlines()[0] + "\n{not json\n")
    assert main(["data", "audit", str(bad), "--model", "tiny"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{bad}:2: json: malformed JSON" in err
