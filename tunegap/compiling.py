"""Regional `torch.compile`: each decoder layer is compiled in place, once for all of them.

Why regional: the layers share one code path, so one compiled graph serves all 30 (PyTorch's "regional
compilation" recipe); compiling the whole model costs minutes on two cores for the same kernels.
What it buys on the CPU: Inductor fuses each layer's elementwise work (RMSNorm, rotary, SiLU x up, residual
adds, casts) into a few C++ loops and its partitioner keeps fewer activations for backward (it recomputes the
cheap ones); attention goes through SDPA's math backend, which Inductor fuses too (`precision`).
Measured on the default model, 2-core Zen 4, bf16, 8 x 128-token examples per step, 3 alternating rounds
(`benchmarks/vs_trl.py`, medians): LoRA 2.28 -> 1.98 s/step (1.75 with the C++ wrapper, `options`) and
2.43 -> 2.00 GiB peak RSS; full SFT 3.08 -> 2.71 s/step and 4.06 -> 3.38 GiB. The price is a one-time
compile, 9-20 s more for step 1 with Inductor's on-disk cache warm (about a minute cold), which is why
`--compile auto` turns it on only where the predicted saving beats the predicted compile.

A compiled layer runs kernels no `TorchDispatchMode` can see, so the ledger's counted FLOPs of a compiled
run come from replaying the step on fake tensors (`costs.counted.count_on_fake_tensors`).
"""

from __future__ import annotations

import shutil

from .config import ConfigError

# --compile auto compiles when the predicted saving beats the predicted compile. Measured on the default model:
# compiled steps take 0.8-0.9x the eager time (module docstring), so a saving of 12% of the training time; the
# compile took about a minute cold on a 2-core Zen 4 (fp32 peak ~190 GFLOP/s measured) and 59 s on a Zen 3
# measured at 47 GFLOP/s with a warm cache, so its cost is scaled by this machine's measured fp32 peak.
COMPILED_STEP_SAVING = 0.12
COMPILE_SECONDS_AT_REFERENCE = 60.0
REFERENCE_FP32_PEAK = 190e9


def compile_seconds(fp32_peak: float) -> float:
    """The one-time compile's predicted cost on a machine of this measured fp32 peak (estimate, seconds)."""
    return COMPILE_SECONDS_AT_REFERENCE * REFERENCE_FP32_PEAK / max(fp32_peak, 1e9)


def blocks(decoder) -> list:
    """The decoder's repeated blocks: the longest `nn.ModuleList` of one module class (Llama's `layers`,
    GPT-2's `h`), or [] when there is none."""
    import torch

    lists = [m for m in decoder.modules() if isinstance(m, torch.nn.ModuleList) and len(m)
             and len({type(b) for b in m}) == 1]
    return list(max(lists, key=len)) if lists else []


def why_not(method, distributed: bool, decoder=None) -> str | None:
    """The reason this run cannot be compiled, or None."""
    if decoder is not None and not blocks(decoder):
        return "no list of repeated decoder blocks found in this model"
    if distributed:
        return "not under torchrun (DDP/FSDP run eagerly here)"
    if method.changes_sequence:
        return f"{method.name} passes virtual tokens through every layer's cache"
    if getattr(method, "base_format", "same") != "same":
        return f"{method.name}: its {method.base_format} base weights are not tried with torch.compile here"
    if shutil.which("g++") is None and shutil.which("c++") is None:
        return "no C++ compiler (g++) on PATH for Inductor's CPU kernels"
    return None


def decide(setting: str, *, method, distributed: bool, estimated_seconds: float, fp32_peak: float,
           decoder=None) -> tuple[bool, str]:
    """(compile?, the reason, for the run's log and ledger)."""
    if setting == "off":
        return False, "off (--compile off)"
    reason = why_not(method, distributed, decoder)
    if setting == "on":
        if reason:
            raise ConfigError(f"--compile on: cannot compile this run: {reason}")
        return True, "on (--compile on)"
    if reason:
        return False, f"off (auto: {reason})"
    saving, cost = COMPILED_STEP_SAVING * estimated_seconds, compile_seconds(fp32_peak)
    because = (f"training predicted at {estimated_seconds / 60:.1f} min, so compiling saves about {saving:.0f} s "
               f"against a compile of about {cost:.0f} s on this machine (estimates)")
    if saving <= cost:
        return False, f"off (auto: {because}; --compile on forces it)"
    return True, f"on (auto: {because})"


def compile_layers(decoder) -> list:
    """Compile every decoder block in place (`nn.Module.compile`: state-dict keys and hooks stay as they are).

    dynamic=True: packed batches change width every step, and one graph with a symbolic width avoids a
    recompile per width."""
    layers = blocks(decoder)
    for layer in layers:
        layer.compile(dynamic=True, options=options(next(layer.parameters()).device.type))
    return layers


def options(device: str) -> dict:
    """Inductor options. On the CPU its C++ wrapper calls the kernels from C++ instead of a Python function per
    graph: default model, LoRA, 8 alternating pairs of runs, median 0.96x the step time (6 of 8 pairs faster;
    a noisy machine), the same warm compile time."""
    return {"cpp_wrapper": True} if device == "cpu" else {}


def decompile(layers) -> None:
    """Back to eager (evaluation and generation after training would otherwise compile again for no_grad
    and for every cache length). `nn.Module.compile` keeps its compiled call in `_compiled_call_impl`."""
    for layer in layers:
        layer._compiled_call_impl = None


def eager():
    """Run compiled modules eagerly inside this block (held-out loss during training, the FLOP count's replay)."""
    import torch

    return torch.compiler.set_stance("force_eager")


def check_compiler() -> str | None:
    """Compile a two-op function once: None if Inductor works here, else its error in one line."""
    import torch

    try:
        torch.compile(lambda x: (x * 2).sin() + 1, dynamic=False, options=options("cpu"))(torch.ones(4))
    except Exception as e:  # noqa: BLE001  any failure means: run eagerly, and say why
        return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]
    return None
