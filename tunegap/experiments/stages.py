"""`tunegap experiment stages`: the post-training ladder, each stage's cost measured beside pretraining's.

The essay: "Modern instruction-tuned and aligned models are produced by running several fine-tuning stages on
top of a pretrained checkpoint ... The whole pipeline only makes economic sense because each stage after
pretraining is dramatically cheaper than the stage before."

Stages, each an ordinary run of the one trainer starting from the previous stage's trained model
(`--init-from`), kept under <out>/stages/ and reused when its settings have not changed:
  sft   LoRA supervised fine-tuning on the shipped support task (next-token loss on the replies)
  dpo   DPO (Rafailov et al. 2023) on the support task's preference pairs, from the SFT model
  rl    GRPO (Shao et al. 2024) with the task's own checks as a verifiable reward, from the DPO model
  pretraining  not run: estimated from the base model's published token count with the same formulas.
A stage's FLOPs are everything it spent to train: the update steps (formula, checked against counted FLOPs),
plus DPO's reference log-probs when they were precomputed, plus RL's sampling and reference passes (formula).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..config import TrainConfig
from ..costs.shape import ModelShape
from ..io import atomic_write_json, write_figure
from ..models import load_model
from ..report import Section, Verdict, write_report
from ..trainer import run_or_reuse
from .gap_experiment import GapConfig, pretraining_estimate

# "Dramatically cheaper": at least one order of magnitude fewer FLOPs than the stage before. Fixed before any
# result came in; the verdict names every step of the ladder that misses it.
DRAMATIC = 10.0
STAGES = ("sft", "dpo", "rl")


@dataclass
class StagesConfig:
    model: str = "smollm2-135m"
    out: str = ""  # default: runs/stages-<model>
    method: str = "lora"
    sft_tokens: int = 16_000
    sft_lr: float = 5e-3  # the gap experiment's swept LoRA learning rate (experiments/gap_experiment.py)
    # DPO learning rate, swept on SmolLM2-135M from this ladder's SFT model, 12 LoRA steps of 8 pairs (held-out
    # pairs and the first 16 held-out tickets, 2026-12-02): 5e-5 -> reward accuracy 0.72, refusal F1 1.0;
    # 1e-4 -> 0.97, refusal F1 1.0; 2e-4 -> 1.0, refusal F1 0.67; 5e-4 -> 1.0, refusal F1 0.0 (style 0.75)
    dpo_steps: int = 12
    dpo_lr: float = 1e-4
    # GRPO: lr 5e-4 raised the bare SmolLM2's held-out reward 0.244 -> 0.288 in 8 steps (LoRA, 4 x 4 replies);
    # from this ladder's DPO model the reward is already 1.0 on 16 held-out tickets (lr 5e-4 and 1e-4 alike)
    rl_steps: int = 8
    rl_lr: float = 5e-4
    rl_prompts: int = 4  # prompts per RL step, each sampled group_size times
    group_size: int = 4
    max_new_tokens: int = 96  # the task's replies run to about 80 tokens: fewer cuts the sign-off and fails style
    seq_len: int = 256
    batch_size: int = 8
    eval_examples: int = 32
    generate_examples: int = 16
    gpu: str = "H100-SXM"
    gpu_price: float | None = None
    pretrain_tokens: float | None = None
    seed: int = 0
    quick: bool = False
    progress: bool = True

    @classmethod
    def quick_config(cls, **overrides) -> "StagesConfig":
        """The smoke version the tests run: the same code path on a tiny random model."""
        values = dict(model="tiny", sft_tokens=4_000, sft_lr=1e-2, dpo_steps=3, dpo_lr=1e-3, rl_steps=2,
                      rl_lr=1e-3, rl_prompts=2, group_size=2, max_new_tokens=8, seq_len=512, batch_size=4,
                      eval_examples=4, generate_examples=2, pretrain_tokens=2e12, quick=True, progress=False)
        values.update(overrides)
        return cls(**values)

    def folder(self) -> Path:
        return Path(self.out or f"runs/stages-{Path(self.model).name}")


def stage_configs(config: StagesConfig, runs_dir: Path) -> dict[str, TrainConfig]:
    """The three runs, each starting from the one before it (run names double as --init-from)."""
    common = dict(model=config.model, method=config.method, data="support", seq_len=config.seq_len,
                  eval_examples=config.eval_examples, generate_examples=config.generate_examples,
                  runs_dir=str(runs_dir), seed=config.seed, progress=config.progress, gpu=config.gpu,
                  warmup_steps=1, forgetting="off", task_metrics="on", threads=1 if config.quick else 0,
                  **({"gpu_price": config.gpu_price} if config.gpu_price is not None else {}))
    return {
        "sft": TrainConfig(**common, objective="next-token", batch_size=config.batch_size,
                           budget_tokens=config.sft_tokens, lr=config.sft_lr, alpha=16.0),
        "dpo": TrainConfig(**common, objective="dpo", init_from="sft", batch_size=config.batch_size,
                           max_steps=config.dpo_steps, lr=config.dpo_lr),
        "rl": TrainConfig(**common, objective="grpo", init_from="dpo", batch_size=config.rl_prompts,
                          group_size=config.group_size, max_new_tokens=config.max_new_tokens,
                          max_steps=config.rl_steps, lr=config.rl_lr),
    }


def _value(costs: dict, key: str):
    entry = costs.get(key)
    return entry["value"] if isinstance(entry, dict) else entry


def stage_flops(ledger: dict) -> dict:
    """Everything a stage spent to train, split by what it was spent on (FLOPs, formula)."""
    metrics = ledger.get("metrics", {})
    parts = {"update": _value(ledger["costs"], "flops_total")}
    if "dpo_reference_flops" in metrics and "in each step" not in str(metrics.get("dpo_reference", "")):
        parts["reference (precomputed)"] = metrics["dpo_reference_flops"]
    phases = metrics.get("rl_phases", {})
    for key, label in (("generation_flops", "sampling"), ("reference_flops", "reference")):
        if key in phases:
            parts[label] = _value(phases, key)
    return {"parts": parts, "total": sum(v for v in parts.values() if v)}


def stage_row(name: str, ledger: dict) -> dict:
    costs, metrics = ledger["costs"], ledger.get("metrics", {})
    flops = stage_flops(ledger)
    update = _value(costs, "flops_total") or 1.0
    dollars = _value(costs, "dollars")
    return {
        "stage": name, "objective": ledger["config"]["objective"], "flops": flops,
        "tokens": _value(costs, "tokens"), "steps": _value(costs, "optimizer_steps"),
        "params_trainable": _value(costs, "params_trainable"), "wall_time_s": _value(costs, "wall_time_s"),
        # the ledger prices its update FLOPs on the named GPU; the stage's other FLOPs at the same rate
        "dollars": None if dollars is None else dollars * flops["total"] / update,
        "metrics": {k: metrics.get(k) for k in ("eval_loss", "style_adherence", "product_accuracy", "refusal_f1",
                                                "eval_reward_accuracy", "eval_reward_before", "eval_reward")
                    if metrics.get(k) is not None},
    }


def ladder_verdict(flops: dict[str, float]) -> dict:
    """Each stage against the one before it (pretraining first): supported when every step of the ladder is
    at least DRAMATIC times cheaper in FLOPs; otherwise the verdict names the steps that are not."""
    names = list(flops)
    ratios = {f"{a}/{b}": flops[a] / flops[b] for a, b in zip(names, names[1:]) if flops[b]}
    missed = [pair for pair, ratio in ratios.items() if ratio < DRAMATIC]
    measured = ", ".join(f"{pair} {ratio:.3g}x" for pair, ratio in ratios.items())
    if not missed:
        return asdict(Verdict("each stage after pretraining is dramatically cheaper than the stage before",
                              f"FLOPs ratios {measured} (all >= {DRAMATIC:g}x)", True))
    return asdict(Verdict("each stage after pretraining is dramatically cheaper than the stage before",
                          f"FLOPs ratios {measured}; under {DRAMATIC:g}x: {', '.join(missed)}", False,
                          "the stages' own budgets decide the later steps of the ladder; pretraining's dwarfs all"))


def run_stages_experiment(config: StagesConfig) -> dict:
    out = config.folder()
    runs_dir = out / "stages"
    started = time.perf_counter()
    ledgers = {}
    for index, (name, train_config) in enumerate(stage_configs(config, runs_dir).items(), start=1):
        print(f"tunegap: stage {index}/3 {name} ({train_config.objective})", flush=True)
        ledgers[name] = run_or_reuse(train_config, name=name, what="stage")[1]
    shape = ModelShape.from_hf_config(load_model(config.model, seed=config.seed)[0].config)
    achieved = _value(ledgers["sft"]["costs"], "achieved_flops_per_s")
    gap_like = GapConfig(model=config.model, gpu=config.gpu, gpu_price=config.gpu_price,
                         pretrain_tokens=config.pretrain_tokens)
    pretrain = pretraining_estimate(gap_like, shape, achieved)
    rows = {name: stage_row(name, ledger) for name, ledger in ledgers.items()}
    flops = {"pretraining": _value(pretrain["on_gpu"]["costs"], "flops_total"),
             **{name: row["flops"]["total"] for name, row in rows.items()}}
    results = {
        "schema": 1, "experiment": "stages", "config": {**asdict(config), "folder": str(out)},
        "pretraining": {"tokens": pretrain["tokens"], "source": pretrain["source"], "flops": flops["pretraining"],
                        "dollars": _value(pretrain["on_gpu"]["costs"], "dollars"),
                        "here_years": pretrain["here_years"], "how": "estimate"},
        "stages": rows,
        "verdicts": [ladder_verdict(flops)],
        "wall_seconds": time.perf_counter() - started,
    }
    atomic_write_json(out / "results.json", results)
    write_stages_report(out, results)
    return results


# --------------------------------------------------------------------------------------------- the report

def _fmt(value, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and (abs(value) >= 1e4 or 0 < abs(value) < 1e-2):
        return f"{value:.3g}{unit}"
    return f"{value:,.3g}{unit}" if isinstance(value, float) else f"{value:,}{unit}"


def stages_table(results: dict) -> str:
    pre = results["pretraining"]
    lines = ["| stage | tokens | steps | trainable params | FLOPs | wall time | dollars | after it |",
             "|---|---|---|---|---|---|---|---|",
             f"| pretraining (estimate) | {_fmt(pre['tokens'])} | - | all | {_fmt(pre['flops'])} (formula) | "
             f"{_fmt(pre['here_years'])} years on this machine (estimate) | ${_fmt(pre['dollars'])} (estimate) | - |"]
    for name, row in results["stages"].items():
        after = ", ".join(f"{k} {_fmt(v)}" for k, v in row["metrics"].items())
        split = " + ".join(f"{k} {_fmt(v)}" for k, v in row["flops"]["parts"].items())
        lines.append(f"| {name} ({row['objective']}) | {_fmt(row['tokens'])} (measured) | {row['steps']} | "
                     f"{_fmt(row['params_trainable'])} | {_fmt(row['flops']['total'])} (formula: {split}) | "
                     f"{_fmt(row['wall_time_s'])} s (measured) | ${_fmt(row['dollars'])} (estimate) | {after} |")
    return "\n".join(lines)


def stages_chart(results: dict, path: Path) -> Path:
    """FLOPs per stage on a log scale: the eye reads the ladder's steps as distances."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = ["pretraining"] + list(results["stages"])
    values = [results["pretraining"]["flops"]] + [row["flops"]["total"] for row in results["stages"].values()]
    fig = Figure(figsize=(7, 4), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.bar(names, values, color=["#888"] + ["#3a7"] * (len(names) - 1))
    ax.set_yscale("log")
    ax.set_ylabel("training FLOPs (log scale; pretraining estimated)")
    for i, v in enumerate(values):
        ax.text(i, v, f"10^{math.log10(v):.1f}", ha="center", va="bottom")
    fig.tight_layout()
    return write_figure(fig, path)  # atomic, and never through a planted symbolic link


def write_stages_report(folder: Path, results: dict) -> Path:
    """report.html (self-contained), report.md, the chart and section.json in the experiment folder."""
    chart = stages_chart(results, folder / "stages_flops.png")
    body = "\n\n".join([
        "Each stage starts from the one before it (`--init-from`); FLOPs are formula counts of everything the "
        "stage spent to train (update steps, precomputed reference passes, RL sampling), the update's checked "
        "against counted FLOPs in each run's ledger. Pretraining is estimated from the published token count.",
        stages_table(results)])
    section = Section(title="The post-training ladder, measured", verdicts=[Verdict(**v) for v in results["verdicts"]],
                      body_markdown=body, images=[chart], order=55)
    return write_report(folder, [section], title="tunegap: the cost of each post-training stage")
