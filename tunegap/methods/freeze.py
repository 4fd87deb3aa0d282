"""Freezing the bottom of the network: only the top blocks, the final norm and an untied head train."""

from __future__ import annotations

from dataclasses import dataclass

from ..costs.shape import Trainable
from .base import Method, MethodError, decoder_layers, final_norm, register


@register
@dataclass
class Freeze(Method):
    """Train only the top `layers` blocks, the final norm and an untied head (Yosinski et al. 2014's recipe).

    A tied head is the embedding matrix: training it would send gradients to the bottom of the network,
    so it stays frozen and backprop stops at the lowest trained block.
    """

    name = "freeze"
    layers: int = 2

    def check(self, shape):
        if not 1 <= self.layers <= shape.num_layers:
            raise MethodError(f"freeze: --freeze-layers must be in 1..{shape.num_layers}, got {self.layers}")

    def _top(self, shape):
        return range(shape.num_layers - self.layers, shape.num_layers)

    def prepare(self, model, shape):
        for p in model.parameters():
            p.requires_grad_(False)
        blocks = decoder_layers(model)
        for i in self._top(shape):
            for p in blocks[i].parameters():
                p.requires_grad_(True)
        for p in final_norm(model).parameters():  # RMSNorm's weight, or LayerNorm's weight and bias
            p.requires_grad_(True)
        if not shape.tied_embeddings:
            model.get_output_embeddings().weight.requires_grad_(True)
        return model

    def trainable(self, shape):
        top = list(self._top(shape))
        return Trainable(dense=frozenset((i, m) for i in top for m in shape.layer_matrices()),
                         norms=frozenset(top), final_norm=True, head=not shape.tied_embeddings,
                         extras=frozenset(top))
