"""What this machine can do, measured rather than assumed.

CPUs differ wildly in bf16: a Zen 4 with avx512_bf16 runs bf16 matmuls about 2x faster than fp32, a Zen 3
emulates them about 300x slower. So the peak of each precision is measured at start-up with a square
matmul, the faster one is chosen for autocast, and MFU is stated against the faster peak.
"""

from __future__ import annotations

import functools
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


def measure_matmul_flops(dtype_name: str, *, size: int = 1536, seconds: float = 0.25, trials: int = 3,
                         device: str = "cpu") -> float:
    """Sustained FLOP/s of an n x n x n matmul (2n^3 FLOPs each): the best of a few short bursts.

    The best burst, not the mean: the machine is shared, and a peak is what the hardware can do when
    nothing else runs. An emulated precision shows itself on the first call and is not repeated.
    """
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    start = time.perf_counter()
    a @ b  # warm-up, and a first timing
    sync()
    one = time.perf_counter() - start
    best = 2.0 * size**3 / one
    if one > seconds:
        return best
    reps = max(1, int(seconds / one))
    for _ in range(trials):
        start = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync()
        best = max(best, 2.0 * size**3 * reps / (time.perf_counter() - start))
    return best


@functools.lru_cache(maxsize=None)
def measure_peaks(device: str = "cpu") -> Peaks:
    """Measured once per process (about 2 s), never read from a file: a stale peak would misstate MFU."""
    import torch

    name = torch.cuda.get_device_name() if device.startswith("cuda") else cpu_name()
    return Peaks(device=name, fp32_flops_per_s=measure_matmul_flops("fp32", device=device),
                 bf16_flops_per_s=measure_matmul_flops("bf16", device=device), threads=torch.get_num_threads())
