"""What every analysis shares: its output folder, training through the one loop, loading a run's weights, charts.

An analysis writes `<out>/results.json` (every number with its unit and how it was obtained), PNG charts and
`<out>/section.json` (a `tunegap.report.Section`), so `tunegap report` can gather it with the others.
Analyses that train go through the one trainer and name each run after its settings' identity
(`config.run_identity`), so a second analysis asking for the same run (the rank sweep's full fine-tune and the
forgetting analysis's, say) reuses it instead of training it again.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from dataclasses import asdict, replace
from pathlib import Path

from .. import outputs, trainer
from ..config import ConfigError, TrainConfig
from ..data.tasks import TASKS
from ..io import atomic_write_json, read_jsonl, write_figure
from ..stats import Interval, mean_interval

# Report order: the gap experiment (a Section's default order, 50) first, then the essay's reasons in its order
# (representations, low rank, optimisation), then its caveats (forgetting, knowledge).
ORDER = {"probe": 60, "rank": 70, "sweep": 75, "noise": 77, "convergence": 80, "forgetting": 90, "plane": 92,
         "knowledge": 95}
QUICK_MODEL = "tiny"  # --quick: a 2-layer random Llama; numbers exercise the code, they say nothing about LLMs


class AnalysisError(ConfigError):
    """Input an analysis cannot use (a run without saved weights, an unknown rank list...): one line."""


def q(value, unit: str, how: str) -> dict:
    """A number as the ledger writes it: value, unit, and measured | formula | estimate."""
    return {"value": value, "unit": unit, "how": how}


def parse_ints(text: str, what: str, *, allow_zero: bool = False) -> list[int]:
    try:
        values = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise AnalysisError(f"{what}: expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < (0 if allow_zero else 1):
        kind = "non-negative" if allow_zero else "positive"
        raise AnalysisError(f"{what}: expected {kind} integers, got {text!r}")
    return values


def parse_floats(text: str, what: str) -> list[float]:
    """Comma-separated positive numbers (a learning-rate grid: 1e-4,3e-4)."""
    try:
        values = [float(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise AnalysisError(f"{what}: expected comma-separated numbers, got {text!r}") from None
    if not values or not all(math.isfinite(v) and v > 0 for v in values):
        raise AnalysisError(f"{what}: expected positive numbers, got {text!r}")
    return values


# --------------------------------------------------------------------------- training through the one loop

def run_or_reuse(config: TrainConfig, prefix: str) -> tuple[Path, dict]:
    """Train `config` as run `<prefix>-<identity>` through the one trainer, or reuse the finished run of the same
    settings (`trainer.run_or_reuse`)."""
    return trainer.run_or_reuse(config, prefix=prefix)


def run_seeds(config: TrainConfig, prefix: str, seeds: int) -> list[tuple[Path, dict]]:
    """The same settings trained with seeds config.seed, config.seed + 1, ... (weights, data order, dropout
    and LoRA's initialisation all follow the seed); each run reused when it already exists."""
    return [run_or_reuse(replace(config, seed=config.seed + i), prefix) for i in range(seeds)]


def seed_interval(ledgers: list[dict], key: str) -> Interval:
    """Mean and 95% interval over seeds of one ledger metric (a seed that did not measure it is left out)."""
    return mean_interval([ledger.get("metrics", {}).get(key) for ledger in ledgers])


def check_seeds(seeds: int) -> int:
    if not isinstance(seeds, int) or seeds < 1:
        raise AnalysisError(f"--seeds: expected a positive integer, got {seeds!r}")
    return seeds


def task_names(choice: str) -> tuple[str, ...]:
    """`--task support|docstrings|both` as the shipped task names to run."""
    if choice == "both":
        return tuple(TASKS)
    if choice not in TASKS:
        raise AnalysisError(f"--task: expected one of {', '.join([*TASKS, 'both'])}, got {choice!r}")
    return (choice,)


def task_settings(task: str, quick: bool) -> dict:
    """Run settings a shipped task needs beside an analysis's shared ones: a docstrings prompt (the function's
    code) is about 250 SmolLM2 tokens where a support ticket is about 100."""
    if task == "docstrings":
        return {"data": task, "seq_len": 512 if quick else 320}
    return {"data": task}


def read_metrics(folder: Path) -> list[dict]:
    return read_jsonl(Path(folder) / "metrics.jsonl")


def train_curve(folder: Path) -> list[dict]:
    """Per-step rows (step, loss, cumulative FLOPs) of a run, in step order, without the eval-only rows."""
    rows = [r for r in read_metrics(folder) if "loss" in r]
    return sorted(rows, key=lambda r: r["step"])


def ema(values: list[float], beta: float = 0.8) -> list[float]:
    """Bias-corrected exponential moving average (Kingma & Ba 2015's correction): noisy step losses, smoothed."""
    out, avg = [], 0.0
    for i, v in enumerate(values, start=1):
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta ** i))
    return out


# --------------------------------------------------------------------------- a run's weights

def load_run(folder: str | Path) -> tuple[Path, dict]:
    """(folder, ledger) of a completed run; an unfinished one is a one-line AnalysisError."""
    try:
        return outputs.finished_run(folder)
    except outputs.RunLoadError as err:
        raise AnalysisError(str(err)) from None


def load_base(config: dict):
    """The model a run started from: same name, init and seed (a random preset is redrawn identically)."""
    return outputs.load_start(config)


def tuned_model(folder: Path, config: dict):
    """The run's trained model as a plain transformers model (adapters merged), via `outputs.load_run`."""
    try:
        run = outputs.load_run(folder, merge=True)
    except outputs.RunLoadError as err:
        raise AnalysisError(str(err)) from None
    return run.model, run.tokenizer


def weight_delta(base, tuned) -> dict:
    """name -> W_tuned - W_base for every parameter of the same name and shape (fp32)."""
    base_sd = base.state_dict()
    deltas = {}
    for name, w in tuned.state_dict().items():
        b = base_sd.get(name)
        if b is not None and b.shape == w.shape and w.is_floating_point():
            deltas[name] = w.float() - b.float()
    return deltas


def interpolate_(model, base_sd: dict, delta: dict, alpha: float) -> None:
    """Set the model's weights to W_base + alpha * (W_tuned - W_base) in place (WiSE-FT, Wortsman et al. 2022)."""
    import torch

    params = model.state_dict()
    with torch.no_grad():
        for name, d in delta.items():
            params[name].copy_(base_sd[name].float() + alpha * d)


# --------------------------------------------------------------------------- outputs

def figure(width: float = 7.5, height: float = 4.5):
    """A matplotlib Figure on the Agg canvas: no display, no global pyplot state."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig, path: Path) -> Path:
    fig.tight_layout()
    return write_figure(fig, path)  # atomic, and never through a planted symbolic link


def write_outputs(out: Path, results: dict, section) -> None:
    """results.json (with the section's verdicts, added to `results` in place for the caller to print) and
    section.json, atomically (a reader never sees half a file)."""
    out.mkdir(parents=True, exist_ok=True)
    results["verdicts"] = [asdict(v) for v in section.verdicts]
    atomic_write_json(out / "results.json", {**results, "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    section.save(out)


def disagreements(by_task: dict[str, list], claims: list[str] | None = None) -> str:
    """With two or more tasks: one sentence naming each claim their verdicts differ on ("" with one task).
    Each task's list judges the same claims in the same order; `claims` names them (default: the first task's
    claims without their "[task] " prefix)."""
    if len(by_task) < 2:
        return ""
    first, *_ = by_task.values()
    names = claims or [v.claim.split("] ", 1)[-1] for v in first]
    differ = []
    for i, claim in enumerate(names[:min(len(vs) for vs in by_task.values())]):
        labels = {task: verdicts[i].label for task, verdicts in by_task.items()}
        if len(set(labels.values())) > 1:
            differ.append(f"'{claim}' ({', '.join(f'{task}: {label}' for task, label in labels.items())})")
    return ("The tasks disagree on " + "; ".join(differ) + ".") if differ else \
        "The tasks reach the same verdicts."


def half_width(value) -> float:
    """An error bar's half width: an `Interval` or a results.json interval; 0 where no interval was measured."""
    if isinstance(value, Interval):
        return value.half_width if math.isfinite(value.half_width) else 0.0
    return (value["high"] - value["low"]) / 2 if value and value.get("low") is not None else 0.0


def fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if isinstance(value, int):
        return f"{value:,}"
    if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
        return f"{value:.{digits}g}"
    return f"{value:.{digits}g}" if abs(value) < 1 else f"{value:,.{digits}g}"


def interval_cell(value: dict | None) -> str:
    """A results.json number (`Interval.as_dict`, or a plain `q`) as a table cell: mean [low, high]; "(1 seed)"
    where one seed gave no interval; n/a where nothing was measured."""
    if not value or value.get("value") is None or (isinstance(value["value"], float) and math.isnan(value["value"])):
        return "n/a"
    if value.get("low") is None:
        return fmt(value["value"]) + (" (1 seed)" if value.get("seeds") == 1 else "")
    return f"{fmt(value['value'])} [{fmt(value['low'])}, {fmt(value['high'])}]"


def md_table(header: list[str], rows: list[list]) -> str:
    """A pipe table; a '|' inside a cell would split it, so cells may not contain one."""
    def cell(c) -> str:
        return str(c).replace("|", "/").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def quick_aware(fn):
    """Run an analysis under `quick_threads(quick=...)`."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with quick_threads(bool(kwargs.get("quick", False))):
            return fn(*args, **kwargs)

    return wrapper


@contextlib.contextmanager
def quick_threads(quick: bool):
    """One torch thread for --quick: a 2-layer d=64 model is too small to split, and on a busy machine thread
    synchronisation made tiny forward passes ~10-50x slower (measured on the 2-core dev box); restored after."""
    import torch

    before = torch.get_num_threads()
    if quick:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
