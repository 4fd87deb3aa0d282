"""Prefix tuning through Hugging Face PEFT: trained key/value prefixes in every layer."""

from __future__ import annotations

from dataclasses import dataclass

from ..costs.parts import POSITIONS, Part, Tensor
from .base import Method, MethodError, register


@register
@dataclass
class PrefixTuning(Method):
    """Trainable key/value prefixes in every layer (Li & Liang 2021), no reparameterisation MLP."""

    name = "prefix"
    saves_adapter = True
    changes_sequence = True
    virtual_tokens: int = 16

    def check(self, shape):
        if self.virtual_tokens <= 0:
            raise MethodError(f"prefix: --virtual-tokens must be positive, got {self.virtual_tokens}")

    def prepare(self, model, shape):
        from peft import PrefixTuningConfig, TaskType, get_peft_model

        return get_peft_model(model, PrefixTuningConfig(task_type=TaskType.CAUSAL_LM,
                                                        num_virtual_tokens=self.virtual_tokens))

    def parts(self, shape):
        """One table P_theta of prefix activations, a key and a value per layer (Li & Liang 2021, Sec. 4.2),
        stored as PEFT does: virtual tokens x (2 · layers · kv heads · head dim)."""
        n = self.virtual_tokens
        kv = 2 * shape.num_layers * shape.num_kv_heads * shape.head_dim
        return (Part(POSITIONS, None, "kv", tensors=(Tensor("prefix_kv", n, kv),), positions=n),)
