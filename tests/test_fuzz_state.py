"""Hypothesis fuzzing of the files tunegap reads back: checkpoint progress and optimizer state, safetensors
headers, report sections and model config.json. Each is either accepted, and then what was accepted is sane, or
refused with one line that names the file; no other exception escapes."""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from tunegap.checkpoint import CheckpointError, load_checkpoint, load_tensors, read_progress
from tunegap.errors import ConfigError
from tunegap.io import DamagedFileError
from tunegap.ledger import Totals
from tunegap.models import CONFIG_COUNTS, CONFIG_NUMBERS, ModelError, check_model_config
from tunegap.report import gather_sections
from tunegap.safety import check_safetensors

# 120 inputs per test in CI; TUNEGAP_FUZZ_EXAMPLES=3000 reruns the one-off campaign docs/reliability.md reports.
FUZZ = settings(max_examples=int(os.environ.get("TUNEGAP_FUZZ_EXAMPLES", "120")), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                        HealthCheck.too_slow])

scalars = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=6)
           | st.sampled_from([0, 1, -1, 1.5, "64", "nan", 1e308, 2**63]))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=8)


def one_line_naming(err: Exception, path: Path) -> None:
    assert "\n" not in str(err) and str(path.name) in str(err), str(err)


# --------------------------------------------------------------------------- progress.json

def valid_progress() -> dict:
    totals = Totals(steps=4, examples=16, tokens=900, loss_tokens=300, train_seconds=1.5, counted_steps=[1, 4],
                    step_seconds=[0.3, 0.4, 0.4, 0.4], events=[{"event": "resumed"}]).to_dict()
    return {"step": 4, "totals": totals, "config_hash": "abc", "resolved": {"precision": "fp32", "device": "cpu"}}


@st.composite
def mutated_progress(draw):
    progress = valid_progress()
    for _ in range(draw(st.integers(1, 3))):
        where = draw(st.sampled_from(["top", "totals", "flops"]))
        target = {"top": progress, "totals": progress["totals"],
                  "flops": progress["totals"]["flops"]}[where] if isinstance(progress.get("totals"), dict) and \
            isinstance(progress["totals"].get("flops"), dict) else progress
        key = draw(st.sampled_from(sorted(target) + ["extra"]))
        if draw(st.booleans()):
            target.pop(key, None)
        else:
            target[key] = draw(json_values)
    return progress


@FUZZ
@given(progress=mutated_progress() | json_values)
def test_progress_is_accepted_sane_or_refused_naming_it(tmp_path, progress):
    step = tmp_path / "step-000004"
    step.mkdir(exist_ok=True)
    (step / "progress.json").write_text(json.dumps(progress))
    try:
        accepted = read_progress(step)
    except CheckpointError as err:
        one_line_naming(err, step / "progress.json")
        return
    totals = Totals.from_dict(accepted["totals"])
    assert totals.steps == accepted["step"] and totals.to_dict() == {**accepted["totals"], **totals.to_dict()}
    for value in (totals.steps, totals.examples, totals.tokens, totals.loss_tokens, totals.padding_tokens):
        assert isinstance(value, int) and not isinstance(value, bool) and value >= 0
    assert all(math.isfinite(v) and v >= 0 for v in (totals.train_seconds, totals.wall_seconds, totals.flops.total))


@FUZZ
@given(data=st.binary(max_size=60) | st.text(max_size=60).map(lambda t: t.encode("utf-8", "surrogatepass")))
def test_progress_of_arbitrary_bytes_is_refused_naming_it(tmp_path, data):
    (tmp_path / "progress.json").write_bytes(data)
    with pytest.raises(CheckpointError) as err:
        read_progress(tmp_path)
    one_line_naming(err.value, tmp_path / "progress.json")


# --------------------------------------------------------------------------- state.pt

def small_run():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return model, optimizer, scheduler


tensors = st.builds(lambda shape, dtype: torch.zeros(shape, dtype=dtype),
                    st.lists(st.integers(0, 4), max_size=3), st.sampled_from([torch.float32, torch.uint8, torch.int64]))
state_values = st.recursive(scalars | tensors, lambda inner: st.lists(inner, max_size=3)
                            | st.dictionaries(st.sampled_from(["state", "param_groups", "params", "lr", "exp_avg",
                                                               "step", "base_lrs", 0, 1]), inner, max_size=4),
                            max_leaves=10)


@FUZZ
@given(optimizer_state=state_values, scheduler_state=state_values, rng=state_values | tensors)
def test_optimizer_state_is_restored_or_refused_naming_it(tmp_path, optimizer_state, scheduler_state, rng):
    model, optimizer, scheduler = small_run()
    step = tmp_path / "step-000004"
    step.mkdir(exist_ok=True)
    save_file({n: p.detach().clone() for n, p in model.named_parameters()}, str(step / "trainable.safetensors"))
    (step / "progress.json").write_text(json.dumps(valid_progress()))
    torch.save({"optimizer": optimizer_state, "scheduler": scheduler_state, "rng": rng}, step / "state.pt")
    try:
        load_checkpoint(step, model=model, optimizer=optimizer, scheduler=scheduler)
    except CheckpointError as err:
        one_line_naming(err, step / "state.pt")
        return
    for group in optimizer.param_groups:  # accepted: every moment fits its parameter
        for p in group["params"]:
            assert all(v.shape == p.shape for v in optimizer.state.get(p, {}).values()
                       if torch.is_tensor(v) and v.dim())


# --------------------------------------------------------------------------- safetensors headers

DTYPES = ["F32", "F16", "BF16", "I64", "U8", "BOOL", "F8_E4M3", "X", "", 5, None]


@st.composite
def safetensors_bytes(draw):
    header = {}
    for name in draw(st.lists(st.text(min_size=1, max_size=4), max_size=3, unique=True)):
        entry = {"dtype": draw(st.sampled_from(DTYPES)),
                 "shape": draw(st.lists(st.integers(-2, 2**40) | st.sampled_from([0, 1, 2, 3]), max_size=3)
                               | json_values),
                 "data_offsets": draw(st.lists(st.integers(-4, 2**64) | st.integers(0, 64), min_size=0, max_size=3)
                                      | json_values)}
        for key in draw(st.lists(st.sampled_from(list(entry)), max_size=2)):
            entry.pop(key, None)
        header[name] = entry
    if draw(st.booleans()):
        header["__metadata__"] = draw(json_values)
    raw = json.dumps(header).encode() + b" " * draw(st.integers(0, 8))
    length = draw(st.sampled_from([len(raw), len(raw) + 1, len(raw) - 1, 0, 2**62, 2**64 - 1]) | st.integers(0, 10**6))
    body = draw(st.binary(max_size=96))
    return struct.pack("<Q", max(0, min(length, 2**64 - 1))) + raw + body


def valid_file_mutations():
    """(where, how, byte): a real file damaged at one place."""
    return st.tuples(st.integers(0, 400), st.sampled_from(["flip", "truncate", "extend"]), st.integers(0, 255))


@FUZZ
@given(data=safetensors_bytes())
def test_safetensors_header_is_checked_before_anything_loads_it(tmp_path, data):
    path = tmp_path / "x.safetensors"
    path.write_bytes(data)
    try:
        check_safetensors(path)
    except DamagedFileError as err:
        one_line_naming(err, path)
        with pytest.raises(CheckpointError):  # the checkpoint reader refuses the same file, on one line
            load_tensors(path)
        return
    tensors = load_file(str(path))  # accepted by the check: the real loader must read it
    assert all(isinstance(t, torch.Tensor) for t in tensors.values())


@FUZZ
@given(edit=valid_file_mutations())
def test_a_damaged_real_safetensors_file_is_refused_or_loads(tmp_path, edit):
    path = tmp_path / "w.safetensors"
    save_file({"a": torch.arange(24, dtype=torch.float32).view(4, 6), "b": torch.ones(3, dtype=torch.bfloat16)},
              str(path))
    data = bytearray(path.read_bytes())
    at, how, value = edit
    at %= len(data)
    if how == "flip":
        data[at] ^= value or 1
    elif how == "truncate":
        del data[at:]
    else:
        data += bytes([value]) * (at % 17 + 1)
    path.write_bytes(bytes(data))
    try:
        check_safetensors(path)
    except DamagedFileError as err:
        one_line_naming(err, path)
        return
    load_file(str(path))


# --------------------------------------------------------------------------- section.json

section_fields = st.fixed_dictionaries({}, optional={
    "title": st.text(max_size=8) | json_values, "body_markdown": st.text(max_size=20) | json_values,
    "order": st.integers(-5, 200) | json_values,
    "images": st.lists(st.sampled_from(["chart.png", "../secret.txt", "/etc/hostname", "sub/chart.png", "link.png",
                                        "missing.png", "", ".", ".."]) | json_values, max_size=3) | json_values,
    "verdicts": st.lists(st.fixed_dictionaries({}, optional={"claim": st.text(max_size=5) | json_values,
                                                             "measured": st.text(max_size=5) | json_values,
                                                             "supported": st.sampled_from([True, False, None, 1, "y"]),
                                                             "note": st.text(max_size=5) | json_values,
                                                             "extra": json_values}), max_size=2) | json_values,
    "unknown": json_values})


@FUZZ
@given(section=section_fields | json_values)
def test_section_file_is_gathered_with_its_own_images_or_refused_naming_it(tmp_path, section):
    root = tmp_path / "results"
    folder = root / "a"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sub").mkdir(exist_ok=True)
    (folder / "chart.png").write_bytes(b"png")
    (folder / "sub" / "chart.png").write_bytes(b"png")
    (tmp_path / "secret.txt").write_text("SECRET")
    if not (folder / "link.png").is_symlink():
        (folder / "link.png").symlink_to(tmp_path / "secret.txt")
    (folder / "section.json").write_text(json.dumps(section))
    try:
        sections = gather_sections(root)
    except (ConfigError, DamagedFileError) as err:
        one_line_naming(err, folder / "section.json")
        return
    for s in sections:
        assert isinstance(s.title, str) and isinstance(s.body_markdown, str) and isinstance(s.order, int)
        assert all(Path(p) == folder / "chart.png" for p in s.images), s.images


# --------------------------------------------------------------------------- model config.json

config_fields = st.fixed_dictionaries({}, optional={key: st.integers(-3, 4096) | json_values
                                                    for key in (*CONFIG_COUNTS, *CONFIG_NUMBERS)})


@FUZZ
@given(config=config_fields | json_values)
def test_model_config_types_are_checked_naming_file_and_key(tmp_path, config):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    try:
        checked = check_model_config(path)
    except (ModelError, DamagedFileError) as err:
        one_line_naming(err, path)
        return
    for key in CONFIG_COUNTS:
        value = checked.get(key)
        assert value is None or (type(value) is int and value >= 1), (key, value)
    for key in CONFIG_NUMBERS:
        value = checked.get(key)
        assert value is None or (type(value) in (int, float) and math.isfinite(value) and value > 0), (key, value)
