"""What this machine can do, measured rather than assumed.

CPUs differ wildly in bf16: a Zen 4 with avx512_bf16 runs bf16 matmuls about 2x faster than fp32, a Zen 3
emulates them about 300x slower. So the peak of each precision is measured at start-up with a square
matmul, the faster one is chosen for autocast, and MFU is stated against the faster peak.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class Peaks:
    device: str
    fp32_flops_per_s: float
    bf16_flops_per_s: float
    threads: int

    @property
    def best_precision(self) -> str:
        # bf16 must win clearly: autocast adds casts that a marginal matmul gain does not repay.
        return "bf16" if self.bf16_flops_per_s > 1.2 * self.fp32_flops_per_s else "fp32"

    @property
    def best_flops_per_s(self) -> float:
        return max(self.fp32_flops_per_s, self.bf16_flops_per_s)

    def to_dict(self) -> dict:
        return {**asdict(self), "best_precision": self.best_precision, "how": "measured"}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def measure_matmul_flops(dtype_name: str, *, size: int = 1024, min_seconds: float = 0.3,
                         device: str = "cpu") -> float:
    """Sustained FLOP/s of an n x n x n matmul (2n^3 FLOPs each), after one warm-up call."""
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    a @ b
    sync()
    # Bail out early on emulated precisions: one call already tells us it is hopeless.
    start = time.perf_counter()
    a @ b
    sync()
    one = time.perf_counter() - start
    reps = max(1, int(min_seconds / max(one, 1e-6)))
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync()
    elapsed = time.perf_counter() - start
    return 2.0 * size**3 * reps / elapsed


@functools.lru_cache(maxsize=None)
def measure_peaks(device: str = "cpu") -> Peaks:
    """Measure once per process; cached in TUNEGAP_CACHE per CPU model and thread count for later runs."""
    import torch

    threads = torch.get_num_threads()
    name = torch.cuda.get_device_name() if device.startswith("cuda") else cpu_name()
    cache = Path(os.environ.get("TUNEGAP_CACHE", Path.home() / ".cache" / "tunegap")) / "peaks.json"
    key = f"{name}|{threads}|{torch.__version__}"
    try:
        cached = json.loads(cache.read_text()).get(key)
        if cached:
            return Peaks(**cached)
    except (OSError, ValueError, TypeError):
        pass
    peaks = Peaks(device=name, fp32_flops_per_s=measure_matmul_flops("fp32", device=device),
                  bf16_flops_per_s=measure_matmul_flops("bf16", device=device), threads=threads)
    try:
        from ..io import atomic_write_json

        table = json.loads(cache.read_text()) if cache.is_file() else {}
        table[key] = asdict(peaks)
        atomic_write_json(cache, table)
    except (OSError, ValueError):
        pass  # a cache we cannot write only costs a second next time
    return peaks
