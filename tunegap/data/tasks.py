"""The shipped tasks, by the name `--data` takes: their splits, their scorer and the metric read as quality.

    support      a fictional company's house style (templated replies: learnable in minutes on a CPU)
    docstrings   the standard library's functions and their authors' first docstring sentence (real prose)

Both have train, validation and test splits: sweeps choose hyper-parameters on validation and report on test.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from . import docstrings, support


@dataclass(frozen=True)
class ShippedTask:
    name: str
    splits: Callable[[], dict[str, list[dict]]]  # "train", "validation", "test" records (messages + meta)
    score: Callable[[list[dict], list[str]], dict]  # (metas, generated texts) -> task metrics
    quality: str  # the task metric analyses read as "quality" (a fraction in [0, 1], higher is better)
    quality_name: str  # how a reader calls it
    max_new_tokens: int  # long enough for a full reference reply


def _support_splits() -> dict[str, list[dict]]:
    train, test = support.generate_support()
    return {"train": train, "validation": support.support_validation(), "test": test}


TASKS = {
    "support": ShippedTask("support", _support_splits, support.aggregate_scores, "style_adherence",
                           "style adherence", 96),
    "docstrings": ShippedTask("docstrings", docstrings.generate_docstrings, docstrings.aggregate_scores,
                              "summary_f1", "docstring token F1", 40),
}


def shipped(name: str) -> ShippedTask | None:
    return TASKS.get(name)


def task_of_records(records: list[dict]) -> ShippedTask | None:
    """The shipped task held-out records came from (their meta says so), or None for a user's data."""
    meta = records[0].get("meta") if records else None
    if not isinstance(meta, dict):
        return None
    return TASKS["docstrings"] if meta.get("task") == "docstrings" else TASKS["support"] if "in_scope" in meta \
        else None
