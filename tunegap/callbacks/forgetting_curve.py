"""A run's learning-forgetting curve: held-out loss and forgetting on the current weights, every N steps.

Biderman et al. (2024) compare LoRA with full fine-tuning on the learning-forgetting plane: how much of the task
a run has learned (held-out loss) against how far it has moved from its base (forgetting), at checkpoints along
each run. This callback measures both points on the weights as they are mid-run, every `every` steps and at the
last step, and adds them to that step's row of metrics.jsonl: `eval_loss` (the test split, unless the held-out
callback already measured it this step) and `tunegap.forgetting.measure_forgetting`'s keys (`forgetting_kl`,
`general_accuracy`, `general_retained`, ...).

The measurement may not change the run it watches: it runs in eval mode under no_grad (measure_forgetting
restores train mode), eagerly (no compiled shapes), and with the random number generators saved and restored,
so a run with the curve takes exactly the steps a run without it takes. A LoRA model is measured as the PEFT
model it is (its forward adds the adapters); the base is a second copy of the starting weights, loaded once.

It applies where forgetting means something (an SFT fine-tune of real pretrained weights, `has_real_weights`)
and where both models can sit side by side on the CPU: one CPU process (not torchrun, not a GPU).
"""

from __future__ import annotations

import contextlib
import random

from ..forgetting import autocast_for, cached_base_reference, forgetting_work, has_real_weights, measure_forgetting
from ..models import load_model
from ..predict import generation_seconds, heldout_seconds
from .base import Callback
from .heldout import heldout_now

WHAT = "forgetting curve"


def curve_steps(every: int, steps: int) -> list[int]:
    """The steps a curve is measured at: every `every`-th, and the last."""
    marks = list(range(every, steps + 1, every)) if every else []
    return marks + ([steps] if steps and (not marks or marks[-1] != steps) else [])


class ForgettingCurve(Callback):
    def __init__(self, every: int):
        self.every = every
        self.runs, self.base, self.reference, self.autocast = False, None, None, contextlib.nullcontext

    @staticmethod
    def why_not(trainer) -> str:
        """Why the curve cannot be measured on this run ('' when it can)."""
        if trainer.data.kind != "sft" or not has_real_weights(trainer.config):
            return "off: needs an SFT fine-tune of real pretrained weights"
        if trainer.strategy.enabled or trainer.strategy.device_type != "cpu":
            return "off: measured in one CPU process only (the base copy sits beside the model on the CPU)"
        return ""

    def plan(self, trainer, forecast):
        why = self.why_not(trainer)
        if why:
            return {"what": WHAT, "seconds": 0.0, "runs": False, "why": why}
        jobs = forgetting_work(trainer.config, trainer.tokenizer)
        job_s = [generation_seconds(forecast.probe, forecast.decoding(j["prompts"]), trainer.shape, **j) for j in jobs]
        held = trainer.data.eval
        times = len([s for s in curve_steps(self.every, trainer.steps) if s > trainer.totals.steps])
        heldout = heldout_seconds(forecast.probe, trainer.shape, examples=len(held),
                                  tokens_per_example=sum(map(len, held)) / max(len(held), 1)) if held else 0.0
        # forgetting_work's first two jobs run at every point (the tuned model's answers, the KL passes); the
        # rest (the base model's replies, when not on disk yet) once
        seconds = times * (sum(job_s[:2]) + heldout) + sum(job_s[2:])
        return {"what": f"{WHAT} ({times} points)", "seconds": seconds, "runs": True, "why": ""}

    def on_train_start(self, trainer):
        self.runs = not self.why_not(trainer)
        if not self.runs:
            return
        config = trainer.config
        with _same_random_numbers():  # loading a model may draw random numbers for weights it then overwrites
            self.base, _ = load_model(config.model, init=config.init, seed=config.seed,
                                      trust_remote_code=config.trust_remote_code, allow_pickle=config.allow_pickle)
            self.base.eval()
            self.reference = cached_base_reference(config.model, self.base, trainer.tokenizer,
                                                   precision=trainer.precision)
        self.autocast = autocast_for(trainer.precision)

    def on_step_end(self, trainer, step, row):
        if not self.runs or (step % self.every and step != trainer.steps):
            return {}
        with _same_random_numbers():
            measured = {} if row.get("eval_loss") is not None else {"eval_loss": heldout_now(trainer)}
            measured.update(measure_forgetting(self.base, trainer.ctx.model, trainer.tokenizer,
                                               reference=self.reference, autocast=self.autocast))
        return measured

    def on_train_end(self, trainer):
        self.base = self.reference = None  # the base copy's memory, back before the outputs are written
        return {}

    def close(self):
        self.base = self.reference = None


@contextlib.contextmanager
def _same_random_numbers():
    """torch's and Python's generators as they were: the run after a measurement draws what it would have."""
    import torch

    state = random.getstate()
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            random.setstate(state)
