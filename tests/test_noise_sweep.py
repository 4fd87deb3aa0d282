"""`tunegap sweep noise`: the corruption, the verdict rules on both sides of their thresholds, one quick run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunegap.analysis.common import AnalysisError
from tunegap.analysis.noise_sweep import (corrupt_replies, corrupted_share, noise_cost, noise_verdicts, reply_of,
                                          sweep_noise)
from tunegap.data.tasks import TASKS
from tunegap.stats import mean_interval


def _prompt(record: dict) -> str:
    return json.dumps(record["messages"][:-1])


@pytest.mark.parametrize("task", ["support", "docstrings"])
@pytest.mark.parametrize("share", [0.0, 0.1, 0.25, 0.5])
def test_corruption_replaces_exactly_the_stated_share_with_other_examples_replies(task, share):
    pool = TASKS[task].splits()["train"][:200]
    noisy = corrupt_replies(pool, share, seed=3)
    assert corrupted_share(pool, noisy) == round(share * 200) / 200  # every chosen reply really changed
    assert [_prompt(r) for r in noisy] == [_prompt(r) for r in pool]  # prompts untouched
    replies = {reply_of(r) for r in pool}
    changed = [(a, b) for a, b in zip(pool, noisy) if reply_of(a) != reply_of(b)]
    assert all(reply_of(b) in replies for _, b in changed)  # a real reply of another training example
    assert all(reply_of(pool[b["meta"]["noise"]["reply_from"]]) == reply_of(b) for _, b in changed)
    assert sum("noise" in r["meta"] for r in noisy) == len(changed)
    assert all("noise" not in r.get("meta", {}) for r in pool)  # the input is not modified


def test_corruption_follows_the_seed():
    pool = TASKS["support"].splits()["train"][:100]
    same = [reply_of(r) for r in corrupt_replies(pool, 0.25, 1)]
    assert same == [reply_of(r) for r in corrupt_replies(pool, 0.25, 1)]
    assert same != [reply_of(r) for r in corrupt_replies(pool, 0.25, 2)]
    with pytest.raises(AnalysisError):
        corrupt_replies(pool, 1.5, 0)


def _rows(clean, noisy25, clean2, loss_clean=(2.0, 2.1, 2.05), loss_noisy=(2.0, 2.1, 2.05)):
    def arm(noise, compute, quality, loss):
        return {"noise_percent": noise, "compute_multiple": compute,
                "quality": mean_interval(quality).as_dict("fraction"), "eval_loss": mean_interval(loss).as_dict("nats")}

    return {"noise-0": arm(0, 1, clean, loss_clean), "noise-25": arm(25, 1, noisy25, loss_noisy),
            "noise-50": arm(50, 1, noisy25, loss_noisy), "clean-2x": arm(0, 2, clean2, loss_clean),
            "clean-4x": arm(0, 4, clean2, loss_clean)}


def _verdicts(rows):
    return noise_verdicts("support", {"arms": rows, **noise_cost(rows)}, "style adherence")


def test_noise_costs_more_than_doubling_on_each_side_of_zero():
    clean = [0.80, 0.82, 0.81]
    # noise takes ~0.30, doubling adds ~0.04: supported
    cost, _ = _verdicts(_rows(clean, [0.50, 0.52, 0.49], [0.85, 0.86, 0.84]))
    assert cost.supported is True and not cost.unresolved
    assert cost.anchor["paper"].startswith("Zhou et al. 2023") and cost.anchor["relation"] == "agrees"
    # noise takes ~0.01, doubling adds ~0.30: not supported
    cost, _ = _verdicts(_rows(clean, [0.79, 0.81, 0.80], [1.10, 1.12, 1.11]))
    assert cost.supported is False and not cost.unresolved
    # the seeds disagree: unresolved, with the budget that would resolve it
    cost, _ = _verdicts(_rows(clean, [0.60, 0.82, 0.70], [1.00, 0.82, 0.91]))
    assert cost.supported is None and cost.unresolved and "seeds" in cost.note


def test_noise_raises_test_loss_on_each_side_of_zero():
    clean = [0.8, 0.8, 0.8]
    _, loss = _verdicts(_rows(clean, clean, clean, loss_noisy=(2.3, 2.45, 2.35)))
    assert loss.supported is True and loss.anchor["paper"].startswith("Song et al. 2022")
    _, loss = _verdicts(_rows(clean, clean, clean, loss_noisy=(1.8, 1.9, 1.85)))
    assert loss.supported is False


def test_sweep_noise_quick_trains_on_corrupted_files_and_scores_the_untouched_test_split(tmp_path):
    out = tmp_path / "noise"
    results = sweep_noise(out=out, task="support", noise=(0, 25), seeds=2, quick=True, runs_dir=str(tmp_path / "r"))
    t = results["tasks"]["support"]
    pool = t["pool_examples"]
    assert set(t["arms"]) == {"noise-0", "noise-25", "clean-2x", "clean-4x"}
    assert t["arms"]["noise-25"]["corrupted_share"]["per_seed"] == [round(0.25 * pool) / pool] * 2
    assert t["arms"]["clean-4x"]["steps"] == 4 * t["arms"]["noise-0"]["steps"]
    test_split = TASKS["support"].splits()["test"]
    written = [json.loads(line) for line in (out / "data" / "support-test.jsonl").read_text().splitlines()]
    assert written == test_split  # the held-out split is scored exactly as shipped
    clean = TASKS["support"].splits()["train"][:pool]
    for seed, folder in enumerate(t["arms"]["noise-25"]["runs"]):
        ledger = json.loads((Path(folder) / "ledger.json").read_text())
        assert ledger["config"]["seed"] == seed and ledger["config"]["eval_data"].endswith("support-test.jsonl")
        trained = [json.loads(line) for line in open(ledger["config"]["data"])]
        assert corrupted_share(clean, trained) == round(0.25 * pool) / pool
        assert "style_adherence" in ledger["metrics"]  # the task's scorer, found from the test records' meta
    q = {k: t["arms"][k]["quality"]["per_seed"] for k in ("noise-0", "noise-25", "clean-2x")}
    expected = [(c - n) - (d - c) for c, n, d in zip(q["noise-0"], q["noise-25"], q["clean-2x"])]
    assert t["noise_minus_doubling"]["per_seed"] == pytest.approx(expected)
    assert [v["anchor"]["paper"].split()[0] for v in results["verdicts"]] == ["Zhou", "Song"]


def test_a_user_eval_file_without_a_shipped_tasks_meta_trains_and_is_not_scored(tmp_path, few_jsonl):
    """The one change TaskMetrics needed: a held-out file is scored only when its records name a shipped task."""
    from conftest import tiny_config
    from tunegap.callbacks import TaskMetrics, default_callbacks
    from tunegap.trainer import train

    config = tiny_config(tmp_path, data=str(few_jsonl), eval_data=str(few_jsonl), generate_examples=2, max_steps=1)
    assert any(isinstance(c, TaskMetrics) for c in default_callbacks(config))
    ledger = train(config)
    assert "eval_loss" in ledger["metrics"] and "style_adherence" not in ledger["metrics"]
