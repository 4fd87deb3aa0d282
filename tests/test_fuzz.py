"""Property-based tests: whatever a user feeds tunegap (data files, config files, command lines), the answer is
the right records, a counted skip, or one `path:line: field: problem` line; never a traceback, never a silently
wrong result. Loader basics (garbage lines, JSON values) are in test_data.py; these add oracles and the
config and CLI layers.
"""

from __future__ import annotations

import io
import json
import re
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tunegap.config import ConfigError, TrainConfig
from tunegap.data.loaders import ROLES, DataError, load_corpus, load_preferences, load_sft

FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                      HealthCheck.too_slow])

# Values of every JSON/YAML type, including the awkward ones: empty, whitespace, huge, non-finite.
_scalars = (st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.sampled_from([0, -1, 10**30])
            | st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from(["", " ", "\t\n", "x", "ü" * 3])
            | st.text(max_size=12))
_values = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=3)
                       | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=6)
_json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=6),
                            lambda inner: st.lists(inner, max_size=3)
                            | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=6)


def _write(tmp_path: Path, name: str, lines: list) -> Path:
    path = tmp_path / name
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def _one_line_error(err: Exception, path: Path, line: int | None = None) -> None:
    text = str(err)
    assert "\n" not in text and text.startswith(f"{path}:"), text
    if line is not None:
        assert text.startswith(f"{path}:{line}: "), text


# --------------------------------------------------------------------------- SFT messages, with an oracle

_role = st.sampled_from([*ROLES, "tool", "User", "", None, 1])
_content = st.sampled_from(["hi", "", "  ", "a\nb", "é" * 3]) | st.none() | st.integers(0, 3)
_message = st.fixed_dictionaries({}, optional={"role": _role, "content": _content, "name": st.just("x")})


def _valid_conversation(messages) -> bool:
    """The documented rules, written independently of the loader."""
    if not isinstance(messages, list) or not messages:
        return False
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            return False
        if m["role"] not in ROLES or not isinstance(m["content"], str) or not m["content"].strip():
            return False
        if m["role"] == "system" and i != 0:
            return False
    turns = [m["role"] for m in messages if m["role"] != "system"]
    return bool(turns) and turns[0] == "user" and messages[-1]["role"] == "assistant"


@FUZZ
@given(messages=st.lists(_message, max_size=5), before=st.integers(0, 3))
def test_sft_messages_accepted_exactly_when_valid_and_kept_verbatim(tmp_path, messages, before):
    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    path = _write(tmp_path, "m.jsonl", [good] * before + [{"messages": messages, "meta": {"k": 1}}])
    valid = _valid_conversation(messages)
    try:
        records = load_sft(path)
    except DataError as err:
        assert not valid, err
        _one_line_error(err, path, before + 1)
        assert err.field.startswith("messages")
        kept, report = load_sft(path, on_error="skip", report=True) if before else (None, None)
        if before:
            assert report.n_skipped == 1 and len(kept) == before
        return
    assert valid
    assert records[-1] == {"messages": [{"role": m["role"], "content": m["content"]} for m in messages],
                           "meta": {"k": 1}}


# --------------------------------------------------------------------------- preference pairs, with an oracle

_text_or_junk = st.sampled_from(["A", "B", "", " ", "same"]) | st.none() | st.integers(0, 2) | st.lists(st.just("A"),
                                                                                                    max_size=1)


@FUZZ
@given(record=st.fixed_dictionaries({}, optional={"prompt": _text_or_junk, "chosen": _text_or_junk,
                                                  "rejected": _text_or_junk, "system": _text_or_junk,
                                                  "extra": _json_values}))
def test_preference_pairs_accepted_exactly_when_valid(tmp_path, record):
    path = _write(tmp_path, "p.jsonl", [{"prompt": "Q", "chosen": "A", "rejected": "B"}, record])
    text_ok = lambda k: isinstance(record.get(k), str) and record[k].strip()  # noqa: E731
    valid = (all(text_ok(k) for k in ("prompt", "chosen", "rejected")) and ("system" not in record or text_ok("system"))
             and record["chosen"] != record["rejected"])
    try:
        records = load_preferences(path)
    except DataError as err:
        assert not valid, err
        _one_line_error(err, path, 2)
        assert err.field in ("prompt", "chosen", "rejected", "system")
        return
    assert valid and records[1] == record


# --------------------------------------------------------------------------- corpora: bytes in, text or one line out

@FUZZ
@given(files=st.lists(st.binary(max_size=60), min_size=1, max_size=4))
def test_corpus_folder_of_arbitrary_bytes(tmp_path, files):
    folder = tmp_path / "corpus"
    if folder.exists():
        for f in folder.iterdir():
            f.unlink()
    folder.mkdir(exist_ok=True)
    expected, bad = [], 0
    for i, data in enumerate(files):
        (folder / f"{i:02d}.txt").write_bytes(data)
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError:
            bad += 1
            continue
        if text.strip():
            expected.append(text)
        else:
            bad += 1
    if not expected:
        with pytest.raises(DataError) as err:
            load_corpus(folder, on_error="skip")
        assert "\n" not in str(err.value)
        return
    docs, report = load_corpus(folder, on_error="skip", report=True)
    assert docs == expected and report.n_skipped == bad  # every document exact, every skip counted
    if bad:
        with pytest.raises(DataError) as err:
            load_corpus(folder)
        assert re.match(rf"{re.escape(str(folder))}/\d\d\.txt:\d+: text: ", str(err.value)), err.value


def test_very_long_lines_load_or_fail_on_their_line(tmp_path):
    long = "x" * 2_000_000
    path = _write(tmp_path, "long.jsonl", [{"prompt": "q", "response": long}, {"prompt": long}])
    with pytest.raises(DataError) as err:
        load_sft(path)
    _one_line_error(err.value, path, 2)
    assert len(str(err.value)) < 300  # the message names the problem, not the 2 MB of text
    records, report = load_sft(path, on_error="skip", report=True)
    assert records[0]["messages"][1]["content"] == long and report.n_skipped == 1


# --------------------------------------------------------------------------- rendering: context and templates

def _sft_config(tmp_path, data: Path, **kw):
    from tunegap.config import TrainConfig

    return TrainConfig(model="tiny", data=str(data), seq_len=kw.pop("seq_len", 64), train_examples=0,
                       runs_dir=str(tmp_path / "runs"), name="f", progress=False, **kw)


def test_prompt_longer_than_the_context_is_a_counted_skip(tmp_path):
    from tunegap.data.sources import prepare
    from tunegap.models import tiny_tokenizer

    rows = [{"prompt": "hi", "response": "hello"}, {"prompt": "p" * 500, "response": "never seen"},
            {"prompt": "yo", "response": "hey"}]
    path = _write(tmp_path, "ctx.jsonl", rows)
    data = prepare(_sft_config(tmp_path, path), tiny_tokenizer())
    assert len(data.train) == 2 and data.stats["train"]["n_dropped"] == 1
    only_long = _write(tmp_path, "long.jsonl", [rows[1]])
    with pytest.raises(DataError, match=r"long.jsonl:0: file: no training example left .*1 dropped"):
        prepare(_sft_config(tmp_path, only_long), tiny_tokenizer())


@pytest.mark.parametrize("template, problem", [
    # a template that refuses system messages (as Gemma's and Mistral's do)
    ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
     "{% endif %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}", "System role not supported"),
    # a template that rewrites replies, so the reply's tokens cannot be located for the loss mask
    ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] | upper + '<|im_end|>' }}{% endfor %}"
     "{% if add_generation_prompt %}assistant: {% endif %}", "does not reproduce assistant message"),
])
def test_mismatched_chat_template_is_a_data_error_on_the_line(tmp_path, template, problem):
    from tunegap.data.sources import prepare
    from tunegap.models import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = template
    rows = [{"prompt": "hi", "response": "HELLO"}, {"prompt": "hi", "response": "HEY"},
            {"system": "Be brief.", "prompt": "hi", "response": "hello there"}]
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\n" + json.dumps(rows[2]) + "\n")
    with pytest.raises(DataError) as err:
        prepare(_sft_config(tmp_path, path, seq_len=256), tokenizer)
    assert str(err.value).startswith(f"{path}:4: messages: the model's chat template cannot render"), err.value
    assert problem in str(err.value) and "\n" not in str(err.value)


# --------------------------------------------------------------------------- config files

_FIELDS = [f for f in TrainConfig.__dataclass_fields__]


@FUZZ
@given(values=st.dictionaries(st.sampled_from([*_FIELDS, "unknown_key", "Rank", ""]) | st.text(max_size=4),
                              _values, max_size=5))
def test_config_file_is_a_valid_config_or_one_line_error(tmp_path, values):
    import yaml

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(values, allow_unicode=True))
    try:
        config = TrainConfig.from_file(path)
    except ConfigError as err:
        assert re.match(rf"{re.escape(str(path))}:\d+: [^\n]+: [^\n]+$", str(err)), str(err)
        return
    for key, value in values.items():  # accepted: exactly what the file said (an int may stand for a float)
        got = getattr(config, key)
        if type(got) is str and type(value) is bool:  # an on/off/auto setting: YAML reads `off` as false
            assert got == ("on" if value else "off")
            continue
        assert got == (float(value) if type(got) is float else value) and type(got) in (type(value), float)


@FUZZ
@given(text=st.text(max_size=80) | st.binary(max_size=80).map(lambda b: b.decode("latin-1")))
def test_config_file_of_arbitrary_text(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogateescape")
    try:
        TrainConfig.from_file(path)
    except ConfigError as err:
        assert str(err).startswith(f"{path}:") and "\n" not in str(err), str(err)


def test_config_file_errors_name_the_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("method: lora\nrank: 8\n\nlr: -1\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}:4: lr: must be positive"):
        TrainConfig.from_file(path)
    path.write_text("rank: eight\n")
    with pytest.raises(ConfigError, match=r":1: rank: must be an integer, got str 'eight'"):
        TrainConfig.from_file(path)
    path.write_text("precision: fp16\n")
    with pytest.raises(ConfigError, match=r":1: precision: must be one of auto, fp32, bf16"):
        TrainConfig.from_file(path)
    path.write_bytes(b"rank: \xff\n")
    with pytest.raises(ConfigError, match=r":0: file: cannot read"):
        TrainConfig.from_file(path)


# --------------------------------------------------------------------------- command lines

_NUMBERS = ["0", "1", "-1", "-0.5", "2", "64", "1e-3", "nan", "inf", "-inf", "1e400", "99999999999999999999",
            "0x10", "1_000", "10M", "2.5T", "3k", "x", "", " ", "--"]
_NAMES = ["tiny", "lora", "full", "freeze", "ia3", "prompt", "prefix", "adapter", "bogus", "support", "cpu",
          "H100-SXM", "fp32", "bf16", "auto", "ddp", "../..", "/nonexistent", ".", "a,b", "q,k"]
_SKIP = {"--nproc", "--config", "--png", "--help", "-h", "--runs-dir", "--name", "--tokenizer"}


def _flags(command: str) -> list[str]:
    from tunegap.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices[command]
    return sorted(s for a in sub._actions for s in a.option_strings if s not in _SKIP)


@pytest.fixture(scope="module")
def existing_run(tmp_path_factory):
    """A run folder whose saved settings can never match: any valid finetune command line stops right after
    validation ("run exists" / "changed settings"), so fuzzing never starts a real training."""
    runs = tmp_path_factory.mktemp("fuzz") / "runs"
    (runs / "fuzzed").mkdir(parents=True)
    (runs / "fuzzed" / "config.json").write_text(json.dumps({"model": "never"}))
    (runs / "fuzzed" / "ledger.json").write_text("{}")
    return runs


def _run_cli(argv: list[str]) -> tuple[int, str, str]:
    from tunegap.cli import main

    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


@st.composite
def _command_lines(draw):
    command = draw(st.sampled_from(["finetune", "pretrain", "estimate", "gap", "runs", "eval", "generate", "nope"]))
    flags = _flags(command) if command != "nope" else ["--x"]
    argv = [command]
    for _ in range(draw(st.integers(0, 5))):
        argv.append(draw(st.sampled_from(flags) | st.sampled_from(["-x", "--no-such-flag", "positional"])))
        if draw(st.booleans()):
            argv.append(draw(st.sampled_from(_NUMBERS + _NAMES)))
    return argv


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(argv=_command_lines())
def test_any_command_line_runs_or_fails_on_one_line(existing_run, argv):
    command = argv[0]
    if command in ("finetune", "pretrain"):
        argv = [*argv, "--runs-dir", str(existing_run), "--name", "fuzzed"]
    elif command in ("eval", "generate"):  # fail before loading any model: no such run / outside the folder
        argv = [*argv, "--runs-dir", str(existing_run), "--run", "../fuzzed-nowhere"]
    elif command == "runs" or "--against" in argv:
        argv = [*argv, "--runs-dir", str(existing_run)]
    code, out, err = _run_cli(argv)  # an exception escaping main() fails the test with its traceback
    assert "Traceback" not in err
    if code == 0:
        assert command in ("estimate", "gap", "runs"), (argv, out)
    else:
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("tunegap: error: "), (argv, err)


@pytest.mark.parametrize("argv", [
    ["finetune", "--lr", "nan"], ["finetune", "--epochs", "inf"], ["finetune", "--gpu-price", "1e400"],
    ["finetune", "--rank", "1.5"], ["finetune", "--precision", "fp16"], ["finetune", "--name", "../../x"],
    ["finetune", "--data", "/nonexistent.jsonl", "--model", "tiny", "--name", "bad-data"], ["generate"],
    ["eval", "--run", "/etc"],
    ["runs", "--runs-dir", "/dev/null"], [], ["--version"],
])
def test_known_bad_command_lines(existing_run, argv):
    if argv[:1] == ["finetune"]:
        argv = [*argv, "--runs-dir", str(existing_run), "--no-progress", "--threads", "1"]
    code, _, err = _run_cli(argv)
    lines = err.strip().splitlines()
    if argv[:1] == ["runs"]:
        assert code == 0  # nothing indexed there: an empty list, not an error
    else:
        assert code == 2 and len(lines) == 1 and lines[0].startswith("tunegap: error: "), err


def test_help_of_every_command_renders():
    from tunegap.cli import build_parser

    commands = next(a for a in build_parser()._actions if a.dest == "command").choices
    for command in ["", *commands]:
        code, out, err = _run_cli([command, "--help"] if command else ["--help"])
        assert code == 0 and "usage:" in out and not err, (command, err)
