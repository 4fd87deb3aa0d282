"""Forgetting after a fine-tune of real pretrained weights (`tunegap.forgetting`), into the ledger's metrics."""

from __future__ import annotations

from ..forgetting import forgetting_after_training
from .base import Callback


class Forgetting(Callback):
    def on_outputs(self, trainer, model, tokenizer):
        return forgetting_after_training(trainer.config, model, tokenizer, trainer.data.kind)
