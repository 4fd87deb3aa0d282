"""Callbacks: held-out loss, task metrics, forgetting and progress, as small objects the trainer composes.

Each returns metric dicts into the log and the ledger; the trainer knows nothing about the shipped tasks or
forgetting. `default_callbacks(config)` is what `tunegap finetune` runs with.
"""

from __future__ import annotations

from ..data.tasks import shipped
from .base import Callback
from .forgetting import Forgetting
from .forgetting_curve import ForgettingCurve
from .heldout import HeldoutLoss
from .progress import ProgressBar
from .task_metrics import TaskMetrics
from .tracking import MetricsMirror

__all__ = ["Callback", "Forgetting", "ForgettingCurve", "HeldoutLoss", "ProgressBar", "TaskMetrics",
           "MetricsMirror", "default_callbacks"]


def default_callbacks(config) -> list[Callback]:
    callbacks: list[Callback] = [ProgressBar(), HeldoutLoss(config.eval_every)]
    task = shipped(config.data)
    # a user file as --eval-data may hold a shipped task's held-out records (a sweep that trains on a corrupted
    # copy of the task): TaskMetrics then finds their scorer from the records' meta (None here)
    if (task or config.eval_data) and config.generate_examples and config.task_metrics != "off":
        callbacks.append(TaskMetrics(task, config.generate_examples, config.task_metrics))
    if config.forgetting != "off":
        callbacks.append(Forgetting(config.forgetting))
    if config.forgetting_every:  # after the held-out loss: a step it measured is not measured twice
        callbacks.append(ForgettingCurve(config.forgetting_every))
    if config.log != "none":  # last: it mirrors metrics.jsonl, which holds what every other callback added
        callbacks.append(MetricsMirror(config.log))
    return callbacks
