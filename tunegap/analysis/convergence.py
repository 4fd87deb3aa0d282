"""`tunegap analyze convergence`: the same architecture trained on the same task from random and pretrained weights.

The essay's third reason: optimisation from a pretrained checkpoint starts in a good basin and gets somewhere in
a fraction of the steps. Both arms are full fine-tunes through the one loop, same data order, same steps, so
FLOPs per step are equal (formula) and loss-vs-FLOPs is loss-vs-steps rescaled. Each arm gets its customary
learning rate (pretrained: small, as fine-tuning; random: the pretraining default), which is generous to the
random start.

Target: by default where the pretrained arm stands a tenth of the way through the budget (EMA-smoothed training
loss, mean over seeds). Steps to reach it are measured when reached; otherwise a power law L(t) = a * t^b fitted to
the second half of the random arm's smoothed curve is extrapolated to the target and reported as an estimate,
never as measured.

Seeds (`--seeds N`, default 3): both arms run seeds 0..N-1 (the same seed shares data order on both sides); the
per-seed step ratio scratch / pretrained gets a 95% interval and the verdict is judged on it (`stats.judge`).

Predicted wall time of the defaults (smollm2-135m, 30 steps, 3 seeds, 2-core CPU): about 12 minutes (estimate:
six runs of ~2 min each at the ~3 s per step the gap experiment's full arm measured; generation and forgetting
off).
"""

from __future__ import annotations

import math
import time
from dataclasses import replace
from pathlib import Path

from ..literature import anchor
from ..report import Section, Verdict
from ..stats import judge, mean_interval
from .common import (ORDER, QUICK_MODEL, check_seeds, ema, figure, fmt, md_table, q, quick_aware, run_seeds,
                     save_figure, train_curve, write_outputs)
from .forgetting import base_train_config


def steps_to(losses: list[float], target: float) -> int | None:
    """First step (1-based) whose smoothed loss is at or below `target`."""
    return next((i + 1 for i, v in enumerate(losses) if v <= target), None)


def power_law_fit(steps: list[int], losses: list[float]) -> dict | None:
    """Least squares of log L = log a + b log t; None if fewer than 3 points or a loss <= 0."""
    pts = [(math.log(t), math.log(v)) for t, v in zip(steps, losses) if t > 0 and v > 0]
    if len(pts) < 3:
        return None
    n = len(pts)
    mx, my = sum(x for x, _ in pts) / n, sum(y for _, y in pts) / n
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    if sxx == 0:
        return None
    b = sum((x - mx) * (y - my) for x, y in pts) / sxx
    a = my - b * mx
    ss_res = sum((y - (a + b * x)) ** 2 for x, y in pts)
    ss_tot = sum((y - my) ** 2 for _, y in pts)
    return {"log_a": a, "b": b, "r2": 1 - ss_res / ss_tot if ss_tot else 1.0, "from_step": steps[0],
            "to_step": steps[-1]}


def extrapolate(fit: dict | None, target: float) -> float | None:
    """Step at which the fitted power law reaches `target`; None when it is not decreasing."""
    if not fit or fit["b"] >= 0 or target <= 0:
        return None
    return math.exp((math.log(target) - fit["log_a"]) / fit["b"])


@quick_aware
def analyze_convergence(*, out: str | Path, model: str = "smollm2-135m", steps: int = 30, lr_pretrained: float = 5e-5,
                        lr_scratch: float = 1e-3, target_loss: float = 0.0, runs_dir: str = "runs", seeds: int = 3,
                        quick: bool = False, progress: bool = True) -> dict:
    """Steps to a target loss from pretrained and random weights, per seed, with the ratio's 95% interval."""
    started = time.perf_counter()
    out = Path(out)
    seeds = check_seeds(seeds)
    if quick:
        model, steps = QUICK_MODEL, min(steps, 6)
    base = replace(base_train_config(model=model, steps=steps, runs_dir=runs_dir, quick=quick, progress=progress),
                   generate_examples=0, task_metrics="off", forgetting="off")  # this reads training curves only
    # constant after warm-up: a cosine decay to zero would flatten the end of the curve we extrapolate from
    arms = {"pretrained": replace(base, method="full", init="pretrained", lr=lr_pretrained, schedule="constant"),
            "scratch": replace(base, method="full", init="scratch", lr=lr_scratch, schedule="constant")}
    if quick:  # a random preset is random either way; the seed differs so "pretrained" is another draw
        arms["pretrained"] = replace(arms["pretrained"], lr=1e-3)
    print(f"tunegap: convergence: {2 * seeds} runs of {steps} steps ({seeds} seeds per arm)", flush=True)
    curves = {}
    for label, cfg in arms.items():
        curves[label] = []
        for folder, ledger in run_seeds(cfg, f"converge-{label}", seeds):
            rows = train_curve(folder)
            losses = [r["loss"] for r in rows]
            curves[label].append({"run": str(folder), "seed": ledger["config"]["seed"],
                                  "steps": [r["step"] for r in rows], "loss": losses, "smoothed": ema(losses), "flops": [r["flops"] for r in rows],
                                  "eval_loss": ledger.get("metrics", {}).get("eval_loss"),
                                  "flops_total": ledger["costs"]["flops_total"]["value"],
                                  "train_time_s": ledger["costs"]["train_time_s"]["value"]})
    pre_runs = curves["pretrained"]
    # default target: where the pretrained arm stands a tenth of the way in (mean over seeds), so that the scratch
    # arm failing to reach it in the whole budget is a measured ratio of >= 10x, and reaching it sooner < 10x
    tenth = max(1, math.ceil(len(pre_runs[0]["smoothed"]) / ORDER_OF_MAGNITUDE))
    target = target_loss or sum(r["smoothed"][tenth - 1] for r in pre_runs) / len(pre_runs)
    flops_per_step = pre_runs[0]["flops_total"] / max(len(pre_runs[0]["steps"]), 1)
    result_arms = {}
    for label, runs in curves.items():
        measured_runs = [_steps_to_target(c, target, flops_per_step) for c in runs]
        result_arms[label] = {"lr": arms[label].lr, "runs": measured_runs,
                              "eval_loss": mean_interval([c["eval_loss"] for c in runs]).as_dict("nats/token"),
                              "reached": sum(c["reached_at_step"] is not None for c in measured_runs)}
    verdict = convergence_seeds_verdict([c["reached_at_step"] for c in result_arms["pretrained"]["runs"]],
                                        [c["reached_at_step"] for c in result_arms["scratch"]["runs"]], steps)
    ratio = verdict["ratio"]
    results = {"analysis": "convergence", "model": model, "quick": quick, "budget_steps": steps,
               "seeds": [r["seed"] for r in pre_runs],
               "target_loss": q(target, "nats/token", "measured" if not target_loss else "given"),
               "target_rule": "given" if target_loss else "pretrained arm's EMA(0.8) training loss a tenth of the way "
                                                          "through the budget, mean over seeds",
               "flops_per_step": q(flops_per_step, "FLOP", "formula"), "arms": result_arms,
               "step_ratio": ratio.as_dict("ratio", "measured lower bound" if verdict["lower_bound"] else "measured"),
               "start_loss": {k: mean_interval([c["loss"][0] for c in runs]).as_dict("nats/token")
                              for k, runs in curves.items()},
               "wall_seconds": q(time.perf_counter() - started, "s", "measured")}
    out.mkdir(parents=True, exist_ok=True)
    images = [_plot(result_arms, target, out / "convergence.png")]
    section = convergence_section(results, images)
    write_outputs(out, results, section)
    return results


def _steps_to_target(c: dict, target: float, flops_per_step: float) -> dict:
    """One seed's run: the step it reached the target at (measured), or a power-law extrapolation (estimate)."""
    reached = steps_to(c["smoothed"], target)
    half = len(c["steps"]) // 2
    fit = power_law_fit(c["steps"][half:], c["smoothed"][half:]) if reached is None else None
    n = reached if reached is not None else extrapolate(fit, target)
    how = "measured" if reached is not None else "estimate"
    return {**c, "reached_at_step": reached, "fit": fit, "extrapolated_step": n if reached is None else None,
            "steps_to_target": q(n, "step", how),
            "flops_to_target": q(n * flops_per_step if n is not None else None, "FLOP",
                                 "formula" if reached is not None else "estimate")}


def _plot(arms: dict, target: float, path: Path) -> Path:
    fig = figure(10, 4.2)
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    colours = {"pretrained": "#4c72b0", "scratch": "#c44e52"}
    for label, arm in arms.items():
        c = colours.get(label)
        for i, a in enumerate(arm["runs"]):  # one line per seed
            first = i == 0
            for ax, x in ((ax1, a["steps"]), (ax2, a["flops"])):
                ax.plot(x, a["loss"], color=c, alpha=0.2, linewidth=0.8)
                ax.plot(x, a["smoothed"], color=c, alpha=1.0 if first else 0.5,
                        label=f"{label} (lr {arm['lr']:g}, {len(arm['runs'])} seeds)" if first else None)
            if a["fit"] and a["extrapolated_step"]:
                t0, t1 = a["fit"]["from_step"], min(a["extrapolated_step"], 50 * a["steps"][-1])
                xs = [t0 * (t1 / t0) ** (j / 40) for j in range(41)]
                ax1.plot(xs, [math.exp(a["fit"]["log_a"]) * x ** a["fit"]["b"] for x in xs], color=c, linestyle=":",
                         label=f"{label}: power-law extrapolation (estimate)" if first else None)
    for ax in (ax1, ax2):
        ax.axhline(target, color="grey", linestyle="--", linewidth=0.8, label="target loss")
        ax.set_yscale("log")
        ax.set_ylabel("training loss, nats/token (measured)")
    ax1.set_xscale("log")
    ax1.set_xlabel("optimizer step")
    ax2.set_xscale("log")
    ax2.set_xlabel("training FLOPs (formula)")
    ax1.legend(fontsize=7)
    fig.suptitle("Same architecture, same task: from pretrained vs random weights", fontsize=10)
    return save_figure(fig, path)


ORDER_OF_MAGNITUDE = 10.0


def convergence_verdict(pretrained_steps: int | None, scratch_steps: int | None, budget_steps: int) -> bool | None:
    """Does the pretrained start reach the target in >= 10x fewer steps? Measured step counts only: a power-law
    extrapolation is an estimate and never counts as support.

    Both reached: the measured ratio decides. Only the pretrained arm reached: the scratch arm needs more than
    the budget, a measured lower bound budget / pretrained_steps, which supports the claim when it is >= 10 and
    resolves nothing otherwise (a longer budget would). The pretrained arm did not reach it: not resolved."""
    if pretrained_steps is None:
        return None
    if scratch_steps is not None:
        return scratch_steps / pretrained_steps >= ORDER_OF_MAGNITUDE
    return True if budget_steps / pretrained_steps >= ORDER_OF_MAGNITUDE else None


def convergence_seeds_verdict(pretrained_steps: list, scratch_steps: list, budget_steps: int) -> dict:
    """The same rule over seeds, judged on the 95% interval of the per-seed step ratio scratch / pretrained.

    A seed whose scratch arm did not reach the target contributes its measured lower bound budget / pretrained
    steps; never an extrapolation. Interval above 10: supported (lower bounds included: the true ratios are
    larger still). Interval below 10: not supported only when every ratio was measured; with lower bounds among
    them a longer budget could raise it, so not resolved. Straddling 10, or a pretrained arm that never reached
    the target: not resolved at this budget, with the note saying what would resolve it."""
    if not pretrained_steps or any(p is None for p in pretrained_steps):
        missing = [i for i, p in enumerate(pretrained_steps) if p is None]
        return {"supported": None, "unresolved": True, "lower_bound": False, "ratio": mean_interval([]),
                "note": f"not resolved at this budget: the pretrained arm did not reach the target in seed(s) "
                        f"{missing or 'none run'}; a lower target or a longer budget would"}
    ratios = [(s if s is not None else budget_steps) / p for p, s in zip(pretrained_steps, scratch_steps)]
    lower_bound = any(s is None for s in scratch_steps)
    interval = mean_interval(ratios)
    j = judge(interval, ORDER_OF_MAGNITUDE, claim_below=False)
    supported, note = j.supported, j.note
    if supported is False and lower_bound:
        longest = max(pretrained_steps)
        supported, note = None, (f"not resolved at this budget: the scratch arm did not reach the target within "
                                 f"{budget_steps} steps in some seeds, so those ratios are lower bounds; a budget of "
                                 f"at least {int(ORDER_OF_MAGNITUDE * longest)} steps would resolve it")
    return {"supported": supported, "unresolved": supported is None, "lower_bound": lower_bound, "ratio": interval,
            "note": note}


def _steps_text(a: dict) -> str:
    if a["reached_at_step"] is not None:
        return f"{a['reached_at_step']} (measured)"
    if a["extrapolated_step"] is not None:
        f = a["fit"]
        return (f"not reached in {len(a['steps'])}; power-law fit on steps {f['from_step']}-{f['to_step']} "
                f"(R^2 {f['r2']:.2f}) extrapolates ~{a['extrapolated_step']:.3g} (estimate)")
    return f"not reached in {len(a['steps'])}, loss not falling: no extrapolation"


def convergence_section(results: dict, images: list[Path]):
    arms = results["arms"]
    pre, scr = arms["pretrained"], arms["scratch"]
    target = results["target_loss"]["value"]
    budget = results["budget_steps"]
    verdict = convergence_seeds_verdict([a["reached_at_step"] for a in pre["runs"]],
                                        [a["reached_at_step"] for a in scr["runs"]], budget)
    per_seed = "; ".join(f"seed {p.get('seed', i)}: pretrained {_steps_text(p)}, random {_steps_text(s)}"
                         for i, (p, s) in enumerate(zip(pre["runs"], scr["runs"])))
    ratio = verdict["ratio"]
    measured = (f"steps to reach {target:.3g} nats/token, per seed: {per_seed}. Ratio random / pretrained "
                + (f"{ratio.text(3)}" if ratio.n else "not measured")
                + (" (measured lower bounds where random did not reach it; extrapolations never enter)"
                   if verdict["lower_bound"] else " (measured)"))
    supported = verdict["supported"]
    verdicts = [Verdict("Starting from pretrained weights reaches a given task loss in far fewer steps "
                        "(an order of magnitude or more) than starting from random weights.", measured, supported,
                        "same architecture, data order and FLOPs per step; judged on the 95% interval over seeds of "
                        f"the per-seed step ratio against {ORDER_OF_MAGNITUDE:.0f}x, on measured steps only (a "
                        "scratch arm that did not finish counts as its measured lower bound, budget / pretrained "
                        "steps), never on an extrapolation" + (f". {verdict['note']}" if verdict["note"] else ""),
                        anchor("convergence", supported), unresolved=verdict["unresolved"])]
    rows = [[label, a["runs"][i].get("seed", i), f"{a['lr']:g}", fmt(a["runs"][i]["loss"][0]),
             fmt(a["runs"][i]["smoothed"][-1]), fmt(a["runs"][i]["eval_loss"]), _steps_text(a["runs"][i]),
             fmt(a["runs"][i]["flops_to_target"]["value"]) + f" ({a['runs'][i]['flops_to_target']['how']})"]
            for label, a in arms.items() for i in range(len(a["runs"]))]
    quick = " (quick: both arms are random tiny models; the code path only)" if results["quick"] else ""
    body = "\n".join([
        f"Model `{results['model']}`{quick}, "
        f"full fine-tuning on the support task for {budget} steps, constant learning rate after "
        f"warm-up, same batches in the same order for the same seed, {len(pre['runs'])} seed(s) per arm. FLOPs "
        f"per step {results['flops_per_step']['value']:.3g} (formula) for both arms. Target: {results['target_rule']} "
        f"= {target:.4g} nats/token.",
        "",
        md_table(["arm", "seed", "lr", "first-step loss", "final smoothed loss", "held-out loss", "steps to target",
                  "FLOPs to target"], rows),
        "",
        "An extrapolated step count assumes the random arm keeps following the power law it showed late in the "
        "budget; real curves bend (plateaus, then drops as structure is found), so read it as an order of magnitude.",
    ])
    return Section(title="Convergence: pretrained vs random start", verdicts=verdicts, body_markdown=body,
                   images=images, order=ORDER["convergence"])


__all__ = ["analyze_convergence", "convergence_verdict", "convergence_seeds_verdict", "power_law_fit", "extrapolate",
           "steps_to"]
