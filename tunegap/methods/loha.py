"""LoHa through PEFT's LoHaConfig: a Hadamard product of two low-rank matrices beside each target matrix."""

from __future__ import annotations

from dataclasses import dataclass

from ..costs.parts import PARALLEL, CallMatmul, Matmul, Part, Tensor
from .base import ALL_LINEAR, Method, register
from .lora import check_low_rank
from .targets import module_names, parse_targets, present


def hadamard_part(shape, layer: int, matrix: str, rank: int) -> Part:
    """ΔW = (W1a·W1b) ⊙ (W2a·W2b)·(alpha/r) for W0 (k inputs, m outputs) (Hyeon-Woo et al. 2022, FedPara,
    Eq. 2): 2r·(k + m) parameters, rank up to r². PEFT (`peft.tuners.loha.layer`) builds ΔW once per forward
    call, two (m x r)(r x k) products, in an autograd Function (`HadaWeight`) that keeps only the factors: its
    backward runs both products again and one matmul per factor's gradient. Then ΔW is applied to every token
    as a (k x m) matmul whose weight gets a gradient (ΔW requires one) and whose input gets one where x does."""
    fan_in, fan_out = shape.matrix_dims(matrix)
    experts = shape.matrix_copies(matrix)[0]
    tensors = tuple(Tensor(name, rows, cols, experts) for name, rows, cols in (
        ("hada_w1_a", fan_out, rank), ("hada_w1_b", rank, fan_in),
        ("hada_w2_a", fan_out, rank), ("hada_w2_b", rank, fan_in)))
    product = CallMatmul(fan_out, rank, fan_in, grads=2, recomputed=True)
    return Part(PARALLEL, layer, matrix, tensors=tensors, matmuls=(Matmul(fan_in, fan_out),),
                per_call=(product, product), weight_per_call=True)


@register
@dataclass
class LoHa(Method):
    """Low-rank Hadamard product adaptation (Hyeon-Woo et al. 2022, FedPara, Eq. 2) beside each target matrix
    with W0 frozen, through Hugging Face PEFT's LoHaConfig (LyCORIS's LoHa)."""

    name = "loha"
    saves_adapter = True
    rank: int = 8
    alpha: float = 16.0
    targets: tuple = ALL_LINEAR

    def __post_init__(self):
        self.targets = parse_targets(self.targets)

    def check(self, shape):
        check_low_rank(self.name, self.rank, self.targets, shape)

    def prepare(self, model, shape):
        from peft import LoHaConfig, TaskType, get_peft_model

        config = LoHaConfig(task_type=TaskType.CAUSAL_LM, r=self.rank, alpha=self.alpha,
                            target_modules=module_names(model.config.model_type, self.targets, shape.layer_matrices()))
        return get_peft_model(model, config)

    def parts(self, shape):
        return tuple(hadamard_part(shape, i, m, self.rank) for i in range(shape.num_layers)
                     for m in present(self.targets, shape))
