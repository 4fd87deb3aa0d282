"""`tunegap analyze convergence`: the same architecture trained on the same task from random and pretrained weights.

The essay's third reason: optimisation from a pretrained checkpoint starts in a good basin and gets somewhere in
a fraction of the steps. Both arms are full fine-tunes through the one loop, same data order, same steps, so
FLOPs per step are equal (formula) and loss-vs-FLOPs is loss-vs-steps rescaled. Each arm gets its customary
learning rate (pretrained: small, as fine-tuning; random: the pretraining default), which is generous to the
random start.

Target: by default the loss the pretrained arm reaches at the end of the budget (EMA-smoothed training loss).
Steps to reach it are measured when reached; otherwise a power law L(t) = a * t^b fitted to the second half of
the random arm's smoothed curve is extrapolated to the target and reported as an estimate, never as measured.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace
from pathlib import Path

from ..literature import anchor
from .common import (ORDER, QUICK_MODEL, ema, figure, fmt, md_table, q, quick_aware, run_or_reuse, save_figure,
                     train_curve, write_outputs)
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
                        lr_scratch: float = 1e-3, target_loss: float = 0.0, runs_dir: str = "runs",
                        quick: bool = False, progress: bool = True) -> dict:
    started = time.perf_counter()
    out = Path(out)
    if quick:
        model, steps = QUICK_MODEL, min(steps, 6)
    base = replace(base_train_config(model=model, steps=steps, runs_dir=runs_dir, quick=quick, progress=progress),
                   generate_examples=0)
    # constant after warm-up: a cosine decay to zero would flatten the end of the curve we extrapolate from
    arms = {"pretrained": replace(base, method="full", init="pretrained", lr=lr_pretrained, schedule="constant"),
            "scratch": replace(base, method="full", init="scratch", lr=lr_scratch, schedule="constant")}
    if quick:  # a random preset is random either way; the seed differs so "pretrained" is another draw
        arms["pretrained"] = replace(arms["pretrained"], lr=1e-3)
    curves = {}
    for label, cfg in arms.items():
        folder, ledger = run_or_reuse(cfg, f"converge-{label}")
        rows = train_curve(folder)
        losses = [r["loss"] for r in rows]
        curves[label] = {"run": str(folder), "lr": cfg.lr, "steps": [r["step"] for r in rows], "loss": losses,
                         "smoothed": ema(losses), "flops": [r["flops"] for r in rows],
                         "eval_loss": ledger.get("metrics", {}).get("eval_loss"),
                         "flops_total": ledger["costs"]["flops_total"]["value"],
                         "train_time_s": ledger["costs"]["train_time_s"]["value"]}
    pre = curves["pretrained"]
    # default target: where the pretrained arm stands a tenth of the way in, so that the scratch arm failing to
    # reach it in the whole budget is a measured ratio of >= 10x, and reaching it sooner is a measured < 10x
    tenth = max(1, math.ceil(len(pre["smoothed"]) / ORDER_OF_MAGNITUDE))
    target = target_loss or pre["smoothed"][tenth - 1]
    flops_per_step = pre["flops_total"] / max(len(pre["steps"]), 1)
    result_arms = {}
    for label, c in curves.items():
        reached = steps_to(c["smoothed"], target)
        half = len(c["steps"]) // 2
        fit = power_law_fit(c["steps"][half:], c["smoothed"][half:]) if reached is None else None
        n = reached if reached is not None else extrapolate(fit, target)
        how = "measured" if reached is not None else "estimate"
        result_arms[label] = {**c, "reached_at_step": reached, "fit": fit,
                              "extrapolated_step": n if reached is None else None,
                              "steps_to_target": q(n, "step", how),
                              "flops_to_target": q(n * flops_per_step if n is not None else None, "FLOP",
                                                   "formula" if reached is not None else "estimate")}
    p_steps = result_arms["pretrained"]["steps_to_target"]["value"]
    s_steps = result_arms["scratch"]["steps_to_target"]["value"]
    both = result_arms["scratch"]["reached_at_step"] and result_arms["pretrained"]["reached_at_step"]
    ratio_how = "measured" if both else "estimate"
    results = {"analysis": "convergence", "model": model, "quick": quick, "budget_steps": steps,
               "target_loss": q(target, "nats/token", "measured" if not target_loss else "given"),
               "target_rule": "given" if target_loss else "pretrained arm's EMA(0.8) training loss a tenth of the way "
                                                          "through the budget",
               "flops_per_step": q(flops_per_step, "FLOP", "formula"), "arms": result_arms,
               "step_ratio": q(s_steps / p_steps if s_steps and p_steps else None, "ratio", ratio_how),
               "start_loss": {k: q(c["loss"][0], "nats/token", "measured") for k, c in curves.items()},
               "wall_seconds": q(time.perf_counter() - started, "s", "measured")}
    out.mkdir(parents=True, exist_ok=True)
    images = [_plot(result_arms, target, out / "convergence.png")]
    section = convergence_section(results, images)
    results["verdicts"] = [v.__dict__ for v in section.verdicts]
    write_outputs(out, results, section)
    return results


def _plot(arms: dict, target: float, path: Path) -> Path:
    fig = figure(10, 4.2)
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    colours = {"pretrained": "#4c72b0", "scratch": "#c44e52"}
    for label, a in arms.items():
        c = colours.get(label)
        for ax, x in ((ax1, a["steps"]), (ax2, a["flops"])):
            ax.plot(x, a["loss"], color=c, alpha=0.3, linewidth=0.8)
            ax.plot(x, a["smoothed"], color=c, label=f"{label} (lr {a['lr']:g})")
        if a["fit"] and a["extrapolated_step"]:
            t0, t1 = a["fit"]["from_step"], min(a["extrapolated_step"], 50 * a["steps"][-1])
            xs = [t0 * (t1 / t0) ** (i / 40) for i in range(41)]
            ax1.plot(xs, [math.exp(a["fit"]["log_a"]) * x ** a["fit"]["b"] for x in xs], color=c, linestyle=":",
                     label=f"{label}: power-law extrapolation (estimate)")
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


def convergence_section(results: dict, images: list[Path]):
    from ..report import Section, Verdict

    arms = results["arms"]
    pre, scr = arms["pretrained"], arms["scratch"]
    target = results["target_loss"]["value"]

    def steps_text(a) -> str:
        if a["reached_at_step"] is not None:
            return f"{a['reached_at_step']} steps (measured)"
        if a["extrapolated_step"] is not None:
            f = a["fit"]
            return (f"not reached within {len(a['steps'])} steps; power-law fit on steps {f['from_step']}-"
                    f"{f['to_step']} (R^2 {f['r2']:.2f}) extrapolates ~{a['extrapolated_step']:.3g} steps (estimate)")
        return f"not reached within {len(a['steps'])} steps, and the loss is not falling: no extrapolation"

    ratio = results["step_ratio"]
    if ratio["value"] is not None:
        measured = (f"to reach {target:.3g} nats/token: pretrained {steps_text(pre)}; random {steps_text(scr)}; "
                    f"ratio ~{ratio['value']:.3g}x ({ratio['how']})")
    else:
        measured = f"to reach {target:.3g} nats/token: pretrained {steps_text(pre)}; random {steps_text(scr)}"
    supported = convergence_verdict(pre["reached_at_step"], scr["reached_at_step"], results["budget_steps"])
    verdicts = [Verdict("Starting from pretrained weights reaches a given task loss in far fewer steps "
                        "(an order of magnitude or more) than starting from random weights.", measured, supported,
                        "same architecture, data order and FLOPs per step; supported on measured steps only (a ratio "
                        ">= 10, or a budget >= 10x the pretrained arm's steps that scratch did not finish), never on "
                        "an extrapolation",
                        anchor("convergence", supported))]
    rows = [[label, f"{a['lr']:g}", fmt(results["start_loss"][label]["value"]), fmt(a["smoothed"][-1]),
             fmt(a["eval_loss"]), steps_text(a),
             fmt(a["flops_to_target"]["value"]) + f" ({a['flops_to_target']['how']})"] for label, a in arms.items()]
    quick = " (quick: both arms are random tiny models; the code path only)" if results["quick"] else ""
    body = "\n".join([
        f"Model `{results['model']}`{quick}, "
        f"full fine-tuning on the support task for {results['budget_steps']} steps, constant learning rate after "
        f"warm-up, same batches in the same order. FLOPs per step {results['flops_per_step']['value']:.3g} (formula) "
        f"for both arms. Target: {results['target_rule']} = {target:.4g} nats/token.",
        "",
        md_table(["arm", "lr", "first-step loss", "final smoothed loss", "held-out loss", "steps to target",
                  "FLOPs to target"], rows),
        "",
        "An extrapolated step count assumes the random arm keeps following the power law it showed late in the "
        "budget; real curves bend (plateaus, then drops as structure is found), so read it as an order of magnitude.",
    ])
    return Section(title="Convergence: pretrained vs random start", verdicts=verdicts, body_markdown=body,
                   images=images, order=ORDER["convergence"])


__all__ = ["analyze_convergence", "convergence_verdict", "power_law_fit", "extrapolate", "steps_to"]
