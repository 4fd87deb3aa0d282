"""The post-training ladder: SFT, then DPO from it, then RL from that, beside pretraining (estimated)."""

from __future__ import annotations

import json

import pytest

from tunegap.experiments.stages import DRAMATIC, StagesConfig, ladder_verdict, run_stages_experiment


def test_ladder_verdict_on_both_sides_of_the_threshold():
    clear = ladder_verdict({"pretraining": 1e21, "sft": 1e13, "dpo": 1e13 / DRAMATIC, "rl": 1e13 / DRAMATIC ** 2})
    assert clear["supported"] is True
    rl_dearer = ladder_verdict({"pretraining": 1e21, "sft": 1e13, "dpo": 1e12, "rl": 1e12 / (0.99 * DRAMATIC)})
    assert rl_dearer["supported"] is False and "dpo/rl" in rl_dearer["measured"] and "sft/dpo" not in \
        rl_dearer["measured"].split("under")[1]


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("stages")
    return out, run_stages_experiment(StagesConfig.quick_config(out=str(out)))


def test_quick_ladder_runs_each_stage_from_the_one_before(quick):
    out, results = quick
    assert list(results["stages"]) == ["sft", "dpo", "rl"]
    configs = {name: json.loads((out / "stages" / name / "config.json").read_text()) for name in ("sft", "dpo", "rl")}
    assert configs["dpo"]["init_from"] == "sft" and configs["rl"]["init_from"] == "dpo"
    assert [configs[n]["objective"] for n in ("sft", "dpo", "rl")] == ["next-token", "dpo", "grpo"]
    rl = results["stages"]["rl"]["flops"]["parts"]
    assert rl["sampling"] > 0 and rl["update"] > 0  # RL's cost is mostly its sampling, counted apart
    assert results["pretraining"]["flops"] > 1e6 * max(r["flops"]["total"] for r in results["stages"].values())
    assert results["verdicts"][0]["supported"] in (True, False)
    assert (out / "report.html").read_text().count("<img") == 1


def test_a_second_ladder_reuses_every_stage(quick, capsys):
    out, results = quick
    again = run_stages_experiment(StagesConfig.quick_config(out=str(out)))
    assert capsys.readouterr().out.count("reusing stage") == 3
    assert again["stages"]["rl"]["flops"] == results["stages"]["rl"]["flops"]
