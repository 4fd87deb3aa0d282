"""Houlsby bottleneck adapters, written by hand because PEFT has none: x + up(act(down(x))) after each MLP."""

from __future__ import annotations

from dataclasses import dataclass

from ..costs.parts import SERIAL, Matmul, Part, Tensor
from .base import Method, MethodError, decoder_layers, register


@register
@dataclass
class Adapter(Method):
    """Houlsby et al. 2019 bottleneck adapter after each MLP: x + up(act(down(x))), up initialised to 0.

    Written by hand because PEFT has no bottleneck adapter; it wraps each block's MLP module in place.
    """

    name = "adapter"
    saves_trained_tensors = True
    dim: int = 16

    def check(self, shape):
        if self.dim <= 0:
            raise MethodError(f"adapter: --adapter-dim must be positive, got {self.dim}")

    def prepare(self, model, shape):
        for p in model.parameters():
            p.requires_grad_(False)
        for block in decoder_layers(model):
            block.mlp = BottleneckAdapter(block.mlp, shape.hidden_size, self.dim)
        return model

    def parts(self, shape):
        """d -> a -> d with biases after every MLP: 2da + a + d parameters per layer (Houlsby et al. 2019, Sec. 2.1)."""
        d, a = shape.hidden_size, self.dim
        tensors = (Tensor("adapter_down.weight", d, a), Tensor("adapter_down.bias", a),
                   Tensor("adapter_up.weight", a, d), Tensor("adapter_up.bias", d))
        return tuple(Part(SERIAL, layer, "mlp_out", tensors=tensors, matmuls=(Matmul(d, a), Matmul(a, d)))
                     for layer in range(shape.num_layers))


def BottleneckAdapter(mlp, hidden: int, dim: int):
    """Build the adapter module lazily so that importing tunegap does not import torch."""
    import torch
    from torch import nn

    class _Adapter(nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = mlp
            self.adapter_down = nn.Linear(hidden, dim)
            self.adapter_up = nn.Linear(dim, hidden)
            nn.init.zeros_(self.adapter_up.weight)  # start as the identity: the base model's behaviour
            nn.init.zeros_(self.adapter_up.bias)

        def forward(self, x):
            h = self.mlp(x)
            return h + self.adapter_up(torch.nn.functional.gelu(self.adapter_down(h)))

    return _Adapter()
