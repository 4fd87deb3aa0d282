"""Forgetting: how far a fine-tune moved the model away from what it did before, on things unrelated to the task.

Two measurements, both on sets the project ships (`tunegap.data.support`):
  * drift: KL(p_base || p_tuned) of the next-token distributions, in nats per token, over the base model's own
    greedy replies to 40 general prompts. Scoring the base's replies asks "how much less would the tuned model
    say what the base model said?", the quantity RLHF's KL penalty keeps small (Ouyang et al. 2022, Eq. 2);
    prompt tokens are not scored (the chat template's system text is the same in every prompt).
  * capability: greedy answers to 40 easy questions, right when an accepted answer appears; reported with the
    base model's score and the share of the base's right answers the tuned model keeps.

`measure_forgetting(base, tuned, tokenizer)` (`tunegap.forgetting`) is the reusable piece; the trainer's
forgetting callback runs it after a fine-tune of real pretrained weights (`--forgetting auto|on|off`),
which writes `forgetting_kl` and `general_accuracy` into the ledger's metrics.

`tunegap analyze forgetting` compares full fine-tuning, LoRA at several ranks and freezing at equal task
quality: each run's update is scaled, W_base + a * dW (weight-space interpolation, WiSE-FT, Wortsman et al.
2022), until its held-out task loss equals the worst method's final loss, and forgetting is measured there.
"""

from __future__ import annotations

import contextlib
import copy
import time
from dataclasses import replace
from pathlib import Path

from ..config import TrainConfig
from ..data.sources import prepare
from ..methods import make_method
from ..objectives import Context, heldout_loss
from ..forgetting import (autocast_for, base_reference, forgetting_after_training, has_real_weights, measure_forgetting,
                          reply_kl)
from ..literature import anchor
from ..report import Section, Verdict
from ..stats import Interval, Judgement, judge, mean_interval, paired_differences
from .common import (ORDER, QUICK_MODEL, AnalysisError, check_seeds, figure, fmt, interpolate_, interval_cell, load_base,
                     md_table, q, quick_aware, run_seeds, save_figure, tuned_model, weight_delta, write_outputs)

ALPHAS = (0.5, 1.0)  # then secant steps to the equal-quality point: every held-out loss costs a pass over the set


def method_configs(base, ranks: list[int], full_lr: float, freeze_lr: float) -> dict:
    """The arms: full fine-tuning, LoRA at each rank (alpha = 2r: the update scale alpha/r stays 2), freezing."""
    arms = {"full": replace(base, method="full", lr=full_lr)}
    for r in ranks:
        arms[f"lora-r{r}"] = replace(base, method="lora", rank=r, alpha=2.0 * r)
    arms["freeze"] = replace(base, method="freeze", lr=freeze_lr)
    return arms


def base_train_config(*, model: str, steps: int, runs_dir: str, quick: bool, seed: int = 0, progress: bool = True):
    """The settings every support-task run of the sweep and the forgetting analysis shares, so that runs of the
    same arm (same method, rank, lr and steps) are trained once and reused by both."""
    if quick:
        return TrainConfig(model=model, data="support", seq_len=512, batch_size=4, max_steps=steps,
                           train_examples=32, eval_examples=4, generate_examples=1, runs_dir=runs_dir, lr=1e-3,
                           task_metrics="on", forgetting="on",
                           precision="fp32", progress=False, seed=seed, keep_checkpoints=1, threads=1)
    return TrainConfig(model=model, data="support", seq_len=128, batch_size=8, max_steps=steps, eval_examples=32,
                       generate_examples=16, runs_dir=runs_dir, seed=seed, progress=progress, keep_checkpoints=1,
                       task_metrics="on", forgetting="on")  # the analyses read both from every run


def eval_loss_of(model, tokenizer, examples, batch_size: int, seq_len: int, autocast=contextlib.nullcontext) -> float:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ctx = Context(model, model, make_method("full"), pad, autocast)
    return heldout_loss(ctx, examples, batch_size, seq_len)


def crossing(points: list[tuple[float, float]], target: float) -> float | None:
    """Along the (x, loss) polyline in its order, the x where the loss first falls to `target`, linearly
    interpolated (x: the interpolation weight here, a forgetting measure in `analyze plane`); None if it never does."""
    for (a0, l0), (a1, l1) in zip(points, points[1:]):
        if l0 >= target >= l1 and l0 != l1:
            return a0 + (a1 - a0) * (l0 - target) / (l0 - l1)
        if l1 == target:
            return a1
    return None


@quick_aware
def analyze_forgetting(*, out: str | Path, model: str = "smollm2-135m", steps: int = 16, ranks=(4, 64),
                       full_lr: float = 5e-5, freeze_lr: float = 1e-4, seeds: int = 3, runs_dir: str = "runs",
                       quick: bool = False, progress: bool = True) -> dict:
    """Train (or reuse) full, LoRA and freeze runs for each seed; compare their forgetting at equal held-out task
    loss, seed by seed (each seed's runs matched at that seed's worst final loss), with 95% intervals."""
    out = Path(out)
    started = time.perf_counter()
    seeds = check_seeds(seeds)
    if quick:
        model, steps, ranks = QUICK_MODEL, min(steps, 3), (1, 2)  # the quick sweep's runs, reused
        full_lr = freeze_lr = 1e-3
    base_cfg = base_train_config(model=model, steps=steps, runs_dir=runs_dir, quick=quick, progress=progress)
    arms = method_configs(base_cfg, list(ranks), full_lr, freeze_lr)
    runs = {label: run_seeds(cfg, f"support-{label}", seeds) for label, cfg in arms.items()}
    per_seed, shared = [], None
    for i in range(seeds):
        seed_cfg = replace(base_cfg, seed=base_cfg.seed + i)
        if shared is None or not has_real_weights(base_cfg):  # a random preset's base follows the seed
            shared = _base_and_reference(seed_cfg, quick)
        per_seed.append(_one_seed({label: r[i] for label, r in runs.items()}, seed_cfg, *shared))
    first = per_seed[0]
    per_arm = {label: {**arm, "seeds": [s["arms"][label]["summary"] for s in per_seed],
                       "intervals": _intervals([s["arms"][label]["summary"] for s in per_seed])}
               for label, arm in first["arms"].items()}
    for arm in per_arm.values():
        arm.pop("summary")
    results = {
        "analysis": "forgetting", "model": model, "quick": quick, "steps": steps, "seeds": seeds,
        "settings": {"full_lr": full_lr, "freeze_lr": freeze_lr, "lora_lr": base_cfg.lr, "ranks": list(ranks),
                     "alphas": list(ALPHAS), "lora_alpha": "2r"},
        "base": {"eval_loss": q(first["base_loss"], "nats/token", "measured"),
                 "general_accuracy": q(first["base_accuracy"], "fraction", "measured")},
        "target_eval_loss": q(first["target"], "nats/token", "measured"),  # the first seed's (its arms' paths)
        "target_eval_loss_seeds": mean_interval(s["target"] for s in per_seed).as_dict("nats/token"),
        "arms": per_arm,
        "wall_seconds": q(time.perf_counter() - started, "s", "measured"),
    }
    out.mkdir(parents=True, exist_ok=True)
    images = [_plot_path(per_arm, first["base_loss"], first["target"], out / "forgetting_vs_quality.png"),
              _plot_bars(per_arm, out / "forgetting_at_equal_quality.png")]
    section = forgetting_section(results, images)
    write_outputs(out, results, section)
    return results


def _base_and_reference(config, quick: bool) -> tuple:
    """The base model a seed's runs started from, its held-out examples and what it says (`base_reference`)."""
    base, tokenizer = load_base(config.to_dict())
    base.eval()
    autocast = autocast_for(config.precision)
    kw = dict(reply_tokens=24, answer_tokens=24, autocast=autocast)
    if quick:  # a random 2-layer model: a handful of prompts and questions exercise the same code
        from ..data.support import general_prompts, general_questions

        kw.update(prompts=general_prompts()[:6], questions=general_questions()[:6], reply_tokens=8, answer_tokens=8)
    reference = base_reference(base, tokenizer, **kw)
    kw.pop("reply_tokens")
    return base, tokenizer, prepare(config, tokenizer).eval, reference, kw


def _one_seed(runs: dict, config, base, tokenizer, examples, reference, kw) -> dict:
    """One seed's arms: each run's update scaled along W_base + a * dW, matched at the seed's worst final loss."""
    import torch

    base_sd = {k: v.clone() for k, v in base.state_dict().items()}

    def loss_at(model_) -> float:
        return eval_loss_of(model_, tokenizer, examples, config.batch_size, config.seq_len, kw["autocast"])

    base_loss = loss_at(base)
    work = copy.deepcopy(base)

    per_arm, deltas = {}, {}
    for label, (folder, ledger) in runs.items():
        tuned, _ = tuned_model(folder, ledger["config"])
        deltas[label] = weight_delta(base, tuned)
        del tuned
        path = [(0.0, base_loss)]
        for a in ALPHAS:
            interpolate_(work, base_sd, deltas[label], a)
            path.append((a, loss_at(work)))
        final = measure_forgetting(base, work, tokenizer, reference=reference, **kw)  # work is at alpha = 1
        per_arm[label] = {"run": str(folder), "method": ledger["config"]["method"],
                          "rank": ledger["config"]["rank"] if ledger["config"]["method"] == "lora" else None,
                          "params_trainable": ledger["costs"]["params_trainable"]["value"],
                          "update_norm": float(torch.sqrt(sum((d.double() ** 2).sum()
                                                              for d in deltas[label].values()))),
                          "alpha_path": path, "final": final}

    target = max(arm["alpha_path"][-1][1] for arm in per_arm.values())  # the worst method's final quality
    for label, arm in per_arm.items():
        points = sorted(arm["alpha_path"])
        alpha = crossing(points, target)
        loss = None
        for attempt in range(3):  # measure there; refine by secant while more than 1% off the target loss
            if alpha is None:
                break
            interpolate_(work, base_sd, deltas[label], alpha)
            loss = loss_at(work)
            if abs(loss - target) <= 0.01 * target or attempt == 2:
                break
            points = sorted(points + [(alpha, loss)])
            better = crossing(points, target)
            if better is None:
                break
            alpha = better
        arm["alpha_path"] = points
        arm["matched_alpha"] = alpha
        arm["matched"] = None if alpha is None else {
            "eval_loss": loss, **measure_forgetting(base, work, tokenizer, reference=reference, **kw)}
        matched = arm["matched"] or {}
        arm["summary"] = {"seed": config.seed, "run": arm["run"], "final_eval_loss": arm["alpha_path"][-1][1],
                          "final_kl": final["forgetting_kl"], "matched_kl": matched.get("forgetting_kl"),
                          "matched_retained": matched.get("general_retained")}
    del deltas
    return {"arms": per_arm, "base_loss": base_loss, "target": target,
            "base_accuracy": _mean(reference["base_right"])}


SEED_UNITS = {"final_eval_loss": "nats/token", "final_kl": "nats/token", "matched_kl": "nats/token",
              "matched_retained": "fraction"}


def _intervals(summaries: list[dict]) -> dict:
    """Mean and 95% interval over seeds of each arm's numbers."""
    return {k: mean_interval(s[k] for s in summaries).as_dict(unit) for k, unit in SEED_UNITS.items()}


def paired_forgets_less(arms: dict, label: str, reference: str = "full") -> tuple[Interval, Judgement]:
    """`label`'s KL at equal quality minus `reference`'s, seed by seed (same seed, same data order), against 0."""
    interval = paired_differences([s["matched_kl"] for s in arms[label]["seeds"]],
                                  [s["matched_kl"] for s in arms[reference]["seeds"]])
    return interval, judge(interval, 0.0, claim_below=True)


def combined(judgements: list[Judgement]) -> tuple[bool | None, bool, str]:
    """One verdict over several arms (each LoRA rank): supported when every arm's is, not when none is;
    otherwise None, unresolved when some arm's interval straddles 0 (with its notes)."""
    outcomes = [j.supported for j in judgements]
    if outcomes and all(o is True for o in outcomes):
        return True, False, ""
    if outcomes and all(o is False for o in outcomes):
        return False, False, ""
    notes = "; ".join(j.note for j in judgements if j.note)
    return None, any(o is None for o in outcomes), notes or "the LoRA ranks disagree"


def _mean(values) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None


def _plot_path(arms: dict, base_loss: float, target: float, path: Path) -> Path:
    fig = figure(7.5, 4.5)
    ax = fig.add_subplot(1, 1, 1)
    for label, arm in arms.items():
        pts = [(base_loss, 0.0)]
        if arm.get("matched"):
            pts.append((arm["matched"]["eval_loss"], arm["matched"]["forgetting_kl"]))
        pts.append((arm["alpha_path"][-1][1], arm["final"]["forgetting_kl"]))
        pts.sort(key=lambda p: -p[0])
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    ax.axvline(target, color="grey", linestyle="--", linewidth=0.8, label="equal-quality level")
    ax.invert_xaxis()
    ax.set_xlabel("held-out task loss, nats/token (measured; better to the right)")
    ax.set_ylabel("KL(base ‖ tuned), nats/token (measured)")
    ax.set_title("Forgetting vs task quality along W_base + a*dW (a = 0, matched, 1)", fontsize=10)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def _plot_bars(arms: dict, path: Path) -> Path:
    fig = figure(7.5, 4.0)
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    labels = list(arms)
    kl = [arms[k]["matched"]["forgetting_kl"] if arms[k].get("matched") else float("nan") for k in labels]
    acc = [arms[k]["matched"]["general_retained"] if arms[k].get("matched") and
           arms[k]["matched"]["general_retained"] is not None else float("nan") for k in labels]
    ax1.bar(labels, kl, color="#4c72b0")
    ax1.set_ylabel("KL at equal task loss, nats/token (measured)")
    ax2.bar(labels, acc, color="#55a868")
    ax2.set_ylim(0, 1)
    ax2.set_ylabel("base-right general answers kept (measured)")
    for ax in (ax1, ax2):
        ax.tick_params(axis="x", rotation=45, labelsize=8)
    fig.suptitle("Forgetting at equal task quality", fontsize=10)
    return save_figure(fig, path)


def forgetting_section(results: dict, images: list[Path]):
    arms = results["arms"]
    target = results["target_eval_loss"]["value"]
    rows = []
    for label, arm in arms.items():
        m, f = arm.get("matched") or {}, arm["final"]
        rows.append([label, fmt(arm["params_trainable"]), fmt(arm["alpha_path"][-1][1]), fmt(f["forgetting_kl"]),
                     f"{fmt(f['general_retained'])} ({fmt(f['general_accuracy'])})", fmt(arm["matched_alpha"]),
                     fmt(m.get("eval_loss")), fmt(m.get("forgetting_kl")),
                     f"{fmt(m.get('general_retained'))} ({fmt(m.get('general_accuracy'))})",
                     interval_cell(arm.get("intervals", {}).get("matched_kl"))])
    table = md_table(["arm", "trainable params", "final task loss", "final KL", "final kept (accuracy)",
                      "a at equal quality", "task loss there", "KL there", "kept (accuracy) there",
                      f"KL there, mean [95% CI] over {results.get('seeds', 1)} seeds"], rows)
    loras = [k for k, a in arms.items() if a["method"] == "lora"]
    if "full" in arms and loras:
        pairs = {k: paired_forgets_less(arms, k) for k in loras}
        supported, unresolved, note = combined([j for _, j in pairs.values()])
        measured = "KL at equal task loss, LoRA minus full, seed by seed: " + "; ".join(
            f"{k} {iv.text(unit='nats/token') if iv.n else 'no equal-quality point'}" for k, (iv, _) in pairs.items())
    else:
        supported, unresolved, note = None, False, ""
        measured = "no full fine-tuning or LoRA arm"
    verdicts = [Verdict("LoRA forgets less than full fine-tuning (essay: 'LoRA helps here too').", measured,
                        supported, "equal quality = same held-out task loss, reached by scaling each update"
                        + (f"; {note}" if note else ""), anchor=anchor("lora_forgets_less", supported),
                        unresolved=unresolved)]
    if "full" in arms and "freeze" in arms:
        iv, j = paired_forgets_less(arms, "freeze")
        verdicts.append(Verdict("Freezing most of the network also limits forgetting.",
                                "KL at equal quality, freeze minus full, seed by seed: "
                                + (iv.text(unit="nats/token") if iv.n else "no equal-quality point"),
                                j.supported, j.note, anchor=anchor("freeze_forgets_less", j.supported),
                                unresolved=j.supported is None))
    base_acc = results["base"]["general_accuracy"]["value"]
    quick = ", quick: a random tiny model, numbers exercise the code only" if results["quick"] else ""
    n_prompts = next(iter(arms.values()))["final"]["forgetting_prompts"] if arms else 0
    body = "\n".join([
        f"Every arm trained {results['steps']} steps on the support task through the one training loop "
        f"(model `{results['model']}`{quick}). "
        "Forgetting is KL(base ‖ tuned) of next-token distributions over the base model's own greedy replies to "
        f"{n_prompts} general prompts (nats/token, measured), and "
        f"easy general questions: the base model answers {fmt(base_acc)} of them right, so capability loss is "
        "the share of those the tuned model still gets right (`kept`; raw accuracy in brackets).",
        "",
        "Methods reach different task quality in the same steps, so forgetting is compared at **equal task quality**: "
        "each run's update dW is scaled, W_base + a*dW (WiSE-FT, Wortsman et al. 2022), to the a where its held-out "
        f"task loss equals the worst method's final loss ({target:.4g} nats/token for the first seed; each seed "
        "is matched at its own), and measured there. The scaled model is not a point the optimizer visited; it is "
        "the cheapest way to equalise quality without training every method several times "
        "(`tunegap analyze plane` reads forgetting off real checkpoints instead). Verdicts pair the arms seed by "
        f"seed (same seed, same data order) over {results.get('seeds', 1)} seed(s), with 95% Student-t intervals.",
        "",
        table,
    ])
    return Section(title="Forgetting: does LoRA forget less?", verdicts=verdicts, body_markdown=body,
                   images=images, order=ORDER["forgetting"])


__all__ = ["measure_forgetting", "base_reference", "forgetting_after_training", "analyze_forgetting", "reply_kl",
           "paired_forgets_less", "has_real_weights", "method_configs", "base_train_config", "AnalysisError"]
