"""The data layouts users bring from TRL, Alpaca and ShareGPT, and parquet/arrow/`save_to_disk` tables.

Each layout loads to the same conversations as tunegap's own prompt/response file, trains a tiny model with the
same loss-bearing tokens, and a malformed record is one line naming its file, line or row, and field.
"""

from __future__ import annotations

import json

import datasets
import pyarrow as pa
import pyarrow.ipc  # noqa: F401  (pa.ipc)
import pyarrow.parquet as pq
import pytest

from conftest import FEW, tiny_config
from tunegap.cli import main
from tunegap.config import TrainConfig
from tunegap.data.loaders import SFT_FORMATS, DataError, load_corpus, load_sft
from tunegap.data.sources import data_kind
from tunegap.trainer import train

LAYOUTS = {
    "prompt-completion": lambda r: {"prompt": r["prompt"], "completion": r["response"]},
    "prompt-completion-chat": lambda r: {"prompt": [{"role": "user", "content": r["prompt"]}],
                                         "completion": [{"role": "assistant", "content": r["response"]}]},
    "alpaca": lambda r: {"instruction": r["prompt"], "input": "", "output": r["response"]},
    "sharegpt": lambda r: {"conversations": [{"from": "human", "value": r["prompt"]},
                                             {"from": "gpt", "value": r["response"]}]},
}
# one malformed record per layout, and the field its error must name
MALFORMED = {
    "prompt-completion": ({"prompt": "Hi"}, "completion: missing field"),
    "prompt-completion-chat": ({"prompt": [{"role": "user", "content": "Hi"}],
                                "completion": [{"role": "robot", "content": "x"}]}, "completion[0].role: unknown role"),
    "alpaca": ({"instruction": "Hi", "input": 3, "output": "x"}, "input: must be a string"),
    "sharegpt": ({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt"}]},
                 "conversations[1].value: missing field"),
}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_table(path, rows, kind):
    """`rows` as a parquet file, a `datasets.save_to_disk` folder, or a Hub-style folder (card + data/*.parquet)."""
    if kind == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), path.with_suffix(".parquet"))
        return path.with_suffix(".parquet")
    if kind in ("arrow-stream", "arrow-file"):
        table = pa.Table.from_pylist(rows)
        open_writer = pa.ipc.new_stream if kind == "arrow-stream" else pa.ipc.new_file
        with pa.OSFile(str(path.with_suffix(".arrow")), "wb") as sink, open_writer(sink, table.schema) as writer:
            writer.write_table(table)
        return path.with_suffix(".arrow")
    if kind == "save_to_disk":
        datasets.Dataset.from_list(rows).save_to_disk(str(path))
        return path
    (path / "data").mkdir(parents=True)
    (path / "README.md").write_text("---\nlicense: mit\n---\n# A data set card\nThis is prose, not training data.\n")
    pq.write_table(pa.Table.from_pylist(rows), path / "data" / "train-00000-of-00001.parquet")
    pq.write_table(pa.Table.from_pylist(rows[:1]), path / "data" / "test-00000-of-00001.parquet")
    return path


@pytest.fixture
def reference(few_jsonl):
    return load_sft(few_jsonl)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_each_jsonl_layout_loads_as_the_same_conversations_and_trains(tmp_path, reference, layout):
    path = write_jsonl(tmp_path / f"{layout}.jsonl", [LAYOUTS[layout](r) for r in FEW])
    assert load_sft(path) == reference
    ledger = train(tiny_config(tmp_path, data=str(path), name=layout, max_steps=2, seq_len=128))
    assert ledger["status"] == "completed"
    assert ledger["data"]["train"]["n_examples"] == len(FEW)
    assert ledger["data"]["train"]["n_loss_tokens"] > 0


def test_every_layout_puts_loss_on_the_same_tokens(tmp_path, few_jsonl):
    """Same conversations, same labels: the layout changes nothing the model sees."""
    stats = []
    for layout in ("prompt-response", *LAYOUTS):
        path = few_jsonl if layout == "prompt-response" else write_jsonl(
            tmp_path / f"{layout}.jsonl", [LAYOUTS[layout](r) for r in FEW])
        stats.append(train(tiny_config(tmp_path, data=str(path), name=layout, max_steps=1, seq_len=128))
                     ["data"]["train"])
    assert all(s == stats[0] for s in stats), stats


@pytest.mark.parametrize("layout", MALFORMED)
def test_a_malformed_record_is_one_line_naming_file_line_and_field(tmp_path, layout):
    bad, field = MALFORMED[layout]
    path = write_jsonl(tmp_path / "bad.jsonl", [LAYOUTS[layout](FEW[0]), bad])
    with pytest.raises(DataError) as caught:
        load_sft(path)
    assert str(caught.value).startswith(f"{path}:2: {field}") and "\n" not in str(caught.value)


def test_alpaca_input_joins_the_instruction_after_a_blank_line(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Translate.", "input": "hola", "output": "hello"}])
    assert load_sft(path)[0]["messages"][:2] == [{"role": "user", "content": "Translate.\n\nhola"},
                                                  {"role": "assistant", "content": "hello"}]


def test_format_flag_overrides_the_detection(tmp_path, capsys):
    path = write_jsonl(tmp_path / "a.jsonl", [LAYOUTS["alpaca"](r) for r in FEW])
    with pytest.raises(DataError, match=r"a.jsonl:1: conversations: missing field"):
        load_sft(path, format="sharegpt")
    assert main(["finetune", "--model", "tiny", "--data", str(path), "--format", "sharegpt", "--max-steps", "1",
                 "--runs-dir", str(tmp_path / "runs"), "--no-progress"]) == 2
    assert "a.jsonl:1: conversations: missing field" in capsys.readouterr().err


def test_the_config_offers_exactly_the_loaders_formats():
    field = TrainConfig.__dataclass_fields__["format"]
    assert tuple(field.metadata["choices"]) == SFT_FORMATS


@pytest.mark.parametrize("kind", ["parquet", "arrow-stream", "arrow-file", "save_to_disk", "hub-folder"])
def test_tables_load_and_train_like_jsonl(tmp_path, reference, kind):
    path = write_table(tmp_path / "set", [LAYOUTS["alpaca"](r) for r in FEW], kind)
    assert data_kind(str(path)) == "sft"
    assert load_sft(path) == reference  # a Hub folder: the train split only, never its README.md
    ledger = train(tiny_config(tmp_path, data=str(path), name=kind, max_steps=1, seq_len=128))
    assert ledger["data"]["train"]["n_examples"] == len(FEW)


@pytest.mark.parametrize("kind", ["parquet", "hub-folder"])
def test_a_malformed_row_names_file_row_and_field(tmp_path, kind):
    rows = [LAYOUTS["sharegpt"](r) for r in FEW]
    rows[2] = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "alien", "value": "x"}]}
    path = write_table(tmp_path / "set", rows, kind)
    with pytest.raises(DataError) as caught:
        load_sft(path)
    assert "row 3: conversations[1].from: unknown speaker 'alien'" in str(caught.value)
    assert str(caught.value).startswith(str(path if kind == "parquet" else path / "data" / "train-00000-of-00001.parquet"))


def test_a_hub_folder_of_text_is_a_corpus_and_its_card_is_not_read(tmp_path):
    docs = [{"text": "Lumora makes sync boxes."}, {"text": "The card must not be trained on."}]
    path = write_table(tmp_path / "corpus", docs, "hub-folder")
    assert data_kind(str(path)) == "corpus"
    assert load_corpus(path) == [d["text"] for d in docs]


def test_a_plain_folder_of_text_files_is_still_a_corpus(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.md").write_text("# Notes\nplain prose")
    assert data_kind(str(tmp_path / "c")) == "corpus" and load_corpus(tmp_path / "c") == ["# Notes\nplain prose"]


def test_data_show_marks_exactly_the_reply_and_its_end_of_turn(tmp_path, capsys):
    path = write_jsonl(tmp_path / "s.jsonl", [LAYOUTS["sharegpt"](r) for r in FEW])
    assert main(["data", "show", str(path), "--model", "tiny", "--row", "2"]) == 0
    out = capsys.readouterr().out
    assert "layout sharegpt (detected)" in out
    assert "<|im_start|>user\nSay hi to Bo.<|im_end|>\n<|im_start|>assistant\n[[Hi Bo, nice to meet you.<|im_end|>]]" in out
    assert out.count("[[") == 2  # the header's legend and the reply: the prompt and the markup carry none
    n = len("Hi Bo, nice to meet you.") + 1  # byte-level tokenizer: one token per byte, plus <|im_end|>
    assert f", {n} carry loss" in out


def test_data_show_says_what_seq_len_cuts_and_refuses_a_missing_row(tmp_path, capsys):
    path = write_jsonl(tmp_path / "s.jsonl", FEW)
    assert main(["data", "show", str(path), "--model", "tiny", "--seq-len", "40"]) == 0
    assert "cut by --seq-len 40" in capsys.readouterr().out
    assert main(["data", "show", str(path), "--model", "tiny", "--row", "9"]) == 2
    assert "s.jsonl:0: row: --row 9 is outside 1..4" in capsys.readouterr().err


def test_dpo_trains_on_a_hub_folder_of_preference_pairs(tmp_path):
    """TRL's preference layout as parquet in a Hub-style folder, through the preference loader DPO uses."""
    pairs = [{"prompt": r["prompt"], "chosen": r["response"], "rejected": "No."} for r in FEW]
    path = write_table(tmp_path / "prefs", pairs, "hub-folder")
    ledger = train(tiny_config(tmp_path, objective="dpo", data=str(path), name="dpo", max_steps=1, seq_len=128))
    assert ledger["status"] == "completed" and ledger["data"]["train"]["n_pairs"] == len(FEW)


def test_an_empty_parquet_file_is_one_line_not_a_traceback(tmp_path):
    pq.write_table(pa.table({"prompt": pa.array([], pa.string())}), tmp_path / "empty.parquet")
    with pytest.raises(DataError, match=r"empty.parquet:0: file: empty data set"):
        load_sft(tmp_path / "empty.parquet")
