"""Predicted durations, printed before long work starts: training, held-out loss and each evaluation.

A FLOP count over a guessed utilisation misses by 2-4x between machines (a busy 2-core host reaches a fraction
of a quiet one's peak, and decoding is bound by memory, not arithmetic). So each prediction is scaled from a
probe of the real work on this machine, a second or two in all:

  * one timed forward pass of the real model on one real micro-batch gives this model's achieved FLOP/s here;
    a training step and the held-out loss are their formula FLOPs (`costs.flops`) divided by it, the step
    times `BACKWARD_SLOWDOWN` for the backward pass's lower efficiency;
  * one timed decode of a batch gives the time of a decoding step, which reads every weight once whatever
    the batch holds; generation is its prompts' prefill at the forward pass's FLOP/s plus `max_new_tokens`
    steps per batch (rows that stop early make it shorter, so the prediction is an upper bound).

Predictions are estimates and say so; the ledger keeps them beside what was then measured.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from .costs.flops import forward_flops
from .generation import DEFAULT_BATCH, decode

# measured step time / (formula step FLOPs / forward-probe FLOP/s), default model, LoRA and full, CPU:
# the backward pass and optimizer run below the forward pass's matmul efficiency
BACKWARD_SLOWDOWN = 1.25
PROBE_TOKENS = 4
# a run's checkpoint and outputs are written at this rate (measured here: a full fine-tune's 1.6 GB final
# checkpoint in 5.4 s on the project's VM disk); an assumption elsewhere, printed as part of an estimate
WRITE_BYTES_PER_S = 300e6
# the decode probe's rows: one probe serves every evaluation of a run (a step of 32 rows and one of 64 differ by
# less than the prediction's other errors on a CPU), and it stays under a second on the default model
PROBE_ROWS = 32
# the forward probe's rows: matmuls of 2 x 128 tokens already run near a CPU's large-matrix rate
PROBE_FORWARD_ROWS = 2


@dataclass
class Probe:
    """What the probes measured: the model's achieved forward FLOP/s on this machine."""
    forward_flops_per_s: float

    def seconds(self, flops: float) -> float:
        return flops / self.forward_flops_per_s


def probe_forward(ctx, rows: int, width: int, shape) -> Probe:
    """Time the model's forward pass on a micro-batch of `rows` x `width` tokens (after a one-row warm-up), no
    gradients (measured). Stand-in tokens, not a real batch: an objective's batches can have side effects (RL
    samples its replies while building one), and the time depends on the shape alone."""
    import torch

    ids = torch.full((max(1, min(rows, PROBE_FORWARD_ROWS)), max(1, width)), 10, dtype=torch.long)
    model = ctx.model
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), ctx.autocast():
            model(input_ids=ids[:1, :8], use_cache=False)  # first-call allocations and kernel choice
            times = []
            for _ in range(3):  # the median of three: one pass on a shared host can be twice as slow
                started = time.perf_counter()
                model(input_ids=ids, use_cache=False)
                times.append(time.perf_counter() - started)
            seconds = sorted(times)[1]
    finally:
        model.train(was_training)
    flops = forward_flops(shape, sequences=ids.shape[0], seq_len=ids.shape[1])
    return Probe(flops / max(seconds, 1e-9))


def training_seconds(probe: Probe, step_flops: float, steps: int) -> float:
    return steps * BACKWARD_SLOWDOWN * probe.seconds(step_flops)


def heldout_seconds(probe: Probe, shape, *, examples: int, tokens_per_example: float) -> float:
    return probe.seconds(forward_flops(shape, sequences=examples, seq_len=max(1, round(tokens_per_example))))


def probe_decode(model, prompts: list[list[int]], *, pad_id: int, batch_size: int = DEFAULT_BATCH) -> float:
    """Seconds of one fp32 decoding step of the first batch of `prompts` (the median of the steps after the
    prefill of a `PROBE_TOKENS`-token decode; measured).

    `prompts` may be stand-ins of the right count and a short length: a decoding step of a small model reads
    every weight once per step, which costs the same for a short prompt as for a long one."""
    first = sorted(prompts, key=len, reverse=True)[:batch_size]
    marks: list[float] = []
    decode(model, first, max_new_tokens=PROBE_TOKENS, eos_id=None, pad_id=pad_id, batch_size=batch_size,
           on_token=lambda: marks.append(time.perf_counter()))
    steps = sorted(b - a for a, b in zip(marks, marks[1:]))
    return steps[len(steps) // 2] if steps else 0.0


def generation_seconds(probe: Probe, step_s: float, shape, *, prompts: int, prompt_tokens: float,
                       max_new_tokens: int, shared_prefix_tokens: int = 0, batch_size: int = DEFAULT_BATCH) -> float:
    """Upper bound on decoding `prompts` prompts of `prompt_tokens` mean length, the first `shared_prefix_tokens`
    of which every prompt shares (encoded once, `generation.decode`): the prefill at the forward probe's FLOP/s,
    then `max_new_tokens - 1` steps per batch of `step_s` (the decode probe's), plus each step's attention to
    the context beyond the probe's (rows that stop early make it shorter)."""
    if prompts <= 0 or max_new_tokens <= 0:
        return 0.0
    prefix = shared_prefix_tokens
    own = max(1, round(prompt_tokens) - prefix)
    prefill = forward_flops(shape, sequences=prompts, seq_len=own, past_len=prefix, logit_tokens=prompts)
    if prefix:
        prefill += forward_flops(shape, sequences=1, seq_len=prefix, logit_tokens=1)
    context = prefix + own + max_new_tokens // 2  # the mean context a decoding step attends to
    attention = (forward_flops(shape, sequences=prompts, seq_len=1, past_len=context)
                 - forward_flops(shape, sequences=prompts, seq_len=1, past_len=8)) * (max_new_tokens - 1)
    steps = math.ceil(prompts / batch_size) * (max_new_tokens - 1) * step_s
    return probe.seconds(prefill + attention) + steps


def minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 90 else f"{seconds:.0f} s"


class Forecast:
    """A run's duration probes and predicted training time, handed to each callback's `plan`."""

    def __init__(self, probe: Probe, training_s: float, model, pad_id: int):
        self.probe, self.training_s = probe, training_s
        self._model, self._pad_id, self._decode_probes = model, pad_id, {}

    def decoding(self, prompts: int, batch_size: int = DEFAULT_BATCH) -> float:
        """Seconds of a decoding step at the batch `prompts` prompts would be decoded in, up to PROBE_ROWS rows
        (stand-in 8-token prompts; measured once for all the evaluations that need as many rows or more)."""
        rows = max(1, min(prompts, batch_size, PROBE_ROWS))
        if rows not in self._decode_probes:
            self._decode_probes[rows] = probe_decode(self._model, [list(range(10, 18))] * rows, pad_id=self._pad_id,
                                                     batch_size=batch_size)
        return self._decode_probes[rows]
