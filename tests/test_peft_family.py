"""The LoRA family beyond LoRA (rsLoRA, DoRA, QLoRA) and LoHa: each trains on the tiny model through the trainer
with counted FLOPs equal to its parts' formula, saves an adapter that plain PEFT loads onto the fp32 base, and
QLoRA's 4-bit base shows in the ledger's weights as the storage layout predicts.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import tiny_config
from tunegap.costs.flops import train_step_flops
from tunegap.costs.memory import NF4_BLOCK, TrainSetup, memory_per_device
from tunegap.costs.shape import ModelShape
from tunegap.estimate import main as estimate_main
from tunegap.methods import MethodError, make_method
from tunegap.methods.qlora import scaler_block
from tunegap.outputs import load_start
from tunegap.trainer import train

RANK = 4
NEW = ("rslora", "dora", "loha", "qlora")


def hand_count(name: str, shape: ModelShape) -> int:
    """Trainable parameters per the papers, over every block matrix: r(k + m) for LoRA, rsLoRA and QLoRA
    (Hu et al. 2021, Sec. 4.1), plus m magnitudes for DoRA (Liu et al. 2024, Eq. 5), 2r(k + m) for LoHa's two
    factor pairs (Hyeon-Woo et al. 2022, Eq. 2)."""
    total = 0
    for m in shape.layer_matrices():
        k, n = shape.matrix_dims(m)
        total += {"dora": RANK * (k + n) + n, "loha": 2 * RANK * (k + n)}.get(name, RANK * (k + n))
    return total * shape.num_layers


def run(tmp_path, name: str, **overrides) -> dict:
    config = tiny_config(tmp_path, method=name, name=name, rank=RANK, max_steps=4, count_flops_every=1,
                         lr=1e-2, warmup_steps=1, **overrides)
    return train(config)


def losses(tmp_path, name: str) -> list[float]:
    lines = (tmp_path / "runs" / name / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines if '"loss"' in line]


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Each new method and plain LoRA, 4 steps on the tiny model; one run each for every test below."""
    tmp_path = tmp_path_factory.mktemp("peft")
    return tmp_path, {name: run(tmp_path, name) for name in ("lora",) + NEW}


@pytest.mark.parametrize("name", NEW)
def test_trains_with_counted_flops_equal_to_the_formula(trained, name):
    tmp_path, ledgers = trained
    ledger = ledgers[name]
    costs, shape = ledger["costs"], ModelShape(**ledger["shape"])
    assert ledger["status"] == "completed" and ledger["method"]["name"] == name
    assert len(ledger["counted_steps"]) == 4
    assert costs["flops_counted_sampled"]["value"] == pytest.approx(
        costs["flops_formula_on_sampled_steps"]["value"], rel=1e-9)
    assert costs["params_trainable"]["value"] == make_method(name, rank=RANK).trainable(shape).params(shape) \
        == hand_count(name, shape)
    seen = losses(tmp_path, name)
    assert seen[-1] < seen[0], seen  # 4 steps at lr 1e-2 on the support task: every method's loss falls


@pytest.mark.parametrize("name", NEW)
def test_the_saved_adapter_loads_in_plain_peft_onto_the_fp32_base(trained, name):
    from peft import PeftModel

    tmp_path, ledgers = trained
    base, _ = load_start(ledgers[name]["config"])
    ids = torch.randint(3, 250, (2, 24), generator=torch.Generator().manual_seed(0))
    before = logits(base, ids)
    model = PeftModel.from_pretrained(base, str(tmp_path / "runs" / name / "adapter"))
    assert all(p.dtype == torch.float32 and type(p) is torch.nn.Parameter for p in model.parameters())
    assert not torch.allclose(logits(model, ids), before, atol=1e-4)
    if name == "rslora":  # alpha / sqrt(r) (Kalajdzievski 2023, Eq. 4), not LoRA's alpha / r
        scalings = {m.scaling["default"] for m in model.modules() if hasattr(m, "lora_A") and m.lora_A}
        assert scalings == {16.0 / math.sqrt(RANK)}


def nf4_bytes(numel: int) -> int:
    """torchao's NF4 layout for one matrix: two 4-bit codes per byte, one int8 absmax per block of 64, one fp32
    factor per `scaler_block` absmax, an fp32 absmax mean and the 16-entry fp32 code table (Dettmers et al.
    2023, Sec. 3: 4 + 8/64 + 32/(64·256) bits per weight at QLoRA's block sizes)."""
    blocks = numel // NF4_BLOCK
    return numel // 2 + blocks + 4 * (blocks // scaler_block(numel)) + 4 + 16 * 4


def test_qlora_stores_the_block_matrices_in_4_bits_and_the_ledger_shows_it(trained):
    _, ledgers = trained
    lora, qlora = ledgers["lora"], ledgers["qlora"]
    shape = ModelShape(**qlora["shape"])
    sizes = [k * n for m in shape.layer_matrices() for k, n in [shape.matrix_dims(m)]] * shape.num_layers
    added = qlora["costs"]["params_total"]["value"] - shape.total_params()
    fp32 = 4 * (shape.total_params() + added)
    expected = fp32 - 4 * sum(sizes) + sum(nf4_bytes(s) for s in sizes)
    assert lora["costs"]["weights_bytes"]["value"] == fp32
    assert qlora["costs"]["weights_bytes"]["value"] == expected
    ratio = qlora["costs"]["weights_bytes"]["value"] / lora["costs"]["weights_bytes"]["value"]
    assert 0.30 < ratio < 0.40, ratio  # tiny: the fp32 embedding and LoRA's A, B are a third of what is left
    # the estimator's QLoRA (blocks of 64 and 256, no per-matrix constants) within 1% of the measured bytes
    trainable = make_method("qlora", rank=RANK).trainable(shape)
    estimated = memory_per_device(shape, trainable, TrainSetup(base_format="nf4"), seq_len=64).weights
    assert estimated == pytest.approx(expected, rel=0.01)


def test_qlora_base_weights_are_nf4_and_the_formula_counts_its_step():
    from tunegap.models import load_model

    model, _ = load_model("tiny")
    shape = ModelShape.from_hf_config(model.config)
    method = make_method("qlora", rank=RANK)
    model = method.prepare(model, shape)
    quantised = [type(p).__name__ for n, p in model.named_parameters() if "layers." in n and not p.requires_grad
                 and p.dim() == 2]
    assert quantised and set(quantised) == {"NF4Tensor"}
    assert len(quantised) == shape.num_layers * len(shape.layer_matrices())
    ids = torch.randint(0, 250, (3, 40))
    from tunegap.costs.counted import count_flops

    with count_flops() as counter:
        model(input_ids=ids).logits.float().sum().backward()
    formula = train_step_flops(shape, method.trainable(shape), sequences=3, seq_len=40)
    assert counter.get_total_flops() == pytest.approx(formula.hardware, rel=1e-9)


def test_per_call_matmuls_run_once_per_forward_call():
    """DoRA's weight norm and LoHa's weight rebuild cost the same whatever the tokens; two calls cost twice."""
    shape = ModelShape(vocab_size=100, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                       intermediate_size=128)
    for name in ("dora", "loha"):
        tr = make_method(name, rank=RANK).trainable(shape)
        one = train_step_flops(shape, tr, sequences=2, seq_len=8)
        two = train_step_flops(shape, tr, sequences=2, seq_len=8, calls=2)
        lora = train_step_flops(shape, make_method("lora", rank=RANK).trainable(shape), sequences=2, seq_len=8)
        assert two.hardware > one.hardware
        if name == "dora":  # only the forward-only norm matmuls differ from LoRA: (k x k x r) + (k x r x m)
            per_call = sum(2 * k * (k * RANK + RANK * n) for m in shape.layer_matrices()
                           for k, n in [shape.matrix_dims(m)]) * shape.num_layers
            assert one.forward - lora.forward == per_call and one.backward == lora.backward
            assert two.forward - one.forward == per_call


def test_the_estimator_prices_qlora_as_the_registered_method(capsys):
    assert estimate_main(["estimate", "--model", "smollm2-135m", "--method", "qlora", "--tokens", "1M",
                          "--precision", "fp32", "--json"]) == 0
    q = json.loads(capsys.readouterr().out)
    assert estimate_main(["estimate", "--model", "smollm2-135m", "--method", "lora", "--tokens", "1M",
                          "--precision", "fp32", "--json"]) == 0
    lora = json.loads(capsys.readouterr().out)
    assert q["method"]["name"] == "qlora" and q["method"]["label"] == "qlora"
    assert q["memory"]["detail"]["nf4_params"] > 0 and lora["memory"]["detail"]["nf4_params"] == 0
    assert q["costs"]["flops_total"] == lora["costs"]["flops_total"]
    assert q["costs"]["weights_bytes"]["value"] < 0.4 * lora["costs"]["weights_bytes"]["value"]


def test_dora_refuses_dropout_and_qlora_a_matrix_that_is_not_whole_blocks():
    shape = ModelShape(vocab_size=100, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                       intermediate_size=128)
    with pytest.raises(MethodError, match="dropout"):
        make_method("dora", dropout=0.1).check(shape)
    odd = ModelShape(vocab_size=100, hidden_size=60, num_layers=1, num_heads=4, num_kv_heads=2,
                     intermediate_size=90)
    with pytest.raises(MethodError, match="NF4"):
        make_method("qlora", rank=RANK).check(odd)


@pytest.mark.parametrize("name", ["dora", "loha", "qlora"])
def test_checkpointed_step_counts_exactly_the_formulas_flops(name):
    """Activation checkpointing reruns each block's per-call matmuls with its forward: still counted == formula."""
    from tunegap.costs.counted import count_flops
    from tunegap.data.packing import make_batch
    from tunegap.data.render import Example
    from tunegap.models import base_model, checkpoint_activations, load_model
    from tunegap.objectives import Context
    from tunegap.objectives.next_token import step_flops, sum_loss
    from tunegap.precision import autocast_factory

    model, _ = load_model("tiny")
    method = make_method(name, rank=RANK)
    shape = ModelShape.from_hf_config(model.config)
    model = method.prepare(model, shape)
    checkpoint_activations(base_model(model))
    model.train()
    examples = [Example(list(range(3, 3 + n)), [-100] * 3 + list(range(6, 3 + n))) for n in (9, 14, 6)]
    batch = make_batch(examples, capacity=24, pad_id=0)
    ctx = Context(model, base_model(model), method, 0, autocast_factory("fp32"))
    with count_flops() as counter:
        (sum_loss(ctx, batch) / batch.n_loss_tokens).backward()
    formula = step_flops(shape, method.trainable(shape), ctx, batch, checkpointing=True)
    assert formula.recompute > 0
    assert counter.get_total_flops() == pytest.approx(formula.hardware, rel=1e-9)


def held_activation_bytes(model_name: str, method_name: str, *, autocast: bool, batch: int = 2, seq_len: int = 48):
    """Bytes of the distinct non-parameter tensors autograd still holds after one forward of the loss: tensors
    saved only by a per-call graph that is dropped at once (DoRA's B(A(I)) for its norm) are not counted."""
    import gc
    import weakref

    import torch.nn.functional as F

    from tunegap.models import load_model

    torch.manual_seed(0)
    model, _ = load_model(model_name)
    shape = ModelShape.from_hf_config(model.config)
    method = make_method(method_name, rank=RANK)
    model = method.prepare(model, shape)
    base = model.get_base_model()
    model.train()
    quantised = lambda t: hasattr(t, "__tensor_flatten__")  # noqa: E731  an NF4 weight: a parameter, not saved
    params = {p.untyped_storage().data_ptr() for p in model.parameters() if not quantised(p)}
    saved = []

    def pack(t):
        if not quantised(t) and t.untyped_storage().data_ptr() not in params:
            saved.append(weakref.ref(t))
        return t

    ids = torch.randint(0, shape.vocab_size, (batch, seq_len))
    context = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else torch.autocast("cpu", enabled=False)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with context:
            hidden = base.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state
            logits = base.get_output_embeddings()(hidden[:, :-1].reshape(-1, shape.hidden_size))
        loss = F.cross_entropy(logits.float(), ids[:, 1:].reshape(-1), reduction="sum")
    del hidden, logits
    gc.collect()
    alive = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
             for t in (r() for r in saved) if t is not None}
    assert loss.requires_grad
    return sum(alive.values()), shape, method


@pytest.mark.parametrize("model_name, name, autocast", [
    ("tiny", "dora", False), ("small", "dora", False), ("small", "dora", True), ("tiny", "loha", False),
    ("small", "loha", False), ("small", "qlora", False), ("small", "qlora", True)])
def test_activation_formula_matches_what_autograd_holds(model_name, name, autocast):
    """DoRA keeps W0·x and B·A·x apart for its magnitude (both outputs of its scale), LoHa keeps ΔW once per call
    where the input needs a gradient, QLoRA keeps no autocast copy of a 4-bit weight. (LoHa under autocast is
    left out: PEFT's LyCORIS layers return the input's dtype, so the blocks keep fp32 where LoRA keeps bf16:
    the formula is 10% low on the small model.)"""
    from tunegap.costs.memory import PRECISIONS, activation_bytes

    measured, shape, method = held_activation_bytes(model_name, name, autocast=autocast)
    acts = activation_bytes(shape, method.trainable(shape), PRECISIONS["bf16-autocast" if autocast else "fp32"],
                            sequences=2, seq_len=48, loss_positions=2 * 47, quantized_base=method.base_format == "nf4")
    assert sum(acts.blocks) + acts.head == pytest.approx(measured, rel=0.035)
