"""The callback interface: hooks that return metric dicts, which the trainer writes into the log and ledger."""

from __future__ import annotations


class Callback:
    """Override the hooks you need; each returns a dict of metrics (or {}) that the trainer records.

    `trainer` exposes `config`, `strategy`, `objective`, `ctx` (model, base, method), `data`, `steps` (planned),
    `tokenizer`, `name` and `folder`.
    """

    def plan(self, trainer, forecast) -> dict:
        """Before step 1 on the main process: what this callback will cost, {"what", "seconds", "runs", "why"}
        ({} when it costs nothing worth saying). `forecast` (`trainer.Forecast`) holds the duration probes."""
        return {}

    def on_train_start(self, trainer) -> None:
        """Before the first step (after a resume, before the first step still to run)."""

    def on_step_end(self, trainer, step: int, row: dict) -> dict:
        """After each optimizer step; `row` is the step's log line. Runs on every rank (collectives allowed)."""
        return {}

    def on_train_end(self, trainer) -> dict:
        """After the last step, before the outputs are gathered. Runs on every rank (collectives allowed)."""
        return {}

    def on_outputs(self, trainer, model, tokenizer) -> dict:
        """After the trained model is written, with its full weights on the CPU; the main process only."""
        return {}

    def close(self) -> None:
        """Always called when training stops, finished or not."""


def decide(setting: str, flag: str, *, training_s: float, evaluation_s: float) -> tuple[bool, str]:
    """An evaluation's on/off/auto setting: auto runs it only when the training it follows is predicted to take
    at least as long, so a short fine-tune stays short."""
    if setting == "on":
        return True, f"on ({flag} on)"
    if setting == "off":
        return False, f"off ({flag} off)"
    if training_s >= evaluation_s:
        return True, "auto: runs, training is predicted to take longer"
    return False, f"auto: skipped, it would take longer than the training; {flag} on runs it"
