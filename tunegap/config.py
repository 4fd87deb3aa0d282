"""The one typed configuration of a training run; the CLI flags are generated from its fields.

A field's `help` metadata is its documentation and its `--flag` help text at once, so the two cannot drift.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

from .errors import ConfigError
from .runs import valid_run_name

__all__ = ["ConfigError", "TrainConfig", "add_config_arguments", "config_from_args", "dumps"]


def _f(default, help: str, **kw):
    if isinstance(default, (list, dict, tuple)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    # what to train
    model: str = _f("smollm2-135m", "model: smollm2-135m (embedded default), a tiny preset, or a local HF folder")
    init: str = _f("pretrained", "pretrained weights, or 'scratch' for fresh random weights (pretraining)",
                   choices=("pretrained", "scratch"))
    method: str = _f("lora", "any method registered in tunegap/methods/ (full, lora, freeze, ia3, ...); "
                             "make_method checks the name before any work starts")
    objective: str = _f("next-token", "what training minimises: next-token (SFT on replies, pretraining on a "
                                      "corpus), dpo (preference pairs, Rafailov et al. 2023), reward (a scalar-head "
                                      "reward model on preference pairs, Bradley-Terry loss), grpo; see "
                                      "tunegap/objectives/")
    beta: float = _f(0.1, "dpo: beta, the strength of the pull towards the reference model (Rafailov et al. 2023, "
                          "Eq. 7); smaller lets the policy drift further")
    init_from: str = _f("", "start from a finished run's trained model (a run name in --runs-dir or a folder; a "
                            "LoRA/IA3 adapter is merged into its starting model, which --model must name): SFT, "
                            "then DPO from it, then RL from that")
    rank: int = _f(8, "LoRA rank r", aliases=("--lora-r",))
    alpha: float = _f(16.0, "LoRA alpha (the update is scaled by alpha/r)", aliases=("--lora-alpha",))
    dropout: float = _f(0.0, "LoRA dropout", aliases=("--lora-dropout",))
    targets: str = _f("q,k,v,o,gate,up,down", "LoRA target matrices, comma-separated: short names, PEFT's module "
                                             "names (q_proj, v_proj, ...) or all-linear", aliases=("--target-modules",))
    freeze_layers: int = _f(2, "freeze: number of top blocks that train")
    virtual_tokens: int = _f(16, "prompt/prefix tuning: number of virtual tokens")
    adapter_dim: int = _f(16, "bottleneck adapter width")
    # data
    data: str = _f("support", "SFT data (JSONL, parquet/arrow, a save_to_disk or Hub-style folder), a text corpus "
                              "(pretraining), preference pairs in TRL's formats (dpo, reward), or a shipped task: "
                              "'support' (a house style, or its preference pairs) or 'docstrings' (the Python "
                              "standard library's functions and their authors' docstrings)")
    format: str = _f("auto", "SFT data layout: auto (from the first record), messages, prompt-response, "
                             "prompt-completion (TRL), alpaca (instruction/input/output), sharegpt "
                             "(conversations of from/value)",
                      choices=("auto", "messages", "prompt-response", "prompt-completion", "alpaca", "sharegpt"))
    eval_data: str = _f("", "held-out JSONL of the same kind ('' = a shipped task's test split)")
    seq_len: int = _f(128, "maximum tokens per example (longer ones are truncated, or dropped with --drop-long)",
                      aliases=("--max-length",))
    drop_long: bool = _f(False, "drop examples longer than seq_len instead of truncating them")
    train_examples: int = _f(0, "use only the first N training examples (0 = all)")
    # optimisation
    batch_size: int = _f(8, "examples (or corpus blocks) per micro-batch", aliases=("--per-device-train-batch-size",))
    grad_accum: int = _f(1, "micro-batches per optimizer step", aliases=("--gradient-accumulation-steps",))
    max_steps: int = _f(0, "optimizer steps (0 = derive from --epochs or --budget-tokens)")
    epochs: float = _f(1.0, "passes over the training data, used when --max-steps is 0", aliases=("--num-train-epochs",))
    budget_tokens: int = _f(0, "stop after this many training tokens (0 = no token budget)")
    lr: float = _f(2e-4, "peak learning rate (AdamW)", aliases=("--learning-rate",))
    weight_decay: float = _f(0.0, "AdamW weight decay")
    warmup_steps: int = _f(0, "linear warm-up steps (0 = 5% of steps)")
    schedule: str = _f("cosine", "learning-rate schedule after warm-up", choices=("cosine", "linear", "constant"),
                       aliases=("--lr-scheduler-type",))
    clip: float = _f(1.0, "gradient-norm clipping (0 = off)")
    seed: int = _f(0, "seed for weights, data order and dropout")
    precision: str = _f("auto", "auto picks bf16 autocast only where this CPU's measured bf16 matmul is faster",
                        choices=("auto", "fp32", "bf16"))
    pack: bool = _f(True, "pack several examples per row (no FLOP spent on padding)")
    threads: int = _f(0, "torch threads (0 = all cores)")
    activation_checkpointing: bool = _f(False, "recompute activations in backward: 0.6x (LoRA) / 0.75x (full) the "
                                               "peak memory for 1.3x the step time (default model, CPU, measured)")
    compile: str = _f("auto", "torch.compile each decoder layer: 0.8-0.9x the step time and 0.83x the peak memory "
                              "(LoRA and full SFT, default model, CPU, measured) for a one-time 10-25 s compile; "
                              "auto compiles runs estimated at 10 minutes or more", choices=("auto", "on", "off"))
    device: str = _f("auto", "where one process trains: auto takes a CUDA GPU when torch sees one, else the CPU",
                     choices=("auto", "cpu", "cuda"))
    nproc: int = _f(1, "processes on this node: N > 1 re-launches the command under torchrun (one per GPU, or "
                       "CPU processes with gloo); several nodes: launch with torchrun itself")
    parallel: str = _f("ddp", "under torchrun: ddp replicates the model on every process, fsdp shards weights, "
                              "gradients and optimizer state (FSDP2 fully_shard)", choices=("ddp", "fsdp"))
    # reinforcement learning (--objective grpo, Shao et al. 2024)
    group_size: int = _f(4, "grpo: replies sampled per prompt; each is judged against its own group's mean reward")
    kl_beta: float = _f(0.04, "grpo: weight of the KL penalty to the reference model (k3 estimator, DeepSeekMath "
                              "eq. 4); the reference is the starting model (PEFT: adapters disabled)")
    temperature: float = _f(1.0, "grpo: sampling temperature of the replies")
    max_new_tokens: int = _f(96, "grpo: longest sampled reply, in tokens")
    reward: str = _f("support", "grpo: the reward, a float in [0, 1] per reply: support (the task's own checks: "
                                "style, product, refusal) or style (greeting, sign-off, structure)")
    reward_model: str = _f("", "grpo: score replies with a finished --objective reward run (a name in --runs-dir or a "
                               "folder) instead of --reward")
    # evaluation and outputs
    eval_every: int = _f(0, "evaluate held-out loss every N steps (0 = only at the end)")
    eval_examples: int = _f(64, "held-out examples for the loss")
    val_examples: int = _f(0, "validation examples of a shipped task: their loss is logged as val_loss, for "
                              "choosing hyper-parameters without looking at the test split (0 = none)")
    generate_examples: int = _f(32, "held-out examples generated and scored for task metrics (0 = none)")
    task_metrics: str = _f("auto", "after training, generate replies to --generate-examples held-out examples of "
                                   "a shipped task and score them; auto: only when training is predicted to "
                                   "take longer than this evaluation (the prediction is printed before step 1)",
                           choices=("auto", "on", "off"))
    forgetting: str = _f("auto", "after an SFT fine-tune of real pretrained weights, measure drift from the base "
                                 "(KL on 40 general prompts) and general-question accuracy into the ledger; auto: "
                                 "only when training is predicted to take longer than this evaluation",
                         choices=("auto", "on", "off"))
    forgetting_every: int = _f(0, "every N steps and at the last, measure held-out loss and forgetting (KL to the "
                                  "base on the general prompts, general-question accuracy) on the current "
                                  "weights into metrics.jsonl: the run's learning-forgetting curve (0 = never; "
                                  "real pretrained weights, one CPU process)")
    checkpoint_every: int = _f(0, "write a checkpoint every N steps (0 = only at the end)")
    keep_checkpoints: int = _f(2, "checkpoints kept (older ones are deleted)")
    count_flops_every: int = _f(0, "count FLOPs (PyTorch's per-op formulas over the ops a step dispatches) every N steps (0 = first and last step)")
    gpu_price: float = _f(2.5, "GPU price in $/hour for the dollar estimate")
    gpu: str = _f("H100-SXM", "GPU the dollar estimate assumes (catalogue name)")
    runs_dir: str = _f("runs", "folder holding every run")
    name: str = _f("", "run name (default: <method>-<model>-<time>)")
    resume: bool = _f(False, "continue the newest checkpoint of run --name")
    trust_remote_code: bool = _f(False, "allow a model folder's own Python code to run (off: it is code from a stranger)")
    allow_pickle: bool = _f(False, "accept a model folder whose weights are pickled *.bin/*.pt (read as tensors only, "
                                   "torch.load(weights_only=True)); off: safetensors only")
    progress: bool = _f(True, "show a progress bar")
    log: str = _f("none", "also send metrics.jsonl, line for line, to TensorBoard (a tensorboard/ folder in the run; "
                          "pip install 'tunegap[log]') or MLflow (MLFLOW_TRACKING_URI, else ./mlruns; "
                          "pip install 'tunegap[mlflow]')", choices=("none", "tensorboard", "mlflow"))

    def __post_init__(self):
        self._check_types()
        positive = ("rank", "freeze_layers", "virtual_tokens", "adapter_dim", "seq_len", "batch_size",
                    "grad_accum", "eval_examples", "nproc")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')}: must be positive, got {getattr(self, name)}")
        for name in ("max_steps", "budget_tokens", "warmup_steps", "eval_every", "checkpoint_every",
                     "train_examples", "generate_examples", "threads", "count_flops_every", "val_examples",
                     "forgetting_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name.replace('_', '-')}: must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ConfigError(f"--lr: must be positive, got {self.lr}")
        if not self.beta > 0:
            raise ConfigError(f"--beta: must be positive, got {self.beta}")
        if not self.epochs > 0:
            raise ConfigError(f"--epochs: must be positive, got {self.epochs}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"--dropout: must be in [0, 1), got {self.dropout}")
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"--{f.name.replace('_', '-')}: must be a finite number, got {value}")
        for name in ("weight_decay", "clip"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name.replace('_', '-')}: must be >= 0, got {getattr(self, name)}")
        if self.gpu_price < 0:
            raise ConfigError(f"--gpu-price: must be >= 0, got {self.gpu_price}")
        if self.keep_checkpoints < 1:
            raise ConfigError(f"--keep-checkpoints: must be at least 1, got {self.keep_checkpoints}")
        if self.name and not valid_run_name(self.name):
            raise ConfigError(f"--name: {self.name!r} must be letters, digits, '.', '_' or '-' "
                              "(no path separators: a run stays inside the runs folder)")

    def _check_types(self) -> None:
        """A config file can hold any YAML value: each field must have its default's type (an int may stand
        for a float), else a one-line error rather than a TypeError from deep inside the checks below."""
        for f in fields(self):
            default = f.default if f.default is not MISSING else f.default_factory()
            value = getattr(self, f.name)
            kind = type(default)
            if kind is float and type(value) is int:
                setattr(self, f.name, float(value))
            elif kind is str and type(value) is bool and {"on", "off"} <= set(f.metadata.get("choices", ())):
                value = "on" if value else "off"  # a config file's true/false for an on/off/auto setting
                setattr(self, f.name, value)
            elif type(value) is not kind:
                names = {bool: "true/false", int: "an integer", float: "a number", str: "a string"}
                raise ConfigError(f"--{f.name.replace('_', '-')}: must be {names.get(kind, kind.__name__)}, "
                                  f"got {type(value).__name__} {str(value)[:40]!r}")
            choices = f.metadata.get("choices")
            if choices and value not in choices:  # argparse checks flags; a config file needs the same check
                raise ConfigError(f"--{f.name.replace('_', '-')}: must be one of {', '.join(choices)}, got {value!r}")
            if kind is str and "\x00" in value:  # no path or name may carry one
                raise ConfigError(f"--{f.name.replace('_', '-')}: contains a NUL character")

    @property
    def target_list(self) -> tuple[str, ...]:
        return tuple(t.strip() for t in self.targets.split(",") if t.strip())

    def method_options(self) -> dict:
        """Every method setting under the methods' own field names; `make_method` passes each method the
        ones it declares, so any registered method takes its options from here."""
        return dict(rank=self.rank, alpha=self.alpha, dropout=self.dropout, targets=self.target_list,
                    layers=self.freeze_layers, virtual_tokens=self.virtual_tokens, dim=self.adapter_dim)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict, *, source: str = "config") -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(str(k) for k in values if k not in known)  # YAML keys need not be strings
        if unknown:
            raise ConfigError(f"{source}: unknown field(s) {', '.join(unknown)}")
        return cls(**values)

    @classmethod
    def from_file(cls, path: str | Path) -> "TrainConfig":
        """YAML or JSON holding only the fields that differ from the defaults."""
        return cls(**cls.read_file(path))

    @classmethod
    def read_file(cls, path: str | Path) -> dict:
        """The fields a YAML/JSON file sets (checked as a whole config would be, ints made floats where due)."""
        import yaml

        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
            values = yaml.safe_load(text)
            values = {} if values is None else values  # an empty file (a `0` or `[]` file is an error below)
            top = yaml.compose(text, Loader=yaml.SafeLoader)  # nodes only, for line numbers
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"{path}:0: file: cannot read: {err}") from None
        except (yaml.YAMLError, RecursionError, ValueError) as err:
            mark = getattr(err, "problem_mark", None)
            line = mark.line + 1 if mark else 0
            problem = str(getattr(err, "problem", None) or err).splitlines()[0]
            raise ConfigError(f"{path}:{line}: file: not valid YAML/JSON: {problem}") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{path}:1: file: expected a mapping of field: value, got {type(values).__name__}")
        pairs = top.value if isinstance(top, yaml.MappingNode) else []
        lines = {str(k.value): k.start_mark.line + 1 for k, _ in pairs if isinstance(k, yaml.ScalarNode)}
        known = {f.name for f in fields(cls)}
        for key in values:
            if key not in known:
                raise ConfigError(f"{path}:{lines.get(str(key), 0)}: {str(key)[:40]!r}: unknown field")
        try:
            checked = cls(**values)
        except ConfigError as err:  # name the line of the offending field
            flag = re.match(r"--([a-z0-9-]+): ", str(err))
            key = flag.group(1).replace("-", "_") if flag else ""
            problem = str(err)[flag.end():] if flag else str(err)
            raise ConfigError(f"{path}:{lines.get(key, 0)}: {key or 'file'}: {problem}") from None
        return {key: getattr(checked, key) for key in values}


class _Store(argparse.Action):
    """argparse's store, noting that the flag was given: then it wins over a --config file even when it equals
    the default (`--config a.yaml --rank 8` trains rank 8 whatever the file says)."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        _mark_given(namespace, self.dest)


class _StoreBool(argparse.BooleanOptionalAction):
    def __call__(self, parser, namespace, values, option_string=None):
        super().__call__(parser, namespace, values, option_string)
        _mark_given(namespace, self.dest)


# Settings that do not change what a run computes: where it is written, how it reports, how it is sped up.
RESULT_NEUTRAL = ("resume", "progress", "name", "runs_dir", "threads", "allow_pickle", "compile", "log")


def _defaults() -> dict:
    return {f.name: f.default if f.default is not MISSING else f.default_factory() for f in fields(TrainConfig)}


def run_identity(config: dict) -> str:
    """The one identity of a run's settings: equal for runs that compute the same thing. Resume refuses a
    checkpoint of another identity; `trainer.run_or_reuse` reuses a finished run of the same one.

    A setting at today's default is left out on both sides: a new setting whose default keeps the old behaviour
    neither renames nor re-runs every finished run, while a changed default is still another run (the saved
    config.json holds the old value, which no longer equals the default)."""
    defaults = _defaults()
    stable = {k: v for k, v in sorted(config.items())
              if k not in RESULT_NEUTRAL and not (k in defaults and json.dumps(defaults[k]) == json.dumps(v))}
    return hashlib.sha256(json.dumps(stable, sort_keys=True).encode()).hexdigest()[:16]


def changed_settings(old: dict, new: dict) -> list[str]:
    """The settings that make `new` another run than `old` (for the message that refuses a resume); a setting
    the old run's config.json lacks had its default then."""
    defaults = _defaults()
    return sorted(k for k in new if k not in RESULT_NEUTRAL and old.get(k, defaults.get(k)) != new[k])


def _mark_given(namespace: argparse.Namespace, dest: str) -> None:
    given = set(getattr(namespace, "given_flags", ()))
    setattr(namespace, "given_flags", given | {dest})


def add_config_arguments(parser: argparse.ArgumentParser, cls=TrainConfig, **defaults) -> None:
    """One `--flag` per dataclass field (and the aliases TRL users type), typed and documented from the field."""
    for f in fields(cls):
        flags = ["--" + f.name.replace("_", "-"), *f.metadata.get("aliases", ())]
        default = defaults.get(f.name, f.default if f.default is not MISSING else f.default_factory())
        kind = type(default)
        helptext = f.metadata["help"].replace("%", "%%")  # argparse %-formats help ("5% of steps" broke --help)
        if kind is bool:
            parser.add_argument(*flags, action=_StoreBool, default=default, help=helptext)
        else:
            parser.add_argument(*flags, action=_Store, type=kind, default=default, help=helptext,
                                choices=f.metadata.get("choices"))


def config_from_args(args: argparse.Namespace, cls=TrainConfig) -> "TrainConfig":
    """The command's defaults, then the --config file's fields, then every flag given on the command line."""
    values = {f.name: getattr(args, f.name) for f in fields(cls)}
    if getattr(args, "config", None):
        given = getattr(args, "given_flags", set())
        values.update({k: v for k, v in cls.read_file(args.config).items() if k not in given})
    return cls(**values)


def dumps(config: TrainConfig) -> str:
    return json.dumps(config.to_dict(), indent=2)
