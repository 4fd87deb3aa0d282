"""(IA)^3 through Hugging Face PEFT: learned vectors rescaling keys, values and the MLP's inner activations."""

from __future__ import annotations

from dataclasses import dataclass

from ..costs.parts import SCALE_INPUT, SCALE_OUTPUT, Part, Tensor
from .base import Method, MethodError, register
from .targets import FUSED, module_names


@register
@dataclass
class IA3(Method):
    """Learned rescaling of keys, values and the MLP's inner activations (Liu et al. 2022, Sec. 3.3)."""

    name = "ia3"
    saves_adapter = True

    def prepare(self, model, shape):
        from peft import IA3Config, TaskType, get_peft_model

        arch = model.config.model_type
        if arch in FUSED:
            raise MethodError(f"ia3: {arch} computes q, k and v in one fused matrix, and (IA)^3 rescales keys and "
                              "values only; use lora, dora, freeze or full on this model")
        down = module_names(arch, ("down",))
        config = IA3Config(task_type=TaskType.CAUSAL_LM, target_modules=module_names(arch, ("k", "v")) + down,
                           feedforward_modules=down)
        return get_peft_model(model, config)

    def parts(self, shape):
        """l_k and l_v scale the key and value projections' outputs, l_ff the down projection's input
        (Liu et al. 2022, Eq. in Sec. 3.3: k ⊙ l_k, v ⊙ l_v, (l_ff ⊙ γ(W1 x)) W2): one vector each."""
        parts = []
        for layer in range(shape.num_layers):
            for m in ("k", "v"):
                parts.append(Part(SCALE_OUTPUT, layer, m, tensors=(Tensor("ia3_l", shape.matrix_dims(m)[1]),)))
            parts.append(Part(SCALE_INPUT, layer, "down", tensors=(Tensor("ia3_l", shape.matrix_dims("down")[0]),)))
        return tuple(parts)
