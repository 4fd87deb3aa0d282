"""Forgetting after a fine-tune of real pretrained weights (`tunegap.forgetting`), into the ledger's metrics."""

from __future__ import annotations

from ..forgetting import forgetting_after_training, forgetting_applies, forgetting_work
from ..predict import generation_seconds
from .base import Callback, decide


class Forgetting(Callback):
    def __init__(self, setting: str = "on"):
        self.setting, self.runs = setting, setting != "off"

    def plan(self, trainer, forecast):
        if self.setting == "off" or not forgetting_applies(trainer.config, trainer.data.kind):
            self.runs = False
            return {}
        seconds = 0.0
        for job in forgetting_work(trainer.config, trainer.tokenizer):
            seconds += generation_seconds(forecast.probe, forecast.decoding(job["prompts"]), trainer.shape, **job)
        self.runs, why = decide(self.setting, "--forgetting", training_s=forecast.training_s, evaluation_s=seconds)
        return {"what": "forgetting", "seconds": seconds, "runs": self.runs, "why": why}

    def on_outputs(self, trainer, model, tokenizer):
        if not self.runs:
            return {}
        return forgetting_after_training(trainer.config, model, tokenizer, trainer.data.kind)
