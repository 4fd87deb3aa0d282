"""Objectives: what a training step minimises, and everything that depends on it.

An objective builds its data and batches, computes the loss *summed* over the batch's units (loss tokens for
next-token prediction, pairs for preference losses) with metrics summed the same way, counts how many units a
batch holds (the normaliser the trainer divides the whole step by, torchtune's scaling), and gives the step's
FLOPs by formula. The trainer knows nothing else about it, so DPO or a reward model is one new file here
(subclass `Objective`, decorate with `register`, import it below) and no edit to the trainer.
"""

from .base import OBJECTIVES, Context, LossOutput, Objective, heldout_sums, make_objective, register
from .next_token import NextToken, heldout_loss, sum_loss
from .grpo import GRPO  # registers --objective grpo
from .dpo import DPO  # registers --objective dpo
from .reward import RewardModel  # registers --objective reward

__all__ = ["DPO", "GRPO", "OBJECTIVES", "Context", "LossOutput", "NextToken", "Objective", "RewardModel",
           "heldout_loss", "heldout_sums", "make_objective", "register", "sum_loss"]
