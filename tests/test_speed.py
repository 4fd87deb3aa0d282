"""The speed levers of the training loop change time and memory, never the numbers (issue 7)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_config
from tunegap.costs.shape import ModelShape
from tunegap.data.packing import IGNORE, make_batch
from tunegap.data.render import Example
from tunegap.losses import linear_cross_entropy
from tunegap.methods import make_method
from tunegap.models import load_model
from tunegap.precision import can_store_frozen_low, frozen_linears_to
from tunegap.models import base_model
from tunegap.objectives import Context, sum_loss
from tunegap.precision import autocast_factory
from tunegap.trainer import train


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny matmuls: a 2nd thread only spin-waits


def _problem(n=37, d=16, vocab=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g)
    weight = torch.randn(vocab, d, generator=g) * 0.3
    targets = torch.randint(0, vocab, (n,), generator=g)
    targets[::5] = IGNORE
    return hidden, weight, targets


def _grads(fn, hidden, weight, targets):
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = fn(h, w, targets)
    (0.37 * loss).backward()  # a non-unit upstream gradient must scale both gradients
    return loss.detach(), h.grad, w.grad


def _reference(h, w, y):
    return F.cross_entropy(F.linear(h, w).float(), y, reduction="sum")


@pytest.mark.parametrize("chunk_rows", [1, 8, 256])
def test_fused_chunked_cross_entropy_equals_the_plain_one_with_gradients(chunk_rows):
    hidden, weight, targets = _problem()
    fused = _grads(lambda h, w, y: linear_cross_entropy(h, w, y, chunk_rows=chunk_rows), hidden, weight, targets)
    plain = _grads(_reference, hidden, weight, targets)
    for a, b in zip(fused, plain):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)
    assert fused[1][::5].abs().max() == 0  # ignored rows send no gradient back


def test_fused_cross_entropy_under_bf16_autocast_matches_autocast_reference():
    hidden, weight, targets = _problem(n=64, d=32, vocab=300)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = _grads(lambda h, w, y: linear_cross_entropy(h, w, y, chunk_rows=16), hidden, weight, targets)
        plain = _grads(_reference, hidden, weight, targets)
    assert fused[0].dtype == torch.float32
    assert fused[0] == pytest.approx(float(plain[0]), rel=1e-4)
    assert torch.allclose(fused[1], plain[1], rtol=2e-2, atol=2e-3)
    # not equal to the fp32 loss: the matmul really ran in bf16, as the unfused head does under autocast
    assert float(fused[0]) != pytest.approx(float(_reference(hidden, weight, targets)), rel=1e-6)


def test_fused_cross_entropy_without_gradients_gives_the_same_loss():
    hidden, weight, targets = _problem()
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, weight, targets, chunk_rows=4)
    assert loss.grad_fn is None
    assert float(loss) == pytest.approx(float(_reference(hidden, weight, targets)), rel=1e-6)


def test_sum_loss_equals_cross_entropy_of_the_models_own_logits():
    model, _ = load_model("tiny")
    shape = ModelShape.from_hf_config(model.config)
    method = make_method("lora")
    model = method.prepare(model, shape)
    examples = [Example(list(range(3, 3 + n)), [IGNORE] * (n // 2) + list(range(3 + n // 2, 3 + n))) for n in (9, 14)]
    batch = make_batch(examples, capacity=32, pad_id=0)
    ctx = Context(model, base_model(model), method, 0, autocast_factory("fp32"))
    ours = sum_loss(ctx, batch)
    logits = model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False).logits
    mask = batch.targets != IGNORE
    theirs = F.cross_entropy(logits[mask].float(), batch.targets[mask], reduction="sum")
    assert float(ours) == pytest.approx(float(theirs), rel=1e-5)


@pytest.mark.parametrize("name", ["lora", "ia3", "prefix", "adapter"])
def test_frozen_weights_in_bf16_give_bit_identical_autocast_steps(name):
    model, _ = load_model("tiny-untied")
    shape = ModelShape.from_hf_config(model.config)
    model = make_method(name, virtual_tokens=4).prepare(model, shape)
    for p in model.parameters():
        if p.requires_grad:  # adapters that start as an exact no-op would hide a difference
            torch.nn.init.normal_(p, std=0.05)
    low = copy.deepcopy(model)
    head = base_model(low).get_output_embeddings()
    frozen = sum(m.weight.numel() for m in base_model(low).modules()
                 if isinstance(m, torch.nn.Linear) and not m.weight.requires_grad and m is not head)
    assert frozen_linears_to(base_model(low), torch.bfloat16, keep=[head]) == 2 * frozen
    assert head.weight.dtype == torch.float32
    assert base_model(low).get_input_embeddings().weight.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in low.parameters() if p.requires_grad)
    ids = torch.randint(0, 250, (2, 24))
    results = []
    for m in (model, low):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = m(input_ids=ids).logits.float()
        logits.square().mean().backward()
        results.append((logits.detach(), [p.grad for p in m.parameters() if p.requires_grad]))
    assert torch.equal(results[0][0], results[1][0])
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1]))


def test_frozen_weights_go_low_only_where_the_base_is_never_saved():
    lora, full, freeze = make_method("lora"), make_method("full"), make_method("freeze")
    assert can_store_frozen_low(lora, "bf16", distributed=False)
    assert not can_store_frozen_low(lora, "fp32", distributed=False)
    assert not can_store_frozen_low(lora, "bf16", distributed=True)
    assert not can_store_frozen_low(full, "bf16", distributed=False)
    assert not can_store_frozen_low(freeze, "bf16", distributed=False)  # it saves the whole model


def test_bf16_lora_run_trains_and_saves_an_fp32_adapter(tmp_path):
    from safetensors.torch import load_file

    # generation after training runs without autocast: the frozen weights must be fp32 again by then
    ledger = train(tiny_config(tmp_path, precision="bf16", max_steps=2, generate_examples=2))
    assert ledger["status"] == "completed" and ledger["metrics"]["eval_loss"] > 0
    assert "style_adherence" in ledger["metrics"]
    adapter = load_file(str(tmp_path / "runs" / "t" / "adapter" / "adapter_model.safetensors"))
    assert adapter and all(t.dtype == torch.float32 for t in adapter.values())


def test_fp32_attention_keeps_packed_rows_separate_and_runs_outside_autocast():
    from tunegap.precision import FP32_ATTENTION, fp32_attention

    reference, _ = load_model("tiny")
    model = copy.deepcopy(reference)
    assert fp32_attention(model) and model.config._attn_implementation == FP32_ATTENTION
    examples = [Example(list(range(3, 3 + n)), list(range(3, 3 + n))) for n in (7, 5, 9)]
    batch = make_batch(examples, capacity=12, pad_id=0)
    with torch.no_grad():  # no autocast: the same function as transformers' sdpa, block-diagonal masks included
        ours = model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False).logits
        theirs = reference(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False).logits
    assert torch.equal(ours, theirs)
    seen = []
    hook = model.model.layers[0].self_attn.o_proj.register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False)
        reference.model.layers[0].self_attn.o_proj.register_forward_pre_hook(
            lambda m, args: seen.append(args[0].dtype))
        reference(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False)
    hook.remove()
    assert seen == [torch.float32, torch.bfloat16]  # autocast alone would have run the attention in bf16


def test_loss_positions_are_exactly_the_loss_bearing_targets():
    g = torch.Generator().manual_seed(3)
    examples = []
    for n in (5, 9, 13, 2, 7):
        labels = torch.randint(3, 50, (n,), generator=g).tolist()
        cut = int(torch.randint(0, n, (1,), generator=g))
        examples.append(Example(list(range(3, 3 + n)), [IGNORE] * cut + labels[cut:]))
    for pack in (True, False):
        batch = make_batch(examples, capacity=20, pad_id=0, pack=pack)
        expected = (batch.targets.flatten() != IGNORE).nonzero().squeeze(1)
        assert torch.equal(batch.loss_positions, expected)
        assert batch.n_loss_tokens == len(expected) > 0


@pytest.mark.parametrize("name,math", [("lora", False), ("full", False), ("lora", True)])
def test_a_fake_tensor_replay_counts_the_flops_of_the_real_step_and_touches_nothing(name, math):
    """The compiled run's counted FLOPs come from this replay: it must equal a real eager step's count, and
    the formula's, with the attention kernel compiled runs use (math: no score recompute in backward)."""
    from tunegap.costs.counted import count_flops, count_on_fake_tensors
    from tunegap.precision import fp32_attention
    from tunegap.objectives.next_token import step_flops

    model, _ = load_model("tiny")
    method = make_method(name)
    shape = ModelShape.from_hf_config(model.config)
    model = method.prepare(model, shape)
    assert fp32_attention(base_model(model), math=math)
    examples = [Example(list(range(3, 3 + n)), [IGNORE] * 3 + list(range(6, 3 + n))) for n in (9, 14, 6)]
    batch = make_batch(examples, capacity=24, pad_id=0)
    ctx = Context(model, base_model(model), method, 0, autocast_factory("bf16"))
    trained = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in trained]
    replayed = count_on_fake_tensors(lambda: torch.autograd.grad(sum_loss(ctx, batch) / batch.n_loss_tokens, trained))
    assert all(p.grad is None for p in trained)
    assert all(torch.equal(a, b) for a, b in zip(before, trained))
    with count_flops() as counter:
        (sum_loss(ctx, batch) / batch.n_loss_tokens).backward()
    assert replayed == counter.get_total_flops() > 0
    formula = step_flops(shape, method.trainable(shape), ctx, batch, checkpointing=False)
    assert replayed == pytest.approx(formula.hardware, rel=1e-9)
    assert (formula.recompute == 0) == math


def test_compile_is_decided_from_the_setting_the_method_and_the_predicted_saving_against_its_cost():
    from tunegap import compiling
    from tunegap.config import ConfigError

    lora, prefix = make_method("lora"), make_method("prefix")
    fast, slow = 300e9, 47e9  # measured fp32 peaks of a quiet Xeon and a busy Zen 3
    assert compiling.decide("off", method=lora, distributed=False, estimated_seconds=1e6,
                            fp32_peak=fast) == (False, "off (--compile off)")
    with pytest.raises(ConfigError, match="torchrun"):
        compiling.decide("on", method=lora, distributed=True, estimated_seconds=1e6, fp32_peak=fast)
    on, why = compiling.decide("auto", method=prefix, distributed=False, estimated_seconds=1e6, fp32_peak=fast)
    assert not on and "virtual tokens" in why
    assert compiling.compile_seconds(slow) > compiling.compile_seconds(fast)  # a slower machine compiles slower
    if compiling.why_not(lora, distributed=False) is None:
        # the break-even: compile when 12% of the training beats the compile's cost on this machine
        for peak in (fast, slow):
            even = compiling.compile_seconds(peak) / compiling.COMPILED_STEP_SAVING
            on, why = compiling.decide("auto", method=lora, distributed=False, estimated_seconds=0.9 * even,
                                       fp32_peak=peak)
            assert not on and "--compile on forces it" in why
            assert compiling.decide("auto", method=lora, distributed=False, estimated_seconds=1.1 * even,
                                    fp32_peak=peak)[0]
        # a 20-step arm of 5 minutes does not repay the compile on the slow machine (issue 19: 59 s first step)
        assert not compiling.decide("auto", method=lora, distributed=False, estimated_seconds=300, fp32_peak=slow)[0]


@pytest.mark.skipif(__import__("tunegap.compiling", fromlist=["why_not"]).why_not(make_method("lora"), False)
                    is not None, reason="torch.compile cannot run here (no C++ compiler)")
def test_a_compiled_run_trains_like_the_eager_one_and_counts_the_same_flops(tmp_path):
    """Regional compile (tunegap/compiling.py) changes kernels, not the numbers: the same losses to float
    rounding, the same counted FLOPs (from the fake-tensor replay), and eager layers again afterwards."""
    import json

    ledgers, losses = {}, {}
    for setting in ("off", "on"):
        config = tiny_config(tmp_path, name=setting, compile=setting, max_steps=3)
        ledgers[setting] = train(config)
        rows = (tmp_path / "runs" / setting / "metrics.jsonl").read_text().splitlines()
        losses[setting] = [json.loads(r)["loss"] for r in rows if "grad_norm" in json.loads(r)]
    assert ledgers["on"]["compiled"].startswith("on") and ledgers["off"]["compiled"].startswith("off")
    assert losses["on"] == pytest.approx(losses["off"], rel=1e-4)
    counted = {k: v["costs"]["flops_counted_sampled"]["value"] for k, v in ledgers.items()}
    assert counted["on"] == counted["off"] > 0
    assert ledgers["on"]["metrics"]["eval_loss"] == pytest.approx(ledgers["off"]["metrics"]["eval_loss"], rel=1e-4)


@pytest.mark.parametrize("name", ["full", "lora", "adapter", "ia3"])
def test_checkpointed_step_counts_exactly_the_formulas_flops(name):
    """The formula's recompute is the block forward minus its last matmul (checkpoint's early stop), and
    `checkpoint_activations` leaves the frozen embeddings' output without grad (no first-block input gradient)."""
    from tunegap.costs.counted import count_flops
    from tunegap.models import checkpoint_activations
    from tunegap.objectives.next_token import step_flops

    model, _ = load_model("tiny")
    method = make_method(name)
    shape = ModelShape.from_hf_config(model.config)
    model = method.prepare(model, shape)
    checkpoint_activations(base_model(model))
    model.train()
    examples = [Example(list(range(3, 3 + n)), [IGNORE] * 3 + list(range(6, 3 + n))) for n in (9, 14, 6)]
    batch = make_batch(examples, capacity=24, pad_id=0)
    ctx = Context(model, base_model(model), method, 0, autocast_factory("fp32"))
    with count_flops() as counter:
        (sum_loss(ctx, batch) / batch.n_loss_tokens).backward()
    formula = step_flops(shape, method.trainable(shape), ctx, batch, checkpointing=True)
    assert formula.recompute > 0
    assert counter.get_total_flops() == pytest.approx(formula.hardware, rel=1e-9)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
