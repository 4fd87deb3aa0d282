"""`tunegap decide`: prompt, retrieve or fine-tune, for one task and one query volume, each option measured here.

"Every team building on top of LLMs makes a fine-tune-vs-prompt-vs-RAG decision regularly, and most of them make
it badly" (the essay's opening). The three options run on the same held-out split of the user's task:

  prompt     the frozen model with the first k training examples, solved, in every prompt
  retrieve   the frozen model with the k training examples whose prompts are most like the query (BM25, as
             `analyze knowledge` retrieves) in the prompt
  fine-tune  a LoRA fine-tune on the training split through tunegap's trainer (or a finished run, `--run`)

Quality is the token F1 of each greedy reply against the reference reply (SQuAD's answer metric, Rajpurkar et
al. 2016), measured. Cost is per query, the inference FLOPs of its prompt and reply (formula, `costs.flops`),
and one-time, the fine-tune's FLOPs from its ledger; dollars price FLOPs on `--gpu` at an assumed utilisation
(an estimate, stated). Over `--months` at `--queries-per-month`, the cheapest option whose quality is within
`--tolerance` of the best is recommended, with the query counts at which the fine-tune breaks even.
`--scale-to MODEL` repeats the cost arithmetic for that model's shape; its quality is not measured, and the
output says the ranking is assumed to carry.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

from .analysis.knowledge import Retriever
from .config import TrainConfig
from .costs.catalog import gpu_peak_flops, resolve_model
from .costs.flops import generation_flops, train_step_flops
from .costs.hardware import DEFAULT_MFU
from .costs.shape import ModelShape
from .data.docstrings import token_f1
from .data.loaders import load_sft
from .data.support import generate_support
from .evaluate import few_shot, generate
from .io import atomic_write_json, atomic_write_text
from .ledger import format_flops, q
from .methods import make_method
from .models import load_model
from .outputs import finished_run, load_run
from .report import Section, Verdict
from .trainer import run_or_reuse

QUICK_MODEL = "tiny"
SERVING_MFU = 0.1  # assumed: decoding is bound by memory, far below a training step's utilisation
TRAINING_MFU = DEFAULT_MFU  # assumed, the estimator's


@dataclass
class Option:
    name: str
    quality: float  # token F1, measured
    per_query_flops: float  # formula
    one_time_flops: float  # formula (the fine-tune's ledger)
    seconds_per_query: float  # measured here

    def total_flops(self, queries: float) -> float:
        return self.one_time_flops + queries * self.per_query_flops


def recommend(options: list[Option], queries: float, tolerance: float) -> tuple[Option, list[Option]]:
    """The cheapest option (FLOPs over `queries`) among those within `tolerance` of the best quality, and that
    eligible set."""
    best = max(o.quality for o in options)
    eligible = [o for o in options if o.quality >= best - tolerance]
    return min(eligible, key=lambda o: o.total_flops(queries)), eligible


def break_even(tuned: Option, other: Option) -> float | None:
    """Queries after which the fine-tune's one-time cost is repaid by its cheaper queries (None: never)."""
    saved = other.per_query_flops - tuned.per_query_flops
    extra = tuned.one_time_flops - other.one_time_flops
    return extra / saved if saved > 0 else None


def split_task(records: list[dict], eval_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(eval_fraction * len(records)))
    return [records[i] for i in order[n_eval:]], [records[i] for i in order[:n_eval]]


def reference_reply(record: dict) -> str:
    return record["messages"][-1]["content"] if record["messages"][-1]["role"] == "assistant" else ""


def interval(values: list[float], seed: int = 0, draws: int = 1000) -> tuple[float, float]:
    """95% bootstrap interval of the mean over queries (percentile method)."""
    rng = random.Random(seed)
    means = sorted(sum(rng.choices(values, k=len(values))) / len(values) for _ in range(draws))
    return means[int(0.025 * draws)], means[int(0.975 * draws) - 1]


def measure(name, model, tokenizer, shape, records, conversations, max_new_tokens, one_time_flops=0.0) -> dict:
    """Greedy replies to `conversations`: quality against `records`' replies, per-query FLOPs and seconds."""
    started = time.perf_counter()
    texts, prompt_lens, new_lens = generate(model, tokenizer, conversations, max_new_tokens=max_new_tokens)
    seconds = time.perf_counter() - started
    scores = [token_f1(t, reference_reply(r)) for t, r in zip(texts, records)]
    option = Option(name, sum(scores) / len(scores),
                    sum(generation_flops(shape, p, max(1, n)) for p, n in zip(prompt_lens, new_lens)) / len(texts),
                    one_time_flops, seconds / len(texts))
    return {"option": option, "interval": interval(scores), "mean_prompt_tokens": sum(prompt_lens) / len(texts),
            "mean_new_tokens": sum(new_lens) / len(texts), "sample": texts[0] if texts else ""}


def fine_tune(args, train_path: Path, eval_path: Path) -> tuple[Path, dict]:
    """The LoRA option's run: a finished `--run`, or one trained (and reused when unchanged) here."""
    if args.run:
        return finished_run(args.run, args.runs_dir)
    config = TrainConfig(model=args.model, method="lora", rank=args.rank, alpha=2.0 * args.rank,
                         data=str(train_path.resolve()), eval_data=str(eval_path.resolve()), epochs=args.epochs,
                         lr=args.lr, seq_len=args.seq_len, batch_size=8, generate_examples=0, task_metrics="off",
                         forgetting="off", runs_dir=args.runs_dir, progress=not args.quick, seed=args.seed,
                         **({"precision": "fp32", "threads": 1} if args.quick else {}))
    return run_or_reuse(config, prefix="decide-lora", what="fine-tune")


def scaled(options: list[Option], measured: dict, ledger: dict, model_name: str) -> list[Option]:
    """The same options priced for another model's shape, at the token counts measured here (formula)."""
    shape, _ = resolve_model(model_name)
    costs = ledger["costs"]
    examples, tokens = max(1, costs["examples"]["value"]), costs["tokens"]["value"]
    rank = ledger["config"].get("rank", 8)
    trainable = make_method("lora", rank=rank, alpha=2.0 * rank).trainable(shape)
    one_time = train_step_flops(shape, trainable, sequences=examples, seq_len=max(1, round(tokens / examples))).total
    out = []
    for o in options:
        m = measured[o.name]
        per_query = generation_flops(shape, round(m["mean_prompt_tokens"]), max(1, round(m["mean_new_tokens"])))
        out.append(Option(o.name, o.quality, per_query, one_time if o.one_time_flops else 0.0, float("nan")))
    return out


def _query_text(record: dict) -> str:
    return " ".join(m["content"] for m in record["messages"] if m["role"] == "user")


def _dollars(flops: float, gpu: str, price: float, mfu: float) -> float:
    return flops / (gpu_peak_flops(gpu, "bf16") * mfu) / 3600 * price


def _load_task(args) -> tuple[list[dict], list[dict]]:
    if args.task == "support":
        train, held = generate_support()
        train = train[:args.train_examples or 200]
    else:
        records = load_sft(args.task)
        train, held = (records, load_sft(args.eval)) if args.eval else split_task(records, args.eval_fraction,
                                                                                    args.seed)
        train = train[:args.train_examples] if args.train_examples else train
    if not train or not held:
        raise ValueError(f"{args.task}: needs training and held-out examples (got {len(train)} and {len(held)})")
    return train, held[:args.eval_examples]


def run_decide(args) -> dict:
    """Measure the three options, recommend one, write results.json, a chart and a report section."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train, held = _load_task(args)
    train_path, eval_path = out / "train.jsonl", out / "eval.jsonl"
    for path, rows in ((train_path, train), (eval_path, held)):
        atomic_write_text(path, "".join(json.dumps({"messages": r["messages"]}) + "\n" for r in rows))
    model, tokenizer = load_model(args.model, seed=args.seed)
    shape = ModelShape.from_hf_config(model.config)
    k = min(args.k, len(train))
    retriever = Retriever([_query_text(r) for r in train])
    prompted = {f"prompt ({k}-shot)": [few_shot(r["messages"], train[:k]) for r in held],
                f"retrieve ({k} by BM25)": [few_shot(r["messages"], [train[i] for i in
                                                                     retriever.top(_query_text(r), k)]) for r in held]}
    measured = {name: measure(name, model, tokenizer, shape, held, convs, args.max_new_tokens)
                for name, convs in prompted.items()}
    folder, ledger = fine_tune(args, train_path, eval_path)
    if ledger["config"]["model"] != args.model:
        raise ValueError(f"{folder}: fine-tuned from {ledger['config']['model']}, not --model {args.model}")
    tuned = load_run(folder, merge=True)
    measured["fine-tune (LoRA)"] = measure("fine-tune (LoRA)", tuned.model, tuned.tokenizer, shape, held,
                                           [r["messages"] for r in held], args.max_new_tokens,
                                           one_time_flops=ledger["costs"]["flops_total"]["value"])
    results = summarise(args, measured, ledger, folder)
    if args.scale_to:
        options = scaled([m["option"] for m in measured.values()], measured, ledger, args.scale_to)
        results["scaled"] = {"model": args.scale_to, **decision(args, options)}
    atomic_write_json(out / "results.json", results)
    write_section(out, results)
    return results


def decision(args, options: list[Option]) -> dict:
    """Each option's cost over the horizon, the recommendation and the fine-tune's break-even query counts."""
    queries = args.queries_per_month * args.months
    choice, eligible = recommend(options, queries, args.tolerance)
    tuned = next(o for o in options if o.one_time_flops)
    usd = lambda flops, mfu: _dollars(flops, args.gpu, args.gpu_price, mfu)  # noqa: E731
    rows = {o.name: {
        "quality": q(o.quality, "token F1", "measured"),
        "per_query_flops": q(o.per_query_flops, "FLOP", "formula"),
        "per_query_usd": q(usd(o.per_query_flops, args.serving_mfu), "USD", "estimate"),
        "one_time_flops": q(o.one_time_flops, "FLOP", "formula"),
        "one_time_usd": q(usd(o.one_time_flops, args.training_mfu), "USD", "estimate"),
        "horizon_usd": q(usd(o.one_time_flops, args.training_mfu) + queries * usd(o.per_query_flops, args.serving_mfu),
                         "USD", "estimate"),
        "seconds_per_query_here": q(o.seconds_per_query, "s", "measured"),
    } for o in options}
    return {"queries": q(queries, "query", "given"), "recommendation": choice.name,
            "within_tolerance": [o.name for o in eligible],
            "break_even_queries": {o.name: q(break_even(tuned, o), "query", "formula")
                                   for o in options if o is not tuned},
            "options": rows}


def summarise(args, measured: dict, ledger: dict, folder: Path) -> dict:
    options = [m["option"] for m in measured.values()]
    result = decision(args, options)
    for name, m in measured.items():
        low, high = m["interval"]
        result["options"][name]["quality_interval_95"] = q([low, high], "token F1", "measured (bootstrap over queries)")
        result["options"][name]["sample_reply"] = m["sample"]
    result.update({"model": args.model, "task": args.task, "fine_tune_run": str(folder),
                   "assumptions": {"gpu": args.gpu, "gpu_price_per_hour_usd": args.gpu_price,
                                   "serving_mfu": args.serving_mfu, "training_mfu": args.training_mfu,
                                   "tolerance": args.tolerance, "k": args.k}})
    return result


def format_decision(results: dict) -> str:
    lines = [f"{'option':24} {'quality (token F1)':>24} {'per query':>22} {'one-time':>22} {'over horizon':>14}"]
    for name, row in results["options"].items():
        low, high = row["quality_interval_95"]["value"] if "quality_interval_95" in row else (None, None)
        quality = f"{row['quality']['value']:.3f}" + (f" [{low:.3f}, {high:.3f}]" if low is not None else "")
        lines.append(f"{name:24} {quality:>24} {format_flops(row['per_query_flops']['value']):>10} "
                     f"${row['per_query_usd']['value']:<10.2g} {format_flops(row['one_time_flops']['value']):>10} "
                     f"${row['one_time_usd']['value']:<10.3g} ${row['horizon_usd']['value']:<12,.2f}")
    queries = results["queries"]["value"]
    lines.append(f"recommended for {queries:,.0f} queries: {results['recommendation']} (the cheapest within "
                 f"tolerance of the best quality: {', '.join(results['within_tolerance'])})")
    for name, be in results["break_even_queries"].items():
        lines.append(f"  the fine-tune costs less than {name} after "
                     + (f"{be['value']:,.0f} queries (formula)" if be["value"] else "no number of queries (formula)"))
    return "\n".join(lines)


def write_section(out: Path, results: dict) -> None:
    """decide.png (quality against the horizon's dollars; FLOPs against queries) and section.json."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["options"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for name, row in rows.items():
        left.scatter(row["horizon_usd"]["value"], row["quality"]["value"], s=60)
        left.annotate(name, (row["horizon_usd"]["value"], row["quality"]["value"]), textcoords="offset points",
                      xytext=(5, 5))
    left.set_xlabel(f"dollars over {results['queries']['value']:,.0f} queries (estimate)")
    left.set_ylabel("token F1 on held-out queries (measured)")
    horizon = max(results["queries"]["value"], max((b["value"] or 0) for b in results["break_even_queries"].values()))
    xs = [max(horizon, 10) ** (i / 60) for i in range(61)]  # log-spaced: break-evens sit far below the horizon
    for name, row in rows.items():
        right.plot(xs, [row["one_time_flops"]["value"] + x * row["per_query_flops"]["value"] for x in xs], label=name)
    right.set_xscale("log")
    right.set_yscale("log")
    right.set_xlabel("queries")
    right.set_ylabel("FLOPs, one-time + per query (formula)")
    right.legend()
    fig.tight_layout()
    fig.savefig(out / "decide.png", dpi=110)
    plt.close(fig)
    verdict = Verdict(claim="which is cheaper for this task: prompting, retrieval or fine-tuning",
                      measured=format_decision(results).splitlines()[-len(results["break_even_queries"]) - 1],
                      supported=None, note="quality measured here on the default model; dollars are estimates")
    Section(title="Prompt, retrieve or fine-tune?", verdicts=[verdict],
            body_markdown="```\n" + format_decision(results) + "\n```", images=[out / "decide.png"],
            order=97).save(out)


def cmd_decide(args) -> int:
    if args.quick:
        args.model, args.epochs, args.eval_examples, args.max_new_tokens, args.k = QUICK_MODEL, 1.0, 4, 8, 2
        args.train_examples, args.seq_len = args.train_examples or 16, 512
    args.out = args.out or str(Path(args.runs_dir) / f"decide-{Path(args.task).stem}")
    results = run_decide(args)
    print(format_decision(results))
    if "scaled" in results:
        print(f"\nthe same arithmetic for {results['scaled']['model']} (quality not measured there; the ranking "
              "measured here is assumed to carry):")
        print(format_decision(results["scaled"]))
    print(f"results: {Path(args.out) / 'results.json'}; chart: {Path(args.out) / 'decide.png'}")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("decide", help="prompt, retrieve or fine-tune: each measured on your task, priced, "
                                             "one recommended", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--task", default="support", help="SFT JSONL of solved examples, or 'support' (the shipped task)")
    p.add_argument("--eval", default="", help="held-out SFT JSONL (default: --eval-fraction of --task)")
    p.add_argument("--eval-fraction", type=float, default=0.2)
    p.add_argument("--eval-examples", type=int, default=32, help="held-out queries measured")
    p.add_argument("--train-examples", type=int, default=0, help="first N training examples (0 = all; support: 200)")
    p.add_argument("--queries-per-month", type=float, default=10_000)
    p.add_argument("--months", type=float, default=12)
    p.add_argument("--gpu", default="A100-80GB", help="GPU the dollars assume (catalogue name)")
    p.add_argument("--gpu-price", type=float, default=2.0, help="$/hour of that GPU")
    p.add_argument("--serving-mfu", type=float, default=SERVING_MFU, help="assumed utilisation while serving")
    p.add_argument("--training-mfu", type=float, default=TRAINING_MFU, help="assumed utilisation while training")
    p.add_argument("--tolerance", type=float, default=0.02, help="token F1 within which options count as equal")
    p.add_argument("--k", type=int, default=4, help="examples in the prompt (prompt and retrieve)")
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--run", default="", help="a finished LoRA run to use instead of training one")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--epochs", type=float, default=2.0)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--scale-to", default="", help="also price the options for this model (e.g. llama-3.1-8b)")
    p.add_argument("--runs-dir", default="runs")
    p.add_argument("--out", default="", help="results folder (default: <runs-dir>/decide-<task>)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a tiny random model: exercises the code in seconds")
    p.set_defaults(func=cmd_decide)
