"""DoRA through PEFT's `use_dora`: LoRA's direction update with a trained magnitude per output column."""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..costs.parts import SCALE_OUTPUT, CallMatmul, Part, Tensor
from .base import MethodError, register
from .lora import LoRA, low_rank_part
from .targets import present


def dora_parts(shape, layer: int, matrix: str, rank: int) -> tuple:
    """DoRA beside W0 (k inputs, m outputs): W' = m · (W0 + B·A) / ||W0 + B·A||_c (Liu et al. 2024, Eq. 5), so
    W'·x = (m / ||W0 + B·A||_c) ⊙ (W0·x + B·A·x): LoRA's x -> A -> B path, and a trained magnitude per output
    scaling the sum (a SCALE_OUTPUT part, as IA3's vectors: its multiply keeps that output for m's gradient).
    To get the norm, PEFT (`peft.tuners.lora.dora.DoraLinearLayer`) builds B·A once per forward call as
    B(A(I_k)), a (k x k)(k x r) and a (k x r)(r x m) product, whose result it detaches (the norm is a constant
    in backward, Sec. 4.3): two per-call matmuls with no backward; the norm and the rescaling are elementwise.
    W0·x is reused (PEFT recomputes it only under dropout, which `DoRA.check` refuses)."""
    lora = low_rank_part(shape, layer, matrix, rank)
    fan_in, fan_out = shape.matrix_dims(matrix)
    lora = replace(lora, per_call=(CallMatmul(fan_in, fan_in, rank), CallMatmul(fan_in, rank, fan_out)))
    magnitude = Tensor("lora_magnitude_vector", fan_out, 1, shape.matrix_copies(matrix)[0])
    return lora, Part(SCALE_OUTPUT, layer, matrix, tensors=(magnitude,))


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
        return tuple(part for i in range(shape.num_layers) for m in present(self.targets, shape)
                     for part in dora_parts(shape, i, m, self.rank))
