"""What this machine can do, measured rather than assumed.

CPUs differ wildly in bf16: a Zen 4 with avx512_bf16 runs bf16 matmuls about 2x faster than fp32, a Zen 3
emulates them about 300x slower. So the peak of each precision is measured at start-up with a square
matmul, the faster one is chosen for autocast, and MFU is stated against the faster peak.
"""

from __future__ import annotations

import functools
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import ConfigError

# Model-FLOPs utilisation assumed where none was measured: the estimator's default and the trainer's --compile
# auto decision. An assumption, below what large tuned runs publish (PaLM 540B: 46.2%, Chowdhery et al. 2022,
# Table 3).
DEFAULT_MFU = 0.40


@dataclass(frozen=True)
class Peaks:
    device: str
    fp32_flops_per_s: float
    bf16_flops_per_s: float
    threads: int
    how: str = "measured"  # "given" when TUNEGAP_PEAKS_FP32/_BF16 supplied them

    @property
    def best_precision(self) -> str:
        # bf16 must win clearly: autocast adds casts that a marginal matmul gain does not repay.
        return "bf16" if self.bf16_flops_per_s > 1.2 * self.fp32_flops_per_s else "fp32"

    @property
    def best_flops_per_s(self) -> float:
        return max(self.fp32_flops_per_s, self.bf16_flops_per_s)

    def to_dict(self) -> dict:
        return {**asdict(self), "best_precision": self.best_precision}


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
    # its own generator: the first run of a process measures the peaks after seeding the global one, and
    # drawing from that would give it other LoRA weights than a later run of the same seed
    own = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, generator=own).to(dtype)
    b = torch.randn(size, size, device=device, generator=own).to(dtype)
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


PEAK_ENV = {"fp32": "TUNEGAP_PEAKS_FP32", "bf16": "TUNEGAP_PEAKS_BF16"}


def given_peaks(device: str = "cpu") -> Peaks | None:
    """Peaks from TUNEGAP_PEAKS_FP32 and TUNEGAP_PEAKS_BF16 (FLOP/s), labelled "given", not "measured".

    For processes started many times over (fault-injection tests, job arrays) where 2 s of matmuls per
    start dominates; the ledger says the figures were supplied, so an MFU computed from them is not
    mistaken for a measurement on this machine.
    """
    raw = {k: os.environ.get(v) for k, v in PEAK_ENV.items()}
    if not any(raw.values()):
        return None
    values = {}
    for key, text in raw.items():
        try:
            values[key] = float(text or "nan")
        except ValueError:
            values[key] = float("nan")
        if not 0 < values[key] < float("inf"):
            raise ConfigError(f"{PEAK_ENV[key]}={text!r}: set both {' and '.join(PEAK_ENV.values())} "
                              "to positive FLOP/s, or neither to measure them")
    import torch

    return Peaks(device=f"{cpu_name() if device == 'cpu' else device} (peaks given by environment)",
                 fp32_flops_per_s=values["fp32"], bf16_flops_per_s=values["bf16"],
                 threads=torch.get_num_threads(), how="given")


@functools.lru_cache(maxsize=None)
def measure_peaks(device: str = "cpu") -> Peaks:
    """Measured once per process (about 2 s), never read from a file: a stale peak would misstate MFU.

    The one exception is `given_peaks` (environment variables), labelled as such wherever it is reported.
    """
    import torch

    given = given_peaks(device)
    if given is not None:
        return given
    name = torch.cuda.get_device_name() if device.startswith("cuda") else cpu_name()
    return Peaks(device=name, fp32_flops_per_s=measure_matmul_flops("fp32", device=device),
                 bf16_flops_per_s=measure_matmul_flops("bf16", device=device), threads=torch.get_num_threads())
