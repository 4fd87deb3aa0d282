"""LoRA through Hugging Face PEFT: a trained low-rank path beside each target matrix."""

from __future__ import annotations

from dataclasses import dataclass

from ..costs.parts import PARALLEL, Matmul, Part, Tensor
from .base import ALL_LINEAR, Method, MethodError, register
from .targets import module_names, parse_targets, present


def low_rank_part(shape, layer: int, matrix: str, rank: int) -> Part:
    """x -> A (k x r) -> B (r x m) beside W0 (k x m): h = W0·x + (alpha/r)·B·A·x (Hu et al. 2021, Eq. 3),
    r·(k + m) parameters per matrix (Sec. 4.1), one pair per stored MoE expert."""
    fan_in, fan_out = shape.matrix_dims(matrix)
    experts = shape.matrix_copies(matrix)[0]
    return Part(PARALLEL, layer, matrix,
                tensors=(Tensor("lora_A", fan_in, rank, experts), Tensor("lora_B", rank, fan_out, experts)),
                matmuls=(Matmul(fan_in, rank), Matmul(rank, fan_out)))


def check_low_rank(name: str, rank: int, targets: tuple, shape) -> None:
    """Settings shared by the low-rank methods (LoRA and its variants, LoHa): known targets, 0 < rank <= dims."""
    if not targets:
        raise MethodError(f"{name}: --targets is empty; choose some of {','.join(ALL_LINEAR)}")
    unknown = set(targets) - set(ALL_LINEAR)
    if unknown:
        raise MethodError(f"{name}: unknown target matrices {sorted(unknown)}; choose from {ALL_LINEAR}")
    if rank <= 0:
        raise MethodError(f"{name}: --rank must be positive, got {rank}")
    if not present(targets, shape):
        raise MethodError(f"{name}: this model has none of the target matrices {','.join(targets)}")
    smallest = min(min(shape.matrix_dims(m)) for m in present(targets, shape))
    if rank > smallest:
        raise MethodError(f"{name}: --rank {rank} exceeds the smallest target matrix dimension {smallest}")


@register
@dataclass
class LoRA(Method):
    """W + (alpha/r)·B·A with W frozen (Hu et al. 2021, Eq. 3), through Hugging Face PEFT."""

    name = "lora"
    saves_adapter = True
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple = ALL_LINEAR

    def __post_init__(self):
        self.targets = parse_targets(self.targets)  # q_proj, all-linear, ... become q, k, v, o, gate, up, down

    def check(self, shape):
        check_low_rank(self.name, self.rank, self.targets, shape)

    def peft_options(self) -> dict:
        """LoraConfig options a variant of LoRA adds (DoRA's use_dora, rsLoRA's use_rslora)."""
        return {}

    def prepare(self, model, shape):
        from peft import LoraConfig, TaskType, get_peft_model

        config = LoraConfig(task_type=TaskType.CAUSAL_LM, r=self.rank, lora_alpha=self.alpha,
                            lora_dropout=self.dropout, target_modules=module_names(model.config.model_type, self.targets, shape.layer_matrices()),
                            **self.peft_options())
        return get_peft_model(model, config)

    def parts(self, shape):
        return tuple(low_rank_part(shape, i, m, self.rank) for i in range(shape.num_layers)
                     for m in present(self.targets, shape))
