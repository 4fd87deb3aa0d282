"""`tunegap experiment gap`: the pretraining/fine-tuning gap, measured on a real model.

Arms, all on one shipped task (`--task support|docstrings`) and judged by that task's own scorer:
  icl-k    the frozen base model with k solved examples from the task's train split in the prompt (no
           training; every query pays); each seed draws its own k shots
  lora-rN  LoRA fine-tune for a fixed token budget
  full     full fine-tune for the same budget
  scratch  the same architecture from random weights, same data and budget (what the data alone builds)
  pretrain the base model's pretraining: not run, estimated from its published token count with the
           same formulas, on this machine's measured throughput and on a named GPU.
Every arm that trains is an ordinary run of `tunegap.train`, kept under <out>/arms/<arm>-seed<k> (with
`--lr-factors`, <arm>-lr<rate>-seed<k>), and reused
when its config has not changed. Each training arm runs `--seeds N` seeds (seed, seed+1, ...): every number the
report quotes is a mean over seeds with a 95% Student-t interval (`tunegap.stats`), and every verdict with a
threshold is judged on that interval. With `--lr-factors 0.3,1,3` each trained arm's learning rate is chosen
on the task's validation split (seed 0 at each multiple of the default; the lowest val_loss wins and is seed 0's
run), so the test split the report quotes never chose anything. Without it each task's rates are TASK_RATES,
which that choice made once (evidence/run.sh, 2026-12-02).

Wall time on the default model, --seeds 3 --lr-factors 0.3,1,3 (five runs per trained arm): 16.6 min (support)
and 17.4 min (docstrings), measured 2026-12-02 on a 2-core host at fp32 336-362 / bf16 2,178-2,455 GFLOP/s
(evidence/walltimes.tsv); without --lr-factors an arm trains three of those five runs. A slower CPU takes
longer, and the command prints its own per-arm prediction before the first arm.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import math
import random
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from ..config import ConfigError, TrainConfig
from ..costs.catalog import EstimateError, cpu_device, resolve_device, resolve_model
from ..costs.flops import forward_flops, generation_flops
from ..costs.hardware import measure_peaks
from ..costs.memory import TrainSetup
from ..costs.shape import ModelShape
from ..data.render import tokenize_prompt
from ..data.sources import prepare
from ..data.tasks import TASKS
from ..estimate import estimate_run
from ..evaluate import few_shot, task_metrics
from ..generation import common_prefix_length
from ..io import atomic_write_json, atomic_write_text, read_jsonl
from ..methods import Full
from ..models import base_model, load_model
from ..objectives import Context, heldout_loss
from ..precision import autocast_factory
from ..predict import Forecast, generation_seconds, heldout_seconds, minutes, probe_forward
from ..stats import mean_interval
from ..trainer import Trainer, run_or_reuse
from .gap_experiment_report import verdicts, write_gap_report

YEAR_S = 365.25 * 24 * 3600


@dataclass
class GapConfig:
    model: str = "smollm2-135m"
    out: str = ""  # default: runs/gap-<model>
    budget_tokens: int = 16_000
    ranks: tuple = (8,)
    k_shots: tuple = (0, 2, 8)
    task: str = "support"  # a shipped task (tunegap.data.tasks): support or docstrings
    seeds: int = 3  # every training arm runs seeds seed, seed+1, ...; numbers are means with 95% intervals
    seq_len: int = 0  # 0: the task's own (TASK_SEQ_LEN)
    batch_size: int = 8
    # Each arm's learning rate; None: the task's own (TASK_RATES, chosen on its validation split).
    lr_lora: float | None = None
    lr_full: float | None = None
    lr_scratch: float | None = None
    # More than one factor: each trained arm's rate is chosen on the validation split. Its first seed trains at
    # every factor x the rate above, the lowest val_loss wins, and all seeds run at that rate (the winning
    # candidate is seed 0's run). The test split never takes part in the choice.
    lr_factors: tuple = (1.0,)
    eval_examples: int = 64
    val_examples: int = 32  # validation examples each arm's val_loss is measured on
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
                      lr_lora=1e-2, lr_full=3e-3, lr_scratch=3e-3, eval_examples=8, val_examples=8,
                      generate_examples=4, max_new_tokens=16, pretrain_tokens=2e12, seeds=2, quick=True,
                      progress=False)
        values.update(overrides)
        return cls(**values)

    def folder(self) -> Path:
        task = "" if self.task == "support" else f"-{self.task}"
        return Path(self.out or f"runs/gap-{Path(self.model).name}{task}")

    def sequence_length(self) -> int:
        return self.seq_len or TASK_SEQ_LEN[self.task]

    def seed_list(self) -> list[int]:
        return [self.seed + i for i in range(self.seeds)]

    def check(self) -> "GapConfig":
        if self.task not in TASKS:
            raise ConfigError(f"--task: one of {', '.join(TASKS)}, got {self.task!r}")
        if not isinstance(self.seeds, int) or self.seeds < 1:
            raise ConfigError(f"--seeds: a positive integer, got {self.seeds!r}")
        if not self.lr_factors or any(not f > 0 for f in self.lr_factors) or len(set(self.lr_factors)) < len(
                self.lr_factors):
            raise ConfigError(f"--lr-factors: distinct positive numbers, got {self.lr_factors!r}")
        return self

    def chooses_rates(self) -> bool:
        return len(self.lr_factors) > 1

    def default_rates(self) -> dict:
        """Each training arm's learning rate before any choice (the fields above; TASK_RATES where unset), by
        arm name."""
        own = TASK_RATES[self.task]
        lora, full, scratch = (own[arm] if rate is None else rate for arm, rate in
                               (("lora", self.lr_lora), ("full", self.lr_full), ("scratch", self.lr_scratch)))
        return {**{f"lora-r{r}": lora for r in self.ranks}, "full": full, "scratch": scratch}


TASK_SEQ_LEN = {"support": 128, "docstrings": 256}  # a support ticket and reply fit in 128; a signature in 256

# Each task's rates, chosen on its validation split (32 examples, seed 0) by `experiment gap --lr-factors 0.3,1,3`
# around the earlier defaults (LoRA 5e-3, full 3e-4, scratch 5e-3), 2026-12-02; every candidate's validation loss
# is in evidence/gap-<task>/results.json. Several won at an edge of that grid (docstrings all three, support full
# and scratch), so a wider grid may find better ones; the test split never took part.
TASK_RATES = {"support": {"lora": 5e-3, "full": 9e-4, "scratch": 1.5e-3},
              "docstrings": {"lora": 1.5e-3, "full": 9e-5, "scratch": 1.5e-3}}


QUICK_CORPUS_MODULES = ("json", "collections", "textwrap", "argparse", "pathlib", "email", "csv", "string",
                        "logging", "random", "statistics", "difflib", "heapq", "shutil", "tempfile", "zipfile")


def quick_pretrained_base(config: GapConfig) -> str:
    """--quick's base model: the tiny architecture briefly pretrained on English text nobody here wrote (the
    standard library's own docstrings, present on every machine), kept under <out>/base and reused.

    A random tiny preset as the base would make the full and scratch arms the same run; with this base, the
    scratch arm (same architecture, fresh weights) has to learn the bytes of English from the task data alone."""
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
    values = dict(model=config.model, data=config.task, seq_len=config.sequence_length(),
                  batch_size=config.batch_size, val_examples=config.val_examples,
                  budget_tokens=config.budget_tokens, epochs=1.0, eval_examples=config.eval_examples,
                  generate_examples=config.generate_examples, runs_dir=str(arms_dir), name=name, seed=config.seed,
                  progress=config.progress, gpu=config.gpu, warmup_steps=2, eval_every=0,
                  task_metrics="on",  # the verdicts compare the arms' task quality
                  forgetting="off")  # `tunegap analyze forgetting` measures it; here it would double the run time
    if config.gpu_price is not None:
        values["gpu_price"] = config.gpu_price
    values.update(overrides)
    return TrainConfig(**values)


def _arm_config(config: GapConfig, arms_dir: Path, arm: str, lr: float, seed: int):
    """One training arm's run at rate `lr` and seed `seed`: run `<arm>-seed<k>`, or `<arm>-lr<rate>-seed<k>` when
    rates are chosen (so the chosen candidate is its seed-0 run, reused)."""
    settings = {f"lora-r{r}": dict(method="lora", rank=r, alpha=2.0 * r) for r in config.ranks}
    settings["full"] = dict(method="full")
    settings["scratch"] = dict(method="full", init="scratch")
    name = f"{arm}-lr{lr:g}-seed{seed}" if config.chooses_rates() else f"{arm}-seed{seed}"
    return _train_config(config, arms_dir, name, seed=seed, lr=lr, **settings[arm])


def _seed_configs(config: GapConfig, arms_dir: Path, arm: str, lr: float) -> list:
    """One training arm's runs at rate `lr`, one per seed."""
    return [_arm_config(config, arms_dir, arm, lr, seed) for seed in config.seed_list()]


def _arm_configs(config: GapConfig, arms_dir: Path, rates: dict | None = None) -> dict:
    """The training arms' run settings, by arm name: one TrainConfig per seed at the arm's rate (`rates`, default
    `default_rates`)."""
    rates = rates or config.default_rates()
    return {arm: _seed_configs(config, arms_dir, arm, lr) for arm, lr in rates.items()}


def choose_rate(config: GapConfig, arms_dir: Path, arm: str) -> dict:
    """One training arm's rate, chosen on the validation split: its first seed at every `lr_factors` x its
    default rate, the lowest val_loss wins (a run without one, diverged or unmeasured, ranks last). Without a
    choice to make (one factor), the default rate as it is."""
    defaults = config.default_rates()
    if not config.chooses_rates():
        return {"lr": defaults[arm], "candidates": []}
    candidates = []
    for i, factor in enumerate(config.lr_factors, start=1):
        rate = float(f"{defaults[arm] * factor:.3g}")  # 0.3 x 3e-4 is 9e-05, not 8.999999999999999e-05
        train_config = _arm_config(config, arms_dir, arm, rate, config.seed)
        print(f"tunegap: {arm}: choosing its learning rate on validation, lr {rate:g} ({i}/{len(config.lr_factors)})",
              flush=True)
        candidates.append({"lr": rate, "val_loss": run_arm(train_config)["metrics"].get("val_loss")})
    return {"lr": pick_rate(candidates), "candidates": candidates}


def rates_how(config: GapConfig) -> str:
    """Where the learning rates came from, as results.json and the report say it."""
    if config.chooses_rates():
        return (f"each arm's rate chosen on the validation split ({config.val_examples} examples, seed "
                f"{config.seed}) among {', '.join(f'{f:g}' for f in config.lr_factors)} x its default; the test "
                "split never took part")
    own = ("the task's own rates (TASK_RATES), chosen on its validation split by `--lr-factors 0.3,1,3` "
           "(evidence/run.sh, 2026-12-02); the test split never took part")
    if all(rate is None for rate in (config.lr_lora, config.lr_full, config.lr_scratch)):
        return own
    return f"set in the experiment's config where given; otherwise {own}"


def pick_rate(candidates: list[dict]) -> float:
    """The candidate rate of lowest validation loss; one with no finite val_loss never wins over one with."""
    def key(c):
        loss = c["val_loss"]
        return (0, loss) if isinstance(loss, (int, float)) and math.isfinite(loss) else (1, 0.0)
    return min(candidates, key=key)["lr"]


def icl_shots(train_records: list[dict], k: int, seed: int) -> list[dict]:
    """The k solved examples seed `seed` puts in the prompt: drawn from the task's train split, never its test."""
    return random.Random(f"tunegap-icl-{seed}").sample(train_records, k) if k else []


def predict_arms(config: GapConfig, arms_dir: Path) -> dict:
    """Each arm's predicted seconds (estimates, `tunegap.predict`), before any arm starts: a training arm's
    setup (measured while predicting), training and evaluations; the ICL arm's generation at each k, from an
    fp32 probe of the base model (its replies are decoded in fp32) with the shots as a shared prefix."""
    predicted, full = {}, None
    seeds = config.seeds
    runs = seeds + len(config.lr_factors) - 1  # the rate candidates other than the winner, which is seed 0's run
    for name, train_configs in _arm_configs(config, arms_dir).items():
        trainer = Trainer(train_configs[0])  # one run is predicted; the others cost the same (same steps)
        parts = {part: seconds * runs for part, seconds in trainer.predict().items()}
        predicted[name] = {"seconds": sum(parts.values()), "parts": parts}
        full = trainer if name == "full" else full  # its plain model probes the ICL arm's fp32 decoding too
    fp32 = Context(full.ctx.model, full.ctx.base, full.method, full.ctx.pad_id, contextlib.nullcontext)
    forecast = Forecast(probe_forward(fp32, config.batch_size, round(full.mean_tokens), full.shape), 0.0, full.ctx.model,
                        full.ctx.pad_id)
    splits = TASKS[config.task].splits()
    records = splits["test"][:config.generate_examples]
    held = full.data.eval
    parts = {"held-out loss": heldout_seconds(forecast.probe, full.shape, examples=len(held),
                                              tokens_per_example=sum(map(len, held)) / max(len(held), 1))}
    for k in config.k_shots:
        shots = icl_shots(splits["train"], k, config.seed)
        prompts = [tokenize_prompt(full.tokenizer, few_shot(r["messages"], shots)) for r in records]
        parts[f"{k}-shot"] = (1 if k == 0 else seeds) * generation_seconds(  # zero-shot is the same for every seed
            forecast.probe, forecast.decoding(len(prompts)), full.shape, prompts=len(prompts),
            prompt_tokens=sum(map(len, prompts)) / len(prompts), shared_prefix_tokens=common_prefix_length(prompts),
            max_new_tokens=icl_new_tokens(config))
    predicted["icl"] = {"seconds": sum(parts.values()), "parts": parts}
    return predicted


def print_predictions(predicted: dict) -> None:
    total = sum(p["seconds"] for p in predicted.values())
    arms = ", ".join(f"{name} {minutes(p['seconds'])}" for name, p in predicted.items())
    print(f"tunegap: predicted (estimate, from probes of the model on this machine): {arms}; all arms "
          f"{minutes(total)}", flush=True)


def run_arm(train_config) -> dict:
    """Train one arm's seed, or reuse its finished ledger when the settings are unchanged (`trainer.run_or_reuse`)."""
    return run_or_reuse(train_config, name=train_config.name, what="arm")[1]


def icl_new_tokens(config: GapConfig) -> int:
    """Reply length the ICL arm decodes: the experiment's cap, never beyond what the task's references need."""
    return min(config.max_new_tokens, TASKS[config.task].max_new_tokens)


def metric_unit(key: str) -> str:
    if key.endswith("loss"):
        return "nats/token"
    if key.endswith("tokens"):
        return "tokens"
    if key.endswith("seconds") or key.endswith("_s"):
        return "s"
    if key in ("n", "generated") or key.startswith("n_"):
        return "examples"
    return "fraction"


def over_seeds(per_seed: list[dict]) -> dict:
    """{key: Interval.as_dict} over seeds for every numeric key the seeds share (means with 95% intervals)."""
    keys = [k for k, v in per_seed[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return {k: mean_interval([m.get(k) for m in per_seed]).as_dict(metric_unit(k)) for k in keys}


def costs_over_seeds(costs: list[dict]) -> dict:
    """Each ledger cost as its mean over seeds with an interval (unit and how kept); a cost that is not a number
    in every seed (a missing price) is seed 0's entry as it was."""
    out = {}
    for key, entry in costs[0].items():
        values = [c.get(key, {}).get("value") if isinstance(c.get(key), dict) else None for c in costs]
        if isinstance(entry, dict) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            out[key] = mean_interval(values).as_dict(entry.get("unit", ""), entry.get("how", "measured"))
        else:
            out[key] = entry
    return out


def icl_arms(config: GapConfig, shape) -> dict:
    """The base model, frozen, with k solved tickets in the prompt: quality and per-query inference cost."""
    model, tokenizer = load_model(config.model, seed=config.seed)
    precision = measure_peaks().best_precision
    autocast = autocast_factory(precision)
    task = TASKS[config.task]
    splits = task.splits()
    records = splits["test"][:config.generate_examples]
    held = prepare(_train_config(config, Path("."), "icl"), tokenizer).eval
    ctx = Context(model, base_model(model), Full(), tokenizer.pad_token_id, autocast)
    zero_shot_loss = heldout_loss(ctx, held, config.batch_size, config.sequence_length())
    arms = {}
    for k in config.k_shots:
        # greedy decoding of a frozen model: zero-shot is one measurement; with shots, each seed draws its own
        seeds = config.seed_list() if k else [config.seed]
        per_seed = [task_metrics(model, tokenizer, records, task.score, shots=icl_shots(splits["train"], k, seed),
                                 max_new_tokens=icl_new_tokens(config))  # no autocast: see callbacks/task_metrics.py
                    for seed in seeds]
        prompt_tokens = sum(m["mean_prompt_tokens"] for m in per_seed) / len(per_seed)
        new_tokens = sum(m["mean_new_tokens"] for m in per_seed) / len(per_seed)
        prefix = sum(m["shared_prefix_tokens"] for m in per_seed) / len(per_seed)
        per_query = generation_flops(shape, round(prompt_tokens), max(1, round(new_tokens)))
        # with a prompt cache the shared prefix (system text + shots) is encoded once for all queries: per query,
        # its forward pass is saved; attending to it from each query's own tokens is not
        cached = per_query - forward_flops(shape, sequences=1, seq_len=round(prefix), logit_tokens=0)
        arms[f"icl-{k}"] = {
            "k": k, "seeds": seeds, "metrics": over_seeds(per_seed),
            "per_seed": [{key: v for key, v in m.items() if key != "samples"} for m in per_seed],
            "samples": per_seed[0]["samples"],
            "eval_loss": zero_shot_loss if k == 0 else None,
            "inference_flops_per_query": per_query,
            "inference_flops_per_query_cached": cached,
            "shared_prefix_tokens": prefix,
            "seconds_per_query": sum(m["generation_seconds"] for m in per_seed) / len(per_seed) / max(len(records), 1),
            "precision": precision,
        }
    return arms


def _loss_curve(ledger_path: Path) -> list[dict]:
    rows = read_jsonl(Path(ledger_path).parent / "metrics.jsonl")
    return [{"step": r["step"], "loss": r["loss"], "flops": r["flops"], "tokens": r["tokens"]} for r in rows if "loss" in r]


def _arm_summary(arms_dir: Path, name: str, ledgers: list[dict]) -> dict:
    """One training arm over its seeds: each seed's run as its ledger has it, then every cost and metric as a
    mean over seeds with a 95% interval (token counts and FLOPs vary a little: data order sets where the token
    budget is crossed)."""
    runs = []
    for ledger in ledgers:
        folder = arms_dir / ledger["config"]["name"]
        runs.append({"seed": ledger["config"]["seed"], "ledger_path": str(folder / "ledger.json"),
                     "costs": ledger["costs"],
                     "metrics": {k: v for k, v in ledger["metrics"].items() if k != "samples"},
                     "samples": ledger["metrics"].get("samples", []), "precision": ledger["precision"],
                     "loss_curve": _loss_curve(folder / "ledger.json")})
    return {"seeds": [r["seed"] for r in runs], "runs": runs,
            "costs": costs_over_seeds([r["costs"] for r in runs]),
            "metrics": over_seeds([r["metrics"] for r in runs]),
            "samples": runs[0]["samples"], "precision": runs[0]["precision"]}


def measured_gap(pretrain: dict, ledger: dict) -> dict:
    """Pretraining (estimate) over one measured fine-tune (its costs' means over seeds), axis by axis.

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
    config.check()
    if config.quick and config.model == "tiny":
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
    trained, rates, choice = {}, config.default_rates(), {}
    titles = {"full": "arm 3/5 full fine-tune", "scratch": "arm 4/5 same architecture from random weights (scratch)"}
    for name in rates:
        arm_started = time.perf_counter()
        choice[name] = choose_rate(config, arms_dir, name)
        rates[name] = choice[name]["lr"]
        train_configs = _seed_configs(config, arms_dir, name, rates[name])
        trained[name] = []
        for i, train_config in enumerate(train_configs, start=1):
            print(f"tunegap: {titles.get(name, f'arm 2/5 LoRA rank {train_config.rank}')}, seed "
                  f"{train_config.seed} ({i}/{len(train_configs)})", flush=True)
            trained[name].append(run_arm(train_config))
        measured[name] = time.perf_counter() - arm_started
    print("tunegap: predicted vs measured per arm: " + ", ".join(
        f"{name} {minutes(predicted[name]['seconds'])} vs {minutes(measured[name])}" for name in measured), flush=True)
    print("tunegap: arm 5/5 pretraining of the base model (estimated, not run)", flush=True)
    summaries = {name: _arm_summary(arms_dir, name, ledgers) for name, ledgers in trained.items()}
    achieved = summaries["full"]["costs"]["achieved_flops_per_s"]["value"]
    pretrain = pretraining_estimate(config, shape, achieved)

    lora_name = f"lora-r{config.ranks[0]}"
    zero = icl[f"icl-{min(config.k_shots)}"]
    best_k = max(config.k_shots)
    extra_per_query = icl[f"icl-{best_k}"]["inference_flops_per_query"] - zero["inference_flops_per_query"]
    extra_cached = (icl[f"icl-{best_k}"].get("inference_flops_per_query_cached", 0.0)
                    - zero.get("inference_flops_per_query_cached", 0.0))
    train_flops = summaries[lora_name]["costs"]["flops_total"]["value"]
    results = {
        "schema": 2,
        "experiment": "gap",
        "task": config.task,
        "quality_key": TASKS[config.task].quality,
        "seeds": config.seed_list(),
        "learning_rates": {"lora": rates[lora_name], "full": rates["full"], "scratch": rates["scratch"],
                           "how": rates_how(config), "by_arm": choice},
        "config": {**asdict(config), "folder": str(out)},
        "model": {"name": config.model, "shape": shape.to_dict()},
        "icl": icl,
        "trained": summaries,
        "pretrain": {k: v for k, v in pretrain.items() if k != "on_gpu"} | {"costs": pretrain["on_gpu"]["costs"],
                                                                            "assumptions": pretrain["on_gpu"]["assumptions"],
                                                                            "hardware": pretrain["on_gpu"]["hardware"]},
        "gap": {name: measured_gap(pretrain["on_gpu"], summary) for name, summary in summaries.items()
                if name != "scratch"},
        "break_even": {
            "k": best_k, "arm": lora_name,
            "train_flops": train_flops,
            "icl_extra_flops_per_query": extra_per_query,
            "queries": break_even(train_flops, extra_per_query),
            "icl_extra_flops_per_query_cached": extra_cached,
            "queries_cached": break_even(train_flops, extra_cached),
        },
        "wall_seconds": time.perf_counter() - started,
        "durations": {name: {"predicted_s": predicted[name]["seconds"], "predicted_parts_s": predicted[name]["parts"],
                             "measured_s": measured[name]} for name in measured},
    }

    results["verdicts"] = verdicts(results)
    atomic_write_json(out / "results.json", results)
    write_gap_report(out, results)
    return results
