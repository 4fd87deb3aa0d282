"""`tunegap experiment gap`: the pretraining/fine-tuning gap, measured on a real model.

Arms, all on the shipped support task and judged by the same task metrics:
  icl-k    the frozen base model with k solved tickets in the prompt (no training; every query pays)
  lora-rN  LoRA fine-tune for a fixed token budget
  full     full fine-tune for the same budget
  scratch  the same architecture from random weights, same data and budget (what the data alone builds)
  pretrain the base model's pretraining: not run, estimated from its published token count with the
           same formulas, on this machine's measured throughput and on a named GPU.
Every arm that trains is an ordinary run of `tunegap.train`, kept under <out>/arms/, and reused when
its config has not changed.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..io import atomic_write_json, atomic_write_text, read_jsonl
from ..predict import generation_seconds, minutes
from ..trainer import run_or_reuse

YEAR_S = 365.25 * 24 * 3600


@dataclass
class GapConfig:
    model: str = "smollm2-135m"
    out: str = ""  # default: runs/gap-<model>
    budget_tokens: int = 16_000
    ranks: tuple = (8,)
    k_shots: tuple = (0, 2, 8)
    seq_len: int = 128
    batch_size: int = 8
    # Each arm gets its own best learning rate, so no arm loses by a bad guess. Held-out loss (nats/token)
    # after the default 16k tokens on SmolLM2-135M, measured 2026-11-26 on this 2-core machine:
    #   LoRA r=8:  2e-3 -> 0.203, 5e-3 -> 0.043, 1e-2 -> 0.065
    #   full:      3e-5 -> 0.664, 1e-4 -> 0.079, 3e-4 -> 0.015, 1e-3 -> 0.027
    #   scratch:   6e-4 -> 4.91,  2e-3 -> 4.42,  5e-3 -> 4.40
    lr_lora: float = 5e-3
    lr_full: float = 3e-4
    lr_scratch: float = 5e-3
    eval_examples: int = 64
    generate_examples: int = 24
    max_new_tokens: int = 80
    gpu: str = "H100-SXM"
    gpu_price: float | None = None
    pretrain_tokens: float | None = None
    seed: int = 0
    quick: bool = False
    progress: bool = True

    @classmethod
    def quick_config(cls, **overrides) -> "GapConfig":
        """The smoke version the tests run: tiny model, tiny budget, same code path."""
        values = dict(model="tiny", budget_tokens=4_000, ranks=(8,), k_shots=(0, 1), seq_len=512, batch_size=4,
                      lr_lora=1e-2, lr_full=3e-3, lr_scratch=3e-3, eval_examples=8, generate_examples=4,
                      max_new_tokens=16, pretrain_tokens=2e12, quick=True, progress=False)
        values.update(overrides)
        return cls(**values)

    def folder(self) -> Path:
        return Path(self.out or f"runs/gap-{Path(self.model).name}")


QUICK_CORPUS_MODULES = ("json", "collections", "textwrap", "argparse", "pathlib", "email", "csv", "string",
                        "logging", "random", "statistics", "difflib", "heapq", "shutil", "tempfile", "zipfile")


def quick_pretrained_base(config: GapConfig) -> str:
    """--quick's base model: the tiny architecture briefly pretrained on English text nobody here wrote (the
    standard library's own docstrings, present on every machine), kept under <out>/base and reused.

    A random tiny preset as the base would make the full and scratch arms the same run; with this base, the
    scratch arm (same architecture, fresh weights) has to learn the bytes of English from the task data alone."""
    import importlib
    import inspect

    from ..config import TrainConfig

    folder = config.folder() / "base"
    corpus = folder / "stdlib-docstrings.txt"
    if not corpus.is_file():
        docs = []
        for name in QUICK_CORPUS_MODULES:
            module = importlib.import_module(name)
            docs += [inspect.getdoc(obj) or "" for obj in [module, *vars(module).values()]
                     if inspect.getmodule(obj) is module]
        atomic_write_text(corpus, "\n\n".join(d for d in docs if d))
    pretrain = TrainConfig(model=config.model, data=str(corpus), method="full", init="scratch", seq_len=256,
                           batch_size=8, max_steps=40, lr=3e-3, warmup_steps=2, eval_examples=4, generate_examples=0,
                           runs_dir=str(folder), name="pretrain", seed=config.seed, progress=False, precision="fp32",
                           threads=1, task_metrics="off", forgetting="off")
    run_folder, _ = run_or_reuse(pretrain, name="pretrain", what="quick base")
    return str(run_folder / "model")


def _train_config(config: GapConfig, arms_dir: Path, name: str, **overrides):
    from ..config import TrainConfig

    values = dict(model=config.model, data="support", seq_len=config.seq_len, batch_size=config.batch_size,
                  budget_tokens=config.budget_tokens, epochs=1.0, eval_examples=config.eval_examples,
                  generate_examples=config.generate_examples, runs_dir=str(arms_dir), name=name, seed=config.seed,
                  progress=config.progress, gpu=config.gpu, warmup_steps=2, eval_every=0,
                  task_metrics="on",  # the verdicts compare the arms' task quality
                  forgetting="off")  # `tunegap analyze forgetting` measures it; here it would double the run time
    if config.gpu_price is not None:
        values["gpu_price"] = config.gpu_price
    values.update(overrides)
    return TrainConfig(**values)


def _arm_configs(config: GapConfig, arms_dir: Path) -> dict:
    """The training arms' run settings, by arm name."""
    arms = {f"lora-r{r}": _train_config(config, arms_dir, f"lora-r{r}", method="lora", rank=r, alpha=2.0 * r,
                                        lr=config.lr_lora) for r in config.ranks}
    arms["full"] = _train_config(config, arms_dir, "full", method="full", lr=config.lr_full)
    arms["scratch"] = _train_config(config, arms_dir, "scratch", method="full", init="scratch", lr=config.lr_scratch)
    return arms


def predict_arms(config: GapConfig, arms_dir: Path) -> dict:
    """Each arm's predicted seconds (estimates, `tunegap.predict`), before any arm starts: a training arm's
    setup (measured while predicting), training and evaluations; the ICL arm's generation at each k, from an
    fp32 probe of the base model (its replies are decoded in fp32) with the shots as a shared prefix."""
    import contextlib

    from ..data.render import tokenize_prompt
    from ..data.support import generate_support
    from ..evaluate import few_shot
    from ..objectives import Context
    from ..predict import Forecast, heldout_seconds, probe_forward
    from ..generation import common_prefix_length
    from ..trainer import Trainer

    predicted, full = {}, None
    for name, train_config in _arm_configs(config, arms_dir).items():
        trainer = Trainer(train_config)
        parts = trainer.predict()
        predicted[name] = {"seconds": sum(parts.values()), "parts": parts}
        full = trainer if name == "full" else full  # its plain model probes the ICL arm's fp32 decoding too
    fp32 = Context(full.ctx.model, full.ctx.base, full.method, full.ctx.pad_id, contextlib.nullcontext)
    forecast = Forecast(probe_forward(fp32, config.batch_size, round(full.mean_tokens), full.shape), 0.0, full.ctx.model,
                        full.ctx.pad_id)
    train_records, eval_records = generate_support()
    records = eval_records[:config.generate_examples]
    held = full.data.eval
    parts = {"held-out loss": heldout_seconds(forecast.probe, full.shape, examples=len(held),
                                              tokens_per_example=sum(map(len, held)) / max(len(held), 1))}
    for k in config.k_shots:
        prompts = [tokenize_prompt(full.tokenizer, few_shot(r["messages"], train_records[:k])) for r in records]
        parts[f"{k}-shot"] = generation_seconds(
            forecast.probe, forecast.decoding(len(prompts)), full.shape, prompts=len(prompts),
            prompt_tokens=sum(map(len, prompts)) / len(prompts), shared_prefix_tokens=common_prefix_length(prompts),
            max_new_tokens=config.max_new_tokens)
    predicted["icl"] = {"seconds": sum(parts.values()), "parts": parts}
    return predicted


def print_predictions(predicted: dict) -> None:
    total = sum(p["seconds"] for p in predicted.values())
    arms = ", ".join(f"{name} {minutes(p['seconds'])}" for name, p in predicted.items())
    print(f"tunegap: predicted (estimate, from probes of the model on this machine): {arms}; all arms "
          f"{minutes(total)}", flush=True)


def run_arm(train_config) -> dict:
    """Train one arm, or reuse its finished ledger when the settings are unchanged (`trainer.run_or_reuse`)."""
    return run_or_reuse(train_config, name=train_config.name, what="arm")[1]


def icl_arms(config: GapConfig, shape) -> dict:
    """The base model, frozen, with k solved tickets in the prompt: quality and per-query inference cost."""
    from ..costs.flops import forward_flops, generation_flops
    from ..costs.hardware import measure_peaks
    from ..data.sources import prepare
    from ..data.support import generate_support
    from ..evaluate import support_metrics
    from ..models import load_model
    from ..methods import Full
    from ..models import base_model
    from ..objectives import Context, heldout_loss
    from ..precision import autocast_factory

    model, tokenizer = load_model(config.model, seed=config.seed)
    precision = measure_peaks().best_precision
    autocast = autocast_factory(precision)
    train_records, eval_records = generate_support()
    records = eval_records[:config.generate_examples]
    held = prepare(_train_config(config, Path("."), "icl"), tokenizer).eval
    ctx = Context(model, base_model(model), Full(), tokenizer.pad_token_id, autocast)
    zero_shot_loss = heldout_loss(ctx, held, config.batch_size, config.seq_len)
    arms = {}
    for k in config.k_shots:
        metrics = support_metrics(model, tokenizer, records, shots=train_records[:k],
                                  max_new_tokens=config.max_new_tokens)  # no autocast: see callbacks/task_metrics.py
        per_query = generation_flops(shape, round(metrics["mean_prompt_tokens"]), max(1, round(metrics["mean_new_tokens"])))
        # with a prompt cache the shared prefix (system text + shots) is encoded once for all queries: per query,
        # its forward pass is saved; attending to it from each query's own tokens is not
        cached = per_query - forward_flops(shape, sequences=1, seq_len=metrics["shared_prefix_tokens"], logit_tokens=0)
        arms[f"icl-{k}"] = {
            "k": k, "metrics": {key: v for key, v in metrics.items() if key != "samples"},
            "samples": metrics["samples"],
            "eval_loss": zero_shot_loss if k == 0 else None,
            "inference_flops_per_query": per_query,
            "inference_flops_per_query_cached": cached,
            "shared_prefix_tokens": metrics["shared_prefix_tokens"],
            "seconds_per_query": metrics["generation_seconds"] / max(len(records), 1),
            "precision": precision,
        }
    return arms


def _loss_curve(ledger_path: Path) -> list[dict]:
    rows = read_jsonl(Path(ledger_path).parent / "metrics.jsonl")
    return [{"step": r["step"], "loss": r["loss"], "flops": r["flops"], "tokens": r["tokens"]} for r in rows if "loss" in r]


def _value(ledger: dict, key: str):
    return ledger["costs"][key]["value"]


def measured_gap(pretrain: dict, ledger: dict) -> dict:
    """Pretraining (estimate) over one measured fine-tune, axis by axis.

    FLOPs ratio = tokens ratio x FLOPs-per-token ratio exactly; steps, trainable parameters and
    optimizer-state bytes are separate axes (they shape memory and wall-clock, not the FLOP count).
    """
    pc, fc = pretrain["costs"], ledger["costs"]
    tokens = pc["tokens"]["value"] / fc["tokens"]["value"]
    flops = pc["flops_total"]["value"] / fc["flops_total"]["value"]
    per_token = (pc["flops_total"]["value"] / pc["tokens"]["value"]) / (fc["flops_total"]["value"] / fc["tokens"]["value"])
    return {
        "flops": flops,
        "cost_multipliers": {"tokens": tokens, "flops_per_token": per_token},
        "product_check": tokens * per_token / flops,
        "other_axes": {
            "optimizer_steps": pc["optimizer_steps"]["value"] / max(fc["optimizer_steps"]["value"], 1),
            "params_trainable": pc["params_trainable"]["value"] / max(fc["params_trainable"]["value"], 1),
            "optimizer_state_bytes": pc["optimizer_state_bytes"]["value"] / max(fc["optimizer_state_bytes"]["value"], 1),
        },
    }


def pretraining_estimate(config: GapConfig, shape, measured_flops_per_s: float) -> dict:
    """The base model's pretraining, priced by the estimator on this machine and on a named GPU."""
    from ..costs.catalog import EstimateError, cpu_device, resolve_device, resolve_model
    from ..costs.memory import TrainSetup
    from ..estimate import estimate_run
    from ..methods import Full

    tokens = config.pretrain_tokens
    source = "given (--pretrain-tokens)"
    preset = None
    if tokens is None:
        try:
            _, preset = resolve_model(Path(config.model).name)
        except EstimateError:
            preset = None
        if preset is None or not preset.pretrain_tokens:
            raise EstimateError(f"{config.model}: no published pretraining token count; pass --pretrain-tokens")
        tokens, source = preset.pretrain_tokens, preset.source
    seq_len = (preset.pretrain_seq_len if preset and preset.pretrain_seq_len else 2048)
    batch_tokens = (preset.pretrain_batch_tokens if preset and preset.pretrain_batch_tokens else 4e6)
    rows = max(1, math.ceil(tokens / seq_len))
    steps = max(1, math.ceil(tokens / batch_tokens))
    gpu = resolve_device(config.gpu, price=config.gpu_price)
    on_gpu = estimate_run(shape, Full(), tokens=tokens, sequences=rows, seq_len=seq_len, steps=steps,
                          setup=TrainSetup(precision="bf16-mixed", micro_batch=8), hardware=gpu, label="pretrain")
    seconds_here = on_gpu["costs"]["flops_total"]["value"] / measured_flops_per_s
    return {"tokens": tokens, "source": source, "seq_len": seq_len, "batch_tokens": batch_tokens,
            "on_gpu": on_gpu, "here_seconds": seconds_here, "here_years": seconds_here / YEAR_S,
            "here_how": "estimate: pretraining FLOPs (formula) / this machine's achieved FLOP/s in the full "
                        "fine-tune arm (measured)",
            "cpu_device": cpu_device().name}


def break_even(train_flops: float, icl_extra_flops_per_query: float) -> float | None:
    """Queries after which a one-time fine-tune costs fewer FLOPs than longer few-shot prompts (None: never)."""
    if icl_extra_flops_per_query <= 0:
        return None
    return train_flops / icl_extra_flops_per_query


def run_gap_experiment(config: GapConfig) -> dict:
    from ..costs.shape import ModelShape
    from ..models import load_model

    if config.quick and config.model == "tiny":
        from dataclasses import replace

        config = replace(config, model=quick_pretrained_base(config))
    out = config.folder()
    arms_dir = out / "arms"
    arms_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    shape = ModelShape.from_hf_config(load_model(config.model, seed=config.seed)[0].config)

    predicted = predict_arms(config, arms_dir)
    print_predictions(predicted)
    measured = {}
    print("tunegap: arm 1/5 in-context learning (frozen base model, k solved examples in the prompt)", flush=True)
    arm_started = time.perf_counter()
    icl = icl_arms(config, shape)
    measured["icl"] = time.perf_counter() - arm_started
    trained = {}
    titles = {"full": "arm 3/5 full fine-tune", "scratch": "arm 4/5 same architecture from random weights (scratch)"}
    for name, train_config in _arm_configs(config, arms_dir).items():
        print(f"tunegap: {titles.get(name, f'arm 2/5 LoRA rank {train_config.rank}')}", flush=True)
        arm_started = time.perf_counter()
        trained[name] = run_arm(train_config)
        measured[name] = time.perf_counter() - arm_started
    print("tunegap: predicted vs measured per arm: " + ", ".join(
        f"{name} {minutes(predicted[name]['seconds'])} vs {minutes(measured[name])}" for name in measured), flush=True)
    print("tunegap: arm 5/5 pretraining of the base model (estimated, not run)", flush=True)
    full = trained["full"]
    achieved = _value(full, "achieved_flops_per_s")
    pretrain = pretraining_estimate(config, shape, achieved)

    lora_name = f"lora-r{config.ranks[0]}"
    zero = icl[f"icl-{min(config.k_shots)}"]
    best_k = max(config.k_shots)
    extra_per_query = icl[f"icl-{best_k}"]["inference_flops_per_query"] - zero["inference_flops_per_query"]
    extra_cached = (icl[f"icl-{best_k}"].get("inference_flops_per_query_cached", 0.0)
                    - zero.get("inference_flops_per_query_cached", 0.0))
    results = {
        "schema": 1,
        "experiment": "gap",
        "config": {**asdict(config), "folder": str(out)},
        "model": {"name": config.model, "shape": shape.to_dict()},
        "icl": icl,
        "trained": {name: {"ledger_path": str(arms_dir / name / "ledger.json"), "costs": ledger["costs"],
                           "metrics": {k: v for k, v in ledger["metrics"].items() if k != "samples"},
                           "samples": ledger["metrics"].get("samples", []), "precision": ledger["precision"],
                           "loss_curve": _loss_curve(arms_dir / name / "ledger.json")}
                    for name, ledger in trained.items()},
        "pretrain": {k: v for k, v in pretrain.items() if k != "on_gpu"} | {"costs": pretrain["on_gpu"]["costs"],
                                                                            "assumptions": pretrain["on_gpu"]["assumptions"],
                                                                            "hardware": pretrain["on_gpu"]["hardware"]},
        "gap": {name: measured_gap(pretrain["on_gpu"], ledger) for name, ledger in trained.items()
                if name != "scratch"},
        "break_even": {
            "k": best_k, "arm": lora_name,
            "train_flops": _value(trained[lora_name], "flops_total"),
            "icl_extra_flops_per_query": extra_per_query,
            "queries": break_even(_value(trained[lora_name], "flops_total"), extra_per_query),
            "icl_extra_flops_per_query_cached": extra_cached,
            "queries_cached": break_even(_value(trained[lora_name], "flops_total"), extra_cached),
        },
        "wall_seconds": time.perf_counter() - started,
        "durations": {name: {"predicted_s": predicted[name]["seconds"], "predicted_parts_s": predicted[name]["parts"],
                             "measured_s": measured[name]} for name in measured},
    }
    from .gap_experiment_report import verdicts, write_gap_report

    results["verdicts"] = verdicts(results)
    atomic_write_json(out / "results.json", results)
    write_gap_report(out, results)
    return results
