"""`tunegap sweep lora-rank`: task quality, held-out loss and cost against LoRA rank, full fine-tuning as the line.

Hu et al. (2021, Sec. 7.2 and Table 6) found rank 1-8 enough on GPT-3 for their tasks. Here every rank trains
the same steps on the same data with the same learning rate, alpha = 2r (so the update scale alpha/r stays
2, the default's 16/8; LoRA's Sec. 4.1 keeps alpha fixed instead, which changes the effective step size with r),
and full fine-tuning trains the same steps at its own learning rate. The question: from which rank on is LoRA
within 1-2% of full fine-tuning, and what does each rank cost?
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

from ..data.tasks import TASKS
from ..literature import anchor
from ..report import Section, Verdict
from ..stats import NOT_RESOLVED, Interval, judge, mean_interval, paired_differences
from .common import (ORDER, QUICK_MODEL, check_seeds, disagreements, figure, fmt, half_width, md_table, q, quick_aware,
                     run_seeds, save_figure, task_names, task_settings, write_outputs)
from .forgetting import base_train_config

DEFAULT_RANKS = (1, 4, 16, 64)
CLOSE = 0.02  # "close to full": held-out loss within 2% (relative), quality within 2 points


@quick_aware
def sweep_lora_rank(*, out: str | Path, ranks=DEFAULT_RANKS, model: str = "smollm2-135m", steps: int = 16,
                    lr: float = 2e-4, full_lr: float = 5e-5, runs_dir: str = "runs", quick: bool = False,
                    generate_examples: int = 16, progress: bool = True, seeds: int = 3,
                    task: str = "support") -> dict:
    started = time.perf_counter()
    out, seeds = Path(out), check_seeds(seeds)
    if quick:
        model, steps, ranks, full_lr, lr = QUICK_MODEL, min(steps, 3), (1, 2, 4), 1e-3, 1e-3
    by_task = {}
    for name in task_names(task):
        base = base_train_config(model=model, steps=steps, runs_dir=runs_dir, quick=quick, progress=progress)
        base = replace(base, lr=lr, generate_examples=base.generate_examples if quick else generate_examples,
                       **task_settings(name, quick))
        arms = {"full": replace(base, method="full", lr=full_lr)}
        for r in ranks:
            arms[f"lora-r{r}"] = replace(base, method="lora", rank=r, alpha=2.0 * r)
        by_task[name] = _task_rows(arms, name, seeds)
    first = next(iter(by_task.values()))
    results = {"analysis": "sweep-lora-rank", "model": model, "quick": quick, "steps": steps, "seeds": seeds,
               "settings": {"lora_lr": lr, "full_lr": full_lr, "alpha": "2r", "ranks": list(ranks),
                            "generate_examples": generate_examples if not quick else 1},
               "tasks": by_task, "arms": first["arms"], "within": first["within"],
               "wall_seconds": q(time.perf_counter() - started, "s", "measured")}
    out.mkdir(parents=True, exist_ok=True)
    images = [_plot_quality(by_task, out / "lora_rank_quality.png"), _plot_cost(first["arms"], out / "lora_rank_cost.png")]
    section = sweep_section(results, images)
    write_outputs(out, results, section)
    return results


def _task_rows(arms: dict, task: str, seeds: int) -> dict:
    """Every arm over the seeds: means with 95% intervals, and each LoRA rank's gap to full paired by seed."""
    quality_key = TASKS[task].quality
    runs = {label: run_seeds(cfg, f"{task}-{label}" if task != "support" else f"support-{label}", seeds)
            for label, cfg in arms.items()}  # support runs keep their names: `analyze forgetting` reuses them
    metric = {label: {key: [ledger.get("metrics", {}).get(key) for _, ledger in pairs]
                      for key in ("eval_loss", "train_loss", quality_key, "forgetting_kl")}
              for label, pairs in runs.items()}
    rows = {}
    full = metric["full"]
    for label, pairs in runs.items():
        cfg, m = arms[label], metric[label]
        costs = pairs[0][1]["costs"]
        gap = mean_interval([(x - f) / f for x, f in zip(m["eval_loss"], full["eval_loss"]) if x is not None and f])
        quality = mean_interval(m[quality_key])
        rows[label] = {
            "runs": [str(folder) for folder, _ in pairs], "run": str(pairs[0][0]), "method": cfg.method,
            "rank": cfg.rank if cfg.method == "lora" else None, "lr": cfg.lr,
            "eval_loss": mean_interval(m["eval_loss"]).as_dict("nats/token"),
            "train_loss": mean_interval(m["train_loss"]).as_dict("nats/token"),
            "quality": quality.as_dict("fraction") if quality.n else None,
            "forgetting_kl": mean_interval(m["forgetting_kl"]).as_dict("nats/token") if any(
                v is not None for v in m["forgetting_kl"]) else None,
            "loss_gap": gap.as_dict("fraction"),
            "quality_gap": paired_differences(m[quality_key], full[quality_key]).as_dict("fraction")
            if quality.n else None,
            "train_time_s": mean_interval([ledger["costs"]["train_time_s"]["value"] for _, ledger in pairs]
                                          ).as_dict("s"),
            **{k: costs[k] for k in ("params_trainable", "optimizer_state_bytes", "flops_total", "dollars",
                                     "peak_memory_bytes", "tokens")},
        }
    return {"task": task, "quality_metric": quality_key, "arms": rows, "within": _within(rows)}


def _interval(d: dict | None) -> Interval | None:
    return Interval.from_dict(d) if d and d.get("value") is not None else None


def _within(rows: dict) -> dict:
    """Per rank, is the gap to full resolved within 2%? And the smallest rank whose whole interval is."""
    loras = sorted((r["rank"], r) for r in rows.values() if r["rank"] is not None)
    judged = {"loss": {}, "quality": {}}
    for rank, r in loras:
        loss_gap, quality_gap = _interval(r["loss_gap"]), _interval(r.get("quality_gap"))
        judged["loss"][rank] = judge(loss_gap, CLOSE, claim_below=True).supported if loss_gap else None
        judged["quality"][rank] = judge(quality_gap, -CLOSE, claim_below=False).supported if quality_gap else None
    return {"loss_2pct": next((rank for rank, ok in judged["loss"].items() if ok), None),
            "quality_2pt": next((rank for rank, ok in judged["quality"].items() if ok), None),
            "judged": {kind: {str(k): v for k, v in d.items()} for kind, d in judged.items()}}


def close_to_full(within: dict, kind: str = "loss", largest: int = 16) -> bool | None:
    """"A rank <= 16 is close to full": True when one such rank's interval clears the bar, False when every such
    rank tested is resolved above it, None otherwise (not resolved, or no such rank tested)."""
    small = {int(k): v for k, v in within["judged"][kind].items() if int(k) <= largest}
    if any(v is True for v in small.values()):
        return True
    if small and all(v is False for v in small.values()):
        return False
    return None


def _plot_quality(by_task: dict, path: Path) -> Path:
    """Held-out loss and task quality against rank, one row per task; bars are 95% intervals over seeds."""
    fig = figure(10, 3.8 * len(by_task))
    for row, (task, data) in enumerate(by_task.items()):
        rows = data["arms"]
        loras = sorted((r["rank"], r) for r in rows.values() if r["rank"] is not None)
        ranks, full = [k for k, _ in loras], rows["full"]
        panels = [("eval_loss", "held-out loss, nats/token (measured)")]
        if full["quality"]:
            panels.append(("quality", f"{TASKS[task].quality_name} (measured)"))
        for col, (key, ylabel) in enumerate(panels):
            ax = fig.add_subplot(len(by_task), 2, 2 * row + col + 1)
            means = [r[key]["value"] for _, r in loras]
            errs = [half_width(r[key]) for _, r in loras]
            ax.errorbar(ranks, means, yerr=errs, marker="o", capsize=3, label="LoRA (alpha = 2r)")
            ax.axhline(full[key]["value"], color="black", label="full fine-tuning")
            if half_width(full[key]):
                ax.axhspan(full[key]["value"] - half_width(full[key]), full[key]["value"] + half_width(full[key]),
                           color="grey", alpha=0.2, label="full: 95% interval")
            ax.set_xscale("log", base=2)
            ax.set_xlabel("LoRA rank r")
            ax.set_ylabel(ylabel, fontsize=8)
            ax.set_title(f"task: {task}", fontsize=9)
            ax.legend(fontsize=7)
    fig.suptitle("Task quality vs LoRA rank, same steps and data (mean over seeds, 95% interval)", fontsize=10)
    return save_figure(fig, path)


def _plot_cost(rows: dict, path: Path) -> Path:
    loras = sorted((r["rank"], r) for r in rows.values() if r["rank"] is not None)
    full = rows["full"]
    ranks = [k for k, _ in loras]
    fig = figure(7.5, 4.2)
    ax = fig.add_subplot(1, 1, 1)
    for key, label, colour in (("params_trainable", "trainable parameters (measured)", "#4c72b0"),
                               ("optimizer_state_bytes", "optimizer state, bytes (measured)", "#dd8452"),
                               ("flops_total", "training FLOPs (formula)", "#55a868")):
        ax.plot(ranks, [r[key]["value"] for _, r in loras], marker="o", color=colour, label=f"LoRA: {label}")
        ax.axhline(full[key]["value"], color=colour, linestyle="--", linewidth=1, label=f"full: {label}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("LoRA rank r")
    ax.set_title("Cost per rank: parameters and optimizer state shrink, FLOPs barely move", fontsize=10)
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def sweep_section(results: dict, images: list[Path]):
    verdicts, tables, by_task = [], [], {}
    for task, data in results["tasks"].items():
        rows, within = data["arms"], data["within"]
        tables += [f"**Task `{task}`** ({TASKS[task].quality_name} on generated test replies):", "",
                   _table(rows, task), ""]
        close = close_to_full(within)
        best = min((r for r in rows.values() if r["rank"] is not None), key=lambda r: r["eval_loss"]["value"])
        measured = (f"{task}: smallest rank whose held-out loss is within 2% of full's over the whole 95% interval: "
                    f"{within['loss_2pct'] or 'none'}; best LoRA r={best['rank']} at "
                    f"{_interval(best['loss_gap']).text(3)} relative to full")
        by_task[task] = [Verdict(
            f"A low-rank update (r <= 16) gets within 2% of full fine-tuning's held-out loss ({task}).", measured,
            close, _note(results, close, within, "loss"), anchor("sweep_rank_close", close),
            unresolved=close is None)]
        full_quality = rows["full"]["quality"]
        if full_quality:
            tell = full_quality["value"] >= 0.1
            quality_close = close_to_full(within, "quality") if tell else None
            by_task[task].append(Verdict(
                f"On generated replies, LoRA (r <= 16) matches full fine-tuning's {TASKS[task].quality_name} "
                f"within 2 points ({task}).",
                f"smallest rank within 2 points of full's {fmt(full_quality['value'])} over the whole interval: "
                f"{within.get('quality_2pt') or 'none'}", quality_close,
                _note(results, quality_close, within, "quality") if tell else
                "full fine-tuning itself reached < 10% in this budget, so this cannot tell",
                anchor("sweep_style", quality_close), unresolved=tell and quality_close is None))
        verdicts += by_task[task]
    first = next(iter(results["tasks"].values()))["arms"]
    lora_params = [r["params_trainable"]["value"] for r in first.values() if r["rank"] is not None]
    flops = [r["flops_total"]["value"] / first["full"]["flops_total"]["value"] for r in first.values()
             if r["rank"] is not None]
    verdicts.append(Verdict("LoRA's saving is parameters and optimizer memory, not compute per token.",
                            f"trainable params {min(lora_params):,}-{max(lora_params):,} vs "
                            f"{first['full']['params_trainable']['value']:,} (counted); FLOPs {min(flops):.2f}-"
                            f"{max(flops):.2f}x full's (formula against formula: the cost model's statement, "
                            "not a measurement)", max(flops) > 0.5, anchor=anchor("sweep_compute", max(flops) > 0.5)))
    tables.append(disagreements(by_task, ["a rank <= 16 within 2% of full's held-out loss",
                                          "a rank <= 16 within 2 points of full's quality"]))
    quick = " (quick: random tiny model; the numbers only exercise the code)" if results["quick"] else ""
    body = "\n".join([
        f"Model `{results['model']}`{quick}; {results['seeds']} seed(s) per arm (weights, data order, LoRA "
        f"initialisation), every arm trained {results['steps']} steps of the same batches; LoRA lr "
        f"{results['settings']['lora_lr']}, alpha = 2r; full fine-tuning lr {results['settings']['full_lr']}, "
        "both fixed in advance (`tunegap sweep lr` chooses them on a validation split). Held-out loss and "
        "quality are on each task's test split; numbers are means with 95% Student-t intervals over seeds, and "
        "`vs full` is the per-seed relative gap to full fine-tuning.", "", *tables])
    return Section(title="LoRA rank sweep: how low can the rank go?", verdicts=verdicts, body_markdown=body,
                   images=images, order=ORDER["sweep"])


def _note(results: dict, outcome: bool | None, within: dict, kind: str) -> str:
    note = f"{results['steps']} steps, {results['seeds']} seed(s) per arm"
    if outcome is None:
        gaps = [r for r in within["judged"][kind]]
        note += (f"; {NOT_RESOLVED}: no rank <= 16 has its whole interval within 2% and not every one is resolved "
                 f"outside it (ranks judged: {', '.join(gaps)}); more seeds narrow the intervals as 1/sqrt(n)")
    return note


def _table(rows: dict, task: str) -> str:
    return md_table(
        ["arm", "trainable params", "optimizer state", "FLOPs (formula)", "train time (measured)",
         "held-out loss (nats/token)", "vs full (paired)", TASKS[task].quality_name, "KL forgetting"],
        [[label, fmt(r["params_trainable"]["value"]), f"{r['optimizer_state_bytes']['value'] / 2**20:.3g} MiB",
          f"{r['flops_total']['value']:.3g}", _interval(r["train_time_s"]).text(3, "s"),
          _interval(r["eval_loss"]).text(3), "-" if label == "full" else _interval(r["loss_gap"]).text(2),
          _interval(r["quality"]).text(3) if r["quality"] else "not generated",
          _interval(r["forgetting_kl"]).text(3) if r["forgetting_kl"] else "n/a"] for label, r in rows.items()])


__all__ = ["sweep_lora_rank", "DEFAULT_RANKS"]
