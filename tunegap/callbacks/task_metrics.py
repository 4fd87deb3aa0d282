"""Task metrics of the shipped support task on generated replies (style, product names, refusals)."""

from __future__ import annotations

from ..evaluate import support_metrics
from .base import Callback


class SupportTaskMetrics(Callback):
    """Generates replies to the first `examples` held-out tickets and scores them with the task's checkers."""

    def __init__(self, examples: int):
        self.examples = examples

    def on_outputs(self, trainer, model, tokenizer):
        records = trainer.data.eval_records[:self.examples]
        if not records:
            return {}
        # generated without autocast: decoding one token at a time, casting every weight to bf16 on each
        # step costs more than the bf16 matmul saves
        return support_metrics(model, tokenizer, records)
