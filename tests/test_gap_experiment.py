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


def test_gap_axes_match_known_answers(quick_gap):
    """Known answers, not the definitions: the token axis is the given pretraining token count over the tokens the
    arm's own ledger spent; full fine-tuning and pretraining run the same model, so per token pretraining costs
    more only by attention over its longer sequences (2048 vs 512 tokens: a large share on a 64-wide model);
    LoRA skips frozen weights' gradients, so pretraining over LoRA per token is larger still."""
    out, results = quick_gap
    for name in ("full", "lora-r8"):
        ledger = json.loads((out / "arms" / name / "ledger.json").read_text())
        assert results["gap"][name]["cost_multipliers"]["tokens"] == pytest.approx(
            2e12 / ledger["costs"]["tokens"]["value"], rel=1e-9)
    per_token = {n: g["cost_multipliers"]["flops_per_token"] for n, g in results["gap"].items()}
    assert 1.0 < per_token["full"] < 5.0
    assert per_token["lora-r8"] > per_token["full"]


def test_break_even_counts_queries_on_planted_costs():
    assert break_even(1e12, 1e9) == pytest.approx(1000.0)  # 1e12 FLOPs once = 1000 queries at 1e9 extra each
    assert break_even(3e15, 2e12) == pytest.approx(1500.0)
    assert break_even(100.0, 0.0) is None and break_even(100.0, -5.0) is None


def test_more_shots_cost_more_per_query_by_the_shot_tokens(quick_gap):
    _, results = quick_gap
    zero, one = results["icl"]["icl-0"], results["icl"]["icl-1"]
    extra_tokens = one["metrics"]["mean_prompt_tokens"] - zero["metrics"]["mean_prompt_tokens"]
    assert extra_tokens > 50  # one solved ticket, byte-level tokens
    extra = one["inference_flops_per_query"] - zero["inference_flops_per_query"]
    assert extra > 0 and results["break_even"]["icl_extra_flops_per_query"] == pytest.approx(extra)


def test_scratch_loses_to_the_pretrained_base(quick_gap):
    """The quick base is pretrained on stdlib docstrings, so scratch (same architecture, fresh weights, same data
    and budget) must end with a clearly higher held-out loss, and its verdict says so."""
    _, results = quick_gap
    full, scratch = results["trained"]["full"]["metrics"], results["trained"]["scratch"]["metrics"]
    assert scratch["eval_loss"] > 1.1 * full["eval_loss"]
    verdict = next(v for v in results["verdicts"] if v["claim"].startswith("pretraining builds"))
    assert verdict["supported"] is True


def test_arms_with_an_unchanged_config_are_reused(quick_gap, capsys):
    out, results = quick_gap
    again = run_gap_experiment(GapConfig.quick_config(out=str(out), k_shots=(0,)))
    assert "reusing arm lora-r8" in capsys.readouterr().out
    assert again["trained"]["full"]["costs"] == results["trained"]["full"]["costs"]


def test_verdicts_cover_the_essays_claims(quick_gap):
    out, results = quick_gap
    claims = " ".join(v["claim"] for v in results["verdicts"])
    for phrase in ("under 1%", "close to full", "10-100x", "four or more orders"):
        assert phrase in claims
    assert all(v["anchor"]["paper"] and v["anchor"]["comparison"] for v in results["verdicts"])
    report = (out / "report.md").read_text()
    assert "published result" in report and "Hu et al. 2021" in report
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


def test_every_arm_is_predicted_before_it_runs_and_measured_after(quick_gap):
    out, results = quick_gap
    durations = results["durations"]
    assert set(durations) == {"icl", "lora-r8", "full", "scratch"}
    for arm in durations.values():
        assert arm["predicted_s"] > 0 and arm["measured_s"] > 0
        assert arm["predicted_s"] == pytest.approx(sum(arm["predicted_parts_s"].values()))
    # a training arm's prediction covers what its trainer then times: training, held-out loss, task metrics
    parts = durations["full"]["predicted_parts_s"]
    assert {"setup", "training", "held-out loss", "checkpoint and outputs"} <= set(parts)
