"""Task metrics of a shipped task on generated replies (support: style, products, refusals; docstrings: F1)."""

from __future__ import annotations

from ..data.render import tokenize_prompt
from ..data.tasks import ShippedTask, task_of_records
from ..evaluate import task_metrics
from ..predict import generation_seconds
from .base import Callback, decide


class TaskMetrics(Callback):
    """Generates replies to the first `examples` held-out records and scores them with the task's checkers.
    `task` None: the shipped task the held-out records came from (their meta, `task_of_records`); records of no
    shipped task are not scored."""

    def __init__(self, task: ShippedTask | None, examples: int, setting: str = "on"):
        self.task, self.examples, self.setting, self.runs = task, examples, setting, setting != "off"

    def plan(self, trainer, forecast):
        records = trainer.data.eval_records[:self.examples]
        self.task = self.task or task_of_records(records)
        if not records or self.setting == "off" or self.task is None:
            self.runs = False
            return {}
        prompt_tokens = sum(len(tokenize_prompt(trainer.tokenizer, r["messages"])) for r in records) / len(records)
        seconds = generation_seconds(forecast.probe, forecast.decoding(len(records)), trainer.shape,
                                     prompts=len(records), prompt_tokens=prompt_tokens,
                                     max_new_tokens=self.task.max_new_tokens)
        self.runs, why = decide(self.setting, "--task-metrics", training_s=forecast.training_s, evaluation_s=seconds)
        return {"what": f"task metrics ({len(records)} replies)", "seconds": seconds, "runs": self.runs, "why": why}

    def on_outputs(self, trainer, model, tokenizer):
        records = trainer.data.eval_records[:self.examples]
        if not records or not self.runs or self.task is None:
            return {}
        # generated without autocast: decoding one token at a time, casting every weight to bf16 on each
        # step costs more than the bf16 matmul saves
        return task_metrics(model, tokenizer, records, self.task.score, max_new_tokens=self.task.max_new_tokens)
