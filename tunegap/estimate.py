"""`tunegap estimate`: the ledger a run would record, predicted from the model's config alone, in under a second.

`estimate_run` is a pure function of (shape, method, work, setup, device) and returns the same cost keys a
run's ledger.json holds (`tunegap.ledger`), each `{"value", "unit", "how": "estimate"}`. FLOPs come from
`costs.flops` (the formulas that match FlopCounterMode), memory from `costs.memory`, devices and model
presets from `costs.catalog`. Time is model FLOPs / (devices x datasheet peak x MFU), MFU an assumption
(0.40 by default; Llama 3 reports 38-43%, Dubey et al. 2024, Table 4), plus QLoRA's dequantisation, which is
memory-bound. `--against RUN` puts a finished run's measured ledger beside the prediction for its settings.

Nothing here imports torch: only `--gpu cpu` does (to measure this machine's peaks).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import replace
from pathlib import Path

from .costs.catalog import Device, EstimateError, cpu_device, model_presets, resolve_device, resolve_model
from .costs.flops import CONVENTIONS, convention_flops, recompute_flops, train_step_flops
from .costs.hardware import DEFAULT_MFU
from .costs.megatron import RECOMPUTE, Layout, StageMemory, smallest_fitting_layout, stage_memory
from .costs.memory import (NAMED_PRESETS, OPTIMIZERS, PRECISIONS, TrainSetup, bytes_per_param, devices_needed,
                           memory_per_device, nf4_bytes_per_param, precision)
from .costs.shape import ModelShape
from .ledger import format_quantity
from .methods import ALL_LINEAR, METHODS, Method, make_method

__all__ = ["EstimateError", "estimate_run", "estimate", "add_parser", "main", "format_estimate"]

COST_UNITS = {
    "tokens": "token", "loss_tokens": "token", "examples": "example", "optimizer_steps": "step",
    "params_total": "parameter", "params_trainable": "parameter", "trainable_share": "fraction",
    "weights_bytes": "byte", "gradient_bytes": "byte", "optimizer_state_bytes": "byte",
    "activation_bytes": "byte", "peak_memory_bytes": "byte",
    "flops_forward": "FLOP", "flops_backward": "FLOP", "flops_total": "FLOP", "flops_hardware": "FLOP",
    "wall_time_s": "s", "tokens_per_s": "token/s", "gpu_hours": "GPU-hour", "dollars": "USD",
}
# Names the estimator takes beyond the registered methods, and the method each runs as ("qlora" is registered:
# `methods.qlora.QLoRA`, whose base_format "nf4" sets the setup's).
PSEUDO_METHODS = {"pretrain": "full"}


def _q(value, key: str) -> dict:
    return {"value": None if value is None else float(value), "unit": COST_UNITS[key], "how": "estimate"}


THROUGHPUT_FLAGS = {"mfu": "--mfu", "hfu": "--hfu", "tokens_per_s_per_gpu": "--tokens-per-second-per-gpu",
                    "tflops_per_gpu": "--tflops-per-gpu"}
THROUGHPUT_KEYS = tuple(THROUGHPUT_FLAGS)


def resolve_throughput(given: dict | None, *, model_flops: float, hardware_flops: float, tokens: float,
                       devices: int, peak: float) -> dict:
    """MFU, HFU, seconds and per-device rates from whichever one the user gave (Chowdhery et al. 2022, App. B:
    MFU = model FLOPs / (time x devices x peak), HFU the same with the recompute the hardware also ran).

    `tflops_per_gpu` is achieved *hardware* FLOP/s per device, as Megatron-LM logs it and Narayanan et al. 2021
    report it (their 8TP counts the recomputed forward); `tokens_per_s_per_gpu` a measured rate."""
    given = dict(given or {"mfu": DEFAULT_MFU})
    if len(given) != 1 or next(iter(given)) not in THROUGHPUT_KEYS:
        raise EstimateError("give at most one of --mfu, --hfu, --tokens-per-second-per-gpu, --tflops-per-gpu")
    (key, value), = given.items()
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise EstimateError(f"{THROUGHPUT_FLAGS[key]}: expected a positive finite number, got {value}")
    if key in ("mfu", "hfu") and value > 1:
        raise EstimateError(f"--{key}: expected a fraction in (0, 1], got {value}")
    if key == "mfu":
        seconds = model_flops / (devices * peak * value)
    elif key == "hfu":
        seconds = hardware_flops / (devices * peak * value)
    elif key == "tflops_per_gpu":
        seconds = hardware_flops / (devices * value * 1e12)
    else:
        seconds = tokens / (devices * value)
    mfu, hfu = model_flops / (seconds * devices * peak), hardware_flops / (seconds * devices * peak)
    if hfu > 1.0 + 1e-9:
        raise EstimateError(f"{THROUGHPUT_FLAGS[key]} {value} implies HFU {hfu:.0%} of the {peak / 1e12:.4g} TFLOP/s "
                            "peak: faster than the hardware can run")
    return {"given": key, "value": value, "seconds": seconds, "mfu": mfu, "hfu": hfu,
            "tokens_per_s_per_gpu": tokens / (seconds * devices),
            "model_tflops_per_gpu": model_flops / (seconds * devices) / 1e12,
            "hardware_tflops_per_gpu": hardware_flops / (seconds * devices) / 1e12}


def _full_training(method: Method, label: str) -> bool:
    return method.name == "full" or label in ("full", "pretrain")


def _megatron_memory(shape, setup: TrainSetup, layout: Layout, *, seq_len: int, recompute: str, flash: bool,
                     dropout: bool, runtime: float) -> StageMemory:
    per = bytes_per_param(setup.precision, setup.optimizer)
    return stage_memory(shape, layout, bytes_weights=per["weights"], bytes_grads=per["gradients"],
                        bytes_states=per["optimizer_state"], zero=setup.zero, micro_batch=setup.micro_batch,
                        seq_len=seq_len, micro_batches=setup.grad_accum, recompute=recompute, flash=flash,
                        dropout=dropout, runtime_bytes=runtime)


def estimate_run(shape: ModelShape, method: Method, *, tokens: float | None = None, sequences: int,
                 seq_len: int, steps: int, setup: TrainSetup, hardware: Device, examples: float | None = None,
                 loss_tokens: float | None = None, label: str | None = None, convention: str = "hardware",
                 throughput: dict | None = None, goodput: float = 1.0, layout: Layout | None = None,
                 auto_layout: bool = False, recompute: str | None = None, activations: str = "auto",
                 flash: bool = True, dropout: bool | None = None) -> dict:
    """Predict a run's ledger: `sequences` rows of `seq_len` tokens in all, over `steps` optimizer steps.

    `tokens`: real tokens (default sequences x seq_len; less when rows are padded); `loss_tokens`: positions
    with a loss, where logits are computed (default `tokens`); `examples`: for the record (default sequences).
    The setup's micro-batch is in rows per device. `convention`: the FLOP count the totals and MFU use
    (`flops.CONVENTIONS`). `throughput`: one of {"mfu" | "hfu" | "tokens_per_s_per_gpu" | "tflops_per_gpu": x}
    (default the setup's MFU). `goodput`: the share of wall-clock spent training (restarts, downtime aside).
    `layout`: model-parallel degrees (full training only; `setup.gpus` is then every device); `auto_layout`:
    pick the smallest that fits when pure data parallelism does not. Raises EstimateError (or MethodError).
    """
    if sequences < 1 or seq_len < 1:
        raise EstimateError(f"no work: {sequences} sequences of {seq_len} tokens (give a positive token count)")
    if steps < 1:
        raise EstimateError(f"no work: {steps} optimizer steps")
    positions = float(sequences) * seq_len
    tokens = positions if tokens is None else float(tokens)
    if not (math.isfinite(tokens) and tokens > 0):
        raise EstimateError(f"--tokens: expected a positive finite count, got {tokens}")
    if not (isinstance(goodput, (int, float)) and 0 < goodput <= 1):
        raise EstimateError(f"--goodput: expected a fraction in (0, 1], got {goodput}")
    loss_tokens = tokens if loss_tokens is None else float(loss_tokens)
    method.check(shape)
    if method.base_format != "same":  # the method stores its base so (QLoRA: NF4), whatever the setup says
        setup = replace(setup, base_format=method.base_format)
    if setup.base_format == "nf4" and method.name not in ("lora", "qlora"):
        raise EstimateError(f"a 4-bit NF4 base (QLoRA) needs the lora method, not {method.name}")
    label = label or ("qlora" if setup.base_format == "nf4" else method.name)
    full = _full_training(method, label)
    trainable = method.trainable(shape)
    recompute = recompute or ("full" if setup.checkpointing else "none")
    if recompute not in RECOMPUTE:
        raise EstimateError(f"--recompute: expected one of {', '.join(RECOMPUTE)}, got {recompute!r}")
    if recompute == "selective" and activations == "hf":
        raise EstimateError("--recompute selective is Megatron's (Korthikanti et al. 2022): "
                            "use --activations korthikanti")
    setup = replace(setup, checkpointing=recompute == "full")
    if (layout is not None and layout.gpus != setup.gpus):
        raise EstimateError(f"--gpus {setup.gpus} and the layout's {layout.gpus} devices differ")

    # FLOPs of the whole run (train_step_flops is linear in sequences); logits only at loss positions,
    # except for methods that lengthen the sequence, which project every position (as tunegap.train does)
    logit_tokens = None if method.changes_sequence else loss_tokens
    calls = math.ceil(sequences / setup.micro_batch)  # forward calls: parts' per-call matmuls run once in each
    flops = train_step_flops(shape, trainable, sequences=sequences, seq_len=seq_len, logit_tokens=logit_tokens,
                             checkpointing=setup.checkpointing, calls=calls)
    plain = train_step_flops(shape, trainable, sequences=sequences, seq_len=seq_len, logit_tokens=logit_tokens,
                             calls=calls) if setup.checkpointing else flops
    checkpoint_recompute = flops.recompute - plain.recompute  # checkpointing's extra forward (HFU, not MFU)
    model = convention_flops(shape, trainable, convention, sequences=sequences, seq_len=seq_len,
                             logit_tokens=logit_tokens, calls=calls, full_training=full)
    if recompute == "selective":
        extra = recompute_flops(shape, sequences=sequences, seq_len=seq_len, recompute="selective", flash=flash)
        flops = replace(flops, recompute=max(flops.recompute, extra))
    hardware_flops = flops.hardware
    if not all(math.isfinite(x) for x in (model.total, hardware_flops)):
        raise EstimateError("the model's config gives no finite FLOP count (a dimension is out of range)")

    # memory of one device for one micro-batch
    per_micro = None if method.changes_sequence else loss_tokens / sequences * setup.micro_batch
    p = precision(setup.precision)
    # CUDA's flash kernel takes no fp32: SDPA then runs its math kernel, which keeps the s x s probabilities
    math_attention = hardware.kind == "gpu" and p.activation == 4
    memory_args = dict(seq_len=seq_len, loss_positions=per_micro, runtime_bytes=hardware.runtime_bytes,
                       math_attention=math_attention, allocator_retention=hardware.allocator_retention)
    dropout = shape.family in ("gpt2", "gpt_neox") if dropout is None else dropout
    parallel = layout is not None and (layout.model_parallel > 1 or layout.ep > 1)
    use_korthikanti = activations == "korthikanti" or (activations == "auto" and (parallel or recompute == "selective"))
    if activations not in ("auto", "hf", "korthikanti"):
        raise EstimateError(f"--activations: expected auto, hf or korthikanti, got {activations!r}")
    if (parallel or use_korthikanti or auto_layout and full) and not full:
        raise EstimateError("model-parallel layouts and Korthikanti activations are modelled for full training "
                            "(--method full or pretrain)")
    mem = memory_per_device(shape, trainable, replace(setup, gpus=layout.dp if layout else setup.gpus),
                            **memory_args)
    needed, why = devices_needed(shape, trainable, setup, capacity_bytes=hardware.memory_bytes, **memory_args)
    stage = None
    mega = dict(seq_len=seq_len, recompute=recompute, flash=flash, dropout=dropout, runtime=hardware.runtime_bytes)
    if use_korthikanti or parallel:
        layout = layout or Layout(gpus=setup.gpus)
        stage = _megatron_memory(shape, setup, layout, **mega)
    if auto_layout and full and layout is None and mem.peak > hardware.memory_bytes:
        layout, stage, found = smallest_fitting_layout(shape, setup.gpus, hardware.memory_bytes,
                                                       lambda lay: _megatron_memory(shape, setup, lay, **mega))
        why = (f"smallest layout that fits {setup.gpus} devices: {layout.describe()}" if found else
               f"no layout of {setup.gpus} devices fits; the lowest peak (shown) is {layout.describe()}: add "
               "devices, --recompute, --zero or a smaller --micro-batch")
        use_korthikanti = True
    layout = layout or Layout(gpus=setup.gpus)
    peak_bytes = stage.peak if stage is not None else mem.peak
    fits = peak_bytes <= hardware.memory_bytes
    if stage is not None and not why.startswith(("smallest layout", "no layout")):
        why = (f"fits on {layout.describe()}" if fits else
               "its busiest device needs more than the capacity; try another layout, --recompute or a smaller "
               "--micro-batch")

    if stage is not None:  # Megatron's recompute: the whole forward of each block ("full"), or QK^T and AV
        base = train_step_flops(shape, trainable, sequences=sequences, seq_len=seq_len, logit_tokens=logit_tokens,
                                calls=calls, attention_rescore=False)
        flops = replace(base, recompute=recompute_flops(shape, sequences=sequences, seq_len=seq_len,
                                                        recompute=recompute, flash=flash))
        checkpoint_recompute = flops.recompute if recompute == "full" else 0.0
        hardware_flops = flops.hardware

    # time: model FLOPs (in the chosen convention) at MFU x peak on every device; HFU beside it
    peak, peak_note = hardware.peak(p.peak)
    rate = resolve_throughput(throughput if throughput is not None else {"mfu": setup.mfu}, model_flops=model.total,
                              hardware_flops=hardware_flops * model.total / flops.total, tokens=tokens,
                              devices=setup.gpus, peak=peak)
    compute_s = rate["seconds"]
    dequant_s, dequant_note = 0.0, ""
    if setup.base_format == "nf4":
        # bitsandbytes dequantises each 4-bit matrix to bf16 before every matmul that reads it: forward,
        # the input-gradient pass, and the recomputed forward; memory-bound (read 0.5 B, write 2 B per weight)
        nf4 = mem.detail["nf4_params"]
        passes = 2 + (1 if setup.checkpointing else 0)
        micro_batches = math.ceil(sequences / (setup.micro_batch * setup.gpus))
        traffic = (nf4_bytes_per_param(setup.double_quant) + 2) * nf4 * passes * micro_batches
        if hardware.memory_bandwidth:
            dequant_s = traffic / hardware.memory_bandwidth
        else:
            dequant_note = f"{hardware.name}: no memory bandwidth in the catalogue, QLoRA dequantisation time left out"
    wall = (compute_s + dequant_s) / goodput
    gpu_hours = wall * setup.gpus / 3600
    dollars = gpu_hours * hardware.price_per_hour if hardware.price_per_hour is not None else None
    params_total = shape.total_params() + mem.detail["added_params"]
    params_trainable = trainable.params(shape)
    if stage is not None:
        weights, grads, states, acts = stage.weights, stage.gradients, stage.optimizer_state, stage.activations
    else:
        weights, grads, states, acts = mem.weights, mem.gradients, mem.optimizer_state, mem.activations

    costs = {
        "tokens": _q(tokens, "tokens"),
        "loss_tokens": _q(loss_tokens, "loss_tokens"),
        "examples": _q(sequences if examples is None else examples, "examples"),
        "optimizer_steps": _q(steps, "optimizer_steps"),
        "params_total": _q(params_total, "params_total"),
        "params_trainable": _q(params_trainable, "params_trainable"),
        "trainable_share": _q(params_trainable / params_total, "trainable_share"),
        "weights_bytes": _q(weights, "weights_bytes"),
        "gradient_bytes": _q(grads, "gradient_bytes"),
        "optimizer_state_bytes": _q(states, "optimizer_state_bytes"),
        "activation_bytes": _q(acts, "activation_bytes"),
        "peak_memory_bytes": _q(peak_bytes, "peak_memory_bytes"),
        "flops_forward": _q(model.forward, "flops_forward"),
        "flops_backward": _q(model.backward, "flops_backward"),
        "flops_total": _q(model.total, "flops_total"),
        "flops_hardware": _q(hardware_flops, "flops_hardware"),
        "wall_time_s": _q(wall, "wall_time_s"),
        "tokens_per_s": _q(tokens / wall, "tokens_per_s"),
        "gpu_hours": _q(gpu_hours, "gpu_hours"),
        "dollars": _q(dollars, "dollars"),
    }
    full_flops = train_step_flops(shape, METHODS["full"]().trainable(shape), sequences=sequences, seq_len=seq_len,
                                  logit_tokens=logit_tokens).total
    notes = [] if full else [
        f"{label}: {flops.total / full_flops:.0%} of a full fine-tune's FLOPs for the same tokens (frozen weights "
        "skip their weight-gradient matmuls, but not the forward or the input gradients)"
        + ("; LoRA costs about 2/3 of full fine-tuning per token, not 1%: its saving is memory"
           if method.name == "lora" else "")]
    notes += [n for n in (peak_note, dequant_note) if n]
    if hardware.kind == "gpu" and p.peak == "fp32":
        notes.append("fp32 matmuls use the non-tensor-core fp32 peak; enabling TF32 would be faster")
    if seq_len > (shape.max_position_embeddings or seq_len):
        notes.append(f"--seq-len {seq_len} exceeds the model's {shape.max_position_embeddings} positions")
    if shape.sliding_window and seq_len > shape.sliding_window:
        notes.append(f"the config's sliding window ({shape.sliding_window}) is shorter than --seq-len: attention "
                     "FLOPs count the full square (an upper bound)")
    if layout.pp > 1:
        notes.append(f"pipeline bubble (p - 1)/m = {(layout.pp - 1) / setup.grad_accum:.1%} of the ideal step "
                     f"(1F1B, Narayanan et al. 2021, Sec. 2.2): inside the MFU, which is end to end")
    opt = OPTIMIZERS[setup.optimizer]
    per_param = _bytes_layout(setup)
    activation_model = (
        f"Korthikanti et al. 2022, Table 2: sbh(34 + 5as/h) per layer at 16 bits, generalised to this block "
        f"({'with' if dropout else 'without'} dropout), TP {layout.tp}{' + SP' if layout.sp else ''}, CP {layout.cp}, "
        f"recompute {recompute}, " + ("fused/flash attention: no 5as/h term (fp32 logsumexp kept)" if flash else
                                      "eager attention: the 5as/h term kept")
        + f"; PP {layout.pp}: {stage.in_flight if stage else 1} micro-batches in flight (1F1B)"
        if use_korthikanti or stage is not None else
        "tensors saved by a Hugging Face Llama-style block with SDPA attention (checked against autograd), "
        "adapted from Korthikanti et al. 2022, Sec. 4.1: " + ("math kernel on GPU in fp32, s^2 probabilities kept"
                                                               if math_attention else "flash-style kernel, no s^2 term")
        + "; PEFT adapters in fp32; loss in fp32 over loss positions x vocabulary")
    assumptions = [
        f"FLOP convention {convention}: {CONVENTIONS[convention]}",
        f"throughput from {THROUGHPUT_FLAGS[rate['given']]} {rate['value']:.4g}: MFU {rate['mfu']:.1%} (model "
        f"FLOPs), HFU {rate['hfu']:.1%} (with recompute) of the {p.peak} peak {peak / 1e12:.4g} TFLOP/s "
        f"({hardware.name}); communication and input pipeline are inside that figure",
        f"goodput {goodput:.0%}: wall-clock = compute time / goodput (restarts, failures, evaluation)",
        f"bytes/param layout {per_param['name']}: weights {per_param['weights']:g} + gradients "
        f"{per_param['gradients']:g} + optimizer state {per_param['optimizer_state'] or 0:g} = "
        f"{per_param['total'] or 0:g} B per trained parameter ({per_param['source']})",
        f"precision {setup.precision}: {p.source}",
        f"optimizer {setup.optimizer}: {opt.source}",
        "activations: " + activation_model,
        f"memory per device at the busiest moment ({mem.phase if stage is None else 'first pipeline stage'}); runtime "
        "overhead " + ("= the measured process baseline" if hardware.kind == "cpu" else
                       "= CUDA context and allocator reserve (measured on an H200, plus a margin)"),
        *hardware.notes,
        f"layout {layout.describe()}, ZeRO-{setup.zero}",
    ]
    if hardware.price_per_hour is None:
        assumptions.append(f"{hardware.name}: no price given (pass --price), dollars left out")
    else:
        assumptions.append(f"price ${hardware.price_per_hour:.2f} per device-hour")
    memory = {**mem.to_dict(), "capacity_bytes": hardware.memory_bytes, "fits": fits, "devices_needed": needed,
              "fit_message": why, "activation_model": "korthikanti" if stage is not None else "hf"}
    if stage is not None:
        memory.update(weights=stage.weights, gradients=stage.gradients, optimizer_state=stage.optimizer_state,
                      activations=stage.activations, peak=stage.peak, stage=stage.to_dict())
    memory["zero3_sharded_bytes"] = (stage.model_states if stage is not None else
                                     mem.weights - mem.detail["zero3_gathered_bytes"] + mem.gradients
                                     + mem.optimizer_state) if setup.zero == 3 else None
    memory["zero3_gathered_bytes"] = (stage.gathered_layers if stage is not None else
                                      mem.detail["zero3_gathered_bytes"]) if setup.zero == 3 else None
    return {
        "schema": 1,
        "kind": "estimate",
        "model": {"name": shape.name, "shape": shape.to_dict(), "params_active": shape.active_params()},
        "method": {**method.to_dict(), "label": label},
        "setup": {**setup.to_dict(), "seq_len": seq_len, "recompute": recompute},
        "layout": layout.to_dict(),
        "hardware": hardware.to_dict(),
        "work": {"sequences": sequences, "seq_len": seq_len, "tokens": tokens, "loss_tokens": loss_tokens,
                 "steps": steps, "examples": examples},
        "convention": {"name": convention, "description": CONVENTIONS[convention]},
        "bytes_per_param": per_param,
        "costs": costs,
        "flops": {**flops.to_dict(), "checkpoint_recompute": checkpoint_recompute, "model_total": model.total,
                  "convention": convention},
        "memory": memory,
        "time": {"compute_s": compute_s, "dequantisation_s": dequant_s, "peak_flops_per_s": peak, "mfu": rate["mfu"],
                 "hfu": rate["hfu"], "goodput": goodput, "given": rate["given"],
                 "tokens_per_s_per_gpu": rate["tokens_per_s_per_gpu"],
                 "model_tflops_per_gpu": rate["model_tflops_per_gpu"],
                 "hardware_tflops_per_gpu": rate["hardware_tflops_per_gpu"],
                 "pipeline_bubble": (layout.pp - 1) / setup.grad_accum},
        "assumptions": assumptions,
        "notes": notes,
    }


def _bytes_layout(setup: TrainSetup) -> dict:
    """The bytes/param layout of the setup, named by the preset that matches it (if any)."""
    name, source = f"{setup.precision} + {setup.optimizer}", "see precision and optimizer below"
    for preset, (prec, opt, _total, cite) in NAMED_PRESETS.items():
        if (prec, opt) == (setup.precision, setup.optimizer):
            name, source = preset, cite
            break
    if OPTIMIZERS[setup.optimizer].factored:
        p = precision(setup.precision)
        return {"name": name, "weights": p.weight, "gradients": p.grad, "optimizer_state": None, "total": None,
                "source": "Adafactor's state is per matrix (rows + columns), not per parameter"}
    return {"name": name, **bytes_per_param(setup.precision, setup.optimizer), "source": source}


# --- work: how many tokens ---------------------------------------------------------------------------------

def parse_count(text: str) -> float:
    """'2e12', '15T', '500M', '10k' -> a number (its range is checked where it is used, in one line)."""
    scale = {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}
    t = str(text).strip().lower().replace(",", "").replace("_", "")
    try:
        return float(t[:-1]) * scale[t[-1]] if t and t[-1] in scale else float(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a count: {text!r} (e.g. 2e12, 15T, 500M, 10k)") from None


def _strings(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


def count_data_tokens(path: str | Path, *, seq_len: int, tokenizer=None) -> dict:
    """Examples and tokens of a JSONL file: each example's text (every string in the record), truncated to
    `seq_len`. With a tokenizer the count is exact for the text (chat-template tokens aside); without one
    it is characters / 4, the usual English BPE rate, and says so."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise EstimateError(f"{path}: cannot read: {err}") from None
    lengths = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as err:
            raise EstimateError(f"{path}:{number}: not a JSON object: {err}") from None
        text = "\n".join(_strings(record))
        n = len(tokenizer(text)["input_ids"]) if tokenizer is not None else math.ceil(len(text) / 4)
        lengths.append(min(max(n, 1), seq_len))
    if not lengths:
        raise EstimateError(f"{path}: no examples (zero tokens)")
    return {"examples": len(lengths), "tokens": float(sum(lengths)),
            "how": "tokenizer" if tokenizer is not None else "approximate: characters / 4"}


def resolve_work(*, seq_len: int, rows_per_step: int, tokens: float | None = None, examples: float | None = None,
                 epochs: float = 1.0, example_tokens: int | None = None, data: dict | None = None) -> dict:
    """Turn --tokens, --examples or --data into rows of `seq_len` (packed, as tunegap trains) and steps."""
    if epochs <= 0:
        raise EstimateError(f"--epochs: must be positive, got {epochs}")
    if seq_len < 1:
        raise EstimateError(f"--seq-len: must be positive, got {seq_len}")
    given = [x is not None for x in (tokens, examples, data)]
    if sum(given) != 1:
        raise EstimateError("give exactly one of --tokens, --examples or --data")
    if tokens is not None:
        total, n_examples, how = float(tokens), None, "--tokens"
    elif examples is not None:
        per = example_tokens or seq_len
        if not 0 < per <= seq_len:
            raise EstimateError(f"--example-tokens: must be in 1..--seq-len ({seq_len}), got {per}")
        total, n_examples, how = float(examples) * per * epochs, float(examples) * epochs, \
            f"--examples x {per} tokens each"
    else:
        total, n_examples, how = data["tokens"] * epochs, data["examples"] * epochs, f"--data ({data['how']})"
    if not total > 0:
        raise EstimateError("no work: zero tokens")
    rows = max(1, math.ceil(total / seq_len))
    return {"tokens": total, "sequences": rows, "examples": n_examples, "seq_len": seq_len,
            "steps": max(1, math.ceil(rows / rows_per_step)), "how": how}


# --- from parsed arguments -----------------------------------------------------------------------------------

def method_choices() -> tuple[str, ...]:
    """Every registered method (read when the parser is built, so methods registered later are included)."""
    return (*PSEUDO_METHODS, *METHODS)


def _method_from_args(args) -> tuple[Method, str]:
    name = args.method
    base = PSEUDO_METHODS.get(name, name)
    targets = tuple(t.strip() for t in args.targets.split(",") if t.strip())
    return make_method(base, rank=args.rank, alpha=args.alpha, targets=targets, layers=args.freeze_layers,
                       virtual_tokens=args.virtual_tokens, dim=args.adapter_dim), name


def _default_precision(device: Device) -> str:
    if device.kind == "cpu":
        bf16, fp32 = device.peak_flops_per_s.get("bf16") or 0, device.peak_flops_per_s.get("fp32") or 0
        return "bf16-autocast" if bf16 > 1.2 * fp32 else "fp32"  # as tunegap.train's "auto"
    return "bf16-mixed" if device.peak_flops_per_s.get("bf16") else "fp16-mixed"


def finite(name: str, value, *, low: float = 0.0, high: float = math.inf, zero_ok: bool = False):
    """A number given on the command line, finite and in (low, high] ([low, high] with `zero_ok`): else
    EstimateError naming the flag and what was expected."""
    if value is None:
        return None
    ok = isinstance(value, (int, float)) and math.isfinite(value) and (value >= low if zero_ok else value > low) \
        and value <= high
    if not ok:
        bound = "" if high == math.inf else f" and at most {high:g}"
        floor = f"at least {low:g}" if zero_ok else f"above {low:g}"
        raise EstimateError(f"{name}: expected a finite number {floor}{bound}, got {value}")
    return value


def setup_from_args(args, device: Device, method_name: str) -> TrainSetup:
    preset = getattr(args, "bytes_preset", None)
    if preset:  # a named bytes/param layout sets precision and optimizer together
        prec, opt = NAMED_PRESETS[preset][:2]
    else:
        prec = args.precision if args.precision != "auto" else _default_precision(device)
        if method_name == "qlora" and prec in ("fp32", "bf16-autocast") and args.precision == "auto":
            prec = "bf16-mixed"
        opt = args.optimizer
    mfu = DEFAULT_MFU if args.mfu is None else finite("--mfu", args.mfu, high=1.0)
    return TrainSetup(optimizer=opt, precision=prec, micro_batch=args.micro_batch,
                      grad_accum=args.grad_accum, gpus=args.gpus, zero=args.zero, checkpointing=args.checkpointing,
                      base_format="nf4" if method_name == "qlora" else "same", mfu=mfu,
                      double_quant=getattr(args, "double_quant", True))


def _throughput_from_args(args) -> dict | None:
    given = {key: getattr(args, key, None) for key in THROUGHPUT_KEYS}
    given = {k: v for k, v in given.items() if v is not None}
    if len(given) > 1:
        raise EstimateError("give at most one of --mfu, --hfu, --tokens-per-second-per-gpu, --tflops-per-gpu")
    return given or None


def _layout_from_args(args) -> Layout | None:
    degrees = {k: getattr(args, k, None) for k in ("tp", "pp", "cp", "ep")}
    if all(v in (None, 1) for v in degrees.values()) and not getattr(args, "sp", False):
        return None
    return Layout(gpus=args.gpus, sp=bool(getattr(args, "sp", False)),
                  **{k: (1 if v is None else v) for k, v in degrees.items()})


def data_counts(args) -> dict | None:
    if not args.data:
        return None
    tokenizer = None
    folder = args.tokenizer or (args.model if Path(args.model).is_dir() else None)
    if folder:
        try:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(folder)
        except (OSError, ValueError) as err:
            raise EstimateError(f"--tokenizer {folder}: cannot load a tokenizer: {err}") from None
    return count_data_tokens(args.data, seq_len=args.seq_len, tokenizer=tokenizer)


def estimate(args) -> dict:
    """The estimate for parsed `tunegap estimate` arguments."""
    for flag in ("tokens", "examples"):
        finite(f"--{flag}", getattr(args, flag))
    finite("--price", args.price, zero_ok=True)
    finite("--epochs", args.epochs)
    finite("--loss-fraction", args.loss_fraction, high=1.0)
    finite("--goodput", args.goodput, high=1.0)
    shape, preset = resolve_model(args.model)
    device = resolve_device(args.gpu, catalog=args.catalog, price=args.price)
    method, name = _method_from_args(args)
    setup = setup_from_args(args, device, name)
    layout = _layout_from_args(args)
    dp = layout.dp if layout else setup.gpus
    work = resolve_work(seq_len=args.seq_len, rows_per_step=setup.micro_batch * setup.grad_accum * dp,
                        tokens=args.tokens, examples=args.examples, epochs=args.epochs,
                        example_tokens=args.example_tokens, data=data_counts(args))
    result = estimate_run(shape, method, tokens=work["tokens"], sequences=work["sequences"], seq_len=work["seq_len"],
                          steps=work["steps"], setup=setup, hardware=device, examples=work["examples"],
                          loss_tokens=work["tokens"] * args.loss_fraction, label=name,
                          convention=args.flop_convention, throughput=_throughput_from_args(args),
                          goodput=args.goodput, layout=layout, auto_layout=layout is None,
                          recompute=args.recompute, activations=args.activations, flash=args.flash)
    result["work"]["how"] = work["how"]
    result["units"] = args.units
    if not result["memory"]["fits"]:  # it would not run: no wall-clock or dollars as if it did
        for key in ("wall_time_s", "tokens_per_s", "gpu_hours", "dollars"):
            result["costs"][key]["value"] = None
        result["notes"].append("does not fit: wall-clock, throughput, GPU-hours and dollars left out")
    if preset is not None:
        result["model"].update(preset.to_dict())
    if args.method == "pretrain" and preset is not None and preset.pretrain_tokens:
        result["notes"].append(f"{preset.display} was pretrained on {preset.pretrain_tokens:.3g} tokens "
                               f"({preset.source})")
    return result


# --- a table for people -------------------------------------------------------------------------------------

def _fmt(entry: dict) -> str:
    return format_quantity(entry)


def format_estimate(result: dict) -> str:
    """A table for people: one memory unit throughout (GiB = 2^30 B or GB = 10^9 B, stated in the header)."""
    c, mem, m = result["costs"], result["memory"], result["method"]
    hw, setup, t = result["hardware"], result["setup"], result["time"]
    unit = result.get("units", "GiB")
    scale = 2**30 if unit == "GiB" else 1e9
    per = result["bytes_per_param"]
    lines = [f"tunegap estimate: {result['model'].get('display') or result['model']['name']}, "
             f"method {m['label']}, {setup['precision']}, {setup['optimizer']}, micro-batch {setup['micro_batch']} x "
             f"{setup['seq_len']} tokens, {setup['gpus']} x {hw['name']}, ZeRO-{setup['zero']}, recompute "
             f"{setup['recompute']}",
             f"(every number below is an estimate; FLOP convention: {result['convention']['name']}; bytes/param "
             f"layout: {per['name']}; memory in {unit} = {'2^30' if unit == 'GiB' else '10^9'} bytes)"]

    def row(label, key):
        lines.append(f"  {label:<28}{_fmt(c[key])}")

    def size(label, value):
        lines.append(f"  {label:<28}" + ("n/a" if value is None else f"{value / scale:,.2f} {unit}") + " (estimate)")

    lines.append("work")
    for label, key in (("tokens", "tokens"), ("loss tokens", "loss_tokens"), ("examples", "examples"),
                       ("optimizer steps", "optimizer_steps")):
        row(label, key)
    lines.append("parameters")
    row("total", "params_total")
    if result["model"].get("params_active") and result["model"]["params_active"] < c["params_total"]["value"]:
        lines.append(f"  {'active per token (MoE)':<28}{result['model']['params_active']:,.0f} parameter (estimate)")
    row("trainable", "params_trainable")
    lines.append(f"  {'trainable share':<28}{100 * c['trainable_share']['value']:.4g}% "
                 f"({c['params_total']['value'] / max(c['params_trainable']['value'], 1):,.0f}x fewer) (estimate)")
    lines.append(f"FLOPs (model FLOPs in the {result['convention']['name']} convention; hardware = what the "
                 "kernels run, recompute included)")
    for label, key in (("forward", "flops_forward"), ("backward", "flops_backward"), ("total", "flops_total"),
                       ("hardware (HFU)", "flops_hardware")):
        row(label, key)
    lines.append(f"memory per device ({result['layout']['tp']}-way TP x {result['layout']['pp']}-way PP x "
                 f"{result['layout']['cp']}-way CP x {result['layout']['dp']}-way DP; activations: "
                 f"{mem['activation_model']})")
    size("weights", mem["weights"])
    size("gradients", mem["gradients"])
    size("optimizer state", mem["optimizer_state"])
    if mem.get("zero3_sharded_bytes") is not None:
        size("ZeRO-3 sharded states", mem["zero3_sharded_bytes"])
        size("ZeRO-3 gathered layers", mem["zero3_gathered_bytes"])
    size("activations", mem["activations"])
    if mem["activation_model"] == "hf":
        size("  without checkpointing", mem["activations_no_checkpointing"])
        size("  with checkpointing", mem["activations_checkpointing"])
    size("runtime overhead", mem["runtime"])
    if mem["allocator"]:
        size("allocator retention", mem["allocator"])
    size("peak", mem["peak"])
    lines.append(f"  {'capacity':<28}{mem['capacity_bytes'] / scale:,.2f} {unit} -> "
                 + ("fits" if mem["fits"] else "DOES NOT FIT") + f"; {mem['fit_message']}")
    lines.append("time and money")
    if not mem["fits"]:
        lines.append("  not estimated: the run does not fit (see capacity above)")
    else:
        lines.append(f"  {'utilisation':<28}MFU {t['mfu']:.1%}, HFU {t['hfu']:.1%} (from "
                     f"{THROUGHPUT_FLAGS[t['given']]}; estimate)")
        lines.append(f"  {'per device':<28}{t['tokens_per_s_per_gpu']:,.4g} token/s, {t['model_tflops_per_gpu']:,.4g} "
                     f"model TFLOP/s, {t['hardware_tflops_per_gpu']:,.4g} hardware TFLOP/s (estimate)")
        for label, key in (("wall-clock", "wall_time_s"), ("throughput", "tokens_per_s"), ("GPU-hours", "gpu_hours"),
                           ("dollars", "dollars")):
            row(label, key)
    lines.append("assumptions")
    lines += [f"  - {a}" for a in result["assumptions"]]
    if result["notes"]:
        lines.append("notes")
        lines += [f"  - {n}" for n in result["notes"]]
    return "\n".join(lines)


# --- --against: predicted vs measured -------------------------------------------------------------------------

LEDGER_PRECISION = {"fp32": "fp32", "bf16": "bf16-autocast"}  # tunegap.train's names -> the estimator's


def against_run(run: str, runs_dir: str = "runs", *, mfu: float | None = None) -> dict:
    """Predict a finished run from its own ledger.json settings and put the measurements beside it."""
    path = Path(run)
    if path.is_dir():
        path = path / "ledger.json"
    elif not path.is_file():
        path = Path(runs_dir) / run / "ledger.json"
    if not path.is_file():
        raise EstimateError(f"--against: no ledger.json at {run!r} (nor in {runs_dir}/{run})")
    try:
        ledger = json.loads(path.read_text(encoding="utf-8"))
        config, measured = ledger["config"], ledger["costs"]
        shape = ModelShape(**ledger["shape"])
        options = {k: v for k, v in ledger["method"].items() if k != "name"}
        if "targets" in options:
            options["targets"] = tuple(options["targets"])
        method = make_method(ledger["method"]["name"], **options)
        value = {k: v["value"] for k, v in measured.items()}
        peaks = ledger["peaks"]
        prec = LEDGER_PRECISION.get(ledger.get("precision", "fp32"), "fp32")
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise EstimateError(f"{path}: not a tunegap ledger the estimator can read ({err})") from None

    device = cpu_device(peaks)  # the peaks the run measured, not this moment's
    seq_len = int(config["seq_len"])
    positions = float(value["tokens"]) + float(value.get("padding_tokens") or 0)
    steps = int(value["optimizer_steps"])
    micro_batches = max(1, steps * int(config.get("grad_accum", 1)))
    rows = max(1, math.ceil(positions / micro_batches / seq_len))
    peak_key = precision(prec).peak
    achieved = value["flops_total"] / max(value.get("train_time_s") or value["wall_time_s"], 1e-9)
    run_mfu = mfu or min(1.0, achieved / device.peak(peak_key)[0])
    setup = TrainSetup(precision=prec, micro_batch=rows, grad_accum=int(config.get("grad_accum", 1)),
                       checkpointing=bool(config.get("activation_checkpointing", False)), mfu=run_mfu)
    result = estimate_run(shape, method, tokens=value["tokens"], sequences=max(1, math.ceil(positions / seq_len)),
                          seq_len=seq_len, steps=steps, setup=setup, hardware=device,
                          examples=value.get("examples"), loss_tokens=value.get("loss_tokens") or None)
    keys = ["tokens", "loss_tokens", "optimizer_steps", "params_total", "params_trainable", "weights_bytes",
            "gradient_bytes", "optimizer_state_bytes", "peak_memory_bytes", "flops_total", "flops_hardware",
            "wall_time_s", "tokens_per_s"]
    rows_out = []
    for key in keys:
        m_entry = measured.get("train_time_s" if key == "wall_time_s" else key)
        if not m_entry or m_entry.get("value") is None:
            continue
        p_val, m_val = result["costs"][key]["value"], float(m_entry["value"])
        rows_out.append({"key": key, "unit": COST_UNITS[key], "predicted": p_val, "measured": m_val,
                         "measured_how": m_entry.get("how"), "ratio": p_val / m_val if m_val else None})
    return {"run": ledger.get("run", str(path)), "ledger": str(path), "estimate": result, "comparison": rows_out,
            "note": f"time predicted at the run's own MFU ({run_mfu:.1%} of the {peak_key} peak), so it checks the "
                    "FLOP count, not the MFU assumption; micro-batch taken as "
                    f"{rows} rows of {seq_len} (the run's positions per micro-batch, packed); FLOP convention "
                    f"{result['convention']['name']} (the ledger's); bytes/param layout "
                    f"{result['bytes_per_param']['name']}"}


def format_against(report: dict) -> str:
    lines = [f"tunegap estimate --against {report['run']}: predicted (estimate) vs measured",
             f"  {'':<24}{'predicted':>34}{'measured':>34}{'pred/meas':>11}"]
    for r in report["comparison"]:
        pred = format_quantity({"value": r["predicted"], "unit": r["unit"], "how": "estimate"})
        meas = format_quantity({"value": r["measured"], "unit": r["unit"], "how": r["measured_how"]})
        ratio = f"{r['ratio']:.3f}" if r["ratio"] is not None else "n/a"
        lines.append(f"  {r['key']:<24}{pred:>34}{meas:>34}{ratio:>11}")
    lines.append(f"  note: {report['note']}")
    return "\n".join(lines)


# --- the command line ----------------------------------------------------------------------------------------

def add_common_arguments(p: argparse.ArgumentParser, *, seq_len: int) -> None:
    p.add_argument("--model", default="smollm2-135m",
                   help=f"a preset ({', '.join(model_presets())}), a config.json, or a model folder")
    p.add_argument("--seq-len", type=int, default=seq_len, help="tokens per sequence (row)")
    p.add_argument("--tokens", type=parse_count, help="training tokens, e.g. 10M")
    p.add_argument("--examples", type=parse_count, help="training examples (see --example-tokens)")
    p.add_argument("--example-tokens", type=int, help="mean tokens per example (default --seq-len)")
    p.add_argument("--epochs", type=float, default=1.0, help="passes over --examples or --data")
    p.add_argument("--data", help="a JSONL file to count tokens in")
    p.add_argument("--tokenizer", help="a local model folder whose tokenizer counts --data (default: chars/4)")
    p.add_argument("--optimizer", default="adamw", choices=tuple(OPTIMIZERS))
    p.add_argument("--precision", default="auto", choices=("auto", *PRECISIONS),
                   help="auto: bf16-mixed on GPUs, tunegap's own choice on the cpu")
    # each knob also under the name `tunegap finetune` gives it
    p.add_argument("--micro-batch", "--batch-size", type=int, default=8, help="sequences per forward pass per device")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--checkpointing", "--activation-checkpointing", action=argparse.BooleanOptionalAction, default=False,
                   help="full activation checkpointing (one checkpoint per block)")
    p.add_argument("--gpus", type=int, default=1, help="data-parallel devices")
    p.add_argument("--zero", type=int, default=0, choices=(0, 1, 2, 3), help="ZeRO stage (3 = FSDP)")
    p.add_argument("--gpu", default="H100-SXM", help="a catalogue GPU, or 'cpu' for this machine (measured)")
    p.add_argument("--price", "--gpu-price", type=float, help="$ per device-hour (default: the catalogue's)")
    p.add_argument("--catalog", help="a JSON file of extra GPUs in gpus.json's format")
    p.add_argument("--mfu", type=float, help=f"assumed model-FLOPs utilisation (default {DEFAULT_MFU})")
    p.add_argument("--rank", type=int, default=8, help="LoRA/QLoRA rank")
    p.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha (no cost effect)")
    p.add_argument("--targets", default=",".join(ALL_LINEAR), help="LoRA target matrices, comma-separated")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def cmd_estimate(args) -> int:
    if args.against:
        report = against_run(args.against, args.runs_dir)
        print(json.dumps(report, indent=2, default=str) if args.json else format_against(report))
        return 0
    result = estimate(args)
    print(json.dumps(_json_safe(result), indent=2, default=str, allow_nan=False) if args.json
          else format_estimate(result))
    return 0


def _json_safe(value):
    """JSON has no NaN or Infinity: a non-finite number becomes null (none should reach here)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def add_parser(subparsers) -> None:
    """Register `estimate` on an argparse subparsers object (tunegap.cli calls this; `gap` is multipliers.py's)."""
    est = subparsers.add_parser("estimate", help="predict a run's FLOPs, memory, time and dollars (no weights)",
                                description=__doc__.split("\n\n")[0])
    add_common_arguments(est, seq_len=128)
    est.add_argument("--method", default="lora", choices=method_choices())
    est.add_argument("--freeze-layers", type=int, default=2, help="freeze: top blocks that train")
    est.add_argument("--virtual-tokens", type=int, default=16, help="prompt/prefix tuning tokens")
    est.add_argument("--adapter-dim", type=int, default=16, help="bottleneck adapter width")
    est.add_argument("--loss-fraction", type=float, default=1.0,
                     help="share of tokens that carry loss (SFT replies only: below 1)")
    est.add_argument("--flop-convention", default="hardware", choices=tuple(CONVENTIONS),
                     help="how FLOPs are counted (totals and MFU): " + "; ".join(
                         f"{k}: {v.split(' (')[0]}" for k, v in CONVENTIONS.items()))
    est.add_argument("--hfu", type=float, help="assumed hardware-FLOPs utilisation (recompute included)")
    est.add_argument("--tokens-per-second-per-gpu", dest="tokens_per_s_per_gpu", type=float,
                     help="a measured training rate per device")
    est.add_argument("--tflops-per-gpu", type=float,
                     help="achieved hardware TFLOP/s per device (as Megatron-LM logs it, recompute included)")
    est.add_argument("--goodput", type=float, default=1.0,
                     help="share of wall-clock spent training (restarts, failures, evaluation aside)")
    est.add_argument("--bytes-preset", choices=tuple(NAMED_PRESETS),
                     help="a named bytes/param layout (sets --precision and --optimizer): " + "; ".join(
                         f"{k} = {v[2]:g} B" for k, v in NAMED_PRESETS.items()))
    est.add_argument("--double-quant", action=argparse.BooleanOptionalAction, default=True,
                     help="QLoRA double quantization of the NF4 constants (Dettmers et al. 2023)")
    for flag, what in (("tp", "tensor"), ("pp", "pipeline"), ("cp", "context"), ("ep", "expert")):
        est.add_argument(f"--{flag}", type=int, help=f"{what}-parallel degree (full training; default: pure data "
                                                    "parallelism, or the smallest layout that fits --gpus)")
    est.add_argument("--sp", action="store_true", help="Megatron sequence parallelism in the TP region")
    est.add_argument("--recompute", choices=RECOMPUTE,
                     help="activation recomputation (default: full with --checkpointing, else none)")
    est.add_argument("--activations", default="auto", choices=("auto", "hf", "korthikanti"),
                     help="activation model: hf (the tensors a Hugging Face block saves, as tunegap trains) or "
                          "korthikanti (Megatron, Korthikanti et al. 2022); auto: hf unless model-parallel")
    est.add_argument("--flash", action=argparse.BooleanOptionalAction, default=True,
                     help="fused/flash attention (no s x s activations)")
    est.add_argument("--units", default="GiB", choices=("GiB", "GB"), help="memory units of the table")
    est.add_argument("--against", help="a run name or folder: compare its measured ledger with the estimate")
    est.add_argument("--runs-dir", default="runs")
    est.set_defaults(func=cmd_estimate)


def main(argv: list[str] | None = None) -> int:
    """`python -m tunegap.estimate estimate ...` without the rest of the CLI."""
    parser = argparse.ArgumentParser(prog="tunegap")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ValueError as err:  # EstimateError, MethodError, ...: one line, exit 2
        print(f"tunegap: error: {str(err).splitlines()[0] if str(err) else type(err).__name__}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
