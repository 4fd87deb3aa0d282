"""The evidence analyses: each number checked against an independent computation with a known answer."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch
from conftest import needs_smollm2

from tunegap.analysis.common import AnalysisError, disagreements
from tunegap.analysis.convergence import (analyze_convergence, convergence_section, convergence_seeds_verdict,
                                          convergence_verdict, extrapolate,
                                          power_law_fit, steps_to)
from tunegap.analysis.forgetting import (analyze_forgetting, base_reference, has_real_weights, measure_forgetting,
                                         reply_kl)
from tunegap.analysis.knowledge import Retriever, analyze_knowledge, correct, fact_records, tokenize_words
from tunegap.analysis.probe import agreement_items, analyze_probe, fit_probe, majority_rate
from tunegap.analysis.rank import (analyze_rank, analyze_rank_grid, effective_rank, energy_curve, low_rank_verdict,
                                   matrix_stats, pooled_low_rank_verdict, random_reference, rank_for,
                                   rank_growth_verdict, spectrum_ranks)
from tunegap.analysis.sweep import sweep_lora_rank
from tunegap.data.support import fictional_facts, general_prompts
from tunegap.models import load_model
from tunegap.report import gather_sections, markdown_to_html, write_gathered_report


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --------------------------------------------------------------------------- intrinsic rank

def _planted(m, n, singular, seed=0):
    """U diag(s) V^T with orthonormal U, V: a matrix whose singular values are exactly `singular`."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, len(singular), generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, len(singular), generator=g, dtype=torch.float64))
    return u @ torch.diag(torch.tensor(singular, dtype=torch.float64)) @ v.T


@pytest.mark.parametrize("k", [1, 3, 7])
def test_effective_rank_of_k_equal_singular_values_is_k(k):
    delta = _planted(40, 30, [2.5] * k)
    s = torch.linalg.svdvals(delta)
    assert effective_rank(s) == pytest.approx(k, rel=1e-9)
    assert rank_for(s, 0.99) == k
    assert energy_curve(s, 10)[k - 1] == pytest.approx(1.0)


def test_rank_statistics_match_numpy_on_an_uneven_spectrum():
    singular = [10.0, 5.0, 2.0, 1.0, 0.5]
    stats = matrix_stats(_planted(50, 20, singular).float(), 8)
    s = np.linalg.svd(_planted(50, 20, singular).numpy(), compute_uv=False)
    s = s[s > 1e-6]
    p = s / s.sum()
    assert stats["effective_rank"] == pytest.approx(math.exp(-(p * np.log(p)).sum()), rel=1e-4)
    energy = np.cumsum(s ** 2) / np.sum(s ** 2)
    assert stats["r90"] == int(np.argmax(energy >= 0.90)) + 1 == 2  # 100+25 of 130.25 = 96%
    assert stats["energy"][0] == pytest.approx(100 / 130.25, rel=1e-5)


def _fake_full_run(tmp_path, plant_rank=2):
    """A 'finished full fine-tune' of the tiny model whose only change is a planted rank-2 update to one matrix."""
    model, tokenizer = load_model("tiny", seed=0)
    w = model.model.layers[1].self_attn.q_proj.weight
    with torch.no_grad():
        w += _planted(*w.shape, [0.3, 0.2][:plant_rank]).float()
    folder = tmp_path / "runs" / "planted"
    model.save_pretrained(folder / "model", safe_serialization=True)
    tokenizer.save_pretrained(folder / "model")
    ledger = {"status": "completed", "config": {"model": "tiny", "init": "pretrained", "seed": 0, "method": "full",
                                                "lr": 1e-3},
              "costs": {"optimizer_steps": {"value": 1, "unit": "step", "how": "measured"}}}
    (folder / "ledger.json").write_text(json.dumps(ledger))
    return folder


def test_rank_analysis_finds_the_planted_rank_2_update(tmp_path):
    folder = _fake_full_run(tmp_path)
    results = analyze_rank(folder, out=tmp_path / "rank", max_rank=16)
    changed = [m for m in results["matrices"] if not m["unchanged"]]
    assert [m["name"] for m in changed] == ["model.layers.1.self_attn.q_proj.weight"]
    (m,) = changed
    assert m["r99"] == 2 and m["energy"][1] == pytest.approx(1.0, abs=1e-6)
    p = np.array([0.3, 0.2]) / 0.5
    assert m["effective_rank"] == pytest.approx(math.exp(-(p * np.log(p)).sum()), rel=1e-3)
    assert m["random"]["r90"] > 10  # a Gaussian 64x64 matrix needs most of its rank
    for f in ("results.json", "section.json", "rank_energy.png", "rank_by_layer.png"):
        assert (tmp_path / "rank" / f).is_file()
    assert results["verdicts"][0]["supported"] is True


def _ranks(singular, size=256, seed=0):
    return spectrum_ranks(_planted(size, size, singular, seed))


@pytest.mark.parametrize("singular, expected", [
    ([0.3, 0.2], True),                  # rank 2: a rank-4 LoRA holds all of it
    ([1.0] * 60, False),                 # 60 equal directions: r90 = 54 >= 10 x 4, yet far below noise's r90
    ([1.0] * 10, None),                  # r90 = 9: beyond rank 4, short of 10x: not resolved
])
def test_low_rank_verdict_on_both_sides_of_its_threshold_with_planted_updates(singular, expected):
    noise = random_reference((256, 256), 16)["r90"]
    assert noise > 100  # a Gaussian 256x256 matrix needs about half its rank
    assert low_rank_verdict(_ranks(singular)["r90"], 4, noise) is expected


def test_low_rank_verdict_refuses_a_threshold_at_the_noise_level():
    """On a 64x64 matrix 10 x rank 16 = 160 exceeds any null's r90, so 'not low-rank' would mean 'as spread as
    noise': the rule says not resolved, even for a flat spectrum."""
    flat = _ranks([1.0] * 64, size=64)
    noise = random_reference((64, 64), 16)["r90"]
    assert low_rank_verdict(flat["r90"], 16, noise) is None
    assert low_rank_verdict(_ranks([0.3, 0.2], size=64)["r90"], 16, noise) is True
    assert low_rank_verdict(2, 16, 2) is None  # not below the null: not low-rank "support" either


def test_rank_quick_runs_the_seed_difference_null_and_the_embedding_rows(tmp_path, capsys):
    from tunegap.cli import main

    assert main(["analyze", "rank", "--quick", "--runs-dir", str(tmp_path / "runs"), "--out", str(tmp_path / "r")]) == 0
    results = json.loads((tmp_path / "r" / "results.json").read_text())
    assert results["null_run"] and results["lora_ranks"] == [2, 4]
    changed = [m for m in results["matrices"] if not m["unchanged"]]
    assert all(m["seed_null"]["r90"] >= 1 and m["base"]["max_rank"] == min(m["shape"]) for m in changed)
    assert not any(m["type"] == "embed" for m in results["matrices"])  # analysed apart
    emb = results["embedding_rows"]
    assert emb["rows_rule"] == "tokens seen in training" and 20 < emb["rows"] < 259  # not the whole vocabulary
    assert results["verdicts"][0]["anchor"]["paper"].startswith("Biderman")


def test_rank_analysis_refuses_a_lora_run_and_a_missing_run(tmp_path):
    with pytest.raises(AnalysisError, match="not a finished tunegap run"):
        analyze_rank(tmp_path / "nothing", out=tmp_path / "o")
    folder = _fake_full_run(tmp_path)
    (folder / "adapter").mkdir()
    with pytest.raises(AnalysisError, match="rank <= r by construction"):
        analyze_rank(folder, out=tmp_path / "o")


# --------------------------------------------------------------------------- forgetting

def test_kl_of_a_model_with_itself_is_zero_and_a_perturbation_matches_torch_kl_div():
    base, tokenizer = load_model("tiny", seed=0)
    base.eval()
    prompts = general_prompts()[:3]
    same = measure_forgetting(base, base, tokenizer, prompts=prompts, questions=[], reply_tokens=6)
    assert same["forgetting_kl"] == 0.0 and same["forgetting_kl_tokens"] > 0

    other, _ = load_model("tiny", seed=0)
    with torch.no_grad():
        other.model.layers[0].mlp.down_proj.weight.mul_(1.5)
    other.eval()
    ref = base_reference(base, tokenizer, prompts=prompts[:1], questions=[], reply_tokens=6)
    (seq, start), = ref["sequences"]
    (total, count), = reply_kl(base, other, ref["sequences"], tokenizer.pad_token_id)
    with torch.no_grad():  # independent: torch's kl_div, one unpadded sequence, positions by hand
        lp_b = torch.log_softmax(base(torch.tensor([seq])).logits[0].float(), -1)[start - 1:len(seq) - 1]
        lp_o = torch.log_softmax(other(torch.tensor([seq])).logits[0].float(), -1)[start - 1:len(seq) - 1]
        expected = torch.nn.functional.kl_div(lp_o, lp_b, log_target=True, reduction="sum")
    assert count == len(seq) - start and total == pytest.approx(float(expected), rel=1e-4) and total > 0


def test_forgetting_runs_only_for_real_pretrained_weights(tmp_path):
    from tunegap.config import TrainConfig

    assert not has_real_weights(TrainConfig(model="tiny"))
    assert not has_real_weights(TrainConfig(model="smollm2-135m", init="scratch"))
    assert has_real_weights(TrainConfig(model=str(tmp_path)))


def test_train_loop_writes_forgetting_into_the_ledger_for_a_pretrained_folder(tmp_path, monkeypatch):
    from conftest import tiny_config
    from tunegap.trainer import train

    monkeypatch.setenv("TUNEGAP_CACHE", str(tmp_path / "cache"))  # the base model's replies are cached there
    model, tokenizer = load_model("tiny", seed=0)
    model.save_pretrained(tmp_path / "pretrained", safe_serialization=True)
    tokenizer.save_pretrained(tmp_path / "pretrained")
    ledger = train(tiny_config(tmp_path, model=str(tmp_path / "pretrained"), max_steps=2, threads=1,
                               forgetting="on"))
    metrics = ledger["metrics"]
    assert metrics["forgetting_kl"] > 0 and metrics["forgetting_prompts"] == 40
    assert 0 <= metrics["general_accuracy"] <= 1 and metrics["general_questions"] == 40
    assert len(list((tmp_path / "cache" / "forgetting").glob("*.json"))) == 1
    again = train(tiny_config(tmp_path, model=str(tmp_path / "pretrained"), max_steps=2, threads=1, name="again",
                              forgetting="on"))
    assert again["metrics"]["forgetting_kl"] > 0
    # auto, the default: it runs exactly when its prediction said it would (the rule itself: test_generation.py)
    short = train(tiny_config(tmp_path, model=str(tmp_path / "pretrained"), max_steps=2, threads=1, name="short"))
    assert ("forgetting_kl" in short["metrics"]) == ("forgetting" in short["timings"]["predicted_seconds"])
    assert len(list((tmp_path / "cache" / "forgetting").glob("*.json"))) == 1  # the base's replies were reused
    from tunegap.forgetting import cached_base_reference

    base, tokenizer = load_model(str(tmp_path / "pretrained"))
    fresh = base_reference(base, tokenizer)
    assert cached_base_reference(str(tmp_path / "pretrained"), base, tokenizer) == fresh
    off = train(tiny_config(tmp_path, model=str(tmp_path / "pretrained"), max_steps=1, name="off", forgetting=False,
                            threads=1))
    assert "forgetting_kl" not in off["metrics"]


# --------------------------------------------------------------------------- sweep and forgetting, end to end

@pytest.fixture(scope="module")
def shared_runs(tmp_path_factory):
    """The quick sweep's runs; the quick forgetting analysis reuses its full and LoRA runs."""
    root = tmp_path_factory.mktemp("analyses")
    sweep = sweep_lora_rank(out=root / "sweep", quick=True, runs_dir=str(root / "runs"), seeds=2)
    return root, sweep


def test_sweep_gaps_are_recomputed_from_the_run_ledgers(shared_runs):
    root, sweep = shared_runs
    assert all(v["anchor"]["paper"].startswith("Schulman") for v in sweep["verdicts"])
    arms = sweep["arms"]
    assert sorted(arms) == ["full", "lora-r1", "lora-r2", "lora-r4"]
    def ledgers(arm):
        return [json.loads((root / "runs" / run.split("/")[-1] / "ledger.json").read_text()) for run in arm["runs"]]

    full = ledgers(arms["full"])
    assert len(full) == 2 and full[0]["config"]["seed"] != full[1]["config"]["seed"]
    for label, arm in arms.items():
        runs = ledgers(arm)
        gaps = [(r["metrics"]["eval_loss"] - f["metrics"]["eval_loss"]) / f["metrics"]["eval_loss"]
                for r, f in zip(runs, full)]  # paired by seed
        assert arm["loss_gap"]["per_seed"] == pytest.approx(gaps)
        assert arm["loss_gap"]["value"] == pytest.approx(sum(gaps) / 2)
        losses = [r["metrics"]["eval_loss"] for r in runs]
        assert arm["eval_loss"]["low"] <= min(losses) and arm["eval_loss"]["high"] >= max(losses)
        assert arm["params_trainable"]["value"] == runs[0]["costs"]["params_trainable"]["value"]
    # LoRA trains 2 x r x (fan_in + fan_out) per target matrix: parameters grow linearly with r
    p = [arms[f"lora-r{r}"]["params_trainable"]["value"] for r in (1, 2, 4)]
    assert p[1] == 2 * p[0] and p[2] == 4 * p[0]
    for f in ("results.json", "section.json", "lora_rank_quality.png", "lora_rank_cost.png"):
        assert (root / "sweep" / f).is_file()


def test_forgetting_reuses_runs_and_alpha_one_reproduces_the_runs_eval_loss(shared_runs):
    root, sweep = shared_runs
    before = {p.name for p in (root / "runs").iterdir() if p.is_dir()}
    results = analyze_forgetting(out=root / "forgetting", quick=True, seeds=1, runs_dir=str(root / "runs"))
    after = {p.name for p in (root / "runs").iterdir() if p.is_dir()}
    assert len(after - before) == 1 and next(iter(after - before)).startswith("support-freeze-")  # only freeze trained
    assert results["arms"]["full"]["run"] == sweep["arms"]["full"]["run"]
    for label, arm in results["arms"].items():
        ledger = json.loads((root / "runs" / arm["run"].split("/")[-1] / "ledger.json").read_text())
        alphas = dict(arm["alpha_path"])
        assert alphas[0.0] == pytest.approx(results["base"]["eval_loss"]["value"])
        # W_base + 1.0 * dW (LoRA merged) scored by this module == the loop's own held-out loss of the run
        assert alphas[1.0] == pytest.approx(ledger["metrics"]["eval_loss"], rel=1e-4)
        if arm["matched"]:
            assert arm["matched"]["eval_loss"] == pytest.approx(results["target_eval_loss"]["value"], rel=0.02)
    assert (root / "forgetting" / "forgetting_at_equal_quality.png").is_file()


# --------------------------------------------------------------------------- convergence

def test_power_law_fit_recovers_a_known_law_and_extrapolates_it():
    steps = list(range(5, 30))
    fit = power_law_fit(steps, [3.0 * t ** -0.5 for t in steps])
    assert fit["b"] == pytest.approx(-0.5) and math.exp(fit["log_a"]) == pytest.approx(3.0) and fit["r2"] > 0.999
    assert extrapolate(fit, 0.3) == pytest.approx(100.0)  # 3 / sqrt(100) = 0.3
    assert extrapolate(power_law_fit(steps, [1.0 + 0 * t for t in steps]), 0.5) is None  # flat: no extrapolation
    assert steps_to([5.0, 4.0, 3.0, 2.0], 3.0) == 3 and steps_to([5.0, 4.0], 1.0) is None


@pytest.mark.parametrize("pretrained, scratch, budget, expected", [
    (3, 40, 40, True),     # measured 13x
    (3, 20, 40, False),    # measured 6.7x
    (3, None, 40, True),   # scratch unfinished in 40 steps: a measured lower bound of 13x
    (10, None, 40, None),  # lower bound 4x: the budget cannot tell
    (None, None, 40, None),
])
def test_convergence_verdict_on_both_sides_of_ten_x(pretrained, scratch, budget, expected):
    assert convergence_verdict(pretrained, scratch, budget) is expected


def _planted_run(seed, reached, extrapolated=None):
    return {"seed": seed, "reached_at_step": reached, "extrapolated_step": extrapolated, "smoothed": [1.0],
            "loss": [2.0], "eval_loss": 1.0, "steps": [1, 2, 3, 4],
            "flops_to_target": {"value": 1, "how": "formula" if reached else "estimate"},
            "fit": {"from_step": 2, "to_step": 4, "r2": 0.99}}


def test_an_extrapolated_ratio_is_never_support():
    section = convergence_section({
        "arms": {"pretrained": {"lr": 1e-3, "runs": [_planted_run(0, 2), _planted_run(1, 2), _planted_run(2, 2)]},
                 "scratch": {"lr": 1e-3, "runs": [_planted_run(s, None, 1e6) for s in range(3)]}},
        "target_loss": {"value": 1.0}, "budget_steps": 4, "quick": True, "model": "tiny",
        "flops_per_step": {"value": 1.0}, "target_rule": "given"}, [])
    verdict = section.verdicts[0]
    assert verdict.supported is None and verdict.unresolved  # 500,000x extrapolated, but only 2x measured (4 / 2)
    assert "at least 20 steps" in verdict.note  # what would resolve it: 10x the pretrained arm's 2 steps


@pytest.mark.parametrize("pretrained, scratch, budget, expected", [
    ([3, 3, 3], [40, 36, 38], 40, True),           # measured ~12.7x on every seed, tight interval above 10
    ([3, 3, 3], [20, 21, 19], 40, False),          # measured ~6.7x, interval below 10
    ([3, 3, 3], [None, None, None], 60, True),     # scratch unfinished in 60 steps: lower bounds of 20x
    ([10, 10, 10], [None, None, None], 40, None),  # lower bounds of 4x: a longer budget could raise them
    ([3, 3, 3], [20, 45, 33], 60, None),           # 6.7x, 15x, 11x: the interval straddles 10
    ([3, None, 3], [20, 20, 20], 40, None),        # the pretrained arm missed the target in one seed
])
def test_convergence_seed_verdict_on_both_sides_of_ten_x(pretrained, scratch, budget, expected):
    verdict = convergence_seeds_verdict(pretrained, scratch, budget)
    assert verdict["supported"] is expected
    assert verdict["unresolved"] is (expected is None)
    if expected is None:
        assert "not resolved at this budget" in verdict["note"]


def test_convergence_quick_reports_measured_or_estimated_steps(tmp_path):
    results = analyze_convergence(out=tmp_path / "conv", quick=True, runs_dir=str(tmp_path / "runs"), seeds=2)
    pre, scr = results["arms"]["pretrained"], results["arms"]["scratch"]
    assert [r["seed"] for r in pre["runs"]] == [0, 1] and [r["seed"] for r in scr["runs"]] == [0, 1]
    assert pre["runs"][0]["loss"] != pre["runs"][1]["loss"]  # another seed, another run
    for run in pre["runs"]:
        assert run["steps_to_target"]["how"] == "measured"
    expected = convergence_seeds_verdict([r["reached_at_step"] for r in pre["runs"]],
                                         [r["reached_at_step"] for r in scr["runs"]], results["budget_steps"])
    assert results["verdicts"][0]["supported"] is expected["supported"]
    assert results["verdicts"][0]["unresolved"] is expected["unresolved"]
    ratio = results["step_ratio"]
    assert ratio["seeds"] == 2 and ratio["low"] <= ratio["value"] <= ratio["high"]
    for p_run, s_run in zip(pre["runs"], scr["runs"]):
        assert s_run["steps_to_target"]["how"] == ("measured" if s_run["reached_at_step"] else "estimate")
        # FLOPs per step: the same formula for both arms (same architecture, same batches)
        assert p_run["flops"] == pytest.approx(s_run["flops"])
    assert (tmp_path / "conv" / "convergence.png").is_file()


# --------------------------------------------------------------------------- knowledge

def test_bm25_finds_a_planted_fact_and_most_shipped_facts():
    facts = fictional_facts()
    docs = [f["statement"] for f in facts] + ["The Zorblax 9000 toaster weighs 17 kg."]
    retriever = Retriever(docs)
    assert retriever.top("How heavy is the Zorblax 9000?", 1) == [len(docs) - 1]
    questions = [(i, qn) for i, f in enumerate(facts) for qn in f["questions"]]
    hits = sum(i in retriever.top(qn, 3) for i, qn in questions)
    assert hits / len(questions) >= 0.9


def test_fact_answers_are_checked_leniently_and_training_text_differs_from_questions():
    fact = next(f for f in fictional_facts() if f["answer"] == "$1,340")
    assert correct(fact, "It costs 1340 dollars.") and correct(fact, "$1,340") and not correct(fact, "$1,430")
    train, evals = fact_records(fictional_facts())
    assert len(evals) == 2 * len(train)
    asked = {r["messages"][0]["content"] for r in evals}
    assert not asked & {r["messages"][0]["content"] for r in train}
    assert tokenize_words("Costs $1,340.") == ["costs", "$1,340"]


def test_knowledge_quick_runs_all_four_arms(tmp_path):
    results = analyze_knowledge(out=tmp_path / "k", quick=True, runs_dir=str(tmp_path / "runs"), paraphrases=(0, 1),
                                seeds=1)
    assert [v["anchor"]["paper"].split()[0] for v in results["verdicts"]] == ["Ovadia", "Biderman"]
    assert all(v["unresolved"] for v in results["verdicts"])  # one seed: no interval, nothing is resolved
    arms = results["arms"]
    assert set(arms) == {"closed_book", "fine_tuned", "retrieval", "fine_tuned_rag"}
    assert arms["retrieval"]["mean_prompt_tokens"]["value"] > arms["closed_book"]["mean_prompt_tokens"]["value"]
    facts = fictional_facts()[:results["facts"]]  # independent: the hit rate recomputed with a fresh index
    retriever = Retriever([f["statement"] for f in facts])
    hits = [i in retriever.top(qn, results["k"]) for i, f in enumerate(facts) for qn in f["questions"]]
    assert arms["retrieval"]["retrieval_hit_rate"]["value"] == pytest.approx(sum(hits) / len(hits))
    assert results["break_even_queries"]["value"] == pytest.approx(
        arms["fine_tuned"]["training_flops"]["value"] / arms["retrieval"]["extra_flops_per_query"]["value"])


# --------------------------------------------------------------------------- probes

def _seeds(*values):
    from tunegap.stats import mean_interval

    return mean_interval(values).as_dict("fraction")


def test_probe_verdicts_on_each_side_of_their_thresholds():
    from tunegap.analysis.probe import depth_verdict, features_verdict

    present = {"best_accuracy": _seeds(0.97, 0.98, 0.99), "over_majority": _seeds(0.45, 0.47, 0.49)}
    weak = {"best_accuracy": _seeds(0.70, 0.72, 0.74), "over_majority": _seeds(0.20, 0.22, 0.24)}
    noisy = {"best_accuracy": _seeds(0.80, 0.95, 1.0), "over_majority": _seeds(0.45, 0.47, 0.49)}
    assert features_verdict({"a": present}, ["a"]).supported is True
    assert features_verdict({"a": present, "b": weak}, ["a", "b"]).supported is False
    unresolved = features_verdict({"a": noisy}, ["a"])
    assert unresolved.supported is None and "seeds" in unresolved.note
    deep = {"gain_over_layer0": _seeds(0.40, 0.45, 0.50), "over_random_init": _seeds(0.30, 0.32, 0.34)}
    flat = {"gain_over_layer0": _seeds(0.0, 0.01, 0.02), "over_random_init": _seeds(0.30, 0.32, 0.34)}
    random_too = {"gain_over_layer0": _seeds(0.40, 0.45, 0.50), "over_random_init": _seeds(-0.02, 0.0, 0.02)}
    middle = {"gain_over_layer0": _seeds(0.05, 0.15, 0.25), "over_random_init": _seeds(0.30, 0.32, 0.34)}
    assert depth_verdict(deep).supported is True
    assert depth_verdict(flat).supported is False
    assert depth_verdict(random_too).supported is False  # random weights decode it as well: no credit to pretraining
    assert depth_verdict(middle).supported is None


def test_probe_reads_a_planted_linear_feature_and_not_noise():
    g = torch.Generator().manual_seed(0)
    x, xt = torch.randn(400, 32, generator=g), torch.randn(200, 32, generator=g)
    y, yt = (x[:, 5] > 0).long(), (xt[:, 5] > 0).long()
    x[:, 5] += (2 * y - 1) * 0.5
    xt[:, 5] += (2 * yt - 1) * 0.5
    assert fit_probe(x, y, xt, yt)["test_accuracy"] >= 0.98
    noise = torch.randint(0, 2, (200,), generator=g)
    assert fit_probe(x, y, xt, noise)["test_accuracy"] < 0.65  # labels unrelated to the features
    assert majority_rate(torch.tensor([0, 0, 1]), torch.tensor([0, 1, 1, 1])) == 0.25


def test_agreement_items_are_balanced_and_test_heads_are_unseen():
    train, test = agreement_items()
    head = lambda text: text.split()[1]  # noqa: E731
    assert not {head(t) for t, _ in train} & {head(t) for t, _ in test}
    assert sum(y for _, y in train) * 2 == len(train)
    assert all(re.fullmatch(r"The \w+ [\w ]+ the \w+", t) for t, _ in train[:20])


def test_probes_on_a_real_tiny_model_read_a_planted_token_and_not_random_labels():
    """Known answers through the whole path (tokenise, hidden states, pooling, probe): a label that is the last
    token's identity is decodable from the embeddings (layer 0) of any model, random weights included; labels
    drawn independently of the text are not decodable at any layer."""
    import random

    from tunegap.analysis.probe import probe_model

    model, tokenizer = load_model("tiny", seed=0)
    rng = random.Random(0)
    words = ["".join(rng.choice("klmnoprstu") for _ in range(5)) for _ in range(240)]
    planted = [(f"the {w} {'x' if i % 2 else 'q'}", i % 2) for i, w in enumerate(words)]
    shuffled = [(text, rng.randrange(2)) for text, _ in planted]
    out = probe_model(model, tokenizer, {"agreement": (planted[:160], planted[160:])})["agreement"]
    assert out["test_accuracy"][0] >= 0.95 and out["majority"] == pytest.approx(0.5)
    noise = probe_model(model, tokenizer, {"agreement": (shuffled[:160], shuffled[160:])})["agreement"]
    assert max(noise["test_accuracy"]) <= 0.75


def test_probe_quick_writes_its_chart_and_anchored_verdicts(tmp_path):
    results = analyze_probe(out=tmp_path / "p", quick=True, seeds=2)
    assert (tmp_path / "p" / "probe_layers.png").is_file()
    best = results["intervals"]["agreement"]["best_accuracy"]
    assert best["per_seed"] == [s["agreement"]["best_accuracy"] for s in results["per_seed_summary"]]
    assert best["low"] <= best["value"] <= best["high"]
    assert all("Tenney" in v["anchor"]["paper"] for v in results["verdicts"])


# --------------------------------------------------------------------------- report

def test_report_gathers_every_section_with_embedded_charts(tmp_path):
    from tunegap.analysis.common import figure, save_figure
    from tunegap.report import Section, Verdict

    root = tmp_path / "results"
    for name, order in (("late", 60), ("early", 20)):
        folder = root / name
        folder.mkdir(parents=True)
        fig = figure(2, 2)
        fig.add_subplot(1, 1, 1).plot([1, 2], [3, 4])
        Section(f"{name} section", [Verdict(f"{name} claim", "1 s (measured)", True)], f"- {name} body",
                [save_figure(fig, folder / f"{name}.png")], order=order).save(folder)
    (root / "evil").mkdir()
    Section("Injected", [Verdict("x <script>alert(1)</script>", "1", None)], "<img src=x onerror=alert(1)>",
            [], order=99).save(root / "evil")
    path, sections = write_gathered_report(root)
    page = path.read_text()
    assert [s.title for s in sections] == ["early section", "late section", "Injected"]
    assert page.count("data:image/png;base64,") == 2
    assert "<script>" not in page and "&lt;script&gt;" in page and "<img src=x" not in page
    md = (root / "report.md").read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert links == ["early/early.png", "late/late.png"] and all((root / link).is_file() for link in links)
    assert not (root / "section.json").exists()  # gathering again must not find the report itself
    assert len(gather_sections(root)) == 3


def test_anchors_relate_to_the_verdict_and_render_beside_it(tmp_path):
    """Biderman et al. find full fine-tuning's update NOT low-rank: a 'supported' low-rank verdict differs from
    them, a 'not supported' one agrees; an unresolved verdict claims neither. The anchor survives section.json."""
    from tunegap.literature import ANCHORS, anchor
    from tunegap.report import Section, Verdict, gather_sections

    assert anchor("rank_low", True)["relation"] == "differs" and anchor("rank_low", False)["relation"] == "agrees"
    assert anchor("lora_forgets_less", True)["relation"] == "agrees"
    assert anchor("lora_forgets_less", False)["relation"] == "differs"
    assert anchor("retrieval_beats_ft", None)["relation"] == "unresolved"
    assert all(a.paper and a.where and a.finding and a.agrees != a.differs for a in ANCHORS.values())
    verdict = Verdict("update is low-rank", "r90 = 3 (measured)", True, anchor=anchor("rank_low", True))
    Section("Rank", [verdict]).save(tmp_path / "rank")
    (section,) = gather_sections(tmp_path)
    assert section.verdicts[0].anchor["paper"].startswith("Biderman")
    path, _ = write_gathered_report(tmp_path)
    page, md = path.read_text(), (tmp_path / "report.md").read_text()
    for text in (page, md):
        assert "published result" in text and "10-100x greater than typical LoRA" in text
        assert "tunegap differs from Biderman et al." in text


def test_markdown_lists_and_headings():
    html = markdown_to_html("# Title\n\n- one **bold**\n- two\n\ntext `x<y`")
    assert "<ul><li>one <strong>bold</strong></li><li>two</li></ul>" in html
    assert "<code>x&lt;y</code>" in html and "<h3>Title</h3>" in html


# --------------------------------------------------------------------------- CLI and run reuse

def test_cli_errors_are_one_line(tmp_path, capsys):
    from tunegap.cli import main

    assert main(["analyze", "rank", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "not a finished tunegap run" in err
    assert main(["sweep", "lora-rank", "--ranks", "4,x", "--out", str(tmp_path / "o")]) == 2
    assert "--ranks" in capsys.readouterr().err


def test_run_identity_ignores_names_and_folders_only():
    from tunegap.config import TrainConfig
    from tunegap.config import run_identity

    def identity(config):
        return run_identity(config.to_dict())

    a = TrainConfig(model="tiny", name="a", runs_dir="x", threads=1)
    assert identity(a) == identity(TrainConfig(model="tiny", name="b", runs_dir="y", threads=2))
    assert identity(a) != identity(TrainConfig(model="tiny", rank=4))


def test_run_identity_survives_a_new_setting_but_not_a_changed_default(monkeypatch):
    """A finished run's config.json predates settings added since; at their defaults they change nothing. A
    default that changes is another run: the saved config holds the old value."""
    from tunegap import config as config_module
    from tunegap.config import TrainConfig, changed_settings, run_identity

    saved = TrainConfig(model="tiny").to_dict()
    older = {k: v for k, v in saved.items() if k != "val_examples"}  # written before --val-examples existed
    assert run_identity(older) == run_identity(saved)
    assert changed_settings(older, saved) == []
    assert run_identity(older) != run_identity({**saved, "val_examples": 8})
    defaults = config_module._defaults()
    monkeypatch.setattr(config_module, "_defaults", lambda: {**defaults, "rank": defaults["rank"] * 2})
    assert run_identity(saved) != run_identity({**saved, "rank": defaults["rank"] * 2})
    assert changed_settings(saved, {**saved, "rank": defaults["rank"] * 2}) == ["rank"]


@pytest.mark.slow
@needs_smollm2
def test_default_model_self_kl_is_zero_and_retention_counts_only_what_the_base_knew():
    """The base model gets only about half of the shipped general questions right (0.50 measured, bf16 and fp32
    alike), so capability loss is read on that subset: `general_retained`, 1.0 for the model against itself."""
    base, tokenizer = load_model("smollm2-135m")
    result = measure_forgetting(base, base, tokenizer)
    assert result["forgetting_kl"] == 0.0
    assert 0.3 <= result["general_accuracy_base"] == result["general_accuracy"] and result["general_retained"] == 1.0


# --------------------------------------------------------------------------- rank over steps, lrs and seeds

@pytest.mark.parametrize("values, expected", [
    ([3.0, 4.0, 3.5, 3.0], True),          # r90 ~3.4, interval below rank 8 and the null's 200
    ([150.0, 160.0, 155.0, 158.0], False),  # interval above 10 x rank 8 = 80
    ([20.0, 30.0, 25.0, 28.0], None),      # between rank 8 and 80: not resolved
    ([5.0, 12.0, 3.0, 9.0], None),          # straddles rank 8
])
def test_pooled_low_rank_verdict_on_both_sides_of_its_thresholds(values, expected):
    verdict = pooled_low_rank_verdict(values, 8, null_r90=200.0)
    assert verdict["supported"] is expected and verdict["unresolved"] is (expected is None)
    if expected is None:
        assert "not resolved at this budget" in verdict["note"]


def test_pooled_low_rank_verdict_refuses_a_threshold_at_the_noise_level():
    # 10 x rank 8 = 80 is not below a null r90 of 60: 'not low-rank' would mean 'as spread as noise'
    verdict = pooled_low_rank_verdict([150.0, 160.0, 155.0], 8, null_r90=60.0)
    assert verdict["supported"] is None and "wider model" in verdict["note"]


def test_rank_growth_verdict_on_both_sides_of_zero():
    assert rank_growth_verdict([10, 11, 12], [20, 22, 21])["supported"] is True
    assert rank_growth_verdict([20, 22, 21], [10, 11, 12])["supported"] is False
    mixed = rank_growth_verdict([10, 11, 12], [12, 9, 13])
    assert mixed["supported"] is None and mixed["unresolved"]


def test_rank_grid_quick_trains_each_cell_per_seed(tmp_path):
    results = analyze_rank_grid(out=tmp_path / "grid", quick=True, steps_list=(2, 6), lrs=(3e-3,), seeds=2,
                                lora_ranks=(2, 4), runs_dir=str(tmp_path / "runs"))
    assert [(c["steps"], c["lr"]) for c in results["cells"]] == [(2, 3e-3), (6, 3e-3)]
    for cell in results["cells"]:
        r90 = cell["r90"]
        assert len(r90["per_seed"]) == 2 and len(set(cell["runs"])) == 2  # two seeds, two runs
        assert 1 <= r90["value"] <= 64 and r90["low"] <= r90["value"] <= r90["high"]  # a 64-wide model
        assert cell["r90_over_lora_rank"]["4"]["value"] == pytest.approx(r90["value"] / 4)
    pooled = results["pooled_r90"]
    assert pooled["per_seed"] == [v for c in results["cells"] for v in c["r90"]["per_seed"]]
    first = results["verdicts"][0]
    expected = pooled_low_rank_verdict(pooled["per_seed"], 4, results["seed_null_r90"]["value"])
    assert first["supported"] is expected["supported"] and first["anchor"]["paper"].startswith("Biderman")
    assert len(results["verdicts"]) == 2  # two step counts: the growth verdict too


def test_with_two_tasks_the_report_names_the_claims_they_disagree_on():
    from tunegap.report import Verdict

    def two(ratio, gap):
        return [Verdict("[t] The best LoRA rate is about 10x.", "", ratio), Verdict("[t] Within 5%.", "", gap,
                                                                                 unresolved=gap is None)]

    text = disagreements({"support": two(True, None), "docstrings": two(True, False)})
    assert text == ("The tasks disagree on 'Within 5%.' (support: not resolved at this budget, "
                    "docstrings: not supported).")
    assert disagreements({"support": two(True, True), "docstrings": two(True, True)}).endswith("same verdicts.")
    assert disagreements({"support": two(True, True)}) == ""
    # given names, and a task that judged fewer claims: only the claims every task judged are compared
    named = disagreements({"support": two(False, True), "docstrings": two(True, True)[:1]}, ["ratio", "gap"])
    assert named == "The tasks disagree on 'ratio' (support: not supported, docstrings: supported)."
