"""`tunegap analyze knowledge`: teaching a model new facts by fine-tuning vs handing them over by retrieval.

The essay: fine-tuning is "a worse tool for stuffing new factual knowledge into a model ... retrieval is usually
the right tool". The facts are the shipped fictional product specs (`fictional_facts()`), which no model can
know. Three arms answer the same paraphrased questions (two per fact, worded unlike the training text):
  * closed book: the frozen base model, nothing added (the floor: it cannot know them);
  * fine-tuned: the one training loop on "state the <attribute> of the <device>" -> the fact's statement;
  * retrieval: BM25 (Robertson & Zaragoza 2009; the `rank_bm25` library) over the statements, the top k put in
    the frozen model's prompt.
Accuracy: the fact's value (e.g. "48 TB") appears in the greedy answer. Costs: training FLOPs from the run's
ledger (formula) against the extra prompt tokens retrieval adds to every query (measured, priced with the
inference FLOP formula), giving the number of queries after which fine-tuning would have been cheaper.
Forgetting: the fine-tuned model's drift on general prompts; retrieval leaves the weights untouched (0 by
construction).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

from ..literature import anchor
from .common import (ORDER, QUICK_MODEL, figure, fmt, load_base, md_table, q, quick_aware, run_or_reuse, save_figure,
                     tuned_model, write_outputs)

_WORD = re.compile(r"[a-z0-9$.,]+")
TRAIN_PROMPT = "State the {attribute} of the {device}."
ATTRIBUTE_WORDS = {"storage": "storage capacity", "battery": "battery life", "weight": "weight",
                   "launch": "launch year", "codename": "development codename", "colour": "colour name",
                   "port": "default port", "price": "price"}


def tokenize_words(text: str) -> list[str]:
    """Lower-cased word tokens for BM25 (digits, $ and decimal points kept: '48 tb', '$1,340')."""
    return [w.strip(".,") for w in _WORD.findall(text.lower()) if w.strip(".,")]


class Retriever:
    """BM25 (Okapi, k1 = 1.5, b = 0.75, rank_bm25's defaults) over a list of documents."""

    def __init__(self, documents: list[str]):
        from rank_bm25 import BM25Okapi

        if not documents:
            raise ValueError("retrieval needs at least one document")
        self.documents = list(documents)
        self.bm25 = BM25Okapi([tokenize_words(d) for d in self.documents])

    def top(self, query: str, k: int) -> list[int]:
        scores = self.bm25.get_scores(tokenize_words(query))
        return sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:k]


def retrieval_prompt(question: str, passages: list[str]) -> str:
    notes = "\n".join(f"- {p}" for p in passages)
    return f"Use these notes to answer.\n{notes}\n\nQuestion: {question}"


def accepted(fact: dict) -> list[str]:
    """The value as written, and without '$' or thousands commas ('$1,340' -> '1,340', '1340')."""
    v = fact["answer"]
    forms = {v, v.replace("$", ""), v.replace("$", "").replace(",", "")}
    return sorted(f for f in forms if f.strip())


def correct(fact: dict, text: str) -> bool:
    low = text.casefold()
    return any(a.casefold() in low for a in accepted(fact))


def fact_records(facts: list[dict]) -> tuple[list[dict], list[dict]]:
    """SFT records: train on 'state the <attribute> of <device>' -> statement; held-out loss on the paraphrases."""
    train = [{"messages": [{"role": "user", "content": TRAIN_PROMPT.format(attribute=ATTRIBUTE_WORDS[f["attribute"]],
                                                                          device=f["device"])},
                           {"role": "assistant", "content": f["statement"]}]} for f in facts]
    evals = [{"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": f["statement"]}]}
             for f in facts for question in f["questions"]]
    return train, evals


def _write_jsonl(path: Path, records: list[dict]) -> None:
    from ..io import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))


@quick_aware
def analyze_knowledge(*, out: str | Path, model: str = "smollm2-135m", method: str = "lora", rank: int = 16,
                      epochs: float = 10.0, lr: float = 1e-3, k: int = 3, runs_dir: str = "runs", quick: bool = False,
                      max_new_tokens: int = 24, progress: bool = True) -> dict:
    from ..costs.flops import generation_flops
    from ..costs.shape import ModelShape
    from ..data.support import fictional_facts, general_prompts, general_questions
    from ..evaluate import generate
    from ..forgetting import autocast_for, measure_forgetting

    started = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    facts = fictional_facts()
    if quick:
        model, facts, epochs, max_new_tokens = QUICK_MODEL, facts[:8], 2.0, 8
    train_records, eval_records = fact_records(facts)
    train_path, eval_path = out / "facts_train.jsonl", out / "facts_questions.jsonl"
    _write_jsonl(train_path, train_records)
    _write_jsonl(eval_path, eval_records)
    from ..config import TrainConfig

    config = TrainConfig(model=model, method=method, rank=rank, alpha=2.0 * rank, data=str(train_path.resolve()),
                         eval_data=str(eval_path.resolve()), seq_len=256 if quick else 128, batch_size=8,
                         epochs=epochs, lr=lr, eval_examples=len(eval_records), generate_examples=0,
                         runs_dir=runs_dir, progress=progress and not quick, keep_checkpoints=1, forgetting="off",
                         precision="fp32" if quick else "auto", threads=1 if quick else 0)
    folder, ledger = run_or_reuse(config, f"knowledge-{method}")

    base, tokenizer = load_base(config.to_dict())
    tuned, _ = tuned_model(folder, ledger["config"])
    questions = [(f, qn) for f in facts for qn in f["questions"]]
    retriever = Retriever([f["statement"] for f in facts])
    retrieved = [retriever.top(qn, k) for _, qn in questions]
    hit = [facts.index(f) in top for (f, _), top in zip(questions, retrieved)]
    plain = [[{"role": "user", "content": qn}] for _, qn in questions]
    with_notes = [[{"role": "user", "content": retrieval_prompt(qn, [facts[i]["statement"] for i in top])}]
                  for (_, qn), top in zip(questions, retrieved)]

    autocast = autocast_for(config.precision)

    def run_arm(model_, conversations):
        t0 = time.perf_counter()
        texts, prompt_lens = generate(model_, tokenizer, conversations, max_new_tokens=max_new_tokens,
                                      autocast=autocast)[:2]
        right = [correct(f, t) for (f, _), t in zip(questions, texts)]
        return {"accuracy": q(sum(right) / len(right), "fraction", "measured"), "correct": right,
                "mean_prompt_tokens": q(sum(prompt_lens) / len(prompt_lens), "token", "measured"),
                "seconds": q(time.perf_counter() - t0, "s", "measured"),
                "samples": [{"question": qn, "answer": f["answer"], "reply": t}
                            for (f, qn), t in list(zip(questions, texts))[:4]]}

    arms = {"closed_book": run_arm(base, plain), "fine_tuned": run_arm(tuned, plain),
            "retrieval": run_arm(base, with_notes)}
    arms["retrieval"]["retrieval_hit_rate"] = q(sum(hit) / len(hit), "fraction", "measured")

    shape = ModelShape.from_hf_config(base.config)
    p0, p1 = arms["closed_book"]["mean_prompt_tokens"]["value"], arms["retrieval"]["mean_prompt_tokens"]["value"]
    per_query_plain = generation_flops(shape, round(p0), max_new_tokens)
    per_query_rag = generation_flops(shape, round(p1), max_new_tokens)
    extra = per_query_rag - per_query_plain
    train_flops = ledger["costs"]["flops_total"]["value"]
    arms["fine_tuned"]["training_flops"] = q(train_flops, "FLOP", "formula")
    arms["fine_tuned"]["train_time_s"] = ledger["costs"]["train_time_s"]
    arms["fine_tuned"]["eval_loss_on_questions"] = q(ledger.get("metrics", {}).get("eval_loss"), "nats/token",
                                                     "measured")
    arms["retrieval"]["extra_flops_per_query"] = q(extra, "FLOP", "formula")
    small = dict(prompts=general_prompts()[:6], questions=general_questions()[:6], reply_tokens=8, answer_tokens=8)
    forgetting = measure_forgetting(base, tuned, tokenizer, autocast=autocast, **(small if quick else {}))
    arms["fine_tuned"]["forgetting"] = forgetting
    arms["retrieval"]["forgetting_kl"] = q(0.0, "nats/token", "formula")  # frozen weights: the same model
    results = {"analysis": "knowledge", "model": model, "quick": quick, "facts": len(facts),
               "questions": len(questions), "k": k, "run": str(folder),
               "settings": {"method": method, "rank": rank, "epochs": epochs, "lr": lr,
                            "train_prompt": TRAIN_PROMPT, "max_new_tokens": max_new_tokens},
               "arms": arms,
               "break_even_queries": q(train_flops / extra if extra > 0 else None, "query", "formula"),
               "wall_seconds": q(time.perf_counter() - started, "s", "measured")}
    images = [_plot(results, out / "knowledge.png")]
    section = knowledge_section(results, images)
    results["verdicts"] = [v.__dict__ for v in section.verdicts]
    write_outputs(out, results, section)
    return results


def _plot(results: dict, path: Path) -> Path:
    arms = results["arms"]
    fig = figure(9, 4.0)
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    labels = ["closed_book", "fine_tuned", "retrieval"]
    ax1.bar(labels, [arms[k]["accuracy"]["value"] for k in labels], color=["#8c8c8c", "#dd8452", "#4c72b0"])
    ax1.set_ylim(0, 1)
    ax1.set_ylabel("accuracy on paraphrased questions (measured)")
    ax1.set_title(f"{results['facts']} fictional facts, {results['questions']} questions", fontsize=9)
    n = [1, 10, 100, 1e3, 1e4, 1e5, 1e6]
    train = arms["fine_tuned"]["training_flops"]["value"]
    extra = arms["retrieval"]["extra_flops_per_query"]["value"]
    ax2.plot(n, [train] * len(n), label="fine-tune: training once (formula)", color="#dd8452")
    ax2.plot(n, [extra * x for x in n], label="retrieval: extra prompt tokens per query (formula)", color="#4c72b0")
    ax2.set_xscale("log")
    ax2.set_yscale("log")
    ax2.set_xlabel("queries served")
    ax2.set_ylabel("extra FLOPs over the closed-book model")
    ax2.legend(fontsize=7)
    ax2.set_title("Compute: one-off training vs a longer prompt per query", fontsize=9)
    return save_figure(fig, path)


def knowledge_section(results: dict, images: list[Path]):
    from ..report import Section, Verdict

    a = results["arms"]
    acc = {k: a[k]["accuracy"]["value"] for k in ("closed_book", "fine_tuned", "retrieval")}
    f = a["fine_tuned"]["forgetting"]
    lost_accuracy = f["general_retained"] is not None and f["general_retained"] < 1.0
    measured = (f"accuracy on paraphrased questions: closed book {acc['closed_book']:.2f}, fine-tuned "
                f"{acc['fine_tuned']:.2f}, retrieval (BM25 top-{results['k']}) {acc['retrieval']:.2f}")
    supported = True if acc["retrieval"] > acc["fine_tuned"] + 0.05 else False \
        if acc["fine_tuned"] > acc["retrieval"] + 0.05 else None
    be = results["break_even_queries"]["value"]
    verdicts = [
        Verdict("Retrieval is the better tool for new facts than fine-tuning.", measured, supported,
                f"{results['settings']['method']} fine-tune, {results['settings']['epochs']:g} epochs on one statement "
                "per fact; retrieval uses the frozen base model", anchor("retrieval_beats_ft", supported)),
        Verdict("Fine-tuning facts in disturbs unrelated behaviour; retrieval does not.",
                f"fine-tuned KL(base‖tuned) {f['forgetting_kl']:.3g} nats/token, general accuracy "
                f"{fmt(f['general_accuracy'])} (base {fmt(f['general_accuracy_base'])}; base-right answers kept "
                f"{fmt(f['general_retained'])}); "
                "retrieval 0 (weights unchanged)", f["forgetting_kl"] > 0.01 or lost_accuracy,
                anchor=anchor("ft_disturbs", f["forgetting_kl"] > 0.01 or lost_accuracy)),
    ]
    rows = [["closed book", fmt(acc["closed_book"]), fmt(a["closed_book"]["mean_prompt_tokens"]["value"]), "0", "0"],
            ["fine-tuned", fmt(acc["fine_tuned"]), fmt(a["fine_tuned"]["mean_prompt_tokens"]["value"]),
             f"{a['fine_tuned']['training_flops']['value']:.3g} once (formula)", f"{f['forgetting_kl']:.3g}"],
            ["retrieval", fmt(acc["retrieval"]), fmt(a["retrieval"]["mean_prompt_tokens"]["value"]),
             f"{a['retrieval']['extra_flops_per_query']['value']:.3g} per query (formula)", "0 (frozen)"]]
    samples = a["fine_tuned"]["samples"][:2] + a["retrieval"]["samples"][:2]
    body = "\n".join([
        f"Model `{results['model']}`{' (quick: random tiny model; code path only)' if results['quick'] else ''}; "
        f"{results['facts']} fictional product facts, each asked two ways unlike the training wording "
        f"(\"{results['settings']['train_prompt']}\"). Right = the value appears in the greedy answer "
        f"(max {results['settings']['max_new_tokens']} new tokens). BM25 puts the right fact in the top "
        f"{results['k']} for {100 * a['retrieval']['retrieval_hit_rate']['value']:.0f}% of questions (measured).",
        "",
        md_table(["arm", "accuracy (measured)", "prompt tokens (measured)", "extra compute", "KL forgetting"], rows),
        "",
        f"Break-even: after {fmt(be)} queries retrieval's longer prompts have cost as many FLOPs as the fine-tune "
        "(formula; retrieval also needs an index and a store, fine-tuning needs retraining whenever a fact changes).",
        "",
        "Sample answers (fine-tuned, then retrieval):",
        "",
        *[f"- Q: {s['question']} (expects {s['answer']}) -> `{s['reply'][:120]}`" for s in samples],
    ])
    return Section(title="Facts: fine-tuning vs retrieval", verdicts=verdicts, body_markdown=body, images=images,
                   order=ORDER["knowledge"])


__all__ = ["analyze_knowledge", "Retriever", "tokenize_words", "retrieval_prompt", "fact_records", "correct"]
