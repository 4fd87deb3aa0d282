"""`tunegap decide`: the recommendation rule on both sides of its thresholds, and a --quick run whose numbers are
its parts' (the fine-tune's ledger, the formulas)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunegap.data.docstrings import token_f1
from tunegap.decide import Option, break_even, recommend

PROMPT = Option("prompt", quality=0.80, per_query_flops=10.0, one_time_flops=0.0, seconds_per_query=1.0)
TUNED = Option("fine-tune", quality=0.81, per_query_flops=2.0, one_time_flops=1000.0, seconds_per_query=1.0)


def test_the_fine_tune_is_recommended_only_past_its_break_even():
    even = break_even(TUNED, PROMPT)
    assert even == pytest.approx(125.0)  # 1000 FLOPs repaid at 8 FLOPs a query
    assert recommend([PROMPT, TUNED], 0.9 * even, tolerance=0.02)[0] is PROMPT
    assert recommend([PROMPT, TUNED], 1.1 * even, tolerance=0.02)[0] is TUNED


def test_an_option_outside_the_quality_tolerance_is_never_recommended_however_cheap():
    worse = Option("prompt", quality=0.78, per_query_flops=10.0, one_time_flops=0.0, seconds_per_query=1.0)
    assert recommend([worse, TUNED], 10, tolerance=0.02)[0] is TUNED  # 0.03 below the best: out
    inside = Option("prompt", quality=0.795, per_query_flops=10.0, one_time_flops=0.0, seconds_per_query=1.0)
    assert recommend([inside, TUNED], 10, tolerance=0.02)[0] is inside  # 0.015 below: in, and cheaper at 10


def test_a_fine_tune_whose_queries_cost_no_less_never_breaks_even():
    dear = Option("fine-tune", quality=0.9, per_query_flops=10.0, one_time_flops=1000.0, seconds_per_query=1.0)
    assert break_even(dear, PROMPT) is None


def test_token_f1():
    assert token_f1("the cat sat", "the cat sat") == 1.0
    assert token_f1("a dog", "the cat") == 0.0
    assert token_f1("the cat", "the cat sat down") == pytest.approx(2 * 1.0 * 0.5 / 1.5)


def test_decide_quick_recommends_from_numbers_equal_to_its_parts(tmp_path, capsys):
    from tunegap.cli import main

    out = tmp_path / "decide"
    assert main(["decide", "--quick", "--runs-dir", str(tmp_path / "runs"), "--out", str(out),
                 "--queries-per-month", "1000", "--months", "3"]) == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    ledger = json.loads((Path(results["fine_tune_run"]) / "ledger.json").read_text())
    rows = results["options"]
    tuned = rows["fine-tune (LoRA)"]
    assert tuned["one_time_flops"]["value"] == ledger["costs"]["flops_total"]["value"] > 0
    queries = results["queries"]["value"]
    assert queries == 3000
    for row in rows.values():
        assert row["horizon_usd"]["value"] == pytest.approx(row["one_time_usd"]["value"]
                                                            + queries * row["per_query_usd"]["value"])
    # the recommendation is the rule applied to the printed numbers
    options = [Option(n, r["quality"]["value"], r["per_query_flops"]["value"], r["one_time_flops"]["value"], 0.0)
               for n, r in rows.items()]
    assert recommend(options, queries, 0.02)[0].name == results["recommendation"]
    assert f"recommended for 3,000 queries: {results['recommendation']}" in printed
    assert (out / "decide.png").stat().st_size > 0 and (out / "section.json").is_file()
