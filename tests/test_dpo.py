"""DPO (`--objective dpo`): Eq. 7 by hand, a real held-out margin gain, one model in memory, FLOPs as counted."""

from __future__ import annotations

import contextlib
import gc
import json

import pytest
import torch

from conftest import tiny_config
from tunegap.costs.shape import ModelShape
from tunegap.data.preference import generate_support_preferences, tokenize_preferences
from tunegap.data.sources import Prepared
from tunegap.errors import ConfigError
from tunegap.methods import make_method
from tunegap.models import base_model, load_model
from tunegap.objectives import DPO, Context
from tunegap.objectives.dpo import reference_logps, reply_logps
from tunegap.objectives.pairs import PairExample
from tunegap.trainer import Trainer


def _pairs(tokenizer, n: int) -> list[PairExample]:
    records = generate_support_preferences()[1][:n]
    pairs, _ = tokenize_preferences(tokenizer, records, 512)
    return [PairExample(p) for p in pairs]


def _logp_by_hand(model, side) -> torch.Tensor:
    """log pi(y|x): the reply tokens' log-softmax under the model's own full logits, one unpacked sequence."""
    ids = torch.tensor([side.input_ids])
    logits = model(input_ids=ids).logits[0, :-1].float()
    labels = torch.tensor(side.labels[1:])
    keep = labels != -100
    return torch.log_softmax(logits[keep], dim=-1).gather(1, labels[keep, None]).sum()


def _dpo_by_hand(policy, reference, examples, beta: float) -> tuple[float, float]:
    """Eq. 7 of Rafailov et al. 2023 summed over pairs, and the summed implicit-reward margin."""
    loss = margin = 0.0
    for e in examples:
        (pc, pr), (rc, rr) = ([_logp_by_hand(m, side) for side in e.sides()] for m in (policy, reference))
        z = beta * ((pc - rc) - (pr - rr))
        loss += float(-torch.nn.functional.logsigmoid(z))
        margin += float(z)
    return loss, margin


@pytest.mark.parametrize("method", ["lora", "full"])
def test_loss_equals_equation_7_computed_by_hand(method):
    """LoRA: the reference is the adapter-disabled model, in the step; full: log-probs precomputed in setup.
    Both against a separately loaded copy of the starting weights, with the policy moved away from it."""
    torch.manual_seed(0)
    model, tokenizer = load_model("tiny", seed=0)
    start = load_model("tiny", seed=0)[0].eval()
    prepared = make_method(method)
    model = prepared.prepare(model, ModelShape.from_hf_config(model.config)).eval()
    ctx = Context(model, base_model(model), prepared, tokenizer.pad_token_id, contextlib.nullcontext)
    examples = _pairs(tokenizer, 3)
    objective = DPO(beta=0.5, seq_len=512)
    objective.setup(ctx, Prepared("preference", examples, [], [], {}))
    assert all((e.reference is None) == (method == "lora") for e in examples)
    with torch.no_grad():  # move the policy away from the reference
        for name, p in model.named_parameters():
            if p.requires_grad and (method == "full" or "lora_B" in name):
                p.add_(0.2 * torch.randn_like(p))
        batch = objective.make_batch(examples, capacity=512, pad_id=ctx.pad_id, pack=True)
        out = objective.loss(ctx, batch)
        loss, margin = _dpo_by_hand(model, start, examples, beta=0.5)
    # each log-prob is a sum near -1000 nats whose fp32 rounding (packed vs one sequence) is about 1e-4
    assert float(out.total) == pytest.approx(loss, abs=1e-3)
    assert float(out.metrics["reward_margin"]) == pytest.approx(margin, abs=2e-3)
    assert abs(margin) > 0.1  # the policy really differs from the reference: the check has teeth


def _live_models() -> int:
    """Causal LMs alive in this process (the tiny preset is a Llama)."""
    from transformers import LlamaForCausalLM

    gc.collect()
    return sum(isinstance(o, LlamaForCausalLM) for o in gc.get_objects())


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """20 steps of LoRA DPO on the shipped pairs from the tiny random model; live models counted at the first and
    last step, held-out metrics measured before the first step too."""
    from tunegap.callbacks import Callback, default_callbacks
    from tunegap.objectives.pairs import heldout_means

    class AtStart(Callback):
        def on_train_start(self, trainer):
            self.metrics = heldout_means(trainer.objective, trainer.ctx, trainer.data.eval)

    config = tiny_config(tmp_path_factory.mktemp("dpo"), objective="dpo", method="lora", lr=3e-3, max_steps=20,
                         train_examples=80, eval_examples=100, forgetting=False)
    at_start, before = AtStart(), _live_models()
    trainer = Trainer(config, callbacks=[*default_callbacks(config), at_start])
    live = []
    ledger = trainer.run(on_step=lambda step: live.append(_live_models() - before) if step in (1, 20) else None)
    return trainer, ledger, live, at_start.metrics


def test_dpo_raises_the_heldout_margin(lora_run):
    """At the start the policy is the reference, so every implicit reward is 0 (margin 0, accuracy 0); 20 steps
    make chosen beat rejected on held-out pairs (measured on these 100 pairs over seeds 0-2: margin 0.35-0.70,
    accuracy 0.67-0.74, loss 0.58-0.64)."""
    start, metrics = lora_run[3], lora_run[1]["metrics"]
    assert start["eval_reward_margin"] == 0 and start["eval_reward_accuracy"] == 0
    assert metrics["eval_reward_margin"] > 0.15
    assert metrics["eval_reward_accuracy"] >= 0.6
    assert metrics["eval_loss"] < 0.67  # log 2 = 0.693 at the start


def test_lora_reference_is_the_same_model_with_adapters_disabled(lora_run):
    trainer, ledger, live, _ = lora_run
    assert live == [1, 1]  # one transformers model alive while training: no frozen copy
    assert not any(isinstance(v, torch.nn.Module) for v in vars(trainer.objective).values())
    assert all(e.reference is None for e in trainer.data.train + trainer.data.eval)  # nothing precomputed
    start, _ = load_model("tiny", seed=0)
    assert ledger["costs"]["params_total"]["value"] == sum(p.numel() for p in start.parameters()) + \
        ledger["costs"]["params_trainable"]["value"]  # base + adapters, nothing else
    ctx, objective = trainer.ctx, trainer.objective
    batch = objective.make_batch(trainer.data.eval[:2], capacity=512, pad_id=ctx.pad_id, pack=True)
    start_ctx = Context(start, start, make_method("full"), ctx.pad_id, contextlib.nullcontext)
    with torch.no_grad():
        reference, policy = reference_logps(ctx, batch), reply_logps(ctx, batch)
        assert torch.allclose(reference, reply_logps(start_ctx, batch), rtol=1e-5)  # the starting weights
    assert not torch.allclose(policy, reference, rtol=1e-3)  # while the policy moved


def test_counted_flops_equal_the_formula_with_the_reference_pass_inside(lora_run):
    costs, metrics = lora_run[1]["costs"], lora_run[1]["metrics"]
    assert costs["flops_counted_over_formula"]["value"] == pytest.approx(1.0, rel=1e-9)
    assert "in each step" in metrics["dpo_reference"]
    # the reference forward (no gradients) is part of the step: between a quarter and half of all forward FLOPs
    assert 0.25 < metrics["dpo_reference_flops"] / costs["flops_forward"]["value"] < 0.5


def test_full_weights_precompute_the_reference_and_count_exactly(tmp_path):
    before = _live_models()
    trainer = Trainer(tiny_config(tmp_path, objective="dpo", method="full", max_steps=2, train_examples=8,
                                  eval_examples=4, forgetting=False))
    live = []
    ledger = trainer.run(on_step=lambda step: live.append(_live_models() - before))
    assert live == [1, 1]
    assert all(e.reference is not None for e in trainer.data.train + trainer.data.eval)
    assert ledger["costs"]["flops_counted_over_formula"]["value"] == pytest.approx(1.0, rel=1e-9)
    assert "precomputed" in ledger["metrics"]["dpo_reference"] and ledger["metrics"]["dpo_reference_flops"] > 0
    assert (tmp_path / "runs" / "t" / "model" / "model.safetensors").is_file()


def test_cli_runs_dpo_on_trl_jsonl_files(tmp_path):
    from tunegap.cli import main
    from tunegap.data.preference import write_support_preferences

    train_file, eval_file = write_support_preferences(tmp_path / "pairs", n_train=8, n_eval=4)
    rc = main(["finetune", "--objective", "dpo", "--beta", "0.2", "--model", "tiny", "--data", str(train_file),
               "--eval-data", str(eval_file), "--max-steps", "1", "--batch-size", "2", "--seq-len", "512",
               "--generate-examples", "0", "--forgetting", "off", "--no-progress", "--threads", "1",
               "--precision", "fp32", "--runs-dir", str(tmp_path / "runs"), "--name", "cli"])
    assert rc == 0
    ledger = json.loads((tmp_path / "runs" / "cli" / "ledger.json").read_text())
    assert ledger["config"]["beta"] == 0.2 and ledger["metrics"]["dpo_beta"] == 0.2
    assert ledger["data"]["kind"] == "preference" and ledger["data"]["train_examples"] == 8
    assert ledger["metrics"]["eval_loss"] == pytest.approx(0.693, abs=0.05)  # one step from the reference


def test_init_from_a_lora_sft_run_starts_from_its_merged_weights(tmp_path):
    from tunegap.outputs import load_run
    from tunegap.trainer import train

    train(tiny_config(tmp_path, name="sft", max_steps=2, lr=1e-2, train_examples=8, forgetting=False))
    trainer = Trainer(tiny_config(tmp_path, name="dpo", objective="dpo", init_from="sft", max_steps=1,
                                  train_examples=4, eval_examples=2, forgetting=False))
    trainer.run()
    sft = load_run(tmp_path / "runs" / "sft").model
    ctx = trainer.ctx
    batch = trainer.objective.make_batch(trainer.data.eval, capacity=512, pad_id=ctx.pad_id, pack=True)
    sft_ctx = Context(sft, sft, make_method("full"), ctx.pad_id, contextlib.nullcontext)
    start = load_model("tiny", seed=0)[0]
    start_ctx = Context(start, start, make_method("full"), ctx.pad_id, contextlib.nullcontext)
    with torch.no_grad():
        reference = reference_logps(ctx, batch)
        assert torch.allclose(reference, reply_logps(sft_ctx, batch), rtol=1e-5)
        assert not torch.allclose(reference, reply_logps(start_ctx, batch), rtol=1e-3)


def test_init_from_is_refused_where_it_cannot_match(tmp_path):
    from tunegap.trainer import train

    with pytest.raises(ConfigError, match="drop --init scratch"):
        train(tiny_config(tmp_path, objective="dpo", init_from="some-run", init="scratch"))
    with pytest.raises(ConfigError, match="--init-from no-such-run: cannot start from it"):
        train(tiny_config(tmp_path, objective="dpo", init_from="no-such-run"))
    with pytest.raises(ConfigError, match="--beta"):
        tiny_config(tmp_path, objective="dpo", beta=0.0)


def test_killed_full_dpo_run_resumes_to_the_same_weights(tmp_path):
    """The reference log-probs are precomputed in setup, before --resume loads the checkpoint, so the resumed run
    compares against the starting weights too and ends where an uninterrupted run does."""
    from safetensors.torch import load_file

    from tunegap.trainer import train

    common = dict(objective="dpo", method="full", max_steps=4, checkpoint_every=2, train_examples=16,
                  eval_examples=2, forgetting=False)
    train(tiny_config(tmp_path, name="straight", **common))

    def crash(step):
        if step == 3:
            raise KeyboardInterrupt  # dies after step 3; the newest checkpoint is step 2

    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(tmp_path, name="killed", **common), on_step=crash)
    train(tiny_config(tmp_path, name="killed", resume=True, **common))
    runs = tmp_path / "runs"
    newest = lambda name: sorted((runs / name / "checkpoints").glob("step-*"))[-1] / "trainable.safetensors"
    a, b = load_file(str(newest("straight"))), load_file(str(newest("killed")))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
