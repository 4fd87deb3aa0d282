"""Forgetting: how far a fine-tune moved the model away from what it did before, on things unrelated to the task.

Two measurements, both on sets the project ships (`tunegap.data.support`):
  * drift: KL(p_base || p_tuned) of the next-token distributions, in nats per token, over the base model's own
    greedy replies to 40 general prompts. Scoring the base's replies asks "how much less would the tuned model
    say what the base model said?", the quantity RLHF's KL penalty keeps small (Ouyang et al. 2022, Eq. 2);
    prompt tokens are not scored (the chat template's system text is the same in every prompt).
  * capability: greedy answers to 40 easy questions, right when an accepted answer appears; reported with the
    base model's score and the share of the base's right answers the tuned model keeps.

`measure_forgetting(base, tuned, tokenizer)` is the reusable piece; the training loop calls
`forgetting_after_training` after every fine-tune of real pretrained weights (`--forgetting`, on by default),
which writes `forgetting_kl` and `general_accuracy` into the ledger's metrics.

`tunegap analyze forgetting` compares full fine-tuning, LoRA at several ranks and freezing at equal task
quality: each run's update is scaled, W_base + a * dW (weight-space interpolation, WiSE-FT, Wortsman et al.
2022), until its held-out task loss equals the worst method's final loss, and forgetting is measured there.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import replace
from pathlib import Path

from .common import (ORDER, QUICK_MODEL, AnalysisError, figure, fmt, interpolate_, load_base, md_table, q,
                     quick_aware, run_or_reuse, save_figure, tuned_model, weight_delta, write_outputs)

ALPHAS = (0.5, 1.0)  # then secant steps to the equal-quality point: every held-out loss costs a pass over the set


# --------------------------------------------------------------------------- the measurement

def _replies(base, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 16,
             autocast=contextlib.nullcontext) -> list[tuple[list[int], int]]:
    """Base model's greedy reply to each prompt: (prompt + reply token ids, index of the first reply token)."""
    import torch

    from ..data.render import tokenize_prompt

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    encoded = [tokenize_prompt(tokenizer, [{"role": "user", "content": p}]) for p in prompts]
    out: list[tuple[list[int], int]] = []
    with torch.no_grad(), autocast():
        for i in range(0, len(encoded), batch_size):
            chunk = encoded[i:i + batch_size]
            width = max(len(p) for p in chunk)
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
            gen = base.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
            for prompt, row in zip(chunk, gen[:, width:].tolist()):
                reply = []
                for t in row:
                    reply.append(t)
                    if t == tokenizer.eos_token_id:
                        break
                out.append((prompt + reply, len(prompt)))
    return out


def _logprobs(model, sequences: list[list[int]], pad: int, autocast=contextlib.nullcontext):
    """Log-softmax of the model's logits for right-padded sequences, in fp32: [batch, time, vocab]."""
    import torch

    width = max(len(s) for s in sequences)
    ids = torch.tensor([s + [pad] * (width - len(s)) for s in sequences])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences])
    with autocast():
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, -width:]  # prompt tuning prepends
    return torch.log_softmax(logits.float(), dim=-1)


def reply_kl(base, tuned, sequences: list[tuple[list[int], int]], pad: int, batch_size: int = 8,
             autocast=contextlib.nullcontext) -> list[tuple[float, int]]:
    """Per sequence: (sum over reply positions of KL(p_base || p_tuned) in nats, positions scored).

    Position t-1 predicts token t; the positions scored are those predicting the reply's tokens. Under bf16
    autocast both models round the same way, so a model compared with itself still gives exactly 0.
    """
    import torch

    results = []
    with torch.no_grad():
        for i in range(0, len(sequences), batch_size):
            chunk = sequences[i:i + batch_size]
            lp_base = _logprobs(base, [s for s, _ in chunk], pad, autocast)
            lp_tuned = _logprobs(tuned, [s for s, _ in chunk], pad, autocast)
            kl = (lp_base.exp() * (lp_base - lp_tuned)).sum(-1)  # [batch, time]
            for row, (seq, start) in enumerate(chunk):
                positions = slice(max(start - 1, 0), len(seq) - 1)
                values = kl[row, positions]
                results.append((float(values.sum()), int(values.numel())))
    return results


def answers_correct(model, tokenizer, questions: list[dict], max_new_tokens: int = 24,
                    autocast=contextlib.nullcontext) -> list[bool]:
    from ..data.support import answer_matches
    from ..evaluate import generate

    texts = generate(model, tokenizer, [[{"role": "user", "content": item["question"]}] for item in questions],
                     max_new_tokens=max_new_tokens, autocast=autocast)[0]
    return [answer_matches(item, text) for item, text in zip(questions, texts)]


def measure_forgetting(base, tuned, tokenizer, *, prompts: list[str] | None = None,
                       questions: list[dict] | None = None, reply_tokens: int = 24, answer_tokens: int = 24,
                       reference: dict | None = None, autocast=contextlib.nullcontext) -> dict:
    """Drift (KL, nats/token) and capability (general-question accuracy) of `tuned` relative to `base`.

    `reference` (from `base_reference`) saves regenerating the base model's replies and answers when the same
    base is compared with several tuned models. Both models must share the tokenizer.
    """
    from ..data.support import general_prompts, general_questions

    started = time.perf_counter()
    prompts = general_prompts() if prompts is None else prompts
    questions = general_questions() if questions is None else questions
    reference = reference or base_reference(base, tokenizer, prompts=prompts, questions=questions,
                                            reply_tokens=reply_tokens, answer_tokens=answer_tokens, autocast=autocast)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    states = [(m, m.training) for m in (base, tuned)]
    for m, _ in states:
        m.eval()
    try:
        per_prompt = reply_kl(base, tuned, reference["sequences"], pad, autocast=autocast)
        tuned_right = answers_correct(tuned, tokenizer, questions, answer_tokens, autocast) if questions else []
    finally:
        for m, was in states:
            m.train(was)
    total = sum(s for s, _ in per_prompt)
    count = sum(n for _, n in per_prompt)
    base_right = reference["base_right"]
    kept = [t for b, t in zip(base_right, tuned_right) if b]
    return {
        "forgetting_kl": total / max(count, 1),
        "forgetting_kl_max_prompt": max((s / n for s, n in per_prompt if n), default=0.0),
        "forgetting_kl_tokens": count,
        "general_accuracy": sum(tuned_right) / len(tuned_right) if tuned_right else None,
        "general_accuracy_base": sum(base_right) / len(base_right) if base_right else None,
        "general_retained": sum(kept) / len(kept) if kept else None,
        "general_questions": len(questions),
        "forgetting_prompts": len(prompts),
        "forgetting_seconds": time.perf_counter() - started,
    }


def base_reference(base, tokenizer, *, prompts: list[str] | None = None, questions: list[dict] | None = None,
                   reply_tokens: int = 24, answer_tokens: int = 24, autocast=contextlib.nullcontext) -> dict:
    """What the base model says (its greedy replies) and which general questions it gets right."""
    from ..data.support import general_prompts, general_questions

    prompts = general_prompts() if prompts is None else prompts
    questions = general_questions() if questions is None else questions
    was = base.training
    base.eval()
    try:
        sequences = _replies(base, tokenizer, prompts, reply_tokens, autocast=autocast)
        right = answers_correct(base, tokenizer, questions, answer_tokens, autocast) if questions else []
    finally:
        base.train(was)
    return {"sequences": sequences, "base_right": right}


def has_real_weights(config) -> bool:
    """Forgetting means something only for pretrained weights: not scratch runs, not the random presets."""
    from ..models import ARCH_PRESETS, TINY_PRESETS

    return config.init == "pretrained" and config.model not in TINY_PRESETS and config.model not in ARCH_PRESETS


def forgetting_after_training(config, model, tokenizer, data_kind: str) -> dict:
    """The training loop's hook: measure forgetting of a finished SFT fine-tune of real weights (else {}).

    Runs after the weights are saved; a failure is recorded as `forgetting_error` in the ledger rather than
    losing the finished run.
    """
    if not getattr(config, "forgetting", True) or data_kind != "sft" or not has_real_weights(config):
        return {}
    from ..models import load_model

    try:
        base, _ = load_model(config.model, init=config.init, seed=config.seed)
        precision = _precision(config.precision)
        autocast = _autocast(precision)
        reference = cached_base_reference(config.model, base, tokenizer, precision=precision)
        result = measure_forgetting(base, model, tokenizer, autocast=autocast, reference=reference)
    except (RuntimeError, ValueError, OSError) as err:
        return {"forgetting_error": str(err).splitlines()[0] if str(err) else type(err).__name__}
    print(f"tunegap: forgetting: KL(base‖tuned) {result['forgetting_kl']:.4g} nats/token on "
          f"{result['forgetting_prompts']} general prompts; general questions the base model answers right "
          f"still right: {_pct(result['general_retained'])} (accuracy {_pct(result['general_accuracy'])}, "
          f"base {_pct(result['general_accuracy_base'])}) (measured, {result['forgetting_seconds']:.0f} s)",
          flush=True)
    return result


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.0f}%"


def cached_base_reference(model_name: str, base, tokenizer, *, precision: str = "fp32", reply_tokens: int = 24,
                          answer_tokens: int = 24) -> dict:
    """`base_reference` for the shipped prompts and questions, kept on disk per base model.

    The base model's replies and answers do not change between fine-tunes of it, and generating them is
    two thirds of the measurement; the key covers the weights files (path, size, mtime), the sets and the
    precision, so a changed model or set is measured afresh.
    """
    import hashlib
    import json

    from ..data.support import general_prompts, general_questions
    from ..io import atomic_write_json
    from ..models import DEFAULT_MODEL, cache_dir, default_model_folder

    folder = default_model_folder() if model_name == DEFAULT_MODEL else Path(model_name)
    weights = sorted((str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in folder.glob("*.safetensors"))
    prompts, questions = general_prompts(), general_questions()
    key = hashlib.sha256(json.dumps([weights, prompts, questions, reply_tokens, answer_tokens,
                                     precision]).encode()).hexdigest()[:16]
    path = cache_dir() / "forgetting" / f"{key}.json"
    if path.is_file():
        try:
            data = json.loads(path.read_text())
            return {"sequences": [(list(s), int(start)) for s, start in data["sequences"]],
                    "base_right": [bool(x) for x in data["base_right"]]}
        except (ValueError, KeyError, TypeError):
            pass  # a damaged cache file is measured afresh
    reference = base_reference(base, tokenizer, prompts=prompts, questions=questions, reply_tokens=reply_tokens,
                               answer_tokens=answer_tokens, autocast=_autocast(precision))
    atomic_write_json(path, reference)
    return reference


# --------------------------------------------------------------------------- the analysis

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
    from ..config import TrainConfig

    if quick:
        return TrainConfig(model=model, data="support", seq_len=512, batch_size=4, max_steps=steps,
                           train_examples=32, eval_examples=4, generate_examples=1, runs_dir=runs_dir, lr=1e-3,
                           precision="fp32", progress=False, seed=seed, keep_checkpoints=1, threads=1)
    return TrainConfig(model=model, data="support", seq_len=128, batch_size=8, max_steps=steps, eval_examples=32,
                       generate_examples=16, runs_dir=runs_dir, seed=seed, progress=progress, keep_checkpoints=1)


def _precision(precision: str) -> str:
    """The training loop's choice: bf16 only where this CPU's measured bf16 matmul is faster."""
    if precision == "auto":
        from ..costs.hardware import measure_peaks

        return measure_peaks().best_precision
    return precision


def _autocast(precision: str):
    from ..train import autocast_factory

    return autocast_factory(_precision(precision))


def _eval_loss(model, tokenizer, examples, batch_size: int, seq_len: int, autocast=contextlib.nullcontext) -> float:
    from ..methods import make_method
    from ..train import Context, heldout_loss

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ctx = Context(model, model, make_method("full"), pad, autocast)
    return heldout_loss(ctx, examples, batch_size, seq_len)


def _crossing(points: list[tuple[float, float]], target: float) -> float | None:
    """Smallest alpha where the (alpha, loss) polyline first reaches `target` (loss falling), linearly interpolated."""
    for (a0, l0), (a1, l1) in zip(points, points[1:]):
        if l0 >= target >= l1 and l0 != l1:
            return a0 + (a1 - a0) * (l0 - target) / (l0 - l1)
        if l1 == target:
            return a1
    return None


@quick_aware
def analyze_forgetting(*, out: str | Path, model: str = "smollm2-135m", steps: int = 16, ranks=(4, 64),
                       full_lr: float = 5e-5, freeze_lr: float = 1e-4, runs_dir: str = "runs", quick: bool = False,
                       progress: bool = True) -> dict:
    """Train (or reuse) full, LoRA and freeze runs; compare their forgetting at equal held-out task loss."""
    import copy

    import torch

    from ..data.sources import prepare

    out = Path(out)
    started = time.perf_counter()
    if quick:
        model, steps, ranks = QUICK_MODEL, min(steps, 3), (1, 2)  # the quick sweep's runs, reused
        full_lr = freeze_lr = 1e-3
    base_cfg = base_train_config(model=model, steps=steps, runs_dir=runs_dir, quick=quick, progress=progress)
    arms = method_configs(base_cfg, list(ranks), full_lr, freeze_lr)
    runs = {label: run_or_reuse(cfg, f"support-{label}") for label, cfg in arms.items()}

    base, tokenizer = load_base(base_cfg.to_dict())
    base.eval()
    base_sd = {k: v.clone() for k, v in base.state_dict().items()}
    examples = prepare(base_cfg, tokenizer).eval
    autocast = _autocast(base_cfg.precision)
    kw = dict(reply_tokens=24, answer_tokens=24, autocast=autocast)
    if quick:  # a random 2-layer model: a handful of prompts and questions exercise the same code
        from ..data.support import general_prompts, general_questions

        kw.update(prompts=general_prompts()[:6], questions=general_questions()[:6], reply_tokens=8, answer_tokens=8)
    reference = base_reference(base, tokenizer, **kw)
    kw.pop("reply_tokens")

    def loss_at(model_) -> float:
        return _eval_loss(model_, tokenizer, examples, base_cfg.batch_size, base_cfg.seq_len, autocast)

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
        alpha = _crossing(points, target)
        loss = None
        for attempt in range(3):  # measure there; refine by secant while more than 1% off the target loss
            if alpha is None:
                break
            interpolate_(work, base_sd, deltas[label], alpha)
            loss = loss_at(work)
            if abs(loss - target) <= 0.01 * target or attempt == 2:
                break
            points = sorted(points + [(alpha, loss)])
            better = _crossing(points, target)
            if better is None:
                break
            alpha = better
        arm["alpha_path"] = points
        arm["matched_alpha"] = alpha
        arm["matched"] = None if alpha is None else {
            "eval_loss": loss, **measure_forgetting(base, work, tokenizer, reference=reference, **kw)}
    del deltas

    results = {
        "analysis": "forgetting", "model": model, "quick": quick, "steps": steps,
        "settings": {"full_lr": full_lr, "freeze_lr": freeze_lr, "lora_lr": base_cfg.lr, "ranks": list(ranks),
                     "alphas": list(ALPHAS), "lora_alpha": "2r"},
        "base": {"eval_loss": q(base_loss, "nats/token", "measured"),
                 "general_accuracy": q(_mean(reference["base_right"]), "fraction", "measured")},
        "target_eval_loss": q(target, "nats/token", "measured"),
        "arms": per_arm,
        "wall_seconds": q(time.perf_counter() - started, "s", "measured"),
    }
    out.mkdir(parents=True, exist_ok=True)
    images = [_plot_path(per_arm, base_loss, target, out / "forgetting_vs_quality.png"),
              _plot_bars(per_arm, out / "forgetting_at_equal_quality.png")]
    section = forgetting_section(results, images)
    results["verdicts"] = [v.__dict__ for v in section.verdicts]
    write_outputs(out, results, section)
    return results


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
    from ..report import Section, Verdict

    arms = results["arms"]
    target = results["target_eval_loss"]["value"]
    rows = []
    for label, arm in arms.items():
        m, f = arm.get("matched") or {}, arm["final"]
        rows.append([label, fmt(arm["params_trainable"]), fmt(arm["alpha_path"][-1][1]), fmt(f["forgetting_kl"]),
                     f"{fmt(f['general_retained'])} ({fmt(f['general_accuracy'])})", fmt(arm["matched_alpha"]),
                     fmt(m.get("eval_loss")), fmt(m.get("forgetting_kl")),
                     f"{fmt(m.get('general_retained'))} ({fmt(m.get('general_accuracy'))})"])
    table = md_table(["arm", "trainable params", "final task loss", "final KL", "final kept (accuracy)",
                      "a at equal quality", "task loss there", "KL there", "kept (accuracy) there"], rows)
    full = (arms.get("full") or {}).get("matched")
    loras = {k: a["matched"] for k, a in arms.items() if k.startswith("lora") and a.get("matched")}
    if full and loras:
        less = [k for k, m in loras.items() if m["forgetting_kl"] < full["forgetting_kl"]]
        supported = True if len(less) == len(loras) else False if not less else None
        measured = (f"KL at task loss {target:.3g} nats/token: full {full['forgetting_kl']:.3g}; "
                    + ", ".join(f"{k} {m['forgetting_kl']:.3g}" for k, m in loras.items()) + " nats/token")
    else:
        supported, measured = None, "no equal-quality point for full fine-tuning or LoRA (see table)"
    freeze = (arms.get("freeze") or {}).get("matched")
    verdicts = [Verdict("LoRA forgets less than full fine-tuning (essay: 'LoRA helps here too').", measured,
                        supported, "equal quality = same held-out task loss, reached by scaling each update")]
    if full and freeze:
        verdicts.append(Verdict("Freezing most of the network also limits forgetting.",
                                f"KL at equal quality: freeze {freeze['forgetting_kl']:.3g} vs full "
                                f"{full['forgetting_kl']:.3g} nats/token",
                                freeze["forgetting_kl"] < full["forgetting_kl"]))
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
        f"task loss equals the worst method's final loss ({target:.4g} nats/token), and measured there. "
        "The scaled model is not a point the optimizer visited; it is the cheapest way to equalise quality "
        "without training every method several times.",
        "",
        table,
    ])
    return Section(title="Forgetting: does LoRA forget less?", verdicts=verdicts, body_markdown=body,
                   images=images, order=ORDER["forgetting"])


__all__ = ["measure_forgetting", "base_reference", "forgetting_after_training", "analyze_forgetting", "reply_kl",
           "has_real_weights", "method_configs", "base_train_config", "AnalysisError"]
