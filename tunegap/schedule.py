"""How many steps a run takes, which examples each step sees, and the learning rate at each step.

Pure functions of the config (and a seed): a resumed run recomputes exactly the order and schedule the
killed one had, so nothing about them needs to be checkpointed besides the step number.
"""

from __future__ import annotations

import math

from .config import ConfigError, TrainConfig


class DataOrder:
    """Which examples micro-batch i holds: a fresh seeded permutation per epoch, reproducible after resume."""

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size, self.seed, self._perms = n, batch_size, seed, {}

    def _perm(self, epoch: int):
        import torch

        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perms = {epoch: torch.randperm(self.n, generator=g).tolist()}
        return self._perms[epoch]

    def micro_batch(self, index: int) -> list[int]:
        start = index * self.batch_size
        return [self._perm(k // self.n)[k % self.n] for k in range(start, start + self.batch_size)]

    def epochs_done(self, micro_batches: int) -> float:
        return micro_batches * self.batch_size / self.n


def lr_lambda(config: TrainConfig, total_steps: int, warmup: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if config.schedule == "constant" or total_steps <= warmup:
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        if config.schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * progress))  # cosine to zero (Loshchilov & Hutter 2017)

    return factor


def warmup_steps(config: TrainConfig, steps: int) -> int:
    return config.warmup_steps or max(1, round(0.05 * steps))


def total_steps(config: TrainConfig, n_examples: int, mean_tokens: float) -> int:
    per_step = config.batch_size * config.grad_accum
    if config.max_steps:
        steps = config.max_steps
    elif config.budget_tokens:
        if config.budget_tokens < mean_tokens * per_step:  # rounding up would silently spend more than asked
            raise ConfigError(f"--budget-tokens {config.budget_tokens:,} is less than one optimizer step (about "
                              f"{mean_tokens * per_step:,.0f} tokens: --batch-size x --grad-accum x "
                              f"{mean_tokens:.0f} mean tokens per example); raise it or lower --batch-size")
        steps = math.ceil(config.budget_tokens / (mean_tokens * per_step))
    else:
        steps = math.ceil(config.epochs * n_examples / per_step)
    if steps <= 0:
        raise ConfigError("the settings give zero optimizer steps; raise --epochs, --max-steps or --budget-tokens")
    return steps
