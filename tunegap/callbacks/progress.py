"""A progress bar with the step's loss and throughput (the main process only)."""

from __future__ import annotations

from .base import Callback


class ProgressBar(Callback):
    def __init__(self):
        self.bar = None

    def on_train_start(self, trainer):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=trainer.steps, initial=trainer.totals.steps, desc=trainer.name, unit="step",
                        disable=not trainer.config.progress or not trainer.strategy.is_main, dynamic_ncols=True)

    def on_step_end(self, trainer, step, row):
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{row['tokens_per_s']:.0f}")
        return {}

    def close(self):
        if self.bar is not None:
            self.bar.close()
