"""What a run cost, written as it goes: `ledger.json` (totals) beside `metrics.jsonl` (one line per step).

Every figure is a `{"value", "unit", "how"}` triple, where `how` is "measured" (timed, counted, read
from the OS or the optimizer's tensors), "formula" (computed from `costs/` for the work actually done), or
"estimate" (depends on an assumption such as a GPU's price or MFU). The estimator writes the same keys,
so `tunegap estimate --against RUN` compares like with like.
"""

from __future__ import annotations

import math
import os
import platform
import resource
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

from .costs.flops import ZERO, Flops
from .io import atomic_write_json

SCHEMA = 1


def q(value, unit: str, how: str) -> dict:
    return {"value": value, "unit": unit, "how": how}


def peak_rss_bytes() -> int:
    """Peak resident memory of this process since start or the last `reset_peak_rss` (Linux VmHWM)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> bool:
    """Start measuring the peak afresh, so model loading does not count as training memory."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def environment() -> dict:
    import torch
    import transformers

    versions = {"python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__}
    try:
        import peft

        versions["peft"] = peft.__version__
    except ImportError:
        pass
    commit = ""
    head = Path(__file__).resolve().parent.parent / ".git" / "HEAD"
    try:
        ref = head.read_text().strip()
        commit = (head.parent / ref[5:]).read_text().strip() if ref.startswith("ref:") else ref
    except OSError:
        pass
    return {"versions": versions, "platform": platform.platform(), "cpu_count": os.cpu_count(),
            "tunegap_commit": commit}


REQUIRED_TOTALS = ("steps", "examples", "tokens", "loss_tokens", "train_seconds", "flops")  # what every checkpoint held


@dataclass
class Totals:
    """Running sums that a checkpoint saves and a resumed run continues from."""

    steps: int = 0
    examples: int = 0
    tokens: int = 0
    loss_tokens: int = 0
    padding_tokens: int = 0
    train_seconds: float = 0.0
    wall_seconds: float = 0.0  # earlier segments of a resumed run, up to their last checkpoint
    flops: Flops = ZERO
    counted_flops: float = 0.0
    formula_flops_on_counted_steps: float = 0.0
    counted_steps: list = field(default_factory=list)
    step_seconds: list = field(default_factory=list)
    events: list = field(default_factory=list)

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["flops"] = self.flops.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Totals":
        """Totals saved by `to_dict`; anything else (a missing, extra or mistyped field) is a ValueError
        naming the field, since a resumed run would otherwise carry the damage into its ledger."""
        if not isinstance(d, dict):
            raise ValueError(f"totals: expected an object, got {type(d).__name__}")
        wanted = {f.name: f for f in fields(cls)}
        missing = sorted(k for k in REQUIRED_TOTALS if k not in d)  # later fields default: older checkpoints resume
        if missing or set(d) - set(wanted):
            raise ValueError(f"totals: missing {missing}, unknown {sorted(set(d) - set(wanted))}"[:200])
        values = {}
        for name, value in d.items():
            if name == "flops":
                values[name] = _flops_from_dict(value)
            elif isinstance(wanted[name].default, int):
                values[name] = _count(value, f"totals.{name}")
            elif isinstance(wanted[name].default, float):
                values[name] = _amount(value, f"totals.{name}")
            else:
                values[name] = _list(name, value)
        return cls(**values)


def _count(value, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{where}: expected a count >= 0, got {value!r}"[:160])
    return value


def _amount(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{where}: expected a finite number >= 0, got {value!r}"[:160])
    return float(value)


def _list(name: str, value) -> list:
    check = {"counted_steps": lambda v: _count(v, f"totals.{name}[]"),
             "step_seconds": lambda v: _amount(v, f"totals.{name}[]")}.get(name)
    if not isinstance(value, list):
        raise ValueError(f"totals.{name}: expected a list, got {type(value).__name__}")
    if check is None:
        if not all(isinstance(v, dict) for v in value):
            raise ValueError(f"totals.{name}: expected a list of objects")
        return list(value)
    return [check(v) for v in value]


def _flops_from_dict(f) -> Flops:
    if not isinstance(f, dict):
        raise ValueError(f"totals.flops: expected an object, got {type(f).__name__}")
    parts = ("forward", "backward_input", "backward_weight")
    missing = [k for k in parts if k not in f]
    if missing:
        raise ValueError(f"totals.flops: missing {missing}")
    return Flops(*(_amount(f[k], f"totals.flops.{k}") for k in parts), _amount(f.get("recompute", 0.0),
                                                                              "totals.flops.recompute"))


def optimizer_state_bytes(optimizer) -> int:
    """Counted from the optimizer's real state tensors (Adam: exp_avg and exp_avg_sq per trained weight)."""
    import torch

    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if torch.is_tensor(value):
                total += value.numel() * value.element_size()
    return total


def build_ledger(*, run_name: str, status: str, config: dict, method: dict, shape: dict, peaks: dict,
                 precision: str, params_total: int, params_trainable: int, weights_bytes: int,
                 gradient_bytes: int, optimizer_bytes: int, totals: Totals, data_stats: dict,
                 peak_memory: int, peak_memory_how: str, wall_seconds: float, gpu: str, gpu_price: float,
                 gpu_flops_per_s: float, metrics: dict, environment_info: dict, compiled: str = "off") -> dict:
    """Assemble ledger.json; pure, so tests can check each figure against its inputs."""
    train_s = max(totals.train_seconds, 1e-9)
    best_peak = peaks.get("best_flops_per_s") or max(peaks.get("fp32_flops_per_s", 0), peaks.get("bf16_flops_per_s", 0))
    achieved = totals.flops.total / train_s
    median_step = sorted(totals.step_seconds)[len(totals.step_seconds) // 2] if totals.step_seconds else 0.0
    counted_ratio = (totals.counted_flops / totals.formula_flops_on_counted_steps
                     if totals.formula_flops_on_counted_steps else None)
    # Dollars: the same model FLOPs on the named GPU at the MFU this run reached on its own hardware
    # would be optimistic for a CPU run; state the assumption instead: 40% MFU (estimate).
    assumed_mfu = 0.40
    gpu_hours = totals.flops.total / (gpu_flops_per_s * assumed_mfu) / 3600 if gpu_flops_per_s else None
    costs = {
        "examples": q(totals.examples, "example", "measured"),
        "tokens": q(totals.tokens, "token", "measured"),
        "loss_tokens": q(totals.loss_tokens, "token", "measured"),
        "padding_tokens": q(totals.padding_tokens, "token", "measured"),
        "optimizer_steps": q(totals.steps, "step", "measured"),
        "epochs": q(data_stats.get("epochs", 0.0), "epoch", "measured"),
        "params_total": q(params_total, "parameter", "measured"),
        "params_trainable": q(params_trainable, "parameter", "measured"),
        "trainable_share": q(params_trainable / params_total if params_total else 0.0, "fraction", "measured"),
        "weights_bytes": q(weights_bytes, "byte", "measured"),
        "gradient_bytes": q(gradient_bytes, "byte", "measured"),
        "optimizer_state_bytes": q(optimizer_bytes, "byte", "measured"),
        "peak_memory_bytes": q(peak_memory, "byte", peak_memory_how),
        "flops_forward": q(totals.flops.forward, "FLOP", "formula"),
        "flops_backward": q(totals.flops.backward, "FLOP", "formula"),
        "flops_total": q(totals.flops.total, "FLOP", "formula"),
        "flops_hardware": q(totals.flops.hardware, "FLOP", "formula"),
        "flops_counted_sampled": q(totals.counted_flops, "FLOP", "measured"),
        "flops_formula_on_sampled_steps": q(totals.formula_flops_on_counted_steps, "FLOP", "formula"),
        "flops_counted_over_formula": q(counted_ratio, "ratio", "measured"),
        "wall_time_s": q(wall_seconds, "s", "measured"),
        "train_time_s": q(totals.train_seconds, "s", "measured"),
        "step_time_median_s": q(median_step, "s", "measured"),
        "tokens_per_s": q(totals.tokens / train_s, "token/s", "measured"),
        "loss_tokens_per_s": q(totals.loss_tokens / train_s, "token/s", "measured"),
        "achieved_flops_per_s": q(achieved, "FLOP/s", "measured"),
        # against peaks given by environment (hardware.given_peaks) an MFU is no longer a measurement
        "mfu": q(achieved / best_peak if best_peak else None, "fraction",
                 "measured" if peaks.get("how", "measured") == "measured" else "estimate"),
        "gpu_hours": q(gpu_hours, "GPU-hour", "estimate"),
        "dollars": q(gpu_hours * gpu_price if gpu_hours is not None else None, "USD", "estimate"),
    }
    return {
        "schema": SCHEMA,
        "run": run_name,
        "status": status,
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": config,
        "method": method,
        "shape": shape,
        "precision": precision,
        "compiled": compiled,  # "on (...)" / "off (...)": torch.compile of the decoder layers, and why
        "peaks": peaks,
        "dollar_assumptions": {"gpu": gpu, "price_per_hour_usd": gpu_price, "gpu_flops_per_s": gpu_flops_per_s,
                               "assumed_mfu": assumed_mfu},
        "costs": costs,
        "data": data_stats,
        "metrics": metrics,
        "events": totals.events,
        "counted_steps": totals.counted_steps,
        "environment": environment_info,
    }


def write_ledger(path: Path, ledger: dict) -> None:
    atomic_write_json(path, ledger)


def format_flops(value: float, unit: str = "FLOP") -> str:
    """'1.23 GFLOP': a FLOP count (or rate) with the SI prefix that keeps it readable."""
    for scale, prefix in ((1e21, "Z"), (1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M")):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}"


def format_quantity(entry: dict) -> str:
    """'1.23 GFLOP (formula)': value with a scaled unit and how it was obtained."""
    value, unit, how = entry["value"], entry["unit"], entry["how"]
    if value is None:
        return f"n/a ({how})"
    if unit == "byte":
        for scale, name in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
            if abs(value) >= scale:
                return f"{value / scale:.2f} {name} ({how})"
        return f"{value:.0f} B ({how})"
    if unit in ("FLOP", "FLOP/s"):
        return f"{format_flops(value, unit)} ({how})"
    if unit == "fraction":
        return f"{100 * value:.3g}% ({how})"
    if unit == "USD":
        return f"${value:,.4g} ({how})"
    if isinstance(value, float):
        return f"{value:,.4g} {unit} ({how})"
    return f"{value:,} {unit} ({how})"


def format_ledger(ledger: dict) -> str:
    """A readable table of a ledger's costs and metrics, every number with its unit and provenance."""
    lines = [f"run {ledger['run']} [{ledger['status']}]  method={ledger['method']['name']}  "
             f"model={ledger['config']['model']}  precision={ledger['precision']}"
             f"{'  compiled' if str(ledger.get('compiled', '')).startswith('on') else ''}"]
    width = max(len(k) for k in ledger["costs"])
    for key, entry in ledger["costs"].items():
        lines.append(f"  {key:<{width}}  {format_quantity(entry)}")
    if ledger.get("metrics"):
        lines.append("  metrics (measured):")
        for key, value in ledger["metrics"].items():
            if isinstance(value, (list, dict)):
                continue
            shown = f"{value:.4g}" if isinstance(value, float) else str(value)
            lines.append(f"    {key:<{width - 2}}  {shown}")
    predicted = (ledger.get("timings") or {}).get("predicted_seconds")
    if predicted and "train_time_s" in ledger["costs"]:
        lines.append(f"  training time: predicted {predicted['training']:.3g} s (estimate), took "
                     f"{ledger['costs']['train_time_s']['value']:.3g} s (measured)")
    return "\n".join(lines)
