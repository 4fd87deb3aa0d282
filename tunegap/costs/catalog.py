"""What the estimator knows without weights: model presets and the devices it can price, shipped as data.

`data/models.json` holds each preset's Hugging Face config fields, its published pretraining tokens and the
source of every number; `data/gpus.json` holds each GPU's memory, dense datasheet peaks per precision,
bandwidth and a default price. A `--catalog FILE` in the same format adds or replaces GPUs. The device "cpu" is
this machine, with peaks measured by `hardware.measure_peaks` (imported lazily: torch loads only then).
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field, replace
from importlib import metadata
from pathlib import Path

from .shape import ModelShape, validate_config

DATA = Path(__file__).resolve().parent / "data"


class EstimateError(ValueError):
    """Input the estimator cannot work with (unknown preset or GPU, zero tokens, ...), said in one line."""


def _key(name: str) -> str:
    return re.sub(r"[^a-z0-9.]", "", name.lower())


def _read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as err:
        raise EstimateError(f"{path}: cannot read {what}: {err.strerror or err}") from None
    except ValueError as err:
        raise EstimateError(f"{path}: not valid JSON ({what}): {err}") from None


# --- models -----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelPreset:
    name: str
    display: str
    config: dict
    pretrain_tokens: float | None
    pretrain_seq_len: int | None
    pretrain_batch_tokens: float | None
    published_params: float | None
    source: str
    notes: str = ""

    def shape(self) -> ModelShape:
        return ModelShape.from_hf_config(self.config, f"preset {self.name}")

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "config"}


@functools.lru_cache(maxsize=None)
def model_presets() -> dict[str, ModelPreset]:
    table = _read_json(DATA / "models.json", "model presets")["models"]
    return {name: ModelPreset(name=name, **entry) for name, entry in table.items()}


def resolve_model(name_or_path: str) -> tuple[ModelShape, ModelPreset | None]:
    """A preset name (case and punctuation ignored), a config.json, or a folder holding one."""
    presets = model_presets()
    wanted = _key(name_or_path)
    for preset in presets.values():
        if _key(preset.name) == wanted or _key(preset.display) == wanted:
            return preset.shape(), preset
    path = Path(name_or_path)
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        config = _read_json(path, "a Hugging Face config")
        if isinstance(config, dict):
            config.setdefault("_name_or_path", str(name_or_path))
        try:
            return validate_config(config, str(path)), None
        except ValueError as err:
            raise EstimateError(str(err)) from None
    raise EstimateError(f"--model: {name_or_path!r} is neither a preset ({', '.join(presets)}) "
                        "nor a config.json / model folder")


# --- devices ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Device:
    """Something to train on: memory, dense peak FLOP/s per precision, price."""

    name: str
    kind: str  # "gpu" or "cpu"
    memory_bytes: float
    peak_flops_per_s: dict  # precision -> FLOP/s (None where the device has no such unit)
    runtime_bytes: float  # taken before any tensor (CUDA context; for the CPU, the Python + torch process)
    price_per_hour: float | None
    memory_bandwidth: float | None = None
    allocator_retention: float = 0.0  # freed memory the allocator keeps, as a fraction of activation bytes
    source: str = ""
    notes: tuple = field(default_factory=tuple)

    def peak(self, precision_key: str) -> tuple[float, str]:
        """(FLOP/s, note) for matmuls in `precision_key` ("fp32", "bf16", "fp16")."""
        table = self.peak_flops_per_s
        if table.get(precision_key):
            return float(table[precision_key]), ""
        if precision_key == "bf16" and table.get("fp16"):
            return float(table["fp16"]), f"{self.name} has no bf16 units: the fp16 peak is used (train in fp16-mixed)"
        raise EstimateError(f"{self.name}: no {precision_key} peak in the catalogue")

    def to_dict(self) -> dict:
        return {**self.__dict__, "notes": list(self.notes)}


def _check_device(device: Device) -> None:
    """A catalogue entry's numbers: memory and peaks finite and positive (a peak may be null), a price finite
    and >= 0 (or null); one line naming the entry and field otherwise."""
    def bad(field, value, expected):
        return EstimateError(f"GPU catalogue entry {device.name!r}: {field}: expected {expected}, got {value!r}")

    def number(value):
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

    if not (number(device.memory_bytes) and device.memory_bytes > 0):
        raise bad("memory_bytes", device.memory_bytes, "a positive finite number of bytes")
    for key, value in device.peak_flops_per_s.items():
        if value is not None and not (number(value) and value > 0):
            raise bad(f"peak_flops_per_s.{key}", value, "a positive finite FLOP/s or null")
    if device.price_per_hour is not None and not (number(device.price_per_hour) and device.price_per_hour >= 0):
        raise bad("price_per_hour_usd", device.price_per_hour, "a finite price >= 0 or null")
    if device.memory_bandwidth is not None and not (number(device.memory_bandwidth) and device.memory_bandwidth > 0):
        raise bad("memory_bandwidth_bytes_per_s", device.memory_bandwidth, "a positive finite number or null")


@functools.lru_cache(maxsize=None)
def _shipped_gpus() -> dict:
    return _read_json(DATA / "gpus.json", "the GPU catalogue")


def gpu_catalog(extra: str | Path | None = None) -> dict[str, Device]:
    """The shipped GPUs, plus (replacing same-named ones) those in `extra`, a file in gpus.json's format."""
    tables = [_shipped_gpus()] + ([_read_json(Path(extra), "a GPU catalogue")] if extra else [])
    devices = {}
    for table in tables:
        runtime = table.get("runtime_bytes", _shipped_gpus()["runtime_bytes"])
        for entry in table.get("gpus", []):
            try:
                device = Device(name=entry["name"], kind="gpu", memory_bytes=float(entry["memory_bytes"]),
                                peak_flops_per_s=dict(entry["peak_flops_per_s"]),
                                runtime_bytes=float(entry.get("runtime_bytes", runtime)),
                                price_per_hour=entry.get("price_per_hour_usd"),
                                memory_bandwidth=entry.get("memory_bandwidth_bytes_per_s"),
                                source=entry.get("source", ""),
                                notes=(entry["notes"],) if entry.get("notes") else ())
            except (KeyError, TypeError, ValueError) as err:
                raise EstimateError(f"GPU catalogue entry {entry.get('name', '?')!r}: missing or bad field {err}") \
                    from None
            _check_device(device)
            for alias in [entry["name"], *entry.get("aliases", [])]:
                devices[_key(alias)] = device
    return devices


# glibc malloc keeps freed activation-sized blocks (its mmap threshold rises to 32 MiB as blocks are freed),
# so a CPU run's peak RSS exceeds its live tensors. benchmarks/estimate_calibration.py measured the excess on
# smollm2-135m (10 runs: full, LoRA, freeze, checkpointing, 2-8 x 128-512 tokens) at 0.2-0.9x the activation
# bytes (LoRA's unfused adapters leave the most holes); 0.6x keeps every run within 25%. With the threshold
# pinned (MALLOC_MMAP_THRESHOLD_=131072) the excess vanishes: LoRA 8 x 128 peaked at 2.70 GB instead of 4.42 GB.
CPU_ALLOCATOR_RETENTION = 0.6
CPU_ALLOCATOR_SOURCE = ("allocator retention: glibc malloc keeps freed blocks; measured 0.2-0.9x the activation "
                        "bytes on this machine's calibration runs, 0.6x assumed (benchmarks/estimate_calibration.py)")
BASELINE_IMPORTS = ("torch", "transformers", "peft")  # what every tunegap training process imports
FALLBACK_BASELINE_BYTES = 350 * 2**20


def measure_baseline_rss() -> int:
    """Peak RSS (bytes) of a fresh Python process that only imports torch, transformers and peft.

    A CPU run's peak memory includes this process baseline, so the estimator adds it for device "cpu".
    Measured once in a subprocess (a few seconds) and cached per interpreter and package versions.
    """
    versions = []
    for name in BASELINE_IMPORTS:
        try:
            versions.append(f"{name}={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{name}=none")
    key = "|".join([sys.executable, *versions])
    cache = Path(os.environ.get("TUNEGAP_CACHE", Path.home() / ".cache" / "tunegap")) / "baseline_rss.json"
    try:
        cached = json.loads(cache.read_text()).get(key)
        if cached:
            return int(cached)
    except (OSError, ValueError, TypeError, AttributeError):
        pass
    code = ("import importlib, resource\n"
            f"for m in {BASELINE_IMPORTS!r}:\n"
            "    try:\n        importlib.import_module(m)\n    except ImportError:\n        pass\n"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
        value = int(out.stdout.strip().splitlines()[-1]) * 1024  # ru_maxrss is in KiB on Linux
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return FALLBACK_BASELINE_BYTES
    try:
        from ..io import atomic_write_json

        table = json.loads(cache.read_text()) if cache.is_file() else {}
        table[key] = value
        atomic_write_json(cache, table)
    except (OSError, ValueError, AttributeError):
        pass  # an unwritable cache only costs a few seconds next time
    return value


def cpu_device(peaks: dict | None = None) -> Device:
    """This machine: matmul peaks (measured now, or `peaks` as a run's ledger recorded them), physical memory,
    and the measured Python + torch baseline as runtime overhead."""
    if peaks is None:
        from .hardware import measure_peaks

        peaks = measure_peaks().to_dict()
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        memory = 0
    baseline = measure_baseline_rss()
    return Device(name=f"cpu ({peaks.get('device', '?')}, {peaks.get('threads', '?')} threads)", kind="cpu",
                  memory_bytes=float(memory),
                  peak_flops_per_s={"fp32": peaks["fp32_flops_per_s"], "bf16": peaks["bf16_flops_per_s"]},
                  runtime_bytes=float(baseline), price_per_hour=None, allocator_retention=CPU_ALLOCATOR_RETENTION,
                  source="matmul peaks measured on this machine (hardware.measure_peaks); memory from sysconf",
                  notes=("runtime overhead = peak RSS of a process that only imports torch, transformers and peft "
                         "(measured)", CPU_ALLOCATOR_SOURCE))


def resolve_device(name: str = "H100-SXM", *, catalog: str | Path | None = None,
                   price: float | None = None) -> Device:
    """A catalogue GPU by name or alias, or "cpu"; `price` ($/h) overrides the catalogue's."""
    if _key(name) == "cpu":
        device = cpu_device()
    else:
        devices = gpu_catalog(catalog)
        if _key(name) not in devices:
            names = sorted({d.name for d in devices.values()})
            raise EstimateError(f"--gpu: unknown {name!r}; choose from {', '.join(names)}, cpu (or add it with --catalog)")
        device = devices[_key(name)]
    if price is not None:
        if price < 0:
            raise EstimateError(f"--price: must be >= 0, got {price}")
        device = replace(device, price_per_hour=float(price))
    return device


def gpu_peak_flops(name: str, precision: str = "bf16") -> float:
    """Dense datasheet peak of a catalogue GPU (what `tunegap.train` prices its dollar estimate with)."""
    return resolve_device(name).peak(precision)[0]
