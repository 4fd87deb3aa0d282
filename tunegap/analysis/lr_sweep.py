"""`tunegap sweep lr`: LoRA and full fine-tuning over a log grid of learning rates, each at its own best rate.

A fixed learning-rate pair can decide a LoRA-vs-full comparison on its own: Schulman et al. (2025, LoRA Without
Regret) find LoRA's best rate about 10x full fine-tuning's. Here both methods train the same steps on the same
batches (same seeds, so the same data order) at every rate of a half-decade grid. Each method's rate is chosen
on the VALIDATION split (lowest seed-mean val_loss) and only the chosen arms' TEST metrics (eval_loss, the
task's quality) are reported, as means with 95% intervals over seeds. Two verdicts per task:

  * the best LoRA rate is about 10x full's: supported when best-LoRA / best-full lies in [3x, 30x] (one grid
    step either side of 10x on a half-decade grid), not resolved when either argmin is not (its val_loss
    interval overlaps a grid neighbour's, or it sits at the grid's edge so the ratio is only a bound that
    straddles the band);
  * at its best rate LoRA reaches full fine-tuning's test loss within 5%: the per-seed relative gap
    (paired: the same seed on both sides), judged against 0.05.

Defaults (default model, 16 steps, batch 8, 4 rates per method, rank 16, no forgetting evaluation): 8 runs per
seed and task; with --seeds 3 on both tasks 48 runs, about 85 min on a free 2-core CPU (an estimate from the
measured eager step times in benchmarks/RESULTS.md, 2.3 s LoRA and 3.1 s full per step of 8 x 128 tokens, 2.5x
that for docstrings' 320-token rows, plus the held-out losses and 16 generated replies: about 1-1.4 min a
support run, 2-2.6 min a docstrings run). The command prints its own prediction (`Trainer.predict()` probes,
finished runs counted as free) before training.

Runs are named `<task>-full-<identity>` and `<task>-lora-r<rank>-<identity>` from `task_config`'s settings
(`sweep lora-rank`'s, plus the validation split), so any analysis asking for the same run reuses it. Choosing a
rate needs the validation loss and not the forgetting evaluation (on the default model that takes about as long
as a 16-step run's training), so these runs are not `sweep lora-rank`'s or `sweep freeze`'s.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace
from pathlib import Path

from ..config import TrainConfig
from ..data.tasks import TASKS
from ..literature import anchor
from ..predict import minutes
from ..report import Section, Verdict
from ..stats import Interval, judge, mean_interval
from ..trainer import Trainer, finished_ledger
from .common import (ORDER, QUICK_MODEL, check_seeds, disagreements, figure, fmt, interval_cell, md_table, q,
                     quick_aware, run_seeds, save_figure, seed_interval, task_names, task_settings, write_outputs)
from .forgetting import base_train_config

DEFAULT_LORA_LRS = (1e-4, 3e-4, 1e-3, 3e-3)
DEFAULT_FULL_LRS = (1e-5, 3e-5, 1e-4, 3e-4)
QUICK_LORA_LRS = (1e-3, 1e-2)  # --quick: two rates per method, a random tiny model, a few steps
QUICK_FULL_LRS = (1e-4, 1e-3)
DEFAULT_RANK = 16  # alpha = 2r = 32: Schulman et al.'s alpha at this rank
RATIO_CLAIM, RATIO_BAND = 10.0, (3.0, 30.0)  # one half-decade grid step (about 3x) either side of 10x
GAP_THRESHOLD = 0.05  # LoRA's test loss at most 5% above full fine-tuning's
_TOLERANCE = 1e-9  # 3e-3 / 1e-4 is 29.999999999999996 in floating point


def task_config(task: str, *, model: str, steps: int, runs_dir: str, quick: bool, validation: bool = True,
                generate_examples: int = 16, progress: bool = True) -> TrainConfig:
    """One task's shared run settings: `sweep lora-rank`'s (`base_train_config` and `task_settings`), so a run
    of the same method, rate and seed is trained once and reused by every sweep. `validation`: choosing a rate
    reads the validation split's loss (logged as val_loss) and skips the forgetting evaluation it does not read;
    without it the settings are exactly `sweep lora-rank`'s (forgetting measured), as `sweep freeze` wants."""
    base = base_train_config(model=model, steps=steps, runs_dir=runs_dir, quick=quick, progress=progress)
    base = replace(base, generate_examples=base.generate_examples if quick else generate_examples,
                   **task_settings(task, quick))
    if validation:
        base = replace(base, val_examples=4 if quick else 32, forgetting="off")
    return base


def lora_arm(base: TrainConfig, rank: int, lr: float) -> tuple[TrainConfig, str]:
    """A LoRA run (alpha = 2r, as `sweep lora-rank`) and its run-name prefix, shared by every sweep."""
    return replace(base, method="lora", rank=rank, alpha=2.0 * rank, lr=lr), f"{base.data}-lora-r{rank}"


def full_arm(base: TrainConfig, lr: float) -> tuple[TrainConfig, str]:
    return replace(base, method="full", lr=lr), f"{base.data}-full"


def pending_runs(config: TrainConfig, prefix: str, seeds: int) -> int:
    """How many of the seeds' runs are not finished yet (a finished one is reused and costs nothing)."""
    return sum(finished_ledger(replace(config, seed=config.seed + i), prefix=prefix) is None for i in range(seeds))


def predicted_arm(config: TrainConfig) -> tuple[dict, Trainer]:
    """One run's predicted seconds per part (`Trainer.predict`: probes of this model on this machine), and the
    trainer that predicted it (its shape and trainable parts, for scaling to similar arms)."""
    trainer = Trainer(config)
    return trainer.predict(), trainer


# --------------------------------------------------------------------------- choosing on validation

def choose_lr(per_seed: dict[float, list]) -> dict:
    """Each rate's per-seed val_loss -> the rate of the lowest seed-mean val_loss, and how far to trust it:
    how many seeds' own argmin agrees, whether its interval overlaps a grid neighbour's (then the argmin is
    not resolved), and whether it sits at an edge of the grid (then the true optimum may lie beyond it)."""
    lrs = sorted(per_seed)
    intervals = {lr: mean_interval(per_seed[lr]) for lr in lrs}
    measured = [lr for lr in lrs if intervals[lr].n]
    if not measured:
        return {"lr": None, "agree": 0, "seeds": 0, "overlap": True, "edge": None, "resolved": False}
    best = min(measured, key=lambda lr: intervals[lr].mean)
    i = lrs.index(best)
    n = max(len(v) for v in per_seed.values())
    argmins = []
    for s in range(n):
        seed_values = {lr: per_seed[lr][s] for lr in lrs if s < len(per_seed[lr]) and per_seed[lr][s] is not None}
        if seed_values:
            argmins.append(min(seed_values, key=seed_values.get))
    neighbours = [lrs[j] for j in (i - 1, i + 1) if 0 <= j < len(lrs)]
    overlap = any(intervals[nb].n == 0 or intervals[best].high >= intervals[nb].low for nb in neighbours)
    edge = "low" if i == 0 else "high" if i == len(lrs) - 1 else None
    if len(lrs) == 1:
        edge = "both"
    return {"lr": best, "agree": sum(a == best for a in argmins), "seeds": len(argmins), "overlap": overlap,
            "overlaps_with": [nb for nb in neighbours if intervals[best].high >= intervals[nb].low],
            "edge": edge, "resolved": not overlap and edge is None}


def ratio_bounds(lora: dict, full: dict) -> tuple[float, float]:
    """The range the true best-LoRA / best-full ratio can lie in: the measured ratio, opened to 0 or infinity
    on the side where an argmin sits at its grid's edge (the optimum may lie beyond it)."""
    ratio = lora["lr"] / full["lr"]
    low_open = lora["edge"] in ("low", "both") or full["edge"] in ("high", "both")
    high_open = lora["edge"] in ("high", "both") or full["edge"] in ("low", "both")
    return (0.0 if low_open else ratio), (math.inf if high_open else ratio)


def ratio_verdict(lora: dict, full: dict) -> tuple[bool | None, str]:
    """'The best LoRA rate is about 10x full's': supported when the ratio lies in [3x, 30x], not supported
    outside it, not resolved when either argmin is not (interval overlap, or an edge that makes the ratio a
    bound reaching both inside and outside the band)."""
    if lora["lr"] is None or full["lr"] is None:
        return None, "not resolved at this budget: no val_loss was measured"
    unresolved = [name for name, c in (("LoRA", lora), ("full", full)) if c["overlap"]]
    if unresolved:
        whose = " and ".join(f"{name}'s" for name in unresolved)
        return None, (f"not resolved at this budget: {whose} best rate has a val_loss interval overlapping a grid "
                      "neighbour's; more seeds would resolve the argmin if the neighbours' means stay apart")
    low, high = ratio_bounds(lora, full)
    band_low, band_high = RATIO_BAND[0] * (1 - _TOLERANCE), RATIO_BAND[1] * (1 + _TOLERANCE)
    if band_low <= low and high <= band_high:
        return True, ""
    if high < band_low or low > band_high:
        return False, ("" if low == high else "an argmin sits at its grid's edge, but every ratio it allows is "
                                              "outside the band")
    return None, ("not resolved at this budget: a best rate sits at the edge of its grid, so the ratio is only "
                  f"known to lie in [{low:.3g}, {high:.3g}]; widen the grid (--lora-lrs/--full-lrs)")


def measured(interval: Interval, unit: str) -> dict | None:
    """An interval as results.json writes it (`Interval.as_dict`), or None when no seed measured it (a mean of
    nothing is NaN, which is not JSON)."""
    return interval.as_dict(unit) if interval.n else None


def relative_gaps(lora_losses: list, full_losses: list) -> list[float]:
    """Per seed (the same seed's data order on both sides), LoRA's test loss relative to full's, minus 1."""
    return [(lo - fu) / fu for lo, fu in zip(lora_losses, full_losses) if lo is not None and fu is not None and fu]


def gap_verdict(gaps: list[float]) -> tuple[Interval, bool | None, str]:
    """'At its best rate LoRA reaches full's test loss within 5%': the paired per-seed gaps' interval below
    0.05 supports it, above refutes it, across it is not resolved."""
    interval = mean_interval(gaps)
    judgement = judge(interval, GAP_THRESHOLD, claim_below=True)
    return interval, judgement.supported, judgement.note


# --------------------------------------------------------------------------- the sweep

@quick_aware
def sweep_lr(*, out: str | Path, task: str = "both", seeds: int | None = None, lora_lrs=None, full_lrs=None,
             rank: int = DEFAULT_RANK, model: str = "smollm2-135m", steps: int = 16, runs_dir: str = "runs",
             quick: bool = False, generate_examples: int = 16, progress: bool = True) -> dict:
    """Train (or reuse) every task x method x rate x seed; choose on validation, report on test, judge."""
    started = time.perf_counter()
    out = Path(out)
    seeds = check_seeds(seeds if seeds is not None else (2 if quick else 3))
    if quick:
        model, steps = QUICK_MODEL, min(steps, 3)
    lora_lrs = sorted(lora_lrs or (QUICK_LORA_LRS if quick else DEFAULT_LORA_LRS))
    full_lrs = sorted(full_lrs or (QUICK_FULL_LRS if quick else DEFAULT_FULL_LRS))
    tasks = list(task_names(task))
    plan = {}
    for t in tasks:
        base = task_config(t, model=model, steps=steps, runs_dir=runs_dir, quick=quick,
                           generate_examples=generate_examples, progress=progress)
        plan[t] = {"lora": {lr: lora_arm(base, rank, lr) for lr in lora_lrs},
                   "full": {lr: full_arm(base, lr) for lr in full_lrs}}
    predicted = _predict(plan, seeds)

    per_task, done, total = {}, 0, sum(len(arms) for methods in plan.values() for arms in methods.values())
    for t, methods in plan.items():
        quality = TASKS[t].quality
        rows = {}
        for method, arms in methods.items():
            rows[method] = {}
            for lr, (config, prefix) in arms.items():
                done += 1
                print(f"tunegap: sweep lr: arm {done}/{total}: {t}, {method}, lr {lr:g} ({seeds} seeds)", flush=True)
                runs = run_seeds(config, prefix, seeds)
                rows[method][lr] = _arm_row(runs, quality)
        per_task[t] = _task_results(rows, quality)

    wall = time.perf_counter() - started
    print(f"tunegap: sweep lr: {minutes(wall)} (measured) against a predicted {minutes(predicted['seconds'])} "
          "(estimate)", flush=True)
    results = {"analysis": "sweep-lr", "model": model, "quick": quick, "steps": steps, "seeds": seeds,
               "tasks": tasks,
               "settings": {"lora_lrs": lora_lrs, "full_lrs": full_lrs, "rank": rank, "alpha": 2 * rank,
                            "batch_size": next(iter(plan.values()))["full"][full_lrs[0]][0].batch_size,
                            "seq_len": {t: plan[t]["full"][full_lrs[0]][0].seq_len for t in tasks},
                            "choice": "lowest seed-mean val_loss on the validation split; test metrics reported",
                            "ratio_band": list(RATIO_BAND), "gap_threshold": GAP_THRESHOLD},
               "per_task": per_task,
               "predicted_seconds": q(predicted["seconds"], "s", "estimate"),
               "prediction": predicted["how"],
               "wall_seconds": q(wall, "s", "measured")}
    out.mkdir(parents=True, exist_ok=True)
    images = [_plot_val_loss(results, out / "lr_val_loss.png")]
    section = lr_section(results, images)
    write_outputs(out, results, section)
    return results


def _predict(plan: dict, seeds: int) -> dict:
    """Predicted seconds of the runs still to train: one `Trainer.predict()` per task and method (the rate and
    the seed do not change a run's work), times that method's unfinished runs; finished runs count zero."""
    total, parts = 0.0, {}
    for t, methods in plan.items():
        for method, arms in methods.items():
            todo = sum(pending_runs(config, prefix, seeds) for config, prefix in arms.values())
            if not todo:
                parts[f"{t} {method}"] = {"runs": 0, "seconds_each": 0.0}
                continue
            predicted, _ = predicted_arm(next(iter(arms.values()))[0])
            each = sum(predicted.values())
            parts[f"{t} {method}"] = {"runs": todo, "seconds_each": each}
            total += each * todo
    how = ("estimate: Trainer.predict() of one run per task and method (probes of this model on this machine) "
           "times that method's unfinished runs; finished runs are reused and count zero")
    runs = sum(p["runs"] for p in parts.values())
    print(f"tunegap: sweep lr: {runs} runs to train, predicted {minutes(total)} ({how}): "
          + ", ".join(f"{k} {p['runs']} x {p['seconds_each']:.0f} s" for k, p in parts.items()), flush=True)
    return {"seconds": total, "parts": parts, "how": how}


def _arm_row(runs: list, quality: str) -> dict:
    ledgers = [ledger for _, ledger in runs]
    return {"runs": [str(folder) for folder, _ in runs],
            "per_seed": {key: [ledger.get("metrics", {}).get(key) for ledger in ledgers]
                         for key in ("val_loss", "eval_loss", quality)},
            "val_loss": seed_interval(ledgers, "val_loss"), "eval_loss": seed_interval(ledgers, "eval_loss"),
            "quality": seed_interval(ledgers, quality)}


def _task_results(rows: dict, quality: str) -> dict:
    """One task's arms as results.json writes them, each method's choice on validation, and both verdicts."""
    choices = {method: choose_lr({lr: row["per_seed"]["val_loss"] for lr, row in arms.items()})
               for method, arms in rows.items()}
    chosen = {}
    for method, choice in choices.items():
        row = rows[method].get(choice["lr"])
        chosen[method] = {
            **{k: v for k, v in choice.items() if k not in ("lr", "agree", "seeds")},
            "lr": q(choice["lr"], "learning rate", "measured"),
            "seeds_agreeing": q(choice["agree"], "seeds", "measured"),
            "seeds": q(choice["seeds"], "seeds", "measured"),
            "runs": row["runs"] if row else [],
            "val_loss": measured(row["val_loss"], "nats/token") if row else None,
            "eval_loss": measured(row["eval_loss"], "nats/token") if row else None,
            "quality": measured(row["quality"], "fraction") if row else None}
    lora, full = choices["lora"], choices["full"]
    ratio_supported, ratio_note = ratio_verdict(lora, full)
    ratio = lora["lr"] / full["lr"] if lora["lr"] and full["lr"] else None
    low, high = ratio_bounds(lora, full) if ratio else (None, None)
    gaps = relative_gaps(*(rows[m][choices[m]["lr"]]["per_seed"]["eval_loss"] if choices[m]["lr"] is not None else []
                           for m in ("lora", "full")))  # seed by seed, before None values are dropped
    gap, gap_supported, gap_note = gap_verdict(gaps)
    return {
        "quality_key": quality,
        "arms": {method: [{"lr": lr, "runs": row["runs"], "val_loss": measured(row["val_loss"], "nats/token"),
                           "eval_loss": measured(row["eval_loss"], "nats/token"),
                           "quality": measured(row["quality"], "fraction")} for lr, row in sorted(arms.items())]
                 for method, arms in rows.items()},
        "chosen": chosen,
        "ratio": q(ratio, "x", "measured"),
        "ratio_bounds": {"low": q(low, "x", "measured"), "high": q(high if high != math.inf else None, "x",
                                                                      "measured")},
        "ratio_verdict": {"supported": ratio_supported, "note": ratio_note},
        "test_loss_gap": measured(gap, "fraction"),
        "gap_verdict": {"supported": gap_supported, "note": gap_note},
    }


# --------------------------------------------------------------------------- chart and report section

def _plot_val_loss(results: dict, path: Path) -> Path:
    tasks = results["tasks"]
    fig = figure(5.2 * len(tasks), 4.2)
    for i, t in enumerate(tasks, start=1):
        ax = fig.add_subplot(1, len(tasks), i)
        res = results["per_task"][t]
        for method, colour, label in (("lora", "#4c72b0", f"LoRA r={results['settings']['rank']}"),
                                      ("full", "#dd8452", "full fine-tuning")):
            arms = [a for a in res["arms"][method] if a["val_loss"]]
            lrs = [a["lr"] for a in arms]
            means = [a["val_loss"]["value"] for a in arms]
            err = [[m - a["val_loss"]["low"] if a["val_loss"]["low"] is not None else 0 for m, a in zip(means, arms)],
                   [a["val_loss"]["high"] - m if a["val_loss"]["high"] is not None else 0
                    for m, a in zip(means, arms)]]
            ax.errorbar(lrs, means, yerr=err, marker="o", capsize=3, color=colour, label=label)
            best = res["chosen"][method]
            if best["lr"]["value"] is not None and best["val_loss"]:
                ax.plot([best["lr"]["value"]], [best["val_loss"]["value"]], marker="*", markersize=16, color=colour,
                        markeredgecolor="black", linestyle="none", label=f"best {method}: {best['lr']['value']:g}")
        ax.set_xscale("log")
        ax.set_xlabel("peak learning rate (log scale)")
        ax.set_ylabel("validation loss, nats/token (measured; mean, 95% CI)")
        ax.set_title(f"{t}: ratio best LoRA / best full = {fmt(res['ratio']['value'])}x", fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(f"Validation loss vs learning rate, {results['steps']} steps, {results['seeds']} seeds "
                 "(Schulman et al. 2025: LoRA's best rate about 10x full's)", fontsize=9)
    return save_figure(fig, path)


def _verdicts(results: dict) -> dict:
    verdicts = {}
    for t in results["tasks"]:
        res = results["per_task"][t]
        lora, full = res["chosen"]["lora"], res["chosen"]["full"]
        rv, gv = res["ratio_verdict"], res["gap_verdict"]
        stability = "seeds agreeing on the argmin: " + ", ".join(
            f"{name} {c['seeds_agreeing']['value']}/{c['seeds']['value']}"
            for name, c in (("LoRA", lora), ("full", full)))
        low, high = res["ratio_bounds"]["low"]["value"], res["ratio_bounds"]["high"]["value"]
        bound = "" if low == high else f" (bounds [{fmt(low)}, {fmt(high) if high is not None else 'inf'}]x)"
        ratio_measured = (f"{t}: best LoRA lr {fmt(lora['lr']['value'])} / best full lr {fmt(full['lr']['value'])} "
                          f"= {fmt(res['ratio']['value'])}x{bound}, chosen on validation loss; {stability}")
        verdicts.setdefault(t, []).append(Verdict(
            f"[{t}] The best LoRA learning rate is about 10x full fine-tuning's (within [3x, 30x]: one half-decade "
            "grid step either side).", ratio_measured, rv["supported"],
            rv["note"] or f"rates chosen by lowest seed-mean val_loss over {results['seeds']} seeds",
            anchor("lora_lr_ratio", rv["supported"]), unresolved=rv["supported"] is None))
        gap = res["test_loss_gap"]
        gap_text = ("not measured" if gap is None else f"{100 * gap['value']:+.2f}% ({gap['seeds']} seed, no "
                    "interval)" if gap["low"] is None else
                    f"{100 * gap['value']:+.2f}% [95% CI {100 * gap['low']:+.2f}%, {100 * gap['high']:+.2f}%]")
        verdicts[t].append(Verdict(
            f"[{t}] At its best learning rate, LoRA reaches full fine-tuning's test loss within 5%.",
            f"{t}: LoRA test loss relative to full's, paired per seed: {gap_text} (LoRA "
            f"{interval_cell(lora['eval_loss'])}, full {interval_cell(full['eval_loss'])} nats/token)",
            gv["supported"], gv["note"] or f"paired over {gap['seeds']} seeds; threshold +5%",
            anchor("lora_gap_at_best_lr", gv["supported"]), unresolved=gv["supported"] is None))
    return verdicts


def lr_section(results: dict, images: list[Path]):
    by_task = _verdicts(results)
    blocks = []
    for t in results["tasks"]:
        res = results["per_task"][t]
        rows = []
        for method in ("lora", "full"):
            chosen = res["chosen"][method]["lr"]["value"]
            for arm in res["arms"][method]:
                mark = " (chosen)" if arm["lr"] == chosen else ""
                rows.append([f"{method}{mark}", f"{arm['lr']:g}", interval_cell(arm["val_loss"]),
                             interval_cell(arm["eval_loss"]), interval_cell(arm["quality"])])
        blocks += [f"**{t}** (quality: {TASKS[t].quality_name}, test split; chosen arms' test numbers are the "
                   "ones the verdicts read)", "",
                   md_table(["method", "lr", "val loss (choice)", "test loss", TASKS[t].quality_name], rows), ""]
    quick = " (quick: random tiny model; the numbers only exercise the code)" if results["quick"] else ""
    s = results["settings"]
    body = "\n".join([
        f"Model `{results['model']}`{quick}. Every arm trains {results['steps']} steps, batch {s['batch_size']}, "
        f"on the same data in the same order per seed; LoRA rank {s['rank']}, alpha {s['alpha']}. Each method's "
        "learning rate is the one of lowest seed-mean **validation** loss; the table's test columns are means "
        f"with 95% Student-t intervals over {results['seeds']} seeds. Predicted "
        f"{minutes(results['predicted_seconds']['value'])} ({results['prediction']}); took "
        f"{minutes(results['wall_seconds']['value'])} (measured).", "", *blocks,
        disagreements(by_task)])
    return Section(title="Learning rate: LoRA and full fine-tuning, each at its best rate",
                   verdicts=[v for vs in by_task.values() for v in vs], body_markdown=body, images=images,
                   order=ORDER["sweep"] + 1)


__all__ = ["sweep_lr", "choose_lr", "ratio_verdict", "gap_verdict", "relative_gaps", "task_config",
           "DEFAULT_LORA_LRS", "DEFAULT_FULL_LRS"]
