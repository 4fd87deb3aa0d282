"""`tunegap analyze plane`: LoRA against full fine-tuning on the learning-forgetting plane.

Biderman et al. (2024) plot each run's learning (held-out task loss) against its forgetting at checkpoints along
the run and find LoRA and full fine-tuning on roughly one trade-off curve, LoRA at less learning and less
forgetting; Schulman et al. (2025) find LoRA matches full fine-tuning in a low-regret regime (small data) when
its learning rate is about 10x full's. Here every arm (LoRA at each rank and learning rate, full fine-tuning at
each learning rate) trains `--seeds` seeds through the one loop with `--forgetting-every k`
(`callbacks.forgetting_curve`), so each run's metrics.jsonl holds real checkpoints' test loss, KL(base || tuned)
on the general prompts and general-question accuracy. The verdicts are read from those curves:

  (a) LoRA matches full: the best LoRA arm's final test loss is within 5% of the best full arm's (each method's
      best arm chosen on validation loss; per-seed ratios, same seed = same data order, judged by their 95%
      interval against +5%).
  (b) LoRA forgets less at equal learning: for each seed pair of the two best arms, at the test loss both runs
      reach (the worse of their two final losses), each run's forgetting is read off its curve by linear
      interpolation between checkpoints (the base model is the curve's first point: its test loss, KL 0, every
      base-right answer kept); LoRA minus full per seed, judged against 0. A pair without such a level (a run
      whose loss never fell below the base's) is left out; with fewer than two pairs the verdict is not
      resolved, and says so. The level is paired because a mean level sits above about half of the worse
      method's seeds, which would never reach it.

Predicted wall time of the defaults on the default model, a quiet 2-core CPU: about 2 h for `--seeds 3 --task
both` (6 arms x 3 seeds x 2 tasks = 36 runs of 16 steps with 4 curve points each), about 1 h with one task
(estimate: each run ~35-55 s of steps plus ~25 s per curve point). The command prints its own prediction (from
timed probes on this machine) before the first run; finished runs are reused, so a killed analysis resumes.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace
from pathlib import Path

from ..config import TrainConfig
from ..data.sources import prepare
from ..forgetting import autocast_for
from ..literature import anchor
from ..models import load_model
from ..report import Section, Verdict
from ..stats import NOT_RESOLVED, Interval, judge, mean_interval
from ..trainer import Trainer
from .common import (ORDER, QUICK_MODEL, AnalysisError, check_seeds, disagreements, figure, fmt, half_width,
                     interval_cell, load_base, md_table, q, quick_aware, read_metrics, run_seeds, save_figure,
                     write_outputs)
from .forgetting import crossing, eval_loss_of

TASKS = ("support", "docstrings")
MATCH_TOLERANCE = 0.05  # (a): LoRA's final test loss at most 5% above full's
CURVE_KEYS = ("eval_loss", "forgetting_kl", "general_accuracy", "general_retained")
FORGETTING = {  # measure -> (unit, value at the base model, higher means more forgetting)
    "forgetting_kl": ("nats/token", 0.0, True),
    "general_retained": ("fraction", 1.0, False),
}


# --------------------------------------------------------------------------- the arms and their runs

def plane_config(task: str, *, model: str, steps: int, every: int, runs_dir: str, quick: bool, progress: bool):
    """The settings every arm of one task shares: a curve point every `every` steps, the test split's loss,
    a validation split to choose each method's best arm on, and no end-of-run generation."""
    if task not in TASKS:
        raise AnalysisError(f"--task: expected support, docstrings or both, got {task!r}")
    shared = dict(model=model, data=task, max_steps=steps, forgetting_every=every, eval_every=0,
                  generate_examples=0, task_metrics="off", forgetting="off", runs_dir=runs_dir, keep_checkpoints=1)
    if quick:
        return TrainConfig(**shared, seq_len=512, batch_size=4, train_examples=32, eval_examples=4, val_examples=4,
                           precision="fp32", progress=False, threads=1)
    return TrainConfig(**shared, seq_len=128 if task == "support" else 256, batch_size=8, eval_examples=32,
                       val_examples=32, progress=progress)


def arm_configs(base, ranks, lora_lrs, full_lrs) -> dict:
    """LoRA at each rank and learning rate (alpha = 2r: the update scale stays 2), full at each learning rate."""
    arms = {f"lora-r{r}-lr{lr:g}": replace(base, method="lora", rank=r, alpha=2.0 * r, lr=lr)
            for r in ranks for lr in lora_lrs}
    arms.update({f"full-lr{lr:g}": replace(base, method="full", lr=lr) for lr in full_lrs})
    return arms


def quick_base(runs_dir: str) -> str:
    """--quick: the tiny random model saved as a model folder, so the curve callback's real-weights path runs
    (its numbers measure drift from random weights and say nothing about LLMs)."""
    folder = Path(runs_dir) / "plane-quick-base"
    if not (folder / "config.json").is_file():
        model, tokenizer = load_model(QUICK_MODEL, seed=0)
        model.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)
    return str(folder)


def predict_seconds(arms: dict, seeds: int) -> float:
    """Predicted seconds of every run (estimates, `Trainer.predict`): one LoRA arm (the largest rank) and one full
    arm probed per task, each multiplied by its arms and seeds. Runs already finished are reused, so less."""
    probes: dict[tuple, float] = {}
    total = 0.0
    for cfg in arms.values():
        key = (cfg.data, cfg.method)
        if key not in probes:
            widest = max((c for c in arms.values() if (c.data, c.method) == key), key=lambda c: c.rank)
            probes[key] = sum(Trainer(replace(widest, progress=False)).predict().values())
        total += seeds * probes[key]
    return total


def seed_curve(folder: Path) -> list[dict]:
    """A run's measured curve points (step, test loss, forgetting), in step order, from its metrics.jsonl."""
    rows = [r for r in read_metrics(folder) if r.get("forgetting_kl") is not None and r.get("eval_loss") is not None]
    keys = (*CURVE_KEYS, "general_accuracy_base")
    return [{"step": r["step"], **{k: r.get(k) for k in keys}} for r in sorted(rows, key=lambda r: r["step"])]


# --------------------------------------------------------------------------- reading the curves

def at_level(points: list[dict], level: float, key: str, base_loss: float) -> float | None:
    """Forgetting measure `key` where the seed's curve (the base model first) reaches test loss `level`, linearly
    interpolated between checkpoints; None when the curve never gets down to it."""
    start = FORGETTING[key][1]
    path = [(start, base_loss)] + [(p[key], p["eval_loss"]) for p in points if p.get(key) is not None]
    return crossing(path, level)


def best_arm(arms: dict, method: str) -> str | None:
    """The method's arm with the lowest mean validation loss (chosen on validation, reported on test)."""
    mine = {k: a for k, a in arms.items() if a["method"] == method}
    scored = {k: mean_interval(s["val_loss"] for s in a["seeds"]).mean for k, a in mine.items()}
    scored = {k: v for k, v in scored.items() if not math.isnan(v)}
    return min(scored, key=scored.get) if scored else None


def final_losses(arm: dict) -> list:
    return [s["eval_loss"] for s in arm["seeds"]]


def matches_full(lora: dict, full: dict, tolerance: float = MATCH_TOLERANCE) -> dict:
    """(a): per seed, LoRA's final test loss relative to full's, minus 1; claimed below `tolerance`."""
    ratios = [None if a is None or b is None else a / b - 1 for a, b in zip(final_losses(lora), final_losses(full))]
    interval = mean_interval(ratios)
    return {"interval": interval, "judgement": judge(interval, tolerance, claim_below=True)}


def pair_levels(lora: dict, full: dict) -> list:
    """Per seed pair, the test loss both runs reach: the worse of the two final losses (None if one is missing)."""
    return [None if a is None or b is None else max(a, b) for a, b in zip(final_losses(lora), final_losses(full))]


def forgets_less(lora: dict, full: dict, key: str, base_loss: float) -> dict:
    """(b): per seed pair, LoRA's forgetting minus full's at the pair's common test loss (`pair_levels`); LoRA
    forgets less when the difference is below 0 (KL) or above 0 (kept answers). Fewer than two pairs whose
    curves both reach their level (a run whose loss never fell below the base's does not): not resolved."""
    pairs = [(None, None) if level is None else
             (at_level(a["points"], level, key, base_loss), at_level(b["points"], level, key, base_loss))
             for level, a, b in zip(pair_levels(lora, full), lora["seeds"], full["seeds"])]
    reached = [(a, b) for a, b in pairs if a is not None and b is not None]
    interval = mean_interval(a - b for a, b in reached)
    if not any(p.get(key) is not None for arm in (lora, full) for seed in arm["seeds"] for p in seed["points"]):
        note = (f"{NOT_RESOLVED}: {key} was not measured (general_retained needs general questions the base model "
                "answers right, and it answers none)")
        return {"interval": interval, "judgement": None, "note": note, "pairs": 0}
    if len(reached) < 2:
        note = (f"{NOT_RESOLVED}: only {len(reached)} of {len(pairs)} seed pairs have a common test loss both "
                "curves reach (with this measure); more seeds, or more steps so both runs learn, would resolve it")
        return {"interval": interval, "judgement": None, "note": note, "pairs": len(reached)}
    j = judge(interval, 0.0, claim_below=FORGETTING[key][2])
    return {"interval": interval, "judgement": j.supported, "note": j.note, "pairs": len(reached)}


def read_plane(arms: dict, base_loss: float) -> dict:
    """The verdicts' numbers for one task from its arms (label -> {"method", "seeds": [{"val_loss", "eval_loss",
    "points"}]}): the best arm of each method, (a), (b) for each forgetting measure, and `level`, the one test
    loss every seed of both best arms reaches (the highest pair level), where the table reads every arm."""
    lora_key, full_key = best_arm(arms, "lora"), best_arm(arms, "full")
    if lora_key is None or full_key is None:
        raise AnalysisError("analyze plane: needs at least one LoRA and one full arm with a validation loss")
    lora, full = arms[lora_key], arms[full_key]
    levels = [x for x in pair_levels(lora, full) if x is not None]
    return {"best_lora": lora_key, "best_full": full_key, "matches": matches_full(lora, full),
            "level": max(levels) if levels else math.nan, "pair_levels": levels,
            "forgets": {key: forgets_less(lora, full, key, base_loss) for key in FORGETTING}}


# --------------------------------------------------------------------------- the command

@quick_aware
def analyze_plane(*, out: str | Path, model: str = "smollm2-135m", task: str = "both", steps: int = 16,
                  every: int = 4, ranks=(4, 64), lora_lrs=(2e-4, 1e-3), full_lrs=(2e-5, 1e-4), seeds: int = 3,
                  runs_dir: str = "runs", quick: bool = False, progress: bool = True) -> dict:
    """Train (or reuse) every arm x seed with curve points every `every` steps; plot and judge the plane."""
    started = time.perf_counter()
    out = Path(out)
    seeds = check_seeds(seeds)
    tasks = list(TASKS) if task == "both" else [task]
    if quick:
        model, steps, every, ranks = quick_base(runs_dir), min(steps, 4), 2, (2, 8)
        lora_lrs, full_lrs = (3e-3, 1e-2), (1e-3, 3e-3)
    configs = {t: plane_config(t, model=model, steps=steps, every=every, runs_dir=runs_dir, quick=quick,
                               progress=progress) for t in tasks}
    all_arms = {(t, label): cfg for t in tasks for label, cfg in arm_configs(configs[t], ranks, lora_lrs,
                                                                               full_lrs).items()}
    predicted = predict_seconds({f"{t}/{label}": cfg for (t, label), cfg in all_arms.items()}, seeds)
    print(f"tunegap: analyze plane: {len(all_arms)} arms x {seeds} seeds = {len(all_arms) * seeds} runs, predicted "
          f"{predicted / 60:.1f} min (estimate from timed probes; finished runs are reused)", flush=True)

    per_task = {}
    for t in tasks:
        arms = {}
        labels = [label for (tt, label) in all_arms if tt == t]
        for i, label in enumerate(labels, start=1):
            cfg = all_arms[(t, label)]
            print(f"tunegap: analyze plane: {t} arm {i}/{len(labels)} {label} ({seeds} seeds)", flush=True)
            runs = run_seeds(cfg, f"plane-{t}-{label}", seeds)
            arms[label] = {"method": cfg.method, "rank": cfg.rank if cfg.method == "lora" else None, "lr": cfg.lr,
                           "runs": [str(folder) for folder, _ in runs],
                           "seeds": [{"seed": ledger["config"]["seed"], "points": seed_curve(folder),
                                      "val_loss": ledger.get("metrics", {}).get("val_loss"),
                                      "eval_loss": ledger.get("metrics", {}).get("eval_loss")}
                                     for folder, ledger in runs]}
        base_loss, base_accuracy = _base_point(configs[t], arms)
        per_task[t] = {"base_loss": base_loss, "base_accuracy": base_accuracy, "arms": arms,
                       "reading": read_plane(arms, base_loss)}

    out.mkdir(parents=True, exist_ok=True)
    images = [_plot(t, d, out / f"plane_{t}.png") for t, d in per_task.items()]
    results = {"analysis": "plane", "model": model, "quick": quick, "steps": steps, "every": every, "seeds": seeds,
               "settings": {"ranks": list(ranks), "lora_lrs": list(lora_lrs), "full_lrs": list(full_lrs),
                            "lora_alpha": "2r", "match_tolerance": MATCH_TOLERANCE},
               "predicted_seconds": q(predicted, "s", "estimate"),
               "tasks": {t: _task_results(d) for t, d in per_task.items()},
               "wall_seconds": q(time.perf_counter() - started, "s", "measured")}
    section = plane_section(results, per_task, images)
    write_outputs(out, results, section)
    return results


def _base_point(config, arms: dict) -> tuple[float, float | None]:
    """The curves' common first point: the base model's test loss (measured here, as the loop measures it) and
    its general accuracy (the curve rows carry it)."""
    base, tokenizer = load_base(config.to_dict())
    base.eval()
    loss = eval_loss_of(base, tokenizer, prepare(config, tokenizer).eval, config.batch_size, config.seq_len,
                        autocast_for(config.precision))
    accuracy = next((p.get("general_accuracy_base") for a in arms.values() for s in a["seeds"]
                     for p in s["points"] if p.get("general_accuracy_base") is not None), None)
    return loss, accuracy


def _mean_curve(arm: dict) -> list[dict]:
    """Seed means at each step every seed measured: {"step", key: Interval}."""
    steps = sorted(set.intersection(*[{p["step"] for p in s["points"]} for s in arm["seeds"]])) if arm["seeds"] else []
    curve = []
    for step in steps:
        at = [next(p for p in s["points"] if p["step"] == step) for s in arm["seeds"]]
        curve.append({"step": step, **{k: mean_interval(p.get(k) for p in at) for k in CURVE_KEYS}})
    return curve


UNITS = {"eval_loss": "nats/token", "forgetting_kl": "nats/token", "general_accuracy": "fraction",
         "general_retained": "fraction"}


def _task_results(d: dict) -> dict:
    reading = d["reading"]
    arms = {}
    for label, arm in d["arms"].items():
        level = {key: mean_interval(at_level(s["points"], reading["level"], key, d["base_loss"]) for s in arm["seeds"])
                 for key in FORGETTING}
        arms[label] = {"method": arm["method"], "rank": arm["rank"], "lr": arm["lr"], "runs": arm["runs"],
                       "val_loss": mean_interval(s["val_loss"] for s in arm["seeds"]).as_dict("nats/token"),
                       "curve": [{"step": p["step"], **{k: p[k].as_dict(UNITS[k]) for k in CURVE_KEYS}}
                                 for p in _mean_curve(arm)],
                       "at_common_level": {k: v.as_dict(FORGETTING[k][0]) for k, v in level.items()}}
    forgets = {k: {"lora_minus_full": f["interval"].as_dict(FORGETTING[k][0]), "seed_pairs": f["pairs"],
                   "supported": f["judgement"], "note": f["note"]} for k, f in reading["forgets"].items()}
    return {"base": {"eval_loss": q(d["base_loss"], "nats/token", "measured"),
                     "general_accuracy": q(d["base_accuracy"], "fraction", "measured")},
            "arms": arms, "best_lora": reading["best_lora"], "best_full": reading["best_full"],
            "lora_relative_to_full": reading["matches"]["interval"].as_dict("fraction"),
            "common_level": q(reading["level"], "nats/token", "measured"),
            "pair_levels": mean_interval(reading["pair_levels"]).as_dict("nats/token"), "forgets_less": forgets}


def _plot(task: str, d: dict, path: Path) -> Path:
    """Test loss (x, inverted: more learning to the right) against KL and against kept answers, one line per arm
    through its seed-mean checkpoints from the base model, 95% interval bars at the final point."""
    fig = figure(11, 4.5)
    panels = [("forgetting_kl", "KL(base ‖ tuned), nats/token (measured)")]
    panels.append(("general_retained", "base-right general answers kept (measured)") if d["base_accuracy"]
                  else ("general_accuracy", "general accuracy (measured; base: none right)"))
    level = d["reading"]["level"]
    for i, (key, ylabel) in enumerate(panels, start=1):
        ax = fig.add_subplot(1, 2, i)
        start = {"forgetting_kl": 0.0, "general_retained": 1.0}.get(key, d["base_accuracy"] or 0.0)
        for label, arm in d["arms"].items():
            curve = _mean_curve(arm)
            xs = [d["base_loss"]] + [p["eval_loss"].mean for p in curve]
            ys = [start] + [p[key].mean for p in curve]
            line, = ax.plot(xs, ys, marker="o", markersize=3, label=label,
                            linestyle="--" if arm["method"] == "full" else "-")
            if curve:
                last = curve[-1]
                ax.errorbar([last["eval_loss"].mean], [last[key].mean], xerr=[[half_width(last["eval_loss"])]],
                            yerr=[[half_width(last[key])]], color=line.get_color(), capsize=3, linewidth=1)
        ax.axvline(level, color="grey", linestyle=":", linewidth=0.8, label="common test-loss level")
        ax.invert_xaxis()
        ax.set_xlabel("held-out test loss, nats/token (measured; more learning to the right)")
        ax.set_ylabel(ylabel)
        if i == 1:
            ax.legend(fontsize=7)
    fig.suptitle(f"{task}: learning vs forgetting at checkpoints (seed means; bars: 95% interval at the end)",
                 fontsize=10)
    return save_figure(fig, path)


# --------------------------------------------------------------------------- the report section

def plane_section(results: dict, per_task: dict, images: list[Path]):
    by_task, tables = {}, []
    for t, d in per_task.items():
        by_task[t] = verdicts = []
        r, tr = d["reading"], results["tasks"][t]
        prefix = f"{t}: " if len(per_task) > 1 else ""
        m = r["matches"]
        supported = m["judgement"].supported
        verdicts.append(Verdict(
            f"{prefix}LoRA matches full fine-tuning: its best arm's final test loss is within "
            f"{100 * MATCH_TOLERANCE:.0f}% of full's best.",
            f"{r['best_lora']} vs {r['best_full']} (each chosen on validation loss): LoRA's test loss relative to "
            f"full's, per seed, {_pct(m['interval'])}", supported, m["judgement"].note,
            anchor=anchor("plane_lora_matches", supported), unresolved=supported is None))
        for key, words in (("forgetting_kl", "drifts less from the base (KL)"),
                           ("general_retained", "keeps more of the base's right general answers")):
            f = r["forgets"][key]
            unit = FORGETTING[key][0]
            verdicts.append(Verdict(
                f"{prefix}At equal learning, LoRA forgets less: it {words} at the test loss both methods reach.",
                f"at each seed pair's common test loss (mean {mean_interval(r['pair_levels']).mean:.4g} "
                f"nats/token), {r['best_lora']} minus {r['best_full']}: "
                f"{f['interval'].text(unit=unit) if f['interval'].n else 'no seed pair reaches it'}",
                f["judgement"], f["note"], anchor=anchor("plane_forgets_less", f["judgement"]),
                unresolved=f["judgement"] is None))
        rows = []
        for label, arm in tr["arms"].items():
            last = arm["curve"][-1] if arm["curve"] else {}
            rows.append([label, fmt(arm["lr"]), interval_cell(arm["val_loss"]), interval_cell(last.get("eval_loss")),
                         interval_cell(last.get("forgetting_kl")), interval_cell(last.get("general_retained")),
                         interval_cell(arm["at_common_level"]["forgetting_kl"]),
                         interval_cell(arm["at_common_level"]["general_retained"])])
        tables.append(f"**{t}** (base model: test loss {fmt(d['base_loss'])} nats/token, general accuracy "
                      f"{fmt(d['base_accuracy'])}; every arm read at {fmt(r['level'])} nats/token, the highest "
                      "pair level)\n\n" + md_table(
                          ["arm", "lr", "val loss", "final test loss", "final KL", "final kept",
                           f"KL at {fmt(r['level'])}", f"kept at {fmt(r['level'])}"], rows))
    where = disagreements(by_task, ["LoRA matches full", "forgets less (KL)", "forgets less (kept answers)"])
    quick = " (quick: a random tiny model; the numbers exercise the code only)" if results["quick"] else ""
    s = results["settings"]
    body = "\n".join([
        f"Every arm trained {results['steps']} steps with {results['seeds']} seeds on model `{results['model']}`"
        f"{quick}; LoRA ranks {s['ranks']} at learning rates {s['lora_lrs']} (alpha = 2r), full fine-tuning at "
        f"{s['full_lrs']}. Every {results['every']} steps and at the end, the loop measured the test split's loss "
        "and forgetting on the weights as they were (KL(base ‖ tuned) over the base's replies to the general "
        "prompts, nats/token; the share of the base's right general answers kept). Each method's best arm is "
        "chosen on validation loss; the verdicts read the test split. Forgetting at equal learning is read off "
        "each seed's curve by linear interpolation between checkpoints, at the worse of the two best arms' final "
        "test losses, and compared seed by seed (same seed: same data order).",
        "", where, "", *[x for table in tables for x in (table, "")]])
    return Section(title="LoRA vs full fine-tuning on the learning-forgetting plane",
                   verdicts=[v for vs in by_task.values() for v in vs],
                   body_markdown=body, images=images, order=ORDER["plane"])


def _pct(interval: Interval) -> str:
    if not interval.n:
        return "not measured"
    if interval.n < 2:
        return f"{100 * interval.mean:+.2f}% (1 seed, no interval)"
    return (f"{100 * interval.mean:+.2f}% [95% CI {100 * interval.low:+.2f}%, {100 * interval.high:+.2f}%; "
            f"{interval.n} seeds]")


__all__ = ["analyze_plane", "at_level", "best_arm", "forgets_less", "matches_full", "pair_levels", "read_plane"]
