"""`tunegap sweep freeze`: which blocks each k freezes, the k the verdict reads, the 5% rule on both sides of
its threshold (planted numbers), and one --quick sweep checked against its own run ledgers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunegap.analysis.common import AnalysisError
from tunegap.analysis.freeze_sweep import check_ks, default_ks, freeze_arm, loss_verdict, verdict_k
from tunegap.analysis.lr_sweep import task_config


def test_default_ks_and_the_verdict_k_on_the_default_model_and_the_tiny_one():
    assert default_ks(30) == [0, 7, 15, 22, 29]
    assert verdict_k(default_ks(30), 30) == 22
    assert verdict_k([0, 10, 25], 30) == 25  # 3L/4 = 22.5: 25 is nearer than 10
    assert verdict_k([0], 30) is None
    assert default_ks(2) == [0, 1] and verdict_k([0, 1], 2) == 1
    assert check_ks([7, 0, 7], 30) == [0, 7]
    for bad in ([30], [-1], []):
        with pytest.raises(AnalysisError):
            check_ks(bad, 30)


def test_k_frozen_means_the_bottom_k_blocks_and_k0_is_full_fine_tuning(tmp_path):
    from tunegap.costs.shape import ModelShape
    from tunegap.methods import make_method
    from tunegap.models import load_model

    base = task_config("support", model="tiny", steps=2, runs_dir=str(tmp_path), quick=True, validation=False)
    full, prefix = freeze_arm(base, 0, 30, 1e-4)
    assert (full.method, full.lr, prefix) == ("full", 1e-4, "support-full")
    frozen, prefix = freeze_arm(base, 22, 30, 1e-4)
    assert (frozen.method, frozen.freeze_layers, prefix) == ("freeze", 8, "support-freeze")
    model, _ = load_model("tiny")
    shape = ModelShape.from_hf_config(model.config)
    config, _ = freeze_arm(base, 1, shape.num_layers, 1e-3)
    make_method(config.method, **config.method_options()).prepare(model, shape)
    blocks = model.model.layers
    assert not any(p.requires_grad for p in blocks[0].parameters())
    assert all(p.requires_grad for p in blocks[1].parameters())
    assert not model.model.embed_tokens.weight.requires_grad  # tied head: frozen with the bottom


@pytest.mark.parametrize("increases, expected", [
    ([0.010, 0.020, 0.015], True),   # at most 2%: costs little
    ([0.20, 0.25, 0.22], False),     # over 20%: costs a lot
    ([-0.01, 0.0, -0.005], True),    # frozen better than full
    ([0.00, 0.10, 0.06], None),      # straddles 5%: not resolved
])
def test_loss_rule_on_both_sides_of_five_percent(increases, expected):
    interval, supported, note = loss_verdict(increases)
    assert supported is expected
    assert interval.n == 3 and (note != "") is (expected is None)


def test_k0_and_the_lora_line_are_sweep_lora_ranks_runs_at_its_default_rates(tmp_path):
    """Same settings and run names as `sweep lora-rank` (its full run at 5e-5, its rank-16 run at 2e-4), so
    whichever sweep runs second reuses the other's runs instead of training them again."""
    from dataclasses import replace

    from tunegap.analysis.common import task_settings
    from tunegap.analysis.forgetting import base_train_config
    from tunegap.analysis.freeze_sweep import DEFAULT_LORA_LR, DEFAULT_LR
    from tunegap.analysis.lr_sweep import lora_arm
    from tunegap.config import run_identity

    for task in ("support", "docstrings"):
        # as tunegap/analysis/sweep.py builds its arms
        theirs = replace(base_train_config(model="smollm2-135m", steps=16, runs_dir="runs", quick=False), lr=2e-4,
                         generate_examples=16, **task_settings(task, False))
        their_full, their_lora = replace(theirs, method="full", lr=5e-5), replace(theirs, method="lora", rank=16,
                                                                                alpha=32.0)
        ours = task_config(task, model="smollm2-135m", steps=16, runs_dir="runs", quick=False, validation=False)
        (full, full_prefix), (lora, lora_prefix) = freeze_arm(ours, 0, 30, DEFAULT_LR), lora_arm(ours, 16,
                                                                                                   DEFAULT_LORA_LR)
        assert run_identity(full.to_dict()) == run_identity(their_full.to_dict()) and full_prefix == f"{task}-full"
        assert run_identity(lora.to_dict()) == run_identity(their_lora.to_dict())
        assert lora_prefix == f"{task}-lora-r16" and full.forgetting == "on"


def test_the_verdict_pairs_seeds_and_reads_a_quality_drop_as_positive():
    from tunegap.analysis.freeze_sweep import _judge

    def row(k, losses, quality, kl=(None, None)):
        return {"k": k, "per_seed": {"eval_loss": list(losses), "style_adherence": list(quality),
                                     "forgetting_kl": list(kl), "general_accuracy": [None, None]}}

    rows = [row(0, (2.0, 4.0), (0.9, 0.8), (0.10, 0.20)), row(22, (2.2, 4.4), (0.7, 0.8), (0.05, 0.05))]
    v = _judge(rows, 22, "style_adherence")
    assert v["loss_increase"]["per_seed"] == pytest.approx([0.1, 0.1])  # 10% each seed: the rule says no
    assert v["supported"] is False
    assert v["quality_drop"]["per_seed"] == pytest.approx([0.2, 0.0])
    assert v["forgetting_kl_change"]["per_seed"] == pytest.approx([-0.05, -0.15])
    assert _judge(rows[1:], 22, "style_adherence")["loss_increase"] is None  # no k = 0: nothing to judge


def _refuse(constant: str):
    raise ValueError(f"results.json holds {constant}, which is not JSON")


def _ledger(run: str) -> dict:
    return json.loads((Path(run) / "ledger.json").read_text())


def test_quick_sweep_freezes_more_as_k_grows_and_judges_from_its_own_ledgers(tmp_path, capsys):
    from tunegap.cli import main

    out = tmp_path / "freeze"
    assert main(["sweep", "freeze", "--quick", "--task", "docstrings", "--runs-dir", str(tmp_path / "runs"),
                 "--out", str(out)]) == 0
    assert "runs to train, predicted" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text(), parse_constant=_refuse)  # strict JSON: no NaN
    assert results["num_layers"] == 2 and results["ks"] == [0, 1] and results["verdict_k"] == 1
    res = results["per_task"]["docstrings"]
    arms = {a["k"]: a for a in res["arms"]}
    ledgers = {k: [_ledger(r) for r in a["runs"]] for k, a in arms.items()}
    assert ledgers[0][0]["config"]["method"] == "full"
    assert ledgers[1][0]["config"]["method"] == "freeze" and ledgers[1][0]["config"]["freeze_layers"] == 1
    params = [arms[k]["params_trainable"]["value"] for k in results["ks"]]
    assert params[0] == ledgers[0][0]["costs"]["params_total"]["value"]  # k = 0 trains everything
    assert all(a > b for a, b in zip(params, params[1:]))  # more frozen, fewer trainable
    assert arms[1]["flops_total"]["value"] < arms[0]["flops_total"]["value"]  # a frozen block skips its weight grads
    assert res["lora"]["params_trainable"]["value"] < params[0]
    # the verdict's numbers are the paired per-seed relative test-loss increases of these very runs
    increases = [(f["metrics"]["eval_loss"] - z["metrics"]["eval_loss"]) / z["metrics"]["eval_loss"]
                 for f, z in zip(ledgers[1], ledgers[0])]
    assert res["verdict"]["loss_increase"]["per_seed"] == pytest.approx(increases)
    (verdict,) = results["verdicts"]
    assert verdict["anchor"]["paper"].startswith("Yosinski") and verdict["unresolved"] == (verdict["supported"] is None)
    # a random tiny model measures no forgetting: reported as absent, not as zero
    assert arms[0]["forgetting_kl"] is None and "not measured" in verdict["measured"]
    assert all(a["wall_time_s"]["seeds"] == 2 for a in res["arms"])
    for f in ("freeze_quality_forgetting.png", "freeze_cost.png", "section.json"):
        assert (out / f).is_file()
