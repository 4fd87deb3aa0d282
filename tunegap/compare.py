"""`tunegap compare RUN RUN ...`: finished runs side by side, read from their ledgers alone.

Every number is printed as the ledger holds it, with its unit and how it was obtained (measured, formula or
estimate), so a LoRA run, a full fine-tune, a DPO run and an RL run can be read against each other without
re-running anything. An RL run's ledger also splits its cost into generation, scoring, the reference's forward
and the update (`objectives/grpo.py`); those rows appear for it, and '-' for runs that have no such phase.
`--png` draws the same comparison (FLOPs, time, memory, task metrics) with matplotlib's Agg canvas.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .analysis.common import figure, save_figure
from .ledger import format_quantity, q
from .objectives import OBJECTIVES
from .outputs import RunLoadError, finished_run

# (ledger cost key, label), in print order
COSTS = (("params_trainable", "trainable params"), ("trainable_share", "trainable share"),
         ("optimizer_state_bytes", "optimizer state"), ("peak_memory_bytes", "peak memory"),
         ("tokens", "tokens"), ("optimizer_steps", "optimizer steps"), ("flops_total", "FLOPs (update)"),
         ("flops_hardware", "FLOPs, hardware (update)"), ("flops_counted_over_formula", "counted / formula"),
         ("train_time_s", "train time"), ("wall_time_s", "wall time"), ("gpu_hours", "GPU-hours"),
         ("dollars", "dollars"))
FRACTIONS = {"style_adherence", "product_accuracy", "refusal_precision", "refusal_recall", "refusal_f1",
             "greets_by_name", "signed_off", "structure_ok", "trainable_share"}
CHART_METRICS = ("eval_reward", "style_adherence", "product_accuracy", "refusal_f1")


def load_ledgers(runs: list[str], runs_dir: str) -> list[tuple[str, dict]]:
    """(name, ledger) of each finished run; anything else is a one-line RunLoadError naming it."""
    loaded = []
    for run in runs:
        try:
            folder, ledger = finished_run(run, runs_dir)
        except ValueError as err:  # RunLoadError, or a ledger.json that is not JSON
            raise RunLoadError(str(err) if isinstance(err, RunLoadError) else
                               f"{run}: ledger.json is not valid JSON ({err})") from None
        if not isinstance(ledger.get("costs"), dict):
            raise RunLoadError(f"{folder}: ledger.json has no costs (not a tunegap ledger)")
        loaded.append((ledger.get("run") or folder.name, ledger))
    return loaded


def rl_rows(ledger: dict) -> dict:
    """An RL run's phases, and what they add up to: update time (train time less the phases the trainer timed
    inside each step), all FLOPs, and the dollar estimate scaled from update FLOPs to all FLOPs."""
    phases = ledger.get("metrics", {}).get("rl_phases")
    if not isinstance(phases, dict):
        return {}
    costs, value = ledger["costs"], lambda key: (phases.get(key) or {}).get("value") or 0.0
    sampling_s = value("generation_time_s") + value("scoring_time_s") + value("reference_time_s")
    update_flops = costs["flops_total"]["value"] or 0.0
    all_flops = update_flops + value("generation_flops") + value("reference_flops")
    dollars = costs.get("dollars", {}).get("value")
    derived = {
        "update_time_s": q(costs["train_time_s"]["value"] - sampling_s, "s", "measured"),
        "flops_all_phases": q(all_flops, "FLOP", "formula"),
        "dollars_all_phases": q(dollars * all_flops / update_flops if dollars is not None and update_flops else None,
                                "USD", "estimate"),
    }
    return {**phases, **derived}


def metric_entry(key: str, value, ledger: dict) -> dict:
    """A task metric as a ledger quantity (metrics are measured; their unit follows from what they count)."""
    unit = ("fraction" if key in FRACTIONS else "reward" if "reward" in key else
            f"loss/{_objective_unit(ledger)}" if key.endswith("_loss") else "s" if key.endswith("seconds") else
            "token" if key.endswith("_tokens") else "example" if key == "n" or key.startswith("n_") else "value")
    return q(value, unit, "measured")


def _objective_unit(ledger: dict) -> str:
    cls = OBJECTIVES.get(ledger.get("config", {}).get("objective", "next-token"))
    return getattr(cls, "unit", "token")


def comparison(loaded: list[tuple[str, dict]]) -> list[tuple[str, list]]:
    """(label, one cell per run) rows: settings as text, every number as a {value, unit, how} entry or None."""
    ledgers = [ledger for _, ledger in loaded]
    rows = [(label, [ledger.get("config", {}).get(key, "-") for ledger in ledgers])
            for label, key in (("objective", "objective"), ("method", "method"), ("model", "model"))]
    rows += [(label, [ledger["costs"].get(key) for ledger in ledgers]) for key, label in COSTS]
    rl = [rl_rows(ledger) for ledger in ledgers]
    rl_keys = list(dict.fromkeys(key for phases in rl for key in phases))
    rows += [(f"rl: {key}", [phases.get(key) for phases in rl]) for key in rl_keys]
    scalar = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
    metric_keys = list(dict.fromkeys(k for ledger in ledgers for k, v in ledger.get("metrics", {}).items()
                                     if scalar(v)))
    rows += [(f"metric: {key}", [metric_entry(key, ledger["metrics"][key], ledger)
                                 if scalar(ledger.get("metrics", {}).get(key)) else None for ledger in ledgers])
             for key in metric_keys]
    return rows


def format_table(names: list[str], rows: list[tuple[str, list]]) -> str:
    """A plain-text table, one column per run; '-' where a run has no such figure."""
    def cell(c) -> str:
        return "-" if c is None else format_quantity(c) if isinstance(c, dict) else Path(str(c)).name

    body = [[label, *map(cell, cells)] for label, cells in rows]
    header = ["", *names]
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    line = lambda row: "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, body)])


def _value(entry) -> float:
    return float(entry["value"]) if isinstance(entry, dict) and entry.get("value") is not None else 0.0


def _stacked(ax, names: list[str], parts: list[tuple[str, list[float]]], scale: float, unit: str, title: str):
    bottom = [0.0] * len(names)
    for label, values in parts:
        if any(values):
            ax.bar(names, [v / scale for v in values], bottom=[b / scale for b in bottom], label=label)
            bottom = [b + v for b, v in zip(bottom, values)]
    ax.set_ylabel(unit)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)


def chart(loaded: list[tuple[str, dict]], path: Path) -> Path:
    """Four panels: FLOPs and train time split by phase (an RL run's generation dominates), peak memory and
    optimizer state, and the task metrics every run has."""
    names = [name for name, _ in loaded]
    costs = [ledger["costs"] for _, ledger in loaded]
    rl = [rl_rows(ledger) for _, ledger in loaded]
    fig = figure(11, 7)
    ax = fig.subplots(2, 2)
    _stacked(ax[0][0], names, [("update", [_value(c["flops_total"]) for c in costs]),
                               ("generation", [_value(r.get("generation_flops")) for r in rl]),
                               ("reference forward", [_value(r.get("reference_flops")) for r in rl])],
             1e12, "TFLOP", "FLOPs by phase (formula)")
    _stacked(ax[0][1], names, [("update", [_value(r["update_time_s"]) if r else _value(c["train_time_s"])
                                           for c, r in zip(costs, rl)]),
                               ("generation", [_value(r.get("generation_time_s")) for r in rl]),
                               ("scoring + reference", [_value(r.get("scoring_time_s"))
                                                        + _value(r.get("reference_time_s")) for r in rl])],
             1.0, "s", "train time by phase (measured)")
    _stacked(ax[1][0], names, [("peak memory", [_value(c["peak_memory_bytes"]) for c in costs])],
             2**30, "GiB", "peak memory (measured)")
    metrics = [m for m in CHART_METRICS
               if any(isinstance(ledger.get("metrics", {}).get(m), (int, float)) for _, ledger in loaded)]
    width = 0.8 / max(len(metrics), 1)
    for i, m in enumerate(metrics):
        values = [ledger.get("metrics", {}).get(m) or 0.0 for _, ledger in loaded]
        ax[1][1].bar([x + i * width for x in range(len(names))], values, width, label=m)
    ax[1][1].set_xticks([x + width * (len(metrics) - 1) / 2 for x in range(len(names))], names)
    ax[1][1].set_title("task metrics, held out (measured)", fontsize=9)
    ax[1][1].set_ylim(0, 1.05)
    if metrics:
        ax[1][1].legend(fontsize=7)
    return save_figure(fig, Path(path))


def cmd_compare(args) -> int:
    loaded = load_ledgers(args.runs, args.runs_dir)
    rows = comparison(loaded)
    if args.json:
        print(json.dumps({"runs": [n for n, _ in loaded], "rows": [{"label": l, "cells": c} for l, c in rows]},
                         indent=2))
    else:
        print(format_table([n for n, _ in loaded], rows))
    if args.png:
        print(f"chart: {chart(loaded, args.png)}")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `compare` on the CLI's subparsers (tunegap.cli calls this)."""
    p = subparsers.add_parser("compare", help="finished runs side by side from their ledgers (cost and quality)")
    p.add_argument("runs", nargs="+", help="run folders, or run names in --runs-dir")
    p.add_argument("--runs-dir", default="runs")
    p.add_argument("--png", help="write a chart of the comparison here")
    p.add_argument("--json", action="store_true", help="the rows as JSON instead of a table")
    p.set_defaults(func=cmd_compare)
