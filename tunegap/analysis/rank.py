"""`tunegap analyze rank RUN`: is the update of a full fine-tune low-rank, and where is it not?
`tunegap analyze rank --steps-list 12,24 --lrs 5e-5,2e-4 --seeds 3`: the same question over training lengths and
learning rates, the full fine-tunes trained here (`analyze_rank_grid`).

LoRA (Hu et al. 2021) *constrains* the update to rank r and finds little lost; that does not show a full
fine-tune, left free, would have moved only a few directions (the essay's own caveat). This measures it: for
every weight matrix of a finished full (or freeze) run, dW = W_tuned - W_base and its singular values s_i, and
  * effective rank, exp(H(p)) with p_i = s_i / sum(s) (Roy & Vetterli 2007, Def. 1): k for k equal singular
    values, 1 for a rank-1 matrix, below the matrix rank when a few directions dominate;
  * r90 / r99: the smallest rank whose best approximation keeps 90% / 99% of ||dW||_F^2;
  * energy(r) = sum_{i<=r} s_i^2 / sum s_i^2, the share the best rank-r approximation keeps (Eckart & Young
    1936), for r = 1..64: what a LoRA of rank r could at best express of this update;
each compared with a Gaussian matrix of the same shape and norm (no structure: its spectrum follows the
Marchenko-Pastur law, so energy(r) grows roughly like r / min(m, n)).

In the literature's units (Biderman et al. 2024): r50/r90/r99 as multiples of the LoRA ranks in use, beside the
base weights' own spectrum and, given a second seed's run, a null from the difference of the two seeds'
updates (dW_1 - dW_2: what the optimiser's noise alone spreads). Token embeddings are analysed apart, on the
rows of the tokens seen in training only (the other rows see no input gradient).
"""

from __future__ import annotations

import re
import time
from dataclasses import replace
from pathlib import Path

from ..config import ConfigError, TrainConfig
from ..data.loaders import DataError
from ..data.sources import prepare
from ..literature import anchor
from ..predict import minutes
from ..report import Section, Verdict
from ..stats import judge, mean_interval, paired_differences
from ..trainer import Trainer
from .common import (AnalysisError, ORDER, QUICK_MODEL, check_seeds, fmt, load_base, load_run, md_table, q,
                     quick_aware, run_or_reuse, run_seeds, save_figure, figure, tuned_model, write_outputs)
from .forgetting import base_train_config

MATRIX_TYPES = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "gate_proj": "gate", "up_proj": "up",
                "down_proj": "down"}
_LAYER = re.compile(r"layers\.(\d+)\.")


def spectrum(delta):
    """Singular values of a matrix, in float64 (descending)."""
    import torch

    return torch.linalg.svdvals(delta.double())


def effective_rank(s) -> float:
    """Roy & Vetterli (2007): exp of the Shannon entropy of the singular values normalised to sum 1."""
    import torch

    s = s[s > 0]
    if s.numel() == 0:
        return 0.0
    p = s / s.sum()
    return float(torch.exp(-(p * torch.log(p)).sum()))


def energy_curve(s, max_rank: int) -> list[float]:
    """energy(r) for r = 1..max_rank: share of ‖dW‖_F^2 the best rank-r approximation keeps (Eckart-Young)."""
    e = s.double() ** 2
    total = float(e.sum())
    if total == 0:
        return [1.0] * max_rank
    cum = (e.cumsum(0) / total).tolist()
    return [cum[min(r, len(cum)) - 1] for r in range(1, max_rank + 1)]


def rank_for(s, share: float) -> int:
    """Smallest r whose best rank-r approximation keeps `share` of the squared Frobenius norm."""
    e = s.double() ** 2
    total = float(e.sum())
    if total == 0:
        return 0
    cum = (e.cumsum(0) / total).tolist()
    return next(i + 1 for i, c in enumerate(cum) if c >= share - 1e-12)


def matrix_stats(delta, max_rank: int, weight=None) -> dict:
    s = spectrum(delta)
    m, n = delta.shape
    return {"shape": [m, n], "max_rank": min(m, n), "norm": float(s.pow(2).sum().sqrt()),
            "relative_norm": (float(s.pow(2).sum().sqrt() / weight.double().norm()) if weight is not None else None),
            "effective_rank": effective_rank(s), "r50": rank_for(s, 0.50), "r90": rank_for(s, 0.90),
            "r99": rank_for(s, 0.99),
            "energy": energy_curve(s, max_rank), "singular_values": [float(x) for x in s[:max_rank]]}


def random_reference(shape: tuple[int, int], max_rank: int, seed: int = 0) -> dict:
    """The same statistics for a Gaussian matrix of this shape (norm does not change any of them)."""
    import torch

    g = torch.Generator().manual_seed(seed + 7919 * shape[0] + shape[1])
    return matrix_stats(torch.randn(*shape, generator=g, dtype=torch.float64), max_rank)


def spectrum_ranks(matrix) -> dict:
    """r50/r90/r99 of any matrix (the base weights, a seed-difference null), with its full rank."""
    s = spectrum(matrix)
    return {"r50": rank_for(s, 0.50), "r90": rank_for(s, 0.90), "r99": rank_for(s, 0.99),
            "max_rank": min(matrix.shape)}


NOT_LOW_RANK_MULTIPLE = 10  # Biderman et al. 2024: full fine-tuning's rank is 10-100x typical LoRA ranks


def low_rank_verdict(r90: float, lora_rank: int, null_r90: float) -> bool | None:
    """Is the update low-rank in the literature's units?

    True: a LoRA of the largest rank in use could hold 90% of ||dW||^2 (r90 <= lora_rank) and the update is more
    concentrated than the null. False: r90 >= 10x that rank (the bottom of Biderman et al.'s 10-100x), a threshold
    set by the LoRA rank, not by noise; when 10x the rank is not below the null's r90 the rule could only say
    False for an update as spread as noise, so it says None (not resolved) instead.
    """
    if r90 <= lora_rank and r90 < null_r90:
        return True
    if NOT_LOW_RANK_MULTIPLE * lora_rank >= null_r90:
        return None
    return False if r90 >= NOT_LOW_RANK_MULTIPLE * lora_rank else None


def seen_token_ids(config: dict) -> set[int] | None:
    """Token ids in the run's training examples (their embedding rows get an input gradient); None when the run's
    data cannot be prepared again here (then the rows that changed stand in)."""
    try:
        train_config = TrainConfig.from_dict(config)
        _, tokenizer = load_base(config)
        prepared = prepare(train_config, tokenizer)
    except (ConfigError, DataError, TypeError, OSError, ValueError):
        return None
    return {t for example in prepared.train for t in example.input_ids}


def embedding_rows_stats(delta, seen: set[int] | None, max_rank: int, weight) -> dict:
    """The embedding update restricted to the rows of tokens seen in training (or, unknown, the rows that moved)."""
    import torch

    rows = sorted(seen) if seen is not None else torch.nonzero(delta.abs().sum(1) > 0).flatten().tolist()
    rows = [r for r in rows if r < delta.shape[0]]
    if not rows:
        return {"rows": 0, "rows_rule": "none"}
    index = torch.tensor(rows)
    stats = matrix_stats(delta[index], max_rank, weight[index])
    stats.pop("singular_values", None)
    return {"rows": len(rows), "rows_rule": "tokens seen in training" if seen is not None else "rows that changed",
            **stats, "random": spectrum_ranks(torch.randn(len(rows), delta.shape[1], dtype=torch.float64,
                                                          generator=torch.Generator().manual_seed(0)))}


def classify(name: str) -> tuple[str, int | None] | None:
    """('q'|'k'|...|'embed'|'head', layer) for a weight matrix name, None for norms and biases."""
    if not name.endswith(".weight"):
        return None
    layer = _LAYER.search(name)
    for key, short in MATRIX_TYPES.items():
        if f".{key}." in name:
            return short, int(layer.group(1)) if layer else None
    if "embed_tokens" in name:
        return "embed", None
    if "lm_head" in name:
        return "head", None
    return None


def _full_run(run) -> tuple[Path, dict]:
    folder, ledger = load_run(run)
    if (folder / "adapter").is_dir():
        raise AnalysisError(f"{folder}: a {ledger['config']['method']} run; its update has rank <= r by "
                            "construction. Point this at a full fine-tune (method full) to ask whether the free "
                            "update is low-rank")
    return folder, ledger


def _updates(folder: Path, config: dict) -> tuple[dict, dict]:
    """name -> (W_tuned - W_base) in float64, and name -> W_base, for the 2-D weights; a tied head counted once."""
    base, _ = load_base(config)
    tuned, _ = tuned_model(folder, config)
    base_sd, tuned_sd = base.state_dict(), tuned.state_dict()
    deltas, weights, pointers = {}, {}, set()
    for name, w in tuned_sd.items():
        if classify(name) is None or name not in base_sd or w.dim() != 2:
            continue
        if base_sd[name].data_ptr() in pointers:  # a tied head is the embedding matrix: count it once
            continue
        pointers.add(base_sd[name].data_ptr())
        deltas[name], weights[name] = w.double() - base_sd[name].double(), base_sd[name]
    return deltas, weights


def analyze_rank(run: str | Path, *, out: str | Path, max_rank: int = 64, include_embeddings: bool = True,
                 seed: int = 0, lora_ranks: tuple[int, ...] = (8, 16), null_run: str | Path | None = None) -> dict:
    """Spectra of every matrix's update in a finished run, per layer and per type, against random matrices, the
    base weights' spectrum and (given `null_run`, the same settings with another seed) a seed-difference null."""
    started = time.perf_counter()
    folder, ledger = _full_run(run)
    config = ledger["config"]
    deltas, weights = _updates(folder, config)
    null_deltas = {}
    if null_run:
        null_folder, null_ledger = _full_run(null_run)
        null_deltas = _updates(null_folder, null_ledger["config"])[0]
    matrices, refs, embedding = [], {}, None
    for name, delta in deltas.items():
        kind = classify(name)
        if kind[0] in ("embed", "head"):
            if include_embeddings and float(delta.abs().max()) > 0:
                embedding = {"name": name, **embedding_rows_stats(delta, seen_token_ids(config), max_rank,
                                                                  weights[name])}
            continue
        if float(delta.abs().max()) == 0.0:
            matrices.append({"name": name, "type": kind[0], "layer": kind[1], "unchanged": True})
            continue
        stats = matrix_stats(delta, max_rank, weights[name])
        key = tuple(delta.shape)
        if key not in refs:
            refs[key] = random_reference(key, max_rank, seed)
        null = spectrum_ranks(delta - null_deltas[name]) if name in null_deltas else None
        matrices.append({"name": name, "type": kind[0], "layer": kind[1], "unchanged": False, **stats,
                         "random": {k: refs[key][k] for k in ("effective_rank", "r50", "r90", "r99", "energy")},
                         "base": spectrum_ranks(weights[name].double()), "seed_null": null})
    changed = [m for m in matrices if not m["unchanged"]]
    if not changed:
        raise AnalysisError(f"{folder}: no weight matrix changed; nothing to analyse")
    by_type = _aggregate(changed, lambda m: m["type"])
    by_layer = _aggregate([m for m in changed if m["layer"] is not None], lambda m: m["layer"])
    overall = _aggregate(changed, lambda m: "all")["all"]
    results = {
        "analysis": "rank", "run": str(folder), "model": config["model"], "method": config["method"],
        "steps": ledger["costs"]["optimizer_steps"]["value"], "lr": config.get("lr"), "max_rank": max_rank,
        "how": "measured (singular values of W_tuned - W_base, float64)",
        "overall": overall, "by_type": by_type, "by_layer": {str(k): v for k, v in sorted(by_layer.items())},
        "lora_ranks": sorted(lora_ranks), "null_run": str(null_run) if null_run else None,
        "embedding_rows": embedding,
        "matrices": [{k: v for k, v in m.items() if k != "singular_values"} for m in matrices],
        "wall_seconds": q(time.perf_counter() - started, "s", "measured"),
    }
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    images = [_plot_energy(by_type, overall, max_rank, out / "rank_energy.png"),
              _plot_layers(changed, out / "rank_by_layer.png"),
              _plot_spectra(changed, out / "rank_spectra.png")]
    section = rank_section(results, images)
    write_outputs(out, results, section)
    return results


# --------------------------------------------------------------------------- over steps, learning rates and seeds

GRID_ORDER = ORDER["rank"] + 1  # right after the single-run section


def median_r90(deltas: dict) -> float:
    """Median over the transformer's weight matrices (embeddings and head apart) of each update's r90."""
    values = [rank_for(spectrum(d), 0.90) for name, d in deltas.items()
              if classify(name)[0] not in ("embed", "head") and float(d.abs().max()) > 0]
    if not values:
        raise AnalysisError("no weight matrix changed; nothing to analyse")
    return _median(values)


def pooled_low_rank_verdict(r90_values: list[float], lora_rank: int, null_r90: float) -> dict:
    """`low_rank_verdict` on the 95% interval of per-seed median r90s pooled over every (steps, lr) cell.

    Supported: the whole interval at or below the largest LoRA rank and below the null's r90. Not supported: the
    whole interval at or above 10x that rank, when 10x the rank is below the null's r90 (otherwise 'not low-rank'
    would only mean 'as spread as noise'). Otherwise not resolved at this budget."""
    interval = mean_interval(r90_values)
    low = judge(interval, lora_rank, claim_below=True)
    high = judge(interval, NOT_LOW_RANK_MULTIPLE * lora_rank, claim_below=False)
    if interval.n >= 2 and interval.high <= lora_rank and interval.high < null_r90:
        return {"supported": True, "unresolved": False, "interval": interval, "note": ""}
    if NOT_LOW_RANK_MULTIPLE * lora_rank >= null_r90:
        return {"supported": None, "unresolved": True, "interval": interval,
                "note": f"not resolved at this budget: {NOT_LOW_RANK_MULTIPLE}x rank {lora_rank} is not below the "
                        f"null's r90 ({null_r90:.0f}), so the rule could only call noise 'not low-rank'; a wider "
                        "model would resolve it"}
    if high.supported is True:
        return {"supported": False, "unresolved": False, "interval": interval, "note": ""}
    note = high.note if interval.mean > lora_rank else low.note
    return {"supported": None, "unresolved": True, "interval": interval,
            "note": note or f"not resolved at this budget: the interval lies between rank {lora_rank} and "
                            f"{NOT_LOW_RANK_MULTIPLE}x it"}


def rank_growth_verdict(shortest: list[float], longest: list[float]) -> dict:
    """Does the update spread into more directions with more steps? Per seed (and learning rate), r90 after the
    longest run minus r90 after the shortest; supported when the difference's 95% interval is above 0."""
    diff = paired_differences(longest, shortest)
    j = judge(diff, 0.0, claim_below=False)
    return {"supported": j.supported, "unresolved": j.supported is None, "interval": diff, "note": j.note}


def _grid_prediction(config, steps_list, lrs, seeds) -> float:
    """Predicted seconds of the whole grid (estimate): one trainer's prediction at the longest step count, scaled
    per run by its steps, plus a measured-order allowance for the SVDs (not predicted)."""
    parts = Trainer(replace(config, max_steps=max(steps_list), name="forecast")).predict()
    per_step = parts["training"] / max(steps_list)
    fixed = sum(v for k, v in parts.items() if k != "training")
    return sum((fixed + per_step * steps) * len(lrs) * seeds for steps in steps_list)


@quick_aware
def analyze_rank_grid(*, out: str | Path, model: str = "smollm2-135m", steps_list: tuple = (12, 24),
                      lrs: tuple = (5e-5, 2e-4), seeds: int = 3, lora_ranks: tuple = (8, 16), runs_dir: str = "runs",
                      quick: bool = False, progress: bool = True) -> dict:
    """r90 of full fine-tunes trained here at each (steps, lr), seeds 0..N-1, as multiples of the LoRA ranks.

    Predicted wall time of the defaults (smollm2-135m, 2 step counts x 2 learning rates x 3 seeds = 12 runs of
    12-24 steps, 2-core CPU): about 22 minutes (estimate: ~3 s per step, ~20 s of SVDs per run; the command
    prints its own prediction before the first run)."""
    started = time.perf_counter()
    seeds = check_seeds(seeds)
    if seeds < 2:
        raise AnalysisError("--seeds: the grid needs at least 2 seeds (the seed-difference null and the intervals)")
    steps_list, lrs = sorted(set(steps_list)), sorted(set(lrs))
    model = QUICK_MODEL if quick else model
    base = replace(base_train_config(model=model, steps=max(steps_list), runs_dir=runs_dir, quick=quick,
                                     progress=progress),
                   method="full", generate_examples=0, task_metrics="off", forgetting="off")  # weights only
    print(f"tunegap: rank grid: {len(steps_list) * len(lrs) * seeds} full fine-tunes ({len(steps_list)} step counts "
          f"x {len(lrs)} learning rates x {seeds} seeds); predicted "
          f"{minutes(_grid_prediction(base, steps_list, lrs, seeds))} "
          "for training and evaluation (estimate), plus the SVDs", flush=True)
    cells, done = [], 0
    for steps in steps_list:
        for lr in lrs:
            runs = run_seeds(replace(base, max_steps=steps, lr=lr), "rank-full", seeds)
            updates = [_updates(folder, ledger["config"])[0] for folder, ledger in runs]
            per_seed = [median_r90(u) for u in updates]
            # the seed-difference null: what two seeds' optimiser noise spreads, same settings
            null = median_r90({name: updates[0][name] - updates[1][name] for name in updates[0]})
            done += seeds
            print(f"tunegap: rank grid {done}/{len(steps_list) * len(lrs) * seeds}: steps {steps}, lr {lr:g}: "
                  f"median r90 per seed {per_seed} (measured)", flush=True)
            interval = mean_interval(per_seed)
            cells.append({"steps": steps, "lr": lr, "runs": [str(folder) for folder, _ in runs],
                          "r90": interval.as_dict("rank"), "seed_null_r90": q(null, "rank", "measured"),
                          "r90_over_lora_rank": {str(r): mean_interval([v / r for v in per_seed]).as_dict(
                              f"x LoRA rank {r}") for r in lora_ranks},
                          "max_rank": q(min(next(iter(updates[0].values())).shape), "rank", "formula")})
            del updates
    lora_rank = max(lora_ranks)
    pooled_values = [v for c in cells for v in c["r90"]["per_seed"]]
    null_r90 = _median([c["seed_null_r90"]["value"] for c in cells])
    pooled = pooled_low_rank_verdict(pooled_values, lora_rank, null_r90)
    growth = None
    if len(steps_list) > 1:
        short = [c for c in cells if c["steps"] == steps_list[0]]
        long = [c for c in cells if c["steps"] == steps_list[-1]]
        growth = rank_growth_verdict([v for c in short for v in c["r90"]["per_seed"]],
                                     [v for c in long for v in c["r90"]["per_seed"]])
    results = {"analysis": "rank-grid", "model": model, "quick": quick, "steps_list": steps_list, "lrs": lrs,
               "seeds": seeds, "lora_ranks": sorted(lora_ranks), "cells": cells,
               "pooled_r90": pooled["interval"].as_dict("rank"),
               "pooled_r90_over_lora_rank": {str(r): mean_interval([v / r for v in pooled_values]).as_dict(
                   f"x LoRA rank {r}") for r in lora_ranks},
               "seed_null_r90": q(null_r90, "rank", "measured"),
               "how": "measured (median over weight matrices of r90 of W_tuned - W_base, float64; embeddings and "
                      "head apart, not included)",
               "wall_seconds": q(time.perf_counter() - started, "s", "measured")}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    images = [_plot_grid(cells, lora_ranks, out / "rank_grid.png")]
    section = rank_grid_section(results, pooled, growth, images)
    write_outputs(out, results, section)
    return results


def _plot_grid(cells: list[dict], lora_ranks, path: Path) -> Path:
    fig = figure(7.5, 4.5)
    ax = fig.add_subplot(1, 1, 1)
    for lr in sorted({c["lr"] for c in cells}):
        row = sorted((c for c in cells if c["lr"] == lr), key=lambda c: c["steps"])
        means = [c["r90"]["value"] for c in row]
        lows = [c["r90"]["value"] - (c["r90"]["low"] if c["r90"]["low"] is not None else c["r90"]["value"])
                for c in row]
        highs = [(c["r90"]["high"] if c["r90"]["high"] is not None else c["r90"]["value"]) - c["r90"]["value"]
                 for c in row]
        ax.errorbar([c["steps"] for c in row], means, yerr=[lows, highs], marker="o", capsize=3, label=f"lr {lr:g}")
    for r in lora_ranks:
        ax.axhline(r, color="grey", linestyle=":", linewidth=0.8)
        ax.axhline(NOT_LOW_RANK_MULTIPLE * r, color="black", linestyle="--", linewidth=0.6)
    ax.set_xlabel("optimizer steps")
    ax.set_ylabel("median r90 over matrices (measured; mean, 95% interval)")
    ax.set_title(f"Rank of the full fine-tune's update; dotted: LoRA ranks {list(lora_ranks)}, dashed: 10x", fontsize=9)
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def rank_grid_section(results: dict, pooled: dict, growth: dict | None, images: list[Path]):
    lora_rank = max(results["lora_ranks"])
    iv = pooled["interval"]
    multiples = ", ".join(f"{iv.mean / r:.2g}x rank {r}" for r in results["lora_ranks"])
    verdicts = [Verdict(
        "A full fine-tune's update is low-rank in LoRA's units, over training lengths and learning rates.",
        f"median r90 pooled over {len(results['cells'])} (steps, lr) cells x {results['seeds']} seeds: {iv.text(3)} "
        f"= {multiples} (measured); seed-difference null r90 {results['seed_null_r90']['value']:.0f}",
        pooled["supported"],
        f"judged on the pooled 95% interval: supported if at or below rank {lora_rank} and below the null; not "
        f"supported if at or above {NOT_LOW_RANK_MULTIPLE}x it (the bottom of Biderman et al.'s 10-100x)"
        + (f". {pooled['note']}" if pooled["note"] else ""),
        anchor("rank_low", pooled["supported"]), unresolved=pooled["unresolved"])]
    if growth is not None:
        verdicts.append(Verdict(
            "The update spreads into more directions as training goes on.",
            f"r90 after {results['steps_list'][-1]} minus after {results['steps_list'][0]} steps, per seed and "
            f"learning rate: {growth['interval'].text(3)} (measured)",
            growth["supported"], "judged on the 95% interval of the paired differences against 0"
            + (f". {growth['note']}" if growth["note"] else ""),
            anchor("rank_grows_with_training", growth["supported"]), unresolved=growth["unresolved"]))
    ranks = results["lora_ranks"]
    rows = [[c["steps"], f"{c['lr']:g}", f"{c['r90']['value']:.3g} [{fmt(c['r90']['low'])}, {fmt(c['r90']['high'])}]",
             *[f"{c['r90_over_lora_rank'][str(r)]['value']:.2g}x [{fmt(c['r90_over_lora_rank'][str(r)]['low'])}, "
               f"{fmt(c['r90_over_lora_rank'][str(r)]['high'])}]" for r in ranks],
             f"{c['seed_null_r90']['value']:.0f}", f"{c['max_rank']['value']}"] for c in results["cells"]]
    quick = " (quick: a tiny random model; the code path only)" if results["quick"] else ""
    body = "\n".join([
        f"Full fine-tunes of `{results['model']}`{quick} on the support task, trained here at each step count and "
        f"learning rate with seeds 0..{results['seeds'] - 1}. Per run, the median over weight matrices (token "
        "embeddings and head apart: not included) of r90, the smallest rank keeping 90% of ‖dW‖_F^2; per cell the "
        "mean over seeds with its 95% Student-t interval, as a multiple of each LoRA rank (Biderman et al. 2024's "
        "unit); the seed-difference null is r90 of dW(seed 0) - dW(seed 1).",
        "",
        md_table(["steps", "lr", "r90 (mean [95% CI])", *[f"r90 / LoRA rank {r}" for r in ranks],
                  "seed-difference null r90", "full rank"], rows),
        "",
        "Biderman et al. 2024 measured full fine-tuning on Llama-2-7B over billions of tokens and found ranks "
        "10-100x typical LoRA ranks; these runs are a few dozen steps, so read the trend over steps, not the level.",
    ])
    return Section(title="Intrinsic rank over training length and learning rate", verdicts=verdicts,
                   body_markdown=body, images=images, order=GRID_ORDER)


def quick_seed_runs(runs_dir: str, steps: int = 6) -> tuple[Path, Path]:
    """--quick: two full fine-tunes of the tiny model, seeds 0 and 1, same settings otherwise (reused when present),
    so the seed-difference null runs on every test machine."""
    config = base_train_config(model=QUICK_MODEL, steps=steps, runs_dir=runs_dir, quick=True)
    folders = [run_or_reuse(replace(config, method="full", lr=3e-3, seed=seed), "rank-full")[0] for seed in (0, 1)]
    return folders[0], folders[1]


def _median(values: list[float]) -> float:
    values = sorted(values)
    n = len(values)
    return values[n // 2] if n % 2 else 0.5 * (values[n // 2 - 1] + values[n // 2])


def _aggregate(matrices: list[dict], key) -> dict:
    groups: dict = {}
    for m in matrices:
        groups.setdefault(key(m), []).append(m)
    out = {}
    for k, ms in groups.items():
        r = len(ms[0]["energy"])
        out[k] = {
            "matrices": len(ms),
            "median_effective_rank": _median([m["effective_rank"] for m in ms]),
            "median_effective_rank_random": _median([m["random"]["effective_rank"] for m in ms]),
            "median_r50": _median([m["r50"] for m in ms]),
            "median_r90": _median([m["r90"] for m in ms]), "median_r99": _median([m["r99"] for m in ms]),
            "median_base_r90": _median([m["base"]["r90"] for m in ms]) if all("base" in m for m in ms) else None,
            "median_seed_null_r90": (_median([m["seed_null"]["r90"] for m in ms])
                                     if all(m.get("seed_null") for m in ms) else None),
            "median_r90_random": _median([m["random"]["r90"] for m in ms]),
            "median_r90_fraction": _median([m["r90"] / m["max_rank"] for m in ms]),
            "median_max_rank": _median([m["max_rank"] for m in ms]),
            "mean_energy": [sum(m["energy"][i] for m in ms) / len(ms) for i in range(r)],
            "mean_energy_random": [sum(m["random"]["energy"][i] for m in ms) / len(ms) for i in range(r)],
            "median_relative_norm": _median([m["relative_norm"] for m in ms if m["relative_norm"] is not None]
                                            or [0.0]),
        }
    return out


def _plot_energy(by_type: dict, overall: dict, max_rank: int, path: Path) -> Path:
    fig = figure(7.5, 4.5)
    ax = fig.add_subplot(1, 1, 1)
    r = list(range(1, max_rank + 1))
    for t, agg in by_type.items():
        ax.plot(r, agg["mean_energy"], label=f"{t} ({agg['matrices']})")
    ax.plot(r, overall["mean_energy_random"], color="black", linestyle="--", label="random Gaussian, same shapes")
    ax.set_xscale("log", base=2)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("rank r of the best approximation")
    ax.set_ylabel("share of ‖dW‖_F^2 kept (measured)")
    ax.set_title("How much of the full fine-tune's update a rank-r matrix can hold", fontsize=10)
    ax.legend(fontsize=7, ncol=2)
    return save_figure(fig, path)


def _plot_layers(matrices: list[dict], path: Path) -> Path:
    fig = figure(9, 4.2)
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    types = sorted({m["type"] for m in matrices if m["layer"] is not None}, key=list(MATRIX_TYPES.values()).index)
    for t in types:
        ms = sorted((m for m in matrices if m["type"] == t and m["layer"] is not None), key=lambda m: m["layer"])
        ax1.plot([m["layer"] for m in ms], [m["effective_rank"] / m["random"]["effective_rank"] for m in ms],
                 marker=".", label=t)
        ax2.plot([m["layer"] for m in ms], [m["r90"] / m["max_rank"] for m in ms], marker=".", label=t)
    ax1.set_ylabel("effective rank / random's (measured)")
    ax2.set_ylabel("r90 / min(m, n) (measured)")
    for ax in (ax1, ax2):
        ax.set_xlabel("layer")
        ax.set_ylim(bottom=0)
    ax1.legend(fontsize=7, ncol=2)
    fig.suptitle("Where the update is low-rank: per layer and matrix type (1.0 = as spread as noise)", fontsize=10)
    return save_figure(fig, path)


def _plot_spectra(matrices: list[dict], path: Path) -> Path:
    fig = figure(7.5, 4.2)
    ax = fig.add_subplot(1, 1, 1)
    biggest = sorted(matrices, key=lambda m: -m["norm"])[:6]
    for m in biggest:
        s = m["singular_values"]
        ax.plot(range(1, len(s) + 1), [x / s[0] for x in s], label=m["name"].replace("model.", "")[:40])
    ax.set_yscale("log")
    ax.set_xlabel("index i")
    ax.set_ylabel("s_i / s_1 (measured)")
    ax.set_title("Normalised singular values of the six largest updates", fontsize=10)
    ax.legend(fontsize=6)
    return save_figure(fig, path)


def rank_section(results: dict, images: list[Path]):
    overall, by_type = results["overall"], results["by_type"]
    e, er = overall["mean_energy"], overall["mean_energy_random"]
    r_hi, r8 = min(64, len(e)), min(8, len(e)) - 1
    frac = overall["median_r90_fraction"]
    lora_rank = max(results["lora_ranks"])
    seed_null = overall["median_seed_null_r90"]
    null_r90, null_name = ((seed_null, "seed-difference null") if seed_null is not None
                           else (overall["median_r90_random"], "Gaussian null"))
    supported = low_rank_verdict(overall["median_r90"], lora_rank, null_r90)
    multiples = ", ".join(f"{overall['median_r90'] / r:.1f}x rank {r}" for r in results["lora_ranks"])
    measured = (f"median r50/r90/r99 = {overall['median_r50']:.0f}/{overall['median_r90']:.0f}/"
                f"{overall['median_r99']:.0f} of {overall['median_max_rank']:.0f}; r90 = {multiples} (measured); "
                f"base weights' own r90 {fmt(overall['median_base_r90'])}; seed-difference null r90 "
                f"{fmt(seed_null) if seed_null is not None else 'not run (pass --null-run)'}; Gaussian "
                f"{overall['median_r90_random']:.0f}; rank 8 keeps {100 * e[r8]:.0f}% of ‖dW‖^2 "
                f"(noise {100 * er[r8]:.0f}%), rank {r_hi} keeps {100 * e[r_hi - 1]:.0f}% "
                f"(noise {100 * er[r_hi - 1]:.0f}%)")
    r99 = _median([a["median_r99"] / a["median_max_rank"] for a in by_type.values()])
    worst = sorted(by_type.items(), key=lambda kv: -kv[1]["median_r90_fraction"])
    where = ", ".join(f"{t} (r90 {100 * a['median_r90_fraction']:.0f}% of full rank)" for t, a in worst[:3])
    verdicts = [
        Verdict("A full fine-tune's update is low-rank in LoRA's units: a LoRA of the rank in use could hold it.",
                measured, supported,
                f"supported if median r90 <= {lora_rank} (the largest LoRA rank in use) and below the {null_name}'s "
                f"r90; not supported if >= {NOT_LOW_RANK_MULTIPLE}x that rank (Biderman et al.'s 10-100x); "
                f"not resolved in between, or when {NOT_LOW_RANK_MULTIPLE}x the rank is not below the null's r90 "
                f"({null_r90:.0f}). r90 is {100 * frac:.0f}% of full rank; median r99 = {100 * r99:.0f}%",
                anchor("rank_low", supported)),
        Verdict("The update is far more concentrated than an unstructured matrix.",
                f"median effective rank {overall['median_effective_rank']:.1f} vs "
                f"{overall['median_effective_rank_random']:.1f} for Gaussian noise of the same shapes; the top "
                f"direction alone holds {100 * e[0]:.1f}% vs {100 * er[0]:.1f}%",
                overall["median_effective_rank"] < 0.8 * overall["median_effective_rank_random"],
                anchor=anchor("rank_structured",
                              overall["median_effective_rank"] < 0.8 * overall["median_effective_rank_random"])),
    ]
    emb = results.get("embedding_rows")
    if emb and emb.get("rows"):
        concentrated = emb["r90"] < 0.8 * emb["random"]["r90"]
        verdicts.append(Verdict(
            "The token-embedding update (rows of tokens seen in training) is concentrated too.",
            f"{emb['name']}: {emb['rows']} rows ({emb['rows_rule']}); r50/r90/r99 = {emb['r50']}/{emb['r90']}/"
            f"{emb['r99']} of {emb['max_rank']} vs Gaussian rows r90 {emb['random']['r90']} (measured)",
            concentrated, "analysed apart from the other matrices: only seen rows get an input gradient",
            anchor("embedding_rows", concentrated)))
    rows = [[t, a["matrices"], f"{a['median_effective_rank']:.1f} ({a['median_effective_rank_random']:.1f})",
             f"{a['median_r90']:.0f} ({a['median_r90_random']:.0f})", f"{a['median_r99']:.0f}",
             f"{a['median_max_rank']:.0f}", f"{100 * a['mean_energy'][r8]:.1f}%",
             f"{100 * a['mean_energy'][r_hi - 1]:.1f}%", f"{a['median_relative_norm']:.2e}"]
            for t, a in by_type.items()]
    table = md_table(["type", "matrices", "effective rank (noise)", "r90 (noise)", "r99", "full rank",
                      "kept by rank 8", f"kept by rank {r_hi}", "‖dW‖ / ‖W‖"], rows)
    units = md_table(
        ["type", "r50 / r90 / r99", *[f"r90 / LoRA rank {r}" for r in results["lora_ranks"]], "base W's r90",
         "seed-difference null r90", "Gaussian r90"],
        [[t, f"{a['median_r50']:.0f} / {a['median_r90']:.0f} / {a['median_r99']:.0f}",
          *[f"{a['median_r90'] / r:.1f}x" for r in results["lora_ranks"]], fmt(a["median_base_r90"]),
          fmt(a["median_seed_null_r90"]) if a["median_seed_null_r90"] is not None else "not run",
          f"{a['median_r90_random']:.0f}"] for t, a in by_type.items()])
    body = "\n".join([
        f"Run `{results['run']}`: {results['method']} fine-tune of `{results['model']}` for {results['steps']} steps "
        f"(lr {results['lr']}). For each weight matrix, dW = W_tuned - W_base; its singular values give the effective "
        "rank (Roy & Vetterli 2007), r90/r99 (smallest rank keeping 90/99% of ‖dW‖_F^2) and the share of ‖dW‖^2 "
        "the best rank-r approximation keeps (Eckart-Young). Every figure is measured; in brackets, the same for a "
        "Gaussian matrix of equal shape (its spectrum does not depend on the norm). Medians over layers.",
        "",
        f"Least low-rank: {where}.",
        "",
        "In the literature's units (Biderman et al. 2024 report full fine-tuning's rank as a multiple of LoRA's): "
        "the rank holding 50/90/99% of ‖dW‖^2 over each LoRA rank in use, beside the base weights' own r90 and "
        "the r90 of the difference of two seeds' updates (what optimiser noise alone spreads; measured, medians).",
        "",
        units,
        "",
        table,
        "",
        "What this does and does not show: the head of the spectrum is concentrated, so a rank-r LoRA could express "
        "much of this particular update; the tail is spread like noise (AdamW normalises each coordinate of every "
        "step, one plausible source). Whether the tail matters for quality is what the LoRA rank sweep measures.",
    ])
    return Section(title="Intrinsic rank of a full fine-tune", verdicts=verdicts, body_markdown=body, images=images,
                   order=ORDER["rank"])


__all__ = ["analyze_rank", "analyze_rank_grid", "pooled_low_rank_verdict", "rank_growth_verdict", "low_rank_verdict", "quick_seed_runs", "spectrum_ranks", "effective_rank", "energy_curve", "rank_for", "matrix_stats", "random_reference", "classify"]
