"""The main job's smoke version: every arm runs, results.json agrees with the ledgers, the report renders."""

from __future__ import annotations

import json
import math

import pytest

from browser import needs_browser, open_report
from tunegap.experiments.gap_experiment import GapConfig, break_even, run_gap_experiment


@pytest.fixture(scope="module")
def quick_gap(tmp_path_factory):
    out = tmp_path_factory.mktemp("gap")
    results = run_gap_experiment(GapConfig.quick_config(out=str(out)))
    return out, results


def test_results_agree_with_each_arms_ledger(quick_gap):
    out, results = quick_gap
    saved = json.loads((out / "results.json").read_text())
    assert set(saved["trained"]) == {"lora-r8", "full", "scratch"}
    assert set(saved["icl"]) == {"icl-0", "icl-1"}
    for name, arm in saved["trained"].items():
        ledger = json.loads((out / "arms" / name / "ledger.json").read_text())
        assert arm["costs"] == ledger["costs"]
        assert arm["metrics"]["eval_loss"] == ledger["metrics"]["eval_loss"]
        assert arm["costs"]["tokens"]["value"] >= 4_000  # the token budget was spent
        curve = arm["loss_curve"]
        assert [c["step"] for c in curve] == list(range(1, len(curve) + 1))
        assert curve[-1]["flops"] == pytest.approx(arm["costs"]["flops_total"]["value"])


def test_gap_multipliers_multiply_to_the_total(quick_gap):
    _, results = quick_gap
    for name, gap in results["gap"].items():
        m = gap["cost_multipliers"]
        assert m["tokens"] * m["flops_per_token"] == pytest.approx(gap["flops"], rel=1e-9)
        pre = results["pretrain"]["costs"]["flops_total"]["value"]
        assert gap["flops"] == pytest.approx(pre / results["trained"][name]["costs"]["flops_total"]["value"])


def test_break_even_and_icl_costs(quick_gap):
    _, results = quick_gap
    assert results["icl"]["icl-1"]["inference_flops_per_query"] > results["icl"]["icl-0"]["inference_flops_per_query"]
    be = results["break_even"]
    assert be["queries"] == pytest.approx(be["train_flops"] / be["icl_extra_flops_per_query"])
    assert break_even(100.0, 0.0) is None


def test_arms_with_an_unchanged_config_are_reused(quick_gap, capsys):
    out, results = quick_gap
    again = run_gap_experiment(GapConfig.quick_config(out=str(out), k_shots=(0,)))
    assert "reusing arm lora-r8" in capsys.readouterr().out
    assert again["trained"]["full"]["costs"] == results["trained"]["full"]["costs"]


def test_verdicts_cover_the_essays_claims(quick_gap):
    _, results = quick_gap
    claims = " ".join(v["claim"] for v in results["verdicts"])
    for phrase in ("under 1%", "close to full", "10-100x", "four or more orders"):
        assert phrase in claims
    total = next(v for v in results["verdicts"] if "orders of magnitude" in v["claim"])
    ratio = results["gap"]["lora-r8"]["flops"]
    assert total["supported"] == (ratio >= 1e4) and f"10^{math.log10(ratio):.1f}" in total["measured"]


@needs_browser
def test_report_opens_in_a_real_browser_with_its_charts(quick_gap):
    out, _ = quick_gap
    seen = open_report(out / "report.html")
    assert len(seen["images"]) >= 3
    assert all(complete and width > 100 and height > 100 for complete, width, height in seen["images"])
    assert seen["errors"] == []
    assert seen["colours"] > 50  # a blank or unstyled page has a handful of colours
    assert "tunegap" in seen["title"]
