"""`tunegap analyze knowledge` as Ovadia et al. 2023 measured it: paraphrases, retrieval, fine-tuning plus retrieval."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tunegap.analysis.common import AnalysisError
from tunegap.analysis.knowledge import (PARAPHRASES, Retriever, analyze_knowledge, fact_records, fine_tune_steps,
                                        knowledge_verdicts, paraphrase_records)
from tunegap.data.support import fictional_facts
from tunegap.stats import mean_interval, paired_differences


def _words(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9$.,]+", text.lower())).strip(" .,")


@pytest.mark.parametrize("n", [1, 5, 10])
def test_paraphrases_are_n_distinct_wordings_that_state_the_fact(n):
    for fact in fictional_facts():
        records = paraphrase_records(fact, n)
        prompts = [r["messages"][0]["content"] for r in records]
        statements = [r["messages"][1]["content"] for r in records]
        assert len(set(statements)) == n and len(set(prompts)) == n
        assert all(fact["answer"] in s and fact["device"] in s for s in statements)
    assert paraphrase_records(fictional_facts()[0], 1)[0]["messages"][1]["content"] == fictional_facts()[0]["statement"]
    assert paraphrase_records(fictional_facts()[0], 0) == []
    with pytest.raises(AnalysisError):
        paraphrase_records(fictional_facts()[0], len(PARAPHRASES) + 1)


def test_no_test_question_is_worded_like_any_training_text():
    facts = fictional_facts()
    train, evals = fact_records(facts, len(PARAPHRASES))
    texts = {_words(m["content"]) for r in train for m in r["messages"]}
    questions = [_words(r["messages"][0]["content"]) for r in evals]
    assert len(questions) == 2 * len(facts)
    assert not set(questions) & texts  # not even after case and punctuation are dropped
    assert not any(q in t for q in questions for t in texts)


def test_every_paraphrase_count_trains_the_same_steps():
    assert fine_tune_steps(10, 40, 8) == 50
    assert fine_tune_steps(2, 8, 8) == 2 and fine_tune_steps(0.1, 8, 8) == 1


def _results(rag, ft1, ft10, kl=(0.2, 0.25, 0.22)):
    """Planted results: retrieval's accuracy (deterministic), fine-tuned accuracy per seed at 1 and 10 paraphrases."""
    best = 10 if mean_interval(ft10).mean >= mean_interval(ft1).mean else 1
    best_acc = ft10 if best == 10 else ft1
    return {"best_paraphrases": best, "settings": {"steps": 50},
            "rag_minus_best_ft": paired_differences([rag] * len(best_acc), best_acc).as_dict("fraction"),
            "paraphrase_gain": {"from": 1, "to": 10, **paired_differences(ft10, ft1).as_dict("fraction")},
            "arms": {"fine_tuned": {"forgetting_kl": mean_interval(kl).as_dict("nats/token")}}}


def test_retrieval_beats_fine_tuning_on_each_side_of_zero():
    rag, gain, kl = knowledge_verdicts(_results(0.9, [0.1, 0.12, 0.11], [0.3, 0.35, 0.32]))
    assert rag.supported is True and rag.anchor["paper"].startswith("Ovadia") and rag.anchor["relation"] == "agrees"
    rag, *_ = knowledge_verdicts(_results(0.2, [0.1, 0.12, 0.11], [0.5, 0.55, 0.52]))
    assert rag.supported is False and rag.anchor["relation"] == "differs"
    rag, *_ = knowledge_verdicts(_results(0.5, [0.1, 0.1, 0.1], [0.3, 0.7, 0.45]))
    assert rag.supported is None and rag.unresolved and "seeds" in rag.note


def test_more_paraphrases_help_on_each_side_of_zero():
    _, gain, _ = knowledge_verdicts(_results(0.9, [0.1, 0.12, 0.11], [0.3, 0.35, 0.32]))
    assert gain.supported is True and "10 minus at 1" in gain.measured
    _, gain, _ = knowledge_verdicts(_results(0.9, [0.4, 0.45, 0.42], [0.1, 0.12, 0.11]))
    assert gain.supported is False
    _, gain, _ = knowledge_verdicts(_results(0.9, [0.4, 0.2, 0.3], [0.3, 0.3, 0.3]))
    assert gain.supported is None and gain.unresolved
    *_, kl = knowledge_verdicts(_results(0.9, [0.1] * 3, [0.1] * 3, kl=(0.001, 0.002, 0.0015)))
    assert kl.supported is False  # below 0.01 nats/token on every seed


def test_knowledge_quick_paraphrases_retrieval_and_both(tmp_path):
    out = tmp_path / "k"
    results = analyze_knowledge(out=out, quick=True, runs_dir=str(tmp_path / "runs"), paraphrases=(0, 1, 5),
                                seeds=2)
    by = results["by_paraphrases"]
    assert set(by) == {"0", "1", "5"}
    assert len((out / "facts_train_p5.jsonl").read_text().splitlines()) == 5 * results["facts"]
    steps = set()
    for n in ("1", "5"):
        assert len(set(by[n]["runs"])) == 2  # one run per seed
        for folder in by[n]["runs"]:
            ledger = json.loads((Path(folder) / "ledger.json").read_text())
            steps.add(ledger["config"]["max_steps"])
    assert steps == {results["settings"]["steps"]}  # equal compute for every paraphrase count
    best = str(results["best_paraphrases"])
    rag = results["arms"]["retrieval"]["accuracy"]["value"]
    assert results["rag_minus_best_ft"]["per_seed"] == pytest.approx(
        [rag - a for a in by[best]["fine_tuned"]["per_seed"]])
    assert results["paraphrase_gain"]["per_seed"] == pytest.approx(
        [b - a for a, b in zip(by["1"]["fine_tuned"]["per_seed"], by["5"]["fine_tuned"]["per_seed"])])
    facts = fictional_facts()[:results["facts"]]
    retriever = Retriever([f["statement"] for f in facts])
    hits = [i in retriever.top(qn, results["k"]) for i, f in enumerate(facts) for qn in f["questions"]]
    assert results["arms"]["retrieval"]["retrieval_hit_rate"]["value"] == pytest.approx(sum(hits) / len(hits))
    assert [v["anchor"]["paper"].split()[0] for v in results["verdicts"]] == ["Ovadia", "Ovadia", "Biderman"]
    assert (out / "knowledge.png").is_file()
