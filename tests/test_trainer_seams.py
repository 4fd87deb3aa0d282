"""The Trainer's seams: an objective or a callback written in this file alone (no edit under tunegap/) trains
through the one trainer with its ledger intact, and the strategies choose where a step runs."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from conftest import tiny_config
from tunegap.callbacks import Callback, default_callbacks
from tunegap.costs.flops import train_step_flops
from tunegap.data.packing import make_batch
from tunegap.objectives import OBJECTIVES, LossOutput, Objective, register
from tunegap.objectives.next_token import NextToken
from tunegap.strategies import SingleDevice, pick_device
from tunegap.trainer import run_or_reuse, train


@dataclasses.dataclass
class LastTokenOnly(Objective):
    """A throwaway objective: cross-entropy of each example's last reply token only (one loss token per
    example), with logits computed at those positions alone."""

    name = "last-token-only"

    def prepare_data(self, config, tokenizer):
        return NextToken().prepare_data(config, tokenizer)

    def make_batch(self, examples, *, capacity, pad_id, pack):
        batch = make_batch(examples, capacity=capacity, pad_id=pad_id, pack=pack)
        targets = batch.targets.flatten()
        loss_at = torch.zeros_like(targets, dtype=torch.bool)
        ends = batch.position_ids.flatten() == 0  # each example starts at position 0: the one before it ended one
        starts = ends.nonzero().squeeze(1).tolist()[1:] + [len(targets)]
        for end in starts:
            last = (targets[:end] != -100).nonzero()
            if len(last):
                loss_at[int(last[-1])] = True
        return dataclasses.replace(batch, loss_positions=loss_at.nonzero().squeeze(1))

    def loss(self, ctx, batch):
        with ctx.autocast():
            hidden = ctx.base.get_decoder()(input_ids=batch.input_ids, position_ids=batch.position_ids,
                                            use_cache=False).last_hidden_state
        picked = hidden.flatten(0, 1).index_select(0, batch.loss_positions)
        logits = ctx.base.get_output_embeddings()(picked).float()
        targets = batch.targets.flatten().index_select(0, batch.loss_positions)
        loss = torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
        right = (logits.argmax(-1) == targets).sum()
        return LossOutput(loss, {"last_token_accuracy": float(right)})

    def step_flops(self, shape, trainable, ctx, batch, *, checkpointing):
        return train_step_flops(shape, trainable, sequences=batch.rows, seq_len=batch.width,
                                logit_tokens=batch.n_loss_tokens, checkpointing=checkpointing)


@pytest.fixture
def last_token_objective():
    register(LastTokenOnly)
    yield LastTokenOnly.name
    OBJECTIVES.pop(LastTokenOnly.name)


def test_an_objective_from_a_test_file_trains_with_counted_flops_equal_to_the_formula(tmp_path, last_token_objective):
    ledger = train(tiny_config(tmp_path, objective=last_token_objective, max_steps=3, count_flops_every=1))
    costs = ledger["costs"]
    assert costs["flops_counted_over_formula"]["value"] == pytest.approx(1.0, rel=1e-9)
    # one loss token per example: the objective, not next-token prediction, decided what carries loss
    assert costs["loss_tokens"]["value"] == costs["examples"]["value"] == 3 * 4
    rows = [json.loads(line) for line in (tmp_path / "runs" / "t" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert len(steps) == 3 and all(0.0 <= r["last_token_accuracy"] <= 1.0 for r in steps)
    assert ledger["config"]["objective"] == last_token_objective


def test_an_unknown_objective_is_one_clear_error(tmp_path):
    from tunegap.config import ConfigError

    with pytest.raises(ConfigError, match="--objective: unknown objective 'nope'; choose from"):
        train(tiny_config(tmp_path, objective="nope"))


class CountSteps(Callback):
    def __init__(self):
        self.seen, self.closed = [], False

    def on_step_end(self, trainer, step, row):
        self.seen.append(step)
        return {"steps_seen": len(self.seen)}

    def on_outputs(self, trainer, model, tokenizer):
        return {"callback_saw_final_model": sum(p.numel() for p in model.parameters())}

    def close(self):
        self.closed = True


def test_a_callback_from_a_test_file_adds_its_metrics_to_the_log_and_the_ledger(tmp_path):
    counter = CountSteps()
    ledger = train(tiny_config(tmp_path, max_steps=2), callbacks=[*default_callbacks(tiny_config(tmp_path)), counter])
    assert counter.seen == [1, 2] and counter.closed
    assert ledger["metrics"]["callback_saw_final_model"] == ledger["costs"]["params_total"]["value"]
    rows = [json.loads(line) for line in (tmp_path / "runs" / "t" / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("steps_seen") for r in rows if "loss" in r] == [1, 2]


def test_run_or_reuse_reuses_the_same_settings_and_replaces_changed_ones(tmp_path, capsys):
    config = tiny_config(tmp_path, max_steps=2)
    folder, first = run_or_reuse(config, name="arm")
    _, again = run_or_reuse(config, name="arm")
    assert again == json.loads(json.dumps(first)) and "reusing run arm (same settings" in capsys.readouterr().out
    _, changed = run_or_reuse(dataclasses.replace(config, max_steps=3), name="arm")
    assert changed["costs"]["optimizer_steps"]["value"] == 3 and folder.name == "arm"


def test_one_device_strategy_is_the_identity_on_the_cpu():
    cpu = SingleDevice("cpu")
    assert cpu.total((3, 2.5)) == (3, 2.5) and cpu.gather(1) == [1] and cpu.shard([4, 2]) == [4, 2]
    assert pick_device("cpu") == "cpu"
    assert pick_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_device_cuda_without_a_gpu_is_one_clear_error(tmp_path):
    from tunegap.config import ConfigError

    with pytest.raises(ConfigError, match="--device cuda: torch sees no CUDA GPU"):
        train(tiny_config(tmp_path, device="cuda"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_device_cuda_trains_one_gpu_without_torchrun(tmp_path):
    cpu = train(tiny_config(tmp_path, name="cpu", device="cpu", max_steps=3))
    gpu = train(tiny_config(tmp_path, name="gpu", device="cuda", max_steps=3))
    assert "cuda" in gpu["costs"]["peak_memory_bytes"].get("note", "")
    assert gpu["metrics"]["eval_loss"] == pytest.approx(cpu["metrics"]["eval_loss"], rel=1e-3)
    assert gpu["costs"]["flops_counted_over_formula"]["value"] == pytest.approx(1.0, rel=1e-6)


def test_a_run_started_from_a_run_loads_back_with_every_stage_below_it(tmp_path):
    """LoRA on LoRA: the second run's adapter sits on the first run's merged weights, so loading it back must
    rebuild that start (not the bare base) before merging its own adapter."""
    from tunegap.outputs import load_run

    train(tiny_config(tmp_path, name="first", max_steps=3, lr=1e-2, forgetting=False))
    trainer_config = tiny_config(tmp_path, name="second", init_from="first", max_steps=3, lr=1e-2, forgetting=False)
    from tunegap.trainer import Trainer

    trainer = Trainer(trainer_config)
    trainer.run()
    ids = torch.tensor([[5, 9, 13, 2, 7, 11]])
    with torch.no_grad():
        trained = trainer.ctx.model(input_ids=ids).logits
        loaded = load_run(tmp_path / "runs" / "second").model(input_ids=ids).logits
        first_only = load_run(tmp_path / "runs" / "first").model(input_ids=ids).logits
    assert torch.allclose(loaded, trained, atol=1e-5)
    assert not torch.allclose(loaded, first_only, atol=1e-4)
