"""Held-out loss during training and after it, through the strategy (each rank evaluates its share)."""

from __future__ import annotations

from .. import compiling
from ..predict import heldout_seconds
from .base import Callback


def heldout_now(trainer, examples=None):
    """The objective's mean held-out loss on the current weights (the test split unless `examples`)."""
    config = trainer.config
    with compiling.eager():  # no compile for no_grad shapes
        return trainer.strategy.heldout(trainer.objective, trainer.ctx,
                                        trainer.data.eval if examples is None else examples,
                                        config.batch_size, config.seq_len)


class HeldoutLoss(Callback):
    """The objective's loss on the held-out set, per unit: every `every` steps (0 = only at the end); also on
    the validation split at the end when the data has one (`--val-examples`), logged as val_loss."""

    def __init__(self, every: int = 0):
        self.every = every

    def plan(self, trainer, forecast):
        held, validation = trainer.data.eval, trainer.data.validation
        if not held and not validation:
            return {}
        times = 1 + (trainer.steps // self.every if self.every else 0)  # the test split, every `every` steps

        def seconds(examples):
            if not examples:
                return 0.0
            return heldout_seconds(forecast.probe, trainer.shape, examples=len(examples),
                                   tokens_per_example=sum(len(e) for e in examples) / len(examples))

        return {"what": "held-out loss", "seconds": times * seconds(held) + seconds(validation), "runs": True,
                "why": ""}  # the validation split once, at the end

    def on_step_end(self, trainer, step, row):
        if self.every and step % self.every == 0 and step < trainer.steps:
            return {"eval_loss": heldout_now(trainer)}
        return {}

    def on_train_end(self, trainer):
        validation = trainer.data.validation
        return {"eval_loss": heldout_now(trainer),
                **({"val_loss": heldout_now(trainer, validation)} if validation else {})}
