"""`tunegap sweep freeze`: freeze the bottom k transformer blocks, train the rest fully; quality, forgetting
and cost against k.

Yosinski et al. (2014, Fig. 2) froze the first n layers of a network transferred to a new task and trained the
rest: lower layers transferred well, upper layers were more task-specific, so accuracy fell as n grew. This is
that curve on an LLM fine-tune. k = 0 is full fine-tuning (every weight, embeddings included); k >= 1 is
`--method freeze --freeze-layers L-k`: the top L-k blocks and the final norm train (and an untied head; a tied
one is the embedding matrix and stays frozen with the bottom). LoRA (rank 16, alpha 2r) is the reference line.
Every arm trains the same steps on the same batches (same seeds), at one learning rate for every k. The settings
are `sweep lora-rank`'s (`lr_sweep.task_config` without validation), so at the default rates (full 5e-5, LoRA
2e-4, that sweep's) its full and rank-16 runs are this sweep's k = 0 and reference line, trained once for both;
`sweep lr` finds each method's best rate on validation, to pass here as --lr and --lora-lr.

Per k, on the test split: held-out loss and the task's quality; forgetting (KL from the base model on general
prompts and general-question accuracy, `--forgetting on`; a random tiny model under --quick measures none);
and cost from the ledger: trainable parameters and optimizer state (measured), training FLOPs (formula),
wall time (measured). Verdict per task: "freezing most of the network costs little quality" is supported when
the paired per-seed relative test-loss increase at k = 3L/4 (the nearest k swept) over k = 0 has its 95%
interval below 5%, not supported when above, not resolved when it straddles 5%.

Defaults (default model of 30 blocks: k = 0, 7, 15, 22, 29, plus LoRA; 16 steps; --seeds 3; both tasks) are 36
runs with the forgetting evaluation, about 1.5 hours on a free 2-core CPU (an estimate: about 2 min a support
run, 3 min a docstrings run, from the measured step times in benchmarks/RESULTS.md, a frozen bottom's shorter
backward, and about a minute of forgetting evaluation a run); 12 of the 36 are `sweep lora-rank --task both
--seeds 3`'s full and rank-16 runs, reused when that sweep ran first (then about 1 hour). The command prints its own prediction (`Trainer.predict()` probes, finished
runs counted as free) before training.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

from ..config import TrainConfig
from ..costs.flops import train_step_flops
from ..costs.shape import ModelShape
from ..data.tasks import TASKS
from ..literature import anchor
from ..methods import make_method
from ..models import load_model
from ..predict import minutes
from ..report import Section, Verdict
from ..stats import judge, mean_interval, paired_differences
from .common import (ORDER, QUICK_MODEL, AnalysisError, check_seeds, disagreements, figure, fmt, interval_cell, md_table,
                     q, quick_aware, run_seeds, save_figure, seed_interval, task_names, write_outputs)
from .lr_sweep import (DEFAULT_RANK, full_arm, lora_arm, measured, pending_runs,
                       predicted_arm, relative_gaps, task_config)

DEFAULT_LR = 5e-5  # `sweep lora-rank`'s full fine-tuning rate: its full runs are this sweep's k = 0
DEFAULT_LORA_LR = 2e-4  # and its LoRA rate: its rank-16 runs are this sweep's reference line
LOSS_THRESHOLD = 0.05  # "costs little": at most 5% more test loss than full fine-tuning (paired per seed)
FORGETTING = ("forgetting_kl", "general_accuracy")


def default_ks(num_layers: int) -> list[int]:
    """0, L/4, L/2, 3L/4 and L-1 frozen bottom blocks (fewer on a model too shallow to tell them apart)."""
    L = num_layers
    return sorted({0, L // 4, L // 2, 3 * L // 4, L - 1})


def verdict_k(ks: list[int], num_layers: int) -> int | None:
    """The swept k nearest to 3L/4 (ties: the larger), the point "most of the network frozen" is judged at."""
    target = 3 * num_layers / 4
    frozen = [k for k in ks if k > 0]
    return min(frozen, key=lambda k: (abs(k - target), -k)) if frozen else None


def check_ks(ks, num_layers: int) -> list[int]:
    ks = sorted(set(ks))
    bad = [k for k in ks if not 0 <= k < num_layers]
    if bad or not ks:
        raise AnalysisError(f"--ks: each k must be in 0..{num_layers - 1} (the model has {num_layers} blocks; "
                            f"at least one must train), got {bad or 'none'}")
    return ks


def freeze_arm(base: TrainConfig, k: int, num_layers: int, lr: float) -> tuple[TrainConfig, str]:
    """Bottom k blocks frozen, the rest trained: k = 0 is full fine-tuning (the `sweep lr` run of that rate
    when the settings match), k >= 1 is method freeze with its top L-k blocks training."""
    if k == 0:
        return full_arm(base, lr)
    return replace(base, method="freeze", freeze_layers=num_layers - k, lr=lr), f"{base.data}-freeze"


def num_layers_of(model: str) -> int:
    loaded, _ = load_model(model)
    return ModelShape.from_hf_config(loaded.config).num_layers


def loss_verdict(increases: list[float]):
    """'Freezing most of the network costs little quality': the paired per-seed relative test-loss increase at
    k = 3L/4 over k = 0, its interval judged against 5% (below supports)."""
    interval = mean_interval(increases)
    judgement = judge(interval, LOSS_THRESHOLD, claim_below=True)
    return interval, judgement.supported, judgement.note


@quick_aware
def sweep_freeze(*, out: str | Path, task: str = "both", seeds: int | None = None, ks=None, lr: float = DEFAULT_LR,
                 lora_lr: float = DEFAULT_LORA_LR, rank: int = DEFAULT_RANK, model: str = "smollm2-135m",
                 steps: int = 16, runs_dir: str = "runs", quick: bool = False, generate_examples: int = 16,
                 progress: bool = True) -> dict:
    """Train (or reuse) every task x k x seed and the LoRA reference; quality, forgetting and cost vs k."""
    started = time.perf_counter()
    out = Path(out)
    seeds = check_seeds(seeds if seeds is not None else (2 if quick else 3))
    if quick:
        model, steps, lr, lora_lr = QUICK_MODEL, min(steps, 3), 1e-3, 1e-3  # `sweep lora-rank --quick`'s
    layers = num_layers_of(model)
    ks = check_ks(ks if ks is not None else default_ks(layers), layers)
    judged_k = verdict_k(ks, layers)
    tasks = list(task_names(task))
    plan = {}
    for t in tasks:
        base = task_config(t, model=model, steps=steps, runs_dir=runs_dir, quick=quick, validation=False,
                           generate_examples=generate_examples, progress=progress)
        plan[t] = {"base": base, "ks": {k: freeze_arm(base, k, layers, lr) for k in ks},
                   "lora": lora_arm(base, rank, lora_lr)}
    predicted = _predict(plan, seeds, layers)

    per_task, done, total = {}, 0, len(tasks) * (len(ks) + 1)
    for t, arms in plan.items():
        quality = TASKS[t].quality
        rows = []
        for k, (config, prefix) in arms["ks"].items():
            done += 1
            print(f"tunegap: sweep freeze: arm {done}/{total}: {t}, bottom {k} of {layers} blocks frozen "
                  f"({seeds} seeds)", flush=True)
            rows.append({"k": k, "method": config.method, "trained_blocks": layers - k,
                         **_arm_row(run_seeds(config, prefix, seeds), quality)})
        done += 1
        print(f"tunegap: sweep freeze: arm {done}/{total}: {t}, LoRA reference r={rank} ({seeds} seeds)", flush=True)
        lora = {"method": "lora", "rank": rank, **_arm_row(run_seeds(*arms["lora"], seeds), quality)}
        verdict = _judge(rows, judged_k, quality)
        for row in (*rows, lora):
            del row["per_seed"]  # raw, aligned by seed for the paired verdict; results.json has the intervals
        per_task[t] = {"quality_key": quality, "arms": rows, "lora": lora, "verdict": verdict}

    wall = time.perf_counter() - started
    print(f"tunegap: sweep freeze: {minutes(wall)} (measured) against a predicted {minutes(predicted['seconds'])} "
          "(estimate)", flush=True)
    results = {"analysis": "sweep-freeze", "model": model, "quick": quick, "steps": steps, "seeds": seeds,
               "tasks": tasks, "num_layers": layers, "ks": ks, "verdict_k": judged_k,
               "settings": {"lr": lr, "lora_lr": lora_lr, "rank": rank, "alpha": 2 * rank,
                            "loss_threshold": LOSS_THRESHOLD, "k0": "full fine-tuning (embeddings train too)"},
               "per_task": per_task,
               "predicted_seconds": q(predicted["seconds"], "s", "estimate"), "prediction": predicted["how"],
               "wall_seconds": q(wall, "s", "measured")}
    out.mkdir(parents=True, exist_ok=True)
    images = [_plot_quality(results, out / "freeze_quality_forgetting.png"),
              _plot_cost(results, out / "freeze_cost.png")]
    section = freeze_section(results, images)
    write_outputs(out, results, section)
    return results


def _predict(plan: dict, seeds: int, layers: int) -> dict:
    """Predicted seconds of the runs still to train. Per task, `Trainer.predict()` of the k = 0 (full) run and
    of the LoRA run; a k >= 1 run is the full run's prediction with its training part scaled by the ratio of
    formula step FLOPs (a frozen bottom skips its backward), its evaluations unchanged."""
    total, parts = 0.0, {}
    for t, arms in plan.items():
        todo = {k: pending_runs(config, prefix, seeds) for k, (config, prefix) in arms["ks"].items()}
        if any(todo.values()):
            lr = next(iter(arms["ks"].values()))[0].lr  # every k trains at the one rate
            c, _ = full_arm(arms["base"], lr)  # the k = 0 run, swept or not: the one the others scale from
            full_parts, trainer = predicted_arm(c)

            def step_flops(trainable):
                return train_step_flops(trainer.shape, trainable, sequences=c.batch_size * c.grad_accum,
                                        seq_len=max(1, round(trainer.mean_tokens))).total

            full_step = step_flops(trainer.trainable)
            for k, n in todo.items():
                if not n:
                    continue
                frozen = make_method("freeze", layers=layers - k).trainable(trainer.shape) if k else None
                ratio = step_flops(frozen) / full_step if k else 1.0
                each = sum(full_parts.values()) + full_parts["training"] * (ratio - 1)
                parts[f"{t} k={k}"] = {"runs": n, "seconds_each": each}
                total += n * each
            del trainer
        n = pending_runs(*arms["lora"], seeds)
        if n:
            lora_parts, _ = predicted_arm(arms["lora"][0])
            parts[f"{t} lora"] = {"runs": n, "seconds_each": sum(lora_parts.values())}
            total += n * sum(lora_parts.values())
    how = ("estimate: Trainer.predict() of the full (k = 0) and LoRA runs per task (probes of this model on this "
           "machine); a frozen-k run is the full run's prediction with training scaled by formula step FLOPs; "
           "finished runs are reused and count zero")
    runs = sum(p["runs"] for p in parts.values())
    print(f"tunegap: sweep freeze: {runs} runs to train, predicted {minutes(total)} ({how}): "
          + ", ".join(f"{k} {p['runs']} x {p['seconds_each']:.0f} s" for k, p in parts.items()), flush=True)
    return {"seconds": total, "parts": parts, "how": how}


def _cost_interval(ledgers: list[dict], key: str):
    return mean_interval([ledger["costs"].get(key, {}).get("value") for ledger in ledgers])


def _arm_row(runs: list, quality: str) -> dict:
    """One arm's test metrics and forgetting over seeds (means, 95% intervals) and its costs from the ledgers."""
    ledgers = [ledger for _, ledger in runs]
    costs = ledgers[0]["costs"]  # parameters, optimizer state and formula FLOPs do not depend on the seed
    per_seed = {key: [ledger.get("metrics", {}).get(key) for ledger in ledgers]
                for key in ("eval_loss", quality, *FORGETTING)}
    forgetting = {key: seed_interval(ledgers, key) for key in FORGETTING}
    return {"runs": [str(folder) for folder, _ in runs], "per_seed": per_seed,
            "eval_loss": measured(seed_interval(ledgers, "eval_loss"), "nats/token"),
            "quality": measured(seed_interval(ledgers, quality), "fraction"),
            "forgetting_kl": measured(forgetting["forgetting_kl"], "nats/token"),
            "general_accuracy": measured(forgetting["general_accuracy"], "fraction"),
            **{key: costs[key] for key in ("params_trainable", "optimizer_state_bytes", "flops_total")},
            "wall_time_s": measured(_cost_interval(ledgers, "wall_time_s"), "s"),
            "train_time_s": measured(_cost_interval(ledgers, "train_time_s"), "s")}


def _judge(rows: list[dict], k: int | None, quality: str) -> dict:
    """The verdict's numbers at k (nearest 3L/4) against k = 0, paired per seed."""
    by_k = {row["k"]: row for row in rows}
    if k is None or 0 not in by_k:
        return {"k": k, "supported": None, "note": "needs k = 0 and at least one k >= 1 among --ks",
                "loss_increase": None, "quality_drop": None, "forgetting_kl_change": None}
    zero, frozen = by_k[0]["per_seed"], by_k[k]["per_seed"]
    increases = relative_gaps(frozen["eval_loss"], zero["eval_loss"])
    interval, supported, note = loss_verdict(increases)
    quality_drop = paired_differences(zero[quality], frozen[quality])
    kl_change = paired_differences(frozen["forgetting_kl"], zero["forgetting_kl"])
    return {"k": k, "supported": supported, "note": note, "loss_increase": measured(interval, "fraction"),
            "quality_drop": measured(quality_drop, "fraction"),
            "forgetting_kl_change": measured(kl_change, "nats/token")}


# --------------------------------------------------------------------------- charts and report section

def _errorbar(ax, xs, values, **kw):
    """Means with their 95% intervals as error bars (a 1-seed point has none); skipped when nothing measured."""
    points = [(x, v) for x, v in zip(xs, values) if v and v["value"] is not None and v["seeds"]]
    if not points:
        return False
    means = [v["value"] for _, v in points]
    err = [[m - v["low"] if v["low"] is not None else 0 for m, (_, v) in zip(means, points)],
           [v["high"] - m if v["high"] is not None else 0 for m, (_, v) in zip(means, points)]]
    ax.errorbar([x for x, _ in points], means, yerr=err, marker="o", capsize=3, **kw)
    return True


def _reference(ax, value, label, colour="#4c72b0"):
    if not value or value["value"] is None or not value["seeds"]:
        return
    ax.axhline(value["value"], color=colour, linestyle="--", linewidth=1, label=label)
    if value["low"] is not None:
        ax.axhspan(value["low"], value["high"], color=colour, alpha=0.12)


def _plot_quality(results: dict, path: Path) -> Path:
    tasks, L = results["tasks"], results["num_layers"]
    panels = (("eval_loss", "test loss, nats/token (measured)"), ("quality", None),
              ("forgetting_kl", "KL(base ‖ tuned), nats/token (measured)"))
    fig = figure(13, 3.8 * len(tasks))
    for row, t in enumerate(tasks):
        res = results["per_task"][t]
        ks = [a["k"] for a in res["arms"]]
        for col, (key, label) in enumerate(panels, start=1):
            ax = fig.add_subplot(len(tasks), len(panels), row * len(panels) + col)
            shown = _errorbar(ax, ks, [a[key] for a in res["arms"]], color="#dd8452",
                              label="bottom k frozen (k = 0: full)")
            _reference(ax, res["lora"][key], f"LoRA r={res['lora']['rank']} (95% CI band)")
            full = next((a[key] for a in res["arms"] if a["k"] == 0), None)
            if shown and full:
                ax.axhline(full["value"], color="black", linestyle=":", linewidth=1, label="full fine-tuning (k = 0)")
            if not shown:
                why = "\n(a random --quick model measures no forgetting)" if results["quick"] else ""
                ax.text(0.5, 0.5, f"not measured{why}",
                        ha="center", va="center", transform=ax.transAxes, fontsize=8)
            if key == "eval_loss" and results["verdict_k"] is not None:
                ax.axvline(results["verdict_k"], color="grey", linestyle=":", linewidth=1, label="verdict k ≈ 3L/4")
            ax.set_xticks(ks)
            ax.set_xlabel(f"bottom blocks frozen, k (of {L})")
            ax.set_ylabel(label or f"{TASKS[t].quality_name} (measured)", fontsize=8)
            if key == "quality":
                ax.set_ylim(-0.05, 1.05)
            ax.set_title(t, fontsize=9)
            if shown:
                ax.legend(fontsize=7)
    fig.suptitle("Freezing the bottom k blocks: task quality and forgetting (Yosinski et al. 2014's transfer "
                 f"curve), {results['steps']} steps, {results['seeds']} seeds", fontsize=10)
    return save_figure(fig, path)


def _plot_cost(results: dict, path: Path) -> Path:
    tasks, L = results["tasks"], results["num_layers"]
    fig = figure(6.5 * len(tasks), 4.4)
    series = (("params_trainable", "trainable parameters (measured)", "#4c72b0"),
              ("optimizer_state_bytes", "optimizer state, bytes (measured)", "#dd8452"),
              ("flops_total", "training FLOPs (formula)", "#55a868"),
              ("wall_time_s", "wall time, s (measured, mean)", "#c44e52"))
    for i, t in enumerate(tasks, start=1):
        res = results["per_task"][t]
        ax = fig.add_subplot(1, len(tasks), i)
        ks = [a["k"] for a in res["arms"]]
        for key, label, colour in series:
            ax.plot(ks, [a[key]["value"] for a in res["arms"]], marker="o", color=colour, label=label)
            ax.axhline(res["lora"][key]["value"], color=colour, linestyle="--", linewidth=1, label=f"LoRA: {label}")
        ax.set_yscale("log")
        ax.set_xticks(ks)
        ax.set_xlabel(f"bottom blocks frozen, k (of {L}; k = 0 is full fine-tuning)")
        ax.set_title(f"{t}: cost vs k", fontsize=9)
        ax.legend(fontsize=6)
    return save_figure(fig, path)


def _pct(value: dict | None, unit: str = "%") -> str:
    """A fraction as a signed percentage (or percentage points, unit " points") with its interval."""
    if not value or value["value"] is None or not value["seeds"]:
        return "not measured"
    if value["low"] is None:
        return f"{100 * value['value']:+.2f}{unit} (1 seed, no interval)"
    return (f"{100 * value['value']:+.2f}{unit} [95% CI {100 * value['low']:+.2f}{unit}, "
            f"{100 * value['high']:+.2f}{unit}]")


def freeze_section(results: dict, images: list[Path]):
    by_task, blocks = {}, []
    L, k = results["num_layers"], results["verdict_k"]
    for t in results["tasks"]:
        res = results["per_task"][t]
        rows = []
        for arm in [*res["arms"], {**res["lora"], "k": f"LoRA r={res['lora']['rank']}"}]:
            rows.append(["0 (full)" if arm["k"] == 0 else arm["k"], fmt(arm["params_trainable"]["value"]),
                         f"{arm['optimizer_state_bytes']['value'] / 2**20:.3g} MiB",
                         f"{arm['flops_total']['value']:.3g}", interval_cell(arm["wall_time_s"]),
                         interval_cell(arm["eval_loss"]), interval_cell(arm["quality"]),
                         *(interval_cell(arm[key]) if arm[key] else "not measured" for key in FORGETTING)])
        blocks += [f"**{t}** (quality: {TASKS[t].quality_name})", "",
                   md_table(["k frozen", "trainable params", "optimizer state", "FLOPs (formula)", "wall time, s",
                             "test loss", TASKS[t].quality_name, "KL forgetting", "general accuracy"], rows), ""]
        v = res["verdict"]
        if v["loss_increase"] is None:  # --ks without 0 or without a frozen k: nothing to judge
            by_task[t] = []
            continue
        measured_text = (f"{t}: test loss at k = {v['k']} of {L} frozen vs k = 0 (full), paired per seed: "
                         f"{_pct(v['loss_increase'])}; {TASKS[t].quality_name} drop "
                         f"{_pct(v['quality_drop'], ' points')}; forgetting KL change "
                         + (f"{interval_cell(v['forgetting_kl_change'])} nats/token" if v["forgetting_kl_change"]
                            else "not measured"))
        by_task[t] = [Verdict(
            f"[{t}] Freezing most of the network (the bottom ~3/4 of the blocks) costs little quality: at most "
            f"{100 * LOSS_THRESHOLD:.0f}% more test loss than full fine-tuning.", measured_text, v["supported"],
            v["note"] or f"paired over {results['seeds']} seeds; threshold +{100 * LOSS_THRESHOLD:.0f}% relative "
                          "test loss",
            anchor("freeze_transfer", v["supported"]), unresolved=v["supported"] is None)]
    quick = " (quick: random tiny model; the numbers only exercise the code)" if results["quick"] else ""
    s = results["settings"]
    body = "\n".join([
        f"Model `{results['model']}` ({L} blocks){quick}. Each arm freezes the bottom k blocks and trains the rest "
        f"fully for {results['steps']} steps at lr {s['lr']:g} on the same batches per seed; k = 0 is full "
        "fine-tuning (embeddings train too; for k >= 1 a tied embedding/head stays frozen). LoRA (rank "
        f"{s['rank']}, alpha {s['alpha']}, lr {s['lora_lr']:g}) is the reference. Test split; means with 95% "
        f"Student-t intervals over {results['seeds']} seeds. The verdict reads k = {k}, the swept k nearest 3L/4. "
        f"Predicted {minutes(results['predicted_seconds']['value'])} ({results['prediction']}); took "
        f"{minutes(results['wall_seconds']['value'])} (measured).", "", *blocks, disagreements(by_task)])
    return Section(title="Freezing the bottom k blocks: the transfer curve on an LLM",
                   verdicts=[v for vs in by_task.values() for v in vs], body_markdown=body, images=images,
                   order=ORDER["sweep"] + 2)


__all__ = ["sweep_freeze", "default_ks", "verdict_k", "loss_verdict", "freeze_arm"]
