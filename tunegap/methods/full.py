"""Full fine-tuning, and pretraining when the weights start random: every weight trains."""

from __future__ import annotations

from dataclasses import dataclass

from ..costs.shape import full_trainable
from .base import Method, register


@register
@dataclass
class Full(Method):
    """Every weight trains: supervised fine-tuning, and pretraining when the weights start random."""

    name = "full"

    def prepare(self, model, shape):
        for p in model.parameters():
            p.requires_grad_(True)
        return model

    def trainable(self, shape):
        return full_trainable(shape)
