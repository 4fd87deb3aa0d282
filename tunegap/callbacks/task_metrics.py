"""Task metrics of the shipped support task on generated replies (style, product names, refusals)."""

from __future__ import annotations

from ..data.render import tokenize_prompt
from ..evaluate import support_metrics
from ..predict import generation_seconds
from .base import Callback, decide

MAX_NEW_TOKENS = 96  # support_metrics' default reply length


class SupportTaskMetrics(Callback):
    """Generates replies to the first `examples` held-out tickets and scores them with the task's checkers."""

    def __init__(self, examples: int, setting: str = "on"):
        self.examples, self.setting, self.runs = examples, setting, setting != "off"

    def plan(self, trainer, forecast):
        records = trainer.data.eval_records[:self.examples]
        if not records or self.setting == "off":
            self.runs = False
            return {}
        prompt_tokens = sum(len(tokenize_prompt(trainer.tokenizer, r["messages"])) for r in records) / len(records)
        seconds = generation_seconds(forecast.probe, forecast.decoding(len(records)), trainer.shape,
                                     prompts=len(records), prompt_tokens=prompt_tokens, max_new_tokens=MAX_NEW_TOKENS)
        self.runs, why = decide(self.setting, "--task-metrics", training_s=forecast.training_s, evaluation_s=seconds)
        return {"what": f"task metrics ({len(records)} replies)", "seconds": seconds, "runs": self.runs, "why": why}

    def on_outputs(self, trainer, model, tokenizer):
        records = trainer.data.eval_records[:self.examples]
        if not records or not self.runs:
            return {}
        # generated without autocast: decoding one token at a time, casting every weight to bf16 on each
        # step costs more than the bf16 matmul saves
        return support_metrics(model, tokenizer, records, max_new_tokens=MAX_NEW_TOKENS)
