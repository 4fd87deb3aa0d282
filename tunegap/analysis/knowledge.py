"""`tunegap analyze knowledge`: teaching a model new facts by fine-tuning vs handing them over by retrieval.

The essay: fine-tuning is "a worse tool for stuffing new factual knowledge into a model ... retrieval is usually
the right tool". Measured as Ovadia et al. (2023, arXiv 2312.05934) measured it, on the shipped fictional product
specs (`fictional_facts()`), which no model can know. The same paraphrased questions (two per fact, worded
unlike every training text) go to:
  * closed book (0 paraphrases): the frozen base model, nothing added (the floor: it cannot know them);
  * fine-tuned on 1, 5 or 10 paraphrases of each fact (`paraphrase_records`: templated prompt -> statement
    pairs; paraphrase 1 is the shipped "state the <attribute> of the <device>" -> statement). Every count trains
    the same steps (the compute of `epochs` passes over one paraphrase per fact), so more paraphrases means more
    varied wording at equal compute, not more compute;
  * retrieval: BM25 (Robertson & Zaragoza 2009; the `rank_bm25` library) over the statements, the top k put in
    the frozen model's prompt;
  * fine-tuned plus retrieval: each fine-tuned model answering with the same retrieved notes in its prompt.
Fine-tuned arms are means with 95% intervals over seeds (`--seeds`); closed book and retrieval are deterministic
(frozen weights, greedy decoding, a fixed index), so they are measured once.
Accuracy: the fact's value (e.g. "48 TB") appears in the greedy answer. Costs: training FLOPs from the run's
ledger (formula) against the extra prompt tokens retrieval adds to every query (measured, priced with the
inference FLOP formula), giving the number of queries after which fine-tuning would have been cheaper.
Forgetting: the best fine-tune's drift on general prompts; retrieval leaves the weights untouched (0 by
construction).

Defaults (LoRA r16, 50 steps per fine-tune, paraphrases 0,1,5,10, 3 seeds: 9 fine-tunes) on the default model:
about 30 min on a free 2-core CPU (estimate: 2.3 s per LoRA step from benchmarks/RESULTS.md, plus 160 short
answers per fine-tune); `Trainer.predict` prints this machine's prediction before the first fine-tune.
"""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path

from ..config import TrainConfig
from ..costs.flops import generation_flops
from ..costs.shape import ModelShape
from ..data.support import fictional_facts, general_prompts, general_questions
from ..evaluate import generate
from ..forgetting import autocast_for, measure_forgetting
from ..io import atomic_write_text
from ..literature import anchor
from ..report import Section, Verdict
from ..stats import Interval, judge, mean_interval, paired_differences
from ..trainer import Trainer
from .common import (ORDER, QUICK_MODEL, AnalysisError, check_seeds, figure, fmt, load_base, md_table, q, quick_aware,
                     run_seeds, save_figure, seed_interval, tuned_model, write_outputs)

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


# (prompt, statement) templates of a fact; the first is the shipped training pair. None of the prompts asks the way
# the shipped questions do ("What is the ... of ...?", "How much ...?"): tests check no question equals a text here.
PARAPHRASES = (
    (TRAIN_PROMPT, "{statement}"),
    ("Give the {attribute} of the {device}.", "The {attribute} of the {device} is {answer}."),
    ("{device}: {attribute}?", "{device}: {attribute} = {answer}."),
    ("Fill in the spec sheet: {device}, {attribute}.", "Spec sheet, {device}. {Attribute}: {answer}."),
    ("Recall the {device}'s {attribute}.", "{answer} is the {attribute} of the {device}."),
    ("Look up the {attribute} on file for the {device}.", "Our records list the {device}'s {attribute} as {answer}."),
    ("Product fact check: the {device} and its {attribute}.", "For the {device}, the {attribute} is {answer}."),
    ("Remind me of the {device} {attribute}.", "Reminder: the {device} has a {attribute} of {answer}."),
    ("Complete the note about the {device} ({attribute}).", "Note: {device}, {attribute}: {answer}."),
    ("Write one line on the {attribute} of the {device}.", "The {device} is listed with a {attribute} of {answer}."),
)
DEFAULT_PARAPHRASES = (0, 1, 5, 10)


def paraphrase_records(fact: dict, n: int) -> list[dict]:
    """The first n templated (prompt -> statement) wordings of one fact, deterministic; n <= len(PARAPHRASES)."""
    if not 0 <= n <= len(PARAPHRASES):
        raise AnalysisError(f"--paraphrases: between 0 and {len(PARAPHRASES)} per fact, got {n}")
    words = ATTRIBUTE_WORDS[fact["attribute"]]
    fields = dict(attribute=words, Attribute=words[:1].upper() + words[1:], device=fact["device"],
                  answer=fact["answer"], statement=fact["statement"])
    return [{"messages": [{"role": "user", "content": prompt.format(**fields)},
                          {"role": "assistant", "content": statement.format(**fields)}]}
            for prompt, statement in PARAPHRASES[:n]]


def fact_records(facts: list[dict], paraphrases: int = 1) -> tuple[list[dict], list[dict]]:
    """SFT records: `paraphrases` wordings of each fact to train on; held-out loss on the questions -> statement."""
    train = [r for f in facts for r in paraphrase_records(f, paraphrases)]
    evals = [{"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": f["statement"]}]}
             for f in facts for question in f["questions"]]
    return train, evals


def _write_jsonl(path: Path, records: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))


def fine_tune_steps(epochs: float, facts: int, batch_size: int) -> int:
    """The steps of every fine-tune: `epochs` passes over one wording per fact, whatever the paraphrase count."""
    return max(1, math.ceil(epochs * facts / batch_size))


@quick_aware
def analyze_knowledge(*, out: str | Path, model: str = "smollm2-135m", method: str = "lora", rank: int = 16,
                      epochs: float = 10.0, lr: float = 1e-3, k: int = 3, paraphrases=DEFAULT_PARAPHRASES,
                      seeds: int = 3, runs_dir: str = "runs", quick: bool = False, max_new_tokens: int = 24,
                      progress: bool = True) -> dict:
    started = time.perf_counter()
    seeds = check_seeds(seeds)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    facts = fictional_facts()
    if quick:
        model, facts, epochs, max_new_tokens = QUICK_MODEL, facts[:8], 2.0, 8
    counts = sorted({int(n) for n in paraphrases})
    for n in counts:
        paraphrase_records(facts[0], n)  # the range check, before anything trains
    tuned_counts = [n for n in counts if n > 0]
    _, eval_records = fact_records(facts)
    eval_path = out / "facts_questions.jsonl"
    _write_jsonl(eval_path, eval_records)
    batch_size = 8
    steps = fine_tune_steps(epochs, len(facts), batch_size)
    configs = {}
    for n in tuned_counts:
        train_path = out / f"facts_train_p{n}.jsonl"
        _write_jsonl(train_path, fact_records(facts, n)[0])
        configs[n] = TrainConfig(model=model, method=method, rank=rank, alpha=2.0 * rank,
                                 data=str(train_path.resolve()), eval_data=str(eval_path.resolve()), seq_len=256 if quick else 128,
                                 batch_size=batch_size, max_steps=steps, lr=lr, eval_examples=len(eval_records),
                                 generate_examples=0, runs_dir=runs_dir, progress=progress and not quick,
                                 keep_checkpoints=1, forgetting="off", precision="fp32" if quick else "auto",
                                 threads=1 if quick else 0)
    reference_config = configs[tuned_counts[0]] if tuned_counts else TrainConfig(
        model=model, data="support", precision="fp32" if quick else "auto", runs_dir=runs_dir)

    base, tokenizer = load_base(reference_config.to_dict())
    autocast = autocast_for(reference_config.precision)
    questions = [(f, qn) for f in facts for qn in f["questions"]]
    retriever = Retriever([f["statement"] for f in facts])
    retrieved = [retriever.top(qn, k) for _, qn in questions]
    hit = [facts.index(f) in top for (f, _), top in zip(questions, retrieved)]
    plain = [[{"role": "user", "content": qn}] for _, qn in questions]
    with_notes = [[{"role": "user", "content": retrieval_prompt(qn, [facts[i]["statement"] for i in top])}]
                  for (_, qn), top in zip(questions, retrieved)]

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

    arms = {"closed_book": run_arm(base, plain), "retrieval": run_arm(base, with_notes)}
    for arm in arms.values():
        arm["deterministic"] = "frozen base weights, greedy decoding, fixed index: measured once, no seed interval"
    arms["retrieval"]["retrieval_hit_rate"] = q(sum(hit) / len(hit), "fraction", "measured")
    if tuned_counts:
        parts = Trainer(configs[tuned_counts[0]]).predict() if not quick else {}
        per_run = sum(parts.values()) + arms["closed_book"]["seconds"]["value"] + arms["retrieval"]["seconds"]["value"]
        if progress and not quick:
            print(f"analyze knowledge: {len(tuned_counts) * seeds} fine-tunes of {steps} steps, predicted "
                  f"{per_run * len(tuned_counts) * seeds / 60:.0f} min plus forgetting (estimate: Trainer.predict "
                  "for training, the measured closed-book and retrieval passes for each run's answers)")

    by_count, tuned_runs = {}, {}
    for n in tuned_counts:
        rows = []
        for i, (folder, ledger) in enumerate(run_seeds(configs[n], f"knowledge-{method}-p{n}", seeds)):
            tuned, _ = tuned_model(folder, ledger["config"])
            rows.append({"run": str(folder), "ledger": ledger, "plain": run_arm(tuned, plain),
                         "notes": run_arm(tuned, with_notes)})
            if progress and not quick:
                print(f"  {n} paraphrase(s), seed {i}: accuracy {rows[-1]['plain']['accuracy']['value']:.2f}, with "
                      f"retrieval {rows[-1]['notes']['accuracy']['value']:.2f} (fraction, measured)")
        tuned_runs[n] = rows
        by_count[n] = {
            "paraphrases": n, "runs": [r["run"] for r in rows], "steps": steps,
            "training_examples": n * len(facts),
            "fine_tuned": mean_interval([r["plain"]["accuracy"]["value"] for r in rows]).as_dict("fraction"),
            "fine_tuned_rag": mean_interval([r["notes"]["accuracy"]["value"] for r in rows]).as_dict("fraction"),
            "eval_loss_on_questions": seed_interval([r["ledger"] for r in rows], "eval_loss").as_dict("nats/token"),
            "training_flops": rows[0]["ledger"]["costs"]["flops_total"],
            "train_time_s": q(sum(r["ledger"]["costs"]["train_time_s"]["value"] for r in rows) / len(rows), "s",
                              "measured"),
        }
    by_count[0] = {"paraphrases": 0, "closed_book": arms["closed_book"]["accuracy"]}

    shape = ModelShape.from_hf_config(base.config)
    p0, p1 = arms["closed_book"]["mean_prompt_tokens"]["value"], arms["retrieval"]["mean_prompt_tokens"]["value"]
    extra = generation_flops(shape, round(p1), max_new_tokens) - generation_flops(shape, round(p0), max_new_tokens)
    arms["retrieval"]["extra_flops_per_query"] = q(extra, "FLOP", "formula")
    arms["retrieval"]["forgetting_kl"] = q(0.0, "nats/token", "formula")  # frozen weights: the same model
    results = {"analysis": "knowledge", "model": model, "quick": quick, "facts": len(facts),
               "questions": len(questions), "k": k, "seeds": seeds, "paraphrases": counts,
               "settings": {"method": method, "rank": rank, "epochs": epochs, "steps": steps, "lr": lr,
                            "batch_size": batch_size, "train_prompt": TRAIN_PROMPT, "max_new_tokens": max_new_tokens},
               "arms": arms, "by_paraphrases": {str(n): v for n, v in sorted(by_count.items())}}
    if tuned_counts:
        best = max(tuned_counts, key=lambda n: (by_count[n]["fine_tuned"]["value"], -n))
        small = dict(prompts=general_prompts()[:6], questions=general_questions()[:6], reply_tokens=8, answer_tokens=8)
        drift = []
        for row in tuned_runs[best]:
            tuned, _ = tuned_model(Path(row["run"]), row["ledger"]["config"])
            drift.append(measure_forgetting(base, tuned, tokenizer, autocast=autocast, **(small if quick else {})))
        train_flops = by_count[best]["training_flops"]["value"]
        arms["fine_tuned"] = {
            "paraphrases": best, "accuracy": by_count[best]["fine_tuned"],
            "mean_prompt_tokens": tuned_runs[best][0]["plain"]["mean_prompt_tokens"],
            "samples": tuned_runs[best][0]["plain"]["samples"],
            "training_flops": q(train_flops, "FLOP", "formula"),
            "train_time_s": by_count[best]["train_time_s"],
            "eval_loss_on_questions": by_count[best]["eval_loss_on_questions"],
            "forgetting": drift[0],
            "forgetting_kl": mean_interval([d["forgetting_kl"] for d in drift]).as_dict("nats/token"),
        }
        arms["fine_tuned_rag"] = {"paraphrases": best, "accuracy": by_count[best]["fine_tuned_rag"],
                                  "samples": tuned_runs[best][0]["notes"]["samples"]}
        results["best_paraphrases"] = best
        results["break_even_queries"] = q(train_flops / extra if extra > 0 else None, "query", "formula")
        results["rag_minus_best_ft"] = paired_differences(
            [arms["retrieval"]["accuracy"]["value"]] * seeds, by_count[best]["fine_tuned"]["per_seed"]).as_dict(
            "fraction")
        if len(tuned_counts) > 1:
            lo, hi = tuned_counts[0], tuned_counts[-1]
            results["paraphrase_gain"] = {"from": lo, "to": hi, **paired_differences(
                by_count[hi]["fine_tuned"]["per_seed"], by_count[lo]["fine_tuned"]["per_seed"]).as_dict("fraction")}
    results["wall_seconds"] = q(time.perf_counter() - started, "s", "measured")
    images = [_plot(results, out / "knowledge.png")]
    section = knowledge_section(results, images)
    write_outputs(out, results, section)
    return results


def _plot(results: dict, path: Path) -> Path:
    arms, by = results["arms"], results["by_paraphrases"]
    fig = figure(10, 4.0)
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    tuned = sorted((int(n), v) for n, v in by.items() if int(n) > 0)
    xs = [0] + [n for n, _ in tuned]

    def line(key, label, colour):
        ys = [v[key]["value"] for _, v in tuned]
        low = [v[key]["low"] if v[key]["low"] is not None else y for (_, v), y in zip(tuned, ys)]
        high = [v[key]["high"] if v[key]["high"] is not None else y for (_, v), y in zip(tuned, ys)]
        ax1.errorbar([n for n, _ in tuned], ys, yerr=[[y - lo for y, lo in zip(ys, low)],
                                                      [hi - y for y, hi in zip(ys, high)]],
                     marker="o", capsize=3, color=colour, label=label)

    closed = arms["closed_book"]["accuracy"]["value"]
    ax1.plot([0], [closed], marker="s", color="#8c8c8c", linestyle="none", label="closed book (0 paraphrases)")
    if tuned:
        line("fine_tuned", "fine-tuned (95% CI over seeds)", "#dd8452")
        line("fine_tuned_rag", "fine-tuned + retrieval", "#55a868")
    ax1.axhline(arms["retrieval"]["accuracy"]["value"], color="#4c72b0",
                label=f"retrieval, BM25 top-{results['k']} (deterministic)")
    ax1.set_xticks(xs)
    ax1.set_ylim(-0.05, 1.05)
    ax1.set_xlabel("paraphrases of each fact in training (equal steps)")
    ax1.set_ylabel("accuracy on reworded questions (measured)")
    ax1.set_title(f"{results['facts']} fictional facts, {results['questions']} questions", fontsize=9)
    ax1.legend(fontsize=7)
    n = [1, 10, 100, 1e3, 1e4, 1e5, 1e6]
    extra = arms["retrieval"]["extra_flops_per_query"]["value"]
    if "fine_tuned" in arms:
        ax2.plot(n, [arms["fine_tuned"]["training_flops"]["value"]] * len(n), color="#dd8452",
                 label="fine-tune: training once (formula)")
    ax2.plot(n, [extra * x for x in n], label="retrieval: extra prompt tokens per query (formula)", color="#4c72b0")
    ax2.set_xscale("log")
    ax2.set_yscale("log")
    ax2.set_xlabel("queries served")
    ax2.set_ylabel("extra FLOPs over the closed-book model")
    ax2.legend(fontsize=7)
    ax2.set_title("Compute: one-off training vs a longer prompt per query", fontsize=9)
    return save_figure(fig, path)


def knowledge_verdicts(results: dict) -> list:
    """Retrieval vs the best fine-tune, 10 vs 1 paraphrases (paired per seed), and forgetting: each judged."""
    verdicts = []
    if "rag_minus_best_ft" in results:
        diff = Interval.from_dict(results["rag_minus_best_ft"])
        j = judge(diff, 0.0, claim_below=False)
        verdicts.append(Verdict(
            "Retrieval is the better tool for new facts than fine-tuning.",
            f"accuracy, retrieval minus the best fine-tune ({results['best_paraphrases']} paraphrase(s)): "
            f"{diff.text(unit='fraction')} (measured, paired per seed)", j.supported,
            j.note or "the best fine-tune is chosen on these questions, which favours fine-tuning",
            anchor("retrieval_beats_ft", j.supported), unresolved=j.supported is None))
    if "paraphrase_gain" in results:
        gain = results["paraphrase_gain"]
        diff = Interval.from_dict(gain)
        j = judge(diff, 0.0, claim_below=False)
        verdicts.append(Verdict(
            "More paraphrases of each fact help fine-tuning learn it.",
            f"accuracy at {gain['to']} minus at {gain['from']} paraphrase(s): {diff.text(unit='fraction')} "
            "(measured, paired per seed)", j.supported,
            j.note or f"equal steps ({results['settings']['steps']}) for every paraphrase count",
            anchor("paraphrases_help_ft", j.supported), unresolved=j.supported is None))
    if "fine_tuned" in results["arms"]:
        kl = Interval.from_dict(results["arms"]["fine_tuned"]["forgetting_kl"])
        j = judge(kl, 0.01, claim_below=False)
        verdicts.append(Verdict(
            "Fine-tuning facts in disturbs unrelated behaviour; retrieval does not.",
            f"best fine-tune's KL(base‖tuned) {kl.text(unit='nats/token')} on general prompts (measured); "
            "retrieval 0 (weights unchanged)", j.supported, j.note or "threshold 0.01 nats/token",
            anchor("ft_disturbs", j.supported), unresolved=j.supported is None))
    return verdicts


def knowledge_section(results: dict, images: list[Path]):
    a, by = results["arms"], results["by_paraphrases"]
    verdicts = knowledge_verdicts(results)

    def ci(d: dict) -> str:
        return Interval.from_dict(d).text() if d.get("seeds") else fmt(d["value"])

    rows = [["closed book", "0", fmt(a["closed_book"]["accuracy"]["value"]) + " (deterministic)", "n/a",
             fmt(a["closed_book"]["mean_prompt_tokens"]["value"]), "0"]]
    for n, v in sorted(((int(n), v) for n, v in by.items() if int(n) > 0)):
        rows.append(["fine-tuned", str(n), ci(v["fine_tuned"]), ci(v["fine_tuned_rag"]),
                     fmt(a["closed_book"]["mean_prompt_tokens"]["value"]),
                     f"{v['training_flops']['value']:.3g} once (formula)"])
    rows.append([f"retrieval (BM25 top-{results['k']})", "0", fmt(a["retrieval"]["accuracy"]["value"]) +
                 " (deterministic)", "n/a", fmt(a["retrieval"]["mean_prompt_tokens"]["value"]),
                 f"{a['retrieval']['extra_flops_per_query']['value']:.3g} per query (formula)"])
    be = results.get("break_even_queries", {}).get("value")
    samples = a.get("fine_tuned", {}).get("samples", [])[:2] + a["retrieval"]["samples"][:2]
    body = "\n".join([
        f"Model `{results['model']}`{' (quick: random tiny model; code path only)' if results['quick'] else ''}; "
        f"{results['facts']} fictional product facts, each asked two ways unlike every training wording; "
        f"{results['settings']['method']} fine-tunes of {results['settings']['steps']} steps each "
        f"(batch {results['settings']['batch_size']}, lr {results['settings']['lr']}) on 1 to 10 templated "
        f"wordings per fact, {results['seeds']} seed(s): means with 95% intervals. Right = the value appears in "
        f"the greedy answer (max {results['settings']['max_new_tokens']} new tokens). BM25 puts the right fact in "
        f"the top {results['k']} for {100 * a['retrieval']['retrieval_hit_rate']['value']:.0f}% of questions "
        "(measured).",
        "",
        md_table(["arm", "paraphrases", "accuracy (measured)", "with retrieval (measured)", "prompt tokens",
                  "extra compute"], rows),
        "",
        "In Ovadia et al. (2023) fine-tuning plus retrieval did not consistently beat retrieval alone; compare "
        "the retrieval row with the 'with retrieval' column.",
        "",
        (f"Break-even: after {fmt(be)} queries retrieval's longer prompts have cost as many FLOPs as the best "
         "fine-tune (formula; retrieval also needs an index and a store, fine-tuning needs retraining whenever a "
         "fact changes)." if be is not None else ""),
        "",
        "Sample answers (best fine-tune, then retrieval):",
        "",
        *[f"- Q: {s['question']} (expects {s['answer']}) -> `{s['reply'][:120]}`" for s in samples],
    ])
    return Section(title="Facts: fine-tuning vs retrieval", verdicts=verdicts, body_markdown=body, images=images,
                   order=ORDER["knowledge"])


__all__ = ["analyze_knowledge", "Retriever", "tokenize_words", "retrieval_prompt", "fact_records", "correct",
           "paraphrase_records", "knowledge_verdicts", "fine_tune_steps", "PARAPHRASES", "DEFAULT_PARAPHRASES"]
