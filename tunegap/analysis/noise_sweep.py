"""`tunegap sweep noise`: what noisy training data costs, in the currency of compute.

The essay's caveat: fine-tuning is cheap to run, not cheap to do well, and most of the work is the data. Here a
share of the TRAINING replies (0, 10, 25, 50% by default) is replaced by the reply of another training example,
drawn at random (`corrupt_replies`): the prompt stays, the reply answers some other request. That is the label
noise of a mis-joined export or a shuffled annotation file, realistic because every corrupted reply is still a
well-formed reply of the task. Which records are corrupted and which reply each gets follow the seed; the
validation and test splits are never touched (the test split is written as its own file and scored as it is).

Every noisy arm trains the same steps on the same pool of examples (one epoch at 1x). Beside them, the clean pool
trains 2x and 4x the steps (the same examples seen two and four times: compute, not more data). Test quality
(the task's metric on generated replies) and test loss are means with 95% intervals over seeds. The verdict
prices the noise in compute: "25% noise costs more than doubling the compute" holds when, seed by seed, the
quality the noise removed (clean 1x - noisy 1x) exceeds what doubling the steps added (clean 2x - clean 1x).

Defaults (LoRA r16, 12 steps of batch 8, 3 seeds, both tasks: 36 runs, 720 steps) on the default model: about
50 min on a free 2-core CPU (support alone about 22 min; estimate from the 2.3 s LoRA step of
benchmarks/RESULTS.md plus start-up and evaluation per run); `Trainer.predict` prints this machine's prediction
before the first run.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import replace
from pathlib import Path

from ..config import TrainConfig
from ..data.tasks import TASKS
from ..io import atomic_write_text
from ..literature import anchor
from ..report import Section, Verdict
from ..stats import Interval, judge, mean_interval, paired_differences
from ..trainer import Trainer
from .common import (ORDER, QUICK_MODEL, AnalysisError, check_seeds, disagreements, figure, fmt, interval_cell,
                     md_table, q, quick_aware, run_seeds, save_figure, seed_interval, write_outputs)

DEFAULT_NOISE = (0, 10, 25, 50)  # percent of the training replies replaced
COMPUTE = (2, 4)  # clean arms at these multiples of the noisy arms' steps
KEY_NOISE = 25  # the verdict's noise level (the nearest one swept when 25 is not)
TASK_NAMES = ("support", "docstrings")
SEQ_LEN = {"support": 128, "docstrings": 256}
# A mismatched support reply still follows the house style, so style adherence cannot see this noise; whether
# the reply names the customer's product can (reported beside it, not judged).
CONTENT_METRIC = {"support": ("product_accuracy", "product accuracy")}


def _reply_index(record: dict) -> int:
    """Index of the last assistant message: the reply the loss is on."""
    roles = [m["role"] for m in record["messages"]]
    if "assistant" not in roles:
        raise AnalysisError("a training record without an assistant reply cannot be corrupted")
    return len(roles) - 1 - roles[::-1].index("assistant")


def reply_of(record: dict) -> str:
    return record["messages"][_reply_index(record)]["content"]


def corrupt_replies(records: list[dict], share: float, seed: int) -> list[dict]:
    """A copy of `records` with exactly round(share * n) replies swapped for the reply of another training record
    whose reply text differs (so every chosen record really is wrong); chosen records and donors follow `seed`.
    Corrupted records say so in meta["noise"] (the donor's index), which training ignores."""
    if not 0 <= share <= 1:
        raise AnalysisError(f"--noise: a share must be between 0 and 100%, got {100 * share:g}%")
    n = len(records)
    k = round(share * n)
    if k and len({reply_of(r) for r in records}) < 2:
        raise AnalysisError("corruption needs at least two different replies in the training set")
    rng = random.Random(f"noise-{seed}")  # a string seed: the same on every platform and Python version
    out = [{**r, "messages": [dict(m) for m in r["messages"]], "meta": dict(r.get("meta") or {})} for r in records]
    for i in sorted(rng.sample(range(n), k)):
        own = reply_of(records[i])
        donor = rng.randrange(n)
        while reply_of(records[donor]) == own:
            donor = rng.randrange(n)
        out[i]["messages"][_reply_index(out[i])]["content"] = reply_of(records[donor])
        out[i]["meta"]["noise"] = {"reply_from": donor}
    return out


def corrupted_share(clean: list[dict], noisy: list[dict]) -> float:
    """Share of records whose reply differs from the clean one (measured, not the requested share)."""
    return sum(reply_of(a) != reply_of(b) for a, b in zip(clean, noisy)) / max(len(clean), 1)


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))
    return path.resolve()


def task_config(task: str, *, model: str, steps: int, lr: float, rank: int, runs_dir: str, quick: bool,
                progress: bool, train_path: Path, test_path: Path, generate_examples: int):
    """One arm's settings: LoRA on a written training file, scored on the shipped task's test split (written to a
    file: TaskMetrics finds the task's scorer from the records' meta)."""
    if quick:
        return TrainConfig(model=model, data=str(train_path), eval_data=str(test_path), method="lora", rank=4,
                           alpha=8.0, lr=1e-3, seq_len=256, batch_size=4, max_steps=steps, eval_examples=4,
                           generate_examples=1, task_metrics="on", forgetting="off", precision="fp32",
                           progress=False, keep_checkpoints=1, threads=1, runs_dir=runs_dir)
    return TrainConfig(model=model, data=str(train_path), eval_data=str(test_path), method="lora", rank=rank,
                       alpha=2.0 * rank, lr=lr, seq_len=SEQ_LEN[task], batch_size=8, max_steps=steps,
                       eval_examples=32, generate_examples=generate_examples, task_metrics="on", forgetting="off",
                       keep_checkpoints=1, progress=progress, runs_dir=runs_dir)


def _predict_seconds(configs: list, seeds: int) -> float:
    """Predicted seconds of every run (estimate): one `Trainer.predict` per task at 1x, training scaled by steps."""
    total, by_task = 0.0, {}
    for cfg in configs:
        key = (cfg.seq_len, cfg.eval_data)
        if key not in by_task:
            parts = Trainer(replace(cfg, progress=False)).predict()
            by_task[key] = (parts.pop("training"), cfg.max_steps, sum(parts.values()))
        train_s, steps, rest = by_task[key]
        total += train_s * cfg.max_steps / steps + rest
    return total * seeds


@quick_aware
def sweep_noise(*, out: str | Path, task: str = "both", noise=DEFAULT_NOISE, seeds: int = 3,
                model: str = "smollm2-135m", steps: int = 12, lr: float = 1e-3, rank: int = 16,
                generate_examples: int = 16, runs_dir: str = "runs", quick: bool = False,
                progress: bool = True) -> dict:
    started = time.perf_counter()
    out = Path(out)
    seeds = check_seeds(seeds)
    tasks = TASK_NAMES if task == "both" else (task,)
    if any(t not in TASKS for t in tasks):
        raise AnalysisError(f"--task: expected support, docstrings or both, got {task!r}")
    noise = tuple(sorted({int(n) for n in noise} | {0}))
    if quick:
        model, steps = QUICK_MODEL, min(steps, 2)
    batch = 4 if quick else 8
    plan, configs = {}, []
    for name in tasks:
        splits = TASKS[name].splits()
        pool = splits["train"][:steps * batch]  # one epoch at 1x: every noisy arm sees each example once
        test_path = _write_jsonl(out / "data" / f"{name}-test.jsonl", splits["test"])
        clean_path = _write_jsonl(out / "data" / f"{name}-train-clean.jsonl", pool)
        common = dict(model=model, lr=lr, rank=rank, runs_dir=runs_dir, quick=quick, progress=progress,
                      test_path=test_path, generate_examples=generate_examples)
        arms = {}
        for share in noise:
            arms[f"noise-{share}"] = {"noise": share, "compute": 1, "steps": steps, "paths": []}
            for s in range(seeds):
                noisy = corrupt_replies(pool, share / 100, s)
                path = clean_path if share == 0 else _write_jsonl(
                    out / "data" / f"{name}-train-noise{share}-seed{s}.jsonl", noisy)
                arms[f"noise-{share}"]["paths"].append(path)
                arms[f"noise-{share}"].setdefault("measured_share", []).append(corrupted_share(pool, noisy))
        for m in COMPUTE:
            arms[f"clean-{m}x"] = {"noise": 0, "compute": m, "steps": steps * m, "paths": [clean_path] * seeds,
                                   "measured_share": [0.0] * seeds}
        for arm in arms.values():
            arm["config"] = task_config(name, steps=arm["steps"], train_path=arm["paths"][0], **common)
            configs.append(arm["config"])
        plan[name] = (arms, len(pool))
    predicted = _predict_seconds(configs, seeds) if not quick else None
    runs_total = len(configs) * seeds
    if predicted is not None:
        print(f"sweep noise: {runs_total} runs, predicted {predicted / 60:.0f} min (estimate: Trainer.predict per "
              f"task, training scaled by steps)")

    results_tasks, done = {}, 0
    for name, (arms, pool_size) in plan.items():
        rows = {}
        for label, arm in arms.items():
            ledgers, folders = [], []
            for s, path in enumerate(arm["paths"]):
                cfg = replace(arm["config"], data=str(path), seed=s)
                (folder, ledger), = run_seeds(cfg, f"noise-{name}-{label}", 1)
                ledgers.append(ledger)
                folders.append(str(folder))
                done += 1
                if progress and not quick:
                    print(f"  [{done}/{runs_total}] {name} {label} seed {s}: {TASKS[name].quality_name} "
                          f"{fmt(ledger.get('metrics', {}).get(TASKS[name].quality))}, test loss "
                          f"{fmt(ledger.get('metrics', {}).get('eval_loss'))} nats/token (measured)")
            rows[label] = {
                "noise_percent": arm["noise"], "compute_multiple": arm["compute"], "steps": arm["steps"],
                "runs": folders,
                "corrupted_share": mean_interval(arm["measured_share"]).as_dict("fraction"),
                "quality": seed_interval(ledgers, TASKS[name].quality).as_dict("fraction"),
                "eval_loss": seed_interval(ledgers, "eval_loss").as_dict("nats/token"),
                **({"content": seed_interval(ledgers, CONTENT_METRIC[name][0]).as_dict("fraction")}
                   if name in CONTENT_METRIC else {}),
                "flops_total": q(sum(lg["costs"]["flops_total"]["value"] for lg in ledgers) / len(ledgers),
                                 "FLOP", "formula"),
                "train_time_s": q(sum(lg["costs"]["train_time_s"]["value"] for lg in ledgers) / len(ledgers),
                                  "s", "measured"),
            }
        results_tasks[name] = {"quality_metric": TASKS[name].quality, "quality_name": TASKS[name].quality_name,
                               "pool_examples": pool_size, "arms": rows, **noise_cost(rows)}
    results = {"analysis": "sweep-noise", "model": model, "quick": quick, "seeds": seeds, "steps": steps,
               "noise_percent": list(noise), "compute_multiples": [1, *COMPUTE], "tasks": results_tasks,
               "corruption": CORRUPTION,
               "settings": {"method": "lora", "rank": 4 if quick else rank, "lr": 1e-3 if quick else lr,
                            "batch_size": batch, "generate_examples": 1 if quick else generate_examples},
               "predicted_seconds": q(predicted, "s", "estimate"),
               "wall_seconds": q(time.perf_counter() - started, "s", "measured")}
    images = [_plot(results, out / "noise_quality.png")]
    section = noise_section(results, images)
    write_outputs(out, results, section)
    return results


CORRUPTION = ("a corrupted record keeps its prompt and gets the reply of another training record (drawn uniformly "
              "among those whose reply text differs), as a mis-joined export would; exactly round(share x pool) "
              "records, chosen and matched by the seed; validation and test splits untouched")


def _per_seed(row: dict, key: str) -> list:
    return row[key]["per_seed"]


def key_noise(rows: dict) -> int | None:
    """The swept noise level nearest 25% (the verdict's), None when only clean data was swept."""
    levels = [r["noise_percent"] for r in rows.values() if r["compute_multiple"] == 1 and r["noise_percent"] > 0]
    return min(levels, key=lambda n: (abs(n - KEY_NOISE), n)) if levels else None


def noise_cost(rows: dict) -> dict:
    """Seed by seed: what the key noise level took (clean 1x - noisy) and what 2x compute gave (clean 2x - clean
    1x); their difference decides the verdict. The ratio (noise loss / doubling gain, estimate) reads the noise
    in doublings of compute, only where doubling helped on average."""
    level = key_noise(rows)
    if level is None:
        return {"key_noise_percent": None}
    clean, noisy, double = (_per_seed(rows[k], "quality") for k in ("noise-0", f"noise-{level}", "clean-2x"))
    lost = [c - n for c, n in zip(clean, noisy)]
    gained = [d - c for d, c in zip(double, clean)]
    excess = paired_differences(lost, gained)
    loss_rise = paired_differences(_per_seed(rows[f"noise-{max(r['noise_percent'] for r in rows.values())}"],
                                             "eval_loss"), _per_seed(rows["noise-0"], "eval_loss"))
    mean_gain = mean_interval(gained).mean
    ratio = mean_interval(lost).mean / mean_gain if mean_gain and mean_gain > 0 else None
    return {"key_noise_percent": level,
            "quality_lost_to_noise": mean_interval(lost).as_dict("fraction"),
            "quality_gained_by_2x": mean_interval(gained).as_dict("fraction"),
            "noise_minus_doubling": excess.as_dict("fraction"),
            "noise_in_doublings": q(ratio, "doublings of compute", "estimate"),
            "max_noise_loss_rise": loss_rise.as_dict("nats/token")}


def noise_verdicts(name: str, result: dict, quality_name: str) -> list:
    """Per task: does the key noise level cost more than doubling the compute buys; does the largest raise test loss."""
    level = result.get("key_noise_percent")
    if level is None:
        return []
    excess = Interval.from_dict(result["noise_minus_doubling"])
    j = judge(excess, 0.0, claim_below=False)
    lost, gained = Interval.from_dict(result["quality_lost_to_noise"]), Interval.from_dict(result["quality_gained_by_2x"])
    top = max(r["noise_percent"] for r in result["arms"].values())
    rise = Interval.from_dict(result["max_noise_loss_rise"])
    jl = judge(rise, 0.0, claim_below=False)
    return [
        Verdict(f"{name}: {level}% noisy replies cost more than 2x compute (the {quality_name} they remove "
                "exceeds what doubling the steps adds on clean data).",
                f"lost to noise {lost.text(unit='fraction')}; gained by 2x {gained.text(unit='fraction')}; "
                f"paired difference {excess.text()} (measured)", j.supported,
                j.note or "paired per seed: (clean 1x - noisy 1x) - (clean 2x - clean 1x) > 0",
                anchor("noise_costs_compute", j.supported), unresolved=j.supported is None),
        Verdict(f"{name}: {top}% noisy replies raise the test loss at the same compute.",
                f"test loss, {top}% noise minus clean: {rise.text(unit='nats/token')} (measured)", jl.supported,
                jl.note or "paired per seed, same steps", anchor("noise_hurts", jl.supported),
                unresolved=jl.supported is None),
    ]


def _plot(results: dict, path: Path) -> Path:
    tasks = results["tasks"]
    fig = figure(10, 3.8 * len(tasks))
    colours = {1: "#8c8c8c", 2: "#4c72b0", 4: "#55a868"}
    for row, (name, t) in enumerate(tasks.items()):
        noisy = sorted((r for r in t["arms"].values() if r["compute_multiple"] == 1), key=lambda r: r["noise_percent"])
        clean = {r["compute_multiple"]: r for r in t["arms"].values() if r["noise_percent"] == 0}
        for col, (key, label) in enumerate((("quality", f"test {t['quality_name']} (measured)"),
                                            ("eval_loss", "test loss, nats/token (measured)"))):
            ax = fig.add_subplot(len(tasks), 2, 2 * row + col + 1)
            xs = [r["noise_percent"] for r in noisy]
            ys = [r[key]["value"] for r in noisy]
            err = [[y - (r[key]["low"] if r[key]["low"] is not None else y) for y, r in zip(ys, noisy)],
                   [(r[key]["high"] if r[key]["high"] is not None else y) - y for y, r in zip(ys, noisy)]]
            ax.errorbar(xs, ys, yerr=err, marker="o", color="#dd8452", capsize=3, label="noisy, 1x compute")
            for m, r in sorted(clean.items()):
                v = r[key]
                ax.axhline(v["value"], color=colours.get(m, "black"), linewidth=1, label=f"clean, {m}x compute")
                if v["low"] is not None:
                    ax.axhspan(v["low"], v["high"], color=colours.get(m, "black"), alpha=0.12)
            if key == "quality":
                ax.set_ylim(-0.05, 1.05)
            ax.set_xlabel("share of training replies mismatched, %")
            ax.set_ylabel(label, fontsize=8)
            ax.set_title(f"{name}: mean and 95% interval over {results['seeds']} seeds", fontsize=9)
            ax.legend(fontsize=7)
    return save_figure(fig, path)


def noise_section(results: dict, images: list[Path]):
    by_task, parts = {}, []
    for name, t in results["tasks"].items():
        by_task[name] = noise_verdicts(name, t, t["quality_name"])
        content = CONTENT_METRIC.get(name)
        rows = [[label, r["noise_percent"], f"{r['compute_multiple']}x ({r['steps']} steps)",
                 fmt(r["corrupted_share"]["value"]), interval_cell(r["quality"]), interval_cell(r["eval_loss"]),
                 *([interval_cell(r["content"])] if content else []), f"{r['flops_total']['value']:.3g}"]
                for label, r in t["arms"].items()]
        doublings = t.get("noise_in_doublings", {}).get("value")
        parts += [f"**{name}** ({t['pool_examples']} training examples in the pool; quality = {t['quality_name']})",
                  "", md_table(["arm", "noise %", "compute", "corrupted share (measured)",
                                f"test {t['quality_name']} (95% CI)", "test loss nats/token (95% CI)",
                                *([f"test {content[1]} (95% CI)"] if content else []), "FLOPs (formula)"], rows),
                  "", *([f"A mismatched {name} reply still has the task's form, so {t['quality_name']} can miss "
                         f"this noise; {content[1]} and the test loss (of the right reply) cannot."]
                        if content else []), "",
                  (f"{t['key_noise_percent']}% noise is worth about {doublings:.2g} doublings of compute (estimate: "
                   "quality lost / quality one doubling adds)." if doublings is not None else
                   "Doubling the compute did not add quality on average, so the noise cannot be priced in "
                   "doublings here."), ""]
    parts += [disagreements(by_task, ["the key noise level costs more than 2x compute",
                                      "the largest noise level raises the test loss"]), ""]
    quick = " (quick: random tiny model; the numbers only exercise the code)" if results["quick"] else ""
    body = "\n".join([
        f"Model `{results['model']}`{quick}; LoRA r{results['settings']['rank']}, lr {results['settings']['lr']}, "
        f"batch {results['settings']['batch_size']}, {results['steps']} steps at 1x; {results['seeds']} seeds. "
        f"Corruption: {results['corruption']}. Quality is scored on "
        f"{results['settings']['generate_examples']} generated test replies, loss on the test split. The learning "
        "rate is not tuned per arm: the question is what the same recipe loses to noise.", "", *parts])
    return Section(title="Noisy data vs more compute", verdicts=[v for vs in by_task.values() for v in vs],
                   body_markdown=body, images=images, order=ORDER["noise"])


__all__ = ["sweep_noise", "corrupt_replies", "corrupted_share", "noise_cost", "noise_verdicts", "DEFAULT_NOISE"]
