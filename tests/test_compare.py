"""`tunegap compare`: finished runs side by side from their ledgers, every number with unit and provenance;
a chart with --png; anything that is not a finished run is one line and exit code 2."""

from __future__ import annotations

import json

import pytest

from conftest import tiny_config
from tunegap.cli import main


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """A tiny LoRA SFT run and a tiny GRPO run (2 steps each)."""
    from tunegap.trainer import train

    tmp = tmp_path_factory.mktemp("compare")
    train(tiny_config(tmp, name="sft-run", max_steps=2, forgetting=False))
    train(tiny_config(tmp, name="rl-run", objective="grpo", reward="style", group_size=2, max_new_tokens=8,
                      max_steps=2, generate_examples=2, forgetting=False))
    return tmp / "runs"


def test_two_runs_side_by_side_with_a_chart(two_runs, tmp_path, capsys):
    png = tmp_path / "compare.png"
    assert main(["compare", str(two_runs / "sft-run"), "rl-run", "--runs-dir", str(two_runs), "--png", str(png)]) == 0
    out = capsys.readouterr().out
    header = out.splitlines()[0]
    assert "sft-run" in header and "rl-run" in header
    table = {line.split("  ")[0]: line for line in out.splitlines()}
    assert "(measured)" in table["trainable params"] and "parameter" in table["trainable params"]
    assert "(formula)" in table["FLOPs (update)"] and "(estimate)" in table["dollars"]
    assert table["counted / formula"].count("1 ratio (measured)") == 2
    generation = table["rl: generation_flops"].split()
    assert generation[2] == "-" and "(formula)" in table["rl: generation_flops"]  # the SFT run has no such phase
    assert "reward (measured)" in table["metric: eval_reward"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_json_rows_keep_unit_and_how(two_runs, capsys):
    assert main(["compare", "sft-run", "rl-run", "--runs-dir", str(two_runs), "--json"]) == 0
    rows = {r["label"]: r["cells"] for r in json.loads(capsys.readouterr().out)["rows"]}
    assert rows["peak memory"][0]["unit"] == "byte" and rows["peak memory"][0]["how"] == "measured"
    assert rows["rl: update_time_s"][0] is None and rows["rl: update_time_s"][1]["how"] == "measured"


@pytest.mark.parametrize("problem", ["missing", "unfinished", "not json"])
def test_bad_input_is_one_line_and_exit_code_2(tmp_path, capsys, problem):
    run = tmp_path / "r"
    if problem != "missing":
        run.mkdir()
        text = json.dumps({"status": "running", "costs": {}}) if problem == "unfinished" else "{not json"
        (run / "ledger.json").write_text(text)
    assert main(["compare", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tunegap: error: ") and err.count("\n") == 1 and str(run) in err
