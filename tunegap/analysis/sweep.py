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

from ..literature import anchor
from .common import ORDER, QUICK_MODEL, figure, fmt, md_table, q, quick_aware, run_or_reuse, save_figure, write_outputs
from .forgetting import base_train_config

DEFAULT_RANKS = (1, 4, 16, 64)
QUALITY = "style_adherence"  # share of generated replies that follow the house style exactly (measured)


@quick_aware
def sweep_lora_rank(*, out: str | Path, ranks=DEFAULT_RANKS, model: str = "smollm2-135m", steps: int = 16,
                    lr: float = 2e-4, full_lr: float = 5e-5, runs_dir: str = "runs", quick: bool = False,
                    generate_examples: int = 16, progress: bool = True) -> dict:
    started = time.perf_counter()
    out = Path(out)
    if quick:
        model, steps, ranks, full_lr, lr = QUICK_MODEL, min(steps, 3), (1, 2, 4), 1e-3, 1e-3
    base = base_train_config(model=model, steps=steps, runs_dir=runs_dir, quick=quick, progress=progress)
    base = replace(base, lr=lr, generate_examples=base.generate_examples if quick else generate_examples)
    arms = {"full": replace(base, method="full", lr=full_lr)}
    for r in ranks:
        arms[f"lora-r{r}"] = replace(base, method="lora", rank=r, alpha=2.0 * r)
    rows = {}
    for label, cfg in arms.items():
        folder, ledger = run_or_reuse(cfg, f"support-{label}")  # shared with `analyze forgetting`
        c, m = ledger["costs"], ledger.get("metrics", {})
        rows[label] = {
            "run": str(folder), "method": cfg.method, "rank": cfg.rank if cfg.method == "lora" else None,
            "lr": cfg.lr,
            "eval_loss": q(m.get("eval_loss"), "nats/token", "measured"),
            "train_loss": q(m.get("train_loss"), "nats/token", "measured"),
            "quality": q(m.get(QUALITY), "fraction", "measured") if QUALITY in m else None,
            **{k: q(m.get(k), "fraction", "measured") if k in m else None
               for k in ("product_accuracy", "refusal_f1")},
            "forgetting_kl": q(m.get("forgetting_kl"), "nats/token", "measured") if "forgetting_kl" in m else None,
            **{k: c[k] for k in ("params_trainable", "optimizer_state_bytes", "flops_total", "train_time_s",
                                 "dollars", "peak_memory_bytes", "tokens")},
        }
    full = rows["full"]
    full_loss = full["eval_loss"]["value"]
    for label, row in rows.items():
        loss = row["eval_loss"]["value"]
        row["loss_gap"] = q((loss - full_loss) / full_loss if loss is not None and full_loss else None,
                            "fraction", "measured")
        if row["quality"] and full["quality"]:
            row["quality_gap"] = q(row["quality"]["value"] - full["quality"]["value"], "fraction", "measured")
    results = {"analysis": "sweep-lora-rank", "model": model, "quick": quick, "steps": steps,
               "settings": {"lora_lr": lr, "full_lr": full_lr, "alpha": "2r", "ranks": list(ranks),
                            "generate_examples": base.generate_examples},
               "arms": rows, "within": _within(rows),
               "wall_seconds": q(time.perf_counter() - started, "s", "measured")}
    out.mkdir(parents=True, exist_ok=True)
    images = [_plot_quality(rows, out / "lora_rank_quality.png"), _plot_cost(rows, out / "lora_rank_cost.png")]
    section = sweep_section(results, images)
    results["verdicts"] = [v.__dict__ for v in section.verdicts]
    write_outputs(out, results, section)
    return results


def _within(rows: dict) -> dict:
    """Smallest rank within 1% and 2% of full fine-tuning: held-out loss (relative) and quality (absolute points)."""
    loras = sorted((r["rank"], r) for r in rows.values() if r["rank"] is not None)
    found = {}
    for tol in (0.01, 0.02):
        found[f"loss_{int(tol * 100)}pct"] = next((rank for rank, r in loras if r["loss_gap"]["value"] is not None
                                                   and r["loss_gap"]["value"] <= tol), None)
        found[f"quality_{int(tol * 100)}pt"] = next((rank for rank, r in loras if r.get("quality_gap")
                                                     and r["quality_gap"]["value"] >= -tol), None)
    return found


def _plot_quality(rows: dict, path: Path) -> Path:
    loras = sorted((r["rank"], r) for r in rows.values() if r["rank"] is not None)
    full = rows["full"]
    has_quality = full["quality"] is not None
    fig = figure(10 if has_quality else 6.5, 4.2)
    ax = fig.add_subplot(1, 2 if has_quality else 1, 1)
    ranks = [k for k, _ in loras]
    ax.plot(ranks, [r["eval_loss"]["value"] for _, r in loras], marker="o", label="LoRA (alpha = 2r)")
    fl = full["eval_loss"]["value"]
    ax.axhline(fl, color="black", label="full fine-tuning")
    ax.axhspan(fl, fl * 1.02, color="grey", alpha=0.2, label="within 2% of full")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("LoRA rank r")
    ax.set_ylabel("held-out loss, nats/token (measured)")
    ax.legend(fontsize=8)
    if has_quality:
        ax2 = fig.add_subplot(1, 2, 2)
        ax2.plot(ranks, [r["quality"]["value"] for _, r in loras], marker="o", label="LoRA: house style")
        ax2.axhline(full["quality"]["value"], color="black", label="full fine-tuning")
        ax2.set_xscale("log", base=2)
        ax2.set_ylim(-0.05, 1.05)
        ax2.set_xlabel("LoRA rank r")
        ax2.set_ylabel("style adherence of generated replies (measured)")
        ax2.legend(fontsize=8)
    fig.suptitle("Task quality vs LoRA rank, same steps and data", fontsize=10)
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
    from ..report import Section, Verdict

    rows = results["arms"]
    table = md_table(
        ["arm", "trainable params", "optimizer state", "FLOPs (formula)", "train time (measured)", "held-out loss",
         "vs full", "style adherence", "KL forgetting"],
        [[label, fmt(r["params_trainable"]["value"]), f"{r['optimizer_state_bytes']['value'] / 2**20:.3g} MiB",
          f"{r['flops_total']['value']:.3g}", f"{r['train_time_s']['value']:.3g} s", fmt(r["eval_loss"]["value"]),
          f"{100 * r['loss_gap']['value']:+.2f}%" if r["loss_gap"]["value"] is not None else "n/a",
          fmt(r["quality"]["value"]) if r["quality"] else "not generated",
          fmt(r["forgetting_kl"]["value"]) if r["forgetting_kl"] else "n/a"] for label, r in rows.items()])
    within = results["within"]
    r2 = within["loss_2pct"]
    best = min((r for r in rows.values() if r["rank"] is not None), key=lambda r: r["eval_loss"]["value"])
    measured = (f"smallest rank within 2% of full's held-out loss: {r2 if r2 else 'none tested'}; within 1%: "
                f"{within['loss_1pct'] or 'none tested'}; best LoRA r={best['rank']} at "
                f"{100 * best['loss_gap']['value']:+.2f}% vs full")
    verdicts = [Verdict("A low-rank update (r = 8 or 16) gets close to full fine-tuning quality (within 2%).", measured,
                        r2 is not None and r2 <= 16,
                        f"{results['steps']} steps each, same data; held-out loss on the support task",
                        anchor("sweep_rank_close", r2 is not None and r2 <= 16))]
    if within.get("quality_2pt") is not None or rows["full"]["quality"]:
        verdicts.append(Verdict("On generated replies, LoRA matches full fine-tuning's house-style adherence.",
                                f"smallest rank within 2 points of full's style adherence "
                                f"({fmt(rows['full']['quality']['value'])}): {within.get('quality_2pt') or 'none'}",
                                (within.get("quality_2pt") is not None) if rows["full"]["quality"]["value"] >= 0.1
                                else None,
                                f"{results['settings']['generate_examples']} held-out tickets generated per arm"
                                + ("; full fine-tuning itself reached < 10% in this budget, so this cannot tell"
                                   if rows["full"]["quality"]["value"] < 0.1 else "")))
        verdicts[-1].anchor = anchor("sweep_style", verdicts[-1].supported)
    lora_params = [r["params_trainable"]["value"] for r in rows.values() if r["rank"] is not None]
    flops = [r["flops_total"]["value"] / rows["full"]["flops_total"]["value"] for r in rows.values()
             if r["rank"] is not None]
    verdicts.append(Verdict("LoRA's saving is parameters and optimizer memory, not compute per token.",
                            f"trainable params {min(lora_params):,}-{max(lora_params):,} vs "
                            f"{rows['full']['params_trainable']['value']:,}; FLOPs {min(flops):.2f}-{max(flops):.2f}x "
                            "full's (formula)", max(flops) > 0.5, anchor=anchor("sweep_compute", max(flops) > 0.5)))
    quick = " (quick: random tiny model; the numbers only exercise the code)" if results["quick"] else ""
    body = "\n".join([
        f"Model `{results['model']}`{quick}; "
        f"every arm trained {results['steps']} steps of the same batches; LoRA lr {results['settings']['lora_lr']}, "
        f"alpha = 2r; full fine-tuning lr {results['settings']['full_lr']}. Held-out loss is on the support task's "
        "eval tickets (held-out name/issue pairs). Per-run ledgers hold every cost; `vs full` is relative "
        "held-out loss.",
        "", table])
    return Section(title="LoRA rank sweep: how low can the rank go?", verdicts=verdicts, body_markdown=body,
                   images=images, order=ORDER["sweep"])


__all__ = ["sweep_lora_rank", "DEFAULT_RANKS"]
