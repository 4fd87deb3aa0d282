"""Prompt tuning through Hugging Face PEFT: trained virtual tokens prepended to every input."""

from __future__ import annotations

from dataclasses import dataclass

from ..costs.parts import POSITIONS, Part, Tensor
from .base import Method, MethodError, register


@register
@dataclass
class PromptTuning(Method):
    """Trainable virtual tokens prepended to every input (Lester et al. 2021)."""

    name = "prompt"
    saves_adapter = True
    changes_sequence = True
    virtual_tokens: int = 16

    def check(self, shape):
        if self.virtual_tokens <= 0:
            raise MethodError(f"prompt: --virtual-tokens must be positive, got {self.virtual_tokens}")

    def prepare(self, model, shape):
        from peft import PromptTuningConfig, TaskType, get_peft_model

        return get_peft_model(model, PromptTuningConfig(task_type=TaskType.CAUSAL_LM,
                                                        num_virtual_tokens=self.virtual_tokens))

    def parts(self, shape):
        """One embedding per virtual token (Lester et al. 2021, Sec. 2: P_e, p x e), seen by every block."""
        n = self.virtual_tokens
        return (Part(POSITIONS, None, "input", tensors=(Tensor("prompt_embeddings", n, shape.hidden_size),),
                     positions=n),)
