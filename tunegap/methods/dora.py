"""DoRA through PEFT's `use_dora`: LoRA's direction update with a trained magnitude per output column."""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..costs.parts import CallMatmul, Tensor
from .base import MethodError, register
from .lora import LoRA, low_rank_part


def dora_part(shape, layer: int, matrix: str, rank: int):
    """LoRA's x -> A -> B path plus DoRA's magnitude m (one per output, Liu et al. 2024, Eq. 5:
    W' = m · (W0 + B·A) / ||W0 + B·A||_c) and the matmuls PEFT runs once per forward call to get that norm
    (`peft.tuners.lora.dora.DoraLinearLayer`): B·A is built as B(A(I_k)), an (k x k)(k x r) and a (k x r)(r x m)
    product. Its result is detached (the norm is a constant in backward, Liu et al. 2024, Sec. 4.3), so those
    two matmuls have no backward; the norm itself and the rescaling are elementwise. The base output W0·x is
    reused (PEFT recomputes it only under dropout, which `DoRA.check` refuses)."""
    part = low_rank_part(shape, layer, matrix, rank)
    fan_in, fan_out = shape.matrix_dims(matrix)
    magnitude = Tensor("lora_magnitude_vector", fan_out, 1, shape.matrix_copies(matrix)[0])
    return replace(part, tensors=part.tensors + (magnitude,),
                   per_call=(CallMatmul(fan_in, fan_in, rank), CallMatmul(fan_in, rank, fan_out)))


@register
@dataclass
class DoRA(LoRA):
    """Weight-decomposed low-rank adaptation (Liu et al. 2024, Eq. 5): LoRA updates the direction of W0 and a
    trained vector m its column magnitudes, through PEFT's LoraConfig(use_dora=True)."""

    name = "dora"

    def check(self, shape):
        super().check(shape)
        if self.dropout:
            raise MethodError(f"dora: --dropout {self.dropout}: PEFT's DoRA then runs W0 a second time on the "
                              "dropped-out input, a matmul the cost model does not describe; use --dropout 0")

    def peft_options(self) -> dict:
        return {"use_dora": True}

    def parts(self, shape):
        return tuple(dora_part(shape, i, m, self.rank) for i in range(shape.num_layers) for m in self.targets)
