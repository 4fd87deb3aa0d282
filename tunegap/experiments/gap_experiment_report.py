"""Charts, verdicts and the report section of the gap experiment: a pure function of results.json."""

from __future__ import annotations

import math
from pathlib import Path

from ..io import write_figure
from ..ledger import format_flops
from ..literature import anchor

QUALITY_KEYS = ("style_adherence", "product_accuracy", "refusal_f1")


def _fmt_x(x: float | None) -> str:
    if x is None:
        return "n/a"
    return f"{x:,.0f}x" if x >= 100 else f"{x:.3g}x"


def _duration(seconds: float) -> str:
    if seconds >= 365.25 * 86400:
        return f"{seconds / (365.25 * 86400):,.1f} years"
    if seconds >= 86400:
        return f"{seconds / 86400:.1f} days"
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} hours"
    if seconds >= 60:
        return f"{seconds / 60:.1f} minutes"
    return f"{seconds:.1f} s"


def quality(metrics: dict) -> float:
    """One task-quality number for ranking arms: the mean of style, product names and refusal F1 (0-1)."""
    values = [metrics.get(k) for k in QUALITY_KEYS if metrics.get(k) is not None]
    return sum(values) / len(values) if values else 0.0


def _shortfall(lora: dict, full: dict) -> str:
    """Where LoRA trails full fine-tuning by more than 0.05, so the verdict names the cause."""
    names = {"style_adherence": "style", "product_accuracy": "product names", "refusal_recall": "refusal recall",
             "refusal_precision": "refusal precision"}
    behind = [f"{label} {lora[k]:.2f} vs {full[k]:.2f}" for k, label in names.items()
              if lora.get(k) is not None and full.get(k) is not None and lora[k] < full[k] - 0.05]
    return "; LoRA trails on " + ", ".join(behind) if behind else ""


def verdicts(results: dict) -> list[dict]:
    """Each quantitative claim of the essay this experiment touches, with the measured value; honest."""
    trained = results["trained"]
    lora_name = next(n for n in trained if n.startswith("lora"))
    lora, full, scratch = trained[lora_name], trained["full"], trained["scratch"]
    share = lora["costs"]["trainable_share"]["value"]
    out = [{
        "claim": "LoRA trains under 1% of the parameters",
        "measured": f"{lora_name}: {100 * share:.2f}% of {lora['costs']['params_total']['value']:,} parameters "
                    f"trainable (measured)",
        "supported": share < 0.01,
        "note": "the share falls with model width: rank r on a d x d matrix trains 2r/d of it, so a 576-wide "
                "model at r=8 on every projection trains more than 1%; a 4096-wide one trains about 0.4% "
                "(tunegap estimate shows it)" if share >= 0.01 else "",
    }]
    q_lora, q_full = quality(lora["metrics"]), quality(full["metrics"])
    l_lora, l_full = lora["metrics"].get("eval_loss"), full["metrics"].get("eval_loss")
    close = l_lora is not None and l_full is not None and l_lora <= 1.05 * l_full and q_lora >= q_full - 0.05
    out.append({
        "claim": "LoRA gets close to full fine-tuning quality",
        "measured": f"held-out loss {l_lora:.3f} (LoRA) vs {l_full:.3f} (full) nats/token; task quality "
                    f"{q_lora:.2f} vs {q_full:.2f} (mean of style, product names, refusal F1; measured)",
        "supported": close,
        "note": "criterion: loss within 5% and task quality within 0.05 of full fine-tuning, same token budget"
                + _shortfall(lora["metrics"], full["metrics"]),
    })
    gap = results["gap"][lora_name]
    mult = gap["cost_multipliers"]
    axes = {"tokens": mult["tokens"], "optimizer steps": gap["other_axes"]["optimizer_steps"],
            "parameters touched": gap["other_axes"]["params_trainable"],
            "optimizer state": gap["other_axes"]["optimizer_state_bytes"]}
    in_range = [name for name, x in axes.items() if 10 <= x <= 1e4]
    out.append({
        "claim": "each axis (data, steps, parameters touched, optimizer state) saves about 10-100x",
        "measured": "; ".join(f"{k} {_fmt_x(v)}" for k, v in axes.items()),
        "supported": len(in_range) == len(axes) and all(v <= 1000 for v in axes.values()),
        "note": "pretraining (estimate, published token count) over this LoRA run (measured). Axes far above "
                "100x mean the essay's per-axis range is conservative for this model and budget; FLOPs per "
                f"token differ by only {_fmt_x(mult['flops_per_token'])} (LoRA still runs the full forward "
                "and backward through activations)",
    })
    total = gap["flops"]
    out.append({
        "claim": "four or more orders of magnitude in total",
        "measured": f"pretraining {format_flops(results['pretrain']['costs']['flops_total']['value'])} (estimate) / "
                    f"{lora_name} {format_flops(lora['costs']['flops_total']['value'])} (formula, measured tokens) = "
                    f"{_fmt_x(total)} = 10^{math.log10(total):.1f}",
        "supported": total >= 1e4,
        "note": "compute ratio; the dollar ratio is the same on the same hardware",
    })
    ls, lf = scratch["metrics"].get("eval_loss"), full["metrics"].get("eval_loss")
    out.append({
        "claim": "pretraining builds the representations: the task data alone, from random weights, does not",
        "measured": f"held-out loss from scratch {ls:.3f} vs pretrained+full {lf:.3f} nats/token after the "
                    f"same {scratch['costs']['tokens']['value']:,} tokens; task quality "
                    f"{quality(scratch['metrics']):.2f} vs {quality(full['metrics']):.2f} (measured)",
        "supported": ls is not None and lf is not None and ls > lf,
        "note": "",
    })
    be = results["break_even"]
    best_icl = results["icl"][f"icl-{be['k']}"]["metrics"]
    out.append({
        "claim": "in-context learning is the cheaper alternative when you only have a handful of examples",
        "measured": (f"{be['k']}-shot prompts add {format_flops(be['icl_extra_flops_per_query'])} per query; the "
                     f"{lora_name} fine-tune ({format_flops(be['train_flops'])}) pays for itself after "
                     f"{be['queries']:,.0f} queries{_cached_clause(be)}; task quality {quality(best_icl):.2f} ({be['k']}-shot) vs "
                     f"{quality(lora['metrics']):.2f} (LoRA)") if be["queries"] else
                    "k-shot prompts cost no more per query here",
        "supported": None,
        "note": "a trade-off, not a yes/no: below the break-even query count prompting costs less compute; "
                "above it, or when the fine-tune's quality is higher, fine-tuning wins",
    })
    published = ("lora_params_share", "lora_close_to_full", "gap_axes", "gap_total", "pretraining_builds",
                 "icl_break_even")  # tunegap.literature's key for each verdict above, in order
    assert len(published) == len(out)
    for verdict, key in zip(out, published):
        verdict["anchor"] = anchor(key, verdict["supported"])
    return out


def charts(results: dict, folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    trained = results["trained"]
    colors = {"full": "#1f77b4", "scratch": "#d62728"}

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, arm in trained.items():
        curve = arm["loss_curve"]
        if curve:
            ax.plot([c["flops"] for c in curve], [c["loss"] for c in curve], label=name,
                    color=colors.get(name, "#2ca02c"), marker="." if len(curve) < 40 else None)
    ax.set_xscale("log")
    ax.set_xlabel("cumulative training FLOPs (formula)")
    ax.set_ylabel("training loss (nats/token, measured)")
    ax.set_title("Loss against compute: pretrained arms vs random init")
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    paths.append(_save(fig, folder / "loss_vs_flops.png"))

    arms = {**{k: v["metrics"] for k, v in results["icl"].items()}, **{k: v["metrics"] for k, v in trained.items()}}
    cost = {**{k: 0.0 for k in results["icl"]}, **{k: v["costs"]["flops_total"]["value"] for k, v in trained.items()}}
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.2))
    names = list(arms)
    width = 0.25
    for i, key in enumerate(QUALITY_KEYS):
        left.bar([j + i * width for j in range(len(names))], [arms[n].get(key) or 0 for n in names], width, label=key)
    left.set_xticks([j + width for j in range(len(names))], names, rotation=30, ha="right")
    left.set_ylim(0, 1.05)
    left.set_ylabel("fraction of held-out tickets (measured)")
    left.set_title("Task quality")
    left.legend(fontsize=8)
    right.bar(names, [max(cost[n], 1.0) for n in names], color="#7f7f7f")
    right.set_yscale("log")
    right.set_ylabel("training FLOPs (formula; ICL arms train nothing)")
    right.set_title("One-time training cost")
    right.tick_params(axis="x", rotation=30)
    paths.append(_save(fig, folder / "quality_vs_cost.png"))

    lora_name = next(n for n in trained if n.startswith("lora"))
    g = results["gap"][lora_name]
    labels = ["tokens", "FLOPs/token", "= FLOPs", "optimizer steps", "params touched", "optimizer state"]
    values = [g["cost_multipliers"]["tokens"], g["cost_multipliers"]["flops_per_token"], g["flops"],
              g["other_axes"]["optimizer_steps"], g["other_axes"]["params_trainable"],
              g["other_axes"]["optimizer_state_bytes"]]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    bars = ax.bar(labels, values, color=["#1f77b4", "#1f77b4", "#000000", "#9467bd", "#9467bd", "#9467bd"])
    ax.set_yscale("log")
    ax.set_ylabel("pretraining / fine-tune (x, log scale)")
    ax.set_title(f"Where the gap comes from: pretraining vs {lora_name}")
    for bar, v in zip(bars, values):
        ax.text(bar.get_x() + bar.get_width() / 2, v, _fmt_x(v), ha="center", va="bottom", fontsize=8)
    ax.tick_params(axis="x", rotation=20)
    paths.append(_save(fig, folder / "gap_multipliers.png"))

    be = results["break_even"]
    if be["queries"]:
        fig, ax = plt.subplots(figsize=(7, 4.2))
        horizon = max(10.0, 3 * be["queries"])
        xs = [horizon * i / 100 for i in range(101)]
        ax.plot(xs, [be["train_flops"] for _ in xs], label=f"{lora_name}: one-time training")
        ax.plot(xs, [be["icl_extra_flops_per_query"] * x for x in xs], label=f"{be['k']}-shot prompts: extra per query")
        ax.axvline(be["queries"], color="grey", linestyle="--")
        ax.set_xlabel("queries served")
        ax.set_ylabel("FLOPs (formula)")
        ax.set_title(f"Break-even after {be['queries']:,.0f} queries")
        ax.legend()
        paths.append(_save(fig, folder / "break_even.png"))
    return paths


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    write_figure(fig, path, dpi=110)  # atomic, and never through a planted symbolic link
    plt.close(fig)
    return path


def body_markdown(results: dict) -> str:
    trained, pre = results["trained"], results["pretrain"]
    lora_name = next(n for n in trained if n.startswith("lora"))
    lora = trained[lora_name]
    rows = ["| arm | trainable params | tokens | steps | FLOPs (formula) | train time (measured) | held-out loss | "
            "style | product names | refusal F1 |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, arm in results["icl"].items():
        m = arm["metrics"]
        loss = f"{arm['eval_loss']:.3f}" if arm["eval_loss"] is not None else "-"
        rows.append(f"| {name} (frozen) | 0 | 0 | 0 | 0 (+{format_flops(arm['inference_flops_per_query'])}/query) | "
                    f"{arm['seconds_per_query']:.2f} s/query | {loss} | {m['style_adherence']:.2f} | "
                    f"{m['product_accuracy']:.2f} | {m['refusal_f1']:.2f} |")
    for name, arm in trained.items():
        c, m = arm["costs"], arm["metrics"]
        rows.append(f"| {name} | {c['params_trainable']['value']:,} | {c['tokens']['value']:,} | "
                    f"{c['optimizer_steps']['value']} | {format_flops(c['flops_total']['value'])} | "
                    f"{_duration(c['train_time_s']['value'])} | {m.get('eval_loss', float('nan')):.3f} | "
                    f"{m.get('style_adherence', 0):.2f} | {m.get('product_accuracy', 0):.2f} | {m.get('refusal_f1', 0):.2f} |")
    pc = pre["costs"]
    gpu = pre["hardware"]["name"]
    lines = [
        "**Smoke run (--quick) on a random tiny model: the numbers exercise the code, the verdicts mean nothing.**"
        if results["config"].get("quick") else "",
        "",
        f"Model: **{results['model']['name']}**. Every trained arm saw the same token budget of the shipped "
        "support task; task metrics come from greedy generations on held-out tickets (measured).",
        "",
        *rows,
        "",
        f"**Pretraining the base model** (estimate): {pre['tokens'] / 1e12:.3g} trillion tokens ({pre['source']}), "
        f"{format_flops(pc['flops_total']['value'])}, {pc['gpu_hours']['value']:,.0f} GPU-hours on {gpu}"
        + (f", about ${pc['dollars']['value']:,.0f}" if pc['dollars']['value'] is not None else "") + ".",
        "",
        f"**This fine-tune took {_duration(lora['costs']['train_time_s']['value'])} on this machine (measured); "
        f"pretraining the base model here would take about {_duration(pre['here_seconds'])}** ({pre['here_how']}).",
        "",
        f"The {lora_name} run's FLOPs priced on {gpu} at 40% MFU: "
        f"{lora['costs']['gpu_hours']['value'] * 3600:.3g} GPU-seconds, "
        f"${lora['costs']['dollars']['value']:.3g} (estimate).",
        "",
        "Multipliers (pretraining / fine-tune): FLOPs = tokens x FLOPs-per-token exactly; steps, trainable "
        "parameters and optimizer state are separate axes that set memory and wall-clock rather than FLOPs.",
        "",
        "| arm | tokens | FLOPs/token | = FLOPs | optimizer steps | params touched | optimizer state |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, g in results["gap"].items():
        o = g["other_axes"]
        lines.append(f"| {name} | {_fmt_x(g['cost_multipliers']['tokens'])} | "
                     f"{_fmt_x(g['cost_multipliers']['flops_per_token'])} | {_fmt_x(g['flops'])} | "
                     f"{_fmt_x(o['optimizer_steps'])} | {_fmt_x(o['params_trainable'])} | "
                     f"{_fmt_x(o['optimizer_state_bytes'])} |")
    be = results["break_even"]
    lines += ["", "**Break-even, in-context learning vs fine-tuning**: " + (
        f"{be['k']}-shot prompts cost {format_flops(be['icl_extra_flops_per_query'])} more per query than "
        f"zero-shot; the {be['arm']} fine-tune's {format_flops(be['train_flops'])} equal that after "
        f"**{be['queries']:,.0f} queries**{_cached_clause(be)}." if be["queries"] else
        "few-shot prompts cost nothing extra here.")]
    samples = lora.get("samples") or []
    if samples:
        lines += ["", f"A held-out ticket and the {lora_name} reply:", "", f"> {samples[0]['prompt']}", "",
                  "```", samples[0]["reply"], "```"]
    return "\n".join(lines)


def _cached_clause(be: dict) -> str:
    """The break-even again with a prompt cache, which encodes the shots once (a serving stack's price)."""
    if "queries_cached" not in be:
        return ""
    if not be["queries_cached"]:
        return " without a prompt cache (with one, the shots cost nothing extra per query)"
    return (f" without a prompt cache, {be['queries_cached']:,.0f} with one (the shots encoded once, "
            f"{format_flops(be['icl_extra_flops_per_query_cached'])} extra per query; formula)")


def write_gap_report(folder: Path, results: dict) -> Path:
    """report.html (self-contained), report.md, PNGs and section.json in the experiment folder."""
    from ..report import Section, Verdict, write_report

    images = charts(results, folder)
    section = Section(
        title="The pretraining/fine-tuning gap, measured",
        verdicts=[Verdict(**v) for v in results["verdicts"]],
        body_markdown=body_markdown(results),
        images=images,
    )
    return write_report(folder, [section], title=f"tunegap: why fine-tuning {results['model']['name']} is cheap")
