"""A method defined outside tunegap/ joins the registry and trains, counts and estimates like a shipped one.

The throwaway method lives only in this file: LoRA on W_q and W_v (Hu et al. 2021's GPT-3 setting, Sec. 7.1)
in the top block alone, so the block below trains nothing and backprop must stop above it. Its cost
description is written here with the generic part vocabulary; no file under tunegap/ names it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

from conftest import tiny_config
from tunegap.config import TrainConfig
from tunegap.costs.parts import PARALLEL, Matmul, Part, PartError, Tensor
from tunegap.costs.shape import ModelShape
from tunegap.estimate import main as estimate_main
from tunegap.methods import METHODS, Method, MethodError, make_method, register, unregister
from tunegap.trainer import train


@dataclass
class TopQueryValueLoRA(Method):
    """LoRA beside W_q and W_v of the top block only, through PEFT's own `layers_to_transform`."""

    name = "qv-top-lora"
    saves_adapter = True
    rank: int = 4

    def prepare(self, model, shape):
        from peft import LoraConfig, TaskType, get_peft_model

        config = LoraConfig(task_type=TaskType.CAUSAL_LM, r=self.rank, lora_alpha=2 * self.rank,
                            target_modules=["q_proj", "v_proj"], layers_to_transform=[shape.num_layers - 1])
        return get_peft_model(model, config)

    def parts(self, shape):
        top, r = shape.num_layers - 1, self.rank
        parts = []
        for matrix in ("q", "v"):
            fan_in, fan_out = shape.matrix_dims(matrix)
            parts.append(Part(PARALLEL, top, matrix, tensors=(Tensor("A", fan_in, r), Tensor("B", r, fan_out)),
                              matmuls=(Matmul(fan_in, r), Matmul(r, fan_out))))
        return tuple(parts)


@pytest.fixture
def toy_method():
    register(TopQueryValueLoRA)
    yield TopQueryValueLoRA
    unregister(TopQueryValueLoRA.name)
    assert TopQueryValueLoRA.name not in METHODS


def hand_count(shape: ModelShape, rank: int) -> int:
    """r·(k + m) for W_q and W_v of one block (Hu et al. 2021, Sec. 4.1)."""
    return rank * (sum(shape.matrix_dims("q")) + sum(shape.matrix_dims("v")))


def test_a_method_registered_in_a_test_trains_with_counted_flops_equal_to_its_parts(tmp_path, toy_method):
    ledger = train(tiny_config(tmp_path, method=toy_method.name, rank=4, max_steps=2, count_flops_every=1))
    costs, shape = ledger["costs"], ModelShape(**ledger["shape"])
    assert ledger["status"] == "completed" and ledger["method"]["name"] == toy_method.name
    assert len(ledger["counted_steps"]) == 2
    assert costs["flops_counted_sampled"]["value"] > 0
    assert costs["flops_counted_sampled"]["value"] == pytest.approx(
        costs["flops_formula_on_sampled_steps"]["value"], rel=1e-9)
    trainable = toy_method(rank=4).trainable(shape)
    assert costs["params_trainable"]["value"] == trainable.params(shape) == hand_count(shape, 4)
    assert (tmp_path / "runs" / "t" / "adapter" / "adapter_model.safetensors").is_file()


def test_the_estimator_takes_a_registered_method_by_name(capsys, toy_method):
    assert estimate_main(["estimate", "--model", "smollm2-135m", "--method", toy_method.name, "--rank", "8",
                          "--tokens", "1M", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    shape = ModelShape(**result["model"]["shape"])
    assert result["method"]["name"] == toy_method.name
    assert result["costs"]["params_trainable"]["value"] == hand_count(shape, 8)


def test_the_registry_is_the_one_list_of_methods(toy_method):
    assert TrainConfig(method=toy_method.name).method == toy_method.name
    assert isinstance(make_method(toy_method.name, rank=2, targets=("q",)), toy_method)  # foreign options skipped

    @dataclass
    class Impostor(Method):
        name = toy_method.name

    with pytest.raises(MethodError, match="already registered"):
        register(Impostor)


def test_unregistered_names_and_uncostable_parts_are_refused():
    with pytest.raises(MethodError, match="unknown method"):
        make_method("qv-top-lora")
    with pytest.raises(PartError, match="cannot sit at"):
        Part(PARALLEL, 0, "mlp_out", matmuls=(Matmul(4, 2),))
    with pytest.raises(PartError, match="must chain"):
        Part(PARALLEL, 0, "q", matmuls=(Matmul(4, 2), Matmul(3, 4)))
