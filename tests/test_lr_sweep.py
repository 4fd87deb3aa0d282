"""`tunegap sweep lr`: the rate chosen on validation, the 10x-ratio and within-5% rules on both sides of their
thresholds (planted numbers), and one --quick sweep checked against its own run ledgers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tunegap.analysis.common import AnalysisError, parse_floats
from tunegap.analysis.lr_sweep import choose_lr, gap_verdict, ratio_bounds, ratio_verdict, relative_gaps

GRID = [1e-4, 3e-4, 1e-3, 3e-3]


def _choice(lr, edge=None, overlap=False):
    return {"lr": lr, "edge": edge, "overlap": overlap}


# --------------------------------------------------------------------------- choosing on validation

def test_choose_lr_takes_the_lowest_seed_mean_and_counts_the_seeds_that_agree():
    per_seed = {1e-4: [3.0, 3.1, 3.05], 3e-4: [2.50, 2.52, 2.51], 1e-3: [2.00, 2.01, 2.60], 3e-3: [2.9, 2.8, 2.85]}
    c = choose_lr(per_seed)
    # 1e-3 has the lowest mean (2.203 < 2.51) though seed 2 alone prefers 3e-4: 2 of 3 seeds agree
    assert c["lr"] == 1e-3 and c["agree"] == 2 and c["seeds"] == 3
    assert c["edge"] is None
    # seed 2's 2.60 widens its interval (t = 4.3 at 2 degrees of freedom) past both neighbours' means
    assert c["overlap"] is True and c["overlaps_with"] == [3e-4, 3e-3]
    assert c["resolved"] is False


def test_choose_lr_resolves_a_clear_interior_minimum_and_flags_an_edge():
    clear = {1e-4: [3.0, 3.01, 3.02], 3e-4: [2.5, 2.51, 2.52], 1e-3: [2.0, 2.01, 2.02], 3e-3: [2.9, 2.91, 2.92]}
    c = choose_lr(clear)
    assert (c["lr"], c["agree"], c["overlap"], c["edge"], c["resolved"]) == (1e-3, 3, False, None, True)
    edge = choose_lr({lr: [v + 10 * lr for v in (2.0, 2.01, 2.02)] for lr in GRID})  # lower rate, lower loss
    assert edge["lr"] == 1e-4 and edge["edge"] == "low" and edge["resolved"] is False
    one_seed = choose_lr({lr: [v[0]] for lr, v in clear.items()})
    assert one_seed["lr"] == 1e-3 and one_seed["overlap"] is True  # one seed: no interval, nothing resolved


# --------------------------------------------------------------------------- rule (a): about 10x

@pytest.mark.parametrize("lora, full, expected", [
    (1e-3, 1e-4, True),        # 10x
    (3e-3, 1e-4, True),        # 30x (29.999999999999996 in floating point): the band's upper edge
    (3e-4, 1e-4, True),        # 3x: the lower edge
    (1e-2, 1e-4, False),       # 100x
    (3e-4, 3e-4, False),       # 1x: the same rate
    (1e-3, 1e-3 / 31, False),  # 31x: just outside
])
def test_ratio_rule_on_both_sides_of_its_band(lora, full, expected):
    supported, note = ratio_verdict(_choice(lora), _choice(full))
    assert supported is expected and note == ""


def test_ratio_rule_is_unresolved_when_an_argmin_is_not():
    supported, note = ratio_verdict(_choice(1e-3, overlap=True), _choice(1e-4))
    assert supported is None and "LoRA's best rate" in note and "not resolved" in note
    supported, note = ratio_verdict(_choice(1e-3), _choice(1e-4, overlap=True))
    assert supported is None and "full's best rate" in note


def test_ratio_rule_reads_an_edge_as_a_bound():
    # LoRA best at the top of its grid: the true ratio is 10x or more, which reaches beyond 30x: not resolved
    assert ratio_bounds(_choice(1e-3, edge="high"), _choice(1e-4)) == (10.0, math.inf)
    supported, note = ratio_verdict(_choice(1e-3, edge="high"), _choice(1e-4))
    assert supported is None and "edge" in note
    # LoRA best at the bottom of its grid and below full's rate: at most 1x, outside the band whatever lies beyond
    supported, _ = ratio_verdict(_choice(1e-4, edge="low"), _choice(1e-4))
    assert supported is False


# --------------------------------------------------------------------------- rule (b): within 5% at the best rates

def test_relative_gaps_pair_seeds_and_skip_missing_ones():
    assert relative_gaps([2.2, None, 3.3], [2.0, 2.0, 3.0]) == pytest.approx([0.1, 0.1])


@pytest.mark.parametrize("gaps, expected", [
    ([0.010, 0.012, 0.011], True),    # interval well below 5%
    ([0.10, 0.11, 0.12], False),      # well above
    ([-0.02, -0.03, -0.025], True),   # LoRA better than full: within 5% as well
    ([0.00, 0.10, 0.05], None),       # straddles 5%: not resolved
])
def test_gap_rule_on_both_sides_of_five_percent(gaps, expected):
    interval, supported, note = gap_verdict(gaps)
    assert supported is expected
    assert interval.mean == pytest.approx(sum(gaps) / len(gaps))
    assert (note != "") is (expected is None)


def test_grid_arguments_are_checked():
    assert parse_floats("1e-4, 3e-4", "--lora-lrs") == [1e-4, 3e-4]
    for bad in ("1e-4,x", "-1e-3", "0", ""):
        with pytest.raises(AnalysisError):
            parse_floats(bad, "--lora-lrs")


# --------------------------------------------------------------------------- --quick, end to end

def _refuse(constant: str):
    raise ValueError(f"results.json holds {constant}, which is not JSON")


def _ledger(run: str) -> dict:
    return json.loads((Path(run) / "ledger.json").read_text())


def test_quick_sweep_reports_the_test_metrics_of_the_arm_chosen_on_validation(tmp_path, capsys):
    from tunegap.cli import main

    out = tmp_path / "lr"
    assert main(["sweep", "lr", "--quick", "--task", "support", "--runs-dir", str(tmp_path / "runs"),
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "runs to train, predicted" in printed and "(measured) against a predicted" in printed
    results = json.loads((out / "results.json").read_text(), parse_constant=_refuse)  # strict JSON: no NaN
    assert results["seeds"] == 2 and results["tasks"] == ["support"]
    for task, res in results["per_task"].items():
        for method, arms in res["arms"].items():
            assert len(arms) == 2 and all(a["val_loss"]["seeds"] == 2 for a in arms)
            chosen = res["chosen"][method]
            # the chosen rate is the one of lowest mean validation loss, recomputed from the runs' own ledgers
            means = {a["lr"]: sum(_ledger(r)["metrics"]["val_loss"] for r in a["runs"]) / 2 for a in arms}
            assert chosen["lr"]["value"] == min(means, key=means.get)
            # and the reported test numbers are that arm's runs' eval_loss, not another arm's
            ledgers = [_ledger(r) for r in chosen["runs"]]
            assert all(led["config"]["lr"] == chosen["lr"]["value"] and led["config"]["method"] == method
                       and led["config"]["data"] == task for led in ledgers)
            assert chosen["eval_loss"]["per_seed"] == pytest.approx([led["metrics"]["eval_loss"] for led in ledgers])
            assert [led["config"]["seed"] for led in ledgers] == [0, 1]
        lora, full = res["chosen"]["lora"], res["chosen"]["full"]
        assert res["ratio"]["value"] == pytest.approx(lora["lr"]["value"] / full["lr"]["value"])
        gaps = [(a - b) / b for a, b in zip(lora["eval_loss"]["per_seed"], full["eval_loss"]["per_seed"])]
        assert res["test_loss_gap"]["per_seed"] == pytest.approx(gaps)
        assert res["ratio_verdict"]["supported"] is None  # two rates per method: every argmin sits at an edge
    # every run is finished now: a second sweep would train none of them (and predicts zero seconds for them)
    from tunegap.analysis.lr_sweep import lora_arm, pending_runs, task_config

    base = task_config("support", model="tiny", steps=3, runs_dir=str(tmp_path / "runs"), quick=True)
    assert base.val_examples == 4 and base.forgetting == "off"  # choosing reads validation, not forgetting
    chosen_lora = lora_arm(base, 16, results["per_task"]["support"]["chosen"]["lora"]["lr"]["value"])
    assert pending_runs(*chosen_lora, 2) == 0 and pending_runs(*chosen_lora, 3) == 1
    assert len(results["verdicts"]) == 2
    assert {v["anchor"]["paper"].split(",")[0] for v in results["verdicts"]} == {"Schulman et al. 2025"}
    assert all(v["unresolved"] == (v["supported"] is None) for v in results["verdicts"])
    section = json.loads((out / "section.json").read_text())
    assert section["images"] == ["lr_val_loss.png"] and (out / "lr_val_loss.png").stat().st_size > 10_000
