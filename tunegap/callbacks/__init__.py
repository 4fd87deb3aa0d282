"""Callbacks: held-out loss, task metrics, forgetting and progress, as small objects the trainer composes.

Each returns metric dicts into the log and the ledger; the trainer knows nothing about the support task or
forgetting. `default_callbacks(config)` is what `tunegap finetune` runs with.
"""

from __future__ import annotations

from .base import Callback
from .forgetting import Forgetting
from .heldout import HeldoutLoss
from .progress import ProgressBar
from .task_metrics import SupportTaskMetrics
from .tracking import MetricsMirror

__all__ = ["Callback", "Forgetting", "HeldoutLoss", "ProgressBar", "SupportTaskMetrics", "MetricsMirror",
           "default_callbacks"]


def default_callbacks(config) -> list[Callback]:
    callbacks: list[Callback] = [ProgressBar(), HeldoutLoss(config.eval_every)]
    if config.data == "support" and config.generate_examples and config.task_metrics != "off":
        callbacks.append(SupportTaskMetrics(config.generate_examples, config.task_metrics))
    if config.forgetting != "off":
        callbacks.append(Forgetting(config.forgetting))
    if config.log != "none":  # last: it mirrors metrics.jsonl, which holds what every other callback added
        callbacks.append(MetricsMirror(config.log))
    return callbacks
