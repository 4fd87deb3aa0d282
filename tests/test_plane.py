"""The learning-forgetting plane: the curve callback, the verdict rules on planted curves, and --quick end to end."""

from __future__ import annotations

import json

import pytest
from conftest import tiny_config

from tunegap.analysis.plane import analyze_plane, at_level, best_arm, forgets_less, matches_full, read_plane
from tunegap.callbacks.forgetting_curve import curve_steps
from tunegap.io import read_jsonl
from tunegap.models import load_model
from tunegap.stats import judge, mean_interval
from tunegap.trainer import train


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def pretrained_tiny(tmp_path, monkeypatch):
    """The tiny random model saved as a model folder: real-weights code paths, in milliseconds."""
    monkeypatch.setenv("TUNEGAP_CACHE", str(tmp_path / "cache"))
    model, tokenizer = load_model("tiny", seed=0)
    model.save_pretrained(tmp_path / "pretrained", safe_serialization=True)
    tokenizer.save_pretrained(tmp_path / "pretrained")
    return str(tmp_path / "pretrained")


def test_curve_steps_are_every_kth_and_the_last():
    assert curve_steps(2, 5) == [2, 4, 5]
    assert curve_steps(3, 6) == [3, 6]
    assert curve_steps(8, 5) == [5]


@pytest.mark.parametrize("method", ["lora", "full"])
def test_curve_rows_at_the_right_steps_and_the_trajectory_is_unchanged(tmp_path, pretrained_tiny, method):
    # LoRA dropout draws random numbers every step: a measurement that drew any would change the steps after it
    common = dict(model=pretrained_tiny, method=method, max_steps=5, forgetting="off", eval_examples=4,
                  dropout=0.1 if method == "lora" else 0.0)
    plain = train(tiny_config(tmp_path, name=f"plain-{method}", **common))
    curve = train(tiny_config(tmp_path, name=f"curve-{method}", forgetting_every=2, **common))
    rows = read_jsonl(tmp_path / "runs" / f"curve-{method}" / "metrics.jsonl")
    plain_rows = read_jsonl(tmp_path / "runs" / f"plain-{method}" / "metrics.jsonl")
    measured = [r for r in rows if "forgetting_kl" in r]
    assert [r["step"] for r in measured] == [2, 4, 5]
    assert all(r["eval_loss"] > 0 and r["forgetting_kl"] > 0 and r["forgetting_prompts"] == 40 for r in measured)
    # the same steps, bit for bit: the measurement drew no random number and left no state behind
    losses = lambda rs: [(r["step"], r["loss"], r["grad_norm"]) for r in rs if "loss" in r]  # noqa: E731
    assert losses(rows) == losses(plain_rows)
    assert curve["metrics"]["eval_loss"] == plain["metrics"]["eval_loss"]
    # the last point measured the final weights: its held-out loss is the run's own
    assert measured[-1]["eval_loss"] == pytest.approx(curve["metrics"]["eval_loss"], rel=1e-6)


# --------------------------------------------------------------------------- the verdict rules, on planted curves



def _seed(final, curve, val=None, retained=None):
    """One seed's run: its final test loss and curve points (test loss, KL[, kept]) at steps 2, 4, ..."""
    points = [{"step": 2 * (i + 1), "eval_loss": loss, "forgetting_kl": kl,
               "general_retained": None if retained is None else retained[i]} for i, (loss, kl) in enumerate(curve)]
    return {"eval_loss": final, "val_loss": final if val is None else val, "points": points}


def _arm(method, seeds):
    return {"method": method, "seeds": seeds}


def test_at_level_interpolates_between_checkpoints_from_the_base_point():
    points = _seed(1.0, [(1.5, 0.1), (1.0, 0.3)], retained=[0.8, 0.6])["points"]
    assert at_level(points, 1.25, "forgetting_kl", base_loss=2.0) == pytest.approx(0.2)
    assert at_level(points, 1.75, "forgetting_kl", base_loss=2.0) == pytest.approx(0.05)  # base: KL 0 at loss 2
    assert at_level(points, 1.75, "general_retained", base_loss=2.0) == pytest.approx(0.9)  # base keeps all
    assert at_level(points, 1.0, "forgetting_kl", base_loss=2.0) == pytest.approx(0.3)
    assert at_level(points, 0.9, "forgetting_kl", base_loss=2.0) is None  # never learned that much


def test_matches_full_on_each_side_of_five_percent():
    full = _arm("full", [_seed(f, []) for f in (1.00, 1.01, 0.99)])
    close = _arm("lora", [_seed(f, []) for f in (1.02, 1.03, 1.01)])
    far = _arm("lora", [_seed(f, []) for f in (1.10, 1.12, 1.10)])
    noisy = _arm("lora", [_seed(f, []) for f in (1.00, 1.12, 1.05)])
    assert matches_full(close, full)["judgement"].supported is True
    assert matches_full(close, full)["interval"].mean == pytest.approx((0.02 + 1.03 / 1.01 - 1 + 1.01 / 0.99 - 1) / 3)
    assert matches_full(far, full)["judgement"].supported is False
    straddles = matches_full(noisy, full)["judgement"]
    assert straddles.supported is None and "seeds" in straddles.note


def _pair(lora_kl_scale, full_kl_scale=1.0, seeds=3, lora_rises=False):
    """LoRA and full arms with straight curves from the base (loss 2, KL 0): KL = scale x learning."""
    def curve(scale, final, jitter):
        return [(2 - (2 - final) * f, scale * (2 - final) * f * (1 + jitter)) for f in (0.5, 1.0)]
    full = _arm("full", [_seed(1.0, curve(full_kl_scale, 1.0, 0.0)) for _ in range(seeds)])
    lora = _arm("lora", [_seed(1.2, curve(lora_kl_scale, 1.2, 0.05 * i)) for i in range(seeds)])
    if lora_rises:  # a run whose test loss rose above the base's: no level both runs reach
        for s in lora["seeds"]:
            s["points"] = [{"step": 2, "eval_loss": 2.5, "forgetting_kl": 0.1, "general_retained": None}]
            s["eval_loss"] = 2.5
    return lora, full


def test_forgets_less_reads_each_pair_at_its_common_level_on_each_side_of_zero():
    lora, full = _pair(lora_kl_scale=0.5)  # LoRA: half the KL per unit of learning
    result = forgets_less(lora, full, "forgetting_kl", base_loss=2.0)
    # pair level 1.2 (LoRA's final): full's KL there is 0.8 x 1.0, LoRA's 0.8 x 0.5 x (1 + jitter)
    expected = [0.8 * 0.5 * (1 + 0.05 * i) - 0.8 for i in range(3)]
    assert result["judgement"] is True and result["pairs"] == 3
    assert result["interval"].mean == pytest.approx(sum(expected) / 3)
    assert forgets_less(*_pair(lora_kl_scale=2.0), "forgetting_kl", base_loss=2.0)["judgement"] is False
    same = forgets_less(*_pair(lora_kl_scale=0.97), "forgetting_kl", base_loss=2.0)  # jitter straddles 0
    assert same["judgement"] is None and same["interval"].low < 0 < same["interval"].high
    never = forgets_less(*_pair(lora_kl_scale=0.5, lora_rises=True), "forgetting_kl", base_loss=2.0)
    assert never["judgement"] is None and never["pairs"] == 0 and "0 of 3 seed pairs" in never["note"]


def test_forgets_less_on_kept_answers_claims_the_higher_side():
    def arm(method, kept):
        return _arm(method, [_seed(1.0, [(1.5, 0.1), (1.0, 0.2)], retained=[kept + 0.01 * i, kept - 0.02 * i])
                             for i in range(3)])
    assert forgets_less(arm("lora", 0.9), arm("full", 0.6), "general_retained", 2.0)["judgement"] is True
    assert forgets_less(arm("lora", 0.5), arm("full", 0.8), "general_retained", 2.0)["judgement"] is False
    unmeasured = forgets_less(*_pair(0.5), "general_retained", 2.0)
    assert unmeasured["judgement"] is None and "not measured" in unmeasured["note"]


def test_best_arm_is_chosen_on_validation_not_test():
    arms = {"lora-a": _arm("lora", [_seed(1.0, [], val=1.5)] * 2),
            "lora-b": _arm("lora", [_seed(1.2, [], val=1.1)] * 2),
            "full-a": _arm("full", [_seed(1.0, [(1.0, 0.1)])] * 2)}
    assert best_arm(arms, "lora") == "lora-b"
    assert read_plane(arms, 2.0)["best_lora"] == "lora-b"


# --------------------------------------------------------------------------- --quick, end to end

def test_plane_quick_reads_its_verdicts_from_the_runs_curves(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNEGAP_CACHE", str(tmp_path / "cache"))
    results = analyze_plane(out=tmp_path / "plane", quick=True, task="support", seeds=2,
                            runs_dir=str(tmp_path / "runs"))
    task = results["tasks"]["support"]
    assert len(task["arms"]) == 6 and results["seeds"] == 2
    finals = {}
    for label, arm in task["arms"].items():
        assert [p["step"] for p in arm["curve"]] == [2, 4]  # every 2 steps of 4: checkpoints of the real runs
        ledgers = [json.loads((tmp_path / "runs" / run.split("/")[-1] / "ledger.json").read_text())
                   for run in arm["runs"]]
        # the curve's last point is the run's final weights: the loop's own end-of-run test loss, seed by seed
        assert arm["curve"][-1]["eval_loss"]["per_seed"] == pytest.approx([g["metrics"]["eval_loss"] for g in ledgers])
        finals[label] = [g["metrics"]["eval_loss"] for g in ledgers]
        assert all(v > 0 for v in arm["curve"][-1]["forgetting_kl"]["per_seed"])  # trained weights drifted
    lora, full = task["best_lora"], task["best_full"]
    assert task["arms"][lora]["val_loss"]["value"] == min(a["val_loss"]["value"] for a in task["arms"].values()
                                                          if a["method"] == "lora")
    expected = [a / b - 1 for a, b in zip(finals[lora], finals[full])]
    assert task["lora_relative_to_full"]["per_seed"] == pytest.approx(expected)
    matches, kl, kept = results["verdicts"]
    assert matches["supported"] == judge(mean_interval(expected), 0.05, claim_below=True).supported
    assert matches["anchor"]["paper"].startswith("Schulman") and kl["anchor"]["paper"].startswith("Biderman")
    assert task["forgets_less"]["forgetting_kl"]["seed_pairs"] == 2  # each pair's own level: both runs reach it
    assert kept["supported"] is None and kept["unresolved"]  # the random base answers nothing right
    assert (tmp_path / "plane" / "plane_support.png").stat().st_size > 10_000


# --------------------------------------------------------------------------- analyze forgetting --seeds

def test_forgetting_seeds_verdict_pairs_seeds_on_each_side_of_zero():
    from tunegap.analysis.forgetting import combined, paired_forgets_less

    def arms(lora_kls, full_kls):
        return {"full": {"seeds": [{"matched_kl": k} for k in full_kls]},
                "lora-r4": {"seeds": [{"matched_kl": k} for k in lora_kls]}}
    less = paired_forgets_less(arms([0.10, 0.21, 0.12], [0.20, 0.30, 0.22]), "lora-r4")
    assert less[1].supported is True and less[0].mean == pytest.approx(-0.0967, abs=1e-3)
    assert paired_forgets_less(arms([0.30, 0.41, 0.32], [0.20, 0.30, 0.22]), "lora-r4")[1].supported is False
    straddles = paired_forgets_less(arms([0.25, 0.20, 0.22], [0.20, 0.30, 0.22]), "lora-r4")[1]
    assert straddles.supported is None and "seeds" in straddles.note
    # a seed without an equal-quality point drops out of the pairing; one pair left gives no interval
    assert paired_forgets_less(arms([0.1, None], [0.2, 0.3]), "lora-r4")[1].supported is None
    assert combined([less[1], less[1]])[:2] == (True, False)
    assert combined([less[1], straddles])[:2] == (None, True)
